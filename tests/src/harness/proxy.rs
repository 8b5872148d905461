//! Starting pgveil in-process on 127.0.0.1:0 against the test cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use proxy::config::{ClientTlsMode, Config, UpstreamTls};

use super::certs::{self, CertFiles};
use super::pg::Cluster;

/// The key tests use for the `hash` mask.
pub const HASH_KEY: &[u8] = b"pgveil-test-hash-key";

#[derive(Debug)]
pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub shared: Arc<proxy::Shared>,
    pub certs: CertFiles,
    pub dir: PathBuf,
    running: Option<proxy::Running>,
}

/// A configuration pointing at the cluster, with client TLS offered (`allow`) and a plaintext
/// upstream leg (relayed SCRAM works with every client setting there; tests that need TLS on
/// both legs switch `upstream.tls` to `verify-full`, whose CA is already set).
pub fn config(cluster: &Cluster, certs: &CertFiles) -> Config {
    let mut c = Config { listen: "127.0.0.1:0".to_owned(), ..Config::default() };
    c.upstream.host = "127.0.0.1".to_owned();
    c.upstream.port = cluster.port;
    c.upstream.tls = UpstreamTls::Disable;
    c.upstream.ca = Some(cluster.certs.ca.clone());
    c.tls.cert = Some(certs.cert.clone());
    c.tls.key = Some(certs.key.clone());
    c.tls.clients = ClientTlsMode::Allow;
    // The corpora probe on purpose, thousands of blocks per session: the probe budget (on by
    // default) is off here and tested on its own (access::incident_drill_…).
    c.limits.blocks_per_session = None;
    c
}

/// Writes fresh proxy certificates into a temp dir of their own.
pub fn proxy_certs() -> (CertFiles, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pgveil-proxy-{:016x}", rand::random::<u64>()));
    let certs = certs::write(&dir, "proxy").expect("proxy certificates");
    (certs, dir)
}

pub async fn spawn(cluster: &Cluster) -> ProxyHandle {
    spawn_with(cluster, |_| {}).await
}

pub async fn spawn_with(cluster: &Cluster, adjust: impl FnOnce(&mut Config)) -> ProxyHandle {
    let (certs, dir) = proxy_certs();
    let mut config = config(cluster, &certs);
    adjust(&mut config);
    start(config, certs, dir, None).await
}

/// A proxy enforcing the rules file `rules_yaml` (the catalog connection logs in as `pgveil`).
/// The rules are written to `<dir>/rules.yaml`, which the proxy watches.
pub async fn spawn_with_rules(cluster: &Cluster, rules_yaml: &str, adjust: impl FnOnce(&mut Config)) -> ProxyHandle {
    let (certs, dir) = proxy_certs();
    let rules_path = dir.join("rules.yaml");
    std::fs::write(&rules_path, rules_yaml).expect("write rules");
    let mut config = config(cluster, &certs);
    config.rules = Some(rules_path);
    config.catalog.user = Some("pgveil".to_owned());
    config.catalog.password = Some("pgveil_pw".to_owned());
    adjust(&mut config);
    let opts = rules::CompileOptions { hash_key: Some(HASH_KEY.to_vec()) };
    let policy = rules::compile(rules_yaml, &opts).expect("test rules compile");
    start(config, certs, dir, Some((policy, opts))).await
}

async fn start(
    config: Config,
    certs: CertFiles,
    dir: PathBuf,
    rules: Option<(rules::Policy, rules::CompileOptions)>,
) -> ProxyHandle {
    // The same start as `pgveil run` (the rules were compiled once above to fail early with
    // the test's own message; the proxy compiles the file it watches).
    let options = rules.map(|(_, o)| o).unwrap_or_default();
    let running = proxy::Proxy::start(config, options).await.expect("proxy starts");
    ProxyHandle { addr: running.addr, shared: Arc::clone(&running.shared), certs, dir, running: Some(running) }
}

impl ProxyHandle {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops accepting, waits for the drain to finish and for the audit log to be written.
    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

impl Drop for ProxyHandle {
    /// Every test proxy, when it goes, asserts that both layers held for the whole of its
    /// life (threat model I2): the substitution checker (debug builds re-parse every statement
    /// a masked session sends) never failed, and the result-column layer never had a raw value
    /// to mask. So the counters stay 0 across the whole suite, not only where a test asks.
    fn drop(&mut self) {
        drop(self.running.take());
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            use std::sync::atomic::Ordering::Relaxed;
            let m = &self.shared.metrics;
            assert_eq!(m.substitution_check_failures_total.load(Relaxed), 0, "a statement sent failed the checker");
            assert_eq!(m.backstop_masked_cells_total.load(Relaxed), 0, "the result-column layer masked a raw value");
        }
    }
}
