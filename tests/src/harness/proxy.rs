//! Starting pgveil in-process on 127.0.0.1:0 against the test cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use proxy::config::{ClientTlsMode, Config, UpstreamTls};
use tokio_util::sync::CancellationToken;

use super::certs::{self, CertFiles};
use super::pg::Cluster;

#[derive(Debug)]
pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub shared: Arc<proxy::Shared>,
    pub certs: CertFiles,
    pub dir: PathBuf,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
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
    let listener = tokio::net::TcpListener::bind(&config.listen).await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let metrics = Arc::new(proxy::metrics::Metrics::default());
    let shared =
        Arc::new(proxy::Shared::new(config, proxy::audit::Audit::disabled(), metrics).expect("proxy shared state"));
    let stop = CancellationToken::new();
    let task = tokio::spawn(proxy::serve(listener, Arc::clone(&shared), stop.clone().cancelled_owned()));
    ProxyHandle { addr, shared, certs, dir, stop, task: Some(task) }
}

impl ProxyHandle {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops accepting and waits for the drain to finish.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
