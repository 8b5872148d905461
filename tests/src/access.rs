//! Access review (issue 16): `raw_access` events for reads of raw protected values, by
//! unmasked roles and exempt roles alike; column usage in statement events.

use tokio_postgres::SimpleQueryMessage;

use crate::harness::client::{connect_plain, url};
use crate::harness::{pg, proxy as harness_proxy};
use crate::masking::RULES;

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pgveil-test-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn events(log: &str, kind: &str) -> Vec<serde_json::Value> {
    log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v["event"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_reads_are_logged_per_statement_with_rows_and_masked_reads_are_not() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let dir = tempdir();
    let audit_path = dir.join("audit.jsonl");
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |c| {
        c.audit.path = Some(audit_path.display().to_string());
        c.audit.raw_access = true;
    })
    .await;

    // An unmasked_for role reads raw SSNs: simple, extended and multi-statement.
    let billing = connect_plain(&url(p.port(), "billing_admin", &db.name, "sslmode=disable")).await.unwrap();
    let rows = billing.simple_query("SELECT id, ssn FROM customers WHERE id <= 5").await.unwrap();
    assert_eq!(rows.iter().filter(|m| matches!(m, SimpleQueryMessage::Row(_))).count(), 5);
    let rows = billing.query("SELECT ssn FROM customers WHERE id BETWEEN $1 AND $2", &[&10i32, &12i32]).await.unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].get::<_, String>(0), "010-11-0010", "billing_admin sees raw values");
    billing.simple_query("SELECT 1; SELECT ssn FROM customers WHERE id = 7; SELECT name FROM customers").await.unwrap();
    // Its masked columns and unprotected reads log nothing.
    billing.simple_query("SELECT email FROM customers WHERE id = 1").await.unwrap();
    // A masked session's reads are masked: no raw_access.
    let app = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    app.simple_query("SELECT ssn FROM customers WHERE id <= 3").await.unwrap();
    // A raw-predicate grant: the raw value is compared (predicate_raw), the result is masked.
    app.query("SELECT id, email FROM customers WHERE email = $1", &[&"canary1@leak.test"]).await.unwrap();
    // An exempt session is inspected parse-only: its reads are logged, its results untouched.
    let dba = connect_plain(&url(p.port(), "dba", &db.name, "sslmode=disable")).await.unwrap();
    let r = dba.query_one("SELECT ssn, card_number FROM public.customers WHERE id = 1", &[]).await.unwrap();
    assert_eq!(r.get::<_, String>(1), "4000000000000001");
    // An exempt session is never blocked, and its syntax errors are the server's.
    let e = dba.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::SYNTAX_ERROR));
    dba.simple_query("DO $$ BEGIN PERFORM 1; END $$").await.expect("exempt sessions run anything");
    drop((billing, app, dba));
    p.shutdown().await;

    let log = std::fs::read_to_string(&audit_path).unwrap();
    for raw in ["900-00-00", "-11-00", "4000000000000001"] {
        assert!(!log.contains(raw), "a raw value reached the audit log");
    }
    let raw = events(&log, "raw_access");
    let summary: Vec<(String, u64, String)> = raw
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap().to_owned(),
                e["rows"].as_u64().unwrap(),
                e["statement"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("billing_admin".to_owned(), 5, "SELECT id, ssn FROM customers WHERE id <= $1".to_owned()),
            ("billing_admin".to_owned(), 3, "SELECT ssn FROM customers WHERE id BETWEEN $1 AND $2".to_owned()),
            ("billing_admin".to_owned(), 1, "SELECT ssn FROM customers WHERE id = $1".to_owned()),
            ("app_user".to_owned(), 1, "SELECT id, email FROM customers WHERE email = $1".to_owned()),
            ("dba".to_owned(), 1, "SELECT ssn, card_number FROM public.customers WHERE id = $1".to_owned()),
        ],
        "one event per statement that read raw values, with its rows:\n{log}"
    );
    assert_eq!(raw[0]["usage"], serde_json::json!({"public.customers.ssn": ["raw"]}));
    assert_eq!(raw[0]["columns"], serde_json::json!(["public.customers.ssn"]));
    assert_eq!(raw[0]["tables"], serde_json::json!(["public.customers"]));
    assert_eq!(raw[3]["usage"], serde_json::json!({"public.customers.email": ["masked", "predicate_raw"]}));
    assert_eq!(
        raw[4]["usage"],
        serde_json::json!({"public.customers.card_number": ["raw"], "public.customers.ssn": ["raw"]})
    );
    for e in &raw {
        assert_eq!(e["fingerprint"].as_str().map(str::len), Some(16), "{e}");
    }
    assert_eq!(proxy::audit_cli::verify(&log), Ok(log.lines().count()), "the hash chain is intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_statements_carry_their_column_usage() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let dir = tempdir();
    let audit_path = dir.join("audit.jsonl");
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |c| c.audit.path = Some(audit_path.display().to_string()))
        .await;
    let app = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    for sql in [
        "SELECT id FROM customers WHERE ssn = '900-00-0001'",
        "SELECT id FROM customers ORDER BY card_number",
        "SELECT 1 FROM orders WHERE id = 1 AND lower(status) = 'x'; DO $$ BEGIN END $$",
    ] {
        app.simple_query(sql).await.expect_err(sql);
    }
    drop(app);
    p.shutdown().await;
    let log = std::fs::read_to_string(&audit_path).unwrap();
    let blocked = events(&log, "query_blocked");
    let usage: Vec<serde_json::Value> = blocked.iter().map(|e| e["usage"].clone()).collect();
    assert_eq!(
        usage,
        vec![
            serde_json::json!({"public.customers.ssn": ["masked"]}),
            serde_json::json!({"public.customers.card_number": ["masked"]}),
            serde_json::json!({}),
        ],
        "{log}"
    );
    assert!(!log.contains("raw_access"), "nothing raw was read, and raw_access is off");
}
