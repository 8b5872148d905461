#!/usr/bin/env python3
"""Holds N idle PostgreSQL connections open through a proxy (trust authentication).

    hold.py HOST PORT N USER DATABASE

Prints "held N" once every connection is logged in, then waits for a line on stdin; on it,
runs SELECT 1 on every connection, prints "alive K", terminates them all and exits.
"""
import socket
import struct
import sys


def startup(user: str, db: str) -> bytes:
    params = b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0application_name\0hold\0\0"
    body = struct.pack(">I", 196608) + params
    return struct.pack(">I", len(body) + 4) + body


def until_ready(s: socket.socket) -> bool:
    """Reads messages until ReadyForQuery; False on an ErrorResponse or a closed socket."""
    buf = b""
    ok = True
    while True:
        while len(buf) >= 5:
            tag, length = buf[0:1], struct.unpack(">I", buf[1:5])[0]
            if len(buf) < 1 + length:
                break
            if tag == b"E":
                ok = False
            if tag == b"Z":
                return ok
            buf = buf[1 + length:]
        chunk = s.recv(65536)
        if not chunk:
            return False
        buf += chunk


def main() -> None:
    host, port, n, user, db = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    conns = []
    failed = 0
    for _ in range(n):
        try:
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(startup(user, db))
            if until_ready(s):
                conns.append(s)
            else:
                failed += 1
                s.close()
        except OSError as e:
            failed += 1
            print(f"connect failed: {e}", file=sys.stderr)
    print(f"held {len(conns)} failed {failed}", flush=True)
    sys.stdin.readline()
    alive = 0
    query = b"SELECT 1\0"
    for s in conns:
        try:
            s.sendall(b"Q" + struct.pack(">I", 4 + len(query)) + query)
            if until_ready(s):
                alive += 1
        except OSError:
            pass
    print(f"alive {alive}", flush=True)
    for s in conns:
        try:
            s.sendall(b"X\0\0\0\x04")
        except OSError:
            pass
        s.close()


if __name__ == "__main__":
    main()
