//! Bad input from clients: each gets a clear error or a closed connection, costs nothing else,
//! and other sessions carry on.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::client::{connect_plain, url};
use crate::harness::{pg, proxy as harness_proxy};
use crate::masking::RULES;

/// Everything the proxy sends until it closes the connection (bounded in time).
async fn drain(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection");
    out
}

fn startup(user: &str, db: &str) -> BytesMut {
    crate::harness::startup_packet(&[("user", user), ("database", db)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_clients_get_errors_and_others_carry_on() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |c| {
        c.limits.startup_timeout = Duration::from_secs(1);
    })
    .await;
    // A healthy session that must be unaffected by everything below.
    let healthy = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();

    // Garbage instead of a startup packet.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let reply = drain(&mut s).await;
    assert!(
        String::from_utf8_lossy(&reply).contains("invalid length of startup packet"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );

    // A length word of 2^31-1, and one below 8.
    for len in [0x7fff_ffffu32, 3] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(&len.to_be_bytes()).await.unwrap();
        let reply = drain(&mut s).await;
        assert!(String::from_utf8_lossy(&reply).contains("08P01"), "len {len}: {:?}", String::from_utf8_lossy(&reply));
    }

    // A truncated startup, then silence: closed after startup_timeout (slowloris).
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&startup("app_user", &db.name)[..10]).await.unwrap();
    let _ = drain(&mut s).await;

    // Plaintext smuggled behind an SSLRequest (CVE-2021-23214).
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut pkt = BytesMut::new();
    pkt.put_u32(8);
    pkt.put_u32(80_877_103);
    pkt.put_slice(&startup("app_user", &db.name));
    s.write_all(&pkt).await.unwrap();
    let reply = drain(&mut s).await;
    assert!(
        String::from_utf8_lossy(&reply).contains("unencrypted data after SSL request"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );

    // After login: an unknown message type, and a length below 4.
    for msg in [&b"Z\0\0\0\x04"[..], &b"Q\0\0\0\x02"[..]] {
        let mut s = crate::harness::client::raw_login(p.port(), &db.name).await;
        s.write_all(msg).await.unwrap();
        let reply = drain(&mut s).await;
        assert!(String::from_utf8_lossy(&reply).contains("08P01"), "{:?}: {:?}", msg, String::from_utf8_lossy(&reply));
    }

    // A message larger than the protocol allows for its type (Sync over 10,000 bytes).
    let mut s = crate::harness::client::raw_login(p.port(), &db.name).await;
    s.write_all(b"S\0\0\x27\x20").await.unwrap();
    let reply = drain(&mut s).await;
    assert!(String::from_utf8_lossy(&reply).contains("08P01"));

    // The healthy session never noticed.
    assert_eq!(healthy.query_one("SELECT 42", &[]).await.unwrap().get::<_, i32>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_masked_session_is_blocked_not_forwarded() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    // trust_user logs in without a password exchange and is masked like every non-exempt role.
    let mut s = crate::harness::client::raw_login(p.port(), &db.name).await;
    let body = b"SELECT '\xff\xfe' FROM customers\0";
    let mut msg = BytesMut::new();
    msg.put_u8(b'Q');
    msg.put_u32(u32::try_from(body.len() + 4).unwrap());
    msg.put_slice(body);
    s.write_all(&msg).await.unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !reply.windows(6).any(|w| w.starts_with(b"Z\0\0\0\x05")) {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("42501") && text.contains("UTF-8"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_clearly() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with(cluster, |c| c.limits.max_connections = 2).await;
    let a = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    let b = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    let err =
        connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.expect_err("third connection");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS), "{err}");
    assert_eq!(a.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.expect("a slot is free again");
    assert_eq!(c.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_clear_fatal_error() {
    let cluster = pg::cluster();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let p = harness_proxy::spawn_with(cluster, |c| c.upstream.port = port).await;
    let err = connect_plain(&url(p.port(), "app_user", "postgres", "sslmode=disable")).await.expect_err("no server");
    let msg = err.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert!(msg.contains("could not connect to the database server"), "{err}");
}

/// A client that asks for a huge result and stops reading: the proxy does not buffer it; the
/// back-pressure reaches the backend, which waits in `ClientWrite`, for the byte pump and for
/// the inspected relay alike. Other sessions carry on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_pushes_back_on_the_backend() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let pump = harness_proxy::spawn(cluster).await;
    let inspected = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    for (name, port) in [("pump", pump.port()), ("inspected", inspected.port())] {
        let mut s = crate::harness::client::raw_login(port, &db.name).await;
        // ~16 GB of rows, streamed (a set-returning function in the select list is not
        // materialized first): far more than every socket and proxy buffer together, and than
        // a proxy that buffered could hold.
        let marker = format!("stalled_{name}");
        let sql = format!("SELECT generate_series(1, 40000000) AS n, repeat('x', 400) AS {marker}\0");
        let mut msg = BytesMut::new();
        msg.put_u8(b'Q');
        msg.put_u32(u32::try_from(sql.len() + 4).unwrap());
        msg.put_slice(sql.as_bytes());
        s.write_all(&msg).await.unwrap();
        // ...and never read. The backend must end up blocked writing to its client.
        let probe = format!(
            "SELECT state || '/' || coalesce(wait_event, '') FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
        );
        let mut seen = String::new();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            seen = cluster.psql_admin(&db.name, &probe).unwrap().trim().to_owned();
            if seen == "active/ClientWrite" {
                break;
            }
        }
        assert_eq!(seen, "active/ClientWrite", "{name}: the backend should be held back by the stalled client");
        let other = connect_plain(&url(port, "app_user", &db.name, "sslmode=disable")).await.unwrap();
        assert_eq!(other.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7, "{name}");
        // Still blocked at every look over two seconds: nothing is draining the result into
        // memory (a proxy reading on would leave the backend busy producing rows instead).
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(cluster.psql_admin(&db.name, &probe).unwrap().trim(), "active/ClientWrite", "{name}");
        }
        drop(s);
    }
}

/// PostgreSQL closes the connection at Terminate and never reads what follows; so does pgveil,
/// as a byte pump and as the inspecting relay: no FATAL for a bad packet after Terminate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_terminate_are_ignored_as_postgresql_ignores_them() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let inspected = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let pump = harness_proxy::spawn(cluster).await;
    let mut after_terminate = BytesMut::new();
    after_terminate.put_u8(b'X');
    after_terminate.put_u32(4);
    // A bad packet: a length shorter than the length word itself, then junk.
    after_terminate.put_u8(b'Q');
    after_terminate.put_u32(2);
    after_terminate.put_slice(b"\xff\xfe junk");
    for (name, port) in [("direct", cluster.port), ("pump", pump.port()), ("inspected", inspected.port())] {
        let mut s = crate::harness::client::raw_login(port, &db.name).await;
        s.write_all(&after_terminate).await.unwrap();
        let rest = drain(&mut s).await;
        assert!(
            rest.is_empty(),
            "{name}: the connection closes without a word, got {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}
