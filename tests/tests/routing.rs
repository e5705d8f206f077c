//! Recipients that are not users, on real processes: aliases to users and
//! to remote addresses (forwarded with SRS, the bounce coming back to the
//! original sender), domain aliases, catch-alls, sub-addressing, loops
//! refused at `alias add` and forged SRS addresses at RCPT; made through
//! one node and used through the others; `quill admin` and Python's
//! smtplib and LMTP client. Sieve scripts (folders, flags, discard,
//! redirect, one vacation reply across three nodes), taps, ManageSieve
//! with sieve-connect, sub-address folders with imaplib.

mod common;

use std::process::Command;
use std::time::Duration;

use common::sink::Sink;
use common::{PASSWORD, node, run};
use hyper::Method;
use quill_harness::process::{NodeProcess, TempDir};
use serde_json::json;

/// One transaction on port 25 from `from`; Err names the refusal.
async fn smtp_send(node: &NodeProcess, from: &str, rcpts: &[&str], subject: &str) -> Result<(), String> {
    let mut c = quill_harness::SmtpClient::connect(node.smtp(), false)
        .await
        .map_err(|e| e.to_string())?;
    let body = format!(
        "From: {from}\r\nTo: {}\r\nSubject: {subject}\r\n\r\nhello\r\n",
        rcpts.join(", ")
    );
    let replies = c
        .send_mail(from, rcpts, body.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let _ = c.quit().await;
    match replies.first() {
        Some(r) if r.code == 250 => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// The subjects in a user's mailbox, sorted.
async fn subjects(node: &NodeProcess, user: &str) -> Vec<String> {
    let mut s: Vec<String> = common::read_all(node, user)
        .await
        .values()
        .filter_map(|m| {
            String::from_utf8_lossy(m)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        })
        .collect();
    s.sort();
    s
}

/// Waits (with a deadline) until `user`'s subjects, read through `node`,
/// are `want`.
async fn wait_subjects(node: &NodeProcess, user: &str, want: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = subjects(node, user).await;
        if got == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{user}: {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A converged 3-node cluster whose outbound queue relays to a fresh sink,
/// with domain example.org and `users` in it.
async fn cluster_with_sink(label: &str, users: &[&str]) -> (TempDir, Sink, Vec<NodeProcess>) {
    let sink = Sink::start(0).await;
    let relay = sink.addr.to_string();
    let extra = ["--relay-host", &relay, "--retry-initial", "300ms", "--retry-max", "1s"];
    let (dir, nodes) = common::cluster_with_users(label, 3, &extra, users).await;
    (dir, sink, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_made_through_one_node_route_mail_on_every_node() {
    let _slot = common::cluster_slot().await;
    let (_dir, sink, nodes) = cluster_with_sink("routing", &["alice", "bob", "carol"]).await;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    n1.admin(
        Method::POST,
        "/v1/aliases",
        Some(json!({"address": "Sales@example.org", "targets": ["alice@example.org", "bob@example.org"]})),
    )
    .await
    .expect("alias made");
    n1.admin(
        Method::POST,
        "/v1/domain-aliases",
        Some(json!({"alias": "example.net", "target": "example.org"})),
    )
    .await
    .expect("domain alias made");
    for n in &nodes {
        common::wait_for("the routes on every node", Duration::from_secs(10), || async {
            n.admin(Method::GET, "/v1/routes", None)
                .await
                .is_ok_and(|r| r.to_string().contains("sales@example.org") && r.to_string().contains("example.net"))
        })
        .await;
    }
    // The alias, a sub-address and the domain alias, each through another
    // node than the one that made them.
    smtp_send(n3, "x@origin.test", &["sales@example.org"], "to-sales")
        .await
        .unwrap();
    smtp_send(n2, "x@origin.test", &["alice+news@example.org"], "to-tag")
        .await
        .unwrap();
    smtp_send(n3, "x@origin.test", &["carol@EXAMPLE.NET"], "to-net")
        .await
        .unwrap();
    wait_subjects(n1, "alice@example.org", &["to-sales", "to-tag"]).await;
    wait_subjects(n2, "bob@example.org", &["to-sales"]).await;
    wait_subjects(n3, "carol@example.org", &["to-net"]).await;
    // Unknown until a catch-all takes it; then through the domain alias too.
    let e = smtp_send(n2, "x@origin.test", &["nobody@example.org"], "lost")
        .await
        .unwrap_err();
    assert!(e.contains("550"), "{e}");
    n2.admin(
        Method::PUT,
        "/v1/catch-all/example.org",
        Some(json!({"address": "carol@example.org"})),
    )
    .await
    .expect("catch-all set");
    common::wait_for("the catch-all on node 3", Duration::from_secs(10), || async {
        smtp_send(n3, "x@origin.test", &["nobody@example.org"], "caught")
            .await
            .is_ok()
    })
    .await;
    smtp_send(n1, "x@origin.test", &["nobody@example.net"], "caught-net")
        .await
        .unwrap();
    wait_subjects(n1, "carol@example.org", &["caught", "caught-net", "to-net"]).await;
    // A loop is refused when it would be made, naming it.
    n1.admin(
        Method::POST,
        "/v1/aliases",
        Some(json!({"address": "a@example.org", "targets": ["alice@example.org"]})),
    )
    .await
    .unwrap();
    n1.admin(
        Method::POST,
        "/v1/aliases",
        Some(json!({"address": "b@example.org", "targets": ["a@example.org"]})),
    )
    .await
    .unwrap();
    let (status, reply) = n2
        .admin_raw(
            Method::POST,
            "/v1/aliases",
            Some(json!({"address": "a@example.org", "targets": ["b@example.org"]})),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{reply}");
    assert!(
        reply
            .to_string()
            .contains("alias loop: a@example.org -> b@example.org -> a@example.org"),
        "{reply}"
    );

    // Forwarding: a local copy, and a remote one from an SRS sender with
    // Delivered-To, whose bounce comes back to the original sender.
    n1.admin(
        Method::POST,
        "/v1/aliases",
        Some(json!({"address": "fwd@example.org", "targets": ["friend@remote.test", "bob@example.org"]})),
    )
    .await
    .unwrap();
    // (A probe by sending would not do: the catch-all takes the address
    // until the alias is there.)
    common::wait_for("the forward on node 2", Duration::from_secs(10), || async {
        n2.admin(Method::GET, "/v1/routes", None)
            .await
            .is_ok_and(|r| r.to_string().contains("fwd@example.org"))
    })
    .await;
    smtp_send(n2, "sender@origin.test", &["fwd@example.org"], "forwarded")
        .await
        .unwrap();
    wait_subjects(n3, "bob@example.org", &["forwarded", "to-sales"]).await;
    common::wait_for("the forwarded copy at the sink", Duration::from_secs(30), || async {
        !sink.got().is_empty()
    })
    .await;
    let got = sink.got();
    assert_eq!(got.len(), 1, "{got:?}");
    let fwd = &got[0];
    assert_eq!(fwd.rcpts, ["friend@remote.test"]);
    assert!(
        fwd.from.starts_with("srs0=") && fwd.from.ends_with("=origin.test=sender@example.org"),
        "{}",
        fwd.from
    );
    assert!(
        fwd.data.starts_with("Delivered-To: fwd@example.org\r\n"),
        "{}",
        fwd.data
    );
    assert!(fwd.data.contains("Subject: forwarded") && fwd.data.ends_with("hello\r\n"));
    // The remote side bounces to the SRS address, through any node.
    let mut c = quill_harness::SmtpClient::connect(n3.smtp(), false).await.unwrap();
    let replies = c
        .send_mail("", &[&fwd.from], b"Subject: bounce\r\n\r\nno such user\r\n")
        .await
        .expect("the bounce is taken");
    assert_eq!(replies[0].code, 250);
    // (The sink lower-cases addresses, as relays may: still ours.) A
    // forged one (a hash we did not make) is refused.
    let forged = "SRS0=abcd=aa=origin.test=victim@example.org";
    let e = c
        .send_mail("", &[forged], b"Subject: forged\r\n\r\nx\r\n")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("550"), "{e}");
    let _ = c.quit().await;
    common::wait_for("the bounce at the original sender", Duration::from_secs(30), || async {
        sink.got().len() == 2
    })
    .await;
    let bounce = &sink.got()[1];
    assert_eq!(bounce.rcpts, ["sender@origin.test"]);
    assert_eq!(bounce.from, "", "a bounce keeps its null sender");
    assert!(bounce.data.contains("Subject: bounce"));
}

/// `quill admin alias|domain` on one node, and an alias used by Python's
/// smtplib and its LMTP client (one reply per RCPT, an alias included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quill_admin_manages_routes_and_standard_clients_use_them() {
    let (_d, node) = node("routing-cli", &[]).await;
    let bin = node.opts.binary.clone();
    let addr = node.admin_addr().to_string();
    let token = node.opts.admin_token.clone();
    let admin = move |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.args(["admin", "--node", &addr, "--token", &token]).args(args);
        let o = c.output().expect("quill admin runs");
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    tokio::task::spawn_blocking(move || {
        assert!(
            admin(&[
                "alias",
                "add",
                "team@example.org",
                "alice@example.org",
                "bob@example.org"
            ])
            .0
        );
        let (ok, out) = admin(&["alias", "add", "typo@example.org", "alcie@example.org"]);
        assert!(!ok && out.contains("no user or alias alcie@example.org"), "{out}");
        let (ok, out) = admin(&["alias", "add", "self@example.org", "self@example.org"]);
        assert!(
            !ok && out.contains("alias loop: self@example.org -> self@example.org"),
            "{out}"
        );
        assert!(admin(&["domain", "add", "example.com"]).0);
        assert!(admin(&["domain", "alias", "example.com", "example.org"]).0);
        let (ok, out) = admin(&["domain", "add", "example.com"]);
        assert!(!ok && out.contains("already exists"), "{out}");
        let (ok, out) = admin(&["domain", "remove", "example.org"]);
        assert!(!ok, "a domain that aliases point into stays: {out}");
        assert!(admin(&["domain", "catch-all", "example.org", "carol@example.org"]).0);
        let (_, out) = admin(&["alias", "list"]);
        assert!(
            out.contains("team@example.org -> alice@example.org, bob@example.org"),
            "{out}"
        );
        assert!(out.contains("*@example.com -> *@example.org (domain alias)"), "{out}");
        assert!(out.contains("*@example.org -> carol@example.org (catch-all)"), "{out}");
        let (_, json) = admin(&["alias", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON");
        assert_eq!(v["catch_all"]["example.org"], "carol@example.org");
        assert!(!json.contains("srs"), "the SRS key is never shown: {json}");
        assert!(admin(&["domain", "catch-all", "example.org", "--remove"]).0);
        assert!(!admin(&["alias", "list"]).1.contains("catch-all"));
    })
    .await
    .unwrap();
    if testkit::program("python3") {
        let smtp = node.smtp();
        let lmtp = node.lmtp();
        let script = format!(
            r#"
import smtplib
s = smtplib.SMTP("{}", {})
refused = s.sendmail("x@origin.test", ["team@example.org", "alice+x@example.com"], "Subject: py\r\n\r\nhi\r\n")
assert refused == {{}}, refused
try:
    s.sendmail("x@origin.test", ["nobody@example.org"], "Subject: lost\r\n\r\nhi\r\n")
    raise SystemExit("an unknown address was taken")
except smtplib.SMTPRecipientsRefused as e:
    assert e.recipients["nobody@example.org"][0] == 550, e.recipients
s.quit()
l = smtplib.LMTP("{}", {})
code, _ = l.docmd("LHLO", "py.test")
assert code == 250, code
assert l.mail("x@origin.test")[0] == 250
assert l.rcpt("team@example.org")[0] == 250
assert l.rcpt("carol@example.org")[0] == 250
code, msg = l.data(b"Subject: lmtp\r\n\r\nhi\r\n")
assert code == 250, (code, msg)
# Exactly one more reply (carol's) is owed: then NOOP's own.
code, msg = l.getreply()
assert code == 250 and b"carol@example.org" in msg, (code, msg)
code, msg = l.noop()
assert code == 250 and b"Ok" in msg and b"stored" not in msg, (code, msg)
l.quit()
print("clients ok")
"#,
            smtp.ip(),
            smtp.port(),
            lmtp.ip(),
            lmtp.port()
        );
        let out = tokio::task::spawn_blocking(move || run(Command::new("python3").args(["-c", &script])))
            .await
            .unwrap();
        assert!(out.contains("clients ok"), "{out}");
        assert_eq!(subjects(&node, "alice@example.org").await, ["lmtp", "py"]);
        assert_eq!(subjects(&node, "bob@example.org").await, ["lmtp", "py"]);
        assert_eq!(subjects(&node, "carol@example.org").await, ["lmtp"]);
    }
}

const SCRIPT: &str = r#"require ["fileinto", "mailbox", "imap4flags", "copy", "vacation"];
# Reports into their folder, flagged; list mail dropped; the rest kept.
if header :contains "subject" "report" {
    fileinto :create :flags "\\Flagged" "Work/Reports";
    stop;
}
if address :is "from" "noise@lists.example" {
    discard;
    stop;
}
if header :contains "subject" "forward me" {
    redirect :copy "friend@remote.test";
}
vacation :days 1 :subject "Away" "I am away until Monday.";
"#;

/// A Sieve script set through one node runs on mail taken by the others:
/// folders made and flagged, discards, redirects (SRS, at the sink), and
/// one vacation reply though the sender writes three times through three
/// nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sieve_files_flags_redirects_and_answers_once_across_nodes() {
    let _slot = common::cluster_slot().await;
    let (_dir, sink, nodes) = cluster_with_sink("sieve", &["alice"]).await;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    // A script with an error is refused with its line and reason.
    let (status, reply) = n2
        .admin_raw(
            Method::PUT,
            "/v1/sieve/alice@example.org",
            Some(json!({"script": "keep;\nfileinto \"x\";\n"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply
            .to_string()
            .contains("line 2: fileinto needs require \\\"fileinto\\\""),
        "{reply}"
    );
    n2.admin(
        Method::PUT,
        "/v1/sieve/alice@example.org",
        Some(json!({"script": SCRIPT})),
    )
    .await
    .expect("script stored");
    // A tap keeps a copy of everything alice is sent, before her script
    // runs (the discarded message included).
    n1.add_user("archive@example.org", PASSWORD, None).await.unwrap();
    let quill = |args: &[&str]| run(n1.admin_command().args(args));
    quill(&["tap", "add", "alice@example.org", "archive@example.org"]);
    assert!(quill(&["tap", "list"]).contains("alice@example.org -> archive@example.org"));
    common::wait_for("the tap on node 3", Duration::from_secs(10), || async {
        n3.admin(Method::GET, "/v1/routes", None)
            .await
            .is_ok_and(|v| v["taps"]["alice@example.org"] == "archive@example.org")
    })
    .await;
    let from = "bob@remote.example";
    let send = |n: &NodeProcess, subject: &str, from: &str| {
        let (addr, subject, from) = (n.smtp(), subject.to_owned(), from.to_owned());
        async move {
            let mut c = quill_harness::SmtpClient::connect(addr, false).await.unwrap();
            let body = format!(
                "From: {from}\r\nTo: alice@example.org\r\nSubject: {subject}\r\nMessage-ID: <{subject}@remote.example>\r\n\r\nhello\r\n"
            );
            let r = c
                .send_mail(from.as_str(), &["alice@example.org"], body.as_bytes())
                .await;
            let _ = c.quit().await;
            r.map(|r| r[0].code)
        }
    };
    common::wait_for("the script on node 3", Duration::from_secs(10), || async {
        n3.admin(Method::GET, "/v1/sieve/alice@example.org", None)
            .await
            .is_ok_and(|v| v["active"] == "quill")
    })
    .await;
    for (k, n) in [n1, n2, n3].into_iter().enumerate() {
        assert_eq!(send(n, &format!("hello {k}"), from).await.unwrap(), 250);
    }
    assert_eq!(send(n3, "monthly report", from).await.unwrap(), 250);
    assert_eq!(send(n1, "noise", "noise@lists.example").await.unwrap(), 250);
    assert_eq!(
        send(n2, "please forward me", "carol@remote.example").await.unwrap(),
        250
    );
    // Another auto-responder's reply, and a bounce: kept, never answered
    // (no storm between two responders).
    let mut c = quill_harness::SmtpClient::connect(n3.smtp(), false).await.unwrap();
    let robot = b"From: robot@remote.example\r\nTo: alice@example.org\r\nSubject: robot\r\nAuto-Submitted: auto-replied\r\n\r\naway\r\n";
    assert_eq!(
        c.send_mail("robot@remote.example", &["alice@example.org"], robot)
            .await
            .unwrap()[0]
            .code,
        250
    );
    let bounce = b"From: MAILER-DAEMON@remote.example\r\nTo: alice@example.org\r\nSubject: bounce\r\n\r\nfailed\r\n";
    assert_eq!(
        c.send_mail("", &["alice@example.org"], bounce).await.unwrap()[0].code,
        250
    );
    let _ = c.quit().await;
    // Over IMAP: INBOX has the kept ones, Work/Reports the report, flagged;
    // the discarded one is nowhere.
    if testkit::program("python3") {
        let imap = n2.imap();
        let script = format!(
            r#"
import imaplib, time
m = imaplib.IMAP4("{}", {})
m.login("alice@example.org", "{PASSWORD}")
typ, boxes = m.list()
assert any(b'"Work/Reports"' in b or b' Work/Reports' in b for b in boxes), boxes
def subjects(folder):
    typ, n = m.select(folder, readonly=True)
    typ, d = m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    return sorted((x[1].decode().strip(), b"\\Flagged" in x[0]) for x in d if isinstance(x, tuple))
# Mail taken by the other nodes shows here once the user's manager maps
# its copies: read until it does, within a deadline.
want = {{
    "INBOX": [(s, False) for s in ["Subject: bounce", "Subject: hello 0", "Subject: hello 1", "Subject: hello 2", "Subject: please forward me", "Subject: robot"]],
    "Work/Reports": [("Subject: monthly report", True)],
}}
deadline = time.time() + 30
for folder, expected in want.items():
    got = subjects(folder)
    while got != expected and time.time() < deadline:
        time.sleep(0.2)
        got = subjects(folder)
    assert got == expected, (folder, got)
m.logout()
print("imap ok")
"#,
            imap.ip(),
            imap.port()
        );
        let out = tokio::task::spawn_blocking(move || run(Command::new("python3").args(["-c", &script])))
            .await
            .unwrap();
        assert!(out.contains("imap ok"), "{out}");
    }
    // At the sink: one vacation reply to bob (three messages, three nodes;
    // none for the report, which stopped first, nor to the list, the
    // robot or the bounce), one to carol, and carol's message redirected
    // with an SRS sender.
    common::wait_for("the replies and the redirect", Duration::from_secs(30), || async {
        sink.got().len() >= 3
    })
    .await;
    // Everything queued has gone out once every node's queue is empty:
    // what the sink holds then is all there is.
    for n in &nodes {
        common::wait_for("an empty outbound queue", Duration::from_secs(30), || async {
            n.metric("quill_queue_messages_held").await.is_ok_and(|v| v == 0.0)
        })
        .await;
    }
    let got = sink.got();
    let to_bob: Vec<_> = got.iter().filter(|g| g.rcpts == [from]).collect();
    assert_eq!(to_bob.len(), 1, "one vacation reply to bob: {got:?}");
    assert_eq!(to_bob[0].from, "", "sent from the null sender");
    assert!(to_bob[0].data.contains("Auto-Submitted: auto-replied\r\n"));
    assert!(to_bob[0].data.contains("Subject: Away\r\n"));
    assert!(to_bob[0].data.contains("I am away until Monday."));
    assert!(!got.iter().any(|g| g.rcpts.iter().any(|r| r.contains("lists.example"))));
    let fwd: Vec<_> = got.iter().filter(|g| g.rcpts == ["friend@remote.test"]).collect();
    assert_eq!(fwd.len(), 1, "{got:?}");
    assert!(fwd[0].from.starts_with("srs0=") && fwd[0].from.ends_with("=remote.example=carol@example.org"));
    assert!(fwd[0].data.starts_with("Delivered-To: alice@example.org\r\n"));
    assert_eq!(got.len(), 3, "{got:?}");
    // The tap's copies, as received.
    let archived = [
        "bounce",
        "hello 0",
        "hello 1",
        "hello 2",
        "monthly report",
        "noise",
        "please forward me",
        "robot",
    ];
    wait_subjects(n1, "archive@example.org", &archived).await;
    // quill admin sieve get prints it; remove turns filtering off.
    assert_eq!(quill(&["sieve", "get", "alice@example.org"]), SCRIPT);
    quill(&["sieve", "remove", "alice@example.org"]);
    assert!(
        n1.admin(Method::GET, "/v1/sieve/alice@example.org", None)
            .await
            .unwrap()["active"]
            .is_null()
    );
}

/// ManageSieve (RFC 5804) with an outside client, `sieve-connect`: STARTTLS,
/// AUTHENTICATE PLAIN, a script with an error refused with its line, one
/// uploaded and activated, listed, and then filtering mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managesieve_with_sieve_connect() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = TempDir::new("managesieve").expect("temp dir");
    let ip = quill_harness::fresh_loopback();
    let mut opts = quill_harness::process::NodeOptions::new(dir.path().join("node"), ip).expect("quill binary");
    let sieve_addr = opts.addr(4190);
    opts.extra_args = vec!["--managesieve".into(), sieve_addr.to_string()];
    let node = NodeProcess::start(opts).await.expect("node starts");
    node.add_domain("example.org").await.unwrap();
    node.add_user("alice@example.org", PASSWORD, None).await.unwrap();
    // The greeting is the capability list; commands need a login.
    let conn = tokio::net::TcpStream::connect(sieve_addr).await.unwrap();
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    let mut caps = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).await.unwrap();
        caps.push_str(&l);
        if l.starts_with("OK") {
            break;
        }
    }
    assert!(caps.contains("\"SIEVE\" \"fileinto copy imap4flags vacation"), "{caps}");
    assert!(caps.contains("\"STARTTLS\""), "{caps}");
    w.write_all(b"LISTSCRIPTS\r\n").await.unwrap();
    let mut l = String::new();
    r.read_line(&mut l).await.unwrap();
    assert!(l.starts_with("NO"), "{l}");
    // Hostile input: each gets a NO with the reason, the session goes on.
    let mut say = async |line: Vec<u8>| {
        w.write_all(&line).await.unwrap();
        let mut l = String::new();
        r.read_line(&mut l).await.unwrap();
        l
    };
    let long = [b"NOOP \"".to_vec(), vec![b'x'; 9000], b"\"\r\n".to_vec()].concat();
    assert!(say(long).await.starts_with("NO \"line too long\""));
    let huge = b"PUTSCRIPT \"x\" {99999999+}\r\n".to_vec();
    assert!(say(huge).await.starts_with("NO \"literal too large\""));
    let bad_plain = b"AUTHENTICATE \"PLAIN\" \"%%%\"\r\n".to_vec();
    assert!(say(bad_plain).await.starts_with("NO"));
    let nul = b"NOOP \"a\0b\"\r\n".to_vec();
    assert!(say(nul).await.starts_with("OK (TAG"));
    // Too many bad commands end the session (the last NO comes with the
    // BYE, and the server closes: a write after it may fail).
    let mut last = String::new();
    for _ in 0..25 {
        let _ = w.write_all(b"FROBNICATE\r\n").await;
        last.clear();
        if r.read_line(&mut last).await.unwrap_or(0) == 0 || last.starts_with("BYE") {
            break;
        }
    }
    assert!(last.starts_with("BYE \"too many errors\""), "{last}");
    drop((r, w));

    if !testkit::program("sieve-connect") {
        return;
    }
    let bad = dir.path().join("bad.sieve");
    std::fs::write(&bad, "keep;\nfileinto \"Junk\";\n").unwrap();
    let good = dir.path().join("good.sieve");
    std::fs::write(
        &good,
        "require \"fileinto\";\nif header :contains \"subject\" \"spam\" { discard; stop; }\n",
    )
    .unwrap();
    let connect = |args: Vec<String>| {
        let (ip, port) = (sieve_addr.ip().to_string(), sieve_addr.port().to_string());
        async move {
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut c = Command::new("sieve-connect")
                    .args(["--server", &ip, "--port", &port, "--user", "alice@example.org"])
                    .args(["--passwordfd", "0", "--notlsverify", "--authmech", "PLAIN"])
                    .args(&args)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("sieve-connect runs");
                c.stdin.take().unwrap().write_all(PASSWORD.as_bytes()).unwrap();
                let o = c.wait_with_output().unwrap();
                (
                    o.status.success(),
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    ),
                )
            })
            .await
            .unwrap()
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (ok, out) = connect(s(&[
        "--upload",
        "--localsieve",
        bad.to_str().unwrap(),
        "--remotesieve",
        "bad",
    ]))
    .await;
    assert!(!ok && out.contains("line 2: fileinto needs require"), "{out}");
    let (ok, out) = connect(s(&[
        "--upload",
        "--localsieve",
        good.to_str().unwrap(),
        "--remotesieve",
        "filter",
    ]))
    .await;
    assert!(ok, "{out}");
    let (ok, out) = connect(s(&["--activate", "--remotesieve", "filter"])).await;
    assert!(ok, "{out}");
    let (ok, out) = connect(s(&["--list"])).await;
    assert!(ok && out.contains("filter") && out.contains("ACTIVE"), "{out}");
    // It filters: the spam is dropped, the rest kept.
    smtp_send(&node, "x@origin.test", &["alice@example.org"], "buy spam now")
        .await
        .unwrap();
    smtp_send(&node, "x@origin.test", &["alice@example.org"], "lunch")
        .await
        .unwrap();
    assert_eq!(subjects(&node, "alice@example.org").await, ["lunch"]);
    let (ok, out) = connect(s(&["--download", "--remotesieve", "filter", "--localsieve", "-"])).await;
    assert!(ok && out.contains("discard; stop;"), "{out}");
}

/// `--subaddress-folders`: user+tag@ is filed into the user's folder `tag`
/// where it exists (made over IMAP), else into INBOX (imaplib).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_addresses_file_into_their_folder() {
    let (_d, node) = node("subaddress", &["--subaddress-folders"]).await;
    if !testkit::program("python3") {
        return;
    }
    let (imap, smtp) = (node.imap(), node.smtp());
    let script = format!(
        r#"
import imaplib, smtplib
m = imaplib.IMAP4("{ip}", {iport})
m.login("alice@example.org", "{PASSWORD}")
assert m.create("news")[0] == "OK"
s = smtplib.SMTP("{ip}", {sport})
for to, subject in [("alice+news@example.org", "n1"), ("alice+nosuch@example.org", "x1"), ("Alice+NEWS@example.org", "n2")]:
    assert s.sendmail("x@origin.test", [to], "Subject: %s\r\n\r\nhi\r\n" % subject) == {{}}
s.quit()
def subjects(folder):
    typ, n = m.select(folder, readonly=True)
    typ, d = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    return sorted(x[1].decode().strip() for x in d if isinstance(x, tuple))
assert subjects("news") == ["Subject: n1", "Subject: n2"], subjects("news")
assert subjects("INBOX") == ["Subject: x1"], subjects("INBOX")
m.logout()
print("folders ok")
"#,
        ip = imap.ip(),
        iport = imap.port(),
        sport = smtp.port(),
    );
    let out = tokio::task::spawn_blocking(move || run(Command::new("python3").args(["-c", &script])))
        .await
        .unwrap();
    assert!(out.contains("folders ok"), "{out}");
}
