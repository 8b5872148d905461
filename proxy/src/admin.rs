//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` (the process is alive) and
//! `/readyz` (accepting clients). A deliberately tiny HTTP/1.1 responder: one request per
//! connection, bounded request size, no keep-alive.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (mut sock, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => continue,
            },
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut used = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while used < buf.len() {
                    let n = sock.read(buf.get_mut(used..).unwrap_or_default()).await.ok()?;
                    if n == 0 {
                        break;
                    }
                    used = used.saturating_add(n);
                    if buf.get(..used).is_some_and(|b| b.windows(4).any(|w| w == b"\r\n\r\n")) {
                        break;
                    }
                }
                Some(())
            })
            .await;
            if !matches!(read, Ok(Some(()))) {
                return;
            }
            let head = String::from_utf8_lossy(buf.get(..used).unwrap_or_default());
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", shared.metrics.render()),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                "/readyz" if shared.ready.load(Ordering::Relaxed) => ("200 OK", "text/plain", "ready\n".to_owned()),
                "/readyz" => ("503 Service Unavailable", "text/plain", "not ready\n".to_owned()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
