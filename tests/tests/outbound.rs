//! Outbound mail: submission of mail for other domains, the replicated
//! queue, delivery to a remote server (a scripted SMTP sink on loopback,
//! as `--relay-host`), deferral and retry, bounces (RFC 3464, read with
//! Python's `email` package), loop detection, the queue bound, and a
//! kill -9 of a node with queued mail.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::sink::{Got, Sink};
use common::{PASSWORD, node, run};
use quill_harness::process::{self, NodeProcess, TempDir};
use tokio::net::TcpListener;

/// Submits one message through `node`'s submission port as alice.
async fn submit(node: &NodeProcess, rcpts: &[&str], subject: &str) -> Result<(), String> {
    use base64::Engine;
    let mut c = quill_harness::SmtpClient::connect(node.submission(), false)
        .await
        .map_err(|e| e.to_string())?;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0alice@example.org\0{PASSWORD}"));
    let r = c
        .command(&format!("AUTH PLAIN {plain}"))
        .await
        .map_err(|e| e.to_string())?;
    if r.code != 235 {
        return Err(format!("AUTH: {r:?}"));
    }
    let msg = format!(
        "From: alice@example.org\r\nTo: {}\r\nSubject: {subject}\r\n\r\nhello\r\n",
        rcpts.join(", ")
    );
    let replies = c
        .send_mail("alice@example.org", rcpts, msg.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let _ = c.quit().await;
    match replies.first() {
        Some(r) if r.code == 250 => Ok(()),
        other => Err(format!("DATA: {other:?}")),
    }
}

/// One transaction on port 25; the final reply's code and text, or the
/// refusal.
async fn smtp_send(node: &NodeProcess, from: &str, rcpts: &[&str], body: &[u8]) -> Result<(), String> {
    let mut c = quill_harness::SmtpClient::connect(node.smtp(), false)
        .await
        .map_err(|e| e.to_string())?;
    let replies = c.send_mail(from, rcpts, body).await.map_err(|e| e.to_string())?;
    let _ = c.quit().await;
    match replies.first() {
        Some(r) if r.code == 250 => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_mail_is_delivered_deferred_retried_and_bounced() {
    let sink = Sink::start(2).await;
    let relay = sink.addr.to_string();
    let (_d, n) = node(
        "outbound",
        &["--relay-host", &relay, "--retry-initial", "200ms", "--retry-max", "1s"],
    )
    .await;
    // One message, three remote recipients and a local one: the local one
    // has it at once; the remote ones are delivered, deferred twice then
    // delivered, and refused for good.
    submit(
        &n,
        &[
            "friend@remote.test",
            "defer1@remote.test",
            "reject1@remote.test",
            "bob@example.org",
        ],
        "out",
    )
    .await
    .expect("submitted");
    assert_eq!(common::read_all(&n, "bob@example.org").await.len(), 1);
    common::wait_for("both remote deliveries", Duration::from_secs(30), || async {
        let got = sink.got();
        let rcpts: Vec<String> = got.iter().flat_map(|g| g.rcpts.clone()).collect();
        rcpts.contains(&"friend@remote.test".to_owned()) && rcpts.contains(&"defer1@remote.test".to_owned())
    })
    .await;
    let got = sink.got();
    assert_eq!(got.len(), 2, "friend at the first try, defer1 at the third: {got:?}");
    assert!(got.iter().all(|g| g.from == "alice@example.org"));
    assert!(got[0].data.contains("Subject: out") && got[0].data.contains("with ESMTPA"));
    assert!(got[0].data.ends_with("hello\r\n"), "{:?}", got[0].data);
    assert_eq!(sink.tries.lock().unwrap()["defer1@remote.test"], 3);
    // The refused recipient: a DSN in alice's mailbox.
    common::wait_for("the bounce", Duration::from_secs(30), || async {
        common::read_all(&n, "alice@example.org").await.len() == 1
    })
    .await;
    let dsn = common::read_all(&n, "alice@example.org")
        .await
        .into_values()
        .next()
        .unwrap();
    if testkit::program("python3") {
        let out = run(Command::new("python3")
            .args(["-c", PY_DSN])
            .arg(String::from_utf8_lossy(&dsn).as_ref()));
        assert!(out.contains("dsn ok"), "{out}");
    }
    // The queue is empty again (every recipient ended), nothing left over.
    common::wait_for("an empty queue", Duration::from_secs(10), || async {
        metric(&n, "quill_queue_messages_held").await == Some(0)
    })
    .await;
    assert_eq!(metric(&n, "quill_outbound_delivered_total").await, Some(2));
    assert_eq!(metric(&n, "quill_outbound_failed_total").await, Some(1));
    assert_eq!(metric(&n, "quill_outbound_bounces_total").await, Some(1));
    assert_eq!(metric(&n, "quill_outbound_cut_transactions_total").await, Some(0));
    assert_eq!(sink.got().len(), 2, "nothing delivered twice");
}

const PY_DSN: &str = r#"
import email, sys
m = email.message_from_string(sys.argv[1])
assert m.get_content_type() == "multipart/report", m.get_content_type()
assert m.get_param("report-type") == "delivery-status", m.get_param("report-type")
parts = m.get_payload()
assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"], [p.get_content_type() for p in parts]
status = parts[1].get_payload()
# The per-message fields, then one block per recipient.
blocks = [dict(b.items()) for b in status]
rcpt = blocks[1]
assert rcpt["Final-Recipient"] == "rfc822; reject1@remote.test", rcpt
assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.1.1", rcpt
assert "no such user" in rcpt["Diagnostic-Code"], rcpt
assert "Subject: out" in parts[2].get_payload(), parts[2].get_payload()
assert m["To"] == "<alice@example.org>", m["To"]
print("dsn ok")
"#;

/// A metric of a node's `/metrics`.
async fn metric(n: &NodeProcess, name: &str) -> Option<u64> {
    n.metric(name).await.ok().map(|v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_are_refused_and_a_full_queue_says_try_later() {
    // Nothing listens at the relay: mail stays queued.
    let relay = free_addr().await.to_string();
    let (_d, n) = node(
        "outbound-bounds",
        &["--relay-host", &relay, "--queue-max-messages", "1"],
    )
    .await;
    // A loop: 51 Received headers.
    let mut msg = String::new();
    for i in 0..51 {
        msg.push_str(&format!("Received: from hop{i}.test by hop{}.test\r\n", i + 1));
    }
    msg.push_str("Subject: loop\r\n\r\nround and round\r\n");
    let err = smtp_send(&n, "x@remote.test", &["bob@example.org"], msg.as_bytes())
        .await
        .expect_err("a loop is refused");
    assert!(err.contains("554") && err.contains("5.4.6"), "{err}");
    // 50 are fine.
    let fine = msg.split_once("\r\n").unwrap().1;
    smtp_send(&n, "x@remote.test", &["bob@example.org"], fine.as_bytes())
        .await
        .expect("50 hops are no loop");
    // Delivered-To naming the recipient: a loop too.
    let err = smtp_send(
        &n,
        "x@remote.test",
        &["bob@example.org"],
        b"Delivered-To: bob@example.org\r\nSubject: again\r\n\r\nx\r\n",
    )
    .await
    .expect_err("a loop is refused");
    assert!(err.contains("5.4.6"), "{err}");
    // Port 25 still relays for nobody.
    let err = smtp_send(
        &n,
        "alice@example.org",
        &["someone@remote.test"],
        b"Subject: relay?\r\n\r\nx\r\n",
    )
    .await
    .expect_err("no relaying on port 25");
    assert!(err.contains("550"), "{err}");
    // The queue bound (1 message on this node): the first is taken, the
    // next is told to come back, and nothing accepted is lost.
    submit(&n, &["first@remote.test"], "first").await.expect("first queued");
    common::wait_for("the queue counted", Duration::from_secs(10), || async {
        metric(&n, "quill_queue_messages_held").await == Some(1)
    })
    .await;
    let err = submit(&n, &["second@remote.test"], "second")
        .await
        .expect_err("queue full");
    assert!(err.contains("451 4.3.1"), "{err}");
    // Local mail still flows.
    submit(&n, &["bob@example.org"], "local")
        .await
        .expect("local mail is not held back");
    assert!(
        metric(&n, "quill_outbound_deferred_total").await.unwrap_or(0) >= 1,
        "the dead relay defers"
    );
    assert_eq!(
        metric(&n, "quill_queue_messages_held").await,
        Some(1),
        "the first stays queued"
    );

    // The operator's view: `quill admin queue list|show|hold|retry|release|remove`.
    let cli = |args: &[&str]| {
        let mut cmd = n.admin_command();
        cmd.arg("queue").args(args);
        run(&mut cmd)
    };
    let listed = cli(&["list"]);
    assert!(
        listed.contains("first@remote.test=pending") && listed.contains("1 queued"),
        "{listed}"
    );
    let id = listed.split_whitespace().next().unwrap().to_owned();
    let shown = cli(&["show", &id]);
    assert!(
        shown.contains("Subject: first") && shown.contains("\"held\": false"),
        "{shown}"
    );
    cli(&["hold", &id]);
    assert!(cli(&["list"]).contains("HELD"));
    cli(&["release", &id]);
    cli(&["retry", &id]);
    assert!(!cli(&["list"]).contains("HELD"));
    let err = n.admin_command().args(["queue", "show", "00"]).output().unwrap();
    assert!(!err.status.success());
    cli(&["remove", &id]);
    common::wait_for("the removed entry gone", Duration::from_secs(10), || async {
        metric(&n, "quill_queue_messages_held").await == Some(0)
    })
    .await;
    assert!(cli(&["list"]).contains("0 queued"));
    assert_eq!(
        metric(&n, "quill_outbound_bounces_total").await,
        Some(0),
        "removed without a bounce"
    );
}

const SECRET: &str = "outbound-test-secret";

/// A loopback address nothing listens on (yet): the remote server of a
/// test that starts it later.
async fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

/// The flags of a cluster test's nodes: `relay` as the smarthost, quick
/// retries.
fn quick_queue(relay: &str) -> Vec<String> {
    ["--relay-host", relay, "--retry-initial", "300ms", "--retry-max", "1s"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Waits for the cluster to converge, then makes alice and waits for her
/// on every node.
async fn with_alice(nodes: &[NodeProcess]) {
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    process::wait_converged(&all, nodes.len(), Duration::from_secs(60))
        .await
        .expect("converges");
    nodes[0].add_domain("example.org").await.unwrap();
    nodes[0].add_user("alice@example.org", PASSWORD, None).await.unwrap();
    common::wait_user_on_every_node(nodes, "alice@").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_survives_a_kill_of_its_owner() {
    let _slot = common::cluster_slot().await;
    // The remote server is down while mail is queued; its port is kept.
    let relay = free_addr().await;
    let dir = TempDir::new("outbound-kill").expect("temp dir");
    let extra = quick_queue(&relay.to_string());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut nodes = process::start_cluster_with(dir.path(), 3, SECRET, "info", &extra)
        .await
        .expect("cluster starts");
    with_alice(&nodes).await;
    const N: usize = 24;
    for i in 0..N {
        let to = format!("r{i}@remote.test");
        submit(&nodes[i % 3], &[to.as_str()], &format!("m{i}"))
            .await
            .expect("queued");
    }
    // Every node owns some of the 32 shards: kill the one with the most
    // work queued.
    let counts = || async {
        let mut owned = Vec::new();
        for n in &nodes {
            owned.push(metric(n, "quill_queue_messages_owned").await.unwrap_or(0));
        }
        owned
    };
    common::wait_for("every queued message owned", Duration::from_secs(20), || async {
        counts().await.iter().sum::<u64>() == N as u64
    })
    .await;
    let owned = counts().await;
    let victim = (0..3).max_by_key(|k| owned[*k]).unwrap();
    let owned = owned[victim];
    assert!(owned > 0);
    nodes[victim].kill9().await.unwrap();
    let sink = Sink::start_on(TcpListener::bind(relay).await.unwrap(), 0);
    common::wait_for("every queued message delivered", Duration::from_secs(60), || async {
        let mut s = sink.subjects();
        s.dedup();
        s.len() >= N
    })
    .await;
    let mut subjects = sink.subjects();
    let before = subjects.len();
    subjects.dedup();
    eprintln!(
        "node {} owned {owned} queued messages when it was killed; {before} deliveries for {N} messages",
        victim + 1
    );
    assert_eq!(subjects.len(), N, "every message arrived: {subjects:?}");
    // The sink was down, so no transaction was cut: no duplicate.
    assert_eq!(before, N, "duplicates");
    nodes[victim].restart().await.unwrap();
}

/// MX delivery through a real DNS server: MX preference with fallback
/// (the preferred host refuses connections), implicit MX, null MX
/// bounces at once, and a destination that never answers (it takes the
/// connection and says nothing) does not hold up mail to a healthy one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_lookup_fallback_and_a_dead_destination_beside_a_healthy_one() {
    if !testkit::program("dnsmasq") {
        return;
    }
    // The healthy MX on 127.0.0.2, a black hole on 127.0.0.3, same port;
    // 127.0.0.4 refuses connections (the preferred MX of healthy.test).
    let healthy = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = healthy.local_addr().unwrap().port();
    let hole = TcpListener::bind(("127.0.0.3", port))
        .await
        .expect("the same port on 127.0.0.3");
    let sink = Sink::start_on(healthy, 0);
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        tokio::spawn(async move {
            while let Ok((c, _)) = hole.accept().await {
                held.lock().unwrap().push(c);
            }
        });
    }
    let dns = common::dns::dnsmasq(&[
        "--mx-host=healthy.test,mx1.healthy.test,5".into(),
        "--mx-host=healthy.test,mx2.healthy.test,10".into(),
        "--address=/mx1.healthy.test/127.0.0.4".into(),
        "--address=/mx2.healthy.test/127.0.0.2".into(),
        "--address=/implicit.test/127.0.0.2".into(),
        "--mx-host=dead.test,mx.dead.test,10".into(),
        "--address=/mx.dead.test/127.0.0.3".into(),
        "--mx-host=nomail.test,.,0".into(),
        // Answered here, never forwarded: a name without MX records gets
        // an empty answer (implicit MX), not a refusal.
        "--local=/test/".into(),
    ]);
    let (dns_s, port_s) = (dns.addr.to_string(), port.to_string());
    let (_d, n) = node(
        "outbound-mx",
        &[
            "--dns",
            &dns_s,
            "--mx-port",
            &port_s,
            "--retry-initial",
            "1s",
            "--outbound-per-destination",
            "4",
        ],
    )
    .await;
    // Mail to the dead destination first: it takes its connection slots.
    for i in 0..12 {
        submit(&n, &[format!("u{i}@dead.test").as_str()], &format!("dead {i}"))
            .await
            .expect("queued");
    }
    // Up to 40 s on a loaded machine (the queue's first attempts follow
    // its shards' owner being settled); the node's log says why if not.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while held.lock().unwrap().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead destination was not given connections ({} held): {}",
            held.lock().unwrap().len(),
            n.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = std::time::Instant::now();
    for i in 0..5 {
        submit(&n, &[format!("h{i}@healthy.test").as_str()], &format!("healthy {i}"))
            .await
            .expect("queued");
    }
    submit(&n, &["someone@implicit.test"], "implicit")
        .await
        .expect("queued");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.got().len() < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "the healthy mail was not delivered ({} of 6): {}",
            sink.got().len(),
            n.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    eprintln!("healthy mail delivered in {took:?} beside a dead destination");
    // Well under the 30 s a dead host holds a try: nothing waited for it.
    assert!(took < Duration::from_secs(15), "{took:?}");
    let rcpts: Vec<String> = sink.got().iter().flat_map(|g| g.rcpts.clone()).collect();
    assert!(rcpts.contains(&"someone@implicit.test".to_owned()), "{rcpts:?}");
    // The dead destination holds at most its own slots (4), never all.
    assert!(held.lock().unwrap().len() <= 4, "{}", held.lock().unwrap().len());
    // Null MX: bounced at once.
    submit(&n, &["x@nomail.test"], "nomail").await.expect("queued");
    common::wait_for("the null-MX bounce", Duration::from_secs(20), || async {
        common::read_all(&n, "alice@example.org")
            .await
            .values()
            .any(|m| String::from_utf8_lossy(m).contains("Final-Recipient: rfc822; x@nomail.test"))
    })
    .await;
    drop(dns);
}

/// Per-account sending limits on submission: messages with remote
/// recipients a minute, remote recipients an hour (`451 4.7.1` past
/// them); local mail is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_account_cannot_flood_the_queue() {
    let (_d, n) = node(
        "outbound-rates",
        &[
            "--relay-host",
            "127.0.0.1:9",
            "--max-submissions-per-minute",
            "2",
            "--max-submission-recipients-per-hour",
            "5",
        ],
    )
    .await;
    submit(&n, &["a@remote.test"], "1").await.expect("first");
    submit(&n, &["b@remote.test", "c@remote.test"], "2")
        .await
        .expect("second");
    let err = submit(&n, &["d@remote.test"], "3")
        .await
        .expect_err("a third in the minute");
    assert!(err.contains("451") && err.contains("4.7.1"), "{err}");
    for i in 0..3 {
        submit(&n, &["bob@example.org"], &format!("local {i}"))
            .await
            .expect("local mail is not limited");
    }
    // 4 remote recipients counted so far (a, b, c, d): the sixth is refused.
    let err = submit(&n, &["e@remote.test", "f@remote.test"], "4")
        .await
        .expect_err("over the recipients an hour");
    assert!(err.contains("4.7.1"), "{err}");
}

/// Quill delivering to Quill: the remote server offers STARTTLS (its
/// self-signed certificate), the sender takes it (opportunistic TLS), and
/// the message lands in the remote user's mailbox, marked as received
/// over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opportunistic_starttls_to_another_quill() {
    let (_r, remote) = node("outbound-remote", &[]).await;
    remote.add_domain("remote.test").await.unwrap();
    remote.add_user("rob@remote.test", PASSWORD, None).await.unwrap();
    let relay = remote.smtp().to_string();
    let (_d, n) = node("outbound-tls", &["--relay-host", &relay]).await;
    submit(&n, &["rob@remote.test"], "over tls").await.expect("queued");
    common::wait_for("the message at the remote Quill", Duration::from_secs(20), || async {
        common::read_all(&remote, "rob@remote.test").await.len() == 1
    })
    .await;
    let got = common::read_all(&remote, "rob@remote.test")
        .await
        .into_values()
        .next()
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("Subject: over tls"), "{text}");
    // The remote's Received: names TLS; below it, the sender's own (ESMTPA).
    let first = text.lines().take(3).collect::<Vec<_>>().join(" ");
    assert!(first.contains("with ESMTPS"), "{text}");
    assert!(text.contains("with ESMTPA"), "{text}");
}

/// `--role in`: the node takes mail (and submissions) but owns no queue
/// shard; the others work the whole queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_out_role_owns_no_queue_entries() {
    let _slot = common::cluster_slot().await;
    let relay = free_addr().await;
    let dir = TempDir::new("outbound-roles").expect("temp dir");
    let extra = quick_queue(&relay.to_string());
    let flags: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut nodes = process::start_cluster_with(dir.path(), 2, SECRET, "info", &flags)
        .await
        .expect("cluster starts");
    let mut o = process::NodeOptions::new(dir.path().join("n3"), quill_harness::fresh_loopback()).unwrap();
    o.seeds = vec![nodes[0].cluster_addr()];
    o.join_token = Some(nodes[0].join_token().unwrap());
    o.extra_args = extra.into_iter().chain(["--role".into(), "in".into()]).collect();
    nodes.push(NodeProcess::start(o).await.expect("the in-only node starts"));
    with_alice(&nodes).await;
    const N: u64 = 12;
    for i in 0..N {
        let to = format!("r{i}@remote.test");
        submit(&nodes[2], &[to.as_str()], &format!("m{i}"))
            .await
            .expect("queued");
    }
    common::wait_for("the queue owned by the out nodes", Duration::from_secs(20), || async {
        let a = metric(&nodes[0], "quill_queue_messages_owned").await.unwrap_or(0);
        let b = metric(&nodes[1], "quill_queue_messages_owned").await.unwrap_or(0);
        a + b == N
    })
    .await;
    assert_eq!(metric(&nodes[2], "quill_queue_messages_owned").await, Some(0));
    let sink = Sink::start_on(TcpListener::bind(relay).await.unwrap(), 0);
    common::wait_for("every message delivered", Duration::from_secs(30), || async {
        sink.got().len() as u64 >= N
    })
    .await;
    assert_eq!(sink.got().len() as u64, N);
}

/// `--outbound-rate-per-destination`: 4 a second to one domain, a bucket
/// of one second's worth: 12 messages cannot all arrive within 2 s, and
/// another domain is not slowed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rate_limit_spaces_deliveries() {
    let sink = Sink::start(0).await;
    let relay = sink.addr.to_string();
    let (_d, n) = node(
        "outbound-rate",
        &["--relay-host", &relay, "--outbound-rate-per-destination", "4"],
    )
    .await;
    let started = std::time::Instant::now();
    for i in 0..12 {
        submit(&n, &[format!("u{i}@slow.test").as_str()], &format!("s{i}"))
            .await
            .expect("queued");
    }
    submit(&n, &["x@fast.test"], "fast").await.expect("queued");
    let fast = |g: &Got| g.rcpts.iter().any(|r| r == "x@fast.test");
    common::wait_for("the other domain's message", Duration::from_secs(30), || async {
        sink.got().iter().any(fast)
    })
    .await;
    let slow_before = sink.got().iter().filter(|g| !fast(g)).count();
    assert!(slow_before < 12, "the other domain waited for the limited one");
    common::wait_for("every message delivered", Duration::from_secs(30), || async {
        sink.got().len() >= 13
    })
    .await;
    let took = started.elapsed();
    eprintln!("12 messages at 4/s to one domain took {took:?}");
    // 4 at once, then 8 more at 4 a second: at least 2 s.
    assert!(took >= Duration::from_millis(1900), "{took:?}");
}

/// `--delay-warning`: a message still deferred after it gets one
/// "delayed" DSN (Action: delayed, a 4.x.x status), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_announced_once() {
    let sink = Sink::start(1_000).await;
    let relay = sink.addr.to_string();
    let (_d, n) = node(
        "outbound-delay",
        &[
            "--relay-host",
            &relay,
            "--retry-initial",
            "200ms",
            "--retry-max",
            "300ms",
            "--delay-warning",
            "1s",
        ],
    )
    .await;
    submit(&n, &["defer-me@remote.test"], "slow one").await.expect("queued");
    common::wait_for("the delay warning", Duration::from_secs(20), || async {
        !common::read_all(&n, "alice@example.org").await.is_empty()
    })
    .await;
    let first = common::read_all(&n, "alice@example.org")
        .await
        .into_values()
        .next()
        .unwrap();
    let text = String::from_utf8_lossy(&first);
    assert!(text.contains("Subject: Delayed Mail"), "{text}");
    assert!(
        text.contains("Action: delayed") && text.contains("Status: 4.2.0"),
        "{text}"
    );
    // More tries, no second warning.
    let tries = sink.tries.lock().unwrap()["defer-me@remote.test"];
    common::wait_for("more tries", Duration::from_secs(20), || async {
        sink.tries.lock().unwrap()["defer-me@remote.test"] >= tries + 3
    })
    .await;
    assert_eq!(
        common::read_all(&n, "alice@example.org").await.len(),
        1,
        "one warning only"
    );
}

/// A queue owner cut off from the majority (its cluster traffic dropped;
/// it can still reach the remote server) stops working its shards, and
/// the majority's new owners deliver them: every message once, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_owner_stops_and_nothing_is_sent_twice() {
    if !testkit::available(process::Partition::available(), "iptables (as root) is not usable here") {
        return;
    }
    let _slot = common::cluster_slot().await;
    let relay = free_addr().await;
    let dir = TempDir::new("outbound-partition").expect("temp dir");
    let extra = quick_queue(&relay.to_string());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let nodes = process::start_cluster_with(dir.path(), 3, SECRET, "info", &extra)
        .await
        .expect("cluster starts");
    process::wait_voters(&nodes[0], 3, Duration::from_secs(30))
        .await
        .unwrap();
    with_alice(&nodes).await;
    const N: u64 = 24;
    for i in 0..N {
        let to = format!("p{i}@remote.test");
        submit(&nodes[i as usize % 3], &[to.as_str()], &format!("p{i}"))
            .await
            .expect("queued");
    }
    let counts = || async {
        let mut owned = Vec::new();
        for n in &nodes {
            owned.push(metric(n, "quill_queue_messages_owned").await.unwrap_or(0));
        }
        owned
    };
    common::wait_for("every queued message owned", Duration::from_secs(20), || async {
        counts().await.iter().sum::<u64>() == N
    })
    .await;
    let owned = counts().await;
    let victim = (0..3).max_by_key(|k| owned[*k]).unwrap();
    let mut cut = process::Partition::cut(nodes[victim].opts.ip).unwrap();
    // The cut-off node notices it has no majority and lets its shards go;
    // the others take them over.
    common::wait_for("the cut-off owner letting go", Duration::from_secs(30), || async {
        metric(&nodes[victim], "quill_queue_messages_owned").await == Some(0)
    })
    .await;
    let others: Vec<usize> = (0..3).filter(|k| *k != victim).collect();
    common::wait_for("the majority owning every message", Duration::from_secs(30), || async {
        let mut sum = 0;
        for k in &others {
            sum += metric(&nodes[*k], "quill_queue_messages_owned").await.unwrap_or(0);
        }
        sum == N
    })
    .await;
    let sink = Sink::start_on(TcpListener::bind(relay).await.unwrap(), 0);
    common::wait_for("every message delivered", Duration::from_secs(60), || async {
        sink.got().len() as u64 >= N
    })
    .await;
    // A few more looks by every node: nothing comes twice.
    let more = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < more {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut subjects = sink.subjects();
    let all = subjects.len();
    subjects.dedup();
    assert_eq!(subjects.len() as u64, N, "every message arrived");
    assert_eq!(all as u64, N, "a message was sent twice");
    cut.heal();
}
