//! Real clients: tokio-postgres (with rustls) and the libpq command-line tools.

use std::path::Path;
use std::process::{Command, Output};

use tokio_postgres::{Client, NoTls};

/// Connects with tokio-postgres over TLS, verifying the server against `ca`.
pub async fn connect_tls(conn: &str, ca: &Path) -> Result<Client, tokio_postgres::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in proxy::tls::load_certs(ca).expect("CA file") {
        roots.add(cert).expect("CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    let (client, connection) = tokio_postgres::connect(conn, tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub async fn connect_plain(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs psql with `-X -At` and the given connection string; returns the whole output.
pub fn psql(psql: &Path, conn: &str, sql: &str) -> Output {
    Command::new(psql).args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", conn, "-c", sql]).output().expect("run psql")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A libpq connection string to the proxy for a fixture role.
pub fn url(port: u16, role: &str, db: &str, extra: &str) -> String {
    format!("host=127.0.0.1 port={port} user={role} password={role}_pw dbname={db} {extra}")
}

/// The (pid, secret key) of the first BackendKeyData in a server→client byte stream.
pub fn backend_key(stream: &[u8]) -> Option<(i32, Vec<u8>)> {
    let mut rest = stream;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let msg = rest.get(..1 + len)?;
        if msg[0] == b'K' && len >= 8 {
            return Some((i32::from_be_bytes([msg[5], msg[6], msg[7], msg[8]]), msg[9..].to_vec()));
        }
        rest = &rest[1 + len..];
    }
    None
}

/// Sends a CancelRequest the way libpq's `PQcancel` does: over a new plaintext connection,
/// then waits until the other end closes it. PostgreSQL closes it only after signalling the
/// backend (twice: the pid and its process group), so a statement sent after this returns
/// cannot be hit by this cancel. tokio-postgres's `cancel_query` returns as soon as the request
/// is written, and libpq's comment in `internal_cancel` names what that allows: "we might issue
/// another command only to find that our cancel zaps that command instead".
pub async fn cancel_and_wait(addr: std::net::SocketAddr, pid: i32, key: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect for the cancel");
    let mut request = Vec::with_capacity(12 + key.len());
    request.extend_from_slice(&u32::try_from(12 + key.len()).expect("key length").to_be_bytes());
    request.extend_from_slice(&80_877_102u32.to_be_bytes());
    request.extend_from_slice(&pid.to_be_bytes());
    request.extend_from_slice(key);
    conn.write_all(&request).await.expect("send the cancel request");
    let mut sink = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), conn.read_to_end(&mut sink))
        .await
        .expect("the cancel connection is closed")
        .expect("read to the cancel connection's end");
    assert!(sink.is_empty(), "a cancel request gets no answer, only a close: {sink:?}");
}

/// Logs in as trust_user and returns the stream positioned after the first ReadyForQuery.
pub async fn raw_login(port: u16, db: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&crate::harness::startup_packet(&[("user", "trust_user"), ("database", db)])).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed during login: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    s
}
