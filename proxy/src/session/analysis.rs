//! Statement analysis for one session: the policy as this identity sees it (recomputed when
//! the rules are reloaded), the database's catalog, and a process-wide cache keyed by exact
//! statement text, identity, rules generation and catalog generation, bounded in bytes.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rules::catalog::Catalog;
use rules::sql::{Analysis, Analyzer};
use rules::{Identity, SessionPolicy};

use crate::Shared;
use crate::catalog::DbCatalog;

/// Bytes of statement text and plans the cache may hold.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    identity: u64,
    policy_generation: u64,
    catalog_generation: u64,
    sql: Arc<[u8]>,
}

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<Key, Arc<Analysis>> for Weigh {
    fn weight(&self, key: &Key, val: &Arc<Analysis>) -> u64 {
        let plans: usize = val.statements.iter().map(|s| 64 + s.outputs.len() * 48).sum();
        u64::try_from(key.sql.len() + plans + 128).unwrap_or(u64::MAX)
    }
}

pub struct Cache {
    inner: quick_cache::sync::Cache<Key, Arc<Analysis>, Weigh>,
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

/// The session's view of the rules, kept current across reloads.
#[derive(Debug)]
pub struct SessionRules {
    pub identity: Identity,
    identity_key: u64,
    pub user: String,
    generation: u64,
    policy: Arc<rules::Policy>,
    pub view: SessionPolicy,
    pub catalog: Arc<DbCatalog>,
}

impl SessionRules {
    pub fn new(shared: &Shared, policy: Arc<rules::Policy>, identity: Identity, user: &str, db: &str) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        db.hash(&mut h);
        for r in identity.roles() {
            r.hash(&mut h);
        }
        let view = policy.for_identity(&identity);
        SessionRules {
            identity,
            identity_key: h.finish(),
            user: user.to_owned(),
            generation: shared.policy_generation.load(Ordering::Relaxed),
            policy,
            view,
            catalog: shared.catalogs.for_db(db),
        }
    }

    /// Picks up a reloaded policy (atomically: a statement sees the old or the new rules).
    pub fn refresh(&mut self, shared: &Shared) {
        let generation = shared.policy_generation.load(Ordering::Relaxed);
        if generation == self.generation {
            return;
        }
        if let Some(policy) = shared.policy.load_full() {
            self.view = policy.for_identity(&self.identity);
            self.policy = policy;
        }
        self.generation = generation;
    }

    pub fn hash_key(&self) -> Option<&rules::HashKey> {
        self.policy.hash_key()
    }

    pub fn is_strict(&self) -> bool {
        !self.view.masked.is_empty()
    }

    /// Analyses statement text, from the cache when possible. `None` text (not UTF-8) and
    /// catalog failures come back as blocking analyses: fail closed.
    pub async fn analyze(&mut self, shared: &Shared, sql: &[u8]) -> Arc<Analysis> {
        self.refresh(shared);
        let started = Instant::now();
        let catalog = match self.catalog.current(&shared.config, &shared.metrics).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "catalog unavailable; blocking statements of masked sessions");
                return Arc::new(blocked(
                    "catalog_unavailable",
                    "pgveil cannot read the database catalog right now",
                    "retry shortly",
                ));
            }
        };
        let key = Key {
            identity: self.identity_key,
            policy_generation: self.generation,
            catalog_generation: self.catalog.generation(),
            sql: Arc::from(sql),
        };
        if let Some(hit) = shared.analysis_cache.inner.get(&key) {
            shared.metrics.analysis(nanos(started), true);
            return hit;
        }
        let Ok(text) = std::str::from_utf8(sql) else {
            return Arc::new(blocked("unanalysable", "the statement is not valid UTF-8", "send statements in UTF-8"));
        };
        let mut analysis = self.run(&catalog, text);
        if analysis.block.as_ref().is_some_and(|b| b.rule == "unknown_relation")
            && self.catalog.refresh(&shared.config, &shared.metrics, true).await.is_ok()
        {
            // A relation created since the snapshot: look again with a fresh catalog.
            let fresh = self.catalog.snapshot();
            analysis = self.run(&fresh, text);
        }
        let analysis = Arc::new(analysis);
        let key = Key { catalog_generation: self.catalog.generation(), ..key };
        shared.analysis_cache.inner.insert(key, Arc::clone(&analysis));
        shared.metrics.analysis(nanos(started), false);
        analysis
    }

    fn run(&self, catalog: &Catalog, text: &str) -> Analysis {
        Analyzer::new(&self.view, catalog, &self.user).analyze(text)
    }
}

fn nanos(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn blocked(rule: &str, reason: &str, hint: &str) -> Analysis {
    Analysis {
        block: Some(rules::sql::Block {
            rule: rule.to_owned(),
            reason: reason.to_owned(),
            hint: hint.to_owned(),
            tables: Vec::new(),
            columns: Vec::new(),
        }),
        ..Analysis::default()
    }
}
