//! A DML target (which cannot be a subquery): its columns qualified by the range variable
//! pgveil bound them to, masked columns masked, and how column references resolve.

#[allow(clippy::wildcard_imports, reason = "a part of checks, with its imports")]
use super::*;

#[allow(clippy::too_many_arguments, reason = "the pieces of one decision")]
pub(super) fn target(
    found: &Found<'_>,
    site: usize,
    rel: &Arc<Relation>,
    p: &Protected,
    protect: &Protection<'_>,
    toks: &Tokens<'_>,
    raw_ok: &HashSet<i32>,
    moved: &[(usize, usize)],
    resolved: &[Option<Arc<Relation>>],
    edits: &mut Vec<Edit>,
) -> Result<(), Block> {
    let Some(r) = found.rels.get(site) else { return Ok(()) };
    if matches!(p, Protected::View { .. }) {
        return Err(block(
            Reason::Unsupported,
            format!("writing through view {} over protected data is not supported for masked sessions", rel.name),
            "write to the table itself",
        ));
    }
    let alias = quote_ident(r.alias().unwrap_or(r.relname()));
    let scope_entries = found.scopes.get(r.scope).map_or(0, |s| s.entries.len());
    for c in &found.cols {
        let star = c.fields.last().is_some_and(|f| f == "*");
        if star && c.position != Position::Returning {
            // `x.*` of the target in SET, a sublink or a MERGE assignment: its raw row.
            let qualifier = c.fields.len().checked_sub(2).and_then(|i| c.fields.get(i));
            if qualifier.is_some_and(|q| binds_to(found, c.scope, q) == Some(Some(site))) {
                return Err(block(
                    Reason::WholeRow,
                    format!("a whole-row reference to protected table {} in a write", rel.name),
                    "name the columns you need",
                ));
            }
            continue;
        }
        if star && c.position == Position::Returning {
            let qualifier = c.fields.len().checked_sub(2).and_then(|i| c.fields.get(i));
            let ours = match qualifier {
                None => c.scope == r.scope,
                Some(q) => *q == r.alias().unwrap_or(r.relname()),
            };
            if !ours {
                continue;
            }
            if qualifier.is_none() && scope_entries > 1 && found.kind != StmtKind::Insert {
                return Err(block(
                    Reason::Unsupported,
                    "RETURNING * over a protected table and other relations",
                    "list the columns in RETURNING",
                ));
            }
            let list: Vec<String> = rel
                .columns
                .iter()
                .map(|col| {
                    let q = format!("{alias}.{}", quote_ident(&col.name));
                    match protect.column_expr(p, &col.name, &q) {
                        Some(e) => format!("{e} AS {}", quote_ident(&col.name)),
                        None => q,
                    }
                })
                .collect();
            let at = toks.at(c.location).ok_or_else(|| block(Reason::Unsupported, "cannot locate *", ""))?;
            let end = if qualifier.is_some() { at.saturating_add(2) } else { at };
            edits.push(Edit { from: at, to: end.saturating_add(1), pieces: vec![Piece::Text(list.join(", "))] });
            continue;
        }
        let (name, ambiguous) = match resolve_column(found, resolved, c) {
            Col::Site(s, n) if s == site => (n, false),
            Col::Ambiguous(s, n) if s == site => (n, true),
            Col::Site(s, _)
                if c.fields.len() == 1 && p.is_masked(&c.fields[0]) && in_chain(found, c.scope, r.scope) =>
            {
                // Pinned (I12): an unqualified name that pgveil binds to another relation but
                // that the target's protected column would capture if that relation lost it
                // (a DROP COLUMN, an alias column list, a shadow) is qualified by its range
                // variable, so the server binds it there or fails.
                let Some(other) = found.rels.get(s) else { continue };
                let name = other.reference_name();
                let Some(at) = toks.at(c.location) else {
                    return Err(block(Reason::Unsupported, "cannot locate a column", ""));
                };
                if moved.iter().any(|(from, to)| (*from..*to).contains(&at)) {
                    // Its comparison moved into the substitution, which qualifies it there.
                    continue;
                }
                // PostgreSQL binds a qualified name to the nearest range variable of that name.
                if binds_to(found, c.scope, name) != Some(Some(s)) {
                    return Err(block(
                        Reason::Unsupported,
                        format!(
                            "pgveil cannot tell whether {} here is the protected column of the target",
                            c.fields[0]
                        ),
                        "qualify the column with its table",
                    ));
                }
                edits.push(Edit { from: at, to: at, pieces: vec![Piece::Text(format!("{}.", quote_ident(name)))] });
                continue;
            }
            _ => {
                // A whole-row reference to the target.
                if c.fields.len() == 1
                    && c.fields.first().is_some_and(|f| f == r.alias().unwrap_or(r.relname()))
                    && rel.column(&c.fields[0]).is_none()
                    && c.scope >= r.scope
                {
                    return Err(block(
                        Reason::WholeRow,
                        format!("a whole-row reference to protected table {} in a write", rel.name),
                        "name the columns you need",
                    ));
                }
                continue;
            }
        };
        if !p.is_masked(&name) || raw_ok.contains(&c.location) {
            continue;
        }
        if ambiguous {
            return Err(block(
                Reason::Unsupported,
                format!("pgveil cannot tell whether {name} here is the protected column of the target"),
                "qualify the column with its table",
            ));
        }
        let Some(expr) = protect.column_expr(p, &name, &format!("{alias}.{}", quote_ident(&name))) else { continue };
        let at = toks.at(c.location).ok_or_else(|| block(Reason::Unsupported, "cannot locate a column", ""))?;
        let end = toks.name_end(at);
        edits.push(Edit { from: at, to: end.saturating_add(1), pieces: vec![Piece::Text(format!("({expr})"))] });
    }
    Ok(())
}

/// The FROM entry a qualifier names from `scope` (innermost first): `Some(site)` for a
/// relation site, `Some(None)` for another entry, `None` when nothing in scope has the name.
pub(super) fn binds_to(found: &Found<'_>, scope: usize, qualifier: &str) -> Option<Option<usize>> {
    let mut at = Some(scope);
    while let Some(si) = at {
        let s = found.scopes.get(si)?;
        if let Some(e) = s.entries.iter().rev().find(|e| e.alias == qualifier) {
            return Some(e.rel);
        }
        at = s.parent;
    }
    None
}

/// Whether scope `outer` is `scope` or encloses it.
pub(super) fn in_chain(found: &Found<'_>, scope: usize, outer: usize) -> bool {
    let mut at = Some(scope);
    while let Some(si) = at {
        if si == outer {
            return true;
        }
        at = found.scopes.get(si).and_then(|s| s.parent);
    }
    false
}

/// The catalog name of the column a relation site exposes as `column`: an alias column list
/// (`AS k(a, b)`) renames the first columns by position and hides their own names.
pub(super) fn exposed(found: &Found<'_>, site: usize, rel: &Relation, column: &str) -> Option<String> {
    let renamed = found.rels.get(site).map(walk::RelSite::alias_columns).unwrap_or_default();
    if let Some(i) = renamed.iter().position(|n| n == column) {
        return rel.columns.get(i).map(|c| c.name.clone());
    }
    rel.columns.iter().skip(renamed.len()).find(|c| c.name == column).map(|c| c.name.clone())
}

/// Resolves a column reference through its scopes, as the server would by name.
pub(crate) fn resolve_column(found: &Found<'_>, resolved: &[Option<Arc<Relation>>], c: &ColSite) -> Col {
    let fields: Vec<&str> = c.fields.iter().map(String::as_str).filter(|f| *f != "*").collect();
    let (qualifier, column) = match fields.as_slice() {
        [col] => (None, *col),
        [q, col] => (Some(*q), *col),
        [_, q, col] | [_, _, q, col] => (Some(*q), *col),
        _ => return Col::Other,
    };
    let mut scope = Some(c.scope);
    let mut unknown_inner = false;
    while let Some(si) = scope {
        let Some(s) = found.scopes.get(si) else { break };
        match qualifier {
            Some(q) => {
                if let Some(e) = s.entries.iter().rev().find(|e| e.alias == q) {
                    return match e.rel {
                        Some(site) => {
                            let known = resolved.get(site).cloned().flatten();
                            let name = known.and_then(|r| exposed(found, site, &r, column));
                            Col::Site(site, name.unwrap_or_else(|| column.to_owned()))
                        }
                        None => Col::Other,
                    };
                }
            }
            None => {
                let mut unknown_here = false;
                for e in &s.entries {
                    let known = e.rel.and_then(|site| resolved.get(site).cloned().flatten().map(|r| (site, r)));
                    match known.as_ref().and_then(|(site, r)| exposed(found, *site, r, column).map(|n| (*site, n))) {
                        Some((site, name)) => {
                            return if unknown_inner { Col::Ambiguous(site, name) } else { Col::Site(site, name) };
                        }
                        None if known.is_some() => {}
                        None => unknown_here = true,
                    }
                }
                if unknown_here {
                    unknown_inner = true;
                }
            }
        }
        scope = s.parent;
    }
    Col::Other
}
