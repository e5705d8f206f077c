"""What the IMAP load scripts share (stdlib only): their arguments, one
session per user in processes at most -c at a time, a bounded wait, and
the figure they print. Loopback targets only."""
import argparse
import imaplib
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def login(host, port, user, pw):
    """An IMAP session logged in as `user`."""
    m = imaplib.IMAP4(host, port, timeout=120)
    m.login(user, pw)
    return m


def run(one, what, default_per, default_label, size=False):
    """Parses the arguments and runs `one((host, port, user, pw, per[, size]))`
    for users user0001.., printing `what` per second."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("-c", type=int, default=16)
    ap.add_argument("--per", type=int, default=default_per)
    if size:
        ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--label", default=default_label)
    a = ap.parse_args()
    if not a.host.startswith("127."):
        sys.exit("refusing non-loopback target")
    extra = (a.size,) if size else ()
    jobs = [(a.host, a.port, f"user{i:04d}", f"pass{i:04d}", a.per) + extra for i in range(1, a.users + 1)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.c) as ex:
        n = sum(ex.map(one, jobs, timeout=900))
    dt = time.perf_counter() - t0
    sized = f" size={a.size}" if size else ""
    print(f"{a.label}: users={a.users} conc={a.c} {what}={n}{sized} secs={dt:.2f} {what}_per_sec={n / dt:.1f}")
