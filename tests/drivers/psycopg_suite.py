"""psycopg 3 and SQLAlchemy 2 through pgveil. Prints one JSON line per case; exit 1 on failure.

Usage: psycopg_suite.py HOST PORT DBNAME ROLE (app_user is masked, dba is exempt)
"""
import datetime
import decimal
import json
import sys
import threading
import time

import psycopg
import sqlalchemy
from psycopg import errors
from sqlalchemy import orm

host, port, dbname, role = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
masked = role != "dba"
conninfo = f"host={host} port={port} dbname={dbname} user={role} password={role}_pw sslmode=disable"
results = []
SSN = "***-**-0001" if masked else "900-00-0001"
BIRTH = datetime.date(1980, 1, 1) if masked else datetime.date(1980, 7, 15)
BALANCE = decimal.Decimal("1000.00") if masked else decimal.Decimal("1234.56")


def case(name, modes):
    def wrap(fn):
        try:
            detail = fn()
            results.append({"case": name, "modes": modes, "ok": True, "detail": detail or ""})
        except Exception as e:  # noqa: BLE001 - every failure is reported
            results.append({"case": name, "modes": modes, "ok": False, "detail": f"{type(e).__name__}: {e}"})
        return fn
    return wrap


def check(cond, what):
    if not cond:
        raise AssertionError(what)


@case("text results", "simple")
def _():
    with psycopg.connect(conninfo) as c:
        row = c.execute("SELECT ssn, email FROM customers WHERE id = 1", prepare=False).fetchone()
        check(row[0] == SSN, row)


@case("binary results (numeric, date, timestamptz)", "extended, binary")
def _():
    with psycopg.connect(conninfo) as c:
        cur = c.cursor(binary=True)
        row = cur.execute("SELECT ssn, balance, birth_date, signup, id FROM customers WHERE id = %s", (1,)).fetchone()
        check(row[0] == SSN and row[1] == BALANCE and row[2] == BIRTH and isinstance(row[3], datetime.datetime), row)


@case("prepared statements reused", "extended, prepared")
def _():
    with psycopg.connect(conninfo, prepare_threshold=1) as c:
        for i in range(1, 20):
            row = c.execute("SELECT ssn FROM customers WHERE id = %s", (i,)).fetchone()
            check(row[0] is not None and (not masked or row[0].startswith("***")), row)


@case("server-side cursor", "extended, named portal")
def _():
    with psycopg.connect(conninfo) as c:
        with c.transaction():
            cur = c.cursor(name="srv")
            cur.execute("SELECT id, ssn FROM customers WHERE id <= 10 ORDER BY id")
            rows = cur.fetchmany(4) + cur.fetchall()
            check(len(rows) == 10 and rows[0][1] == SSN, rows[:2])


@case("pipeline mode with a blocked statement", "extended, pipeline")
def _():
    with psycopg.connect(conninfo, autocommit=True) as c:
        try:
            with c.pipeline():
                a = c.execute("SELECT ssn FROM customers WHERE id = 1")
                b = c.execute("SELECT name FROM customers WHERE id = 2")
        except errors.Error:
            pass
        check(a.fetchone()[0] == SSN, "pipeline first result")
        check(b.fetchone() is not None, "pipeline second result")
        if masked:
            # One statement and an explicit sync: psycopg raises the error at the sync, so the
            # pipeline is never left with results in flight (which psycopg refuses to exit).
            seen = False
            try:
                with c.pipeline() as p:
                    c.execute("SELECT id FROM customers WHERE ssn = 'x'")
                    p.sync()
            except errors.InsufficientPrivilege:
                seen = True
            check(seen, "not blocked")
        check(c.execute("SELECT 1").fetchone()[0] == 1, "usable")


@case("executemany", "extended")
def _():
    with psycopg.connect(conninfo) as c:
        c.cursor().executemany("INSERT INTO orders (customer_id, amount, status) VALUES (%s, %s, %s)", [(1, 1.5, "x"), (2, 2.5, "y")])
        c.rollback()


@case("COPY FROM STDIN and COPY TO STDOUT", "simple, copy")
def _():
    with psycopg.connect(conninfo) as c:
        with c.cursor().copy("COPY orders (customer_id, amount, status) FROM STDIN") as cp:
            cp.write_row((1, 3.25, "copied"))
        out = []
        with c.cursor().copy("COPY (SELECT id, status FROM orders WHERE status = 'copied') TO STDOUT") as cp:
            for row in cp.rows():
                out.append(row)
        check(len(out) == 1, out)
        c.rollback()


@case("LISTEN/NOTIFY", "simple, async messages")
def _():
    with psycopg.connect(conninfo, autocommit=True) as listener, psycopg.connect(conninfo, autocommit=True) as sender:
        listener.execute("LISTEN pgveil_events")
        sender.execute("NOTIFY pgveil_events, 'hello'")
        gen = listener.notifies(timeout=5)
        got = [n.payload for n in gen]
        check(got[:1] == ["hello"], got)


@case("cancel", "cancel request")
def _():
    with psycopg.connect(conninfo) as c:
        t = threading.Timer(0.5, c.cancel)
        t.start()
        start = time.time()
        try:
            c.execute("SELECT pg_sleep(20)")
            raise AssertionError("not cancelled")
        except errors.QueryCanceled:
            pass
        check(time.time() - start < 10, "took too long")


@case("blocked statement is an ordinary SQL error", "simple, extended")
def _():
    if not masked:
        return "exempt: not blocked"
    with psycopg.connect(conninfo) as c:
        for prepare in (False, True):
            try:
                c.execute("SELECT id FROM customers ORDER BY ssn", prepare=prepare)
                raise AssertionError("not blocked")
            except errors.InsufficientPrivilege as e:
                check(e.sqlstate == "42501", e.sqlstate)
            c.rollback()
        check(c.execute("SELECT 1").fetchone()[0] == 1, "usable")


@case("SQLAlchemy 2 Core and ORM", "extended")
def _():
    engine = sqlalchemy.create_engine(f"postgresql+psycopg://{role}:{role}_pw@{host}:{port}/{dbname}")
    meta = sqlalchemy.MetaData()
    customers = sqlalchemy.Table("customers", meta, sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
                                 sqlalchemy.Column("name", sqlalchemy.Text), sqlalchemy.Column("ssn", sqlalchemy.Text))

    class Base(orm.DeclarativeBase):
        pass

    class Customer(Base):
        __tablename__ = "customers"
        id = sqlalchemy.Column(sqlalchemy.Integer, primary_key=True)
        name = sqlalchemy.Column(sqlalchemy.Text)
        ssn = sqlalchemy.Column(sqlalchemy.Text)

    with engine.connect() as conn:
        row = conn.execute(sqlalchemy.select(customers.c.id, customers.c.ssn).where(customers.c.id == 1)).one()
        check(row.ssn == SSN, row)
    with orm.Session(engine) as s:
        cust = s.get(Customer, 1)
        check(cust.ssn == SSN, cust.ssn)
        s.add(Customer(name="ORM Person", ssn="123-45-6789"))
        s.flush()
        s.rollback()
    engine.dispose()


@case("DateStyle and IntervalStyle set by the session", "simple")
def _():
    with psycopg.connect(conninfo) as c:
        c.execute("SET DateStyle = 'German'")
        c.execute("SET IntervalStyle = 'postgres_verbose'")
        row = c.execute("SELECT birth_date::text, (interval '1 day')::text FROM customers WHERE id = 1", prepare=False).fetchone()
        check(row[0] == ("01.01.1980" if masked else "15.07.1980"), row)
        c.execute("RESET DateStyle")


@case("client encodings (LATIN1 allowed, SJIS refused for masked roles)", "simple")
def _():
    with psycopg.connect(conninfo) as c:
        c.execute("SET client_encoding = 'LATIN1'")
        row = c.execute("SELECT name FROM customers WHERE id = 1").fetchone()
        check(row[0] == "Canary One", row)
        c.execute("RESET client_encoding")
        try:
            c.execute("SET client_encoding = 'SJIS'")
            check(not masked, "SJIS was allowed for a masked role")
        except errors.InsufficientPrivilege:
            check(masked, "SJIS refused for an exempt role")


@case("search_path to an unprotected table of the same name", "simple")
def _():
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute("SET search_path = crm")
        row = c.execute("SELECT ssn FROM customers WHERE id = 1", prepare=False).fetchone()
        check(row[0] == "not-protected", row)
        c.execute("RESET search_path")
        row = c.execute("SELECT ssn FROM customers WHERE id = 1", prepare=False).fetchone()
        check(row[0] == SSN, row)


@case("temporary tables", "simple, extended")
def _():
    with psycopg.connect(conninfo) as c:
        c.execute("CREATE TEMP TABLE scratch AS SELECT id, ssn FROM customers WHERE id <= 3")
        row = c.execute("SELECT ssn FROM scratch WHERE id = %s", (1,)).fetchone()
        check(row[0] == SSN, row)
        c.execute("DROP TABLE scratch")


@case("server-side cursor closed after an error", "extended, named portal")
def _():
    with psycopg.connect(conninfo) as c:
        cur = c.cursor(name="broken")
        try:
            cur.execute("SELECT 1/0 FROM customers")
            cur.fetchall()
            check(False, "division by zero did not fail")
        except errors.DivisionByZero:
            pass
        cur.close()
        c.rollback()
        row = c.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()
        check(row[0] == SSN, row)


for r in results:
    r.update(driver="psycopg", version=psycopg.__version__, role=role)
    print(json.dumps(r))
sys.exit(0 if all(r["ok"] for r in results) else 1)
