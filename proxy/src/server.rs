//! The accept loop: connection limit, one task per client, graceful drain on shutdown.
//! Reads and writes no protocol bytes itself (a refusal at the limit is encoded by `protocol`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::Shared;
use crate::metrics::Rejected;
use crate::protocol::messages::{ErrorResponse, sqlstate};
use crate::workers::Workers;

/// Accepts clients on `listener` until `shutdown` resolves, then stops accepting, lets open
/// sessions finish for the configured grace period, closes the rest and returns.
///
/// With `workers`, each session runs on one of the session threads (its sockets registered
/// with that thread's runtime); without, on the calling runtime.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    workers: Option<Arc<Workers>>,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(shared.config.limits.max_connections));
    let tracker = TaskTracker::new();
    // Quarantines shared with other instances (ends when the proxy stops accepting).
    tokio::spawn(crate::containment::watch(Arc::clone(&shared)));
    shared.ready.store(true, Ordering::Relaxed);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            shared.metrics.rejected(Rejected::MaxConnections);
            tracker.spawn(refuse(tcp));
            continue;
        };
        let shared = Arc::clone(&shared);
        let Some(workers) = &workers else {
            tracker.spawn(async move {
                shared.metrics.connection_opened();
                crate::session::run(Arc::clone(&shared), tcp, peer).await;
                shared.metrics.connection_closed();
                drop(permit);
            });
            continue;
        };
        // Leave this runtime's driver; the session thread registers the socket with its own.
        let tcp = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand an accepted connection to a session thread");
                continue;
            }
        };
        workers.spawn(tracker.track_future(async move {
            shared.metrics.connection_opened();
            match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => crate::session::run(Arc::clone(&shared), tcp, peer).await,
                Err(e) => tracing::warn!(error = %e, "cannot register an accepted connection"),
            }
            shared.metrics.connection_closed();
            drop(permit);
        }));
    }
    shared.ready.store(false, Ordering::Relaxed);
    shared.stop_accepting.cancel();
    drop(listener);
    tracker.close();
    let grace = shared.config.limits.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "grace period over; closing remaining sessions");
        shared.hard_stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait()).await;
    }
}

async fn refuse(mut tcp: tokio::net::TcpStream) {
    let e = ErrorResponse::fatal(sqlstate::TOO_MANY_CONNECTIONS, "pgveil: sorry, too many clients already");
    // The client's first packet is unread; PostgreSQL answers the same way at its limit.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), tcp.write_all(&e.to_bytes())).await;
    let _ = tcp.shutdown().await;
}

/// Resolves on SIGTERM or SIGINT; SIGHUP reopens the audit log (and reloads rules, where set).
pub async fn signals(shared: Arc<Shared>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reopening the audit log and reloading rules");
                shared.audit.reopen();
                shared.reload.notify_one();
            }
        }
    }
    tracing::info!("shutting down: no new sessions, draining open ones");
}
