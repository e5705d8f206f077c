#!/usr/bin/env python3
"""Bounded IMAP STORE load (stdlib only): --users processes at most -c at
a time, each logging in as userNNNN/passNNNN, selecting INBOX and storing
--per flag changes, one message per command (UID STORE n +FLAGS (\\Seen)
then -FLAGS, round the folder's messages: what a client does as mail is
read); prints STORE operations/s. The users need messages (fill first).

  python3 bench/imap_store.py --host 127.0.0.1 --port 12643 --users 16 --per 400
"""
import argparse
import imaplib
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def one(a):
    host, port, user, pw, per = a
    m = imaplib.IMAP4(host, port, timeout=120)
    m.login(user, pw)
    typ, data = m.select("INBOX")
    if typ != "OK":
        raise RuntimeError(f"{user}: SELECT: {typ} {data}")
    typ, data = m.uid("SEARCH", None, "ALL")
    uids = data[0].split()
    if not uids:
        raise RuntimeError(f"{user}: no messages to flag (fill first)")
    n = 0
    for i in range(per):
        uid = uids[i % len(uids)].decode()
        op = "+FLAGS.SILENT" if (i // len(uids)) % 2 == 0 else "-FLAGS.SILENT"
        typ, data = m.uid("STORE", uid, op, "(\\Seen)")
        if typ != "OK":
            raise RuntimeError(f"{user}: STORE: {typ} {data}")
        n += 1
    m.logout()
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("-c", type=int, default=16)
    ap.add_argument("--per", type=int, default=400)
    ap.add_argument("--label", default="imap_store")
    a = ap.parse_args()
    if not a.host.startswith("127."):
        sys.exit("refusing non-loopback target")
    jobs = [(a.host, a.port, f"user{i:04d}", f"pass{i:04d}", a.per) for i in range(1, a.users + 1)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.c) as ex:
        n = sum(ex.map(one, jobs, timeout=900))
    dt = time.perf_counter() - t0
    print(f"{a.label}: users={a.users} conc={a.c} stores={n} secs={dt:.2f} stores_per_sec={n / dt:.1f}")


if __name__ == "__main__":
    main()
