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
