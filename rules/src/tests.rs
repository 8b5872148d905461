//! Data-driven tests of statement analysis against the spec example's rules.

use std::sync::Arc;

use crate::policy::Identity;
use crate::sql::Analyzer;
use crate::{CompileOptions, compile};

#[track_caller]
fn check(roles: &[&str], sql: &str, expected: &str) {
    let policy = Arc::new(
        compile(include_str!("../testdata/valid/spec-example.yaml"), &CompileOptions { hash_key: Some(b"k".to_vec()) })
            .unwrap(),
    );
    let session = policy.for_identity(&Identity::new(roles.iter().copied()));
    let catalog = crate::catalog::example();
    let analysis = Analyzer::new(&session, &catalog, roles[0]).analyze(sql);
    let actual = match (&analysis.block, analysis.flagged.first()) {
        (Some(b), _) => format!("block {}", b.rule),
        (None, Some(f)) => format!("flag {}", f.rule),
        (None, None) => {
            let masks: Vec<String> = analysis
                .statements
                .iter()
                .flat_map(|s| {
                    s.outputs
                        .iter()
                        .map(|m| m.as_ref().map_or_else(|| "-".to_owned(), |m| crate::mask::mask_name(m).to_owned()))
                })
                .collect();
            let limit = analysis
                .statements
                .iter()
                .find_map(|s| s.max_rows.as_ref())
                .map(|l| format!(" max_rows={}", l.rows))
                .unwrap_or_default();
            if masks.is_empty() { format!("allow{limit}") } else { format!("allow [{}]{limit}", masks.join(" ")) }
        }
    };
    assert_eq!(actual, expected, "\nroles: {roles:?}\nsql:   {sql}\nblock: {:?}", analysis.block);
}

const APP: &[&str] = &["app_user"];
const ANALYST: &[&str] = &["analyst"];

#[test]
fn plain_columns_rely_on_row_description() {
    check(APP, "SELECT id, name, ssn, email FROM customers WHERE id = 1", "allow [- - partial email]");
    check(APP, "SELECT c.ssn AS x FROM public.customers c WHERE c.id < 10", "allow [partial]");
    check(APP, "SELECT s FROM (SELECT ssn AS s FROM customers) t", "allow [partial]");
    check(APP, "WITH w AS (SELECT ssn FROM customers) SELECT ssn FROM w", "allow [partial]");
    check(APP, "SELECT * FROM customers", "allow [- - email partial redact partial generalize round nullify -]");
    check(APP, "SELECT ssn FROM customers_eu", "allow [partial]");
}

#[test]
fn derived_columns_get_the_mask_or_are_blocked() {
    check(APP, "SELECT ssn::text FROM customers", "allow [partial]");
    check(APP, "SELECT id, ssn COLLATE \"C\" FROM customers", "allow [- partial]");
    check(APP, "SELECT (SELECT ssn FROM customers LIMIT 1)", "allow [partial]");
    check(APP, "SELECT ssn FROM customers UNION ALL SELECT ssn FROM customers", "allow [partial]");
    check(APP, "SELECT lower(ssn) FROM customers", "block derived_column");
    check(APP, "SELECT ssn || '' FROM customers", "block derived_column");
    check(APP, "SELECT max(ssn) FROM customers", "block derived_column");
    check(APP, "SELECT CASE WHEN true THEN ssn END FROM customers", "block derived_column");
    check(APP, "SELECT lag(ssn) OVER () FROM customers", "block derived_column");
    check(APP, "SELECT x FROM (SELECT lower(ssn) x FROM customers) s", "block derived_column");
    check(APP, "SELECT upper_email FROM customers_v", "block derived_column");
    check(APP, "SELECT id, ssn FROM customers_v", "allow [- partial]");
    check(APP, "SELECT count(*) FROM (SELECT lower(ssn) x FROM customers) s", "allow");
}

#[test]
fn predicates_on_masked_columns_are_blocked() {
    check(APP, "SELECT id FROM customers WHERE ssn = '900-00-0001'", "block predicate");
    check(APP, "SELECT id FROM customers WHERE ssn LIKE '9%'", "block predicate");
    check(APP, "SELECT id FROM customers ORDER BY ssn", "block predicate");
    check(APP, "SELECT ssn FROM customers ORDER BY 1", "block predicate");
    check(APP, "SELECT id FROM customers GROUP BY card_number", "block predicate");
    check(APP, "SELECT DISTINCT ssn FROM customers", "block predicate");
    check(APP, "SELECT id FROM customers c JOIN customers d USING (ssn)", "block predicate");
    check(
        APP,
        "SELECT id FROM orders WHERE customer_id IN (SELECT id FROM customers WHERE ssn = 'x')",
        "block predicate",
    );
    check(APP, "SELECT id FROM orders WHERE 'x' IN (SELECT ssn FROM customers)", "block predicate");
    check(
        APP,
        "SELECT id FROM customers WHERE EXISTS (SELECT 1 FROM customers d WHERE d.ssn = customers.ssn)",
        "block predicate",
    );
    check(APP, "SELECT ssn FROM customers INTERSECT SELECT '900-00-0001'", "block predicate");
    check(APP, "SELECT count(*) FILTER (WHERE ssn > '5') FROM customers", "block predicate");
    // predicates: equality on email.
    check(APP, "SELECT id FROM customers WHERE email = 'canary1@leak.test'", "allow");
    check(APP, "SELECT id FROM customers WHERE email IN ('a@b.c', 'd@e.f') AND id > 3", "allow");
    check(APP, "SELECT id FROM customers WHERE email LIKE 'canary%'", "block predicate");
    check(APP, "SELECT id FROM customers WHERE lower(email) = 'x'", "block predicate");
    check(APP, "SELECT id FROM customers WHERE email = name", "block predicate");
}

#[test]
fn whole_rows_and_leaky_statements_are_blocked() {
    check(APP, "SELECT c FROM customers c", "block whole_row");
    check(APP, "SELECT row_to_json(c) FROM customers c", "block function");
    check(APP, "SELECT to_json(c.*) FROM customers c", "block whole_row");
    check(APP, "SELECT (c).ssn FROM customers c", "allow [partial]");
    check(APP, "COPY customers TO STDOUT", "block copy_out");
    check(APP, "COPY (SELECT ssn FROM customers) TO STDOUT", "block copy_out");
    check(APP, "COPY orders TO STDOUT", "allow");
    check(APP, "COPY customers (id, name) TO STDOUT", "allow");
    check(APP, "CREATE TABLE x AS SELECT ssn FROM customers", "block ddl_copy");
    check(APP, "SELECT ssn INTO x FROM customers", "block ddl_copy");
    check(APP, "INSERT INTO orders (status) SELECT ssn FROM customers", "block write_source");
    check(APP, "UPDATE customers SET name = ssn WHERE id = 1", "block write_source");
    check(APP, "DO $$ BEGIN PERFORM 1; END $$", "block procedural");
    check(APP, "SELECT query_to_xml('select ssn from customers', true, true, '')", "block function");
    check(APP, "SELECT most_common_vals FROM pg_stats", "block catalog");
    check(APP, "SET ROLE dba", "block identity_change");
    check(APP, "SET standard_conforming_strings = off", "block setting");
    check(APP, "EXPLAIN ANALYZE SELECT id FROM customers WHERE id = 1", "block explain_analyze");
    check(APP, "SELECT id FROM nowhere", "block unknown_relation");
    check(APP, "SELEC 1", "block unanalysable");
    check(APP, "SELECT id FROM customers; SELECT lower(ssn) FROM customers", "block derived_column");
}

#[test]
fn ordinary_statements_are_allowed() {
    check(
        APP,
        "SELECT o.id, o.amount, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.status = 'open'",
        "allow",
    );
    check(
        APP,
        "SELECT status, count(*), sum(amount) FROM orders GROUP BY status HAVING count(*) > 1 ORDER BY 2 DESC",
        "allow",
    );
    check(
        APP,
        "INSERT INTO customers (name, email, ssn) VALUES ('n', 'e@x.y', '1-2-3') RETURNING id, ssn",
        "allow [- partial]",
    );
    check(
        APP,
        "UPDATE customers SET ssn = '1-2-3', name = upper(name) WHERE id = 4 RETURNING *",
        "allow [- - email partial redact partial generalize round nullify -]",
    );
    check(APP, "DELETE FROM orders WHERE id = 1", "allow");
    check(APP, "BEGIN; SAVEPOINT a; ROLLBACK TO a; COMMIT", "allow");
    check(APP, "SET application_name = 'x'; SET search_path = public; SHOW search_path", "allow");
    check(APP, "LISTEN ch; NOTIFY ch, 'x'; UNLISTEN ch", "allow");
    check(APP, "SELECT relname FROM pg_class WHERE relname = 'customers'", "allow");
    check(APP, "SELECT now(), 1 + 1, $1::int", "allow");
    check(APP, "SELECT id, name FROM names_v WHERE name LIKE 'C%'", "allow");
    check(APP, "EXPLAIN SELECT ssn FROM customers WHERE ssn = 'x'", "allow");
    check(APP, "COPY orders FROM STDIN", "allow");
    check(&["dba"], "SELECT lower(ssn) FROM customers WHERE ssn = 'x'", "allow");
    check(
        &["billing_admin", "support"],
        "SELECT lower(ssn), lower(email) FROM customers WHERE ssn = 'x' AND email LIKE 'x%'",
        "allow",
    );
}

#[test]
fn selects_rules() {
    check(ANALYST, "SELECT * FROM customers WHERE id = 1", "block no-bulk-customer-export");
    check(ANALYST, "SELECT id FROM (SELECT * FROM customers) s WHERE id = 1", "block no-bulk-customer-export");
    check(ANALYST, "SELECT * FROM names_v WHERE id = 2", "block no-bulk-customer-export");
    check(ANALYST, "SELECT id, name FROM customers", "block no-bulk-customer-export");
    check(ANALYST, "SELECT id, name FROM customers WHERE id > 10", "allow max_rows=1000");
    check(ANALYST, "SELECT id, name FROM customers LIMIT 5", "allow max_rows=1000");
    check(ANALYST, "SELECT count(*) FROM customers", "allow max_rows=1000");
    check(ANALYST, "SELECT id FROM orders", "allow");
    check(APP, "SELECT * FROM customers", "allow [- - email partial redact partial generalize round nullify -]");
}

#[test]
fn driver_introspection_is_allowed_but_not_settings_games() {
    check(APP, "SELECT set_config('jit', 'off', false)", "allow");
    check(APP, "SELECT set_config('standard_conforming_strings', 'off', false)", "block function");
    check(APP, "SELECT set_config('role', 'dba', false)", "block function");
    check(APP, "SELECT to_regtype('hstore'), current_setting('server_version_num')", "allow");
    check(APP, "DECLARE c CURSOR FOR SELECT id, ssn FROM customers", "allow");
    check(APP, "DECLARE c CURSOR FOR SELECT ssn::text FROM customers", "block cursor");
    check(APP, "DECLARE c CURSOR FOR SELECT ssn FROM customers_v", "block cursor");
}

#[test]
fn shape_keys_ignore_literals_only_where_they_cannot_matter() {
    use crate::sql::shape_key;
    let a = shape_key("SELECT abalance FROM pgbench_accounts WHERE aid = 42;").unwrap();
    assert_eq!(Some(a.clone()), shape_key("SELECT abalance FROM pgbench_accounts WHERE aid = 9001;"));
    assert_ne!(Some(a), shape_key("SELECT abalance FROM pgbench_accounts WHERE bid = 42;"));
    assert_ne!(shape_key("SELECT \"Ssn\" FROM t WHERE a = 'x'"), shape_key("SELECT ssn FROM t WHERE a = 'x'"));
    assert_eq!(shape_key("SELECT id FROM t ORDER BY 1"), None);
    assert_eq!(shape_key("SELECT set_config('jit', 'off', false)"), None);
    assert_eq!(shape_key("SELECT id FROM t LIMIT 5"), None);
    // Comments do not change the key; a literal never merges with an identifier.
    assert_eq!(shape_key("SELECT a FROM t WHERE b = 1 -- c"), shape_key("SELECT a FROM t WHERE b = 2"));
    assert_ne!(shape_key("SELECT a FROM t WHERE b = 'c'"), shape_key("SELECT a FROM t WHERE b = c"));
    // Writes: assigned values are literals like any other (pgbench's tpcb-like statements)...
    let up = "UPDATE pgbench_accounts SET abalance = abalance + 17 WHERE aid = 3";
    assert_eq!(shape_key(up), shape_key("UPDATE pgbench_accounts SET abalance = abalance + 99 WHERE aid = 7"));
    assert!(shape_key("INSERT INTO h (tid, delta) VALUES (1, 2)").is_some());
    // ...but SET stays sensitive outside an UPDATE, also after one in the same text,
    assert_eq!(shape_key("UPDATE t SET a = 1 WHERE id = 2; SET search_path = evil"), None);
    assert_eq!(shape_key("ALTER ROLE app SET search_path = 'evil'"), None);
    assert_eq!(shape_key("SELECT a INTO new_t FROM t"), None);
    // ...and RETURNING still is.
    assert_eq!(shape_key("UPDATE t SET a = 1 WHERE id = 2 RETURNING ssn"), None);
    // The analysis of a write does not depend on its values.
    for (a, b) in [
        ("UPDATE customers SET notes = 'x' WHERE id = 1", "UPDATE customers SET notes = 'y' WHERE id = 2"),
        ("UPDATE customers SET notes = ssn WHERE id = 1", "UPDATE customers SET notes = ssn WHERE id = 9"),
        (
            "INSERT INTO orders (customer_id, amount) VALUES (1, 2)",
            "INSERT INTO orders (customer_id, amount) VALUES (3, 4)",
        ),
    ] {
        assert_eq!(shape_key(a), shape_key(b));
        let verdict = |sql| {
            let policy = Arc::new(
                compile(
                    include_str!("../testdata/valid/spec-example.yaml"),
                    &CompileOptions { hash_key: Some(b"k".to_vec()) },
                )
                .unwrap(),
            );
            let session = policy.for_identity(&Identity::new(APP.iter().copied()));
            let analysis = Analyzer::new(&session, &crate::catalog::example(), APP[0]).analyze(sql);
            analysis.block.map(|b| b.rule)
        };
        assert_eq!(verdict(a), verdict(b), "{a}");
    }
}
