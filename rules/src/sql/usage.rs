//! Column usage for the audit log (audit.md `usage`): for every protected column a statement
//! involves, whether the session saw it masked, raw, or compared it raw under a
//! `predicates: equality/any` grant. Computed for every session, exempt ones included, from
//! the same walk the decision uses; "protected" here means named by any rule, whoever the
//! session is, so a reader the rules leave unmasked is seen reading raw values.
//!
//! It errs towards listing a column: `*`, whole-row references, NATURAL joins and reads of a
//! view over protected tables count every protected column they could reach.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::catalog::Relation;
use crate::policy::Predicates;

use super::checks::{Col, resolve_column};
use super::protect::{Protected, Protection};
use super::walk::{self, Found, Position, Site};

/// How views over views are followed for usage.
const MAX_DEPTH: usize = 8;

/// How a statement used a protected column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Use {
    /// Returned or computed on masked values.
    Masked,
    /// Returned (or computed on) raw: the session's rules leave the column unmasked.
    Raw,
    /// Compared raw in a filter a `predicates: equality/any` grant allows.
    PredicateRaw,
}

impl Use {
    pub fn as_str(self) -> &'static str {
        match self {
            Use::Masked => "masked",
            Use::Raw => "raw",
            Use::PredicateRaw => "predicate_raw",
        }
    }

    /// Whether a raw value was read (audit `raw_access`).
    pub fn is_raw(self) -> bool {
        matches!(self, Use::Raw | Use::PredicateRaw)
    }
}

/// One protected column and one way it was used (a column used two ways appears twice).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ColumnUse {
    /// `schema.table.column` of the relation read (a child's own name for a child).
    pub column: String,
    /// Its `schema.table`.
    pub table: String,
    pub how: Use,
}

/// The usage of one walked statement. `all` sees every ruled column as protected; `session`
/// is the session's own view (what it masks).
pub(crate) fn of(found: &Found<'_>, all: &mut Protection<'_>, session: &mut Protection<'_>) -> Vec<ColumnUse> {
    let mut out = BTreeSet::new();
    collect(found, all, session, 0, &mut out);
    out.into_iter().collect()
}

fn collect(
    found: &Found<'_>,
    all: &mut Protection<'_>,
    session: &mut Protection<'_>,
    depth: usize,
    out: &mut BTreeSet<ColumnUse>,
) {
    let mut resolved: Vec<Option<Arc<Relation>>> = Vec::with_capacity(found.rels.len());
    let mut prot: Vec<Option<Arc<Protected>>> = Vec::with_capacity(found.rels.len());
    for r in &found.rels {
        let schema = r.schema();
        let is_cte = r.cte;
        let rel = if is_cte { None } else { all.resolve(schema, r.relname()) };
        prot.push(rel.as_ref().and_then(|x| all.protected(x)));
        resolved.push(rel);
    }
    if prot.iter().all(Option::is_none) {
        return;
    }
    // (site, column, position, reference location)
    let mut refs: Vec<(usize, String, Position, i32)> = Vec::new();
    let every = |site: usize, position: Position, refs: &mut Vec<(usize, String, Position, i32)>| {
        if let Some(rel) = resolved.get(site).cloned().flatten() {
            for c in &rel.columns {
                refs.push((site, c.name.clone(), position, -1));
            }
        }
    };
    for c in &found.cols {
        let star = c.fields.last().is_some_and(|f| f == "*");
        if star {
            let qualifier = c.fields.len().checked_sub(2).and_then(|i| c.fields.get(i));
            for site in sites_in_scope(found, c.scope, qualifier.map(String::as_str)) {
                every(site, c.position, &mut refs);
            }
            continue;
        }
        match resolve_column(found, &resolved, c) {
            Col::Site(s, n) | Col::Ambiguous(s, n) => refs.push((s, n, c.position, c.location)),
            Col::Other => {
                // A whole-row reference (`t` alone, not a column of anything in scope).
                if let [only] = c.fields.as_slice() {
                    for site in sites_in_scope(found, c.scope, Some(only)) {
                        every(site, c.position, &mut refs);
                    }
                }
            }
        }
    }
    for (i, r) in found.rels.iter().enumerate() {
        if found.natural_join && r.site == Site::Read {
            every(i, Position::Filter("JOIN"), &mut refs);
        }
        if r.site == Site::CopyTo {
            if r.copy_columns.is_empty() {
                every(i, Position::Output, &mut refs);
            } else {
                refs.extend(r.copy_columns.iter().map(|c| (i, c.clone(), Position::Output, -1)));
            }
        }
    }
    let mut views_done: Vec<usize> = Vec::new();
    for (site, name, position, location) in refs {
        let (Some(rel), Some(p)) = (resolved.get(site).cloned().flatten(), prot.get(site).cloned().flatten()) else {
            continue;
        };
        if let Protected::View { .. } = &*p {
            // What the view reads is what its definition reads.
            if views_done.contains(&site) || depth >= MAX_DEPTH {
                continue;
            }
            views_done.push(site);
            if let Some(def) = rel.view_sql.as_deref() {
                definition(def, all, session, depth.saturating_add(1), out);
            }
            continue;
        }
        if !p.is_masked(&name) {
            continue;
        }
        let table = rel.name.to_string();
        let column = format!("{table}.{}", crate::names::quote_ident(&name));
        let mine = session.protected(&rel);
        let how = match mine.as_deref() {
            Some(m) if m.is_masked(&name) => {
                if raw_compare(found, site, location, position, m.column(&name).map(|v| v.predicates)) {
                    Use::PredicateRaw
                } else {
                    Use::Masked
                }
            }
            _ => Use::Raw,
        };
        out.insert(ColumnUse { column, table, how });
    }
}

/// The FROM entries a `*` (or `q.*`, or the whole-row reference `q`) at this scope denotes.
fn sites_in_scope(found: &Found<'_>, scope: usize, qualifier: Option<&str>) -> Vec<usize> {
    let mut at = Some(scope);
    while let Some(si) = at {
        let Some(s) = found.scopes.get(si) else { break };
        match qualifier {
            None => return s.entries.iter().filter_map(|e| e.rel).collect(),
            Some(q) => {
                if let Some(e) = s.entries.iter().rev().find(|e| e.alias == q) {
                    return e.rel.into_iter().collect();
                }
            }
        }
        at = s.parent;
    }
    Vec::new()
}

/// Whether this reference is a raw comparison a grant lets through (as `checks` decides it:
/// a top-level WHERE conjunct of the right shape).
fn raw_compare(
    found: &Found<'_>,
    site: usize,
    location: i32,
    position: Position,
    predicates: Option<Predicates>,
) -> bool {
    let Position::Filter(_) = position else { return false };
    let Some(r) = found.rels.get(site) else { return false };
    let conj = found
        .scopes
        .get(r.scope)
        .and_then(|s| s.conjuncts.iter().find(|k| k.col_location == location && location >= 0));
    match (predicates, conj) {
        (Some(Predicates::Equality), Some(k)) => k.op == "=",
        (Some(Predicates::Any), Some(_)) => true,
        // Elsewhere (ORDER BY, GROUP BY, a join) `any` compares the masked values.
        _ => false,
    }
}

/// The usage of a view's definition.
fn definition(
    sql: &str,
    all: &mut Protection<'_>,
    session: &mut Protection<'_>,
    depth: usize,
    out: &mut BTreeSet<ColumnUse>,
) {
    let sql = sql.trim().trim_end_matches(';').trim();
    let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else { return };
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref() else { continue };
        let Ok(tree) = serde_json::to_value(stmt) else { continue };
        let found = walk::walk(&tree);
        collect(&found, all, session, depth, out);
    }
}
