//! `pgveil audit access`: the periodic access review. For each role and protected column:
//! statements that read it raw, statements that read it masked, rows, the largest single
//! statement (so one bulk read stands out among many small ones), first and last seen. Reads
//! any number of logs, rotated and gzipped ones included (by content, not by name).
#![allow(clippy::arithmetic_side_effects, reason = "an operator command over local files: counters")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which events count.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// RFC 3339 timestamps at or after this.
    pub since: Option<String>,
    pub role: Option<String>,
    /// A column as the log names it (`public.customers.ssn`), or its last part (`ssn`).
    pub column: Option<String>,
}

/// One (role, column) line of the review.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Row {
    pub role: String,
    pub column: String,
    /// Statements that returned the raw value (or compared it raw: `predicate_raw`).
    pub raw_reads: u64,
    /// Of those, the ones that only compared it raw.
    pub predicate_raw: u64,
    /// Statements that read it masked.
    pub masked_reads: u64,
    /// Statements in all (raw and masked).
    pub statements: u64,
    /// Rows returned by those statements.
    pub rows: u64,
    /// The most rows one statement returned, and that statement's fingerprint.
    pub max_rows: u64,
    pub max_rows_fingerprint: String,
    pub first_seen: String,
    pub last_seen: String,
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    ts: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    user: std::borrow::Cow<'a, str>,
    #[serde(default)]
    usage: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    rows: Option<u64>,
    #[serde(borrow, default)]
    fingerprint: Option<std::borrow::Cow<'a, str>>,
}

/// Events that report a statement which ran (a blocked one read nothing).
const READS: &[&str] = &["raw_access", "row_limit", "backstop", "query_flagged"];

/// The review of the given logs' text.
#[derive(Debug, Default)]
pub struct Review {
    rows: BTreeMap<(String, String), Row>,
    /// Lines that were not JSON.
    pub unreadable: u64,
    pub lines: u64,
}

impl Review {
    pub fn add_text(&mut self, text: &str, filter: &Filter) {
        for line in text.lines() {
            if line.trim().is_empty() {
                continue;
            }
            self.lines += 1;
            let Ok(l) = serde_json::from_str::<Line<'_>>(line) else {
                self.unreadable += 1;
                continue;
            };
            if !READS.contains(&&*l.event) {
                continue;
            }
            if filter.since.as_deref().is_some_and(|s| *l.ts < *s)
                || filter.role.as_deref().is_some_and(|r| *l.user != *r)
            {
                continue;
            }
            let Some(usage) = l.usage else { continue };
            for (column, hows) in usage {
                if let Some(c) = filter.column.as_deref()
                    && column != c
                    && column.rsplit('.').next().is_none_or(|last| last.trim_matches('"') != c)
                {
                    continue;
                }
                let raw = hows.iter().any(|h| h == "raw" || h == "predicate_raw");
                let only_predicate = raw && !hows.iter().any(|h| h == "raw");
                let masked = hows.iter().any(|h| h == "masked");
                let row = self.rows.entry((l.user.to_string(), column.clone())).or_insert_with(|| Row {
                    role: l.user.to_string(),
                    column,
                    first_seen: l.ts.to_string(),
                    ..Row::default()
                });
                row.statements += 1;
                row.raw_reads += u64::from(raw);
                row.predicate_raw += u64::from(only_predicate);
                row.masked_reads += u64::from(masked);
                let rows = l.rows.unwrap_or(0);
                row.rows += rows;
                if row.max_rows_fingerprint.is_empty() || rows > row.max_rows {
                    row.max_rows = rows;
                    row.max_rows_fingerprint = l.fingerprint.as_deref().unwrap_or("-").to_owned();
                }
                if *l.ts < *row.first_seen {
                    row.first_seen = l.ts.to_string();
                }
                if *l.ts > *row.last_seen {
                    row.last_seen = l.ts.to_string();
                }
            }
        }
    }

    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.rows.values()
    }

    /// The review as a table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<36} {:>9} {:>9} {:>10} {:>10} {:>12} {:<24} {:<24}",
            "ROLE", "COLUMN", "RAW", "MASKED", "STATEMENTS", "ROWS", "MAX ROWS", "FIRST SEEN", "LAST SEEN"
        );
        for r in self.rows() {
            let _ = writeln!(
                out,
                "{:<16} {:<36} {:>9} {:>9} {:>10} {:>10} {:>12} {:<24} {:<24}",
                r.role,
                r.column,
                r.raw_reads,
                r.masked_reads,
                r.statements,
                r.rows,
                r.max_rows,
                r.first_seen,
                r.last_seen
            );
        }
        if self.rows.is_empty() {
            out.push_str(
                "(no reads of protected columns in these logs; raw reads are logged with audit.raw_access: true)\n",
            );
        }
        if self.unreadable > 0 {
            let _ = writeln!(out, "({} of {} lines were not JSON and were skipped)", self.unreadable, self.lines);
        }
        out
    }

    /// One JSON object per (role, column).
    pub fn json(&self) -> String {
        let mut out = String::new();
        for r in self.rows() {
            if let Ok(line) = serde_json::to_string(r) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }
}

/// A log file's text, gunzipped when it is gzip (by its magic bytes).
pub fn read_log(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(bytes.as_slice()).read_to_string(&mut text)?;
        Ok(text)
    } else {
        String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// The log and its rotations (`audit.jsonl`, `audit.jsonl.1`, `audit.jsonl.2.gz`,
/// `audit.jsonl-20261201.gz`, …), oldest first by name.
pub fn with_rotations(path: &Path) -> Vec<PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return vec![path.to_owned()] };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.strip_prefix(name).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    if path.exists() {
        found.push(path.to_owned());
    }
    found
}

/// A deterministic audit log of `lines` lines as pgveil writes them (several roles, raw and
/// masked reads of several columns, blocks, reloads, one bulk read), for the snapshot tests
/// and the benchmark of the review.
#[doc(hidden)]
pub fn sample_log(lines: usize) -> String {
    let roles = ["billing_admin", "support", "app_user", "analyst", "dba"];
    let columns = ["public.customers.ssn", "public.customers.email", "public.customers.card_number", "crm.leads.phone"];
    let mut out = String::with_capacity(lines.saturating_mul(330));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..lines {
        // xorshift: the same log on every run.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let secs = i / 4;
        let ts = format!(
            "2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            1 + (secs / 86_400) % 28,
            (secs / 3600) % 24,
            (secs / 60) % 60,
            secs % 60,
            (i % 4) * 250
        );
        let pick = |n: usize, shift: u32| usize::try_from((x >> shift) % n as u64).unwrap_or(0);
        let role = roles.get(pick(roles.len(), 3)).copied().unwrap_or("dba");
        let col = columns.get(pick(columns.len(), 11)).copied().unwrap_or("public.customers.ssn");
        let other = columns.get(pick(columns.len(), 19)).copied().unwrap_or("public.customers.email");
        // Half way through, one bulk read: the review must make it stand out.
        let kind = if i == lines / 2 { 4 } else { pick(10, 29) };
        let rows = if i == lines / 2 { 250_000 } else { (x >> 37) % 40 };
        let fp = format!("{:016x}", (x >> 5) % 50);
        let line = match kind {
            0 => format!(
                r#"{{"ts":"{ts}","event":"query_blocked","session":"s{i}","user":"{role}","database":"shop","rule":"predicate","reason":"column is masked","statement":"SELECT id FROM customers WHERE ssn = $1","fingerprint":"{fp}","tables":["public.customers"],"columns":["{col}"],"usage":{{"{col}":["masked"]}},"prev":"0"}}"#
            ),
            1 => format!(
                r#"{{"ts":"{ts}","event":"rules_reloaded","tables":[],"columns":[],"reason":"rules.yaml loaded","prev":"0"}}"#
            ),
            2 if col != other => format!(
                r#"{{"ts":"{ts}","event":"raw_access","session":"s{i}","user":"{role}","database":"shop","reason":"returned raw values","statement":"SELECT a, b FROM t WHERE id = $1","fingerprint":"{fp}","tables":["public.customers"],"columns":["{col}","{other}"],"usage":{{"{col}":["raw"],"{other}":["masked"]}},"rows":{rows},"prev":"0"}}"#
            ),
            3 => format!(
                r#"{{"ts":"{ts}","event":"raw_access","session":"s{i}","user":"{role}","database":"shop","reason":"compared raw","statement":"SELECT id FROM t WHERE email = $1","fingerprint":"{fp}","tables":["public.customers"],"columns":["{col}"],"usage":{{"{col}":["masked","predicate_raw"]}},"rows":{rows},"prev":"0"}}"#
            ),
            _ => format!(
                r#"{{"ts":"{ts}","event":"raw_access","session":"s{i}","user":"{role}","database":"shop","reason":"returned raw values","statement":"SELECT ssn FROM customers WHERE id = $1","fingerprint":"{fp}","tables":["public.customers"],"columns":["{col}"],"usage":{{"{col}":["raw"]}},"rows":{rows},"prev":"0"}}"#
            ),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}
