//! The operator files in deploy/ are executable documentation: they load with the real loaders.

#[test]
fn example_configuration_and_rules_load() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let yaml = std::fs::read_to_string(format!("{root}/pgveil.yaml")).unwrap();
    let config =
        proxy::config::Config::from_yaml_with_env(&yaml, "deploy/pgveil.yaml", []).expect("deploy/pgveil.yaml");
    assert_eq!(config.listen, "0.0.0.0:6432");
    assert_eq!(config.upstream.tls, proxy::config::UpstreamTls::VerifyFull);
    let rules = std::fs::read_to_string(format!("{root}/rules.yaml")).unwrap();
    let policy =
        rules::compile(&rules, &rules::CompileOptions { hash_key: Some(b"k".to_vec()) }).expect("deploy/rules.yaml");
    assert!(!policy.columns().is_empty());
    let k8s = std::fs::read_to_string(format!("{root}/kubernetes/pgveil.yaml")).unwrap();
    for kind in ["Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler"] {
        assert!(k8s.contains(&format!("kind: {kind}")), "kubernetes manifest lacks {kind}");
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/grafana/pgveil-dashboard.json")).unwrap())
            .unwrap();
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 5));
}

/// Every source file says what it owns in a `//!` header.
#[test]
fn every_source_file_has_an_ownership_header() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut missing = Vec::new();
    for dir in ["proxy/src", "rules/src", "tests/src"] {
        let mut stack = vec![std::path::PathBuf::from(format!("{root}/{dir}"))];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().filter_map(Result::ok) {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    if !text.starts_with("//!") {
                        missing.push(p.display().to_string());
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "files without a //! header: {missing:?}");
}
