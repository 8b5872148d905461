# Shared by the end-to-end scripts (sourced): a throwaway PostgreSQL cluster with pgbench's
# tables, a 200,000-row table, the bench roles and rules, and a release pgveil in front of it.
# Sets BIN PGVEIL WORK PG_PORT VEIL_PORT ADMIN_PORT VEIL_PID and the cleanup trap.

BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort | tail -n 1)
[ -n "$BIN" ] && [ -x "$BIN/initdb" ] || { echo "PostgreSQL server binaries missing: apt-get install -y postgresql" >&2; exit 1; }
cargo build --release -p proxy >/dev/null 2>&1 || cargo build --release -p proxy
PGVEIL=$PWD/target/release/pgveil

WORK=$(mktemp -d /tmp/pgveil-bench-XXXXXX)
chmod 755 "$WORK"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres "$WORK"

# setup_cluster MAX_CONNECTIONS
setup_cluster() {
  PG_PORT=$(free_port); VEIL_PORT=$(free_port); ADMIN_PORT=$(free_port)
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$WORK/tls.key" -out "$WORK/tls.crt" -days 2 -subj /CN=localhost >/dev/null 2>&1
  chmod 600 "$WORK/tls.key"; [ "$(id -u)" = 0 ] && chown postgres "$WORK/tls.key" "$WORK/tls.crt"
  as_pg "$BIN/initdb" -D "$WORK/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
  # TLS is offered on every target (clients choose with PGSSLMODE), so TLS runs compare alike.
  cat >> "$WORK/data/postgresql.conf" <<CONF
ssl = on
ssl_cert_file = '$WORK/tls.crt'
ssl_key_file = '$WORK/tls.key'
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
max_connections = $1
fsync = off
synchronous_commit = off
shared_buffers = 128MB
CONF
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
  PSQL=("$BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres)
  "${PSQL[@]}" -c "CREATE DATABASE bench" >/dev/null
  "$BIN/pgbench" -i -s 10 -q -h 127.0.0.1 -p "$PG_PORT" -U postgres bench >/dev/null 2>&1
  "${PSQL[@]}" -d bench >/dev/null <<SQL
CREATE TABLE big AS SELECT g AS id, md5(g::text) c1, md5((g+1)::text) c2, md5((g+2)::text) c3, md5((g+3)::text) c4,
  md5((g+4)::text) c5, md5((g+5)::text) c6, md5((g+6)::text) c7 FROM generate_series(1, 200000) g;
CREATE ROLE bench_exempt LOGIN; CREATE ROLE bench_nomask LOGIN; CREATE ROLE bench_masked LOGIN; CREATE ROLE pgveil LOGIN;
GRANT ALL ON ALL TABLES IN SCHEMA public TO bench_exempt, bench_nomask, bench_masked;
SQL
  cat > "$WORK/rules.yaml" <<YAML
version: 1
exempt: [bench_exempt]
columns:
  public.pgbench_accounts.abalance: { mask: { round: 100 }, unmasked_for: [bench_nomask] }
  public.pgbench_accounts.filler: { mask: redact }
  public.big.c1: { mask: { partial: { keep_last: 4 } }, unmasked_for: [bench_nomask] }
  public.big.c2: { mask: redact, unmasked_for: [bench_nomask] }
YAML
}

# start_pgveil [EXTRA CONFIG LINES]: writes $WORK/pgveil.yaml and starts pgveil in the background.
start_pgveil() {
  local extra=${1:-}
  [ -n "$extra" ] || extra="limits: { max_connections: 500 }"
  cat > "$WORK/pgveil.yaml" <<YAML
listen: 127.0.0.1:$VEIL_PORT
upstream: { host: 127.0.0.1, port: $PG_PORT, tls: disable }
tls: { cert: $WORK/tls.crt, key: $WORK/tls.key, clients: allow }
catalog: { user: pgveil }
rules: $WORK/rules.yaml
admin: { listen: 127.0.0.1:$ADMIN_PORT }
$extra
YAML
  PGVEIL_LOG=warn "$PGVEIL" run --config "$WORK/pgveil.yaml" 2>"$WORK/pgveil.log" &
  VEIL_PID=$!; PIDS+=("$VEIL_PID")
  for _ in $(seq 100); do "$BIN/pg_isready" -q -h 127.0.0.1 -p "$VEIL_PORT" -U bench_exempt -d bench && return 0; sleep 0.1; done
  echo "pgveil did not start: $(cat "$WORK/pgveil.log")" >&2; exit 1
}

# start_pgbouncer: PgBouncer 1.x in session mode in front of the cluster (TLS offered to
# clients, sslmode chosen by them). Sets BOUNCER_PORT BOUNCER_PID.
start_pgbouncer() {
  command -v pgbouncer >/dev/null || { echo "pgbouncer missing: apt-get install -y pgbouncer" >&2; exit 1; }
  BOUNCER_PORT=$(free_port)
  cat > "$WORK/pgbouncer.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = 500
default_pool_size = 100
client_tls_sslmode = allow
client_tls_key_file = $WORK/tls.key
client_tls_cert_file = $WORK/tls.crt
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
unix_socket_dir =
INI
  printf '"postgres" ""\n"bench_exempt" ""\n' > "$WORK/userlist.txt"
  [ "$(id -u)" = 0 ] && chown -R postgres "$WORK"
  as_pg pgbouncer -d "$WORK/pgbouncer.ini"
  sleep 1
  BOUNCER_PID=$(cat "$WORK/pgbouncer.pid"); PIDS+=("$BOUNCER_PID")
}

# start_haproxy: HAProxy in `mode tcp`, the protocol-blind floor. Sets HAPROXY_PORT and
# HAPROXY_PID, or returns 1 with a note when HAProxy is not installed.
start_haproxy() {
  command -v haproxy >/dev/null || { echo "haproxy not installed: its floor row is skipped (apt-get install -y haproxy)" >&2; return 1; }
  HAPROXY_PORT=$(free_port)
  cat > "$WORK/haproxy.cfg" <<CFG
global
  maxconn 2000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen pg
  bind 127.0.0.1:$HAPROXY_PORT
  server pg 127.0.0.1:$PG_PORT
CFG
  haproxy -D -f "$WORK/haproxy.cfg" -p "$WORK/haproxy.pid"
  sleep 0.5
  HAPROXY_PID=$(cat "$WORK/haproxy.pid"); PIDS+=("$HAPROXY_PID")
}

# Process CPU ticks (user + system) and context switches of all its threads.
# Fields of a pgbench report (its output as the argument).
tps_of() { sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$1"; }
tx_of() { sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$1"; }
# per_tx_us TICKS TX: CPU ticks (of /proc, CLK_TCK a second) as microseconds per transaction.
per_tx_us() { awk -v d="$1" -v tick="$TICK" -v tx="$2" 'BEGIN { if (tx > 0) printf "%.1f", d / tick * 1e6 / tx; else print 0 }'; }
latency_of() { sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$1"; }
cpu_ticks() { [ -n "$1" ] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }
user_ticks() { [ -n "$1" ] && awk '{print $14}' "/proc/$1/stat" || echo 0; }
ctx_switches() { [ -n "$1" ] && cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}' || echo 0; }
TICK=$(getconf CLK_TCK)
