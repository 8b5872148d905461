//! The one way to start and stop a proxy: `Proxy::start(config, options)` loads the rules,
//! opens the audit log, binds the listeners and spawns the accept loop, the admin listener and
//! the rules watcher; `Running::shutdown()` stops accepting, drains sessions for the grace
//! period, stops the admin listener and flushes the audit log. `main`, `demo` and the test
//! harness all use it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::audit::{Audit, AuditWriter};
use crate::config::Config;
use crate::workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Rules(String),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot start the session threads: {0}")]
    Workers(std::io::Error),
}

/// Starts proxies.
#[derive(Debug)]
pub struct Proxy;

/// A started proxy.
#[derive(Debug)]
pub struct Running {
    pub shared: Arc<Shared>,
    /// The client listener's address (the port chosen for `:0`).
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    stop: CancellationToken,
    admin_stop: CancellationToken,
    serve: Option<tokio::task::JoinHandle<()>>,
    workers: Option<Arc<Workers>>,
    writer: Option<AuditWriter>,
}

impl Proxy {
    /// Loads `config.rules` (compiled with `options`), starts the audit writer and binds
    /// `config.listen` and `config.admin.listen`; the proxy then serves until
    /// [`Running::shutdown`].
    pub async fn start(config: Config, options: rules::CompileOptions) -> Result<Running, StartError> {
        let policy = match &config.rules {
            Some(path) => Some(crate::policy::load(path, &options).map_err(StartError::Rules)?),
            None => None,
        };
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let (audit, writer) = match &config.audit.path {
            Some(path) => {
                let (a, w) = Audit::start(path, config.audit.chain, Arc::clone(&metrics))?;
                (a, Some(w))
            }
            None => (Audit::disabled(), None),
        };
        let bind = |addr: String| async move {
            TcpListener::bind(&addr).await.map_err(|source| StartError::Bind { addr, source })
        };
        let listener = bind(config.listen.clone()).await?;
        let admin = match &config.admin.listen {
            Some(a) => Some(bind(a.clone()).await?),
            None => None,
        };
        let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen.clone(), source })?;
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let shared = Arc::new(Shared::with_rules(config, audit, metrics, policy, options)?);
        let admin_stop = CancellationToken::new();
        if let Some(admin) = admin {
            tokio::spawn(crate::admin::serve(admin, Arc::clone(&shared), admin_stop.clone()));
        }
        tokio::spawn(crate::policy::watch(Arc::clone(&shared)));
        let workers = Workers::start(shared.config.limits.workers).map_err(StartError::Workers)?.map(Arc::new);
        let stop = CancellationToken::new();
        let serve =
            tokio::spawn(crate::serve(listener, Arc::clone(&shared), workers.clone(), stop.clone().cancelled_owned()));
        Ok(Running { shared, addr, admin_addr, stop, admin_stop, serve: Some(serve), workers, writer })
    }
}

impl Running {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serves until `until` resolves (signals, for `run`), then shuts down.
    pub async fn run_until(self, until: impl Future<Output = ()>) {
        until.await;
        self.shutdown().await;
    }

    /// Stops accepting, lets sessions finish up to `limits.shutdown_grace` (then closes
    /// them), stops the admin listener and waits until every audit line is written.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(serve) = self.serve.take() {
            let _ = serve.await;
        }
        if let Some(workers) = self.workers.take().and_then(|w| Arc::try_unwrap(w).ok()) {
            let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
        }
        self.admin_stop.cancel();
        self.shared.audit.close().await;
        if let Some(w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.finish()).await;
        }
    }
}

impl Drop for Running {
    /// A proxy dropped without `shutdown` stops accepting and closes its listeners.
    fn drop(&mut self) {
        self.stop.cancel();
        self.admin_stop.cancel();
    }
}
