//! Statement analysis for one session: the policy as this identity sees it (recomputed when
//! the rules are reloaded), the database's catalog, and a process-wide cache keyed by exact
//! statement text, identity, rules generation and catalog generation, bounded in bytes.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rules::catalog::Catalog;
use rules::sql::session::{Change, PathState, parse_list};
use rules::sql::{Analysis, Analyzer};
use rules::{Identity, SessionPolicy};

use crate::Shared;
use crate::catalog::DbCatalog;

/// Bytes of statement text and plans the cache may hold.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Looked up by a hash of the text (no allocation per statement); the entry keeps the text,
/// and a hit whose text differs is a miss, so a hash collision can never reuse a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    identity: u64,
    policy_generation: u64,
    catalog_generation: u64,
    text_hash: u64,
    /// Filed under a statement's shape (literals replaced), not its exact text: the two never
    /// match each other even where the texts are equal.
    shape: bool,
}

impl Key {
    fn bench(identity: u64, text: &[u8]) -> Key {
        Key { identity, policy_generation: 0, catalog_generation: 0, text_hash: text_hash(text), shape: false }
    }
}

#[derive(Clone)]
struct Entry {
    text: Arc<[u8]>,
    analysis: Arc<Analysis>,
}

#[derive(Clone)]
struct Weigh;

/// What every entry costs besides its contents: key, entry, the analysis and the cache slot.
const ENTRY_OVERHEAD: usize =
    std::mem::size_of::<Key>() + std::mem::size_of::<Entry>() + std::mem::size_of::<Analysis>() + 96;

impl quick_cache::Weighter<Key, Entry> for Weigh {
    /// An estimate of the heap an entry holds: its text, the analysis with its strings, and
    /// the cache's own slot. Estimates err high, so the bound holds in real memory.
    fn weight(&self, _key: &Key, val: &Entry) -> u64 {
        use std::mem::size_of;
        let strings = |v: &[String]| v.iter().fold(0usize, |sum, s| sum.saturating_add(s.len()).saturating_add(32));
        let a = &val.analysis;
        let plans = a.statements.iter().fold(0usize, |sum, s| {
            sum.saturating_add(size_of::<rules::sql::StatementPlan>())
                .saturating_add(strings(&s.substituted))
                .saturating_add(s.outputs.len().saturating_mul(size_of::<Option<rules::Mask>>()))
                .saturating_add(strings(&s.tables))
        });
        let blocks = a.block.iter().chain(&a.flagged).fold(0usize, |sum, b| {
            sum.saturating_add(size_of::<rules::sql::Block>())
                .saturating_add(b.reason.len())
                .saturating_add(b.hint.len())
                .saturating_add(b.rule.len())
                .saturating_add(strings(&b.tables))
                .saturating_add(strings(&b.columns))
        });
        let total = val
            .text
            .len()
            .saturating_add(ENTRY_OVERHEAD)
            .saturating_add(plans)
            .saturating_add(blocks)
            .saturating_add(a.effects.len().saturating_mul(128))
            .saturating_add(a.rewritten.as_ref().map_or(0, |t| t.len().saturating_mul(3)));
        u64::try_from(total).unwrap_or(u64::MAX)
    }
}

pub struct Cache {
    inner: quick_cache::sync::Cache<Key, Entry, Weigh>,
}

impl Cache {
    /// One lookup as a session does it (hash of the text, then the text compared), for the
    /// criterion bench of a cache hit.
    #[doc(hidden)]
    pub fn bench_lookup(&self, identity: u64, text: &[u8]) -> Option<Arc<Analysis>> {
        self.get(&Key::bench(identity, text), text)
    }

    /// Stores an analysis where `bench_lookup` finds it.
    #[doc(hidden)]
    pub fn bench_store(&self, identity: u64, text: &[u8], analysis: &Arc<Analysis>) {
        self.put(Key::bench(identity, text), text, analysis);
    }

    fn get(&self, key: &Key, text: &[u8]) -> Option<Arc<Analysis>> {
        self.inner.get(key).filter(|e| &*e.text == text).map(|e| e.analysis)
    }

    fn put(&self, key: Key, text: &[u8], analysis: &Arc<Analysis>) {
        self.inner.insert(key, Entry { text: Arc::from(text), analysis: Arc::clone(analysis) });
    }
}

fn text_hash(text: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("len", &self.inner.len()).finish()
    }
}

impl Cache {
    pub fn new() -> Self {
        Cache { inner: quick_cache::sync::Cache::with_weighter(16_384, CACHE_BYTES, Weigh) }
    }
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

/// A statement's decision as the session uses it: the (shared, cached) analysis, and the
/// text to send when a cached shape's rewrite was applied to this text's own literals.
#[derive(Debug, Clone)]
pub struct Decided {
    pub analysis: Arc<Analysis>,
    text: Option<Arc<str>>,
}

impl Decided {
    /// The statement PostgreSQL runs in place of the client's, if it is rewritten.
    pub fn rewritten(&self) -> Option<&str> {
        self.text.as_deref().or(self.analysis.rewritten.as_deref())
    }
}

impl From<Arc<Analysis>> for Decided {
    fn from(analysis: Arc<Analysis>) -> Self {
        Decided { analysis, text: None }
    }
}

/// The session's view of the rules, kept current across reloads.
#[derive(Debug)]
pub struct SessionRules {
    pub identity: Identity,
    identity_key: u64,
    pub user: String,
    generation: u64,
    /// Counts the reloads that changed what this session sees (its masks, the hash key):
    /// server-side objects decided under an earlier one are re-decided or refused (I11).
    view_generation: u64,
    policy: Arc<rules::Policy>,
    pub view: SessionPolicy,
    /// Every ruled column as protected: column usage (audit `usage`) is computed against it.
    all: SessionPolicy,
    /// An exempt session inspected only to audit its raw reads (`audit.raw_access`): nothing
    /// it sends is blocked or rewritten, and its results pass as the server sent them.
    pub observe: bool,
    pub catalog: Arc<DbCatalog>,
    /// The session's search_path state (threat model I12): `projected` assumes every
    /// statement sent so far succeeds and decides the next one; `confirmed` follows the
    /// server's CommandCompletes; `at_ready` is `confirmed` at the last ReadyForQuery, which an
    /// implicit transaction that failed returns to.
    projected: PathState,
    confirmed: PathState,
    at_ready: PathState,
    /// A statement changed `projected` or `confirmed` since the three last agreed (the
    /// ReadyForQuery of a session that never changes its path does nothing).
    path_moved: bool,
    path_key: u64,
    temp: Vec<String>,
    /// The last analyses found under shape keys, latest first: a session repeating its
    /// statements with new literals (the simple protocol's way) skips the shared cache,
    /// whose shard lock every session thread would otherwise take on each statement, and
    /// mostly the scan too.
    shape_memo: Vec<ShapeMemo>,
}

/// Shapes a session remembers: a transaction's worth of statements (pgbench's TPC-B has 5).
const SHAPE_MEMO: usize = 8;

#[derive(Debug)]
struct ShapeMemo {
    key: Key,
    shape: Vec<u8>,
    analysis: Arc<Analysis>,
    /// A text of that shape, to match the next one against without scanning it.
    template: Option<rules::sql::Template>,
}

impl SessionRules {
    pub fn new(shared: &Shared, policy: Arc<rules::Policy>, identity: Identity, user: &str, db: &str) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        db.hash(&mut h);
        for r in identity.roles() {
            r.hash(&mut h);
        }
        let view = policy.for_identity(&identity);
        let all = policy.universal();
        let observe = view.exempt;
        let start = PathState::new(vec![user.to_owned(), "public".to_owned()]);
        let mut rules = SessionRules {
            identity,
            identity_key: h.finish(),
            user: user.to_owned(),
            generation: shared.policy_generation.load(Ordering::Relaxed),
            view_generation: 0,
            policy,
            view,
            all,
            observe,
            catalog: shared.catalogs.for_db(db),
            projected: start.clone(),
            confirmed: start.clone(),
            at_ready: start,
            path_moved: false,
            path_key: 0,
            temp: Vec::new(),
            shape_memo: Vec::new(),
        };
        rules.rekey();
        rules
    }

    /// The search_path the server started the session with (`SHOW search_path`'s text).
    pub fn set_default_path(&mut self, value: &str) {
        let start = PathState::new(parse_list(value, &self.user));
        self.projected = start.clone();
        self.confirmed = start.clone();
        self.at_ready = start;
        self.rekey();
    }

    /// Why a masked session may not run with its search_path: one that puts pg_catalog after
    /// another schema lets that schema's functions and operators shadow the built-ins the
    /// session's statements call (threat model I12), from whichever source it came.
    pub fn path_problem(&self) -> Option<String> {
        let path = self.confirmed.default_path();
        let at = path.iter().position(|s| s == "pg_catalog")?;
        let before = path.get(..at).filter(|b| !b.is_empty())?;
        Some(format!(
            "the session's search_path puts pg_catalog after {}, which masked sessions may not use",
            before.join(", ")
        ))
    }

    /// The changes of statements just sent, assumed to succeed: the next statement is decided
    /// against the state they leave.
    /// A SET LOCAL is assumed to hold (it does in a multi-statement Query and in an extended
    /// Sync segment; a lone one outside a transaction is corrected at ReadyForQuery).
    pub fn project(&mut self, analysis: &Analysis) {
        let mut changed = false;
        for c in analysis.statements.iter().flat_map(|p| &p.session) {
            self.projected.apply(c, true);
            changed = true;
        }
        if changed {
            self.path_moved = true;
            self.rekey();
        }
    }

    /// A statement's changes, now that the server ran it (`tag`: its CommandComplete tag; a
    /// COMMIT of a failed transaction answers ROLLBACK).
    pub fn confirm(&mut self, changes: &[Change], tag: &[u8], several: bool) {
        self.path_moved |= !changes.is_empty();
        for c in changes {
            match c {
                Change::Commit { chain } if tag.starts_with(b"ROLLBACK") => {
                    self.confirmed.apply(&Change::Rollback { chain: *chain }, several);
                }
                c => self.confirmed.apply(c, several),
            }
        }
    }

    /// At ReadyForQuery (`status` its byte): outside a transaction block any transaction is
    /// over, and one that failed outside an explicit block was rolled back whole. With nothing
    /// else in flight, the projection is what the server confirmed.
    pub fn ready(&mut self, status: u8, failed: bool, nothing_in_flight: bool) {
        if !self.path_moved {
            return; // no statement changed the path since the states last agreed
        }
        if status == b'I' {
            if failed && !self.at_ready.in_transaction() {
                self.confirmed = self.at_ready.clone();
            }
            self.confirmed.end();
        }
        if self.at_ready != self.confirmed {
            self.at_ready = self.confirmed.clone();
        }
        if nothing_in_flight {
            if self.projected != self.confirmed {
                self.projected = self.confirmed.clone();
                self.rekey();
            }
            // Settled, unless a transaction or SET LOCAL is still open.
            self.path_moved = self.confirmed.in_transaction() || status != b'I';
        }
    }

    /// A temporary relation of this name was dropped (if there was one).
    pub fn forget_temp(&mut self, name: &str) {
        if let Some(at) = self.temp.iter().position(|t| t == name) {
            self.temp.remove(at);
            self.rekey();
        }
    }

    /// The session's temporary relations are gone (DISCARD).
    pub fn discard_temp(&mut self) {
        if !self.temp.is_empty() {
            self.temp.clear();
            self.rekey();
        }
    }

    /// Remembers a temporary relation the session created (bounded: a session that creates
    /// thousands keeps the latest).
    pub fn add_temp(&mut self, name: &str) {
        if !self.temp.iter().any(|t| t == name) {
            if self.temp.len() >= 1024 {
                self.temp.remove(0);
            }
            self.temp.push(name.to_owned());
            self.rekey();
        }
    }

    /// The cache key's identity part: who the session is and how its names resolve.
    fn rekey(&mut self) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.identity_key.hash(&mut h);
        self.projected.key(&mut h);
        self.temp.hash(&mut h);
        self.path_key = h.finish();
    }

    /// Picks up a reloaded policy (atomically: a statement sees the old or the new rules).
    pub fn refresh(&mut self, shared: &Shared) {
        let generation = shared.policy_generation.load(Ordering::Relaxed);
        if generation == self.generation {
            return;
        }
        if let Some(policy) = shared.policy.load_full() {
            // An observed session stays as it started, like a byte pump: it was not started
            // with the pins a masked session needs (rules changing who is exempt apply to
            // new sessions).
            if !self.observe {
                let view = policy.for_identity(&self.identity);
                let key = |p: &rules::Policy| p.hash_key().map(rules::HashKey::fingerprint);
                if view.masked != self.view.masked || key(&policy) != key(&self.policy) {
                    // What the session's stored statements were decided under is gone (I11).
                    self.view_generation = self.view_generation.wrapping_add(1);
                }
                self.view = view;
            }
            self.all = policy.universal();
            self.policy = policy;
        }
        self.generation = generation;
    }

    /// See `view_generation`.
    pub fn view_generation(&self) -> u64 {
        self.view_generation
    }

    pub fn hash_key(&self) -> Option<&rules::HashKey> {
        self.policy.hash_key()
    }

    pub fn is_strict(&self) -> bool {
        !self.view.masked.is_empty()
    }

    /// Analyses statement text, from the cache when possible. `None` text (not UTF-8) and
    /// catalog failures come back as blocking analyses: fail closed.
    pub async fn analyze(&mut self, shared: &Shared, sql: &[u8]) -> Decided {
        self.refresh(shared);
        if shared.audit.is_failing() && shared.config.audit.on_failure == crate::config::AuditFailure::Refuse {
            return Arc::new(blocked(
                AUDIT_UNAVAILABLE,
                "the audit log cannot be written, and statements of audited sessions do not run unaudited",
                "retry shortly; the operator should check the audit log's disk (audit.on_failure)",
            ))
            .into();
        }
        let started = Instant::now();
        // Fresh enough (or reloaded) first; the snapshot itself is taken only when the caches
        // miss (an Arc shared by every session: its count is a cache line they would all
        // write on every statement).
        match self.catalog.refresh(&shared.config, &shared.metrics, started, None).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "catalog unavailable; blocking statements of masked sessions");
                return Arc::new(blocked(
                    "catalog_unavailable",
                    "pgveil cannot read the database catalog right now",
                    "retry shortly",
                ))
                .into();
            }
        };
        let Ok(text) = std::str::from_utf8(sql) else {
            return Arc::new(blocked("unanalysable", "the statement is not valid UTF-8", "send statements in UTF-8"))
                .into();
        };
        let mut key = Key {
            identity: self.path_key,
            policy_generation: self.generation,
            catalog_generation: self.catalog.generation(),
            text_hash: 0,
            shape: false,
        };
        // Statements that differ only in literals (the simple protocol's way of passing
        // values) share one analysis, keyed by the server scanner's tokens; a text matching
        // a remembered text of its shape is that shape's without a scan (nor a hash of it:
        // under the simple protocol the exact text is mostly new).
        if let Some(decided) = self.by_template(shared, &key, text) {
            shared.metrics.analysis_hit(true);
            return decided;
        }
        key.text_hash = text_hash(sql);
        if let Some(hit) = shared.analysis_cache.get(&key, sql) {
            shared.metrics.analysis_hit(false);
            return hit.into();
        }
        let scanned = rules::sql::Scanned::new(text);
        let shaped = scanned
            .as_ref()
            .and_then(|s| rules::sql::shape_key_of(text, s))
            .map(|k| (Key { text_hash: text_hash(k.as_bytes()), shape: true, ..key }, k.into_bytes()));
        let found = match (&shaped, &scanned) {
            (Some((k, shape)), Some(scanned)) => self.by_shape(shared, k, shape, text, scanned),
            _ => None,
        };
        if let Some(hit) = found {
            // Not stored again under its exact text: texts that differ only in literals are
            // mostly one-offs, and storing each filled the cache (and pgveil's memory) with
            // them under a read-write pgbench (benches/load/run.sh).
            match &hit.rewrite {
                None => {
                    shared.metrics.analysis_hit(false);
                    return hit.into();
                }
                // The rewrite is in tokens: applied to this text's own literals.
                Some(rw) => {
                    if let Some(rewritten) = scanned.as_ref().and_then(|s| rw.apply_to(text, s)) {
                        shared.metrics.analysis_hit(false);
                        return Decided { analysis: hit, text: Some(Arc::from(rewritten)) };
                    }
                }
            }
        }
        // The generation is read before the snapshot it is stored under: an analysis is never
        // filed under a newer generation than the catalog it was made from.
        let mut generation = self.catalog.generation();
        let catalog = self.catalog.snapshot();
        let mut analysis = self.run(&catalog, text);
        if analysis.unknown_relation && self.is_strict() {
            // A relation the snapshot does not know: maybe created since. Reload once (waiting
            // out the refresh rate limit rather than skipping it) and decide again; if it is
            // still unknown, the server answers for it (42P01).
            match self.catalog.refresh(&shared.config, &shared.metrics, Instant::now(), Some(started)).await {
                Ok(()) => {
                    generation = self.catalog.generation();
                    let fresh = self.catalog.snapshot();
                    analysis = self.run(&fresh, text);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catalog refresh failed; blocking statements of masked sessions");
                    return Arc::new(blocked(
                        "catalog_unavailable",
                        "pgveil cannot read the database catalog right now",
                        "retry shortly",
                    ))
                    .into();
                }
            }
        }
        #[cfg(debug_assertions)]
        if analysis.block.is_none() && self.is_strict() {
            // Debug builds (the tests) re-parse every statement as the server will run it.
            let snapshot = self.catalog.snapshot();
            let sent = analysis.rewritten.as_deref().unwrap_or(text);
            if let Err(e) = rules::sql::verify_substituted(&self.view, &snapshot, self.projected.current(), sent) {
                tracing::error!(error = %e, statement = sent, "substitution check failed");
                shared.metrics.substitution_check_failures_total.fetch_add(1, Ordering::Relaxed);
            }
        }
        let analysis = Arc::new(analysis);
        if let Some((k, shape)) = shaped {
            shared.analysis_cache.put(Key { catalog_generation: generation, ..k }, &shape, &analysis);
        }
        // The exact text too: repeated statements (the extended protocol's Parse) then skip
        // even the scan. The cache is scan-resistant, so one-off texts are evicted first.
        shared.analysis_cache.put(Key { catalog_generation: generation, ..key }, sql, &analysis);
        shared.metrics.analysis_miss(nanos(started));
        analysis.into()
    }

    /// The analysis filed under a shape: the one the session remembers for it, else the
    /// shared cache's (then remembered, with this text as the template later texts are
    /// matched against).
    fn by_shape(
        &mut self,
        shared: &Shared,
        key: &Key,
        shape: &[u8],
        text: &str,
        scanned: &rules::sql::Scanned,
    ) -> Option<Arc<Analysis>> {
        let at = self.shape_memo.iter().position(|m| m.key == *key && m.shape == shape);
        let memo = match at {
            Some(at) => {
                let mut memo = self.shape_memo.remove(at);
                if memo.template.is_none() {
                    memo.template = rules::sql::Template::new(text, scanned, memo.analysis.rewrite.as_ref());
                }
                memo
            }
            None => {
                let analysis = shared.analysis_cache.get(key, shape)?;
                let template = rules::sql::Template::new(text, scanned, analysis.rewrite.as_ref());
                ShapeMemo { key: *key, shape: shape.to_vec(), analysis, template }
            }
        };
        let hit = Arc::clone(&memo.analysis);
        // Long statements are not remembered by the session (the shared cache, bounded in
        // bytes, still has them): a session holds at most SHAPE_MEMO short ones.
        if memo.shape.len() <= rules::sql::MAX_TEMPLATE_TEXT {
            self.shape_memo.insert(0, memo);
            self.shape_memo.truncate(SHAPE_MEMO);
        }
        Some(hit)
    }

    /// A remembered shape's decision for a text that matches its template (same bytes but
    /// for plain literals): the same shape, so the same analysis, and the shape's compiled
    /// rewrite with this text's literals, all without the scanner. `None` sends the text the
    /// long way.
    fn by_template(
        &mut self,
        #[cfg_attr(not(debug_assertions), allow(unused))] shared: &Shared,
        key: &Key,
        text: &str,
    ) -> Option<Decided> {
        let (at, matched) = self.shape_memo.iter().enumerate().find_map(|(at, memo)| {
            let current = memo.key.identity == key.identity
                && memo.key.policy_generation == key.policy_generation
                && memo.key.catalog_generation == key.catalog_generation;
            if !current {
                return None;
            }
            Some((at, memo.template.as_ref()?.apply(text)?))
        })?;
        // Latest first, so the shapes in use are the ones kept.
        self.shape_memo.get_mut(..=at)?.rotate_right(1);
        let memo = self.shape_memo.first()?;
        #[cfg(debug_assertions)]
        {
            // Debug builds (the tests) check every match against the long way: the scanner's
            // tokens and the shape's rewrite applied to them.
            use rules::sql::Matched;
            let scanned = rules::sql::Scanned::new(text);
            let long_way = match &memo.analysis.rewrite {
                None => Some(Matched::AsIs),
                Some(rw) => scanned.as_ref().and_then(|s| rw.apply_to(text, s)).map(Matched::Rewritten),
            };
            let tokens = memo.template.as_ref().and_then(|t| t.scan(text));
            if long_way.as_ref() != Some(&matched) || tokens.is_none() || tokens != scanned {
                tracing::error!(statement = text, "a template's match differs from the scanner's");
                shared.metrics.substitution_check_failures_total.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let analysis = Arc::clone(&memo.analysis);
        Some(match matched {
            rules::sql::Matched::AsIs => analysis.into(),
            rules::sql::Matched::Rewritten(t) => Decided { analysis, text: Some(Arc::from(t)) },
        })
    }

    /// The decision for a text against a given catalog, without the cache or a server (unit
    /// tests and fuzz targets of the relay).
    #[doc(hidden)]
    pub fn decide_offline(&self, catalog: &Catalog, text: &str) -> Decided {
        Arc::new(self.run(catalog, text)).into()
    }

    fn run(&self, catalog: &Catalog, text: &str) -> Analysis {
        Analyzer::new(&self.view, catalog, &self.user)
            .with_usage(&self.all)
            .with_path_state(self.projected.clone())
            .with_temp_relations(self.temp.clone())
            .analyze(text)
    }
}

fn nanos(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The rule of statements refused while the audit log is failing. They are counted in the
/// metrics and the process log, not the audit log: it is the thing that is down.
pub const AUDIT_UNAVAILABLE: &str = "audit_unavailable";

fn blocked(rule: &str, reason: &str, hint: &str) -> Analysis {
    Analysis {
        block: Some(rules::sql::Block {
            rule: rule.to_owned(),
            reason: reason.to_owned(),
            hint: hint.to_owned(),
            tables: Vec::new(),
            columns: Vec::new(),
            check: None,
            sqlstate: "42501",
        }),
        ..Analysis::default()
    }
}
