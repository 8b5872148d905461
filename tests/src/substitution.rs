//! Substitution (issue 14): the statement PostgreSQL executes for a masked session reads
//! protected relations only through masked subqueries.
//!
//! - The substitution equivalence oracle: every statement of the corpora gives, through
//!   pgveil as `app_user`, what it gives directly on a copy of the fixture whose protected
//!   columns hold `app_user`'s masked values (computed by the Rust masks, not by SQL): rows,
//!   SQLSTATE of errors, row counts.
//! - Statements blocked before substitution that now run.
//! - Another session changing views, columns and children while a masked session runs.

use std::sync::Arc;

use tokio_postgres::SimpleQueryMessage;

use crate::harness::client::{connect_plain, url};
use crate::harness::{pg, proxy as harness_proxy};
use crate::masking::RULES;

/// Statements blocked before substitution that must now run for a masked session.
pub(crate) const NOW_ALLOWED: &[&str] = &[
    "CREATE TEMP TABLE tmp_a (id int, note text)",
    "INSERT INTO tmp_a VALUES (1, 'x')",
    "SELECT id, note FROM tmp_a",
    "DROP TABLE tmp_a",
    "CREATE TEMP TABLE tmp_b AS SELECT id, ssn, email FROM customers WHERE id <= 3",
    "SELECT ssn, email FROM tmp_b ORDER BY id",
    "CREATE TABLE copy_masked AS SELECT id, ssn, card_number FROM customers",
    "SELECT count(*) FROM copy_masked WHERE card_number = '****'",
    "DROP TABLE copy_masked",
    "INSERT INTO orders (customer_id, amount, status) SELECT id, 1, ssn FROM customers WHERE id = 1 RETURNING status",
    "SELECT upper(email), lower(ssn), substring(phone from 1 for 4) FROM customers WHERE id <= 3 ORDER BY id",
    "SELECT coalesce(notes, 'none'), extract(year FROM birth_date) FROM customers WHERE id <= 3 ORDER BY id",
    "SELECT length(ssn), ssn || '!' FROM customers WHERE id = 1",
    "SELECT max(ssn), min(email), count(DISTINCT id) FROM customers",
    "SELECT c FROM customers c WHERE c.id = 1",
    "SELECT to_jsonb(c) - 'signup' FROM customers c WHERE c.id = 2",
    "SELECT row_to_json(c)::text FROM customers c WHERE c.id = 3",
    "SELECT id, ssn FROM customers WHERE id = 1 UNION ALL SELECT id, ssn FROM customers WHERE id = 2",
    "WITH w AS (SELECT id, ssn FROM customers) SELECT * FROM w WHERE id < 3 ORDER BY id",
    "SELECT s.x FROM (SELECT lower(ssn) AS x FROM customers) s LIMIT 3",
    "SELECT ssn FROM customers c, LATERAL (SELECT c.id) l WHERE c.id = 1",
    "SELECT id FROM customers WHERE email = 'canary2@leak.test'",
    "SELECT id FROM customers WHERE email IN ('canary1@leak.test', 'canary3@leak.test') ORDER BY id",
    "CREATE VIEW my_view AS SELECT id, ssn, upper(email) AS e FROM customers",
    "SELECT * FROM my_view WHERE id = 1",
    "DROP VIEW my_view",
    "SELECT pg_notify('substitution', 'hello')",
    "SELECT pg_advisory_lock(42), pg_advisory_unlock(42)",
    "SELECT int4range(1, 10) @> 5, numrange(1.5, 2.5), daterange('2024-01-01', '2024-02-01')",
    "SELECT count(*) > 0 FROM information_schema.columns WHERE table_name = 'customers'",
    "SELECT count(*) FROM pg_cursors",
    "SELECT count(*) FROM pg_prepared_statements",
    "SELECT count(*) FROM pg_prepared_xacts",
    "SET DateStyle = 'German'",
    "SELECT birth_date FROM customers WHERE id = 1",
    "RESET DateStyle",
    "SET client_encoding = 'LATIN1'",
    "SELECT name FROM customers WHERE id = 1",
    "RESET client_encoding",
    "SET IntervalStyle = 'postgres_verbose'",
    "SET extra_float_digits = 1",
    "CREATE TYPE mood AS ENUM ('ok', 'sad')",
    "DROP TYPE mood",
    "CREATE TABLE scratch_t (a int)",
    "CREATE INDEX ON scratch_t (a)",
    "DROP TABLE scratch_t",
    "COPY customers TO STDOUT",
    "COPY (SELECT ssn FROM customers WHERE id = 1) TO STDOUT",
    "UPDATE customers SET notes = ssn WHERE id = 4 RETURNING notes",
    "EXPLAIN SELECT ssn FROM customers WHERE id = 1",
    "SELECT ssn FROM customers ORDER BY id LIMIT 1",
    "DECLARE cur CURSOR WITH HOLD FOR SELECT ssn FROM customers WHERE id <= 2",
    "FETCH ALL FROM cur",
    "CLOSE cur",
    "PREPARE ps AS SELECT ssn FROM customers WHERE id = $1",
    "EXECUTE ps(2)",
    "DEALLOCATE ps",
    // Subqueries list only the columns a statement names (unless it reaches them by position).
    "SELECT count(*) FROM customers",
    "SELECT 1 FROM customers LIMIT 1",
    "SELECT o.id FROM orders o WHERE EXISTS (SELECT 1 FROM customers WHERE id = o.customer_id) ORDER BY 1 LIMIT 3",
    "SELECT (SELECT name FROM customers WHERE id = o.customer_id) FROM orders o ORDER BY o.id LIMIT 3",
    "SELECT x, y, z FROM customers AS c(x, y, z) ORDER BY x LIMIT 2",
    "SELECT c.name, o.amount FROM customers c JOIN orders o USING (id) ORDER BY 1 LIMIT 3",
];

/// Statements the server must reject with its own error, not pgveil's 42501.
const SERVER_ERRORS: &[(&str, &str)] = &[
    ("SELECT id FROM no_such_table", "42P01"),
    ("SELECT nope FROM customers", "42703"),
    ("SELEC 1", "42601"),
    ("SELECT FROM WHERE", "42601"),
    ("SELECT ssn::int FROM customers", "22P02"),
];

fn render(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    let mut out = Vec::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::Row(r) => {
                let cells: Vec<String> = (0..r.len())
                    .map(|i| match r.try_get(i) {
                        Ok(v) => v.unwrap_or("NULL").to_owned(),
                        Err(_) => "<not UTF-8>".to_owned(),
                    })
                    .collect();
                out.push(cells.join("|"));
            }
            SimpleQueryMessage::CommandComplete(n) => out.push(format!("-- {n}")),
            _ => {}
        }
    }
    out
}

/// A statement's outcome, comparable across the two runs: its rows (sorted when the
/// statement has no ORDER BY) and row counts, or the SQLSTATE of its error.
pub(crate) async fn outcome(client: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>, String> {
    outcome_in(client, sql, false).await
}

/// [`outcome`], inside a transaction the caller opened (`in_tx`): each statement runs under a
/// savepoint rolled back after it, so the transaction's own state stays as it was.
pub(crate) async fn outcome_in(client: &tokio_postgres::Client, sql: &str, in_tx: bool) -> Result<Vec<String>, String> {
    let wrap = !sql.contains(';') && !sql.to_uppercase().starts_with("EXPLAIN");
    let (open, close) = if in_tx { ("SAVEPOINT drift", "ROLLBACK TO SAVEPOINT drift") } else { ("BEGIN", "ROLLBACK") };
    if wrap || in_tx {
        client.batch_execute(open).await.map_err(|e| format!("{open}: {e}"))?;
    }
    let r = match client.simple_query(sql).await {
        Ok(msgs) => {
            let mut rows = render(&msgs);
            if !sql.to_uppercase().contains("ORDER BY") {
                rows.sort();
            }
            Ok(rows)
        }
        Err(e) => Err(e.code().map_or_else(|| e.to_string(), |c| c.code().to_owned())),
    };
    if wrap || in_tx {
        let _ = client.batch_execute(close).await;
    }
    r
}

/// Writes `app_user`'s masked values into the protected columns of a database, computed by
/// the Rust masks (independently of the SQL the proxy generates).
pub(crate) async fn mask_fixture(admin: &tokio_postgres::Client) {
    let policy = Arc::new(
        rules::compile(RULES, &rules::CompileOptions { hash_key: Some(harness_proxy::HASH_KEY.to_vec()) }).unwrap(),
    );
    let id = rules::Identity::new(["app_user"]);
    let cols = [
        ("email", rules::types::PgType::Text),
        ("ssn", rules::types::PgType::Text),
        ("card_number", rules::types::PgType::Text),
        ("phone", rules::types::PgType::Text),
        ("birth_date", rules::types::PgType::Date),
        ("balance", rules::types::PgType::Numeric),
        ("notes", rules::types::PgType::Text),
    ];
    let rows = admin
        .query(
            "SELECT id::text, email, ssn, card_number, phone, birth_date::text, balance::text, notes FROM customers",
            &[],
        )
        .await
        .unwrap();
    let mut sql = String::from("BEGIN;\n");
    for r in &rows {
        let mut sets = Vec::new();
        for (i, (name, ty)) in cols.iter().enumerate() {
            let column = rules::ColumnName::new("public", "customers", name);
            let Some(mask) = policy.column_mask(&column, &id) else { continue };
            let value = match r.get::<_, Option<String>>(i + 1) {
                None => "NULL".to_owned(),
                Some(raw) => {
                    match rules::mask::apply(mask, *ty, rules::types::Format::Text, raw.as_bytes(), policy.hash_key()) {
                        rules::mask::Masked::Null => "NULL".to_owned(),
                        rules::mask::Masked::Value(v) => {
                            format!("'{}'", String::from_utf8_lossy(&v).replace('\'', "''"))
                        }
                    }
                }
            };
            sets.push(format!("{name} = {value}"));
        }
        sql.push_str(&format!("UPDATE customers SET {} WHERE id = {};\n", sets.join(", "), r.get::<_, String>(0)));
    }
    sql.push_str("COMMIT;");
    admin.batch_execute(&sql).await.unwrap();
}

/// The oracle's statements: the leak corpus, the statements substitution lets run and the
/// false-block corpus, less those with no rows to compare here (COPY and EXPLAIN: the leak
/// scan covers them), and those where the masked copy is not the reference by design: raw
/// comparisons the rules grant (`email`: predicates: equality) and writes whose RETURNING masks
/// the value they just wrote.
pub(crate) fn oracle_statements() -> Vec<String> {
    crate::leaks::all_cases()
        .into_iter()
        .map(|(_, s)| s)
        .chain(NOW_ALLOWED.iter().map(|s| (*s).to_owned()))
        .chain(crate::false_blocks::CORPUS.iter().map(|s| (*s).to_owned()))
        .filter(|s| {
            let u = s.to_uppercase();
            let excluded = u.starts_with("COPY")
                || u.starts_with("EXPLAIN")
                || u.contains("PG_NOTIFY")
                || u.contains("WHERE EMAIL")
                || ((u.starts_with("UPDATE CUSTOMERS") || u.starts_with("INSERT INTO CUSTOMERS"))
                    && u.contains("RETURNING"));
            !excluded
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn substituted_statements_equal_the_same_statements_on_masked_data() {
    let cluster = pg::cluster();
    let orig = cluster.fresh_db();
    let masked = cluster.fresh_db();
    let admin = connect_plain(&url(cluster.port, "dba", &masked.name, "sslmode=disable")).await.unwrap();
    mask_fixture(&admin).await;
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let via = connect_plain(&url(p.port(), "app_user", &orig.name, "sslmode=disable")).await.unwrap();
    let direct = connect_plain(&url(cluster.port, "app_user", &masked.name, "sslmode=disable")).await.unwrap();
    let statements = oracle_statements();
    let (mut compared, mut blocked) = (0, 0);
    let mut differences = Vec::new();
    for sql in &statements {
        let through = outcome(&via, sql).await;
        if through.as_ref().is_err_and(|c| c == "42501") {
            blocked += 1;
            continue;
        }
        let on_masked = outcome(&direct, sql).await;
        compared += 1;
        if through != on_masked {
            differences.push(format!("{sql}\n  through pgveil: {through:?}\n  on masked data: {on_masked:?}"));
        }
    }
    assert!(differences.is_empty(), "{} of {compared} differ:\n{}", differences.len(), differences.join("\n"));
    assert!(compared >= 150, "compared {compared} statements ({blocked} blocked)");
    crate::leaks::assert_layers_held(&p.shared);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_blocked_before_substitution_now_run() {
    assert!(NOW_ALLOWED.len() >= 40);
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let client = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    for sql in NOW_ALLOWED {
        if sql.starts_with("COPY") {
            let stream = client.copy_out(*sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            futures_util::pin_mut!(stream);
            let mut bytes = Vec::new();
            while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
                bytes.extend_from_slice(&chunk.unwrap());
            }
            let text = String::from_utf8_lossy(&bytes);
            assert!(text.contains("***-**-0001") && !text.contains("900-00-0001"), "{sql}: {text}");
            continue;
        }
        if let Err(e) = client.simple_query(sql).await {
            panic!("{sql}: {e} ({:?})", e.code());
        }
    }
    // Expressions compute on masked values.
    let rows = client.simple_query("SELECT upper(email), ssn || '!' FROM customers WHERE id = 1").await.unwrap();
    assert_eq!(render(&rows)[0], "C***@LEAK.TEST|***-**-0001!");
    // The server's own errors, not pgveil's.
    for (sql, code) in SERVER_ERRORS {
        let e = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(e.code().map(|c| c.code()), Some(*code), "{sql}: {e}");
        let e = client.query(*sql, &[]).await.expect_err(sql);
        assert_eq!(e.code().map(|c| c.code()), Some(*code), "{sql} (extended): {e}");
    }
    // An error position points into the client's text, not the rewritten one.
    let e = client.simple_query("SELECT nope FROM customers").await.unwrap_err();
    let pos = e.as_db_error().and_then(|d| d.position()).map(|p| format!("{p:?}"));
    assert_eq!(pos.as_deref(), Some("Original(8)"), "{e}");
    crate::leaks::assert_layers_held(&p.shared);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sessions_ddl_never_opens_a_window_on_raw_values() {
    use crate::harness::recorder::Recorder;
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let recorder = Recorder::start(p.addr).await;
    let masked = connect_plain(&url(recorder.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    // Warm the proxy's catalog.
    masked.simple_query("SELECT ssn FROM customers WHERE id = 1").await.unwrap();
    let steps: &[(&str, &str)] = &[
        (
            "CREATE TABLE customers_kid () INHERITS (customers); \
             INSERT INTO customers_kid (name, ssn, email) VALUES ('Kid', '900-00-0001', 'canary1@leak.test')",
            "SELECT ssn, email FROM customers_kid",
        ),
        (
            "CREATE TABLE customers_part (LIKE customers); INSERT INTO customers_part SELECT * FROM customers WHERE id = 2; \
             ALTER TABLE customers_part INHERIT customers",
            "SELECT ssn, email, card_number FROM customers_part",
        ),
        ("CREATE VIEW cv AS SELECT id, name FROM customers", "SELECT * FROM cv WHERE id = 1"),
        ("CREATE OR REPLACE VIEW cv AS SELECT id, name, ssn, email FROM customers", "SELECT * FROM cv WHERE id = 1"),
        ("ALTER TABLE customers RENAME COLUMN notes TO remarks", "SELECT remarks FROM customers WHERE id = 1"),
        ("ALTER TABLE customers RENAME COLUMN ssn TO national_id", "SELECT national_id FROM customers WHERE id = 1"),
        ("SELECT 1", "SELECT * FROM customers WHERE id = 2"),
    ];
    for (ddl, read) in steps {
        cluster.psql_admin(&db.name, ddl).unwrap_or_else(|e| panic!("{ddl}: {e}"));
        // Immediately, and again once the proxy has certainly reloaded.
        let _ = masked.simple_query(read).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let _ = masked.simple_query(read).await;
        let _ = masked.query(*read, &[]).await;
    }
    // The renamed column answers to its rule by attnum: it keeps its own mask (partial), and
    // the rest of the table is not redacted wholesale.
    let row = masked.query_one("SELECT name, national_id FROM customers WHERE id = 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "Canary One", "unmasked columns stay readable");
    assert_eq!(row.get::<_, String>(1), "***-**-0001", "the rule of ssn follows the column to national_id");
    let stream = recorder.captured();
    for (what, needle) in crate::leaks::needles() {
        assert!(!stream.windows(needle.len()).any(|w| w == needle.as_slice()), "the masked session received {what}");
    }
    crate::leaks::assert_layers_held(&p.shared);
}

/// RowDescription reports the table OID and attnum of masked columns as PostgreSQL does
/// without pgveil (the server itself reports 0 for the masked expression).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_descriptions_report_the_origins_direct_reports() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let via = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    let direct = connect_plain(&url(cluster.port, "app_user", &db.name, "sslmode=disable")).await.unwrap();
    for sql in [
        "SELECT id, ssn, email AS e, balance FROM customers WHERE id = 1",
        "SELECT * FROM customers WHERE id = 1",
        "SELECT c.card_number, o.amount FROM customers c JOIN orders o ON o.customer_id = c.id LIMIT 1",
    ] {
        let origins = |s: &tokio_postgres::Statement| {
            s.columns().iter().map(|c| (c.name().to_owned(), c.table_oid(), c.column_id())).collect::<Vec<_>>()
        };
        let (d, v) = (direct.prepare(sql).await.unwrap(), via.prepare(sql).await.unwrap());
        assert_eq!(origins(&d), origins(&v), "{sql}");
        // And the values are still masked.
        let row = via.query_one(sql, &[]).await.unwrap();
        if let Ok(ssn) = row.try_get::<_, String>("ssn") {
            assert!(ssn.starts_with("***"), "{ssn}");
        }
    }
    crate::leaks::assert_layers_held(&p.shared);
}

/// A masked session's own open DDL transaction holds locks the catalog reload would wait for
/// (`pg_get_viewdef` of a view it is dropping): the reload must not wait on them, or the
/// session waits on the proxy that waits on the session. Found by SQLAlchemy's reflection
/// tests through a masked role (tests/suites/run.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_own_ddl_locks_do_not_stall_its_catalog() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let client = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    client.batch_execute("CREATE MATERIALIZED VIEW mv_lock AS SELECT id, ssn FROM customers").await.unwrap();
    client.batch_execute("CREATE VIEW v_lock AS SELECT id FROM orders").await.unwrap();
    client.batch_execute("BEGIN; DROP MATERIALIZED VIEW mv_lock; DROP VIEW v_lock").await.unwrap();
    let next = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        client.query_one("SELECT ssn FROM customers WHERE id = 1", &[]),
    )
    .await
    .expect("the statement after the session's own DDL is answered, not stalled")
    .unwrap();
    assert_eq!(next.get::<_, String>(0), "***-**-0001");
    client.batch_execute("ROLLBACK").await.unwrap();
    crate::leaks::assert_layers_held(&p.shared);
}
