//! pgveil: a PostgreSQL wire-protocol proxy that masks protected columns and blocks
//! over-broad statements for the roles a rules file names.
//!
//! Reading order: `config` (operator settings) → `server` (accept loop, limits, shutdown) →
//! `session` (one connection: handshake, upstream, authentication, relay) → `forward` (the
//! byte pump) → `protocol` (sans-IO wire format). Around them: `tls`, `cancel`, `audit`,
//! `metrics`, `admin`.
//!
//! The whole crate denies what could panic on input (unwrap, expect, panic, indexing,
//! unchecked arithmetic): every path that touches client or server bytes is covered, and the
//! few exceptions are allowed where they stand, with the reason.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod access_review;
pub mod admin;
pub mod admin_cli;
pub mod audit;
pub mod audit_cli;
pub mod cancel;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod config;
pub mod conn;
pub mod containment;
pub mod demo;
pub mod error;
pub mod forward;
#[doc(hidden)]
pub mod fuzz;
pub mod init;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod running;
pub mod server;
pub mod session;
pub mod tls;
pub mod workers;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio_util::sync::CancellationToken;

pub use running::{Proxy, Running};
pub use server::serve;

/// Everything sessions share: passed as `Arc<Shared>`, never global, so two proxies can run in
/// one process (the tests do).
pub struct Shared {
    pub config: config::Config,
    pub server_tls: Option<tls::ServerTls>,
    pub upstream_tls: Option<tokio_rustls::TlsConnector>,
    pub cancel: cancel::CancelKeys,
    pub metrics: Arc<metrics::Metrics>,
    pub audit: audit::Audit,
    /// Set while the proxy accepts clients (`/readyz`).
    pub ready: AtomicBool,
    /// Cancelled when SIGTERM arrives: new sessions are refused.
    pub stop_accepting: CancellationToken,
    /// Cancelled when the grace period is over: open sessions are closed.
    pub hard_stop: CancellationToken,
    /// Notified on SIGHUP: the rules watcher reloads the file.
    pub reload: tokio::sync::Notify,
    /// The rules in force (`None`: no rules file, every session is a byte pump).
    pub policy: arc_swap::ArcSwapOption<rules::Policy>,
    /// Bumped on every successful reload.
    pub policy_generation: std::sync::atomic::AtomicU64,
    pub rules_options: rules::CompileOptions,
    pub catalogs: catalog::Catalogs,
    pub analysis_cache: session::analysis::Cache,
    /// SCRAM verifiers read for `auth.mode: scram`, by (database, role), with when.
    pub verifiers: dashmap::DashMap<(String, String), (Option<session::scram::Verifier>, std::time::Instant)>,
    /// Recent failed logins by client address (slowing down guessing).
    pub auth_failures: dashmap::DashMap<std::net::IpAddr, (u32, std::time::Instant)>,
    /// Live sessions, the probe budget's quarantines, operator actions.
    pub containment: containment::Containment,
    /// The pump threads, started with the first session pumped on them.
    pub pump_loops: forward::event_loop::Lazy,
    mock_secret: [u8; 32],
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Shared {
    /// The per-process secret behind the mock verifiers of roles that do not exist.
    pub fn cancel_mock_secret(&self) -> &[u8] {
        &self.mock_secret
    }

    /// Builds the shared state from a validated configuration, loading certificates.
    pub fn new(
        config: config::Config,
        audit: audit::Audit,
        metrics: Arc<metrics::Metrics>,
    ) -> Result<Shared, tls::TlsError> {
        Self::with_rules(config, audit, metrics, None, rules::CompileOptions::default())
    }

    /// As `new`, with the rules in force at start and the options reloads compile with.
    pub fn with_rules(
        config: config::Config,
        audit: audit::Audit,
        metrics: Arc<metrics::Metrics>,
        policy: Option<rules::Policy>,
        rules_options: rules::CompileOptions,
    ) -> Result<Shared, tls::TlsError> {
        let server_tls = match (&config.tls.cert, &config.tls.key, config.tls.clients) {
            (_, _, config::ClientTlsMode::Disable) => None,
            (Some(cert), Some(key), _) => Some(tls::server_tls(cert, key)?),
            _ => None,
        };
        let upstream_tls = tls::upstream_connector(&config)?;
        let cancel = cancel::CancelKeys::new(config.cancel_secret.as_deref().map(str::as_bytes));
        Ok(Shared {
            config,
            server_tls,
            upstream_tls,
            cancel,
            metrics,
            audit,
            ready: AtomicBool::new(false),
            stop_accepting: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            reload: tokio::sync::Notify::new(),
            policy: arc_swap::ArcSwapOption::new(policy.map(Arc::new)),
            policy_generation: std::sync::atomic::AtomicU64::new(0),
            rules_options,
            catalogs: catalog::Catalogs::default(),
            analysis_cache: session::analysis::Cache::new(),
            verifiers: dashmap::DashMap::new(),
            auth_failures: dashmap::DashMap::new(),
            containment: containment::Containment::default(),
            pump_loops: forward::event_loop::Lazy::default(),
            mock_secret: rand::random(),
        })
    }
}
