//! Framing and forwarding: splitting frames off a buffer (messages/s, bytes/s), and relaying
//! a stream frame by frame versus a plain `tokio::io::copy` over the same bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test and bench code: a panic is a failure report")]

use bytes::{BufMut, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use proxy::protocol::{Direction, decode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server stream: a RowDescription and `rows` DataRows of 8 text columns, then CommandComplete.
fn server_stream(rows: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    for i in 0..rows {
        let at = out.len();
        out.put_u8(b'D');
        out.put_u32(0);
        out.put_u16(8);
        for c in 0..8 {
            let v = format!("value-{i}-{c}-xxxxxxxx");
            out.put_i32(i32::try_from(v.len()).unwrap());
            out.put_slice(v.as_bytes());
        }
        let len = u32::try_from(out.len() - at - 1).unwrap();
        out[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
    }
    out.to_vec()
}

/// Splits every frame off the buffer; returns the bytes seen.
fn decode_all(buf: &mut BytesMut) -> usize {
    let mut n = 0;
    while let Ok(Some(f)) = decode(buf, Direction::FromServer) {
        n += f.len();
    }
    n
}

fn split(c: &mut Criterion) {
    let stream = server_stream(10_000);
    let mut g = c.benchmark_group("frame_split");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("decode_10k_datarows_msgs", |b| {
        b.iter_batched(|| BytesMut::from(stream.as_slice()), |mut buf| decode_all(&mut buf), BatchSize::SmallInput);
    });
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("decode_10k_datarows_bytes", |b| {
        b.iter_batched(|| BytesMut::from(stream.as_slice()), |mut buf| decode_all(&mut buf), BatchSize::SmallInput);
    });
    g.finish();
}

fn forward(c: &mut Criterion) {
    let stream = server_stream(20_000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut g = c.benchmark_group("forward");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.sample_size(20);
    g.bench_function("tokio_io_copy_baseline", |b| {
        b.iter(|| rt.block_on(relay(&stream, false)));
    });
    g.bench_function("frame_by_frame", |b| {
        b.iter(|| rt.block_on(relay(&stream, true)));
    });
    g.finish();
}

/// Sends `data` through a relay task over duplex pipes and drains the far end.
async fn relay(data: &[u8], framed: bool) -> usize {
    let (mut src_w, mut src_r) = tokio::io::duplex(64 * 1024);
    let (mut dst_w, mut dst_r) = tokio::io::duplex(64 * 1024);
    let payload = data.to_vec();
    let writer = tokio::spawn(async move {
        src_w.write_all(&payload).await.unwrap();
        src_w.shutdown().await.unwrap();
    });
    let relay = tokio::spawn(async move {
        if framed {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut out = BytesMut::with_capacity(64 * 1024);
            loop {
                while let Ok(Some(f)) = decode(&mut buf, Direction::FromServer) {
                    out.extend_from_slice(f.as_bytes());
                }
                if !out.is_empty() {
                    dst_w.write_all(&out).await.unwrap();
                    out.clear();
                }
                if src_r.read_buf(&mut buf).await.unwrap() == 0 {
                    break;
                }
            }
        } else {
            tokio::io::copy(&mut src_r, &mut dst_w).await.unwrap();
        }
        dst_w.shutdown().await.unwrap();
    });
    let mut sink = Vec::with_capacity(data.len());
    dst_r.read_to_end(&mut sink).await.unwrap();
    writer.await.unwrap();
    relay.await.unwrap();
    sink.len()
}

criterion_group!(benches, split, forward);
criterion_main!(benches);
