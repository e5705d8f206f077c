#!/usr/bin/env python3
"""TLS cost on one SMTP server: handshakes per second (implicit TLS, full
handshakes, no resumption) and delivery messages/s over persistent sessions,
plaintext beside STARTTLS, in the same run.

  python3 bench/tls_bench.py --host 127.0.0.9 --smtp 2525 --smtps 2465 \
      --to bob@example.org [--clients 4] [--seconds 10]

Each phase runs --clients processes for --seconds and stops itself (bounded
load); the delivery phases run --rounds times each, in ABBA order, and the
figures are over all of them. Certificates are not verified (the figure is the server's cost).
Python's client side takes CPU from the same 2 cores as the server: compare
the ratios within one run, not absolute rates across machines.
"""
import argparse
import multiprocessing as mp
import smtplib
import socket
import os
import ssl
import time

BODY = b"Subject: tls bench\r\n\r\n" + b"x" * 2000 + b"\r\n"


def ctx():
    c = ssl.create_default_context()
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    return c


def handshakes(host, port, seconds, out):
    c, n, end = ctx(), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        with socket.create_connection((host, port), timeout=30) as s:
            with c.wrap_socket(s) as t:
                t.recv(512)  # the 220 greeting: the handshake is done
        n += 1
    out.put(n)


def deliveries(host, port, to, tls, seconds, out):
    # One session for as many messages as the server's per-session command
    # limit allows (then a new one: one handshake per ~300 messages).
    n, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            with smtplib.SMTP(host, port, timeout=60) as s:
                s.ehlo("bench.test")
                if tls:
                    s.starttls(context=ctx())
                    s.ehlo("bench.test")
                for _ in range(300):
                    if time.monotonic() >= end:
                        break
                    s.sendmail("bench@remote.test", [to], BODY)
                    n += 1
    finally:
        out.put(n)


def cpu_seconds(pid):
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase(target, args, clients, seconds):
    q = mp.Queue()
    ps = [mp.Process(target=target, args=args + (seconds, q)) for _ in range(clients)]
    t0 = time.monotonic()
    for p in ps:
        p.start()
    total = sum(q.get() for _ in ps)
    for p in ps:
        p.join()
    return total, time.monotonic() - t0


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--host", required=True)
    a.add_argument("--smtp", type=int, required=True)
    a.add_argument("--smtps", type=int, required=True)
    a.add_argument("--to", required=True)
    a.add_argument("--clients", type=int, default=4)
    a.add_argument("--seconds", type=float, default=10)
    a.add_argument("--rounds", type=int, default=2, help="delivery rounds, ABBA order (default 2)")
    a.add_argument("--pid", type=int, default=0, help="the server's PID: also report its CPU time per operation")
    o = a.parse_args()
    # Delivery phases run ABBA (plaintext, STARTTLS, STARTTLS, plaintext):
    # the store grows as the run goes on, which must not favour either.
    plan = [("handshakes", handshakes, (o.host, o.smtps))]
    plain = ("plaintext", deliveries, (o.host, o.smtp, o.to, False))
    tls = ("starttls", deliveries, (o.host, o.smtp, o.to, True))
    for r in range(o.rounds):
        plan += [plain, tls] if r % 2 == 0 else [tls, plain]
    sums = {}
    for name, target, args in plan:
        c0 = cpu_seconds(o.pid)
        n, secs = phase(target, args, o.clients, o.seconds)
        cpu = cpu_seconds(o.pid) - c0
        t = sums.setdefault(name, [0, 0.0, 0.0])
        t[0] += n
        t[1] += secs
        t[2] += cpu
    out = {k: (n / secs, cpu / max(n, 1) * 1e6) for k, (n, secs, cpu) in sums.items()}
    cpu = lambda k: f", server CPU {out[k][1]:.0f} us each" if o.pid else ""
    print(f"handshakes/s (implicit TLS, full): {out['handshakes'][0]:.0f}{cpu('handshakes')}")
    print(f"deliveries/s plaintext, persistent sessions: {out['plaintext'][0]:.0f}{cpu('plaintext')}")
    print(f"deliveries/s STARTTLS, persistent sessions: {out['starttls'][0]:.0f}{cpu('starttls')}")
    print(f"STARTTLS / plaintext, deliveries/s: {out['starttls'][0] / out['plaintext'][0]:.2f}")
    if o.pid:
        print(f"STARTTLS / plaintext, server CPU per delivery: {out['starttls'][1] / out['plaintext'][1]:.2f}")


if __name__ == "__main__":
    main()
