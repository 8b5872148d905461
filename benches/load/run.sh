#!/usr/bin/env bash
# Load and shutdown, through the release pgveil binary against a throwaway PostgreSQL:
#   0. a storm of malformed clients (STORM rounds of each kind): all answered or closed, and
#      descriptors and memory back to the baseline;
#   1. HOLD (default 1,000) idle client connections of HOLD_ROLE (default bench_masked, an
#      inspected role; bench_exempt holds pumped ones) held open, plus pgbench
#      (tpcb-like, read-write) with CLIENTS (default 64) clients of an inspected role for
#      LOAD_SECS (default 60) seconds: pgbench must report zero failed transactions and every
#      held connection must still answer afterwards;
#   2. memory per idle connection (RSS delta / HOLD), peak RSS, and open file descriptors
#      before, during and after: after all clients leave, pgveil's descriptors must return to
#      their baseline (no leak);
#   3. SIGTERM under load: a statement in flight when the signal arrives completes, new
#      connections are refused, every audit line of the blocks issued before is on disk, and
#      pgveil exits 0 within the grace period.
# Prints a table and writes benches/results/load-<date>-<host>.md. Exits non-zero on a failure.
#
#   benches/load/run.sh            # HOLD=1000 CLIENTS=64 LOAD_SECS=60 STORM=100
set -euo pipefail
cd "$(dirname "$0")/../.."
HOLD=${HOLD:-1000}
HOLD_ROLE=${HOLD_ROLE:-bench_masked}
CLIENTS=${CLIENTS:-64}
LOAD_SECS=${LOAD_SECS:-60}
GRACE=${GRACE:-10}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((HOLD * 2 + CLIENTS * 2 + 100)) ] || { echo "ulimit -n $(ulimit -n) is too low for HOLD=$HOLD" >&2; exit 1; }

source benches/lib.sh
setup_cluster $((HOLD + CLIENTS + 100))
AUDIT=$WORK/audit.jsonl
start_pgveil "limits: { max_connections: $((HOLD + CLIENTS + 50)), shutdown_grace: ${GRACE}s }
audit: { path: $AUDIT }"

fds() { ls "/proc/$VEIL_PID/fd" | wc -l; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$VEIL_PID/status"; }
PSQLV=("$BIN/psql" -X -q -At -h 127.0.0.1 -p "$VEIL_PORT" -d bench)
FAIL=0
check() { if eval "$2"; then echo "  ok    $1"; else echo "  FAIL  $1"; FAIL=1; fi; }

# Warm up: the catalog connection and one session of each role, so the baseline includes them.
"${PSQLV[@]}" -U bench_masked -c "SELECT abalance FROM pgbench_accounts WHERE aid = 1" >/dev/null
"${PSQLV[@]}" -U bench_nomask -c "SELECT 1" >/dev/null
# A plaintext exempt session starts the pump threads (their descriptors, an epoll set and an
# eventfd each, are part of the baseline).
PGSSLMODE=disable "${PSQLV[@]}" -U bench_exempt -c "SELECT 1" >/dev/null
sleep 1
fd0=$(fds); rss0=$(rss_kb)

# 0. A storm of malformed clients (STORM rounds of every kind in tests/src/hardening.rs):
#    every one answered or closed, and descriptors and memory back where they were.
STORM=${STORM:-100}
storm_line=$(python3 benches/load/storm.py 127.0.0.1 "$VEIL_PORT" "$STORM" bench_masked bench)
storm_total=$(awk '{print $2}' <<<"$storm_line"); storm_ok=$(awk '{print $4}' <<<"$storm_line")
for _ in $(seq 50); do [ "$(fds)" -le "$fd0" ] && break; sleep 0.2; done
fdS=$(fds); rssS=$(rss_kb)

# 1. Hold HOLD idle sessions of HOLD_ROLE.
coproc HOLDER { python3 benches/load/hold.py 127.0.0.1 "$VEIL_PORT" "$HOLD" "$HOLD_ROLE" bench; }
holder_pid=$HOLDER_PID # bash unsets HOLDER_PID once the coprocess has exited
read -r held_line <&"${HOLDER[0]}"
held=$(awk '{print $2}' <<<"$held_line"); hold_failed=$(awk '{print $4}' <<<"$held_line")
sleep 1
fd1=$(fds); rss1=$(rss_kb)
per_idle=$(( (rss1 - rss0) * 1024 / (held > 0 ? held : 1) ))

# ... plus pgbench, sampling RSS and descriptors every second.
peak=$rss1; peak_fd=$fd1
( while sleep 1; do echo "$(rss_kb) $(fds)"; done ) > "$WORK/samples" 2>/dev/null &
SAMPLER=$!; PIDS+=("$SAMPLER")
bench_out=$("$BIN/pgbench" -n -c "$CLIENTS" -j 2 -T "$LOAD_SECS" -h 127.0.0.1 -p "$VEIL_PORT" -U bench_nomask bench 2>&1) && bench_rc=0 || bench_rc=$?
kill "$SAMPLER" 2>/dev/null || true
read -r peak peak_fd < <(awk -v r="$peak" -v f="$peak_fd" '{ if ($1 > r) r = $1; if ($2 > f) f = $2 } END { print r, f }' "$WORK/samples")
tps=$(tps_of "$bench_out")
tx=$(tx_of "$bench_out")
failed_tx=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$bench_out")
lat=$(latency_of "$bench_out")

echo >&"${HOLDER[1]}"
read -r alive_line <&"${HOLDER[0]}"
alive=$(awk '{print $2}' <<<"$alive_line")
wait "$holder_pid" 2>/dev/null || true

# 2. Everyone has left: descriptors back to the baseline.
for _ in $(seq 50); do [ "$(fds)" -le "$fd0" ] && break; sleep 0.2; done
fd2=$(fds); rss2=$(rss_kb)

# 3. SIGTERM under load.
blocks=5
for i in $(seq "$blocks"); do
  "${PSQLV[@]}" -U bench_masked -c "SELECT aid FROM pgbench_accounts WHERE abalance = $i" >/dev/null 2>&1 || true
done
"$BIN/pgbench" -n -c 16 -j 2 -T 60 -h 127.0.0.1 -p "$VEIL_PORT" -U bench_nomask bench >"$WORK/bench2.out" 2>&1 &
BENCH2=$!
"${PSQLV[@]}" -U bench_nomask -c "SELECT pg_sleep(3), 'in-flight done'" >"$WORK/inflight.out" 2>&1 &
INFLIGHT=$!
sleep 1
term_at=$(date +%s.%N)
kill -TERM "$VEIL_PID"
sleep 0.3
"${PSQLV[@]}" -U bench_nomask -c "SELECT 1" >/dev/null 2>&1 && refused=no || refused=yes
wait "$INFLIGHT" && inflight_rc=0 || inflight_rc=$?
wait "$VEIL_PID" && veil_rc=0 || veil_rc=$?
exit_secs=$(awk -v s="$term_at" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
wait "$BENCH2" 2>/dev/null || true
audited=$(grep -c '"event":"query_blocked"' "$AUDIT" || true)

HOST=$(hostname); DATE=$(date +%F)
OUT="benches/results/load-$DATE-$HOST${RUN:+-$RUN}.md"  # RUN= names a second run of the day
cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
{
  echo "# pgveil load and shutdown, $DATE"
  echo
  echo "Machine: $(nproc) cores ($cpu), $(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo) GiB; PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') and pgveil (release) on loopback."
  echo "Command: \`HOLD=$HOLD HOLD_ROLE=$HOLD_ROLE CLIENTS=$CLIENTS LOAD_SECS=$LOAD_SECS benches/load/run.sh\`"
  echo
  echo "| measure | value |"
  echo "|---|---|"
  echo "| malformed clients (garbage, bad lengths, truncated/smuggled startup, bad messages, invalid UTF-8) | $storm_ok of $storm_total answered with an error or closed |"
  echo "| after the storm: descriptors / RSS vs baseline | $fdS vs $fd0 / $((rssS/1024)) vs $((rss0/1024)) MiB |"
  echo "| idle connections held ($HOLD_ROLE) | $held (failed to open: $hold_failed) |"
  echo "| held connections answering after the load | $alive |"
  echo "| pgbench tpcb-like, $CLIENTS clients × ${LOAD_SECS} s (inspected role) | $tx transactions, $tps TPS, latency $lat ms |"
  echo "| pgbench failed transactions / exit code | ${failed_tx:-0} / $bench_rc |"
  echo "| pgveil RSS: baseline / with $held idle / peak under load / after | $((rss0/1024)) / $((rss1/1024)) / $((peak/1024)) / $((rss2/1024)) MiB |"
  echo "| memory per idle connection | $per_idle bytes |"
  echo "| open descriptors: baseline / with $held idle / peak / after all left | $fd0 / $fd1 / $peak_fd / $fd2 |"
  echo "| SIGTERM: statement in flight completed | $([ "$inflight_rc" = 0 ] && grep -q 'in-flight done' "$WORK/inflight.out" && echo yes || echo "no ($(tr '\n' ' ' < "$WORK/inflight.out"))") |"
  echo "| SIGTERM: new connection refused | $refused |"
  echo "| SIGTERM: exit code, seconds to exit (grace ${GRACE} s) | $veil_rc, $exit_secs |"
  echo "| query_blocked audit lines: $blocks blocks before SIGTERM + $STORM invalid-UTF-8 statements of the storm | $audited of $((blocks + STORM)) |"
} > "$OUT"
cat "$OUT"
echo
echo "checks:"
check "every malformed client answered or closed" '[ "$storm_ok" = "$storm_total" ]'
check "storm: descriptors back to baseline, RSS within 8 MiB of it" '[ "$fdS" -le "$fd0" ] && [ $((rssS - rss0)) -le 8192 ]'
check "every idle connection opened" '[ "$held" = "$HOLD" ]'
check "every held connection still answers" '[ "$alive" = "$HOLD" ]'
check "pgbench: zero failed transactions, exit 0" '[ "${failed_tx:-0}" = 0 ] && [ "$bench_rc" = 0 ]'
check "memory per idle connection <= 64 KiB" '[ "$per_idle" -le 65536 ]'
check "descriptors back to baseline (no leak)" '[ "$fd2" -le "$fd0" ]'
check "in-flight statement completed after SIGTERM" '[ "$inflight_rc" = 0 ] && grep -q "in-flight done" "$WORK/inflight.out"'
check "new connections refused after SIGTERM" '[ "$refused" = yes ]'
check "exit 0 within the grace period" '[ "$veil_rc" = 0 ] && awk -v s="$exit_secs" -v g="$GRACE" "BEGIN { exit !(s <= g + 3) }"'
check "every block audited and flushed" '[ "$audited" = "$((blocks + STORM))" ]'
echo "written to $OUT"
exit $FAIL
