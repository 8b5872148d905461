//! Faults around the proxy: the backend killed mid-query, crashing and restarting, down, slow;
//! the catalog connection lost; the audit log's disk full; the rules file deleted. In each case
//! the affected sessions get a clear error, the others carry on, nothing protected leaks, and
//! the proxy recovers by itself once the fault is gone.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::harness::client::{connect_plain, url};
use crate::harness::fault::FaultRelay;
use crate::harness::{pg, proxy as harness_proxy};
use crate::masking::RULES;

const SSN: &str = "SELECT ssn FROM customers WHERE id = 1";
const MASKED_SSN: &str = "***-**-0001";
const RAW_SSN: &str = "900-00-0001";

async fn ssn(c: &Client) -> Result<String, tokio_postgres::Error> {
    c.query_one(SSN, &[]).await.map(|r| r.get(0))
}

/// Polls `cond` every 50 ms for up to 20 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's (or proxy's) message, or the client's own description of the failure.
fn msg(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

/// A server that cannot be reached: "could not connect" for a pass-through session; for a
/// masked one the proxy may first find it cannot read the role's memberships (57P03). Both
/// are clear, and neither lets the session in.
fn unreachable(e: &tokio_postgres::Error) -> bool {
    msg(e).contains("could not connect") || code(e) == "57P03"
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_terminated_mid_query_ends_only_its_own_session() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let bystander = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    // One inspected session (masked role) and one byte-pumped session (exempt role).
    for role in ["app_user", "dba"] {
        let victim = connect_plain(&url(p.port(), role, &db.name, "sslmode=disable")).await.unwrap();
        let marker = format!("pg_sleep(30) /* {role} */");
        let running = tokio::spawn({
            let sql = format!("SELECT {marker}");
            async move { victim.simple_query(&sql).await.map(|_| ()) }
        });
        let find =
            format!("SELECT pid FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()");
        let mut pid = String::new();
        for _ in 0..100 {
            pid = cluster.psql_admin(&db.name, &find).unwrap().trim().to_owned();
            if !pid.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!pid.is_empty(), "{role}'s statement never reached the server");
        cluster.psql_admin(&db.name, &format!("SELECT pg_terminate_backend({pid})")).unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("the victim hears of it promptly")
            .unwrap()
            .expect_err("the statement was killed");
        assert!(code(&err) == "57P01" || err.is_closed() || msg(&err).contains("closed"), "{role}: {err}");
        assert_eq!(ssn(&bystander).await.unwrap(), MASKED_SSN, "the bystander carries on, masked");
    }
    let again = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    assert_eq!(ssn(&again).await.unwrap(), MASKED_SSN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_crash_restart_and_slow_start_are_survived() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let mut relay = FaultRelay::start(cluster.port).await;
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |c| {
        c.upstream.port = relay.port;
        c.upstream.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let conn = |role: &'static str| {
        let u = url(p.port(), role, &db.name, "sslmode=disable connect_timeout=20");
        async move { connect_plain(&u).await }
    };
    let masked = conn("app_user").await.unwrap();
    let exempt = conn("dba").await.unwrap();
    assert_eq!(ssn(&masked).await.unwrap(), MASKED_SSN);
    assert_eq!(ssn(&exempt).await.unwrap(), RAW_SSN);

    // Crash: every server connection drops at once, one of them mid-statement.
    let busy = tokio::spawn(async move { masked.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.sever_all();
    let err = tokio::time::timeout(Duration::from_secs(10), busy).await.expect("prompt").unwrap().expect_err("severed");
    assert!(err.is_closed() || !code(&err).is_empty() || msg(&err).contains("closed"), "{err}");
    assert!(ssn(&exempt).await.is_err(), "the exempt session's server connection is gone too");

    // Down: new sessions get a clear error instead of hanging.
    relay.down();
    let started = Instant::now();
    for role in ["app_user", "dba"] {
        let err = conn(role).await.expect_err("server down");
        assert!(unreachable(&err), "{role}: {}", msg(&err));
    }
    assert!(started.elapsed() < Duration::from_secs(10), "refused promptly");

    // Restart: the proxy needs nothing done to it.
    relay.up().await;
    let masked = conn("app_user").await.expect("server back");
    assert_eq!(ssn(&masked).await.unwrap(), MASKED_SSN);

    // Slow: a server that answers new connections after 1 s still gets them (the open session
    // is not held up meanwhile); one slower than upstream.connect_timeout is a clear error.
    relay.set_delay(Duration::from_millis(1000));
    let slow = tokio::spawn(conn("app_user"));
    for _ in 0..5 {
        assert_eq!(ssn(&masked).await.unwrap(), MASKED_SSN);
    }
    let slow = slow.await.unwrap().expect("a slow server is waited for");
    assert_eq!(ssn(&slow).await.unwrap(), MASKED_SSN);
    relay.set_delay(Duration::from_secs(5));
    for role in ["app_user", "dba"] {
        let err = conn(role).await.expect_err("slower than connect_timeout");
        assert!(unreachable(&err), "{role}: {}", msg(&err));
    }
    relay.set_delay(Duration::ZERO);
    assert_eq!(ssn(&conn("app_user").await.unwrap()).await.unwrap(), MASKED_SSN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_catalog_connection_masked_sessions_fail_closed_and_exempt_ones_continue() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    // A catalog role of this test's own, so taking it away touches no other test.
    let role = format!("cat_{:08x}", rand::random::<u32>());
    cluster.psql_admin("postgres", &format!("CREATE ROLE {role} LOGIN PASSWORD 'cat_pw'")).unwrap();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |c| {
        c.catalog.user = Some(role.clone());
        c.catalog.password = Some("cat_pw".to_owned());
    })
    .await;
    let conn = |r: &'static str| {
        let u = url(p.port(), r, &db.name, "sslmode=disable");
        async move { connect_plain(&u).await }
    };
    let masked = conn("app_user").await.unwrap();
    let exempt = conn("dba").await.unwrap();
    assert_eq!(ssn(&masked).await.unwrap(), MASKED_SSN);

    // The catalog connection dies and cannot come back.
    cluster
        .psql_admin(
            "postgres",
            &format!(
                "ALTER ROLE {role} NOLOGIN;\nSELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{role}';"
            ),
        )
        .unwrap();
    // The snapshot expires (as it does on DDL or after its refresh period).
    p.shared.catalogs.invalidate_all();

    let err = ssn(&masked).await.expect_err("no catalog: the masked session's statements are refused");
    assert_eq!(code(&err), "42501", "{err}");
    assert!(msg(&err).contains("catalog"), "{err}");
    let err = conn("app_user").await.expect_err("no catalog: a new masked session cannot be proven safe");
    assert_eq!(code(&err), "57P03", "{err}");
    assert_eq!(ssn(&exempt).await.unwrap(), RAW_SSN, "the exempt session carries on");
    assert_eq!(ssn(&conn("dba").await.unwrap()).await.unwrap(), RAW_SSN, "new exempt sessions too");

    // Back: both masked sessions work again, still masked.
    cluster.psql_admin("postgres", &format!("ALTER ROLE {role} LOGIN")).unwrap();
    assert_eq!(ssn(&masked).await.unwrap(), MASKED_SSN);
    assert_eq!(ssn(&conn("app_user").await.unwrap()).await.unwrap(), MASKED_SSN);
    drop(p);
    let _ = cluster.psql_admin("postgres", &format!("DROP ROLE IF EXISTS {role}"));
}

/// The audit log on a full disk: `/dev/full` answers every write with ENOSPC. The path is a
/// symbolic link, so the test can "free the disk" by pointing it at a real file.
async fn audit_on_full_disk(on_failure: proxy::config::AuditFailure) {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let dir = std::env::temp_dir().join(format!("pgveil-audit-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("audit.jsonl");
    std::os::unix::fs::symlink("/dev/full", &link).unwrap();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |c| {
        c.audit.path = Some(link.display().to_string());
        c.audit.on_failure = on_failure;
    })
    .await;
    let masked = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    let exempt = connect_plain(&url(p.port(), "dba", &db.name, "sslmode=disable")).await.unwrap();

    // A blocked statement needs an audit line, which cannot be written.
    let err = masked.simple_query("SELECT id FROM customers WHERE ssn = 'x'").await.expect_err("a predicate on ssn");
    assert_eq!(code(&err), "42501");
    eventually("the audit writer notices the full disk", || p.shared.audit.is_failing()).await;
    assert!(p.shared.metrics.render().contains("pgveil_audit_failing 1"));

    match on_failure {
        proxy::config::AuditFailure::Refuse => {
            let err = ssn(&masked).await.expect_err("refused while the audit log is down");
            assert_eq!(code(&err), "42501", "{err}");
            assert!(msg(&err).contains("audit"), "{err}");
        }
        proxy::config::AuditFailure::Continue => assert_eq!(ssn(&masked).await.unwrap(), MASKED_SSN),
    }
    assert_eq!(ssn(&exempt).await.unwrap(), RAW_SSN, "exempt sessions are not audited and carry on");

    // Space again: the writer reopens the path, writes the line it kept, and statements run.
    let file = dir.join("real.jsonl");
    std::fs::write(&file, "").unwrap();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&file, &link).unwrap();
    eventually("the audit log recovers", || !p.shared.audit.is_failing()).await;
    assert_eq!(ssn(&masked).await.unwrap(), MASKED_SSN);
    p.shutdown().await;
    let log = std::fs::read_to_string(&file).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"query_blocked\"") && l.contains("ssn")),
        "the line written during the outage was kept, not lost: {log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_disk_refuses_audited_statements_and_loses_no_line() {
    audit_on_full_disk(proxy::config::AuditFailure::Refuse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_disk_with_on_failure_continue_keeps_serving() {
    audit_on_full_disk(proxy::config::AuditFailure::Continue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_rules_file_keeps_the_rules_in_force() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let masked = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    let rules = p.shared.config.rules.clone().unwrap();
    let rejected = || p.shared.metrics.reloads_rejected.load(std::sync::atomic::Ordering::Relaxed);
    let before = rejected();
    std::fs::remove_file(&rules).unwrap();
    eventually("the deletion is noticed", || rejected() > before).await;
    assert_eq!(ssn(&masked).await.unwrap(), MASKED_SSN, "open sessions keep their masks");
    let fresh = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    assert_eq!(ssn(&fresh).await.unwrap(), MASKED_SSN, "new sessions get the rules in force");
    // SIGHUP with the file still gone changes nothing either.
    p.shared.reload.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ssn(&fresh).await.unwrap(), MASKED_SSN);
    // Restored: reloaded as usual.
    let ok = || p.shared.metrics.reloads_ok.load(std::sync::atomic::Ordering::Relaxed);
    let before = ok();
    std::fs::write(&rules, RULES).unwrap();
    eventually("the restored file is reloaded", || ok() > before).await;
    assert_eq!(ssn(&fresh).await.unwrap(), MASKED_SSN);
}

/// Everything a raw session as trust_user receives after its login for `sql`, until the
/// connection ends (bounded in time), as message tags with SQLSTATEs: `E(57P01)`, `Z`, ….
async fn until_closed(port: u16, db: &str, sql: &str, cluster: &pg::Cluster) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let app = format!("endings-{}", rand::random::<u32>());
    s.write_all(&crate::harness::startup_packet(&[
        ("user", "trust_user"),
        ("database", db),
        ("application_name", &app),
    ]))
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed during login");
        seen.extend_from_slice(&buf[..n]);
    }
    let mut q = bytes::BytesMut::new();
    bytes::BufMut::put_u8(&mut q, b'Q');
    bytes::BufMut::put_u32(&mut q, u32::try_from(sql.len() + 5).unwrap());
    bytes::BufMut::put_slice(&mut q, sql.as_bytes());
    bytes::BufMut::put_u8(&mut q, 0);
    s.write_all(&q).await.unwrap();
    let find = format!("SELECT pid FROM pg_stat_activity WHERE application_name = '{app}' AND state = 'active'");
    let mut pid = String::new();
    for _ in 0..100 {
        pid = cluster.psql_admin(db, &find).unwrap().trim().to_owned();
        if !pid.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!pid.is_empty(), "the statement never reached the server");
    cluster.psql_admin(db, &format!("SELECT pg_terminate_backend({pid})")).unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await.expect("closed promptly").unwrap();
    let mut out = Vec::new();
    let mut b = &rest[..];
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        let (msg, tail) = b.split_at((len + 1).min(b.len()));
        let mut code = String::new();
        if msg[0] == b'E' || msg[0] == b'N' {
            // Fields: a type byte, then a NUL-terminated value; `C` is the SQLSTATE.
            for field in msg[5..].split(|&c| c == 0) {
                if let Some((b'C', value)) = field.split_first() {
                    code = String::from_utf8_lossy(value).into_owned();
                }
            }
        }
        out.push(format!("{}({code})", char::from(msg[0])));
        b = tail;
    }
    out
}

/// How a session ends when its backend goes, and when a client leaves before its startup
/// packet: as PostgreSQL ends them (the server's FATAL, then a plain close; nothing at all),
/// with no message of pgveil's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_endings_are_postgresqls() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let sql = "SELECT pg_sleep(30)";
    let direct = until_closed(cluster.port, &db.name, sql, cluster).await;
    assert_eq!(direct.last().map(String::as_str), Some("E(57P01)"), "PostgreSQL's own ending: {direct:?}");
    assert_eq!(until_closed(p.port(), &db.name, sql, cluster).await, direct, "through pgveil, masked");
    // Connected and gone at once (a port check, a pool's probe): no answer at all.
    for port in [cluster.port, p.port()] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty(), "port {port}: {:?}", String::from_utf8_lossy(&rest));
    }
    p.shutdown().await;
}
