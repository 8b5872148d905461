#!/usr/bin/env bash
# Stops and removes the throwaway PostgreSQL cluster(s) the test harness started under /tmp.
set -u
for base in /tmp/pgveil-test-*; do
  [ -d "$base/data" ] || continue
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort | tail -n 1)
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$bin/pg_ctl" -D "$base/data" -m immediate stop >/dev/null 2>&1 || true
  else
    "$bin/pg_ctl" -D "$base/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$base"
done
