//! Names bind as pgveil resolved them (threat model I12): the text the server receives pins
//! every relation to its schema and every capturable column to its range variable, and CTE
//! names shadow only inside their own query level.

use crate::catalog::{Catalog, Relation};
use crate::names::TableName;
use crate::policy::Identity;
use crate::sql::{Analysis, Analyzer, verify_substituted};

fn relation(oid: u32, schema: &str, name: &str, cols: &[&str]) -> Relation {
    Relation::text_table(oid, TableName::new(schema, name), cols.iter().map(|c| (*c).to_owned()))
}

/// The spec example's catalog, with an unprotected `scratch.customers` shadow and a
/// `public.other` that has a column named like a protected one.
fn catalog() -> Catalog {
    let mut rels: Vec<Relation> = crate::catalog::example().relations().map(|r| (**r).clone()).collect();
    rels.push(relation(20_001, "scratch", "customers", &["id", "ssn", "email"]));
    rels.push(relation(20_002, "public", "other", &["id", "ssn", "x"]));
    Catalog::new(rels)
}

fn analyze(path: &[&str], temp: &[&str], sql: &str) -> Analysis {
    let session = super::tests::policy().for_identity(&Identity::new(["app_user"]));
    let catalog = catalog();
    let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
    let a = Analyzer::new(&session, &catalog, "app_user")
        .with_search_path(path.clone())
        .with_temp_relations(temp.iter().map(|s| (*s).to_owned()).collect())
        .analyze(sql);
    if a.block.is_none() {
        let sent = a.rewritten.as_deref().unwrap_or(sql);
        verify_substituted(&session, &catalog, &path, sent).unwrap_or_else(|e| panic!("{e}\nsql: {sql}\nsent: {sent}"));
    }
    a
}

#[track_caller]
fn sent(path: &[&str], sql: &str) -> String {
    let a = analyze(path, &[], sql);
    assert!(a.block.is_none(), "{sql}: blocked {:?}", a.block);
    a.rewritten.unwrap_or_else(|| sql.to_owned())
}

#[track_caller]
fn blocked(sql: &str) -> String {
    analyze(&["public"], &[], sql).block.unwrap_or_else(|| panic!("{sql}: not blocked")).rule
}

const PUBLIC: &[&str] = &["app_user", "public"];

#[test]
fn every_relation_is_pinned_to_the_schema_pgveil_resolved() {
    assert_eq!(sent(PUBLIC, "SELECT id FROM orders WHERE id = 1"), "SELECT id FROM public.orders WHERE id = 1");
    assert_eq!(
        sent(PUBLIC, "SELECT o.id FROM orders o JOIN other ON other.id = o.id"),
        "SELECT o.id FROM public.orders o JOIN public.other ON other.id = o.id"
    );
    assert_eq!(
        sent(PUBLIC, "UPDATE orders SET status = 'x' WHERE id = 1"),
        "UPDATE public.orders SET status = 'x' WHERE id = 1"
    );
    assert_eq!(sent(PUBLIC, "TABLE ONLY orders"), "TABLE ONLY public.orders");
    assert_eq!(sent(PUBLIC, "LOCK TABLE orders"), "LOCK TABLE public.orders");
    assert_eq!(sent(PUBLIC, "SELECT relname FROM pg_class"), "SELECT relname FROM pg_catalog.pg_class");
    // A name pgveil does not know is the server's to answer (42P01 for a name nobody has).
    assert_eq!(sent(PUBLIC, "SELECT 1 FROM nowhere"), "SELECT 1 FROM nowhere");
    // What a statement creates is named as written.
    assert_eq!(
        sent(PUBLIC, "CREATE TABLE copy AS SELECT id FROM orders"),
        "CREATE TABLE copy AS SELECT id FROM public.orders"
    );
}

#[test]
fn a_shadow_on_the_search_path_is_read_as_resolved_and_pinned() {
    // scratch.customers comes first: pgveil reads it (unprotected) and says so in the text,
    // so the server reads that relation or, if it is gone (renamed or dropped in an open
    // transaction pgveil cannot see), fails: never public.customers raw.
    let text = sent(&["scratch", "public"], "SELECT ssn || '' FROM customers");
    assert_eq!(text, "SELECT ssn || '' FROM scratch.customers");
    let text = sent(PUBLIC, "SELECT ssn || '' FROM customers");
    assert!(text.contains("FROM public.customers AS customers) AS customers"), "{text}");
}

#[test]
fn temporary_relations_are_pinned_to_pg_temp() {
    let a = analyze(PUBLIC, &["customers"], "SELECT ssn FROM customers");
    assert_eq!(a.rewritten.as_deref(), Some("SELECT ssn FROM pg_temp.customers"));
    let a = analyze(PUBLIC, &["customers"], "SELECT ssn FROM public.customers");
    assert!(
        a.rewritten.as_deref().is_some_and(|t| t.contains("FROM public.customers AS customers) AS customers")),
        "{a:?}"
    );
}

#[test]
fn cte_names_shadow_only_inside_their_query_level() {
    // A CTE named pg_stats in a subquery does not make the outer pg_stats a CTE.
    assert_eq!(
        blocked("SELECT (WITH pg_stats AS (SELECT 1 AS x) SELECT x FROM pg_stats), attname FROM pg_stats"),
        "catalog"
    );
    assert_eq!(blocked("SELECT attname FROM pg_stats WHERE EXISTS (WITH pg_stats AS (SELECT 1) SELECT 1)"), "catalog");
    // A non-recursive CTE does not see itself: its own pg_stats is the catalog's.
    assert_eq!(blocked("WITH pg_stats AS (SELECT attname FROM pg_stats) SELECT attname FROM pg_stats"), "catalog");
    // Where the CTE is in scope, it is the CTE.
    let text = sent(PUBLIC, "WITH pg_stats AS (SELECT 1 AS attname) SELECT attname FROM pg_stats");
    assert_eq!(text, "WITH pg_stats AS (SELECT 1 AS attname) SELECT attname FROM pg_stats");
    let text = sent(PUBLIC, "WITH a AS (SELECT 1 AS v), b AS (SELECT v FROM a) SELECT v FROM b");
    assert_eq!(text, "WITH a AS (SELECT 1 AS v), b AS (SELECT v FROM a) SELECT v FROM b");
    let text =
        sent(PUBLIC, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT n FROM r");
    assert!(text.ends_with("SELECT n FROM r"), "{text}");
    // The WITH of an INSERT is visible to its source query.
    let text = sent(PUBLIC, "WITH src AS (SELECT 1 AS id) INSERT INTO orders (id) SELECT id FROM src");
    assert_eq!(text, "WITH src AS (SELECT 1 AS id) INSERT INTO public.orders (id) SELECT id FROM src");
}

#[test]
fn a_column_the_target_could_capture_is_qualified_by_its_range_variable() {
    // pgveil binds ssn to other.ssn; if other lost its ssn, the server would bind the name to
    // the target's raw column: the text says other.ssn.
    let text = sent(PUBLIC, "UPDATE customers SET notes = (SELECT ssn FROM other WHERE other.id = 1) WHERE id = 2");
    assert!(text.contains("(SELECT other.ssn FROM public.other WHERE other.id = 1)"), "{text}");
    let text = sent(PUBLIC, "DELETE FROM customers WHERE id IN (SELECT id FROM other WHERE ssn = 'x')");
    assert!(text.contains("WHERE other.ssn = 'x'"), "{text}");
    // Names the target has no masked column of stay as written.
    let text = sent(PUBLIC, "UPDATE customers SET notes = (SELECT x FROM other WHERE other.id = 1) WHERE id = 2");
    assert!(text.contains("(SELECT x FROM public.other"), "{text}");
}

#[test]
fn an_alias_column_list_hides_the_names_it_renames() {
    // k(a, b, c, d) renames id, name, email, ssn: ssn inside the sublink is the target's.
    let text = sent(
        PUBLIC,
        "UPDATE customers SET notes = (SELECT ssn FROM customers AS k(a, b, c, d) WHERE k.a = 1) WHERE id = 2",
    );
    assert!(text.contains("CAST(customers.ssn AS pg_catalog.text)"), "the target's ssn is masked: {text}");
    let text = sent(PUBLIC, "UPDATE customers SET notes = (SELECT d FROM other AS k(d) WHERE k.d = '1') WHERE id = 2");
    assert!(text.contains("(SELECT d FROM public.other AS k(d)"), "{text}");
}

#[test]
fn whole_row_references_to_the_target_are_refused_outside_returning() {
    assert_eq!(blocked("UPDATE customers x SET notes = row_to_json(x.*)::text WHERE id = 1"), "whole_row");
    assert_eq!(
        blocked("UPDATE customers x SET notes = (SELECT row_to_json(x.*) FROM orders LIMIT 1)::text"),
        "whole_row"
    );
    assert_eq!(blocked("UPDATE customers SET notes = (SELECT customers.*::text FROM orders LIMIT 1)"), "whole_row");
    assert_eq!(blocked("UPDATE customers x SET notes = x::text WHERE id = 1"), "whole_row");
    // Another relation's row is not the target's.
    let text =
        sent(PUBLIC, "UPDATE customers SET notes = (SELECT row_to_json(o.*)::text FROM orders o LIMIT 1) WHERE id = 1");
    assert!(text.contains("FROM public.orders o"), "{text}");
}

#[test]
fn each_statement_of_a_text_is_decided_against_the_state_the_ones_before_it_leave() {
    let text = sent(PUBLIC, "SET search_path = scratch, public; SELECT ssn || '' FROM customers");
    assert_eq!(text, "SET search_path = scratch, public; SELECT ssn || '' FROM scratch.customers");
    let text = sent(&["scratch", "public"], "BEGIN; SET LOCAL search_path = public; SELECT ssn FROM customers; COMMIT");
    assert!(text.contains("FROM public.customers AS customers) AS customers; COMMIT"), "{text}");
    let text = sent(PUBLIC, "SELECT pg_catalog.set_config('search_path', '', false)");
    assert_eq!(text, "SELECT pg_catalog.set_config('search_path', '', false)");
    let text = sent(PUBLIC, "SELECT set_config('search_path', 'scratch, public', false); SELECT ssn FROM customers");
    assert!(text.ends_with("SELECT ssn FROM scratch.customers"), "{text}");
    let a = analyze(PUBLIC, &[], "SELECT set_config('search_path', 'scratch, public', false)");
    use crate::sql::session::Change;
    let path = Some(vec!["scratch".to_owned(), "public".to_owned()]);
    assert_eq!(a.statements[0].session, [Change::SearchPath { path, local: false }]);
    assert_eq!(
        analyze(PUBLIC, &[], "ROLLBACK TO SAVEPOINT a").statements[0].session,
        [Change::RollbackTo("a".to_owned())]
    );
}

#[test]
fn search_path_changes_that_cannot_be_followed_or_pin_catalog_late_are_refused() {
    assert_eq!(blocked("SELECT set_config('search_path', 'scratch', false) FROM orders"), "setting");
    assert_eq!(blocked("SELECT set_config('search_path', 'scratch, pg_catalog', false)"), "setting");
    assert_eq!(blocked("SET search_path = scratch, pg_catalog"), "setting");
    // pg_catalog first, or left out, is fine.
    sent(PUBLIC, "SET search_path = pg_catalog, scratch");
}

#[test]
fn an_unqualified_drop_a_protected_table_answers_to_on_the_path_is_refused() {
    let a = analyze(&["scratch", "public"], &[], "DROP TABLE customers");
    assert_eq!(a.block.map(|b| b.rule).as_deref(), Some("protected_ddl"));
    sent(&["scratch", "public"], "DROP TABLE scratch.customers");
    // The session's temporary customers shadows the protected one: that is what DROP drops.
    let a = analyze(PUBLIC, &["customers"], "DROP TABLE customers");
    assert_eq!(a.block, None);
    assert_eq!(a.effects, [crate::sql::Effect::TempDropped("customers".to_owned())]);
}

#[test]
fn row_constructor_assignments_compute_on_masked_values() {
    let text = sent(PUBLIC, "UPDATE customers SET (name, notes) = (ssn, email) WHERE id = 4");
    assert!(text.starts_with("UPDATE public.customers SET (name, notes) = ((CAST("), "{text}");
    let text = sent(
        PUBLIC,
        "UPDATE customers SET (name, notes) = (SELECT ssn, email FROM other WHERE other.id = 1) WHERE id = 4",
    );
    // other has no email: the name is the target's, masked.
    assert!(text.contains("(SELECT other.ssn, (CAST(CASE WHEN customers.email IS NULL"), "{text}");
}

#[test]
fn dropping_a_view_is_not_ddl_on_a_protected_table() {
    // customers_v reads customers; a view whose definition the catalog could not read is
    // masked whole like a table, but dropping it loses no protected data either.
    sent(PUBLIC, "DROP VIEW customers_v");
    let mut rels: Vec<Relation> = catalog().relations().map(|r| (**r).clone()).collect();
    let v = rels.iter_mut().find(|r| r.name.table == "names_v").unwrap();
    v.view_sql = None;
    v.definition_unavailable = true;
    let catalog = Catalog::new(rels);
    let session = super::tests::policy().for_identity(&Identity::new(["app_user"]));
    let a = Analyzer::new(&session, &catalog, "app_user").analyze("DROP VIEW names_v");
    assert_eq!(a.block, None);
    assert_eq!(blocked("DROP TABLE customers"), "protected_ddl");
}

#[test]
fn a_name_pgveil_cannot_resolve_that_a_protected_relation_answers_to_is_refused() {
    // Under [app_user] alone pgveil knows no `customers`; the server's path may differ (a
    // set_config that never ran, SET LOCAL in a pipeline): refused rather than sent bare.
    let a = analyze(&["app_user"], &[], "INSERT INTO scratch.other SELECT 1, ssn FROM customers");
    assert_eq!(a.block.map(|b| b.rule).as_deref(), Some("unsupported"));
    assert!(a.unknown_relation, "the proxy refreshes its catalog once first");
    // A name no protected relation has is the server's to answer.
    sent(&["app_user"], "SELECT 1 FROM nowhere");
    // FOR UPDATE OF names a FROM entry: never qualified.
    let text = sent(PUBLIC, "SELECT id FROM orders FOR UPDATE OF orders");
    assert_eq!(text, "SELECT id FROM public.orders FOR UPDATE OF orders");
}

#[test]
fn set_config_of_search_path_is_followed_only_where_it_runs_once() {
    for sql in [
        "SELECT set_config('search_path', 'scratch', false) LIMIT 0",
        "SELECT CASE WHEN false THEN set_config('search_path', 'scratch', false) END",
        "SELECT coalesce('x', set_config('search_path', 'scratch', false))",
        "SELECT set_config('search_path', 'scratch', false) WHERE false",
    ] {
        assert_eq!(blocked(sql), "setting", "{sql}");
    }
    assert_eq!(blocked("SET search_path FROM CURRENT"), "setting");
}

#[test]
fn a_dml_target_named_like_a_cte_is_the_relation() {
    // Named like a protected relation, the CTE is refused; named like another, the target is
    // still resolved and pinned (it was taken for the CTE, and sent bare).
    assert_eq!(blocked("WITH customers AS (SELECT 1) UPDATE customers SET notes = notes"), "cte_shadow");
    let text =
        sent(&["scratch", "public"], "WITH customers AS (SELECT 1) UPDATE customers SET email = email RETURNING ssn");
    assert!(text.contains("UPDATE scratch.customers SET"), "{text}");
}

#[test]
fn execute_inside_other_statements_is_seen() {
    for sql in ["CREATE TABLE x AS EXECUTE p", "EXPLAIN ANALYZE EXECUTE p", "EXECUTE p"] {
        let a = analyze(PUBLIC, &[], sql);
        assert!(a.effects.contains(&crate::sql::Effect::Executes("p".to_owned())), "{sql}: {:?}", a.effects);
    }
}

#[test]
fn built_in_calls_by_bare_name_are_pinned_to_pg_catalog() {
    let text = sent(&["scratch", "public"], "SELECT length(1), upper(name), count(*) FROM orders, customers");
    assert!(
        text.starts_with("SELECT pg_catalog.length(1), pg_catalog.upper(name), pg_catalog.count(*) FROM"),
        "{text}"
    );
    // Already qualified (the grammar's own forms too): as written.
    let text = sent(PUBLIC, "SELECT pg_catalog.lower('A'), substring('abc' from 2), extract(year from now())");
    assert!(
        text.starts_with("SELECT pg_catalog.lower('A'), substring('abc' from 2), extract(year from pg_catalog.now())"),
        "{text}"
    );
}

/// A sublink over the target's own table, or with a comparison moved into its substitution:
/// the name qualified by the nearest range variable of its name, which PostgreSQL binds first.
#[test]
fn a_sublink_over_the_targets_table_binds_to_its_own_range_variable() {
    let text = sent(PUBLIC, "UPDATE customers SET name = 'x' WHERE id = (SELECT id FROM customers WHERE email = $1)");
    assert!(text.starts_with("UPDATE public.customers SET name = 'x' WHERE id = (SELECT id FROM (SELECT "), "{text}");
    assert!(text.contains("WHERE customers.email OPERATOR(pg_catalog.=) $1) AS customers WHERE TRUE)"), "{text}");
    let text =
        sent(PUBLIC, "UPDATE customers SET name = 'x' WHERE id = (SELECT id FROM customers c2 WHERE email = $1)");
    assert!(text.contains("WHERE customers.email OPERATOR(pg_catalog.=) $1) c2 WHERE TRUE)"), "{text}");
    assert!(!text.contains("c2.TRUE"), "{text}");
    let text =
        sent(PUBLIC, "UPDATE customers SET name = (SELECT notes FROM customers WHERE customers.id = 1) WHERE id = 2");
    assert!(text.contains("SET name = (SELECT customers.notes FROM (SELECT "), "{text}");
    let text =
        sent(PUBLIC, "UPDATE customers SET name = (SELECT notes FROM customers c2 WHERE c2.id = 1) WHERE id = 2");
    assert!(text.contains("SET name = (SELECT c2.notes FROM (SELECT "), "{text}");
}

#[test]
fn pg_dumps_set_config_from_pg_settings_is_the_equivalent_set() {
    let dump = "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'";
    assert_eq!(
        sent(PUBLIC, dump),
        "SELECT pg_catalog.set_config('restrict_nonsystem_relation_kind', 'view, foreign-table', false) FROM pg_catalog.pg_settings WHERE name = 'restrict_nonsystem_relation_kind'"
    );
    // The setting it names is checked as SET would be; anything else of the shape is not it.
    assert_eq!(
        blocked("SELECT set_config(name, 'off', false) FROM pg_settings WHERE name = 'standard_conforming_strings'"),
        "setting"
    );
    assert_eq!(blocked("SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'search_path'"), "setting");
    for other in [
        "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name LIKE 'search%'",
        "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'jit' OR true",
        "SELECT set_config(name, 'x', false) FROM pg_settings",
        "SELECT set_config(name, 'x', false) FROM scratch.pg_settings WHERE name = 'jit'",
    ] {
        assert_eq!(blocked(other), "setting", "{other}");
    }
}

#[test]
fn what_outlives_a_reload_is_refused_or_ends_the_session() {
    use crate::sql::Effect;
    // A rule on a permanent relation would keep reading what today's rules let it read.
    assert_eq!(blocked("CREATE RULE r AS ON INSERT TO orders DO ALSO SELECT 1"), "function");
    // On the session's temporary relation it is stored code: a reload ends the session.
    let a = analyze(PUBLIC, &["t"], "CREATE RULE r AS ON INSERT TO t DO ALSO NOTHING");
    assert_eq!(a.block, None);
    assert!(a.effects.contains(&Effect::StoredCode), "{:?}", a.effects);
    // A view over a temporary relation is temporary whatever its text says.
    for (temp, sql) in [
        (&["t"][..], "CREATE VIEW v AS SELECT c.name, t.x FROM t, customers c"),
        (&[][..], "CREATE TEMP TABLE t2 (a int); CREATE VIEW v2 AS SELECT a, c.name FROM t2, customers c"),
    ] {
        let a = analyze(PUBLIC, temp, sql);
        assert_eq!(a.block, None, "{sql}");
        assert!(a.effects.contains(&Effect::StoredCode), "{sql}: {:?}", a.effects);
    }
    // A permanent view is not: lineage protects it after a reload.
    let a = analyze(PUBLIC, &[], "CREATE VIEW v3 AS SELECT name FROM customers");
    assert!(!a.effects.contains(&Effect::StoredCode), "{:?}", a.effects);
}
