//! The admin listener, served with hyper (HTTP/1.1). Open to anyone who can reach it:
//! `GET /metrics` (Prometheus text), `/healthz` (alive), `/readyz` (accepting clients).
//! Operator actions need `Authorization: Bearer <admin token>` (`admin.token_file` or
//! `PGVEIL_ADMIN_TOKEN`); without a configured token they are refused:
//!
//! - `GET /sessions`: live sessions (user, application, client, since, statements, blocks);
//! - `POST /sessions/{id}/terminate`;
//! - `GET /quarantines`; `POST /quarantines/{role}?for=15m&reason=…`; `DELETE /quarantines/{role}`.
//!
//! What a request means is decided by the pure [`route`] and [`authorize`] (property-tested);
//! this module's async part only does the I/O.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// The longest quarantine an operator may set in one request.
const MAX_QUARANTINE: Duration = Duration::from_secs(366 * 24 * 3600);
/// The quarantine an operator gets without `for=`.
const DEFAULT_QUARANTINE: Duration = Duration::from_secs(15 * 60);

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Healthz,
    Readyz,
    Sessions,
    Terminate(String),
    Quarantines,
    Quarantine {
        role: String,
        how_long: Duration,
        reason: String,
    },
    Release(String),
    /// A known path with the wrong method.
    Method,
    NotFound,
    /// A malformed request (bad escape, bad duration): the message says what.
    Bad(String),
}

impl Route {
    /// Whether the route changes or reveals session state (needs the token).
    pub fn needs_token(&self) -> bool {
        !matches!(self, Route::Metrics | Route::Healthz | Route::Readyz | Route::NotFound | Route::Method)
    }
}

/// Maps a method and a request target (`/path?query`) to a route. Never panics.
pub fn route(method: &str, target: &str) -> Route {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let Ok(parts) = parts.iter().map(|p| decode(p)).collect::<Result<Vec<String>, String>>() else {
        return Route::Bad("bad %-escape in the path".to_owned());
    };
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let get = method == "GET" || method == "HEAD";
    let post = method == "POST";
    match parts.as_slice() {
        ["metrics"] if get => Route::Metrics,
        ["healthz"] if get => Route::Healthz,
        ["readyz"] if get => Route::Readyz,
        ["sessions"] if get => Route::Sessions,
        ["sessions", id, "terminate"] if post => Route::Terminate((*id).to_owned()),
        ["quarantines"] if get => Route::Quarantines,
        ["quarantines", role] if post => {
            let mut how_long = DEFAULT_QUARANTINE;
            let mut reason = "quarantined by an operator".to_owned();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let Ok(v) = decode(&v.replace('+', " ")) else {
                    return Route::Bad("bad %-escape in the query".to_owned());
                };
                match k {
                    "for" => match crate::config::duration::parse(&v) {
                        Some(d) if !d.is_zero() && d <= MAX_QUARANTINE => how_long = d,
                        _ => return Route::Bad(format!("for={v:?}: expected a duration such as 15m, at most 366d")),
                    },
                    "reason" if v.chars().count() <= 500 => reason = v,
                    "reason" => return Route::Bad("reason: at most 500 characters".to_owned()),
                    _ => return Route::Bad(format!("unknown parameter {k:?}")),
                }
            }
            Route::Quarantine { role: (*role).to_owned(), how_long, reason }
        }
        ["quarantines", role] if method == "DELETE" => Route::Release((*role).to_owned()),
        ["metrics" | "healthz" | "readyz" | "sessions" | "quarantines"]
        | ["sessions", _, "terminate"]
        | ["quarantines", _] => Route::Method,
        _ => Route::NotFound,
    }
}

/// `%XX` escapes of a path segment or query value, as UTF-8.
fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0usize;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = b.get(i.saturating_add(1)..i.saturating_add(3)).ok_or("truncated escape")?;
            let hex = std::str::from_utf8(hex).map_err(|_| "bad escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad escape")?);
            i = i.saturating_add(3);
        } else {
            out.push(c);
            i = i.saturating_add(1);
        }
    }
    String::from_utf8(out).map_err(|_| "escape is not UTF-8".to_owned())
}

/// The outcome of checking a request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Ok,
    /// No admin token is configured: actions are refused (403).
    NotConfigured,
    /// Missing, malformed or wrong token (401).
    Denied,
}

/// Compares the `Authorization` header with the configured token in constant time.
pub fn authorize(configured: Option<&str>, header: Option<&[u8]>) -> Auth {
    let Some(token) = configured.filter(|t| !t.is_empty()) else { return Auth::NotConfigured };
    let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else { return Auth::Denied };
    let given = given.trim_ascii();
    if given.len() == token.len() && bool::from(subtle::ConstantTimeEq::ct_eq(given, token.as_bytes())) {
        Auth::Ok
    } else {
        Auth::Denied
    }
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (sock, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => continue,
            },
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(&shared, peer, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(16 * 1024)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn reply(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", format!("{v}\n"))
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

async fn handle<B>(shared: &Shared, peer: SocketAddr, req: &Request<B>) -> Response<Full<Bytes>> {
    let target = req.uri().path_and_query().map_or("/", hyper::http::uri::PathAndQuery::as_str);
    let route = route(req.method().as_str(), target);
    if route.needs_token() {
        let header = req.headers().get(hyper::header::AUTHORIZATION).map(hyper::header::HeaderValue::as_bytes);
        match authorize(shared.config.admin.token.as_deref(), header) {
            Auth::Ok => {}
            Auth::NotConfigured => {
                return error(
                    StatusCode::FORBIDDEN,
                    "admin actions are disabled: no admin token is configured (admin.token_file or PGVEIL_ADMIN_TOKEN)",
                );
            }
            Auth::Denied => {
                shared.metrics.admin_denied_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "admin request with a missing or wrong token");
                let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
                r.headers_mut()
                    .insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
                return r;
            }
        }
    }
    let by = format!("operator@{}", peer.ip());
    let c = &shared.containment;
    match route {
        Route::Metrics => reply(StatusCode::OK, "text/plain; version=0.0.4", shared.metrics.render()),
        Route::Healthz => reply(StatusCode::OK, "text/plain", "ok\n".to_owned()),
        Route::Readyz if shared.ready.load(Ordering::Relaxed) => {
            reply(StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        Route::Readyz => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".to_owned()),
        Route::Sessions => json(StatusCode::OK, &serde_json::json!({ "sessions": c.sessions() })),
        Route::Terminate(id) => {
            if c.terminate(shared, &id, &by) {
                json(StatusCode::OK, &serde_json::json!({ "terminated": id }))
            } else {
                error(StatusCode::NOT_FOUND, "no such session on this instance")
            }
        }
        Route::Quarantines => json(StatusCode::OK, &serde_json::json!({ "quarantines": c.quarantines() })),
        Route::Quarantine { role, how_long, reason } => match c.quarantine(shared, &role, how_long, &reason, &by).await
        {
            Ok(q) => json(StatusCode::OK, &serde_json::json!({ "quarantined": q, "shared": true })),
            Err(e) => json(StatusCode::OK, &serde_json::json!({ "quarantined": role, "shared": false, "warning": e })),
        },
        Route::Release(role) => match c.release(shared, &role, &by).await {
            Ok(true) => json(StatusCode::OK, &serde_json::json!({ "released": role })),
            Ok(false) => error(StatusCode::NOT_FOUND, "that role is not quarantined"),
            Err(e) => json(StatusCode::OK, &serde_json::json!({ "released": role, "shared": false, "warning": e })),
        },
        Route::Method => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        Route::NotFound => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
        Route::Bad(why) => error(StatusCode::BAD_REQUEST, &why),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/metrics"), Route::Metrics);
        assert_eq!(route("POST", "/metrics"), Route::Method);
        assert_eq!(route("GET", "/sessions"), Route::Sessions);
        assert_eq!(route("POST", "/sessions/ab12/terminate"), Route::Terminate("ab12".to_owned()));
        assert_eq!(
            route("POST", "/quarantines/app%20user?for=1h&reason=probing+ssn"),
            Route::Quarantine {
                role: "app user".to_owned(),
                how_long: Duration::from_secs(3600),
                reason: "probing ssn".to_owned()
            }
        );
        assert_eq!(
            route("POST", "/quarantines/x"),
            Route::Quarantine {
                role: "x".to_owned(),
                how_long: DEFAULT_QUARANTINE,
                reason: "quarantined by an operator".to_owned()
            }
        );
        assert!(matches!(route("POST", "/quarantines/x?for=forever"), Route::Bad(_)));
        assert!(matches!(route("POST", "/quarantines/x?for=0s"), Route::Bad(_)));
        assert!(matches!(route("POST", "/quarantines/x?drop=1"), Route::Bad(_)));
        assert!(matches!(route("POST", "/quarantines/%zz"), Route::Bad(_)));
        assert_eq!(route("DELETE", "/quarantines/x"), Route::Release("x".to_owned()));
        assert_eq!(route("GET", "/nothing"), Route::NotFound);
        assert!(!route("GET", "/metrics").needs_token());
        assert!(route("GET", "/sessions").needs_token());
    }

    #[test]
    fn tokens() {
        assert_eq!(authorize(None, Some(b"Bearer x")), Auth::NotConfigured);
        assert_eq!(authorize(Some(""), Some(b"Bearer ")), Auth::NotConfigured);
        assert_eq!(authorize(Some("s3cret"), None), Auth::Denied);
        assert_eq!(authorize(Some("s3cret"), Some(b"Bearer s3cre")), Auth::Denied);
        assert_eq!(authorize(Some("s3cret"), Some(b"bearer s3cret")), Auth::Denied);
        assert_eq!(authorize(Some("s3cret"), Some(b"Basic s3cret")), Auth::Denied);
        assert_eq!(authorize(Some("s3cret"), Some(b"Bearer s3cret")), Auth::Ok);
    }

    proptest! {
        #[test]
        fn the_parser_never_panics_and_actions_always_need_the_token(
            method in prop::sample::select(vec!["GET", "POST", "DELETE", "PUT", "HEAD", "x"]),
            target in "(/[a-z%0-9?=&+._-]{0,12}){0,4}",
            header in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            let r = route(method, &target);
            if !matches!(r, Route::Metrics | Route::Healthz | Route::Readyz | Route::NotFound | Route::Method) {
                prop_assert!(r.needs_token(), "{r:?}");
            }
            // Only the exact token opens the actions.
            let auth = authorize(Some("the-token"), Some(&header));
            prop_assert_eq!(auth == Auth::Ok, header.strip_prefix(b"Bearer ").is_some_and(|t| t.trim_ascii() == b"the-token"));
        }
    }
}
