//! Settings a masked session changes: SET and set_config, which pgveil follows or refuses
//! (search_path, the lexer settings it pins, client encodings, identity).

#[allow(clippy::wildcard_imports, reason = "a part of checks, with its imports")]
use super::*;

/// `SELECT set_config('search_path', 'value', is_local)` on its own (pg_dump's first
/// statement): the value and is_local, when the statement is that and nothing else, so that it
/// certainly runs once.
pub(super) fn lone_path_set(found: &Found<'_>) -> Option<(String, bool)> {
    let [f] = found.funcs.as_slice() else { return None };
    let [sel] = found.selects.as_slice() else { return None };
    if found.kind != StmtKind::Select || !found.rels.is_empty() || !sel.lone_call {
        return None;
    }
    if !matches!(f.name.as_slice(), [n] | [_, n] if n == "set_config")
        || f.name.first().is_some_and(|s| f.name.len() == 2 && s != "pg_catalog")
    {
        return None;
    }
    match f.text_args.as_slice() {
        [Some(name), Some(value), Some(local)] if name.eq_ignore_ascii_case("search_path") => {
            Some((value.clone(), local == "true"))
        }
        _ => None,
    }
}

/// pg_dump's `SELECT set_config(name, 'value', false) FROM pg_settings WHERE name =
/// 'setting'` (a setting set only where the server has it), exactly that and nothing else: the
/// setting's name and the tokens of `name` (the first argument) and of `pg_settings`.
pub(super) fn settings_row_set(found: &Found<'_>, toks: &Tokens<'_>) -> Option<(String, usize, usize)> {
    if found.kind != StmtKind::Select || found.funcs.len() != 1 || found.rels.len() != 1 || found.selects.len() != 1 {
        return None;
    }
    let word = |i: usize, w: &str| toks.is(i, w);
    let catalog = |i: usize| if word(i, "pg_catalog") && toks.text(i.saturating_add(1)) == "." { i + 2 } else { i };
    let literal = |i: usize| plain_literal(toks.text(i));
    let mut i = 0usize;
    if !word(i, "select") {
        return None;
    }
    i = catalog(i + 1);
    if !(word(i, "set_config") && toks.text(i + 1) == "(" && word(i + 2, "name") && toks.text(i + 3) == ",") {
        return None;
    }
    let arg = i + 2;
    literal(i + 4)?;
    if toks.text(i + 5) != "," || !(word(i + 6, "true") || word(i + 6, "false") || literal(i + 6).is_some()) {
        return None;
    }
    if toks.text(i + 7) != ")" || !word(i + 8, "from") {
        return None;
    }
    i = catalog(i + 9);
    let rel = i;
    if !(word(i, "pg_settings") && word(i + 1, "where") && word(i + 2, "name") && toks.text(i + 3) == "=") {
        return None;
    }
    let setting = literal(i + 4)?;
    let end = i + 5;
    let rest = toks.len().checked_sub(end)?;
    (rest == 0 || (rest == 1 && toks.text(end) == ";")).then_some((setting, arg, rel))
}

/// A standard string constant without backslashes or escapes: its value.
pub(super) fn plain_literal(t: &str) -> Option<String> {
    let inner = t.strip_prefix('\'').and_then(|t| t.strip_suffix('\''))?;
    (!inner.contains('\\')).then(|| inner.replace("''", "'"))
}

/// Whether a masked session may set `name` to `values` (`None`: RESET / DEFAULT, back to the
/// session's pinned startup value).
pub(super) fn set(name: &str, values: Option<&[String]>) -> Result<(), Block> {
    let first = values.and_then(|v| v.first()).map(|v| v.to_lowercase());
    match name {
        "role" | "session_authorization" | "session authorization" => Err(block(
            Reason::IdentityChange,
            "changing the session's role is not allowed for masked sessions",
            "connect as the role you need",
        )),
        "standard_conforming_strings" if first.as_deref().is_some_and(|v| !matches!(v, "on" | "true" | "1")) => {
            Err(setting(name))
        }
        "client_encoding" | "names" if first.as_deref().is_some_and(|v| unsafe_encoding(v) || v == "?") => {
            Err(setting(name))
        }
        "search_path" => search_path_allowed(values.unwrap_or_default()),
        _ => Ok(()),
    }
}

/// pg_catalog after another schema lets that schema's functions and operators shadow the
/// built-ins a statement calls.
pub(super) fn search_path_allowed(path: &[String]) -> Result<(), Block> {
    if path.iter().position(|s| s == "pg_catalog").is_some_and(|i| i > 0) {
        return Err(block(
            Reason::Setting,
            "a search_path with pg_catalog after another schema is not allowed for masked sessions",
            "leave pg_catalog out of search_path (it is searched first) or put it first",
        ));
    }
    Ok(())
}

pub(super) fn setting(name: &str) -> Block {
    block(
        Reason::Setting,
        format!("changing {name} this way is not allowed for masked sessions"),
        "pgveil pins settings that change how statements are read",
    )
}

/// Client encodings whose multi-byte characters can hide a quote or backslash byte.
pub fn unsafe_encoding(value: &str) -> bool {
    let v = value.to_ascii_uppercase().replace(['-', '_'], "");
    matches!(
        v.as_str(),
        "SJIS"
            | "SHIFTJIS"
            | "BIG5"
            | "GBK"
            | "UHC"
            | "GB18030"
            | "JOHAB"
            | "SHIFTJIS2004"
            | "WIN932"
            | "WIN936"
            | "WIN949"
            | "WIN950"
            | "CP932"
            | "CP936"
            | "CP949"
            | "CP950"
    )
}
