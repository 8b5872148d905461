//! The audit log of audit.md: one JSON object per line, written by a dedicated task that never
//! drops a line (senders wait when it is behind), flushed on shutdown, reopened on SIGHUP.
//! Receives no row data, bind values or literals: statements arrive already normalized.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::conn::SessionInfo;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    QueryBlocked,
    RowLimit,
    /// A statement returned a protected column's raw value (`audit.raw_access`).
    RawAccess,
    RulesReloaded,
    RulesRejected,
    AuthFailed,
    TlsRejected,
    ProtocolError,
    /// A `monitor`-mode rule matched: the statement ran and would have been blocked.
    QueryFlagged,
    /// The result-column layer masked a raw protected value: substitution missed a
    /// reference (a bug to report; the client still got the masked value).
    Backstop,
    SessionTerminated,
    RoleQuarantined,
    RoleReleased,
}

/// One audit line. Optional fields are omitted when empty.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub ts: String,
    pub event: EventKind,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub session: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub client: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub database: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub application: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Always present (possibly empty) in statement events, for a stable schema.
    pub tables: Vec<String>,
    pub columns: Vec<String>,
    /// Statement events: how each protected column was used (audit.md `usage`), by column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<std::collections::BTreeMap<String, Vec<&'static str>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    /// SHA-256 of the previous line (tamper evidence); set by the writer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
}

pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    now.format(&fmt).unwrap_or_default()
}

impl Event {
    pub fn new(event: EventKind) -> Self {
        Event {
            ts: now_rfc3339(),
            event,
            session: String::new(),
            client: String::new(),
            user: String::new(),
            database: String::new(),
            application: String::new(),
            rule: None,
            reason: None,
            statement: None,
            fingerprint: None,
            tables: Vec::new(),
            columns: Vec::new(),
            usage: None,
            rows: None,
            mode: None,
            prev: None,
        }
    }

    pub fn session(event: EventKind, info: &SessionInfo) -> Self {
        Event {
            session: info.id.clone(),
            client: info.client.clone(),
            user: info.user.clone(),
            database: info.database.clone(),
            application: info.application.clone(),
            ..Self::new(event)
        }
    }

    #[must_use]
    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_owned());
        self
    }

    /// Sets `usage` (and adds its columns to `columns`, its tables to `tables`).
    #[must_use]
    pub fn usage(mut self, uses: &[rules::sql::ColumnUse]) -> Self {
        let mut map: std::collections::BTreeMap<String, Vec<&'static str>> = std::collections::BTreeMap::new();
        for u in uses {
            let hows = map.entry(u.column.clone()).or_default();
            if !hows.contains(&u.how.as_str()) {
                hows.push(u.how.as_str());
            }
            if !self.columns.contains(&u.column) {
                self.columns.push(u.column.clone());
            }
            if !self.tables.contains(&u.table) {
                self.tables.push(u.table.clone());
            }
        }
        self.usage = Some(map);
        self
    }

    #[must_use]
    pub fn rule(mut self, rule: &str) -> Self {
        self.rule = Some(rule.to_owned());
        self
    }
}

enum Msg {
    Line(Box<Event>),
    Reopen,
    /// Everything queued before this is written; the writer then stops.
    Close,
}

/// The sending side, cheap to clone. With no path configured, events are only counted.
#[derive(Debug, Clone)]
pub struct Audit {
    tx: Option<mpsc::Sender<Msg>>,
    state: Arc<WriterState>,
}

/// What the writer thread and the senders share.
#[derive(Debug, Default)]
struct WriterState {
    /// Set while a write fails (disk full, file unwritable); cleared by the next good write.
    failing: AtomicBool,
    /// Set by `close`: a writer that still cannot write gives up retrying (lines go to stderr).
    closing: AtomicBool,
    /// Events waiting for room in the queue (`log` from synchronous code); bounded.
    waiting: AtomicUsize,
    metrics: Option<Arc<Metrics>>,
}

const QUEUE: usize = 4096;
/// How many connection-level events may wait for room beyond the queue before they are
/// dropped and counted (only while the writer is failing or far behind).
const MAX_WAITING: usize = 4096;
/// A batch smaller than this makes the writer pause for [`GATHER`] before the next.
const BATCH_LINES: u64 = 64;
/// How long the writer lets lines gather after a small batch.
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);
/// The most bytes of already-queued lines written with one write.
const BATCH_BYTES: usize = 256 * 1024;
/// How long a closing writer keeps retrying a line it cannot write.
const CLOSE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("audit message")
    }
}

/// Owns the writer task; `finish` waits until every line is written and flushed.
#[derive(Debug)]
pub struct AuditWriter {
    handle: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open { path: String, source: std::io::Error },
}

impl Audit {
    pub fn disabled() -> Self {
        Audit { tx: None, state: Arc::default() }
    }

    /// Whether the log is failing to write right now (statements of audited sessions are
    /// refused while it is, unless `audit.on_failure: continue`).
    pub fn is_failing(&self) -> bool {
        self.state.failing.load(Relaxed)
    }

    /// Starts the writer for `path` (`-` is standard output).
    pub fn start(path: &str, chain: bool, metrics: Arc<Metrics>) -> Result<(Audit, AuditWriter), AuditError> {
        let target = Target::open(path)?;
        let (tx, mut rx) = mpsc::channel::<Msg>(QUEUE);
        let path = path.to_owned();
        let state = Arc::new(WriterState { metrics: Some(Arc::clone(&metrics)), ..WriterState::default() });
        let shared = Arc::clone(&state);
        // A plain thread: file writes block, and this keeps them off the async workers.
        let handle = std::thread::Builder::new()
            .name("pgveil-audit".to_owned())
            .spawn(move || {
                let mut target = target;
                let mut prev: Option<String> = None;
                // Set once a closing writer gave up on the file: the lines still queued go
                // straight to the process log instead of each waiting out CLOSE_RETRY.
                let mut gave_up = false;
                // A Reopen or Close that arrived while a batch was being gathered.
                let mut held: Option<Msg> = None;
                while let Some(msg) = held.take().or_else(|| rx.blocking_recv()) {
                    match msg {
                        Msg::Close => break,
                        Msg::Reopen => match Target::open(&path) {
                            Ok(t) => target = t,
                            Err(e) => tracing::error!(error = %e, "audit log reopen failed; keeping the old file"),
                        },
                        Msg::Line(event) => {
                            let started = Instant::now();
                            // The lines already queued are written together, each whole and in
                            // order: one write and flush per batch, and nothing waits in a buffer
                            // for a later line (a batch is only what has already arrived).
                            let mut batch = String::new();
                            let mut count = 0u64;
                            let mut next = Some(event);
                            while let Some(mut event) = next.take() {
                                if chain {
                                    event.prev = Some(prev.take().unwrap_or_else(|| "0".repeat(64)));
                                }
                                if let Ok(line) = serde_json::to_string(&event) {
                                    if chain {
                                        prev = Some(hex::encode(Sha256::digest(line.as_bytes())));
                                    }
                                    batch.push_str(&line);
                                    batch.push('\n');
                                    count = count.saturating_add(1);
                                }
                                if batch.len() < BATCH_BYTES {
                                    match rx.try_recv() {
                                        Ok(Msg::Line(e)) => next = Some(e),
                                        Ok(other) => held = Some(other),
                                        Err(_) => {}
                                    }
                                }
                            }
                            if batch.is_empty() {
                                continue;
                            }
                            // A failed write is retried (reopening the file, which may have been
                            // replaced) until it succeeds: no line is ever skipped.
                            let mut backoff = std::time::Duration::from_millis(100);
                            let mut failed_since: Option<Instant> = None;
                            let written = loop {
                                match target.write_line(batch.as_bytes()) {
                                    Ok(()) => {
                                        if failed_since.is_some() && shared.failing.swap(false, Relaxed) {
                                            metrics.audit_failing.store(0, Relaxed);
                                            tracing::warn!(path = %path, "audit log writable again");
                                        }
                                        break true;
                                    }
                                    Err(e) => {
                                        metrics.audit_write_errors_total.fetch_add(1, Relaxed);
                                        if !shared.failing.swap(true, Relaxed) {
                                            metrics.audit_failing.store(1, Relaxed);
                                            tracing::error!(error = %e, path = %path, "audit log write failed; retrying");
                                        }
                                        let since = *failed_since.get_or_insert_with(Instant::now);
                                        if shared.closing.load(Relaxed) && (gave_up || since.elapsed() > CLOSE_RETRY) {
                                            gave_up = true;
                                            // Shutting down and still unwritable: the lines go to
                                            // the process log rather than nowhere.
                                            for line in batch.lines() {
                                                tracing::error!(line = %line, "audit line not written to the log");
                                            }
                                            break false;
                                        }
                                        std::thread::sleep(backoff);
                                        backoff = backoff.saturating_mul(2).min(std::time::Duration::from_secs(2));
                                        if let Ok(t) = Target::open(&path) {
                                            target = t;
                                        }
                                    }
                                }
                            };
                            if !written {
                                continue;
                            }
                            metrics.audit_lines_total.fetch_add(count, Relaxed);
                            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                            metrics.audit_write_nanos_sum.fetch_add(nanos, Relaxed);
                            if count < BATCH_LINES && held.is_none() && !shared.closing.load(Relaxed) {
                                // A steady stream of events (raw_access under load) would wake
                                // this thread once per line; pausing briefly lets the next lines
                                // gather, so senders mostly queue without a wake-up. A line
                                // waits at most this long before its write.
                                std::thread::sleep(GATHER);
                            }
                        }
                    }
                }
            })
            .map_err(|source| AuditError::Open { path: "(thread)".to_owned(), source })?;
        Ok((Audit { tx: Some(tx), state }, AuditWriter { handle: Some(handle) }))
    }

    /// Queues a connection-level event (auth failures, protocol errors) from code that cannot
    /// wait. If the queue is full a task waits for room; past `MAX_WAITING` such events (a
    /// failing disk under a flood of bad logins) they are dropped and counted rather than
    /// held without bound. Statement events use [`Audit::send`], which never drops.
    pub fn log(&self, event: Event) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Msg::Line(Box::new(event))) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                if self.state.waiting.fetch_add(1, Relaxed) >= MAX_WAITING {
                    self.state.waiting.fetch_sub(1, Relaxed);
                    if let Some(m) = &self.state.metrics {
                        m.audit_dropped_total.fetch_add(1, Relaxed);
                    }
                    return;
                }
                let tx = tx.clone();
                let state = Arc::clone(&self.state);
                tokio::spawn(async move {
                    let _ = tx.send(msg).await;
                    state.waiting.fetch_sub(1, Relaxed);
                });
            }
        }
    }

    /// Queues an event, waiting for room: back-pressure on the caller, never loss.
    pub async fn send(&self, event: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Line(Box::new(event))).await;
        }
    }

    /// Asks the writer to reopen its file (after logrotate moved it).
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Msg::Reopen);
        }
    }

    /// Asks the writer to stop after every line queued so far (call once sessions are done).
    pub async fn close(&self) {
        self.state.closing.store(true, Relaxed);
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Close).await;
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }
}

impl AuditWriter {
    /// Waits for every queued line to be written. Call after the last `Audit` clone is dropped.
    pub fn finish(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

enum Target {
    Stdout,
    File(std::fs::File),
}

impl Target {
    fn open(path: &str) -> Result<Target, AuditError> {
        if path == "-" {
            return Ok(Target::Stdout);
        }
        let p = PathBuf::from(path);
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map(Target::File)
            .map_err(|source| AuditError::Open { path: path.to_owned(), source })
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line)?;
                out.flush()
            }
            Target::File(f) => {
                f.write_all(line)?;
                f.flush()
            }
        }
    }
}

/// The audit fingerprint of a FunctionCall: 16 hex digits of SHA-256 over its function OID and
/// argument count (the width of pg_query's statement fingerprints).
pub fn function_call_fingerprint(oid: u32, nargs: u16) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("FunctionCall {oid} {nargs}"));
    hex::encode(digest.get(..8).unwrap_or_default())
}
