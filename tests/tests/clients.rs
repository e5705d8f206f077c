//! Clients nobody here wrote: Python's smtplib and poplib (standard
//! library, unmodified), swaks, Postfix's smtp-source, and the `quill admin`
//! command line.
//!
//! swaks and smtp-source come from Debian packages that `.ci/run` installs.
//! Without them these tests fail when `QUILL_REQUIRE_TOOLS=1` (as in CI)
//! and are reported as skipped otherwise.

mod common;

use std::process::Command;

use common::{PASSWORD, node, run};
use quill_harness::Pop3Client;
use quill_harness::client::strip_received;

const PY: &str = r#"
import poplib, smtplib, sys
smtp_host, smtp_port, pop_host, pop_port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
body = b"Subject: from smtplib\r\n\r\nline one\r\n.dot line\r\n\r\nend\r\n"
with smtplib.SMTP(smtp_host, smtp_port, timeout=30) as s:
    s.ehlo("python.test")
    assert s.has_extn("size") and s.has_extn("pipelining") and s.has_extn("smtputf8"), s.esmtp_features
    refused = s.sendmail("py@remote.test", ["bob@example.org", "carol@example.org"], body)
    assert refused == {}, refused
    try:
        s.sendmail("py@remote.test", ["nobody@example.org"], body)
        raise SystemExit("unknown recipient accepted")
    except smtplib.SMTPRecipientsRefused as e:
        code = e.recipients["nobody@example.org"][0]
        assert code == 550, e.recipients
for user in ("bob@example.org", "carol@example.org"):
    p = poplib.POP3(pop_host, pop_port, timeout=30)
    caps = p.capa()
    assert "UIDL" in caps and "TOP" in caps, caps
    p.user(user); p.pass_(password)
    n, size = p.stat()
    assert n == 1, (user, n)
    resp, lines, octets = p.retr(1)
    msg = b"\r\n".join(lines) + b"\r\n"
    assert msg.endswith(body), msg
    assert octets == size, (octets, size)
    assert len(p.uidl()[1]) == 1
    p.dele(1)
    p.quit()
    p = poplib.POP3(pop_host, pop_port, timeout=30)
    p.user(user); p.pass_(password)
    assert p.stat() == (0, 0), p.stat()
    p.quit()
print("python clients ok")
"#;

/// Runs a Python script with the node's SMTP host and port, POP3 host and
/// port and the users' password as its arguments; returns its output.
async fn python(script: &'static str, node: &quill_harness::NodeProcess) -> String {
    let (smtp, pop) = (node.smtp(), node.pop3());
    tokio::task::spawn_blocking(move || {
        run(Command::new("python3").args([
            "-c",
            script,
            &smtp.ip().to_string(),
            &smtp.port().to_string(),
            &pop.ip().to_string(),
            &pop.port().to_string(),
            PASSWORD,
        ]))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_and_poplib() {
    if !testkit::program("python3") {
        return;
    }
    let (_d, node) = node("python", &[]).await;
    let out = python(PY, &node).await;
    assert!(out.contains("python clients ok"), "{out}");
}

/// Python's smtplib and poplib with a UTF-8 address: SMTPUTF8 on MAIL FROM
/// (RFC 6531) and POP3's UTF8 command (RFC 6856).
const PY_UTF8: &str = r#"
import smtplib, poplib, sys
host, port, phost, pport, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
user = "jürgen@example.org"
msg = "From: müller@remote.test\r\nTo: " + user + "\r\nSubject: grüße\r\n\r\nhallo\r\n"
with smtplib.SMTP(host, port) as s:
    s.ehlo()
    assert s.has_extn("smtputf8")
    refused = s.sendmail("müller@remote.test", [user], msg.encode("utf-8"), mail_options=["SMTPUTF8"])
    assert refused == {}, refused
p = poplib.POP3(phost, pport)
p.utf8()
p.user(user)
p.pass_(pw)
n, _ = p.stat()
assert n == 1, n
lines = p.retr(1)[1]
assert "Subject: grüße".encode("utf-8") in lines, lines
p.quit()
print("python utf8 ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtputf8_and_pop3_utf8() {
    if !testkit::program("python3") {
        return;
    }
    let (_d, node) = node("python-utf8", &[]).await;
    node.add_user("jürgen@example.org", PASSWORD, None).await.unwrap();
    let out = python(PY_UTF8, &node).await;
    assert!(out.contains("python utf8 ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_over_smtp_and_lmtp() {
    if !testkit::program("swaks") {
        return;
    }
    let (_d, node) = node("swaks", &[]).await;
    let (smtp, lmtp) = (node.smtp().to_string(), node.lmtp().to_string());
    let (a, b) = tokio::task::spawn_blocking(move || {
        let a = run(Command::new("swaks").args([
            "--server",
            &smtp,
            "--from",
            "s@remote.test",
            "--to",
            "alice@example.org",
            "--body",
            "via swaks smtp",
        ]));
        let b = run(Command::new("swaks").args([
            "--protocol",
            "LMTP",
            "--server",
            &lmtp,
            "--from",
            "s@remote.test",
            "--to",
            "alice@example.org,bob@example.org",
            "--body",
            "via swaks lmtp",
        ]));
        (a, b)
    })
    .await
    .unwrap();
    assert!(a.contains("<-  250 2.0.0 Ok: stored as"), "{a}");
    assert_eq!(
        b.matches("<-  250 2.0.0 <").count(),
        2,
        "one LMTP reply per recipient:\n{b}"
    );
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    p.login("alice@example.org", PASSWORD).await.unwrap();
    assert_eq!(p.stat().await.unwrap().0, 2);
    let m = p.retr(1).await.unwrap();
    assert!(strip_received(&m).is_some() && String::from_utf8_lossy(&m).contains("via swaks smtp"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_smtp_source() {
    if !testkit::program("smtp-source") {
        return;
    }
    let (_d, node) = node("smtp-source", &[]).await;
    let (smtp, lmtp) = (node.smtp().to_string(), node.lmtp().to_string());
    tokio::task::spawn_blocking(move || {
        run(Command::new("smtp-source").args([
            "-s",
            "8",
            "-m",
            "200",
            "-l",
            "4700",
            "-c",
            "-f",
            "a@remote.test",
            "-t",
            "bob@example.org",
            &smtp,
        ]));
        run(Command::new("smtp-source").args([
            "-L",
            "-d",
            "-s",
            "4",
            "-m",
            "100",
            "-l",
            "2000",
            "-f",
            "a@remote.test",
            "-t",
            "carol@example.org",
            &lmtp,
        ]));
    })
    .await
    .unwrap();
    for (user, n) in [("bob@example.org", 200), ("carol@example.org", 100)] {
        let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
        p.login(user, PASSWORD).await.unwrap();
        assert_eq!(p.stat().await.unwrap().0, n, "{user}");
        p.quit().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quill_admin_command_line() {
    let (_d, node) = node("admin-cli", &[]).await;
    let bin = node.opts.binary.clone();
    let addr = node.admin_addr().to_string();
    let token = node.opts.admin_token.clone();
    let out = tokio::task::spawn_blocking(move || {
        let admin = |args: &[&str]| {
            let mut c = Command::new(&bin);
            c.args(["admin", "--node", &addr, "--token", &token]).args(args);
            c.output().expect("quill admin runs")
        };
        let text = |o: std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(admin(&["domain", "add", "example.net"]).status.success());
        let dup = admin(&["domain", "add", "example.net"]);
        assert!(!dup.status.success(), "adding a domain twice fails");
        assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
        assert!(text(admin(&["domain", "list"])).contains("example.net"));
        assert!(
            admin(&["user", "add", "erin@example.net", "--password", "pw1", "--quota", "10M"])
                .status
                .success()
        );
        assert!(text(admin(&["user", "list"])).contains("erin@example.net quota 10485760 bytes"));
        assert!(
            admin(&["user", "passwd", "erin@example.net", "--password", "pw2"])
                .status
                .success()
        );
        let busy = admin(&["domain", "remove", "example.net"]);
        assert!(!busy.status.success(), "a domain with users can't be removed");
        assert!(
            !admin(&["user", "add", "x@nowhere.test", "--password", "p"])
                .status
                .success()
        );
        let json: serde_json::Value = serde_json::from_str(&text(admin(&["cluster", "status", "--json"]))).unwrap();
        assert!(admin(&["log-level", "debug"]).status.success());
        assert!(!admin(&["log-level", "=bad=[filter"]).status.success());
        let mut c = Command::new(&bin);
        let wrong = c
            .args(["admin", "--node", &addr, "--token", "wrong", "domain", "list"])
            .output()
            .unwrap();
        assert!(!wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("401"));
        json
    })
    .await
    .unwrap();
    // DESIGN.md's status contract.
    for k in ["self", "epoch", "leader", "under_replicated", "nodes"] {
        assert!(out.get(k).is_some(), "status lacks {k}: {out}");
    }
    let n = &out["nodes"][0];
    for k in ["id", "name", "state", "voter", "messages", "bytes", "addrs"] {
        assert!(n.get(k).is_some(), "node lacks {k}: {n}");
    }
    assert_eq!(n["state"], "up");
    assert_eq!(n["addrs"]["smtp"], node.smtp().to_string());
    // The new password works.
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    p.login("erin@example.net", "pw2").await.unwrap();
}
