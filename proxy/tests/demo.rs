//! `pgveil demo` end to end, through the real binary: it serves masked and raw data per role,
//! blocks, and on Ctrl-C leaves nothing running and nothing on disk.

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
