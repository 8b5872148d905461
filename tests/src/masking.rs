//! Masking through real clients: the shapes of rules.md in text (psql) and binary
//! (tokio-postgres) results, per role, and blocked statements as ordinary SQL errors.

use tokio_postgres::types::{FromSql, Type};

use crate::harness::client::{connect_plain, psql, stderr, stdout, url};
use crate::harness::{pg, proxy as harness_proxy};

pub(crate) const RULES: &str = include_str!("../fixtures/rules/spec.yaml");

/// Any column's raw wire bytes, to decode binary values ourselves.
#[derive(Debug)]
pub(crate) struct Raw(pub Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

const COLS: &str =
    "SELECT id, name, ssn, email, card_number, phone, birth_date, balance, notes FROM customers WHERE id = 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sees_the_shapes_of_rules_md_per_role() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let run = |role: &str| {
        let out = psql(&cluster.psql_bin(), &url(p.port(), role, &db.name, "sslmode=require"), COLS);
        assert!(out.status.success(), "{role}: {}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    assert_eq!(
        run("app_user"),
        "1|Canary One|***-**-0001|c***@leak.test|****|+1 5** **** *01|1980-01-01|1000.00|",
        "masked for an ordinary role"
    );
    assert_eq!(
        run("dba"),
        "1|Canary One|900-00-0001|canary1@leak.test|4000000000000001|+1 555 0100 001|1980-07-15|1234.56|canary note one",
        "exempt"
    );
    assert_eq!(
        run("billing_admin"),
        "1|Canary One|900-00-0001|c***@leak.test|****|+1 5** **** *01|1980-01-01|1000.00|",
        "unmasked_for"
    );
    let support = run("support");
    assert!(support.contains("|canary1@leak.test|"), "support sees emails: {support}");
    // by_role: the first matching role wins over unmasked_for.
    cluster.psql_admin("postgres", "GRANT support TO support_lead").ok();
    let lead = run("support_lead");
    let hashed = lead.split('|').nth(3).unwrap_or_default();
    assert_eq!(hashed.len(), 16, "hash mask for support_lead: {lead}");
    assert!(hashed.chars().all(|c| c.is_ascii_hexdigit()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_results_decode_in_their_types() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let client = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.expect("connect");
    let row = client
        .query_one("SELECT ssn, birth_date, balance, notes, card_number FROM customers WHERE id = $1", &[&1i32])
        .await
        .expect("masked query");
    assert_eq!(row.get::<_, String>(0), "***-**-0001");
    let date = row.get::<_, Raw>(1).0;
    assert_eq!(rules::mask::binary_to_text(rules::types::PgType::Date, &date).as_deref(), Some("1980-01-01"));
    let balance = row.get::<_, Raw>(2).0;
    assert_eq!(rules::types::numeric_from_binary(&balance).as_deref(), Some("1000.00"));
    assert_eq!(row.get::<_, Option<String>>(3), None, "nullify");
    assert_eq!(row.get::<_, String>(4), "****");
    // A prepared statement reused: every execution is masked.
    let stmt = client.prepare("SELECT ssn FROM customers WHERE id = $1").await.unwrap();
    for id in 1..=50 {
        let ssn: String = client.query_one(&stmt, &[&id]).await.unwrap().get(0);
        assert!(ssn.starts_with("***-**-"), "{ssn}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_statements_are_sql_errors_and_the_session_goes_on() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let client = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.expect("connect");
    for sql in [
        "SELECT id FROM customers WHERE ssn = '900-00-0001'",
        "DO $$ BEGIN PERFORM 1; END $$",
        "SET ROLE dba",
        "SELECT query_to_xml('select 1', true, true, '')",
        "ALTER TABLE customers ADD COLUMN x int",
    ] {
        let err = client.simple_query(sql).await.expect_err(sql);
        let db_err = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db_err.code(), &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE, "{sql}");
        assert!(db_err.message().contains("blocked by rule"), "{sql}: {}", db_err.message());
        assert!(db_err.hint().is_some(), "{sql}: a hint says what to do");
        let err = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{sql} (extended)");
        assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1, "usable after {sql}");
    }
    // Inside a transaction the block fails the transaction, as an error from the server would.
    client.batch_execute("BEGIN").await.unwrap();
    let _ = client.simple_query("SELECT id FROM customers WHERE ssn = 'x'").await.expect_err("blocked");
    let err = client.simple_query("SELECT 1").await.expect_err("transaction aborted");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION));
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(client.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}

/// psql's meta-commands as a masked role give what they give direct (issue 30): they read
/// the catalogs, never a protected column, and none of them is blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_meta_commands_as_a_masked_role_equal_direct() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    cluster
        .psql_admin(
            &db.name,
            "CREATE VIEW public.order_totals AS SELECT customer_id, sum(amount) AS total FROM orders GROUP BY 1;
             CREATE FUNCTION public.add_one(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + 1';
             COMMENT ON TABLE customers IS 'people we sell to';",
        )
        .unwrap();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let direct = format!("host=127.0.0.1 port={} user=app_user password=app_user_pw dbname={}", cluster.port, db.name);
    let through = url(p.port(), "app_user", &db.name, "sslmode=require");
    for meta in [
        "\\d customers",
        "\\d+ customers",
        "\\d+ order_totals",
        "\\dt+",
        "\\dv",
        "\\di",
        "\\ds",
        "\\df+ add_one",
        "\\sf add_one",
        "\\sv order_totals",
        "\\dp customers",
        "\\dx",
        "\\l",
        "\\dn+",
        "\\du",
        "\\dT",
        "\\dd customers",
        "\\dconfig search_path",
    ] {
        let d = psql(&cluster.psql_bin(), &direct, meta);
        let t = psql(&cluster.psql_bin(), &through, meta);
        assert!(d.status.success(), "{meta} direct: {}", stderr(&d));
        assert!(t.status.success(), "{meta} through pgveil: {}", stderr(&t));
        assert_eq!(stdout(&t), stdout(&d), "{meta}");
    }
    crate::leaks::assert_layers_held(&p.shared);
    p.shutdown().await;
}
