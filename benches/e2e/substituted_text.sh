#!/usr/bin/env bash
# What the substitution costs PostgreSQL itself, without pgveil in the path: pgbench -S's
# statement as written ("original"), as pgveil sends it for bench_nomask (a masked column on
# pgbench_accounts that -S does not read; the text comes from `pgveil explain --against`, so it
# follows the rewriter), and the same relation only qualified and aliased ("qualified", a
# control), each sent DIRECT to PostgreSQL, interleaved (even rounds reversed). Reports TPS and
# PostgreSQL's CPU per transaction (the postmaster's reaped children, /proc cutime + cstime).
#
#   benches/e2e/substituted_text.sh    # ROUNDS=8 SECONDS_PER_RUN=5 MODES="simple prepared"
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-8}
SECS=${SECONDS_PER_RUN:-5}
MODES=${MODES:-"simple prepared"}
source benches/lib.sh
setup_cluster 100 >/dev/null

SQL="SELECT abalance FROM pgbench_accounts WHERE aid = 4242;"
rewritten=$("$PGVEIL" explain --rules "$WORK/rules.yaml" --role bench_nomask \
  --against "postgresql://postgres@127.0.0.1:$PG_PORT/bench?sslmode=disable" "$SQL" | sed -n '/^PostgreSQL runs:/{n;s/^ *//;p}')
[ -n "$rewritten" ] || { echo "pgveil explain printed no rewritten text" >&2; exit 1; }
script() { printf '\\set aid random(1, 1000000)\n%s\n' "${1//4242/:aid}" > "$WORK/$2.sql"; }
script "$SQL" original
script "$rewritten" substituted
script "SELECT abalance FROM public.pgbench_accounts AS pgbench_accounts WHERE aid = 4242;" qualified
PM=$(head -1 "$WORK/data/postmaster.pid")
pg_ticks() { awk '{print $16 + $17}' "/proc/$PM/stat"; }

RAW="$WORK/raw.tsv"
: > "$RAW"
for round in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    order=(original substituted qualified)
    (( round % 2 == 0 )) && order=(qualified substituted original)
    for v in "${order[@]}"; do
      before=$(pg_ticks)
      out=$("$BIN/pgbench" -n -f "$WORK/$v.sql" -M "$mode" -c 8 -j 2 -T "$SECS" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench 2>&1)
      sleep 0.3 # the backends exit and are reaped after pgbench ends
      after=$(pg_ticks)
      tps=$(tps_of "$out")
      tx=$(tx_of "$out")
      us=$(per_tx_us $((after - before)) "$tx")
      printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$v" "$tps" "$us" >> "$RAW"
    done
  done
done

python3 - "$RAW" "$rewritten" "$ROUNDS" "$SECS" <<'PY'
import sys, statistics as st
raw, rewritten, rounds, secs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [l.rstrip("\n").split("\t") for l in open(raw)]
by = {}
for r, mode, v, tps, us in rows:
    by.setdefault((mode, v), {})[r] = (float(tps), float(us))
print(f"pgbench -S statement sent directly to PostgreSQL, 8 clients, {rounds} interleaved rounds of {secs} s.")
print(f"substituted (as pgveil sends it for bench_nomask): `{rewritten}`\n")
print("| mode | text | median TPS | PostgreSQL µs CPU per tx | TPS / original, paired median (range) |")
print("|---|---|---|---|---|")
for mode in dict.fromkeys(m for _, m, _, _, _ in rows):
    base = by[(mode, "original")]
    for v in ("original", "substituted", "qualified"):
        d = by[(mode, v)]
        ratios = [d[r][0] / base[r][0] for r in d if r in base]
        print(f"| {mode} | {v} | {st.median(x[0] for x in d.values()):,.0f} | {st.median(x[1] for x in d.values()):.1f} "
              f"| {st.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |")
PY
