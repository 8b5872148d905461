#!/usr/bin/env bash
# A framework's own test suite, three ways (issue 15): PostgreSQL directly, through pgveil as
# an exempt role, and through pgveil as a masked role whose rules mask a column of a table the
# suite never reads. Prints the three counts and the tests whose outcome differs from direct.
#
#   tests/suites/run.sh                               # SQLAlchemy's PostgreSQL dialect tests
#   tests/suites/run.sh test/dialect/postgresql/test_types.py
#   DRIVER=asyncpg tests/suites/run.sh
#
# PYTEST_K="expr" passes -k expr; FUNCTIONS_ALLOW="public.hstore" adds a functions.allow list to
# the masked role's rules. The logs of the last run are left in /tmp/pgveil-suites-last/.
# Installs what it needs (pytest, the SQLAlchemy sdist matching the installed SQLAlchemy, the
# driver); starts its own throwaway cluster and a release pgveil; removes everything on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SEL=${1:-test/dialect/postgresql}
DRIVER=${DRIVER:-psycopg}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
[ -x "$BIN/initdb" ] || { echo "PostgreSQL server binaries missing: apt-get install -y postgresql" >&2; exit 1; }
python3 -m pip install -q pytest 'psycopg[binary]' asyncpg greenlet sqlalchemy >/dev/null 2>&1 || true
VER=$(python3 -c 'import sqlalchemy; print(sqlalchemy.__version__)')
WORK=$(mktemp -d /tmp/pgveil-suites-XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  # The runs' logs and JUnit files are kept for a look at the differences.
  mkdir -p /tmp/pgveil-suites-last && cp "$WORK"/*.log "$WORK"/*.xml /tmp/pgveil-suites-last/ 2>/dev/null || true
  [ -n "${VEIL_PID:-}" ] && kill "$VEIL_PID" 2>/dev/null || true
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
python3 -m pip download -q --no-deps --no-binary :all: -d "$WORK" "sqlalchemy==$VER" >/dev/null
tar xzf "$WORK"/sqlalchemy-*.tar.gz -C "$WORK"
SRC=$(ls -d "$WORK"/sqlalchemy-*/)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port); VEIL_PORT=$(free_port)
echo postgres > "$WORK/pw"; [ "$(id -u)" = 0 ] && chown postgres "$WORK/pw"
as_pg "$BIN/initdb" -D "$WORK/data" -U postgres --pwfile="$WORK/pw" -A scram-sha-256 -E UTF8 >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
max_prepared_transactions = 10
fsync = off
CONF
as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
export PGPASSWORD=postgres
PSQL=("$BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres)
"${PSQL[@]}" -c "CREATE ROLE sqla LOGIN PASSWORD 'sqla' CREATEDB; CREATE ROLE sqla_masked LOGIN PASSWORD 'sqla' CREATEDB; CREATE ROLE pgveil LOGIN PASSWORD 'pgveil'"
for db in direct exempt masked; do
  owner=sqla; [ "$db" = masked ] && owner=sqla_masked
  "${PSQL[@]}" -c "CREATE DATABASE sqla_$db OWNER $owner"
  "${PSQL[@]}" -d "sqla_$db" -c "CREATE EXTENSION hstore; CREATE EXTENSION citext;
    CREATE SCHEMA test_schema AUTHORIZATION $owner; CREATE SCHEMA test_schema_2 AUTHORIZATION $owner;
    CREATE SCHEMA pgveil_canary; CREATE TABLE pgveil_canary.secret (id int, ssn text);
    INSERT INTO pgveil_canary.secret VALUES (1, '900-00-0001')"
done
ALLOW_LINE=""
[ -n "${FUNCTIONS_ALLOW:-}" ] && ALLOW_LINE="functions: { allow: [$FUNCTIONS_ALLOW] }"
cat > "$WORK/rules.yaml" <<YAML
version: 1
exempt: [sqla]
columns:
  pgveil_canary.secret.ssn: { mask: redact }
$ALLOW_LINE
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

run() { # name port user db
  local url="postgresql+$DRIVER://$3:sqla@127.0.0.1:$2/$4"
  (cd "$SRC" && timeout 1800 python3 -m pytest $SEL ${PYTEST_K:+-k "$PYTEST_K"} --dburi "$url" -p no:cacheprovider -q \
     --junitxml="$WORK/$1.xml" >"$WORK/$1.log" 2>&1) || true
}
run direct "$PG_PORT" sqla sqla_direct
run exempt "$VEIL_PORT" sqla sqla_exempt
run masked "$VEIL_PORT" sqla_masked sqla_masked
python3 - "$WORK" "$SEL" "$DRIVER" "$VER" <<'PY'
import sys, xml.etree.ElementTree as ET
work, sel, driver, ver = sys.argv[1:]
def outcomes(name):
    out = {}
    try:
        root = ET.parse(f"{work}/{name}.xml").getroot()
    except Exception as e:
        print(f"{name}: no results ({e}); see the log"); return out
    for tc in root.iter("testcase"):
        key = f"{tc.get('classname')}::{tc.get('name')}"
        state = "pass"
        for child in tc:
            if child.tag in ("failure", "error"): state = "fail"
            elif child.tag == "skipped": state = "skip"
        out[key] = state
    return out
runs = {n: outcomes(n) for n in ("direct", "exempt", "masked")}
print(f"SQLAlchemy {ver} ({driver}), {sel}")
for n, o in runs.items():
    c = {s: sum(1 for v in o.values() if v == s) for s in ("pass", "fail", "skip")}
    print(f"  {n:7} passed {c['pass']:5}  failed {c['fail']:4}  skipped {c['skip']:4}")
for n in ("exempt", "masked"):
    diff = sorted(k for k, v in runs["direct"].items() if v == "pass" and runs[n].get(k) != "pass")
    print(f"  passing direct, not through pgveil as {n}: {len(diff)}")
    for k in diff[:60]: print(f"    {k}")
PY
