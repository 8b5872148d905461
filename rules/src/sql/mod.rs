//! Statement decisions: the one place that imports the SQL parser (PostgreSQL's own, through
//! `pg_query`). For a session with masked columns, every reference to a protected relation is
//! replaced by a subquery that yields the session's masked values (threat model I2), so what
//! PostgreSQL executes can never read a raw protected value; what cannot be made safe that way
//! is blocked (I4). For every session, the `selects` minimization rules are applied.
//!
//! The decision is data: [`Analysis`] says "forward this text, rewritten by these edits" or
//! "block for this reason", computed once and cached by the proxy.
//!
//! - `tokens`: the server scanner's tokens, the coordinates of every edit.
//! - `walk`: one pass over the parse tree that finds relations, column references, functions
//!   and clauses, with their scopes.
//! - `protect`: which relations are protected for the session and the subquery each becomes.
//! - `mask_sql`: each mask as an SQL expression.
//! - `checks`: statements, settings and functions that stay blocked.
//! - `selects`: the minimization rules.
//! - `shape`: cache keys shared by statements that differ only in literals.

#![allow(clippy::result_large_err, reason = "a Block is the cold path; boxing it would not speed the hot one")]

mod checks;
pub mod functions;
pub mod mask_sql;
mod pins;
mod protect;
mod selects;
pub mod session;
mod shape;
mod tokens;
pub mod usage;
mod verify;
mod walk;

use std::fmt;

use crate::catalog::Catalog;
use crate::mask::Mask;
use crate::policy::{Mode, SessionPolicy};

pub use checks::unsafe_encoding;
pub use shape::{MAX_TEMPLATE_TEXT, Matched, Scanned, Template, shape_key, shape_key_of};
pub use tokens::Rewrite;
pub use usage::{ColumnUse, Use};

/// Why a statement may not run (or, in monitor mode, would not have run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The `selects` rule's name, or a built-in reason ([`Reason::as_str`]).
    pub rule: String,
    pub reason: String,
    pub hint: String,
    pub tables: Vec<String>,
    pub columns: Vec<String>,
    /// For a `selects` rule, which check fired (`select_star`, `unfiltered`); `None` for the
    /// built-in reasons, where `rule` already says it.
    pub check: Option<&'static str>,
    /// The SQLSTATE the client gets: `42501` for policy, `42601` for a statement the parser
    /// rejects (the server's own answer to it).
    pub sqlstate: &'static str,
}

/// The built-in reasons a statement is blocked for (the audit `rule` of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// SQL run from strings: DO, non-SQL function bodies, dynamic-SQL built-ins.
    Procedural,
    /// A built-in of a denied family, or a user-defined function the rules do not allow.
    Function,
    /// DDL that changes a protected relation or what derives from it.
    ProtectedDdl,
    /// A lexer-affecting setting.
    Setting,
    /// SET ROLE / SET SESSION AUTHORIZATION.
    IdentityChange,
    /// A CTE named like a protected relation.
    CteShadow,
    /// A masked column in a filter, join, ordering or grouping its `predicates:` forbids.
    Predicate,
    /// A whole-row reference to a protected DML target.
    WholeRow,
    /// Statistics relations that hold sample values.
    Catalog,
    /// Something this version cannot make safe (TABLESAMPLE of a protected table, …).
    Unsupported,
    /// The parser rejected the statement (answered with 42601).
    SyntaxError,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Procedural => "procedural",
            Reason::Function => "function",
            Reason::ProtectedDdl => "protected_ddl",
            Reason::Setting => "setting",
            Reason::IdentityChange => "identity_change",
            Reason::CteShadow => "cte_shadow",
            Reason::Predicate => "predicate",
            Reason::WholeRow => "whole_row",
            Reason::Catalog => "catalog",
            Reason::Unsupported => "unsupported",
            Reason::SyntaxError => "syntax_error",
        }
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.reason)
    }
}

pub(crate) fn block(reason: Reason, why: impl Into<String>, hint: impl Into<String>) -> Block {
    Block {
        rule: reason.as_str().to_owned(),
        reason: why.into(),
        hint: hint.into(),
        tables: Vec::new(),
        columns: Vec::new(),
        check: None,
        sqlstate: "42501",
    }
}

/// A `max_rows` cut for one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLimit {
    pub rule: String,
    pub rows: u64,
    pub mode: Mode,
    pub tables: Vec<String>,
}

/// What the session must do for one statement of the text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatementPlan {
    /// Masks by output position for the result-column layer. Substitution makes it
    /// unnecessary: it stays empty, and the layer keys on RowDescription origins only.
    pub outputs: Vec<Option<Mask>>,
    pub max_rows: Option<RowLimit>,
    /// Protected relations this statement reads (substituted or not).
    pub tables: Vec<String>,
    /// Protected relations replaced by their masked subquery.
    pub substituted: Vec<String>,
    /// Output columns that are a masked column of a substituted table, by output name, with
    /// that column's origin (table OID, attnum): the server reports 0 for the masked
    /// expression, the proxy reports what PostgreSQL would without pgveil.
    pub origins: Vec<(String, u32, i16)>,
    /// How this statement uses protected columns (audit `usage`); empty unless the analyzer
    /// was given the rules' universal view ([`Analyzer::with_usage`]).
    pub usage: Vec<ColumnUse>,
    /// For a statement that reads a raw protected value: its normalized text and fingerprint,
    /// computed once per analysis for the `raw_access` events of every execution.
    pub normalized: Option<Box<(String, String)>>,
    /// What it changes in the session's name resolution once it ran (search_path, transaction
    /// boundaries): the proxy applies these at its CommandComplete.
    pub session: Vec<session::Change>,
}

impl StatementPlan {
    /// Whether the statement reads a protected column's raw value (audit `raw_access`).
    pub fn reads_raw(&self) -> bool {
        self.usage.iter().any(|u| u.how.is_raw())
    }
}

/// Session-level effects a statement has that the proxy must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// SQL `PREPARE name`: its row limit applies to `EXECUTE name`; the statement's text as
    /// the client wrote it (to decide again after a rules reload, I11).
    Prepare(String, Box<StatementPlan>, String),
    /// SQL `DEALLOCATE name` (`None`: ALL).
    Deallocate(Option<String>),
    /// A temporary relation was created: its name, unknown to the shared catalog, is not a
    /// reason to reload it.
    TempRelation(String),
    /// `DISCARD ALL` / `DISCARD TEMP`: the session's temporary relations are gone.
    TempDiscarded,
    /// `DROP … name` (unqualified or in pg_temp): a temporary relation of that name is gone.
    TempDropped(String),
    /// SQL `EXECUTE name`: runs what `PREPARE name` stored.
    Executes(String),
    /// `DECLARE name CURSOR`: the server holds its query, decided under today's rules.
    Cursor(String),
    /// `FETCH` / `MOVE` from a cursor.
    Fetches(String),
    /// `CLOSE name` (`None`: ALL).
    CloseCursor(Option<String>),
    /// The session created a temporary view, a rule or a function: server-side text the
    /// proxy cannot re-decide when the rules change (I11).
    StoredCode,
}

/// The result of analysing one Query or Parse text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Analysis {
    pub statements: Vec<StatementPlan>,
    /// The first enforced block, if any: nothing of the text may run.
    pub block: Option<Block>,
    /// Findings of `monitor`-mode rules: the text runs, these are recorded.
    pub flagged: Vec<Block>,
    pub effects: Vec<Effect>,
    /// The edits that make the text safe; `None`: forward it as it is.
    pub rewrite: Option<Rewrite>,
    /// The rewritten text of the text this analysis was made for.
    pub rewritten: Option<String>,
    /// A relation the catalog snapshot does not know was named (the proxy refreshes the
    /// snapshot once and decides again; then the server answers for it).
    pub unknown_relation: bool,
    /// The column usage of every statement of the text, also when it is blocked.
    pub usage: Vec<ColumnUse>,
}

/// Normalizes a statement for the audit log: every literal becomes `$n`.
pub fn normalize(sql: &str) -> Option<String> {
    pg_query::normalize(sql).ok()
}

/// A stable hash of the statement's normalized shape, for grouping.
pub fn fingerprint(sql: &str) -> Option<String> {
    pg_query::fingerprint(sql, pg_query::ParserOptions::DEFAULT, pg_query::FingerprintOptions::DEFAULT)
        .ok()
        .map(|f| f.hex)
}

/// The relations a statement names (`schema.table` or `table`), for tools.
pub fn tables(sql: &str) -> Option<Vec<String>> {
    pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok().map(|p| p.tables())
}

/// Decides statements for one session.
#[derive(Debug)]
pub struct Analyzer<'a> {
    policy: &'a SessionPolicy,
    catalog: &'a Catalog,
    user: String,
    path: session::PathState,
    temp: Vec<String>,
    all: Option<&'a SessionPolicy>,
}

impl<'a> Analyzer<'a> {
    /// With the default search_path (`"$user", public`).
    pub fn new(policy: &'a SessionPolicy, catalog: &'a Catalog, user: &str) -> Self {
        Analyzer {
            policy,
            catalog,
            user: user.to_owned(),
            path: session::PathState::new(vec![user.to_owned(), "public".to_owned()]),
            temp: Vec::new(),
            all: None,
        }
    }

    /// Computes column usage (audit `usage`) against the rules' universal view
    /// ([`crate::Policy::universal`]): every ruled column counts as protected.
    pub fn with_usage(mut self, all: &'a SessionPolicy) -> Self {
        self.all = Some(all);
        self
    }

    /// Names of temporary relations the session created (see [`Effect::TempRelation`]).
    pub fn with_temp_relations(mut self, names: Vec<String>) -> Self {
        self.temp = names;
        self
    }

    /// Names resolve through this search_path (`$user` already expanded).
    pub fn with_search_path(mut self, path: Vec<String>) -> Self {
        self.path = session::PathState::new(path);
        self
    }

    /// The session's search_path state as the statements before this text left it; each
    /// statement of the text is decided against the state the ones before it leave.
    pub fn with_path_state(mut self, state: session::PathState) -> Self {
        self.path = state;
        self
    }

    /// Analyses a Query or Parse text (one or more statements).
    pub fn analyze(&mut self, sql: &str) -> Analysis {
        let mut out = Analysis::default();
        let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
            Ok(p) => p,
            Err(e) => {
                let message = e.to_string();
                out.block = Some(Block { sqlstate: "42601", ..block(Reason::SyntaxError, first_words(&message), "") });
                return out;
            }
        };
        let strict = !self.policy.masked.is_empty();
        let Some(toks) = tokens::Tokens::new(sql) else {
            out.block = Some(block(Reason::Unsupported, "pgveil cannot scan this statement", ""));
            return out;
        };
        let mut edits = Vec::new();
        let several = parsed.protobuf.stmts.len() > 1;
        let mut path = self.path.clone();
        for raw in &parsed.protobuf.stmts {
            let current = path.current().to_vec();
            let mut protect = protect::Protection::new(self.policy, self.catalog, &current).with_temp(&self.temp);
            let mut all = self.all.map(|a| protect::Protection::new(a, self.catalog, &current));
            let Some(stmt) = raw.stmt.as_ref() else { continue };
            let Ok(tree) = serde_json::to_value(stmt) else {
                out.block = Some(block(Reason::Unsupported, "pgveil cannot read this statement's tree", ""));
                return out;
            };
            let found = walk::walk(&tree);
            if found.too_deep {
                out.block =
                    Some(block(Reason::Unsupported, "the statement nests too deeply for pgveil", "simplify it"));
                return out;
            }
            checks::effects(&found, &self.temp, &mut out.effects);
            let mut plan = StatementPlan { session: checks::changes(&found, &self.user), ..StatementPlan::default() };
            for c in &plan.session {
                path.apply(c, several);
            }
            if let Some(all) = all.as_mut() {
                plan.usage = usage::of(&found, all, &mut protect);
                for u in &plan.usage {
                    if !out.usage.contains(u) {
                        out.usage.push(u.clone());
                    }
                }
                if plan.reads_raw() {
                    let text = statement_text(sql, raw.stmt_location, raw.stmt_len);
                    plan.normalized = Some(Box::new((
                        normalize(text).unwrap_or_else(|| text.to_owned()),
                        fingerprint(text).unwrap_or_default(),
                    )));
                }
            }
            if strict {
                match checks::check(&found, &mut protect, &toks) {
                    Ok(e) => {
                        out.unknown_relation |= e.unknown_relation;
                        if let Some(b) = e.unresolved {
                            out.block = Some(b);
                            return out;
                        }
                        plan.tables = e.read_protected;
                        plan.substituted = e.substituted;
                        plan.origins = e.origins;
                        edits.extend(e.edits);
                    }
                    Err(b) => {
                        out.block = Some(b);
                        return out;
                    }
                }
            }
            if let Err(b) = selects::apply(self.policy, &found, &mut protect, &mut plan, &mut out.flagged) {
                out.block = Some(b);
                return out;
            }
            if let walk::StmtKind::Prepare(name) = &found.kind {
                let text = statement_text(sql, raw.stmt_location, raw.stmt_len).to_owned();
                out.effects.push(Effect::Prepare(name.clone(), Box::new(plan.clone()), text));
            }
            out.statements.push(plan);
        }
        if !edits.is_empty() {
            let rewrite = Rewrite::new(edits, toks.len());
            out.rewritten = rewrite.apply_with(sql, &toks);
            if out.rewritten.is_none() {
                out.block = Some(block(Reason::Unsupported, "pgveil cannot rewrite this statement", ""));
                return out;
            }
            out.rewrite = Some(rewrite);
        }
        out
    }
}

/// One statement of a text, by the parser's byte location and length (0: to the end).
fn statement_text(sql: &str, location: i32, len: i32) -> &str {
    let start = usize::try_from(location).unwrap_or(0);
    let end = match usize::try_from(len) {
        Ok(0) | Err(_) => sql.len(),
        Ok(n) => start.saturating_add(n).min(sql.len()),
    };
    sql.get(start..end).map_or(sql, str::trim)
}

fn first_words(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod tests_names;

/// The substitution checker (see `verify.rs`), for tests of both crates.
#[doc(hidden)]
pub fn verify_substituted(policy: &SessionPolicy, catalog: &Catalog, path: &[String], sql: &str) -> Result<(), String> {
    let mut p = protect::Protection::new(policy, catalog, path);
    verify::verify(sql, &mut p)
}
