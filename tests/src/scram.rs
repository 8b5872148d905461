//! `auth.mode: scram` with TLS on both legs: default libpq and tokio-postgres settings
//! (channel binding preferred) log in, wrong passwords and unknown roles fail alike, and a
//! changed password works at once.

use proxy::config::{AuthMode, UpstreamTls};

use crate::harness::client::{connect_tls, psql, stderr, stdout};
use crate::harness::{pg, proxy as harness_proxy};

async fn scram_proxy(cluster: &pg::Cluster) -> harness_proxy::ProxyHandle {
    harness_proxy::spawn_with(cluster, |c| {
        c.upstream.tls = UpstreamTls::VerifyFull;
        c.auth.mode = AuthMode::Scram;
        c.auth.query = Some("SELECT rolname, rolpassword FROM pgveil.lookup_verifier($1)".to_owned());
        c.catalog.user = Some("pgveil".to_owned());
        c.catalog.password = Some("pgveil_pw".to_owned());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_clients_log_in_with_tls_on_both_legs() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = scram_proxy(cluster).await;
    let base = format!("host=127.0.0.1 port={} dbname={} user=app_user password=app_user_pw", p.port(), db.name);
    // libpq defaults: sslmode=prefer, channel_binding=prefer.
    let q = "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let out = psql(&cluster.psql_bin(), &base, q);
    assert_eq!(stdout(&out).trim(), "app_user|t", "{}", stderr(&out));
    let out = psql(&cluster.psql_bin(), &format!("{base} channel_binding=require"), q);
    assert_eq!(stdout(&out).trim(), "app_user|t", "{}", stderr(&out));
    // tokio-postgres over TLS (it binds the channel when it can).
    let client = connect_tls(&format!("{base} sslmode=require"), &p.certs.ca).await.expect("tokio-postgres logs in");
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    // pgbench, with a script of its own.
    let script = std::env::temp_dir().join(format!("pgveil-scram-{:016x}.sql", rand::random::<u64>()));
    std::fs::write(&script, "SELECT 1;\n").unwrap();
    let out = std::process::Command::new(cluster.bin.join("pgbench"))
        .env("PGPASSWORD", "app_user_pw")
        .args(["-n", "-c", "2", "-t", "20", "-h", "127.0.0.1", "-p", &p.port().to_string(), "-U", "app_user", "-f"])
        .arg(&script)
        .arg(&db.name)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("number of failed transactions: 0") && text.contains("40/40"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_and_unknown_roles_fail_alike_and_new_passwords_work_at_once() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = scram_proxy(cluster).await;
    let conn = |user: &str, pw: &str| {
        format!("host=127.0.0.1 port={} dbname={} user={user} password={pw} sslmode=require", p.port(), db.name)
    };
    let wrong = psql(&cluster.psql_bin(), &conn("app_user", "nope"), "SELECT 1");
    assert!(stderr(&wrong).contains("password authentication failed for user \"app_user\""), "{}", stderr(&wrong));
    let ghost = psql(&cluster.psql_bin(), &conn("no_such_role", "nope"), "SELECT 1");
    assert!(stderr(&ghost).contains("password authentication failed for user \"no_such_role\""), "{}", stderr(&ghost));
    // A changed password works on the next login, and the old one no longer does.
    cluster.psql_admin("postgres", "CREATE ROLE rotating LOGIN PASSWORD 'first'").unwrap();
    let out = psql(&cluster.psql_bin(), &conn("rotating", "first"), "SELECT current_user");
    assert_eq!(stdout(&out).trim(), "rotating", "{}", stderr(&out));
    cluster.psql_admin("postgres", "ALTER ROLE rotating PASSWORD 'second'").unwrap();
    let out = psql(&cluster.psql_bin(), &conn("rotating", "second"), "SELECT current_user");
    assert_eq!(stdout(&out).trim(), "rotating", "{}", stderr(&out));
    let out = psql(&cluster.psql_bin(), &conn("rotating", "first"), "SELECT 1");
    assert!(!out.status.success());
    cluster.psql_admin("postgres", "DROP ROLE rotating").unwrap();
    // An md5-only role is refused with an error that says why (no downgrade).
    let out = psql(&cluster.psql_bin(), &conn("md5_user", "md5_pw"), "SELECT 1");
    assert!(stderr(&out).contains("has an md5 password"), "{}", stderr(&out));
    assert!(p.shared.metrics.auth_failures_total.load(std::sync::atomic::Ordering::Relaxed) >= 3);
}

/// A raw SCRAM exchange with a wrong proof; returns what followed the proof: the server's
/// answer and whether the connection was then closed (EOF) within a few seconds.
async fn failed_scram_exchange(port: u16, db: &str) -> (Vec<u8>, bool) {
    use bytes::{BufMut, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&crate::harness::startup_packet(&[("user", "app_user"), ("database", db)])).await.unwrap();
    let read_msg = async |s: &mut tokio::net::TcpStream| -> (u8, Vec<u8>) {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut body = vec![0; usize::try_from(len).unwrap() - 4];
        s.read_exact(&mut body).await.unwrap();
        (tag, body)
    };
    let (tag, body) = read_msg(&mut s).await;
    assert_eq!((tag, &body[..4]), (b'R', &[0, 0, 0, 10][..]), "AuthenticationSASL");
    let first = b"n,,n=,r=pgveilclientnonce";
    let mut m = BytesMut::new();
    m.put_slice(b"SCRAM-SHA-256\0");
    m.put_i32(i32::try_from(first.len()).unwrap());
    m.put_slice(first);
    let mut out = BytesMut::new();
    out.put_u8(b'p');
    out.put_u32(u32::try_from(m.len() + 4).unwrap());
    out.put_slice(&m);
    s.write_all(&out).await.unwrap();
    let (tag, body) = read_msg(&mut s).await;
    assert_eq!((tag, &body[..4]), (b'R', &[0, 0, 0, 11][..]), "AuthenticationSASLContinue");
    let server_first = String::from_utf8_lossy(&body[4..]).into_owned();
    let nonce = server_first.split(',').find_map(|p| p.strip_prefix("r=")).unwrap().to_owned();
    let proof = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 32]);
    let fin = format!("c=biws,r={nonce},p={proof}");
    let mut out = BytesMut::new();
    out.put_u8(b'p');
    out.put_u32(u32::try_from(fin.len() + 4).unwrap());
    out.put_slice(fin.as_bytes());
    s.write_all(&out).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(8), s.read_to_end(&mut rest)).await.is_ok();
    (rest, closed)
}

/// A failed SCRAM login ends with the server's error and a closed connection, as PostgreSQL
/// ends it: directly, relayed by pgveil, and with pgveil running SCRAM itself. (A driver's
/// SCRAM tests waited for that close and never exited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_scram_login_closes_the_connection_as_postgresql_does() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let relay = harness_proxy::spawn(cluster).await;
    let scram = harness_proxy::spawn_with(cluster, |c| {
        c.auth.mode = AuthMode::Scram;
        c.auth.query = Some("SELECT rolname, rolpassword FROM pgveil.lookup_verifier($1)".to_owned());
        c.catalog.user = Some("pgveil".to_owned());
        c.catalog.password = Some("pgveil_pw".to_owned());
    })
    .await;
    for (name, port) in [("direct", cluster.port), ("relay", relay.port()), ("scram", scram.port())] {
        let (rest, closed) = failed_scram_exchange(port, &db.name).await;
        assert!(closed, "{name}: the connection is closed after the failure");
        assert_eq!(rest.first(), Some(&b'E'), "{name}: an ErrorResponse first: {:?}", String::from_utf8_lossy(&rest));
        let text = String::from_utf8_lossy(&rest);
        assert!(text.contains("28P01") && text.contains("password authentication failed"), "{name}: {text}");
    }
}
