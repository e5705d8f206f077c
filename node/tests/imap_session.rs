//! The IMAP session against a two-node cluster on the in-memory network:
//! the driver and handler over a duplex byte stream, no socket, no
//! process. Two nodes' services share the directory and the UIDs (as they
//! share the Raft state), so what one session does, a session on the other
//! node sees.

mod common;

use std::sync::Arc;

use common::{Client, cluster, directory, peer, services_on};
use quill_node::Limits;
use quill_node::services::Services;
use quill_node::uids::LocalUids;
use testkit::TempDir;
use tokio::io::BufReader;
use tokio::sync::watch;

/// An IMAP session on `services`, greeted.
async fn open(services: &Arc<Services>, stop: &watch::Receiver<bool>) -> Client {
    let (client, server) = tokio::io::duplex(256 * 1024);
    tokio::spawn(quill_node::imap::serve_on(
        quill_node::net::stream::Stream::Plain(server),
        peer(),
        services.clone(),
        stop.clone(),
    ));
    let mut c = Client(BufReader::new(client));
    let greeting = c.line().await;
    assert!(
        greeting.to_ascii_uppercase().starts_with("* OK [CAPABILITY IMAP4REV1"),
        "{greeting}"
    );
    c
}

fn ok(lines: &[String]) -> &str {
    let last = lines.last().expect("a tagged reply");
    assert!(last.split(' ').nth(1) == Some("OK"), "{lines:?}");
    last
}

/// The number in `[NAME n]` of a line, if there is one.
fn code(lines: &[String], name: &str) -> Option<u32> {
    lines.iter().find_map(|l| {
        let i = l.find(&format!("[{name} "))?;
        l[i + name.len() + 2..].split([' ', ']']).next()?.parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_on_the_in_memory_cluster() {
    let dir = TempDir::new("imap-sessions").expect("temp dir");
    let reps = cluster(&dir);
    let dir_state = directory(&dir).await;
    let uids = Arc::new(LocalUids::default());
    let s1 = services_on(&reps[0], dir_state.clone(), uids.clone(), Limits::default());
    let s2 = services_on(&reps[1], dir_state, uids, Limits::default());
    let (_stop_tx, stop) = watch::channel(false);

    let mut a = open(&s1, &stop).await;
    // Wrong password, then the right one.
    let r = a.command("a1", "LOGIN alice@example.org nope").await;
    assert!(r[0].starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r:?}");
    ok(&a.command("a2", "LOGIN alice@example.org pw").await);
    let r = a.command("a3", "SELECT INBOX").await;
    ok(&r);
    assert!(r.iter().any(|l| l == "* 0 EXISTS\r\n"), "{r:?}");
    let validity = code(&r, "UIDVALIDITY").expect("UIDVALIDITY");

    // APPEND with a flag: stored on both nodes (R=2), with its UID.
    let msg = "Subject: hello\r\nFrom: bob@example.org\r\n\r\nbody\r\n";
    a.send(&format!("a4 APPEND INBOX (\\Flagged) {{{}+}}\r\n{msg}\r\n", msg.len()))
        .await;
    let r = a.until_tagged("a4").await;
    let appended = ok(&r).to_owned();
    assert!(appended.contains(&format!("[APPENDUID {validity} 1]")), "{appended}");
    for rep in &reps {
        assert_eq!(rep.store().list(&alice_mailbox(&s1)).len(), 1, "node {}", rep.id());
    }
    // The session that appended learns of it before the tagged OK (its
    // next FETCH may name it), with \Recent: it numbered the message.
    assert!(r.iter().any(|l| l == "* 1 EXISTS\r\n"), "{r:?}");
    assert!(r.iter().any(|l| l == "* 1 RECENT\r\n"), "{r:?}");
    let r = a.command("a5", "NOOP").await;
    assert!(!r.iter().any(|l| l.contains("EXISTS")), "told twice: {r:?}");
    let r = a
        .command("a6", "FETCH 1 (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        .await;
    ok(&r);
    let fetch = r.concat();
    assert!(fetch.contains("UID 1") && fetch.contains("\\Flagged"), "{fetch}");
    assert!(fetch.contains("Subject: hello"), "{fetch}");
    let r = a.command("a7", "SEARCH FLAGGED SUBJECT hello").await;
    assert_eq!(r[0], "* SEARCH 1\r\n", "{r:?}");

    // A second session on the other node sees the same UID and flag, and
    // a flag it stores reaches the first at its next NOOP.
    let mut b = open(&s2, &stop).await;
    ok(&b.command("b1", "LOGIN alice@example.org pw").await);
    let r = b.command("b2", "SELECT INBOX").await;
    assert_eq!(code(&r, "UIDVALIDITY"), Some(validity), "{r:?}");
    let r = b.command("b3", "UID STORE 1 +FLAGS (\\Seen)").await;
    ok(&r);
    let r = a.command("a8", "NOOP").await;
    assert!(
        r.iter().any(|l| l.starts_with("* 1 FETCH") && l.contains("\\Seen")),
        "{r:?}"
    );

    // MOVE to a new folder: COPYUID, then EXPUNGE; the message is there
    // under the UID COPYUID named.
    ok(&a.command("a9", "CREATE Archive").await);
    let r = a.command("a10", "UID MOVE 1 Archive").await;
    ok(&r);
    let all = r.concat();
    assert!(all.contains("[COPYUID ") && all.contains("* 1 EXPUNGE"), "{all}");
    let r = b.command("b4", "NOOP").await;
    assert!(r.iter().any(|l| l == "* 1 EXPUNGE\r\n"), "{r:?}");
    let r = b.command("b5", "SELECT Archive").await;
    assert!(r.iter().any(|l| l == "* 1 EXISTS\r\n"), "{r:?}");
    let r = b.command("b6", "UID FETCH 1:* (FLAGS)").await;
    ok(&r);
    assert!(r[0].contains("\\Flagged") && r[0].contains("\\Seen"), "{r:?}");

    // Bad input: a command the grammar refuses, then LOGOUT.
    let r = a.command("a11", "FROB").await;
    assert!(r.last().expect("reply").starts_with("a11 BAD"), "{r:?}");
    let r = a.command("a12", "LOGOUT").await;
    assert!(r[0].starts_with("* BYE"), "{r:?}");
    ok(&r);
}

/// Where alice's mail is stored (her mailbox name, not her address).
fn alice_mailbox(s: &Services) -> String {
    s.directory.user("alice@example.org").expect("alice").mailbox()
}

/// `\Recent` (RFC 3501 2.3.2) goes to exactly one session: the node whose
/// entry numbered a message claims it, and the first of its sessions with
/// the folder selected read-write to look takes the claim. EXAMINE and
/// STATUS count claims without taking them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_is_told_to_one_session_only() {
    let dir = TempDir::new("imap-recent").expect("temp dir");
    let reps = cluster(&dir);
    let uids = Arc::new(LocalUids::default());
    let s1 = services_on(&reps[0], directory(&dir).await, uids, Limits::default());
    let (_stop_tx, stop) = watch::channel(false);
    let mut sessions = Vec::new();
    for tag in ["a", "b", "c", "d"] {
        let mut s = open(&s1, &stop).await;
        ok(&s.command(&format!("{tag}0"), "LOGIN alice@example.org pw").await);
        sessions.push(s);
    }
    let [a, b, c, d] = &mut sessions[..] else {
        unreachable!()
    };
    ok(&a.command("a1", "SELECT INBOX").await);
    ok(&b.command("b1", "SELECT INBOX").await);
    // c, with no folder selected, appends: recent to a or b, never both.
    let msg = "Subject: one\r\n\r\nbody\r\n";
    c.send(&format!("c1 APPEND INBOX {{{}+}}\r\n{msg}\r\n", msg.len()))
        .await;
    ok(&c.until_tagged("c1").await);
    let r = c.command("c2", "STATUS INBOX (MESSAGES RECENT)").await;
    assert_eq!(r[0], "* STATUS INBOX (MESSAGES 1 RECENT 1)\r\n", "{r:?}");
    let ra = a.command("a2", "NOOP").await;
    let rb = b.command("b2", "NOOP").await;
    assert!(ra.iter().any(|l| l == "* 1 EXISTS\r\n") && rb.iter().any(|l| l == "* 1 EXISTS\r\n"));
    assert!(
        ra.iter().any(|l| l == "* 1 RECENT\r\n"),
        "the first to look takes it: {ra:?}"
    );
    assert!(
        rb.iter().any(|l| l == "* 0 RECENT\r\n"),
        "recent to one session only: {rb:?}"
    );
    let r = a.command("a3", "FETCH 1 (FLAGS)").await;
    assert!(r[0].contains("\\Recent"), "{r:?}");
    let r = b.command("b3", "FETCH 1 (FLAGS)").await;
    assert!(!r[0].contains("\\Recent"), "{r:?}");
    let r = c.command("c3", "STATUS INBOX (RECENT)").await;
    assert_eq!(r[0], "* STATUS INBOX (RECENT 0)\r\n", "{r:?}");

    // EXAMINE counts a claim and leaves it for a read-write session.
    c.send(&format!("c4 APPEND INBOX {{{}+}}\r\n{msg}\r\n", msg.len()))
        .await;
    ok(&c.until_tagged("c4").await);
    let r = d.command("d1", "EXAMINE INBOX").await;
    assert!(r.iter().any(|l| l == "* 1 RECENT\r\n"), "{r:?}");
    let r = d.command("d2", "FETCH 2 (FLAGS)").await;
    assert!(!r[0].contains("\\Recent"), "EXAMINE took a claim: {r:?}");
    let r = b.command("b4", "NOOP").await;
    assert!(r.iter().any(|l| l == "* 1 RECENT\r\n"), "{r:?}");
    let r = b.command("b5", "SEARCH RECENT").await;
    assert_eq!(r[0], "* SEARCH 2\r\n", "{r:?}");
    let r = b.command("b6", "SEARCH OLD").await;
    assert_eq!(r[0], "* SEARCH 1\r\n", "{r:?}");
    let r = a.command("a4", "NOOP").await;
    assert!(r.iter().any(|l| l == "* 1 RECENT\r\n"), "still one for a: {r:?}");
    // Selecting the folder again keeps what was recent to the session.
    let r = a.command("a5", "SELECT INBOX").await;
    assert!(r.iter().any(|l| l == "* 1 RECENT\r\n"), "{r:?}");
    let r = a.command("a6", "SEARCH RECENT").await;
    assert_eq!(r[0], "* SEARCH 1\r\n", "{r:?}");
}

/// A message another session expunged, this one not told yet: a FETCH of
/// its body answers the others and `NO [EXPUNGEISSUED]` (RFC 5530), not
/// "unavailable": nothing is wrong with the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_of_a_message_expunged_elsewhere_says_so() {
    let dir = TempDir::new("imap-expunged").expect("temp dir");
    let reps = cluster(&dir);
    let uids = Arc::new(LocalUids::default());
    let s1 = services_on(&reps[0], directory(&dir).await, uids, Limits::default());
    let (_stop_tx, stop) = watch::channel(false);
    let mut a = open(&s1, &stop).await;
    let mut b = open(&s1, &stop).await;
    ok(&a.command("a0", "LOGIN alice@example.org pw").await);
    ok(&b.command("b0", "LOGIN alice@example.org pw").await);
    for (k, subject) in ["one", "two"].iter().enumerate() {
        let msg = format!("Subject: {subject}\r\n\r\nbody\r\n");
        a.send(&format!("a{} APPEND INBOX {{{}+}}\r\n{msg}\r\n", k + 1, msg.len()))
            .await;
        ok(&a.until_tagged(&format!("a{}", k + 1)).await);
    }
    ok(&a.command("a3", "SELECT INBOX").await);
    ok(&b.command("b1", "SELECT INBOX").await);
    ok(&b.command("b2", "STORE 1 +FLAGS.SILENT (\\Deleted)").await);
    ok(&b.command("b3", "EXPUNGE").await);
    let r = a.command("a4", "FETCH 1:2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])").await;
    let last = r.last().expect("a tagged reply");
    assert!(last.starts_with("a4 NO [EXPUNGEISSUED]"), "{r:?}");
    assert!(
        r.iter().any(|l| l.starts_with("* 2 FETCH")),
        "the other message's data: {r:?}"
    );
    assert!(!r.iter().any(|l| l.starts_with("* 1 FETCH")), "{r:?}");
    // Told at the next NOOP; then all is well again.
    let r = a.command("a5", "NOOP").await;
    assert!(r.iter().any(|l| l == "* 1 EXPUNGE\r\n"), "{r:?}");
    ok(&a.command("a6", "FETCH 1 (BODY.PEEK[])").await);
}

/// A folder's keywords stay defined (RFC 3501 7.2.6, as imaptest's
/// checkpoints compare them): a keyword set and cleared again by one
/// session is told to a session selected meanwhile (at its NOOP) and to a
/// session that selects the folder later; the recent count is told again
/// when an expunge moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywords_stay_defined_and_recent_counts_follow_expunges() {
    let dir = TempDir::new("imap-keywords").expect("temp dir");
    let reps = cluster(&dir);
    let uids = Arc::new(LocalUids::default());
    let s1 = services_on(&reps[0], directory(&dir).await, uids, Limits::default());
    let (_stop_tx, stop) = watch::channel(false);
    let mut a = open(&s1, &stop).await;
    let mut b = open(&s1, &stop).await;
    ok(&a.command("a0", "LOGIN alice@example.org pw").await);
    ok(&b.command("b0", "LOGIN alice@example.org pw").await);
    let msg = "Subject: one\r\n\r\nbody\r\n";
    a.send(&format!("a1 APPEND INBOX {{{}+}}\r\n{msg}\r\n", msg.len()))
        .await;
    ok(&a.until_tagged("a1").await);
    ok(&a.command("a2", "SELECT INBOX").await);
    let r = b.command("b1", "SELECT INBOX").await;
    assert!(!r.iter().any(|l| l.contains("$Gone")), "{r:?}");
    ok(&a.command("a3", "STORE 1 +FLAGS.SILENT ($Gone)").await);
    ok(&a.command("a4", "STORE 1 -FLAGS.SILENT ($Gone)").await);
    let r = b.command("b2", "NOOP").await;
    assert!(
        r.iter().any(|l| l.starts_with("* FLAGS (") && l.contains("$Gone")),
        "{r:?}"
    );
    assert!(
        r.iter().any(|l| l.contains("[PERMANENTFLAGS (") && l.contains("$Gone")),
        "{r:?}"
    );
    let r = b.command("b3", "NOOP").await;
    assert!(!r.iter().any(|l| l.starts_with("* FLAGS")), "told once: {r:?}");
    let mut c = open(&s1, &stop).await;
    ok(&c.command("c0", "LOGIN alice@example.org pw").await);
    let r = c.command("c1", "EXAMINE INBOX").await;
    assert!(
        r.iter().any(|l| l.starts_with("* FLAGS (") && l.contains("$Gone")),
        "{r:?}"
    );
    // a took the message as recent (it numbered it); its expunge by b
    // moves a's count, and a is told.
    let r = a.command("a5", "FETCH 1 (FLAGS)").await;
    assert!(r[0].contains("\\Recent"), "{r:?}");
    ok(&b.command("b4", "STORE 1 +FLAGS.SILENT (\\Deleted)").await);
    ok(&b.command("b5", "EXPUNGE").await);
    let r = a.command("a6", "NOOP").await;
    let at = |line: &str| r.iter().position(|l| l == line);
    assert!(at("* 1 EXPUNGE\r\n") < at("* 0 RECENT\r\n"), "{r:?}");
    assert!(at("* 1 EXPUNGE\r\n").is_some(), "{r:?}");
}
