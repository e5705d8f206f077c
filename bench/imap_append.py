#!/usr/bin/env python3
"""Bounded IMAP APPEND load (stdlib only): --users processes at most -c at
a time, each logging in as userNNNN/passNNNN and appending --per messages
of --size bytes to INBOX over one session; prints messages/s.

  python3 bench/imap_append.py --host 127.0.0.1 --port 12643 --users 16 --per 200
"""
from imap_bench import login, run


def one(a):
    host, port, user, pw, per, size = a
    m = login(host, port, user, pw)
    body = (b"Subject: append bench\r\nFrom: bench@remote.test\r\n\r\n" + b"x" * 76 + b"\r\n") * max(1, size // 80)
    n = 0
    for _ in range(per):
        typ, data = m.append("INBOX", None, None, body)
        if typ != "OK":
            raise RuntimeError(f"{user}: APPEND: {typ} {data}")
        n += 1
    m.logout()
    return n


if __name__ == "__main__":
    run(one, "msgs", 200, "imap_append", size=True)
