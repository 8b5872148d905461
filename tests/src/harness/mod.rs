//! The end-to-end harness: a throwaway PostgreSQL, the proxy in-process, real clients.
//! Holds no assertions about product behaviour.

pub mod certs;
pub mod client;
pub mod fault;
pub mod pg;
pub mod proxy;
pub mod recorder;

/// A fresh directory under the system temp dir.
pub fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pgveil-test-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&d).expect("a temp dir");
    d
}

/// A protocol 3.0 StartupMessage with these parameters.
pub fn startup_packet(params: &[(&str, &str)]) -> bytes::BytesMut {
    use bytes::BufMut;
    let mut b = bytes::BytesMut::new();
    b.put_u32(0);
    b.put_u32(196_608);
    for (k, v) in params {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = u32::try_from(b.len()).expect("a short packet").to_be_bytes();
    b[..4].copy_from_slice(&len);
    b
}
