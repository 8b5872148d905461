#!/usr/bin/env bash
# CPU profile of pgveil's hot paths with perf (sampling on cpu-clock, which works where
# hardware counters are not exposed, as on most VMs): pgbench -S through pgveil as an exempt
# role (byte pump) and as an inspected role with no masked column (every message framed,
# every statement looked up in the analysis cache), SECS seconds each, 8 clients.
# Prints the top functions by self time for each and writes benches/results/profile-<date>.md.
#
#   benches/profile.sh                 # SECS=15 MODE=simple
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-15}
MODE=${MODE:-simple}
command -v perf >/dev/null || { echo "perf missing: apt-get install -y linux-perf" >&2; exit 1; }
source benches/lib.sh
setup_cluster 100
start_pgveil
OUT="benches/results/profile-$(date +%F)-$(hostname).md"
{
  echo "# pgveil CPU profile, $(date +%F)"
  echo
  echo "Command: \`SECS=$SECS MODE=$MODE benches/profile.sh\` — perf record -e cpu-clock -F 2000 on the pgveil process"
  echo "while \`PGSSLMODE=disable pgbench -S -M $MODE -c 8 -j 2 -T $SECS\` runs through it. Self time, top 25 symbols."
} > "$OUT"
for role in bench_exempt bench_nomask; do
  perf record -e cpu-clock -F 2000 -g -o "$WORK/perf.data" -p "$VEIL_PID" -- sleep "$SECS" >"$WORK/perf.log" 2>&1 &
  PERF=$!
  PGSSLMODE=disable "$BIN/pgbench" -n -S -M "$MODE" -c 8 -j 2 -T "$SECS" -h 127.0.0.1 -p "$VEIL_PORT" -U "$role" bench > "$WORK/bench.out" 2>&1
  wait "$PERF" || true
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/bench.out")
  {
    echo
    echo "## $role ($([ $role = bench_exempt ] && echo 'byte pump' || echo 'inspected, no masked column')), $tps TPS"
    echo
    echo '```'
    perf report -i "$WORK/perf.data" --no-children --sort symbol -g none --percent-limit 0.7 --stdio 2>"$WORK/report.err" | grep -E "%" | grep -v "^#" | head -25 || cat "$WORK/perf.log" "$WORK/report.err"
    echo '```'
    echo
    echo "By component (self time):"
    echo
    echo '```'
    perf report -i "$WORK/perf.data" --no-children --sort dso -g none --stdio 2>/dev/null | grep -E "%" | grep -v "^#" | head -8 || true
    echo '```'
  } >> "$OUT"
done
cat "$OUT"
echo "written to $OUT"
