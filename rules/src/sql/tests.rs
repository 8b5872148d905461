//! Data-driven tests of statement decisions against the spec example's rules and catalog.
//! Every rewrite is re-parsed by the substitution checker.

use std::sync::Arc;

use crate::policy::Identity;
use crate::sql::{Analyzer, verify_substituted};
use crate::{CompileOptions, compile};

pub(super) fn policy() -> Arc<crate::Policy> {
    Arc::new(
        compile(
            include_str!("../../testdata/valid/spec-example.yaml"),
            &CompileOptions { hash_key: Some(b"k".to_vec()) },
        )
        .unwrap(),
    )
}

/// `block <rule>`, `flag <rule>`, `allow` (forwarded as written, but for its relation names
/// pinned to their schemas) or `rewrite` (substituted), with ` max_rows=N` when a row limit
/// applies.
fn decide(roles: &[&str], sql: &str) -> (String, Option<String>) {
    let session = policy().for_identity(&Identity::new(roles.iter().copied()));
    let catalog = crate::catalog::example();
    let analysis = Analyzer::new(&session, &catalog, roles[0]).analyze(sql);
    let limit = analysis
        .statements
        .iter()
        .find_map(|s| s.max_rows.as_ref())
        .map(|l| format!(" max_rows={}", l.rows))
        .unwrap_or_default();
    let verdict = match (&analysis.block, analysis.flagged.first(), &analysis.rewritten) {
        (Some(b), _, _) => format!("block {}", b.rule),
        (None, Some(f), _) => format!("flag {}", f.rule),
        (None, None, Some(t)) if unpinned(t) != unpinned(sql) => format!("rewrite{limit}"),
        (None, None, Some(_)) => format!("allow{limit}"),
        (None, None, None) => format!("allow{limit}"),
    };
    if let Some(text) = &analysis.rewritten {
        verify_substituted(&session, &catalog, &path(roles[0]), text)
            .unwrap_or_else(|e| panic!("{e}\nsql: {sql}\nrewritten: {text}"));
    } else if analysis.block.is_none() {
        verify_substituted(&session, &catalog, &path(roles[0]), sql).unwrap_or_else(|e| panic!("{e}\nsql: {sql}"));
    }
    (verdict, analysis.rewritten)
}

/// A text without the schema qualifications pinning adds (for telling a pinned text from a
/// substituted one).
fn unpinned(sql: &str) -> String {
    sql.replace("public.", "").replace("pg_catalog.", "").replace("pg_temp.", "")
}

fn path(user: &str) -> Vec<String> {
    vec![user.to_owned(), "public".to_owned()]
}

#[track_caller]
fn check(roles: &[&str], sql: &str, expected: &str) {
    let (actual, rewritten) = decide(roles, sql);
    assert_eq!(actual, expected, "\nroles: {roles:?}\nsql:   {sql}\nrewritten: {rewritten:?}");
}

#[track_caller]
fn rewritten(roles: &[&str], sql: &str) -> String {
    let (verdict, text) = decide(roles, sql);
    text.unwrap_or_else(|| panic!("{sql}: not rewritten ({verdict})"))
}

const APP: &[&str] = &["app_user"];
const ANALYST: &[&str] = &["analyst"];

#[test]
fn statements_without_protected_reads_are_forwarded_as_written() {
    check(APP, "SELECT id, amount FROM orders WHERE id = 1", "allow");
    check(APP, "DELETE FROM orders WHERE id = 1", "allow");
    check(APP, "UPDATE customers SET name = upper(name) WHERE id = 4", "allow");
    check(APP, "INSERT INTO customers (name, email, ssn) VALUES ('n', 'e@x.y', '1-2-3')", "allow");
    check(APP, "COPY customers (id, name) TO STDOUT", "allow");
}

#[test]
fn every_read_of_a_protected_relation_is_substituted() {
    // Also when no masked column is named: the subquery's column list is the only way in, so
    // a stale catalog can only make a statement fail.
    check(APP, "SELECT id, name FROM customers WHERE id = 1", "rewrite");
    check(APP, "SELECT c.id FROM public.customers c JOIN orders o ON o.customer_id = c.id", "rewrite");
    check(APP, "SELECT count(*) FROM customers", "rewrite");
}

#[test]
fn every_reach_of_a_masked_column_is_substituted() {
    for sql in [
        "SELECT ssn FROM customers WHERE id = 1",
        "SELECT * FROM customers",
        "SELECT c FROM customers c",
        "SELECT to_jsonb(c) FROM customers c",
        "SELECT (c).ssn FROM customers c",
        "SELECT lower(ssn), upper(email), substring(phone from 2 for 3) FROM customers",
        "SELECT coalesce(notes, 'x'), extract(year FROM birth_date), balance * 2 FROM customers",
        "SELECT ssn::regclass FROM customers",
        "SELECT ssn FROM customers_eu",
        "SELECT ssn FROM ONLY customers",
        "SELECT ssn FROM ONLY (customers)",
        "SELECT ssn FROM customers *",
        "SELECT id FROM customers c WHERE c.id = 1 FOR UPDATE OF c",
        "SELECT x.ssn FROM \"customers\" AS x(i, n, e, ssn)",
        "SELECT ssn FROM U&\"\\0063ustomers\"",
        "TABLE customers",
        "SELECT * FROM orders NATURAL JOIN customers",
        "SELECT g, ssn FROM generate_series(1, 3) g, customers",
        "SELECT t.* FROM customers t",
        "SELECT * FROM customers c, LATERAL (SELECT c.ssn) s",
        "SELECT ssn FROM customers UNION SELECT ssn FROM customers_eu",
        "WITH w AS MATERIALIZED (SELECT lower(ssn) AS x FROM customers) SELECT 1 FROM w",
        "SELECT 1 FROM (SELECT length(ssn) FROM customers OFFSET 0) s",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT ssn FROM r, customers",
        "CREATE TABLE copy AS SELECT ssn, email FROM customers",
        "SELECT ssn INTO copy FROM customers",
        "CREATE VIEW v AS SELECT ssn FROM customers",
        "CREATE MATERIALIZED VIEW mv AS SELECT * FROM customers",
        "INSERT INTO orders (status) SELECT ssn FROM customers",
        "PREPARE p AS SELECT ssn FROM customers WHERE id = $1",
        "DECLARE cur CURSOR FOR SELECT ssn FROM customers",
        "EXPLAIN SELECT ssn FROM customers",
        "EXPLAIN ANALYZE SELECT ssn FROM customers",
        "COPY customers TO STDOUT",
        "COPY customers (id, ssn) TO STDOUT",
        "COPY (SELECT ssn FROM customers) TO STDOUT",
        "UPDATE orders o SET status = c.ssn FROM customers c WHERE c.id = o.customer_id",
        "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id AND c.name = 'x' RETURNING c.ssn",
        "MERGE INTO orders o USING customers c ON o.customer_id = c.id WHEN MATCHED THEN UPDATE SET status = c.ssn",
        "SELECT upper_email FROM customers_v",
        "SELECT 1 FROM customers_v",
        "CREATE FUNCTION f() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT ssn FROM customers LIMIT 1; END",
    ] {
        check(APP, sql, "rewrite");
    }
}

#[test]
fn a_subquery_lists_the_columns_the_statement_names_unless_it_can_reach_others() {
    // Only names used anywhere in the statement (so no reference can bind elsewhere).
    let named = rewritten(APP, "SELECT name FROM customers WHERE id = 1");
    assert_eq!(
        named,
        "SELECT name FROM (SELECT customers.id, customers.name FROM public.customers AS customers) AS customers WHERE id = 1"
    );
    let none = rewritten(APP, "SELECT count(1) FROM customers");
    assert_eq!(none, "SELECT pg_catalog.count(1) FROM (SELECT  FROM public.customers AS customers) AS customers");
    // A name used in another scope still keeps the column (correlated references).
    let inner =
        rewritten(APP, "SELECT o.id FROM orders o WHERE EXISTS (SELECT 1 FROM customers WHERE name = o.status)");
    assert!(
        inner.contains("(SELECT customers.id, customers.name FROM public.customers AS customers) AS customers"),
        "{inner}"
    );
    // Positional reach lists every column.
    for sql in [
        "SELECT * FROM customers",
        "SELECT c.* FROM customers c",
        "SELECT c FROM customers c",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT (c).name FROM customers c",
        "SELECT x FROM customers AS c(x)",
        "SELECT id FROM customers NATURAL JOIN orders",
        "TABLE customers",
        "SELECT id FROM customers, orders o WHERE o.* IS NOT NULL",
    ] {
        let all = rewritten(APP, sql);
        assert!(all.contains("(SELECT customers.id, customers.name, "), "{sql}: {all}");
        assert!(all.contains(", customers.signup FROM "), "{sql}: {all}");
    }
}

#[test]
fn substitution_keeps_the_client_text_around_it() {
    let text = rewritten(APP, "SELECT notes /* c */ FROM customers WHERE id = $1");
    assert_eq!(
        text,
        "SELECT notes /* c */ FROM (SELECT customers.id, CAST(NULL AS pg_catalog.text) AS notes FROM public.customers AS customers) AS customers WHERE id = $1"
    );
    let only = rewritten(APP, "SELECT notes FROM ONLY customers c");
    assert!(only.starts_with("SELECT notes FROM (SELECT "), "{only}");
    assert!(only.ends_with("FROM ONLY public.customers AS customers) c"), "{only}");
    let table = rewritten(APP, "TABLE customers");
    assert!(table.starts_with("SELECT * FROM (SELECT customers.id, customers.name, "), "{table}");
    let copy = rewritten(APP, "COPY customers (id, notes) TO STDOUT");
    assert_eq!(
        copy,
        "COPY (SELECT customers.id, CAST(NULL AS pg_catalog.text) AS notes FROM ONLY public.customers AS customers) TO STDOUT"
    );
    let view = rewritten(APP, "SELECT upper_email FROM customers_v");
    assert!(view.contains("upper(email) AS upper_email FROM (SELECT customers.id,"), "{view}");
}

/// The checker fails on every reference to a DML target's masked column that pgveil did not
/// mask: raw in SET, RETURNING, a sublink, ON CONFLICT, a comparison without a grant or
/// with an unpinned operator, a mask over another column.
#[test]
fn the_checker_refuses_raw_references_to_a_write_target() {
    let session = policy().for_identity(&Identity::new(APP.iter().copied()));
    let catalog = crate::catalog::example();
    let refused = [
        "UPDATE public.customers SET notes = ssn WHERE id = 1",
        "UPDATE public.customers c SET notes = c.ssn || '' WHERE id = 1",
        "UPDATE public.customers SET name = 'x' WHERE id = 1 RETURNING ssn",
        "DELETE FROM public.customers WHERE ssn OPERATOR(pg_catalog.=) '1'",
        "DELETE FROM public.customers WHERE email = 'a@b.c'",
        "DELETE FROM public.customers WHERE email OPERATOR(pg_catalog.<) 'a@b.c'",
        "DELETE FROM public.customers WHERE NOT email OPERATOR(pg_catalog.=) 'a@b.c'",
        "UPDATE public.customers SET notes = (SELECT ssn) WHERE id = 1",
        "INSERT INTO public.customers AS c (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET notes = c.ssn",
    ];
    for sql in refused {
        let checked = verify_substituted(&session, &catalog, &path("app_user"), sql);
        assert!(checked.as_ref().is_err_and(|e| e.contains("outside its mask")), "{sql}: {checked:?}");
    }
    // A substitution's columns are qualified by its own range variable, so a column the
    // relation lost since the catalog was read cannot bind to the write target's.
    for sql in [
        "UPDATE public.orders SET status = (SELECT name FROM (SELECT id, name FROM public.customers) AS c WHERE c.id = 1)",
        "SELECT name FROM (SELECT customers.id, name FROM public.customers AS customers) AS customers",
        "SELECT name FROM (SELECT x.id, x.name FROM public.customers AS x) AS customers",
    ] {
        let checked = verify_substituted(&session, &catalog, &path("app_user"), sql);
        assert!(checked.as_ref().is_err_and(|e| e.contains("not qualified by its substitution")), "{sql}: {checked:?}");
    }
    // What pgveil writes for the same statements passes.
    for sql in [
        "UPDATE customers SET notes = ssn WHERE id = 1",
        "UPDATE customers c SET notes = c.ssn || '' WHERE id = 1 RETURNING ssn, email",
        "DELETE FROM customers WHERE email = 'a@b.c' RETURNING *",
        "DELETE FROM customers c WHERE c.email IN ('a@b.c', $1) AND id > 3",
        "UPDATE customers SET notes = (SELECT ssn) WHERE id = 1",
        "INSERT INTO customers AS c (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET notes = c.ssn",
    ] {
        let sent = rewritten(APP, sql);
        verify_substituted(&session, &catalog, &path("app_user"), &sent).unwrap_or_else(|e| panic!("{e}\n{sent}"));
    }
}

#[test]
fn dml_targets_see_masked_values_and_keep_their_assignments() {
    let up = rewritten(APP, "UPDATE customers SET notes = ssn, ssn = '1-2-3' WHERE id = 1 RETURNING id, ssn");
    assert!(up.starts_with("UPDATE public.customers SET notes = (CAST("), "{up}");
    assert!(up.contains(", ssn = '1-2-3' WHERE id = 1 RETURNING id, (CAST("), "{up}");
    let star = rewritten(APP, "UPDATE customers SET ssn = '1' WHERE id = 4 RETURNING *");
    assert!(star.contains("RETURNING customers.id, customers.name, CAST("), "{star}");
    check(APP, "INSERT INTO customers AS c (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET notes = c.ssn", "rewrite");
    // The raw comparison a grant allows, its operator pinned.
    let up = rewritten(APP, "UPDATE customers c SET name = 'x' WHERE c.email = 'a@b.c'");
    assert_eq!(up, "UPDATE public.customers c SET name = 'x' WHERE c.email OPERATOR(pg_catalog.=) 'a@b.c'");
    let up = rewritten(APP, "UPDATE customers c SET name = 'x' WHERE c.email IN ('a@b.c', $1)");
    assert!(
        up.ends_with("WHERE (c.email OPERATOR(pg_catalog.=) 'a@b.c' OR c.email OPERATOR(pg_catalog.=) $1)"),
        "{up}"
    );
    check(APP, "UPDATE customers SET name = 'x' WHERE id IN (SELECT id FROM customers WHERE name = 'y')", "rewrite");
    check(APP, "DELETE FROM customers WHERE ssn = 'x'", "block predicate");
    check(APP, "UPDATE customers SET name = 'x' RETURNING customers", "block whole_row");
    check(
        APP,
        "DELETE FROM customers WHERE EXISTS (SELECT 1 FROM generate_series(1, 2) g WHERE g::text = ssn)",
        "block unsupported",
    );
}

#[test]
fn predicates_follow_the_columns_grant() {
    for sql in [
        "SELECT id FROM customers WHERE ssn = '900-00-0001'",
        "SELECT id FROM customers WHERE ssn LIKE '9%'",
        "SELECT id FROM customers ORDER BY ssn",
        "SELECT ssn FROM customers ORDER BY 1",
        "SELECT ssn AS s FROM customers ORDER BY s",
        "SELECT id FROM customers GROUP BY card_number",
        "SELECT DISTINCT ssn FROM customers",
        "SELECT count(DISTINCT ssn) FROM customers",
        "SELECT id FROM customers c JOIN customers d USING (ssn)",
        "SELECT id FROM orders WHERE customer_id IN (SELECT id FROM customers WHERE ssn = 'x')",
        "SELECT id FROM customers WHERE EXISTS (SELECT 1 FROM orders o WHERE o.status = customers.ssn)",
        "SELECT count(*) FILTER (WHERE ssn > '5') FROM customers",
        "SELECT string_agg(name, ',' ORDER BY ssn) FROM customers",
        "SELECT rank() OVER (ORDER BY balance) FROM customers",
        "SELECT id FROM customers WHERE email LIKE 'canary%'",
        "SELECT id FROM customers WHERE lower(email) = 'x'",
    ] {
        check(APP, sql, "block predicate");
    }
    // `predicates: equality` on email: the conjunct moves into the substitution.
    let eq = rewritten(APP, "SELECT id, email FROM customers WHERE email = 'canary1@leak.test' AND id > 3");
    assert!(
        eq.contains(
            "FROM public.customers AS customers WHERE customers.email OPERATOR(pg_catalog.=) 'canary1@leak.test') AS customers WHERE TRUE AND id > 3"
        ),
        "{eq}"
    );
    let inl = rewritten(APP, "SELECT id FROM customers c WHERE c.email IN ($1, $2)");
    assert!(
        inl.contains(
            "WHERE (customers.email OPERATOR(pg_catalog.=) $1 OR customers.email OPERATOR(pg_catalog.=) $2)) c WHERE TRUE"
        ),
        "{inl}"
    );
    check(
        APP,
        "SELECT o.id FROM orders o LEFT JOIN customers c ON c.id = o.customer_id WHERE c.email = 'x'",
        "block predicate",
    );
}

#[test]
fn what_cannot_be_substituted_is_blocked() {
    for (sql, rule) in [
        ("DO $$ BEGIN PERFORM 1; END $$", "procedural"),
        ("SELECT query_to_xml('select ssn from customers', true, true, '')", "procedural"),
        ("SELECT table_to_xml('customers', true, true, '')", "function"),
        ("SELECT ts_stat('select 1')", "procedural"),
        ("CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$", "procedural"),
        ("CREATE FUNCTION f() RETURNS text LANGUAGE sql AS 'SELECT ssn FROM customers'", "procedural"),
        ("SELECT app.secret_fn(1)", "function"),
        ("SELECT my_udf(ssn) FROM customers", "function"),
        ("SELECT pgveil.hmac_hex('x', 'y')", "function"),
        ("SELECT * FROM pgveil.keys", "function"),
        ("SELECT most_common_vals FROM pg_stats", "catalog"),
        ("SET ROLE dba", "identity_change"),
        ("SET SESSION AUTHORIZATION dba", "identity_change"),
        ("SET standard_conforming_strings = off", "setting"),
        ("SET client_encoding = 'SJIS'", "setting"),
        ("SELECT set_config('standard_conforming_strings', 'off', false)", "setting"),
        ("SELECT set_config('role', 'dba', false)", "identity_change"),
        ("SELECT set_config($1, 'x', false)", "setting"),
        ("SET search_path = evil, pg_catalog", "setting"),
        ("ALTER TABLE customers ADD COLUMN x int", "protected_ddl"),
        ("ALTER TABLE customers RENAME COLUMN ssn TO s", "protected_ddl"),
        ("DROP TABLE customers", "protected_ddl"),
        ("CREATE TABLE kid () INHERITS (customers)", "protected_ddl"),
        ("CREATE TABLE part PARTITION OF customers FOR VALUES IN (1)", "protected_ddl"),
        ("ALTER TABLE orders INHERIT customers", "protected_ddl"),
        ("CREATE INDEX ON customers ((ssn::int))", "protected_ddl"),
        ("CREATE TRIGGER t BEFORE INSERT ON customers FOR EACH ROW EXECUTE FUNCTION f()", "protected_ddl"),
        ("CREATE RULE r AS ON SELECT TO customers DO INSTEAD SELECT 1", "protected_ddl"),
        ("CREATE POLICY p ON customers USING (true)", "protected_ddl"),
        ("ALTER TABLE orders ADD FOREIGN KEY (status) REFERENCES customers (ssn)", "protected_ddl"),
        ("WITH customers AS (SELECT 1 AS ssn) SELECT ssn FROM customers", "cte_shadow"),
        ("SELECT ssn FROM customers TABLESAMPLE SYSTEM (50)", "unsupported"),
        ("CREATE OPERATOR === (LEFTARG = text, RIGHTARG = text, FUNCTION = texteq)", "function"),
        ("SELEC 1", "syntax_error"),
    ] {
        check(APP, sql, &format!("block {rule}"));
    }
}

#[test]
fn ordinary_application_sql_runs() {
    for sql in [
        "CREATE TEMP TABLE t (a int)",
        "CREATE TABLE IF NOT EXISTS t2 (a int, b text)",
        "CREATE INDEX ON orders (status)",
        "CREATE TYPE mood AS ENUM ('a', 'b')",
        "CREATE COLLATION mycoll (provider = icu, locale = 'und')",
        "CREATE SCHEMA s",
        "DROP TABLE orders",
        "SELECT pg_notify('ch', 'x')",
        "SELECT pg_advisory_lock(1), pg_advisory_unlock(1)",
        "SELECT int4range(1, 5), numrange(1.0, 2.0), tstzrange(now(), now())",
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'orders'",
        "SELECT name FROM pg_cursors",
        "SELECT name FROM pg_prepared_statements",
        "SELECT gid FROM pg_prepared_xacts",
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        "SET DateStyle = 'German'",
        "SET IntervalStyle = postgres",
        "SET TimeZone = 'Europe/Paris'",
        "SET extra_float_digits = 3",
        "SET client_encoding = 'LATIN1'",
        "SET search_path = public",
        "RESET ALL",
        "DISCARD ALL",
        "SELECT set_config('jit', 'off', false)",
        "SELECT id FROM nowhere",
        "BEGIN; SAVEPOINT a; ROLLBACK TO a; COMMIT",
        "LISTEN ch; NOTIFY ch, 'x'; UNLISTEN ch",
        "SELECT relname FROM pg_class WHERE relname = 'customers'",
        "SELECT now(), 1 + 1, $1::int",
        "EXPLAIN SELECT id FROM orders",
        "COPY orders FROM STDIN",
        "COPY customers (id, name) TO STDOUT",
        "LOCK TABLE customers IN SHARE MODE",
        "TRUNCATE orders",
        "SELECT to_regtype('hstore'), current_setting('server_version_num')",
        "EXECUTE p(1)",
        "DEALLOCATE ALL",
    ] {
        let (verdict, _) = decide(APP, sql);
        assert!(verdict == "allow" || verdict == "rewrite", "{sql}: {verdict}");
    }
    check(&["dba"], "SELECT lower(ssn) FROM customers WHERE ssn = 'x'", "allow");
    check(
        &["billing_admin", "support"],
        "SELECT lower(ssn), lower(email) FROM customers WHERE ssn = 'x' AND email LIKE 'x%'",
        "rewrite",
    );
}

#[test]
fn syntax_errors_get_the_servers_code() {
    let session = policy().for_identity(&Identity::new(APP.iter().copied()));
    let catalog = crate::catalog::example();
    let a = Analyzer::new(&session, &catalog, "app_user").analyze("SELECT FROM WHERE");
    let b = a.block.unwrap();
    assert_eq!(b.sqlstate, "42601");
    assert!(b.reason.contains("syntax error"), "{}", b.reason);
}

#[test]
fn selects_rules() {
    check(ANALYST, "SELECT * FROM customers WHERE id = 1", "block no-bulk-customer-export");
    check(ANALYST, "SELECT id FROM (SELECT * FROM customers) s WHERE id = 1", "block no-bulk-customer-export");
    check(ANALYST, "SELECT * FROM names_v WHERE id = 2", "block no-bulk-customer-export");
    check(ANALYST, "SELECT id, name FROM customers", "block no-bulk-customer-export");
    check(ANALYST, "SELECT id, name FROM customers WHERE id > 10", "rewrite max_rows=1000");
    check(ANALYST, "SELECT id, name FROM customers LIMIT 5", "rewrite max_rows=1000");
    check(ANALYST, "SELECT count(*) FROM customers", "rewrite max_rows=1000");
    check(ANALYST, "SELECT id FROM orders", "allow");
    check(ANALYST, "COPY customers (id) TO STDOUT", "block no-bulk-customer-export");
}

#[test]
fn rewrites_apply_to_every_text_of_one_shape() {
    let session = policy().for_identity(&Identity::new(APP.iter().copied()));
    let catalog = crate::catalog::example();
    let a = Analyzer::new(&session, &catalog, "app_user").analyze("SELECT ssn FROM customers WHERE id = 1 -- one");
    let rw = a.rewrite.unwrap();
    let other = rw.apply("SELECT ssn FROM customers WHERE id = 22").unwrap();
    assert!(other.ends_with(") AS customers WHERE id = 22"), "{other}");
    assert_eq!(rw.apply("SELECT ssn FROM customers WHERE id = 1 AND true"), None, "another shape");
    let moved = Analyzer::new(&session, &catalog, "app_user").analyze("SELECT id FROM customers WHERE email = 'a@b.c'");
    let text = moved.rewrite.unwrap().apply("SELECT id FROM customers WHERE email = 'x@y.z'").unwrap();
    assert!(text.contains("WHERE customers.email OPERATOR(pg_catalog.=) 'x@y.z')"), "{text}");
}

#[test]
fn error_positions_map_back_to_the_client_text() {
    let session = policy().for_identity(&Identity::new(APP.iter().copied()));
    let catalog = crate::catalog::example();
    let sql = "SELECT notes, nope FROM customers WHERE id = 1";
    let a = Analyzer::new(&session, &catalog, "app_user").analyze(sql);
    let rewritten = a.rewritten.clone().unwrap();
    let rw = a.rewrite.unwrap();
    // `nope` is the 15th character in both texts; `id` after the substitution.
    assert_eq!(rw.map_position(sql, &rewritten, 15), Some(15));
    let id_new = rewritten.rfind("id = 1").unwrap() + 1;
    let id_old = sql.rfind("id = 1").unwrap() + 1;
    assert_eq!(rw.map_position(sql, &rewritten, id_new), Some(id_old));
    // Inside the substitution: the relation's own position.
    let inner = rewritten.find("CAST").unwrap() + 1;
    assert_eq!(rw.map_position(sql, &rewritten, inner), Some(sql.find("customers").unwrap() + 1));
}

#[test]
fn shape_keys_ignore_literals_only_where_they_cannot_matter() {
    use crate::sql::shape_key;
    let a = shape_key("SELECT abalance FROM pgbench_accounts WHERE aid = 42;").unwrap();
    assert_eq!(Some(a.clone()), shape_key("SELECT abalance FROM pgbench_accounts WHERE aid = 9001;"));
    assert_ne!(Some(a), shape_key("SELECT abalance FROM pgbench_accounts WHERE bid = 42;"));
    assert_ne!(shape_key("SELECT \"Ssn\" FROM t WHERE a = 'x'"), shape_key("SELECT ssn FROM t WHERE a = 'x'"));
    assert_eq!(shape_key("SELECT id FROM t ORDER BY 1"), None);
    assert_eq!(shape_key("SELECT id FROM t oRdEr By 1"), None);
    assert_eq!(shape_key("SELECT SET_CONFIG('jit', 'off', false)"), None);
    assert_eq!(shape_key("SELECT set_config('jit', 'off', false)"), None);
    // Quoted, the name is the same function: its literals still decide.
    assert_eq!(shape_key("SELECT \"set_config\"('standard_conforming_strings', 'off', false)"), None);
    assert_eq!(shape_key("SELECT U&\"set\\005fconfig\"('standard_conforming_strings', 'off', false)"), None);
    assert_eq!(shape_key("SELECT id FROM t LIMIT 5"), None);
    assert_eq!(shape_key("SELECT a FROM t WHERE b = 1 -- c"), shape_key("SELECT a FROM t WHERE b = 2"));
    assert_ne!(shape_key("SELECT a FROM t WHERE b = 'c'"), shape_key("SELECT a FROM t WHERE b = c"));
    let up = "UPDATE pgbench_accounts SET abalance = abalance + 17 WHERE aid = 3";
    assert_eq!(shape_key(up), shape_key("UPDATE pgbench_accounts SET abalance = abalance + 99 WHERE aid = 7"));
    assert!(shape_key("INSERT INTO h (tid, delta) VALUES (1, 2)").is_some());
    assert_eq!(shape_key("UPDATE t SET a = 1 WHERE id = 2; SET search_path = evil"), None);
    assert_eq!(shape_key("ALTER ROLE app SET search_path = 'evil'"), None);
    assert_eq!(shape_key("SELECT a INTO new_t FROM t"), None);
    assert_eq!(shape_key("UPDATE t SET a = 1 WHERE id = 2 RETURNING ssn"), None);
}

#[test]
fn the_hash_key_never_reaches_the_server() {
    let text = rewritten(&["support_lead"], "SELECT email FROM customers WHERE id = 1");
    let key = crate::HashKey::new(b"k");
    assert!(
        text.contains(&format!(
            "pgveil.hmac_hex(CAST(customers.email AS pg_catalog.text), CAST('{}' AS pg_catalog.text))",
            key.fingerprint()
        )),
        "{text}"
    );
    let (ipad, opad) = key.pads();
    assert!(!text.contains(&hex::encode(ipad)) && !text.contains(&hex::encode(opad)), "{text}");
}

#[test]
fn masked_outputs_keep_their_origin() {
    let session = policy().for_identity(&Identity::new(APP.iter().copied()));
    let catalog = crate::catalog::example();
    let origins = |sql: &str| Analyzer::new(&session, &catalog, "app_user").analyze(sql).statements[0].origins.clone();
    assert_eq!(origins("SELECT id, ssn AS s FROM customers WHERE id = 1"), vec![("s".to_owned(), 16_384, 4)]);
    assert_eq!(origins("SELECT upper(ssn) AS ssn FROM customers"), vec![], "an expression has no origin");
    let star = origins("SELECT * FROM customers c");
    assert!(star.contains(&("email".to_owned(), 16_384, 3)) && !star.iter().any(|(n, ..)| n == "id"), "{star:?}");
    assert_eq!(
        origins("SELECT a.ssn, b.ssn FROM customers a, customers_eu b"),
        vec![],
        "a name claimed by two relations is left alone"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, ..Default::default() })]
    /// Statements built from SQL fragments around the protected tables: the decision never
    /// panics, and whatever is allowed passes the substitution checker as the server would
    /// receive it (the rewrite applied to the same text gives the same text).
    #[test]
    fn every_allowed_statement_passes_the_checker(parts in proptest::collection::vec(0usize..FRAGMENTS.len(), 2..24)) {
        let sql: String = parts.iter().map(|&i| FRAGMENTS[i]).collect::<Vec<_>>().join(" ");
        let session = policy().for_identity(&Identity::new(APP.iter().copied()));
        let catalog = crate::catalog::example();
        let analysis = Analyzer::new(&session, &catalog, "app_user").analyze(&sql);
        if analysis.block.is_none() {
            let sent = analysis.rewritten.clone().unwrap_or_else(|| sql.clone());
            let checked = verify_substituted(&session, &catalog, &path("app_user"), &sent);
            proptest::prop_assert!(checked.is_ok(), "{:?}\nsql: {}\nsent: {}", checked, sql, sent);
            if let (Some(rw), Some(text)) = (&analysis.rewrite, &analysis.rewritten) {
                let again = rw.apply(&sql);
                proptest::prop_assert_eq!(again.as_ref(), Some(text));
                for p in [1, text.len() / 2, text.len()] {
                    let _ = rw.map_position(&sql, text, p.max(1));
                }
            }
        }
    }
}

const FRAGMENTS: &[&str] = &[
    "SELECT",
    "SELECT",
    "SELECT",
    "ssn",
    "email",
    "id",
    "name",
    "*",
    "c.*",
    "c.ssn",
    "c",
    "FROM",
    "FROM",
    "customers",
    "customers",
    "public.customers",
    "ONLY",
    "customers_v",
    "customers_eu",
    "orders",
    "o",
    "AS",
    "x",
    ",",
    "WHERE",
    "=",
    "'x'",
    "1",
    "$1",
    "(",
    ")",
    "(",
    ")",
    "JOIN",
    "ON",
    "USING (id)",
    "NATURAL JOIN",
    "LEFT JOIN",
    "UNION",
    "UNION ALL",
    "WITH w AS (SELECT * FROM customers)",
    "w",
    "LATERAL",
    "generate_series(1, 2) g",
    "ORDER BY",
    "GROUP BY",
    "LIMIT 1",
    "upper(ssn)",
    "count(*)",
    "TABLE customers",
    "INSERT INTO orders (status)",
    "UPDATE customers SET",
    "notes = ssn",
    "DELETE FROM customers",
    "RETURNING *",
    "RETURNING ssn",
    "COPY customers TO STDOUT",
    "EXPLAIN",
    "CREATE TABLE t AS",
    "EXISTS",
    "IN",
    "AND",
    "OR",
    "NOT",
    "CASE WHEN true THEN ssn END",
    "::text",
    ";",
];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, ..Default::default() })]
    /// As above, from statement templates, so that most cases parse: every allowed one passes
    /// the checker, and the rewritten text parses.
    #[test]
    fn templated_statements_pass_the_checker(
        cols in 0usize..COLS.len(), rel in 0usize..RELS.len(), rel2 in 0usize..RELS.len(),
        join in 0usize..JOINS.len(), tail in 0usize..TAILS.len(), wrap in 0usize..WRAPS.len(),
    ) {
        let inner = format!("SELECT {} FROM {} a {} {}", COLS[cols], RELS[rel], JOINS[join].replace("{r}", RELS[rel2]), TAILS[tail]);
        let sql = WRAPS[wrap].replace("{q}", &inner);
        let session = policy().for_identity(&Identity::new(APP.iter().copied()));
        let catalog = crate::catalog::example();
        let analysis = Analyzer::new(&session, &catalog, "app_user").analyze(&sql);
        let parses = pg_query::parse(&sql, pg_query::ParserOptions::DEFAULT).is_ok();
        proptest::prop_assert!(parses || analysis.block.as_ref().is_some_and(|b| b.sqlstate == "42601"), "{}", sql);
        if analysis.block.is_none() {
            let sent = analysis.rewritten.clone().unwrap_or_else(|| sql.clone());
            let checked = verify_substituted(&session, &catalog, &path("app_user"), &sent);
            proptest::prop_assert!(checked.is_ok(), "{:?}\nsql: {}\nsent: {}", checked, sql, sent);
        }
    }
}

const COLS: &[&str] = &[
    "*",
    "a.*",
    "a",
    "a.ssn",
    "ssn, email",
    "upper(a.email)",
    "count(*)",
    "a.id",
    "to_jsonb(a)",
    "b.*",
    "coalesce(a.notes, 'x')",
];
const RELS: &[&str] = &[
    "customers",
    "public.customers",
    "ONLY customers",
    "customers_v",
    "customers_eu",
    "orders",
    "names_v",
    "(SELECT * FROM customers)",
    "(TABLE customers)",
    "generate_series(1, 3)",
];
const JOINS: &[&str] = &[
    "",
    ", {r} b",
    "JOIN {r} b ON true",
    "NATURAL JOIN {r} b",
    "LEFT JOIN {r} b USING (id)",
    "CROSS JOIN LATERAL (SELECT a.id) b",
    "JOIN LATERAL (SELECT * FROM {r} x) b ON true",
];
const TAILS: &[&str] = &["", "WHERE a.id = 1", "WHERE a.email = 'x'", "LIMIT 2", "ORDER BY 1", "FOR UPDATE OF a"];
const WRAPS: &[&str] = &[
    "{q}",
    "WITH w AS ({q}) SELECT * FROM w",
    "SELECT * FROM ({q}) s",
    "CREATE TABLE t AS {q}",
    "COPY ({q}) TO STDOUT",
    "EXPLAIN {q}",
    "INSERT INTO orders (status) SELECT 'x' FROM ({q}) s",
    "DECLARE k CURSOR FOR {q}",
    "PREPARE p AS {q}",
    "{q} UNION ALL {q}",
];

/// Deeply nested statements (a long UNION chain, nested parentheses) on a session thread's
/// stack: refused or decided, never a stack overflow, never walked only in part.
#[test]
fn deep_statements_are_refused_not_half_walked() {
    let run = |sql: String| {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let session = policy().for_identity(&Identity::new(APP.iter().copied()));
                let catalog = crate::catalog::example();
                Analyzer::new(&session, &catalog, "app_user").analyze(&sql)
            })
            .unwrap()
            .join()
            .expect("no stack overflow")
    };
    for n in [300, 3000] {
        let unions = vec!["SELECT ssn FROM customers"; n].join(" UNION ALL ");
        let a = run(unions.clone());
        if a.block.is_none() {
            let text = a.rewritten.expect("read protected relations: rewritten");
            let session = policy().for_identity(&Identity::new(APP.iter().copied()));
            verify_substituted(&session, &crate::catalog::example(), &path("app_user"), &text).unwrap();
        }
        let parens = format!("SELECT {}ssn{} FROM customers", "(".repeat(n), ")".repeat(n));
        let a = run(parens);
        assert!(a.block.is_some() || a.rewritten.is_some(), "{n}: decided");
    }
}

/// `column how` lines of a statement's usage, as the audit log would list them.
fn usage(roles: &[&str], sql: &str) -> Vec<String> {
    let p = policy();
    let session = p.for_identity(&Identity::new(roles.iter().copied()));
    let all = p.universal();
    let catalog = crate::catalog::example();
    let analysis = Analyzer::new(&session, &catalog, roles[0]).with_usage(&all).analyze(sql);
    analysis.usage.iter().map(|u| format!("{} {}", u.column.trim_start_matches("public."), u.how.as_str())).collect()
}

#[test]
fn column_usage_says_how_each_protected_column_was_used() {
    let cases: &[(&[&str], &str, &[&str])] = &[
        (APP, "SELECT id, name FROM customers WHERE id = 1", &[]),
        (APP, "SELECT ssn FROM customers WHERE id = 1", &["customers.ssn masked"]),
        (&["billing_admin"], "SELECT ssn FROM customers WHERE id = 1", &["customers.ssn raw"]),
        (
            &["billing_admin"],
            "SELECT upper(c.ssn), c.email FROM customers c",
            &["customers.email masked", "customers.ssn raw"],
        ),
        (&["dba"], "SELECT ssn, email FROM public.customers", &["customers.email raw", "customers.ssn raw"]),
        (APP, "SELECT id FROM customers WHERE email = 'a@b.c'", &["customers.email predicate_raw"]),
        (
            APP,
            "SELECT email FROM customers WHERE email = $1",
            &["customers.email masked", "customers.email predicate_raw"],
        ),
        (&["support"], "SELECT id FROM customers WHERE email = 'a@b.c'", &["customers.email raw"]),
        (APP, "SELECT count(*) FROM customers", &[]),
        (APP, "SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id", &[]),
        (
            &["billing_admin"],
            "SELECT * FROM customers WHERE id = 1",
            &[
                "customers.balance masked",
                "customers.birth_date masked",
                "customers.card_number masked",
                "customers.email masked",
                "customers.notes masked",
                "customers.phone masked",
                "customers.ssn raw",
            ],
        ),
        (
            &["billing_admin"],
            "SELECT c FROM customers c WHERE id = 1",
            &[
                "customers.balance masked",
                "customers.birth_date masked",
                "customers.card_number masked",
                "customers.email masked",
                "customers.notes masked",
                "customers.phone masked",
                "customers.ssn raw",
            ],
        ),
        (&["billing_admin"], "SELECT id, ssn FROM customers_v", &["customers.email masked", "customers.ssn raw"]),
        (&["billing_admin"], "SELECT ssn FROM customers_eu WHERE id = 2", &["customers_eu.ssn raw"]),
        (&["billing_admin"], "COPY customers (id, ssn) TO STDOUT", &["customers.ssn raw"]),
        (&["billing_admin"], "COPY customers (id, name) TO STDOUT", &[]),
        (&["billing_admin"], "WITH x AS (SELECT ssn FROM customers) SELECT * FROM x", &["customers.ssn raw"]),
        (&["billing_admin"], "UPDATE customers SET name = 'x' WHERE ssn = '1' RETURNING id", &["customers.ssn raw"]),
        (&["billing_admin"], "INSERT INTO customers (id, ssn) VALUES (1, '2')", &[]),
        (&["billing_admin"], "SELECT ssn FROM orders", &[]),
    ];
    for (roles, sql, want) in cases {
        assert_eq!(usage(roles, sql), *want, "\nroles: {roles:?}\nsql: {sql}");
    }
}

#[test]
fn raw_reads_carry_their_normalized_statement() {
    let p = policy();
    let session = p.for_identity(&Identity::new(["billing_admin"]));
    let all = p.universal();
    let catalog = crate::catalog::example();
    let a = Analyzer::new(&session, &catalog, "billing_admin")
        .with_usage(&all)
        .analyze("SELECT 1; SELECT ssn FROM customers WHERE id = 42");
    assert!(a.statements[0].normalized.is_none());
    let (text, fp) = &**a.statements[1].normalized.as_ref().unwrap();
    assert_eq!(text, "SELECT ssn FROM customers WHERE id = $1");
    assert_eq!(fp.len(), 16);
}

#[test]
fn names_a_statement_creates_are_not_unknown_relations() {
    let p = policy();
    let session = p.for_identity(&Identity::new(APP.iter().copied()));
    let catalog = crate::catalog::example();
    let unknown = |sql: &str| Analyzer::new(&session, &catalog, "app_user").analyze(sql).unknown_relation;
    for sql in [
        "CREATE TABLE brand_new (id int)",
        "CREATE TABLE IF NOT EXISTS public.brand_new (LIKE orders)",
        "CREATE TABLE brand_new AS SELECT id FROM orders",
        "SELECT id INTO brand_new FROM orders",
        "CREATE VIEW brand_new_v AS SELECT id FROM orders",
        "CREATE MATERIALIZED VIEW brand_new_m AS SELECT id FROM orders",
        "CREATE SEQUENCE brand_new_seq",
    ] {
        assert!(!unknown(sql), "{sql}: the created name needs no reload");
    }
    for sql in
        ["SELECT * FROM brand_new", "CREATE TABLE t2 AS SELECT id FROM not_there", "INSERT INTO brand_new VALUES (1)"]
    {
        assert!(unknown(sql), "{sql}: an unknown relation is read or written");
    }
}

#[test]
fn a_renamed_column_keeps_its_rule_by_attnum() {
    let p = policy();
    let session = p.for_identity(&Identity::new(APP.iter().copied()));
    let mut rels: Vec<crate::catalog::Relation> =
        crate::catalog::example().relations().map(|r| (**r).clone()).collect();
    let customers = rels.iter_mut().find(|r| r.name.table == "customers").unwrap();
    let ssn = customers.columns.iter_mut().find(|c| c.name == "ssn").unwrap();
    ssn.name = "national_id".to_owned();
    ssn.bound_name = Some("ssn".to_owned());
    let catalog = crate::catalog::Catalog::new(rels);
    let a =
        Analyzer::new(&session, &catalog, "app_user").analyze("SELECT name, national_id FROM customers WHERE id = 1");
    let text = a.rewritten.unwrap();
    assert!(
        text.contains("AS national_id")
            && text.contains("pg_catalog.right(CAST(customers.national_id AS pg_catalog.text), 4)"),
        "{text}"
    );
    assert!(text.contains("(SELECT customers.id, customers.name, "), "not whole-table redaction: {text}");
}

/// Shapes with rewrites, literals at `@` (one moved into the substitution by the equality
/// predicate), for the template path below.
const REWRITTEN_SHAPES: &[&str] = &[
    "SELECT ssn FROM customers WHERE id = @ -- one",
    "SELECT id FROM customers WHERE email = @",
    "SELECT id, ssn FROM customers WHERE id IN (@, @) AND name = @",
    "SELECT c.id, o.id FROM customers c JOIN orders o ON o.customer_id = c.id WHERE c.id = @ AND o.id > @",
    "UPDATE customers SET name = @ WHERE id = @",
];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
    /// A text matching a remembered text of its shape is sent exactly as the long way (scan,
    /// then the shape's rewrite applied to its tokens) would send it.
    #[test]
    fn a_template_sends_what_the_rewrite_would(
        shape in proptest::sample::select(REWRITTEN_SHAPES),
        quoted in proptest::bool::ANY,
        values in proptest::collection::vec("[0-9]{1,12}|'([^'\\\\\u{0}]|''){0,8}'", 1..4),
    ) {
        let session = policy().for_identity(&Identity::new(APP.iter().copied()));
        let catalog = crate::catalog::example();
        let seed = if quoted { "'a@b.c'" } else { "1" };
        let first = crate::sql::shape::tests::fill(shape, &[seed.to_owned()]);
        let analysis = Analyzer::new(&session, &catalog, "app_user").analyze(&first);
        let Some(rw) = analysis.rewrite else { return Ok(()) };
        let scanned = crate::sql::Scanned::new(&first).unwrap();
        let template = crate::sql::Template::new(&first, &scanned, Some(&rw)).unwrap();
        let values: Vec<String> = values.into_iter().map(|v| match (quoted, v.starts_with('\'')) {
            (false, true) => "7".to_owned(),
            (true, false) => format!("'{v}'"),
            _ => v,
        }).collect();
        let sql = crate::sql::shape::tests::fill(shape, &values);
        let long_way = rw.apply(&sql).map(crate::sql::Matched::Rewritten);
        proptest::prop_assert!(long_way.is_some(), "{}", sql);
        proptest::prop_assert_eq!(template.apply(&sql), long_way, "{}", sql);
    }
}
