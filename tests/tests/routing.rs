//! Recipients that are not users, on real processes: aliases to users and
//! to remote addresses (forwarded with SRS, the bounce coming back to the
//! original sender), domain aliases, catch-alls, sub-addressing, loops
//! refused at `alias add` and forged SRS addresses at RCPT; made through
//! one node and used through the others; `quill admin` and Python's
//! smtplib and LMTP client.

mod common;

use std::process::Command;
use std::time::Duration;

use common::sink::Sink;
use common::{PASSWORD, node, run};
use hyper::Method;
use quill_harness::process::{self, NodeProcess, TempDir};
use serde_json::json;

const SECRET: &str = "routing-test-secret";

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_made_through_one_node_route_mail_on_every_node() {
    let _slot = common::cluster_slot().await;
    let sink = Sink::start(0).await;
    let dir = TempDir::new("routing").expect("temp dir");
    let relay = sink.addr.to_string();
    let extra = ["--relay-host", &relay, "--retry-initial", "300ms", "--retry-max", "1s"];
    let nodes = process::start_cluster_with(dir.path(), 3, SECRET, "info", &extra)
        .await
        .expect("cluster starts");
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    process::wait_converged(&all, 3, Duration::from_secs(60))
        .await
        .expect("converges");
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    n1.add_domain("example.org").await.unwrap();
    for u in ["alice", "bob", "carol"] {
        n1.add_user(&format!("{u}@example.org"), PASSWORD, None).await.unwrap();
    }
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
    assert_eq!(subjects(n1, "alice@example.org").await, ["to-sales", "to-tag"]);
    assert_eq!(subjects(n2, "bob@example.org").await, ["to-sales"]);
    assert_eq!(subjects(n3, "carol@example.org").await, ["to-net"]);
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
    assert_eq!(
        subjects(n1, "carol@example.org").await,
        ["caught", "caught-net", "to-net"]
    );
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
    common::wait_for("the forward on node 2", Duration::from_secs(10), || async {
        smtp_send(n2, "sender@origin.test", &["fwd@example.org"], "forwarded")
            .await
            .is_ok()
    })
    .await;
    assert_eq!(subjects(n3, "bob@example.org").await, ["forwarded", "to-sales"]);
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
