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

mod definitions;
mod effects;
mod settings;
mod substitute;
mod target;

use definitions::definition_relations_all;
pub(crate) use definitions::{definition_relations, substitute_definition};
pub(crate) use effects::{changes, effects};
pub use settings::unsafe_encoding;
use settings::{lone_path_set, search_path_allowed, set, settings_row_set};
use substitute::{origins, pinned_comparison, substitution, trimmable, value_end};
pub(crate) use target::resolve_column;
use target::target;

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

/// Whether a relation site must be pinned for the statement to run: reads and writes must;
/// a utility statement's name without a location in the text (some DDL forms) is left to the
/// server, as it reads no data.
pub(super) fn pins_site(r: &walk::RelSite<'_>) -> bool {
    matches!(r.site, Site::Read | Site::Tablesample | Site::CopyTo | Site::Target)
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
