//! DBA-facing errors: `rules.yaml:12:5: unknown mask "hsah"`, the offending line with a caret,
//! what was expected and a hint. No Rust types or debug output reach a DBA.

use std::fmt::Write as _;

use crate::tree::Pos;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub pos: Pos,
    pub message: String,
    pub expected: Option<String>,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic { pos, message: message.into(), expected: None, hint: None }
    }

    #[must_use]
    pub fn expected(mut self, what: impl Into<String>) -> Self {
        self.expected = Some(what.into());
        self
    }

    #[must_use]
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Renders one diagnostic against the file's text.
    pub fn render(&self, file: &str, src: &str) -> String {
        let mut out = format!("{file}:{}:{}: error: {}\n", self.pos.line, self.pos.col, self.message);
        if let Some(line) =
            usize::try_from(self.pos.line).ok().and_then(|l| l.checked_sub(1)).and_then(|l| src.lines().nth(l))
        {
            let num = self.pos.line.to_string();
            let pad = " ".repeat(num.len());
            let caret_at = usize::try_from(self.pos.col.saturating_sub(1)).unwrap_or(0);
            let _ = writeln!(out, "{pad} |\n{num} | {line}\n{pad} | {}^", " ".repeat(caret_at.min(line.len())));
        }
        if let Some(e) = &self.expected {
            let _ = writeln!(out, "  = expected {e}");
        }
        if let Some(h) = &self.hint {
            let _ = writeln!(out, "  = hint: {h}");
        }
        out
    }
}

/// Renders every diagnostic, in file order, followed by a count.
pub fn render_all(diags: &[Diagnostic], file: &str, src: &str) -> String {
    let mut sorted: Vec<&Diagnostic> = diags.iter().collect();
    sorted.sort_by_key(|d| d.pos);
    let mut out = String::new();
    for d in &sorted {
        out.push_str(&d.render(file, src));
        out.push('\n');
    }
    let n = sorted.len();
    let _ = writeln!(out, "{file}: {n} error{}", if n == 1 { "" } else { "s" });
    out
}

/// The closest candidate within a small edit distance, for "did you mean".
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (levenshtein(&word.to_lowercase(), c), *c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(1) + 1)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev.get(j).copied().unwrap_or(0) + usize::from(ca != *cb);
            let del = prev.get(j + 1).copied().unwrap_or(0) + 1;
            let ins = cur.get(j).copied().unwrap_or(0) + 1;
            cur.push(sub.min(del).min(ins));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("hsah", &["redact", "hash", "email"]), Some("hash"));
        assert_eq!(did_you_mean("unmaskedfor", &["unmasked_for", "mask"]), Some("unmasked_for"));
        assert_eq!(did_you_mean("zzzzzz", &["hash"]), None);
    }
}
