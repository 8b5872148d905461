//! Incident containment (spec/audit.md `session_terminated`, `role_quarantined`,
//! `role_released`): the registry of live sessions operators list and terminate, the probe
//! budget that ends a session spending too many blocks, and quarantined roles.
//!
//! Quarantines live in PostgreSQL itself, in `pgveil.quarantine` of `catalog.state_database`
//! (created by `pgveil init`): every instance LISTENs on `pgveil_quarantine`, reloads the
//! table when notified (and every 30 s), refuses new sessions of a quarantined role and ends
//! its live ones. Without the table, quarantines hold on this instance only (and say so).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::audit::{Event, EventKind};
use crate::conn::SessionInfo;

/// The NOTIFY channel instances share quarantine changes on.
pub const CHANNEL: &str = "pgveil_quarantine";
/// How often the table is read again even without a notification (expiry, missed notices).
const RELOAD_EVERY: Duration = Duration::from_secs(30);
/// The longest a write to the shared table may take: a session being ended or an operator's
/// request never waits on a stuck state connection longer than this.
const STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a statement on the state connection within [`STATE_TIMEOUT`].
async fn bounded<T>(f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, String> {
    match tokio::time::timeout(STATE_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer from the state database within {STATE_TIMEOUT:?}")),
    }
}

/// One live client session, as operators see it.
#[derive(Debug)]
pub struct Live {
    pub info: SessionInfo,
    pub since: String,
    /// Statements and policy blocks (inspected sessions; a byte pump counts none).
    pub statements: AtomicU64,
    pub blocks: AtomicU64,
    pub inspected: std::sync::atomic::AtomicBool,
    /// Cancelled to end the session; `why` says what the client is told.
    kill: CancellationToken,
    why: std::sync::Mutex<Option<String>>,
}

impl Live {
    pub fn killed(&self) -> &CancellationToken {
        &self.kill
    }

    /// Why the session was ended (for its FATAL).
    pub fn why(&self) -> String {
        self.why.lock().ok().and_then(|w| w.clone()).unwrap_or_else(|| "terminated".to_owned())
    }

    /// Ends the session with `why` as its FATAL message (the first reason given wins).
    pub fn terminate(&self, why: String) {
        if let Ok(mut w) = self.why.lock() {
            w.get_or_insert(why);
        }
        self.kill.cancel();
    }
}

/// A session as the admin API lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionRow {
    pub session: String,
    pub user: String,
    pub database: String,
    pub application: String,
    pub client: String,
    pub since: String,
    pub inspected: bool,
    pub statements: Option<u64>,
    pub blocks: Option<u64>,
}

/// A quarantined role.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Quarantined {
    pub role: String,
    /// RFC 3339.
    pub until: String,
    pub reason: String,
    pub by: String,
}

#[derive(Debug, Default)]
pub struct Containment {
    sessions: DashMap<String, Arc<Live>>,
    quarantined: std::sync::RwLock<Quarantines>,
    /// Quarantines made here and not (yet) in the shared table: a reload of the table keeps
    /// them (one read just before the insert, or a failed insert, must not lift them).
    unshared: std::sync::Mutex<Quarantines>,
    /// The state connection, while it is up.
    state: arc_swap::ArcSwapOption<tokio_postgres::Client>,
    /// Whether `pgveil.quarantine` could be read (else quarantines are local).
    shared_table: std::sync::atomic::AtomicBool,
}

/// Removes the session from the registry when dropped.
#[derive(Debug)]
pub struct Registered<'a> {
    owner: &'a Containment,
    pub live: Arc<Live>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.owner.sessions.remove(&self.live.info.id);
    }
}

impl Containment {
    pub fn register(&self, info: &SessionInfo) -> Registered<'_> {
        let live = Arc::new(Live {
            info: info.clone(),
            since: crate::audit::now_rfc3339(),
            statements: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            inspected: std::sync::atomic::AtomicBool::new(false),
            kill: CancellationToken::new(),
            why: std::sync::Mutex::new(None),
        });
        self.sessions.insert(info.id.clone(), Arc::clone(&live));
        Registered { owner: self, live }
    }

    pub fn sessions(&self) -> Vec<SessionRow> {
        let mut rows: Vec<SessionRow> = self
            .sessions
            .iter()
            .map(|e| {
                let l = e.value();
                let inspected = l.inspected.load(Relaxed);
                SessionRow {
                    session: l.info.id.clone(),
                    user: l.info.user.clone(),
                    database: l.info.database.clone(),
                    application: l.info.application.clone(),
                    client: l.info.client.clone(),
                    since: l.since.clone(),
                    inspected,
                    statements: inspected.then(|| l.statements.load(Relaxed)),
                    blocks: inspected.then(|| l.blocks.load(Relaxed)),
                }
            })
            .collect();
        rows.sort_by(|a, b| a.since.cmp(&b.since).then_with(|| a.session.cmp(&b.session)));
        rows
    }

    /// Ends one session; `false` when no such session is live here.
    pub fn terminate(&self, shared: &Shared, id: &str, by: &str) -> bool {
        let Some(live) = self.sessions.get(id).map(|e| Arc::clone(e.value())) else { return false };
        live.terminate(format!("pgveil: session terminated by an operator ({by})"));
        shared.metrics.sessions_terminated_operator.fetch_add(1, Relaxed);
        shared.audit.log(
            Event::session(EventKind::SessionTerminated, &live.info)
                .rule("operator")
                .reason(&format!("terminated by {by}")),
        );
        true
    }

    /// Ends every live session of a role (a quarantine). Returns how many.
    fn terminate_role(&self, shared: &Shared, role: &str, why: &str) -> usize {
        let mut n = 0usize;
        for e in &self.sessions {
            let live = e.value();
            if live.info.user == role && !live.kill.is_cancelled() {
                live.terminate(format!("pgveil: role \"{role}\" is quarantined: {why}"));
                shared.audit.log(
                    Event::session(EventKind::SessionTerminated, &live.info)
                        .rule("quarantine")
                        .reason(&format!("role quarantined: {why}")),
                );
                n = n.saturating_add(1);
            }
        }
        n
    }

    /// Whether quarantines are shared right now (the state connection is up and
    /// `pgveil.quarantine` was read).
    pub fn is_shared(&self) -> bool {
        self.shared_table.load(Relaxed) && self.state.load().is_some()
    }

    /// The quarantine in force for a role, if any.
    pub fn quarantine_of(&self, role: &str) -> Option<Quarantined> {
        let now = time::OffsetDateTime::now_utc();
        let q = self.quarantined.read().ok()?;
        q.get(role).filter(|(until, _)| *until > now).map(|(_, q)| q.clone())
    }

    pub fn quarantines(&self) -> Vec<Quarantined> {
        let now = time::OffsetDateTime::now_utc();
        let mut out: Vec<Quarantined> = self
            .quarantined
            .read()
            .map(|q| q.values().filter(|(until, _)| *until > now).map(|(_, q)| q.clone()).collect())
            .unwrap_or_default();
        out.sort_by(|a, b| a.role.cmp(&b.role));
        out
    }

    /// Quarantines a role for `how_long`: recorded here at once (its live sessions end), then
    /// in the shared table, which tells every other instance. Audited and counted.
    pub async fn quarantine(
        &self,
        shared: &Shared,
        role: &str,
        how_long: Duration,
        reason: &str,
        by: &str,
    ) -> Result<Quarantined, String> {
        let until = time::Duration::try_from(how_long)
            .ok()
            .and_then(|d| time::OffsetDateTime::now_utc().checked_add(d))
            .ok_or_else(|| "that quarantine is too long".to_owned())?;
        let q =
            Quarantined { role: role.to_owned(), until: rfc3339(until), reason: reason.to_owned(), by: by.to_owned() };
        if let Ok(mut map) = self.unshared.lock() {
            map.insert(role.to_owned(), (until, q.clone()));
        }
        if let Ok(mut map) = self.quarantined.write() {
            map.insert(role.to_owned(), (until, q.clone()));
        }
        shared.metrics.roles_quarantined_total.fetch_add(1, Relaxed);
        let mut ev = Event::new(EventKind::RoleQuarantined).rule(by).reason(&format!("until {}: {reason}", q.until));
        ev.user = role.to_owned();
        shared.audit.send(ev).await;
        self.terminate_role(shared, role, reason);
        let shared_ok = match self.state.load_full() {
            Some(client) => bounded(client.execute(
                "INSERT INTO pgveil.quarantine (role, until, reason, by) VALUES ($1, now() + make_interval(secs => $2), $3, $4) \
                 ON CONFLICT (role) DO UPDATE SET until = EXCLUDED.until, reason = EXCLUDED.reason, by = EXCLUDED.by, at = now()",
                &[&role, &how_long.as_secs_f64(), &reason, &by],
            ))
            .await
            .and(bounded(client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &role])).await),
            None => Err("the state connection is down".to_owned()),
        };
        if let Err(e) = shared_ok {
            tracing::error!(role, error = %e, "quarantine not shared with other instances (this one enforces it)");
            return Err(format!("quarantined on this instance only: {e}"));
        }
        if let Ok(mut map) = self.unshared.lock() {
            map.remove(role);
        }
        Ok(q)
    }

    /// Lifts a role's quarantine here and in the shared table. `false`: it was not quarantined.
    pub async fn release(&self, shared: &Shared, role: &str, by: &str) -> Result<bool, String> {
        // `quarantined` holds every unshared quarantine too (reloads keep them).
        if let Ok(mut m) = self.unshared.lock() {
            m.remove(role);
        }
        let was_here = self.quarantined.write().map(|mut m| m.remove(role).is_some()).unwrap_or(false);
        let shared_result = match self.state.load_full() {
            Some(client) => {
                let n = bounded(client.execute("DELETE FROM pgveil.quarantine WHERE role = $1", &[&role])).await;
                let _ = bounded(client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &role])).await;
                n.map(|n| n > 0)
            }
            None => Err("the state connection is down".to_owned()),
        };
        let released = was_here || shared_result.as_ref().is_ok_and(|b| *b);
        if released {
            shared.metrics.roles_released_total.fetch_add(1, Relaxed);
            let mut ev = Event::new(EventKind::RoleReleased).rule(by).reason(&format!("released by {by}"));
            ev.user = role.to_owned();
            shared.audit.send(ev).await;
        }
        match shared_result {
            Err(e) if self.shared_table.load(Relaxed) => Err(format!("released on this instance only: {e}")),
            _ => Ok(released),
        }
    }

    /// Replaces the quarantines with the shared table's rows; ends the live sessions of roles
    /// newly quarantined by another instance.
    /// `Ok(false)`: the table is not there (asked first, so the server logs no error every
    /// 30 s on a database without `pgveil init`).
    async fn load(&self, shared: &Shared, client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
        let present: bool =
            client.query_one("SELECT pg_catalog.to_regclass('pgveil.quarantine') IS NOT NULL", &[]).await?.get(0);
        if !present {
            return Ok(false);
        }
        let rows = client
            .query(
                "SELECT role, extract(epoch FROM until)::float8, reason, by FROM pgveil.quarantine WHERE until > now()",
                &[],
            )
            .await?;
        let mut fresh = HashMap::new();
        for r in rows {
            let role: String = r.get(0);
            let epoch: f64 = r.get(1);
            #[allow(clippy::cast_possible_truncation, reason = "seconds since 1970 fit an i64")]
            let until = time::OffsetDateTime::from_unix_timestamp(epoch.floor() as i64)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let q = Quarantined { role: role.clone(), until: rfc3339(until), reason: r.get(2), by: r.get(3) };
            fresh.insert(role, (until, q));
        }
        if let Ok(mut unshared) = self.unshared.lock() {
            keep_unshared(&mut fresh, &mut unshared, time::OffsetDateTime::now_utc());
        }
        let newly: Vec<(String, String)> = {
            let Ok(mut map) = self.quarantined.write() else { return Ok(true) };
            let newly = fresh
                .iter()
                .filter(|(role, _)| !map.contains_key(*role))
                .map(|(role, (_, q))| (role.clone(), q.reason.clone()))
                .collect();
            *map = fresh;
            newly
        };
        for (role, reason) in newly {
            self.terminate_role(shared, &role, &reason);
        }
        self.shared_table.store(true, Relaxed);
        Ok(true)
    }
}

/// Keeps the state connection: LISTEN, load, reload on every notification and periodically;
/// reconnects with backoff. Runs until the proxy stops.
pub async fn watch(shared: Arc<Shared>) {
    if shared.config.catalog.user.is_none() {
        return;
    }
    let db = shared.config.catalog.state_database.clone();
    let mut backoff = Duration::from_millis(500);
    let mut warned = false;
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let connected = crate::catalog::connect_listening(&shared.config, &db, &[CHANNEL], move |_| {
            let _ = tx.send(());
        })
        .await;
        let client = match connected {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::warn!(database = %db, error = %e, "containment state connection failed; retrying");
                tokio::select! {
                    () = shared.stop_accepting.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = backoff.saturating_mul(2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        shared.containment.state.store(Some(Arc::clone(&client)));
        loop {
            match shared.containment.load(&shared, &client).await {
                Ok(true) => warned = false,
                Ok(false) => {
                    shared.containment.shared_table.store(false, Relaxed);
                    if !warned {
                        tracing::warn!(database = %db, "pgveil.quarantine is missing (run `pgveil init`): quarantines are local to this instance");
                        warned = true;
                    }
                }
                Err(e) if client.is_closed() => {
                    tracing::warn!(error = %e, "containment state connection lost; reconnecting");
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read pgveil.quarantine"),
            }
            tokio::select! {
                () = shared.stop_accepting.cancelled() => return,
                got = rx.recv() => if got.is_none() { break },
                () = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            // A burst of notifications is one reload.
            while rx.try_recv().is_ok() {}
        }
        shared.containment.state.store(None);
    }
}

/// The probe budget of one session: policy blocks within a sliding window.
#[derive(Debug)]
pub struct ProbeBudget {
    limit: Option<crate::config::Budget>,
    hits: VecDeque<Instant>,
}

impl ProbeBudget {
    pub fn new(limit: Option<crate::config::Budget>) -> Self {
        ProbeBudget { limit, hits: VecDeque::new() }
    }

    /// Records one block; `true` when this one spends past the budget.
    pub fn hit(&mut self, now: Instant) -> bool {
        let Some(limit) = self.limit else { return false };
        while self.hits.front().is_some_and(|t| now.saturating_duration_since(*t) >= limit.per) {
            self.hits.pop_front();
        }
        self.hits.push_back(now);
        self.hits.len() > usize::try_from(limit.max).unwrap_or(usize::MAX)
    }

    /// What the client is told, and the audit reason.
    pub fn describe(&self) -> String {
        match self.limit {
            Some(l) => format!(
                "more than {} statements blocked within {}s (limits.blocks_per_session)",
                l.max,
                l.per.as_secs()
            ),
            None => String::new(),
        }
    }
}

type Quarantines = HashMap<String, (time::OffsetDateTime, Quarantined)>;

/// Adds to what the shared table holds the quarantines made here that it does not hold yet
/// (their insert is in flight, or failed); forgets those that expired.
fn keep_unshared(fresh: &mut Quarantines, unshared: &mut Quarantines, now: time::OffsetDateTime) {
    unshared.retain(|_, (until, _)| *until > now);
    for (role, q) in unshared.iter() {
        fresh.entry(role.clone()).or_insert_with(|| q.clone());
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.to_offset(time::UtcOffset::UTC).format(&fmt).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_keeps_quarantines_not_yet_in_the_shared_table() {
        let now = time::OffsetDateTime::now_utc();
        let q = |role: &str, secs: i64| {
            let until = now + time::Duration::seconds(secs);
            let q = Quarantined {
                role: role.to_owned(),
                until: rfc3339(until),
                reason: "r".to_owned(),
                by: "b".to_owned(),
            };
            (role.to_owned(), (until, q))
        };
        // The table was read before this instance's insert landed: it holds only "other".
        let mut fresh: Quarantines = [q("other", 60)].into_iter().collect();
        let mut unshared: Quarantines = [q("prober", 60), q("expired", -1)].into_iter().collect();
        keep_unshared(&mut fresh, &mut unshared, now);
        let mut roles: Vec<&str> = fresh.keys().map(String::as_str).collect();
        roles.sort_unstable();
        assert_eq!(roles, ["other", "prober"], "the local quarantine survives the reload");
        assert!(!unshared.contains_key("expired"), "expired local quarantines are forgotten");
        // The table's own row wins over the local copy once it is there.
        let mut fresh: Quarantines = [q("prober", 120)].into_iter().collect();
        keep_unshared(&mut fresh, &mut unshared, now);
        assert_eq!(fresh["prober"].0, now + time::Duration::seconds(120));
    }

    #[test]
    fn the_budget_is_a_sliding_window() {
        let mut b = ProbeBudget::new(Some(crate::config::Budget { max: 3, per: Duration::from_secs(60) }));
        let t0 = Instant::now();
        assert!(!b.hit(t0));
        assert!(!b.hit(t0 + Duration::from_secs(1)));
        assert!(!b.hit(t0 + Duration::from_secs(2)));
        assert!(b.hit(t0 + Duration::from_secs(3)), "the fourth within a minute");
        let mut b = ProbeBudget::new(Some(crate::config::Budget { max: 2, per: Duration::from_secs(10) }));
        for i in 0..10 {
            assert!(!b.hit(t0 + Duration::from_secs(i * 6)), "one every 6 s stays within 2 per 10 s");
        }
        let mut off = ProbeBudget::new(None);
        assert!((0..1000).all(|_| !off.hit(t0)));
    }
}
