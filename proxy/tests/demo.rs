//! `pgveil demo` end to end, through the real binary: it serves masked and raw data per role,
//! blocks, and on Ctrl-C leaves nothing running and nothing on disk.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test and bench code: a panic is a failure report")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn psql(port: &str, role: &str, sql: &str) -> std::process::Output {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL client binaries: apt-get install -y postgresql")
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin/psql"))
        .find(|p| p.exists())
        .expect("psql");
    Command::new(bin)
        .args([
            "-X",
            "-At",
            "-d",
            &format!("host=127.0.0.1 port={port} dbname=demo user={role} password={role} sslmode=require"),
            "-c",
            sql,
        ])
        .output()
        .expect("run psql")
}

#[test]
fn demo_masks_blocks_and_cleans_up() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start pgveil demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("PGVEIL_DEMO_READY"))
        .expect("the demo printed its ready line");
    let field = |k: &str| {
        ready.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}="))).unwrap_or_default().to_owned()
    };
    let (port, dir) = (field("port"), field("dir"));
    assert!(std::path::Path::new(&dir).exists());

    let sql = "SELECT ssn, email, card_number FROM customers WHERE id = 1";
    let analyst = psql(&port, "analyst", sql);
    let analyst_out = String::from_utf8_lossy(&analyst.stdout).trim().to_owned();
    let dba = psql(&port, "dba", sql);
    let dba_out = String::from_utf8_lossy(&dba.stdout).trim().to_owned();
    let blocked = psql(&port, "analyst", "SELECT * FROM customers");
    let blocked_err = String::from_utf8_lossy(&blocked.stderr).into_owned();

    // Ctrl-C, as a person would.
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let status = child.wait().expect("demo exits");
    let leftover = Command::new("pgrep").args(["-f", &dir]).output().map(|o| o.stdout).unwrap_or_default();

    assert!(
        analyst_out.starts_with("***-**-") && analyst_out.contains("***@example.com|****"),
        "analyst: {analyst_out} {}",
        String::from_utf8_lossy(&analyst.stderr)
    );
    assert!(!dba_out.contains("***") && dba_out.contains("@example.com"), "dba: {dba_out}");
    assert!(blocked_err.contains("42501") || blocked_err.contains("blocked by rule"), "{blocked_err}");
    assert!(status.success(), "demo exit status {status}");
    assert!(!std::path::Path::new(&dir).exists(), "the temporary directory is gone");
    assert!(leftover.is_empty(), "processes left running: {}", String::from_utf8_lossy(&leftover));
}

/// `pgveil run --config FILE` against the demo's PostgreSQL: environment overrides apply, a
/// blocked statement is audited, and SIGTERM drains, flushes the audit log and exits 0.
#[test]
fn run_with_a_config_file_audits_and_stops_cleanly_on_sigterm() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgveil demo");
    let mut lines = BufReader::new(demo.stdout.take().expect("stdout")).lines();
    let mut pg_port = String::new();
    let mut ready = String::new();
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(rest) = line.split("(PostgreSQL ").nth(1) {
            pg_port = rest.split_whitespace().next().unwrap_or_default().to_owned();
        }
        if line.starts_with("PGVEIL_DEMO_READY") {
            ready = line;
            break;
        }
    }
    let dir = ready.split_whitespace().find_map(|w| w.strip_prefix("dir=")).unwrap_or_default().to_owned();
    assert!(!pg_port.is_empty(), "the demo printed its PostgreSQL port");

    let work = std::env::temp_dir().join(format!("pgveil-run-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let audit = work.join("audit.jsonl");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = work.join("pgveil.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nupstream: {{ host: 127.0.0.1, port: 1, tls: disable }}\ntls: {{ cert: {dir}/server.crt, key: {dir}/server.key }}\ncatalog: {{ user: pgveil }}\nrules: {dir}/rules.yaml\naudit: {{ path: {} }}\n",
            audit.display()
        ),
    )
    .unwrap();
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["run", "--config"])
        .arg(&config)
        // The file says port 1; the environment wins.
        .env("PGVEIL_UPSTREAM_PORT", &pg_port)
        .env("PGVEIL_CATALOG_PASSWORD", "pgveil")
        .env("PGVEIL_HASH_KEY", "k")
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgveil run");
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let masked = psql(&port.to_string(), "analyst", "SELECT ssn FROM customers WHERE id = 1");
    let blocked = psql(&port.to_string(), "analyst", "SELECT name FROM customers WHERE ssn = '123'");
    let _ = Command::new("kill").args(["-TERM", &proxy.id().to_string()]).status();
    let status = proxy.wait().expect("proxy exits");
    let _ = Command::new("kill").args(["-INT", &demo.id().to_string()]).status();
    let _ = demo.wait();
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&work);

    assert!(up, "pgveil run listened on {port}");
    assert!(
        String::from_utf8_lossy(&masked.stdout).starts_with("***-**-"),
        "{}",
        String::from_utf8_lossy(&masked.stderr)
    );
    assert!(!blocked.status.success());
    assert!(status.success(), "SIGTERM exit status {status}");
    assert!(
        log.lines().any(|l| l.contains("\"event\":\"query_blocked\"") && l.contains("\"rule\":\"predicate\"")),
        "{log}"
    );
    assert!(!log.contains("'123'"), "no literal in the audit log");
}
