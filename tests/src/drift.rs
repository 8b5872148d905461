//! The drift harness (issue 29): the substitution-equivalence oracle run again after each kind
//! of change to what names mean. The same change is made to a session through pgveil (on the
//! fixture) and to a direct session on a copy of the fixture whose protected columns hold
//! `app_user`'s masked values; every statement of the oracle must then give both the same
//! rows, row counts or SQLSTATE. A change pgveil's model misses shows as a difference (it read
//! another relation) or as a raw value (the leak scan of the stream).

use crate::harness::client::{connect_plain, url};
use crate::harness::recorder::Recorder;
use crate::harness::{pg, proxy as harness_proxy};
use crate::leaks::{assert_layers_held, needles};
use crate::masking::RULES;
use crate::substitution::{mask_fixture, oracle_statements, outcome_in};

/// Statements whose meaning the drifts below change: unqualified names a shadow or a rename
/// can redirect.
const NAMED: &[&str] = &[
    "SELECT id, ssn FROM customers ORDER BY id LIMIT 3",
    "SELECT count(*) FROM customers",
    "SELECT ssn || '' FROM customers ORDER BY 1 LIMIT 2",
    "SELECT c.id, c.ssn FROM customers c WHERE c.id = 1",
    "UPDATE orders SET status = (SELECT ssn FROM customers WHERE id = 1) WHERE id = 1 RETURNING status",
];

/// A change made on both sides: statements run before the comparison, and whether they leave
/// a transaction open (the comparison then runs under savepoints inside it).
struct Drift {
    name: &'static str,
    session: &'static [&'static str],
    /// Run by the superuser in each database, committed, between the session's statements and
    /// the comparison (another session's DDL).
    other: &'static str,
    in_tx: bool,
    /// pgveil cannot see this change (the session's own open transaction, or another
    /// session's DDL before its notification arrives): a statement may fail closed (42P01 /
    /// 42703) where the direct session reads the relation the name now denotes.
    may_fail: bool,
}

const DRIFTS: &[Drift] = &[
    Drift { name: "none", session: &[], other: "", in_tx: false, may_fail: false },
    Drift {
        name: "rolled-back SET",
        session: &["BEGIN", "SET search_path = crm, public", "ROLLBACK"],
        other: "",
        in_tx: false,
        may_fail: false,
    },
    Drift {
        name: "SET LOCAL, committed",
        session: &["BEGIN", "SET LOCAL search_path = crm, public", "COMMIT"],
        other: "",
        in_tx: false,
        may_fail: false,
    },
    Drift {
        name: "SET to a shadow",
        session: &["SET search_path = crm, public"],
        other: "",
        in_tx: false,
        may_fail: false,
    },
    Drift {
        name: "savepoint rolled back",
        session: &["BEGIN", "SAVEPOINT a", "SET search_path = crm, public", "ROLLBACK TO a"],
        other: "",
        in_tx: true,
        may_fail: false,
    },
    Drift {
        name: "uncommitted DDL",
        session: &["SET search_path = crm, public", "BEGIN", "ALTER TABLE crm.customers RENAME TO crm_gone"],
        other: "",
        in_tx: true,
        may_fail: true,
    },
    Drift {
        name: "another session's RENAME",
        session: &["SET search_path = crm, public"],
        other: "ALTER TABLE crm.customers RENAME TO customers_renamed",
        in_tx: false,
        may_fail: true,
    },
    Drift {
        name: "another session's DROP and re-CREATE",
        session: &["SET search_path = crm, public"],
        other: "DROP TABLE crm.customers; CREATE TABLE crm.customers (id int, ssn text); INSERT INTO crm.customers VALUES (2, 'recreated'); GRANT SELECT ON crm.customers TO PUBLIC",
        in_tx: false,
        may_fail: true,
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_holds_after_every_kind_of_drift() {
    let cluster = pg::cluster();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let rules_path = p.shared.config.rules.clone().unwrap();
    let recorder = Recorder::start(p.addr).await;
    let statements: Vec<String> = oracle_statements()
        .into_iter()
        .filter(|s| !s.contains(';'))
        .take(120)
        .chain(NAMED.iter().map(|s| (*s).to_owned()))
        .collect();
    let mut differences = Vec::new();
    let (mut compared, mut failed_closed) = (0, 0);
    for (i, drift) in DRIFTS.iter().enumerate() {
        // Fresh copies for every drift: the changes are not undone.
        let orig = cluster.fresh_db();
        let masked = cluster.fresh_db();
        let admin = connect_plain(&url(cluster.port, "dba", &masked.name, "sslmode=disable")).await.unwrap();
        mask_fixture(&admin).await;
        for db in [&orig.name, &masked.name] {
            // The masked role may change the shadow it owns.
            cluster
                .psql_admin(db, "ALTER TABLE crm.customers OWNER TO app_user; GRANT CREATE ON SCHEMA crm TO app_user")
                .unwrap();
        }
        if i == DRIFTS.len() - 1 {
            // A reload of the same rules on top: new generations, the same view.
            std::fs::write(&rules_path, RULES).unwrap();
            assert!(proxy::policy::reload(&p.shared));
        }
        let via = connect_plain(&url(recorder.port(), "app_user", &orig.name, "sslmode=disable")).await.unwrap();
        let direct = connect_plain(&url(cluster.port, "app_user", &masked.name, "sslmode=disable")).await.unwrap();
        // The catalog has seen the names before they drift.
        for sql in NAMED {
            let _ = outcome_in(&via, sql, false).await;
        }
        for sql in drift.session {
            via.batch_execute(sql).await.unwrap_or_else(|e| panic!("{}: {sql}: {e:?}", drift.name));
            direct.batch_execute(sql).await.unwrap_or_else(|e| panic!("{}: {sql}: {e}", drift.name));
        }
        if !drift.other.is_empty() {
            cluster.psql_admin(&orig.name, drift.other).unwrap();
            cluster.psql_admin(&masked.name, drift.other).unwrap();
        }
        for sql in &statements {
            let through = outcome_in(&via, sql, drift.in_tx).await;
            if through.as_ref().is_err_and(|c| c == "42501") {
                continue;
            }
            if drift.may_fail && through.as_ref().is_err_and(|c| c == "42P01" || c == "42703") {
                failed_closed += 1;
                continue;
            }
            let on_masked = outcome_in(&direct, sql, drift.in_tx).await;
            compared += 1;
            if through != on_masked {
                differences.push(format!(
                    "[{}] {sql}\n  through pgveil: {through:?}\n  on masked data: {on_masked:?}",
                    drift.name
                ));
            }
        }
    }
    assert!(differences.is_empty(), "{} of {compared} differ:\n{}", differences.len(), differences.join("\n"));
    assert!(compared >= 600, "compared {compared} ({failed_closed} failed closed)");
    assert!(failed_closed > 0, "the uncommitted rename failed no statement: the harness saw no drift");
    let stream = recorder.captured();
    for (what, needle) in needles() {
        assert!(!stream.windows(needle.len()).any(|w| w == needle.as_slice()), "the masked session received {what}");
    }
    assert_layers_held(&p.shared);
}
