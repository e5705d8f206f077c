#!/usr/bin/env python3
"""Bounded IMAP STORE load (stdlib only): --users processes at most -c at
a time, each logging in as userNNNN/passNNNN, selecting INBOX and storing
--per flag changes, one message per command (UID STORE n +FLAGS (\\Seen)
then -FLAGS, round the folder's messages: what a client does as mail is
read); prints STORE operations/s. The users need messages (fill first).
With CONDSTORE=1 in the environment each session first enables CONDSTORE
(RFC 7162): every STORE then answers with the message's new MODSEQ.

  python3 bench/imap_store.py --host 127.0.0.1 --port 12643 --users 16 --per 400
  CONDSTORE=1 python3 bench/imap_store.py --port 12643
"""
import os

from imap_bench import login, run


def one(a):
    host, port, user, pw, per = a
    m = login(host, port, user, pw)
    if os.environ.get("CONDSTORE") == "1":
        typ, data = m.enable("CONDSTORE")
        if typ != "OK":
            raise RuntimeError(f"{user}: ENABLE CONDSTORE: {typ} {data}")
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


if __name__ == "__main__":
    run(one, "stores", 400, "imap_store")
