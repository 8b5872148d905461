#!/usr/bin/env bash
# Where the pass-through's CPU goes, beside PgBouncer and HAProxy in the same run (issue 18):
# pgbench -S, 8 clients, through PgBouncer (session mode), HAProxy (mode tcp) and pgveil as an
# exempt role (byte pump) under each `limits.workers` setting in VARIANTS (default: `auto`,
# one session thread per core, and `shared`, tokio's work-stealing runtime). Per target and round: TPS, proxy CPU µs and
# context switches (voluntary + involuntary, all threads) per transaction; then one run under
# `strace -c -f` for syscalls per transaction and one under perf for the split between kernel
# and user space. Writes benches/results/pump-profile-<date>-<host>.md.
#
#   benches/e2e/pump_profile.sh        # ROUNDS=3 SECONDS_PER_RUN=5 MODES="simple prepared" VARIANTS="auto shared" INSPECTED=0
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-5}
MODES=${MODES:-"simple prepared"}
CLIENTS=${CLIENTS:-8}
for tool in strace perf; do command -v $tool >/dev/null || { echo "$tool missing: apt-get install -y $tool" >&2; exit 1; }; done
source benches/lib.sh
setup_cluster 300
# One pgveil per `limits.workers` setting compared (VARIANTS).
VARIANTS=${VARIANTS:-"auto shared"}
VEILS=()
for v in $VARIANTS; do
  VEIL_PORT=$(free_port); ADMIN_PORT=$(free_port)
  start_pgveil "limits: { max_connections: 500, workers: $v }"
  VEILS+=("pgveil-pump-$v|$VEIL_PORT|bench_exempt|$VEIL_PID")
  # INSPECTED=1: also the inspecting relay (a role with a masked column -S does not read).
  [ "${INSPECTED:-0}" = 1 ] && VEILS+=("pgveil-inspected-$v|$VEIL_PORT|bench_nomask|$VEIL_PID")
done
start_pgbouncer
TARGETS=("pgbouncer|$BOUNCER_PORT|postgres|$BOUNCER_PID")
start_haproxy && TARGETS+=("haproxy|$HAPROXY_PORT|postgres|$HAPROXY_PID")
TARGETS+=("${VEILS[@]}")

bench() { # mode port user -> pgbench output
  PGSSLMODE=disable "$BIN/pgbench" -n -S -M "$1" -c "$CLIENTS" -j 2 -T "$SECS" -h 127.0.0.1 -p "$2" -U "$3" bench 2>&1
}
RAW="$WORK/raw.tsv"; : > "$RAW"
for round in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    for t in "${TARGETS[@]}"; do
      IFS='|' read -r name port user pid <<<"$t"
      c0=$(cpu_ticks "$pid"); s0=$(ctx_switches "$pid")
      out=$(bench "$mode" "$port" "$user")
      c1=$(cpu_ticks "$pid"); s1=$(ctx_switches "$pid")
      tx=$(tx_of "$out"); tps=$(tps_of "$out")
      printf 'run\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$name" "$tps" \
        "$(awk -v d=$((c1 - c0)) -v t="$TICK" -v x="$tx" 'BEGIN { printf "%.2f", d / t * 1e6 / x }')" \
        "$(awk -v d=$((s1 - s0)) -v x="$tx" 'BEGIN { printf "%.3f", d / x }')" >> "$RAW"
    done
  done
done
# Syscalls per transaction (strace slows everything; only the counts are used).
for mode in $MODES; do
  for t in "${TARGETS[@]}"; do
    IFS='|' read -r name port user pid <<<"$t"
    strace -c -f -q -o "$WORK/strace.txt" -p "$pid" & ST=$!
    sleep 0.5
    tx=$(tx_of "$(bench "$mode" "$port" "$user")")
    kill -INT $ST; wait $ST 2>/dev/null || true
    awk -v x="$tx" -v m="$mode" -v n="$name" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" { printf "sys\t%s\t%s\t%s\t%.3f\n", m, n, $NF, $4 / x }' "$WORK/strace.txt" >> "$RAW"
  done
done
# Kernel / user split (perf sampling on cpu-clock; works without hardware counters).
for t in "${TARGETS[@]}"; do
  IFS='|' read -r name port user pid <<<"$t"
  perf record -e cpu-clock -F 2000 -o "$WORK/perf.data" -p "$pid" -- sleep "$SECS" >/dev/null 2>&1 & PERF=$!
  bench simple "$port" "$user" >/dev/null
  wait $PERF || true
  perf report -i "$WORK/perf.data" --no-children --sort dso --stdio > "$WORK/dso.txt" 2>/dev/null || true
  perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio > "$WORK/sym.txt" 2>/dev/null || true
  awk -v n="$name" '/%/ && !/^#/ && k++ < 4 { gsub("%", "", $1); printf "dso\t%s\t%s\t%s\n", n, $2, $1 }' "$WORK/dso.txt" >> "$RAW"
  awk -v n="$name" '/%/ && !/^#/ && k++ < 12 { p = $1; $1 = ""; printf "sym\t%s\t%s\t%s\n", n, substr($0, 2), p }' "$WORK/sym.txt" >> "$RAW"
done

OUT="benches/results/pump-profile-$(date +%F)-$(hostname).md"
python3 - "$RAW" "$OUT" "$ROUNDS" "$SECS" "$CLIENTS" "$VARIANTS" <<'PY'
import sys, statistics
raw, out, rounds, secs, clients, variants = sys.argv[1:7]
rows = [l.rstrip("\n").split("\t") for l in open(raw)]
med = statistics.median
L = ["# Pass-through profile, " + out.split("pump-profile-")[1][:-3], "",
     f"Command: `ROUNDS={rounds} SECONDS_PER_RUN={secs} CLIENTS={clients} VARIANTS=\"{variants}\" benches/e2e/pump_profile.sh` (pgbench -S, {clients} clients, "
     f"{rounds} interleaved rounds of {secs} s; every target on this machine over loopback).", "",
     "| mode | target | TPS (median) | proxy CPU µs/tx | context switches/tx |", "|---|---|---|---|---|"]
runs = {}
for r in rows:
    if r[0] == "run": runs.setdefault((r[1], r[2]), []).append(r)
for (mode, name), rs in runs.items():
    L.append(f"| {mode} | {name} | {med(float(x[3]) for x in rs):.0f} | {med(float(x[4]) for x in rs):.1f} | {med(float(x[5]) for x in rs):.2f} |")
L += ["", "## Syscalls per transaction (`strace -c -f`, one run each)", ""]
sysc = {}
for r in rows:
    if r[0] == "sys": sysc.setdefault((r[1], r[2]), {})[r[3]] = float(r[4])
names = sorted({k for d in sysc.values() for k, v in d.items() if v >= 0.01})
L += ["| mode | target | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
for (mode, name), d in sysc.items():
    L.append(f"| {mode} | {name} | " + " | ".join(f"{d.get(n, 0):.2f}" for n in names) + " |")
L += ["", "## Where the CPU is (perf, cpu-clock samples, simple mode)", ""]
for name in dict.fromkeys(r[1] for r in rows if r[0] == "dso"):
    L.append(f"- {name}: " + ", ".join(f"{r[2]} {r[3]}%" for r in rows if r[0] == "dso" and r[1] == name))
    L.append("  top symbols: " + "; ".join(f"{r[2].strip()} {r[3]}" for r in rows if r[0] == "sym" and r[1] == name)[:600])
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
echo "written to $OUT"
