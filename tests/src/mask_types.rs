//! Every mask on every type it fits, checked by the real server: the masked text value is
//! accepted as that type, and the masked binary value is accepted by the type's binary input.

use bytes::BytesMut;
use rules::mask::{self, Granularity, Mask, Masked};
use rules::types::{Decimal, Format, PgType};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};

use crate::harness::client::{connect_plain, url};
use crate::harness::pg;
use crate::masking::Raw;

/// A parameter sent as raw binary bytes of whatever type the statement declares.
#[derive(Debug)]
struct RawParam(Vec<u8>);

impl ToSql for RawParam {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    tokio_postgres::types::to_sql_checked!();
}

fn samples(ty: PgType) -> &'static [&'static str] {
    match ty {
        PgType::Text | PgType::Varchar | PgType::Bpchar | PgType::Name => {
            &["123-45-6789", "john.doe@example.com", "+1 555 0100 001", "Zoë Ünïcode 日本", "a", ""]
        }
        PgType::Int2 => &["0", "-32768", "32767", "1234"],
        PgType::Int4 => &["0", "-2147483648", "2147483647", "98765"],
        PgType::Int8 => &["0", "-9223372036854775808", "9223372036854775807", "1234567890123"],
        PgType::Numeric => &["0", "1234.56", "-98765.43", "0.0001", "123456789012345678901234.5678", "NaN"],
        PgType::Float4 => &["0", "1.5", "-3.25e10", "Infinity"],
        PgType::Float8 => &["0", "1234.56", "-1e300", "NaN"],
        PgType::Date => &["1984-07-12", "2000-02-29", "0044-03-15 BC", "infinity"],
        PgType::Timestamp => &["1984-07-12 10:11:12.345678", "2000-01-01 00:00:00", "infinity"],
        PgType::Timestamptz => &["1984-07-12 10:11:12+02", "1999-12-31 23:59:59.5+00"],
        PgType::Uuid => &["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
        PgType::Bool => &["t", "f"],
        PgType::Json | PgType::Jsonb => &["{\"a\": 1}", "[1, 2, \"x\"]", "\"s\""],
        PgType::Bytea => &["\\x0102ff", "\\x"],
        PgType::Other(_) => &[],
    }
}

fn masks() -> Vec<Mask> {
    vec![
        Mask::Redact,
        Mask::Nullify,
        Mask::Email,
        Mask::Partial { keep_first: 0, keep_last: 4, fill: '*' },
        Mask::Partial { keep_first: 2, keep_last: 2, fill: '#' },
        Mask::Hash { length: 16 },
        Mask::Hash { length: 8 },
        Mask::Generalize(Granularity::Year),
        Mask::Generalize(Granularity::Month),
        Mask::Round(Decimal::parse("1000").unwrap()),
        Mask::Round(Decimal::parse("0.5").unwrap()),
        Mask::Constant("0".into()),
        Mask::Constant("n/a".into()),
        Mask::Constant("2020-01-01".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_values_are_valid_values_of_their_type() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let client = connect_plain(&url(cluster.port, "app_user", &db.name, "sslmode=disable"))
        .await
        .expect("connect to the test cluster");
    let key = rules::HashKey::new(b"k");
    let mut checked = 0;
    for ty in PgType::KNOWN {
        let type_name = ty.name();
        let pg_type = Type::from_oid(ty.oid()).expect("a built-in type");
        let to_text = client
            .prepare_typed(&format!("SELECT $1::{type_name}::text"), std::slice::from_ref(&pg_type))
            .await
            .unwrap();
        for raw in samples(ty) {
            // The server's own text and binary forms of the sample.
            let row = client
                .query_one(&format!("SELECT $1::text::{type_name}::text, $1::text::{type_name}"), &[raw])
                .await
                .unwrap();
            let text: String = row.get(0);
            let binary = row.get::<_, Raw>(1).0;
            for m in masks() {
                if mask::fits(&m, ty).is_err() {
                    continue;
                }
                // Text format: the server accepts the masked text as the type.
                if let Masked::Value(v) = mask::apply(&m, ty, Format::Text, text.as_bytes(), Some(&key)) {
                    let masked = String::from_utf8(v.into_owned()).expect("masked text is UTF-8");
                    let ok = client.query_one(&format!("SELECT $1::text::{type_name}"), &[&masked]).await;
                    assert!(
                        ok.is_ok(),
                        "{m} on {type_name} {text:?} gave {masked:?}, which the server rejects: {ok:?}"
                    );
                    if ty.is_text() && text.chars().count() > 6 && !matches!(m, Mask::Constant(_)) {
                        assert_ne!(masked, text, "{m} kept {type_name} {text:?} whole");
                    }
                }
                // Binary format: the type's binary input accepts the masked bytes.
                if let Masked::Value(v) = mask::apply(&m, ty, Format::Binary, &binary, Some(&key)) {
                    let ok = client.query_one(&to_text, &[&RawParam(v.into_owned())]).await;
                    assert!(ok.is_ok(), "{m} on {type_name} {text:?} (binary): the server rejects it: {ok:?}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 150, "{checked} combinations checked");
    let _ = <Raw as FromSql>::accepts(&Type::TEXT);
}
