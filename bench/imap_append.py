#!/usr/bin/env python3
"""Bounded IMAP APPEND load (stdlib only): --users processes at most -c at
a time, each logging in as userNNNN/passNNNN and appending --per messages
of --size bytes to INBOX over one session; prints messages/s.

  python3 bench/imap_append.py --host 127.0.0.1 --port 12643 --users 16 --per 200
"""
import argparse
import imaplib
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def one(a):
    host, port, user, pw, per, size = a
    m = imaplib.IMAP4(host, port, timeout=120)
    m.login(user, pw)
    body = (b"Subject: append bench\r\nFrom: bench@remote.test\r\n\r\n" + b"x" * 76 + b"\r\n") * max(1, size // 80)
    n = 0
    for _ in range(per):
        typ, data = m.append("INBOX", None, None, body)
        if typ != "OK":
            raise RuntimeError(f"{user}: APPEND: {typ} {data}")
        n += 1
    m.logout()
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("-c", type=int, default=16)
    ap.add_argument("--per", type=int, default=200)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--label", default="imap_append")
    a = ap.parse_args()
    if not a.host.startswith("127."):
        sys.exit("refusing non-loopback target")
    jobs = [(a.host, a.port, f"user{i:04d}", f"pass{i:04d}", a.per, a.size) for i in range(1, a.users + 1)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.c) as ex:
        n = sum(ex.map(one, jobs, timeout=900))
    dt = time.perf_counter() - t0
    print(f"{a.label}: users={a.users} conc={a.c} msgs={n} size={a.size} secs={dt:.2f} msgs_per_sec={n / dt:.1f}")


if __name__ == "__main__":
    main()
