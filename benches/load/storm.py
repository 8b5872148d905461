#!/usr/bin/env python3
"""A storm of malformed clients against a PostgreSQL proxy: each kind of bad input of
tests/src/hardening.rs, ROUNDS times, several connections at once. Prints how many
connections were answered with an error or closed (every one should be).

    storm.py HOST PORT ROUNDS USER DATABASE
"""
import socket
import struct
import sys
from concurrent.futures import ThreadPoolExecutor


def startup(user: str, db: str) -> bytes:
    body = struct.pack(">I", 196608) + b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0\0"
    return struct.pack(">I", len(body) + 4) + body


def query(sql: bytes) -> bytes:
    body = sql + b"\0"
    return b"Q" + struct.pack(">I", 4 + len(body)) + body


def logged_in(host, port, user, db):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(startup(user, db))
    buf = b""
    while b"Z\0\0\0\x05I" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed during login")
        buf += chunk
    return s


def attempt(kind, host, port, user, db):
    try:
        if kind.startswith("after-login"):
            s = logged_in(host, port, user, db)
        else:
            s = socket.create_connection((host, port), timeout=10)
        payload = {
            "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "huge-length": struct.pack(">I", 0x7FFFFFFF),
            "tiny-length": struct.pack(">I", 3),
            "truncated-startup": startup(user, db)[:10],
            "plaintext-after-sslrequest": struct.pack(">II", 8, 80877103) + startup(user, db),
            "after-login-unknown-type": b"Z\0\0\0\x04",
            "after-login-length-below-4": b"Q\0\0\0\x02",
            "after-login-oversized-sync": b"S\0\0\x27\x20",
            "after-login-invalid-utf8": query(b"SELECT '\xff\xfe' AS x, 1"),
        }[kind]
        s.sendall(payload)
        if kind == "truncated-startup":
            s.close()  # gives up half-way; the proxy must free the slot
            return True
        s.settimeout(15)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
            if kind == "after-login-invalid-utf8" and b"Z\0\0\0\x05" in got:
                break
        s.close()
        return b"E" in got or got == b"" or kind == "plaintext-after-sslrequest"
    except TimeoutError:
        return False  # no answer and no close: a hang
    except OSError:
        return True  # a reset is a closed connection too


def main():
    host, port, rounds, user, db = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    kinds = ["garbage", "huge-length", "tiny-length", "truncated-startup", "plaintext-after-sslrequest",
             "after-login-unknown-type", "after-login-length-below-4", "after-login-oversized-sync",
             "after-login-invalid-utf8"]
    jobs = [k for _ in range(rounds) for k in kinds]
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda k: attempt(k, host, port, user, db), jobs))
    print(f"storm {len(jobs)} answered {sum(results)}", flush=True)
    failed = sorted({k for k, ok in zip(jobs, results) if not ok})
    if failed:
        print(f"unanswered kinds: {', '.join(failed)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
