//! The proxy's own catalog connection: per database, a snapshot of relations (for masking by
//! RowDescription origin and for statement analysis) and role memberships. Shared by every
//! session of that database; refreshed periodically, after DDL, and when a statement names a
//! relation the snapshot does not know.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rules::catalog::{Catalog, Column, RelKind, Relation};
use rules::names::TableName;
use tokio::sync::Mutex;

use crate::config::{Config, UpstreamTls};
use crate::metrics::Metrics;

/// How often a snapshot is reloaded even without a reason.
const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// Refreshes forced by unknown names are spaced at least this far apart.
const MIN_FORCED_GAP: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("the catalog connection is not configured (catalog.user)")]
    NotConfigured,
    #[error("catalog connection failed: {0}")]
    Connect(String),
    #[error("catalog query failed: {0}")]
    Query(String),
}

/// One database's snapshot and the connection that fills it.
pub struct DbCatalog {
    db: String,
    snapshot: ArcSwap<Catalog>,
    generation: AtomicU64,
    loaded_at: Mutex<Option<Instant>>,
    /// When the snapshot stops being fresh ([`since_start`] nanoseconds; 0: never loaded),
    /// so the common case — fresh, not stale — is checked without the lock every session's
    /// every statement would otherwise take.
    fresh_until: AtomicU64,
    /// Set by DDL this proxy saw, and by the `pgveil_ddl` notification `pgveil init`'s event
    /// trigger sends on every DDL of any session.
    stale: Arc<AtomicBool>,
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for DbCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbCatalog").field("db", &self.db).finish_non_exhaustive()
    }
}

/// Every database's catalog.
#[derive(Debug, Default)]
pub struct Catalogs {
    dbs: dashmap::DashMap<String, Arc<DbCatalog>>,
}

impl Catalogs {
    pub fn for_db(&self, db: &str) -> Arc<DbCatalog> {
        Arc::clone(
            self.dbs
                .entry(db.to_owned())
                .or_insert_with(|| {
                    Arc::new(DbCatalog {
                        db: db.to_owned(),
                        snapshot: ArcSwap::from_pointee(Catalog::default()),
                        generation: AtomicU64::new(0),
                        loaded_at: Mutex::new(None),
                        fresh_until: AtomicU64::new(0),
                        stale: Arc::new(AtomicBool::new(true)),
                        client: Mutex::new(None),
                    })
                })
                .value(),
        )
    }

    /// Marks every snapshot stale (after DDL the proxy saw).
    pub fn invalidate_all(&self) {
        for db in &self.dbs {
            db.stale.store(true, Ordering::Relaxed);
        }
    }
}

const RELATIONS_SQL: &str = "
SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text,
       coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'),
       coalesce(array_agg(a.attnum::int4 ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'),
       coalesce(array_agg(a.atttypid::int8 ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'),
       coalesce(array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}')
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
  AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
GROUP BY c.oid, n.nspname, c.relname, c.relkind";

/// View definitions: `pg_get_viewdef` locks each view, so this runs under a short
/// lock_timeout (a view being dropped or redefined in an open transaction must not stall the
/// catalog, nor the session waiting for it: that session may be the one holding the lock).
/// `$1`: also the system schemas' views (only the first load reads them: their definitions
/// change with the server's version, not with DDL, and reading them is most of a reload's
/// cost — 41 ms of ~45 on PostgreSQL 15).
const VIEWDEFS_SQL: &str = "
SELECT c.oid::int8, pg_catalog.pg_get_viewdef(c.oid)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND n.nspname NOT LIKE 'pg_temp%'
  AND ($1 OR n.nspname NOT IN ('pg_catalog', 'information_schema'))";

/// Schemas whose view definitions are read once and kept across reloads.
const SYSTEM_SCHEMAS: [&str; 2] = ["pg_catalog", "information_schema"];

const ANCESTORS_SQL: &str = "
WITH RECURSIVE up(child, parent, depth) AS (
  SELECT inhrelid, inhparent, 1 FROM pg_catalog.pg_inherits
  UNION ALL
  SELECT up.child, i.inhparent, up.depth + 1 FROM up JOIN pg_catalog.pg_inherits i ON i.inhrelid = up.parent
  WHERE up.depth < 32
)
SELECT child::int8, parent::int8 FROM up ORDER BY child, depth";

pub const MEMBERSHIP_SQL: &str =
    "SELECT rolname::text FROM pg_catalog.pg_roles WHERE pg_catalog.pg_has_role($1::text, oid, 'MEMBER')";

/// Nanoseconds from the first call in this process (at least 1).
fn since_start(t: Instant) -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(start).as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl DbCatalog {
    /// Installs a snapshot without a server (unit tests and fuzz targets of the relay).
    #[doc(hidden)]
    pub fn install(&self, catalog: Catalog) {
        self.snapshot.store(Arc::new(catalog));
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn snapshot(&self) -> Arc<Catalog> {
        self.snapshot.load_full()
    }

    /// Bumped after each new snapshot is stored (Release/Acquire): a snapshot taken after
    /// reading a generation is at least that generation's.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// The snapshot, reloaded first if it is stale or old. Fails closed: an error here means
    /// masked sessions must not run statements.
    pub async fn current(&self, config: &Config, metrics: &Metrics) -> Result<Arc<Catalog>, CatalogError> {
        self.refresh(config, metrics, Instant::now(), None).await?;
        Ok(self.snapshot())
    }

    /// Reloads if needed (`now`: the caller's clock reading): with `after: None`, when the
    /// snapshot is stale, old or missing; with `after: Some(t)` (a statement that arrived at
    /// `t` names a relation the snapshot lacks), unless a reload already started after `t`.
    /// Forced reloads are spaced out by waiting, never by skipping, and the wait holds no lock,
    /// so other sessions are not held up by it; callers that need a reload at the same time
    /// share one.
    pub async fn refresh(
        &self,
        config: &Config,
        metrics: &Metrics,
        now: Instant,
        after: Option<Instant>,
    ) -> Result<(), CatalogError> {
        if after.is_none()
            && !self.stale.load(Ordering::Acquire)
            && since_start(now) < self.fresh_until.load(Ordering::Acquire)
        {
            return Ok(());
        }
        let mut at = loop {
            let at = self.loaded_at.lock().await;
            let needed = match (after, *at) {
                (_, None) => true,
                (None, Some(t)) => self.stale.load(Ordering::Relaxed) || t.elapsed() > REFRESH_EVERY,
                (Some(arrived), Some(t)) => t < arrived,
            };
            if !needed {
                return Ok(());
            }
            let wait = match (after, *at) {
                (Some(_), Some(t)) => MIN_FORCED_GAP.saturating_sub(t.elapsed()),
                _ => Duration::ZERO,
            };
            if wait.is_zero() {
                break at;
            }
            drop(at);
            tokio::time::sleep(wait).await;
        };
        // Taken when the reload starts: what changed before it is in the snapshot.
        let started = Instant::now();
        let mut guard = self.client.lock().await;
        let client = match guard.as_ref() {
            Some(c) if !c.is_closed() => c,
            _ => {
                *guard = Some(connect(config, &self.db, Some(Arc::clone(&self.stale))).await?);
                guard.as_ref().ok_or(CatalogError::NotConfigured)?
            }
        };
        // Cleared before the load, so a DDL notified while it runs marks the snapshot stale again.
        self.stale.store(false, Ordering::Relaxed);
        let previous = self.snapshot();
        let loaded = load_after(client, Some(&previous)).await;
        let catalog = match loaded {
            Ok(c) => c,
            Err(e) => {
                *guard = None;
                self.stale.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.snapshot.store(Arc::new(catalog));
        self.generation.fetch_add(1, Ordering::Release);
        *at = Some(started);
        self.fresh_until.store(since_start(started.checked_add(REFRESH_EVERY).unwrap_or(started)), Ordering::Release);
        metrics.catalog_refreshes_total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The stored secret `auth.query` returns for `user` (its second column), if any.
    pub async fn verifier(&self, config: &Config, sql: &str, user: &str) -> Result<Option<String>, CatalogError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            *guard = Some(connect(config, &self.db, Some(Arc::clone(&self.stale))).await?);
        }
        let client = guard.as_ref().ok_or(CatalogError::NotConfigured)?;
        match client.query(sql, &[&user]).await {
            Ok(rows) => Ok(rows.first().and_then(|r| r.try_get::<_, Option<String>>(1).ok().flatten())),
            Err(e) => {
                *guard = None;
                Err(CatalogError::Query(e.to_string()))
            }
        }
    }

    /// Every role `user` is a member of, itself included.
    pub async fn memberships(&self, config: &Config, user: &str) -> Result<Vec<String>, CatalogError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            *guard = Some(connect(config, &self.db, Some(Arc::clone(&self.stale))).await?);
        }
        let client = guard.as_ref().ok_or(CatalogError::NotConfigured)?;
        match client.query(MEMBERSHIP_SQL, &[&user]).await {
            Ok(rows) => Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect()),
            Err(e) => {
                *guard = None;
                Err(CatalogError::Query(e.to_string()))
            }
        }
    }
}

pub async fn load(client: &tokio_postgres::Client) -> Result<Catalog, CatalogError> {
    load_after(client, None).await
}

/// A snapshot, reusing `previous`'s definitions of the system schemas' views when it has them.
async fn load_after(client: &tokio_postgres::Client, previous: Option<&Catalog>) -> Result<Catalog, CatalogError> {
    let q = |e: tokio_postgres::Error| CatalogError::Query(e.to_string());
    // With an empty search_path, view definitions and type names come out schema-qualified,
    // so a masked session's own search_path cannot change what an inlined view reads.
    client.batch_execute("SET search_path = ''").await.map_err(q)?;
    let rows = client.query(RELATIONS_SQL, &[]).await.map_err(q)?;
    let ancestors = client.query(ANCESTORS_SQL, &[]).await.map_err(q)?;
    let mut names: HashMap<u32, TableName> = HashMap::new();
    let mut relations = Vec::with_capacity(rows.len());
    for row in &rows {
        let oid = u32::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        let name = TableName::new(row.get::<_, &str>(1), row.get::<_, &str>(2));
        names.insert(oid, name.clone());
        let kind = RelKind::from_relkind(row.get::<_, &str>(3).chars().next().unwrap_or(' '));
        let col_names: Vec<String> = row.get(4);
        let attnums: Vec<i32> = row.get(5);
        let types: Vec<i64> = row.get(6);
        let sql_types: Vec<String> = row.get(7);
        let columns = col_names
            .into_iter()
            .zip(attnums)
            .zip(types)
            .zip(sql_types)
            .map(|(((name, attnum), ty), sql_type)| Column {
                name,
                attnum: i16::try_from(attnum).unwrap_or(0),
                type_oid: u32::try_from(ty).unwrap_or(0),
                sql_type,
                bound_name: None,
            })
            .collect();
        relations.push(Relation {
            oid,
            name,
            kind,
            columns,
            ancestors: Vec::new(),
            view_sql: None,
            definition_unavailable: matches!(kind, RelKind::View | RelKind::MaterializedView),
        });
    }
    // Columns renamed since the previous snapshot keep answering to the name they had (the
    // rules name columns; a rename must not unprotect one).
    if let Some(prev) = previous {
        for r in &mut relations {
            let Some(old) = prev.by_oid(r.oid) else { continue };
            for c in &mut r.columns {
                let Some(before) = old.column_by_attnum(c.attnum) else { continue };
                c.bound_name =
                    before.bound_name.clone().or_else(|| (before.name != c.name).then(|| before.name.clone()));
                if before.name != c.name {
                    tracing::warn!(
                        relation = %r.name, from = %before.name, to = %c.name,
                        "column renamed: rules naming its old name keep applying to it; update the rules file"
                    );
                }
            }
        }
    }
    let is_system = |r: &Relation| SYSTEM_SCHEMAS.contains(&r.name.schema.as_str());
    // The system views' definitions from the previous snapshot, by oid (stable for a server).
    let kept: HashMap<u32, String> = previous
        .map(|p| p.relations().filter(|r| is_system(r)).filter_map(|r| Some((r.oid, r.view_sql.clone()?))).collect())
        .unwrap_or_default();
    let with_system = kept.is_empty();
    for r in relations.iter_mut().filter(|r| is_system(r)) {
        if let Some(def) = kept.get(&r.oid) {
            r.view_sql = Some(def.clone());
            r.definition_unavailable = false;
        }
    }
    for (oid, def) in view_definitions(client, &relations, with_system).await? {
        if let Some(r) = relations.iter_mut().find(|r| r.oid == oid) {
            r.view_sql = Some(def);
            r.definition_unavailable = false;
        }
    }
    let mut parents: HashMap<u32, Vec<TableName>> = HashMap::new();
    for row in &ancestors {
        let child = u32::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        let parent = u32::try_from(row.get::<_, i64>(1)).unwrap_or(0);
        if let Some(p) = names.get(&parent) {
            parents.entry(child).or_default().push(p.clone());
        }
    }
    for r in &mut relations {
        if let Some(p) = parents.remove(&r.oid) {
            r.ancestors = p;
        }
    }
    let mut catalog = Catalog::new(relations);
    // What `pgveil init` installed here (the hash mask's function and keys).
    let installed = client
        .query_opt("SELECT pg_catalog.to_regclass('pgveil.meta') IS NOT NULL", &[])
        .await
        .map_err(q)?
        .is_some_and(|r| r.get::<_, bool>(0));
    if installed {
        let version = client.query_opt("SELECT max(version) FROM pgveil.meta", &[]).await.map_err(q)?;
        let keys = client.query("SELECT pgveil.key_fingerprints()", &[]).await.map_err(q)?;
        catalog.pgveil = Some(rules::catalog::Installed {
            version: version.and_then(|r| r.get::<_, Option<i32>>(0)).unwrap_or(0),
            keys: keys.iter().map(|r| r.get::<_, String>(0)).collect(),
        });
    }
    Ok(catalog)
}

/// Drives a connection; each notification's channel goes to `on_notify`.
fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>, on_notify: Box<dyn Fn(&str) + Send>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        use futures_util::StreamExt as _;
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => on_notify(n.channel()),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
}

/// Every view's definition that can be read now: all at once, else view by view (a view
/// locked by another session's open DDL transaction is left unavailable, hence redacted).
async fn view_definitions(
    client: &tokio_postgres::Client,
    relations: &[Relation],
    with_system: bool,
) -> Result<Vec<(u32, String)>, CatalogError> {
    let q = |e: tokio_postgres::Error| CatalogError::Query(e.to_string());
    client.batch_execute("SET lock_timeout = '100ms'").await.map_err(q)?;
    let locked = |e: &tokio_postgres::Error| e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
    match client.query(VIEWDEFS_SQL, &[&with_system]).await {
        Ok(rows) => Ok(rows
            .iter()
            .filter_map(|r| {
                let def: Option<String> = r.get(1);
                Some((u32::try_from(r.get::<_, i64>(0)).ok()?, def?))
            })
            .collect()),
        Err(e) if locked(&e) => {
            let mut out = Vec::new();
            for r in relations
                .iter()
                .filter(|r| matches!(r.kind, RelKind::View | RelKind::MaterializedView) && r.view_sql.is_none())
            {
                match client.query_opt("SELECT pg_catalog.pg_get_viewdef($1::int8::oid)", &[&i64::from(r.oid)]).await {
                    Ok(Some(row)) => {
                        if let Some(def) = row.get::<_, Option<String>>(0) {
                            out.push((r.oid, def));
                        }
                    }
                    Ok(None) => {}
                    Err(e) if locked(&e) => {
                        tracing::warn!(view = %r.name, "view definition locked; redacted until it can be read");
                    }
                    Err(e) => return Err(q(e)),
                }
            }
            Ok(out)
        }
        Err(e) => Err(q(e)),
    }
}

async fn connect(
    config: &Config,
    db: &str,
    stale: Option<Arc<AtomicBool>>,
) -> Result<tokio_postgres::Client, CatalogError> {
    // DDL by any session reaches us when `pgveil init` installed its event trigger: a
    // `pgveil_ddl` notification marks the snapshot stale.
    connect_listening(config, db, &["pgveil_ddl"], move |_| {
        if let Some(s) = &stale {
            s.store(true, Ordering::Relaxed);
        }
    })
    .await
}

/// A connection as the catalog user to `db`, LISTENing on `channels`.
pub(crate) async fn connect_listening(
    config: &Config,
    db: &str,
    channels: &[&str],
    on_notify: impl Fn(&str) + Send + 'static,
) -> Result<tokio_postgres::Client, CatalogError> {
    let user = config.catalog.user.as_deref().ok_or(CatalogError::NotConfigured)?;
    let mut pg = tokio_postgres::Config::new();
    pg.user(user).dbname(db).application_name("pgveil-catalog").connect_timeout(config.upstream.connect_timeout);
    if let Some(pw) = config.catalog.password.as_deref() {
        pg.password(pw);
    }
    if config.upstream.is_unix() {
        pg.host_path(&config.upstream.host);
    } else {
        pg.host(&config.upstream.host);
    }
    pg.port(config.upstream.port);
    let fail = |e: tokio_postgres::Error| CatalogError::Connect(e.to_string());
    let on_notify: Box<dyn Fn(&str) + Send> = Box::new(on_notify);
    let client = match config.upstream.tls {
        UpstreamTls::Disable => {
            let (client, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(fail)?;
            drive(conn, on_notify);
            client
        }
        mode => {
            pg.ssl_mode(if mode == UpstreamTls::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            let tls = crate::tls::upstream_client_config(config).map_err(|e| CatalogError::Connect(e.to_string()))?;
            let (client, conn) = pg.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls)).await.map_err(fail)?;
            drive(conn, on_notify);
            client
        }
    };
    for ch in channels {
        client
            .batch_execute(&format!("LISTEN {}", rules::names::quote_ident(ch)))
            .await
            .map_err(|e| CatalogError::Query(e.to_string()))?;
    }
    Ok(client)
}
