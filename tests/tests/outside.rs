//! What outside testing found (issue "What outside testing found"): SMTP
//! smuggling, a removed user's mail handed to the next owner, postmaster,
//! user enumeration, long lines, SMTPUTF8, and the operator's rough edges.
//! Each test failed on the code before the fix.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{PASSWORD, node};
use hyper::Method;
use quill_harness::process::{NodeProcess, quill_binary};
use quill_harness::{Pop3Client, SmtpClient};

async fn hello(addr: std::net::SocketAddr, verb: &str) -> SmtpClient {
    let (mut s, g) = SmtpClient::connect_raw(addr).await.unwrap();
    assert_eq!(g.code, 220);
    assert_eq!(s.command(&format!("{verb} c.test")).await.unwrap().code, 250);
    s
}

async fn stat(node: &NodeProcess, user: &str, password: &str) -> usize {
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    p.login(user, password).await.unwrap();
    let (n, _) = p.stat().await.unwrap();
    p.quit().await.unwrap();
    n
}

async fn messages(node: &NodeProcess, user: &str) -> Vec<Vec<u8>> {
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    p.login(user, PASSWORD).await.unwrap();
    let (n, _) = p.stat().await.unwrap();
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(p.retr(i as u32).await.unwrap());
    }
    p.quit().await.unwrap();
    out
}

/// `quill admin` against `node`, with `stdin` fed to it.
fn admin_cli(node: &NodeProcess, args: &[&str], stdin: &str) -> Output {
    admin_cli_at(&node.admin_addr().to_string(), args, stdin)
}

fn admin_cli_at(addr: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(quill_binary().unwrap())
        .args(["admin", "--node", addr, "--token", "harness-token"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quill admin runs");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "$ quill admin {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// 1. SMTP smuggling (CVE-2023-51764 class), over SMTP and LMTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_end_of_data_neither_ends_the_message_nor_runs_commands() {
    let (_d, node) = node("smuggling", &[]).await;
    for (addr, verb) in [(node.smtp(), "EHLO"), (node.lmtp(), "LHLO")] {
        for fake_end in ["\n.\r\n", "\n.\n", "\r.\r\n", "\r\n.\n"] {
            let mut s = hello(addr, verb).await;
            assert_eq!(s.command("MAIL FROM:<a@b.test>").await.unwrap().code, 250);
            assert_eq!(s.command("RCPT TO:<alice@example.org>").await.unwrap().code, 250);
            assert_eq!(s.command("DATA").await.unwrap().code, 354);
            let data = format!(
                "Subject: hi\r\n\r\nhello{fake_end}MAIL FROM:<admin@example.org>\r\n\
                 RCPT TO:<bob@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
            );
            let r = s.raw(data.as_bytes()).await.unwrap();
            assert_eq!((r.code, r.text.contains("5.5.2")), (500, true), "{fake_end:?}: {r:?}");
            // The session goes on, in step with the client.
            assert_eq!(s.command("NOOP").await.unwrap().code, 250, "{fake_end:?}");
            s.quit().await.unwrap();
        }
    }
    assert_eq!(node.metric("quill_store_entries").await.unwrap(), 0.0, "nothing stored");
    assert_eq!(stat(&node, "alice@example.org", PASSWORD).await, 0);
    assert_eq!(stat(&node, "bob@example.org", PASSWORD).await, 0);

    // A clean message with dot-stuffed lines still goes through unchanged.
    let mut s = SmtpClient::connect(node.smtp(), false).await.unwrap();
    let body = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n";
    let r = s.send_mail("a@b.test", &["alice@example.org"], body).await.unwrap();
    assert_eq!(r[0].code, 250, "{r:?}");
    let got = messages(&node, "alice@example.org").await;
    assert_eq!(quill_harness::client::strip_received(&got[0]).unwrap(), body);
}

// 5. A 1000-character line is stored unchanged; only a line over the
// (much larger) bound is refused, with the exact limit in the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lines_are_stored_unchanged() {
    let (_d, node) = node("long-lines", &[]).await;
    let body = format!(
        "Subject: long\r\n\r\n{}\r\n{}\r\n",
        "y".repeat(1000),
        "z".repeat(20_000)
    );
    let mut s = SmtpClient::connect(node.smtp(), false).await.unwrap();
    let r = s
        .send_mail("a@b.test", &["alice@example.org"], body.as_bytes())
        .await
        .unwrap();
    assert_eq!(r[0].code, 250, "{r:?}");
    let got = messages(&node, "alice@example.org").await;
    assert_eq!(quill_harness::client::strip_received(&got[0]).unwrap(), body.as_bytes());

    // One octet over DATA_LINE_BYTES_MAX (1 MiB, CRLF included) is refused.
    let limit = quill_proto::data::DATA_LINE_BYTES_MAX;
    for (len, want) in [(limit - 2, 250), (limit - 1, 500)] {
        assert_eq!(s.command("MAIL FROM:<a@b.test>").await.unwrap().code, 250);
        assert_eq!(s.command("RCPT TO:<bob@example.org>").await.unwrap().code, 250);
        assert_eq!(s.command("DATA").await.unwrap().code, 354);
        let data = format!("{}\r\n.\r\n", "x".repeat(len));
        let r = s.raw(data.as_bytes()).await.unwrap();
        assert_eq!(r.code, want, "line of {} octets: {r:?}", len + 2);
        if want == 500 {
            assert!(r.text.contains(&limit.to_string()), "{r:?}");
        }
    }
    assert_eq!(s.command("NOOP").await.unwrap().code, 250);
}

// 2. A removed user's mail never reaches the next user of the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_user_with_mail_needs_purge_and_the_next_user_starts_empty() {
    let (_d, node) = node("remove-user", &[]).await;
    let mut s = SmtpClient::connect(node.smtp(), false).await.unwrap();
    for i in 0..3 {
        let body = format!("Subject: secret {i}\r\n\r\nfor alice only\r\n");
        let r = s
            .send_mail("a@b.test", &["alice@example.org"], body.as_bytes())
            .await
            .unwrap();
        assert_eq!(r[0].code, 250);
    }
    s.quit().await.unwrap();

    // Without --purge: refused, and alice keeps her mail.
    let out = admin_cli(&node, &["user", "remove", "alice@example.org"], "");
    assert!(!out.status.success());
    assert!(text(&out).contains("--purge"), "{}", text(&out));
    assert_eq!(stat(&node, "alice@example.org", PASSWORD).await, 3);

    // A domain with users is refused too.
    let (code, reply) = node
        .admin_raw(Method::DELETE, "/v1/domains/example.org", None)
        .await
        .unwrap();
    assert_eq!(code, 409, "{reply}");

    // With --purge: every copy deleted, then the user.
    let out = admin_cli(&node, &["user", "remove", "--purge", "alice@example.org"], "");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("3 message(s) purged"), "{}", text(&out));
    assert!(node.user_list().await.unwrap().iter().all(|u| u != "alice@example.org"));

    // A new alice starts empty.
    node.add_user("alice@example.org", "new owner", None).await.unwrap();
    assert_eq!(stat(&node, "alice@example.org", "new owner").await, 0);
    let mut s = SmtpClient::connect(node.smtp(), false).await.unwrap();
    let r = s
        .send_mail("a@b.test", &["alice@example.org"], b"Subject: welcome\r\n\r\nhi\r\n")
        .await
        .unwrap();
    assert_eq!(r[0].code, 250);
    assert_eq!(stat(&node, "alice@example.org", "new owner").await, 1);
    // A user without mail is removed without --purge.
    let out = admin_cli(&node, &["user", "remove", "carol@example.org"], "");
    assert!(out.status.success(), "{}", text(&out));
}

// 3. postmaster is deliverable for every local domain without a user of
// that name: to --postmaster, else the domain's first user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_is_deliverable_for_every_local_domain() {
    let (_d, node) = node("postmaster", &[]).await;
    node.add_domain("example.net").await.unwrap(); // no users at all
    let mut s = hello(node.smtp(), "EHLO").await;
    assert_eq!(s.command("MAIL FROM:<a@b.test>").await.unwrap().code, 250);
    for rcpt in ["<Postmaster>", "<postmaster@example.org>", "<POSTMASTER@example.net>"] {
        let r = s.command(&format!("RCPT TO:{rcpt}")).await.unwrap();
        assert_eq!(r.code, 250, "{rcpt}: {r:?}");
    }
    // Other unknown users are still unknown; other domains still not ours.
    assert_eq!(s.command("RCPT TO:<nobody@example.org>").await.unwrap().code, 550);
    let r = s.command("RCPT TO:<postmaster@example.com>").await.unwrap();
    assert_eq!((r.code, r.text.contains("5.7.1")), (550, true), "{r:?}");
    assert_eq!(s.command("DATA").await.unwrap().code, 354);
    let r = s.raw(b"Subject: abuse report\r\n\r\nhi\r\n.\r\n").await.unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    // All three named the same mailbox: one copy, at alice (the first user).
    assert_eq!(stat(&node, "alice@example.org", PASSWORD).await, 1);

    // --postmaster chooses the mailbox.
    let (_d2, other) = common::node("postmaster-flag", &["--postmaster", "carol@example.org"]).await;
    let mut s = SmtpClient::connect(other.smtp(), false).await.unwrap();
    let r = s
        .send_mail("a@b.test", &["postmaster@example.org"], b"Subject: x\r\n\r\nx\r\n")
        .await
        .unwrap();
    assert_eq!(r[0].code, 250);
    assert_eq!(stat(&other, "carol@example.org", PASSWORD).await, 1);
    assert_eq!(stat(&other, "alice@example.org", PASSWORD).await, 0);
}

/// The time one failed POP3 login takes, on a fresh connection.
async fn failed_login(node: &NodeProcess, user: &str) -> Duration {
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    assert!(p.command(&format!("USER {user}")).await.unwrap().starts_with("+OK"));
    let t = Instant::now();
    let r = p.command("PASS wrong password").await.unwrap();
    let took = t.elapsed();
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    took
}

// 4a. An unknown user is refused after the same work as a wrong password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_take_as_long_to_refuse_as_wrong_passwords() {
    let (_d, node) = node("login-timing", &[]).await;
    // The first unknown login also makes the dummy hash: not measured.
    failed_login(&node, "warmup@example.org").await;
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..4 {
        known.push(failed_login(&node, "alice@example.org").await);
        unknown.push(failed_login(&node, &format!("nobody{i}@example.org")).await);
    }
    // The fastest of each: noise only ever adds time.
    let (k, u) = (known.iter().min().unwrap(), unknown.iter().min().unwrap());
    eprintln!("fastest refusal: known user {k:?}, unknown user {u:?}");
    assert!(
        u.as_secs_f64() >= k.as_secs_f64() * 0.5,
        "an unknown user is refused much faster ({u:?}) than a wrong password ({k:?})"
    );
}

// 4b. Guessing recipients is slowed, then cut off for the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_harvesting_is_throttled() {
    let (_d, node) = node("harvest", &["--max-unknown-recipients", "6"]).await;
    let mut s = hello(node.smtp(), "EHLO").await;
    assert_eq!(s.command("MAIL FROM:<a@b.test>").await.unwrap().code, 250);
    for i in 1..=6 {
        let t = Instant::now();
        let r = s.command(&format!("RCPT TO:<guess{i}@example.org>")).await.unwrap();
        assert_eq!(r.code, 550, "{r:?}");
        if i > 3 {
            assert!(t.elapsed() >= Duration::from_millis(900), "guess {i} answered at once");
        }
    }
    // The address has used its unknown recipients: every RCPT is deferred,
    // a real user's too, so the answers tell nothing; a new session too.
    for rcpt in ["alice@example.org", "guess7@example.org"] {
        let r = s.command(&format!("RCPT TO:<{rcpt}>")).await.unwrap();
        assert_eq!((r.code, r.text.contains("4.7.1")), (450, true), "{rcpt}: {r:?}");
    }
    let mut s2 = hello(node.smtp(), "EHLO").await;
    assert_eq!(s2.command("MAIL FROM:<a@b.test>").await.unwrap().code, 250);
    assert_eq!(s2.command("RCPT TO:<alice@example.org>").await.unwrap().code, 450);

    // One session may name at most 10 unknown users (default per-address
    // budget, another node).
    let (_d2, other) = common::node("harvest-session", &[]).await;
    let mut s = hello(other.smtp(), "EHLO").await;
    assert_eq!(s.command("MAIL FROM:<a@b.test>").await.unwrap().code, 250);
    for i in 1..=10 {
        let r = s.command(&format!("RCPT TO:<guess{i}@example.org>")).await.unwrap();
        assert_eq!(r.code, 550, "{r:?}");
    }
    let r = s.read_reply().await.unwrap();
    assert_eq!((r.code, r.text.contains("4.7.0")), (421, true), "{r:?}");
}

// 6. SMTPUTF8 addresses end to end; UTF-8 without SMTPUTF8 is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_addresses_end_to_end() {
    let (_d, node) = node("smtputf8", &[]).await;
    node.add_user("Jürgen@example.org", PASSWORD, None).await.unwrap();
    let mut s = hello(node.smtp(), "EHLO").await;
    let r = s.command("MAIL FROM:<jürgen@example.org>").await.unwrap();
    assert_eq!((r.code, r.text.contains("5.6.7")), (553, true), "{r:?}");
    assert_eq!(s.command("MAIL FROM:<a@b.test>").await.unwrap().code, 250);
    let r = s.command("RCPT TO:<jürgen@example.org>").await.unwrap();
    assert_eq!((r.code, r.text.contains("5.6.7")), (553, true), "{r:?}");
    assert_eq!(s.command("RSET").await.unwrap().code, 250);
    assert_eq!(s.command("MAIL FROM:<müller@b.test> SMTPUTF8").await.unwrap().code, 250);
    assert_eq!(s.command("RCPT TO:<JÜRGEN@example.org>").await.unwrap().code, 250);
    assert_eq!(s.command("DATA").await.unwrap().code, 354);
    let body = "Subject: grüße\r\nFrom: müller@b.test\r\n\r\nhallo\r\n";
    let r = s.raw(format!("{body}.\r\n").as_bytes()).await.unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    // POP3 login with the UTF-8 name (RFC 6856: UTF8 first).
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    assert!(p.capa().await.unwrap().iter().any(|c| c == "UTF8 USER"));
    assert!(p.command("UTF8").await.unwrap().starts_with("+OK"));
    p.login("jürgen@example.org", PASSWORD).await.unwrap();
    assert_eq!(p.stat().await.unwrap().0, 1);
    let msg = p.retr(1).await.unwrap();
    assert_eq!(quill_harness::client::strip_received(&msg).unwrap(), body.as_bytes());
    p.quit().await.unwrap();
    assert!(
        node.user_list()
            .await
            .unwrap()
            .iter()
            .any(|u| u == "jürgen@example.org")
    );
}

// 7. The operator's rough edges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_rough_edges() {
    let (_d, node) = node("operator", &[]).await;

    // An empty log filter is refused; logging goes on.
    let out = admin_cli(&node, &["log-level", ""], "");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("empty log filter"), "{}", text(&out));
    let out = admin_cli(&node, &["log-level", "info"], "");
    assert!(out.status.success());
    assert!(text(&out).contains("this node only"), "{}", text(&out));
    let mut s = SmtpClient::connect(node.smtp(), false).await.unwrap();
    assert_eq!(
        s.send_mail("a@b.test", &["bob@example.org"], b"Subject: x\r\n\r\nx\r\n")
            .await
            .unwrap()[0]
            .code,
        250
    );
    common::wait_for("the delivery to be logged", Duration::from_secs(10), || async {
        std::fs::read_to_string(node.log_path()).is_ok_and(|l| l.contains("message stored"))
    })
    .await;

    // Quotas with units; the password from standard input or a file.
    let out = admin_cli(
        &node,
        &[
            "user",
            "add",
            "dave@example.org",
            "--password-file",
            "-",
            "--quota",
            "10MB",
        ],
        "from stdin\n",
    );
    assert!(out.status.success(), "{}", text(&out));
    let pwfile = _d.path().join("pw");
    std::fs::write(&pwfile, "from a file\n").unwrap();
    let out = admin_cli(
        &node,
        &[
            "user",
            "add",
            "erin@example.org",
            "--password-file",
            pwfile.to_str().unwrap(),
            "--quota",
            "1 GiB",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out));
    let list = text(&admin_cli(&node, &["user", "list"], ""));
    assert!(list.contains("dave@example.org quota 10000000 bytes"), "{list}");
    assert!(list.contains("erin@example.org quota 1073741824 bytes"), "{list}");
    assert_eq!(stat(&node, "dave@example.org", "from stdin").await, 0);
    assert_eq!(stat(&node, "erin@example.org", "from a file").await, 0);
    let out = admin_cli(
        &node,
        &[
            "user",
            "add",
            "x@example.org",
            "--password-file",
            "-",
            "--quota",
            "10XB",
        ],
        "pw\n",
    );
    assert!(text(&out).contains("unknown unit"), "{}", text(&out));

    // --node at a port that is not the admin API says what it wants.
    let out = admin_cli_at(&node.smtp().to_string(), &["domain", "list"], "");
    assert!(!out.status.success());
    assert!(text(&out).contains("--admin address"), "{}", text(&out));

    // Every admin subcommand has a help line.
    for sub in [
        &["admin"][..],
        &["admin", "domain"],
        &["admin", "user"],
        &["admin", "node"],
        &["admin", "cluster"],
        &["admin", "dkim"],
    ] {
        let out = Command::new(quill_binary().unwrap())
            .args(sub)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let commands = help
            .split("Commands:")
            .nth(1)
            .and_then(|c| c.split("\n\n").next())
            .unwrap_or_default()
            .to_owned();
        assert!(!commands.is_empty(), "{sub:?}: {help}");
        for line in commands.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                line.split_whitespace().count() >= 2,
                "{sub:?}: no help for {line:?}\n{help}"
            );
        }
    }

    // AUTH PLAIN as another user: said to be not permitted, not "malformed".
    use base64::Engine;
    let b64 =
        base64::engine::general_purpose::STANDARD.encode(format!("bob@example.org\0alice@example.org\0{PASSWORD}"));
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    let r = p.command(&format!("AUTH PLAIN {b64}")).await.unwrap();
    assert!(r.starts_with("-ERR") && r.contains("not permitted"), "{r}");
}

// 7b. log-level --all reaches every node of a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_all_reaches_every_node() {
    let _slot = common::cluster_slot().await;
    let dir = quill_harness::process::TempDir::new("log-all").unwrap();
    let nodes = quill_harness::process::start_cluster(dir.path(), 2, "log-all-secret", "info")
        .await
        .unwrap();
    let live: Vec<&NodeProcess> = nodes.iter().collect();
    quill_harness::process::wait_converged(&live, 2, Duration::from_secs(60))
        .await
        .unwrap();
    let out = admin_cli(&nodes[0], &["log-level", "--all", "info,quill_node=debug"], "");
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert_eq!(said.matches(": ok").count(), 2, "{said}");
    common::wait_for("node 2 to log the change", Duration::from_secs(10), || async {
        std::fs::read_to_string(nodes[1].log_path()).is_ok_and(|l| l.contains("cluster-wide request"))
    })
    .await;
    // A bad filter changes no node.
    let out = admin_cli(&nodes[0], &["log-level", "--all", "info,[bad"], "");
    assert!(!out.status.success(), "{}", text(&out));
}
