//! What a statement does to the session pgveil follows: temporary relations, prepared
//! statements, cursors, stored code, and the search_path changes it makes once it ran.

#[allow(clippy::wildcard_imports, reason = "a part of checks, with its imports")]
use super::*;

/// The session effects of a statement (the proxy follows them; checks decide apart).
/// `temp`: the session's temporary relations.
pub(crate) fn effects(found: &Found<'_>, temp: &[String], effects: &mut Vec<Effect>) {
    effects.extend(found.temp_created.iter().cloned().map(Effect::TempRelation));
    effects.extend(found.executes.iter().cloned().map(Effect::Executes));
    match &found.kind {
        StmtKind::Deallocate(n) => effects.push(Effect::Deallocate(n.clone())),
        StmtKind::Discard { temp: true, .. } => effects.push(Effect::TempDiscarded),
        // A dropped relation the session's temporary one would shadow is that one (pg_temp
        // comes first): it is forgotten, so the name resolves through the catalog again.
        StmtKind::Drop { objects, .. } => {
            for o in objects {
                match o.as_slice() {
                    [n] => effects.push(Effect::TempDropped(n.clone())),
                    [s, n] if s.starts_with("pg_temp") => effects.push(Effect::TempDropped(n.clone())),
                    _ => {}
                }
            }
        }
        StmtKind::Declare(n) => effects.push(Effect::Cursor(n.clone())),
        StmtKind::Fetch(n) => effects.push(Effect::Fetches(n.clone())),
        StmtKind::CloseCursor(n) => effects.push(Effect::CloseCursor(n.clone())),
        StmtKind::CreateFunction { .. } => effects.push(Effect::StoredCode),
        StmtKind::Other(k) if k == "RuleStmt" => effects.push(Effect::StoredCode),
        _ => {}
    }
    // A temporary view reads what its text read when it was created; the catalog snapshot
    // cannot see it, so no rules change reaches it (threat model I11).
    // A view over one of the session's temporary relations is temporary too, whatever its
    // text says (the server makes it so).
    let is_view = |r: &walk::RelSite<'_>| matches!(&r.site, Site::Other("ViewStmt", k) if k == "view");
    let temp_view = found.rels.iter().any(|r| {
        is_view(r)
            && (walk::str_field(r.rv, "relpersistence") == Some("t")
                || r.schema().is_some_and(|s| s.starts_with("pg_temp")))
    }) || (found.rels.iter().any(is_view)
        && found.rels.iter().any(|r| {
            !is_view(r)
                && !r.cte
                && r.schema().is_none_or(|s| s.starts_with("pg_temp"))
                && (temp.iter().any(|t| t == r.relname())
                    || effects.iter().any(|e| matches!(e, Effect::TempRelation(t) if t == r.relname())))
        }));
    if temp_view {
        effects.push(Effect::StoredCode);
    }
}

/// What a statement changes in the session's name resolution, once it ran (see `session`).
pub(crate) fn changes(found: &Found<'_>, user: &str) -> Vec<Change> {
    let path = |values: &Option<Vec<String>>| {
        values.as_ref().map(|v| v.iter().map(|s| crate::sql::session::expand_user(s, user)).collect())
    };
    match &found.kind {
        StmtKind::Set { name, values, local } if name == "search_path" => {
            vec![Change::SearchPath { path: path(values), local: *local }]
        }
        StmtKind::ResetAll | StmtKind::Discard { all: true, .. } => {
            vec![Change::SearchPath { path: None, local: false }]
        }
        StmtKind::Transaction(c) => vec![c.clone()],
        _ => match lone_path_set(found) {
            Some((value, local)) => {
                vec![Change::SearchPath { path: Some(crate::sql::session::parse_list(&value, user)), local }]
            }
            None => Vec::new(),
        },
    }
}
