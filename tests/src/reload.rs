//! Hot reload: rewriting the rules file under a busy client never fails a query and never
//! serves a value unmasked; rejected files leave the previous rules in force.

use std::sync::atomic::Ordering;

use crate::harness::client::{connect_plain, url};
use crate::harness::{pg, proxy as harness_proxy};
use crate::masking::RULES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_rules_fifty_times_under_load_never_unmasks() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let rules_path = p.shared.config.rules.clone().unwrap();
    let redacting = RULES.replace("mask: { partial: { keep_last: 4 } }", "mask: redact");
    let client = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let row = client
                    .query_one("SELECT ssn FROM customers WHERE id = 1", &[])
                    .await
                    .expect("no query fails during reloads");
                let ssn: String = row.get(0);
                assert!(ssn == "***-**-0001" || ssn == "****", "served {ssn:?} during a reload");
                seen.insert(ssn);
                n += 1;
            }
            (seen, n)
        })
    };
    for i in 0..50 {
        let text = match i % 4 {
            0 => redacting.clone(),
            1 => "version: 1\ncolumns: {public.customers.ssn: {mask: hsah}}\n".to_owned(),
            2 => RULES.to_owned(),
            _ => "version: [not yaml".to_owned(),
        };
        // Editors replace the file; do the same.
        let tmp = rules_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &rules_path).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (seen, n) = reader.await.unwrap();
    assert!(n > 50, "the client ran {n} queries");
    assert_eq!(seen.len(), 2, "both rule versions were in force at some point: {seen:?}");
    let m = &p.shared.metrics;
    assert!(m.reloads_ok.load(Ordering::Relaxed) >= 20, "{}", m.reloads_ok.load(Ordering::Relaxed));
    assert!(m.reloads_rejected.load(Ordering::Relaxed) >= 20, "{}", m.reloads_rejected.load(Ordering::Relaxed));
    // SIGHUP's path: an explicit reload of a valid file.
    std::fs::write(&rules_path, RULES).unwrap();
    assert!(proxy::policy::reload(&p.shared));
}

/// The rules with `name` masked too: a reload that protects more for what a session's stored
/// statements read.
fn masking_names() -> String {
    RULES.replacen("columns:\n", "columns:\n  public.customers.name:\n    mask: redact\n", 1)
}

/// Threat model I11: what the server stores for a session (prepared statements, portals,
/// cursors, temporary views) never runs as decided before a reload that changed what the
/// session sees. tokio-postgres prepares a named statement for every query, so its
/// statements are prepared again transparently, and so are SQL-prepared ones a simple Query
/// executes; cursors, bound portals and a protocol EXECUTE of a stale one are refused naming
/// the reload; a session with a temporary view ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_what_the_server_stores() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let rules_path = p.shared.config.rules.clone().unwrap();
    let conn = url(p.port(), "app_user", &db.name, "sslmode=disable");
    let mut client = connect_plain(&conn).await.unwrap();
    let coded = connect_plain(&conn).await.unwrap();
    let implied = connect_plain(&conn).await.unwrap();
    let stmt = client.prepare("SELECT name FROM customers WHERE id = $1").await.unwrap();
    let name: String = client.query_one(&stmt, &[&1i32]).await.unwrap().get(0);
    assert_eq!(name, "Canary One", "name is not protected yet");
    client
        .batch_execute(
            "PREPARE sqlp AS SELECT name FROM customers WHERE id = 1; \
             PREPARE sqlpx (int) AS SELECT name FROM customers WHERE id = $1; \
             PREPARE sqlpy (int) AS SELECT name FROM customers WHERE id = $1; \
             PREPARE sqlpz AS SELECT name FROM customers WHERE id = 1; \
             PREPARE sqlpw AS SELECT name FROM customers WHERE id = 1",
        )
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; DECLARE cur CURSOR WITH HOLD FOR SELECT name FROM customers ORDER BY id; COMMIT")
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    let portal = tx.bind(&stmt, &[&2i32]).await.unwrap();
    coded.batch_execute("CREATE TEMP VIEW names_v AS SELECT id, name FROM customers").await.unwrap();
    // Temporary without saying so: the server makes a view over a temporary table temporary.
    implied
        .batch_execute("CREATE TEMP TABLE tt (x int); INSERT INTO tt VALUES (1); CREATE VIEW tv AS SELECT c.name, tt.x FROM tt, customers c")
        .await
        .unwrap();

    std::fs::write(&rules_path, masking_names()).unwrap();
    assert!(proxy::policy::reload(&p.shared), "the new rules are valid");

    // A portal bound before the reload is refused, naming it.
    let e = tx.query_portal(&portal, 10).await.unwrap_err();
    assert!(format!("{e:?}").contains("reloaded"), "{e:?}");
    drop(tx);
    // The prepared statement is prepared again: the same handle now returns masked names.
    let name: String = client.query_one(&stmt, &[&1i32]).await.unwrap().get(0);
    assert_ne!(name, "Canary One", "a statement prepared before the reload read name raw");
    let again: String = client.query_one(&stmt, &[&2i32]).await.unwrap().get(0);
    assert_eq!(name, again, "the new mask, for every row");
    assert!(p.shared.metrics.reprepared_statements_total.load(Ordering::Relaxed) >= 1);
    // New statements see the new rules too.
    let fresh: String = client.query_one("SELECT name FROM customers WHERE id = 3", &[]).await.unwrap().get(0);
    assert_eq!(fresh, name);
    // SQL PREPARE: the statement is prepared again ahead of the EXECUTE, in the same Query,
    // and its answers unseen: the client sees only its EXECUTE's.
    let rows = client.simple_query("EXECUTE sqlp").await.unwrap();
    assert_eq!(sql_names(&rows), std::slice::from_ref(&name), "{rows:?}");
    let rows = client.simple_query("EXECUTE sqlpx(2); SELECT 1 AS one").await.unwrap();
    assert_eq!(sql_names(&rows), [name.clone(), "1".to_owned()], "{rows:?}");
    // Inside a transaction, and an error in the client's statements still maps its position.
    client.batch_execute("BEGIN").await.unwrap();
    let rows = client.simple_query("EXECUTE sqlpy(3)").await.unwrap();
    assert_eq!(sql_names(&rows), std::slice::from_ref(&name), "{rows:?}");
    client.batch_execute("COMMIT").await.unwrap();
    // An error in the client's own statements points into the client's text.
    let e = client.simple_query("EXECUTE sqlpw; SELECT nosuch FROM customers").await.unwrap_err();
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(db.code().code(), "42703", "{e:?}");
    assert_eq!(db.position(), Some(&tokio_postgres::error::ErrorPosition::Original(23)), "{e:?}");
    // Once prepared again it runs as prepared: no second re-prepare.
    let before = p.shared.metrics.reprepared_statements_total.load(Ordering::Relaxed);
    client.simple_query("EXECUTE sqlp").await.unwrap();
    assert_eq!(p.shared.metrics.reprepared_statements_total.load(Ordering::Relaxed), before);
    // From a protocol Parse the EXECUTE cannot go behind a PREPARE: refused, naming the reload.
    let e = client.query("EXECUTE sqlpz", &[]).await.unwrap_err();
    assert!(
        format!("{e:?}").contains("prepared statement \\\"sqlpz\\\" was prepared under rules that have been reloaded"),
        "{e:?}"
    );
    // Cursors hold a query the proxy cannot send again: refused.
    let e = client.simple_query("FETCH 1 FROM cur").await.unwrap_err();
    assert!(format!("{e:?}").contains("reloaded"), "{e:?}");
    // The session with a temporary view over the table ends, saying why.
    let e = coded.simple_query("SELECT name FROM names_v").await.unwrap_err();
    assert!(format!("{e:?}").contains("rules were reloaded"), "{e:?}");
    let e = implied.simple_query("SELECT name FROM tv").await.unwrap_err();
    assert!(format!("{e:?}").contains("rules were reloaded"), "{e:?}");
    let _ = client.batch_execute("CLOSE cur").await;
}

/// The values of the rows of a simple query's results, first column.
fn sql_names(messages: &[tokio_postgres::SimpleQueryMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// The same through drivers that prepare on their own: psycopg 3 (`prepare_threshold=0`) and
/// asyncpg keep using the statements they prepared before the reload, which now read masked
/// names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_that_prepare_on_their_own_see_the_reloaded_rules() {
    use std::io::{BufRead, Write};
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let rules_path = p.shared.config.rules.clone().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers/reload_prepared.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .args(["127.0.0.1", &p.port().to_string(), &db.name, "app_user"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (install: pip install 'psycopg[binary]' asyncpg)");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (ready, mut lines) = tokio::task::spawn_blocking(move || (lines.next(), lines)).await.unwrap();
    assert_eq!(
        ready.and_then(Result::ok).as_deref(),
        Some("ready"),
        "the script did not get ready: {:?}",
        child.wait_with_output()
    );
    std::fs::write(&rules_path, masking_names()).unwrap();
    assert!(proxy::policy::reload(&p.shared));
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let results: Vec<serde_json::Value> = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for l in lines.by_ref().map_while(Result::ok) {
            out.push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")));
        }
        out
    })
    .await
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{results:?}");
    assert_eq!(results.len(), 2, "{results:?}");
    for r in &results {
        assert_eq!(r["before"], serde_json::json!(["Canary One", "Canary Two"]), "{r}");
        let after = r["after"].as_array().unwrap_or_else(|| panic!("the prepared statement failed: {r}"));
        assert_eq!(after.len(), 2, "{r}");
        assert!(
            after.iter().all(|n| n.as_str().is_some_and(|s| !s.contains("Canary"))),
            "read raw after the reload: {r}"
        );
    }
    assert!(p.shared.metrics.reprepared_statements_total.load(Ordering::Relaxed) >= 2);
}
