//! Results on their way to the client: row descriptions (origins reported as PostgreSQL
//! would), row plans from RowDescription origins (the second layer), `max_rows` cuts, and
//! CommandComplete (the statement's end: raw-access events, search_path changes settled).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::BufMut;
use rules::Mode;
use rules::sql::{RowLimit, StatementPlan};

use super::expect::Expect;
use super::state::PlanMemo;
use super::{Relay, is_ddl_tag};
use crate::audit::{Event, EventKind};
use crate::protocol::Frame;
use crate::protocol::messages::{self, ErrorResponse, FieldDesc, sqlstate};
use crate::session::SessionError;
use crate::session::rows::{self, RowPlan};

impl Relay {
    pub(super) fn origin_plan(
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

    /// What a remembered row plan was built from besides the description: the catalog
    /// snapshot's and the policy's generations.
    fn generations(&self) -> (u64, u64) {
        (self.rules.catalog.generation(), self.shared.policy_generation.load(Relaxed))
    }

    pub(super) fn row_description(&mut self, f: &Frame) -> Result<(), SessionError> {
        let parse = || messages::row_description(f).map(Arc::new).ok_or(SessionError::UnexpectedServerMessage(b'T'));
        match self.expect.front_mut() {
            Some(Expect::DescribeStatement { name, swallow }) => {
                let (name, swallow) = (name.clone(), *swallow);
                let fields = parse()?;
                self.expect.pop_front();
                let mut plan = None;
                if let Some(p) = self.statements.get_mut(&name) {
                    p.desc = Some(fields);
                    plan = Some(Arc::clone(&p.plan));
                }
                if !swallow {
                    self.forward_described(f, plan.as_deref());
                }
            }
            Some(Expect::DescribePortal { portal, swallow }) => {
                let (portal, swallow) = (*portal, *swallow);
                let statement = self.portals.get(&portal).map(|p| Arc::clone(&p.plan));
                let generations = self.generations();
                let same = |m: &Arc<StatementPlan>| statement.as_ref().is_some_and(|s| Arc::ptr_eq(m, s));
                let remembered = PlanMemo::get(self.portal_memo.as_ref(), same, generations, f);
                let (fields, row_plan) = match (remembered, &statement) {
                    (Some((fields, plan)), _) => (fields, Some(plan)),
                    (None, Some(statement)) => {
                        let fields = parse()?;
                        let formats: Vec<i16> = fields.iter().map(|fd| fd.format).collect();
                        let plan =
                            Arc::new(self.origin_plan(&fields, |i| rows::format_at(&formats, i), &statement.outputs));
                        self.portal_memo = Some(PlanMemo::new(Arc::clone(statement), f, generations, &fields, &plan));
                        (fields, Some(plan))
                    }
                    (None, None) => (parse()?, None),
                };
                self.expect.pop_front();
                if let Some(p) = self.portals.get_mut(&portal) {
                    p.desc = Some(fields);
                    p.row_plan = row_plan;
                }
                if !swallow {
                    self.forward_described(f, statement.as_deref());
                }
            }
            Some(Expect::Query(q)) => {
                let analysis = Arc::clone(&q.analysis);
                let idx = q.idx;
                let generations = self.generations();
                let same = |(a, i): &(Arc<rules::sql::Analysis>, usize)| *i == idx && Arc::ptr_eq(a, &analysis);
                let plan = match PlanMemo::get(self.plan_memo.as_ref(), same, generations, f) {
                    Some((_, plan)) => plan,
                    None => {
                        let fields = parse()?;
                        let analysed = analysis.statements.get(idx).map_or(&[][..], |p| &p.outputs[..]);
                        let formats: Vec<i16> = fields.iter().map(|fd| fd.format).collect();
                        let plan = Arc::new(self.origin_plan(&fields, |i| rows::format_at(&formats, i), analysed));
                        self.plan_memo =
                            Some(PlanMemo::new((Arc::clone(&analysis), idx), f, generations, &fields, &plan));
                        plan
                    }
                };
                if let Some(Expect::Query(q)) = self.expect.front_mut() {
                    q.row_plan = Some(plan);
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
    pub(super) fn forward_described(&mut self, f: &Frame, plan: Option<&StatementPlan>) {
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

    pub(super) fn data_row(&mut self, f: &Frame) -> Result<(), SessionError> {
        let (plan, limit, rows) = match self.expect.front() {
            Some(Expect::Execute(portal)) => {
                let portal = *portal;
                let built = {
                    let p = self.portals.get(&portal).ok_or(SessionError::UnexpectedServerMessage(b'D'))?;
                    if p.unknown_statement && self.rules.is_strict() {
                        return Err(SessionError::Policy("rows of a statement pgveil has no plan for"));
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
                        (None, None, None) => return Err(SessionError::Policy("rows without a row description")),
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
                    let ev = Event::session(EventKind::Backstop, &self.info).reason(
                        "the result-column layer masked a raw protected value: substitution missed a reference",
                    );
                    self.audit(ev, false);
                }
            }
        }
        Ok(())
    }

    /// The first row past a `max_rows` limit: stop forwarding, cancel the backend's work.
    pub(super) fn cut(&mut self) {
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
            self.want_cancel = true;
            let mut ev = Event::session(EventKind::RowLimit, &self.info)
                .rule(&limit.rule)
                .reason(&format!("result cut after {} rows (max_rows)", limit.rows));
            ev.rows = Some(limit.rows);
            ev.tables.clone_from(&limit.tables);
            self.audit(ev, false);
        }
    }

    /// The `max_rows` limit of the statement whose rows are arriving.
    pub(super) fn front_limit(&self) -> Option<RowLimit> {
        match self.expect.front()? {
            Expect::Execute(portal) => self.portals.get(portal)?.plan.max_rows.clone(),
            Expect::Query(q) => q.plan()?.max_rows.clone(),
            _ => None,
        }
    }

    pub(super) fn limit_error(limit_rows: u64, rule: &str) -> ErrorResponse {
        ErrorResponse::error(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("pgveil: result cut after {limit_rows} rows by rule \"{rule}\" (max_rows)"),
        )
        .with_hint("add a WHERE clause or a LIMIT to fetch fewer rows")
    }

    pub(super) fn command_complete(&mut self, f: &Frame) -> Result<(), SessionError> {
        if f.tag() == b'C' && is_ddl_tag(f.body_ref()) {
            self.rules.catalog.mark_stale();
        }
        match self.expect.front_mut() {
            Some(Expect::Execute(portal)) => {
                let portal = *portal;
                self.expect.pop_front();
                if let Some(p) = self.portals.get(&portal)
                    && !p.plan.session.is_empty()
                {
                    let changes = p.plan.session.clone();
                    // An extended-protocol statement runs in the implicit transaction of its
                    // Sync segment: SET LOCAL holds until that ends.
                    self.rules.confirm(&changes, f.body_ref(), true);
                }
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
            Some(Expect::Query(q)) if !q.leading.is_empty() => {
                // A statement pgveil put first: the client does not see its answer.
                if let Some(super::state::Leading::Prepare(name, p)) = q.leading.pop_front() {
                    self.sql_prepared.insert(name, p);
                }
            }
            Some(Expect::Query(q)) => {
                let limit = q.cut.then(|| q.plan().and_then(|p| p.max_rows.clone())).flatten();
                let raw = q.plan().is_some_and(StatementPlan::reads_raw).then(|| (Arc::clone(&q.analysis), q.idx));
                let several = q.analysis.statements.len() > 1;
                let changes = q.plan().map(|p| p.session.clone()).unwrap_or_default();
                if !changes.is_empty() {
                    self.rules.confirm(&changes, f.body_ref(), several);
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
    pub(super) fn raw_access(&mut self, plan: &StatementPlan, f: &Frame) {
        if !self.shared.config.audit.raw_access {
            return;
        }
        let mut ev = Event::session(EventKind::RawAccess, &self.info).usage(&plan.usage);
        let raw: Vec<&str> = plan.usage.iter().filter(|u| u.how.is_raw()).map(|u| u.column.as_str()).collect();
        ev.reason = Some(format!("returned raw values of {}", raw.join(", ")));
        if let Some(n) = &plan.normalized {
            ev.statement = Some(n.0.clone());
            ev.fingerprint = Some(n.1.clone()).filter(|f| !f.is_empty());
        }
        ev.rows = Some(if f.tag() == b'C' { messages::command_rows(f).unwrap_or(0) } else { 0 });
        self.shared.metrics.raw_access_total.fetch_add(1, Relaxed);
        self.audit(ev, false);
    }
}
