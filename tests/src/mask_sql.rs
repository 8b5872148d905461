//! The SQL form of every mask (what substitution makes the server compute) gives exactly what
//! the Rust mask (the result-column layer) gives, over edge and random values, in text and
//! binary results, against the real server. NULL stays NULL.

use rand::{Rng, SeedableRng};
use rules::mask::{Granularity, Mask, Masked};
use rules::sql::mask_sql;
use rules::types::{Decimal, Format, PgType};

use crate::harness::client::{connect_plain, url};
use crate::harness::{pg, proxy as harness_proxy};
use crate::masking::Raw;

fn random_text(rng: &mut rand::rngs::StdRng) -> String {
    const PIECES: &[&str] = &["a", "Z", "7", "-", " ", ".", "@", "é", "ü", "€", "_", "+", "x", "0", "ß", "'", "\\"];
    let n = rng.random_range(0..14);
    (0..n).map(|_| PIECES[rng.random_range(0..PIECES.len())]).collect()
}

/// ASCII letters, digits and separators only (the shapes of SSNs, phones, card numbers).
fn random_ascii(rng: &mut rand::rngs::StdRng) -> String {
    const PIECES: &[&str] = &["1", "9", "0", "a", "Z", "-", " ", ".", "(", ")", "+", "/"];
    let n = rng.random_range(0..16);
    (0..n).map(|_| PIECES[rng.random_range(0..PIECES.len())]).collect()
}

fn cases(rng: &mut rand::rngs::StdRng) -> Vec<(Mask, PgType, &'static str, Vec<String>)> {
    let mut texts: Vec<String> = [
        "",
        "@",
        "a@",
        "@b",
        "ab",
        "x@y@z",
        "john.doe@example.com",
        "Çé-ü-123",
        "900-00-0001",
        "+1 555 0100 001",
        "1",
        "12",
        "123",
        "1234",
        "12345",
        "a-b",
        "'quote'",
        "back\\slash",
        "12\n34",
        "tail\n",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    texts.extend((0..60).map(|_| random_text(rng)));
    texts.extend((0..80).map(|_| random_ascii(rng)));
    texts.extend(
        ["4000 0000 0000 0001", "-1234", "1234-", "a-bcde", "ab-cd-ef", "(555) 010-0001", "12-3"].map(String::from),
    );
    let numbers: Vec<String> =
        ["0", "-0.5", "1234.56", "999.5", "-1500", "1000000", "0.01", "-98765.43", "500", "-500"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain((0..30).map(|_| format!("{:.2}", rng.random_range(-100_000.0..100_000.0f64))))
            .collect();
    let ints: Vec<String> = ["0", "1", "-1", "499", "500", "-500", "2147483000", "-2147483000"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain((0..20).map(|_| rng.random_range(-1_000_000..1_000_000i64).to_string()))
        .collect();
    let dates: Vec<String> = ["1980-07-15", "2000-02-29", "1999-12-31", "2024-01-01", "1900-01-01"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain((0..20).map(|_| {
            format!(
                "{:04}-{:02}-{:02}",
                rng.random_range(1900..2100),
                rng.random_range(1..=12),
                rng.random_range(1..=28)
            )
        }))
        .collect();
    let stamps: Vec<String> = dates.iter().map(|d| format!("{d} 13:45:07.25")).collect();
    let partial = |f, l| Mask::Partial { keep_first: f, keep_last: l, fill: '*' };
    vec![
        (Mask::Redact, PgType::Text, "text", texts.clone()),
        (Mask::Redact, PgType::Numeric, "numeric", numbers.clone()),
        (Mask::Redact, PgType::Date, "date", dates.clone()),
        (Mask::Nullify, PgType::Text, "text", texts.clone()),
        (Mask::Email, PgType::Text, "text", texts.clone()),
        (partial(0, 4), PgType::Text, "text", texts.clone()),
        (partial(2, 2), PgType::Text, "text", texts.clone()),
        (partial(1, 0), PgType::Text, "text", texts.clone()),
        (partial(3, 4), PgType::Text, "text", texts.clone()),
        (Mask::Partial { keep_first: 0, keep_last: 2, fill: '#' }, PgType::Text, "text", texts.clone()),
        (Mask::Hash { length: 16 }, PgType::Text, "text", texts.clone()),
        (Mask::Hash { length: 7 }, PgType::Text, "text", texts.clone()),
        (Mask::Hash { length: 16 }, PgType::Int4, "integer", ints.clone()),
        (Mask::Hash { length: 16 }, PgType::Int8, "bigint", ints.clone()),
        (Mask::Hash { length: 16 }, PgType::Numeric, "numeric", ints.clone()),
        (Mask::Generalize(Granularity::Year), PgType::Date, "date", dates.clone()),
        (Mask::Generalize(Granularity::Month), PgType::Date, "date", dates.clone()),
        (Mask::Generalize(Granularity::Month), PgType::Timestamp, "timestamp without time zone", stamps.clone()),
        (Mask::Round(Decimal::parse("1000").unwrap()), PgType::Numeric, "numeric", numbers.clone()),
        (Mask::Round(Decimal::parse("0.5").unwrap()), PgType::Numeric, "numeric", numbers.clone()),
        (Mask::Round(Decimal::parse("100").unwrap()), PgType::Int4, "integer", ints.clone()),
        (Mask::Constant("n/a".to_owned()), PgType::Text, "text", texts),
        (Mask::Constant("2000-01-01".to_owned()), PgType::Date, "date", dates),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_masks_equal_the_rust_masks_in_text_and_binary() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let client = connect_plain(&url(cluster.port, "dba", &db.name, "sslmode=disable")).await.unwrap();
    client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let key = rules::HashKey::new(harness_proxy::HASH_KEY);
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let (mut compared, mut differences) = (0, Vec::new());
    for (mask, ty, sql_type, values) in cases(&mut rng) {
        for v in values.iter().map(Some).chain([None]) {
            let literal = v.map_or_else(|| "NULL".to_owned(), |s| mask_sql::literal(s));
            let col = format!("CAST({literal} AS {sql_type})");
            let sql = format!("SELECT {}", mask_sql::expr(&mask, &col, ty, sql_type, Some(&key)));
            // Text results (simple protocol).
            let text = match client.simple_query(&sql).await {
                Ok(msgs) => msgs.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
                    _ => None,
                }),
                Err(e) => {
                    differences.push(format!("{mask} {} {v:?}: server error {e}", ty.name()));
                    continue;
                }
            };
            let expected_text =
                v.and_then(|s| match rules::mask::apply(&mask, ty, Format::Text, s.as_bytes(), Some(&key)) {
                    Masked::Null => None,
                    Masked::Value(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                });
            compared += 1;
            if text != Some(expected_text.clone()) {
                differences.push(format!("{mask} {} {v:?}: SQL {text:?}, Rust {expected_text:?}", ty.name()));
            }
            // Binary results (extended protocol).
            let Ok(row) = client.query_one(sql.as_str(), &[]).await else { continue };
            let binary: Option<Raw> = row.get(0);
            let expected_binary = v.and_then(|s| {
                let input = rules::mask::text_to_binary(ty, s)?;
                match rules::mask::apply(&mask, ty, Format::Binary, &input, Some(&key)) {
                    Masked::Null => None,
                    Masked::Value(b) => Some(b.into_owned()),
                }
            });
            if binary.map(|r| r.0) != expected_binary {
                differences.push(format!("{mask} {} {v:?}: binary differs", ty.name()));
            }
        }
    }
    assert!(compared > 1000, "{compared}");
    assert!(differences.is_empty(), "{} of {compared} differ:\n{}", differences.len(), differences.join("\n"));
}
