//! One client connection, from the first byte to the last: handshake, upstream connection,
//! relayed authentication, then either a plain byte pump (sessions no rule applies to) or the
//! inspecting relay of `inspect.rs`.

pub mod analysis;
pub(crate) mod auth;
mod handshake;
mod inspect;
mod login;
pub(crate) mod relay;
pub mod rows;
pub mod scram;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub(crate) use crate::conn;
pub use crate::conn::SessionInfo;
pub use crate::error::{SessionError, Side};
pub use handshake::Hello;

use crate::Shared;
use crate::audit::{Event, EventKind};
use crate::conn::Conn;
use crate::metrics::Rejected;
use crate::protocol::messages;
use crate::protocol::startup::{NEWEST_MINOR, Startup};
use crate::protocol::{Direction, Frame};
use handshake::ClientStream;
use upstream::ServerStream;

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
        Ok(Hello::Cancel { pid, key, stream }) => {
            cancel(&shared, pid, &key).await;
            if let Some(mut s) = stream {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
            }
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
    let registered = shared.containment.register(&info);
    let live = &registered.live;
    let ended = match serve_session(&shared, &info, &mut client, &startup, live).await {
        Ok(Some(server)) => {
            let (ended, back) = crate::forward::pump(&shared, client, server, live.killed()).await;
            let Some(back) = back else {
                // The client's socket was lost with a pump thread: nothing more can be said.
                if let Err(e) = ended {
                    report(&shared, &info, &e);
                }
                return;
            };
            client = back;
            ended.map_err(|e| stopped_why(e, live))
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = ended {
        report(&shared, &info, &e);
        if let Some(resp) = e.to_client() {
            let _ = client.write_all(&resp.to_bytes()).await;
            let _ = client.flush().await;
        }
    }
    let _ = client.io.shutdown().await;
}

/// An operator's stop is told to the client with the reason containment recorded.
fn stopped_why(e: SessionError, live: &crate::containment::Live) -> SessionError {
    match e {
        SessionError::Terminated => SessionError::Refused(Box::new(messages::ErrorResponse::fatal(
            messages::sqlstate::ADMIN_SHUTDOWN,
            live.why(),
        ))),
        other => other,
    }
}

/// Logs the session in and, when it is inspected, relays it to its end. A session no rule
/// applies to comes back as its server leg, for the caller to pump (the pump may take both
/// sockets off this task's runtime, so it needs them owned).
async fn serve_session(
    shared: &Arc<Shared>,
    info: &SessionInfo,
    client: &mut Conn<ClientStream>,
    startup: &Startup,
    live: &Arc<crate::containment::Live>,
) -> Result<Option<Conn<ServerStream>>, SessionError> {
    if shared.stop_accepting.is_cancelled() {
        return Err(SessionError::Shutdown);
    }
    // Whether the session may be inspected is known from the login name alone; who the role
    // is a member of is read only after the server accepted its authentication, so an unknown
    // role, a wrong password and an unknown database get exactly the server's answers.
    let may_inspect = shared.policy.load_full().is_some_and(|p| !p.is_exempt(&rules::Identity::new([startup.user()])));
    let server = upstream::connect(shared).await.inspect_err(|_| shared.metrics.rejected(Rejected::Upstream))?;
    let server_tls = upstream::is_tls(&server);
    let mut server = Conn::new(server, Direction::FromServer, BytesMut::new());

    // Protocol negotiation, per leg: never forward `_pq_` options or a version we do not speak.
    let asked = startup.minor;
    let unsupported: Vec<&str> = startup.protocol_options().collect();
    let mut params: Vec<(String, String)> =
        startup.params.iter().filter(|(k, _)| !k.starts_with("_pq_.")).cloned().collect();
    if may_inspect {
        pin_settings(&mut params)?;
    }
    let mut minor = asked.min(NEWEST_MINOR);
    server.write_all(&messages::startup_message(minor, &params)).await?;
    server.flush().await?;

    // A `v` from the server (an older server asked for 3.2) is absorbed and re-issued to the
    // client together with the options we removed.
    // The server's first answer is part of connecting (as PgBouncer's server_connect_timeout
    // counts login): a server that accepts but never answers is a clear error, not a hang.
    let timeout = shared.config.upstream.connect_timeout;
    let first = tokio::time::timeout(timeout, server.read_frame())
        .await
        .map_err(|_| SessionError::Connect(format!("no answer to the startup message within {timeout:?}")))??
        .ok_or(SessionError::Truncated(Direction::FromServer))?;
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

    let relayed = match shared.config.auth.mode {
        crate::config::AuthMode::Relay => auth::relay(client, &mut server, server_tls).await?,
        crate::config::AuthMode::Scram => {
            let login = login::Login {
                shared,
                info,
                peer: info.client.parse::<SocketAddr>().ok().map(|a| a.ip()),
                client_tls: matches!(client.io, tokio_util::either::Either::Right(_)),
                server_cert_hash: upstream::cert_hash(&server.io),
            };
            login.run(client, &mut server).await?
        }
    };
    match relayed {
        auth::Relayed::Ok => {}
        auth::Relayed::Failed if shared.config.auth.mode == crate::config::AuthMode::Scram => return Ok(None),
        auth::Relayed::Failed => {
            shared.metrics.auth_failures_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            shared.audit.log(Event::session(EventKind::AuthFailed, info));
            return Ok(None);
        }
    }
    // The server may still refuse the login (an unknown database is reported after the
    // authentication): its answer is relayed first, then memberships are read.
    let (backend, ready) = after_auth(shared, client, &mut server, may_inspect).await?;
    // A quarantined role is refused once PostgreSQL accepted it (so the refusal tells an
    // unauthenticated client nothing), on every instance sharing the state table.
    if let Some(q) = shared.containment.quarantine_of(startup.user()) {
        shared.metrics.quarantine_refusals_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        shared.audit.log(
            Event::session(EventKind::AuthFailed, info)
                .rule("quarantine")
                .reason(&format!("role quarantined until {} ({})", q.until, q.reason)),
        );
        return Err(SessionError::Refused(Box::new(
            messages::ErrorResponse::fatal(
                messages::sqlstate::INVALID_AUTHORIZATION,
                format!("pgveil: role \"{}\" is quarantined until {}: {}", q.role, q.until, q.reason),
            )
            .with_hint("a security operator can release it with `pgveil admin release`"),
        )));
    }
    // With `audit.raw_access`, exempt sessions are inspected too, parse-only, to log their
    // reads of protected columns.
    let observe = shared.config.audit.raw_access && shared.policy.load_full().is_some_and(|p| !p.columns().is_empty());
    let mut rules = if may_inspect || observe { session_rules(shared, startup).await? } else { None };
    if let Some(r) = rules.as_mut() {
        // The search_path the server actually starts the session with (startup options,
        // role, database and server defaults), asked of the server rather than guessed: names
        // must resolve as the server resolves them (I12).
        let path = server_search_path(&mut server).await?;
        r.set_default_path(&path);
        if r.is_strict()
            && !r.observe
            && let Some(why) = r.path_problem()
        {
            tracing::warn!(user = startup.user(), search_path = %path, "masked session refused: {why}");
            return Err(SessionError::Refused(Box::new(
                messages::ErrorResponse::fatal(messages::sqlstate::INSUFFICIENT_PRIVILEGE, format!("pgveil: {why}"))
                    .with_hint("put pg_catalog first in search_path, or leave it out (it is then searched first)"),
            )));
        }
    }
    client.write_all(ready.as_bytes()).await?;
    client.flush().await?;
    tracing::debug!(inspected = rules.is_some(), "session ready");
    let Some(rules) = rules else { return Ok(Some(server)) };
    live.inspected.store(true, std::sync::atomic::Ordering::Relaxed);
    let ended = inspect::Inspector::new(shared, info, rules, backend, live).run(client, &mut server).await;
    ended.map(|()| None).map_err(|e| stopped_why(e, live))
}

/// Decides, once the server accepted the login, whether this session is inspected: it is
/// unless no rules are loaded or the identity is exempt. Fails closed when memberships cannot
/// be read (57P03).
async fn session_rules(
    shared: &Arc<Shared>,
    startup: &Startup,
) -> Result<Option<analysis::SessionRules>, SessionError> {
    let Some(policy) = shared.policy.load_full() else { return Ok(None) };
    let user = startup.user();
    let observe = shared.config.audit.raw_access && !policy.columns().is_empty();
    if policy.is_exempt(&rules::Identity::new([user])) {
        let identity = rules::Identity::new([user]);
        return Ok(observe.then(|| analysis::SessionRules::new(shared, policy, identity, user, startup.database())));
    }
    let catalog = shared.catalogs.for_db(startup.database());
    let roles = match catalog.memberships(&shared.config, user).await {
        Ok(r) if r.is_empty() => vec![user.to_owned()],
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read role memberships");
            return Err(SessionError::Refused(Box::new(
                messages::ErrorResponse::fatal(
                    messages::sqlstate::CANNOT_CONNECT_NOW,
                    "pgveil: cannot verify the role's memberships (the catalog connection is unavailable)",
                )
                .with_hint("retry shortly; the operator should check pgveil's catalog settings"),
            )));
        }
    };
    let identity = rules::Identity::new(roles.iter().map(String::as_str).chain([user]));
    if policy.is_exempt(&identity) {
        return Ok(observe.then(|| analysis::SessionRules::new(shared, policy, identity, user, startup.database())));
    }
    let rules = analysis::SessionRules::new(shared, policy, identity, user, startup.database());
    if rules.view.masked.values().any(|v| matches!(v.mask, rules::Mask::Hash { .. })) {
        // `hash` is computed by the function `pgveil init` installs, under a key whose
        // fingerprint must match this proxy's: without it the session cannot be served.
        let snapshot = rules.catalog.current(&shared.config, &shared.metrics).await.ok();
        let problem = match &snapshot {
            Some(c) => rules::catalog::Installed::problem(c.pgveil.as_ref(), rules.hash_key()),
            None => Some("the catalog connection is unavailable".to_owned()),
        };
        if let Some(problem) = problem {
            tracing::error!(database = startup.database(), %problem, "hash masks cannot be computed");
            return Err(SessionError::Refused(Box::new(
                messages::ErrorResponse::fatal(
                    messages::sqlstate::CANNOT_CONNECT_NOW,
                    format!(
                        "pgveil: this role's masks need `pgveil init` on database \"{}\": {problem}",
                        startup.database()
                    ),
                )
                .with_hint(
                    "the operator runs `pgveil init --against postgres://…/<database>` with PGVEIL_HASH_KEY set",
                ),
            )));
        }
    }
    Ok(Some(rules))
}

/// Settings that change how statements are lexed or values printed are pinned for inspected
/// sessions (threat model I9): appended to the startup options, which win over role defaults.
fn pin_settings(params: &mut Vec<(String, String)>) -> Result<(), SessionError> {
    if let Some((_, enc)) = params.iter().find(|(k, _)| k == "client_encoding")
        && relay::is_unsafe_encoding(enc.as_bytes())
    {
        return Err(SessionError::Refused(Box::new(messages::ErrorResponse::fatal(
            messages::sqlstate::FEATURE_NOT_SUPPORTED,
            format!("pgveil: client_encoding {enc} is not supported for sessions with masked columns; use UTF8"),
        ))));
    }
    // An unsafe encoding hidden in `options` (`-c client_encoding=SJIS`) is refused too.
    if let Some((_, opts)) = params.iter().find(|(k, _)| k == "options") {
        let lower = opts.to_ascii_lowercase();
        for part in lower.split(|c: char| c.is_whitespace()) {
            if let Some(v) = part.strip_prefix("client_encoding=").or_else(|| part.strip_prefix("--client_encoding="))
                && relay::is_unsafe_encoding(v.as_bytes())
            {
                return Err(SessionError::Refused(Box::new(messages::ErrorResponse::fatal(
                    messages::sqlstate::FEATURE_NOT_SUPPORTED,
                    format!("pgveil: client_encoding {v} is not supported for sessions with masked columns; use UTF8"),
                ))));
            }
        }
    }
    // Top-level startup keys are applied after `options`, so the pins are top-level keys too,
    // replacing any the client sent.
    const PINS: &str = "-c standard_conforming_strings=on -c bytea_output=hex -c DateStyle=ISO";
    const PINNED: &[(&str, &str)] = &[("standard_conforming_strings", "on"), ("bytea_output", "hex")];
    params.retain(|(k, _)| !PINNED.iter().any(|(p, _)| k.eq_ignore_ascii_case(p)));
    match params.iter_mut().find(|(k, _)| k == "options") {
        Some((_, v)) => {
            v.push(' ');
            v.push_str(PINS);
        }
        None => params.push(("options".to_owned(), PINS.to_owned())),
    }
    for (k, v) in PINNED {
        params.push(((*k).to_owned(), (*v).to_owned()));
    }
    Ok(())
}

/// Cancels whatever the backend is running (a `max_rows` cut).
pub(super) async fn cancel_backend(shared: &Shared, pid: u32, key: &[u8]) {
    let Ok(mut server) = upstream::connect(shared).await else { return };
    let _ = server.write_all(&messages::cancel_request(pid, key)).await;
    let _ = server.flush().await;
    let mut sink = [0u8; 1];
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut server, &mut sink))
            .await;
}

/// Asks the server for the session's search_path before the client's first statement (the
/// client has not seen ReadyForQuery yet, so nothing of its own is in flight).
async fn server_search_path(server: &mut Conn<ServerStream>) -> Result<String, SessionError> {
    let mut out = BytesMut::new();
    messages::tagged_parts(&mut out, b'Q', &[b"SELECT pg_catalog.current_setting('search_path')\0"]);
    server.write_all(&out).await?;
    server.flush().await?;
    let mut value = None;
    loop {
        let frame: Frame = server.read_frame().await?.ok_or(SessionError::Truncated(Direction::FromServer))?;
        match frame.tag() {
            b'D' => value = messages::first_cell(&frame).map(|v| String::from_utf8_lossy(v).into_owned()),
            b'T' | b'C' | b'N' | b'S' => {}
            b'Z' => return value.ok_or(SessionError::UnexpectedServerMessage(b'Z')),
            other => return Err(SessionError::UnexpectedServerMessage(other)),
        }
    }
}

/// Relays ParameterStatus and notices up to the first ReadyForQuery, replacing the server's
/// BackendKeyData with a sealed key of our own; returns that ReadyForQuery unsent.
async fn after_auth(
    shared: &Arc<Shared>,
    client: &mut Conn<ClientStream>,
    server: &mut Conn<ServerStream>,
    may_inspect: bool,
) -> Result<((u32, bytes::Bytes), Frame), SessionError> {
    let mut backend = (0, bytes::Bytes::new());
    loop {
        let frame: Frame = server.read_frame().await?.ok_or(SessionError::Truncated(Direction::FromServer))?;
        match frame.tag() {
            b'K' => {
                let (pid, key) = messages::backend_key(&frame).ok_or(SessionError::UnexpectedServerMessage(b'K'))?;
                backend = (pid, bytes::Bytes::copy_from_slice(key));
                let (client_pid, client_key) =
                    shared.cancel.seal(&crate::cancel::BackendKey { pid, key: key.to_vec() });
                let mut out = BytesMut::new();
                messages::backend_key_data(&mut out, client_pid, &client_key);
                client.write_all(&out).await?;
            }
            b'Z' => {
                // Held back: the caller decides whether the session may start, and sends it.
                return Ok((backend, frame));
            }
            b'E' => {
                client.write_all(frame.as_bytes()).await?;
                client.flush().await?;
                return Err(SessionError::ServerRefusedStartup);
            }
            b'S' => {
                // A role or database default can set a lexer setting the pins do not cover
                // (client_encoding): a session that may be masked does not start with it (I9).
                if may_inspect
                    && let Some((name, value)) = messages::parameter_status(&frame)
                    && ((name == b"client_encoding" && relay::is_unsafe_encoding(value))
                        || (name == b"standard_conforming_strings" && value != b"on"))
                {
                    return Err(SessionError::Refused(Box::new(messages::ErrorResponse::fatal(
                        messages::sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "pgveil: {} {} (a role or database default) is not supported for sessions with masked columns",
                            String::from_utf8_lossy(name),
                            String::from_utf8_lossy(value)
                        ),
                    ))));
                }
                client.write_all(frame.as_bytes()).await?;
            }
            b'N' => client.write_all(frame.as_bytes()).await?,
            other => return Err(SessionError::UnexpectedServerMessage(other)),
        }
    }
}

/// Forwards a client's cancel request to the backend its synthetic key maps to.
async fn cancel(shared: &Shared, pid: u32, key: &[u8]) {
    shared.metrics.cancel_requests_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Whatever the key opens to goes to the server, which ignores keys it did not issue.
    let target = shared.cancel.open(pid, key);
    let Ok(mut server) = upstream::connect(shared).await else { return };
    let _ = server.write_all(&messages::cancel_request(target.pid, &target.key)).await;
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
        Side::Policy => tracing::info!(error = %e, "session ended by policy"),
        Side::Internal => tracing::info!(error = %e, "session ended"),
    }
}

fn new_session_id() -> String {
    let mut b = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    hex::encode(b)
}
