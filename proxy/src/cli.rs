//! The DBA-facing commands: `pgveil check` (validate a rules file, optionally against a live
//! database) and `pgveil explain` (what the rules decide for one statement and role).
#![allow(clippy::arithmetic_side_effects, reason = "operator commands: positions and numbering of their own output")]

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use rules::catalog::{Catalog, Relation};
use rules::names::TableName;
use rules::types::PgType;

/// Exit codes of config.md.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FINDING: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// Validates a rules file; returns the report and the exit code.
pub async fn check(path: &Path, against: Option<&str>, opts: &rules::CompileOptions) -> (String, u8) {
    let src = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) => return (format!("{}: cannot read: {e}\n", path.display()), EXIT_USAGE),
    };
    let name = path.display().to_string();
    // A DBA validating rules (in CI, say) does not hold the production secret: without the
    // key, `check` validates with a stand-in and warns that `run` will need the real one.
    let without_key = opts.hash_key.as_ref().is_none_or(Vec::is_empty);
    let stand_in = rules::CompileOptions { hash_key: Some(STAND_IN_KEY.to_vec()) };
    let policy = match rules::compile(&src, if without_key { &stand_in } else { opts }) {
        Ok(p) => p,
        Err(diags) => return (rules::diagnostic::render_all(&diags, &name, &src), EXIT_FINDING),
    };
    let mut out = String::new();
    if without_key && policy.uses_hash() {
        let _ = writeln!(
            out,
            "{name}: warning: the `hash` mask needs PGVEIL_HASH_KEY, which is not set here: `pgveil run` will refuse these rules without it"
        );
    }
    let Some(url) = against else {
        let _ = writeln!(
            out,
            "{name}: ok ({} protected columns, {} selects rules, {} exempt roles)",
            policy.columns().len(),
            policy.selects().len(),
            policy.exempt().len()
        );
        return (out, EXIT_OK);
    };
    let catalog = match live_catalog(url).await {
        Ok((c, _)) => c,
        Err(e) => return (format!("cannot read the catalog of {}: {e}\n", redact_url(url)), EXIT_USAGE),
    };
    let mut diags = Vec::new();
    for (col, rule) in policy.columns() {
        let Some(rel) = catalog.get(&col.table) else {
            diags.push(rules::Diagnostic::new(rule.pos, format!("table {} does not exist in the database", col.table)));
            continue;
        };
        let Some(c) = rel.column(&col.column) else {
            let known: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
            let mut d = rules::Diagnostic::new(
                rule.pos,
                format!("column {} does not exist in table {}", col.column, col.table),
            );
            d.hint = rules::diagnostic::did_you_mean(&col.column, &known).map(|s| format!("did you mean `{s}`?"));
            diags.push(d);
            continue;
        };
        let ty = PgType::from_oid(c.type_oid);
        for m in std::iter::once(&rule.mask).chain(rule.by_role.iter().map(|(_, m)| m)) {
            if let Err(why) = rules::mask::fits(m, ty) {
                diags.push(rules::Diagnostic::new(rule.pos, format!("mask does not fit column {col}: {why}")));
            }
        }
    }
    for s in policy.selects() {
        for t in &s.tables {
            if catalog.get(t).is_none() {
                diags.push(rules::Diagnostic::new(
                    s.pos,
                    format!("`selects` entry `{}`: table {t} does not exist", s.name),
                ));
            }
        }
    }
    for f in policy.functions() {
        // `functions.allow` naming a function the database lacks: likely a typo.
        let exists = match crate::cli::connect(url).await {
            Ok(c) => c
                .query_opt(
                    "SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                     WHERE n.nspname = $1 AND p.proname = $2 LIMIT 1",
                    &[&f.schema, &f.table],
                )
                .await
                .is_ok_and(|r| r.is_some()),
            Err(_) => true,
        };
        if !exists {
            let _ = writeln!(out, "{name}: warning: functions.allow names {f}, which does not exist in the database");
        }
    }
    if policy.uses_hash() {
        let key = if without_key { None } else { policy.hash_key() };
        if let Some(problem) = rules::catalog::Installed::problem(catalog.pgveil.as_ref(), key) {
            let _ = writeln!(
                out,
                "{name}: warning: the `hash` mask cannot be served from this database yet: {problem} (run `pgveil init --against …`)"
            );
        }
    }
    if diags.is_empty() {
        let _ = writeln!(out, "{name}: ok against {} ({} relations checked)", redact_url(url), catalog.len());
        (out, EXIT_OK)
    } else {
        (rules::diagnostic::render_all(&diags, &name, &src), EXIT_FINDING)
    }
}

/// What the rules decide for `sql` run by `role`.
pub async fn explain(
    path: &Path,
    role: &str,
    against: Option<&str>,
    sql: &str,
    opts: &rules::CompileOptions,
) -> (String, u8) {
    let src = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) => return (format!("{}: cannot read: {e}\n", path.display()), EXIT_USAGE),
    };
    // A DBA explaining a statement offline does not hold the production key either: the
    // hash masks are shown with a placeholder where the key's fingerprint goes.
    let without_key = opts.hash_key.as_ref().is_none_or(Vec::is_empty);
    let stand_in = rules::CompileOptions { hash_key: Some(STAND_IN_KEY.to_vec()) };
    let policy = match rules::compile(&src, if without_key { &stand_in } else { opts }) {
        Ok(p) => Arc::new(p),
        Err(diags) => return (rules::diagnostic::render_all(&diags, &path.display().to_string(), &src), EXIT_FINDING),
    };
    let (out, code) = explain_with(&policy, role, against, sql).await;
    if without_key && policy.uses_hash() {
        let fingerprint = rules::HashKey::new(STAND_IN_KEY).fingerprint();
        let out = out.replace(&fingerprint, "<key fingerprint>");
        return (
            format!("{out}note: PGVEIL_HASH_KEY is not set: hash masks show <key fingerprint> where the key's goes\n"),
            code,
        );
    }
    (out, code)
}

/// The key `check` and `explain` stand in with when PGVEIL_HASH_KEY is not set (never used to
/// mask anything: `run` refuses rules with `hash` without the real key).
const STAND_IN_KEY: &[u8] = b"pgveil-check-stand-in";

async fn explain_with(policy: &Arc<rules::Policy>, role: &str, against: Option<&str>, sql: &str) -> (String, u8) {
    let policy = Arc::clone(policy);
    let (catalog, roles) = match against {
        Some(url) => match live_catalog(url).await {
            Ok((c, client)) => {
                let roles = client
                    .query(crate::catalog::MEMBERSHIP_SQL, &[&role])
                    .await
                    .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
                    .unwrap_or_default();
                (c, roles)
            }
            Err(e) => return (format!("cannot read the catalog of {}: {e}\n", redact_url(url)), EXIT_USAGE),
        },
        None => (catalog_from_rules(&policy, sql), Vec::new()),
    };
    let identity = rules::Identity::new(roles.iter().map(String::as_str).chain([role]));
    let mut out = String::new();
    let members: Vec<&str> = identity.roles().map(rules::RoleName::as_str).collect();
    let _ = writeln!(out, "role: {role} (identity: {})", members.join(", "));
    if against.is_none() {
        let _ =
            writeln!(out, "catalog: from the rules file only (pass --against for real columns, views and memberships)");
    }
    if policy.is_exempt(&identity) {
        let _ = writeln!(out, "decision: allowed, unchanged (the role is exempt)");
        return (out, EXIT_OK);
    }
    let view = policy.for_identity(&identity);
    let analysis = rules::sql::Analyzer::new(&view, &catalog, role).analyze(sql);
    for f in &analysis.flagged {
        let _ = writeln!(out, "monitor: rule \"{}\" would block: {}", f.rule, f.reason);
    }
    if let Some(b) = &analysis.block {
        let _ = writeln!(out, "decision: BLOCKED by rule \"{}\"\n  reason: {}", b.rule, b.reason);
        if !b.hint.is_empty() {
            let _ = writeln!(out, "  hint: {}", b.hint);
        }
        return (out, EXIT_FINDING);
    }
    match &analysis.rewritten {
        Some(_) => {
            let _ = writeln!(out, "decision: allowed, with protected relations substituted");
        }
        None => {
            let _ = writeln!(out, "decision: allowed, unchanged");
        }
    }
    for (i, st) in analysis.statements.iter().enumerate() {
        if analysis.statements.len() > 1 {
            let _ = writeln!(out, "statement {}:", i + 1);
        }
        if !st.tables.is_empty() {
            let _ = writeln!(out, "  protected relations read: {}", st.tables.join(", "));
        }
        if !st.substituted.is_empty() {
            let _ = writeln!(out, "  substituted by their masked subqueries: {}", st.substituted.join(", "));
        }
        for t in &st.substituted {
            let Some(rel) = catalog.resolve(
                t.split_once('.').map(|(s, _)| s),
                t.split_once('.').map_or(t.as_str(), |(_, n)| n),
                &[],
            ) else {
                continue;
            };
            for c in &rel.columns {
                let m = policy
                    .column_mask(&rules::ColumnName::new(&rel.name.schema, &rel.name.table, &c.name), &identity)
                    .map_or_else(|| "unmasked".to_owned(), ToString::to_string);
                let _ = writeln!(out, "    {:<24} {m}", c.name);
            }
        }
        if let Some(l) = &st.max_rows {
            let _ = writeln!(out, "  max_rows: {} (rule \"{}\")", l.rows, l.rule);
        }
    }
    if let Some(text) = &analysis.rewritten {
        let _ = writeln!(out, "PostgreSQL runs:\n  {text}");
    }
    (out, EXIT_OK)
}

/// Without a database: every table the rules name, with the columns the rules name, plus the
/// tables the statement names (columns unknown).
fn catalog_from_rules(policy: &rules::Policy, sql: &str) -> Catalog {
    let mut rels: std::collections::BTreeMap<TableName, Vec<String>> = std::collections::BTreeMap::new();
    for col in policy.columns().keys() {
        rels.entry(col.table.clone()).or_default().push(col.column.clone());
    }
    for s in policy.selects() {
        for t in &s.tables {
            rels.entry(t.clone()).or_default();
        }
    }
    if let Ok(parsed) = pg_query_tables(sql) {
        for t in parsed {
            let (schema, table) =
                t.split_once('.').map_or(("public".to_owned(), t.clone()), |(s, t)| (s.to_owned(), t.to_owned()));
            rels.entry(TableName::new(&schema, &table)).or_default();
        }
    }
    Catalog::new(
        rels.into_iter()
            .enumerate()
            .map(|(i, (name, cols))| Relation::text_table(u32::try_from(i).unwrap_or(0) + 100_000, name, cols)),
    )
}

fn pg_query_tables(sql: &str) -> Result<Vec<String>, ()> {
    rules::sql::tables(sql).ok_or(())
}

async fn live_catalog(url: &str) -> Result<(Catalog, tokio_postgres::Client), String> {
    let client = connect(url).await?;
    let catalog = crate::catalog::load(&client).await.map_err(|e| e.to_string())?;
    Ok((catalog, client))
}

/// A connection for the operator commands (TLS when the server offers it, as `prefer`).
pub(crate) async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(crate::tls::no_verification())
        .with_no_client_auth();
    config.alpn_protocols = vec![crate::tls::ALPN_POSTGRESQL.to_vec()];
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres_rustls::MakeRustlsConnect::new(config))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(client)
}

/// A connection URL without its password, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{user}@{}", &url[..s + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
