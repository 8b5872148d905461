//! Cache keys shared by statements that differ only in literal values, where literals cannot
//! change the decision: the server's own scanner splits the text, literals become `$`,
//! everything else is kept as written. A rewrite is expressed in tokens, so it applies to
//! every text of one shape.

use pg_query::protobuf as pb;

/// Keywords whose literal arguments change what analysis decides (positions in ORDER BY,
/// LIMIT NULL, setting values, …): statements with them get no shape key.
const SHAPE_SENSITIVE: &[&str] = &[
    "order",
    "group",
    "limit",
    "offset",
    "fetch",
    "set",
    "reset",
    "distinct",
    "copy",
    "explain",
    "do",
    "prepare",
    "execute",
    "declare",
    "call",
    "values",
    "into",
    "window",
    "over",
    "filter",
    "returning",
    "show",
    "set_config",
];

/// Of `SHAPE_SENSITIVE`, the keywords that are plain syntax in a statement starting with the
/// given word: `UPDATE … SET col = <value>` and `INSERT INTO … VALUES (<values>)` assign values,
/// which analysis never looks at (it looks at the columns and the sources they come from).
const SHAPE_SYNTAX: &[(&str, &[&str])] = &[("update", &["set"]), ("insert", &["into", "values"])];

/// A key equal for statements that differ only in literal values, where literals cannot
/// change the analysis: the server's own scanner splits the text, literals become `$`,
/// everything else is kept as written. `None` when the statement must be analysed as is.
pub fn shape_key(sql: &str) -> Option<String> {
    shape_key_of(sql, &Scanned::new(sql)?)
}

/// One scan of a text by the server's scanner, shared by its shape key and the rewrite of a
/// cached shape (scanning is most of what a cache hit costs).
#[derive(Debug)]
pub struct Scanned(pub(crate) Vec<pb::ScanToken>);

impl Scanned {
    /// The scanner's tokens straight from C (`scan_tokens`: no protobuf round trip, which
    /// was most of a scan's cost).
    pub fn new(sql: &str) -> Option<Scanned> {
        scan_tokens(sql).map(Scanned)
    }
}

/// `pg_query::scan_tokens`, except for a text of whitespace only: the scanner then returns
/// no token array at all, which the crate turns into a slice from a null pointer.
pub(crate) fn scan_tokens(sql: &str) -> Option<Vec<pb::ScanToken>> {
    // The scanner's whitespace (scan.l `space`).
    if sql.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)) {
        return Some(Vec::new());
    }
    pg_query::scan_tokens(sql).ok()
}

/// Whether a token is one of [`SHAPE_SENSITIVE`] (any case). Most tokens are not words of
/// that length, and are told apart without comparing against the list.
fn is_sensitive(text: &str) -> bool {
    const LONGEST: usize = 10;
    let bytes = text.as_bytes();
    if !(2..=LONGEST).contains(&bytes.len()) || !bytes.first().is_some_and(u8::is_ascii_alphabetic) {
        return false;
    }
    let mut lower = [0u8; LONGEST];
    for (l, b) in lower.iter_mut().zip(bytes) {
        *l = b.to_ascii_lowercase();
    }
    let lower = lower.get(..bytes.len()).unwrap_or_default();
    SHAPE_SENSITIVE.iter().any(|k| k.as_bytes() == lower)
}

/// [`shape_key`] of an already scanned text.
pub fn shape_key_of(sql: &str, scanned: &Scanned) -> Option<String> {
    let scanned = &scanned.0;
    let mut key = String::with_capacity(sql.len());
    // The first word of the statement being scanned (a text may hold several).
    let mut head: Option<&str> = None;
    for t in scanned {
        let start = usize::try_from(t.start).ok()?;
        let end = usize::try_from(t.end).ok()?;
        let text = sql.get(start..end)?;
        if matches!(pb::Token::try_from(t.token), Ok(pb::Token::SqlComment | pb::Token::CComment)) {
            continue;
        }
        if text == ";" {
            head = None;
        } else if head.is_none() {
            head = Some(text);
        }
        let literal = matches!(
            pb::Token::try_from(t.token),
            Ok(pb::Token::Sconst
                | pb::Token::Usconst
                | pb::Token::Iconst
                | pb::Token::Fconst
                | pb::Token::Bconst
                | pb::Token::Xconst)
        );
        if literal {
            key.push('$');
        } else {
            if is_sensitive(text) {
                let syntax = SHAPE_SYNTAX.iter().any(|(first, words)| {
                    head.is_some_and(|h| h.eq_ignore_ascii_case(first))
                        && words.iter().any(|w| text.eq_ignore_ascii_case(w))
                });
                if !syntax {
                    return None;
                }
            }
            key.push_str(text);
        }
        key.push('\u{1f}');
    }
    Some(key)
}
