//! The decision for one statement of a masked session: the edits that substitute its
//! protected relations (I2) and mask the protected columns of a DML target, or the block for
//! what cannot be made safe (I4): SQL from strings, denied built-ins, user functions the rules
//! do not allow, DDL on protected relations, lexer settings, identity changes, CTEs named like
//! protected relations, and comparisons of masked columns that `predicates:` forbids.

use std::collections::HashSet;
use std::sync::Arc;

use crate::catalog::{RelKind, Relation};
use crate::names::quote_ident;
use crate::policy::Predicates;

use super::functions;
use super::protect::{Protected, Protection};
use super::session::Change;
use super::tokens::{Edit, Piece, Tokens};
use super::walk::{self, ColSite, Found, Position, Site, StmtKind};
use super::{Block, Effect, Reason, block};

/// Relations masked sessions may never read: statistics hold sample values of every column.
const DENIED_RELATIONS: &[&str] =
    &["pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data", "pg_stat_statements"];

/// Where a protected relation may be named other than read or written: statements that do
/// not change it or what derives from it.
const HARMLESS_SITES: &[(&str, &str)] = &[
    ("LockStmt", "relations"),
    ("TruncateStmt", "relations"),
    ("GrantStmt", "objects"),
    ("VacuumRelation", "relation"),
    ("TableLikeClause", "relation"),
    ("ClusterStmt", "relation"),
    ("ReindexStmt", "relation"),
    ("RefreshMatViewStmt", "relation"),
    ("ViewStmt", "view"),
    ("IntoClause", "rel"),
    ("CreateStmt", "relation"),
    ("CommentStmt", "object"),
    // `FOR UPDATE OF t` names FROM entries (substituted subqueries), not relations.
    ("LockingClause", "locked_rels"),
];

/// Where a statement names the relation it creates.
const CREATED_SITES: &[(&str, &str)] = &[
    ("CreateStmt", "relation"),
    ("IntoClause", "rel"),
    ("CreateTableAsStmt", "rel"),
    ("ViewStmt", "view"),
    ("other", "sequence"),
];

/// Statement types that make the server call a user-defined function later (operators,
/// casts, aggregates, …) without a function call in the text.
const CALLS_LATER: &[&str] = &[
    "CreateCastStmt",
    "CreateOpClassStmt",
    "CreateTransformStmt",
    "CreateEventTrigStmt",
    "CreateConversionStmt",
    "AlterOperatorStmt",
    "CreatePLangStmt",
    "AlterFunctionStmt",
];

#[derive(Debug, Default)]
pub(crate) struct Decided {
    pub edits: Vec<Edit>,
    pub read_protected: Vec<String>,
    pub substituted: Vec<String>,
    pub unknown_relation: bool,
    pub origins: Vec<(String, u32, i16)>,
    /// An unqualified name pgveil cannot resolve that a protected relation answers to in
    /// some schema: the statement is refused, after the proxy refreshed its catalog once.
    pub unresolved: Option<Block>,
}

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
        values.as_ref().map(|v| v.iter().map(|s| super::session::expand_user(s, user)).collect())
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
                vec![Change::SearchPath { path: Some(super::session::parse_list(&value, user)), local }]
            }
            None => Vec::new(),
        },
    }
}

/// `SELECT set_config('search_path', 'value', is_local)` on its own (pg_dump's first
/// statement): the value and is_local, when the statement is that and nothing else, so that it
/// certainly runs once.
fn lone_path_set(found: &Found<'_>) -> Option<(String, bool)> {
    let [f] = found.funcs.as_slice() else { return None };
    let [sel] = found.selects.as_slice() else { return None };
    if found.kind != StmtKind::Select || !found.rels.is_empty() || !sel.lone_call {
        return None;
    }
    if !matches!(f.name.as_slice(), [n] | [_, n] if n == "set_config")
        || f.name.first().is_some_and(|s| f.name.len() == 2 && s != "pg_catalog")
    {
        return None;
    }
    match f.text_args.as_slice() {
        [Some(name), Some(value), Some(local)] if name.eq_ignore_ascii_case("search_path") => {
            Some((value.clone(), local == "true"))
        }
        _ => None,
    }
}

/// pg_dump's `SELECT set_config(name, 'value', false) FROM pg_settings WHERE name =
/// 'setting'` (a setting set only where the server has it), exactly that and nothing else: the
/// setting's name and the tokens of `name` (the first argument) and of `pg_settings`.
fn settings_row_set(found: &Found<'_>, toks: &Tokens<'_>) -> Option<(String, usize, usize)> {
    if found.kind != StmtKind::Select || found.funcs.len() != 1 || found.rels.len() != 1 || found.selects.len() != 1 {
        return None;
    }
    let word = |i: usize, w: &str| toks.is(i, w);
    let catalog = |i: usize| if word(i, "pg_catalog") && toks.text(i.saturating_add(1)) == "." { i + 2 } else { i };
    let literal = |i: usize| plain_literal(toks.text(i));
    let mut i = 0usize;
    if !word(i, "select") {
        return None;
    }
    i = catalog(i + 1);
    if !(word(i, "set_config") && toks.text(i + 1) == "(" && word(i + 2, "name") && toks.text(i + 3) == ",") {
        return None;
    }
    let arg = i + 2;
    literal(i + 4)?;
    if toks.text(i + 5) != "," || !(word(i + 6, "true") || word(i + 6, "false") || literal(i + 6).is_some()) {
        return None;
    }
    if toks.text(i + 7) != ")" || !word(i + 8, "from") {
        return None;
    }
    i = catalog(i + 9);
    let rel = i;
    if !(word(i, "pg_settings") && word(i + 1, "where") && word(i + 2, "name") && toks.text(i + 3) == "=") {
        return None;
    }
    let setting = literal(i + 4)?;
    let end = i + 5;
    let rest = toks.len().checked_sub(end)?;
    (rest == 0 || (rest == 1 && toks.text(end) == ";")).then_some((setting, arg, rel))
}

/// A standard string constant without backslashes or escapes: its value.
fn plain_literal(t: &str) -> Option<String> {
    let inner = t.strip_prefix('\'').and_then(|t| t.strip_suffix('\''))?;
    (!inner.contains('\\')).then(|| inner.replace("''", "'"))
}

pub(crate) fn check(found: &Found<'_>, protect: &mut Protection<'_>, toks: &Tokens<'_>) -> Result<Decided, Block> {
    statement(found, protect)?;
    let lone = lone_path_set(found);
    if let Some((value, _)) = &lone {
        search_path_allowed(&super::session::parse_list(value, ""))?;
    }
    let row_set = settings_row_set(found, toks);
    for f in &found.funcs {
        function(f, protect, lone.is_some(), row_set.as_ref().map(|(n, ..)| n.as_str()))?;
    }
    for cte in &found.ctes {
        if let Some(r) = protect.resolve(None, cte)
            && protect.protected(&r).is_some()
        {
            return Err(Block {
                tables: vec![r.name.to_string()],
                ..block(
                    Reason::CteShadow,
                    format!("the CTE {cte} has the name of protected relation {}", r.name),
                    "give the CTE another name",
                )
            });
        }
    }
    let mut decided = relations(found, protect, toks)?;
    if let Some((setting, arg, rel)) = &row_set {
        // The setting by name, from pg_catalog's pg_settings: what the server sets is what
        // was checked, whatever a temporary `pg_settings` would have held.
        decided.edits.push(Edit {
            from: *arg,
            to: arg + 1,
            pieces: vec![Piece::Text(super::mask_sql::literal(setting))],
        });
        if !toks.is(rel.saturating_sub(1), ".") {
            decided.edits.push(Edit { from: *rel, to: *rel, pieces: vec![Piece::Text("pg_catalog.".to_owned())] });
        }
    }
    // Pinned (I12): a built-in called by its bare name is pg_catalog's. Resolved through the
    // search_path, a function of the session's own with a better-matching signature
    // (`app.length(integer)`) would run instead, outside `functions: allow:`.
    for f in &found.funcs {
        let [name] = f.name.as_slice() else { continue };
        if !functions::is_builtin(name) {
            continue;
        }
        let at = toks.at(f.location).ok_or_else(|| {
            block(Reason::Unsupported, "pgveil cannot locate a function call in the statement's text", "")
        })?;
        decided.edits.push(Edit { from: at, to: at, pieces: vec![Piece::Text("pg_catalog.".to_owned())] });
    }
    Ok(decided)
}

fn statement(found: &Found<'_>, protect: &mut Protection<'_>) -> Result<(), Block> {
    match &found.kind {
        StmtKind::Do => {
            return Err(block(
                Reason::Procedural,
                "DO runs SQL from a string, which pgveil cannot rewrite",
                "run the statements directly",
            ));
        }
        StmtKind::CreateFunction { language, string_body, has_sql_body } => {
            if *has_sql_body {
                return Ok(()); // BEGIN ATOMIC: its statements were walked and are substituted
            }
            let sql = language.is_empty() || language == "sql";
            let reads_protected =
                string_body.as_deref().is_none_or(|b| !definition_relations_all(b, protect).is_empty());
            if !sql || reads_protected {
                return Err(block(
                    Reason::Procedural,
                    format!(
                        "a function body in {} is SQL run from a string, which pgveil cannot rewrite",
                        if sql { "a string" } else { language.as_str() }
                    ),
                    "write SQL functions with BEGIN ATOMIC … END, or ask a DBA to create the function",
                ));
            }
        }
        StmtKind::Set { name, values, .. } => set(name, values.as_deref())?,
        StmtKind::Drop { remove_type, objects } => {
            use pg_query::protobuf::ObjectType as O;
            let relation_types =
                [O::ObjectTable as i64, O::ObjectForeignTable as i64, O::ObjectMatview as i64, O::ObjectView as i64];
            if relation_types.contains(remove_type) {
                for o in objects {
                    let (schema, name) = match o.as_slice() {
                        [n] => (None, n.as_str()),
                        [s, n] | [_, s, n] => (Some(s.as_str()), n.as_str()),
                        _ => continue,
                    };
                    // The session's temporary relation of that name is the one dropped.
                    if schema.is_none_or(|s| s.starts_with("pg_temp")) && protect.temp.iter().any(|t| t == name) {
                        continue;
                    }
                    // A protected table (a view's data is its tables': dropping one, even one
                    // whose definition the catalog could not read and so masks whole, loses
                    // nothing).
                    if let Some(r) = protect.resolve(schema, name)
                        && is_table(&r)
                        && protect.protected(&r).is_some()
                    {
                        return Err(protected_ddl(&r));
                    }
                    // DROP's names are not in the text as relation references pgveil could
                    // pin: an unqualified one that a protected table answers to anywhere on
                    // the search_path is refused (the server's resolution may differ from
                    // pgveil's: an open transaction's DDL, a rolled-back SET).
                    if schema.is_none() {
                        let schemas: Vec<String> = protect.search_path.to_vec();
                        for s in &schemas {
                            if let Some(r) = protect.resolve(Some(s), name)
                                && is_table(&r)
                                && protect.protected(&r).is_some()
                            {
                                return Err(Block {
                                    hint: format!("qualify the name with its schema if you mean another {name}"),
                                    ..protected_ddl(&r)
                                });
                            }
                        }
                    }
                }
            }
        }
        StmtKind::Define(kind) => {
            use pg_query::protobuf::ObjectType as O;
            // Aggregates, operators, base types and text-search parsers/templates name
            // functions the server calls later; collations and dictionaries do not.
            let calls = [O::ObjectAggregate, O::ObjectOperator, O::ObjectType, O::ObjectTsparser, O::ObjectTstemplate];
            if calls.iter().any(|o| *o as i64 == *kind) {
                return Err(block(
                    Reason::Function,
                    "this statement makes the server call a user-defined function later, which masked sessions may not",
                    "ask a DBA to run it",
                ));
            }
        }
        StmtKind::Other(kind) if kind == "SetSearchPathFromCurrent" => {
            return Err(block(
                Reason::Setting,
                "SET search_path FROM CURRENT is not followed by pgveil",
                "SET search_path to the schemas you need",
            ));
        }
        // A rule outlives the session on a permanent relation: its action keeps reading what
        // it read under today's rules after a rules change protects more (I11), and fires
        // for every session that writes the relation. On a temporary one it ends with the
        // session (stored code: a reload ends the session).
        StmtKind::Other(kind) if kind == "RuleStmt" => {
            let on_temp = found.rels.iter().any(|r| {
                matches!(&r.site, Site::Other("RuleStmt", k) if k == "relation")
                    && (r.schema().is_some_and(|s| s.starts_with("pg_temp"))
                        || (r.schema().is_none() && protect.temp.iter().any(|t| t == r.relname())))
            });
            let protected = found.rels.iter().any(|r| {
                matches!(&r.site, Site::Other("RuleStmt", k) if k == "relation")
                    && protect.resolve(r.schema(), r.relname()).is_some_and(|rel| protect.protected(&rel).is_some())
            });
            // (A protected relation's is refused as protected DDL, below.)
            if !on_temp && !protected {
                return Err(block(
                    Reason::Function,
                    "a rule on a permanent relation outlives the session and keeps reading what today's rules let it read",
                    "ask a DBA to create the rule, or use a view",
                ));
            }
        }
        StmtKind::Other(kind) if CALLS_LATER.contains(&kind.as_str()) => {
            return Err(block(
                Reason::Function,
                "this statement makes the server call a user-defined function later, which masked sessions may not",
                "ask a DBA to run it",
            ));
        }
        _ => {}
    }
    Ok(())
}

fn is_table(r: &Relation) -> bool {
    matches!(r.kind, RelKind::Table | RelKind::PartitionedTable | RelKind::Foreign)
}

fn protected_ddl(r: &Relation) -> Block {
    Block {
        tables: vec![r.name.to_string()],
        ..block(
            Reason::ProtectedDdl,
            format!("{} is protected: masked sessions may not change it or what derives from it", r.name),
            "ask a DBA (an exempt role) to make this change",
        )
    }
}

/// Whether a masked session may set `name` to `values` (`None`: RESET / DEFAULT, back to the
/// session's pinned startup value).
fn set(name: &str, values: Option<&[String]>) -> Result<(), Block> {
    let first = values.and_then(|v| v.first()).map(|v| v.to_lowercase());
    match name {
        "role" | "session_authorization" | "session authorization" => Err(block(
            Reason::IdentityChange,
            "changing the session's role is not allowed for masked sessions",
            "connect as the role you need",
        )),
        "standard_conforming_strings" if first.as_deref().is_some_and(|v| !matches!(v, "on" | "true" | "1")) => {
            Err(setting(name))
        }
        "client_encoding" | "names" if first.as_deref().is_some_and(|v| unsafe_encoding(v) || v == "?") => {
            Err(setting(name))
        }
        "search_path" => search_path_allowed(values.unwrap_or_default()),
        _ => Ok(()),
    }
}

/// pg_catalog after another schema lets that schema's functions and operators shadow the
/// built-ins a statement calls.
fn search_path_allowed(path: &[String]) -> Result<(), Block> {
    if path.iter().position(|s| s == "pg_catalog").is_some_and(|i| i > 0) {
        return Err(block(
            Reason::Setting,
            "a search_path with pg_catalog after another schema is not allowed for masked sessions",
            "leave pg_catalog out of search_path (it is searched first) or put it first",
        ));
    }
    Ok(())
}

fn setting(name: &str) -> Block {
    block(
        Reason::Setting,
        format!("changing {name} this way is not allowed for masked sessions"),
        "pgveil pins settings that change how statements are read",
    )
}

/// Client encodings whose multi-byte characters can hide a quote or backslash byte.
pub fn unsafe_encoding(value: &str) -> bool {
    let v = value.to_ascii_uppercase().replace(['-', '_'], "");
    matches!(
        v.as_str(),
        "SJIS"
            | "SHIFTJIS"
            | "BIG5"
            | "GBK"
            | "UHC"
            | "GB18030"
            | "JOHAB"
            | "SHIFTJIS2004"
            | "WIN932"
            | "WIN936"
            | "WIN949"
            | "WIN950"
            | "CP932"
            | "CP936"
            | "CP949"
            | "CP950"
    )
}

/// `lone_path_set`: the statement is a lone `SELECT set_config('search_path', …)`, which the
/// session follows like SET; anywhere else set_config of search_path could run any number of
/// times, or not at all, and is refused.
/// `row_set`: the setting a pg_settings-row set_config names (`settings_row_set`).
fn function(
    f: &walk::FuncSite,
    protect: &Protection<'_>,
    lone_path_set: bool,
    row_set: Option<&str>,
) -> Result<(), Block> {
    let (schema, name) = match f.name.as_slice() {
        [n] => (None, n.as_str()),
        [s, n] => (Some(s.as_str()), n.as_str()),
        [_, s, n] => (Some(s.as_str()), n.as_str()),
        _ => return Ok(()),
    };
    if name == "set_config" && schema.is_none_or(|s| s == "pg_catalog") {
        let setting_name =
            f.text_args.first().cloned().flatten().or_else(|| row_set.map(str::to_owned)).map(|s| s.to_lowercase());
        let value = f.text_args.get(1).cloned().flatten();
        return match setting_name.as_deref() {
            Some("search_path") if lone_path_set => Ok(()),
            Some("search_path") => Err(block(
                Reason::Setting,
                "set_config of search_path is allowed only on its own, with constant arguments",
                "run SELECT set_config('search_path', '…', false) as a statement of its own, or use SET",
            )),
            None => Err(block(
                Reason::Setting,
                "set_config with this setting is not allowed for masked sessions",
                "use SET with a constant value",
            )),
            Some(n) => set(n, Some(&[value.unwrap_or_else(|| "?".to_owned())])),
        };
    }
    match schema {
        Some(s) if s == super::mask_sql::SCHEMA => Err(block(
            Reason::Function,
            "the pgveil schema belongs to the proxy",
            "masked values come from the proxy itself",
        )),
        None | Some("pg_catalog") if functions::is_builtin(name) => match functions::denied(name) {
            Some(family) => Err(block(
                if family.starts_with("runs SQL") { Reason::Procedural } else { Reason::Function },
                format!("{name}() {family}, which masked sessions may not use"),
                "select the rows directly",
            )),
            None => Ok(()),
        },
        _ => {
            let allowed = protect.policy.policy.functions().iter().any(|allowed| {
                allowed.table == name
                    && match schema {
                        Some(s) => allowed.schema == s,
                        None => protect.search_path.contains(&allowed.schema),
                    }
            });
            if allowed {
                Ok(())
            } else {
                let shown = schema.map_or_else(|| name.to_owned(), |s| format!("{s}.{name}"));
                Err(block(
                    Reason::Function,
                    format!("{shown}() is not a built-in, and the rules do not allow it (functions.allow)"),
                    "ask the DBA to list it under functions: allow: if it does not read protected data",
                ))
            }
        }
    }
}

/// How a column reference resolves.
pub(crate) enum Col {
    /// To this relation site's column.
    Site(usize, String),
    /// To something else (an unprotected or unknown relation, a subquery, …).
    Other,
    /// Cannot tell, and it could be a protected column of this site.
    Ambiguous(usize, String),
}

fn relations(found: &Found<'_>, protect: &mut Protection<'_>, toks: &Tokens<'_>) -> Result<Decided, Block> {
    let mut out = Decided::default();
    // Resolve every relation named.
    let mut resolved: Vec<Option<Arc<Relation>>> = Vec::with_capacity(found.rels.len());
    let mut prot: Vec<Option<Arc<Protected>>> = Vec::with_capacity(found.rels.len());
    let mut pins: Vec<(bool, i32, String)> = Vec::new();
    for r in &found.rels {
        let schema = r.schema();
        if schema == Some(super::mask_sql::SCHEMA) {
            return Err(block(
                Reason::Function,
                "the pgveil schema belongs to the proxy",
                "masked values come from the proxy itself",
            ));
        }
        let is_cte = r.cte;
        let is_temp =
            !is_cte && schema.is_none_or(|s| s.starts_with("pg_temp")) && protect.temp.iter().any(|t| t == r.relname());
        // The session's temporary relation shadows any other of its name (pg_temp comes first
        // for relations); the name is pinned to pg_temp below, so a temporary relation that
        // is gone makes the statement fail rather than read the one it shadowed.
        let rel = if is_cte || is_temp { None } else { protect.resolve(schema, r.relname()) };
        // A name the statement creates is expected to be unknown: no reason to reload (a
        // DDL-heavy session would otherwise wait out a forced reload per CREATE).
        let creates =
            matches!(&r.site, Site::Other(parent, key) if CREATED_SITES.iter().any(|(p, k)| p == parent && k == key));
        // `FOR UPDATE OF x` names a FROM entry, not a relation (and may not be qualified).
        let locking = matches!(&r.site, Site::Other("LockingClause", _));
        if rel.is_none() && !is_cte && !is_temp && !creates && !locking {
            out.unknown_relation = true;
            // A name pgveil cannot resolve is sent as written, and the server resolves it
            // through its own search_path: if a protected relation answers to that name in
            // any schema, pgveil's model may be the one that is wrong (I12): refused.
            if schema.is_none()
                && out.unresolved.is_none()
                && let Some(t) = protect.protected_named(r.relname())
            {
                out.unresolved = Some(Block {
                    tables: vec![t.to_string()],
                    ..block(
                        Reason::Unsupported,
                        format!("pgveil cannot resolve {} here, and protected relation {t} has that name", r.relname()),
                        "qualify the name with its schema",
                    )
                });
            }
        }
        if let Some(rel) = &rel
            && matches!(r.site, Site::Read | Site::Tablesample)
            && rel.name.schema == "pg_catalog"
            && DENIED_RELATIONS.contains(&rel.name.table.as_str())
        {
            return Err(block(
                Reason::Catalog,
                format!("{} holds sample values of every column", rel.name),
                "ask a DBA for the statistics you need",
            ));
        }
        // Pinned (I12): the name is written as pgveil resolved it, so a difference between
        // its model and the server's (DDL or a SET it did not see) fails the statement.
        if schema.is_none() && !is_cte && !creates && !locking {
            let pin = if is_temp { Some("pg_temp".to_owned()) } else { rel.as_ref().map(|x| x.name.schema.clone()) };
            if let Some(schema) = pin {
                pins.push((pins_site(r), r.location(), schema));
            }
        }
        prot.push(rel.as_ref().and_then(|x| protect.protected(x)));
        resolved.push(rel);
    }
    let resolve_col = |c: &ColSite| -> Col { resolve_column(found, &resolved, c) };

    // Comparisons of masked columns, and what raw-predicate grants let through.
    let mut pushdowns: Vec<(usize, Vec<Piece>, usize, usize)> = Vec::new(); // site, filter, conj tokens
    let mut raw_ok: HashSet<i32> = HashSet::new(); // DML WHERE refs left raw by a grant
    for c in &found.cols {
        let Position::Filter(clause) = c.position else { continue };
        let (site, name) = match resolve_col(c) {
            Col::Site(s, n) => (s, n),
            Col::Other => continue,
            Col::Ambiguous(s, n) => {
                let is_target = found.rels.get(s).is_some_and(|r| r.site == Site::Target);
                if is_target {
                    return Err(Block {
                        columns: vec![n.clone()],
                        ..block(
                            Reason::Unsupported,
                            format!("pgveil cannot tell whether {n} here is the protected column of the target"),
                            "qualify the column with its table",
                        )
                    });
                }
                continue;
            }
        };
        let Some(p) = prot.get(site).cloned().flatten() else { continue };
        if !p.is_masked(&name) {
            continue;
        }
        let predicates = p.column(&name).map_or(Predicates::None, |v| v.predicates);
        let rel_site = found.rels.get(site);
        let qualified = resolved.get(site).cloned().flatten().map(|r| format!("{}.{name}", r.name)).unwrap_or_default();
        let conj = found
            .scopes
            .get(rel_site.map_or(usize::MAX, |r| r.scope))
            .and_then(|s| s.conjuncts.iter().find(|k| k.col_location == c.location && c.location >= 0));
        let predicate_block = |why: &str| Block {
            columns: vec![qualified.clone()],
            tables: resolved.get(site).cloned().flatten().map(|r| r.name.to_string()).into_iter().collect(),
            ..block(
                Reason::Predicate,
                format!("column {qualified} is masked for this session and cannot be used in {clause}{why}"),
                if clause == "WHERE" {
                    "filter on an unmasked column, or ask the DBA for `predicates: masked` or `equality` on it"
                } else {
                    "use only unmasked columns here, or ask the DBA for `predicates: masked` on it"
                },
            )
        };
        let grant_fits = |k: &walk::Conjunct| match predicates {
            Predicates::Equality => k.op == "=",
            Predicates::Any => true,
            _ => false,
        };
        match predicates {
            Predicates::None => return Err(predicate_block("")),
            Predicates::Masked => {}
            Predicates::Equality | Predicates::Any => {
                let is_target = rel_site.is_some_and(|r| r.site == Site::Target);
                match conj {
                    Some(k) if grant_fits(k) && is_target => {
                        // The raw comparison runs, with its operator pinned.
                        let range = (toks.at(k.first), toks.at(k.rhs_first), toks.at(k.rhs_last));
                        let (Some(first), Some(rhs), Some(last)) = range else {
                            return Err(predicate_block(""));
                        };
                        let last = value_end(toks, k, last);
                        let lhs = vec![Piece::Tokens(first, toks.name_end(first).saturating_add(1))];
                        let Some(pieces) = pinned_comparison(toks, k, lhs, rhs, last) else {
                            return Err(predicate_block(" with this operator"));
                        };
                        out.edits.push(Edit { from: first, to: last.saturating_add(1), pieces });
                        raw_ok.insert(c.location);
                    }
                    Some(k) if grant_fits(k) => {
                        if rel_site.is_some_and(|r| r.nullable) {
                            return Err(predicate_block(" (its table is on the outer side of a join)"));
                        }
                        let (Some(first), Some(rhs), Some(last)) =
                            (toks.at(k.first), toks.at(k.rhs_first), toks.at(k.rhs_last))
                        else {
                            return Err(predicate_block(""));
                        };
                        let last = value_end(toks, k, last);
                        let lhs = vec![Piece::Text(format!(
                            "{}.{}",
                            quote_ident(rel_site.map_or("", |r| r.relname())),
                            quote_ident(&name)
                        ))];
                        let Some(filter) = pinned_comparison(toks, k, lhs, rhs, last) else {
                            return Err(predicate_block(" with this operator"));
                        };
                        pushdowns.push((site, filter, first, last.saturating_add(1)));
                    }
                    _ if predicates == Predicates::Any && clause != "WHERE" => {} // compares masked values
                    _ => return Err(predicate_block(" except as `column = value` at the top of WHERE")),
                }
            }
        }
    }

    // Substitute read relations; mask the protected columns of DML targets.
    let mut substituted_at: Vec<i32> = Vec::new();
    for (i, r) in found.rels.iter().enumerate() {
        let (Some(rel), Some(p)) = (resolved.get(i).cloned().flatten(), prot.get(i).cloned().flatten()) else {
            continue;
        };
        let name = rel.name.to_string();
        match &r.site {
            Site::Read | Site::CopyTo => {
                if r.site != Site::CopyTo || reachable(found, r, &p) {
                    substituted_at.push(r.location());
                }
                if !out.read_protected.contains(&name) {
                    out.read_protected.push(name.clone());
                }
                let filters: Vec<Vec<Piece>> =
                    pushdowns.iter().filter(|(s, ..)| *s == i).map(|(_, f, ..)| f.clone()).collect();
                // Every read of a protected relation is substituted, whether or not the text
                // names a masked column: the subquery's column list is then the only way to
                // its data, so a catalog snapshot that is stale (a column renamed or added by
                // another session) can make the statement fail, never read a raw value.
                if r.site == Site::CopyTo && !reachable(found, r, &p) {
                    continue;
                }
                for (_, _, from, to) in pushdowns.iter().filter(|(s, ..)| *s == i) {
                    out.edits.push(Edit { from: *from, to: *to, pieces: vec![Piece::Text("TRUE".to_owned())] });
                }
                let edit = substitution(r, &p, protect, toks, filters, trimmable(found, r))?;
                out.edits.push(edit);
                out.substituted.push(name);
            }
            Site::Tablesample => {
                return Err(block(
                    Reason::Unsupported,
                    format!("TABLESAMPLE of protected relation {name} is not supported for masked sessions"),
                    "sample with WHERE random() < …",
                ));
            }
            Site::Target => {
                let moved: Vec<(usize, usize)> = pushdowns.iter().map(|(_, _, from, to)| (*from, *to)).collect();
                target(found, i, &rel, &p, protect, toks, &raw_ok, &moved, &resolved, &mut out.edits)?;
            }
            Site::Other(parent, key) => {
                if !HARMLESS_SITES.iter().any(|(p, k)| p == parent && k == key) {
                    return Err(protected_ddl(&rel));
                }
            }
        }
    }
    // Pin every other relation name (a substitution writes its own qualified name).
    for (required, location, schema) in pins {
        if substituted_at.contains(&location) {
            continue;
        }
        match toks.at(location) {
            Some(at) => out.edits.push(Edit {
                from: at,
                to: at,
                pieces: vec![Piece::Text(format!("{}.", quote_ident(&schema)))],
            }),
            None if required => {
                return Err(block(Reason::Unsupported, "pgveil cannot locate a relation in the statement's text", ""));
            }
            None => {}
        }
    }
    out.origins = origins(found, &resolved, &prot);
    Ok(out)
}

/// The last token of a conjunct's right-hand side (`-5` is two tokens).
fn value_end(toks: &Tokens<'_>, k: &walk::Conjunct, last: usize) -> usize {
    if !k.is_in && toks.text(last) == "-" { last.saturating_add(1) } else { last }
}

/// A conjunct `lhs <op> value` or `lhs IN (values)` that a grant lets compare a raw value,
/// with its operator pinned to pg_catalog (I12): `OPERATOR(pg_catalog.=)`, and an IN list as
/// the equalities it stands for. A user's operator (a varchar `=` in a schema on the
/// search_path wins over pg_catalog's text one) never receives the raw value. `None` for an
/// operator written with another schema.
fn pinned_comparison(
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

/// Whether a relation site must be pinned for the statement to run: reads and writes must;
/// a utility statement's name without a location in the text (some DDL forms) is left to the
/// server, as it reads no data.
pub(super) fn pins_site(r: &walk::RelSite<'_>) -> bool {
    matches!(r.site, Site::Read | Site::Tablesample | Site::CopyTo | Site::Target)
}

/// The outputs of the statement's own SELECT that are a masked column of a substituted table
/// (a plain reference, or `*`), with the column's origin; names claimed twice are left out.
fn origins(
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

/// Whether a statement can read a protected column of this relation site: by `*`, whole-row
/// references, NATURAL joins, COPY of every column, or any reference by a masked column's
/// name. Only `COPY t (columns)` of unmasked columns is left as written on this ground.
pub(super) fn reachable(found: &Found<'_>, r: &walk::RelSite<'_>, p: &Protected) -> bool {
    if matches!(p, Protected::View { .. }) || matches!(p, Protected::Table { whole: true, .. }) {
        return true;
    }
    if r.site == Site::CopyTo {
        return r.copy_columns.is_empty() || r.copy_columns.iter().any(|c| p.is_masked(c));
    }
    if found.natural_join || found.cols.iter().any(|c| c.fields.last().is_some_and(|f| f == "*")) {
        return true;
    }
    let alias = r.alias().unwrap_or(r.relname());
    if found.cols.iter().any(|c| c.fields.len() == 1 && (c.fields[0] == alias || c.fields[0] == r.relname())) {
        return true;
    }
    p.masked_names().iter().any(|n| found.names.contains(*n))
}

/// Whether the statement can reach a column of this relation site other than by its name:
/// `*` or `t.*` anywhere, a whole-row reference (`t`, `(t).*`, `f(t)`), a NATURAL join, or
/// an alias with a column list (`AS t(a, b)` renames by position).
fn positional(found: &Found<'_>, r: &walk::RelSite<'_>) -> bool {
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
fn trimmable<'f>(found: &'f Found<'_>, r: &walk::RelSite<'_>) -> Option<&'f std::collections::HashSet<String>> {
    (r.site == Site::Read && !found.too_deep && !positional(found, r)).then_some(&found.names)
}

/// The edit that replaces a relation site by its masked subquery.
fn substitution(
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

#[allow(clippy::too_many_arguments, reason = "the pieces of one decision")]
fn target(
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
fn binds_to(found: &Found<'_>, scope: usize, qualifier: &str) -> Option<Option<usize>> {
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
fn in_chain(found: &Found<'_>, scope: usize, outer: usize) -> bool {
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
fn exposed(found: &Found<'_>, site: usize, rel: &Relation, column: &str) -> Option<String> {
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

/// A view definition with its protected relations substituted; `None` when nothing in it is
/// protected (the view is then not protected either).
pub(crate) fn substitute_definition(sql: &str, protect: &mut Protection<'_>) -> Result<Option<String>, Block> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| block(Reason::Unsupported, e.to_string(), ""))?;
    let toks = Tokens::new(sql).ok_or_else(|| block(Reason::Unsupported, "unscannable view", ""))?;
    let mut edits = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref() else { continue };
        let tree = serde_json::to_value(stmt).map_err(|e| block(Reason::Unsupported, e.to_string(), ""))?;
        let found = walk::walk(&tree);
        if found.too_deep {
            return Err(block(Reason::Unsupported, "a view definition nests too deeply", ""));
        }
        edits.extend(check(&found, protect, &toks)?.edits);
    }
    if edits.is_empty() {
        return Ok(None);
    }
    super::Rewrite::new(edits, toks.len())
        .apply(sql)
        .map(Some)
        .ok_or_else(|| block(Reason::Unsupported, "view not rewritable", ""))
}

/// The relations a definition reads; `None` when the definition cannot be read whole (does
/// not parse, nests too deeply): callers then fail closed.
pub(crate) fn definition_relations(sql: &str, protect: &mut Protection<'_>) -> Option<Vec<Arc<Relation>>> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref() else { continue };
        let tree = serde_json::to_value(stmt).ok()?;
        let found = walk::walk(&tree);
        if found.too_deep {
            return None;
        }
        for r in &found.rels {
            if matches!(r.site, Site::Read | Site::Tablesample | Site::CopyTo)
                && let Some(rel) = protect.resolve(r.schema(), r.relname())
            {
                out.push(rel);
            }
        }
    }
    Some(out)
}

/// The protected relations a function body names anywhere; a body that does not parse counts
/// as reading one.
fn definition_relations_all(sql: &str, protect: &mut Protection<'_>) -> Vec<String> {
    let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else {
        return vec!["(unparsable body)".to_owned()];
    };
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref() else { continue };
        let Ok(tree) = serde_json::to_value(stmt) else { return vec!["(unreadable body)".to_owned()] };
        let found = walk::walk(&tree);
        if found.too_deep {
            return vec!["(body nests too deeply)".to_owned()];
        }
        for r in &found.rels {
            if let Some(rel) = protect.resolve(r.schema(), r.relname())
                && protect.protected(&rel).is_some()
            {
                out.push(rel.name.to_string());
            }
        }
        for f in &found.funcs {
            if function(f, protect, false, None).is_err() {
                out.push(f.name.join("."));
            }
        }
    }
    out
}
