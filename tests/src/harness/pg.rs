//! A throwaway PostgreSQL cluster from the machine's server binaries, shared by every test of
//! a run: started lazily under /tmp (short socket paths, readable by the `postgres` user),
//! guarded by a lock file so parallel test processes agree, with TLS and SCRAM on. Each test
//! gets its own database copied from the `fixture` template.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::certs::{self, CertFiles};

/// Login roles the fixture creates; each one's password is `<name>_pw`.
pub const ROLES: &[&str] = &["app_user", "analyst", "support", "support_lead", "billing_admin", "dba", "pgveil"];

#[derive(Debug)]
pub struct Cluster {
    pub base: PathBuf,
    pub bin: PathBuf,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub certs: CertFiles,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The shared cluster, started if needed. Panics with what to install if PostgreSQL is missing.
pub fn cluster() -> &'static Cluster {
    CLUSTER
        .get_or_init(|| ensure_running().unwrap_or_else(|e| panic!("cannot start the test PostgreSQL cluster: {e:#}")))
}

pub fn server_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PGVEIL_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow::anyhow!(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under /usr/lib/postgresql/*/bin; \
             install them with `apt-get install -y postgresql` (or set PGVEIL_PG_BIN)"
        )
    })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// Runs a server binary, as the `postgres` OS user when we are root (initdb refuses root).
fn run_pg(bin: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args);
    let out = cmd.output()?;
    Ok(out)
}

fn check(out: std::process::Output, what: &str) -> anyhow::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    anyhow::bail!("{what} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn base_dir() -> PathBuf {
    // One cluster per checkout (and per user), so two checkouts on one machine do not collide.
    let key = format!("{}-{}", env!("CARGO_MANIFEST_DIR"), std::env::var("USER").unwrap_or_default());
    let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
    PathBuf::from(format!("/tmp/pgveil-test-{:08x}", hash & 0xffff_ffff))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn ensure_running() -> anyhow::Result<Cluster> {
    let bin = server_bin_dir()?;
    let base = base_dir();
    std::fs::create_dir_all(&base)?;
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(base.join("lock"))?;
    lock.lock()?;
    let data = base.join("data");
    let socket_dir = base.join("sock");
    let root = is_root();
    if !data.join("PG_VERSION").exists() {
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&socket_dir)?;
        let certs = certs::write(&base.join("certs"), "server")?;
        std::fs::write(base.join("pwfile"), "postgres\n")?;
        if root {
            check(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&base).output()?, "chown")?;
        }
        check(
            run_pg(
                &bin.join("initdb"),
                &[
                    "-D",
                    data.to_str().unwrap_or_default(),
                    "-U",
                    "postgres",
                    "--pwfile",
                    base.join("pwfile").to_str().unwrap_or_default(),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
            )?,
            "initdb",
        )?;
        let port = free_port()?;
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nssl = on\n\
             ssl_cert_file = '{}'\nssl_key_file = '{}'\npassword_encryption = 'scram-sha-256'\n\
             max_connections = 400\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 64MB\nlog_min_messages = warning\n",
            socket_dir.display(),
            certs.cert.display(),
            certs.key.display()
        );
        append(&data.join("postgresql.conf"), &conf)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all md5_user 127.0.0.1/32 md5\n\
             host all clear_user 127.0.0.1/32 password\n\
             host all trust_user 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )?;
        std::fs::write(base.join("port"), port.to_string())?;
        if root {
            check(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&base).output()?, "chown")?;
            check(Command::new("chmod").arg("600").arg(&certs.key).output()?, "chmod")?;
        }
    }
    let port: u16 = std::fs::read_to_string(base.join("port"))?.trim().parse()?;
    let certs = CertFiles {
        ca: base.join("certs/server-ca.crt"),
        cert: base.join("certs/server.crt"),
        key: base.join("certs/server.key"),
    };
    let running = run_pg(&bin.join("pg_ctl"), &["-D", data.to_str().unwrap_or_default(), "status"])?.status.success();
    if !running {
        let log = base.join("server.log");
        check(
            run_pg(
                &bin.join("pg_ctl"),
                &[
                    "-D",
                    data.to_str().unwrap_or_default(),
                    "-l",
                    log.to_str().unwrap_or_default(),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )?,
            "pg_ctl start",
        )?;
    }
    let cluster = Cluster { base: base.clone(), bin, port, socket_dir, certs };
    if !base.join("fixture-ready").exists() {
        let mut setup = String::new();
        for role in ROLES {
            setup.push_str(&format!("CREATE ROLE {role} LOGIN PASSWORD '{role}_pw';\n"));
        }
        setup.push_str(
            "CREATE ROLE trust_user LOGIN;\n\
             CREATE ROLE clear_user LOGIN PASSWORD 'clear_pw';\n\
             SET password_encryption = 'md5';\nCREATE ROLE md5_user LOGIN PASSWORD 'md5_pw';\nRESET password_encryption;\n\
             GRANT pg_read_all_data TO dba;\nCREATE DATABASE fixture;\n",
        );
        cluster.psql_admin("postgres", &setup)?;
        cluster.psql_admin("fixture", include_str!("../../fixtures/schema.sql"))?;
        cluster.psql_admin("fixture", include_str!("../../fixtures/auth.sql"))?;
        // What `pgveil init` installs: the hash mask's function and the tests' key.
        let key = rules::HashKey::new(super::proxy::HASH_KEY);
        cluster.psql_admin(
            "fixture",
            &format!("{}\n{};\n", rules::sql::mask_sql::init_sql(), rules::sql::mask_sql::key_sql(&key)),
        )?;
        std::fs::write(base.join("fixture-ready"), "")?;
    }
    drop(lock);
    Ok(cluster)
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

impl Cluster {
    pub fn psql_bin(&self) -> PathBuf {
        self.bin.join("psql")
    }

    /// Runs SQL as the superuser over the Unix socket (trust), failing on the first error.
    pub fn psql_admin(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = Command::new(self.psql_bin())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-U", "postgres", "-d", db, "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        // Statements from stdin run one by one (not as one transaction, as `-c` would).
        child.stdin.take().map(|mut i| i.write_all(sql.as_bytes())).transpose()?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            anyhow::bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A database of its own for one test, copied from the fixture.
    pub fn fresh_db(&self) -> TestDb {
        self.db_from("fixture")
    }

    /// An empty database of its own (from template0), to restore a dump into.
    pub fn empty_db(&self) -> TestDb {
        self.db_from("template0")
    }

    fn db_from(&self, template: &str) -> TestDb {
        let name = format!("t_{:016x}", rand::random::<u64>());
        let mut last = None;
        for _ in 0..20 {
            match self.psql_admin("postgres", &format!("CREATE DATABASE {name} TEMPLATE {template}")) {
                Ok(_) => {
                    return TestDb {
                        name,
                        port: self.port,
                        socket_dir: self.socket_dir.clone(),
                        psql: self.psql_bin(),
                    };
                }
                Err(e) => {
                    // "source database is being accessed by other users": another test's copy.
                    last = Some(e);
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
        panic!("cannot create a test database: {last:?}");
    }
}

/// One test's database; dropped (best effort) when the test ends.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    port: u16,
    socket_dir: PathBuf,
    psql: PathBuf,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new(&self.psql)
            .args(["-X", "-q", "-U", "postgres", "-d", "postgres", "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-c", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .output();
    }
}
