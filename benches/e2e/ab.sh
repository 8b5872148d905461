#!/usr/bin/env bash
# Two pgveil binaries side by side, one interleaved run (even rounds reversed): both in front of
# one cluster, pgbench -S as bench_nomask (inspected, pgbench_accounts substituted), TPS, user CPU and
# proxy CPU per transaction with the paired new/old ratio. For a change on the hot path:
#
#   cp target/release/pgveil /tmp/pgveil-old   # before the change (a release build)
#   benches/e2e/ab.sh /tmp/pgveil-old target/release/pgveil   # ROUNDS=6 MODES="prepared extended" USER_ROLE=bench_nomask
set -euo pipefail
OLD=$(realpath "${1:?old binary}"); NEW=$(realpath "${2:?new binary}")
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-6}
MODES=${MODES:-"prepared extended"}
ROLE=${USER_ROLE:-bench_nomask}
source benches/lib.sh
setup_cluster 300 >/dev/null
PGVEIL=$OLD start_pgveil "limits: { max_connections: 500 }"
OLD_PORT=$VEIL_PORT; OLD_PID=$VEIL_PID
VEIL_PORT=$(free_port); ADMIN_PORT=$(free_port)
PGVEIL=$NEW start_pgveil "limits: { max_connections: 500 }"
NEW_PORT=$VEIL_PORT; NEW_PID=$VEIL_PID
RAW="$WORK/raw.tsv"; : > "$RAW"
for round in $(seq "$ROUNDS"); do
  order=("old|$OLD_PORT|$OLD_PID" "new|$NEW_PORT|$NEW_PID")
  (( round % 2 == 0 )) && order=("${order[1]}" "${order[0]}")
  for mode in $MODES; do
    for t in "${order[@]}"; do
      IFS='|' read -r name port pid <<<"$t"
      before=$(cpu_ticks "$pid"); ubefore=$(user_ticks "$pid")
      out=$(PGSSLMODE=disable "$BIN/pgbench" -n -S -M "$mode" -c 8 -j 2 -T 4 -h 127.0.0.1 -p "$port" -U "$ROLE" bench 2>&1)
      after=$(cpu_ticks "$pid"); uafter=$(user_ticks "$pid")
      tx=$(tx_of "$out")
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$name" "$(tps_of "$out")" "$(per_tx_us $((after - before)) "$tx")" \
        "$(per_tx_us $((uafter - ubefore)) "$tx")" >> "$RAW"
    done
  done
done
python3 - "$RAW" "$ROUNDS" <<'PY'
import sys, statistics as st
d = {}
for line in open(sys.argv[1]):
    r, mode, name, tps, cpu, user = line.split("\t")
    d.setdefault((mode, name), {})[r] = (float(tps), float(cpu), float(user))
print(f"{sys.argv[2]} interleaved rounds of 4 s, pgbench -S, 8 clients\n")
print("| mode | old TPS | new TPS | old µs CPU/tx | new µs CPU/tx | new / old TPS, paired (range) | new / old CPU, paired (range) | old / new µs user CPU/tx | new / old user CPU, paired (range) |")
print("|---|---|---|---|---|---|---|---|---|")
for mode in dict.fromkeys(m for m, _ in d):
    o, n = d[(mode, "old")], d[(mode, "new")]
    med = lambda x, i: st.median(v[i] for v in x.values())
    rt = [n[r][0] / o[r][0] for r in o]; rc = [n[r][1] / o[r][1] for r in o if o[r][1] > 0]
    ru = [n[r][2] / o[r][2] for r in o if o[r][2] > 0]
    print(f"| {mode} | {med(o,0):,.0f} | {med(n,0):,.0f} | {med(o,1):.1f} | {med(n,1):.1f} "
          f"| {st.median(rt):.3f} ({min(rt):.3f}–{max(rt):.3f}) | {st.median(rc):.3f} ({min(rc):.3f}–{max(rc):.3f}) "
          f"| {med(o,2):.2f} / {med(n,2):.2f} | {st.median(ru):.3f} ({min(ru):.3f}–{max(ru):.3f}) |")
PY
