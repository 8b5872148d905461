# Shared by the framework-suite scripts (sourced): a work directory removed on exit, a
# throwaway PostgreSQL with SCRAM, and a release pgveil in front of it whose rules make one
# role exempt and mask a column of a table the suites never read.
# Sets BIN WORK PG_PORT VEIL_PORT PSQL VEIL_PID; needs KEEP_LOGS_IN (a directory) or "".

BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
[ -x "$BIN/initdb" ] || { echo "PostgreSQL server binaries missing: apt-get install -y postgresql" >&2; exit 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# suite_work PREFIX: the work directory, removed (and its logs kept) on exit.
suite_work() {
  WORK=$(mktemp -d "/tmp/$1-XXXXXX")
  [ "$(id -u)" = 0 ] && chown postgres "$WORK"
  trap suite_cleanup EXIT
}

suite_cleanup() {
  if [ -n "${KEEP_LOGS_IN:-}" ]; then
    mkdir -p "$KEEP_LOGS_IN" && cp "$WORK"/*.log "$WORK"/*.xml "$KEEP_LOGS_IN"/ 2>/dev/null || true
  fi
  [ -n "${VEIL_PID:-}" ] && kill "$VEIL_PID" 2>/dev/null || true
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}

# suite_cluster [EXTRA postgresql.conf LINES]
suite_cluster() {
  PG_PORT=$(free_port); VEIL_PORT=$(free_port)
  echo postgres > "$WORK/pw"; [ "$(id -u)" = 0 ] && chown postgres "$WORK/pw"
  as_pg "$BIN/initdb" -D "$WORK/data" -U postgres --pwfile="$WORK/pw" -A scram-sha-256 -E UTF8 >/dev/null
  cat >> "$WORK/data/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
fsync = off
${1:-}
CONF
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
  export PGPASSWORD=postgres
  PSQL=("$BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres)
  "${PSQL[@]}" -c "CREATE ROLE pgveil LOGIN PASSWORD 'pgveil'"
}

# suite_pgveil EXEMPT_ROLE: rules (that role exempt, pgveil_canary.secret.ssn masked,
# $FUNCTIONS_ALLOW as functions.allow), then a release pgveil on $VEIL_PORT.
suite_pgveil() {
  local allow=""
  [ -n "${FUNCTIONS_ALLOW:-}" ] && allow="functions: { allow: [$FUNCTIONS_ALLOW] }"
  cat > "$WORK/rules.yaml" <<YAML
version: 1
exempt: [$1]
columns:
  pgveil_canary.secret.ssn: { mask: redact }
$allow
YAML
  cat > "$WORK/pgveil.yaml" <<YAML
listen: 127.0.0.1:$VEIL_PORT
upstream: { host: 127.0.0.1, port: $PG_PORT, tls: disable }
tls: { clients: allow }
catalog: { user: pgveil, password_file: $WORK/catalog-pw }
rules: $WORK/rules.yaml
limits: { max_connections: 500 }
YAML
  echo pgveil > "$WORK/catalog-pw"
  cargo build --release -q -p proxy   # a no-op when current
  PGVEIL_LOG=warn target/release/pgveil run --config "$WORK/pgveil.yaml" 2>"$WORK/pgveil.log" &
  VEIL_PID=$!
  for _ in $(seq 100); do "$BIN/pg_isready" -q -h 127.0.0.1 -p "$VEIL_PORT" && break; sleep 0.1; done
}

# suite_sdist NAME VERSION: the framework's source distribution (its tests are not in the
# wheel), unpacked in $WORK. Sets SRC.
suite_sdist() {
  python3 -m pip download -q --no-deps --no-binary :all: -d "$WORK" "$1==$2" >/dev/null
  tar xzf "$WORK"/"$1"-*.tar.gz -C "$WORK"
  SRC=$(ls -d "$WORK"/"$1"-*/)
}
