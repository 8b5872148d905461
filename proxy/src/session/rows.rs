//! Result masking: a per-result plan compiled once from RowDescription (origins, types,
//! formats) and the statement's analysis, then applied to each DataRow. Untouched cells are
//! copied as slices; masked cells are replaced with type-correct values in the column's
//! format. A malformed row is an error (the session closes: fail closed).

use bytes::{BufMut, BytesMut};
use rules::catalog::{Catalog, RelKind};
use rules::mask::{self, Mask};
use rules::names::ColumnName;
use rules::types::{Format, PgType};
use rules::{HashKey, Identity, Policy};

use crate::protocol::Frame;
use crate::protocol::messages::FieldDesc;
use crate::protocol::wire::{Reader, begin, finish};

#[derive(Debug, Clone, PartialEq, Eq)]
struct CellPlan {
    mask: Mask,
    ty: PgType,
    format: Format,
}

/// How to mask the rows of one result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowPlan {
    cells: Vec<Option<CellPlan>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed DataRow from the server")]
pub struct RowError;

/// The format of column `i` under Bind's 0 / 1 / N rule.
pub fn format_at(codes: &[i16], i: usize) -> Format {
    let code = match codes {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    };
    Format::from_code(code).unwrap_or(Format::Text)
}

/// The mask RowDescription's origin implies: the column of a table, partition or inheritance
/// child (views are covered by the statement's analysis).
pub fn origin_mask<'p>(
    policy: &'p Policy,
    identity: &Identity,
    catalog: &Catalog,
    table_oid: u32,
    attnum: i16,
) -> Option<&'p Mask> {
    if table_oid == 0 || attnum <= 0 {
        return None;
    }
    let rel = catalog.by_oid(table_oid)?;
    if matches!(rel.kind, RelKind::View | RelKind::MaterializedView) {
        return None;
    }
    let col = rel.column_by_attnum(attnum)?;
    let names = std::iter::once(&col.name).chain(col.bound_name.as_ref());
    names
        .flat_map(|n| std::iter::once(&rel.name).chain(rel.ancestors.iter()).map(move |t| (t, n)))
        .find_map(|(t, n)| policy.column_mask(&ColumnName { table: t.clone(), column: n.clone() }, identity))
}

impl RowPlan {
    /// Combines the two layers (threat model I2): a column is masked if either says so.
    pub fn build(
        fields: &[FieldDesc],
        formats: impl Fn(usize) -> Format,
        analysed: &[Option<Mask>],
        origin: impl Fn(&FieldDesc) -> Option<Mask>,
    ) -> RowPlan {
        let cells = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let m = analysed.get(i).cloned().flatten().or_else(|| origin(f))?;
                let ty = PgType::from_oid(f.type_oid);
                // A mask that cannot produce this type's values falls back to one that can.
                let mask = if mask::fits(&m, ty).is_ok() {
                    m
                } else if mask::fits(&Mask::Redact, ty).is_ok() {
                    Mask::Redact
                } else {
                    Mask::Nullify
                };
                Some(CellPlan { mask, ty, format: formats(i) })
            })
            .collect();
        RowPlan { cells }
    }

    /// Whether rows pass untouched (their original bytes are forwarded).
    pub fn is_identity(&self) -> bool {
        self.cells.iter().all(Option::is_none)
    }

    /// Writes the masked row to `out`; returns the number of cells masked. Runs of cells that
    /// keep their value (and NULLs) are copied as one slice of the original row.
    pub fn rewrite(&self, row: &Frame, out: &mut BytesMut, key: Option<&HashKey>) -> Result<u64, RowError> {
        let body = row.body_ref();
        let mut r = Reader::new(body);
        let n = r.u16().ok_or(RowError)?;
        if usize::from(n) != self.cells.len() {
            return Err(RowError);
        }
        let at = begin(out, b'D');
        out.put_u16(n);
        let offset = |r: &Reader<'_>| body.len().saturating_sub(r.remaining());
        let mut run = offset(&r);
        let mut masked: u64 = 0;
        for plan in &self.cells {
            let cell_at = offset(&r);
            let cell = r.value().ok_or(RowError)?;
            let (Some(p), Some(v)) = (plan, cell) else { continue };
            out.extend_from_slice(body.get(run..cell_at).ok_or(RowError)?);
            run = offset(&r);
            masked = masked.saturating_add(1);
            let len_at = out.len();
            out.put_i32(0);
            match mask::apply_into(&p.mask, p.ty, p.format, v, key, out) {
                mask::Written::Null => {
                    out.truncate(len_at);
                    out.put_i32(-1);
                }
                mask::Written::Value => {
                    let written = out.len().saturating_sub(len_at.saturating_add(4));
                    let len = i32::try_from(written).map_err(|_| RowError)?;
                    if let Some(slot) = out.get_mut(len_at..len_at.saturating_add(4)) {
                        slot.copy_from_slice(&len.to_be_bytes());
                    }
                }
            }
        }
        if !r.is_empty() {
            return Err(RowError);
        }
        out.extend_from_slice(body.get(run..).ok_or(RowError)?);
        finish(out, at);
        Ok(masked)
    }
}

/// ErrorResponse / NoticeResponse for a masked session, without the fields that can echo
/// values (threat model I7 / B14): detail, hint, context and internal query are dropped; the
/// message of classes that quote data is replaced with a generic text. File, line and routine
/// (the server's own source location) are kept: drivers key on them (asyncpg recognises a
/// stale cached statement by routine `RevalidateCachedQuery`), and they hold no data.
pub fn scrub_error(frame: &Frame, out: &mut BytesMut) -> bool {
    scrub(frame, out, None)
}

/// As [`scrub_error`], with the error position (`P`) mapped back to the client's text when
/// the server ran a rewritten statement.
pub fn scrub_error_mapped(frame: &Frame, out: &mut BytesMut, position: &dyn Fn(usize) -> Option<usize>) -> bool {
    scrub(frame, out, Some(position))
}

/// `cache lookup failed for <object kind> <number>`: the internal error a backend raises for
/// an object dropped under a statement that still names it by OID (drivers' type caches
/// recognise it by this text, asyncpg among them). It carries an object kind and an OID,
/// nothing else, so it is kept as the server wrote it.
fn is_catalog_lookup_failure(message: &[u8]) -> bool {
    let Some(rest) = message.strip_prefix(b"cache lookup failed for ") else { return false };
    let Some(space) = rest.iter().rposition(|b| *b == b' ') else { return false };
    let (kind, number) = rest.split_at(space);
    let number = number.get(1..).unwrap_or_default();
    !kind.is_empty()
        && kind.iter().all(|b| b.is_ascii_lowercase() || *b == b' ')
        && !number.is_empty()
        && number.len() <= 10
        && number.iter().all(u8::is_ascii_digit)
}

fn scrub(frame: &Frame, out: &mut BytesMut, position: Option<&dyn Fn(usize) -> Option<usize>>) -> bool {
    let Some(fields) = crate::protocol::messages::error_fields(frame) else { return false };
    let code = fields.iter().find(|(c, _)| *c == b'C').map(|(_, v)| *v).unwrap_or_default();
    // Class 23 (integrity) keeps its message when it is PostgreSQL's own constraint error (it
    // names the constraint, field `n`): the server puts the offending values in DETAIL
    // (dropped below), never in the message, which drivers and frameworks match on. A 23xxx
    // raised by procedural code (no constraint named) can say anything: replaced.
    let names_constraint = fields.iter().any(|(c, _)| *c == b'n');
    let message = fields.iter().find(|(c, _)| *c == b'M').map(|(_, v)| *v).unwrap_or_default();
    let generic: Option<&[u8]> = match code.get(..2) {
        Some(b"XX") if is_catalog_lookup_failure(message) => None,
        Some(b"22") => Some(b"invalid input value (details hidden by pgveil)"),
        Some(b"23") if !names_constraint => Some(b"integrity constraint violated (details hidden by pgveil)"),
        Some(b"P0") => Some(b"error raised by procedural code (details hidden by pgveil)"),
        Some(b"XX") => Some(b"internal error (details hidden by pgveil)"),
        _ => None,
    };
    // Only a rewritten statement's position is mapped; one that cannot be is left out.
    let mapped: Option<Option<String>> = position.map(|map| {
        fields
            .iter()
            .find(|(c, _)| *c == b'P')
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<usize>().ok())
            .and_then(map)
            .map(|p| p.to_string())
    });
    let kept: Vec<(u8, &[u8])> = fields
        .iter()
        .filter(|(c, _)| !matches!(c, b'D' | b'H' | b'W' | b'q' | b'p'))
        .filter(|(c, _)| *c != b'P' || !matches!(mapped, Some(None)))
        .map(|(c, v)| match c {
            b'M' => (*c, generic.unwrap_or(v)),
            b'P' => (*c, mapped.as_ref().and_then(Option::as_deref).map_or(*v, str::as_bytes)),
            _ => (*c, *v),
        })
        .collect();
    crate::protocol::messages::encode_fields(out, frame.tag(), &kept);
    true
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn field(type_oid: u32) -> FieldDesc {
        FieldDesc { table_oid: 0, attnum: 0, type_oid, typlen: -1, typmod: -1, format: 0 }
    }

    fn data_row(cells: &[Option<&[u8]>]) -> Frame {
        let mut out = BytesMut::new();
        let at = begin(&mut out, b'D');
        out.put_u16(u16::try_from(cells.len()).unwrap());
        for c in cells {
            match c {
                None => out.put_i32(-1),
                Some(v) => {
                    out.put_i32(i32::try_from(v.len()).unwrap());
                    out.put_slice(v);
                }
            }
        }
        finish(&mut out, at);
        Frame::from_encoded(out.freeze()).unwrap()
    }

    #[test]
    fn masks_only_planned_cells_and_keeps_nulls() {
        let fields = [field(23), field(25), field(25)];
        let plan = RowPlan::build(&fields, |_| Format::Text, &[None, Some(Mask::Redact), Some(Mask::Email)], |_| None);
        let row = data_row(&[Some(b"7"), Some(b"900-00-0001"), None]);
        let mut out = BytesMut::new();
        assert_eq!(plan.rewrite(&row, &mut out, None), Ok(1), "NULL cells are not counted");
        let masked = Frame::from_encoded(out.freeze()).unwrap();
        let body = masked.body_ref();
        assert!(!body.windows(11).any(|w| w == b"900-00-0001"));
        assert!(body.windows(4).any(|w| w == b"****"));
        assert_eq!(&body[body.len() - 4..], &(-1i32).to_be_bytes(), "NULL stays NULL");
    }

    #[test]
    fn wrong_shapes_fail_closed() {
        let plan = RowPlan::build(&[field(25)], |_| Format::Text, &[Some(Mask::Redact)], |_| None);
        let mut out = BytesMut::new();
        assert_eq!(plan.rewrite(&data_row(&[Some(b"a"), Some(b"b")]), &mut out, None), Err(RowError));
        let bad = Frame::from_encoded(bytes::Bytes::from_static(b"D\0\0\0\x0a\0\x01\0\0\0\x09")).unwrap();
        assert_eq!(plan.rewrite(&bad, &mut out, None), Err(RowError));
    }

    #[test]
    fn masks_that_do_not_fit_fall_back() {
        let plan = RowPlan::build(&[field(23)], |_| Format::Binary, &[Some(Mask::Email)], |_| None);
        let mut out = BytesMut::new();
        plan.rewrite(&data_row(&[Some(&42i32.to_be_bytes())]), &mut out, None).unwrap();
        assert!(out.ends_with(&0i32.to_be_bytes()), "int4 redacted to 0 in binary");
    }

    #[test]
    fn internal_errors_keep_only_catalog_lookup_failures() {
        let scrubbed = |code: &'static str, message: &str| {
            let e = crate::protocol::messages::ErrorResponse::error(code, message);
            let f = Frame::from_encoded(e.to_bytes()).unwrap();
            let mut out = BytesMut::new();
            assert!(scrub_error(&f, &mut out));
            let back = Frame::from_encoded(out.freeze()).unwrap();
            let fields = crate::protocol::messages::error_fields(&back).unwrap();
            let m = fields.iter().find(|(c, _)| *c == b'M').map(|(_, v)| v.to_vec()).unwrap();
            String::from_utf8(m).unwrap()
        };
        assert_eq!(scrubbed("XX000", "cache lookup failed for type 16392"), "cache lookup failed for type 16392");
        assert_eq!(
            scrubbed("XX000", "cache lookup failed for access method 7"),
            "cache lookup failed for access method 7"
        );
        for other in [
            "cache lookup failed for type 900-00-0001",
            "cache lookup failed for type 12345678901",
            "cache lookup failed for 12",
            "cache lookup failed for type x 1; ssn 900000001",
            "could not find tuple for 'secret'",
        ] {
            assert_eq!(scrubbed("XX000", other), "internal error (details hidden by pgveil)", "{other}");
        }
    }

    #[test]
    fn bind_formats() {
        assert_eq!(format_at(&[], 3), Format::Text);
        assert_eq!(format_at(&[1], 3), Format::Binary);
        assert_eq!(format_at(&[0, 1], 1), Format::Binary);
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// A masked row never contains the raw cell of a masked column (for values longer
        /// than what the mask keeps), whatever the other cells hold.
        #[test]
        fn a_masked_row_never_contains_the_raw_cell(secret in "[A-Za-z0-9]{9,40}", other in "[ -~]{0,40}") {
            let fields = [FieldDesc { table_oid: 0, attnum: 0, type_oid: 25, typlen: -1, typmod: -1, format: 0 }; 2];
            for m in [Mask::Redact, Mask::Email, Mask::Partial { keep_first: 2, keep_last: 4, fill: '*' }, Mask::Nullify,
                      Mask::Hash { length: 16 }] {
                let plan = RowPlan::build(&fields, |_| Format::Text, &[Some(m.clone()), None], |_| None);
                let mut row = BytesMut::new();
                let at = begin(&mut row, b'D');
                row.put_u16(2);
                for v in [&secret, &other] {
                    row.put_i32(i32::try_from(v.len()).unwrap());
                    row.put_slice(v.as_bytes());
                }
                finish(&mut row, at);
                let frame = Frame::from_encoded(row.freeze()).unwrap();
                let mut out = BytesMut::new();
                plan.rewrite(&frame, &mut out, Some(&rules::HashKey::new(b"k"))).unwrap();
                let masked_cell = &out[11..out.len() - 4 - other.len()];
                prop_assert!(!masked_cell.windows(secret.len()).any(|w| w == secret.as_bytes()), "{} kept {}", m, secret);
            }
        }
    }
}

#[cfg(test)]
mod scrub_tests {
    use bytes::BytesMut;

    use super::scrub_error;
    use crate::protocol::Frame;
    use crate::protocol::messages::{encode_fields, error_fields};

    fn error(fields: &[(u8, &[u8])]) -> Frame {
        let mut b = BytesMut::new();
        encode_fields(&mut b, b'E', fields);
        Frame::from_encoded(b.freeze()).expect("a frame")
    }

    fn message(f: &Frame) -> (Vec<u8>, Vec<u8>) {
        let mut out = BytesMut::new();
        assert!(scrub_error(f, &mut out));
        let scrubbed = Frame::from_encoded(out.freeze()).expect("a frame");
        let fields = error_fields(&scrubbed).expect("fields");
        let get = |t: u8| fields.iter().find(|(c, _)| *c == t).map(|(_, v)| v.to_vec()).unwrap_or_default();
        (get(b'M'), get(b'D'))
    }

    #[test]
    fn integrity_errors_keep_the_servers_message_and_lose_their_detail() {
        let fk = error(&[
            (b'S', b"ERROR"),
            (b'C', b"23503"),
            (b'M', b"insert or update on table \"o\" violates foreign key constraint \"o_c_fkey\""),
            (b'D', b"Key (c)=(900-00-0001) is not present in table \"c\"."),
            (b'n', b"o_c_fkey"),
            (b'R', b"ri_ReportViolation"),
        ]);
        let (m, d) = message(&fk);
        assert!(m.starts_with(b"insert or update on table"), "{}", String::from_utf8_lossy(&m));
        assert!(d.is_empty(), "DETAIL quotes the key: dropped");
        // A 23xxx raised by procedural code names no constraint: its message can say anything.
        let raised = error(&[(b'S', b"ERROR"), (b'C', b"23505"), (b'M', b"ssn 900-00-0001 is taken")]);
        let (m, _) = message(&raised);
        assert_eq!(m, b"integrity constraint violated (details hidden by pgveil)");
    }
}
