#!/usr/bin/env bash
# The cost of audit.raw_access (issue 16), one interleaved run: two pgveil instances in front
# of one cluster, one with raw_access off, one with it on (audit log on local disk). pgbench -S
# reads pgbench_accounts.abalance, a ruled column, so with raw_access on every transaction of
# an exempt role (inspected parse-only instead of pumped) or of an unmasked_for role writes a
# raw_access event. Prints median TPS and proxy CPU per transaction.
#
#   benches/e2e/raw_access.sh          # ROUNDS=3 SECONDS_PER_RUN=5 CLIENTS=8 MODES="simple prepared"
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-5}
CLIENTS=${CLIENTS:-8}
MODES=${MODES:-"simple prepared"}
source benches/lib.sh
setup_cluster 300
start_pgveil "limits: { max_connections: 500 }"
OFF_PORT=$VEIL_PORT; OFF_PID=$VEIL_PID
VEIL_PORT=$(free_port); ADMIN_PORT=$(free_port)
start_pgveil "limits: { max_connections: 500 }
audit: { path: $WORK/audit.jsonl, raw_access: true }"
ON_PORT=$VEIL_PORT; ON_PID=$VEIL_PID
TARGETS=(
  "exempt-pump|$OFF_PORT|bench_exempt|$OFF_PID"
  "exempt-raw_access|$ON_PORT|bench_exempt|$ON_PID"
  "unmasked-inspected|$OFF_PORT|bench_nomask|$OFF_PID"
  "unmasked-raw_access|$ON_PORT|bench_nomask|$ON_PID"
)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
RAW="$WORK/raw.tsv"; : > "$RAW"
for round in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    for c in $CLIENTS; do
      for t in "${TARGETS[@]}"; do
        IFS='|' read -r name port user pid <<<"$t"
        before=$(cpu_ticks "$pid")
        out=$(PGSSLMODE=disable "$BIN/pgbench" -n -S -M "$mode" -c "$c" -j 2 -T "$SECS" -h 127.0.0.1 -p "$port" -U "$user" bench 2>&1) || { echo "$name failed: $out" >&2; exit 1; }
        after=$(cpu_ticks "$pid")
        tps=$(tps_of "$out")
        tx=$(tx_of "$out")
        cpu=$(per_tx_us $((after - before)) "$tx")
        printf '%s\t%s\t%s\t%s\t%s\n' "$mode" "$c" "$name" "$tps" "$cpu" >> "$RAW"
      done
    done
  done
done
events=$(grep -c '"event":"raw_access"' "$WORK/audit.jsonl" || true)
python3 - "$RAW" "$ROUNDS" "$SECS" "$events" <<'PY'
import sys, statistics
raw, rounds, secs, events = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [l.split("\t") for l in open(raw).read().splitlines()]
g = {}
for mode, c, name, tps, cpu in rows:
    g.setdefault((mode, c, name), []).append((float(tps), float(cpu)))
print(f"ROUNDS={rounds} SECONDS_PER_RUN={secs} benches/e2e/raw_access.sh ({events} raw_access events written)\n")
print("| mode | clients | target | TPS (median) | vs raw_access off | proxy CPU µs/tx |")
print("|---|---|---|---|---|---|")
for (mode, c, name), xs in sorted(g.items()):
    tps = statistics.median(x[0] for x in xs); cpu = statistics.median(x[1] for x in xs)
    base = name.split("-")[0] + ("-pump" if name.startswith("exempt") else "-inspected")
    b = statistics.median(x[0] for x in g[(mode, c, base)])
    print(f"| {mode} | {c} | {name} | {tps:.0f} | {tps/b:.2f} | {cpu:.1f} |")
PY
