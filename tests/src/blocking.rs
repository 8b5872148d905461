//! Minimization and the audit trail: `selects` rules in simple and extended protocol, inside
//! transactions and pipelines, monitor mode, `max_rows` cuts that cancel the backend, and the
//! audit log and metrics they leave behind.

use std::sync::Arc;

use futures_util::{StreamExt, pin_mut};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

use crate::harness::client::{connect_plain, url};
use crate::harness::{pg, proxy as harness_proxy, tempdir};
use crate::masking::RULES;

fn is_block(e: &tokio_postgres::Error, rule: &str) -> bool {
    e.as_db_error().is_some_and(|d| d.code() == &SqlState::INSUFFICIENT_PRIVILEGE && d.message().contains(rule))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selects_rules_block_in_every_protocol_and_the_session_goes_on() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let mut client = connect_plain(&url(p.port(), "analyst", &db.name, "sslmode=disable")).await.unwrap();
    let rule = "no-bulk-customer-export";
    for sql in ["SELECT * FROM customers WHERE id = 1", "SELECT id, name FROM customers"] {
        let e = client.simple_query(sql).await.expect_err(sql);
        assert!(is_block(&e, rule), "simple {sql}: {e}");
        let e = client.query(sql, &[]).await.expect_err(sql);
        assert!(is_block(&e, rule), "extended {sql}: {e}");
        let hint = e.as_db_error().and_then(|d| d.hint()).unwrap_or_default().to_owned();
        assert!(!hint.is_empty(), "a hint says how to write an allowed statement");
        assert_eq!(client.query_one("SELECT count(*) FROM customers", &[]).await.unwrap().get::<_, i64>(0), 200);
    }
    // Allowed shapes.
    let rows = client.query("SELECT id, name FROM customers WHERE id < 10", &[]).await.unwrap();
    assert_eq!(rows.len(), 9);
    let rows = client.simple_query("SELECT id, name FROM customers LIMIT 3").await.unwrap();
    assert_eq!(rows.iter().filter(|m| matches!(m, SimpleQueryMessage::Row(_))).count(), 3);

    // Inside a transaction block: the block fails the transaction like a server error.
    let tx = client.transaction().await.unwrap();
    let e = tx.query("SELECT * FROM customers WHERE id = 2", &[]).await.expect_err("blocked");
    assert!(is_block(&e, rule));
    let e = tx.query("SELECT 1", &[]).await.expect_err("aborted transaction");
    assert_eq!(e.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    tx.rollback().await.unwrap();

    // In a pipeline: the blocked statement fails alone; those around it run.
    let (a, b, c) = tokio::join!(
        client.query("SELECT id FROM orders WHERE id = 1", &[]),
        client.query("SELECT * FROM customers WHERE id = 3", &[]),
        client.query("SELECT name FROM customers WHERE id = 3", &[]),
    );
    assert_eq!(a.unwrap().len(), 1);
    assert!(is_block(&b.unwrap_err(), rule));
    assert_eq!(c.unwrap().len(), 1);
    assert_eq!(client.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_mode_lets_statements_run_and_records_them() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let audit_dir = tempdir();
    let audit_path = audit_dir.join("audit.jsonl");
    let rules = RULES.replace("    max_rows: 1000", "    max_rows: 1000\n    mode: monitor");
    let p = harness_proxy::spawn_with_rules(cluster, &rules, |c| c.audit.path = Some(audit_path.display().to_string()))
        .await;
    let client = connect_plain(&url(p.port(), "analyst", &db.name, "sslmode=disable")).await.unwrap();
    let rows = client.query("SELECT * FROM customers WHERE id = 1", &[]).await.expect("monitor mode runs it");
    assert_eq!(rows.len(), 1);
    drop(client);
    p.shutdown().await;
    let log = std::fs::read_to_string(&audit_path).unwrap();
    let flagged: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["event"] == "query_flagged")
        .collect();
    assert_eq!(flagged.len(), 1, "{log}");
    assert_eq!(flagged[0]["rule"], "no-bulk-customer-export");
    assert_eq!(flagged[0]["mode"], "monitor");
    assert_eq!(flagged[0]["statement"], "SELECT * FROM customers WHERE id = $1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rows_cuts_the_result_and_cancels_the_backend() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    cluster.psql_admin(&db.name, "CREATE SEQUENCE cut_seq; GRANT USAGE, SELECT ON cut_seq TO analyst").unwrap();
    let rules = RULES.replace("max_rows: 1000", "max_rows: 5");
    let p = harness_proxy::spawn_with_rules(cluster, &rules, |_| {}).await;
    let client = connect_plain(&url(p.port(), "analyst", &db.name, "sslmode=disable")).await.unwrap();
    // 200 rows, 20 ms each: ran to the end, the sequence would reach 200.
    // Wide rows make the server flush each one as it is produced.
    let sql = "SELECT id, nextval('cut_seq'), pg_sleep(0.02), repeat('x', 9000) FROM customers WHERE id > 0";
    let stream = client.simple_query_raw(sql).await.unwrap();
    pin_mut!(stream);
    let mut rows = 0;
    let mut error = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(SimpleQueryMessage::Row(_)) => rows += 1,
            Ok(_) => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    assert_eq!(rows, 5, "exactly max_rows rows reach the client");
    let e = error.expect("an error instead of the command's completion");
    assert!(is_block(&e, "max_rows"), "{e}");
    // The backend stopped working on it: far fewer than 200 rows were ever produced.
    let produced: i64 = cluster.psql_admin(&db.name, "SELECT last_value FROM cut_seq").unwrap().trim().parse().unwrap();
    assert!(produced < 100, "the backend produced {produced} rows; it was not cancelled");
    // The same in the extended protocol, and the session is still usable: the cancel sent
    // for a cut never reaches the statement after it (regression: it once did, as 57014).
    for _ in 0..20 {
        let e = client.query("SELECT id, name FROM customers WHERE id > 0", &[]).await.expect_err("cut");
        assert!(is_block(&e, "max_rows"), "{e}");
        assert_eq!(client.query("SELECT id FROM customers WHERE id < 4", &[]).await.unwrap().len(), 3);
        let e = client.simple_query("SELECT id, name FROM customers WHERE id > 0").await.expect_err("cut");
        assert!(is_block(&e, "max_rows"), "{e}");
        assert_eq!(client.query("SELECT id FROM customers WHERE id < 3", &[]).await.unwrap().len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_block_is_audited_once_without_literals_and_metrics_move() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let dir = tempdir();
    let audit_path = dir.join("audit.jsonl");
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |c| c.audit.path = Some(audit_path.display().to_string()))
        .await;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let admin_stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(proxy::admin::serve(admin, Arc::clone(&p.shared), admin_stop.clone()));

    let seen_blocks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (port, name, seen) = (p.port(), db.name.clone(), Arc::clone(&seen_blocks));
        tasks.push(tokio::spawn(async move {
            let role = if i % 2 == 0 { "analyst" } else { "app_user" };
            let client = connect_plain(&url(port, role, &name, "sslmode=disable")).await.unwrap();
            for j in 0..15 {
                let secret = format!("secret-literal-{i}-{j}");
                let blocked = match j % 3 {
                    0 => client.simple_query(&format!("SELECT id FROM customers WHERE ssn = '{secret}'")).await,
                    1 => client
                        .query(&format!("SELECT lower(name) FROM customers WHERE card_number = '{secret}'"), &[])
                        .await
                        .map(|_| Vec::new()),
                    _ => client.simple_query("SELECT id, name FROM customers").await,
                };
                if let Err(e) = blocked {
                    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let metrics = http_get(admin_addr, "/metrics").await;
    for name in [
        "pgveil_connections_active",
        "pgveil_connections_total",
        "pgveil_connections_rejected_total",
        "pgveil_statements_total",
        "pgveil_blocked_total",
        "pgveil_masked_cells_total",
        "pgveil_rows_cut_total",
        "pgveil_forwarded_bytes_total",
        "pgveil_analysis_seconds_sum",
        "pgveil_analysis_cache_total",
        "pgveil_catalog_refreshes_total",
        "pgveil_rules_reloads_total",
        "pgveil_audit_lines_total",
        "pgveil_audit_write_seconds_sum",
        "pgveil_tls_handshake_failures_total",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    let value = |line_start: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(value("pgveil_connections_total") >= 32.0);
    assert!(value("pgveil_statements_total{kind=\"simple\"}") > 0.0);
    assert!(value("pgveil_analysis_cache_total{result=\"hit\"}") > 0.0, "repeated statements hit the cache");
    assert!(value("pgveil_masked_cells_total") == 0.0 || metrics.contains("pgveil_masked_cells_total"));
    assert!(http_get(admin_addr, "/healthz").await.contains("ok"));
    assert!(http_get(admin_addr, "/readyz").await.contains("ready"));
    admin_stop.cancel();
    p.shutdown().await;

    let log = std::fs::read_to_string(&audit_path).unwrap();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).expect("every line parses")).collect();
    let blocked = lines.iter().filter(|v| v["event"] == "query_blocked").count();
    assert_eq!(
        blocked,
        seen_blocks.load(std::sync::atomic::Ordering::Relaxed),
        "one audit line per block the clients saw"
    );
    assert!(blocked >= 32 * 10, "{blocked}");
    assert!(!log.contains("secret-literal"), "a literal reached the audit log");
    assert!(!log.contains("900-00-0001"));
    for v in &lines {
        for field in ["ts", "event", "session", "client", "user", "database"] {
            assert!(v.get(field).is_some(), "{field} missing in {v}");
        }
    }
    assert_eq!(proxy::audit_cli::verify(&log), Ok(lines.len()), "the hash chain is intact");
    let summary = proxy::audit_cli::summary(&log, &proxy::audit_cli::Filter::default());
    assert!(summary.contains("no-bulk-customer-export") && summary.contains("predicate"), "{summary}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
