//! The substitution checker (debug builds run it on every statement a masked session sends;
//! the tests of both crates call it): it re-parses the text the server receives and fails on
//! what pgveil must never send, whatever its analysis believed:
//! - a protected relation read anywhere other than as the single relation of a masked
//!   subquery (every masked column an expression under its own name, every other column
//!   itself), unless no masked column of it is reachable;
//! - a relation name not pinned to its schema, or a masked output not pinned (`pins.rs`);
//! - a reference to a protected column of a DML target (which cannot be a subquery) other
//!   than inside that column's mask, or as the column of a raw comparison `predicates:`
//!   grants, with its operator pinned, at the top of the statement's WHERE.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use crate::catalog::Relation;
use crate::names::quote_ident;
use crate::policy::Predicates;

use super::checks::{Col, pins_site, reachable, resolve_column};
use super::protect::{Protected, Protection};
use super::walk::{self, Found, Site, int, strings};

pub fn verify(sql: &str, protect: &mut Protection<'_>) -> Result<(), String> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).map_err(|e| format!("does not parse: {e}"))?;
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref() else { continue };
        let tree = serde_json::to_value(stmt).map_err(|e| e.to_string())?;
        let found = walk::walk(&tree);
        if found.too_deep {
            return Err("nests too deeply to check".to_owned());
        }
        super::pins::check_substitutions(&tree, &mut |schema, name| {
            protect
                .resolve(schema, name)
                .and_then(|r| protect.protected(&r))
                .is_some_and(|p| matches!(*p, Protected::Table { .. }))
        })?;
        for r in &found.rels {
            let strict = !protect.policy.masked.is_empty();
            if strict && pins_site(r) && r.schema().is_none() && !r.cte && protect.resolve(None, r.relname()).is_some()
            {
                return Err(format!("relation {} is not pinned to its schema", r.relname()));
            }
        }
        reads(&found, protect)?;
        targets(sql, &tree, &found, protect)?;
    }
    Ok(())
}

/// Every read of a protected relation is a substitution.
fn reads(found: &Found<'_>, protect: &mut Protection<'_>) -> Result<(), String> {
    for (i, r) in found.rels.iter().enumerate() {
        if !matches!(r.site, Site::Read | Site::CopyTo | Site::Tablesample) {
            continue;
        }
        let Some(rel) = protect.resolve(r.schema(), r.relname()) else { continue };
        let Some(p) = protect.protected(&rel) else { continue };
        if let Protected::View { .. } = *p {
            return Err(format!("view {} is read as written", rel.name));
        }
        let Protected::Table { whole, .. } = *p else { continue };
        let copy_of_unmasked = r.site == Site::CopyTo && !reachable(found, r, &p);
        let Some(s) = found.selects.iter().find(|s| s.from_rels.contains(&i)) else {
            if !copy_of_unmasked {
                return Err(format!("{} is read outside a substitution", rel.name));
            }
            continue;
        };
        let shaped = s.from_rels.len() == 1
            && s.from_subselects.is_empty()
            && s.outputs.len() <= rel.columns.len()
            && s.outputs.iter().all(|(name, plain)| match rel.column(name) {
                None => false,
                Some(_) if whole || p.is_masked(name) => plain.is_none(),
                Some(_) => plain.as_deref() == Some(name.as_str()),
            });
        if !shaped {
            return Err(format!("{} is read outside a substitution", rel.name));
        }
    }
    Ok(())
}

/// Every reference to a masked column of a DML target is inside the mask pgveil writes for
/// it (`mask(alias.column)`, found in the text at the reference) or is the column of a
/// pinned raw comparison the column's `predicates:` grant allows.
fn targets(sql: &str, tree: &Value, found: &Found<'_>, protect: &mut Protection<'_>) -> Result<(), String> {
    if !found.rels.iter().any(|r| r.site == Site::Target) {
        return Ok(());
    }
    let resolved: Vec<Option<Arc<Relation>>> =
        found.rels.iter().map(|r| if r.cte { None } else { protect.resolve(r.schema(), r.relname()) }).collect();
    let compared = pinned_comparisons(tree);
    for c in &found.cols {
        let (site, name) = match resolve_column(found, &resolved, c) {
            Col::Site(s, n) | Col::Ambiguous(s, n) => (s, n),
            Col::Other => continue,
        };
        let Some(r) = found.rels.get(site).filter(|r| r.site == Site::Target) else { continue };
        let Some(rel) = resolved.get(site).cloned().flatten() else { continue };
        let Some(p) = protect.protected(&rel) else { continue };
        if !p.is_masked(&name) {
            continue;
        }
        let grant = p.column(&name).map_or(Predicates::None, |v| v.predicates);
        let raw_ok = compared.iter().any(|(at, op)| {
            *at == c.location
                && match grant {
                    Predicates::Equality => op == "=",
                    Predicates::Any => true,
                    _ => false,
                }
        });
        if raw_ok {
            continue;
        }
        let qualified = format!("{}.{}", quote_ident(r.reference_name()), quote_ident(&name));
        let masked =
            protect.column_expr(&p, &name, &qualified).is_some_and(|e| inside(sql, c.location, &e, &qualified));
        if !masked {
            return Err(format!(
                "the protected column {name} of write target {} is referenced outside its mask",
                rel.name
            ));
        }
    }
    Ok(())
}

/// Whether the reference at byte `at` of `sql` is one of the occurrences of `qualified` in
/// the mask expression `mask` written there.
fn inside(sql: &str, at: i32, mask: &str, qualified: &str) -> bool {
    let Ok(at) = usize::try_from(at) else { return false };
    mask.match_indices(qualified).any(|(k, _)| {
        at.checked_sub(k).and_then(|start| sql.get(start..start.saturating_add(mask.len()))) == Some(mask)
    })
}

/// The column references compared raw at the top of a DML statement's WHERE (through AND,
/// and the ORs an IN list is written as): `column OPERATOR(pg_catalog.op) value`, with the
/// operator pgveil pins. (location, operator name)
const AND: i64 = pg_query::protobuf::BoolExprType::AndExpr as i64;
const OR: i64 = pg_query::protobuf::BoolExprType::OrExpr as i64;

fn pinned_comparisons(tree: &Value) -> HashSet<(i32, String)> {
    let mut out = HashSet::new();
    let top = tree.get("node").unwrap_or(tree);
    let Some(stmt) = top.get("UpdateStmt").or_else(|| top.get("DeleteStmt")) else {
        return out;
    };
    let mut stack: Vec<&Value> = stmt.get("where_clause").into_iter().collect();
    while let Some(v) = stack.pop() {
        let v = v.get("node").unwrap_or(v);
        if let Some(b) = v.get("BoolExpr") {
            // AND (1) and OR (2); never NOT.
            if matches!(b.get("boolop").and_then(Value::as_i64), Some(AND | OR)) {
                stack.extend(b.get("args").and_then(Value::as_array).into_iter().flatten());
            }
            continue;
        }
        let Some(e) = v.get("AExpr").and_then(Value::as_object) else { continue };
        let name = strings(e.get("name"));
        let [schema, op] = name.as_slice() else { continue };
        if schema != "pg_catalog" {
            continue;
        }
        let lexpr = e.get("lexpr").map(|l| l.get("node").unwrap_or(l));
        let Some(cr) = lexpr.and_then(|l| l.get("ColumnRef")).and_then(Value::as_object) else { continue };
        if let Some(at) = int(cr.get("location")) {
            let op = match op.as_str() {
                "~~" => "LIKE",
                "!~~" => "NOT LIKE",
                "~~*" => "ILIKE",
                "!~~*" => "NOT ILIKE",
                o => o,
            };
            out.insert((at, op.to_owned()));
        }
    }
    out
}
