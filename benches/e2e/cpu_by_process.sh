#!/usr/bin/env bash
# Where a transaction's CPU goes on this machine, by process: pgbench -S at 8 clients through
# pgveil as an exempt role (the pump) and as bench_nomask (inspected, pgbench_accounts
# substituted, nothing masked in the result), interleaved, each run sampled system-wide with
# `perf record -a` and split by command name. Shows how PostgreSQL's own CPU per transaction
# moves with the path in front of it ("swapper" is idle time). Needs perf.
#
#   benches/e2e/cpu_by_process.sh      # ROUNDS=3 SECONDS_PER_RUN=4 MODE=simple
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-4}
MODE=${MODE:-simple}
command -v perf >/dev/null || { echo "perf is needed (apt-get install linux-perf)" >&2; exit 1; }
source benches/lib.sh
setup_cluster 100 >/dev/null
start_pgveil "limits: { max_connections: 500 }"
PGSSLMODE=disable "$BIN/pgbench" -n -S -M "$MODE" -c 8 -j 2 -T 2 -h 127.0.0.1 -p "$VEIL_PORT" -U bench_nomask bench >/dev/null 2>&1
echo "| round | role | transactions | µs of CPU per transaction, by process |"
echo "|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for user in bench_exempt bench_nomask; do
    perf record -a -e cpu-clock -F 999 -o "$WORK/perf.data" -- sleep "$SECS" >/dev/null 2>&1 &
    P=$!
    out=$(PGSSLMODE=disable "$BIN/pgbench" -n -S -M "$MODE" -c 8 -j 2 -T "$SECS" -h 127.0.0.1 -p "$VEIL_PORT" -U "$user" bench 2>&1)
    wait "$P" || true
    tx=$(tx_of "$out")
    by=$(perf report -i "$WORK/perf.data" --stdio --sort comm -F sample,comm 2>/dev/null | grep -v '^#' \
      | awk -v tx="$tx" 'NF >= 2 && ($2 ~ /postgres|pgbench|pgveil|swapper/) { printf "%s %.1f, ", $2, $1 / 999 * 1e6 / tx }')
    echo "| $round | $user | $tx | ${by%, } |"
  done
done
