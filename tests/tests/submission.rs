//! Message submission (RFC 6409) on `--submission`: AUTH PLAIN and LOGIN
//! with Python's smtplib and swaks, the envelope sender and `From:` held to
//! the authenticated user, AUTH refused without TLS where plaintext
//! passwords are not allowed, and the replies of every refusal.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{PASSWORD, node, run};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const PY: &str = r#"
import smtplib, ssl, sys
host, port, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = smtplib.SMTP(host, port)
s.ehlo("client.test")
assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"], s.esmtp_features
code, msg = s.mail("alice@example.org")
assert code == 530, (code, msg)
s.login("alice@example.org", pw)
s.sendmail("alice@example.org", ["bob@example.org"], "From: Alice <alice@example.org>\r\nSubject: submitted\r\n\r\nhi bob\r\n")
try:
    s.sendmail("bob@example.org", ["carol@example.org"], "From: bob@example.org\r\n\r\nforged\r\n")
    raise SystemExit("a forged envelope sender was accepted")
except smtplib.SMTPSenderRefused as e:
    assert e.smtp_code == 553, e
try:
    s.sendmail("alice@example.org", ["carol@example.org"], "From: bob@example.org\r\n\r\nforged\r\n")
    raise SystemExit("a forged From: was accepted")
except smtplib.SMTPDataError as e:
    assert e.smtp_code == 553, e
# Mail for another domain goes to the outbound queue.
refused = s.sendmail("alice@example.org", ["someone@elsewhere.test"], "From: alice@example.org\r\n\r\nout\r\n")
assert refused == {}, refused
s.quit()
# AUTH LOGIN, and a wrong password.
s = smtplib.SMTP(host, port)
s.ehlo("client.test")
s.user, s.password = "carol@example.org", pw
code, msg = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
assert code == 235, (code, msg)
s.quit()
s = smtplib.SMTP(host, port)
try:
    s.login("alice@example.org", "wrong")
    raise SystemExit("a wrong password was accepted")
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535, e
s.quit()
print("submission ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_and_swaks_submit_as_themselves_only() {
    if !testkit::program("python3") {
        return;
    }
    // Queued mail goes nowhere off the machine: a relay nothing listens on.
    let (_d, n) = node("submission", &["--relay-host", "127.0.0.1:9"]).await;
    let sub = n.submission();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new("python3").args(["-c", PY, &sub.ip().to_string(), &sub.port().to_string(), PASSWORD]))
    })
    .await
    .unwrap();
    assert!(out.contains("submission ok"), "{out}");
    if testkit::program("swaks") {
        let out = tokio::task::spawn_blocking(move || {
            run(Command::new("swaks").args([
                "--server",
                &sub.to_string(),
                "--auth",
                "PLAIN",
                "--auth-user",
                "bob@example.org",
                "--auth-password",
                PASSWORD,
                "--from",
                "bob@example.org",
                "--header",
                "From: bob@example.org",
                "--to",
                "alice@example.org",
            ]))
        })
        .await
        .unwrap();
        assert!(
            out.contains("235 2.7.0") && out.contains("250 2.0.0 Ok: stored"),
            "{out}"
        );
    }
    // What arrived: bob has alice's message, marked as authenticated
    // submission; alice has swaks's; nobody got a forged one.
    let got = common::read_all(&n, "bob@example.org").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let m = String::from_utf8_lossy(got.values().next().unwrap()).into_owned();
    assert!(m.contains("with ESMTPA") && m.contains("hi bob"), "{m}");
    assert_eq!(common::read_all(&n, "carol@example.org").await.len(), 0);
    if testkit::program("swaks") {
        assert_eq!(common::read_all(&n, "alice@example.org").await.len(), 1);
    }
}

async fn line(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
    let mut l = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut l))
        .await
        .unwrap()
        .unwrap();
    l
}

/// Without TLS where plaintext passwords are refused: no AUTH in EHLO, and
/// AUTH gets 538; port 25 never offers AUTH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auth_without_tls_where_plaintext_is_refused_and_none_on_port_25() {
    let (_d, n) = node("submission-never", &["--plaintext-auth", "never"]).await;
    for (addr, offers) in [(n.submission(), false), (n.smtp(), false)] {
        let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut r = BufReader::new(r);
        assert!(line(&mut r).await.starts_with("220 "));
        w.write_all(b"EHLO c.test\r\n").await.unwrap();
        let mut ehlo = String::new();
        loop {
            let l = line(&mut r).await;
            ehlo.push_str(&l);
            if l.starts_with("250 ") {
                break;
            }
        }
        assert_eq!(ehlo.contains("AUTH"), offers, "{addr}: {ehlo}");
        w.write_all(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHB3\r\n")
            .await
            .unwrap();
        let reply = line(&mut r).await;
        if addr == n.submission() {
            assert!(reply.starts_with("538 5.7.11"), "{reply}");
        } else {
            assert!(reply.starts_with("502 "), "{reply}");
        }
        w.write_all(b"MAIL FROM:<alice@example.org>\r\n").await.unwrap();
        let reply = line(&mut r).await;
        if addr == n.submission() {
            assert!(reply.starts_with("530 5.7.0"), "{reply}");
        } else {
            assert!(reply.starts_with("250 "), "{reply}");
        }
    }
    // After STARTTLS, AUTH is offered and works (smtplib, the node's
    // self-signed certificate trusted).
    if testkit::program("python3") {
        let (sub, cert, pop) = (n.submission(), n.self_signed_cert(), n.pop3());
        let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3]); ctx.check_hostname = False
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2])); s.starttls(context=ctx); s.ehlo("c.test")
assert "PLAIN" in s.esmtp_features.get("auth", ""), s.esmtp_features
s.login("alice@example.org", sys.argv[4])
s.sendmail("alice@example.org", ["bob@example.org"], "From: alice@example.org\r\n\r\nover tls\r\n")
s.quit()
import poplib
p = poplib.POP3(sys.argv[1], int(sys.argv[5])); p.stls(context=ctx); p.user("bob@example.org"); p.pass_(sys.argv[4])
msg = b"\r\n".join(p.retr(len(p.list()[1]))[1])
assert b"with ESMTPSA" in msg and b"over tls" in msg, msg
p.quit(); print("tls submission ok")
"#;
        let out = tokio::task::spawn_blocking(move || {
            run(Command::new("python3").args([
                "-c",
                script,
                &sub.ip().to_string(),
                &sub.port().to_string(),
                cert.to_str().unwrap(),
                PASSWORD,
                &pop.port().to_string(),
            ]))
        })
        .await
        .unwrap();
        assert!(out.contains("tls submission ok"), "{out}");
    }
}

const PY_SEND_AS: &str = r#"
import smtplib, sys
host, port, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def session(user):
    s = smtplib.SMTP(host, port)
    s.login(user, pw)
    return s
s = session("alice@example.org")
# @example.org:@example.org: any address of her own domain, envelope and From:.
assert s.sendmail("sales@example.org", ["bob@example.org"], "From: Sales <sales@example.org>\r\nSubject: as sales\r\n\r\nx\r\n") == {}
try:
    s.sendmail("boss@other.test", ["bob@example.org"], "From: boss@other.test\r\n\r\nforged\r\n")
    raise SystemExit("another domain's envelope sender was accepted")
except smtplib.SMTPSenderRefused as e:
    assert e.smtp_code == 553, e
try:
    s.sendmail("alice@example.org", ["bob@example.org"], "From: boss@other.test\r\n\r\nforged\r\n")
    raise SystemExit("another domain's From: was accepted")
except smtplib.SMTPDataError as e:
    assert e.smtp_code == 553, e
s.quit()
# carol@example.org:* may send as anyone.
s = session("carol@example.org")
assert s.sendmail("carol@example.org", ["bob@example.org"], "From: news@list.test\r\nSubject: as news\r\n\r\nx\r\n") == {}
s.quit()
print("send-as ok")
"#;

/// `--allow-from` lets an operator allow more than a user's own address,
/// per domain or per user, in the envelope and in `From:`; anything else
/// is still refused; a rule that does not parse stops the start with the
/// reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_from_rules_let_users_send_as_more_than_themselves() {
    if !testkit::program("python3") {
        return;
    }
    let (_d, n) = node(
        "submission-send-as",
        &[
            "--relay-host",
            "127.0.0.1:9",
            "--allow-from",
            "@example.org:@example.org",
            "--allow-from",
            "carol@example.org:*",
        ],
    )
    .await;
    let sub = n.submission();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new("python3").args([
            "-c",
            PY_SEND_AS,
            &sub.ip().to_string(),
            &sub.port().to_string(),
            PASSWORD,
        ]))
    })
    .await
    .unwrap();
    assert!(out.contains("send-as ok"), "{out}");
    let got = common::read_all(&n, "bob@example.org").await;
    assert_eq!(got.len(), 2, "{got:?}");
    let bin = quill_harness::process::quill_binary().unwrap();
    let bad = Command::new(bin)
        .args(["node", "--data", "/nonexistent", "--allow-from", "example.org"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("WHO:PATTERN"), "{err}");

    // The same rules as a cluster setting, on a node started without them.
    let (_d2, n2) = node("submission-send-as-setting", &["--relay-host", "127.0.0.1:9"]).await;
    let rules = "@example.org:@example.org, carol@example.org:*";
    let (ok, said) = common::quill_admin(&n2, &["settings", "set", "allow-from", rules]);
    assert!(ok, "{said}");
    let (ok, said) = common::quill_admin(&n2, &["settings", "set", "allow-from", "example.org"]);
    assert!(!ok && said.contains("WHO:PATTERN"), "{said}");
    let sub = n2.submission();
    // In force within the settings task's poll: the script (which sends
    // as others and expects it taken) tried until it passes.
    common::wait_for(
        "the rules in force on a running node",
        Duration::from_secs(5),
        || async {
            let o = Command::new("python3")
                .args([
                    "-c",
                    PY_SEND_AS,
                    &sub.ip().to_string(),
                    &sub.port().to_string(),
                    PASSWORD,
                ])
                .output()
                .expect("python3 runs");
            String::from_utf8_lossy(&o.stdout).contains("send-as ok")
        },
    )
    .await;
}
