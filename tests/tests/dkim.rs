//! DKIM signing of outgoing mail with keys the cluster shares: a key made
//! through one node (`quill admin dkim create`) reaches the other, mail
//! submitted through that other node leaves through the outbound queue (to
//! a sink as `--relay-host`) signed, and an outside verifier (Python's
//! dkimpy, given the TXT record `dkim create` printed) accepts the
//! signature; RSA and Ed25519; the newest key signs; `dkim remove` goes
//! back to the other selector, then to unsigned mail; no listing shows a
//! private key.

mod common;

use std::time::Duration;

use common::sink::Sink;
use common::{PASSWORD, quill_admin, wait_for};
use quill_harness::fresh_loopback;
use quill_harness::process::{NodeOptions, NodeProcess};

/// dkimpy's verdict on `message`, with `record` as the only TXT record
/// (for `name`): "pass", or "fail: " and why.
const VERIFY: &str = r#"
import sys, dkim
msg = open(sys.argv[1], 'rb').read()
name, record = sys.argv[2].encode(), sys.argv[3].encode()
def dns(q, timeout=5):
    return record if q == name else None
d = dkim.DKIM(msg)
try:
    ok = d.verify(dnsfunc=dns)
except Exception as e:
    ok = False
    print('fail: ' + repr(e))
print('pass' if ok else 'fail')
"#;

fn verify(python: &str, message: &[u8], name: &str, record: &str) -> String {
    let dir = quill_harness::process::TempDir::new("dkim-verify").expect("temp dir");
    let (script, file) = (dir.path().join("verify.py"), dir.path().join("msg.eml"));
    std::fs::write(&script, VERIFY).unwrap();
    std::fs::write(&file, message).unwrap();
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(&file)
        .arg(name)
        .arg(record)
        .output()
        .expect("python runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// What `dkim create` printed: the record's name (with its final dot) and
/// its text, the quoted strings joined as a resolver joins them.
struct Record {
    selector: String,
    name: String,
    text: String,
}

fn record_of(printed: &str) -> Record {
    let line = printed
        .lines()
        .find(|l| l.contains("._domainkey."))
        .expect("a record line");
    let name = line.split_whitespace().next().unwrap().to_owned();
    assert!(line.contains(" IN TXT \""), "{line}");
    let text: String = line.split('"').skip(1).step_by(2).collect();
    let selector = name.split("._domainkey.").next().unwrap().to_owned();
    Record { selector, name, text }
}

/// Submits one message through `node` as alice to a remote recipient.
async fn submit(node: &NodeProcess, subject: &str) {
    use base64::Engine;
    let mut c = quill_harness::SmtpClient::connect(node.submission(), false)
        .await
        .expect("submission connects");
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0alice@example.org\0{PASSWORD}"));
    let r = c.command(&format!("AUTH PLAIN {plain}")).await.expect("auth");
    assert_eq!(r.code, 235, "{r:?}");
    let msg = format!(
        "From: Alice <alice@example.org>\r\nTo: friend@remote.test\r\nSubject: {subject}\r\n\
         Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@example.org>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         hello  there \r\n\r\n.leading dot\r\n\r\n\r\n"
    );
    let replies = c
        .send_mail("alice@example.org", &["friend@remote.test"], msg.as_bytes())
        .await
        .expect("sent");
    let _ = c.quit().await;
    assert_eq!(replies.first().map(|r| r.code), Some(250), "{replies:?}");
}

/// The bytes the sink took for the message with `subject` (waited for).
async fn received(sink: &Sink, subject: &str) -> Vec<u8> {
    let line = format!("Subject: {subject}\r\n");
    wait_for(
        &format!("the sink to get {subject:?}"),
        Duration::from_secs(30),
        || async { sink.got().iter().any(|g| g.data.contains(&line)) },
    )
    .await;
    let got = sink.got();
    got.iter()
        .find(|g| g.data.contains(&line))
        .unwrap()
        .data
        .clone()
        .into_bytes()
}

/// The value of tag `tag` of the message's DKIM-Signature (unfolded).
fn tag(message: &[u8], tag: &str) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let start = text.find("DKIM-Signature:")?;
    let mut field = String::new();
    for (i, l) in text[start..].split("\r\n").enumerate() {
        if i > 0 && !l.starts_with([' ', '\t']) {
            break;
        }
        field.push_str(l.trim());
    }
    let field = field.trim_start_matches("DKIM-Signature:");
    field.split(';').find_map(|t| {
        let (k, v) = t.split_once('=')?;
        (k.trim() == tag).then(|| v.trim().to_owned())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_mail_is_signed_with_the_clusters_keys_and_verifies_outside() {
    // dkimpy, with PyNaCl for Ed25519.
    let Some(python) = testkit::python_with("dkim, nacl") else {
        return;
    };
    let _slot = common::cluster_slot().await;
    let sink = Sink::start(0).await;
    let relay = sink.addr.to_string();
    let (dir, mut nodes) = common::cluster_with_users("dkim", 2, &["--relay-host", &relay], &["alice"]).await;
    // Node 1 takes mail in but never sends it (`--role in`): whatever the
    // sink gets was signed by node 2, with the keys made through node 1.
    nodes[0].opts.extra_args.extend(["--role".to_owned(), "in".to_owned()]);
    nodes[0].restart().await.expect("node 1 restarts");
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    quill_harness::process::wait_converged(&all, 2, Duration::from_secs(60))
        .await
        .expect("converges");
    let (n1, n2) = (&nodes[0], &nodes[1]);

    // Before any key: mail leaves unsigned.
    submit(n2, "unsigned-first").await;
    let m = received(&sink, "unsigned-first").await;
    assert!(tag(&m, "d").is_none(), "{}", String::from_utf8_lossy(&m));

    // Bad input is refused with the reason.
    let (ok, out) = quill_admin(n1, &["dkim", "create", "example.org", "--selector", "not_a_label"]);
    assert!(!ok && out.contains("selector"), "{out}");
    let (ok, out) = quill_admin(n1, &["dkim", "remove", "example.org", "nothere"]);
    assert!(!ok && out.contains("no DKIM selector"), "{out}");

    // An RSA key (the default) made through node 1.
    let (ok, out) = quill_admin(n1, &["dkim", "create", "example.org"]);
    assert!(ok, "{out}");
    let rsa = record_of(&out);
    assert!(rsa.name.ends_with("._domainkey.example.org."), "{out}");
    assert!(rsa.selector.starts_with("quill"), "{out}");
    assert!(rsa.text.starts_with("v=DKIM1; k=rsa; p=MII"), "{}", rsa.text);
    let line = out.lines().find(|l| l.contains("._domainkey.")).unwrap();
    assert!(
        line.matches('"').count() >= 4,
        "a 2048-bit key's record is cut in strings: {line}"
    );
    assert!(line.split('"').skip(1).step_by(2).all(|s| s.len() <= 255), "{line}");

    // It reaches node 2 within seconds.
    wait_for("node 2 to have the key", Duration::from_secs(10), || async {
        let (ok, out) = quill_admin(n2, &["dkim", "list", "--json"]);
        ok && out.contains(&rsa.selector)
    })
    .await;
    let (ok, listed) = quill_admin(n2, &["dkim", "list", "--json"]);
    assert!(ok, "{listed}");
    let rows: serde_json::Value = serde_json::from_str(listed.trim()).expect("JSON list");
    let rows = rows.as_array().expect("a list");
    assert_eq!(rows.len(), 1, "{listed}");
    let mut fields: Vec<&str> = rows[0].as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "algorithm",
            "created_secs",
            "domain",
            "record",
            "selector",
            "signing",
            "zone_line"
        ],
        "no private key among the fields"
    );
    assert_eq!(rows[0]["record"], rsa.text.as_str());
    assert!(!listed.to_ascii_lowercase().contains("private"), "{listed}");
    let (ok, status) = quill_admin(n2, &["cluster", "status", "--json"]);
    assert!(ok, "{status}");
    assert!(!status.contains(&rsa.text[20..60]) && !status.to_ascii_lowercase().contains("private_der"));

    // Mail submitted through node 2 leaves (from node 2: node 1 sends
    // nothing) signed with it; dkimpy agrees, and refuses the same
    // message with its body changed.
    for i in 0..6 {
        submit(n2, &format!("signed-rsa-{i}")).await;
    }
    for i in 1..6 {
        let m = received(&sink, &format!("signed-rsa-{i}")).await;
        assert_eq!(tag(&m, "s").as_deref(), Some(rsa.selector.as_str()));
        assert_eq!(verify(&python, &m, &rsa.name, &rsa.text), "pass");
    }
    let m = received(&sink, "signed-rsa-0").await;
    assert_eq!(
        tag(&m, "d").as_deref(),
        Some("example.org"),
        "{}",
        String::from_utf8_lossy(&m)
    );
    assert_eq!(tag(&m, "s").as_deref(), Some(rsa.selector.as_str()));
    assert_eq!(tag(&m, "a").as_deref(), Some("rsa-sha256"));
    assert_eq!(tag(&m, "c").as_deref(), Some("relaxed/relaxed"));
    let h = tag(&m, "h").unwrap().to_ascii_lowercase();
    for f in [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
    ] {
        assert!(h.split(':').any(|x| x.trim() == f), "{f} not signed: h={h}");
    }
    assert_eq!(verify(&python, &m, &rsa.name, &rsa.text), "pass");
    let tampered = String::from_utf8_lossy(&m).replace("hello  there", "hello  thar");
    assert!(verify(&python, tampered.as_bytes(), &rsa.name, &rsa.text).starts_with("fail"));

    // An Ed25519 key: the newest, it signs from now on.
    let (ok, out) = quill_admin(n1, &["dkim", "create", "example.org", "--algorithm", "ed25519"]);
    assert!(ok, "{out}");
    let ed = record_of(&out);
    assert_ne!(ed.selector, rsa.selector);
    assert!(ed.text.starts_with("v=DKIM1; k=ed25519; p="), "{}", ed.text);
    wait_for("node 2 to have the Ed25519 key", Duration::from_secs(10), || async {
        quill_admin(n2, &["dkim", "list", "--json"]).1.contains(&ed.selector)
    })
    .await;
    submit(n2, "signed-ed25519").await;
    let m = received(&sink, "signed-ed25519").await;
    assert_eq!(
        tag(&m, "s").as_deref(),
        Some(ed.selector.as_str()),
        "{}",
        String::from_utf8_lossy(&m)
    );
    assert_eq!(tag(&m, "a").as_deref(), Some("ed25519-sha256"));
    assert_eq!(verify(&python, &m, &ed.name, &ed.text), "pass");
    assert!(
        verify(&python, &m, &ed.name, &rsa.text).starts_with("fail"),
        "the wrong key fails"
    );

    // A backup keeps both keys, and a restore brings them to a new
    // cluster: the same records, the same key signing.
    let backup = dir.path().join("backup");
    let (ok, out) = quill_admin(n1, &["backup", backup.to_str().unwrap()]);
    assert!(ok, "{out}");
    let restored = {
        let opts = NodeOptions::new(dir.path().join("restored"), fresh_loopback()).expect("quill binary");
        NodeProcess::start(opts).await.expect("node starts")
    };
    let (ok, out) = quill_admin(&restored, &["restore", backup.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, out) = quill_admin(&restored, &["dkim", "list", "--json"]);
    assert!(ok, "{out}");
    let rows: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON list");
    let records: Vec<(&str, bool)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["record"].as_str().unwrap(), r["signing"].as_bool().unwrap()))
        .collect();
    assert_eq!(records, [(rsa.text.as_str(), false), (ed.text.as_str(), true)], "{out}");
    drop(restored);

    // Removing it: the RSA key signs again; removing that too: unsigned.
    let (ok, out) = quill_admin(n1, &["dkim", "remove", "example.org", &ed.selector]);
    assert!(ok, "{out}");
    wait_for("node 2 to drop the Ed25519 key", Duration::from_secs(10), || async {
        let (ok, out) = quill_admin(n2, &["dkim", "list"]);
        ok && !out.contains(&ed.selector) && out.contains("signing")
    })
    .await;
    submit(n2, "after-remove").await;
    let m = received(&sink, "after-remove").await;
    assert_eq!(tag(&m, "s").as_deref(), Some(rsa.selector.as_str()));
    assert_eq!(verify(&python, &m, &rsa.name, &rsa.text), "pass");
    let (ok, out) = quill_admin(n1, &["dkim", "remove", "example.org", &rsa.selector]);
    assert!(ok, "{out}");
    wait_for("node 2 to have no key", Duration::from_secs(10), || async {
        let (ok, out) = quill_admin(n2, &["dkim", "list", "--json"]);
        ok && out.trim() == "[]"
    })
    .await;
    submit(n2, "unsigned-last").await;
    let m = received(&sink, "unsigned-last").await;
    assert!(tag(&m, "d").is_none(), "{}", String::from_utf8_lossy(&m));
}
