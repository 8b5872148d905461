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
/// it comes first on the search_path, and statistics on the protected table. The e-mails are
/// varchar here, for which pg_catalog has no `=` of its own: a user's varchar `=` on the path
/// would win operator resolution.
fn setup(cluster: &pg::Cluster, db: &str) {
    cluster
        .psql_admin(
            db,
            "CREATE SCHEMA scratch AUTHORIZATION app_user;
             CREATE TABLE scratch.customers (id int, ssn text, email text);
             INSERT INTO scratch.customers VALUES (1, 'scratch-ssn', 'scratch@example.com');
             ALTER TABLE scratch.customers OWNER TO app_user;
             CREATE TABLE scratch.other (id int, x text);
             INSERT INTO scratch.other VALUES (1, 'x');
             ALTER TABLE scratch.other OWNER TO app_user;
             ANALYZE public.customers;
             ALTER TABLE public.customers ALTER COLUMN email TYPE varchar(100);",
        )
        .expect("setup");
}

const SHADOWED: &str = "SET search_path = scratch, public";

/// (class, statements run in order on one connection). The last statement of each is the one
/// that would have read raw values on main before issue 29.
fn cases() -> Vec<(&'static str, Vec<String>)> {
    let mut out: Vec<(&'static str, Vec<String>)> = Vec::new();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    // The session's own uncommitted DDL removes the shadow pgveil resolved to.
    for ddl in ["ALTER TABLE scratch.customers RENAME TO gone", "DROP TABLE scratch.customers"] {
        for read in [
            "SELECT ssn || '' FROM customers",
            "SELECT id, ssn || '', email || '' FROM customers WHERE id < 4",
            "COPY (SELECT ssn || '' FROM customers) TO STDOUT",
            "CREATE TEMP TABLE got AS SELECT ssn || '' AS s FROM customers",
            "INSERT INTO scratch.other SELECT id, ssn || '' FROM customers RETURNING x",
            "UPDATE scratch.other SET x = (SELECT ssn || '' FROM customers LIMIT 1) RETURNING x",
            "DECLARE c CURSOR FOR SELECT ssn || '' FROM customers; FETCH ALL FROM c",
            "PREPARE p AS SELECT ssn || '' FROM customers; EXECUTE p",
            "SELECT (SELECT ssn || '' FROM customers LIMIT 1)",
        ] {
            out.push(("own uncommitted DDL", vec![SHADOWED.to_owned(), format!("BEGIN; {ddl}; {read}; ROLLBACK")]));
            out.push((
                "own uncommitted DDL",
                vec![SHADOWED.to_owned(), "BEGIN".to_owned(), ddl.to_owned(), read.to_owned()],
            ));
        }
        // Several statements in one Query: decided before the DDL ran.
        out.push(("one Query", vec![SHADOWED.to_owned(), format!("{ddl}; SELECT ssn || '' FROM customers")]));
    }
    // search_path changes pgveil may model differently.
    out.push((
        "search_path",
        s(&["SET search_path = scratch, public; SET search_path = public; SELECT ssn || '' FROM customers"]),
    ));
    out.push((
        "search_path",
        s(&["BEGIN; SET search_path = scratch, public; ROLLBACK; SELECT ssn || '' FROM customers"]),
    ));
    out.push((
        "search_path",
        s(&["BEGIN", "SET LOCAL search_path = scratch, public", "COMMIT", "SELECT ssn || '' FROM customers"]),
    ));
    out.push((
        "search_path",
        s(&[
            "BEGIN",
            "SAVEPOINT a",
            "SET search_path = scratch, public",
            "ROLLBACK TO a",
            "SELECT ssn || '' FROM customers",
            "COMMIT",
        ]),
    ));
    out.push(("search_path", s(&["SET search_path = '\"scratch,x\"', public", "SELECT ssn || '' FROM customers"])));
    out.push((
        "search_path",
        s(&["SELECT set_config('search_path', 'scratch, public', false)", "SELECT ssn || '' FROM customers"]),
    ));
    out.push(("search_path", s(&["SET search_path = scratch, pg_catalog, public", "SELECT ssn FROM customers"])));
    // pgveil's own SQL must not call the session's types, functions or operators.
    out.push((
        "pg_temp type",
        s(&[
            "CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (VALUE::pg_catalog.regrole IS NOT NULL)",
            "SELECT ssn, email, phone FROM customers WHERE id < 4",
        ]),
    ));
    out.push((
        "pg_temp type",
        s(&[
            "LISTEN leak",
            "CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_catalog.pg_notify('leak', VALUE) IS NULL)",
            "SELECT ssn, email, phone FROM customers WHERE id < 4",
            "SELECT 1",
        ]),
    ));
    out.push((
        "user function",
        s(&[
            "LISTEN leak",
            "CREATE FUNCTION scratch.length(text) RETURNS int LANGUAGE sql AS $$ SELECT pg_catalog.pg_notify('leak', $1) IS NULL AND false $$",
            "SET search_path = scratch, public",
            "SELECT ssn, phone FROM customers WHERE id < 4",
            "SELECT 1",
        ]),
    ));
    out.push((
        "user operator",
        s(&[
            "LISTEN leak",
            "CREATE FUNCTION scratch.eq(varchar, varchar) RETURNS bool LANGUAGE sql AS $$ SELECT pg_catalog.pg_notify('leak', $1) IS NULL AND false $$",
            "CREATE OPERATOR scratch.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = scratch.eq)",
            "SET search_path = scratch, public",
            "SELECT name FROM customers WHERE email = 'canary1@leak.test'",
            "SELECT name FROM customers WHERE email IN ('canary1@leak.test', 'canary2@leak.test')",
            "UPDATE customers SET name = name WHERE email = 'canary2@leak.test' RETURNING id",
            "SELECT 1",
        ]),
    ));
    // DML targets: names inside sublinks that the target's raw columns could capture.
    out.push((
        "dml target",
        s(&["UPDATE customers SET name = (SELECT ssn FROM scratch.customers AS k(a, b) LIMIT 1) WHERE id = 2 RETURNING name"]),
    ));
    out.push((
        "dml target",
        s(&[
            SHADOWED,
            "CREATE TEMP TABLE customers (id int)",
            "UPDATE public.customers SET name = (SELECT ssn FROM customers LIMIT 1) WHERE id = 2 RETURNING name",
        ]),
    ));
    out.push(("dml target", s(&["UPDATE customers x SET name = row_to_json(x.*)::text WHERE id = 2 RETURNING name"])));
    out.push((
        "dml target",
        s(&["UPDATE customers x SET name = (SELECT x.*::text FROM scratch.other LIMIT 1) WHERE id = 2 RETURNING name"]),
    ));
    out.push((
        "dml target",
        s(&["UPDATE customers SET (name, notes) = (ssn, email) WHERE id = 2 RETURNING name, notes"]),
    ));
    // CTE names shadow only inside their own query level.
    out.push((
        "cte scope",
        s(&["SELECT (WITH pg_stats AS (SELECT 1) SELECT 1), most_common_vals::text FROM pg_stats WHERE tablename = 'customers'"]),
    ));
    out.push((
        "cte scope",
        s(&["WITH pg_stats AS (SELECT most_common_vals::text AS v FROM pg_stats) SELECT v FROM pg_stats"]),
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_bind_as_pgveil_resolved_them() {
    let cases = cases();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    setup(cluster, &db.name);
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let recorder = Recorder::start(p.addr).await;
    let mut outcomes = Vec::new();
    for (class, statements) in &cases {
        for extended in [false, true] {
            if extended && statements.iter().any(|s| s.contains(';')) {
                continue;
            }
            let client = connect_plain(&url(recorder.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
            let mut last = Ok(());
            for sql in statements {
                last = if extended {
                    client.query(sql.as_str(), &[]).await.map(|_| ())
                } else {
                    client.simple_query(sql).await.map(|_| ())
                };
            }
            outcomes.push(format!(
                "{class}: {} -> {}",
                statements.join(" / "),
                last.map_or_else(|e| e.to_string(), |()| "ok".to_owned())
            ));
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
