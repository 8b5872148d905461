#!/usr/bin/env bash
# What each mask costs PostgreSQL on a scan, without pgveil in the path: the 200,000-row x
# 8-column fetch (`SELECT * FROM big`, md5 text columns) as pgveil substitutes it for a role
# under several rule sets (the texts come from `pgveil explain --against`, so they follow the
# rewriter), each sent DIRECT to PostgreSQL with pgbench (-t 3, 1 client), interleaved (even
# rounds reversed). Reports the median seconds per fetch and the paired ratio to the plain
# fetch. The headline scan of `benches/e2e/run.sh` is "c1 partial, c2 redact".
#
#   benches/e2e/mask_cost.sh           # ROUNDS=6
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-6}
source benches/lib.sh
setup_cluster 100 >/dev/null

# name|columns of the rules file (one YAML flow mapping per column, ';' between columns)
VARIANTS=(
  "c2 redact|public.big.c2: { mask: redact }"
  "c1 redact, c2 redact|public.big.c1: { mask: redact };public.big.c2: { mask: redact }"
  "c1 email, c2 redact|public.big.c1: { mask: email };public.big.c2: { mask: redact }"
  "c1 partial|public.big.c1: { mask: { partial: { keep_last: 4 } } }"
  "c1 partial, c2 redact|public.big.c1: { mask: { partial: { keep_last: 4 } } };public.big.c2: { mask: redact }"
)
echo "SELECT * FROM big;" > "$WORK/v0.sql"
NAMES=("plain")
i=0
for v in "${VARIANTS[@]}"; do
  i=$((i + 1))
  name=${v%%|*}; cols=${v#*|}
  { echo "version: 1"; echo "columns:"; tr ';' '\n' <<<"$cols" | sed 's/^/  /'; } > "$WORK/rules-$i.yaml"
  "$PGVEIL" explain --rules "$WORK/rules-$i.yaml" --role bench_masked \
    --against "postgresql://postgres@127.0.0.1:$PG_PORT/bench?sslmode=disable" "SELECT * FROM big;" \
    | sed -n '/^PostgreSQL runs:/{n;s/^ *//;p}' > "$WORK/v$i.sql"
  [ -s "$WORK/v$i.sql" ] || { echo "pgveil explain printed no rewritten text for $name" >&2; exit 1; }
  NAMES+=("$name")
done

RAW="$WORK/raw.tsv"
: > "$RAW"
for round in $(seq "$ROUNDS"); do
  order=$(seq 0 $i)
  (( round % 2 == 0 )) && order=$(seq $i -1 0)
  for k in $order; do
    out=$("$BIN/pgbench" -n -f "$WORK/v$k.sql" -t 3 -c 1 -h 127.0.0.1 -p "$PG_PORT" -U postgres bench 2>&1) \
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
print(f"`SELECT * FROM big` (200,000 rows x 8 columns) as pgveil substitutes it, sent directly to PostgreSQL "
      f"with pgbench -t 3 -c 1, {rounds} interleaved rounds.\n")
print("| masked columns | median seconds per fetch | / plain, paired median (range) |")
print("|---|---|---|")
base = by[0]
for k, name in enumerate(names):
    d = by[k]
    ratios = [d[r] / base[r] for r in d if r in base]
    print(f"| {name} | {st.median(d.values()):.3f} | {st.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |")
PY
