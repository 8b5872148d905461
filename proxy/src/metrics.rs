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

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_active: AtomicI64,
    connections_total: AtomicU64,
    rejected: DashMap<&'static str, AtomicU64>,
    statements: DashMap<&'static str, AtomicU64>,
    blocked: DashMap<(String, String), AtomicU64>,
    pub masked_cells_total: AtomicU64,
    /// Cells the result-column layer masked: substitution should leave it nothing to do.
    pub backstop_masked_cells_total: AtomicU64,
    /// Rewrites the substitution checker rejected (debug builds check every rewrite).
    pub substitution_check_failures_total: AtomicU64,
    pub rows_cut_total: AtomicU64,
    pub bytes_client_to_server: AtomicU64,
    pub bytes_server_to_client: AtomicU64,
    pub analysis_seconds_sum: AtomicU64,
    pub analysis_count: AtomicU64,
    pub analysis_cache_hits: AtomicU64,
    pub analysis_cache_misses: AtomicU64,
    pub catalog_refreshes_total: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_rejected: AtomicU64,
    pub audit_lines_total: AtomicU64,
    pub audit_write_nanos_sum: AtomicU64,
    pub audit_write_errors_total: AtomicU64,
    pub audit_dropped_total: AtomicU64,
    /// 1 while the audit log cannot be written.
    pub audit_failing: AtomicU64,
    pub tls_handshake_failures_total: AtomicU64,
    pub auth_failures_total: AtomicU64,
    pub cancel_requests_total: AtomicU64,
    /// `raw_access` events: statements that returned raw protected values.
    pub raw_access_total: AtomicU64,
    /// Containment (spec/audit.md): sessions ended, roles quarantined and released, and
    /// sessions refused for a quarantine.
    pub sessions_terminated_budget: AtomicU64,
    pub sessions_terminated_operator: AtomicU64,
    pub roles_quarantined_total: AtomicU64,
    pub roles_released_total: AtomicU64,
    pub quarantine_refusals_total: AtomicU64,
    /// Admin requests refused for a missing or wrong token.
    pub admin_denied_total: AtomicU64,
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
        bump(&self.statements, kind.as_label());
    }

    pub fn blocked(&self, rule: &str, reason: &str) {
        bump(&self.blocked, (rule.to_owned(), reason.to_owned()));
    }

    pub fn forwarded(&self, to_server: u64, to_client: u64) {
        self.bytes_client_to_server.fetch_add(to_server, Relaxed);
        self.bytes_server_to_client.fetch_add(to_client, Relaxed);
    }

    pub fn analysis(&self, nanos: u64, cache_hit: bool) {
        self.analysis_seconds_sum.fetch_add(nanos, Relaxed);
        self.analysis_count.fetch_add(1, Relaxed);
        if cache_hit {
            self.analysis_cache_hits.fetch_add(1, Relaxed);
        } else {
            self.analysis_cache_misses.fetch_add(1, Relaxed);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let g = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let n = |a: &AtomicU64| a.load(Relaxed).to_string();
        let secs = |a: &AtomicU64| format!("{:.9}", a.load(Relaxed) as f64 / 1e9);
        g(
            &mut out,
            "pgveil_connections_active",
            "gauge",
            "Client sessions open now.",
            self.connections_active.load(Relaxed).to_string(),
        );
        g(&mut out, "pgveil_connections_total", "counter", "Client connections accepted.", n(&self.connections_total));
        let _ = writeln!(
            out,
            "# HELP pgveil_connections_rejected_total Client connections refused, by reason.\n# TYPE pgveil_connections_rejected_total counter"
        );
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
        let _ = writeln!(
            out,
            "# HELP pgveil_statements_total Statements analysed, by protocol.\n# TYPE pgveil_statements_total counter"
        );
        for kind in [StatementKind::Simple, StatementKind::Parse] {
            let v = self.statements.get(kind.as_label()).map_or(0, |c| c.load(Relaxed));
            let _ = writeln!(out, "pgveil_statements_total{{kind=\"{}\"}} {v}", kind.as_label());
        }
        let _ = writeln!(
            out,
            "# HELP pgveil_blocked_total Statements blocked, by rule and reason.\n# TYPE pgveil_blocked_total counter"
        );
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
        g(
            &mut out,
            "pgveil_masked_cells_total",
            "counter",
            "Result cells replaced by a mask.",
            n(&self.masked_cells_total),
        );
        g(
            &mut out,
            "pgveil_backstop_masked_cells_total",
            "counter",
            "Cells the result-column layer masked because substitution missed a reference (should stay 0).",
            n(&self.backstop_masked_cells_total),
        );
        g(
            &mut out,
            "pgveil_substitution_check_failures_total",
            "counter",
            "Rewritten statements the substitution checker rejected (checked in debug builds).",
            n(&self.substitution_check_failures_total),
        );
        g(&mut out, "pgveil_rows_cut_total", "counter", "Results cut by a max_rows rule.", n(&self.rows_cut_total));
        let _ = writeln!(
            out,
            "# HELP pgveil_forwarded_bytes_total Bytes forwarded, by direction.\n# TYPE pgveil_forwarded_bytes_total counter"
        );
        let _ = writeln!(
            out,
            "pgveil_forwarded_bytes_total{{direction=\"client_to_server\"}} {}",
            n(&self.bytes_client_to_server)
        );
        let _ = writeln!(
            out,
            "pgveil_forwarded_bytes_total{{direction=\"server_to_client\"}} {}",
            n(&self.bytes_server_to_client)
        );
        let _ = writeln!(
            out,
            "# HELP pgveil_analysis_seconds Time spent analysing statements.\n# TYPE pgveil_analysis_seconds summary"
        );
        let _ = writeln!(
            out,
            "pgveil_analysis_seconds_sum {}\npgveil_analysis_seconds_count {}",
            secs(&self.analysis_seconds_sum),
            n(&self.analysis_count)
        );
        let _ = writeln!(
            out,
            "# HELP pgveil_analysis_cache_total Statement analysis cache lookups, by result.\n# TYPE pgveil_analysis_cache_total counter"
        );
        let _ = writeln!(out, "pgveil_analysis_cache_total{{result=\"hit\"}} {}", n(&self.analysis_cache_hits));
        let _ = writeln!(out, "pgveil_analysis_cache_total{{result=\"miss\"}} {}", n(&self.analysis_cache_misses));
        g(
            &mut out,
            "pgveil_catalog_refreshes_total",
            "counter",
            "Catalog snapshots loaded.",
            n(&self.catalog_refreshes_total),
        );
        let _ = writeln!(
            out,
            "# HELP pgveil_rules_reloads_total Rules file reloads, by result.\n# TYPE pgveil_rules_reloads_total counter"
        );
        let _ = writeln!(out, "pgveil_rules_reloads_total{{result=\"ok\"}} {}", n(&self.reloads_ok));
        let _ = writeln!(out, "pgveil_rules_reloads_total{{result=\"rejected\"}} {}", n(&self.reloads_rejected));
        g(&mut out, "pgveil_audit_lines_total", "counter", "Audit log lines written.", n(&self.audit_lines_total));
        let _ = writeln!(
            out,
            "# HELP pgveil_audit_write_seconds Time spent writing audit lines.\n# TYPE pgveil_audit_write_seconds summary"
        );
        let _ = writeln!(
            out,
            "pgveil_audit_write_seconds_sum {}\npgveil_audit_write_seconds_count {}",
            secs(&self.audit_write_nanos_sum),
            n(&self.audit_lines_total)
        );
        g(
            &mut out,
            "pgveil_audit_write_errors_total",
            "counter",
            "Failed audit log writes (each is retried; the line is not lost).",
            n(&self.audit_write_errors_total),
        );
        g(
            &mut out,
            "pgveil_audit_dropped_total",
            "counter",
            "Audit lines dropped: only connection-level events while the log is failing and its queue is full.",
            n(&self.audit_dropped_total),
        );
        g(
            &mut out,
            "pgveil_audit_failing",
            "gauge",
            "1 while the audit log cannot be written.",
            n(&self.audit_failing),
        );
        g(
            &mut out,
            "pgveil_tls_handshake_failures_total",
            "counter",
            "Client TLS handshakes that failed.",
            n(&self.tls_handshake_failures_total),
        );
        g(&mut out, "pgveil_auth_failures_total", "counter", "Failed client logins.", n(&self.auth_failures_total));
        g(
            &mut out,
            "pgveil_cancel_requests_total",
            "counter",
            "Cancel requests received.",
            n(&self.cancel_requests_total),
        );
        g(
            &mut out,
            "pgveil_raw_access_total",
            "counter",
            "Statements that returned raw values of protected columns (audit.raw_access).",
            n(&self.raw_access_total),
        );
        let _ = writeln!(
            out,
            "# HELP pgveil_sessions_terminated_total Sessions ended by containment, by cause.\n# TYPE pgveil_sessions_terminated_total counter"
        );
        let _ = writeln!(
            out,
            "pgveil_sessions_terminated_total{{cause=\"probe_budget\"}} {}",
            n(&self.sessions_terminated_budget)
        );
        let _ = writeln!(
            out,
            "pgveil_sessions_terminated_total{{cause=\"operator\"}} {}",
            n(&self.sessions_terminated_operator)
        );
        g(
            &mut out,
            "pgveil_roles_quarantined_total",
            "counter",
            "Roles quarantined (probe budget or operator).",
            n(&self.roles_quarantined_total),
        );
        g(
            &mut out,
            "pgveil_roles_released_total",
            "counter",
            "Quarantined roles released by an operator.",
            n(&self.roles_released_total),
        );
        g(
            &mut out,
            "pgveil_quarantine_refusals_total",
            "counter",
            "New sessions refused because their role is quarantined.",
            n(&self.quarantine_refusals_total),
        );
        g(
            &mut out,
            "pgveil_admin_denied_total",
            "counter",
            "Admin requests refused for a missing or wrong bearer token.",
            n(&self.admin_denied_total),
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
