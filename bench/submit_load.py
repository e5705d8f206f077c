#!/usr/bin/env python3
"""Bounded SMTP submission load (stdlib only): -c processes, each one
session (AUTH PLAIN as userNNNN@example.com / passNNNN when --auth) sending
-n/-c messages of --size bytes from that address to rcptNNNN@remote.test;
prints messages/s accepted. With --sink-count FILE it then waits for an
smtp-sink -c counter file to reach the total and prints the end-to-end
rate (first submission to last message at the remote server).

  python3 bench/submit_load.py --host 127.0.1.1 --port 12587 --auth -n 10000 -c 16
"""
import argparse
import re
import smtplib
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def one(a):
    host, port, auth, k, n, size = a
    user = f"user{k % 100 + 1:04d}@example.com"
    s = smtplib.SMTP(host, port, timeout=120)
    s.ehlo("bench.test")
    if auth:
        s.login(user, f"pass{k % 100 + 1:04d}")
    body = (f"From: {user}\r\nTo: rcpt{k:04d}@remote.test\r\nSubject: outbound bench\r\n\r\n").encode() + (b"x" * 76 + b"\r\n") * max(1, size // 78)
    ok = 0
    for i in range(n):
        refused = s.sendmail(user, [f"rcpt{k:04d}-{i}@remote.test"], body)
        if not refused:
            ok += 1
    s.quit()
    return ok


def sink_count(path):
    try:
        text = open(path, "rb").read().decode(errors="replace")
    except OSError:
        return 0
    nums = re.findall(r"\d+", text)
    return int(nums[-1]) if nums else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--auth", action="store_true")
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("-c", type=int, default=16)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--sink-count", help="smtp-sink -c output file to wait on")
    ap.add_argument("--sink-base", type=int, default=0, help="the counter's value before this run")
    ap.add_argument("--wait", type=float, default=600, help="seconds to wait for the sink at most")
    ap.add_argument("--label", default="submit")
    a = ap.parse_args()
    if not a.host.startswith("127."):
        sys.exit("refusing non-loopback target")
    per = a.n // a.c
    jobs = [(a.host, a.port, a.auth, k, per, a.size) for k in range(a.c)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.c) as ex:
        n = sum(ex.map(one, jobs, timeout=900))
    dt = time.perf_counter() - t0
    line = f"{a.label}: msgs={n} conc={a.c} size={a.size} accept_secs={dt:.2f} accepted_per_sec={n / dt:.1f}"
    if a.sink_count:
        deadline = time.perf_counter() + a.wait
        while sink_count(a.sink_count) - a.sink_base < n and time.perf_counter() < deadline:
            time.sleep(0.05)
        got = sink_count(a.sink_count) - a.sink_base
        end = time.perf_counter() - t0
        line += f" at_sink={got} end_to_end_secs={end:.2f} delivered_per_sec={got / end:.1f}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
