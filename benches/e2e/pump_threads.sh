#!/usr/bin/env bash
# The pump's thread count against PgBouncer, one interleaved run: PgBouncer (session mode),
# pgveil with its defaults and pgveil with B_LIMITS (default `pump_threads: 2`), all exempt
# (the pump), pgbench -S at 8 clients, simple and prepared, ROUNDS rounds of 5 s (even rounds
# reversed). Prints paired medians (min-max) of TPS and proxy CPU per transaction against
# PgBouncer's (issue 18).
#
#   ROUNDS=6 B_LIMITS="pump_threads: 2" benches/e2e/pump_threads.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-6}
source benches/lib.sh
setup_cluster 300 >/dev/null
start_pgveil "limits: { max_connections: 500 }"; A_PORT=$VEIL_PORT; A_PID=$VEIL_PID
VEIL_PORT=$(free_port); ADMIN_PORT=$(free_port)
start_pgveil "limits: { max_connections: 500, ${B_LIMITS:-pump_threads: 2} }"; B_PORT=$VEIL_PORT; B_PID=$VEIL_PID
start_pgbouncer
RAW="$WORK/raw.tsv"; : > "$RAW"
for round in $(seq "$ROUNDS"); do
  order=("bouncer|$BOUNCER_PORT|$BOUNCER_PID|postgres" "default|$A_PORT|$A_PID|bench_exempt" "variant|$B_PORT|$B_PID|bench_exempt")
  (( round % 2 == 0 )) && order=("${order[2]}" "${order[1]}" "${order[0]}")
  for mode in simple prepared; do
    for t in "${order[@]}"; do
      IFS='|' read -r name port pid user <<<"$t"
      b=$(cpu_ticks "$pid")
      out=$(PGSSLMODE=disable "$BIN/pgbench" -n -S -M "$mode" -c 8 -j 2 -T 5 -h 127.0.0.1 -p "$port" -U "$user" bench 2>&1)
      a=$(cpu_ticks "$pid"); tx=$(tx_of "$out")
      printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$name" "$(tps_of "$out")" "$(per_tx_us $((a - b)) "$tx")" >> "$RAW"
    done
  done
done
python3 - "$RAW" <<'PY'
import sys, statistics as st
d={}
for l in open(sys.argv[1]):
    r,m,n,tps,cpu=l.split('\t'); d[(int(r),m,n)]=(float(tps),float(cpu))
rounds=sorted({k[0] for k in d})
for m in ("simple","prepared"):
    for n in ("default","variant"):
        tr=[d[(r,m,n)][0]/d[(r,m,"bouncer")][0] for r in rounds]
        cr=[d[(r,m,n)][1]/d[(r,m,"bouncer")][1] for r in rounds]
        print(f"{m:8} {n}: TPS/bouncer {st.median(tr):.2f} ({min(tr):.2f}-{max(tr):.2f})  CPU/bouncer {st.median(cr):.2f} ({min(cr):.2f}-{max(cr):.2f})  tps {st.median([d[(r,m,n)][0] for r in rounds]):.0f} bouncer {st.median([d[(r,m,'bouncer')][0] for r in rounds]):.0f} cpu {st.median([d[(r,m,n)][1] for r in rounds]):.1f} vs {st.median([d[(r,m,'bouncer')][1] for r in rounds]):.1f}")
PY
