//! Operator settings: the configuration file of config.md, with `PGVEIL_<SECTION>_<KEY>`
//! environment overrides. Validated once at load; the rest of the proxy reads plain structs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: String,
    pub upstream: Upstream,
    pub tls: ClientTls,
    pub auth: Auth,
    pub catalog: Catalog,
    pub rules: Option<PathBuf>,
    pub audit: Audit,
    pub admin: Admin,
    pub limits: Limits,
    /// `PGVEIL_CANCEL_KEY`: the secret that seals cancel keys, shared by instances behind one
    /// load balancer. Never read from the file.
    #[serde(skip)]
    pub cancel_secret: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:6432".to_owned(),
            upstream: Upstream::default(),
            tls: ClientTls::default(),
            auth: Auth::default(),
            catalog: Catalog::default(),
            rules: None,
            audit: Audit::default(),
            admin: Admin::default(),
            limits: Limits::default(),
            cancel_secret: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// A host name or address, or a directory holding the server's Unix socket (as libpq allows).
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
    pub ca: Option<PathBuf>,
    /// Time allowed for connecting to the server.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            host: "127.0.0.1".to_owned(),
            port: 5432,
            tls: UpstreamTls::Prefer,
            ca: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl Upstream {
    /// Whether `host` names a Unix socket directory.
    pub fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    pub fn socket_path(&self) -> PathBuf {
        Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub clients: ClientTlsMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    Disable,
    #[default]
    Allow,
    Require,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub mode: AuthMode,
    pub query: Option<String>,
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    #[default]
    Relay,
    Scram,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Catalog {
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The database whose `pgveil` schema (`pgveil init`) holds what every instance shares:
    /// the quarantined roles.
    pub state_database: String,
    /// Read from `password_file` or `PGVEIL_CATALOG_PASSWORD` at load; never from the file.
    #[serde(skip)]
    pub password: Option<String>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog { user: None, password_file: None, state_database: "postgres".to_owned(), password: None }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// `-` for standard output; unset for no audit log.
    pub path: Option<String>,
    pub raw_access: bool,
    /// Each line carries the SHA-256 of the previous line (`pgveil audit verify` checks it).
    pub chain: bool,
    /// While the log cannot be written (disk full, file unwritable): `refuse` the statements of
    /// audited (masked) sessions, or `continue` serving them with lines queued in memory.
    pub on_failure: AuditFailure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditFailure {
    Refuse,
    Continue,
}

impl Default for Audit {
    fn default() -> Self {
        Audit { path: None, raw_access: false, chain: true, on_failure: AuditFailure::Refuse }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub listen: Option<String>,
    /// A file holding the bearer token of the admin actions (`PGVEIL_ADMIN_TOKEN` otherwise).
    /// Without one the actions are refused; `/metrics`, `/healthz` and `/readyz` stay open.
    pub token_file: Option<PathBuf>,
    /// Read from `token_file` or `PGVEIL_ADMIN_TOKEN` at load; never from the file.
    #[serde(skip)]
    pub token: Option<String>,
}

/// A rate: `20/1m` (20 per minute); a bare number is per minute; `0` or `off`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max: u32,
    pub per: Duration,
}

impl Budget {
    pub fn parse(s: &str) -> Option<Option<Budget>> {
        let s = s.trim();
        if s == "off" || s == "0" {
            return Some(None);
        }
        let (n, per) = match s.split_once('/') {
            Some((n, per)) => (n.trim(), duration::parse(per.trim())?),
            None => (s, Duration::from_secs(60)),
        };
        let max: u32 = n.parse().ok()?;
        if per.is_zero() {
            return None;
        }
        Some((max > 0).then_some(Budget { max, per }))
    }
}

mod budget {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Budget;

    #[allow(clippy::ref_option, reason = "serde's `with` signature")]
    pub fn serialize<S: Serializer>(b: &Option<Budget>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_str(&format!("{}/{}s", b.max, b.per.as_secs())),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Budget>, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let text = match &v {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) => s.clone(),
            _ => return Err(serde::de::Error::custom("expected a rate such as 20/1m")),
        };
        Budget::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a rate such as 20/1m (or off)")))
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option, reason = "serde's `with` signature")]
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}s", d.as_secs())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let v: Option<String> = Option::deserialize(d)?;
        match v.as_deref() {
            None | Some("off" | "0") => Ok(None),
            Some(t) => super::duration::parse(t)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("{t:?} is not a duration such as 15m"))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    #[serde(with = "duration")]
    pub startup_timeout: Duration,
    /// How long SIGTERM waits for sessions to finish before closing them.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// The probe budget: policy blocks a masked session may hit within the window before it
    /// is terminated (`off`: no limit).
    #[serde(with = "budget")]
    pub blocks_per_session: Option<Budget>,
    /// With the budget spent, also quarantine the role for this long: its new sessions are
    /// refused on every instance sharing `catalog.state_database`.
    #[serde(with = "opt_duration")]
    pub quarantine: Option<Duration>,
    /// Where sessions run: `auto` (one session thread per core, each with its own
    /// single-threaded runtime), a number of such threads, or `shared` (tokio's work-stealing
    /// runtime, shared with the rest of the proxy).
    #[serde(with = "workers")]
    pub workers: Workers,
    /// Pump sessions whose two legs are both plaintext TCP with `splice(2)` through a pipe
    /// (the bytes never enter user space) instead of copying them.
    pub splice: bool,
    /// Where sessions whose two legs are plaintext TCP are pumped: `loop` (the pump threads'
    /// own event loops) or `copy` (tokio's copy in the session's task).
    pub pump: Pump,
    /// How many pump threads `pump: loop` runs: `auto` (half the cores, at least one) or a
    /// number. Fewer threads collect more ready sockets per wake-up (issue 18).
    #[serde(with = "pump_threads")]
    pub pump_threads: PumpThreads,
}

/// `limits.pump_threads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpThreads {
    Auto,
    Threads(usize),
}

impl PumpThreads {
    /// The number of pump threads on a machine with `cores` cores.
    pub fn count(self, cores: usize) -> usize {
        match self {
            PumpThreads::Auto => (cores / 2).max(1),
            PumpThreads::Threads(n) => n,
        }
    }
}

/// A thread-count setting's text: a YAML number or string (an environment override is a string).
fn setting_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::Deserialize;
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    })
}

/// A number of threads, 1 to 1024.
fn thread_count(text: &str) -> Option<usize> {
    text.parse::<usize>().ok().filter(|n| (1..=1024).contains(n))
}

mod pump_threads {
    use serde::{Deserializer, Serializer};

    use super::PumpThreads;

    pub fn serialize<S: Serializer>(p: &PumpThreads, s: S) -> Result<S::Ok, S::Error> {
        match p {
            PumpThreads::Auto => s.serialize_str("auto"),
            PumpThreads::Threads(n) => s.serialize_u64(*n as u64),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PumpThreads, D::Error> {
        let text = super::setting_text(d)?;
        match super::thread_count(&text) {
            Some(n) => Ok(PumpThreads::Threads(n)),
            None if text == "auto" => Ok(PumpThreads::Auto),
            None => {
                Err(serde::de::Error::custom(format!("{text:?} is not a number of pump threads (1 to 1024) or auto")))
            }
        }
    }
}

/// `limits.pump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pump {
    Loop,
    Copy,
}

/// `limits.workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Auto,
    Threads(usize),
    Shared,
}

mod workers {
    use serde::{Deserializer, Serializer};

    use super::Workers;

    pub fn serialize<S: Serializer>(w: &Workers, s: S) -> Result<S::Ok, S::Error> {
        match w {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Shared => s.serialize_str("shared"),
            Workers::Threads(n) => s.serialize_u64(*n as u64),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Workers, D::Error> {
        let text = super::setting_text(d)?;
        match (super::thread_count(&text), text.as_str()) {
            (Some(n), _) => Ok(Workers::Threads(n)),
            (None, "auto") => Ok(Workers::Auto),
            (None, "shared") => Ok(Workers::Shared),
            (None, _) => Err(serde::de::Error::custom(format!(
                "{text:?} is not a number of session threads (1 to 1024), auto or shared"
            ))),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 2000,
            startup_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            blocks_per_session: Some(Budget { max: 20, per: Duration::from_secs(60) }),
            quarantine: None,
            workers: Workers::Auto,
            splice: false,
            pump: Pump::Loop,
            pump_threads: PumpThreads::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// `PGVEIL_CATALOG_PASSWORD` is a secret read directly, not a configuration key.
const NOT_KEYS: &[&str] = &["catalog_password", "hash_key", "cancel_key", "admin_token", "config", "log"];
const SECTIONS: &[&str] = &["upstream", "tls", "auth", "catalog", "audit", "admin", "limits"];
const TOP_LEVEL: &[&str] = &["listen", "rules"];

impl Config {
    /// Reads the file (if any), applies `PGVEIL_*` environment overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (src, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_owned(), source })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(environment)".to_owned()),
        };
        let mut config = Self::from_yaml_with_env(&src, &name, std::env::vars())?;
        config.catalog.password = match &config.catalog.password_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.clone(), source })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            None => std::env::var("PGVEIL_CATALOG_PASSWORD").ok(),
        };
        config.cancel_secret = std::env::var("PGVEIL_CANCEL_KEY").ok();
        config.admin.token = match &config.admin.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.clone(), source })?
                    .trim()
                    .to_owned(),
            ),
            None => std::env::var("PGVEIL_ADMIN_TOKEN").ok(),
        }
        .filter(|t| !t.is_empty());
        Ok(config)
    }

    /// Parses YAML text and applies environment-style overrides (`PGVEIL_SECTION_KEY=value`).
    pub fn from_yaml_with_env(
        src: &str,
        name: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: name.to_owned(), message };
        let mut tree: serde_json::Value = if src.trim().is_empty() {
            serde_json::Value::Object(serde_json::Map::new())
        } else {
            serde_saphyr::from_str(src).map_err(|e| invalid(e.to_string()))?
        };
        let serde_json::Value::Object(root) = &mut tree else {
            return Err(invalid("the configuration must be a mapping".to_owned()));
        };
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix("PGVEIL_") else { continue };
            let rest = rest.to_ascii_lowercase();
            if NOT_KEYS.contains(&rest.as_str()) {
                continue;
            }
            let value = scalar(&raw);
            if TOP_LEVEL.contains(&rest.as_str()) {
                root.insert(rest, value);
            } else if let Some((section, key)) = rest.split_once('_').filter(|(s, _)| SECTIONS.contains(s)) {
                let entry =
                    root.entry(section.to_owned()).or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
                if let serde_json::Value::Object(map) = entry {
                    map.insert(key.to_owned(), value);
                }
            }
        }
        let config: Config = serde_json::from_value(tree).map_err(|e| invalid(e.to_string()))?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("listen: {:?} is not an address:port ({e})", self.listen))?;
        if let Some(admin) = &self.admin.listen {
            admin.parse::<SocketAddr>().map_err(|e| format!("admin.listen: {admin:?}: {e}"))?;
        }
        if self.tls.clients != ClientTlsMode::Disable && (self.tls.cert.is_none() != self.tls.key.is_none()) {
            return Err("tls: cert and key must be given together".to_owned());
        }
        if self.tls.clients == ClientTlsMode::Require && self.tls.cert.is_none() {
            return Err("tls.clients is require but tls.cert and tls.key are not set".to_owned());
        }
        if self.upstream.tls == UpstreamTls::VerifyFull && self.upstream.ca.is_none() {
            return Err("upstream.tls is verify-full but upstream.ca is not set".to_owned());
        }
        if self.auth.mode == AuthMode::Scram && self.auth.query.is_none() && self.auth.file.is_none() {
            return Err("auth.mode is scram but neither auth.query nor auth.file is set".to_owned());
        }
        if self.rules.is_some() && self.catalog.user.is_none() {
            return Err("rules are set but catalog.user is not: pgveil needs its catalog connection to know \
                        sessions' roles and the database's relations"
                .to_owned());
        }
        if self.auth.mode == AuthMode::Scram && self.auth.query.is_some() && self.catalog.user.is_none() {
            return Err("auth.query runs on the catalog connection: set catalog.user".to_owned());
        }
        if self.limits.max_connections == 0 {
            return Err("limits.max_connections must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// An environment value as YAML would read it (numbers and booleans typed), else a string.
fn scalar(raw: &str) -> serde_json::Value {
    match serde_saphyr::from_str::<serde_json::Value>(raw) {
        Ok(v @ (serde_json::Value::Bool(_) | serde_json::Value::Number(_))) => v,
        _ => serde_json::Value::String(raw.to_owned()),
    }
}

/// Durations written as `10s`, `500ms`, `2m` or `1h` (a bare number is seconds).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(s: &str) -> Option<Duration> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num.parse().ok()?;
        let secs = match unit.trim() {
            "" | "s" => n,
            "ms" => n / 1000.0,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            _ => return None,
        };
        Duration::try_from_secs_f64(secs).ok()
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Duration::try_from_secs_f64(n).map_err(serde::de::Error::custom),
            Raw::Str(s) => parse(&s).ok_or_else(|| serde::de::Error::custom(format!("invalid duration {s:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file() {
        let src = "listen: 127.0.0.1:7000\nupstream:\n  port: 5432\nlimits:\n  startup_timeout: 3s\ncatalog:\n  user: pgveil\n";
        let env = [
            ("PGVEIL_UPSTREAM_PORT".to_owned(), "6543".to_owned()),
            ("PGVEIL_LIMITS_MAX_CONNECTIONS".to_owned(), "5".to_owned()),
            ("PGVEIL_HASH_KEY".to_owned(), "secret".to_owned()),
            ("PGVEIL_RULES".to_owned(), "/tmp/r.yaml".to_owned()),
        ];
        let c = Config::from_yaml_with_env(src, "t.yaml", env).unwrap();
        assert_eq!(c.upstream.port, 6543);
        assert_eq!(c.limits.max_connections, 5);
        assert_eq!(c.limits.startup_timeout, Duration::from_secs(3));
        assert_eq!(c.rules.as_deref(), Some(Path::new("/tmp/r.yaml")));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = Config::from_yaml_with_env("listen: 1.2.3.4:5\nupstrem: {}\n", "t.yaml", []).unwrap_err();
        assert!(e.to_string().contains("upstrem"), "{e}");
        let e = Config::from_yaml_with_env("upstream: {tls: maybe}\n", "t.yaml", []).unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
        let e = Config::from_yaml_with_env("tls: {clients: require}\n", "t.yaml", []).unwrap_err();
        assert!(e.to_string().contains("tls.cert"), "{e}");
        let e = Config::from_yaml_with_env("rules: /etc/r.yaml\n", "t.yaml", []).unwrap_err();
        assert!(e.to_string().contains("catalog.user"), "{e}");
    }

    /// The limits of a config file with these environment overrides.
    fn limits(src: &str, env: &[(&str, &str)]) -> Result<Limits, ConfigError> {
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        Config::from_yaml_with_env(src, "t.yaml", env).map(|c| c.limits)
    }

    #[test]
    fn session_threads() {
        let workers = |src: &str, env: &[(&str, &str)]| limits(src, env).map(|l| l.workers);
        assert_eq!(workers("", &[]).unwrap(), Workers::Auto);
        assert_eq!(workers("limits: {workers: 3}\n", &[]).unwrap(), Workers::Threads(3));
        assert_eq!(workers("limits: {workers: shared}\n", &[]).unwrap(), Workers::Shared);
        assert_eq!(workers("", &[("PGVEIL_LIMITS_WORKERS", "2")]).unwrap(), Workers::Threads(2));
        for bad in ["0", "many", "-1"] {
            let e = workers(&format!("limits: {{workers: {bad}}}\n"), &[]).unwrap_err();
            assert!(e.to_string().contains("session threads"), "{e}");
        }
    }

    #[test]
    fn pump_choice() {
        let pump = |src: &str| Config::from_yaml_with_env(src, "t.yaml", std::iter::empty()).map(|c| c.limits.pump);
        assert_eq!(pump("").unwrap(), Pump::Loop);
        assert_eq!(pump("limits: {pump: copy}\n").unwrap(), Pump::Copy);
        assert_eq!(pump("limits: {pump: loop}\n").unwrap(), Pump::Loop);
        assert!(pump("limits: {pump: uring}\n").is_err());
    }

    #[test]
    fn pump_thread_count() {
        let threads = |src: &str, env: &[(&str, &str)]| limits(src, env).map(|l| l.pump_threads);
        assert_eq!(threads("", &[]).unwrap(), PumpThreads::Auto);
        assert_eq!(threads("limits: {pump_threads: 3}\n", &[]).unwrap(), PumpThreads::Threads(3));
        assert_eq!(threads("", &[("PGVEIL_LIMITS_PUMP_THREADS", "2")]).unwrap(), PumpThreads::Threads(2));
        for bad in ["0", "shared", "-1", "1025", "true"] {
            let e = threads(&format!("limits: {{pump_threads: {bad}}}\n"), &[]).unwrap_err();
            assert!(e.to_string().contains("pump threads"), "{e}");
            assert!(e.to_string().contains(&format!("\"{bad}\"")), "the message names the value: {e}");
        }
        // Half the cores, never none.
        assert_eq!([1, 2, 3, 8].map(|c| PumpThreads::Auto.count(c)), [1, 1, 1, 4]);
        assert_eq!(PumpThreads::Threads(3).count(64), 3);
    }

    #[test]
    fn durations() {
        assert_eq!(duration::parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(duration::parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(duration::parse("ten"), None);
    }
}
