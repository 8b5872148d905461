"""Drivers that prepare statements on their own, across a rules reload (threat model I11).

Usage: reload_prepared.py HOST PORT DB ROLE. psycopg 3 with prepare_threshold=0 (every query
server-prepared from its first execution) and asyncpg (which prepares every query) each run
the same statement before the reload; the script then prints "ready", waits for a line on
stdin (the test reloads the rules meanwhile) and runs the statement again on the same
connections. It prints one JSON line per driver: the names read before and after.
"""

import asyncio
import json
import sys

import asyncpg
import psycopg

HOST, PORT, DB, ROLE = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
SQL_PSYCOPG = "SELECT name FROM customers WHERE id = %s"
SQL_ASYNCPG = "SELECT name FROM customers WHERE id = $1"


async def main():
    conn = psycopg.connect(
        host=HOST, port=PORT, dbname=DB, user=ROLE, password=f"{ROLE}_pw", sslmode="disable", prepare_threshold=0
    )
    conn.autocommit = True
    apg = await asyncpg.connect(host=HOST, port=PORT, database=DB, user=ROLE, password=f"{ROLE}_pw", ssl=False)
    stmt = await apg.prepare(SQL_ASYNCPG)
    before = {
        "psycopg": [conn.execute(SQL_PSYCOPG, (i,)).fetchone()[0] for i in (1, 2)],
        "asyncpg": [await stmt.fetchval(i) for i in (1, 2)],
    }
    print("ready", flush=True)
    sys.stdin.readline()
    after = {}
    for name, run in (
        ("psycopg", lambda i: conn.execute(SQL_PSYCOPG, (i,)).fetchone()[0]),
        ("asyncpg", None),
    ):
        try:
            if name == "asyncpg":
                after[name] = [await stmt.fetchval(i) for i in (1, 2)]
            else:
                after[name] = [run(i) for i in (1, 2)]
        except Exception as e:  # reported, not raised: the test decides
            after[name] = f"error: {type(e).__name__}: {e}"
    for name in before:
        print(json.dumps({"driver": name, "before": before[name], "after": after[name]}), flush=True)
    conn.close()
    await apg.close()


asyncio.run(main())
