//! `pgveil admin …`: operator actions against a running instance's admin listener (see
//! `admin`), with the bearer token from `--token-file` or `PGVEIL_ADMIN_TOKEN`.
#![allow(clippy::indexing_slicing, reason = "serde_json::Value's Index by key yields Null when missing, never panics")]

use std::fmt::Write as _;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

/// One action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Sessions,
    Terminate(String),
    Quarantines,
    Quarantine { role: String, how_long: String, reason: Option<String> },
    Release(String),
}

impl Action {
    fn request(&self) -> (&'static str, String) {
        let esc = |s: &str| -> String {
            s.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        char::from(b).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        };
        match self {
            Action::Sessions => ("GET", "/sessions".to_owned()),
            Action::Terminate(id) => ("POST", format!("/sessions/{}/terminate", esc(id))),
            Action::Quarantines => ("GET", "/quarantines".to_owned()),
            Action::Quarantine { role, how_long, reason } => {
                let mut t = format!("/quarantines/{}?for={}", esc(role), esc(how_long));
                if let Some(r) = reason {
                    let _ = write!(t, "&reason={}", esc(r));
                }
                ("POST", t)
            }
            Action::Release(role) => ("DELETE", format!("/quarantines/{}", esc(role))),
        }
    }
}

/// Runs an action against `addr` (`host:port`); returns the report and the exit code.
pub async fn run(addr: &str, token: Option<&str>, action: &Action) -> (String, u8) {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let (method, target) = action.request();
    match tokio::time::timeout(Duration::from_secs(10), send(addr, token, method, &target)).await {
        Ok(Ok((status, body))) if status.is_success() => (render(action, &body), 0),
        Ok(Ok((status, body))) => {
            let msg = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(body);
            (format!("pgveil admin: {status}: {}\n", msg.trim()), 1)
        }
        Ok(Err(e)) => (format!("pgveil admin: {addr}: {e}\n"), 2),
        Err(_) => (format!("pgveil admin: {addr}: no answer within 10 s\n"), 2),
    }
}

async fn send(
    addr: &str,
    token: Option<&str>,
    method: &str,
    target: &str,
) -> Result<(hyper::StatusCode, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(target).header(hyper::header::HOST, addr);
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn render(action: &Action, body: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else { return body.to_owned() };
    let s = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut out = String::new();
    match action {
        Action::Sessions => {
            let _ = writeln!(
                out,
                "{:<17} {:<14} {:<12} {:<16} {:<22} {:<24} {:>10} {:>6}",
                "SESSION", "USER", "DATABASE", "APPLICATION", "CLIENT", "SINCE", "STATEMENTS", "BLOCKS"
            );
            for r in v["sessions"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{:<17} {:<14} {:<12} {:<16} {:<22} {:<24} {:>10} {:>6}",
                    s(&r["session"]),
                    s(&r["user"]),
                    s(&r["database"]),
                    s(&r["application"]),
                    s(&r["client"]),
                    s(&r["since"]),
                    s(&r["statements"]),
                    s(&r["blocks"])
                );
            }
        }
        Action::Quarantines => {
            let _ = writeln!(out, "{:<16} {:<24} {:<22} REASON", "ROLE", "UNTIL", "BY");
            for r in v["quarantines"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{:<16} {:<24} {:<22} {}",
                    s(&r["role"]),
                    s(&r["until"]),
                    s(&r["by"]),
                    s(&r["reason"])
                );
            }
        }
        Action::Terminate(id) => {
            let _ = writeln!(out, "session {id} terminated");
        }
        Action::Quarantine { role, .. } => {
            let until = s(&v["quarantined"]["until"]);
            let _ = writeln!(out, "role {role} quarantined until {until}");
            if let Some(w) = v["warning"].as_str() {
                let _ = writeln!(out, "warning: {w}");
            }
        }
        Action::Release(role) => {
            let _ = writeln!(out, "role {role} released");
            if let Some(w) = v["warning"].as_str() {
                let _ = writeln!(out, "warning: {w}");
            }
        }
    }
    out
}
