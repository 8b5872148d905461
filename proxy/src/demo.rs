//! `pgveil demo`: a throwaway PostgreSQL from the machine's server binaries, a realistic
//! sample with roles and rules, and the proxy in front of it with TLS, the audit log and
//! metrics. Ctrl-C stops everything and removes the temporary directory.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::config::{ClientTlsMode, Config, UpstreamTls};

/// The demo's rules: rules.md's example, plus the application role.
pub const DEMO_RULES: &str = r#"version: 1

# Members of these roles bypass every rule below: their sessions are forwarded untouched.
exempt: [dba]

columns:
  public.customers.ssn:
    mask: { partial: { keep_last: 4 } }        # ***-**-6789
    unmasked_for: [billing_admin]
  public.customers.email:
    mask: email                                  # j***@example.com
    unmasked_for: [support]
    predicates: equality                         # look customers up by exact email
  public.customers.card_number:
    mask: redact
  public.customers.phone:
    mask: { partial: { keep_first: 2, keep_last: 2 } }
  public.customers.birth_date:
    mask: { generalize: year }
  public.customers.balance:
    mask: { round: 1000 }
  public.customers.notes:
    mask: nullify

selects:
  - name: no-bulk-customer-export
    roles: [analyst]
    tables: [public.customers]
    deny: [select_star, unfiltered]
    max_rows: 1000
"#;

const SAMPLE_SQL: &str = r#"
CREATE TABLE customers (
  id serial PRIMARY KEY, name text NOT NULL, email text, ssn text, card_number text, phone text,
  birth_date date, balance numeric(12,2), notes text, created_at timestamptz DEFAULT now());
CREATE TABLE orders (
  id serial PRIMARY KEY, customer_id int REFERENCES customers(id), amount numeric(10,2) NOT NULL,
  status text NOT NULL, placed_at timestamptz NOT NULL);
WITH first(n) AS (SELECT unnest(ARRAY['Ada','Grace','Alan','Edsger','Barbara','Donald','Frances','John','Margaret','Ken','Radia','Tim','Linus','Hedy','Katherine'])),
     last(n) AS (SELECT unnest(ARRAY['Lovelace','Hopper','Turing','Dijkstra','Liskov','Knuth','Allen','Backus','Hamilton','Thompson','Perlman','Berners-Lee','Torvalds','Lamarr','Johnson'])),
     people AS (SELECT f.n AS first, l.n AS last, row_number() OVER () AS i FROM first f CROSS JOIN last l)
INSERT INTO customers (name, email, ssn, card_number, phone, birth_date, balance, notes)
SELECT first || ' ' || last,
       lower(first) || '.' || lower(replace(last, '-', '')) || '@example.com',
       lpad((100 + i * 7 % 800)::text, 3, '0') || '-' || lpad((i * 13 % 99 + 1)::text, 2, '0') || '-' || lpad((i * 7919 % 9999)::text, 4, '0'),
       '4' || lpad((i * 982451653 % 1000000000000000)::text, 15, '0'),
       '+1 555 ' || lpad((i * 37 % 10000)::text, 4, '0'),
       date '1950-01-01' + (i * 1031 % 18000)::int,
       round((i * 7717 % 250000) / 7.0, 2),
       CASE WHEN i % 3 = 0 THEN 'prefers phone contact' WHEN i % 3 = 1 THEN 'VIP since ' || (2000 + i % 20) END
FROM people;
INSERT INTO orders (customer_id, amount, status, placed_at)
SELECT 1 + g % 225, round((g * 3571 % 50000) / 100.0, 2), (ARRAY['open','paid','shipped','refunded'])[1 + g % 4],
       timestamptz '2025-01-01' + (g * 7 % 365) * interval '1 day'
FROM generate_series(1, 2000) g;
"#;

fn server_bin() -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow::anyhow!(
            "PostgreSQL server binaries (initdb, pg_ctl) were not found under /usr/lib/postgresql/*/bin.\n\
             Install them: sudo apt-get install -y postgresql (Debian/Ubuntu)"
        )
    })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn pg_cmd(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn run(mut c: Command, what: &str) -> anyhow::Result<String> {
    let out = c.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Stops the server and removes the directory when dropped (also on errors and Ctrl-C).
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    started: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started {
            let mut c = pg_cmd(&self.bin, "pg_ctl");
            c.arg("-D").arg(self.dir.join("data")).args(["-m", "fast", "-w", "stop"]);
            let _ = c.output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the demo until Ctrl-C. `port` 0 picks a free port for the proxy.
pub async fn run_demo(port: u16) -> anyhow::Result<()> {
    let bin = server_bin()?;
    let dir = std::env::temp_dir().join(format!("pgveil-demo-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let mut cluster = Cluster { bin: bin.clone(), dir: dir.clone(), started: false };
    let data = dir.join("data");
    let sock = dir.join("sock");
    std::fs::create_dir_all(&sock)?;
    // Certificates: one self-signed certificate for both the server and the proxy.
    let (cert_pem, key_pem) = crate::tls::self_signed(&["localhost", "127.0.0.1"])?;
    std::fs::write(dir.join("server.crt"), &cert_pem)?;
    std::fs::write(dir.join("server.key"), &key_pem)?;
    std::fs::write(dir.join("pw"), "postgres\n")?;
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(&dir);
                c
            },
            "chown",
        )?;
    }
    eprintln!("pgveil demo: creating a PostgreSQL cluster in {}", dir.display());
    run(
        {
            let mut c = pg_cmd(&bin, "initdb");
            c.arg("-D").arg(&data).args(["-U", "postgres", "--pwfile"]).arg(dir.join("pw"));
            c.args(["--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"]);
            c
        },
        "initdb",
    )?;
    let pg_port = free_port()?;
    let conf = format!(
        "\nport = {pg_port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\npassword_encryption = 'scram-sha-256'\nfsync = off\n",
        sock.display(),
        dir.join("server.crt").display(),
        dir.join("server.key").display()
    );
    let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"))?;
    std::io::Write::write_all(&mut f, conf.as_bytes())?;
    if is_root() {
        run(
            {
                let mut c = Command::new("chmod");
                c.arg("600").arg(dir.join("server.key"));
                c
            },
            "chmod",
        )?;
    }
    run(
        {
            let mut c = pg_cmd(&bin, "pg_ctl");
            c.arg("-D").arg(&data).arg("-l").arg(dir.join("server.log")).args(["-w", "start"]);
            c
        },
        "pg_ctl start",
    )?;
    cluster.started = true;
    let psql = |sql: &str| {
        let mut c = Command::new(bin.join("psql"));
        c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "demo", "-h"]).arg(&sock);
        c.args(["-p", &pg_port.to_string(), "-c", sql]);
        run(c, "psql")
    };
    let mut c = Command::new(bin.join("createdb"));
    c.args(["-U", "postgres", "-h"]).arg(&sock).args(["-p", &pg_port.to_string(), "demo"]);
    run(c, "createdb")?;
    let roles = ["analyst", "support", "billing_admin", "dba", "app"];
    let mut setup = String::from("BEGIN;\n");
    for r in roles {
        setup.push_str(&format!("CREATE ROLE {r} LOGIN PASSWORD '{r}';\n"));
    }
    setup.push_str("CREATE ROLE pgveil LOGIN PASSWORD 'pgveil';\nCOMMIT;");
    psql(&setup)?;
    psql(SAMPLE_SQL)?;
    psql(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO analyst, support, billing_admin, dba, app; GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO app",
    )?;

    let rules_path = dir.join("rules.yaml");
    std::fs::write(&rules_path, DEMO_RULES)?;
    let audit_path = dir.join("audit.jsonl");
    let port = if port == 0 { free_port()? } else { port };
    let admin_port = free_port()?;
    let mut config = Config { listen: format!("127.0.0.1:{port}"), ..Config::default() };
    config.upstream.host = "127.0.0.1".to_owned();
    config.upstream.port = pg_port;
    config.upstream.tls = UpstreamTls::Disable;
    config.tls.cert = Some(dir.join("server.crt"));
    config.tls.key = Some(dir.join("server.key"));
    config.tls.clients = ClientTlsMode::Allow;
    config.catalog.user = Some("pgveil".to_owned());
    config.catalog.password = Some("pgveil".to_owned());
    config.catalog.state_database = "demo".to_owned();
    config.rules = Some(rules_path.clone());
    config.audit.path = Some(audit_path.display().to_string());
    config.admin.listen = Some(format!("127.0.0.1:{admin_port}"));
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    let key = hex::encode(key).into_bytes();
    // What `pgveil init` does: the hash mask's function and this run's key.
    psql(&format!(
        "{}\n{};",
        rules::sql::mask_sql::init_sql(),
        rules::sql::mask_sql::key_sql(&rules::HashKey::new(&key))
    ))?;
    let opts = rules::CompileOptions { hash_key: Some(key) };
    let running = crate::Proxy::start(config, opts).await?;
    let line = |role: &str| {
        format!("psql \"host=127.0.0.1 port={port} dbname=demo user={role} password={role} sslmode=require\"")
    };
    println!(
        "\npgveil demo is running (PostgreSQL {pg_port} ← pgveil {port}, TLS on the client leg).\n\n\
         Connect as each role:\n  analyst        {}\n  support        {}\n  billing_admin  {}\n  dba (exempt)   {}\n  app            {}\n\n\
         Try:\n  masked:   SELECT name, email, ssn, card_number, phone, birth_date, balance FROM customers WHERE id < 5;\n  \
         computed: SELECT upper(email), left(ssn, 3), balance * 2 FROM customers WHERE id < 5;   -- on masked values\n  \
         blocked:  SELECT * FROM customers;            -- as analyst: SELECT * over a protected table\n            \
         SELECT name FROM customers WHERE ssn LIKE '1%';   -- a predicate on a masked column\n  \
         allowed:  SELECT status, count(*), sum(amount) FROM orders GROUP BY status;\n\n\
         A masked copy for staging (app's masks in every protected column):\n  \
         pg_dump -N pgveil -d \"host=127.0.0.1 port={port} dbname=demo user=app password=app sslmode=require\" -f demo-masked.sql\n\n\
         Rules: {}  (edit it: pgveil reloads on save)\nAudit log: {}  (pgveil audit {} --summary)\nMetrics: http://127.0.0.1:{admin_port}/metrics\n\
         Press Ctrl-C to stop and remove everything.\nPGVEIL_DEMO_READY port={port} admin={admin_port} dir={}",
        line("analyst"),
        line("support"),
        line("billing_admin"),
        line("dba"),
        line("app"),
        rules_path.display(),
        audit_path.display(),
        audit_path.display(),
        dir.display(),
    );
    let stop = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! { _ = i.recv() => {}, _ = t.recv() => {} }
            }
            _ => std::future::pending().await,
        }
    };
    running.run_until(stop).await;
    eprintln!("pgveil demo: stopping PostgreSQL and removing {}", dir.display());
    drop(cluster);
    Ok(())
}
