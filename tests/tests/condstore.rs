//! CONDSTORE and QRESYNC (RFC 7162) with Python's imaplib, unmodified,
//! against two nodes of a three-node cluster: a flag stored through one
//! node is found by FETCH CHANGEDSINCE through the other, with a
//! mod-sequence above every HIGHESTMODSEQ either node showed before it; a
//! conditional STORE with a stale mod-sequence fails as MODIFIED; SEARCH
//! MODSEQ and STATUS HIGHESTMODSEQ; an expunge through one node is a
//! VANISHED to a QRESYNC session on the other, and a SELECT (QRESYNC ...)
//! through it gets VANISHED (EARLIER) and only what changed; and the error
//! paths on one node.

mod common;

use common::PASSWORD;

const PY_CONDSTORE: &str = r#"
import imaplib, json, re, sys, time
a_host, a_port, b_host, b_port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
def connect(h, p):
    m = imaplib.IMAP4(h, p)
    m.login(user, pw)
    return m
def last(m, name):
    typ, v = m.response(name)
    assert v and v[-1] is not None, (name, v)
    return v[-1]
def fetched(data):
    out = {}
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):
            item = item[0]
        s = item.decode()
        uid = int(re.search(r"UID (\d+)", s).group(1))
        ms = re.search(r"MODSEQ \((\d+)\)", s)
        fl = re.search(r"FLAGS \(([^)]*)\)", s)
        # \Recent is the session's own, not a stored flag.
        flags = sorted(f for f in fl.group(1).split() if f != "\\Recent") if fl else None
        out[uid] = (flags, int(ms.group(1)) if ms else None)
    return out
def status_highest(m):
    typ, data = m.status("INBOX", "(HIGHESTMODSEQ)")
    assert typ == "OK", data
    return int(re.search(rb"HIGHESTMODSEQ (\d+)", data[0]).group(1))
a = connect(a_host, a_port)
b = connect(b_host, b_port)
assert "CONDSTORE" in a.capabilities and "QRESYNC" in a.capabilities, a.capabilities
typ, data = a.enable("CONDSTORE")
assert typ == "OK", data
typ, data = a.select("INBOX")
assert typ == "OK", data
h0 = int(last(a, "HIGHESTMODSEQ"))
validity = int(last(a, "UIDVALIDITY"))
typ, data = a.uid("FETCH", "1:*", "(UID FLAGS MODSEQ)")
mods = fetched(data)
assert sorted(mods) == [1, 2, 3], mods
assert all(1 <= m <= h0 for _, m in mods.values()), (mods, h0)
# B: CONDSTORE on by its first conditional STORE; the flag change gets a
# mod-sequence above what A showed.
typ, data = b.select("INBOX")
assert typ == "OK", data
typ, data = b.uid("STORE", "2", "(UNCHANGEDSINCE %d)" % h0, "+FLAGS", "(\\Flagged)")
assert typ == "OK", data
stored = fetched(data)
assert 2 in stored, (data, h0, b.untagged_responses)
m2 = stored[2][1]
assert "\\Flagged" in stored[2][0] and m2 > h0, (stored, h0)
# A: what changed since h0 is that message alone, as B left it.
typ, data = a.uid("FETCH", "1:*", "(UID FLAGS) (CHANGEDSINCE %d)" % h0)
changed = fetched(data)
assert changed == {2: (stored[2][0], m2)}, (changed, stored)
# A conditional STORE with the stale value fails, changes nothing.
typ, data = a.uid("STORE", "2", "(UNCHANGEDSINCE %d)" % h0, "-FLAGS", "(\\Flagged)")
assert typ == "OK", data
assert last(a, "MODIFIED") == b"2", a.untagged_responses
typ, data = a.uid("FETCH", "2", "(UID FLAGS MODSEQ)")
assert fetched(data)[2] == (stored[2][0], m2), data
# SEARCH MODSEQ names the highest it found; STATUS tells HIGHESTMODSEQ.
typ, data = a.uid("SEARCH", "MODSEQ", str(h0 + 1))
assert typ == "OK" and data[0] == b"2 (MODSEQ %d)" % m2, data
assert status_highest(b) >= m2
# Never below what the other node showed: read HIGHESTMODSEQ through one
# node, store through the other, ten times each way.
for i in range(10):
    reader, writer = (a, b) if i % 2 == 0 else (b, a)
    seen = status_highest(reader)
    op = "+FLAGS" if i % 4 < 2 else "-FLAGS"
    typ, data = writer.uid("STORE", "1", op, "(\\Seen)")
    assert typ == "OK", data
    got = fetched(data)[1][1]
    assert got is not None and got > seen, (i, got, seen)
# A session without CONDSTORE does not wait for the stamp; it lands soon
# after, above what was shown before the change.
plain = connect(b_host, b_port)
typ, data = plain.select("INBOX")
assert typ == "OK", data
before = status_highest(a)
typ, data = plain.uid("STORE", "3", "+FLAGS", "(\\Draft)")
assert typ == "OK" and b"MODSEQ" not in data[0], data
t0 = time.time()
while True:
    typ, data = a.uid("FETCH", "1:*", "(UID FLAGS) (CHANGEDSINCE %d)" % before)
    got = fetched(data)
    # (The flags may be told first, unsolicited, with the mod-sequence
    # they had: the stamp follows.)
    if 3 in got and got[3][1] > before:
        break
    assert time.time() - t0 < 10, "the stamp of a change without CONDSTORE never landed"
    time.sleep(0.05)
assert "\\Draft" in got[3][0] and got[3][1] > before, got
plain.logout()
known = status_highest(a)
# QRESYNC: E (on A) has the folder selected while D (on B) expunges UID 3;
# a change through A to UID 1 after `known`.
e = connect(a_host, a_port)
typ, data = e.enable("QRESYNC")
assert typ == "OK", data
typ, data = e.select("INBOX")
assert typ == "OK", data
d = connect(b_host, b_port)
d.enable("QRESYNC")
typ, data = d.select("INBOX")
assert typ == "OK", data
typ, data = d.uid("STORE", "3", "+FLAGS.SILENT", "(\\Deleted)")
assert typ == "OK", data
typ, data = d.expunge()
assert typ == "OK", data
assert last(d, "VANISHED") == b"3", d.untagged_responses
typ, data = a.uid("STORE", "1", "+FLAGS", "(\\Answered)")
assert typ == "OK", data
m1 = fetched(data)[1][1]
t0 = time.time()
while time.time() - t0 < 10:
    e.noop()
    if e.untagged_responses.get("VANISHED"):
        break
    time.sleep(0.1)
vanished_s = time.time() - t0
assert last(e, "VANISHED") == b"3", e.untagged_responses
assert "EXPUNGE" not in e.untagged_responses, e.untagged_responses
# A new QRESYNC session through B: VANISHED (EARLIER) 3, then UID 1 alone.
c = connect(b_host, b_port)
c.enable("QRESYNC")
typ, data = c._simple_command("SELECT", "INBOX (QRESYNC (%d %d 1:3))" % (validity, known))
assert typ == "OK", data
assert c.untagged_responses.get("VANISHED") == [b"(EARLIER) 3"], c.untagged_responses
again = fetched(c.untagged_responses.get("FETCH", []))
assert list(again) == [1] and again[1][1] == m1 and "\\Answered" in again[1][0], again
# Another UIDVALIDITY than the folder's: nothing but the folder.
c.untagged_responses.clear()
typ, data = c._simple_command("SELECT", "INBOX (QRESYNC (%d %d))" % (validity + 1, known))
assert typ == "OK", data
assert "VANISHED" not in c.untagged_responses, c.untagged_responses
# QRESYNC without ENABLE is refused.
try:
    b._simple_command("SELECT", "INBOX (QRESYNC (%d %d))" % (validity, known))
    raise SystemExit("SELECT (QRESYNC ...) accepted without ENABLE")
except imaplib.IMAP4.error as err:
    assert "BAD" in str(err) and "ENABLE QRESYNC" in str(err), err
for m in (a, b, c, d, e):
    m.logout()
print(json.dumps({"ok": True, "h0": h0, "m2": m2, "vanished_s": vanished_s}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_condstore_and_qresync_across_two_nodes() {
    let _slot = common::cluster_slot().await;
    if !testkit::program("python3") {
        return;
    }
    let (_dir, nodes) = common::cluster_with_users("condstore", 3, &[], &["carol"]).await;
    common::wait_user_on_every_node(&nodes, "carol@").await;
    for s in ["first", "second", "third"] {
        common::smtp_to(&nodes[0], "carol@example.org", s).await;
    }
    let (a, b) = (nodes[0].imap(), nodes[1].imap());
    let args = vec![
        a.ip().to_string(),
        a.port().to_string(),
        b.ip().to_string(),
        b.port().to_string(),
        "carol@example.org".to_owned(),
        PASSWORD.to_owned(),
    ];
    let got = tokio::task::spawn_blocking(move || common::python_json(PY_CONDSTORE, args))
        .await
        .unwrap();
    eprintln!("condstore across nodes: {got}");
    assert_eq!(got["ok"], true, "{got}");
}

const PY_EDGES: &str = r#"
import imaplib, json, sys
host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
m = imaplib.IMAP4(host, port)
m.login(user, pw)
for i in range(3):
    typ, data = m.append("INBOX", None, None, b"Subject: %d\r\n\r\nx\r\n" % i)
    assert typ == "OK", data
typ, data = m.enable("QRESYNC")
assert typ == "OK" and m.response("ENABLED")[1] == [b"QRESYNC"], data
typ, data = m.select("INBOX")
assert typ == "OK", data
h = int(m.response("HIGHESTMODSEQ")[1][-1])
def refused(*args):
    try:
        m._simple_command(*args)
        return False
    except imaplib.IMAP4.error as err:
        return "BAD" in str(err)
# VANISHED needs UID FETCH and CHANGEDSINCE; 0 is not a mod-sequence.
assert refused("FETCH", "1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
assert refused("UID", "FETCH", "1:* (FLAGS) (VANISHED)")
assert refused("UID", "FETCH", "1:* (FLAGS) (CHANGEDSINCE 0)")
# UNCHANGEDSINCE 0 fails for every message, and changes none.
typ, data = m.uid("STORE", "1:3", "(UNCHANGEDSINCE 0)", "+FLAGS", "(\\Seen)")
assert typ == "OK" and m.response("MODIFIED")[1] == [b"1:3"], (data, m.untagged_responses)
typ, data = m.uid("SEARCH", "SEEN")
assert data == [b""], data
# A search by MODSEQ above everything: no hits, no MODSEQ.
typ, data = m.uid("SEARCH", "MODSEQ", str(h + 1000))
assert typ == "OK" and data == [b""], data
# A new folder's HIGHESTMODSEQ.
typ, data = m.create("Other")
assert typ == "OK", data
typ, data = m.status("Other", "(HIGHESTMODSEQ MESSAGES)")
assert typ == "OK" and b"HIGHESTMODSEQ 1" in data[0], data
# UID EXPUNGE under QRESYNC: VANISHED, and a UID FETCH ... (CHANGEDSINCE
# VANISHED) names the gone UID as EARLIER.
typ, data = m.uid("STORE", "2", "+FLAGS.SILENT", "(\\Deleted)")
assert typ == "OK", data
m.untagged_responses.clear()
typ, data = m._simple_command("UID", "EXPUNGE", "2")
assert typ == "OK" and m.untagged_responses.get("VANISHED") == [b"2"], m.untagged_responses
assert "EXPUNGE" not in m.untagged_responses, m.untagged_responses
m.untagged_responses.clear()
typ, data = m.uid("FETCH", "1:*", "(FLAGS) (CHANGEDSINCE %d VANISHED)" % h)
assert typ == "OK" and m.untagged_responses.get("VANISHED") == [b"(EARLIER) 2"], m.untagged_responses
# SELECT of another folder says the first is closed.
m.untagged_responses.clear()
typ, data = m._simple_command("SELECT", "Other")
assert typ == "OK" and "CLOSED" in m.untagged_responses, m.untagged_responses
m.logout()
print(json.dumps({"ok": True}))
"#;

/// The error paths and corner cases on one node: modifiers refused with
/// BAD, UNCHANGEDSINCE 0, SEARCH MODSEQ with no hits, a new folder's
/// HIGHESTMODSEQ, UID EXPUNGE and FETCH (CHANGEDSINCE VANISHED) under
/// QRESYNC, CLOSED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condstore_and_qresync_edges_on_one_node() {
    if !testkit::program("python3") {
        return;
    }
    let (_dir, n) = common::node("condstore-edges", &[]).await;
    let imap = n.imap();
    let args = vec![
        imap.ip().to_string(),
        imap.port().to_string(),
        "alice@example.org".to_owned(),
        PASSWORD.to_owned(),
    ];
    let got = tokio::task::spawn_blocking(move || common::python_json(PY_EDGES, args))
        .await
        .unwrap();
    assert_eq!(got["ok"], true, "{got}");
}
