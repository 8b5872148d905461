//! What the server stores for the session across a rules change (threat model I11). The
//! server keeps the text pgveil sent when a statement was prepared, a cursor declared or a
//! portal bound; after a reload that changes what this session sees, none of it may run as
//! decided before:
//!
//! - a protocol-prepared statement (whose text pgveil keeps) is prepared again, transparently:
//!   the client's Bind is preceded by a Close and a Parse of the newly decided text, whose
//!   answers the client never sees;
//! - a SQL-prepared statement executed by a simple Query is prepared again the same way: its
//!   PREPARE, decided again, and a DEALLOCATE go first in that Query, answers unseen (an error
//!   in them skips the client's statements, so the old text never runs);
//! - SQL `EXECUTE` of a statement prepared before from anywhere else (a protocol Parse),
//!   `FETCH` / `MOVE` from a cursor declared before, and protocol Execute of a portal bound
//!   before are refused, naming the reload;
//! - a session that created a temporary view, a rule or a function (text on the server pgveil
//!   cannot decide again) ends with a FATAL saying why.

use bytes::{BufMut, Bytes, BytesMut};
use rules::sql::{Analysis, Block, Effect};

use super::Relay;
use super::expect::Expect;
use super::state::{Portal, Prepared};
use crate::audit::EventKind;
use crate::protocol::Frame;
use crate::protocol::messages::{self, ErrorResponse, sqlstate};
use crate::session::SessionError;
use crate::session::analysis::Decided;

/// The audit rule of refusals of server-side objects decided under earlier rules.
pub(crate) const RULES_RELOADED: &str = "rules_reloaded";

/// At most this many SQL cursor names are remembered (a session that declares more keeps the
/// latest; a forgotten one is refused when fetched, never run as decided before).
const MAX_CURSORS: usize = 1024;

impl Relay {
    /// For a Bind of a named statement decided before the last rules change: its name and the
    /// client's text, to decide again ([`Relay::reprepare`]) before the Bind is handled.
    pub(crate) fn stale_statement(&self, f: &Frame) -> Option<(Bytes, Bytes)> {
        // Until a reload changed what the session sees (or a re-prepare was skipped), no
        // statement can be stale: the Bind is not read twice.
        if f.tag() != b'B' || (self.rules.view_generation() == 0 && !self.stale_marked) {
            return None;
        }
        let bind = messages::bind_message(f)?;
        let (name, p) = self.statements.get_key_value(bind.statement)?;
        (!name.is_empty() && !p.text.is_empty() && p.generation != self.rules.view_generation())
            .then(|| (name.clone(), p.text.clone()))
    }

    /// Prepares `name` again with its newly decided text (or a failing statement, if it is
    /// now blocked): a Close and a Parse the client did not send, whose answers it does not
    /// see. A statement that is now blocked is gone; the client's Bind then fails with the
    /// block's error.
    pub(crate) fn reprepare(&mut self, name: Bytes, decided: &Decided) {
        let Some(old) = self.statements.remove(&name) else { return };
        let mut close = BytesMut::new();
        close.put_u8(b'S');
        close.put_slice(&name);
        close.put_u8(0);
        messages::tagged(&mut self.to_server, b'C', &close);
        self.expect.push_back(Expect::Injected(b'3'));
        let text = String::from_utf8_lossy(&old.text).into_owned();
        match self.verdict(&decided.analysis, text.as_bytes()) {
            Some(err) => {
                let mut body = BytesMut::new();
                body.put_slice(&name);
                body.put_u8(0);
                body.put_slice(super::BLOCKED_SQL);
                body.put_u8(0);
                body.put_u16(0);
                messages::tagged(&mut self.to_server, b'P', &body);
                self.expect.push_back(Expect::Parse { blocked: Some(err), source: None });
            }
            None => {
                let sent = decided.rewritten().map_or(old.text.as_ref(), str::as_bytes);
                messages::tagged_parts(&mut self.to_server, b'P', &[&name, b"\0", sent, b"\0", &old.rest]);
                self.expect.push_back(Expect::Reprepared(name.clone()));
                // Its new description (a substituted column reports no origin): the old one
                // would have the result-column layer mask what the server already masked.
                let mut describe = BytesMut::new();
                describe.put_u8(b'S');
                describe.put_slice(&name);
                describe.put_u8(0);
                messages::tagged(&mut self.to_server, b'D', &describe);
                self.expect.push_back(Expect::DescribeStatement { name: name.clone(), swallow: true });
                self.next_id = self.next_id.wrapping_add(1);
                let plan = std::sync::Arc::new(decided.analysis.statements.first().cloned().unwrap_or_default());
                let generation = self.rules.view_generation();
                let fresh = Prepared { id: self.next_id, plan, desc: None, generation, text: old.text, rest: old.rest };
                self.statements.insert(name, fresh);
            }
        }
        self.shared.metrics.reprepared_statements_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The SQL-prepared statements a Query executes that were decided under earlier rules,
    /// with their PREPARE as the client wrote it, to decide again ([`Relay::reprepare_sql`]).
    pub(crate) fn stale_sql(&self, analysis: &Analysis) -> Vec<(String, std::sync::Arc<str>)> {
        let current = self.rules.view_generation();
        let mut out: Vec<(String, std::sync::Arc<str>)> = Vec::new();
        for e in &analysis.effects {
            if let Effect::Executes(n) = e
                && let Some(p) = self.sql_prepared.get(n).filter(|p| p.generation != current)
                && !out.iter().any(|(m, _)| m == n)
            {
                out.push((n.clone(), std::sync::Arc::clone(&p.text)));
            }
        }
        out
    }

    /// Queues `name`'s PREPARE, newly decided, to go ahead of the client's next Query. One now
    /// blocked is not queued: the EXECUTE is then refused as stale.
    pub(crate) fn reprepare_sql(&mut self, name: String, text: &str, decided: &Decided) {
        if decided.analysis.block.is_some() && !self.rules.observe {
            return;
        }
        let plan = std::sync::Arc::new(decided.analysis.statements.first().cloned().unwrap_or_default());
        let generation = self.rules.view_generation();
        let sent = decided.rewritten().unwrap_or(text).to_owned();
        self.fresh_sql.push((
            name,
            sent,
            super::state::SqlPrepared { plan, generation, text: std::sync::Arc::from(text) },
        ));
        self.shared.metrics.reprepared_statements_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends the server a failing Parse in place of a refused extended-protocol message;
    /// `err` replaces its error, and the server skips to the Sync as it would.
    pub(super) fn push_blocked_parse(&mut self, err: Box<ErrorResponse>) {
        let mut body = BytesMut::new();
        body.put_slice(b"pgveil_refused\0");
        body.put_slice(super::BLOCKED_SQL);
        body.put_u8(0);
        body.put_u16(0);
        messages::tagged(&mut self.to_server, b'P', &body);
        self.expect.push_back(Expect::Parse { blocked: Some(err), source: None });
    }

    /// Marks a statement as decided under no current rules (its new Parse did not run).
    pub(super) fn forget_generation(&mut self, name: &[u8]) {
        if let Some(p) = self.statements.get_mut(name) {
            p.generation = u64::MAX;
            self.stale_marked = true;
        }
    }

    /// Refuses the Execute of a portal bound before the last rules change.
    pub(super) fn stale_portal(&mut self, portal: u64, name: &[u8]) -> Option<Box<ErrorResponse>> {
        let p = self.portals.get(&portal)?;
        if p.generation == self.rules.view_generation() {
            return None;
        }
        let shown = if name.is_empty() {
            "the unnamed portal".to_owned()
        } else {
            format!("portal \"{}\"", String::from_utf8_lossy(name))
        };
        Some(self.refuse_stale(&format!("{shown} was bound"), "bind it again", None))
    }

    /// Refuses SQL that runs what the server stored under earlier rules: EXECUTE of a
    /// statement prepared, FETCH / MOVE from a cursor declared, before the last rules change.
    pub(super) fn stale_use(&mut self, analysis: &Analysis, text: Option<&str>) -> Option<Box<ErrorResponse>> {
        let current = self.rules.view_generation();
        for e in &analysis.effects {
            let what = match e {
                Effect::Executes(n)
                    if self.sql_prepared.get(n).is_some_and(|p| p.generation != current)
                        && !self.fresh_sql.iter().any(|(m, ..)| m == n) =>
                {
                    (format!("prepared statement \"{n}\" was prepared"), "DEALLOCATE it and PREPARE it again")
                }
                Effect::Fetches(n)
                    if self.cursors.get(n).or(self.cursors_floor.as_ref()).is_some_and(|g| *g != current) =>
                {
                    (format!("cursor \"{n}\" was declared"), "CLOSE it and DECLARE it again")
                }
                _ => continue,
            };
            return Some(self.refuse_stale(&what.0, what.1, text));
        }
        None
    }

    /// A portal the client executes without having bound it: a SQL cursor (its rows are what
    /// FETCH gives, its query decided at DECLARE; one declared under earlier rules is refused
    /// as its FETCH would be), or one pgveil knows nothing of, whose rows a masked session
    /// never sees (I1). A portal of its own for this Execute, forgotten once answered.
    pub(super) fn unbound_portal(&mut self, name: &[u8]) -> u64 {
        if name.is_empty() {
            return 0;
        }
        let declared = self.cursor_declared(name);
        self.cursor_portal(declared)
    }

    /// The generation the SQL cursor of this name was declared under, if pgveil remembers it.
    /// A name it does not remember (a cursor forgotten past `MAX_CURSORS`, a portal a function
    /// opened) is not taken for a cursor: its rows are refused (fail closed, I1).
    pub(super) fn cursor_declared(&self, name: &[u8]) -> Option<u64> {
        std::str::from_utf8(name).ok().and_then(|n| self.cursors.get(n).copied())
    }

    /// A portal of its own for the server's portal of a cursor declared under `declared`
    /// (`None`: a portal pgveil knows nothing of, whose rows a masked session never sees).
    pub(super) fn cursor_portal(&mut self, declared: Option<u64>) -> u64 {
        let current = self.rules.view_generation();
        self.next_id = self.next_id.wrapping_add(1);
        let portal = Portal {
            unknown_statement: declared.is_none(),
            generation: declared.unwrap_or(current),
            ..Portal::default()
        };
        self.portals.insert(self.next_id, portal);
        self.next_id
    }

    pub(super) fn remember_cursor(&mut self, name: &str) {
        if self.cursors.len() >= MAX_CURSORS && !self.cursors.contains_key(name) {
            // A cursor not remembered counts as declared under the oldest generation
            // forgotten, so forgetting never lets one run as decided before.
            let oldest = self.cursors.values().copied().min();
            self.cursors_floor = self.cursors_floor.into_iter().chain(oldest).min();
            self.cursors.clear();
        }
        self.cursors.insert(name.to_owned(), self.rules.view_generation());
    }

    /// The session created server-side text no rules change reaches, and the rules changed
    /// since: it ends (I11).
    pub(crate) fn stored_code_stale(&self) -> Option<SessionError> {
        let created = self.stored_code?;
        (created != self.rules.view_generation()).then(|| {
            SessionError::Refused(Box::new(
                ErrorResponse::fatal(
                    sqlstate::INSUFFICIENT_PRIVILEGE,
                    "pgveil: the rules were reloaded, and this session created views, rules or functions under the \
                     earlier rules, which pgveil cannot decide again",
                )
                .with_hint("reconnect; objects a session creates are decided under the rules of their time"),
            ))
        })
    }

    fn refuse_stale(&mut self, what: &str, hint: &str, text: Option<&str>) -> Box<ErrorResponse> {
        let b = Block {
            rule: RULES_RELOADED.to_owned(),
            reason: format!("{what} under rules that have been reloaded since"),
            hint: hint.to_owned(),
            tables: Vec::new(),
            columns: Vec::new(),
            check: None,
            sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
        };
        // Audited and counted as a block, but not a probe: the client did nothing wrong.
        self.shared.metrics.blocked(&b.rule, &b.rule);
        self.audit_block(EventKind::QueryBlocked, &b, text, None, &[]);
        Box::new(super::block_error(&b))
    }
}
