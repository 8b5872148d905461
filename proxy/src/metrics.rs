//! Every metric the proxy exports, in one place. Names and labels are an operator contract:
//! renaming one is a breaking change. Counters are plain atomics owned by `Shared` (no global
//! recorder), rendered in the Prometheus text format by [`Metrics::render`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use dashmap::DashMap;

/// Why a client connection was refused before it became a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejected {
    MaxConnections,
    TlsRequired,
    Protocol,
    Upstream,
    Shutdown,
}

impl Rejected {
    fn as_label(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::TlsRequired => "tls_required",
            Self::Protocol => "protocol",
            Self::Upstream => "upstream",
            Self::Shutdown => "shutdown",
        }
    }
}

/// How a statement was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    Simple,
    Parse,
}

impl StatementKind {
    fn as_label(self) -> &'static str {
        match self {
            Self::Simple => "simple",
            Self::Parse => "parse",
        }
    }
}

/// Declares every metric once: each line is the field, its Prometheus name, type and help.
/// The struct, the renderer's table and the counters the code bumps all come from it.
/// Labelled families and summaries are listed after the scalars, with their own renderers.
macro_rules! metrics {
    (
        scalars { $( $(#[$m:meta])* $field:ident: $kind:literal $name:literal $help:literal, )* }
        families { $( $(#[$om:meta])* $vis:vis $ofield:ident: $oty:ty, )* }
    ) => {
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$m])* pub $field: AtomicU64, )*
            $( $(#[$om])* $vis $ofield: $oty, )*
        }

        /// (name, type, help, value) of every scalar metric, in declaration order.
        const SCALARS: &[(&str, &str, &str, fn(&Metrics) -> &AtomicU64)] = &[
            $( ($name, $kind, $help, |m: &Metrics| &m.$field), )*
        ];
    };
}

metrics! {
    scalars {
        connections_total: "counter" "pgveil_connections_total" "Client connections accepted.",
        masked_cells_total: "counter" "pgveil_masked_cells_total" "Result cells replaced by a mask.",
        /// Cells the result-column layer masked: substitution should leave it nothing to do.
        backstop_masked_cells_total: "counter" "pgveil_backstop_masked_cells_total"
            "Cells the result-column layer masked because substitution missed a reference (should stay 0).",
        /// Rewrites the substitution checker rejected (debug builds check every rewrite).
        substitution_check_failures_total: "counter" "pgveil_substitution_check_failures_total"
            "Rewritten statements the substitution checker rejected (checked in debug builds).",
        rows_cut_total: "counter" "pgveil_rows_cut_total" "Results cut by a max_rows rule.",
        /// Protocol-prepared statements decided again after a rules reload changed a session's view.
        reprepared_statements_total: "counter" "pgveil_reprepared_statements_total"
            "Prepared statements prepared again, transparently, after a rules reload (I11).",
        catalog_refreshes_total: "counter" "pgveil_catalog_refreshes_total" "Catalog snapshots loaded.",
        audit_lines_total: "counter" "pgveil_audit_lines_total" "Audit log lines written.",
        audit_write_errors_total: "counter" "pgveil_audit_write_errors_total"
            "Failed audit log writes (each is retried; the line is not lost).",
        audit_dropped_total: "counter" "pgveil_audit_dropped_total"
            "Audit lines dropped: only connection-level events while the log is failing and its queue is full.",
        /// 1 while the audit log cannot be written.
        audit_failing: "gauge" "pgveil_audit_failing" "1 while the audit log cannot be written.",
        /// Sessions on the pump threads now (`limits.pump: loop`).
        pump_loop_sessions: "gauge" "pgveil_pump_loop_sessions" "Sessions pumped by the pump threads now.",
        tls_handshake_failures_total: "counter" "pgveil_tls_handshake_failures_total" "Client TLS handshakes that failed.",
        auth_failures_total: "counter" "pgveil_auth_failures_total" "Failed client logins.",
        cancel_requests_total: "counter" "pgveil_cancel_requests_total" "Cancel requests received.",
        /// `raw_access` events: statements that returned raw protected values.
        raw_access_total: "counter" "pgveil_raw_access_total"
            "Statements that returned raw values of protected columns (audit.raw_access).",
        roles_quarantined_total: "counter" "pgveil_roles_quarantined_total" "Roles quarantined (probe budget or operator).",
        roles_released_total: "counter" "pgveil_roles_released_total" "Quarantined roles released by an operator.",
        quarantine_refusals_total: "counter" "pgveil_quarantine_refusals_total"
            "New sessions refused because their role is quarantined.",
        /// Admin requests refused for a missing or wrong token.
        admin_denied_total: "counter" "pgveil_admin_denied_total"
            "Admin requests refused for a missing or wrong bearer token.",
    }
    families {
        pub connections_active: AtomicI64,
        rejected: DashMap<&'static str, AtomicU64>,
        statements_simple: Striped,
        statements_parse: Striped,
        blocked: DashMap<(String, String), AtomicU64>,
        /// `pgveil_forwarded_bytes_total{direction}`.
        pub bytes_client_to_server: Striped,
        pub bytes_server_to_client: Striped,
        /// `pgveil_analysis_seconds` (summary) and `pgveil_analysis_cache_total{result}`.
        pub analysis_seconds_sum: Striped,
        pub analysis_count: Striped,
        pub analysis_cache_hits: Striped,
        pub analysis_cache_misses: Striped,
        /// Of the hits, texts matched to a remembered text of their shape without a scan.
        pub analysis_template_matches: Striped,
        /// `pgveil_rules_reloads_total{result}`.
        pub reloads_ok: AtomicU64,
        pub reloads_rejected: AtomicU64,
        /// `pgveil_audit_write_seconds` (summary; its count is the lines written).
        pub audit_write_nanos_sum: AtomicU64,
        /// `pgveil_sessions_terminated_total{cause}` (containment).
        pub sessions_terminated_budget: AtomicU64,
        pub sessions_terminated_operator: AtomicU64,
    }
}

/// A counter bumped on every statement by every session thread: one cache line per slot, a
/// thread always adds to its own, the sum is read at render time. (One shared atomic, or a
/// DashMap entry, bounced its cache line between the cores on each statement.)
#[derive(Debug, Default)]
pub struct Striped([Slot; STRIPES]);

const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

thread_local! {
    static STRIPE: usize = {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        NEXT.fetch_add(1, Relaxed) % STRIPES
    };
}

impl Striped {
    pub fn add(&self, n: u64) {
        // Slot 0 for a thread whose thread-locals are being torn down (never a panic).
        let i = STRIPE.try_with(|i| *i).unwrap_or(0);
        if let Some(slot) = self.0.get(i) {
            slot.0.fetch_add(n, Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.0.iter().fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Relaxed)))
    }
}

fn bump<K: std::hash::Hash + Eq>(map: &DashMap<K, AtomicU64>, key: K) {
    map.entry(key).or_default().fetch_add(1, Relaxed);
}

impl Metrics {
    pub fn connection_opened(&self) {
        self.connections_active.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    pub fn rejected(&self, why: Rejected) {
        bump(&self.rejected, why.as_label());
    }

    pub fn statement(&self, kind: StatementKind) {
        match kind {
            StatementKind::Simple => self.statements_simple.add(1),
            StatementKind::Parse => self.statements_parse.add(1),
        }
    }

    pub fn blocked(&self, rule: &str, reason: &str) {
        bump(&self.blocked, (rule.to_owned(), reason.to_owned()));
    }

    pub fn forwarded(&self, to_server: u64, to_client: u64) {
        self.bytes_client_to_server.add(to_server);
        self.bytes_server_to_client.add(to_client);
    }

    /// A statement decided from the caches: `template` when its text matched a remembered
    /// one of its shape without a scan. Not timed (a few hundred nanoseconds, criterion's
    /// business; two clock reads were a tenth of it).
    pub fn analysis_hit(&self, template: bool) {
        self.analysis_cache_hits.add(1);
        if template {
            self.analysis_template_matches.add(1);
        }
    }

    /// A statement analysed afresh, in `nanos`.
    pub fn analysis_miss(&self, nanos: u64) {
        self.analysis_seconds_sum.add(nanos);
        self.analysis_count.add(1);
        self.analysis_cache_misses.add(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let n = |a: &AtomicU64| a.load(Relaxed);
        let secs = |a: &AtomicU64| format!("{:.9}", a.load(Relaxed) as f64 / 1e9);
        for (name, kind, help, value) in SCALARS {
            head(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {}", value(self).load(Relaxed));
        }
        head(&mut out, "pgveil_connections_active", "gauge", "Client sessions open now.");
        let _ = writeln!(out, "pgveil_connections_active {}", self.connections_active.load(Relaxed));
        head(&mut out, "pgveil_connections_rejected_total", "counter", "Client connections refused, by reason.");
        for why in [
            Rejected::MaxConnections,
            Rejected::TlsRequired,
            Rejected::Protocol,
            Rejected::Upstream,
            Rejected::Shutdown,
        ] {
            let v = self.rejected.get(why.as_label()).map_or(0, |c| c.load(Relaxed));
            let _ = writeln!(out, "pgveil_connections_rejected_total{{reason=\"{}\"}} {v}", why.as_label());
        }
        head(&mut out, "pgveil_statements_total", "counter", "Statements analysed, by protocol.");
        for (kind, c) in
            [(StatementKind::Simple, &self.statements_simple), (StatementKind::Parse, &self.statements_parse)]
        {
            let _ = writeln!(out, "pgveil_statements_total{{kind=\"{}\"}} {}", kind.as_label(), c.get());
        }
        head(&mut out, "pgveil_blocked_total", "counter", "Statements blocked, by rule and reason.");
        for entry in &self.blocked {
            let (rule, reason) = entry.key();
            let _ = writeln!(
                out,
                "pgveil_blocked_total{{rule=\"{}\",reason=\"{}\"}} {}",
                escape(rule),
                escape(reason),
                entry.value().load(Relaxed)
            );
        }
        head(&mut out, "pgveil_forwarded_bytes_total", "counter", "Bytes forwarded, by direction.");
        let _ = writeln!(
            out,
            "pgveil_forwarded_bytes_total{{direction=\"client_to_server\"}} {}\npgveil_forwarded_bytes_total{{direction=\"server_to_client\"}} {}",
            self.bytes_client_to_server.get(),
            self.bytes_server_to_client.get()
        );
        head(
            &mut out,
            "pgveil_analysis_seconds",
            "summary",
            "Time spent analysing statements the caches did not decide.",
        );
        let _ = writeln!(
            out,
            "pgveil_analysis_seconds_sum {:.9}\npgveil_analysis_seconds_count {}",
            self.analysis_seconds_sum.get() as f64 / 1e9,
            self.analysis_count.get()
        );
        head(
            &mut out,
            "pgveil_analysis_cache_total",
            "counter",
            "Statement analysis cache lookups, by result (template: matched a remembered text of its shape without a scan).",
        );
        let template = self.analysis_template_matches.get();
        let hits = self.analysis_cache_hits.get().saturating_sub(template);
        let _ = writeln!(out, "pgveil_analysis_cache_total{{result=\"hit\"}} {hits}");
        let _ = writeln!(out, "pgveil_analysis_cache_total{{result=\"template\"}} {template}");
        let _ = writeln!(out, "pgveil_analysis_cache_total{{result=\"miss\"}} {}", self.analysis_cache_misses.get());
        head(&mut out, "pgveil_rules_reloads_total", "counter", "Rules file reloads, by result.");
        let _ = writeln!(out, "pgveil_rules_reloads_total{{result=\"ok\"}} {}", n(&self.reloads_ok));
        let _ = writeln!(out, "pgveil_rules_reloads_total{{result=\"rejected\"}} {}", n(&self.reloads_rejected));
        head(&mut out, "pgveil_audit_write_seconds", "summary", "Time spent writing audit lines.");
        let _ = writeln!(
            out,
            "pgveil_audit_write_seconds_sum {}\npgveil_audit_write_seconds_count {}",
            secs(&self.audit_write_nanos_sum),
            n(&self.audit_lines_total)
        );
        head(&mut out, "pgveil_sessions_terminated_total", "counter", "Sessions ended by containment, by cause.");
        let _ = writeln!(
            out,
            "pgveil_sessions_terminated_total{{cause=\"probe_budget\"}} {}\npgveil_sessions_terminated_total{{cause=\"operator\"}} {}",
            n(&self.sessions_terminated_budget),
            n(&self.sessions_terminated_operator)
        );
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counters_sum_every_threads_adds() {
        let m = Metrics::default();
        std::thread::scope(|s| {
            for _ in 0..12 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        m.statement(StatementKind::Simple);
                        m.bytes_server_to_client.add(3);
                    }
                });
            }
        });
        m.statement(StatementKind::Parse);
        let text = m.render();
        assert!(text.contains("pgveil_statements_total{kind=\"simple\"} 12000\n"), "{text}");
        assert!(text.contains("pgveil_statements_total{kind=\"parse\"} 1\n"), "{text}");
        assert!(text.contains("pgveil_forwarded_bytes_total{direction=\"server_to_client\"} 36000"), "{text}");
    }

    #[test]
    fn renders_names_and_values() {
        let m = Metrics::default();
        m.connection_opened();
        m.blocked("no-bulk", "select_star");
        let text = m.render();
        assert!(text.contains("pgveil_connections_total 1"), "{text}");
        assert!(text.contains("pgveil_blocked_total{rule=\"no-bulk\",reason=\"select_star\"} 1"), "{text}");
        assert!(text.contains("pgveil_connections_rejected_total{reason=\"max_connections\"} 0"));
    }
}
