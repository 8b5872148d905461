//! Access review (issue 16): `raw_access` events for reads of raw protected values, by
//! unmasked roles and exempt roles alike; column usage in statement events.

use tokio_postgres::SimpleQueryMessage;

use crate::harness::client::{connect_plain, url};
use crate::harness::{pg, proxy as harness_proxy, tempdir};
use crate::masking::RULES;

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

async fn can_log_in(port: u16, role: &str, db: &str) -> Result<(), tokio_postgres::Error> {
    let c = connect_plain(&url(port, role, db, "sslmode=disable")).await?;
    c.simple_query("SELECT 1").await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_drill_budget_quarantine_on_every_instance_and_release() {
    use std::time::{Duration, Instant};
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let dir = tempdir();
    let (log1, log2) = (dir.join("one.jsonl"), dir.join("two.jsonl"));
    let token = "drill-token-7f3a";
    let adjust = |log: &std::path::Path| {
        let (log, state) = (log.display().to_string(), db.name.clone());
        move |c: &mut proxy::config::Config| {
            c.audit.path = Some(log);
            c.limits.blocks_per_session = Some(proxy::config::Budget { max: 5, per: Duration::from_secs(60) });
            c.limits.quarantine = Some(Duration::from_secs(15 * 60));
            c.catalog.state_database = state;
            c.admin.token = Some(token.to_owned());
        }
    };
    let one = harness_proxy::spawn_with_rules(cluster, RULES, adjust(&log1)).await;
    let two = harness_proxy::spawn_with_rules(cluster, RULES, adjust(&log2)).await;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap().to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(proxy::admin::serve(admin, std::sync::Arc::clone(&one.shared), stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(one.shared.containment.is_shared() && two.shared.containment.is_shared()) {
        assert!(Instant::now() < deadline, "both instances read pgveil.quarantine");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Bystanders on both instances, and the prober's own second session on instance two.
    let analyst = connect_plain(&url(one.port(), "analyst", &db.name, "sslmode=disable")).await.unwrap();
    let billing = connect_plain(&url(two.port(), "billing_admin", &db.name, "sslmode=disable")).await.unwrap();
    let prober_elsewhere = connect_plain(&url(two.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    prober_elsewhere.simple_query("SELECT 1").await.unwrap();

    // The probe: five blocks are within the budget, the sixth ends the session.
    let prober = connect_plain(&url(one.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    for i in 0..5 {
        let e = prober.simple_query(&format!("SELECT id FROM customers WHERE ssn = '{i}'")).await.unwrap_err();
        assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
    }
    let e = prober.simple_query("SELECT id FROM customers WHERE ssn = 'x'").await.unwrap_err();
    let db_error = e.as_db_error().unwrap_or_else(|| {
        panic!("a FATAL that says why, got {e:?}; audit log:\n{}", std::fs::read_to_string(&log1).unwrap_or_default())
    });
    assert_eq!(db_error.severity(), "FATAL");
    assert!(db_error.message().contains("blocks_per_session"), "{}", db_error.message());
    assert!(prober.simple_query("SELECT 1").await.is_err(), "the session is gone");
    let quarantined_at = Instant::now();

    // Instance two refuses the role, and its live session there is ended.
    let refused = loop {
        match can_log_in(two.port(), "app_user", &db.name).await {
            Err(e) => break e,
            Ok(()) => {
                assert!(quarantined_at.elapsed() < Duration::from_secs(10), "instance two never refused the role");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    println!("instance two refused the quarantined role {:?} after the budget was spent", quarantined_at.elapsed());
    let d = refused.as_db_error().expect("a FATAL");
    assert_eq!(d.code(), &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert!(d.message().contains("quarantined"), "{}", d.message());
    assert!(prober_elsewhere.simple_query("SELECT 1").await.is_err(), "its session on instance two ended");
    assert!(can_log_in(one.port(), "app_user", &db.name).await.is_err(), "instance one refuses it too");

    // Everyone else carries on, on both instances.
    analyst.simple_query("SELECT id FROM customers WHERE id = 1").await.unwrap();
    billing.simple_query("SELECT ssn FROM customers WHERE id = 1").await.unwrap();
    can_log_in(two.port(), "analyst", &db.name).await.unwrap();

    // The admin API: a missing or wrong token is 401 and does nothing.
    let release = proxy::admin_cli::Action::Release("app_user".to_owned());
    for bad in [None, Some("wrong-token")] {
        let (out, code) = proxy::admin_cli::run(&admin_addr, bad, &release).await;
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("401"), "{out}");
    }
    assert!(one.shared.containment.quarantine_of("app_user").is_some(), "still quarantined");
    let (out, code) = proxy::admin_cli::run(&admin_addr, Some(token), &proxy::admin_cli::Action::Quarantines).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("app_user") && out.contains("probe_budget"), "{out}");
    let (out, code) = proxy::admin_cli::run(&admin_addr, Some(token), &proxy::admin_cli::Action::Sessions).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("analyst") && !out.contains("app_user"), "{out}");

    // Release restores access on every instance.
    let (out, code) = proxy::admin_cli::run(&admin_addr, Some(token), &release).await;
    assert_eq!(code, 0, "{out}");
    let released_at = Instant::now();
    while can_log_in(two.port(), "app_user", &db.name).await.is_err() {
        assert!(released_at.elapsed() < Duration::from_secs(10), "instance two never let the role back in");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    can_log_in(one.port(), "app_user", &db.name).await.unwrap();

    drop((analyst, billing, prober, prober_elsewhere));
    stop.cancel();
    one.shutdown().await;
    two.shutdown().await;
    let text = std::fs::read_to_string(&log1).unwrap();
    let steps: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["user"] == "app_user")
        .map(|v| format!("{} {}", v["event"].as_str().unwrap(), v["rule"].as_str().unwrap_or("-")))
        .collect();
    assert_eq!(
        steps,
        [
            vec!["query_blocked predicate"; 6],
            vec![
                "session_terminated probe_budget",
                "role_quarantined probe_budget",
                "auth_failed quarantine",
                "role_released operator@127.0.0.1",
            ],
        ]
        .concat(),
        "{text}"
    );
    assert_eq!(proxy::audit_cli::verify(&text), Ok(text.lines().count()), "the hash chain is intact");
    let text = std::fs::read_to_string(&log2).unwrap();
    let steps: Vec<&str> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["user"] == "app_user")
        .map(|v| if v["event"] == "session_terminated" { "session_terminated" } else { "auth_failed" })
        .collect();
    assert_eq!(steps.first(), Some(&"session_terminated"), "{text}");
    assert!(steps.len() >= 2, "{text}");
    assert_eq!(proxy::audit_cli::verify(&text), Ok(text.lines().count()));
}

#[test]
fn the_access_review_of_a_generated_log_with_rotations() {
    use std::io::Write as _;
    let log = proxy::access_review::sample_log(100_000);
    assert_eq!(log.lines().count(), 100_000);
    // The same log split into a gzipped rotation, a plain rotation and the live file.
    let dir = tempdir();
    let lines: Vec<&str> = log.lines().collect();
    let (old, rest) = lines.split_at(40_000);
    let (mid, live) = rest.split_at(30_000);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all((old.join("\n") + "\n").as_bytes()).unwrap();
    std::fs::write(dir.join("audit.jsonl.2.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(dir.join("audit.jsonl.1"), mid.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("audit.jsonl"), live.join("\n") + "\n").unwrap();
    let files = proxy::access_review::with_rotations(&dir.join("audit.jsonl"));
    assert_eq!(files.len(), 3, "{files:?}");
    let mut split = proxy::access_review::Review::default();
    for f in &files {
        split.add_text(&proxy::access_review::read_log(f).unwrap(), &proxy::access_review::Filter::default());
    }
    let mut whole = proxy::access_review::Review::default();
    whole.add_text(&log, &proxy::access_review::Filter::default());
    assert_eq!(split.table(), whole.table(), "rotations read as one log");
    insta::assert_snapshot!("access_review_table", whole.table());

    let filter = proxy::access_review::Filter {
        since: Some("2026-11-01T03:00:00.000Z".to_owned()),
        role: Some("billing_admin".to_owned()),
        column: Some("ssn".to_owned()),
    };
    let mut one = proxy::access_review::Review::default();
    one.add_text(&log, &filter);
    insta::assert_snapshot!("access_review_json_filtered", one.json());
}
