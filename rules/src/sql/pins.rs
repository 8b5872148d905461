//! The pin checker (threat model I12): what pgveil writes must not resolve through the
//! session's search_path. A mask's SQL names every function, operator and type with its
//! schema (the grammar's own type keywords, such as `integer`, come out of the parser as
//! `pg_catalog.int4` and count as qualified). Debug builds run it on every masked output of
//! every substitution the proxy sends; the unit tests run it on every mask.

use serde_json::Value;

use super::walk::{str_field, strings};

/// Schemas pgveil's own SQL may call into.
const OWN_SCHEMAS: &[&str] = &["pg_catalog", super::mask_sql::SCHEMA];

/// The functions, operators and types in an expression tree that are not schema-qualified
/// (or are qualified with a schema other than pg_catalog and pgveil's own).
pub(crate) fn unpinned(tree: &Value) -> Vec<String> {
    let mut out = Vec::new();
    visit(tree, &mut out, 0);
    out
}

/// How deep the checker follows a tree (a mask nests a few dozen levels).
const MAX_DEPTH: usize = 600;

fn visit(v: &Value, out: &mut Vec<String>, depth: usize) {
    if depth > MAX_DEPTH {
        out.push("(too deep to check)".to_owned());
        return;
    }
    let next = depth.saturating_add(1);
    match v {
        Value::Array(a) => a.iter().for_each(|x| visit(x, out, next)),
        Value::Object(o) => {
            for (k, x) in o {
                let body = x.as_object();
                let names = match (k.as_str(), body) {
                    ("FuncCall", Some(b)) => Some(("function", strings(b.get("funcname")))),
                    ("AExpr", Some(b)) => Some(("operator", strings(b.get("name")))),
                    ("TypeName", Some(b)) => Some(("type", strings(b.get("names")))),
                    _ => None,
                };
                if let Some((what, parts)) = names {
                    let qualified = match parts.as_slice() {
                        [schema, _] => {
                            OWN_SCHEMAS.contains(&schema.as_str()) || (what == "type" && type_schema(schema))
                        }
                        _ => false,
                    };
                    // `x IS NULL`, CASE and the like are not AExprs; an AExpr without a name
                    // (none in PostgreSQL 15) would have nothing to resolve.
                    if !qualified && !parts.is_empty() {
                        out.push(format!("{what} {}", parts.join(".")));
                    }
                }
                if k == "TypeCast"
                    && let Some(tn) = body.and_then(|b| b.get("type_name")).and_then(Value::as_object)
                {
                    let parts = strings(tn.get("names"));
                    if !matches!(parts.as_slice(), [s, _] if type_schema(s)) {
                        out.push(format!("type {}", parts.join(".")));
                    }
                    if let Some(arg) = body.and_then(|b| b.get("arg")) {
                        visit(arg, out, next);
                    }
                    continue;
                }
                visit(x, out, next);
            }
        }
        _ => {}
    }
}

/// The field names of every column reference in a tree.
fn column_refs(v: &Value, out: &mut Vec<Vec<String>>, depth: usize) {
    if depth > MAX_DEPTH {
        out.push(vec!["(too deep to check)".to_owned()]);
        return;
    }
    match v {
        Value::Array(a) => a.iter().for_each(|x| column_refs(x, out, depth.saturating_add(1))),
        Value::Object(o) => {
            for (k, x) in o {
                if k == "ColumnRef" {
                    out.push(strings(x.get("fields")));
                } else {
                    column_refs(x, out, depth.saturating_add(1));
                }
            }
        }
        _ => {}
    }
}

/// A type may be the column's own, in its own schema (format_type qualifies it), but never
/// one of the session's temporary schema.
fn type_schema(schema: &str) -> bool {
    !schema.starts_with("pg_temp")
}

/// The unpinned names of one SQL expression (for tests: `SELECT <expr>` is parsed).
#[cfg(test)]
pub(crate) fn unpinned_in(expr: &str) -> Result<Vec<String>, String> {
    let parsed = pg_query::parse(&format!("SELECT {expr}"), pg_query::ParserOptions::DEFAULT)
        .map_err(|e| format!("does not parse: {e}"))?;
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(stmt) = raw.stmt.as_ref() else { continue };
        let tree = serde_json::to_value(stmt).map_err(|e| e.to_string())?;
        out.extend(unpinned(&tree));
    }
    Ok(out)
}

/// Every SELECT in the tree that reads exactly one relation for which `protected(schema,
/// name)` holds (the shape of a substitution): its outputs must be pinned, plain columns or
/// mask expressions in which every function, operator and type is qualified.
pub(crate) fn check_substitutions(
    tree: &Value,
    protected: &mut dyn FnMut(Option<&str>, &str) -> bool,
) -> Result<(), String> {
    let mut stack: Vec<(&Value, usize)> = vec![(tree, 0)];
    while let Some((v, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err("nests too deeply to check its pins".to_owned());
        }
        let next = depth.saturating_add(1);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, next))),
            Value::Object(o) => {
                if let Some(Value::Object(sel)) = o.get("SelectStmt")
                    && let Some([from]) = sel.get("from_clause").and_then(Value::as_array).map(Vec::as_slice)
                    && let Some(Value::Object(rv)) =
                        from.get("node").and_then(|n| n.get("RangeVar")).or_else(|| from.get("RangeVar"))
                    && protected(
                        str_field(rv, "schemaname").filter(|s| !s.is_empty()),
                        str_field(rv, "relname").unwrap_or(""),
                    )
                {
                    let rel = str_field(rv, "relname").unwrap_or("");
                    for t in sel.get("target_list").and_then(Value::as_array).into_iter().flatten() {
                        let found = unpinned(t);
                        if !found.is_empty() {
                            return Err(format!("a masked output over {rel} is not pinned: {}", found.join(", ")));
                        }
                    }
                    // Every column named through the substitution's own range variable: one the
                    // relation lost since pgveil read the catalog must fail, not bind outside.
                    let alias = rv.get("alias").and_then(|a| a.get("aliasname")).and_then(Value::as_str);
                    let mut refs = Vec::new();
                    for key in ["target_list", "where_clause"] {
                        if let Some(v) = sel.get(key) {
                            column_refs(v, &mut refs, 0);
                        }
                    }
                    let own = |fields: &Vec<String>| matches!(fields.as_slice(), [q, _] if Some(q.as_str()) == alias && Some(q.as_str()) == str_field(rv, "relname"));
                    if let Some(bad) = refs.iter().find(|f| !own(f)) {
                        return Err(format!(
                            "a column over {rel} is not qualified by its substitution: {}",
                            bad.join(".")
                        ));
                    }
                }
                stack.extend(o.values().map(|x| (x, next)));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{Granularity, HashKey, Mask};
    use crate::sql::mask_sql::expr;
    use crate::types::{Decimal, PgType};

    #[test]
    fn every_mask_is_pinned_for_every_type() {
        let key = HashKey::new(b"k");
        let masks = [
            Mask::Redact,
            Mask::Nullify,
            Mask::Email,
            Mask::Constant("n/a".to_owned()),
            Mask::Partial { keep_first: 0, keep_last: 4, fill: '*' },
            Mask::Partial { keep_first: 2, keep_last: 0, fill: '\\' },
            Mask::Partial { keep_first: 0, keep_last: 0, fill: '#' },
            Mask::Generalize(Granularity::Year),
            Mask::Round(Decimal::parse("0.5").unwrap()),
            Mask::Round(Decimal::parse("-100").unwrap()),
            Mask::Hash { length: 16 },
        ];
        let types = [
            (PgType::Text, "text"),
            (PgType::Varchar, "character varying(20)"),
            (PgType::Int4, "integer"),
            (PgType::Int2, "smallint"),
            (PgType::Int8, "bigint"),
            (PgType::Numeric, "numeric(10,2)"),
            (PgType::Float8, "double precision"),
            (PgType::Date, "date"),
            (PgType::Timestamptz, "timestamp(3) with time zone"),
            (PgType::Uuid, "uuid"),
            (PgType::Bytea, "bytea"),
            (PgType::Bpchar, "\"char\""),
            (PgType::Other(0), "public.mood"),
        ];
        let mut checked = 0;
        for m in &masks {
            for (ty, sql_type) in types {
                let e = expr(m, "c", ty, sql_type, Some(&key));
                let found = unpinned_in(&e).unwrap_or_else(|err| panic!("{m} {sql_type}: {err}\n{e}"));
                assert!(found.is_empty(), "{m} over {sql_type}: {found:?}\n{e}");
                checked += 1;
            }
        }
        assert_eq!(checked, masks.len() * types.len());
    }

    #[test]
    fn the_checker_finds_what_is_not_pinned() {
        let found = unpinned_in("length(c::text) || upper(c) = CAST(c AS pg_catalog.text)").unwrap();
        assert_eq!(found, ["operator =", "operator ||", "function length", "type text", "function upper"]);
        assert!(unpinned_in("c::integer").unwrap().is_empty(), "grammar keywords are pg_catalog's");
        assert_eq!(unpinned_in("scratch.length(c)").unwrap(), ["function scratch.length"]);
        assert_eq!(unpinned_in("c OPERATOR(scratch.||) c").unwrap(), ["operator scratch.||"]);
        assert_eq!(unpinned_in("CAST(c AS pg_temp.text)").unwrap(), ["type pg_temp.text"]);
        assert!(unpinned_in("CAST(c AS public.mood)").unwrap().is_empty(), "a column's own type, qualified");
    }

    #[test]
    fn types_are_pinned_as_format_type_writes_them() {
        use crate::sql::mask_sql::pin_type;
        for (given, pinned) in [
            ("text", "pg_catalog.text"),
            ("\"char\"", "pg_catalog.\"char\""),
            ("text[]", "pg_catalog.text[]"),
            ("character varying(20)", "character varying(20)"),
            ("timestamp(3) with time zone", "timestamp(3) with time zone"),
            ("integer[]", "integer[]"),
            ("public.mood", "public.mood"),
            ("\"My.Schema\".t", "\"My.Schema\".t"),
            ("timestamptz", "pg_catalog.timestamptz"),
            ("bit(64)", "bit(64)"),
            ("int4", "pg_catalog.int4"),
        ] {
            assert_eq!(pin_type(given), pinned, "{given}");
            assert!(unpinned_in(&format!("CAST(c AS {})", pin_type(given))).unwrap().is_empty(), "{given}");
        }
    }
}
