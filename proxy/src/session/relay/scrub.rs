//! Errors, notices and settings from the server: a blocked statement's or a cut result's
//! error in place of the server's, positions mapped back to the client's text, the
//! second layer's scrubbing of masked sessions' errors, and pinned settings kept pinned.

use super::expect::Expect;
use super::state::Source;
use super::{Relay, is_unsafe_encoding};
use crate::protocol::Frame;
use crate::protocol::messages::{self, ErrorResponse, sqlstate};
use crate::session::SessionError;
use crate::session::rows;

impl Relay {
    pub(super) fn send_error(&mut self, e: &ErrorResponse) {
        if !self.suppress {
            e.encode(&mut self.to_client);
        }
    }

    pub(super) fn error(&mut self, f: &Frame) -> Result<(), SessionError> {
        let strict = self.rules.is_strict();
        let mut replacement: Option<ErrorResponse> = None;
        let mut source: Option<Source> = None;
        match self.expect.front_mut() {
            Some(Expect::Query(q)) if !q.leading.is_empty() => {
                // A statement pgveil put first failed: the server skips the client's too.
                let name = q.leading.iter().find_map(|l| match l {
                    super::state::Leading::Prepare(name, _) => Some(name.clone()),
                    super::state::Leading::Deallocate => None,
                });
                if matches!(q.leading.front(), Some(super::state::Leading::Prepare(..)))
                    && let Some(n) = &name
                {
                    // Its DEALLOCATE ran: the server no longer holds the statement.
                    self.sql_prepared.remove(n);
                }
                q.leading.clear();
                let shown = name.unwrap_or_default();
                let server = messages::error_fields(f)
                    .and_then(|fields| fields.into_iter().find(|(k, _)| *k == b'M'))
                    .map(|(_, m)| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_default();
                replacement = Some(
                    ErrorResponse::error(
                        sqlstate::INSUFFICIENT_PRIVILEGE,
                        format!(
                            "pgveil: prepared statement \"{shown}\" could not be prepared again after a rules reload: \
                             {server}"
                        ),
                    )
                    .with_hint("DEALLOCATE it and PREPARE it again"),
                );
            }
            Some(Expect::Query(q)) => {
                source.clone_from(&q.source);
                if let Some(b) = q.blocked.take() {
                    replacement = Some(*b);
                } else if q.cut {
                    let limit = q.plan().and_then(|p| p.max_rows.clone());
                    if let Some(l) = limit {
                        replacement = Some(Self::limit_error(l.rows, &l.rule));
                    }
                    q.cut = false;
                }
            }
            Some(Expect::FunctionCall) => {}
            _ => {
                // Extended protocol: the server now skips to Sync; so do our expectations.
                match self.expect.front() {
                    Some(Expect::Parse { blocked: Some(b), .. }) => replacement = Some((**b).clone()),
                    Some(Expect::Parse { source: s, .. }) => source.clone_from(s),
                    Some(Expect::Execute(portal)) => {
                        if let Some(l) =
                            self.portals.get(portal).filter(|p| p.cut).and_then(|p| p.plan.max_rows.clone())
                        {
                            replacement = Some(Self::limit_error(l.rows, &l.rule));
                        }
                    }
                    _ => {}
                }
                let skipped = self.expect.skip_to_sync();
                for name in skipped.not_reprepared {
                    // Its Parse never ran: the server still holds the text decided under the
                    // earlier rules, so it is prepared again at its next Bind.
                    self.forget_generation(&name);
                }
                // Binds that never ran (the failed one included) name no portal of theirs.
                // Messages after the Sync that were sent before this answer came may name
                // them: they run what the server has under the name instead.
                for undo in skipped.binds.into_iter().rev() {
                    if self.portal_names.get(&undo.portal) == Some(&undo.id) {
                        match undo.previous {
                            Some(id) => self.portal_names.insert(undo.portal.clone(), id),
                            None => self.portal_names.remove(&undo.portal),
                        };
                    }
                    let instead = match undo.previous {
                        Some(id) => id,
                        None if undo.portal.is_empty() => 0,
                        None => {
                            let declared = self.portals.get(&undo.id).and_then(|p| p.declared_if_unbound);
                            self.cursor_portal(declared)
                        }
                    };
                    self.expect.repoint(undo.id, instead);
                }
            }
        }
        if self.suppress {
            return Ok(());
        }
        match (replacement, source) {
            (Some(e), _) => e.encode(&mut self.to_client),
            (None, Some(src)) => {
                rows::scrub_error_mapped(f, &mut self.to_client, &|p| src.map(p));
            }
            (None, None) if strict => {
                rows::scrub_error(f, &mut self.to_client);
            }
            (None, None) => self.forward(f),
        }
        Ok(())
    }

    pub(super) fn parameter_status(&mut self, f: &Frame) -> Result<(), SessionError> {
        if !self.rules.is_strict() {
            return Ok(());
        }
        let (name, value) = messages::parameter_status(f).ok_or(SessionError::UnexpectedServerMessage(b'S'))?;
        let unsafe_value = match name {
            b"standard_conforming_strings" => value != b"on",
            b"client_encoding" => is_unsafe_encoding(value),
            _ => false,
        };
        if unsafe_value {
            // A setting that changes how statements are lexed changed under us (I9).
            return Err(SessionError::Refused(Box::new(ErrorResponse::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "pgveil: a setting that masked sessions must keep pinned was changed; closing the session",
            ))));
        }
        Ok(())
    }
}
