//! One client connection, from the first byte to the last: handshake, upstream connection,
//! relayed authentication, then either a plain byte pump (sessions no rule applies to) or the
//! inspecting relay of `inspect.rs`.

mod auth;
pub mod conn;
mod error;
mod handshake;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub use error::{SessionError, Side};
pub use handshake::Hello;

use crate::Shared;
use crate::audit::{Event, EventKind};
use crate::cancel::Registration;
use crate::metrics::Rejected;
use crate::protocol::messages;
use crate::protocol::startup::{NEWEST_MINOR, Startup};
use crate::protocol::{Direction, Frame};
use conn::Conn;
use handshake::ClientStream;
use upstream::ServerStream;

/// Who this session is, for logs and audit events.
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    pub id: String,
    pub client: String,
    pub user: String,
    pub database: String,
    pub application: String,
}

/// Runs one client connection to its end. Never panics on client input; errors are reported
/// to the client (where it may see them), logged and audited here.
pub async fn run(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let mut info = SessionInfo { id: new_session_id(), client: peer.to_string(), ..SessionInfo::default() };
    let limits = &shared.config.limits;
    let hello = tokio::time::timeout(
        limits.startup_timeout,
        handshake::handshake(tcp, shared.server_tls.as_ref(), shared.config.tls.clients),
    )
    .await
    .unwrap_or(Err(SessionError::StartupTimeout));
    let (client, startup, leftover) = match hello {
        Ok(Hello::Startup { stream, startup, leftover }) => (stream, startup, leftover),
        Ok(Hello::Cancel { pid, key }) => {
            cancel(&shared, pid, &key).await;
            return;
        }
        Err(e) => {
            // The TCP stream is gone inside the handshake; failures there are only audited.
            report(&shared, &info, &e);
            return;
        }
    };
    info.user = startup.user().to_owned();
    info.database = startup.database().to_owned();
    info.application = startup.application().to_owned();
    let span =
        tracing::info_span!("session", id = %info.id, client = %info.client, user = %info.user, db = %info.database);
    let _enter = span.enter();
    let mut client = Conn::new(client, Direction::FromClient, leftover);
    if let Err(e) = serve_session(&shared, &info, &mut client, &startup).await {
        report(&shared, &info, &e);
        if let Some(resp) = e.to_client() {
            let _ = client.write_all(&resp.to_bytes()).await;
            let _ = client.flush().await;
        }
    }
    let _ = client.io.shutdown().await;
}

async fn serve_session(
    shared: &Arc<Shared>,
    info: &SessionInfo,
    client: &mut Conn<ClientStream>,
    startup: &Startup,
) -> Result<(), SessionError> {
    if shared.stop_accepting.is_cancelled() {
        return Err(SessionError::Shutdown);
    }
    let server = upstream::connect(shared).await.inspect_err(|_| shared.metrics.rejected(Rejected::Upstream))?;
    let server_tls = upstream::is_tls(&server);
    let mut server = Conn::new(server, Direction::FromServer, BytesMut::new());

    // Protocol negotiation, per leg: never forward `_pq_` options or a version we do not speak.
    let asked = startup.minor;
    let unsupported: Vec<&str> = startup.protocol_options().collect();
    let params: Vec<(String, String)> =
        startup.params.iter().filter(|(k, _)| !k.starts_with("_pq_.")).cloned().collect();
    let mut minor = asked.min(NEWEST_MINOR);
    server.write_all(&messages::startup_message(minor, &params)).await?;
    server.flush().await?;

    // A `v` from the server (an older server asked for 3.2) is absorbed and re-issued to the
    // client together with the options we removed.
    let first = server.read_frame().await?.ok_or(SessionError::Truncated(Direction::FromServer))?;
    let first = if first.tag() == b'v' {
        minor = minor.min(messages::negotiated_minor(&first).unwrap_or(0));
        None
    } else {
        Some(first)
    };
    if minor < asked || !unsupported.is_empty() {
        let mut out = BytesMut::new();
        messages::negotiate_protocol_version(&mut out, minor, &unsupported);
        client.write_all(&out).await?;
    }
    if let Some(first) = first {
        // Put the first message back in front of the server's read buffer.
        let mut rebuilt = BytesMut::from(first.as_bytes().as_ref());
        rebuilt.extend_from_slice(&server.rbuf);
        server.rbuf = rebuilt;
    }

    match auth::relay(client, &mut server, server_tls).await? {
        auth::Relayed::Ok => {}
        auth::Relayed::Failed => {
            shared.metrics.auth_failures_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            shared.audit.log(Event::session(EventKind::AuthFailed, info));
            return Ok(());
        }
    }
    let _cancel_guard = after_auth(shared, client, &mut server, minor).await?;
    tracing::debug!("session ready");
    crate::forward::pump(shared, client, &mut server).await
}

/// Relays ParameterStatus and notices up to the first ReadyForQuery, replacing the server's
/// BackendKeyData with a synthetic key of our own.
async fn after_auth(
    shared: &Arc<Shared>,
    client: &mut Conn<ClientStream>,
    server: &mut Conn<ServerStream>,
    minor: u16,
) -> Result<Option<Registration>, SessionError> {
    let mut registration = None;
    loop {
        let frame: Frame = server.read_frame().await?.ok_or(SessionError::Truncated(Direction::FromServer))?;
        match frame.tag() {
            b'K' => {
                let (pid, key) = messages::backend_key(&frame).ok_or(SessionError::UnexpectedServerMessage(b'K'))?;
                let key_len = if minor >= 2 { 32 } else { 4 };
                let reg = shared.cancel.register(key_len, pid, bytes::Bytes::copy_from_slice(key));
                let mut out = BytesMut::new();
                messages::backend_key_data(&mut out, reg.pid, &reg.key);
                client.write_all(&out).await?;
                registration = Some(reg);
            }
            b'Z' => {
                client.write_all(frame.as_bytes()).await?;
                client.flush().await?;
                return Ok(registration);
            }
            b'E' => {
                client.write_all(frame.as_bytes()).await?;
                client.flush().await?;
                return Err(SessionError::ServerRefusedStartup);
            }
            b'S' | b'N' => client.write_all(frame.as_bytes()).await?,
            other => return Err(SessionError::UnexpectedServerMessage(other)),
        }
    }
}

/// Forwards a client's cancel request to the backend its synthetic key maps to.
async fn cancel(shared: &Shared, pid: u32, key: &[u8]) {
    shared.metrics.cancel_requests_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let Some(target) = shared.cancel.lookup(pid, key) else {
        tracing::debug!(pid, "cancel request with an unknown key ignored");
        return;
    };
    let Ok(mut server) = upstream::connect(shared).await else { return };
    let _ = server.write_all(&messages::cancel_request(target.backend_pid, &target.backend_key)).await;
    let _ = server.flush().await;
    // PostgreSQL closes the cancel connection itself; wait briefly so the request is read.
    let mut sink = [0u8; 1];
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut server, &mut sink))
            .await;
    let _ = server.shutdown().await;
}

fn report(shared: &Shared, info: &SessionInfo, e: &SessionError) {
    use std::sync::atomic::Ordering::Relaxed;
    match e {
        SessionError::ClientIo(_) | SessionError::Truncated(Direction::FromClient) => {
            tracing::debug!(error = %e, "client went away");
            return;
        }
        SessionError::TlsRequired => {
            shared.metrics.rejected(Rejected::TlsRequired);
            shared.audit.log(
                Event::session(EventKind::TlsRejected, info).reason("client did not use TLS where it is required"),
            );
        }
        SessionError::ClientTls(_) | SessionError::NoAlpn => {
            shared.metrics.tls_handshake_failures_total.fetch_add(1, Relaxed);
            shared.audit.log(Event::session(EventKind::TlsRejected, info).reason(&e.to_string()));
        }
        SessionError::ChannelBinding => {
            shared.metrics.auth_failures_total.fetch_add(1, Relaxed);
            shared.audit.log(Event::session(EventKind::AuthFailed, info).reason(&e.to_string()));
        }
        _ if e.is_client_protocol_error() => {
            shared.metrics.rejected(Rejected::Protocol);
            shared.audit.log(Event::session(EventKind::ProtocolError, info).reason(&e.to_string()));
        }
        _ => {}
    }
    match e.side() {
        Side::Client => tracing::info!(error = %e, "client connection closed"),
        Side::Upstream => tracing::warn!(error = %e, "server connection failed"),
        Side::Internal => tracing::info!(error = %e, "session ended"),
    }
}

fn new_session_id() -> String {
    let mut b = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    hex::encode(b)
}
