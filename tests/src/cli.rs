//! The DBA commands through the real binary: `pgveil check` (with and without a database)
//! and `pgveil explain` (snapshots of its output).

use crate::harness::pg;

fn opts() -> rules::CompileOptions {
    rules::CompileOptions { hash_key: Some(b"k".to_vec()) }
}

fn rules_file(text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("pgveil-rules-{:016x}.yaml", rand::random::<u64>()));
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test]
async fn check_reports_findings_with_positions_and_exit_codes() {
    let ok = rules_file(crate::masking::RULES);
    let (text, code) = proxy::cli::check(&ok, None, &opts()).await;
    assert_eq!(code, 0, "{text}");
    let bad = rules_file("version: 1\ncolumns:\n  public.customers.ssn:\n    mask: hsah\n");
    let (text, code) = proxy::cli::check(&bad, None, &opts()).await;
    assert_eq!(code, 1);
    assert!(text.contains(":4:11: error: unknown mask `hsah`") && text.contains("did you mean `hash`?"), "{text}");
    let (_, code) = proxy::cli::check(std::path::Path::new("/nonexistent/rules.yaml"), None, &opts()).await;
    assert_eq!(code, 2, "an unreadable file is a usage error");
    // Without PGVEIL_HASH_KEY, `check` validates and warns (a DBA in CI has no production
    // secret); `run` still refuses, as the policy loader does.
    let (text, code) = proxy::cli::check(&ok, None, &rules::CompileOptions::default()).await;
    assert_eq!(code, 0, "check without the key validates: {text}");
    assert!(text.contains("warning: the `hash` mask needs PGVEIL_HASH_KEY"), "{text}");
    assert!(rules::compile(crate::masking::RULES, &rules::CompileOptions::default()).is_err(), "run refuses");
    // `explain` offline without the key (issue 30): the hash mask with a placeholder where the
    // key's fingerprint goes, never the stand-in's.
    let rules = rules_file(crate::masking::RULES);
    let sql = "SELECT email FROM customers WHERE id = 1";
    let (text, code) = proxy::cli::explain(&rules, "support_lead", None, sql, &rules::CompileOptions::default()).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(
            "pgveil.hmac_hex(CAST(customers.email AS pg_catalog.text), CAST('<key fingerprint>' AS pg_catalog.text))"
        ),
        "{text}"
    );
    assert!(text.contains("note: PGVEIL_HASH_KEY is not set"), "{text}");
    let (with_key, _) = proxy::cli::explain(&rules, "support_lead", None, sql, &opts()).await;
    assert!(!with_key.contains("<key fingerprint>") && !with_key.contains("is not set"), "{with_key}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_against_a_database_finds_missing_columns_and_type_mismatches() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let rules = rules_file(
        "version: 1\ncolumns:\n  public.customers.ssn:\n    mask: redact\n  public.customers.sns:\n    mask: redact\n  public.customers.balance:\n    mask: email\n  public.nope.x:\n    mask: nullify\n",
    );
    let url = format!("postgres://pgveil:pgveil_pw@127.0.0.1:{}/{}", cluster.port, db.name);
    let (text, code) = proxy::cli::check(&rules, Some(&url), &opts()).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("column sns does not exist") && text.contains("did you mean `ssn`?"), "{text}");
    assert!(text.contains("email works on text columns, not numeric"), "{text}");
    assert!(text.contains("table public.nope does not exist"), "{text}");
    assert!(!text.contains("pgveil_pw"), "the password is not echoed");
    let good = rules_file(crate::masking::RULES);
    let (text, code) = proxy::cli::check(&good, Some(&url), &opts()).await;
    assert_eq!(code, 0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_decision_and_each_columns_mask() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let rules = rules_file(crate::masking::RULES);
    let url = format!("postgres://pgveil:pgveil_pw@127.0.0.1:{}/{}", cluster.port, db.name);
    let run = async |role: &str, sql: &str, against: bool| {
        let (text, code) = proxy::cli::explain(&rules, role, against.then_some(url.as_str()), sql, &opts()).await;
        format!("exit {code}\n{text}")
    };
    let cases = [
        ("app_user", "SELECT id, ssn, email, balance::text FROM customers WHERE id = 1", true),
        ("analyst", "SELECT * FROM customers", true),
        ("analyst", "SELECT name FROM customers WHERE id > 5", true),
        ("app_user", "SELECT id FROM customers WHERE ssn = '1'", false),
        ("dba", "SELECT ssn FROM customers", false),
    ];
    let mut all = String::new();
    for (role, sql, against) in cases {
        all.push_str(&format!(
            "$ pgveil explain --role {role}{} {sql:?}\n",
            if against { " --against URL" } else { "" }
        ));
        all.push_str(&run(role, sql, against).await);
        all.push('\n');
    }
    insta::assert_snapshot!(all);
}

/// `pgveil init` installs, idempotently, the schema and a key the installed function then
/// hashes with; `--print` shows the SQL and never the key's pads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_installs_the_hash_function_and_key_idempotently() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let url = format!("postgres://dba:dba_pw@127.0.0.1:{}/{}", cluster.port, db.name);
    let key = rules::HashKey::new(b"a fresh key for init");
    let (printed, code) = proxy::init::init(&url, true, Some(key.clone()), "pgveil").await;
    assert_eq!(code, 0, "{printed}");
    assert!(
        printed.contains("CREATE SCHEMA IF NOT EXISTS pgveil") && printed.contains(&key.fingerprint()),
        "{printed}"
    );
    assert!(!printed.contains(&hex::encode(key.pads().0)), "--print never shows the pads");
    // The fixture's owner may create schemas in its own copy; install twice.
    let owner =
        format!("postgres://postgres@127.0.0.1:{}/{}?host={}", cluster.port, db.name, cluster.socket_dir.display());
    for _ in 0..2 {
        let (text, code) = proxy::init::init(&owner, false, Some(key.clone()), "pgveil").await;
        assert_eq!(code, 0, "{text}");
        assert!(text.contains(&key.fingerprint()), "{text}");
    }
    // The shared containment table: the catalog role may change it, nobody else may read it.
    let grants = cluster
        .psql_admin(
            &db.name,
            "SELECT has_table_privilege('pgveil', 'pgveil.quarantine', 'INSERT, DELETE'), \
                    has_table_privilege('app_user', 'pgveil.quarantine', 'SELECT')",
        )
        .unwrap();
    assert_eq!(grants.trim(), "t|f", "{grants}");
    let out = cluster
        .psql_admin(
            &db.name,
            &format!(
                "SELECT pgveil.key_installed('{}'), pgveil.hmac_hex('x', '{}')",
                key.fingerprint(),
                key.fingerprint()
            ),
        )
        .unwrap();
    // The same HMAC the Rust mask computes.
    let rules::mask::Masked::Value(expected) = rules::mask::apply(
        &rules::Mask::Hash { length: 64 },
        rules::types::PgType::Text,
        rules::types::Format::Text,
        b"x",
        Some(&key),
    ) else {
        panic!("hash gives a value")
    };
    assert_eq!(out.trim(), format!("t|{}", String::from_utf8_lossy(&expected)));
}
