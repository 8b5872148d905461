//! The substitution of one relation site: its masked subquery, the comparisons a grant lets
//! move into it, the columns it must list, and the origins its outputs report.

#[allow(clippy::wildcard_imports, reason = "a part of checks, with its imports")]
use super::*;

/// The last token of a conjunct's right-hand side (`-5` is two tokens).
pub(super) fn value_end(toks: &Tokens<'_>, k: &walk::Conjunct, last: usize) -> usize {
    if !k.is_in && toks.text(last) == "-" { last.saturating_add(1) } else { last }
}

/// A conjunct `lhs <op> value` or `lhs IN (values)` that a grant lets compare a raw value,
/// with its operator pinned to pg_catalog (I12): `OPERATOR(pg_catalog.=)`, and an IN list as
/// the equalities it stands for. A user's operator (a varchar `=` in a schema on the
/// search_path wins over pg_catalog's text one) never receives the raw value. `None` for an
/// operator written with another schema.
pub(super) fn pinned_comparison(
    toks: &Tokens<'_>,
    k: &walk::Conjunct,
    lhs: Vec<Piece>,
    rhs: usize,
    last: usize,
) -> Option<Vec<Piece>> {
    let op = match k.op.as_str() {
        "LIKE" => "~~",
        "NOT LIKE" => "!~~",
        "ILIKE" => "~~*",
        "NOT ILIKE" => "!~~*",
        o => o.strip_prefix("pg_catalog.").unwrap_or(o),
    };
    if op.is_empty() || op.contains('.') {
        return None;
    }
    let pinned = format!(" OPERATOR(pg_catalog.{op}) ");
    if !k.is_in {
        let mut out = lhs;
        out.push(Piece::Text(pinned));
        out.push(Piece::Tokens(rhs, last.saturating_add(1)));
        return Some(out);
    }
    if toks.text(rhs) != "(" || toks.text(last) != ")" {
        return None;
    }
    let mut out = vec![Piece::Text("(".to_owned())];
    let first = rhs.saturating_add(1);
    let mut start = first;
    for i in first..=last {
        if i == last || toks.text(i) == "," {
            if start >= i {
                return None;
            }
            if out.len() > 1 {
                out.push(Piece::Text(" OR ".to_owned()));
            }
            out.extend(lhs.iter().cloned());
            out.push(Piece::Text(pinned.clone()));
            out.push(Piece::Tokens(start, i));
            start = i.saturating_add(1);
        }
    }
    out.push(Piece::Text(")".to_owned()));
    Some(out)
}

/// The outputs of the statement's own SELECT that are a masked column of a substituted table
/// (a plain reference, or `*`), with the column's origin; names claimed twice are left out.
pub(super) fn origins(
    found: &Found<'_>,
    resolved: &[Option<Arc<Relation>>],
    prot: &[Option<Arc<Protected>>],
) -> Vec<(String, u32, i16)> {
    let mut out: Vec<(String, u32, i16)> = Vec::new();
    let mut ambiguous: Vec<String> = Vec::new();
    let Some(s) = found.selects.iter().find(|s| found.scopes.get(s.scope).and_then(|sc| sc.parent) == Some(0)) else {
        return out;
    };
    let masked_column = |i: usize, name: &str| -> Option<(u32, i16)> {
        let rel = resolved.get(i).cloned().flatten()?;
        let p = prot.get(i).cloned().flatten()?;
        if !matches!(*p, Protected::Table { .. }) || !p.is_masked(name) {
            return None;
        }
        rel.column(name).map(|c| (rel.oid, c.attnum))
    };
    let mut add = |name: &str, origin: (u32, i16)| {
        if ambiguous.iter().any(|a| a == name) {
            return;
        }
        if let Some(pos) = out.iter().position(|(n, ..)| n == name) {
            if out.get(pos).is_some_and(|(_, o, a)| (*o, *a) != origin) {
                out.remove(pos);
                ambiguous.push(name.to_owned());
            }
            return;
        }
        out.push((name.to_owned(), origin.0, origin.1));
    };
    for (name, plain) in &s.outputs {
        let Some(col) = plain else { continue };
        let hits: Vec<(u32, i16)> = s.from_rels.iter().filter_map(|&i| masked_column(i, col)).collect();
        if let [origin] = hits.as_slice() {
            add(name, *origin);
        }
    }
    for star in &s.stars {
        for &i in &s.from_rels {
            let Some(r) = found.rels.get(i) else { continue };
            if star.as_deref().is_some_and(|a| a != r.alias().unwrap_or(r.relname())) {
                continue;
            }
            let Some(rel) = resolved.get(i).cloned().flatten() else { continue };
            for c in &rel.columns {
                if let Some(origin) = masked_column(i, &c.name) {
                    add(&c.name, origin);
                }
            }
        }
    }
    out
}

/// Whether the statement can reach a column of this relation site other than by its name:
/// `*` or `t.*` anywhere, a whole-row reference (`t`, `(t).*`, `f(t)`), a NATURAL join, or
/// an alias with a column list (`AS t(a, b)` renames by position).
pub(super) fn positional(found: &Found<'_>, r: &walk::RelSite<'_>) -> bool {
    let alias = r.alias().unwrap_or(r.relname());
    let renamed =
        r.rv.get("alias")
            .and_then(serde_json::Value::as_object)
            .and_then(|a| a.get("colnames"))
            .and_then(serde_json::Value::as_array)
            .is_some_and(|c| !c.is_empty());
    renamed
        || found.natural_join
        || found.cols.iter().any(|c| {
            c.fields.last().is_some_and(|f| f == "*")
                || (c.fields.len() == 1 && (c.fields[0] == alias || c.fields[0] == r.relname()))
        })
}

/// The columns a read's subquery needs to list: with no positional reach (see
/// [`positional`]) only those whose name the statement uses anywhere (any column reference,
/// USING list or assignment, at any level, so a reference can never bind to another
/// relation's column in its place); `None`: every column. The server then parses and plans
/// only what the statement names (pgbench -S: one column and the key of four, measured in
/// README). Trimming is never a way to a raw value: a column left out can only make a
/// statement fail with 42703, as a stale catalog could before.
pub(super) fn trimmable<'f>(
    found: &'f Found<'_>,
    r: &walk::RelSite<'_>,
) -> Option<&'f std::collections::HashSet<String>> {
    (r.site == Site::Read && !found.too_deep && !positional(found, r)).then_some(&found.names)
}

/// The edit that replaces a relation site by its masked subquery.
pub(super) fn substitution(
    r: &walk::RelSite<'_>,
    p: &Protected,
    protect: &Protection<'_>,
    toks: &Tokens<'_>,
    filters: Vec<Vec<Piece>>,
    named: Option<&std::collections::HashSet<String>>,
) -> Result<Edit, Block> {
    let cannot = || block(Reason::Unsupported, "pgveil cannot locate this relation in the statement's text", "");
    let at = toks.at(r.location()).ok_or_else(cannot)?;
    let mut from = at;
    let mut to = toks.name_end(at);
    let mut prefix = String::new();
    let copy = r.site == Site::CopyTo;
    if !copy {
        if from > 0 && toks.is(from.saturating_sub(1), "only") {
            from = from.saturating_sub(1);
        } else if from > 1 && toks.text(from.saturating_sub(1)) == "(" && toks.is(from.saturating_sub(2), "only") {
            from = from.saturating_sub(2);
            if toks.text(to.saturating_add(1)) == ")" {
                to = to.saturating_add(1);
            }
        } else if from > 0 && toks.is(from.saturating_sub(1), "table") {
            // `TABLE t` is `SELECT * FROM t`.
            from = from.saturating_sub(1);
            prefix.push_str("SELECT * FROM ");
        }
        if toks.text(to.saturating_add(1)) == "*" {
            to = to.saturating_add(1);
        }
    } else if toks.text(to.saturating_add(1)) == "(" {
        to = toks.matching_paren(to.saturating_add(1)).ok_or_else(cannot)?;
    }
    let only = copy || !r.inh();
    let mut pieces = vec![Piece::Text(prefix)];
    pieces.extend(protect.subquery(p, only, &r.copy_columns, named, filters)?);
    if !copy && r.alias().is_none() {
        pieces.push(Piece::Text(format!(" AS {}", quote_ident(r.relname()))));
    }
    Ok(Edit { from, to: to.saturating_add(1), pieces })
}
