//! `pgveil audit`: the audit log for people (a filtered table, a summary, `--follow`, `--json`)
//! and `pgveil audit verify` (the hash chain that makes tampering evident).
#![allow(clippy::arithmetic_side_effects, reason = "an operator command over a local file: counters and line numbers")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, Seek};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Which lines to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// RFC 3339 timestamps at or after this (computed from `--since 1h`).
    pub since: Option<String>,
    pub user: Option<String>,
    pub rule: Option<String>,
    pub event: Option<String>,
    pub database: Option<String>,
}

impl Filter {
    pub fn matches(&self, v: &serde_json::Value) -> bool {
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default();
        self.since.as_deref().is_none_or(|s| field("ts") >= s)
            && self.user.as_deref().is_none_or(|u| field("user") == u)
            && self.rule.as_deref().is_none_or(|r| field("rule") == r)
            && self.event.as_deref().is_none_or(|e| field("event") == e)
            && self.database.as_deref().is_none_or(|d| field("database") == d)
    }
}

/// `--since 1h` → the RFC 3339 time that long ago.
pub fn since(ago: &str) -> Option<String> {
    let d = crate::config::duration::parse(ago)?;
    let t = time::OffsetDateTime::now_utc() - d;
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&fmt).ok()
}

fn parse_lines(text: &str) -> (Vec<serde_json::Value>, usize) {
    let mut bad = 0;
    let values = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).map_err(|_| bad += 1).ok())
        .collect();
    (values, bad)
}

/// A readable table of matching events (or JSON lines with `json`).
pub fn table(text: &str, filter: &Filter, json: bool) -> String {
    let (values, bad) = parse_lines(text);
    let mut out = String::new();
    if !json {
        let _ = writeln!(
            out,
            "{:<24} {:<15} {:<14} {:<12} {:<28} REASON / STATEMENT",
            "TIME", "EVENT", "USER", "DATABASE", "RULE"
        );
    }
    for v in values.iter().filter(|v| filter.matches(v)) {
        if json {
            let _ = writeln!(out, "{v}");
            continue;
        }
        let f = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_owned();
        let detail = match (v.get("statement").and_then(|s| s.as_str()), v.get("reason").and_then(|s| s.as_str())) {
            (Some(s), Some(r)) => format!("{r} | {s}"),
            (None, Some(r)) => r.to_owned(),
            (Some(s), None) => s.to_owned(),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<24} {:<15} {:<14} {:<12} {:<28} {detail}",
            f("ts"),
            f("event"),
            f("user"),
            f("database"),
            f("rule")
        );
    }
    if bad > 0 {
        let _ = writeln!(out, "({bad} lines were not JSON)");
    }
    out
}

/// Counts by event, rule, user and hour, and the most frequent statement fingerprints.
pub fn summary(text: &str, filter: &Filter) -> String {
    let (values, bad) = parse_lines(text);
    let mut by_event: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_rule: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_user: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_hour: BTreeMap<String, u64> = BTreeMap::new();
    let mut prints: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut total = 0u64;
    for v in values.iter().filter(|v| filter.matches(v)) {
        total += 1;
        let f = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        *by_event.entry(f("event").unwrap_or_default()).or_default() += 1;
        if let Some(r) = f("rule") {
            *by_rule.entry(r).or_default() += 1;
        }
        if let Some(u) = f("user") {
            *by_user.entry(u).or_default() += 1;
        }
        if let Some(ts) = f("ts") {
            *by_hour.entry(ts.get(..13).unwrap_or(&ts).to_owned() + ":00").or_default() += 1;
        }
        if let Some(fp) = f("fingerprint") {
            let e = prints.entry(fp).or_insert_with(|| (0, f("statement").unwrap_or_default()));
            e.0 += 1;
        }
    }
    let mut out = format!("{total} events\n");
    for (title, map) in
        [("by event", &by_event), ("by rule", &by_rule), ("by user", &by_user), ("by hour (UTC)", &by_hour)]
    {
        let _ = writeln!(out, "\n{title}:");
        let mut rows: Vec<_> = map.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (k, n) in rows {
            let _ = writeln!(out, "  {n:>8}  {k}");
        }
    }
    let _ = writeln!(out, "\ntop statements (by fingerprint):");
    let mut top: Vec<_> = prints.into_iter().collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1.0));
    for (fp, (n, stmt)) in top.into_iter().take(10) {
        let _ = writeln!(out, "  {n:>8}  {fp}  {}", stmt.chars().take(100).collect::<String>());
    }
    if bad > 0 {
        let _ = writeln!(out, "\n({bad} lines were not JSON)");
    }
    out
}

/// Checks the hash chain: each line's `prev` is the SHA-256 of the line before it.
pub fn verify(text: &str) -> Result<usize, String> {
    let mut prev: Option<String> = None;
    let mut n = 0;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("line {}: not JSON: {e}", i + 1))?;
        let claimed = v
            .get("prev")
            .and_then(|p| p.as_str())
            .ok_or_else(|| format!("line {}: no `prev` field (chain off?)", i + 1))?;
        let expected = prev.clone().unwrap_or_else(|| "0".repeat(64));
        // A reopened or rotated file starts a new chain from the zero hash.
        if claimed != expected && !(claimed == "0".repeat(64) && n > 0) {
            return Err(format!("line {}: chain broken (a line before it was changed, removed or inserted)", i + 1));
        }
        prev = Some(hex::encode(Sha256::digest(line.as_bytes())));
        n += 1;
    }
    Ok(n)
}

/// Prints new matching lines as they are appended, until interrupted.
pub async fn follow(path: &Path, filter: &Filter, json: bool) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::End(0))?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && filter.matches(&v)
        {
            let rendered = table(&line, &Filter::default(), json);
            let body = if json { rendered } else { rendered.lines().skip(1).collect::<Vec<_>>().join("\n") + "\n" };
            #[allow(clippy::print_stdout)]
            {
                print!("{body}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chained(lines: &[&str]) -> String {
        let mut prev = "0".repeat(64);
        let mut out = String::new();
        for l in lines {
            let line =
                format!("{{\"ts\":\"2026-01-01T00:00:00.000Z\",\"event\":\"query_blocked\",{l},\"prev\":\"{prev}\"}}");
            prev = hex::encode(Sha256::digest(line.as_bytes()));
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    #[test]
    fn verify_detects_changes() {
        let log = chained(&[
            "\"user\":\"a\",\"rule\":\"r1\"",
            "\"user\":\"b\",\"rule\":\"r2\"",
            "\"user\":\"a\",\"rule\":\"r1\"",
        ]);
        assert_eq!(verify(&log), Ok(3));
        let tampered = log.replacen("\"user\":\"b\"", "\"user\":\"c\"", 1);
        assert!(verify(&tampered).unwrap_err().contains("line 3"));
        let removed: String = log.lines().enumerate().filter(|(i, _)| *i != 1).map(|(_, l)| format!("{l}\n")).collect();
        assert!(verify(&removed).is_err());
    }

    #[test]
    fn summary_counts() {
        let log = chained(&[
            "\"user\":\"a\",\"rule\":\"r1\"",
            "\"user\":\"b\",\"rule\":\"r2\"",
            "\"user\":\"a\",\"rule\":\"r1\"",
        ]);
        let s = summary(&log, &Filter::default());
        assert!(s.starts_with("3 events"), "{s}");
        assert!(s.contains("       2  r1"), "{s}");
        let only_b = Filter { user: Some("b".into()), ..Filter::default() };
        assert!(summary(&log, &only_b).starts_with("1 events"));
    }
}
