//! Blocklists, access rules, DNS blocklists and greylisting on the
//! `--smtp` listener of real nodes: a list loaded through one node refuses
//! a client on every node within seconds; postmaster is always taken.
//! The test client binds its source to a chosen 127.0.0.x address.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{cluster_slot, cluster_with_users, node, quill_admin, wait_for};
use quill_harness::NodeProcess;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

struct Smtp {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Smtp {
    async fn connect(from: &str, to: SocketAddr) -> (Smtp, (u16, String)) {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
        let stream = sock.connect(to).await.unwrap();
        let (r, w) = stream.into_split();
        let mut s = Smtp {
            r: BufReader::new(r),
            w,
        };
        let greeting = s.reply().await;
        (s, greeting)
    }

    async fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.r.read_line(&mut line))
                .await
                .expect("a reply in time")
                .unwrap();
            if n == 0 {
                return (0, text);
            }
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return (code, text);
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> (u16, String) {
        self.w.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
        self.reply().await
    }
}

/// The reply to `RCPT TO:<rcpt>` from a client at `from` (or the
/// greeting's, if it was not 220).
async fn rcpt(node: &NodeProcess, from: &str, sender: &str, rcpt: &str) -> (u16, String) {
    let (mut s, greeting) = Smtp::connect(from, node.smtp()).await;
    if greeting.0 != 220 {
        return greeting;
    }
    assert_eq!(s.cmd("EHLO client.test").await.0, 250);
    assert_eq!(s.cmd(&format!("MAIL FROM:<{sender}>")).await.0, 250);
    let r = s.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    let _ = s.cmd("QUIT").await;
    r
}

async fn code(node: &NodeProcess, from: &str, to: &str) -> u16 {
    rcpt(node, from, "someone@sender.test", to).await.0
}

fn admin(n: &NodeProcess, args: &[&str]) -> String {
    let (ok, out) = quill_admin(n, args);
    assert!(ok, "quill admin {args:?} failed: {out}");
    out
}

/// The node's `/metrics` text.
async fn metrics(n: &NodeProcess) -> String {
    let mut s = tokio::net::TcpStream::connect(n.admin_addr()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out).await.unwrap();
    out
}

const ALICE: &str = "alice@example.org";

/// Python's smtplib from a listed client address: the listed recipient is
/// refused with 554, a whole message to postmaster is taken.
const PY_LISTED: &str = r#"
import smtplib, sys
host, port = sys.argv[1], int(sys.argv[2])
s = smtplib.SMTP(host, port, source_address=("127.0.0.1", 0))
s.ehlo("client.test")
try:
    s.sendmail("x@sender.test", ["alice@example.org"], "Subject: spam\r\n\r\nspam\r\n")
    raise SystemExit("a listed client's mail was taken")
except smtplib.SMTPRecipientsRefused as e:
    code, msg = e.recipients["alice@example.org"]
    assert code == 554 and b"listed by spam" in msg, e.recipients
refused = s.sendmail("x@sender.test", ["postmaster@example.org"], "Subject: delisting\r\n\r\nplease\r\n")
assert refused == {}, refused
s.quit()
print("smtplib ok")
"#;
const WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_access_rules_reach_every_node() {
    let _slot = cluster_slot().await;
    let (dir, nodes) = cluster_with_users("blocklist", 2, &[], &["alice"]).await;
    for n in &nodes {
        wait_for("alice known on every node, nothing listed yet", WITHIN, || async {
            code(n, "127.0.0.1", ALICE).await == 250
        })
        .await;
    }

    // A bad line refuses the whole file, by its number.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "127.0.0.1\n# fine\n127.0.0.300\n").unwrap();
    let (ok, out) = quill_admin(&nodes[0], &["blocklist", "load", "spam", bad.to_str().unwrap()]);
    assert!(!ok && out.contains("line 3"), "{out}");

    let file = dir.path().join("spam.txt");
    std::fs::write(
        &file,
        "# local spammers\n127.0.0.1\n127.0.0.64/26 :127.0.0.2:listed\n127.0.1.5-127.0.1.9\n!127.0.0.100\n\n2001:db8::/32\n",
    )
    .unwrap();
    let out = admin(&nodes[0], &["blocklist", "load", "spam", file.to_str().unwrap()]);
    assert!(out.contains("5 ranges"), "{out}");
    for n in &nodes {
        wait_for("the list on every node", WITHIN, || async {
            code(n, "127.0.0.1", ALICE).await == 554
        })
        .await;
        let (c, text) = rcpt(n, "127.0.0.1", "x@sender.test", ALICE).await;
        assert_eq!(c, 554);
        assert!(
            text.contains("5.7.1") && text.contains("127.0.0.1 is listed by spam"),
            "{text}"
        );
        // RFC 5321 §4.5.1: postmaster is taken from anyone.
        assert_eq!(code(n, "127.0.0.1", "postmaster@example.org").await, 250);
        assert_eq!(code(n, "127.0.0.1", "postmaster").await, 250);
        for (ip, want) in [
            ("127.0.0.2", 250),
            ("127.0.0.64", 554),
            ("127.0.0.127", 554),
            ("127.0.0.100", 250),
            ("127.0.0.128", 250),
            ("127.0.1.7", 554),
            ("127.0.1.10", 250),
        ] {
            assert_eq!(code(n, ip, ALICE).await, want, "{ip}");
        }
    }
    if testkit::program("python3") {
        let smtp = nodes[1].smtp();
        let out = common::run(std::process::Command::new("python3").args([
            "-c",
            PY_LISTED,
            &smtp.ip().to_string(),
            &smtp.port().to_string(),
        ]));
        assert!(out.contains("smtplib ok"), "{out}");
    }
    let list = admin(&nodes[1], &["blocklist", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(rows[0]["name"], "spam", "{list}");
    assert_eq!(rows[0]["ranges"], 5, "{list}");
    assert!(rows[0]["bytes"].as_u64().unwrap() > 0 && rows[0]["loaded_at_ms"].as_u64().unwrap() > 0);
    let m = metrics(&nodes[0]).await;
    assert!(m.contains("quill_blocklist_hits_total{list=\"spam\"}"), "{m}");

    // The operator's rules: allow wins over every list, deny refuses.
    admin(&nodes[1], &["access", "allow", "127.0.0.1/32"]);
    admin(&nodes[1], &["access", "deny", "127.0.0.2"]);
    for n in &nodes {
        // Both rules (two Raft entries, applied one after the other).
        wait_for("the rules on every node", WITHIN, || async {
            code(n, "127.0.0.1", ALICE).await == 250 && rcpt(n, "127.0.0.2", "x@sender.test", ALICE).await.0 == 554
        })
        .await;
        let (c, text) = rcpt(n, "127.0.0.2", "x@sender.test", ALICE).await;
        assert_eq!(c, 554, "{text}");
        assert!(text.contains("access rules"), "{text}");
    }
    let rules = admin(&nodes[0], &["access", "list"]);
    assert!(
        rules.contains("allow 127.0.0.1/32") && rules.contains("deny 127.0.0.2/32"),
        "{rules}"
    );
    let (ok, out) = quill_admin(&nodes[0], &["access", "allow", "127.0.0.1/8"]);
    assert!(!ok && out.contains("past the prefix"), "{out}");
    admin(&nodes[0], &["access", "remove", "127.0.0.1/32"]);
    admin(&nodes[0], &["access", "remove", "127.0.0.2"]);
    for n in &nodes {
        wait_for("the allow rule gone", WITHIN, || async {
            code(n, "127.0.0.1", ALICE).await == 554
        })
        .await;
    }

    // Removing the list lifts it everywhere.
    admin(&nodes[0], &["blocklist", "remove", "spam"]);
    for n in &nodes {
        wait_for("the list gone", WITHIN, || async {
            code(n, "127.0.0.1", ALICE).await == 250
        })
        .await;
    }
    assert_eq!(admin(&nodes[0], &["blocklist", "list", "--json"]).trim(), "[]");
    let (ok, out) = quill_admin(&nodes[0], &["blocklist", "remove", "spam"]);
    assert!(!ok && out.contains("no list named spam"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_ranges_load_through_the_cli() {
    let (dir, n) = node("blocklist-million", &[]).await;
    let file = dir.path().join("big.txt");
    let mut text = String::with_capacity(16 << 20);
    text.push_str("127.0.0.1\n");
    for i in 0..999_999u32 {
        // Scattered /32s across 11.0.0.0 upwards: none merge.
        let ip = std::net::Ipv4Addr::from(0x0b00_0000 + i * 16);
        text.push_str(&ip.to_string());
        text.push('\n');
    }
    std::fs::write(&file, &text).unwrap();
    let started = Instant::now();
    let out = admin(&n, &["blocklist", "load", "big", file.to_str().unwrap()]);
    let took = started.elapsed();
    println!("1 000 000 ranges loaded in {took:?}: {}", out.trim());
    assert!(out.contains("1000000 ranges"), "{out}");
    wait_for("the big list applied", WITHIN, || async {
        code(&n, "127.0.0.1", ALICE).await == 554
    })
    .await;
    assert_eq!(code(&n, "127.0.0.2", ALICE).await, 250);
    let log = std::fs::read_to_string(n.log_path()).unwrap_or_default();
    if let Some(line) = log.lines().rfind(|l| l.contains("blocklists applied")) {
        println!("node: {line}");
    }
    let list = admin(&n, &["blocklist", "list"]);
    assert!(list.contains("big 1000000 ranges"), "{list}");

    // A restarted node has the list from its Raft state before its SMTP
    // listener opens: its first session is already refused.
    let mut n = n;
    n.restart().await.unwrap();
    wait_for("the SMTP listener back", WITHIN, || async {
        tokio::net::TcpStream::connect(n.smtp()).await.is_ok()
    })
    .await;
    assert_eq!(code(&n, "127.0.0.1", ALICE).await, 554);
    assert_eq!(code(&n, "127.0.0.2", ALICE).await, 250);
}

/// A UDP socket that reads queries and never answers.
fn silent_dns() -> SocketAddr {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while sock.recv_from(&mut buf).is_ok() {}
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_blocklists_refuse_listed_clients_and_never_block_on_failure() {
    let dns = common::dns::dnsmasq(&[
        "--local=/bl.test/".to_owned(),
        "--address=/1.0.0.127.bl.test/127.0.0.2".to_owned(),
        // An error code (RFC 5782 / Spamhaus): not a listing.
        "--address=/3.0.0.127.bl.test/127.255.255.254".to_owned(),
    ]);
    let dns_addr = dns.addr.to_string();
    let (_d, n) = node("dnsbl", &["--dns", &dns_addr, "--dnsbl", "bl.test"]).await;
    let (c, text) = rcpt(&n, "127.0.0.1", "x@sender.test", ALICE).await;
    assert_eq!(c, 554, "{text}");
    assert!(text.contains("127.0.0.1 is listed by bl.test"), "{text}");
    assert_eq!(code(&n, "127.0.0.1", "postmaster@example.org").await, 250);
    assert_eq!(code(&n, "127.0.0.2", ALICE).await, 250, "not in the zone");
    assert_eq!(code(&n, "127.0.0.3", ALICE).await, 250, "an error code");
    admin(&n, &["access", "allow", "127.0.0.1"]);
    wait_for("the allow rule", WITHIN, || async {
        code(&n, "127.0.0.1", ALICE).await == 250
    })
    .await;
    let m = metrics(&n).await;
    assert!(m.contains("quill_dnsbl_hits_total{zone=\"bl.test\"}"), "{m}");
    drop(n);

    // At connect: 554 instead of the greeting.
    let (_d2, n2) = node(
        "dnsbl-connect",
        &["--dns", &dns_addr, "--dnsbl", "bl.test", "--dnsbl-at", "connect"],
    )
    .await;
    let (c, text) = rcpt(&n2, "127.0.0.1", "x@sender.test", ALICE).await;
    assert_eq!(c, 554, "{text}");
    assert!(text.contains("listed by bl.test"), "{text}");
    assert_eq!(code(&n2, "127.0.0.2", ALICE).await, 250);
    drop(n2);

    // A DNS server that never answers: the mail is taken, promptly.
    let silent = silent_dns().to_string();
    let (_d3, n3) = node("dnsbl-silent", &["--dns", &silent, "--dnsbl", "bl.test"]).await;
    let started = Instant::now();
    assert_eq!(code(&n3, "127.0.0.1", ALICE).await, 250);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let m = metrics(&n3).await;
    assert!(m.contains("quill_dnsbl_failures_total{zone=\"bl.test\"}"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greylisting_defers_a_first_try_and_a_retry_through_another_node_passes() {
    let _slot = cluster_slot().await;
    let (_dir, nodes) = cluster_with_users("greylist", 2, &["--greylist", "2s"], &["alice", "bob"]).await;
    // Ready: both nodes know both users and reach the triplets' managers
    // (a first try is deferred, not taken as "manager unavailable").
    for n in &nodes {
        for to in [ALICE, "bob@example.org"] {
            wait_for("greylisting answered on every node", WITHIN, || async {
                rcpt(n, "127.0.9.1", "warm-up@sender.test", to).await.0 == 451
            })
            .await;
        }
    }
    let sender = "news@sender.test";
    let first = Instant::now();
    let (c, text) = rcpt(&nodes[0], "127.0.0.1", sender, ALICE).await;
    assert_eq!(c, 451, "{text}");
    assert!(text.contains("4.7.1 Greylisted"), "{text}");
    // Too soon: the same triplet, still deferred.
    assert_eq!(rcpt(&nodes[0], "127.0.0.1", sender, ALICE).await.0, 451);
    // Another client of the same /24 is the same triplet; another
    // recipient is not.
    assert_eq!(rcpt(&nodes[0], "127.0.0.77", sender, ALICE).await.0, 451);
    let (c, text) = rcpt(&nodes[1], "127.0.0.1", sender, "bob@example.org").await;
    assert_eq!(c, 451, "{text}");
    // Postmaster is never greylisted.
    assert_eq!(
        rcpt(&nodes[0], "127.0.0.1", sender, "postmaster@example.org").await.0,
        250
    );
    // Node 2 never saw this triplet: once the delay has passed since the
    // first try through node 1, its first try passes (the triplet is kept
    // at one manager for the cluster, not per node).
    tokio::time::sleep_until((first + Duration::from_millis(2100)).into()).await;
    let (c, text) = rcpt(&nodes[1], "127.0.0.1", sender, ALICE).await;
    assert_eq!(c, 250, "{text}");
    println!("greylisted triplet passed after {:?}", first.elapsed());
    // And keeps passing, through either node.
    assert_eq!(rcpt(&nodes[0], "127.0.0.1", sender, ALICE).await.0, 250);

    // A client an access rule allows is not greylisted.
    admin(&nodes[0], &["access", "allow", "127.0.5.0/24"]);
    wait_for("the allow rule", WITHIN, || async {
        rcpt(&nodes[1], "127.0.5.1", "other@sender.test", ALICE).await.0 == 250
    })
    .await;
    let m = metrics(&nodes[0]).await;
    assert!(m.contains("quill_greylist_total{outcome=\"deferred\"}"), "{m}");
}
