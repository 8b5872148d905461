#!/usr/bin/env bash
# Django's own test suite with the postgresql backend, three ways (issue 15): PostgreSQL
# directly, through pgveil as an exempt role, and through pgveil as a masked role whose rules
# mask a column of a table the suite never reads. Prints the three counts and the tests that
# pass directly but not through pgveil.
#
#   tests/suites/django.sh                       # the default subset (under 20 minutes here)
#   tests/suites/django.sh basic queries         # any of Django's test labels
#
# Installs what it needs (the Django sdist matching DJANGO_VERSION, which carries the tests;
# asgiref, sqlparse, psycopg); starts its own throwaway cluster and a release pgveil; removes
# everything on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
DJANGO_VERSION=${DJANGO_VERSION:-5.1.15}
LABELS=${*:-"basic queries expressions aggregation lookup model_fields transactions update delete raw_query select_for_update backends.postgresql postgres_tests"}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
[ -x "$BIN/initdb" ] || { echo "PostgreSQL server binaries missing: apt-get install -y postgresql" >&2; exit 1; }
python3 -m pip install -q asgiref sqlparse 'psycopg[binary,pool]' >/dev/null 2>&1 || true
WORK=$(mktemp -d /tmp/pgveil-django-XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  [ -n "${VEIL_PID:-}" ] && kill "$VEIL_PID" 2>/dev/null || true
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
python3 -m pip download -q --no-deps --no-binary :all: -d "$WORK" "django==$DJANGO_VERSION" >/dev/null
tar xzf "$WORK"/django-*.tar.gz -C "$WORK"
SRC=$(ls -d "$WORK"/django-*/)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port); VEIL_PORT=$(free_port)
echo postgres > "$WORK/pw"; [ "$(id -u)" = 0 ] && chown postgres "$WORK/pw"
as_pg "$BIN/initdb" -D "$WORK/data" -U postgres --pwfile="$WORK/pw" -A scram-sha-256 -E UTF8 >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
fsync = off
synchronous_commit = off
CONF
as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
export PGPASSWORD=postgres
PSQL=("$BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres)
# Django's runner creates and drops its test databases and the postgres_tests extensions.
"${PSQL[@]}" -c "CREATE ROLE django LOGIN PASSWORD 'django' SUPERUSER; CREATE ROLE django_masked LOGIN PASSWORD 'django' SUPERUSER; CREATE ROLE pgveil LOGIN PASSWORD 'pgveil'"
"${PSQL[@]}" -c "CREATE SCHEMA pgveil_canary; CREATE TABLE pgveil_canary.secret (id int, ssn text); INSERT INTO pgveil_canary.secret VALUES (1, '900-00-0001')"
cat > "$WORK/rules.yaml" <<YAML
version: 1
exempt: [django]
columns:
  pgveil_canary.secret.ssn: { mask: redact }
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

settings() { # run port user
  cat > "$WORK/settings_$1.py" <<PY
def db(name):
    return {"ENGINE": "django.db.backends.postgresql", "NAME": "postgres", "USER": "$3", "PASSWORD": "django",
            "HOST": "127.0.0.1", "PORT": "$2", "TEST": {"NAME": f"test_$1_{name}"}}
DATABASES = {"default": db("default"), "other": db("other")}
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
PY
}
run() { # run port user
  settings "$1" "$2" "$3"
  local started=$SECONDS
  # shellcheck disable=SC2086
  (cd "$SRC/tests" && PYTHONPATH="$SRC:$WORK" timeout 1800 python3 runtests.py --settings="settings_$1" \
     --parallel=1 --noinput -v 2 $LABELS >"$WORK/$1.log" 2>&1) || true
  echo "$1: $((SECONDS - started)) s" >> "$WORK/times"
}
run direct "$PG_PORT" django
run exempt "$VEIL_PORT" django
run masked "$VEIL_PORT" django_masked
python3 - "$WORK" "$DJANGO_VERSION" "$LABELS" <<'PY'
import re, sys
work, ver, labels = sys.argv[1:]
line = re.compile(r"^(test\w*) \(([\w.]+)\)(?:\n.*?)? \.\.\. (ok|FAIL|ERROR|skipped.*|expected failure|unexpected success)$", re.M)
def outcomes(name):
    text = open(f"{work}/{name}.log", errors="replace").read()
    out = {}
    for m in line.finditer(text):
        s = m.group(3)
        out[f"{m.group(2)}.{m.group(1)}"] = "pass" if s in ("ok", "expected failure") else "skip" if s.startswith("skipped") else "fail"
    ran = re.search(r"^Ran (\d+) tests? in ([\d.]+)s", text, re.M)
    return out, (ran.group(0) if ran else "no 'Ran' line: see the log"), text
runs = {n: outcomes(n) for n in ("direct", "exempt", "masked")}
print(f"Django {ver} (postgresql backend, psycopg), labels: {labels}")
print(open(f"{work}/times").read().strip())
for n, (o, ran, _) in runs.items():
    c = {s: sum(1 for v in o.values() if v == s) for s in ("pass", "fail", "skip")}
    print(f"  {n:7} passed {c['pass']:5}  failed {c['fail']:4}  skipped {c['skip']:4}   ({ran})")
for n in ("exempt", "masked"):
    diff = sorted(k for k, v in runs["direct"][0].items() if v == "pass" and runs[n][0].get(k) != "pass")
    print(f"  passing direct, not through pgveil as {n}: {len(diff)}")
    for k in diff[:60]: print(f"    {k}")
if not runs["masked"][0]:
    print(runs["masked"][2][-3000:])
PY
