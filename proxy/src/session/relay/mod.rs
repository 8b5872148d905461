//! The inspecting relay as a sans-IO state machine: client and server frames go in, bytes for
//! each side, audit events and requests (cancel the backend, end the session) come out. The
//! async driver (`session/inspect.rs`) does the I/O, the statement analysis and the audit
//! sends around it; the unit tests (`tests.rs`) drive it with scripted frames and no sockets.
//!
//! Every statement is analysed before it reaches the server, every result is masked on its way
//! back, and blocked statements are answered with SQLSTATE 42501 while the server is made to
//! fail at the same point (threat model I10), so client and server agree on what ran and one
//! ReadyForQuery follows each Sync. The expected-response queue (`expect.rs`) mirrors the
//! server's skip-to-Sync; `state.rs` holds statements, portals and Query progress; `results.rs`
//! results (row plans, limits, raw-access counts); `scrub.rs` errors, notices and settings.

mod expect;
mod results;
mod scrub;
mod state;
mod stored;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{BufMut, Bytes, BytesMut};
use rules::sql::{Analysis, Block, ColumnUse, Effect};

use self::expect::{BindUndo, Expect, Queue};
use self::state::{Portal, Prepared, QueryState, Source, slice_of};
use super::analysis::{Decided, SessionRules};
use super::{SessionError, SessionInfo};
use crate::Shared;
use crate::audit::{Event, EventKind};
use crate::protocol::Frame;
use crate::protocol::messages::{self, ErrorResponse, sqlstate};

/// Text the server is sent in place of a blocked statement: a syntax error, so the server
/// fails at the same point and skips to Sync (or ends the Query) exactly as it would have.
const BLOCKED_SQL: &[u8] = b"PGVEIL BLOCKED STATEMENT";

/// An audit event the relay produced, and whether the driver must wait for room to log it
/// (statement events: back-pressure, never loss) or may queue it (result events).
#[derive(Debug)]
pub(crate) struct Audited {
    pub event: Event,
    pub wait: bool,
}

pub(crate) struct Relay {
    shared: Arc<Shared>,
    info: SessionInfo,
    live: Arc<crate::containment::Live>,
    budget: crate::containment::ProbeBudget,
    /// The probe budget was spent (the driver ends the session): how much of `to_server` and
    /// of `expect` was there before the statement that spent it.
    trip: Option<(usize, usize)>,
    rules: SessionRules,
    statements: HashMap<Bytes, Prepared>,
    /// Portals by id; `portal_names` says which id a name currently denotes.
    portals: HashMap<u64, Portal>,
    portal_names: HashMap<Bytes, u64>,
    sql_prepared: HashMap<String, state::SqlPrepared>,
    /// SQL statements decided again for the client's next Query, which they go ahead of
    /// (`stored.rs`): name, the PREPARE text to send, its plan.
    fresh_sql: Vec<(String, String, state::SqlPrepared)>,
    /// A statement was marked stale because its re-prepare did not run (`stored.rs`).
    stale_marked: bool,
    /// SQL cursors by name, with the view generation their query was decided under.
    cursors: HashMap<String, u64>,
    /// The oldest generation among cursors forgotten to keep `cursors` bounded: a cursor not
    /// remembered counts as declared then.
    cursors_floor: Option<u64>,
    /// The view generation under which the session first created a temporary view, a rule
    /// or a function (server-side text no rules change reaches: I11).
    stored_code: Option<u64>,
    expect: Queue,
    to_client: BytesMut,
    to_server: BytesMut,
    /// Audit events for the driver to send, in order.
    events: Vec<Audited>,
    /// After the proxy itself failed a statement mid-flight (a row limit), the server's
    /// further output up to ReadyForQuery is not for the client.
    suppress: bool,
    /// A row limit cut a result: the driver cancels the backend's work, and holds the next
    /// ReadyForQuery until that cancel was delivered.
    want_cancel: bool,
    ready_seen: bool,
    next_id: u64,
    /// A backstop event was written for the current statement batch.
    backstop_reported: bool,
    /// The last ReadyForQuery said the session is outside a transaction block.
    idle: bool,
    /// A server error arrived since the last ReadyForQuery (an implicit transaction that
    /// failed rolled its search_path changes back).
    cycle_failed: bool,
    /// The last simple-protocol result's row plan, and the last Describe('P') answer's.
    plan_memo: Option<state::PlanMemo<(Arc<rules::sql::Analysis>, usize)>>,
    portal_memo: Option<state::PlanMemo<Arc<rules::sql::StatementPlan>>>,
}

/// A relay for one session of `roles` under `rules_yaml`, with the example catalog installed
/// and no server or sockets (unit tests and the `relay` fuzz target).
#[doc(hidden)]
pub(crate) fn offline(
    rules_yaml: &str,
    roles: &[&str],
    adjust: impl FnOnce(&mut crate::config::Config),
) -> Option<(Relay, Arc<rules::catalog::Catalog>)> {
    let mut config = crate::config::Config::default();
    config.limits.blocks_per_session = None;
    adjust(&mut config);
    let opts = rules::CompileOptions { hash_key: Some(b"k".to_vec()) };
    let policy = rules::compile(rules_yaml, &opts).ok()?;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let shared =
        Arc::new(Shared::with_rules(config, crate::audit::Audit::disabled(), metrics, Some(policy), opts).ok()?);
    let policy = shared.policy.load_full()?;
    let catalog = Arc::new(rules::catalog::example());
    shared.catalogs.for_db("shop").install((*catalog).clone());
    let user = roles.first().copied().unwrap_or("app_user");
    let info = SessionInfo {
        id: "s1".to_owned(),
        user: user.to_owned(),
        database: "shop".to_owned(),
        ..SessionInfo::default()
    };
    let rules = SessionRules::new(&shared, policy, rules::Identity::new(roles.iter().copied()), user, "shop");
    let live = Arc::clone(&shared.containment.register(&info).live);
    Some((Relay::new(Arc::clone(&shared), info, rules, live), catalog))
}

impl Relay {
    pub(crate) fn new(
        shared: Arc<Shared>,
        info: SessionInfo,
        rules: SessionRules,
        live: Arc<crate::containment::Live>,
    ) -> Self {
        let budget = crate::containment::ProbeBudget::new(shared.config.limits.blocks_per_session);
        Relay {
            shared,
            info,
            live,
            budget,
            trip: None,
            rules,
            statements: HashMap::new(),
            portals: HashMap::new(),
            portal_names: HashMap::new(),
            sql_prepared: HashMap::new(),
            fresh_sql: Vec::new(),
            stale_marked: false,
            cursors: HashMap::new(),
            cursors_floor: None,
            stored_code: None,
            expect: Queue::default(),
            to_client: BytesMut::with_capacity(64 * 1024),
            to_server: BytesMut::with_capacity(16 * 1024),
            events: Vec::new(),
            suppress: false,
            want_cancel: false,
            ready_seen: false,
            next_id: 0,
            backstop_reported: false,
            idle: true,
            cycle_failed: false,
            plan_memo: None,
            portal_memo: None,
        }
    }

    /// The session's rules, for the driver's statement analysis.
    pub(crate) fn rules_mut(&mut self) -> &mut SessionRules {
        &mut self.rules
    }

    /// Bytes to send to the server / to the client.
    pub(crate) fn for_server(&mut self) -> &mut BytesMut {
        &mut self.to_server
    }

    pub(crate) fn for_client(&mut self) -> &mut BytesMut {
        &mut self.to_client
    }

    /// Audit events produced since the last call, in order.
    pub(crate) fn take_events(&mut self) -> Vec<Audited> {
        std::mem::take(&mut self.events)
    }

    /// Whether a row limit asks for the backend's work to be cancelled (once per cut).
    pub(crate) fn take_cancel(&mut self) -> bool {
        std::mem::take(&mut self.want_cancel)
    }

    /// Whether a ReadyForQuery went into the client's buffer since the last call.
    pub(crate) fn take_ready(&mut self) -> bool {
        std::mem::take(&mut self.ready_seen)
    }

    /// Whether the probe budget is spent (the driver ends the session).
    pub(crate) fn over_budget(&self) -> bool {
        self.trip.is_some()
    }

    /// Forgets the statement that spent the budget and everything after it (never sent to the
    /// server, never answered), so the session ends as PostgreSQL ends one: the answers to
    /// what ran before are relayed in full, then the FATAL. `true` when those answers end in a
    /// ReadyForQuery the driver should wait for; `false` when nothing is owed or the client
    /// left its pipeline unsynced (nothing more would come).
    pub(crate) fn forget_from_trip(&mut self) -> bool {
        let Some((to_server, expect)) = self.trip else { return false };
        self.to_server.truncate(to_server);
        self.expect.truncate(expect);
        matches!(self.expect.back(), Some(Expect::Sync | Expect::Query(_) | Expect::FunctionCall))
    }

    /// Whether answers to messages already sent are still to come from the server.
    pub(crate) fn awaiting_server(&self) -> bool {
        !self.expect.is_empty()
    }

    /// What the client is told when the budget ends the session, and the audit reason.
    pub(crate) fn budget_reason(&self) -> String {
        self.budget.describe()
    }

    pub(crate) fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The tag of a server message that answers what the relay expects next (the `relay`
    /// fuzz target's honest server), `None` with nothing in flight.
    #[doc(hidden)]
    pub(crate) fn plausible_answer(&self) -> Option<u8> {
        Some(match self.expect.front()? {
            Expect::Parse { .. } => b'1',
            Expect::Bind(_) => b'2',
            Expect::DescribeStatement { .. } | Expect::DescribePortal { .. } => b'T',
            Expect::Execute(_) => b'C',
            Expect::Close(..) => b'3',
            Expect::Injected(tag) => *tag,
            Expect::Reprepared(_) => b'1',
            Expect::Query(q) if q.row_plan.is_none() => b'T',
            Expect::Sync | Expect::Query(_) | Expect::FunctionCall => b'Z',
        })
    }

    fn audit(&mut self, event: Event, wait: bool) {
        self.events.push(Audited { event, wait });
    }

    // ---- client → server -------------------------------------------------------------

    /// Handles one client message; `false` when the client terminated. `decided` is the
    /// analysis of a Query's or Parse's text (the driver computes it; `None` for other
    /// messages, and a Query or Parse without one is refused: fail closed).
    pub(crate) fn on_client(&mut self, f: Frame, decided: Option<Decided>) -> Result<bool, SessionError> {
        if matches!(f.tag(), b'Q' | b'P' | b'B' | b'E')
            && let Some(fatal) = self.stored_code_stale()
        {
            return Err(fatal);
        }
        match f.tag() {
            b'Q' => {
                let text = messages::query_text(&f).ok_or(SessionError::ClientProtocol(
                    crate::protocol::FrameError::BadLength { tag: b'Q', len: 0 },
                ))?;
                self.shared.metrics.statement(crate::metrics::StatementKind::Simple);
                self.live.statements.fetch_add(1, Relaxed);
                self.statements.remove(&Bytes::new());
                self.portal_names.remove(&Bytes::new());
                let decided = decided.ok_or(SessionError::UnexpectedClientMessage(b'Q'))?;
                let verdict = self.verdict(&decided.analysis, text);
                let fresh = std::mem::take(&mut self.fresh_sql);
                match verdict {
                    Some(err) => self.push_blocked_query(err),
                    None if !fresh.is_empty() => {
                        // Statements prepared again go first, in the same Query: an error in
                        // them skips the client's statements, so nothing runs as decided before.
                        let mut q = QueryState::new(Arc::clone(&decided.analysis), None);
                        let mut lead = String::new();
                        for (name, prepare, p) in fresh {
                            lead.push_str(&format!("DEALLOCATE {};\n{prepare};\n", rules::names::quote_ident(&name)));
                            q.leading.push_back(state::Leading::Deallocate);
                            q.leading.push_back(state::Leading::Prepare(name, p));
                        }
                        let body = decided.rewritten().map_or(text, str::as_bytes);
                        messages::tagged_parts(&mut self.to_server, b'Q', &[lead.as_bytes(), body, b"\0"]);
                        let shift = lead.chars().count();
                        q.source = Some(Source { original: slice_of(&f, text), decided, shift });
                        self.expect.push_back(Expect::Query(q));
                    }
                    None => {
                        let mut q = QueryState::new(Arc::clone(&decided.analysis), None);
                        match decided.rewritten() {
                            Some(rewritten) => {
                                // The statement PostgreSQL runs for this session (I2).
                                messages::tagged_parts(&mut self.to_server, b'Q', &[rewritten.as_bytes(), b"\0"]);
                                q.source = Some(Source { original: slice_of(&f, text), decided, shift: 0 });
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
                let decided = decided.ok_or(SessionError::UnexpectedClientMessage(b'P'))?;
                let analysis = &decided.analysis;
                match self.verdict(analysis, sql) {
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
                        let closing = self.expect.closing_statement(&name);
                        if name.is_empty() || closing || !self.statements.contains_key(&name) {
                            self.next_id = self.next_id.wrapping_add(1);
                            let (text, rest) = if name.is_empty() {
                                (Bytes::new(), Bytes::new())
                            } else {
                                let rest = messages::parse_rest(&f).unwrap_or_default();
                                (Bytes::copy_from_slice(sql), Bytes::copy_from_slice(rest))
                            };
                            let generation = self.rules.view_generation();
                            let p = Prepared { id: self.next_id, plan, desc: None, generation, text, rest };
                            self.statements.insert(name.clone(), p);
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
                                Some(Source { original: slice_of(&f, sql), decided: decided.clone(), shift: 0 })
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
                let current = self.rules.view_generation();
                let (plan, stmt_desc, unknown_statement, generation) = match self.statements.get(bind.statement) {
                    // The unnamed statement of an earlier generation: clients parse it anew
                    // for each use, so one bound again after a reload is refused at Execute.
                    Some(p) => (Arc::clone(&p.plan), p.desc.clone(), false, p.generation),
                    None => match self.sql_prepared.get(&*String::from_utf8_lossy(bind.statement)) {
                        Some(p) => (Arc::clone(&p.plan), None, false, p.generation),
                        None => (Arc::default(), None, true, current),
                    },
                };
                self.next_id = self.next_id.wrapping_add(1);
                let portal = Portal {
                    plan,
                    formats: bind.result_formats,
                    stmt_desc,
                    unknown_statement,
                    generation,
                    bind_pending: true,
                    ..Portal::default()
                };
                let name = Bytes::copy_from_slice(bind.portal);
                let previous = self.portal_names.insert(name.clone(), self.next_id);
                self.portals.insert(self.next_id, portal);
                self.to_server.put_slice(f.as_bytes());
                self.expect.push_back(Expect::Bind(BindUndo { portal: name, id: self.next_id, previous }));
            }
            b'D' => {
                let (kind, name) = messages::target(&f).ok_or(SessionError::UnexpectedClientMessage(b'D'))?;
                let expect = if kind == b'S' {
                    Expect::DescribeStatement { name: Bytes::copy_from_slice(name), swallow: false }
                } else {
                    let id = self.portal_names.get(name).copied().unwrap_or(0);
                    if kind == b'P'
                        && let Some(p) = self.portals.get_mut(&id)
                    {
                        p.described = true;
                    }
                    Expect::DescribePortal { portal: id, swallow: false }
                };
                self.to_server.put_slice(f.as_bytes());
                self.expect.push_back(expect);
            }
            b'E' => {
                let (name, _) = messages::execute_message(&f).ok_or(SessionError::UnexpectedClientMessage(b'E'))?;
                let portal = match self.portal_names.get(name) {
                    Some(id) => *id,
                    None => self.unbound_portal(name),
                };
                if !name.is_empty() && self.portals.get(&portal).is_some_and(|p| p.bind_pending) {
                    // Its Bind may yet fail: what the name would mean then, as of now.
                    let declared = self.cursor_declared(name);
                    if let Some(p) = self.portals.get_mut(&portal) {
                        p.declared_if_unbound = declared;
                    }
                }
                if let Some(err) = self.stale_portal(portal, name) {
                    self.push_blocked_parse(err);
                    return Ok(true);
                }
                let known =
                    self.portals.get(&portal).is_some_and(|p| p.desc.is_some() || p.stmt_desc.is_some() || p.described);
                if !known {
                    // Execute without a Describe: ask the server for the row description
                    // ourselves and keep its answer from the client.
                    let mut body = BytesMut::new();
                    body.put_u8(b'P');
                    body.put_slice(name);
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
                    let err = self.record_block(&b, None, &[]);
                    // No statement text to normalize: the call is named by its function and
                    // argument count, and fingerprinted by them, so security teams can group it.
                    if let Some((oid, nargs)) = messages::function_call(&f)
                        && let Some(a) = self.events.last_mut()
                    {
                        a.event.statement = Some(format!("FunctionCall(function oid {oid}, {nargs} arguments)"));
                        a.event.fingerprint = Some(crate::audit::function_call_fingerprint(oid, nargs));
                    }
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
    fn verdict(&mut self, analysis: &Analysis, text: &[u8]) -> Option<Box<ErrorResponse>> {
        let text = std::str::from_utf8(text).ok();
        if let Some(err) = self.stale_use(analysis, text) {
            return Some(err);
        }
        // An observed (exempt) session is never blocked: only its raw reads are audited.
        if !self.rules.observe {
            for f in &analysis.flagged {
                self.audit_block(EventKind::QueryFlagged, f, text, Some("monitor"), &analysis.usage);
            }
            if let Some(b) = &analysis.block {
                return Some(self.record_block(b, text, &analysis.usage));
            }
        }
        for e in &analysis.effects {
            match e {
                Effect::Prepare(name, plan, text) => {
                    // As with Parse: an existing name is not redefined by the server.
                    let generation = self.rules.view_generation();
                    self.sql_prepared.entry(name.clone()).or_insert_with(|| state::SqlPrepared {
                        plan: Arc::new((**plan).clone()),
                        generation,
                        text: Arc::from(text.as_str()),
                    });
                }
                Effect::Deallocate(Some(name)) => {
                    self.sql_prepared.remove(name);
                }
                Effect::Deallocate(None) => self.sql_prepared.clear(),
                Effect::TempRelation(name) => self.rules.add_temp(name),
                Effect::TempDiscarded => self.rules.discard_temp(),
                Effect::TempDropped(name) => self.rules.forget_temp(name),
                Effect::Cursor(name) => self.remember_cursor(name),
                Effect::CloseCursor(Some(name)) => {
                    self.cursors.remove(name);
                }
                Effect::CloseCursor(None) => self.cursors.clear(),
                Effect::StoredCode => {
                    self.stored_code.get_or_insert(self.rules.view_generation());
                }
                Effect::Executes(_) | Effect::Fetches(_) => {}
            }
        }
        // Statements after these are decided against the search_path they leave; the server's
        // CommandCompletes confirm them (`results.rs`).
        self.rules.project(analysis);
        None
    }

    fn record_block(&mut self, b: &Block, text: Option<&str>, usage: &[ColumnUse]) -> Box<ErrorResponse> {
        if b.sqlstate != sqlstate::INSUFFICIENT_PRIVILEGE {
            // Not a policy decision: the server's own answer (a syntax error), not audited.
            return Box::new(block_error(b));
        }
        self.shared.metrics.blocked(&b.rule, b.check.unwrap_or(&b.rule));
        self.audit_block(EventKind::QueryBlocked, b, text, None, usage);
        self.live.blocks.fetch_add(1, Relaxed);
        if self.budget.hit(std::time::Instant::now()) && self.trip.is_none() {
            self.trip = Some((self.to_server.len(), self.expect.len()));
        }
        Box::new(block_error(b))
    }

    fn audit_block(
        &mut self,
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
        let mut ev = Event::session(kind, &self.info).rule(&b.rule).reason(&b.reason);
        ev.statement = Some(match text.and_then(rules::sql::normalize) {
            Some(n) => n,
            None => statement_digest(text.unwrap_or_default()),
        });
        ev.fingerprint = text.and_then(rules::sql::fingerprint);
        ev.tables.clone_from(&b.tables);
        ev.columns.clone_from(&b.columns);
        ev.mode = mode;
        self.audit(ev.usage(usage), true);
    }

    // ---- server → client -------------------------------------------------------------

    fn forward(&mut self, f: &Frame) {
        if !self.suppress {
            self.to_client.put_slice(f.as_bytes());
        }
    }

    /// Handles one server message.
    pub(crate) fn on_server(&mut self, f: Frame) -> Result<(), SessionError> {
        match f.tag() {
            b'1' => {
                let answered = self.expect.pop(|e| matches!(e, Expect::Parse { .. } | Expect::Reprepared(_)))?;
                if !matches!(answered, Expect::Reprepared(_)) {
                    self.forward(&f);
                }
            }
            b'2' => {
                if let Expect::Bind(undo) = self.expect.pop(|e| matches!(e, Expect::Bind(_)))?
                    && let Some(p) = self.portals.get_mut(&undo.id)
                {
                    p.bind_pending = false;
                }
                self.forward(&f);
            }
            b'3' => {
                let answered = self.expect.pop(|e| matches!(e, Expect::Close(..) | Expect::Injected(b'3')))?;
                if matches!(answered, Expect::Injected(_)) {
                    return Ok(());
                }
                if let Expect::Close(kind, name, id) = answered {
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
            // ParameterDescription: the first answer to a statement Describe.
            b't' if matches!(self.expect.front(), Some(Expect::DescribeStatement { swallow: true, .. })) => {}
            b't' => self.forward(&f),
            b'T' => self.row_description(&f)?,
            b'n' => match self.expect.pop_front() {
                Some(Expect::DescribePortal { swallow: true, .. }) => {}
                Some(Expect::DescribeStatement { swallow: true, .. }) => {}
                Some(Expect::DescribeStatement { .. } | Expect::DescribePortal { .. }) => self.forward(&f),
                _ => return Err(SessionError::UnexpectedServerMessage(b'n')),
            },
            b'D' => self.data_row(&f)?,
            b'C' | b'I' => self.command_complete(&f)?,
            b's' => {
                self.expect.pop(|e| matches!(e, Expect::Execute(_)))?;
                self.forward(&f);
            }
            b'E' => {
                self.cycle_failed = true;
                self.error(&f)?;
            }
            b'Z' => {
                self.expect.pop(|e| matches!(e, Expect::Sync | Expect::Query(_) | Expect::FunctionCall))?;
                let status = f.body_ref().first().copied().unwrap_or(b'I');
                self.idle = status == b'I';
                self.rules.ready(status, std::mem::take(&mut self.cycle_failed), self.expect.is_empty());
                self.suppress = false;
                self.ready_seen = true;
                self.backstop_reported = false;
                self.forget_unused_portals();
                self.forward(&f);
            }
            b'N' => {
                if self.rules.is_strict() && !self.suppress {
                    crate::session::rows::scrub_error(&f, &mut self.to_client);
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
        if self.portals.is_empty() {
            return; // the simple protocol's case, on every ReadyForQuery
        }
        if self.portal_names.len().saturating_add(self.expect.len()) <= SMALL {
            // The extended protocol's usual case (the unnamed portal, a few pending answers):
            // linear scans, no allocation on every ReadyForQuery.
            let (names, expect) = (&self.portal_names, &self.expect);
            self.portals
                .retain(|id, _| names.values().any(|v| v == id) || expect.iter().any(|e| owed_portal(e) == Some(*id)));
            return;
        }
        let named: std::collections::HashSet<u64> = self.portal_names.values().copied().collect();
        let pending: std::collections::HashSet<u64> = self.expect.iter().filter_map(owed_portal).collect();
        self.portals.retain(|id, _| named.contains(id) || pending.contains(id));
    }
}

/// The portal an expected answer belongs to, for the answers that need the portal's state.
fn owed_portal(e: &Expect) -> Option<u64> {
    match e {
        Expect::Execute(id) | Expect::DescribePortal { portal: id, .. } => Some(*id),
        _ => None,
    }
}

/// Up to this many portal names and pending answers, `forget_unused_portals` scans them in
/// place of building sets.
const SMALL: usize = 16;

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
