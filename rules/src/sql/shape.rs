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
#[derive(Debug, PartialEq)]
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
    // A quoted identifier names the same thing as its content (`"set_config"` is set_config);
    // one with Unicode escapes cannot be read here and counts as sensitive.
    if let Some(q) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        return is_sensitive_word(&q.replace("\"\"", "\""));
    }
    if text.len() > 2 && text.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("u&")) {
        return true;
    }
    is_sensitive_word(text)
}

fn is_sensitive_word(text: &str) -> bool {
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
        if literal_kind(t.token) {
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

/// A scanned text that later texts are matched against without scanning them: a text that
/// equals it byte for byte except in its literals, each of them plain (digits only, or
/// `'…'` without a backslash) and bounded by bytes that cannot join a neighbouring token,
/// scans to the same tokens, literals moved. A session repeating one statement with other
/// values (the simple protocol's way of passing them) pays a byte comparison, not a scan.
///
/// Why the tokens are the same: the scanner reads left to right. Before each literal the two
/// texts hold the same bytes, the byte before the literal cannot extend a token into a digit
/// or a quote (whitespace, `(`, `,`, `=`, `<`, `>`), so the literal starts a token in both.
/// The literal ends where the recognizer says: digits are followed by a byte no number can
/// continue with; a quoted string ends at a quote not doubled, and no newline follows it
/// before the next token (PostgreSQL joins `'a'` newline `'b'` into one string). After it the
/// texts again hold the same bytes. The unit tests check this against the scanner itself.
#[derive(Debug, Clone)]
pub struct Template {
    text: String,
    /// Byte ranges of its literals.
    literals: Vec<(usize, usize)>,
    /// The text to send for a text of this template, if its shape is rewritten.
    rewritten: Option<Vec<Out>>,
}

/// The longest text made a template (a session keeps a few; longer texts are not the
/// repeated OLTP statements templates are for).
pub const MAX_TEMPLATE_TEXT: usize = 16 * 1024;

/// Literals a template may have (more go the long way): the matching text's are found
/// without an allocation.
const MAX_LITERALS: usize = 32;

/// Byte ranges of a matching text's literals.
struct Found {
    spans: [(usize, usize); MAX_LITERALS],
    len: usize,
}

impl Found {
    fn spans(&self) -> &[(usize, usize)] {
        self.spans.get(..self.len).unwrap_or_default()
    }
}

/// A piece of the text sent for a text matching a template.
#[derive(Debug, Clone)]
enum Out {
    Fixed(String),
    /// The template's literal number `i`, as the matching text spells it.
    Literal(usize),
}

/// What a text matching a template is sent as.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched {
    AsIs,
    Rewritten(String),
}

/// How a plain literal is spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plain {
    Digits,
    Quoted,
}

/// Whether a scanner token is a literal (any spelling).
fn literal_kind(token: i32) -> bool {
    matches!(
        pb::Token::try_from(token),
        Ok(pb::Token::Sconst
            | pb::Token::Usconst
            | pb::Token::Iconst
            | pb::Token::Fconst
            | pb::Token::Bconst
            | pb::Token::Xconst)
    )
}

/// Bytes after which a digit or a quote always starts a new token.
fn safe_before(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'(' | b',' | b'=' | b'<' | b'>')
}

/// The length of the plain literal of kind `kind` at the start of `s`, if one is there and
/// what follows it cannot continue it.
fn plain_at(s: &[u8], kind: Plain) -> Option<usize> {
    let end = match kind {
        Plain::Digits => {
            let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
            // No number continues with these (`.`, `e`, letters, `_` and `x` would).
            let next = s.get(n).copied();
            if n == 0
                || !next.is_none_or(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b')' | b']' | b',' | b';' | b':'))
            {
                return None;
            }
            n
        }
        Plain::Quoted => {
            if s.first() != Some(&b'\'') {
                return None;
            }
            let mut i = 1usize;
            loop {
                match s.get(i)? {
                    b'\\' | 0 => return None,
                    b'\'' if s.get(i.saturating_add(1)) == Some(&b'\'') => i = i.saturating_add(2),
                    b'\'' => break,
                    _ => i = i.saturating_add(1),
                }
            }
            let end = i.saturating_add(1);
            // A newline after horizontal whitespace could continue the string (`'a'` newline `'b'`).
            let rest = s.get(end..).unwrap_or_default();
            let blank = rest.iter().take_while(|b| matches!(b, b' ' | b'\t' | 0x0c)).count();
            if matches!(rest.get(blank), Some(b'\n' | b'\r' | 0x0b)) {
                return None;
            }
            end
        }
    };
    Some(end)
}

/// The plain spelling of a scanned literal, `None` for any other (`E'…'`, `$$…$$`, `1.5`, …).
fn plain_of(text: &str) -> Option<Plain> {
    let b = text.as_bytes();
    let kind = if b.first()?.is_ascii_digit() { Plain::Digits } else { Plain::Quoted };
    (plain_at(b, kind)? == b.len()).then_some(kind)
}

impl Template {
    /// A template of a scanned text whose shape's rewrite (if any) is `rewrite`, if every
    /// literal of it is plain and bounded as [`Template::scan`] requires (any other text could
    /// never match it).
    pub fn new(sql: &str, scanned: &Scanned, rewrite: Option<&super::Rewrite>) -> Option<Template> {
        if sql.len() > MAX_TEMPLATE_TEXT {
            return None;
        }
        let mut literals = Vec::new();
        for t in &scanned.0 {
            if literal_kind(t.token) {
                let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
                plain_of(sql.get(start..end)?)?;
                if start.checked_sub(1).is_some_and(|p| !sql.as_bytes().get(p).copied().is_some_and(safe_before)) {
                    return None;
                }
                literals.push((start, end));
            }
        }
        if literals.len() > MAX_LITERALS {
            return None;
        }
        let rewritten = match rewrite {
            Some(rw) => Some(compile(rw, sql, scanned, &literals)?),
            None => None,
        };
        Some(Template { text: sql.to_owned(), literals, rewritten })
    }

    /// The byte ranges of the literals of `sql`, in order, when it is this template's text
    /// with other plain literals.
    fn literals_of(&self, sql: &str) -> Option<Found> {
        let (old, new) = (self.text.as_bytes(), sql.as_bytes());
        // The bytes before the first literal settle most mismatches (a session's other
        // shapes), before anything is set up.
        let head = self.literals.first().map_or(old.len(), |&(start, _)| start);
        if new.get(..head)? != old.get(..head)? {
            return None;
        }
        let mut found = Found { spans: [(0, 0); MAX_LITERALS], len: 0 };
        // Where the current stretch of equal bytes starts in each text.
        let (mut o, mut n) = (head, head);
        for &(start, end) in &self.literals {
            let same = old.get(o..start)?;
            let at = n.checked_add(same.len())?;
            if new.get(n..at)? != same {
                return None;
            }
            let kind = plain_of(self.text.get(start..end)?)?;
            let literal_end = at.checked_add(plain_at(new.get(at..)?, kind)?)?;
            *found.spans.get_mut(found.len)? = (at, literal_end);
            found.len = found.len.saturating_add(1);
            (o, n) = (end, literal_end);
        }
        (old.get(o..)? == new.get(n..)?).then_some(found)
    }

    /// The scan of `sql` when it is this template's text with other plain literals: the
    /// template's tokens with the literals moved, which the unit tests and debug builds hold
    /// to be the scanner's tokens of `sql` (the proxy's path, [`Template::apply`], needs no
    /// tokens; this scans the template's own text).
    pub fn scan(&self, sql: &str) -> Option<Scanned> {
        let found = self.literals_of(sql)?;
        let own = scan_tokens(&self.text)?;
        let mut literals = self.literals.iter().zip(found.spans()).peekable();
        let mut tokens = Vec::with_capacity(own.len());
        // The shift of the tokens after the last literal passed.
        let (mut o, mut n) = (0usize, 0usize);
        for t in &own {
            let start = usize::try_from(t.start).ok()?;
            if let Some(&(&(old_start, old_end), &(at, end))) = literals.peek()
                && old_start == start
            {
                let token = if sql.get(at..end)?.starts_with('\'') {
                    pb::Token::Sconst
                } else if sql.get(at..end)?.parse::<i32>().is_ok() {
                    // The scanner's rule: an integer that does not fit 32 bits is a numeric constant.
                    pb::Token::Iconst
                } else {
                    pb::Token::Fconst
                };
                tokens.push(pb::ScanToken {
                    start: i32::try_from(at).ok()?,
                    end: i32::try_from(end).ok()?,
                    token: token as i32,
                    ..*t
                });
                (o, n) = (old_end, end);
                literals.next();
                continue;
            }
            let shift = |p: usize| i32::try_from(p.checked_sub(o)?.checked_add(n)?).ok();
            tokens.push(pb::ScanToken { start: shift(start)?, end: shift(usize::try_from(t.end).ok()?)?, ..*t });
        }
        Some(Scanned(tokens))
    }

    /// What `sql` is sent as, when it is this template's text with other plain literals:
    /// the template's rewrite with `sql`'s literals in it.
    pub fn apply(&self, sql: &str) -> Option<Matched> {
        let found = self.literals_of(sql)?;
        let Some(pieces) = &self.rewritten else { return Some(Matched::AsIs) };
        let mut out = String::with_capacity(self.text.len().saturating_mul(2));
        for p in pieces {
            match p {
                Out::Fixed(t) => out.push_str(t),
                Out::Literal(i) => {
                    let &(a, b) = found.spans().get(*i)?;
                    out.push_str(sql.get(a..b)?);
                }
            }
        }
        Some(Matched::Rewritten(out))
    }
}

/// A rewrite of a template's text as fixed text and the places its literals go.
fn compile(rw: &super::Rewrite, sql: &str, scanned: &Scanned, literals: &[(usize, usize)]) -> Option<Vec<Out>> {
    let toks = super::tokens::Tokens::from_scan(sql, &scanned.0)?;
    let mut pieces: Vec<Out> = Vec::new();
    let fixed = |pieces: &mut Vec<Out>, t: &str| match pieces.last_mut() {
        Some(Out::Fixed(f)) => f.push_str(t),
        _ if t.is_empty() => {}
        _ => pieces.push(Out::Fixed(t.to_owned())),
    };
    let mut whole = true;
    rw.emit(sql, &toks, |span| match span {
        super::tokens::Span::Text(t) => fixed(&mut pieces, t),
        super::tokens::Span::Copy(a, b) => {
            let mut from = a;
            for (i, &(s, e)) in literals.iter().enumerate() {
                if e <= a || s >= b {
                    continue;
                }
                if s < a || e > b {
                    whole = false; // a literal cut in two: never the case for token ranges
                    return;
                }
                fixed(&mut pieces, sql.get(from..s).unwrap_or_default());
                pieces.push(Out::Literal(i));
                from = e;
            }
            fixed(&mut pieces, sql.get(from..b).unwrap_or_default());
        }
    })?;
    whole.then_some(pieces)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Statements with `@` where a literal goes, in the contexts clients write them and in
    /// contexts chosen to trip a recognizer (neighbours that join tokens, comments, casts).
    const BASES: &[&str] = &[
        "SELECT abalance FROM pgbench_accounts WHERE aid = @;",
        "SELECT a FROM t WHERE b=@ AND c<>@",
        "SELECT a FROM t WHERE b IN (@,@, @)",
        "SELECT a FROM t WHERE b = @::int4 AND c = @::text",
        "SELECT a[@] FROM t WHERE f(@,@)>@",
        "SELECT a FROM t WHERE b = @\n AND c = @\n",
        "SELECT a FROM t WHERE b = @ /* c */ AND c = @ -- d\n",
        "UPDATE t SET a = @ WHERE id = @; SELECT @",
        "SELECT a FROM t WHERE b =-@ AND c = +@ AND d = x@ AND e = 1.@",
        "SELECT a FROM t WHERE b = @ @ AND c = @\t@",
        "SELECT @ FROM t WHERE b = U&@ AND c = E@ AND d = X@",
        "INSERT INTO h (a, b) VALUES (@, @)",
        "SELECT a FROM t WHERE b = @.@ OR c = @e@",
        "SELECT $1, a FROM t WHERE b = @ AND $$x$$ = @",
    ];

    /// `base` with its `@`s replaced by `values` in turn (cycling).
    pub(crate) fn fill(base: &str, values: &[String]) -> String {
        let mut out = String::new();
        let mut values = values.iter().cycle();
        for (i, part) in base.split('@').enumerate() {
            if i > 0 {
                out.push_str(values.next().map_or("", String::as_str));
            }
            out.push_str(part);
        }
        out
    }

    fn real_scan(sql: &str) -> Option<Vec<pb::ScanToken>> {
        scan_tokens(sql)
    }

    fn fast_scan(template_text: &str, sql: &str) -> Option<Vec<pb::ScanToken>> {
        let template = Template::new(template_text, &Scanned::new(template_text)?, None)?;
        template.scan(sql).map(|s| s.0)
    }

    #[test]
    fn texts_of_one_template_scan_as_the_scanner_scans_them() {
        let cases: [(&str, &str, &[&str]); 2] = [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = @;",
                "1",
                &["42", "2147483647", "2147483648", "99999999999999999999999", "007"],
            ),
            ("SELECT a FROM t WHERE b = @ AND c IN (@, @)", "'x'", &["''", "'it''s'", "'ünï'", "'a b -- c'", "'/* x'"]),
        ];
        for (base, seed, values) in cases {
            let template = fill(base, &[seed.into()]);
            for v in values {
                let sql = fill(base, &[(*v).into()]);
                assert_eq!(fast_scan(&template, &sql), real_scan(&sql), "{sql}");
                assert!(fast_scan(&template, &sql).is_some(), "{sql} matches its template");
            }
        }
    }

    #[test]
    fn texts_a_scanner_would_split_otherwise_do_not_match() {
        let base = "SELECT a FROM t WHERE b = @ AND c = 1";
        let template = fill(base, &["'x'".into()]);
        for v in ["'a'\n'b'", "'a\\'", "E'a'", "'a'  \n 'b'", "1", "'a'b", "$$a$$"] {
            let sql = fill(base, &[v.into()]);
            let fast = fast_scan(&template, &sql);
            assert!(fast.is_none() || fast == real_scan(&sql), "{sql}");
        }
        let template = fill(base, &["5".into()]);
        for v in ["5.0", "5e3", "5x", "5_0", "0x10", "'5'", "5 5", "-5"] {
            let sql = fill(base, &[v.into()]);
            assert_eq!(fast_scan(&template, &sql), None, "{sql}");
        }
        assert_eq!(fast_scan("SELECT 1", "SELECT 1 "), None, "other bytes around the literals");
        assert_eq!(fast_scan("SELECT E'a'", "SELECT E'b'"), None, "no template of other spellings");
    }

    #[test]
    fn texts_with_more_literals_than_a_template_holds_go_the_long_way() {
        let list = |n: usize, v: &str| format!("SELECT a FROM t WHERE b IN ({})", vec![v; n].join(", "));
        let (most, more) = (list(MAX_LITERALS, "1"), list(MAX_LITERALS + 1, "1"));
        assert!(fast_scan(&most, &list(MAX_LITERALS, "22")).is_some());
        assert_eq!(fast_scan(&more, &list(MAX_LITERALS + 1, "22")), None);
    }

    /// Any bytes from an alphabet of token joiners, put where the template has literals or
    /// anywhere else: whenever the template matches, its tokens are the scanner's.
    fn value() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            3 => proptest::string::string_regex("[0-9]{1,12}[ \n.e_x;:),]?").expect("regex"),
            3 => proptest::string::string_regex("'[a-z' \\\\\n\t]{0,6}'[ \t\n']{0,3}").expect("regex"),
            1 => proptest::string::string_regex("[0-9'\\\\ \n\t.e_xa;:()$/*,-]{0,8}").expect("regex"),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]
        #[test]
        fn a_matched_text_scans_exactly_as_the_scanner_scans_it(
            base in proptest::sample::select(BASES),
            seed in proptest::sample::select(&["1", "'a'", "12345", "''"][..]),
            values in proptest::collection::vec(value(), 1..4),
            cut in 0usize..80,
            insert in value(),
        ) {
            let template = fill(base, &[seed.to_owned()]);
            let mut sql = fill(base, &values);
            if cut % 3 == 0 {
                let at = (cut * 7) % (sql.len() + 1);
                if sql.is_char_boundary(at) {
                    sql.insert_str(at, &insert);
                }
            }
            if let Some(fast) = fast_scan(&template, &sql) {
                proptest::prop_assert_eq!(Some(fast), real_scan(&sql), "{:?} against {:?}", sql, template);
            }
        }

        /// Plain literals in every slot: the template matches (the fast path is taken), and
        /// scans as the scanner does.
        #[test]
        fn plain_literals_always_match(
            base in proptest::sample::select(&BASES[..4]),
            seed in proptest::sample::select(&["1", "'a'"][..]),
            values in proptest::collection::vec("[0-9]{1,25}|'([^'\\\\\u{0}]|'')*'", 1..6),
        ) {
            let template = fill(base, &[seed.to_owned()]);
            let digits = seed.starts_with('1');
            let values: Vec<String> = values.into_iter().map(|v| match (digits, v.starts_with('\'')) {
                (true, true) => "7".to_owned(),
                (false, false) => format!("'{v}'"),
                _ => v,
            }).collect();
            let sql = fill(base, &values);
            let fast = fast_scan(&template, &sql);
            proptest::prop_assert!(fast.is_some(), "{:?} against {:?}", sql, template);
            proptest::prop_assert_eq!(fast, real_scan(&sql), "{:?}", sql);
        }
    }
}
