//! `pgveil audit access` over a generated 100,000-line audit log (issue 16: under 2 s here).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test and bench code: a panic is a failure report")]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn review(c: &mut Criterion) {
    let log = proxy::access_review::sample_log(100_000);
    let mut g = c.benchmark_group("audit_access");
    g.sample_size(10);
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("review_100k_lines", |b| {
        b.iter(|| {
            let mut r = proxy::access_review::Review::default();
            r.add_text(&log, &proxy::access_review::Filter::default());
            r.table()
        });
    });
    g.finish();
}

criterion_group!(benches, review);
criterion_main!(benches);
