//! Export, import, backup and restore (issue #31, item 3), through the
//! `quill admin` CLI against real nodes, compared through IMAP (python's
//! imaplib) and POP3.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{PASSWORD, run};
use quill_harness::process::{NodeOptions, NodeProcess, TempDir};
use quill_harness::{SmtpClient, fresh_loopback};

/// imaplib: `fill` makes folders and APPENDs messages with flags; `dump`
/// prints every message of every folder as `folder|flags|sha256|size`,
/// sorted.
const IMAP_SCRIPT: &str = r#"
import hashlib, imaplib, re, sys
mode, host, port, user, pw = sys.argv[1:6]
M = imaplib.IMAP4(host, int(port))
M.login(user, pw)
if mode == "fill":
    for f in ["Archive/2026", "Work"]:
        M.create(f)
    big = b"Subject: big\r\n\r\n" + b"".join(b"line %d of a longer message\r\n" % i for i in range(8000))
    msgs = [
        ("INBOX", r"(\Seen \Flagged $Label1)", b"Subject: one\r\nMessage-ID: <1@x>\r\n\r\nFrom the start\r\n>From quoted\r\n>>From twice\r\nend\r\n"),
        ("Archive/2026", r"(\Answered)", b"Subject: two\r\nMessage-ID: <2@x>\r\n\r\nno line end at the end"),
        ("Work", r"(\Draft \Deleted)", b"Subject: three\r\nMessage-ID: <3@x>\r\n\r\nthree\r\n"),
        ("INBOX", "()", b"Subject: three\r\nMessage-ID: <3@x>\r\n\r\nthree\r\n"),
        ("INBOX", r"(\Seen)", big),
    ]
    for folder, flags, body in msgs:
        typ, _ = M.append(folder, flags, None, body)
        assert typ == "OK", (folder, typ)
elif mode == "dump":
    out = []
    typ, folders = M.list('""', "*")
    names = [re.search(rb'"/" "?(.*?)"?$', f).group(1).decode() for f in folders]
    for name in names:
        typ, data = M.select('"%s"' % name, readonly=True)
        if typ != "OK" or int(data[0]) == 0:
            continue
        typ, data = M.fetch("1:*", "(FLAGS)")
        for item in data:
            n, flags = re.match(rb"(\d+) \(FLAGS \((.*?)\)\)", item).groups()
            flags = sorted(f for f in flags.decode().split() if f != "\\Recent")
            typ, body = M.fetch(n, "(BODY.PEEK[])")
            raw = body[0][1]
            out.append("%s|%s|%s|%d" % (name, " ".join(flags), hashlib.sha256(raw).hexdigest(), len(raw)))
    for line in sorted(out):
        print(line)
M.logout()
"#;

fn python() -> bool {
    testkit::program("python3")
}

fn imap(mode: &str, node: &NodeProcess, user: &str) -> String {
    let addr = node.imap();
    run(Command::new("python3").args([
        "-c",
        IMAP_SCRIPT,
        mode,
        &addr.ip().to_string(),
        &addr.port().to_string(),
        user,
        PASSWORD,
    ]))
}

/// `quill admin --node N --token T ARGS...`.
fn admin(node: &NodeProcess) -> Command {
    node.admin_command()
}

/// Runs a command that must fail: its output.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{cmd:?} succeeded:\n{text}");
    text
}

fn export_to(node: &NodeProcess, user: &str, format: &str, file: &Path) {
    let out = admin(node)
        .args(["export", user, "--format", format])
        .output()
        .expect("runs");
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(file, &out.stdout).expect("write");
}

/// A node with no domain and no user.
async fn empty_node(dir: &TempDir, name: &str) -> NodeProcess {
    let opts = NodeOptions::new(dir.path().join(name), fresh_loopback()).expect("quill binary");
    NodeProcess::start(opts).await.expect("node starts")
}

#[tokio::test]
async fn export_import_keeps_bytes_flags_and_folders() {
    if !python() {
        eprintln!("skipped: no python3");
        return;
    }
    let (dir, a) = common::node("export-a", &[]).await;
    let user = "alice@example.org";
    imap("fill", &a, user);
    let before = imap("dump", &a, user);
    assert_eq!(before.lines().count(), 5, "{before}");

    let file = dir.path().join("alice.mbox");
    export_to(&a, user, "mbox", &file);
    let text = std::fs::read(&file).expect("read");
    assert!(text.starts_with(b"From "), "mbox");
    assert!(
        text.windows(16).any(|w| w == b"\n>>From quoted\r\n"),
        "From lines are quoted"
    );

    // Into a fresh node: the same messages, flags and folders.
    let (_dir_b, b) = common::node("export-b", &["--max-message-size", "1MB"]).await;
    let said = run(admin(&b).args(["import", user]).arg(&file));
    assert!(said.contains("imported 5 message(s), 0 already there"), "{said}");
    let after = imap("dump", &b, user);
    assert_eq!(after, before);

    // Twice: nothing doubles.
    let said = run(admin(&b).args(["import", user]).arg(&file));
    assert!(said.contains("imported 0 message(s), 5 already there"), "{said}");
    assert_eq!(imap("dump", &b, user), before);

    // Hostile files: refused with the reason, nothing stored.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, b"Subject: not mbox\r\n\r\nhello\r\n").unwrap();
    let said = fails(admin(&b).args(["import", "bob@example.org"]).arg(&bad));
    assert!(said.contains("not an mbox file") && said.contains("400"), "{said}");
    std::fs::write(&bad, &text[..text.len() - 40]).unwrap();
    let said = fails(admin(&b).args(["import", "carol@example.org"]).arg(&bad));
    assert!(said.contains("truncated"), "{said}");
    let mut long = b"From x Thu Jan  1 00:00:00 1970\n".to_vec();
    // Far more than the socket buffers hold: the node answers before the
    // file has all gone, and the CLI still shows its reason.
    long.resize(64 << 20, b'a');
    std::fs::write(&bad, &long).unwrap();
    let said = fails(admin(&b).args(["import", "bob@example.org"]).arg(&bad));
    assert!(said.contains("longer than"), "{said}");
    assert_eq!(imap("dump", &b, "bob@example.org"), "");
    let said = fails(admin(&b).args(["import", "nobody@example.org"]).arg(&file));
    assert!(said.contains("404"), "{said}");

    // Maildir: a tar stream with the folders as Maildir++ directories and
    // the flags in the file names.
    let tar = dir.path().join("alice.tar");
    export_to(&a, user, "maildir", &tar);
    let listing = run(Command::new("tar").arg("-tf").arg(&tar));
    let files: Vec<&str> = listing.lines().collect();
    assert_eq!(files.iter().filter(|f| f.contains("/cur/")).count(), 5, "{listing}");
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("Maildir/cur/") && f.ends_with(":2,FSa")),
        "{listing}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("Maildir/.Archive.2026/cur/") && f.ends_with(":2,R")),
        "{listing}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("Maildir/.Work/cur/") && f.ends_with(":2,DT")),
        "{listing}"
    );
    assert!(files.contains(&"Maildir/dovecot-keywords"), "{listing}");
}

#[tokio::test]
async fn backup_under_load_restores_every_acknowledged_message_once() {
    // A 3-node cluster (each message on 2 nodes): the load goes to one
    // node, the backup is taken through another.
    let _slot = common::cluster_slot().await;
    let (dir, nodes) = common::cluster_with_users(
        "backup-a",
        3,
        &["--max-message-size", "1MB"],
        &["alice", "bob", "carol"],
    )
    .await;
    let (a, through) = (&nodes[0], &nodes[1]);
    // Settings, an alias and a Sieve script go with the directory.
    run(admin(a).args([
        "alias",
        "add",
        "team@example.org",
        "alice@example.org",
        "bob@example.org",
    ]));
    run(admin(a).args(["user", "quota", "carol@example.org", "10MB"]));
    run(admin(a).args(["settings", "set", "max-recipients", "50"]));
    let script = dir.path().join("bob.sieve");
    std::fs::write(
        &script,
        "if header :contains \"subject\" \"nothing\" { discard; }\nkeep;\n",
    )
    .unwrap();
    run(admin(a).args(["sieve", "set", "bob@example.org"]).arg(&script));
    // So do a blocklist and an access rule.
    let list = dir.path().join("spam.txt");
    std::fs::write(&list, "# spam sources\n192.0.2.0/24\n2001:db8::/32\n198.51.100.7\n").unwrap();
    run(admin(a).args(["blocklist", "load", "spam"]).arg(&list));
    run(admin(a).args(["access", "allow", "192.0.2.9/32"]));

    // A steady load: each message's marker with the time it was
    // acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let smtp = a.smtp();
    let load_stop = stop.clone();
    let load = tokio::spawn(async move {
        let mut acked: Vec<(String, String, std::time::Instant)> = Vec::new();
        let mut c: Option<SmtpClient> = None;
        let users = ["alice@example.org", "bob@example.org", "carol@example.org"];
        let mut k = 0usize;
        while !load_stop.load(Ordering::Relaxed) {
            let user = users[k % 3];
            let body = format!(
                "Subject: load {k}\r\nX-Test-Seq: {k}\r\n\r\nmessage {k}\r\nFrom a line to quote\r\n{}\r\n",
                "y".repeat(k % 3000)
            );
            // A new session every 20 messages (a session's commands are
            // bounded).
            if k.is_multiple_of(20) {
                if let Some(old) = c.take() {
                    old.quit().await.expect("quit");
                }
                c = Some(SmtpClient::connect(smtp, false).await.expect("smtp"));
            }
            let r = c
                .as_mut()
                .expect("connected")
                .send_mail("load@remote.test", &[user], body.as_bytes())
                .await
                .expect("send");
            if r.last().is_some_and(|r| r.is_ok()) {
                acked.push((user.to_owned(), k.to_string(), std::time::Instant::now()));
            }
            k += 1;
        }
        acked
    });
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let backup_dir = dir.path().join("backup");
    let started = std::time::Instant::now();
    let said = run(admin(through).arg("backup").arg(&backup_dir));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.expect("load");
    let before: Vec<&(String, String, std::time::Instant)> = acked.iter().filter(|(_, _, t)| *t < started).collect();
    assert!(before.len() > 10, "a steady load before the backup: {}", before.len());
    assert!(said.contains("backed up 3 user(s)"), "{said}");

    // A backup refuses a directory that is not empty.
    fails(admin(through).arg("backup").arg(&backup_dir));

    // Into an empty cluster.
    let b = empty_node(&dir, "restored").await;
    let said = run(admin(&b).arg("restore").arg(&backup_dir));
    assert!(said.contains("restored 3 user(s)"), "{said}");
    for user in ["alice@example.org", "bob@example.org", "carol@example.org"] {
        let got = common::read_all(&b, user).await;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for m in got.values() {
            *seen.entry(common::marker(m)).or_default() += 1;
        }
        assert!(seen.values().all(|n| *n == 1), "{user}: a message twice: {seen:?}");
        let want: BTreeSet<&String> = before.iter().filter(|(u, _, _)| u == user).map(|(_, k, _)| k).collect();
        let missing: Vec<&&String> = want.iter().filter(|k| !seen.contains_key(**k)).collect();
        assert!(
            missing.is_empty(),
            "{user}: acknowledged before the backup, not restored: {missing:?}"
        );
        // Byte for byte as the source has it.
        let source = common::read_all(a, user).await;
        let src: BTreeSet<&Vec<u8>> = source.values().collect();
        assert!(got.values().all(|m| src.contains(m)), "{user}: restored bytes differ");
    }
    let routes = b.admin(hyper::Method::GET, "/v1/routes", None).await.expect("routes");
    assert_eq!(routes["aliases"][0]["address"], "team@example.org", "{routes}");
    let users = b.admin(hyper::Method::GET, "/v1/users", None).await.expect("users");
    let carol = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["address"] == "carol@example.org")
        .expect("carol");
    assert_eq!(carol["quota_bytes"], 10_000_000u64);
    let sieve = run(admin(&b).args(["sieve", "get", "bob@example.org"]));
    assert!(sieve.contains("discard"), "{sieve}");
    let settings = run(admin(&b).args(["settings", "list"]));
    assert!(settings.contains("max-recipients = 50 (cluster"), "{settings}");
    let lists = run(admin(&b).args(["blocklist", "list", "--json"]));
    assert!(lists.contains("\"spam\"") && lists.contains("\"ranges\":3"), "{lists}");
    let rules = run(admin(&b).args(["access", "list"]));
    assert!(rules.contains("192.0.2.9/32") && rules.contains("allow"), "{rules}");
    // The password hashes came along: the old password logs in.
    let mut p = quill_harness::Pop3Client::connect(b.pop3()).await.expect("pop3");
    p.login("alice@example.org", PASSWORD).await.expect("the old password");
    p.quit().await.expect("quit");

    // A cluster that is not empty is refused; the mail again (--resume)
    // doubles nothing.
    let said = fails(admin(&b).arg("restore").arg(&backup_dir));
    assert!(said.contains("not empty") && said.contains("409"), "{said}");
    let counts = |m: &BTreeMap<String, Vec<u8>>| m.len();
    let alice_before = counts(&common::read_all(&b, "alice@example.org").await);
    let said = run(admin(&b).args(["restore", "--resume"]).arg(&backup_dir));
    assert!(said.contains("restored 3 user(s), 0 message(s)"), "{said}");
    assert_eq!(counts(&common::read_all(&b, "alice@example.org").await), alice_before);
    // So is an unfinished or damaged backup.
    let c = empty_node(&dir, "other").await;
    let mbox = backup_dir.join("mail/00001.mbox");
    let mut bytes = std::fs::read(&mbox).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&mbox, bytes).unwrap();
    let said = fails(admin(&c).arg("restore").arg(&backup_dir));
    assert!(said.contains("damaged"), "{said}");
    std::fs::remove_file(backup_dir.join("manifest.json")).unwrap();
    let said = fails(admin(&c).arg("restore").arg(&backup_dir));
    assert!(said.contains("no manifest.json"), "{said}");
    assert!(c.user_list().await.expect("users").is_empty());
}
