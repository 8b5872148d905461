#!/usr/bin/env bash
# End-to-end comparison, one interleaved run (A B C A B C ...) so machine noise hits every
# target alike: PostgreSQL direct, PgBouncer (session mode) and pgveil as an exempt role
# (pure pass-through), as a masked role with no masked column in the result, and as a role
# whose result has masked columns. pgbench -S in simple / extended / prepared mode with 1 and
# 8 clients, a 200,000-row x 8-column result fetched with pgbench, proxy CPU per transaction and
# memory per idle connection. Writes benches/results/<date>-<host>.md and prints it.
#
#   benches/e2e/run.sh                 # defaults: ROUNDS=3 SECONDS_PER_RUN=5 CLIENTS="1 8"
#   ROUNDS=5 SECONDS_PER_RUN=10 CLIENTS="1 8 32" benches/e2e/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-5}
CLIENTS=${CLIENTS:-"1 8"}
MODES=${MODES:-"simple extended prepared"}

source benches/lib.sh
setup_cluster 300
start_pgveil

start_pgbouncer
# HAProxy in `mode tcp`: the protocol-blind floor (issue 18), skipped when not installed.
HAPROXY_ROW=()
start_haproxy && HAPROXY_ROW=("haproxy|$HAPROXY_PORT|postgres|$HAPROXY_PID|disable")

# name | port | user | pid whose CPU is counted | client sslmode. Every target offers TLS; the
# plaintext runs say sslmode=disable (libpq's default, prefer, would pick TLS at the proxies and
# not at a server without ssl, comparing unlike things).
TARGETS=(
  "direct|$PG_PORT|postgres||disable"
  "pgbouncer|$BOUNCER_PORT|postgres|$BOUNCER_PID|disable"
  "${HAPROXY_ROW[@]}"
  "pgveil-exempt|$VEIL_PORT|bench_exempt|$VEIL_PID|disable"
  "pgveil-nomask|$VEIL_PORT|bench_nomask|$VEIL_PID|disable"
  "pgveil-masked|$VEIL_PORT|bench_masked|$VEIL_PID|disable"
)
# TLS on the client leg (TLS_MODES x TLS_CLIENTS only, to keep the run short).
TLS_TARGETS=(
  "direct-tls|$PG_PORT|postgres||require"
  "pgbouncer-tls|$BOUNCER_PORT|postgres|$BOUNCER_PID|require"
  "pgveil-exempt-tls|$VEIL_PORT|bench_exempt|$VEIL_PID|require"
  "pgveil-nomask-tls|$VEIL_PORT|bench_nomask|$VEIL_PID|require"
)
TLS_MODES=${TLS_MODES:-"simple extended"}
TLS_CLIENTS=${TLS_CLIENTS:-8}
RAW="$WORK/raw.tsv"
: > "$RAW"
echo "SELECT * FROM big;" > "$WORK/big.sql"
# The same fetch as pgveil sends it for bench_masked, run directly: what the server's masks
# cost without pgveil in the path.
"$PGVEIL" explain --rules "$WORK/rules.yaml" --role bench_masked \
  --against "postgresql://postgres@127.0.0.1:$PG_PORT/bench?sslmode=disable" "SELECT * FROM big;" \
  | sed -n '/^PostgreSQL runs:/{n;s/^ *//;p}' > "$WORK/big-masked.sql"
[ -s "$WORK/big-masked.sql" ] || { echo "pgveil explain printed no rewritten text" >&2; exit 1; }
for round in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    for c in $CLIENTS; do
      run=("${TARGETS[@]}")
      [[ " $TLS_MODES " == *" $mode "* && " $TLS_CLIENTS " == *" $c "* ]] && run+=("${TLS_TARGETS[@]}")
      # Every other round runs the targets in reverse, so a drift of the machine during a
      # round (caches warming, a noisy neighbour) does not always favour the same target.
      if (( round % 2 == 0 )); then
        for (( i = 0, j = ${#run[@]} - 1; i < j; i++, j-- )); do t=${run[i]}; run[i]=${run[j]}; run[j]=$t; done
      fi
      for t in "${run[@]}"; do
        IFS='|' read -r name port user pid sslmode <<<"$t"
        before=$(cpu_ticks "$pid")
        out=$(PGSSLMODE=$sslmode "$BIN/pgbench" -n -S -M "$mode" -c "$c" -j "$(( c < 2 ? 1 : 2 ))" -T "$SECS" -h 127.0.0.1 -p "$port" -U "$user" bench 2>&1) || { echo "$name $mode c=$c failed: $out" >&2; exit 1; }
        after=$(cpu_ticks "$pid")
        tps=$(tps_of "$out")
        lat=$(latency_of "$out")
        tx=$(tx_of "$out")
        failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
        cpu_us=$(per_tx_us $((after - before)) "$tx")
        printf 'pgbench\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$c" "$name" "$tps" "$lat" "$cpu_us" "${failed:-0}" "$round" >> "$RAW"
      done
    done
  done
  for t in "${TARGETS[@]}" "direct-substituted|$PG_PORT|postgres||disable|big-masked.sql"; do
    IFS='|' read -r name port user pid sslmode script <<<"$t"
    # pgbench discards the rows libpq received (psql's formatting dominated this row before).
    out=$(PGSSLMODE=$sslmode "$BIN/pgbench" -n -f "$WORK/${script:-big.sql}" -t 3 -c 1 -h 127.0.0.1 -p "$port" -U "$user" bench 2>&1) || { echo "$name big failed: $out" >&2; exit 1; }
    lat=$(latency_of "$out")
    printf 'big\t-\t1\t%s\t%s\t-\t-\t0\t%s\n' "$name" "$(awk -v l="$lat" 'BEGIN { printf "%.3f", l / 1000 }')" "$round" >> "$RAW"
  done
done

# Memory per idle connection (pgveil): RSS before and with 200 idle sessions open.
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
rss0=$(rss "$VEIL_PID")
IDLE=()
for i in $(seq 200); do (sleep 8 | PGSSLMODE=disable "$BIN/psql" -X -q -h 127.0.0.1 -p "$VEIL_PORT" -U bench_nomask -d bench >/dev/null 2>&1) & IDLE+=($!); done
sleep 4
rss1=$(rss "$VEIL_PID")
wait "${IDLE[@]}"
per_conn=$(( (rss1 - rss0) * 1024 / 200 ))

HOST=$(hostname); DATE=$(date +%F)
# RUN names one of several runs of a day: results/<date>-<host>-<RUN>.md.
OUT="benches/results/$DATE-$HOST${RUN:+-$RUN}.md"
python3 - "$RAW" "$OUT" "$ROUNDS" "$SECS" "$per_conn" <<'PY'
import sys, statistics, platform, os, subprocess
raw, out, rounds, secs, per_conn = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
rows = [l.rstrip("\n").split("\t") for l in open(raw)]
def med(xs): return statistics.median(xs) if xs else float("nan")
def spread(xs): return (max(xs) - min(xs)) / med(xs) * 100 if xs and med(xs) else 0
cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": ") if "model name" in open("/proc/cpuinfo").read() else platform.processor()
lines = [f"# pgveil end-to-end benchmark, {os.path.basename(out)[:-3]}", "",
         f"Machine: {os.cpu_count()} cores ({cpu}), {round(os.sysconf('SC_PAGE_SIZE')*os.sysconf('SC_PHYS_PAGES')/2**30)} GiB; "
         f"PostgreSQL and every proxy on the same machine over loopback. {rounds} interleaved rounds of {secs} s per run.", "",
         "Command: `ROUNDS=%s SECONDS_PER_RUN=%s benches/e2e/run.sh` (odd rounds run the targets in order, even rounds in reverse)" % (rounds, secs), "",
         "## pgbench -S (select-only), median TPS over rounds", "",
         "| mode | clients | target | TPS (median) | spread % | vs direct | vs PgBouncer | latency ms | added µs | proxy CPU µs/tx | failed |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
groups = {}
for r in rows:
    if r[0] != "pgbench": continue
    groups.setdefault((r[1], r[2], r[3]), []).append(r)
for (mode, c, name), rs in sorted(groups.items(), key=lambda k: (k[0][0], int(k[0][1]))):
    tps = [float(x[4]) for x in rs]; lat = [float(x[5]) for x in rs]; cpu_us = [float(x[6]) for x in rs]
    suffix = "-tls" if name.endswith("-tls") else ""
    d = med([float(x[4]) for x in groups[(mode, c, "direct" + suffix)]]); b = med([float(x[4]) for x in groups[(mode, c, "pgbouncer" + suffix)]])
    dl = med([float(x[5]) for x in groups[(mode, c, "direct" + suffix)]])
    failed = sum(int(x[7]) for x in rs)
    added = (med(lat) - dl) * 1000
    lines.append(f"| {mode} | {c} | {name} | {med(tps):.0f} | {spread(tps):.0f} | {med(tps)/d:.2f} | {med(tps)/b:.2f} | {med(lat):.3f} | {added:+.0f} | {med(cpu_us) if name != 'direct' else 0:.1f} | {failed} |")
# Ratios within one round (the two runs minutes apart at most), then their median and range
# over rounds: steadier than a ratio of medians when the machine drifts between rounds.
lines += ["", "## Paired ratios: per round, then median (min–max) over rounds", "",
          "| mode | clients | nomask / exempt TPS | masked / exempt TPS | exempt / PgBouncer TPS | exempt / PgBouncer CPU per tx |",
          "|---|---|---|---|---|---|"]
by_round = {}
for r in rows:
    if r[0] == "pgbench" and len(r) > 8:
        by_round.setdefault((r[1], r[2], r[8]), {})[r[3]] = (float(r[4]), float(r[6]))
def paired(mode, c, a, b, field):
    xs = [v[a][field] / v[b][field] for (m, cc, _), v in by_round.items()
          if m == mode and cc == c and a in v and b in v and v[b][field] > 0]
    return f"{med(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})" if xs else "–"
for mode, c in sorted({(m, c) for (m, c, _) in by_round}, key=lambda k: (k[0], int(k[1]))):
    lines.append(f"| {mode} | {c} | {paired(mode, c, 'pgveil-nomask', 'pgveil-exempt', 0)} | {paired(mode, c, 'pgveil-masked', 'pgveil-exempt', 0)} "
                 f"| {paired(mode, c, 'pgveil-exempt', 'pgbouncer', 0)} | {paired(mode, c, 'pgveil-exempt', 'pgbouncer', 1)} |")
lines += ["", "Rows named -tls use TLS on the client leg (sslmode=require; PgBouncer with client_tls_sslmode=allow, which",
          "serves TLS clients exactly as require does) and compare with direct-tls and pgbouncer-tls; the others are plaintext.",
          "Proxy CPU is the proxy process's user+system time (from /proc) divided by transactions."]
lines += ["", "## 200,000 rows x 8 columns fetched with pgbench (SELECT * FROM big, 3 per round), median seconds per fetch", "", "| target | seconds | vs direct |", "|---|---|---|"]
big = {}
for r in rows:
    if r[0] == "big": big.setdefault(r[3], []).append(float(r[4]))
d = med(big.get("direct", [1]))
for name, xs in big.items():
    lines.append(f"| {name} | {med(xs):.3f} | {med(xs)/d:.2f} |")
lines += ["", f"pgveil-masked masks 2 of the 8 columns of that result; pgveil-nomask is inspected but its result has no masked column;",
          "direct-substituted is the statement pgveil sends for pgveil-masked, run directly (the server computing the masks).", "",
          f"Memory: {per_conn} bytes of pgveil RSS per idle connection (200 idle sessions).", ""]
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
PY
echo "written to $OUT"
