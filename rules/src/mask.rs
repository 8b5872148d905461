//! Masking functions over one cell: bytes + type + format in, a value of the same type and
//! format out. A mask never fails open: input it cannot read gets the type's redacted
//! placeholder, and a type it cannot produce gets NULL.
// Client bytes pass through here: no panic may be reachable from them (issue #9).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::types::{self, Decimal, Format, PgType};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    Year,
    Month,
}

/// A compiled mask of rules.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mask {
    Redact,
    Nullify,
    Email,
    Partial { keep_first: usize, keep_last: usize, fill: char },
    Hash { length: usize },
    Generalize(Granularity),
    Round(Decimal),
    Constant(String),
}

impl fmt::Display for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mask::Redact => f.write_str("redact"),
            Mask::Nullify => f.write_str("nullify"),
            Mask::Email => f.write_str("email"),
            Mask::Partial { keep_first, keep_last, fill } => {
                write!(f, "partial(keep_first={keep_first}, keep_last={keep_last}, fill={fill:?})")
            }
            Mask::Hash { length } => write!(f, "hash(length={length})"),
            Mask::Generalize(Granularity::Year) => f.write_str("generalize(year)"),
            Mask::Generalize(Granularity::Month) => f.write_str("generalize(month)"),
            Mask::Round(step) => write!(f, "round({})", step.to_text()),
            Mask::Constant(c) => write!(f, "constant({c:?})"),
        }
    }
}

/// The HMAC key for `hash`; `Debug` never shows it.
#[derive(Clone)]
pub struct HashKey(Arc<[u8]>);

impl HashKey {
    pub fn new(key: &[u8]) -> Self {
        HashKey(Arc::from(key))
    }

    /// Names the key without revealing it (`pgveil init` stores it, `run` checks it).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update(b"pgveil-hash-key-fingerprint-v1\0");
        h.update(&self.0);
        hex::encode(h.finalize().get(..12).unwrap_or_default())
    }

    /// HMAC-SHA-256's inner and outer padded keys (RFC 2104): what the installed SQL function
    /// needs to compute the same HMAC with core `sha256()`.
    pub fn pads(&self) -> ([u8; 64], [u8; 64]) {
        use sha2::Digest;
        let mut block = [0u8; 64];
        if self.0.len() > 64 {
            let d = Sha256::digest(&self.0);
            for (b, d) in block.iter_mut().zip(d.iter()) {
                *b = *d;
            }
        } else {
            for (b, k) in block.iter_mut().zip(self.0.iter()) {
                *b = *k;
            }
        }
        (block.map(|b| b ^ 0x36), block.map(|b| b ^ 0x5c))
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(..)")
    }
}

/// A masked cell: SQL NULL or the bytes of a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Masked<'a> {
    Null,
    Value(Cow<'a, [u8]>),
}

/// Whether `mask` can produce a valid value of `ty`; the error says why not.
pub fn fits(mask: &Mask, ty: PgType) -> Result<(), String> {
    let ok = match mask {
        Mask::Nullify => true,
        Mask::Redact => !matches!(ty, PgType::Other(_)),
        Mask::Email | Mask::Partial { .. } => ty.is_text(),
        Mask::Hash { .. } => {
            ty.is_text() || ty.is_integer() || matches!(ty, PgType::Uuid | PgType::Numeric | PgType::Bytea)
        }
        Mask::Generalize(_) => ty.is_datetime(),
        Mask::Round(step) => {
            ty.is_number()
                && (!ty.is_integer()
                    || step.scale == 0
                    || 10i128.checked_pow(step.scale).and_then(|p| step.mantissa.checked_rem(p)) == Some(0))
        }
        Mask::Constant(c) => ty.is_text() || (!matches!(ty, PgType::Other(_)) && text_to_binary(ty, c).is_some()),
    };
    if ok {
        return Ok(());
    }
    Err(match mask {
        Mask::Redact => format!("redact has no placeholder for type {}; use nullify", ty.name()),
        Mask::Email | Mask::Partial { .. } => format!("{} works on text columns, not {}", mask_name(mask), ty.name()),
        Mask::Hash { .. } => {
            format!("hash cannot produce a {} value; use it on text, integer, numeric, uuid or bytea", ty.name())
        }
        Mask::Generalize(_) => format!("generalize works on date and timestamp columns, not {}", ty.name()),
        Mask::Round(_) if ty.is_number() => format!("round needs a whole-number step for {}", ty.name()),
        Mask::Round(_) => format!("round works on numeric columns, not {}", ty.name()),
        Mask::Constant(c) => format!("constant {c:?} is not a valid {} value", ty.name()),
        Mask::Nullify => String::new(),
    })
}

pub fn mask_name(mask: &Mask) -> &'static str {
    match mask {
        Mask::Redact => "redact",
        Mask::Nullify => "nullify",
        Mask::Email => "email",
        Mask::Partial { .. } => "partial",
        Mask::Hash { .. } => "hash",
        Mask::Generalize(_) => "generalize",
        Mask::Round(_) => "round",
        Mask::Constant(_) => "constant",
    }
}

/// Masks one non-NULL cell. NULL cells stay NULL and never reach this function.
pub fn apply<'a>(mask: &'a Mask, ty: PgType, format: Format, input: &[u8], key: Option<&HashKey>) -> Masked<'a> {
    if matches!(mask, Mask::Nullify) || matches!(ty, PgType::Other(_)) {
        return Masked::Null;
    }
    if let (Mask::Redact, Format::Text) = (mask, format) {
        return Masked::Value(Cow::Borrowed(redact_text(ty).as_bytes()));
    }
    // Text-like types have the same bytes in both formats: mask them directly.
    let text: Cow<'_, str> = match format {
        Format::Text => match std::str::from_utf8(input) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => return placeholder(ty, format),
        },
        Format::Binary => match binary_to_text(ty, input) {
            Some(s) => Cow::Owned(s),
            None => return placeholder(ty, format),
        },
    };
    let Some(out) = mask_text(mask, ty, &text, key) else { return placeholder(ty, format) };
    match format {
        Format::Text => Masked::Value(Cow::Owned(out.into_bytes())),
        Format::Binary => {
            text_to_binary(ty, &out).map_or_else(|| placeholder(ty, format), |b| Masked::Value(Cow::Owned(b)))
        }
    }
}

/// The masked text of a value, or `None` when the input cannot be read as `ty`.
fn mask_text(mask: &Mask, ty: PgType, s: &str, key: Option<&HashKey>) -> Option<String> {
    match mask {
        Mask::Nullify => None,
        Mask::Redact => Some(redact_text(ty).to_owned()),
        Mask::Email => Some(email(s).unwrap_or_else(|| redact_text(ty).to_owned())),
        Mask::Partial { keep_first, keep_last, fill } => Some(partial(s, *keep_first, *keep_last, *fill)),
        Mask::Hash { length } => hash(ty, s, *length, key?),
        Mask::Generalize(g) => generalize(ty, s, *g),
        Mask::Round(step) => round(ty, s, *step),
        Mask::Constant(c) => Some(c.clone()),
    }
}

fn placeholder(ty: PgType, format: Format) -> Masked<'static> {
    match format {
        Format::Text => Masked::Value(Cow::Borrowed(redact_text(ty).as_bytes())),
        Format::Binary => text_to_binary(ty, redact_text(ty)).map_or(Masked::Null, |b| Masked::Value(Cow::Owned(b))),
    }
}

/// The fixed placeholder `redact` gives each type (text form).
pub fn redact_text(ty: PgType) -> &'static str {
    match ty {
        PgType::Text | PgType::Varchar | PgType::Bpchar | PgType::Name => "****",
        PgType::Int2 | PgType::Int4 | PgType::Int8 | PgType::Numeric | PgType::Float4 | PgType::Float8 => "0",
        PgType::Date => "1900-01-01",
        PgType::Timestamp => "1900-01-01 00:00:00",
        PgType::Timestamptz => "1900-01-01 00:00:00+00",
        PgType::Uuid => "00000000-0000-0000-0000-000000000000",
        PgType::Bool => "f",
        PgType::Json | PgType::Jsonb => "\"****\"",
        PgType::Bytea => "\\x",
        PgType::Other(_) => "",
    }
}

fn email(s: &str) -> Option<String> {
    let (local, domain) = s.rsplit_once('@')?;
    let first = local.chars().next()?;
    (!domain.is_empty()).then(|| format!("{first}***@{domain}"))
}

/// Whether `partial` may replace a character: ASCII letters and digits, and every non-ASCII
/// character (so the SQL form, `sql::mask_sql`, can name the same set in a regex class).
fn replaceable(c: char) -> bool {
    c.is_ascii_alphanumeric() || !c.is_ascii()
}

/// Keeps `keep_first` and `keep_last` of the replaceable characters; other characters are
/// separators and keep their place. When the mask would keep every replaceable character, it
/// keeps none: a short value is never shown whole.
pub fn partial(s: &str, keep_first: usize, keep_last: usize, fill: char) -> String {
    let total = s.chars().filter(|c| replaceable(*c)).count();
    let keep_all_risk = keep_first.saturating_add(keep_last) >= total;
    let mut seen: usize = 0;
    s.chars()
        .map(|c| {
            if !replaceable(c) {
                return c;
            }
            seen = seen.saturating_add(1);
            let keep = !keep_all_risk && (seen <= keep_first || seen > total.saturating_sub(keep_last));
            if keep { c } else { fill }
        })
        .collect()
}

fn hash(ty: PgType, s: &str, length: usize, key: &HashKey) -> Option<String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.0).ok()?;
    mac.update(s.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex = hex::encode(digest);
    let first8 = u64::from_be_bytes(digest.first_chunk::<8>().copied()?);
    Some(match ty {
        PgType::Uuid => {
            let h = hex.get(..32)?;
            format!("{}-{}-{}-{}-{}", h.get(..8)?, h.get(8..12)?, h.get(12..16)?, h.get(16..20)?, h.get(20..32)?)
        }
        PgType::Int2 => (first8 % 32_768).to_string(),
        PgType::Int4 => (first8 % 2_147_483_648).to_string(),
        PgType::Int8 => (first8 >> 1).to_string(),
        PgType::Numeric => (first8 % 1_000_000_000_000_000).to_string(),
        PgType::Bytea => format!("\\x{}", hex.get(..length.clamp(2, 64) & !1)?),
        _ => hex.get(..length.clamp(1, 64))?.to_owned(),
    })
}

fn generalize(ty: PgType, s: &str, g: Granularity) -> Option<String> {
    let (y, m, _) = types::parse_iso_date(s)?;
    let m = match g {
        Granularity::Year => 1,
        Granularity::Month => m,
    };
    let date = format!("{y:04}-{m:02}-01");
    Some(match ty {
        PgType::Date => date,
        PgType::Timestamp => format!("{date} 00:00:00"),
        PgType::Timestamptz => {
            // Keep the zone the server printed, so the value means the same instant style.
            let zone = s.get(19..).and_then(|rest| rest.find(['+', '-']).map(|i| &rest[i..])).unwrap_or("+00");
            format!("{date} 00:00:00{zone}")
        }
        _ => return None,
    })
}

fn round(ty: PgType, s: &str, step: Decimal) -> Option<String> {
    match ty {
        PgType::Float4 | PgType::Float8 => {
            let v: f64 = s.trim().parse().ok()?;
            let st = step.to_text().parse::<f64>().ok()?;
            if !v.is_finite() || st <= 0.0 {
                return None;
            }
            Some(format!("{}", (v / st).round() * st))
        }
        _ => {
            let out = Decimal::parse(s)?.round_to(step)?;
            if ty.is_integer() {
                let v = i64::try_from(
                    out.rescale(out.scale).and_then(|d| d.mantissa.checked_div(10i128.checked_pow(d.scale)?))?,
                )
                .ok()?;
                let fits = match ty {
                    PgType::Int2 => i16::try_from(v).is_ok(),
                    PgType::Int4 => i32::try_from(v).is_ok(),
                    _ => true,
                };
                return fits.then(|| v.to_string());
            }
            Some(out.to_text())
        }
    }
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// A value's text form to its binary wire form, or `None` if the text is not valid for `ty`.
pub fn text_to_binary(ty: PgType, s: &str) -> Option<Vec<u8>> {
    Some(match ty {
        PgType::Text | PgType::Varchar | PgType::Bpchar | PgType::Name => s.as_bytes().to_vec(),
        PgType::Json => {
            serde_json::from_str::<serde_json::Value>(s).ok()?;
            s.as_bytes().to_vec()
        }
        PgType::Jsonb => {
            serde_json::from_str::<serde_json::Value>(s).ok()?;
            let mut v = vec![1];
            v.extend_from_slice(s.as_bytes());
            v
        }
        PgType::Int2 => s.trim().parse::<i16>().ok()?.to_be_bytes().to_vec(),
        PgType::Int4 => s.trim().parse::<i32>().ok()?.to_be_bytes().to_vec(),
        PgType::Int8 => s.trim().parse::<i64>().ok()?.to_be_bytes().to_vec(),
        PgType::Float4 => s.trim().parse::<f32>().ok()?.to_be_bytes().to_vec(),
        PgType::Float8 => s.trim().parse::<f64>().ok()?.to_be_bytes().to_vec(),
        PgType::Numeric => types::numeric_to_binary(s)?,
        PgType::Date => {
            let (y, m, d) = types::parse_iso_date(s).filter(|_| s.len() == 10)?;
            i32::try_from(types::days_from_civil(y, m, d)).ok()?.to_be_bytes().to_vec()
        }
        PgType::Timestamp => parse_timestamp(s, false)?.to_be_bytes().to_vec(),
        PgType::Timestamptz => parse_timestamp(s, true)?.to_be_bytes().to_vec(),
        PgType::Uuid => {
            let hexed: String = s.chars().filter(|c| *c != '-').collect();
            let b = hex::decode(hexed).ok()?;
            (b.len() == 16).then_some(b)?
        }
        PgType::Bool => match s.trim() {
            "t" | "true" | "on" | "yes" | "1" => vec![1],
            "f" | "false" | "off" | "no" | "0" => vec![0],
            _ => return None,
        },
        PgType::Bytea => hex::decode(s.strip_prefix("\\x")?).ok()?,
        PgType::Other(_) => return None,
    })
}

/// A value's binary wire form to its text form (as the server prints it with DateStyle ISO,
/// UTC for timestamptz).
pub fn binary_to_text(ty: PgType, b: &[u8]) -> Option<String> {
    Some(match ty {
        PgType::Text | PgType::Varchar | PgType::Bpchar | PgType::Name | PgType::Json => {
            std::str::from_utf8(b).ok()?.to_owned()
        }
        PgType::Jsonb => std::str::from_utf8(b.strip_prefix(&[1])?).ok()?.to_owned(),
        PgType::Int2 => i16::from_be_bytes(*b.first_chunk::<2>().filter(|_| b.len() == 2)?).to_string(),
        PgType::Int4 => i32::from_be_bytes(*b.first_chunk::<4>().filter(|_| b.len() == 4)?).to_string(),
        PgType::Int8 => i64::from_be_bytes(*b.first_chunk::<8>().filter(|_| b.len() == 8)?).to_string(),
        PgType::Float4 => f32::from_be_bytes(*b.first_chunk::<4>().filter(|_| b.len() == 4)?).to_string(),
        PgType::Float8 => f64::from_be_bytes(*b.first_chunk::<8>().filter(|_| b.len() == 8)?).to_string(),
        PgType::Numeric => types::numeric_from_binary(b)?,
        PgType::Date => {
            let days = i32::from_be_bytes(*b.first_chunk::<4>().filter(|_| b.len() == 4)?);
            let (y, m, d) = types::civil_from_days(i64::from(days));
            if !(1..=9999).contains(&y) {
                return None;
            }
            format!("{y:04}-{m:02}-{d:02}")
        }
        PgType::Timestamp | PgType::Timestamptz => {
            let micros = i64::from_be_bytes(*b.first_chunk::<8>().filter(|_| b.len() == 8)?);
            let days = micros.div_euclid(MICROS_PER_DAY);
            let rem = micros.rem_euclid(MICROS_PER_DAY);
            let (y, m, d) = types::civil_from_days(days);
            if !(1..=9999).contains(&y) {
                return None;
            }
            let secs = rem / 1_000_000;
            let frac = rem % 1_000_000;
            let mut out = format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
            if frac != 0 {
                out.push_str(format!(".{frac:06}").trim_end_matches('0'));
            }
            if ty == PgType::Timestamptz {
                out.push_str("+00");
            }
            out
        }
        PgType::Uuid => {
            let h = hex::encode(b.first_chunk::<16>().filter(|_| b.len() == 16)?);
            format!("{}-{}-{}-{}-{}", h.get(..8)?, h.get(8..12)?, h.get(12..16)?, h.get(16..20)?, h.get(20..)?)
        }
        PgType::Bool => match b {
            [0] => "f".to_owned(),
            [1] => "t".to_owned(),
            _ => return None,
        },
        PgType::Bytea => format!("\\x{}", hex::encode(b)),
        PgType::Other(_) => return None,
    })
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]]` to microseconds since 2000-01-01 (UTC for tz).
fn parse_timestamp(s: &str, with_zone: bool) -> Option<i64> {
    let (y, m, d) = types::parse_iso_date(s)?;
    let rest = s.get(10..)?;
    let rest = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('T'))?;
    let time_end = rest.find(['+', '-']).unwrap_or(rest.len());
    let (time, zone) = rest.split_at(time_end);
    if !with_zone && !zone.is_empty() {
        return None;
    }
    let mut parts = time.split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let mi: i64 = parts.next()?.parse().ok()?;
    let sec_text = parts.next()?;
    let (sec, frac) = sec_text.split_once('.').unwrap_or((sec_text, ""));
    let sec: i64 = sec.parse().ok()?;
    let frac: i64 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").get(..6)?.parse().ok()? };
    if h > 24 || mi > 59 || sec > 60 {
        return None;
    }
    let mut offset = 0i64;
    if with_zone {
        let (sign, z) = match zone.split_at_checked(1)? {
            ("+", z) => (1, z),
            ("-", z) => (-1, z),
            _ => return None,
        };
        let mut zp = z.split(':');
        let zh: i64 = zp.next()?.parse().ok()?;
        let zm: i64 = zp.next().map_or(Some(0), |v| v.parse().ok())?;
        let zs: i64 = zp.next().map_or(Some(0), |v| v.parse().ok())?;
        offset = zh.checked_mul(3600)?.checked_add(zm.checked_mul(60)?)?.checked_add(zs)?.checked_mul(sign)?;
    }
    let days = types::days_from_civil(y, m, d);
    let seconds = h.checked_mul(3600)?.checked_add(mi.checked_mul(60)?)?.checked_add(sec)?.checked_sub(offset)?;
    days.checked_mul(MICROS_PER_DAY)?.checked_add(seconds.checked_mul(1_000_000)?)?.checked_add(frac)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn text(mask: &Mask, ty: PgType, input: &str) -> Option<String> {
        match apply(mask, ty, Format::Text, input.as_bytes(), Some(&HashKey::new(b"k1"))) {
            Masked::Null => None,
            Masked::Value(v) => Some(String::from_utf8(v.into_owned()).unwrap()),
        }
    }

    #[test]
    fn shapes_of_rules_md() {
        let keep4 = Mask::Partial { keep_first: 0, keep_last: 4, fill: '*' };
        assert_eq!(text(&keep4, PgType::Text, "123-45-6789").unwrap(), "***-**-6789");
        let phone = Mask::Partial { keep_first: 2, keep_last: 2, fill: '*' };
        assert_eq!(text(&phone, PgType::Text, "+1 555 0100 001").unwrap(), "+1 5** **** *01");
        assert_eq!(text(&Mask::Email, PgType::Text, "john.doe@example.com").unwrap(), "j***@example.com");
        assert_eq!(text(&Mask::Email, PgType::Text, "not an email").unwrap(), "****");
        assert_eq!(text(&Mask::Generalize(Granularity::Year), PgType::Date, "1984-07-12").unwrap(), "1984-01-01");
        assert_eq!(
            text(&Mask::Generalize(Granularity::Month), PgType::Timestamptz, "1984-07-12 10:11:12.5+02").unwrap(),
            "1984-07-01 00:00:00+02"
        );
        assert_eq!(text(&Mask::Round(Decimal::parse("1000").unwrap()), PgType::Numeric, "1234.56").unwrap(), "1000.00");
        assert_eq!(text(&Mask::Redact, PgType::Int4, "42").unwrap(), "0");
        assert_eq!(text(&Mask::Nullify, PgType::Text, "x"), None);
        let h = text(&Mask::Hash { length: 16 }, PgType::Text, "a@b.c").unwrap();
        assert_eq!(h.len(), 16);
        assert_eq!(h, text(&Mask::Hash { length: 16 }, PgType::Text, "a@b.c").unwrap(), "deterministic");
        let other_key =
            apply(&Mask::Hash { length: 16 }, PgType::Text, Format::Text, b"a@b.c", Some(&HashKey::new(b"k2")));
        assert_ne!(other_key, Masked::Value(Cow::Owned(h.into_bytes())), "keys matter");
    }

    #[test]
    fn short_values_are_never_kept_whole() {
        assert_eq!(partial("12", 1, 1, '*'), "**");
        assert_eq!(partial("1-2-3", 0, 2, '#'), "#-2-3");
    }

    #[test]
    fn binary_values_decode_in_their_type() {
        let round = Mask::Round(Decimal::parse("1000").unwrap());
        let input = types::numeric_to_binary("1234.56").unwrap();
        let Masked::Value(out) = apply(&round, PgType::Numeric, Format::Binary, &input, None) else { panic!() };
        assert_eq!(types::numeric_from_binary(&out).unwrap(), "1000.00");
        let date = i32::try_from(types::days_from_civil(1980, 1, 1)).unwrap().to_be_bytes();
        let Masked::Value(out) = apply(&Mask::Generalize(Granularity::Year), PgType::Date, Format::Binary, &date, None)
        else {
            panic!()
        };
        assert_eq!(binary_to_text(PgType::Date, &out).unwrap(), "1980-01-01");
        for ty in PgType::KNOWN {
            let Masked::Value(v) = apply(&Mask::Redact, ty, Format::Binary, b"\0\0\0\0", None) else {
                panic!("{ty:?}")
            };
            assert_eq!(binary_to_text(ty, &v).as_deref(), Some(redact_text(ty)), "{ty:?}");
        }
    }

    #[test]
    fn timestamps_round_trip() {
        for s in ["2024-03-01 10:00:00", "1999-12-31 23:59:59.123456", "1900-01-01 00:00:00"] {
            let b = text_to_binary(PgType::Timestamp, s).unwrap();
            assert_eq!(binary_to_text(PgType::Timestamp, &b).unwrap(), s);
        }
        let b = text_to_binary(PgType::Timestamptz, "2024-03-01 12:00:00+02").unwrap();
        assert_eq!(binary_to_text(PgType::Timestamptz, &b).unwrap(), "2024-03-01 10:00:00+00");
    }

    #[test]
    fn fits_explains() {
        assert!(fits(&Mask::Email, PgType::Int4).unwrap_err().contains("text columns"));
        assert!(fits(&Mask::Constant("abc".into()), PgType::Date).is_err());
        assert!(fits(&Mask::Constant("2020-01-01".into()), PgType::Date).is_ok());
        assert!(fits(&Mask::Round(Decimal::parse("0.5").unwrap()), PgType::Int4).is_err());
        assert!(fits(&Mask::Redact, PgType::Other(600)).is_err());
        assert!(fits(&Mask::Nullify, PgType::Other(600)).is_ok());
    }
}

/// What [`apply_into`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The masked value's bytes were appended.
    Value,
    /// The cell is SQL NULL; nothing was appended.
    Null,
}

/// As [`apply`], appending the masked value to `out` without an allocation for the common
/// masks on text-like columns (the hot path of result masking).
pub fn apply_into(
    mask: &Mask,
    ty: PgType,
    format: Format,
    input: &[u8],
    key: Option<&HashKey>,
    out: &mut bytes::BytesMut,
) -> Written {
    let text_like = ty.is_text() && (format == Format::Text || format == Format::Binary);
    match mask {
        Mask::Nullify => return Written::Null,
        Mask::Redact if format == Format::Text && !matches!(ty, PgType::Other(_)) => {
            out.extend_from_slice(redact_text(ty).as_bytes());
            return Written::Value;
        }
        Mask::Partial { keep_first, keep_last, fill } if text_like && input.is_ascii() && fill.is_ascii() => {
            // The bytes between the `keep_first`-th alphanumeric from the start and the
            // `keep_last`-th from the end are replaced: one scan from each end, then a
            // branch-free fill (this loop is most of a masked row's cost).
            let fill = u8::try_from(u32::from(*fill)).unwrap_or(b'*');
            let total = input.iter().filter(|b| b.is_ascii_alphanumeric()).count();
            let (from, to) = if keep_first.saturating_add(*keep_last) >= total {
                (0, input.len())
            } else {
                let alnums = || input.iter().enumerate().filter(|(_, b)| b.is_ascii_alphanumeric()).map(|(i, _)| i);
                let from = match keep_first.checked_sub(1) {
                    Some(n) => alnums().nth(n).map_or(0, |i| i.saturating_add(1)),
                    None => 0,
                };
                let to = match keep_last.checked_sub(1) {
                    Some(n) => {
                        let from_end = input.iter().enumerate().rev().filter(|(_, b)| b.is_ascii_alphanumeric());
                        from_end.map(|(i, _)| i).nth(n).unwrap_or(input.len())
                    }
                    None => input.len(),
                };
                (from, to)
            };
            let start = out.len();
            out.extend_from_slice(input);
            if let Some(masked) = out.get_mut(start.saturating_add(from)..start.saturating_add(to)) {
                for b in masked {
                    let alnum = b.is_ascii_alphanumeric();
                    *b = if alnum { fill } else { *b };
                }
            }
            return Written::Value;
        }
        Mask::Email if text_like => {
            if let Some(at) = input.iter().rposition(|&b| b == b'@')
                && at > 0
                && at.saturating_add(1) < input.len()
                && let Some(local) = input.get(..at)
                && let Ok(local) = std::str::from_utf8(local)
                && let Some(first) = local.chars().next()
            {
                let mut buf = [0u8; 4];
                out.extend_from_slice(first.encode_utf8(&mut buf).as_bytes());
                out.extend_from_slice(b"***");
                out.extend_from_slice(input.get(at..).unwrap_or_default());
            } else {
                out.extend_from_slice(b"****");
            }
            return Written::Value;
        }
        Mask::Constant(c) if text_like => {
            out.extend_from_slice(c.as_bytes());
            return Written::Value;
        }
        _ => {}
    }
    match apply(mask, ty, format, input, key) {
        Masked::Null => Written::Null,
        Masked::Value(v) => {
            out.extend_from_slice(&v);
            Written::Value
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod into_tests {
    use super::*;

    /// The fast paths give exactly what the general path gives.
    #[test]
    fn fast_paths_agree_with_apply() {
        let masks = [
            Mask::Redact,
            Mask::Email,
            Mask::Partial { keep_first: 0, keep_last: 4, fill: '*' },
            Mask::Partial { keep_first: 2, keep_last: 2, fill: '#' },
            Mask::Constant("n/a".into()),
        ];
        let inputs: [&[u8]; 6] =
            [b"123-45-6789", b"john.doe@example.com", b"+1 555 0100 001", b"ab", b"@x", b"no-at-sign"];
        for m in &masks {
            for input in inputs {
                for format in [Format::Text, Format::Binary] {
                    let mut out = bytes::BytesMut::new();
                    let w = apply_into(m, PgType::Text, format, input, None, &mut out);
                    let expected = apply(m, PgType::Text, format, input, None);
                    match expected {
                        Masked::Null => assert_eq!(w, Written::Null),
                        Masked::Value(v) => assert_eq!(&out[..], &v[..], "{m} on {:?}", String::from_utf8_lossy(input)),
                    }
                }
            }
        }
    }
    proptest::proptest! {
        /// The partial mask's in-place fast path equals the general one for any ASCII text
        /// and any numbers kept.
        #[test]
        fn partial_fast_path_agrees(input in "[ -~]{0,40}", first in 0usize..6, last in 0usize..6) {
            let m = Mask::Partial { keep_first: first, keep_last: last, fill: '*' };
            let mut out = bytes::BytesMut::new();
            apply_into(&m, PgType::Text, Format::Text, input.as_bytes(), None, &mut out);
            let expected = partial(&input, first, last, '*');
            proptest::prop_assert_eq!(&out[..], expected.as_bytes());
        }
    }
}
