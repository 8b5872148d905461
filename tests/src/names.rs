//! Names bind as pgveil resolved them (issue 29, threat model I12): where pgveil's model of the
//! session (its catalog snapshot, its search_path, its temp relations) differs from the
//! server's, the statement fails; it never reads a protected relation raw, and nothing pgveil
//! writes runs a user's function, operator or type on a raw value. Each case runs as a masked
//! role on a connection of its own through the simple protocol and, for single statements,
//! the extended protocol with binary results, while every byte the client receives is
//! recorded and scanned for the fixture's protected values (notices and notifications
//! included).

use crate::harness::client::{connect_plain, url};
use crate::harness::recorder::Recorder;
use crate::harness::{pg, proxy as harness_proxy};
use crate::leaks::{assert_layers_held, needles};
use crate::masking::RULES;

/// A schema the masked role owns, with an unprotected table shadowing public.customers when
/// it comes first on the search_path (the same columns, none of the fixture's values), and
/// statistics on the protected table. The e-mails are varchar here, for which pg_catalog has
/// no `=` of its own: a user's varchar `=` on the path would win operator resolution.
fn setup(cluster: &pg::Cluster, db: &str) {
    cluster
        .psql_admin(
            db,
            "CREATE SCHEMA scratch AUTHORIZATION app_user;
             CREATE TABLE scratch.customers (LIKE public.customers);
             INSERT INTO scratch.customers (id, name, email, ssn, card_number, phone, birth_date, balance, notes)
               VALUES (1, 'Scratch', 'scratch@example.com', 'scratch-ssn', '1111', '+0', '2001-01-01', 1, 'n');
             ALTER TABLE scratch.customers OWNER TO app_user;
             CREATE TABLE scratch.other (id int, x text);
             INSERT INTO scratch.other VALUES (1, 'x');
             ALTER TABLE scratch.other OWNER TO app_user;
             CREATE TABLE scratch.locked (id int, ssn text);
             INSERT INTO scratch.locked VALUES (1, 'locked-ssn');
             ALTER TABLE scratch.locked OWNER TO dba;
             GRANT SELECT ON scratch.locked TO app_user;
             ANALYZE public.customers;
             ALTER TABLE public.customers ALTER COLUMN email TYPE varchar(100);",
        )
        .expect("setup");
}

const SHADOWED: &str = "SET search_path = scratch, public";

/// Protected columns of the fixture.
const COLS: &[&str] = &["ssn", "email", "card_number", "phone", "birth_date", "balance", "notes"];

/// One case: statements run first on the connection, then the statement that would have
/// read raw values on main before issue 29.
struct Case {
    class: &'static str,
    before: Vec<String>,
    last: String,
}

fn case(class: &'static str, before: &[&str], last: impl Into<String>) -> Case {
    Case { class, before: before.iter().map(|s| (*s).to_owned()).collect(), last: last.into() }
}

fn cases() -> Vec<Case> {
    // Control: where the shadow is in force it is what is read (the stream must show it).
    let mut out = vec![case("control", &[SHADOWED], "SELECT ssn FROM customers")];
    // The session's own uncommitted DDL removes the shadow pgveil resolved to.
    for ddl in ["ALTER TABLE scratch.customers RENAME TO gone", "DROP TABLE scratch.customers"] {
        let mut reads: Vec<String> = [
            "SELECT id, ssn || '', email || '' FROM customers WHERE id < 4",
            "CREATE TEMP TABLE got AS SELECT ssn || '' AS s FROM customers",
            "INSERT INTO scratch.other SELECT id, ssn || '' FROM customers RETURNING x",
            "UPDATE scratch.other SET x = (SELECT ssn || '' FROM customers LIMIT 1) RETURNING x",
            "PREPARE p AS SELECT ssn || '' FROM customers",
            "SELECT (SELECT ssn || '' FROM customers LIMIT 1)",
            "WITH w AS (SELECT ssn FROM customers) SELECT ssn || '' FROM w",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        reads.extend(COLS.iter().map(|c| format!("SELECT {c}::text || '' FROM customers")));
        for read in reads {
            out.push(case("own uncommitted DDL", &[SHADOWED, "BEGIN", ddl], read.clone()));
            out.push(case("one Query", &[SHADOWED], format!("{ddl}; {read}")));
        }
    }
    // search_path changes pgveil could model differently from the server.
    for c in COLS {
        let read = format!("SELECT {c}::text || '' FROM customers");
        out.push(case("search_path", &["BEGIN", SHADOWED, "ROLLBACK"], read.clone()));
        out.push(case("search_path", &["BEGIN", "SET LOCAL search_path = scratch, public", "COMMIT"], read.clone()));
        out.push(case("search_path", &["BEGIN", "SAVEPOINT a", SHADOWED, "ROLLBACK TO a"], read.clone()));
        out.push(case("search_path", &[SHADOWED, "SET search_path = public"], read.clone()));
        out.push(case("search_path", &["SET search_path = '\"scratch,x\"', public"], read.clone()));
        out.push(case(
            "search_path",
            &["SELECT set_config('search_path', 'scratch, public', false)", "RESET search_path"],
            read,
        ));
    }
    out.push(case(
        "search_path",
        &[],
        "SET search_path = scratch, public; SET search_path = public; SELECT ssn || '' FROM customers",
    ));
    out.push(case(
        "search_path",
        &[],
        "BEGIN; SET search_path = scratch, public; ROLLBACK; SELECT ssn || '' FROM customers",
    ));
    out.push(case("search_path", &["SET search_path = scratch, pg_catalog, public"], "SELECT ssn FROM customers"));
    // pgveil's own SQL must not call the session's types, functions or operators.
    out.push(case(
        "pg_temp type",
        &["CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (VALUE::pg_catalog.regrole IS NOT NULL)"],
        "SELECT ssn, email, phone, card_number FROM customers WHERE id < 4",
    ));
    out.push(case(
        "pg_temp type",
        &[
            "LISTEN leak",
            "CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_catalog.pg_notify('leak', VALUE) IS NULL)",
        ],
        "SELECT ssn, email, phone FROM customers WHERE id < 4",
    ));
    out.push(case(
        "user function",
        &[
            "LISTEN leak",
            "CREATE FUNCTION scratch.length(text) RETURNS int LANGUAGE sql AS $$ SELECT pg_catalog.pg_notify('leak', $1) IS NULL AND false $$",
            SHADOWED,
        ],
        "SELECT ssn, phone FROM public.customers WHERE id < 4",
    ));
    let operator = [
        "LISTEN leak",
        "CREATE FUNCTION scratch.eq(varchar, varchar) RETURNS bool LANGUAGE sql AS $$ SELECT pg_catalog.pg_notify('leak', $1) IS NULL AND false $$",
        "CREATE OPERATOR scratch.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = scratch.eq)",
        "SET search_path = public, scratch",
    ];
    for last in [
        "SELECT name FROM customers WHERE email = 'canary1@leak.test'",
        "SELECT name FROM customers WHERE email IN ('canary1@leak.test', 'canary2@leak.test')",
        "UPDATE customers SET name = name WHERE email = 'canary2@leak.test' RETURNING id",
    ] {
        out.push(case("user operator", &operator, last));
    }
    // DML targets: names inside sublinks that the target's raw columns could capture.
    for c in COLS {
        out.push(case(
            "dml target",
            &[],
            format!(
                "UPDATE customers SET name = (SELECT {c}::text FROM scratch.customers AS k(a, b, c, d, e, f, g, h, i, j) LIMIT 1) WHERE id = 2 RETURNING name"
            ),
        ));
        out.push(case(
            "dml target",
            &[SHADOWED, "CREATE TEMP TABLE customers (id int)"],
            format!("UPDATE public.customers SET name = (SELECT {c}::text FROM customers LIMIT 1) WHERE id = 2 RETURNING name"),
        ));
    }
    out.push(case(
        "dml target",
        &[],
        "UPDATE customers x SET name = row_to_json(x.*)::text WHERE id = 2 RETURNING name",
    ));
    out.push(case(
        "dml target",
        &[],
        "UPDATE customers x SET name = (SELECT x.*::text FROM scratch.other LIMIT 1) WHERE id = 2 RETURNING name",
    ));
    out.push(case(
        "dml target",
        &[],
        "UPDATE customers SET (name, notes) = (ssn, email) WHERE id = 2 RETURNING name, notes",
    ));
    // CTE names shadow only inside their own query level.
    out.push(case(
        "cte scope",
        &[],
        "SELECT (WITH pg_stats AS (SELECT 1) SELECT 1), most_common_vals::text FROM pg_stats WHERE tablename = 'customers'",
    ));
    out.push(case(
        "cte scope",
        &[],
        "WITH pg_stats AS (SELECT most_common_vals::text AS v FROM pg_stats) SELECT v FROM pg_stats",
    ));
    out
}

/// The ways a statement reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Simple,
    Extended,
    Prepared,
    Cursor,
    Copy,
    Pipeline,
    Psql,
}

async fn run(port: u16, db: &str, c: &Case, path: Path, psql_bin: &std::path::Path) -> String {
    let conn = url(port, "app_user", db, "sslmode=disable");
    if path == Path::Psql {
        let mut cmd = std::process::Command::new(psql_bin);
        cmd.args(["-X", "-At", "-d", &conn]);
        for sql in c.before.iter().chain([&c.last]) {
            cmd.args(["-c", sql]);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
        return String::from_utf8_lossy(&out.stderr).into_owned();
    }
    let client = connect_plain(&conn).await.unwrap();
    let simple = c.last.contains(';') || c.before.iter().any(|s| s.contains(';'));
    if path == Path::Pipeline && !simple {
        let all: Vec<&String> = c.before.iter().chain([&c.last]).collect();
        let results = futures_util::future::join_all(all.iter().map(|s| client.query(s.as_str(), &[]))).await;
        return format!("{:?}", results.last().map(|r| r.as_ref().map(|_| ()).map_err(db_message)));
    }
    for sql in &c.before {
        let _ = client.simple_query(sql).await;
    }
    let result = match path {
        Path::Extended if !simple => client.query(c.last.as_str(), &[]).await.map(|_| ()),
        Path::Prepared if !simple => match client.prepare(&c.last).await {
            Ok(stmt) => {
                let _ = client.query(&stmt, &[]).await;
                client.query(&stmt, &[]).await.map(|_| ())
            }
            Err(e) => Err(e),
        },
        Path::Cursor if !simple && c.last.starts_with("SELECT") => client
            .simple_query(&format!("DECLARE lc CURSOR WITH HOLD FOR {}; FETCH ALL FROM lc; CLOSE lc", c.last))
            .await
            .map(|_| ()),
        Path::Copy if !simple && c.last.starts_with("SELECT") => {
            match client.copy_out(&format!("COPY ({}) TO STDOUT", c.last)).await {
                Ok(stream) => {
                    futures_util::pin_mut!(stream);
                    while let Some(Ok(_)) = futures_util::StreamExt::next(&mut stream).await {}
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        _ => client.simple_query(&c.last).await.map(|_| ()),
    };
    let _ = client.simple_query("ROLLBACK").await;
    result.map_or_else(|e| db_message(&e), |()| "ok".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_bind_as_pgveil_resolved_them() {
    let cases = cases();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    setup(cluster, &db.name);
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let recorder = Recorder::start(p.addr).await;
    let mut outcomes = Vec::new();
    let paths = [Path::Simple, Path::Extended, Path::Prepared, Path::Cursor, Path::Copy, Path::Pipeline, Path::Psql];
    for c in &cases {
        for path in paths {
            let got = run(recorder.port(), &db.name, c, path, &cluster.psql_bin()).await;
            outcomes.push(format!("{}: {} / {} [{path:?}] -> {got}", c.class, c.before.join(" / "), c.last));
        }
    }
    let stream = recorder.captured();
    for (what, needle) in needles() {
        assert!(
            !stream.windows(needle.len()).any(|w| w == needle.as_slice()),
            "the masked session received {what}\n{}",
            outcomes.join("\n")
        );
    }
    assert_layers_held(&p.shared);
    // The shadow is read where it is in force, so the oracle's silence is not an empty stream.
    assert!(stream.windows(11).any(|w| w == b"scratch-ssn"), "the shadow table was never read");
    // And the fixture's own state is intact: no case committed its DDL.
    let dba = connect_plain(&url(cluster.port, "dba", &db.name, "sslmode=disable")).await.unwrap();
    let n: i64 = dba.query_one("SELECT count(*) FROM scratch.customers", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
}

/// Another session's DDL while the statement waits on a lock: PostgreSQL looks the name up
/// again once it has the lock. A column dropped meanwhile from the sublink's table would
/// make the name bind to the DML target's raw column; pinned to its range variable, the
/// statement fails instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_of_another_session_during_a_lock_wait_fails_the_statement() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    setup(cluster, &db.name);
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let recorder = Recorder::start(p.addr).await;
    let dba = connect_plain(&url(cluster.port, "dba", &db.name, "sslmode=disable")).await.unwrap();
    let masked = connect_plain(&url(recorder.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    // The catalog has seen scratch.locked with its ssn column.
    masked.simple_query("SELECT id FROM scratch.locked").await.unwrap();
    dba.batch_execute("BEGIN; LOCK TABLE scratch.locked IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let waiting = tokio::spawn(async move {
        masked
            .simple_query(
                "UPDATE customers SET name = (SELECT ssn FROM scratch.locked LIMIT 1) WHERE id = 2 RETURNING name",
            )
            .await
            .map(|_| ())
            .map_err(|e| db_message(&e))
    });
    // The statement waits on the lock (pg_stat_activity shows other roles' waits only to
    // superusers: the superuser's psql asks).
    let mut waited = false;
    for _ in 0..100 {
        let count = cluster
            .psql_admin(
                &db.name,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND usename = 'app_user'",
            )
            .unwrap();
        if count.trim() != "0" {
            waited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(waited, "the masked statement never waited on the lock");
    dba.batch_execute("ALTER TABLE scratch.locked DROP COLUMN ssn; COMMIT").await.unwrap();
    let result = waiting.await.unwrap();
    assert!(result.as_ref().is_err_and(|e| e.contains("column locked.ssn does not exist")), "{result:?}");
    let stream = recorder.captured();
    for (what, needle) in needles() {
        assert!(!stream.windows(needle.len()).any(|w| w == needle.as_slice()), "the masked session received {what}");
    }
}

/// What pgveil resolved is what runs: a rename in the session's own open transaction makes the
/// statement fail instead of reading the relation the name now denotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_gone_in_an_open_transaction_fails_the_statement() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    setup(cluster, &db.name);
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let client = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    client.batch_execute(SHADOWED).await.unwrap();
    let rows = client.simple_query("SELECT ssn FROM customers").await.unwrap();
    assert_eq!(first_value(&rows).as_deref(), Some("scratch-ssn"), "the shadow is read while it is there");
    client.batch_execute("BEGIN; ALTER TABLE scratch.customers RENAME TO gone").await.unwrap();
    let e = client.simple_query("SELECT ssn || '' FROM customers").await.unwrap_err();
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE), "{e}");
    client.batch_execute("ROLLBACK").await.unwrap();
    // The same within one Query.
    let e = client
        .simple_query("ALTER TABLE scratch.customers RENAME TO gone; SELECT ssn || '' FROM customers")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE), "{e}");
    let rows = client.simple_query("SELECT ssn FROM customers").await.unwrap();
    assert_eq!(first_value(&rows).as_deref(), Some("scratch-ssn"), "the failed Query was rolled back");
}

/// A search_path that puts pg_catalog after another schema refuses the masked session, from
/// any source: startup options, role defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_path_with_pg_catalog_late_refuses_the_masked_session() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    setup(cluster, &db.name);
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let options = "sslmode=disable options='-c search_path=scratch,pg_catalog'";
    let e = connect_plain(&url(p.port(), "app_user", &db.name, options)).await.unwrap_err();
    assert!(db_message(&e).contains("puts pg_catalog after scratch"), "{e:?}");
    // An exempt role is a byte pump: PostgreSQL's own rules apply.
    connect_plain(&url(p.port(), "dba", &db.name, options)).await.unwrap();
    cluster
        .psql_admin(
            &db.name,
            &format!("ALTER ROLE app_user IN DATABASE {} SET search_path = scratch, pg_catalog", db.name),
        )
        .unwrap();
    let e = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap_err();
    assert!(db_message(&e).contains("puts pg_catalog after scratch"), "{e:?}");
    cluster.psql_admin(&db.name, &format!("ALTER ROLE app_user IN DATABASE {} RESET search_path", db.name)).unwrap();
    // A quoted name with a comma in it is one schema.
    let quoted = "sslmode=disable options='-c search_path=\"scratch,pg_catalog\",public'";
    let client = connect_plain(&url(p.port(), "app_user", &db.name, quoted)).await.unwrap();
    let rows = client.simple_query("SELECT name FROM customers WHERE id = 1").await.unwrap();
    assert_eq!(first_value(&rows).as_deref(), Some("Canary One"));
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string())
}

fn first_value(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })
}
