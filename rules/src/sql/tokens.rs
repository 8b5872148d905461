//! The server scanner's tokens of a text, and rewrites expressed in them. Edits name token
//! ranges, not byte offsets, so one rewrite applies to every text of the same shape (texts
//! that differ only in literals and comments, see `shape`): the proxy's cache reuses it.

use pg_query::protobuf as pb;

#[derive(Debug, Clone, Copy)]
struct Tok {
    start: usize,
    end: usize,
}

/// The non-comment tokens of one text.
#[derive(Debug)]
pub(crate) struct Tokens<'a> {
    sql: &'a str,
    toks: Vec<Tok>,
}

impl<'a> Tokens<'a> {
    pub(crate) fn new(sql: &'a str) -> Option<Self> {
        Self::from_scan(sql, &super::shape::scan_tokens(sql)?)
    }

    pub(crate) fn from_scan(sql: &'a str, scanned: &[pb::ScanToken]) -> Option<Self> {
        let mut toks = Vec::with_capacity(scanned.len());
        for t in scanned {
            if matches!(pb::Token::try_from(t.token), Ok(pb::Token::SqlComment | pb::Token::CComment)) {
                continue;
            }
            let start = usize::try_from(t.start).ok()?;
            let end = usize::try_from(t.end).ok()?;
            sql.get(start..end)?;
            toks.push(Tok { start, end });
        }
        Some(Tokens { sql, toks })
    }

    /// The token that starts at byte `offset` (a parse tree location).
    pub(crate) fn at(&self, offset: i32) -> Option<usize> {
        let offset = usize::try_from(offset).ok()?;
        self.toks.binary_search_by_key(&offset, |t| t.start).ok()
    }

    pub(crate) fn text(&self, i: usize) -> &'a str {
        self.toks.get(i).and_then(|t| self.sql.get(t.start..t.end)).unwrap_or("")
    }

    pub(crate) fn is(&self, i: usize, word: &str) -> bool {
        self.text(i).eq_ignore_ascii_case(word)
    }

    pub(crate) fn len(&self) -> usize {
        self.toks.len()
    }

    /// The last token of a dotted name (`a`, `a.b`, `a.b.c`, `U&"a" UESCAPE '!'`) starting at `i`.
    pub(crate) fn name_end(&self, i: usize) -> usize {
        let mut last = self.uescape_end(i);
        while self.text(last.saturating_add(1)) == "." && last.saturating_add(2) < self.len() {
            if self.text(last.saturating_add(2)) == "*" {
                break;
            }
            last = self.uescape_end(last.saturating_add(2));
        }
        last
    }

    fn uescape_end(&self, i: usize) -> usize {
        if self.is(i.saturating_add(1), "uescape") { i.saturating_add(2) } else { i }
    }

    /// The token closing the parenthesis opened at `open`.
    pub(crate) fn matching_paren(&self, open: usize) -> Option<usize> {
        let mut depth = 0usize;
        for i in open..self.len() {
            match self.text(i) {
                "(" | "[" => depth = depth.saturating_add(1),
                ")" | "]" => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// A piece of a rewritten text: new text, or a byte range of the client's.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Span<'s> {
    Text(&'s str),
    Copy(usize, usize),
}

/// One replaced token range `[from, to)`; `from == to` inserts before token `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Edit {
    pub from: usize,
    pub to: usize,
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Text(String),
    /// The original text of tokens `[a, b)` (literals and parameters moved elsewhere).
    Tokens(usize, usize),
}

/// The edits that make a text safe, in token coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    edits: Vec<Edit>,
    /// Tokens of the text it was made for: a text with another count is another shape.
    tokens: usize,
}

impl Rewrite {
    pub(crate) fn new(mut edits: Vec<Edit>, tokens: usize) -> Self {
        edits.sort_by_key(|e| (e.from, e.to));
        // The same node reached twice (`SET (a, b) = (x, y)` shares its row between both
        // targets) makes the same edit twice: one is kept. Different edits of one range
        // still overlap, and the rewrite then fails.
        edits.dedup();
        Rewrite { edits, tokens }
    }

    /// The rewritten text of `sql`, a text of the shape this rewrite was made for; `None` if
    /// its tokens do not fit (the caller analyses it afresh).
    pub fn apply(&self, sql: &str) -> Option<String> {
        self.apply_to(sql, &super::shape::Scanned::new(sql)?)
    }

    /// [`Rewrite::apply`] with the text's scan already made (for its shape key).
    pub fn apply_to(&self, sql: &str, scanned: &super::shape::Scanned) -> Option<String> {
        self.apply_with(sql, &Tokens::from_scan(sql, &scanned.0)?)
    }

    /// [`Rewrite::apply`] with the text's tokens at hand.
    pub(crate) fn apply_with(&self, sql: &str, toks: &Tokens<'_>) -> Option<String> {
        let mut out = String::with_capacity(sql.len().saturating_add(self.extra_len()));
        self.emit(sql, toks, |span| match span {
            Span::Text(t) => out.push_str(t),
            Span::Copy(a, b) => out.push_str(sql.get(a..b).unwrap_or_default()),
        })?;
        Some(out)
    }

    /// An estimate of what the rewrite adds to a text's length.
    fn extra_len(&self) -> usize {
        self.edits
            .iter()
            .flat_map(|e| &e.pieces)
            .map(|p| match p {
                Piece::Text(t) => t.len(),
                Piece::Tokens(..) => 32,
            })
            .sum()
    }

    /// The rewritten text of `sql` as spans, in order: new text, or byte ranges of `sql`
    /// (checked to lie in it). `None` if its tokens do not fit.
    pub(crate) fn emit<'s>(&'s self, sql: &str, toks: &Tokens<'_>, mut out: impl FnMut(Span<'s>)) -> Option<()> {
        if toks.len() != self.tokens {
            return None;
        }
        fn copy<'s>(sql: &str, a: usize, b: usize, out: &mut impl FnMut(Span<'s>)) -> Option<()> {
            sql.get(a..b)?;
            out(Span::Copy(a, b));
            Some(())
        }
        let mut copied = 0usize;
        for e in &self.edits {
            let start = if e.from < toks.len() { toks.toks.get(e.from)?.start } else { sql.len() };
            if start < copied || e.to < e.from {
                return None; // overlapping edits: never produce half a rewrite
            }
            copy(sql, copied, start, &mut out)?;
            for p in &e.pieces {
                match p {
                    Piece::Text(t) => out(Span::Text(t)),
                    Piece::Tokens(a, b) => {
                        let s = toks.toks.get(*a)?.start;
                        let end = toks.toks.get(b.checked_sub(1)?)?.end;
                        copy(sql, s, end, &mut out)?;
                    }
                }
            }
            copied = if e.to > e.from { toks.toks.get(e.to.checked_sub(1)?)?.end } else { start };
        }
        copy(sql, copied, sql.len(), &mut out)
    }

    /// Maps a 1-based character position the server reports in the rewritten text back to
    /// the client's text: positions inside a replacement point at its start.
    pub fn map_position(&self, sql: &str, rewritten: &str, position: usize) -> Option<usize> {
        let toks = Tokens::new(sql)?;
        // Byte offset in the rewritten text of the reported character.
        let target = rewritten.char_indices().nth(position.checked_sub(1)?).map_or(rewritten.len(), |(b, _)| b);
        let mut orig = 0usize; // byte offset in sql
        let mut new = 0usize; // byte offset in rewritten
        for e in &self.edits {
            let start = if e.from < toks.len() { toks.toks.get(e.from)?.start } else { sql.len() };
            let unchanged = start.checked_sub(orig)?;
            if target < new.saturating_add(unchanged) {
                return char_pos(sql, orig.saturating_add(target.saturating_sub(new)));
            }
            new = new.saturating_add(unchanged);
            let end = if e.to > e.from { toks.toks.get(e.to.checked_sub(1)?)?.end } else { start };
            let replaced_len: usize = e
                .pieces
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => Some(t.len()),
                    Piece::Tokens(a, b) => {
                        Some(toks.toks.get(b.checked_sub(1)?)?.end.saturating_sub(toks.toks.get(*a)?.start))
                    }
                })
                .sum::<Option<usize>>()?;
            if target < new.saturating_add(replaced_len) {
                return char_pos(sql, start);
            }
            new = new.saturating_add(replaced_len);
            orig = end;
        }
        char_pos(sql, orig.saturating_add(target.saturating_sub(new)))
    }
}

fn char_pos(sql: &str, byte: usize) -> Option<usize> {
    Some(sql.get(..byte.min(sql.len()))?.chars().count().saturating_add(1))
}
