//! The inspecting relay for sessions the rules apply to: every statement is analysed before
//! it reaches the server, every result is masked on its way back, and blocked statements are
//! answered with SQLSTATE 42501 while the server is made to fail at the same point (threat
//! model I10), so client and server agree on what ran and one ReadyForQuery follows each Sync.
//!
//! The session keeps a queue of the responses it expects, one entry per message sent to the
//! server, mirroring the server's skip-to-Sync after an error.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{BufMut, Bytes, BytesMut};
use rules::Mode;
use rules::sql::{Analysis, Block, ColumnUse, Effect, RowLimit, StatementPlan};
use tokio::io::{AsyncRead, AsyncWrite};

use super::analysis::{Decided, SessionRules};
use super::conn::Conn;
use super::rows::{self, RowPlan};
use super::{SessionError, SessionInfo};
use crate::Shared;
use crate::audit::{Event, EventKind};
use crate::protocol::messages::{self, ErrorResponse, FieldDesc, sqlstate};
use crate::protocol::{Direction, Frame};

/// Text the server is sent in place of a blocked statement: a syntax error, so the server
/// fails at the same point and skips to Sync (or ends the Query) exactly as it would have.
const BLOCKED_SQL: &[u8] = b"PGVEIL BLOCKED STATEMENT";

#[derive(Debug, Default)]
struct Prepared {
    /// Which definition this is (names are reused); a Close forgets only the one it named.
    id: u64,
    plan: Arc<StatementPlan>,
    desc: Option<Arc<Vec<FieldDesc>>>,
}

#[derive(Debug, Default)]
struct Portal {
    plan: Arc<StatementPlan>,
    formats: Vec<i16>,
    /// From Describe('P'): real formats.
    desc: Option<Arc<Vec<FieldDesc>>>,
    /// From the statement's Describe('S'): formats come from Bind.
    stmt_desc: Option<Arc<Vec<FieldDesc>>>,
    row_plan: Option<Arc<RowPlan>>,
    rows: u64,
    cut: bool,
    /// The client sent Describe('P') for it: its answer will come before any row.
    described: bool,
    /// Bound to a statement name the proxy has no plan for: its rows are refused (I1).
    unknown_statement: bool,
}

#[derive(Debug)]
struct QueryState {
    /// The analysis of the Query's text: one plan per statement, shared with the cache.
    analysis: Arc<Analysis>,
    idx: usize,
    row_plan: Option<Arc<RowPlan>>,
    blocked: Option<Box<ErrorResponse>>,
    rows: u64,
    cut: bool,
    source: Option<Source>,
    /// A search_path to follow once the server completed this Query (see `verdict`).
    pending_path: Option<Option<Vec<String>>>,
}

impl QueryState {
    fn new(analysis: Arc<Analysis>, blocked: Option<Box<ErrorResponse>>) -> Self {
        QueryState { analysis, idx: 0, row_plan: None, blocked, rows: 0, cut: false, source: None, pending_path: None }
    }

    fn plan(&self) -> Option<&StatementPlan> {
        self.analysis.statements.get(self.idx)
    }
}

/// The client's text of a statement the server runs rewritten, to map error positions back.
#[derive(Debug, Clone)]
struct Source {
    decided: Decided,
    /// A slice of the client's frame (no copy).
    original: Bytes,
}

impl Source {
    fn map(&self, position: usize) -> Option<usize> {
        let rw = self.decided.analysis.rewrite.as_ref()?;
        rw.map_position(std::str::from_utf8(&self.original).ok()?, self.decided.rewritten()?, position)
    }
}

/// `part` (a slice of `frame`'s bytes) as a shared slice of them, without copying.
fn slice_of(frame: &Frame, part: &[u8]) -> Bytes {
    let whole = frame.as_bytes();
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize);
    match start.and_then(|s| Some((s, s.checked_add(part.len())?))) {
        Some((s, e)) if e <= whole.len() => whole.slice(s..e),
        _ => Bytes::copy_from_slice(part),
    }
}

#[derive(Debug)]
enum Expect {
    Parse {
        blocked: Option<Box<ErrorResponse>>,
        source: Option<Source>,
    },
    Bind,
    DescribeStatement(Bytes),
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
}

pub(super) struct Inspector<'a> {
    shared: &'a Arc<Shared>,
    info: &'a SessionInfo,
    live: &'a Arc<crate::containment::Live>,
    budget: crate::containment::ProbeBudget,
    /// The probe budget was spent: the session ends once this message is handled.
    over_budget: bool,
    rules: SessionRules,
    backend: (u32, Bytes),
    statements: HashMap<Bytes, Prepared>,
    /// Portals by id; `portal_names` says which id a name currently denotes.
    portals: HashMap<u64, Portal>,
    portal_names: HashMap<Bytes, u64>,
    sql_prepared: HashMap<String, Arc<StatementPlan>>,
    expect: VecDeque<Expect>,
    to_client: BytesMut,
    to_server: BytesMut,
    /// After the proxy itself failed a statement mid-flight (a row limit), the server's
    /// further output up to ReadyForQuery is not for the client.
    suppress: bool,
    /// The cancel sent for a row limit. ReadyForQuery is held until it has been delivered,
    /// so a late cancel can never hit the client's next statement (the server ignores a
    /// cancel that arrives while it waits for a command).
    pending_cancel: Option<tokio::task::JoinHandle<()>>,
    ready_seen: bool,
    next_id: u64,
    /// A backstop event was written for the current statement batch.
    backstop_reported: bool,
    /// The last ReadyForQuery said the session is outside a transaction block.
    idle: bool,
    /// A search_path change to apply when the Query being sent completes.
    deferred_path: Option<Option<Vec<String>>>,
}

impl<'a> Inspector<'a> {
    pub(super) fn new(
        shared: &'a Arc<Shared>,
        info: &'a SessionInfo,
        rules: SessionRules,
        backend: (u32, Bytes),
        live: &'a Arc<crate::containment::Live>,
    ) -> Self {
        Inspector {
            shared,
            info,
            live,
            budget: crate::containment::ProbeBudget::new(shared.config.limits.blocks_per_session),
            over_budget: false,
            rules,
            backend,
            statements: HashMap::new(),
            portals: HashMap::new(),
            portal_names: HashMap::new(),
            sql_prepared: HashMap::new(),
            expect: VecDeque::new(),
            to_client: BytesMut::with_capacity(64 * 1024),
            to_server: BytesMut::with_capacity(16 * 1024),
            suppress: false,
            pending_cancel: None,
            ready_seen: false,
            next_id: 0,
            backstop_reported: false,
            idle: true,
            deferred_path: None,
        }
    }

    pub(super) async fn run<C, S>(mut self, client: &mut Conn<C>, server: &mut Conn<S>) -> Result<(), SessionError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Bytes the client sent before the session became ready are handled first.
        while let Some(f) = client.buffered_frame()? {
            if !self.on_client(f).await? {
                return self.flush_server(server).await;
            }
        }
        self.flush_server(server).await?;
        loop {
            tokio::select! {
                f = client.read_frame() => {
                    let Some(f) = f? else { return Ok(()) };
                    if !self.on_client(f).await? {
                        return self.flush_server(server).await;
                    }
                    while !self.over_budget && let Some(f) = client.buffered_frame()? {
                        if !self.on_client(f).await? {
                            return self.flush_server(server).await;
                        }
                    }
                    if self.over_budget {
                        return Err(self.spent().await);
                    }
                    self.flush_server(server).await?;
                }
                f = server.read_frame() => {
                    let Some(f) = f? else {
                        self.flush_client(client).await?;
                        return Err(SessionError::Truncated(Direction::FromServer));
                    };
                    self.on_server(f)?;
                    while let Some(f) = server.buffered_frame()? {
                        self.on_server(f)?;
                    }
                    if std::mem::take(&mut self.ready_seen)
                        && let Some(cancel) = self.pending_cancel.take()
                    {
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), cancel).await;
                    }
                    self.flush_client(client).await?;
                }
                () = self.shared.hard_stop.cancelled() => return Err(SessionError::Shutdown),
                () = self.live.killed().cancelled() => return Err(SessionError::Terminated),
            }
        }
    }

    async fn flush_server<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        server: &mut Conn<S>,
    ) -> Result<(), SessionError> {
        flush(&mut self.to_server, server, &self.shared.metrics.bytes_client_to_server).await
    }

    async fn flush_client<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        client: &mut Conn<C>,
    ) -> Result<(), SessionError> {
        flush(&mut self.to_client, client, &self.shared.metrics.bytes_server_to_client).await
    }

    // ---- client → server -------------------------------------------------------------

    /// Handles one client message; `false` when the client terminated.
    async fn on_client(&mut self, f: Frame) -> Result<bool, SessionError> {
        match f.tag() {
            b'Q' => {
                let text = messages::query_text(&f).ok_or(SessionError::ClientProtocol(
                    crate::protocol::FrameError::BadLength { tag: b'Q', len: 0 },
                ))?;
                self.shared.metrics.statement(crate::metrics::StatementKind::Simple);
                self.live.statements.fetch_add(1, Relaxed);
                self.statements.remove(&Bytes::new());
                self.portal_names.remove(&Bytes::new());
                let decided = self.rules.analyze(self.shared, text).await;
                match self.verdict(&decided.analysis, text, true).await {
                    Some(err) => self.push_blocked_query(err),
                    None => {
                        let mut q = QueryState::new(Arc::clone(&decided.analysis), None);
                        q.pending_path = self.deferred_path.take();
                        match decided.rewritten() {
                            Some(rewritten) => {
                                // The statement PostgreSQL runs for this session (I2).
                                messages::tagged_parts(&mut self.to_server, b'Q', &[rewritten.as_bytes(), b"\0"]);
                                q.source = Some(Source { original: slice_of(&f, text), decided: decided.clone() });
                            }
                            None => self.to_server.put_slice(f.as_bytes()),
                        }
                        self.expect.push_back(Expect::Query(q));
                    }
                }
            }
            b'P' => {
                let (name, sql) = messages::parse_message(&f).ok_or(SessionError::UnexpectedClientMessage(b'P'))?;
                let name = Bytes::copy_from_slice(name);
                self.shared.metrics.statement(crate::metrics::StatementKind::Parse);
                self.live.statements.fetch_add(1, Relaxed);
                let decided = self.rules.analyze(self.shared, sql).await;
                let analysis = &decided.analysis;
                match self.verdict(analysis, sql, false).await {
                    Some(err) => {
                        let mut body = BytesMut::new();
                        body.put_slice(&name);
                        body.put_u8(0);
                        body.put_slice(BLOCKED_SQL);
                        body.put_u8(0);
                        body.put_u16(0);
                        messages::tagged(&mut self.to_server, b'P', &body);
                        self.statements.remove(&name);
                        self.expect.push_back(Expect::Parse { blocked: Some(err), source: None });
                    }
                    None => {
                        let plan = Arc::new(analysis.statements.first().cloned().unwrap_or_default());
                        // A named statement that exists is not redefined: the server refuses the
                        // Parse and keeps the old one, so the old plan must stay too.
                        let closing = self.expect.iter().any(|e| matches!(e, Expect::Close(b'S', n, _) if *n == name));
                        if name.is_empty() || closing || !self.statements.contains_key(&name) {
                            self.next_id = self.next_id.wrapping_add(1);
                            self.statements.insert(name.clone(), Prepared { id: self.next_id, plan, desc: None });
                        }
                        let source = match decided.rewritten() {
                            Some(rewritten) => {
                                // Same name and parameter types, the rewritten text (I2, I11:
                                // the server stores the substituted statement).
                                let rest = messages::parse_rest(&f).unwrap_or_default();
                                messages::tagged_parts(
                                    &mut self.to_server,
                                    b'P',
                                    &[&name, b"\0", rewritten.as_bytes(), b"\0", rest],
                                );
                                Some(Source { original: slice_of(&f, sql), decided: decided.clone() })
                            }
                            None => {
                                self.to_server.put_slice(f.as_bytes());
                                None
                            }
                        };
                        self.expect.push_back(Expect::Parse { blocked: None, source });
                    }
                }
            }
            b'B' => {
                let bind = messages::bind_message(&f).ok_or(SessionError::UnexpectedClientMessage(b'B'))?;
                let (plan, stmt_desc, unknown_statement) = match self.statements.get(bind.statement) {
                    Some(p) => (Arc::clone(&p.plan), p.desc.clone(), false),
                    None => match self.sql_prepared.get(&*String::from_utf8_lossy(bind.statement)) {
                        Some(plan) => (Arc::clone(plan), None, false),
                        None => (Arc::default(), None, true),
                    },
                };
                self.next_id = self.next_id.wrapping_add(1);
                let portal = Portal {
                    plan,
                    formats: bind.result_formats.clone(),
                    stmt_desc,
                    unknown_statement,
                    ..Portal::default()
                };
                self.portal_names.insert(Bytes::copy_from_slice(bind.portal), self.next_id);
                self.portals.insert(self.next_id, portal);
                self.to_server.put_slice(f.as_bytes());
                self.expect.push_back(Expect::Bind);
            }
            b'D' => {
                let (kind, name) = messages::target(&f).ok_or(SessionError::UnexpectedClientMessage(b'D'))?;
                let name = Bytes::copy_from_slice(name);
                let id = self.portal_names.get(&name).copied().unwrap_or(0);
                if kind == b'P'
                    && let Some(p) = self.portals.get_mut(&id)
                {
                    p.described = true;
                }
                self.to_server.put_slice(f.as_bytes());
                self.expect.push_back(match kind {
                    b'S' => Expect::DescribeStatement(name),
                    _ => Expect::DescribePortal { portal: id, swallow: false },
                });
            }
            b'E' => {
                let (portal, _) = messages::execute_message(&f).ok_or(SessionError::UnexpectedClientMessage(b'E'))?;
                let name = Bytes::copy_from_slice(portal);
                let portal = self.portal_names.get(&name).copied().unwrap_or(0);
                let known =
                    self.portals.get(&portal).is_some_and(|p| p.desc.is_some() || p.stmt_desc.is_some() || p.described);
                if !known {
                    // Execute without a Describe: ask the server for the row description
                    // ourselves and keep its answer from the client.
                    let mut body = BytesMut::new();
                    body.put_u8(b'P');
                    body.put_slice(&name);
                    body.put_u8(0);
                    messages::tagged(&mut self.to_server, b'D', &body);
                    self.expect.push_back(Expect::DescribePortal { portal, swallow: true });
                }
                self.to_server.put_slice(f.as_bytes());
                self.expect.push_back(Expect::Execute(portal));
            }
            b'C' => {
                let (kind, name) = messages::target(&f).ok_or(SessionError::UnexpectedClientMessage(b'C'))?;
                let name = Bytes::copy_from_slice(name);
                let id = if kind == b'S' {
                    self.statements.get(&name).map_or(0, |p| p.id)
                } else {
                    self.portal_names.get(&name).copied().unwrap_or(0)
                };
                self.to_server.put_slice(f.as_bytes());
                self.expect.push_back(Expect::Close(kind, name, id));
            }
            b'S' => {
                self.to_server.put_slice(f.as_bytes());
                self.expect.push_back(Expect::Sync);
            }
            b'F' => {
                if self.rules.is_strict() {
                    let b = Block {
                        rule: "function_call".to_owned(),
                        reason: "the FunctionCall protocol message is not allowed for masked sessions".to_owned(),
                        hint: "call functions with SELECT".to_owned(),
                        tables: Vec::new(),
                        columns: Vec::new(),
                        check: None,
                        sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                    };
                    let err = self.record_block(&b, None, &[]).await;
                    self.push_blocked_query(err);
                } else {
                    self.to_server.put_slice(f.as_bytes());
                    self.expect.push_back(Expect::FunctionCall);
                }
            }
            b'X' => {
                self.to_server.put_slice(f.as_bytes());
                return Ok(false);
            }
            // Flush, CopyData, CopyDone, CopyFail: forwarded as they are.
            _ => self.to_server.put_slice(f.as_bytes()),
        }
        Ok(true)
    }

    /// Sends the server a failing Query in place of a blocked one; `err` replaces its error.
    fn push_blocked_query(&mut self, err: Box<ErrorResponse>) {
        messages::tagged(&mut self.to_server, b'Q', &[BLOCKED_SQL, b"\0"].concat());
        self.expect.push_back(Expect::Query(QueryState::new(Arc::default(), Some(err))));
    }

    /// Applies an analysis: `Some(error)` when the statement must not run.
    async fn verdict(&mut self, analysis: &Analysis, text: &[u8], simple: bool) -> Option<Box<ErrorResponse>> {
        // A SET that no rollback can undo: a Query of that one statement, sent outside a
        // transaction block with nothing else in flight.
        let settled = simple && analysis.statements.len() == 1 && self.idle && self.expect.is_empty();
        self.deferred_path = None;
        let text = std::str::from_utf8(text).ok();
        // An observed (exempt) session is never blocked: only its raw reads are audited.
        if !self.rules.observe {
            for f in &analysis.flagged {
                self.audit_block(EventKind::QueryFlagged, f, text, Some("monitor"), &analysis.usage).await;
            }
            if let Some(b) = &analysis.block {
                return Some(self.record_block(b, text, &analysis.usage).await);
            }
        }
        for e in &analysis.effects {
            match e {
                Effect::Prepare(name, plan) => {
                    // As with Parse: an existing name is not redefined by the server.
                    self.sql_prepared.entry(name.clone()).or_insert_with(|| Arc::new((**plan).clone()));
                }
                Effect::Deallocate(Some(name)) => {
                    self.sql_prepared.remove(name);
                }
                Effect::Deallocate(None) => self.sql_prepared.clear(),
                // A lone SET outside a transaction is applied when the server confirms it,
                // and nothing can undo it then; any other is applied now, and the path it
                // leaves stays uncertain (a rollback may restore it).
                Effect::SearchPath { path, local: false } if settled => self.deferred_path = Some(path.clone()),
                Effect::SearchPath { path, .. } => self.rules.set_path(path.clone(), false),
                Effect::TempRelation(name) => self.rules.add_temp(name),
            }
        }
        None
    }

    async fn record_block(&mut self, b: &Block, text: Option<&str>, usage: &[ColumnUse]) -> Box<ErrorResponse> {
        if b.sqlstate != sqlstate::INSUFFICIENT_PRIVILEGE {
            // Not a policy decision: the server's own answer (a syntax error), not audited.
            return Box::new(block_error(b));
        }
        self.shared.metrics.blocked(&b.rule, b.check.unwrap_or(&b.rule));
        self.audit_block(EventKind::QueryBlocked, b, text, None, usage).await;
        self.live.blocks.fetch_add(1, Relaxed);
        if self.budget.hit(std::time::Instant::now()) {
            self.over_budget = true;
        }
        Box::new(block_error(b))
    }

    /// The probe budget is spent: the session is ended (and its role quarantined, with
    /// `limits.quarantine`), each step audited in order.
    async fn spent(&mut self) -> SessionError {
        let why = self.budget.describe();
        self.shared.metrics.sessions_terminated_budget.fetch_add(1, Relaxed);
        self.live.terminate(format!("pgveil: session terminated: {why}"));
        self.shared
            .audit
            .send(Event::session(EventKind::SessionTerminated, self.info).rule("probe_budget").reason(&why))
            .await;
        tracing::warn!(user = %self.info.user, "{why}: session terminated");
        if let Some(how_long) = self.shared.config.limits.quarantine {
            let c = &self.shared.containment;
            if let Err(e) = c.quarantine(self.shared, &self.info.user, how_long, &why, "probe_budget").await {
                tracing::error!(user = %self.info.user, error = %e, "quarantine");
            }
        }
        SessionError::Terminated
    }

    async fn audit_block(
        &self,
        kind: EventKind,
        b: &Block,
        text: Option<&str>,
        mode: Option<&'static str>,
        usage: &[ColumnUse],
    ) {
        if b.rule == super::analysis::AUDIT_UNAVAILABLE {
            tracing::warn!(user = %self.info.user, "statement refused: the audit log is failing");
            return;
        }
        let mut ev = Event::session(kind, self.info).rule(&b.rule).reason(&b.reason);
        ev.statement = Some(match text.and_then(rules::sql::normalize) {
            Some(n) => n,
            None => statement_digest(text.unwrap_or_default()),
        });
        ev.fingerprint = text.and_then(rules::sql::fingerprint);
        ev.tables.clone_from(&b.tables);
        ev.columns.clone_from(&b.columns);
        ev.mode = mode;
        self.shared.audit.send(ev.usage(usage)).await;
    }

    // ---- server → client -------------------------------------------------------------

    fn forward(&mut self, f: &Frame) {
        if !self.suppress {
            self.to_client.put_slice(f.as_bytes());
        }
    }

    fn on_server(&mut self, f: Frame) -> Result<(), SessionError> {
        match f.tag() {
            b'1' => {
                self.pop(|e| matches!(e, Expect::Parse { .. }))?;
                self.forward(&f);
            }
            b'2' => {
                self.pop(|e| matches!(e, Expect::Bind))?;
                self.forward(&f);
            }
            b'3' => {
                if let Expect::Close(kind, name, id) = self.pop(|e| matches!(e, Expect::Close(..)))? {
                    if kind == b'S' {
                        if self.statements.get(&name).is_some_and(|p| p.id == id) {
                            self.statements.remove(&name);
                        }
                    } else if self.portal_names.get(&name) == Some(&id) {
                        self.portal_names.remove(&name);
                    }
                }
                self.forward(&f);
            }
            b't' => self.forward(&f),
            b'T' => self.row_description(&f)?,
            b'n' => match self.expect.pop_front() {
                Some(Expect::DescribePortal { swallow: true, .. }) => {}
                Some(Expect::DescribeStatement(_) | Expect::DescribePortal { .. }) => self.forward(&f),
                _ => return Err(SessionError::UnexpectedServerMessage(b'n')),
            },
            b'D' => self.data_row(&f)?,
            b'C' | b'I' => self.command_complete(&f)?,
            b's' => {
                self.pop(|e| matches!(e, Expect::Execute(_)))?;
                self.forward(&f);
            }
            b'E' => self.error(&f)?,
            b'Z' => {
                self.pop(|e| matches!(e, Expect::Sync | Expect::Query(_) | Expect::FunctionCall))?;
                self.idle = f.body_ref().first() == Some(&b'I');
                self.suppress = false;
                self.ready_seen = true;
                self.backstop_reported = false;
                self.forget_unused_portals();
                self.forward(&f);
            }
            b'N' => {
                if self.rules.is_strict() && !self.suppress {
                    rows::scrub_error(&f, &mut self.to_client);
                } else {
                    self.forward(&f);
                }
            }
            b'S' => {
                self.parameter_status(&f)?;
                self.forward(&f);
            }
            b'G' | b'H' | b'd' | b'c' | b'A' | b'V' => self.forward(&f),
            other => return Err(SessionError::UnexpectedServerMessage(other)),
        }
        Ok(())
    }

    /// Drops portals no name denotes and no pending response refers to.
    fn forget_unused_portals(&mut self) {
        let named: std::collections::HashSet<u64> = self.portal_names.values().copied().collect();
        let pending: std::collections::HashSet<u64> = self
            .expect
            .iter()
            .filter_map(|e| match e {
                Expect::Execute(id) | Expect::DescribePortal { portal: id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        self.portals.retain(|id, _| named.contains(id) || pending.contains(id));
    }

    fn pop(&mut self, ok: impl Fn(&Expect) -> bool) -> Result<Expect, SessionError> {
        match self.expect.pop_front() {
            Some(e) if ok(&e) => Ok(e),
            // The server answered something we did not ask for: we no longer know what its
            // messages mean, so the session ends (fail closed, I8).
            _ => Err(SessionError::UnexpectedServerMessage(b'?')),
        }
    }

    fn origin_plan(
        &self,
        fields: &[FieldDesc],
        formats: impl Fn(usize) -> rules::types::Format,
        analysed: &[Option<rules::Mask>],
    ) -> RowPlan {
        let catalog = self.rules.catalog.snapshot();
        let policy = self.shared.policy.load_full();
        RowPlan::build(fields, formats, analysed, |fd| {
            policy
                .as_ref()
                .and_then(|p| rows::origin_mask(p, &self.rules.identity, &catalog, fd.table_oid, fd.attnum).cloned())
        })
    }

    fn row_description(&mut self, f: &Frame) -> Result<(), SessionError> {
        let fields = Arc::new(messages::row_description(f).ok_or(SessionError::UnexpectedServerMessage(b'T'))?);
        match self.expect.front_mut() {
            Some(Expect::DescribeStatement(name)) => {
                let name = name.clone();
                self.expect.pop_front();
                let mut plan = None;
                if let Some(p) = self.statements.get_mut(&name) {
                    p.desc = Some(fields);
                    plan = Some(Arc::clone(&p.plan));
                }
                self.forward_described(f, plan.as_deref());
            }
            Some(Expect::DescribePortal { portal, swallow }) => {
                let (portal, swallow) = (*portal, *swallow);
                self.expect.pop_front();
                let mut plan = None;
                if let Some(p) = self.portals.get_mut(&portal) {
                    p.desc = Some(fields);
                    p.row_plan = None;
                    plan = Some(Arc::clone(&p.plan));
                }
                if !swallow {
                    self.forward_described(f, plan.as_deref());
                }
            }
            Some(Expect::Query(q)) => {
                let analysis = Arc::clone(&q.analysis);
                let idx = q.idx;
                let analysed = analysis.statements.get(idx).map_or(&[][..], |p| &p.outputs[..]);
                let formats: Vec<i16> = fields.iter().map(|fd| fd.format).collect();
                let plan = self.origin_plan(&fields, |i| rows::format_at(&formats, i), analysed);
                if let Some(Expect::Query(q)) = self.expect.front_mut() {
                    q.row_plan = Some(Arc::new(plan));
                    q.rows = 0;
                }
                self.forward_described(f, analysis.statements.get(idx));
            }
            _ => return Err(SessionError::UnexpectedServerMessage(b'T')),
        }
        Ok(())
    }

    /// Forwards a RowDescription, reporting for substituted masked columns the origin (table
    /// OID, attnum) PostgreSQL reports without pgveil. The row plan was built from the
    /// server's own description, so the result-column layer is not fooled by it.
    fn forward_described(&mut self, f: &Frame, plan: Option<&StatementPlan>) {
        let Some(origins) = plan.map(|p| &p.origins).filter(|o| !o.is_empty()) else {
            self.forward(f);
            return;
        };
        let patched = messages::row_description_with_origins(f, |name| {
            origins.iter().find(|(n, ..)| n.as_bytes() == name).map(|(_, oid, attnum)| (*oid, *attnum))
        });
        match patched {
            Some(bytes) if !self.suppress => self.to_client.put_slice(&bytes),
            Some(_) => {}
            None => self.forward(f),
        }
    }

    fn data_row(&mut self, f: &Frame) -> Result<(), SessionError> {
        let (plan, limit, rows) = match self.expect.front() {
            Some(Expect::Execute(portal)) => {
                let portal = *portal;
                let built = {
                    let p = self.portals.get(&portal).ok_or(SessionError::UnexpectedServerMessage(b'D'))?;
                    if p.unknown_statement && self.rules.is_strict() {
                        return Err(SessionError::UnexpectedServerMessage(b'D'));
                    }
                    match (&p.row_plan, &p.desc, &p.stmt_desc) {
                        (Some(_), _, _) => None,
                        (None, Some(desc), _) => {
                            let formats: Vec<i16> = desc.iter().map(|fd| fd.format).collect();
                            Some(self.origin_plan(desc, |i| rows::format_at(&formats, i), &p.plan.outputs))
                        }
                        (None, None, Some(desc)) => {
                            Some(self.origin_plan(desc, |i| rows::format_at(&p.formats, i), &p.plan.outputs))
                        }
                        // Rows we cannot classify never reach the client (I1).
                        (None, None, None) => return Err(SessionError::UnexpectedServerMessage(b'D')),
                    }
                };
                let p = self.portals.get_mut(&portal).ok_or(SessionError::UnexpectedServerMessage(b'D'))?;
                if let Some(b) = built {
                    p.row_plan = Some(Arc::new(b));
                }
                p.rows = p.rows.saturating_add(1);
                (p.row_plan.clone().unwrap_or_default(), p.plan.max_rows.as_ref().map(|l| (l.rows, l.mode)), p.rows)
            }
            Some(Expect::Query(_)) => {
                let Some(Expect::Query(q)) = self.expect.front_mut() else {
                    return Err(SessionError::UnexpectedServerMessage(b'D'));
                };
                let Some(plan) = q.row_plan.clone() else { return Err(SessionError::UnexpectedServerMessage(b'D')) };
                q.rows = q.rows.saturating_add(1);
                (plan, q.plan().and_then(|p| p.max_rows.as_ref()).map(|l| (l.rows, l.mode)), q.rows)
            }
            _ => return Err(SessionError::UnexpectedServerMessage(b'D')),
        };
        if let Some((max, Mode::Enforce)) = limit
            && rows > max
        {
            self.cut();
            return Ok(());
        }
        if self.suppress {
            return Ok(());
        }
        if plan.is_identity() {
            self.to_client.put_slice(f.as_bytes());
        } else {
            let masked = plan
                .rewrite(f, &mut self.to_client, self.rules.hash_key())
                .map_err(|_| SessionError::UnexpectedServerMessage(b'D'))?;
            self.shared.metrics.masked_cells_total.fetch_add(masked, Relaxed);
            if masked > 0 && self.rules.is_strict() {
                // Substitution should have left nothing raw to mask (I3): count and report it.
                self.shared.metrics.backstop_masked_cells_total.fetch_add(masked, Relaxed);
                if !std::mem::replace(&mut self.backstop_reported, true) {
                    tracing::warn!(user = %self.info.user, "result-column layer masked a raw protected value");
                    let ev = Event::session(EventKind::Backstop, self.info).reason(
                        "the result-column layer masked a raw protected value: substitution missed a reference",
                    );
                    self.shared.audit.log(ev);
                }
            }
        }
        Ok(())
    }

    /// The first row past a `max_rows` limit: stop forwarding, cancel the backend's work.
    fn cut(&mut self) {
        let Some(limit) = self.front_limit() else { return };
        let limit = &limit;
        let first = match self.expect.front_mut() {
            Some(Expect::Execute(portal)) => {
                let portal = *portal;
                self.portals.get_mut(&portal).is_some_and(|p| !std::mem::replace(&mut p.cut, true))
            }
            Some(Expect::Query(q)) => !std::mem::replace(&mut q.cut, true),
            _ => false,
        };
        if first {
            self.shared.metrics.rows_cut_total.fetch_add(1, Relaxed);
            let shared = Arc::clone(self.shared);
            let (pid, key) = self.backend.clone();
            self.pending_cancel = Some(tokio::spawn(async move { super::cancel_backend(&shared, pid, &key).await }));
            let mut ev = Event::session(EventKind::RowLimit, self.info)
                .rule(&limit.rule)
                .reason(&format!("result cut after {} rows (max_rows)", limit.rows));
            ev.rows = Some(limit.rows);
            ev.tables.clone_from(&limit.tables);
            self.shared.audit.log(ev);
        }
    }

    /// The `max_rows` limit of the statement whose rows are arriving.
    fn front_limit(&self) -> Option<RowLimit> {
        match self.expect.front()? {
            Expect::Execute(portal) => self.portals.get(portal)?.plan.max_rows.clone(),
            Expect::Query(q) => q.plan()?.max_rows.clone(),
            _ => None,
        }
    }

    fn limit_error(limit_rows: u64, rule: &str) -> ErrorResponse {
        ErrorResponse::error(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("pgveil: result cut after {limit_rows} rows by rule \"{rule}\" (max_rows)"),
        )
        .with_hint("add a WHERE clause or a LIMIT to fetch fewer rows")
    }

    fn command_complete(&mut self, f: &Frame) -> Result<(), SessionError> {
        if f.tag() == b'C' && is_ddl_tag(f.body_ref()) {
            self.rules.catalog.mark_stale();
        }
        match self.expect.front_mut() {
            Some(Expect::Execute(portal)) => {
                let portal = *portal;
                self.expect.pop_front();
                if let Some(p) = self.portals.get(&portal)
                    && p.plan.reads_raw()
                {
                    self.raw_access(&Arc::clone(&p.plan), f);
                }
                let cut = self.portals.get(&portal).filter(|p| p.cut).and_then(|p| p.plan.max_rows.clone());
                if let Some(limit) = cut {
                    self.send_error(&Self::limit_error(limit.rows, &limit.rule));
                    // The server did not fail: hide its further output up to the Sync.
                    self.suppress = true;
                } else {
                    self.forward(f);
                }
            }
            Some(Expect::Query(q)) => {
                let limit = q.cut.then(|| q.plan().and_then(|p| p.max_rows.clone())).flatten();
                let raw = q.plan().is_some_and(StatementPlan::reads_raw).then(|| (Arc::clone(&q.analysis), q.idx));
                if let Some(path) = q.pending_path.take() {
                    self.rules.set_path(path, true);
                }
                q.idx = q.idx.saturating_add(1);
                q.row_plan = None;
                q.rows = 0;
                q.cut = false;
                if let Some((analysis, idx)) = raw
                    && let Some(plan) = analysis.statements.get(idx)
                {
                    self.raw_access(plan, f);
                }
                if let Some(limit) = limit {
                    self.send_error(&Self::limit_error(limit.rows, &limit.rule));
                    self.suppress = true;
                } else {
                    self.forward(f);
                }
            }
            _ => return Err(SessionError::UnexpectedServerMessage(f.tag())),
        }
        Ok(())
    }

    /// A `raw_access` event for a statement that returned raw protected values, with the
    /// rows its CommandComplete counts (audit.md; `audit.raw_access`).
    fn raw_access(&self, plan: &StatementPlan, f: &Frame) {
        if !self.shared.config.audit.raw_access {
            return;
        }
        let mut ev = Event::session(EventKind::RawAccess, self.info).usage(&plan.usage);
        let raw: Vec<&str> = plan.usage.iter().filter(|u| u.how.is_raw()).map(|u| u.column.as_str()).collect();
        ev.reason = Some(format!("returned raw values of {}", raw.join(", ")));
        if let Some(n) = &plan.normalized {
            ev.statement = Some(n.0.clone());
            ev.fingerprint = Some(n.1.clone()).filter(|f| !f.is_empty());
        }
        ev.rows = Some(if f.tag() == b'C' { messages::command_rows(f).unwrap_or(0) } else { 0 });
        self.shared.metrics.raw_access_total.fetch_add(1, Relaxed);
        self.shared.audit.log(ev);
    }

    fn send_error(&mut self, e: &ErrorResponse) {
        if !self.suppress {
            e.encode(&mut self.to_client);
        }
    }

    fn error(&mut self, f: &Frame) -> Result<(), SessionError> {
        let strict = self.rules.is_strict();
        let mut replacement: Option<ErrorResponse> = None;
        let mut source: Option<Source> = None;
        match self.expect.front_mut() {
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
                while self.expect.front().is_some_and(|e| !matches!(e, Expect::Sync)) {
                    self.expect.pop_front();
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

    fn parameter_status(&mut self, f: &Frame) -> Result<(), SessionError> {
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

/// Writes what is buffered for one side, in one write, and counts it.
async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
    buf: &mut BytesMut,
    to: &mut Conn<S>,
    counter: &std::sync::atomic::AtomicU64,
) -> Result<(), SessionError> {
    if buf.is_empty() {
        return Ok(());
    }
    let out = buf.split();
    counter.fetch_add(u64::try_from(out.len()).unwrap_or(u64::MAX), Relaxed);
    to.write_all(&out).await?;
    to.flush().await
}

/// Client encodings whose multi-byte characters can contain quote or backslash bytes (the
/// same list the statement checks use).
pub(super) fn is_unsafe_encoding(value: &[u8]) -> bool {
    rules::sql::unsafe_encoding(&String::from_utf8_lossy(value))
}

fn is_ddl_tag(tag: &[u8]) -> bool {
    ["CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT", "REFRESH", "SELECT INTO"]
        .iter()
        .any(|p| tag.starts_with(p.as_bytes()))
}

/// The client-facing error for a blocked statement.
pub(super) fn block_error(b: &Block) -> ErrorResponse {
    if b.sqlstate == sqlstate::SYNTAX_ERROR {
        return ErrorResponse::error(sqlstate::SYNTAX_ERROR, b.reason.clone());
    }
    let mut e = ErrorResponse::error(
        sqlstate::INSUFFICIENT_PRIVILEGE,
        format!("pgveil: statement blocked by rule \"{}\": {}", b.rule, b.reason),
    );
    if !b.hint.is_empty() {
        e = e.with_hint(b.hint.clone());
    }
    e
}

/// An unparseable statement is logged by length and hash only (audit.md).
fn statement_digest(text: &str) -> String {
    use sha2::Digest;
    format!("(unparsed: {} bytes, sha256 {})", text.len(), hex::encode(sha2::Sha256::digest(text.as_bytes())))
}
