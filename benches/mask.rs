//! DataRow rewriting (ns per row with 0, 2 and all of 8 columns masked, text and binary) and
//! statement analysis (cache-free parse and analysis of a typical OLTP statement).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test and bench code: a panic is a failure report")]

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use criterion::{Criterion, criterion_group, criterion_main};
use proxy::protocol::Frame;
use proxy::protocol::messages::FieldDesc;
use proxy::session::rows::RowPlan;
use rules::Mask;
use rules::types::Format;

fn row(binary: bool) -> Frame {
    let mut out = BytesMut::new();
    out.put_u8(b'D');
    out.put_u32(0);
    out.put_u16(8);
    for c in 0..8 {
        if binary && c == 0 {
            out.put_i32(4);
            out.put_i32(123_456);
            continue;
        }
        let v = format!("900-00-{c:04}-some-text");
        out.put_i32(i32::try_from(v.len()).unwrap());
        out.put_slice(v.as_bytes());
    }
    let len = u32::try_from(out.len() - 1).unwrap();
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Frame::from_encoded(out.freeze()).unwrap()
}

fn fields() -> Vec<FieldDesc> {
    (0..8)
        .map(|c| FieldDesc {
            table_oid: 0,
            attnum: 0,
            type_oid: if c == 0 { 23 } else { 25 },
            typlen: -1,
            typmod: -1,
            format: 0,
        })
        .collect()
}

fn rewrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("datarow");
    for (fmt, binary) in [("text", false), ("binary", true)] {
        let frame = row(binary);
        let format = if binary { Format::Binary } else { Format::Text };
        for (label, masked) in [("0_masked", 0usize), ("2_masked", 2), ("8_masked", 8)] {
            let masks: Vec<Option<Mask>> = (0..8)
                .map(|i| {
                    (i < masked).then_some({
                        if i % 2 == 0 { Mask::Redact } else { Mask::Partial { keep_first: 0, keep_last: 4, fill: '*' } }
                    })
                })
                .collect();
            let plan = RowPlan::build(&fields(), |_| format, &masks, |_| None);
            let mut out = BytesMut::with_capacity(1 << 20);
            g.bench_function(format!("{fmt}_{label}"), |b| {
                b.iter(|| {
                    if out.len() > (1 << 19) {
                        out.clear();
                    }
                    if plan.is_identity() {
                        out.extend_from_slice(frame.as_bytes());
                    } else {
                        plan.rewrite(&frame, &mut out, None).unwrap();
                    }
                });
            });
        }
    }
    g.finish();
}

fn analysis(c: &mut Criterion) {
    let policy = Arc::new(
        rules::compile(
            include_str!("../rules/testdata/valid/spec-example.yaml"),
            &rules::CompileOptions { hash_key: Some(b"k".to_vec()) },
        )
        .unwrap(),
    );
    let view = policy.for_identity(&rules::Identity::new(["app_user"]));
    let cols = ["id", "name", "email", "ssn", "card_number", "phone", "birth_date", "balance", "notes"];
    let catalog = rules::catalog::Catalog::new([rules::catalog::Relation::text_table(
        1,
        rules::TableName::new("public", "customers"),
        cols.iter().map(|c| (*c).to_owned()),
    )]);
    let sql = "SELECT id, name, email, ssn FROM customers WHERE id = $1 AND name LIKE $2 ORDER BY id LIMIT 10";
    c.bench_function("parse_only_pg_query", |b| {
        b.iter(|| pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).map(|p| p.protobuf.stmts.len()));
    });
    c.bench_function("scan_only_pg_query", |b| {
        b.iter(|| pg_query::scan(sql).map(|p| p.tokens.len()));
    });
    // What the proxy runs for each new text: tokens straight from C, then the shape key.
    c.bench_function("scan_tokens_pg_query", |b| {
        b.iter(|| pg_query::scan_tokens(sql).map(|t| t.len()));
    });
    c.bench_function("shape_key_with_scan", |b| {
        b.iter(|| rules::sql::shape_key(sql));
    });
    c.bench_function("analyse_oltp_statement_uncached", |b| {
        b.iter(|| rules::sql::Analyzer::new(&view, &catalog, "app_user").analyze(sql));
    });
    // A hit: what every repeated statement text costs (the cache holds 10,000 other entries).
    let cache = proxy::session::analysis::Cache::new();
    let analysis = Arc::new(rules::sql::Analyzer::new(&view, &catalog, "app_user").analyze(sql));
    for i in 0..10_000 {
        cache.bench_store(7, format!("SELECT {i}").as_bytes(), &analysis);
    }
    cache.bench_store(7, sql.as_bytes(), &analysis);
    c.bench_function("analysis_cache_hit", |b| {
        b.iter(|| cache.bench_lookup(7, sql.as_bytes()).is_some());
    });
    // Substitution: parse, decide and rewrite a statement that reads masked columns, and
    // apply a cached rewrite to another text of the same shape (the simple protocol's case).
    let masked = "SELECT id, email, ssn FROM customers WHERE id = 42";
    c.bench_function("substitute_uncached", |b| {
        b.iter(|| rules::sql::Analyzer::new(&view, &catalog, "app_user").analyze(masked));
    });
    let rw = rules::sql::Analyzer::new(&view, &catalog, "app_user").analyze(masked).rewrite.unwrap();
    c.bench_function("rewrite_cached_shape", |b| {
        b.iter(|| rw.apply("SELECT id, email, ssn FROM customers WHERE id = 9001"));
    });
    // As the proxy does it: the scan made for the shape key is reused by the rewrite.
    let other = "SELECT id, email, ssn FROM customers WHERE id = 9001";
    let scanned = rules::sql::Scanned::new(other).unwrap();
    c.bench_function("rewrite_cached_shape_prescanned", |b| {
        b.iter(|| rw.apply_to(other, &scanned));
    });
    // As the proxy does it since templates: the text matched to a remembered one of its
    // shape and the compiled rewrite filled with its literals, no scan.
    let first = rules::sql::Scanned::new(masked).unwrap();
    let template = rules::sql::Template::new(masked, &first, Some(&rw)).unwrap();
    c.bench_function("rewrite_cached_shape_template", |b| {
        b.iter(|| template.apply(other));
    });
}

criterion_group!(benches, rewrite, analysis);
criterion_main!(benches);
