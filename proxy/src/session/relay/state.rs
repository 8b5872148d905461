//! Statements, portals and Query progress as the relay tracks them.

use std::sync::Arc;

use bytes::Bytes;
use rules::sql::{Analysis, StatementPlan};

use crate::protocol::Frame;
use crate::protocol::messages::{ErrorResponse, FieldDesc};
use crate::session::analysis::Decided;
use crate::session::rows::RowPlan;

#[derive(Debug, Default)]
pub(super) struct Prepared {
    /// Which definition this is (names are reused); a Close forgets only the one it named.
    pub id: u64,
    pub plan: Arc<StatementPlan>,
    pub desc: Option<Arc<Vec<FieldDesc>>>,
    /// The session's view generation it was decided under (I11).
    pub generation: u64,
    /// The client's text and the rest of its Parse (parameter types), to decide it again
    /// after a rules change: copies, not slices of the read buffer. Empty for the unnamed
    /// statement, which clients parse anew.
    pub text: Bytes,
    pub rest: Bytes,
}

/// A statement prepared with SQL PREPARE, the view generation it was decided under, and its
/// PREPARE as the client wrote it (to decide again after a rules change).
#[derive(Debug)]
pub(super) struct SqlPrepared {
    pub plan: Arc<StatementPlan>,
    pub generation: u64,
    pub text: Arc<str>,
}

/// A statement pgveil puts before a client's Query, whose CommandComplete the client does not
/// see: the DEALLOCATE and PREPARE that prepare a SQL statement again after a reload (I11).
#[derive(Debug)]
pub(super) enum Leading {
    Deallocate,
    /// Once its CommandComplete arrives, the server holds the newly decided statement.
    Prepare(String, SqlPrepared),
}

#[derive(Debug, Default)]
pub(super) struct Portal {
    pub plan: Arc<StatementPlan>,
    pub formats: Vec<i16>,
    /// From Describe('P'): real formats.
    pub desc: Option<Arc<Vec<FieldDesc>>>,
    /// From the statement's Describe('S'): formats come from Bind.
    pub stmt_desc: Option<Arc<Vec<FieldDesc>>>,
    pub row_plan: Option<Arc<RowPlan>>,
    pub rows: u64,
    pub cut: bool,
    /// The client sent Describe('P') for it: its answer will come before any row.
    pub described: bool,
    /// Bound to a statement name the proxy has no plan for: its rows are refused (I1).
    pub unknown_statement: bool,
    /// The view generation its statement was decided under (I11).
    pub generation: u64,
    /// An Execute of its name went out before the server confirmed its Bind: if the Bind never
    /// runs, that Execute runs the server's own portal of the name, a SQL cursor declared
    /// under this generation (`Some`) or none pgveil knows (`None`), as of that Execute.
    pub declared_if_unbound: Option<u64>,
    /// Its Bind is sent and not yet confirmed by BindComplete.
    pub bind_pending: bool,
}

#[derive(Debug)]
pub(super) struct QueryState {
    /// The analysis of the Query's text: one plan per statement, shared with the cache.
    pub analysis: Arc<Analysis>,
    pub idx: usize,
    pub row_plan: Option<Arc<RowPlan>>,
    pub blocked: Option<Box<ErrorResponse>>,
    pub rows: u64,
    pub cut: bool,
    pub source: Option<Source>,
    /// Statements pgveil sent ahead of the client's, answered first (oldest first).
    pub leading: std::collections::VecDeque<Leading>,
}

impl QueryState {
    pub fn new(analysis: Arc<Analysis>, blocked: Option<Box<ErrorResponse>>) -> Self {
        QueryState {
            analysis,
            idx: 0,
            row_plan: None,
            blocked,
            rows: 0,
            cut: false,
            source: None,
            leading: std::collections::VecDeque::new(),
        }
    }

    pub fn plan(&self) -> Option<&StatementPlan> {
        self.analysis.statements.get(self.idx)
    }
}

/// A row plan remembered with the RowDescription it was built from, under the catalog and
/// policy generations of the time, for `key`: the result it answered (a Query's analysis and
/// statement index, or a portal's statement plan, compared by identity). A simple-protocol
/// workload describes the same result for every literal it sends, and libpq's
/// `PQexecPrepared` describes its portal at every execution: the next description with the
/// same bytes, for the same key and generations, gets the same plan.
#[derive(Debug)]
pub(super) struct PlanMemo<K> {
    pub key: K,
    pub desc: bytes::Bytes,
    pub generations: (u64, u64),
    pub fields: Arc<Vec<FieldDesc>>,
    pub plan: Arc<RowPlan>,
}

impl<K> PlanMemo<K> {
    pub fn new(
        key: K,
        desc: &Frame,
        generations: (u64, u64),
        fields: &Arc<Vec<FieldDesc>>,
        plan: &Arc<RowPlan>,
    ) -> Self {
        // A copy: the frame shares the read buffer, which must not be kept.
        let desc = bytes::Bytes::copy_from_slice(desc.as_bytes());
        PlanMemo { key, desc, generations, fields: Arc::clone(fields), plan: Arc::clone(plan) }
    }

    /// The remembered description and plan, when `same` says the key is this result's and
    /// `desc` is the remembered description under the same generations.
    pub fn get(
        memo: Option<&Self>,
        same: impl Fn(&K) -> bool,
        generations: (u64, u64),
        desc: &Frame,
    ) -> Option<(Arc<Vec<FieldDesc>>, Arc<RowPlan>)> {
        memo.filter(|m| m.generations == generations && same(&m.key) && m.desc == desc.as_bytes())
            .map(|m| (Arc::clone(&m.fields), Arc::clone(&m.plan)))
    }
}

/// The client's text of a statement the server runs rewritten, to map error positions back.
#[derive(Debug, Clone)]
pub(super) struct Source {
    pub decided: Decided,
    /// A slice of the client's frame (no copy).
    pub original: Bytes,
    /// Characters pgveil sent ahead of the client's text (statements it put first).
    pub shift: usize,
}

impl Source {
    pub fn map(&self, position: usize) -> Option<usize> {
        let position = position.checked_sub(self.shift).filter(|p| *p > 0)?;
        let Some(rw) = self.decided.analysis.rewrite.as_ref() else { return Some(position) };
        rw.map_position(std::str::from_utf8(&self.original).ok()?, self.decided.rewritten()?, position)
    }
}

/// `part` (a slice of `frame`'s bytes) as a shared slice of them, without copying.
pub(super) fn slice_of(frame: &Frame, part: &[u8]) -> Bytes {
    let whole = frame.as_bytes();
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize);
    match start.and_then(|s| Some((s, s.checked_add(part.len())?))) {
        Some((s, e)) if e <= whole.len() => whole.slice(s..e),
        _ => Bytes::copy_from_slice(part),
    }
}
