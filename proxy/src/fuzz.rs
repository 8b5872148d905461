//! Entry points of the fuzz targets (`fuzz/`), kept in the library so that every input that
//! ever found a bug runs again in plain `cargo test` (`proxy/tests/fuzz_regressions.rs`).
//!
//! Each function takes arbitrary bytes and must return without panicking; the checks inside
//! are invariants a wrong answer would break (a frame's length, a rewritten row's shape, a
//! masked cell never equal to the raw one).
#![allow(
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    reason = "fuzz targets report a broken invariant by panicking"
)]

use std::sync::{Arc, LazyLock};

use bytes::{BufMut, BytesMut};
use rules::catalog::Catalog;
use rules::mask::{self, Mask};
use rules::types::{Format, PgType};
use rules::{CompileOptions, HashKey, Identity, Policy};

use crate::protocol::messages::{self, FieldDesc};
use crate::protocol::{Direction, Frame, decode, startup};
use crate::session::rows::{RowPlan, scrub_error};

/// A fuzz target: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/regressions/<name>/` call them.
pub const TARGETS: [(&str, Target); 6] = [
    ("frame", frame),
    ("startup", startup),
    ("datarow", datarow),
    ("mask", mask),
    ("rules", rules),
    ("analysis", analysis),
];

/// The frame decoder in either direction, then every typed view of the frames it yields.
pub fn frame(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else { return };
    let dir = if first & 1 == 0 { Direction::FromClient } else { Direction::FromServer };
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(f)) = decode(&mut buf, dir) {
        assert!(f.len() >= 5, "a frame holds at least its tag and length");
        assert_eq!(f.body_ref().len().checked_add(5), Some(f.len()));
        let _ = messages::auth_request(&f);
        let _ = messages::backend_key(&f);
        let _ = messages::error_fields(&f);
        let _ = messages::negotiated_minor(&f);
        let _ = messages::row_description(&f);
        let _ = messages::query_text(&f);
        let _ = messages::parse_message(&f);
        let _ = messages::bind_message(&f);
        let _ = messages::target(&f);
        let _ = messages::execute_message(&f);
        let _ = messages::parameter_status(&f);
        let mut out = BytesMut::new();
        let _ = scrub_error(&f, &mut out);
    }
}

/// The startup packet parser (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest).
pub fn startup(data: &[u8]) {
    if let Some(word) = data.first_chunk::<4>() {
        let _ = startup::packet_len(*word);
    }
    if let Ok(startup::StartupPacket::Startup(s)) = startup::parse(data) {
        let _ = (s.user(), s.database(), s.application(), s.protocol_options().count());
    }
}

/// The DataRow rewriter: the first bytes choose the columns' types, formats and masks, the
/// rest is the row body. A rewritten row must be a well-formed DataRow of the same width.
pub fn datarow(data: &[u8]) {
    let Some((&width, rest)) = data.split_first() else { return };
    let width = usize::from(width % 6).saturating_add(1);
    let Some((spec, body)) = rest.split_at_checked(width) else { return };
    let fields: Vec<FieldDesc> = spec
        .iter()
        .map(|b| FieldDesc {
            table_oid: 0,
            attnum: 0,
            type_oid: pick(&PgType::KNOWN, *b).map_or(25, |t| t.oid()),
            typlen: -1,
            typmod: -1,
            format: i16::from(b & 0x80 != 0),
        })
        .collect();
    let masks: Vec<Option<Mask>> = spec.iter().map(|b| MASKS.get(usize::from(b >> 4)).cloned()).collect();
    let plan = RowPlan::build(
        &fields,
        |i| if fields.get(i).is_some_and(|f| f.format == 1) { Format::Binary } else { Format::Text },
        &masks,
        |_| None,
    );
    let mut row = BytesMut::with_capacity(body.len().saturating_add(5));
    row.put_u8(b'D');
    row.put_u32(u32::try_from(body.len().saturating_add(4)).unwrap_or(u32::MAX));
    row.put_slice(body);
    let Some(frame) = Frame::from_encoded(row.freeze()) else { return };
    let mut out = BytesMut::new();
    if plan.rewrite(&frame, &mut out, Some(&HASH_KEY)).is_ok() {
        let mut buf = out.clone();
        let rewritten = decode(&mut buf, Direction::FromServer).ok().flatten().expect("a rewritten row is one frame");
        assert!(buf.is_empty(), "nothing after the rewritten row");
        assert_eq!(rewritten.tag(), b'D');
        assert_eq!(rewritten.body_ref().get(..2), frame.body_ref().get(..2), "same number of columns");
    }
}

/// Every mask on every type it is applied to, in both formats: no panic; `redact` gives the
/// same value whatever the input (it cannot carry anything of it), and `hash` never returns
/// an input long enough to be a secret.
pub fn mask(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else { return };
    let Some(&ty) = pick(&PgType::KNOWN, sel) else { return };
    for m in MASKS.iter() {
        for format in [Format::Text, Format::Binary] {
            let out = mask::apply(m, ty, format, input, Some(&HASH_KEY));
            match (m, &out) {
                (Mask::Redact, mask::Masked::Value(v)) => {
                    // The reference: the redaction of another input of the same length (so a
                    // fixed-width binary value keeps its size); compared when both are values.
                    let other: Vec<u8> = input.iter().rev().map(|b| b ^ 0x01).collect();
                    if let mask::Masked::Value(w) = mask::apply(m, ty, format, &other, Some(&HASH_KEY)) {
                        assert_eq!(&**v, &*w, "redact depends on its input");
                    }
                }
                (Mask::Hash { .. }, mask::Masked::Value(v)) if input.len() > 8 => {
                    assert_ne!(&**v, input, "{m} returned the raw value");
                }
                _ => {}
            }
        }
    }
}

/// The rules loader: any text, valid YAML or not, gives a policy or diagnostics.
pub fn rules(data: &[u8]) {
    let src = String::from_utf8_lossy(data);
    if let Err(diags) = rules::compile(&src, &CompileOptions { hash_key: Some(b"fuzz".to_vec()) }) {
        for d in diags {
            let _ = d.render("fuzz.yaml", &src);
        }
    }
}

/// Statement analysis of any text for a masked session of the spec example's rules.
pub fn analysis(data: &[u8]) {
    let sql = String::from_utf8_lossy(data);
    let session = SPEC_POLICY.for_identity(&Identity::new(["app_user"]));
    let analysis = rules::sql::Analyzer::new(&session, &CATALOG, "app_user").analyze(&sql);
    if analysis.block.is_none() {
        for s in &analysis.statements {
            assert!(s.outputs.len() < 1 << 20);
        }
    }
    let _ = (rules::sql::normalize(&sql), rules::sql::fingerprint(&sql), rules::sql::shape_key(&sql));
}

fn pick<T>(items: &[T], b: u8) -> Option<&T> {
    items.get(usize::from(b) % items.len().max(1))
}

static HASH_KEY: LazyLock<HashKey> = LazyLock::new(|| HashKey::new(b"fuzz"));

static MASKS: LazyLock<[Mask; 9]> = LazyLock::new(|| {
    [
        Mask::Redact,
        Mask::Nullify,
        Mask::Email,
        Mask::Partial { keep_first: 1, keep_last: 4, fill: '*' },
        Mask::Hash { length: 12 },
        Mask::Generalize(mask::Granularity::Year),
        Mask::Generalize(mask::Granularity::Month),
        Mask::Round(rules::types::Decimal::parse("10").unwrap_or(rules::types::Decimal { mantissa: 10, scale: 0 })),
        Mask::Constant("0".to_owned()),
    ]
});

static SPEC_POLICY: LazyLock<Arc<Policy>> = LazyLock::new(|| {
    let src = include_str!("../../rules/testdata/valid/spec-example.yaml");
    Arc::new(
        rules::compile(src, &CompileOptions { hash_key: Some(b"fuzz".to_vec()) }).expect("the spec example compiles"),
    )
});

static CATALOG: LazyLock<Catalog> = LazyLock::new(rules::catalog::example);
