#!/usr/bin/env bash
# Runs each cargo-fuzz target for a while on the stable toolchain (no sanitizer: stable Rust
# cannot build ASan; Rust's own bounds and overflow checks, on in this build, catch what
# matters here) and prints executions per target. Crashes are kept in fuzz/artifacts/<target>/;
# once fixed, copy the input to fuzz/regressions/<target>/ so `cargo test` replays it.
#
#   fuzz/run.sh [seconds per target, default 60] [target ...]
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 2; }
secs=${1:-60}; shift || true
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(frame startup datarow mask rules analysis relay)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/../target/fuzz}
# FUZZ_FLAGS="-O -a" adds debug assertions (integer overflow panics) at the cost of a rebuild.
FLAGS=(${FUZZ_FLAGS:--O})
cargo fuzz build -s none "${FLAGS[@]}"
status=0
printf '%-10s %8s %14s %10s  %s\n' target seconds executions exec/s result
for t in "${targets[@]}"; do
    corpus=corpus/$t; mkdir -p "$corpus" "artifacts/$t"
    seeds=(); [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log=$(mktemp)
    if cargo fuzz run -s none "${FLAGS[@]}" "$t" "$corpus" "${seeds[@]}" "regressions/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="CRASH (see artifacts/$t and $log)"; status=1
    fi
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
    printf '%-10s %8s %14s %10s  %s\n' "$t" "$secs" "${runs:-?}" "$(( ${runs:-0} / secs ))" "$result"
    [ "$result" = ok ] && rm -f "$log"
done
exit $status
