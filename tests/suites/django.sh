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
python3 -m pip install -q asgiref sqlparse 'psycopg[binary,pool]' >/dev/null 2>&1 || true
KEEP_LOGS_IN=""
source tests/suites/lib.sh
suite_work pgveil-django
suite_sdist django "$DJANGO_VERSION"
suite_cluster "synchronous_commit = off"
# Django's runner creates and drops its test databases and the postgres_tests extensions.
"${PSQL[@]}" -c "CREATE ROLE django LOGIN PASSWORD 'django' SUPERUSER; CREATE ROLE django_masked LOGIN PASSWORD 'django' SUPERUSER"
"${PSQL[@]}" -c "CREATE SCHEMA pgveil_canary; CREATE TABLE pgveil_canary.secret (id int, ssn text); INSERT INTO pgveil_canary.secret VALUES (1, '900-00-0001')"
suite_pgveil django

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
