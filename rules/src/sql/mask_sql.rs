//! Each mask as an SQL expression over the raw value, of the column's own type, giving what
//! the Rust mask (`crate::mask`) gives for the same value: the substituted subquery computes
//! these, so the server never hands a raw protected value to anything the session observes.
//! NULL stays NULL. The hash key never appears here: `hash` calls the function `pgveil init`
//! installs, naming the key by its fingerprint.

use crate::mask::{Granularity, HashKey, Mask};
use crate::types::PgType;

/// Schema `pgveil init` installs, and the version of what it installs.
pub const SCHEMA: &str = "pgveil";
pub const SCHEMA_VERSION: i32 = 2;

/// SQL that creates or upgrades the `pgveil` schema (idempotent). The key rows are filled by
/// [`key_sql`].
pub fn init_sql() -> String {
    init_sql_for("pgveil")
}

/// As [`init_sql`], granting the proxy's catalog role (when it exists) what the shared
/// containment state needs: reading and writing `pgveil.quarantine`.
pub fn init_sql_for(catalog_role: &str) -> String {
    let role = literal(catalog_role);
    format!(
        "CREATE SCHEMA IF NOT EXISTS pgveil;
REVOKE ALL ON SCHEMA pgveil FROM PUBLIC;
GRANT USAGE ON SCHEMA pgveil TO PUBLIC;
CREATE TABLE IF NOT EXISTS pgveil.meta (version int NOT NULL);
REVOKE ALL ON pgveil.meta FROM PUBLIC;
GRANT SELECT ON pgveil.meta TO PUBLIC;
DELETE FROM pgveil.meta;
INSERT INTO pgveil.meta (version) VALUES ({SCHEMA_VERSION});
CREATE TABLE IF NOT EXISTS pgveil.keys (
  fingerprint text PRIMARY KEY,
  ipad bytea NOT NULL,
  opad bytea NOT NULL,
  created timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON pgveil.keys FROM PUBLIC;
CREATE OR REPLACE FUNCTION pgveil.hmac_hex(value text, key_fingerprint text) RETURNS text
  LANGUAGE sql STABLE STRICT SECURITY DEFINER PARALLEL SAFE
  SET search_path = pg_catalog
  AS $pgveil$
    SELECT encode(sha256(k.opad || sha256(k.ipad || convert_to(value, 'UTF8'))), 'hex')
    FROM pgveil.keys k WHERE k.fingerprint = key_fingerprint
  $pgveil$;
REVOKE ALL ON FUNCTION pgveil.hmac_hex(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgveil.hmac_hex(text, text) TO PUBLIC;
CREATE OR REPLACE FUNCTION pgveil.key_installed(key_fingerprint text) RETURNS boolean
  LANGUAGE sql STABLE STRICT SECURITY DEFINER SET search_path = pg_catalog
  AS $pgveil$ SELECT EXISTS (SELECT 1 FROM pgveil.keys WHERE fingerprint = key_fingerprint) $pgveil$;
GRANT EXECUTE ON FUNCTION pgveil.key_installed(text) TO PUBLIC;
CREATE OR REPLACE FUNCTION pgveil.key_fingerprints() RETURNS SETOF text
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog
  AS $pgveil$ SELECT fingerprint FROM pgveil.keys ORDER BY created $pgveil$;
GRANT EXECUTE ON FUNCTION pgveil.key_fingerprints() TO PUBLIC;
CREATE OR REPLACE FUNCTION pgveil.notify_ddl() RETURNS event_trigger LANGUAGE plpgsql
  SET search_path = pg_catalog
  AS $pgveil$ BEGIN PERFORM pg_notify('pgveil_ddl', current_database()); END $pgveil$;
DO $pgveil$ BEGIN
  -- Every DDL of every session tells the proxies to reload their catalog (event triggers
  -- need a superuser; without one the proxies reload every 30 s and after their own DDL).
  IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
     AND NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgveil_ddl') THEN
    CREATE EVENT TRIGGER pgveil_ddl ON ddl_command_end EXECUTE FUNCTION pgveil.notify_ddl();
  END IF;
END $pgveil$;
-- Containment shared by every instance (roles quarantined by the probe budget or an
-- operator); instances LISTEN on pgveil_quarantine and reload it when notified.
CREATE TABLE IF NOT EXISTS pgveil.quarantine (
  role text PRIMARY KEY,
  until timestamptz NOT NULL,
  reason text NOT NULL,
  by text NOT NULL,
  at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON pgveil.quarantine FROM PUBLIC;
DO $pgveil$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {role}) THEN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON pgveil.quarantine TO %I', {role});
  END IF;
END $pgveil$;
"
    )
}

/// The statement that installs `key` (its HMAC pads, never the key itself, and never in a
/// statement a masked session's server log shows next to data). Idempotent.
/// The same, as a statement with parameters (fingerprint, ipad, opad) for
/// [`key_sql_params`]: the pads then travel as bind values, not in the statement's text.
pub const KEY_INSERT: &str =
    "INSERT INTO pgveil.keys (fingerprint, ipad, opad) VALUES ($1, $2, $3) ON CONFLICT (fingerprint) DO NOTHING";

/// The bind values of [`KEY_INSERT`].
pub fn key_sql_params(key: &HashKey) -> (String, Vec<u8>, Vec<u8>) {
    let (ipad, opad) = key.pads();
    (key.fingerprint(), ipad.to_vec(), opad.to_vec())
}

/// The key row as one statement's text (throwaway clusters: the demo, the tests).
pub fn key_sql(key: &HashKey) -> String {
    let (ipad, opad) = key.pads();
    format!(
        "INSERT INTO pgveil.keys (fingerprint, ipad, opad) VALUES ('{}', '\\x{}', '\\x{}') ON CONFLICT (fingerprint) DO NOTHING",
        key.fingerprint(),
        hex::encode(ipad),
        hex::encode(opad)
    )
}

/// A string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The mask of `col` (an SQL expression of type `sql_type`) as an SQL expression of that type.
///
/// Every function, operator and type it writes is `pg_catalog`-qualified (or a grammar keyword
/// such as `integer`, which always means pg_catalog's type), so nothing in it resolves
/// through the session's search_path: a `pg_temp.text` domain or a user's `length(text)` in a
/// schema on the path never sees the raw value (threat model I12, CVE-2018-1058).
pub fn expr(mask: &Mask, col: &str, ty: PgType, sql_type: &str, key: Option<&HashKey>) -> String {
    let sql_type = pin_type(sql_type);
    let cast = |e: &str| format!("CAST({e} AS {sql_type})");
    let keep_null = |e: &str| cast(&format!("CASE WHEN {col} IS NULL THEN NULL ELSE {e} END"));
    match mask {
        Mask::Nullify => cast("NULL"),
        Mask::Redact => {
            if matches!(ty, PgType::Other(_)) {
                cast("NULL")
            } else {
                keep_null(&literal(crate::mask::redact_text(ty)))
            }
        }
        Mask::Constant(c) => keep_null(&literal(c)),
        Mask::Email => {
            // The domain is what follows the last `@` (split_part's field -1, PostgreSQL 14
            // and later); both it and the part before it must be non-empty. Without reverse()
            // and character counts: 0.088 against 0.190 s per 200,000 e-mails
            // (benches/results/mask-forms.md).
            let s = text(col);
            let domain = func("split_part", &[&s, &lit("@"), "-1"]);
            let local = op(&func("left", &[&s, "1"]), "||", &lit("***@"));
            let octets = |e: &str| func("octet_length", &[e]);
            cast(&format!(
                "CASE WHEN {col} IS NULL THEN NULL WHEN {} AND {} AND {} THEN {} ELSE {} END",
                op(&func("strpos", &[&s, &lit("@")]), ">", "0"),
                op(&domain, "<>", &lit("")),
                op(&op(&octets(&domain), "+", "1"), "<", &octets(&s)),
                op(&local, "||", &domain),
                lit("****")
            ))
        }
        Mask::Partial { keep_first, keep_last, fill } => partial(col, *keep_first, *keep_last, *fill, &cast),
        Mask::Generalize(g) => {
            let unit = match g {
                Granularity::Year => "year",
                Granularity::Month => "month",
            };
            let arg =
                if ty == PgType::Date { format!("CAST({col} AS timestamp without time zone)") } else { col.to_owned() };
            cast(&func("date_trunc", &[&lit(unit), &arg]))
        }
        Mask::Round(step) => {
            let st = format!("({})", step.to_text());
            match ty {
                PgType::Float4 | PgType::Float8 => {
                    cast(&op(&func("round", &[&format!("CAST({} AS numeric)", op(col, "/", &st))]), "*", &st))
                }
                t if t.is_integer() => {
                    cast(&op(&func("round", &[&op(&format!("CAST({col} AS numeric)"), "/", &st)]), "*", &st))
                }
                // The scale of the input and the step, presented with the input's scale where
                // that loses nothing: as the Rust mask does.
                _ => {
                    let r = op(&op(&func("round", &[&op(col, "/", &st)]), "*", &st), "+", &op(col, "-", col));
                    let scaled = func("round", &[&r, &func("scale", &[col])]);
                    cast(&format!("CASE WHEN {} THEN {scaled} ELSE {r} END", op(&r, "=", &scaled)))
                }
            }
        }
        Mask::Hash { length } => match key {
            Some(k) => hash(col, ty, *length, &k.fingerprint(), &cast),
            // No key: the proxy refuses to start; fail closed all the same.
            None => cast("NULL"),
        },
    }
}

/// A type as `format_type` writes it (under an empty search_path), pinned: its SQL-standard
/// spellings (`integer`, `character varying(20)`, `timestamp(3) with time zone`, …) are the
/// grammar's own and always mean pg_catalog's types; a qualified name stays as it is; any
/// other name is a pg_catalog type (`text`, `"char"`, `uuid[]`) and gets its schema written.
pub fn pin_type(t: &str) -> std::borrow::Cow<'_, str> {
    const GRAMMAR: &[&str] = &[
        "bigint",
        "bit",
        "boolean",
        "character",
        "double",
        "integer",
        "interval",
        "numeric",
        "real",
        "smallint",
        "time",
        "timestamp",
    ];
    let t = t.trim();
    let word_end = t.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(t.len());
    if GRAMMAR.contains(&t.get(..word_end).unwrap_or("")) {
        return t.into();
    }
    let mut quoted = false;
    for c in t.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => return t.into(),
            '(' | '[' | ' ' if !quoted => break,
            _ => {}
        }
    }
    format!("pg_catalog.{t}").into()
}

/// `pg_catalog.name(args…)`.
fn func(name: &str, args: &[&str]) -> String {
    format!("pg_catalog.{name}({})", args.join(", "))
}

/// `(l OPERATOR(pg_catalog.o) r)`: the operator pinned, the precedence explicit.
fn op(l: &str, o: &str, r: &str) -> String {
    format!("({l} OPERATOR(pg_catalog.{o}) {r})")
}

/// An expression as pg_catalog's text.
fn text(e: &str) -> String {
    format!("CAST({e} AS pg_catalog.text)")
}

/// A text literal, typed (no unknown-type literal is left for operator resolution).
fn lit(s: &str) -> String {
    text(&literal(s))
}

/// Characters `partial` may replace: ASCII letters and digits, and every non-ASCII character
/// (the Rust mask counts the same ones).
const ALNUM: &str = "0-9A-Za-z\\u0080-\\U0010FFFF";

fn partial(col: &str, first: usize, last: usize, fill: char, cast: &dyn Fn(&str) -> String) -> String {
    let s = text(col);
    let fill_re = if fill == '\\' { "\\\\".to_owned() } else { fill.to_string() };
    let fill_lit = lit(&fill_re);
    let replace = |e: &str| func("regexp_replace", &[e, &lit(&format!("[{ALNUM}]")), &fill_lit, &lit("g")]);
    let all = replace(&s);
    if first.saturating_add(last) == 0 {
        return cast(&format!("CASE WHEN {col} IS NULL THEN NULL ELSE {all} END"));
    }
    let len = |e: &str| func("length", &[e]);
    let total = len(&func("regexp_replace", &[&s, &lit(&format!("[^{ALNUM}]")), &lit(""), &lit("g")]));
    let pre = if first == 0 {
        lit("")
    } else {
        func("substring", &[&s, &lit(&format!("^((?:[^{ALNUM}]*[{ALNUM}]){{{first}}})"))])
    };
    let suf = if last == 0 {
        lit("")
    } else {
        func("substring", &[&s, &lit(&format!("((?:[{ALNUM}][^{ALNUM}]*){{{last}}})$"))])
    };
    let mid = func("substr", &[&s, &op(&len(&pre), "+", "1"), &op(&op(&len(&s), "-", &len(&pre)), "-", &len(&suf))]);
    let keep = first.saturating_add(last);
    // Fast path without the counting expressions for values of ASCII letters and digits only
    // (card numbers, tokens, hex digests): every character is replaceable. "No other
    // character" is cheaper for the server than the anchored "only these" (an ad-hoc count
    // over 200,000 hex digests: 114–131 against 136–146 ms) and means the same.
    let plain = op(&s, "!~", &lit("[^0-9A-Za-z]"));
    let fills = lit(&fill.to_string());
    let repeat = |n: &str| func("repeat", &[&fills, n]);
    let mut fast = repeat(&op(&len(&s), "-", &keep.to_string()));
    if first > 0 {
        fast = op(&func("left", &[&s, &first.to_string()]), "||", &fast);
    }
    if last > 0 {
        fast = op(&fast, "||", &func("right", &[&s, &last.to_string()]));
    }
    let fast = format!("CASE WHEN {} THEN {} ELSE {fast} END", op(&len(&s), "<=", &keep.to_string()), repeat(&len(&s)));
    let rest = op(&op(&pre, "||", &replace(&mid)), "||", &suf);
    // ASCII values with separators (SSNs, phone numbers, spaced card numbers) whose kept ends
    // are letters and digits, with one masked between them: `translate` masks the middle
    // without counting or anchored regular expressions. A value no longer than `keep` has at most
    // `keep` letters and digits, all masked (the branch before, which also keeps `substr`'s
    // length positive here).
    let digits_letters = lit(ASCII_ALNUM);
    let strip = |e: &str| func("translate", &[e, &digits_letters, &lit("")]);
    let middle = func("substr", &[&s, &(first + 1).to_string(), &op(&len(&s), "-", &keep.to_string())]);
    let mut ascii = vec![
        op(&func("octet_length", &[&s]), "=", &len(&s)),
        // An unanchored search stops at the first letter or digit: cheaper than comparing
        // the translated middle's length (benches/results/mask-forms.md).
        op(&middle, "~", &lit("[0-9A-Za-z]")),
    ];
    let mut ascii_fast =
        func("translate", &[&middle, &digits_letters, &lit(&fill.to_string().repeat(ASCII_ALNUM.len()))]);
    if first > 0 {
        let head = func("left", &[&s, &first.to_string()]);
        ascii.push(op(&strip(&head), "=", &lit("")));
        ascii_fast = op(&head, "||", &ascii_fast);
    }
    if last > 0 {
        let tail = func("right", &[&s, &last.to_string()]);
        ascii.push(op(&strip(&tail), "=", &lit("")));
        ascii_fast = op(&ascii_fast, "||", &tail);
    }
    cast(&format!(
        "CASE WHEN {col} IS NULL THEN NULL WHEN {plain} THEN {fast} WHEN {} THEN {all} WHEN {} THEN {ascii_fast} \
         WHEN {} THEN {all} ELSE {rest} END",
        op(&len(&s), "<=", &keep.to_string()),
        ascii.join(" AND "),
        op(&total, "<=", &keep.to_string())
    ))
}

/// The ASCII letters and digits, for `translate`.
const ASCII_ALNUM: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn hash(col: &str, ty: PgType, length: usize, fingerprint: &str, cast: &dyn Fn(&str) -> String) -> String {
    let h = format!("pgveil.hmac_hex({}, {})", text(col), lit(fingerprint));
    let left = |n: usize| func("left", &[&h, &n.to_string()]);
    let first8 = format!("CAST(CAST({} AS bit(64)) AS bigint)", op(&lit("x"), "||", &left(16)));
    match ty {
        PgType::Uuid => cast(&left(32)),
        PgType::Int2 => cast(&op(&first8, "&", "32767")),
        PgType::Int4 => cast(&op(&first8, "&", "2147483647")),
        PgType::Int8 => cast(&op(&op(&first8, ">>", "1"), "&", "9223372036854775807")),
        PgType::Numeric => cast(&func(
            "mod",
            &[
                &op(
                    &format!("CAST({first8} AS numeric)"),
                    "+",
                    &format!("CASE WHEN {} THEN 18446744073709551616 ELSE 0 END", op(&first8, "<", "0")),
                ),
                "1000000000000000",
            ],
        )),
        PgType::Bytea => cast(&func("decode", &[&left(length.clamp(2, 64) & !1), &lit("hex")])),
        _ => cast(&left(length.clamp(1, 64))),
    }
}
