//! The `pgveil` command line: arguments (clap), then one function per command. `main.rs`
//! only calls [`main`].
#![allow(clippy::print_stderr, clippy::print_stdout, reason = "a CLI prints its findings")]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pgveil",
    version,
    about = "PostgreSQL proxy that masks protected columns and blocks over-broad reads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The configuration file (config.md); every key can be overridden by PGVEIL_<SECTION>_<KEY>.
        #[arg(long, short, env = "PGVEIL_CONFIG")]
        config: Option<PathBuf>,
        /// Log format.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Start a throwaway PostgreSQL with sample data and the proxy in front of it.
    Demo {
        /// The proxy's port (0: any free port).
        #[arg(long, default_value_t = 6432)]
        port: u16,
    },
    /// Validate a rules file (exit 0: valid, 1: findings, 2: usage).
    Check {
        #[arg(long)]
        rules: PathBuf,
        /// Also check tables, columns and mask types against this database (postgres://…).
        #[arg(long)]
        against: Option<String>,
    },
    /// Read the audit log: a table of events, a summary, or `verify` the hash chain.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        verify: Option<AuditCommand>,
        /// The audit log (default: audit.path of PGVEIL_CONFIG, else ./audit.jsonl).
        file: Option<PathBuf>,
        /// Only events newer than this (e.g. 15m, 1h, 7d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        rule: Option<String>,
        #[arg(long)]
        event: Option<String>,
        #[arg(long)]
        database: Option<String>,
        /// Counts by event, rule, user and hour, and the top statement fingerprints.
        #[arg(long)]
        summary: bool,
        /// Keep printing new events as they are written.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line, for piping.
        #[arg(long)]
        json: bool,
    },
    /// Create or upgrade the `pgveil` schema (the `hash` mask's function and key) in a database.
    Init {
        /// The database (postgres://…), as a role that may create a schema there.
        #[arg(long)]
        against: String,
        /// Print the SQL instead of running it.
        #[arg(long)]
        print: bool,
        /// The proxy's catalog login (catalog.user), granted the shared quarantine table.
        #[arg(long, default_value = "pgveil")]
        catalog_role: String,
    },
    /// Operator actions on a running instance (admin listener, bearer token).
    Admin {
        #[command(subcommand)]
        action: AdminCommand,
        /// The instance's admin listener (admin.listen).
        #[arg(long, default_value = "127.0.0.1:9930", env = "PGVEIL_ADMIN_LISTEN")]
        url: String,
        /// A file holding the admin token (else PGVEIL_ADMIN_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Show what the rules decide for a statement run by a role.
    Explain {
        #[arg(long)]
        rules: PathBuf,
        #[arg(long)]
        role: String,
        /// Read columns, views and role memberships from this database (postgres://…).
        #[arg(long)]
        against: Option<String>,
        /// The statement.
        sql: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit log (exit 1 if it is broken).
    Verify { file: PathBuf },
    /// The access review: per role and protected column, raw and masked reads, statements,
    /// rows, the largest statement, first and last seen. Reads rotated and gzipped logs.
    Access {
        /// Logs to read (default: audit.path of PGVEIL_CONFIG and its rotations).
        files: Vec<PathBuf>,
        /// Only reads newer than this (e.g. 30d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        role: Option<String>,
        /// `schema.table.column`, or a column name.
        #[arg(long)]
        column: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// List live sessions.
    Sessions,
    /// End a session (its id is in `sessions`).
    Terminate { session: String },
    /// List quarantined roles.
    Quarantines,
    /// Refuse a role's new sessions (and end its live ones) on every instance.
    Quarantine {
        role: String,
        /// How long (e.g. 15m, 2h, 7d).
        #[arg(long = "for", default_value = "15m")]
        how_long: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a role's quarantine.
    Release { role: String },
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgveil: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Run { config, log_format } => {
            init_tracing(&log_format);
            match runtime.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgveil: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo { port } => {
            init_tracing("text");
            match runtime.block_on(crate::demo::run_demo(port)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgveil demo: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { rules, against } => {
            let (report, code) =
                runtime.block_on(crate::cli::check(&rules, against.as_deref(), &crate::policy::options_from_env()));
            print!("{report}");
            ExitCode::from(code)
        }
        Command::Audit { verify: Some(AuditCommand::Verify { file }), .. } => match std::fs::read_to_string(&file) {
            Ok(text) => match crate::audit_cli::verify(&text) {
                Ok(n) => {
                    println!("{}: chain intact ({n} lines)", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("{}: {e}", file.display());
                    ExitCode::from(1)
                }
            },
            Err(e) => {
                eprintln!("pgveil: cannot read {}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        Command::Audit { verify: None, file, since, user, rule, event, database, summary, follow, json } => {
            let file = file.unwrap_or_else(|| {
                crate::config::Config::load(std::env::var_os("PGVEIL_CONFIG").map(PathBuf::from).as_deref())
                    .ok()
                    .and_then(|c| c.audit.path)
                    .map_or_else(|| PathBuf::from("audit.jsonl"), PathBuf::from)
            });
            let since = match since.as_deref().map(crate::audit_cli::since) {
                Some(None) => {
                    eprintln!("pgveil: --since takes a duration such as 15m, 1h or 7d");
                    return ExitCode::from(2);
                }
                Some(s) => s,
                None => None,
            };
            let filter = crate::audit_cli::Filter { since, user, rule, event, database };
            if follow {
                return match runtime.block_on(crate::audit_cli::follow(&file, &filter, json)) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("pgveil: {}: {e}", file.display());
                        ExitCode::from(2)
                    }
                };
            }
            match std::fs::read_to_string(&file) {
                Ok(text) if summary => {
                    print!("{}", crate::audit_cli::summary(&text, &filter));
                    ExitCode::SUCCESS
                }
                Ok(text) => {
                    print!("{}", crate::audit_cli::table(&text, &filter, json));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pgveil: cannot read {}: {e}", file.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Audit { verify: Some(AuditCommand::Access { files, since, role, column, json }), .. } => {
            let files = if files.is_empty() {
                let base = crate::config::Config::load(std::env::var_os("PGVEIL_CONFIG").map(PathBuf::from).as_deref())
                    .ok()
                    .and_then(|c| c.audit.path)
                    .map_or_else(|| PathBuf::from("audit.jsonl"), PathBuf::from);
                crate::access_review::with_rotations(&base)
            } else {
                files
            };
            let since = match since.as_deref().map(crate::audit_cli::since) {
                Some(None) => {
                    eprintln!("pgveil: --since takes a duration such as 30d");
                    return ExitCode::from(2);
                }
                Some(s) => s,
                None => None,
            };
            let filter = crate::access_review::Filter { since, role, column };
            let mut review = crate::access_review::Review::default();
            if files.is_empty() {
                eprintln!("pgveil: no audit log found (give files, or set audit.path through PGVEIL_CONFIG)");
                return ExitCode::from(2);
            }
            for f in &files {
                match crate::access_review::read_log(f) {
                    Ok(text) => review.add_text(&text, &filter),
                    Err(e) => {
                        eprintln!("pgveil: cannot read {}: {e}", f.display());
                        return ExitCode::from(2);
                    }
                }
            }
            print!("{}", if json { review.json() } else { review.table() });
            ExitCode::SUCCESS
        }
        Command::Admin { action, url, token_file } => {
            let token = match token_file {
                Some(f) => match std::fs::read_to_string(&f) {
                    Ok(t) => Some(t.trim().to_owned()),
                    Err(e) => {
                        eprintln!("pgveil admin: cannot read {}: {e}", f.display());
                        return ExitCode::from(2);
                    }
                },
                None => std::env::var("PGVEIL_ADMIN_TOKEN").ok(),
            };
            let action = match action {
                AdminCommand::Sessions => crate::admin_cli::Action::Sessions,
                AdminCommand::Terminate { session } => crate::admin_cli::Action::Terminate(session),
                AdminCommand::Quarantines => crate::admin_cli::Action::Quarantines,
                AdminCommand::Quarantine { role, how_long, reason } => {
                    crate::admin_cli::Action::Quarantine { role, how_long, reason }
                }
                AdminCommand::Release { role } => crate::admin_cli::Action::Release(role),
            };
            let (report, code) = runtime.block_on(crate::admin_cli::run(&url, token.as_deref(), &action));
            print!("{report}");
            ExitCode::from(code)
        }
        Command::Init { against, print, catalog_role } => {
            let key = std::env::var("PGVEIL_HASH_KEY")
                .ok()
                .filter(|k| !k.is_empty())
                .map(|k| rules::HashKey::new(k.as_bytes()));
            let (report, code) = runtime.block_on(crate::init::init(&against, print, key, &catalog_role));
            print!("{report}");
            ExitCode::from(code)
        }
        Command::Explain { rules, role, against, sql } => {
            let (report, code) = runtime.block_on(crate::cli::explain(
                &rules,
                &role,
                against.as_deref(),
                &sql,
                &crate::policy::options_from_env(),
            ));
            print!("{report}");
            ExitCode::from(code)
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGVEIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path.as_deref())?;
    let running = crate::running::Proxy::start(config, crate::policy::options_from_env()).await?;
    let shared = &running.shared;
    tracing::info!(
        listen = %running.addr,
        upstream = %format!("{}:{}", shared.config.upstream.host, shared.config.upstream.port),
        rules = ?shared.config.rules,
        "pgveil ready"
    );
    let signals = crate::server::signals(Arc::clone(shared));
    running.run_until(signals).await;
    tracing::info!("pgveil stopped");
    Ok(())
}
