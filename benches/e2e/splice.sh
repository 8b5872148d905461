#!/usr/bin/env bash
# The pump copying through user space against the pump splicing (`limits.splice: true`), one
# interleaved run (even rounds reversed): two pgveil instances in front of one cluster, an
# exempt role through each. pgbench -S (TPS, proxy CPU per transaction) and the 200,000-row x
# 8-column table fetched whole (`COPY big TO STDOUT` and `SELECT * FROM big` with psql; seconds
# and proxy CPU for FETCHES of them in a row), PostgreSQL direct beside them for the fetches.
#
#   benches/e2e/splice.sh              # ROUNDS=4 SECONDS_PER_RUN=5 CLIENTS="1 8" MODES="simple prepared"
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-4}
SECS=${SECONDS_PER_RUN:-5}
CLIENTS=${CLIENTS:-"1 8"}
MODES=${MODES:-"simple prepared"}
FETCHES=${FETCHES:-5} # each fetch is timed over this many in a row
source benches/lib.sh
setup_cluster 300 >/dev/null
start_pgveil "limits: { max_connections: 500 }"
COPY_PORT=$VEIL_PORT; COPY_PID=$VEIL_PID
VEIL_PORT=$(free_port); ADMIN_PORT=$(free_port)
start_pgveil "limits: { max_connections: 500, splice: true }"
SPLICE_PORT=$VEIL_PORT; SPLICE_PID=$VEIL_PID
RAW="$WORK/raw.tsv"; : > "$RAW"
for round in $(seq "$ROUNDS"); do
  order=("copy|$COPY_PORT|$COPY_PID" "splice|$SPLICE_PORT|$SPLICE_PID")
  (( round % 2 == 0 )) && order=("${order[1]}" "${order[0]}")
  for mode in $MODES; do
    for c in $CLIENTS; do
      for t in "${order[@]}"; do
        IFS='|' read -r name port pid <<<"$t"
        before=$(cpu_ticks "$pid")
        out=$(PGSSLMODE=disable "$BIN/pgbench" -n -S -M "$mode" -c "$c" -j "$(( c < 2 ? 1 : 2 ))" -T "$SECS" -h 127.0.0.1 -p "$port" -U bench_exempt bench 2>&1) || { echo "$name failed: $out" >&2; exit 1; }
        after=$(cpu_ticks "$pid")
        tps=$(tps_of "$out")
        tx=$(tx_of "$out")
        us=$(per_tx_us $((after - before)) "$tx")
        printf 'pgbench %s c=%s\t%s\t%s\t%s\t%s\n' "$mode" "$c" "$name" "$round" "$tps" "$us" >> "$RAW"
      done
    done
  done
  for sql in "COPY big TO STDOUT" "SELECT * FROM big"; do
    for t in "direct|$PG_PORT|" "${order[@]}"; do
      IFS='|' read -r name port pid <<<"$t"
      user=bench_exempt; [ "$name" = direct ] && user=postgres
      before=$(cpu_ticks "$pid")
      start=$(date +%s.%N)
      for _ in $(seq "$FETCHES"); do
        PGSSLMODE=disable "$BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U "$user" -d bench -c "$sql" > /dev/null
      done
      end=$(date +%s.%N)
      after=$(cpu_ticks "$pid")
      ms=$(awk -v d=$((after - before)) -v tick="$TICK" 'BEGIN { printf "%.0f", d / tick * 1e3 }')
      printf '%s\t%s\t%s\t%s\t%s\n' "$sql" "$name" "$round" "$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }')" "$ms" >> "$RAW"
    done
  done
done

python3 - "$RAW" "$ROUNDS" "$SECS" <<'PY'
import sys, statistics as st
raw, rounds, secs = sys.argv[1], sys.argv[2], sys.argv[3]
by = {}
for line in open(raw):
    what, name, r, a, b = line.rstrip("\n").split("\t")
    by.setdefault(what, {}).setdefault(name, {})[r] = (float(a), float(b))
print(f"{rounds} interleaved rounds ({secs} s per pgbench run), exempt role (the pump).\n")
print("| workload | copy | splice | splice / copy, paired median (range) |")
print("|---|---|---|---|")
for what, names in by.items():
    fetch = not what.startswith("pgbench")
    unit = ("s", "ms proxy CPU") if fetch else ("TPS", "µs proxy CPU/tx")
    for i, label in enumerate(unit):
        cell = lambda n: f"{st.median(v[i] for v in names[n].values()):,.3f}" if fetch and i == 0 else f"{st.median(v[i] for v in names[n].values()):,.1f}"
        ratios = [names["splice"][r][i] / names["copy"][r][i] for r in names["splice"] if names["copy"][r][i] > 0]
        ratio = f"{st.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})" if ratios else "-"
        direct = f" (direct {cell('direct')} s)" if fetch and i == 0 and "direct" in names else ""
        print(f"| {what}, {label}{direct} | {cell('copy')} | {cell('splice')} | {ratio} |")
PY
