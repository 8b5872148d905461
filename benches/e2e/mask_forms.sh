#!/usr/bin/env bash
# What SQL forms of one mask cost PostgreSQL over realistic values, without pgveil in the
# path: each FORM file holds one SQL expression over `customers.$COLUMN` (as `pgveil explain`
# prints a substitution's mask, e.g. two pgveil versions' texts for the same rule); each is
# run as `SELECT <form> FROM people AS customers` over 200,000 rows: `ssn` shaped
# `9NN-NN-NNNN` (the default COLUMN), `email` shaped `user123@example4.com`,
# sent DIRECT to PostgreSQL with pgbench (-t 3, 1 client), interleaved (even rounds reversed),
# next to the plain fetch. Reports the median seconds per fetch and the paired ratio.
#
#   benches/e2e/mask_forms.sh old.sql new.sql     # ROUNDS=6 COLUMN=ssn
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-6}
COLUMN=${COLUMN:-ssn}
[ $# -ge 1 ] || { echo "usage: $0 FORM.sql..." >&2; exit 2; }
FORMS=("$@")
source benches/lib.sh
setup_cluster 100 >/dev/null
"${PSQL[@]}" -d bench >/dev/null <<'SQL'
CREATE TABLE people AS SELECT g AS id,
  (900 + g % 99)::text || '-' || lpad((g % 97)::text, 2, '0') || '-' || lpad((g % 9973)::text, 4, '0') AS ssn,
  'user' || g || '@example' || (g % 10) || '.com' AS email
  FROM generate_series(1, 200000) g;
SQL
echo "SELECT $COLUMN FROM people AS customers;" > "$WORK/f0.sql"
NAMES=("plain")
i=0
for f in "${FORMS[@]}"; do
  i=$((i + 1))
  echo "SELECT $(cat "$f") AS $COLUMN FROM people AS customers;" > "$WORK/f$i.sql"
  NAMES+=("$(basename "$f" .sql)")
done
RAW="$WORK/raw.tsv"
: > "$RAW"
for round in $(seq "$ROUNDS"); do
  order=$(seq 0 $i)
  (( round % 2 == 0 )) && order=$(seq $i -1 0)
  for k in $order; do
    out=$("$BIN/pgbench" -n -f "$WORK/f$k.sql" -t 3 -c 1 -h 127.0.0.1 -p "$PG_PORT" -U postgres bench 2>&1) \
      || { echo "${NAMES[$k]} failed: $out" >&2; exit 1; }
    printf '%s\t%s\t%s\n' "$round" "$k" "$(latency_of "$out")" >> "$RAW"
  done
done
printf '%s\n' "${NAMES[@]}" > "$WORK/names"
python3 - "$RAW" "$WORK/names" "$ROUNDS" <<'PY'
import sys, statistics as st
raw, names, rounds = sys.argv[1], [l.rstrip("\n") for l in open(sys.argv[2])], sys.argv[3]
by = {}
for line in open(raw):
    r, k, ms = line.split("\t")
    by.setdefault(int(k), {})[r] = float(ms) / 1000
print(f"200,000 rows, each form sent directly with pgbench -t 3 -c 1, {rounds} interleaved rounds.\n")
print("| form | median seconds per fetch | / plain, paired median (range) |")
print("|---|---|---|")
for k, name in enumerate(names):
    secs = list(by[k].values())
    ratios = [by[k][r] / by[0][r] for r in by[k]]
    print(f"| {name} | {st.median(secs):.3f} | {st.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |")
PY
