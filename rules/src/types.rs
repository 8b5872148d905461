//! The column types masks know, and their text and binary wire forms (as `printtup` /
//! `*send` functions produce them). Anything else is `Other` and can only be nullified.

/// A result column's type, from RowDescription's type OID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PgType {
    Text,
    Varchar,
    Bpchar,
    Name,
    Int2,
    Int4,
    Int8,
    Numeric,
    Float4,
    Float8,
    Date,
    Timestamp,
    Timestamptz,
    Uuid,
    Bool,
    Json,
    Jsonb,
    Bytea,
    Other(u32),
}

impl PgType {
    pub fn from_oid(oid: u32) -> PgType {
        match oid {
            25 => Self::Text,
            1043 => Self::Varchar,
            1042 => Self::Bpchar,
            19 => Self::Name,
            21 => Self::Int2,
            23 => Self::Int4,
            20 => Self::Int8,
            1700 => Self::Numeric,
            700 => Self::Float4,
            701 => Self::Float8,
            1082 => Self::Date,
            1114 => Self::Timestamp,
            1184 => Self::Timestamptz,
            2950 => Self::Uuid,
            16 => Self::Bool,
            114 => Self::Json,
            3802 => Self::Jsonb,
            17 => Self::Bytea,
            other => Self::Other(other),
        }
    }

    /// From a catalog type name (`format_type` / `pg_type.typname`), for `check --against`.
    pub fn from_name(name: &str) -> PgType {
        let base = name.split('(').next().unwrap_or(name).trim();
        match base {
            "text" => Self::Text,
            "character varying" | "varchar" => Self::Varchar,
            "character" | "bpchar" | "char" => Self::Bpchar,
            "name" => Self::Name,
            "smallint" | "int2" => Self::Int2,
            "integer" | "int4" | "int" => Self::Int4,
            "bigint" | "int8" => Self::Int8,
            "numeric" | "decimal" => Self::Numeric,
            "real" | "float4" => Self::Float4,
            "double precision" | "float8" => Self::Float8,
            "date" => Self::Date,
            "timestamp without time zone" | "timestamp" => Self::Timestamp,
            "timestamp with time zone" | "timestamptz" => Self::Timestamptz,
            "uuid" => Self::Uuid,
            "boolean" | "bool" => Self::Bool,
            "json" => Self::Json,
            "jsonb" => Self::Jsonb,
            "bytea" => Self::Bytea,
            _ => Self::Other(0),
        }
    }

    pub fn oid(self) -> u32 {
        match self {
            Self::Text => 25,
            Self::Varchar => 1043,
            Self::Bpchar => 1042,
            Self::Name => 19,
            Self::Int2 => 21,
            Self::Int4 => 23,
            Self::Int8 => 20,
            Self::Numeric => 1700,
            Self::Float4 => 700,
            Self::Float8 => 701,
            Self::Date => 1082,
            Self::Timestamp => 1114,
            Self::Timestamptz => 1184,
            Self::Uuid => 2950,
            Self::Bool => 16,
            Self::Json => 114,
            Self::Jsonb => 3802,
            Self::Bytea => 17,
            Self::Other(oid) => oid,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Varchar => "varchar",
            Self::Bpchar => "bpchar",
            Self::Name => "name",
            Self::Int2 => "int2",
            Self::Int4 => "int4",
            Self::Int8 => "int8",
            Self::Numeric => "numeric",
            Self::Float4 => "float4",
            Self::Float8 => "float8",
            Self::Date => "date",
            Self::Timestamp => "timestamp",
            Self::Timestamptz => "timestamptz",
            Self::Uuid => "uuid",
            Self::Bool => "bool",
            Self::Json => "json",
            Self::Jsonb => "jsonb",
            Self::Bytea => "bytea",
            Self::Other(_) => "other",
        }
    }

    pub fn is_text(self) -> bool {
        matches!(self, Self::Text | Self::Varchar | Self::Bpchar | Self::Name)
    }

    pub fn is_integer(self) -> bool {
        matches!(self, Self::Int2 | Self::Int4 | Self::Int8)
    }

    pub fn is_number(self) -> bool {
        self.is_integer() || matches!(self, Self::Numeric | Self::Float4 | Self::Float8)
    }

    pub fn is_datetime(self) -> bool {
        matches!(self, Self::Date | Self::Timestamp | Self::Timestamptz)
    }

    /// Every type masks can produce values of; the rest only accept `nullify`.
    pub const KNOWN: [PgType; 18] = [
        Self::Text,
        Self::Varchar,
        Self::Bpchar,
        Self::Name,
        Self::Int2,
        Self::Int4,
        Self::Int8,
        Self::Numeric,
        Self::Float4,
        Self::Float8,
        Self::Date,
        Self::Timestamp,
        Self::Timestamptz,
        Self::Uuid,
        Self::Bool,
        Self::Json,
        Self::Jsonb,
        Self::Bytea,
    ];
}

/// Result format code of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Text,
    Binary,
}

impl Format {
    pub fn from_code(code: i16) -> Option<Format> {
        match code {
            0 => Some(Self::Text),
            1 => Some(Self::Binary),
            _ => None,
        }
    }
}

/// Days from 0000-03-01-based civil calendar (Howard Hinnant's algorithm), relative to
/// 2000-01-01, PostgreSQL's epoch.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468 - 10_957
}

pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 10_957 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses the leading `YYYY-MM-DD` of an ISO date or timestamp (DateStyle ISO).
pub fn parse_iso_date(s: &str) -> Option<(i64, u32, u32)> {
    let mut it = s.get(..10)?.split('-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: u32 = it.next()?.parse().ok()?;
    let d: u32 = it.next()?.parse().ok()?;
    ((1..=12).contains(&m) && (1..=31).contains(&d) && s.as_bytes().get(4) == Some(&b'-')).then_some((y, m, d))
}

/// A decimal number as an exact mantissa and scale (`123.45` = 12345, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    pub mantissa: i128,
    pub scale: u32,
}

impl Decimal {
    pub fn parse(s: &str) -> Option<Decimal> {
        let s = s.trim();
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut m: i128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            m = m.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        Some(Decimal { mantissa: if neg { -m } else { m }, scale: u32::try_from(frac.len()).ok()? })
    }

    pub fn rescale(self, scale: u32) -> Option<Decimal> {
        if scale >= self.scale {
            let f = 10i128.checked_pow(scale - self.scale)?;
            Some(Decimal { mantissa: self.mantissa.checked_mul(f)?, scale })
        } else {
            None
        }
    }

    /// Rounds to the nearest multiple of `step` (half away from zero), keeping this scale.
    pub fn round_to(self, step: Decimal) -> Option<Decimal> {
        let scale = self.scale.max(step.scale);
        let v = self.rescale(scale)?.mantissa;
        let s = step.rescale(scale)?.mantissa;
        if s <= 0 {
            return None;
        }
        let q = v.div_euclid(s);
        let r = v.rem_euclid(s);
        let q = if r.checked_mul(2)? >= s { q + 1 } else { q };
        // A tie on a negative value rounds away from zero as well.
        let q = if v < 0 && r.checked_mul(2)? == s { q - 1 } else { q };
        let out = Decimal { mantissa: q.checked_mul(s)?, scale };
        // Present it with the input's scale where that loses nothing.
        if out.scale > self.scale {
            let f = 10i128.checked_pow(out.scale - self.scale)?;
            if out.mantissa % f == 0 {
                return Some(Decimal { mantissa: out.mantissa / f, scale: self.scale });
            }
        }
        Some(out)
    }

    pub fn to_text(self) -> String {
        let neg = self.mantissa < 0;
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = usize::try_from(self.scale).unwrap_or(0);
        let padded =
            if digits.len() <= scale { format!("{}{digits}", "0".repeat(scale + 1 - digits.len())) } else { digits };
        let (int, frac) = padded.split_at(padded.len() - scale);
        let sign = if neg && self.mantissa != 0 { "-" } else { "" };
        if scale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") }
    }
}

/// Numeric's binary form: ndigits, weight, sign, dscale, then base-10000 digits.
pub fn numeric_to_binary(text: &str) -> Option<Vec<u8>> {
    let d = Decimal::parse(text)?;
    let neg = d.mantissa < 0;
    let scale = d.scale;
    // Align the fraction to whole base-10000 groups.
    let pad = (4 - scale % 4) % 4;
    let m = d.mantissa.unsigned_abs().checked_mul(10u128.checked_pow(pad)?)?;
    let frac_groups = i32::try_from((scale + pad) / 4).ok()?;
    let mut groups = Vec::new();
    let mut v = m;
    while v > 0 {
        groups.push(u16::try_from(v % 10_000).ok()?);
        v /= 10_000;
    }
    groups.reverse();
    let weight = i32::try_from(groups.len()).ok()? - frac_groups - 1;
    // Strip leading and trailing zero groups as the server does.
    let mut weight = weight;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let mut out = Vec::with_capacity(8 + 2 * groups.len());
    out.extend_from_slice(&i16::try_from(groups.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&i16::try_from(weight).ok()?.to_be_bytes());
    out.extend_from_slice(&(if neg { 0x4000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&u16::try_from(scale).ok()?.to_be_bytes());
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(out)
}

/// Numeric's binary form to text (finite values; NaN and infinities give `None`).
pub fn numeric_from_binary(b: &[u8]) -> Option<String> {
    let (head, rest) = b.split_first_chunk::<8>()?;
    let ndigits = usize::try_from(i16::from_be_bytes([head[0], head[1]])).ok()?;
    let weight = i64::from(i16::from_be_bytes([head[2], head[3]]));
    let sign = u16::from_be_bytes([head[4], head[5]]);
    let dscale = u32::from(u16::from_be_bytes([head[6], head[7]]));
    if sign != 0 && sign != 0x4000 || rest.len() != ndigits * 2 {
        return None;
    }
    let mut m: i128 = 0;
    for pair in rest.chunks_exact(2) {
        m = m.checked_mul(10_000)?.checked_add(i128::from(u16::from_be_bytes([pair[0], pair[1]])))?;
    }
    // value = m * 10000^(weight - ndigits + 1)
    let exp = (weight - i64::try_from(ndigits).ok()? + 1) * 4;
    let scaled = if exp >= 0 {
        Decimal { mantissa: m.checked_mul(10i128.checked_pow(u32::try_from(exp).ok()?)?)?, scale: 0 }
    } else {
        Decimal { mantissa: m, scale: u32::try_from(-exp).ok()? }
    };
    let scaled = Decimal { mantissa: if sign == 0x4000 { -scaled.mantissa } else { scaled.mantissa }, ..scaled };
    let out = if scaled.scale > dscale {
        let f = 10i128.checked_pow(scaled.scale - dscale)?;
        Decimal { mantissa: scaled.mantissa / f, scale: dscale }
    } else {
        scaled.rescale(dscale)?
    };
    Some(out.to_text())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(days_from_civil(2000, 1, 1), 0);
        assert_eq!(days_from_civil(1980, 1, 1), -7305);
        for days in [-800_000, -7305, -1, 0, 1, 59, 60, 366, 9000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn decimals() {
        let d = Decimal::parse("1234.56").unwrap();
        assert_eq!(d.round_to(Decimal::parse("1000").unwrap()).unwrap().to_text(), "1000.00");
        assert_eq!(
            Decimal::parse("-1500").unwrap().round_to(Decimal::parse("1000").unwrap()).unwrap().to_text(),
            "-2000"
        );
        assert_eq!(
            Decimal::parse("98765.43").unwrap().round_to(Decimal::parse("1000").unwrap()).unwrap().to_text(),
            "99000.00"
        );
        assert_eq!(Decimal::parse("0.05").unwrap().to_text(), "0.05");
        assert!(Decimal::parse("1e5").is_none());
    }

    #[test]
    fn numeric_binary_round_trips() {
        for s in ["0", "1234.56", "-98765.43", "0.0001", "100000000", "5.00", "12.5"] {
            let b = numeric_to_binary(s).unwrap();
            assert_eq!(numeric_from_binary(&b).unwrap(), s, "{s}");
        }
        // 1234.56 as the server sends it: ndigits 2, weight 0, dscale 2, digits 1234 5600.
        assert_eq!(numeric_to_binary("1234.56").unwrap(), [0, 2, 0, 0, 0, 0, 0, 2, 0x04, 0xd2, 0x15, 0xe0]);
    }
}
