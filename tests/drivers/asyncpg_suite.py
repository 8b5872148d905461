"""asyncpg (binary-format extended protocol) through pgveil. One JSON line per case.

Usage: asyncpg_suite.py HOST PORT DBNAME ROLE
"""
import asyncio
import datetime
import decimal
import json
import sys
import uuid

import asyncpg

host, port, dbname, role = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
masked = role != "dba"
SSN = "***-**-0001" if masked else "900-00-0001"
BIRTH = datetime.date(1980, 1, 1) if masked else datetime.date(1980, 7, 15)
BALANCE = decimal.Decimal("1000.00") if masked else decimal.Decimal("1234.56")
results = []


async def case(name, modes, fn):
    try:
        detail = await fn()
        results.append({"case": name, "modes": modes, "ok": True, "detail": detail or ""})
    except Exception as e:  # noqa: BLE001
        results.append({"case": name, "modes": modes, "ok": False, "detail": f"{type(e).__name__}: {e}"})


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def main():
    conn = await asyncpg.connect(host=host, port=port, database=dbname, user=role, password=f"{role}_pw", ssl=False)

    async def codecs():
        row = await conn.fetchrow("SELECT ssn, balance, birth_date, signup, id FROM customers WHERE id = $1", 1)
        check(row["ssn"] == SSN and row["balance"] == BALANCE and row["birth_date"] == BIRTH, dict(row))
        row = await conn.fetchrow("SELECT gen_random_uuid() u, '{\"a\": 1}'::jsonb j, '{\"b\": 2}'::json k, ARRAY[1, 2, 3] a, now() t")
        check(isinstance(row["u"], uuid.UUID) and row["a"] == [1, 2, 3] and isinstance(row["t"], datetime.datetime), dict(row))

    async def cache():
        for i in range(1, 30):
            v = await conn.fetchval("SELECT ssn FROM customers WHERE id = $1", i)
            check(v is not None, i)

    async def copy_in():
        async with conn.transaction():
            await conn.copy_records_to_table("orders", records=[(1, decimal.Decimal("9.5"), "asyncpg")], columns=["customer_id", "amount", "status"])
            n = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'asyncpg'")
            check(n == 1, n)
            raise asyncpg.exceptions.InternalClientError("rollback")

    async def copy_in_wrapped():
        try:
            await copy_in()
        except asyncpg.exceptions.InternalClientError:
            pass

    async def copy_out():
        import io
        buf = io.BytesIO()
        await conn.copy_from_query("SELECT id, status FROM orders WHERE id <= 5", output=buf)
        check(buf.getvalue().count(b"\n") == 5, buf.getvalue())

    async def blocked():
        if not masked:
            return "exempt: not blocked"
        try:
            await conn.fetch("SELECT id FROM customers WHERE ssn = $1", "x")
            raise AssertionError("not blocked")
        except asyncpg.exceptions.InsufficientPrivilegeError:
            pass
        check(await conn.fetchval("SELECT 1") == 1, "usable")

    await case("binary codecs (numeric, date, timestamptz, uuid, json/jsonb, arrays)", "extended, binary", codecs)
    await case("prepared statement cache", "extended, prepared", cache)
    await case("copy_records_to_table", "copy in, binary", copy_in_wrapped)
    await case("copy_from_query", "copy out", copy_out)
    await case("blocked statement is an ordinary SQL error", "extended", blocked)
    await conn.close()


asyncio.run(main())
for r in results:
    r.update(driver="asyncpg", version=asyncpg.__version__, role=role)
    print(json.dumps(r))
sys.exit(0 if all(r["ok"] for r in results) else 1)
