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
pub fn expr(mask: &Mask, col: &str, ty: PgType, sql_type: &str, key: Option<&HashKey>) -> String {
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
            let s = format!("({col})::text");
            let p = format!("strpos(reverse({s}), '@')");
            cast(&format!(
                "CASE WHEN {col} IS NULL THEN NULL WHEN {p} > 1 AND {p} < length({s}) \
                 THEN left({s}, 1) || '***@' || right({s}, {p} - 1) ELSE '****' END"
            ))
        }
        Mask::Partial { keep_first, keep_last, fill } => partial(col, *keep_first, *keep_last, *fill, &cast),
        Mask::Generalize(g) => {
            let unit = match g {
                Granularity::Year => "year",
                Granularity::Month => "month",
            };
            let arg = if ty == PgType::Date { format!("({col})::timestamp") } else { col.to_owned() };
            cast(&format!("date_trunc('{unit}', {arg})"))
        }
        Mask::Round(step) => {
            let st = step.to_text();
            match ty {
                PgType::Float4 | PgType::Float8 => cast(&format!("round((({col}) / {st})::numeric) * {st}")),
                t if t.is_integer() => cast(&format!("round(({col})::numeric / {st}) * {st}")),
                // The scale of the input and the step, presented with the input's scale where
                // that loses nothing: as the Rust mask does.
                _ => {
                    let r = format!("(round(({col}) / {st}) * {st} + (({col}) - ({col})))");
                    cast(&format!(
                        "CASE WHEN {r} = round({r}, scale({col})) THEN round({r}, scale({col})) ELSE {r} END"
                    ))
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

/// Characters `partial` may replace: ASCII letters and digits, and every non-ASCII character
/// (the Rust mask counts the same ones).
const ALNUM: &str = "0-9A-Za-z\\u0080-\\U0010FFFF";

fn partial(col: &str, first: usize, last: usize, fill: char, cast: &dyn Fn(&str) -> String) -> String {
    let s = format!("({col})::text");
    let fill_re = if fill == '\\' { "\\\\".to_owned() } else { fill.to_string() };
    let fill_lit = literal(&fill_re);
    let all = format!("regexp_replace({s}, '[{ALNUM}]', {fill_lit}, 'g')");
    if first.saturating_add(last) == 0 {
        return cast(&format!("CASE WHEN {col} IS NULL THEN NULL ELSE {all} END"));
    }
    let total = format!("length(regexp_replace({s}, '[^{ALNUM}]', '', 'g'))");
    let pre = if first == 0 {
        "''".to_owned()
    } else {
        format!("substring({s} from '^((?:[^{ALNUM}]*[{ALNUM}]){{{first}}})')")
    };
    let suf = if last == 0 {
        "''".to_owned()
    } else {
        format!("substring({s} from '((?:[{ALNUM}][^{ALNUM}]*){{{last}}})$')")
    };
    let mid = format!("substr({s}, length({pre}) + 1, length({s}) - length({pre}) - length({suf}))");
    let keep = first.saturating_add(last);
    // Fast path without the counting expressions for values of ASCII letters and digits only
    // (card numbers, tokens, hex digests): every character is replaceable. "No other
    // character" is cheaper for the server than the anchored "only these" (an ad-hoc count
    // over 200,000 hex digests: 114–131 against 136–146 ms) and means the same.
    let plain = format!("{s} !~ '[^0-9A-Za-z]'");
    let fills = literal(&fill.to_string());
    let head = if first == 0 { String::new() } else { format!("left({s}, {first}) || ") };
    let tail = if last == 0 { String::new() } else { format!(" || right({s}, {last})") };
    let fast = format!(
        "CASE WHEN length({s}) <= {keep} THEN repeat({fills}, length({s})) \
         ELSE {head}repeat({fills}, length({s}) - {keep}){tail} END"
    );
    cast(&format!(
        "CASE WHEN {col} IS NULL THEN NULL WHEN {plain} THEN {fast} WHEN {total} <= {keep} THEN {all} \
         ELSE {pre} || regexp_replace({mid}, '[{ALNUM}]', {fill_lit}, 'g') || {suf} END"
    ))
}

fn hash(col: &str, ty: PgType, length: usize, fingerprint: &str, cast: &dyn Fn(&str) -> String) -> String {
    let h = format!("pgveil.hmac_hex(({col})::text, '{fingerprint}')");
    let first8 = format!("('x' || left({h}, 16))::bit(64)::bigint");
    match ty {
        PgType::Uuid => cast(&format!("left({h}, 32)")),
        PgType::Int2 => cast(&format!("{first8} & 32767")),
        PgType::Int4 => cast(&format!("{first8} & 2147483647")),
        PgType::Int8 => cast(&format!("({first8} >> 1) & 9223372036854775807")),
        PgType::Numeric => cast(&format!(
            "mod(({first8})::numeric + CASE WHEN {first8} < 0 THEN 18446744073709551616 ELSE 0 END, 1000000000000000)"
        )),
        PgType::Bytea => cast(&format!("decode(left({h}, {}), 'hex')", length.clamp(2, 64) & !1)),
        _ => cast(&format!("left({h}, {})", length.clamp(1, 64))),
    }
}
