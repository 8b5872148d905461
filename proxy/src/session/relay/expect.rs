//! What the relay expects from the server: one entry per message it sent, in order, so each
//! server message is known to answer a particular client message. After an error in the
//! extended protocol the server skips to Sync; so does the queue.

use std::collections::VecDeque;

use bytes::Bytes;

use super::state::{QueryState, Source};
use crate::protocol::messages::ErrorResponse;
use crate::session::SessionError;

#[derive(Debug)]
pub(super) enum Expect {
    Parse {
        blocked: Option<Box<ErrorResponse>>,
        source: Option<Source>,
    },
    Bind(BindUndo),
    /// `swallow`: a Describe pgveil sent itself (after preparing a statement again), whose
    /// answers update the statement's description and are not for the client.
    DescribeStatement {
        name: Bytes,
        swallow: bool,
    },
    DescribePortal {
        portal: u64,
        swallow: bool,
    },
    /// By portal id: a later Bind of the same name (pipelines) must not change which
    /// portal these rows belong to.
    Execute(u64),
    /// Close of a statement (`S`) or portal (`P`): forgotten when the server confirms, since
    /// results of earlier messages in the same pipeline may still need it.
    Close(u8, Bytes, u64),
    Sync,
    Query(QueryState),
    FunctionCall,
    /// The answer (by its tag: `1` ParseComplete, `3` CloseComplete) to a message pgveil sent
    /// on its own (a statement prepared again after a rules change): not for the client.
    Injected(u8),
    /// The ParseComplete of a statement prepared again after a rules change (not for the
    /// client); if it never comes, the server still holds the old text.
    Reprepared(Bytes),
}

/// What a Bind changed in the relay's portal names, undone if the server never runs it (an
/// error answers it or an earlier one makes the server skip it): a later Execute of the name
/// must find the portal the server has, not one it refused to create.
#[derive(Debug)]
pub(super) struct BindUndo {
    pub portal: Bytes,
    pub id: u64,
    pub previous: Option<u64>,
}

/// What the server skips after an error, up to Sync.
#[derive(Debug, Default)]
pub(super) struct Skipped {
    /// Statements whose new Parse the server will now not run.
    pub not_reprepared: Vec<Bytes>,
    /// Binds it will not run, oldest first.
    pub binds: Vec<BindUndo>,
}

/// The expected responses, oldest first.
#[derive(Debug, Default)]
pub(super) struct Queue {
    items: VecDeque<Expect>,
}

impl Queue {
    pub fn push_back(&mut self, e: Expect) {
        self.items.push_back(e);
    }

    pub fn front(&self) -> Option<&Expect> {
        self.items.front()
    }

    pub fn front_mut(&mut self) -> Option<&mut Expect> {
        self.items.front_mut()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn back(&self) -> Option<&Expect> {
        self.items.back()
    }

    /// Keeps the oldest `n` entries.
    pub fn truncate(&mut self, n: usize) {
        self.items.truncate(n);
    }

    pub fn pop_front(&mut self) -> Option<Expect> {
        self.items.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Expect> {
        self.items.iter()
    }

    /// The oldest entry, which `ok` says this server message answers. Anything else means the
    /// server answered something we did not ask for: we no longer know what its messages
    /// mean, so the session ends (fail closed, I8).
    pub fn pop(&mut self, ok: impl Fn(&Expect) -> bool) -> Result<Expect, SessionError> {
        match self.items.pop_front() {
            Some(e) if ok(&e) => Ok(e),
            _ => Err(SessionError::UnexpectedServerMessage(b'?')),
        }
    }

    /// After an ErrorResponse in the extended protocol: the server ignores every message up
    /// to the next Sync, so their answers will never come.
    pub fn skip_to_sync(&mut self) -> Skipped {
        let mut skipped = Skipped::default();
        while self.items.front().is_some_and(|e| !matches!(e, Expect::Sync)) {
            match self.items.pop_front() {
                Some(Expect::Reprepared(name)) => skipped.not_reprepared.push(name),
                Some(Expect::Bind(undo)) => skipped.binds.push(undo),
                _ => {}
            }
        }
        skipped
    }

    /// Answers still expected for portal `from` belong to portal `to` (a Bind that never ran:
    /// a later Execute of its name runs the portal the server has under that name).
    pub fn repoint(&mut self, from: u64, to: u64) {
        for e in &mut self.items {
            match e {
                Expect::Execute(id) | Expect::DescribePortal { portal: id, .. } if *id == from => *id = to,
                _ => {}
            }
        }
    }

    /// Whether a Close of this statement is still on its way (a Parse of the same name then
    /// defines it anew).
    pub fn closing_statement(&self, name: &[u8]) -> bool {
        self.items.iter().any(|e| matches!(e, Expect::Close(b'S', n, _) if n == name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_to_sync_keeps_the_sync_and_what_follows() {
        let mut q = Queue::default();
        let bind = |id| Expect::Bind(BindUndo { portal: Bytes::from_static(b"p"), id, previous: None });
        for e in [bind(1), Expect::Execute(1), Expect::Sync, bind(2)] {
            q.push_back(e);
        }
        let skipped = q.skip_to_sync();
        assert!(skipped.not_reprepared.is_empty());
        assert_eq!(skipped.binds.iter().map(|b| b.id).collect::<Vec<_>>(), [1], "the Bind to undo");
        assert!(matches!(q.pop_front(), Some(Expect::Sync)));
        assert!(matches!(q.pop_front(), Some(Expect::Bind(_))));
        assert!(q.is_empty());
        assert!(q.pop(|_| true).is_err(), "an answer nothing was sent for ends the session");
    }
}
