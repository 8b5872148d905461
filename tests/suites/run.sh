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
python3 -m pip install -q pytest 'psycopg[binary]' asyncpg greenlet sqlalchemy >/dev/null 2>&1 || true
VER=$(python3 -c 'import sqlalchemy; print(sqlalchemy.__version__)')
KEEP_LOGS_IN=/tmp/pgveil-suites-last
source tests/suites/lib.sh
suite_work pgveil-suites
suite_sdist sqlalchemy "$VER"
suite_cluster "max_prepared_transactions = 10"
"${PSQL[@]}" -c "CREATE ROLE sqla LOGIN PASSWORD 'sqla' CREATEDB; CREATE ROLE sqla_masked LOGIN PASSWORD 'sqla' CREATEDB"
for db in direct exempt masked; do
  owner=sqla; [ "$db" = masked ] && owner=sqla_masked
  "${PSQL[@]}" -c "CREATE DATABASE sqla_$db OWNER $owner"
  "${PSQL[@]}" -d "sqla_$db" -c "CREATE EXTENSION hstore; CREATE EXTENSION citext;
    CREATE SCHEMA test_schema AUTHORIZATION $owner; CREATE SCHEMA test_schema_2 AUTHORIZATION $owner;
    CREATE SCHEMA pgveil_canary; CREATE TABLE pgveil_canary.secret (id int, ssn text);
    INSERT INTO pgveil_canary.secret VALUES (1, '900-00-0001')"
done
suite_pgveil sqla

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
