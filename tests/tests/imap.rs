//! IMAP: every command's replies on one node (a table over a raw socket),
//! limits, TLS with Python's imaplib (`starttls()`, `IMAP4_SSL`) and
//! `openssl s_client -starttls imap`, the STARTTLS injection case, and
//! Python's imaplib, unmodified, against two nodes of a three-node cluster:
//! the same UIDs and UIDVALIDITY on both, IDLE on one seeing a delivery and
//! an expunge made through the other, and no UID or UIDVALIDITY changed by
//! a `kill -9` between two sessions.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{PASSWORD, node, run};
use quill_harness::process::{self, NodeProcess, TempDir};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A raw IMAP connection: lines in, lines out, every read bounded.
struct Raw {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> (Raw, String) {
        let s = TcpStream::connect(addr).await.expect("connect");
        let (r, w) = s.into_split();
        let mut raw = Raw {
            r: BufReader::new(r),
            w,
        };
        let greeting = raw.line().await;
        (raw, greeting)
    }

    async fn line(&mut self) -> String {
        let mut l = String::new();
        let n = tokio::time::timeout(Duration::from_secs(20), self.r.read_line(&mut l))
            .await
            .expect("a line within 20 s")
            .expect("read");
        assert!(n > 0, "connection closed");
        l
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("write");
    }

    /// Sends `tag rest` and reads up to the tagged reply: (untagged lines,
    /// the tagged line without its tag).
    async fn cmd(&mut self, tag: &str, rest: &str) -> (Vec<String>, String) {
        self.send(format!("{tag} {rest}\r\n").as_bytes()).await;
        self.until(tag).await
    }

    async fn until(&mut self, tag: &str) -> (Vec<String>, String) {
        let mut untagged = Vec::new();
        loop {
            let l = self.line().await;
            if let Some(t) = l.strip_prefix(&format!("{tag} ")) {
                return (untagged, t.trim_end().to_owned());
            }
            untagged.push(l.trim_end().to_owned());
        }
    }
}

/// Every command's reply on one node, the error paths included. `(none)`
/// as the expectation: no untagged response at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_to_every_command() {
    let (_d, n) = node("imap-table", &[]).await;
    common::smtp_to(&n, "bob@example.org", "one").await;
    common::smtp_to(&n, "bob@example.org", "two").await;
    let (mut c, greeting) = Raw::connect(n.imap()).await;
    assert!(greeting.starts_with("* OK [CAPABILITY IMAP4REV1"), "{greeting}");
    let login = format!("LOGIN bob@example.org \"{PASSWORD}\"");
    let many_flags = format!(
        "STORE 1 +FLAGS ({})",
        (0..33).map(|i| format!("k{i}")).collect::<Vec<_>>().join(" ")
    );
    let long_name = format!("CREATE {}", "x".repeat(256));
    let long_flag = format!("STORE 1 +FLAGS (k{})", "x".repeat(64));
    let deep_name = format!("CREATE {}", vec!["d"; 17].join("/"));
    let table: &[(&str, &str, &[&str])] = &[
        (
            "CAPABILITY",
            "OK",
            &["* CAPABILITY IMAP4REV1", "STARTTLS", "AUTH=PLAIN", "IDLE", "UIDPLUS"],
        ),
        ("NOOP", "OK", &["(none)"]),
        ("SELECT INBOX", "BAD", &[]),
        ("FETCH 1 FLAGS", "BAD", &[]),
        ("LOGIN bob@example.org wrong", "NO [AUTHENTICATIONFAILED]", &[]),
        ("LOGIN nobody@example.org wrong", "NO [AUTHENTICATIONFAILED]", &[]),
        (&login, "OK [CAPABILITY IMAP4REV1", &[]),
        (&login, "BAD", &[]),
        ("STARTTLS", "BAD", &[]),
        ("ID NIL", "OK", &["* ID (\"name\" \"Quill\")"]),
        ("NAMESPACE", "OK", &["* NAMESPACE ((\"\" \"/\")) NIL NIL"]),
        // Nothing known to enable (CONDSTORE, which changes every FETCH
        // of FLAGS below: tests/tests/condstore.rs).
        ("ENABLE X-UNKNOWN", "OK", &["* ENABLED"]),
        ("LIST \"\" \"\"", "OK", &["* LIST (\\Noselect) \"/\" \"\""]),
        ("LIST \"\" *", "OK", &["* LIST (\\HasNoChildren) \"/\" INBOX"]),
        ("LIST \"\" Later*", "OK", &["(none)"]),
        // A new user has the special-use folders, marked (RFC 6154).
        (
            "LIST \"\" %",
            "OK",
            &[
                "* LIST (\\HasNoChildren \\Sent) \"/\" Sent",
                "* LIST (\\HasNoChildren \\Trash) \"/\" Trash",
                "* LIST (\\HasNoChildren \\Junk) \"/\" Junk",
            ],
        ),
        ("LSUB \"\" *", "OK", &["* LSUB (\\HasNoChildren) \"/\" INBOX"]),
        ("SUBSCRIBE INBOX", "OK", &[]),
        ("STATUS Later (MESSAGES)", "NO [NONEXISTENT]", &[]),
        ("SELECT Later", "NO [NONEXISTENT]", &[]),
        ("CREATE Later", "OK", &[]),
        ("CREATE Later", "NO [ALREADYEXISTS]", &[]),
        ("CREATE inbox", "NO [ALREADYEXISTS]", &[]),
        ("CREATE a//b", "NO", &[]),
        (&long_name, "NO", &[]),
        (&deep_name, "NO", &[]),
        ("CREATE Keep/2026/Q4", "OK", &[]),
        (
            "LIST \"\" %",
            "OK",
            &[
                "* LIST (\\HasChildren) \"/\" Keep",
                "* LIST (\\HasNoChildren) \"/\" Later",
            ],
        ),
        (
            "LIST \"\" Keep/*",
            "OK",
            &[
                "* LIST (\\HasChildren) \"/\" Keep/2026",
                "* LIST (\\HasNoChildren) \"/\" Keep/2026/Q4",
            ],
        ),
        ("SUBSCRIBE Later", "OK", &[]),
        ("LSUB \"\" *", "OK", &["* LSUB (\\HasNoChildren) \"/\" Later"]),
        ("UNSUBSCRIBE Later", "OK", &[]),
        ("UNSUBSCRIBE Later", "NO [NONEXISTENT]", &[]),
        ("RENAME Keep Old", "OK", &[]),
        ("LIST \"\" Old/*", "OK", &["\"/\" Old/2026/Q4"]),
        ("LIST \"\" Keep*", "OK", &["(none)"]),
        ("RENAME Old Later", "NO [ALREADYEXISTS]", &[]),
        ("RENAME Old Old/x", "NO [CANNOT]", &[]),
        ("RENAME INBOX Old2", "NO [CANNOT]", &[]),
        ("RENAME Nope X", "NO [NONEXISTENT]", &[]),
        ("DELETE Old/2026/Q4", "OK", &[]),
        ("DELETE Old/2026/Q4", "NO [NONEXISTENT]", &[]),
        ("DELETE INBOX", "NO [CANNOT]", &[]),
        (
            "STATUS INBOX (MESSAGES UIDNEXT)",
            "OK",
            &["* STATUS INBOX (MESSAGES 2 UIDNEXT 3)"],
        ),
        (
            "STATUS Later (MESSAGES UNSEEN)",
            "OK",
            &["* STATUS Later (MESSAGES 0 UNSEEN 0)"],
        ),
        ("FETCH 1 FLAGS", "BAD", &[]),
        (
            "SELECT INBOX",
            "OK [READ-WRITE]",
            &[
                "* 2 EXISTS",
                // This session numbers the two delivered messages first:
                // they are recent to it (and to no other session).
                "* 2 RECENT",
                "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)",
                "[PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)]",
                "[UNSEEN 1]",
                "[UIDVALIDITY ",
                "[UIDNEXT 3]",
            ],
        ),
        ("UID SEARCH ALL", "OK", &["* SEARCH 1 2"]),
        ("SEARCH SUBJECT two", "OK", &["* SEARCH 2"]),
        ("SEARCH OR SUBJECT one BODY \"of two\"", "OK", &["* SEARCH 1 2"]),
        ("SEARCH NOT SUBJECT one", "OK", &["* SEARCH 2"]),
        ("SEARCH LARGER 100000", "OK", &["* SEARCH"]),
        ("SEARCH UNSEEN UNDELETED SINCE 1-Jan-2020", "OK", &["* SEARCH 1 2"]),
        ("UID SEARCH UID 2:*", "OK", &["* SEARCH 2"]),
        ("UID FETCH 2 (RFC822.SIZE)", "OK", &["* 2 FETCH (UID 2 RFC822.SIZE "]),
        ("UID FETCH 9:* (UID)", "OK", &["* 2 FETCH (UID 2)"]),
        (
            "FETCH 1:* (FLAGS)",
            "OK",
            &["* 1 FETCH (FLAGS (\\Recent))", "* 2 FETCH (FLAGS (\\Recent))"],
        ),
        (
            "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
            "OK",
            &["* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {"],
        ),
        ("FETCH 1 (INTERNALDATE)", "OK", &["* 1 FETCH (INTERNALDATE \""]),
        (
            "FETCH 1 ENVELOPE",
            "OK",
            &["* 1 FETCH (ENVELOPE (NIL \"one\" ((NIL NIL \"a\" \"remote.test\"))"],
        ),
        (
            "FETCH 2 BODYSTRUCTURE",
            "OK",
            &["* 2 FETCH (BODYSTRUCTURE (\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 13 1"],
        ),
        ("FETCH 2 BODY", "OK", &["* 2 FETCH (BODY (\"TEXT\" \"PLAIN\""]),
        ("FETCH 1 BODY.PEEK[1]", "OK", &["* 1 FETCH (BODY[1] {13}"]),
        ("FETCH 1 BODY.PEEK[1.2]", "OK", &["* 1 FETCH (BODY[1.2] {0}"]),
        ("FETCH 1 BINARY[1]", "NO [CANNOT]", &[]),
        ("FETCH 7 FLAGS", "BAD", &[]),
        (
            "STORE 1 +FLAGS (\\Seen $Work)",
            "OK",
            // A keyword shown first is announced before it is shown.
            &[
                "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)",
                "[PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)]",
                "* 1 FETCH (FLAGS ($Work \\Seen \\Recent))",
            ],
        ),
        ("SEARCH SEEN", "OK", &["* SEARCH 1"]),
        ("SEARCH KEYWORD $Work", "OK", &["* SEARCH 1"]),
        ("SEARCH UNKEYWORD $Work", "OK", &["* SEARCH 2"]),
        (
            "STORE 1 FLAGS (\\Flagged)",
            "OK",
            &["* 1 FETCH (FLAGS (\\Flagged \\Recent))"],
        ),
        ("STORE 1 -FLAGS (\\Flagged)", "OK", &["* 1 FETCH (FLAGS (\\Recent))"]),
        ("STORE 1 +FLAGS ($Case)", "OK", &["* 1 FETCH (FLAGS ($Case \\Recent))"]),
        ("STORE 1 -FLAGS ($CASE)", "OK", &["* 1 FETCH (FLAGS (\\Recent))"]),
        ("SEARCH KEYWORD $case", "OK", &["* SEARCH"]),
        (&long_flag, "NO [LIMIT]", &[]),
        ("FETCH 2 (BODY[TEXT])", "OK", &["FLAGS (\\Seen \\Recent)"]),
        ("SEARCH UNSEEN", "OK", &["* SEARCH 1"]),
        (&many_flags, "NO [LIMIT]", &[]),
        ("COPY 2 Later", "OK [COPYUID ", &[]),
        (
            "STATUS Later (MESSAGES UNSEEN)",
            "OK",
            &["* STATUS Later (MESSAGES 1 UNSEEN 0)"],
        ),
        ("COPY 1 Nope", "NO [TRYCREATE]", &[]),
        ("MOVE 1 Nope", "NO [TRYCREATE]", &[]),
        (
            "STORE 1 +FLAGS (\\Deleted)",
            "OK",
            &["* 1 FETCH (FLAGS (\\Deleted \\Recent))"],
        ),
        ("STORE 1 -FLAGS.SILENT (\\Deleted)", "OK", &["(none)"]),
        ("SEARCH DELETED", "OK", &["* SEARCH"]),
        ("FROB", "BAD", &[]),
        ("EXAMINE INBOX", "OK [READ-ONLY]", &["* 2 EXISTS"]),
        ("STORE 1 +FLAGS (\\Deleted)", "NO [READ-ONLY]", &[]),
        ("MOVE 1 Later", "NO [READ-ONLY]", &[]),
        ("FETCH 1 BODY[TEXT]", "OK", &["* 1 FETCH (BODY[TEXT]"]),
        ("SELECT INBOX", "OK [READ-WRITE]", &["* 2 EXISTS", "[UNSEEN 1]"]),
        ("UID STORE 1 +FLAGS.SILENT (\\Deleted)", "OK", &["(none)"]),
        // The count of recent messages changed: RECENT says so (RFC 3501
        // 7.3.2; imaptest's checkpoints add the sessions' counts up).
        ("EXPUNGE", "OK", &["* 1 EXPUNGE", "* 1 RECENT"]),
        ("UID SEARCH ALL", "OK", &["* SEARCH 2"]),
        ("UID MOVE 2 Later", "OK", &["[COPYUID ", "* 1 EXPUNGE", "* 0 RECENT"]),
        ("UID SEARCH ALL", "OK", &["* SEARCH"]),
        ("SELECT Later", "OK [READ-WRITE]", &["* 2 EXISTS"]),
        ("UID SEARCH ALL", "OK", &["* SEARCH 1 2"]),
        (
            "FETCH 1:* (FLAGS)",
            "OK",
            // Copied and moved here by this session: recent to it.
            &[
                "* 1 FETCH (FLAGS (\\Seen \\Recent))",
                "* 2 FETCH (FLAGS (\\Seen \\Recent))",
            ],
        ),
        ("CHECK", "OK", &[]),
        ("UNSELECT", "OK", &[]),
        ("FETCH 1 FLAGS", "BAD", &[]),
        ("LOGOUT", "OK", &["* BYE"]),
    ];
    for (i, (command, reply, untagged)) in table.iter().enumerate() {
        let tag = format!("t{i}");
        let (got, tagged) = c.cmd(&tag, command).await;
        assert!(
            tagged.starts_with(reply),
            "{command}: want {reply}, got {tagged} (untagged {got:?})"
        );
        for want in *untagged {
            if *want == "(none)" {
                assert!(got.is_empty(), "{command}: untagged {got:?}");
            } else {
                assert!(
                    got.iter().any(|l| l.contains(want)),
                    "{command}: want {want:?} in {got:?}"
                );
            }
        }
    }
    // The expunged message is gone and the moved one is out of INBOX for
    // every session and protocol: POP3 (INBOX only) sees none, and a new
    // IMAP session the same UIDs and stored flags in Later.
    let mut p = quill_harness::Pop3Client::connect(n.pop3()).await.unwrap();
    p.login("bob@example.org", PASSWORD).await.unwrap();
    assert_eq!(p.stat().await.unwrap().0, 0);
    p.quit().await.unwrap();
    let (mut c, _) = Raw::connect(n.imap()).await;
    c.cmd("a", &login).await;
    let (got, tagged) = c.cmd("b", "SELECT INBOX").await;
    assert!(tagged.starts_with("OK"), "{tagged}");
    assert!(
        got.iter().any(|l| l == "* 0 EXISTS") && got.iter().any(|l| l.contains("[UIDNEXT 3]")),
        "{got:?}"
    );
    let (got, _) = c.cmd("c", "SELECT Later").await;
    assert!(got.iter().any(|l| l == "* 2 EXISTS"), "{got:?}");
    let (got, _) = c.cmd("d", "UID FETCH 1:* (FLAGS)").await;
    assert_eq!(
        got,
        ["* 1 FETCH (UID 1 FLAGS (\\Seen))", "* 2 FETCH (UID 2 FLAGS (\\Seen))"]
    );
    // DELETE takes the folder's messages with it.
    let (_, tagged) = c.cmd("e", "DELETE Later").await;
    assert!(tagged.starts_with("OK"), "{tagged}");
    let (got, tagged) = c.cmd("f", "SELECT Later").await;
    assert!(tagged.starts_with("NO [NONEXISTENT]"), "{tagged} {got:?}");
    let (_, tagged) = c.cmd("g", "CREATE Later").await;
    assert!(tagged.starts_with("OK"), "{tagged}");
    let (got, _) = c.cmd("h", "STATUS Later (MESSAGES)").await;
    assert_eq!(got, ["* STATUS Later (MESSAGES 0)"]);
    // A folder deleted under a session that has it selected: its
    // messages are expunged at the next NOOP.
    let (_, tagged) = c.cmd("i", "APPEND Later {5+}\r\nhello").await;
    assert!(tagged.starts_with("OK [APPENDUID"), "{tagged}");
    let (mut other, _) = Raw::connect(n.imap()).await;
    other.cmd("a", &login).await;
    let (got, _) = other.cmd("b", "SELECT Later").await;
    assert!(got.iter().any(|l| l == "* 1 EXISTS"), "{got:?}");
    let (_, tagged) = c.cmd("j", "DELETE Later").await;
    assert!(tagged.starts_with("OK"), "{tagged}");
    let (got, tagged) = other.cmd("c", "NOOP").await;
    assert!(tagged.starts_with("OK"), "{tagged}");
    assert_eq!(got, ["* 1 EXPUNGE"]);
}

/// APPEND (synchronizing and LITERAL+), APPENDUID, the literal size limit,
/// bad syntax, AUTHENTICATE PLAIN, the bad-command limit (20) and the
/// failed-login limit (3 a session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_literals_and_limits() {
    let (_d, n) = node(
        "imap-limits",
        &["--max-message-size", "1000", "--max-imap-sessions-per-user", "2"],
    )
    .await;
    let (mut c, _) = Raw::connect(n.imap()).await;
    // SASL-IR: the PLAIN response on the command line.
    let plain = quill_proto::sasl::plain_response("bob@example.org", PASSWORD);
    let (_, tagged) = c.cmd("a", &format!("AUTHENTICATE PLAIN {plain}")).await;
    assert!(tagged.starts_with("OK"), "{tagged}");
    let msg = b"Subject: appended\r\n\r\nhello\r\n";
    c.send(format!("b APPEND INBOX {{{}}}\r\n", msg.len()).as_bytes()).await;
    let go = c.line().await;
    assert!(go.starts_with('+'), "{go}");
    c.send(msg).await;
    c.send(b"\r\n").await;
    let (_, tagged) = c.until("b").await;
    assert!(tagged.starts_with("OK [APPENDUID "), "{tagged}");
    assert!(tagged.contains(" 1] "), "{tagged}");
    c.send(format!("c APPEND INBOX (\\Deleted) {{{}+}}\r\n", msg.len()).as_bytes())
        .await;
    c.send(msg).await;
    c.send(b"\r\n").await;
    let (_, tagged) = c.until("c").await;
    assert!(tagged.contains(" 2] "), "{tagged}");
    // Over the message size limit: refused before the client sends it.
    let (_, tagged) = c.cmd("d", "APPEND INBOX {5000}").await;
    assert!(tagged.starts_with("BAD"), "{tagged}");
    let (got, tagged) = c.cmd("e", "STATUS INBOX (MESSAGES UIDNEXT)").await;
    assert!(tagged.starts_with("OK"), "{tagged}");
    assert_eq!(got, ["* STATUS INBOX (MESSAGES 2 UIDNEXT 3)"]);
    // APPEND's flags are stored; a folder that does not exist wants CREATE.
    let (got, _) = c.cmd("e2", "STATUS INBOX (DELETED UNSEEN)").await;
    assert_eq!(got, ["* STATUS INBOX (DELETED 1 UNSEEN 2)"]);
    let (_, tagged) = c.cmd("e3", "APPEND Nope {5+}\r\nhello").await;
    assert!(tagged.starts_with("NO [TRYCREATE]"), "{tagged}");
    let (_, tagged) = c.cmd("f", "APPEND Later {1+}\r\nx").await;
    assert!(tagged.starts_with("NO [TRYCREATE]"), "{tagged}");
    // Bad lines: BAD each, and BYE at the limit (20, the refused literal
    // above was the first).
    for i in 0..18 {
        let (_, tagged) = c.cmd(&format!("g{i}"), "SELECT").await;
        assert!(tagged.starts_with("BAD"), "{tagged}");
    }
    c.send(b"h )(\r\n").await;
    let (got, tagged) = c.until("h").await;
    assert!(tagged.starts_with("BAD"), "{tagged}");
    let bye = if got.is_empty() { c.line().await } else { got[0].clone() };
    assert!(bye.starts_with("* BYE"), "{bye}");

    // Sessions per user: two at once here; a third is refused until one
    // ends.
    let login = format!("LOGIN bob@example.org \"{PASSWORD}\"");
    let (mut s1, _) = Raw::connect(n.imap()).await;
    assert!(s1.cmd("a", &login).await.1.starts_with("OK"));
    let (mut s2, _) = Raw::connect(n.imap()).await;
    assert!(s2.cmd("a", &login).await.1.starts_with("OK"));
    let (mut s3, _) = Raw::connect(n.imap()).await;
    let (_, tagged) = s3.cmd("a", &login).await;
    assert!(tagged.starts_with("NO [LIMIT]"), "{tagged}");
    s1.cmd("z", "LOGOUT").await;
    drop(s1);
    common::wait_for("a session slot back", Duration::from_secs(10), || {
        let addr = n.imap();
        let login = login.clone();
        async move {
            let (mut s, _) = Raw::connect(addr).await;
            s.cmd("a", &login).await.1.starts_with("OK")
        }
    })
    .await;
    drop((s2, s3));

    // Failed logins: NO, and BYE after the third in one session.
    let (mut c, _) = Raw::connect(n.imap()).await;
    for t in ["x1", "x2"] {
        let (_, tagged) = c.cmd(t, "LOGIN bob@example.org nope").await;
        assert!(tagged.starts_with("NO [AUTHENTICATIONFAILED]"), "{tagged}");
    }
    let (got, tagged) = c.cmd("x3", "LOGIN bob@example.org nope").await;
    assert!(tagged.starts_with("NO"), "{tagged}");
    let bye = match got.first() {
        Some(l) => l.clone(),
        None => c.line().await,
    };
    assert!(bye.starts_with("* BYE"), "{bye}");
}

const PY_TLS: &str = r#"
import imaplib, socket, ssl, subprocess, sys
host, port, ports, cafile, user, pw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
ctx = ssl.create_default_context(cafile=cafile)
ctx.check_hostname = False
m = imaplib.IMAP4(host, port)
assert "LOGINDISABLED" in m.capabilities and "AUTH=PLAIN" not in m.capabilities, m.capabilities
try:
    m.login(user, pw)
    raise SystemExit("plaintext LOGIN accepted")
except imaplib.IMAP4.error as e:
    assert "PRIVACYREQUIRED" in str(e), e
m.starttls(ssl_context=ctx)
assert "LOGINDISABLED" not in m.capabilities, m.capabilities
m.login(user, pw)
typ, data = m.select("INBOX")
assert typ == "OK", (typ, data)
m.logout()
s = imaplib.IMAP4_SSL(host, ports, ssl_context=ctx)
s.login(user, pw)
assert s.select("INBOX")[0] == "OK"
s.logout()
# Injection: a command pipelined behind STARTTLS is never executed.
raw = socket.create_connection((host, port))
f = raw.makefile("rb")
f.readline()
raw.sendall(b"a STARTTLS\r\nb LOGIN " + user.encode() + b" " + pw.encode() + b"\r\n")
line = f.readline()
assert line.startswith(b"a OK"), line
t = ctx.wrap_socket(raw, server_hostname="localhost")
tf = t.makefile("rb")
t.sendall(b"c NOOP\r\n")
line = tf.readline()
assert line.startswith(b"c OK"), ("the injected LOGIN was executed", line)
t.sendall(b"d SELECT INBOX\r\n")
line = tf.readline()
assert line.startswith(b"d BAD"), ("the injected LOGIN logged in", line)
t.close()
print("imap tls ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_openssl_over_starttls_and_implicit_tls() {
    if !testkit::program("python3") || !testkit::program("openssl") {
        return;
    }
    let (_d, n) = node("imap-tls", &["--plaintext-auth", "never"]).await;
    let cert = n.self_signed_cert();
    let (imap, imaps) = (n.imap(), n.imaps());
    let ca = cert.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new("python3").args([
            "-c",
            PY_TLS,
            &imap.ip().to_string(),
            &imap.port().to_string(),
            &imaps.port().to_string(),
            ca.to_str().unwrap(),
            "bob@example.org",
            PASSWORD,
        ]))
    })
    .await
    .unwrap();
    assert!(out.contains("imap tls ok"), "{out}");
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-starttls",
                "imap",
                "-connect",
                &imap.to_string(),
                "-CAfile",
            ])
            .arg(&cert)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"a CAPABILITY\r\nb LOGOUT\r\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    })
    .await
    .unwrap();
    assert!(out.contains("AUTH=PLAIN") && out.contains("* BYE"), "{out}");
    assert!(
        out.contains("verify return:1") || out.contains("Verify return code: 0"),
        "{out}"
    );
}

const SECRET: &str = "imap-test-secret";

const PY_CLUSTER: &str = r#"
import imaplib, json, smtplib, sys, time
a_host, a_port, b_host, b_port, b_smtp, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
def view(m):
    typ, data = m.select("INBOX")
    assert typ == "OK", (typ, data)
    validity = m.untagged_responses["UIDVALIDITY"][-1]
    typ, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    uids = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(item[0].split(b"UID ")[1].split()[0])
            uids[uid] = item[1].decode().strip()
    return validity.decode(), uids
a = imaplib.IMAP4(a_host, a_port); a.login(user, pw)
b = imaplib.IMAP4(b_host, b_port); b.login(user, pw)
va, ua = view(a)
vb, ub = view(b)
assert (va, ua) == (vb, ub), ((va, ua), (vb, ub))
assert len(ua) == 3, ua
# APPEND through B: its UID is the next one, seen by A at its next NOOP.
typ, data = b.append("INBOX", None, None, b"Subject: appended\r\n\r\nx\r\n")
assert typ == "OK" and b"APPENDUID" in data[0], data
appended = int(data[0].split()[2].rstrip(b"]"))
assert appended == max(ua) + 1, (appended, ua)
deadline = time.time() + 10
while time.time() < deadline:
    a.noop()
    if a.untagged_responses.get("EXISTS", [b"0"])[-1] == b"4":
        break
    time.sleep(0.1)
else:
    raise SystemExit("A never saw the APPEND made through B")
# IDLE on A sees a delivery made through B's SMTP, then an expunge made
# through B.
tag = a._new_tag()
a.send(tag + b" IDLE\r\n")
assert a.readline().startswith(b"+"), "IDLE not accepted"
a.sock.settimeout(15)
t0 = time.time()
smtplib.SMTP(b_host, int(b_smtp)).sendmail("x@remote.test", [user], "Subject: during idle\r\n\r\nidle\r\n")
line = a.readline()
while b"EXISTS" not in line:
    line = a.readline()
idle_seen = time.time() - t0
assert line.strip() == b"* 5 EXISTS", line
b.noop()
b.uid("STORE", "1", "+FLAGS.SILENT", "(\\Deleted)")
typ, data = b.expunge()
assert typ == "OK" and data == [b"1"], (typ, data)
line = a.readline()
while b"EXPUNGE" not in line:
    line = a.readline()
assert line.strip() == b"* 1 EXPUNGE", line
# A flag stored through B reaches A's IDLE.
t1 = time.time()
b.uid("STORE", "2", "+FLAGS", "(\\Flagged)")
line = a.readline()
while b"FETCH" not in line:
    line = a.readline()
flag_seen = time.time() - t1
assert b"UID 2" in line and b"\\Flagged" in line, line
a.send(b"DONE\r\n")
line = a.readline()
while not line.startswith(tag):
    line = a.readline()
assert b"OK" in line, line
va, ua = view(a)
vb, ub = view(b)
assert (va, ua) == (vb, ub), ((va, ua), (vb, ub))
assert 1 not in ua and len(ua) == 4, ua
# A folder made through B, a message moved into it through B: A's NOOP
# sees it leave INBOX, and finds it in the folder under the UID B's
# COPYUID named; a flag set through A is seen through B.
typ, data = b.create("Keep")
assert typ == "OK", data
typ, data = b.uid("MOVE", "3", "Keep")
assert typ == "OK", (typ, data)
arch_validity, src, dst = b.untagged_responses["COPYUID"][-1].split()
assert src == b"3", (src, dst)
deadline = time.time() + 10
while time.time() < deadline:
    a.noop()
    if a.untagged_responses.pop("EXPUNGE", None):
        break
    time.sleep(0.1)
else:
    raise SystemExit("A never saw the MOVE made through B")
typ, data = a.select("Keep")
assert typ == "OK" and a.untagged_responses["UIDVALIDITY"][-1] == arch_validity, (typ, data)
typ, data = a.uid("FETCH", dst.decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
assert data[0][1].decode().strip() == ua[3], (data, ua)
typ, data = a.uid("STORE", dst.decode(), "+FLAGS", "(\\Seen $Done)")
assert typ == "OK", data
b.select("Keep")
typ, data = b.uid("FETCH", dst.decode(), "(FLAGS)")
assert b"\\Seen" in data[0] and b"$Done" in data[0], data
va, ua = view(a)
vb, ub = view(b)
assert (va, ua) == (vb, ub) and 3 not in ua, ((va, ua), (vb, ub))
a.logout(); b.logout()
print(json.dumps({"validity": va, "uids": {str(k): v for k, v in ua.items()}, "idle_seen_s": idle_seen, "flag_seen_s": flag_seen}))
"#;

const PY_VIEW: &str = r#"
import imaplib, json, re, sys
m = imaplib.IMAP4(sys.argv[1], int(sys.argv[2])); m.login(sys.argv[3], sys.argv[4])
out = {}
for folder in ["INBOX", "Keep"]:
    typ, data = m.select(folder)
    assert typ == "OK", (typ, data)
    validity = m.untagged_responses["UIDVALIDITY"][-1].decode()
    typ, data = m.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    uids = {}
    for item in data:
        if isinstance(item, tuple):
            uid = item[0].split(b"UID ")[1].split()[0].decode()
            flags = re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode()
            uids[uid] = item[1].decode().strip() + " | " + flags
    out[folder] = {"validity": validity, "uids": uids}
m.logout()
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_on_two_nodes_sees_the_same_uids_through_idle_and_a_kill() {
    let _slot = common::cluster_slot().await;
    if !testkit::program("python3") {
        return;
    }
    let dir = TempDir::new("imap-cluster").expect("temp dir");
    let mut nodes = process::start_cluster(dir.path(), 3, SECRET, "info")
        .await
        .expect("cluster starts");
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    process::wait_converged(&all, 3, Duration::from_secs(60))
        .await
        .expect("converges");
    nodes[0].add_domain("example.org").await.unwrap();
    nodes[0].add_user("carol@example.org", PASSWORD, None).await.unwrap();
    common::wait_user_on_every_node(&nodes, "carol@").await;
    for s in ["first", "second", "third"] {
        common::smtp_to(&nodes[0], "carol@example.org", s).await;
    }
    let (a, b) = (nodes[0].imap(), nodes[1].imap());
    let args = vec![
        a.ip().to_string(),
        a.port().to_string(),
        b.ip().to_string(),
        b.port().to_string(),
        nodes[1].smtp().port().to_string(),
        "carol@example.org".to_owned(),
        PASSWORD.to_owned(),
    ];
    let before = tokio::task::spawn_blocking(move || common::python_json(PY_CLUSTER, args))
        .await
        .unwrap();
    eprintln!(
        "IDLE saw the delivery after {} s, the flag after {} s",
        before["idle_seen_s"], before["flag_seen_s"]
    );
    // Generous (a loaded 2-core CI machine): the aim is 1 s, measured in
    // BENCHMARKS.md; this only catches a change that is never announced.
    // Changes are told (a safety look comes only after 30 s): a delivery
    // and a flag change made through another node are seen well before.
    assert!(before["flag_seen_s"].as_f64().unwrap() < 5.0, "{before}");
    assert!(before["idle_seen_s"].as_f64().unwrap() < 5.0, "{before}");
    let view_of = |n: &NodeProcess| {
        let addr = n.imap();
        let args = vec![
            addr.ip().to_string(),
            addr.port().to_string(),
            "carol@example.org".to_owned(),
            PASSWORD.to_owned(),
        ];
        tokio::task::spawn_blocking(move || common::python_json(PY_VIEW, args))
    };
    // kill -9 of node 2 between sessions: the survivors show the same
    // UIDs, UIDVALIDITY and flags in both folders, and so does node 2
    // once it is back.
    let first = view_of(&nodes[0]).await.unwrap();
    assert_eq!(first["INBOX"]["validity"], before["validity"]);
    let subjects: serde_json::Map<String, serde_json::Value> = first["INBOX"]["uids"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().split(" | ").next().unwrap().into()))
        .collect();
    assert_eq!(serde_json::Value::Object(subjects), before["uids"]);
    assert!(
        first["INBOX"]["uids"]["2"].as_str().unwrap().contains("\\Flagged"),
        "{first}"
    );
    let archived = first["Keep"]["uids"].as_object().unwrap();
    assert_eq!(archived.len(), 1, "{first}");
    assert!(
        archived.values().all(|v| v.as_str().unwrap().contains("$Done")),
        "{first}"
    );
    nodes[1].kill9().await.unwrap();
    for k in [0, 2] {
        let v = view_of(&nodes[k]).await.unwrap();
        assert_eq!(v, first, "node {k}");
    }
    nodes[1].restart().await.unwrap();
    let v = view_of(&nodes[1]).await.unwrap();
    assert_eq!(v, first);
    a_keyword_is_told_to_every_session_of_the_folder(&nodes).await;
}

/// RFC 3501 7.2.6 as imaptest's checkpoints hold a server to it: a
/// keyword set through one node and cleared again is in the FLAGS of a
/// session selected on another node (told at its NOOP) and of a session
/// that selects the folder later, though no message carries it any more.
async fn a_keyword_is_told_to_every_session_of_the_folder(nodes: &[NodeProcess]) {
    let login = format!("LOGIN carol@example.org \"{PASSWORD}\"");
    let session = |n: &NodeProcess| {
        let (addr, login) = (n.imap(), login.clone());
        async move {
            let (mut c, _) = Raw::connect(addr).await;
            assert!(c.cmd("l", &login).await.1.starts_with("OK"));
            let (lines, ok) = c.cmd("s", "SELECT INBOX").await;
            assert!(ok.starts_with("OK"), "{ok}");
            (c, lines)
        }
    };
    let (mut watcher, _) = session(&nodes[1]).await;
    let (mut setter, _) = session(&nodes[0]).await;
    let (_, ok) = setter.cmd("a", "STORE 1 +FLAGS.SILENT ($Gone)").await;
    assert!(ok.starts_with("OK"), "{ok}");
    let (_, ok) = setter.cmd("b", "STORE 1 -FLAGS.SILENT ($Gone)").await;
    assert!(ok.starts_with("OK"), "{ok}");
    let flags_with_gone = |lines: &[String]| lines.iter().any(|l| l.starts_with("* FLAGS (") && l.contains("$Gone"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (lines, ok) = watcher.cmd("n", "NOOP").await;
        assert!(ok.starts_with("OK"), "{ok}");
        if flags_with_gone(&lines) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never told of $Gone: {lines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // On the node that has applied the definition (a lagging node would
    // tell it at its first NOOP instead).
    let (_, lines) = session(&nodes[1]).await;
    assert!(flags_with_gone(&lines), "a later SELECT: {lines:?}");
}

fn mbsync_config(dir: &std::path::Path, node: &NodeProcess) -> std::path::PathBuf {
    let rc = dir.join(format!("mbsyncrc-{}", node.opts.ip));
    let imap = node.imap();
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount q\nHost {}\nPort {}\nUser user0001@example.com\nPass pass0001\nSSLType None\nAuthMechs LOGIN\n\n\
             IMAPStore far\nAccount q\n\nMaildirStore near\nPath {maildir}/\nInbox {maildir}/INBOX\n\n\
             Channel q\nFar :far:\nNear :near:\nPatterns INBOX\nCreate Near\nSync All\nExpunge Both\nSyncState *\n",
            imap.ip(),
            imap.port(),
            maildir = dir.join("mail").display(),
        ),
    )
    .unwrap();
    rc
}

/// The near side's messages by Message-ID (a duplicate would show twice).
fn near_ids(dir: &std::path::Path) -> Vec<String> {
    let mut ids = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(dir.join("mail/INBOX").join(sub)) else {
            continue;
        };
        for e in entries {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            let id = text
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
                .unwrap_or("")
                .to_owned();
            ids.push(id);
        }
    }
    ids.sort();
    ids
}

async fn far_count(node: &NodeProcess) -> u32 {
    let (mut c, _) = Raw::connect(node.imap()).await;
    c.cmd("a", "LOGIN user0001@example.com pass0001").await;
    let (got, _) = c.cmd("b", "STATUS INBOX (MESSAGES)").await;
    let n = got[0].rsplit_once("MESSAGES ").unwrap().1.trim_end_matches(')');
    n.parse().unwrap()
}

/// mbsync (isync, nobody here wrote it) syncs a mailbox of 1 000 messages
/// down from one node, then deletions back up through another node (the
/// UIDs and UIDVALIDITY being the same there, it carries on with its sync
/// state), twice, with new mail in between: no duplicate, no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbsync_syncs_a_thousand_messages_down_and_deletions_back_up_through_another_node() {
    let _slot = common::cluster_slot().await;
    if !testkit::program("mbsync") {
        return;
    }
    let dir = TempDir::new("imap-mbsync").expect("temp dir");
    let nodes = process::start_cluster(dir.path(), 3, SECRET, "info")
        .await
        .expect("cluster starts");
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    process::wait_converged(&all, 3, Duration::from_secs(60))
        .await
        .expect("converges");
    nodes[0].add_domain("example.com").await.unwrap();
    nodes[0]
        .add_user("user0001@example.com", "pass0001", None)
        .await
        .unwrap();
    common::wait_user_on_every_node(&nodes, "user0001@").await;
    let deliver = |node: &NodeProcess, n: u64, seed: u64| {
        let plan = quill_harness::bench::DeliverPlan::bench(vec![node.lmtp()], true, n, 4, 1, seed);
        quill_harness::bench::deliver(plan)
    };
    let d = deliver(&nodes[0], 1000, 1).await;
    assert_eq!(d.acked.len(), 1000, "{:?}", d.errors.first());
    let mbsync = |rc: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            run(Command::new("mbsync").arg("-c").arg(rc).arg("q"));
        })
    };
    let work = dir.path().to_owned();
    std::fs::create_dir_all(work.join("mail")).unwrap();
    mbsync(mbsync_config(&work, &nodes[0])).await.unwrap();
    let ids = near_ids(&work);
    assert_eq!(ids.len(), 1000);
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), 1000, "duplicates on the near side");

    for round in 0..2u64 {
        // Delete 100 near-side messages; sync through another node.
        let mut gone = 0;
        for sub in ["new", "cur"] {
            for e in std::fs::read_dir(work.join("mail/INBOX").join(sub)).unwrap() {
                if gone < 100 {
                    std::fs::remove_file(e.unwrap().path()).unwrap();
                    gone += 1;
                }
            }
        }
        let before = far_count(&nodes[0]).await;
        let via = &nodes[1 + round as usize];
        mbsync(mbsync_config(&work, via)).await.unwrap();
        assert_eq!(
            far_count(&nodes[0]).await,
            before - 100,
            "round {round}: deletions did not go up"
        );
        // New mail through a third node, synced down through the first.
        let d = deliver(&nodes[2 - round as usize], 150, 10 + round).await;
        assert_eq!(d.acked.len(), 150);
        mbsync(mbsync_config(&work, &nodes[0])).await.unwrap();
        let ids = near_ids(&work);
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "round {round}: duplicates");
        assert_eq!(
            ids.len() as u32,
            far_count(&nodes[1]).await,
            "round {round}: near and far differ"
        );
    }
    assert_eq!(near_ids(&work).len(), 1000 - 100 + 150 - 100 + 150);

    // Flags both ways: 10 messages flagged and read on the near side go up
    // through node 2; 5 flagged on the far side through node 3 come down
    // through node 1.
    let mut marked = 0;
    for sub in ["new", "cur"] {
        for e in std::fs::read_dir(work.join("mail/INBOX").join(sub)).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if marked == 10 || name.contains(",F") {
                continue;
            }
            let base = name.split(':').next().unwrap();
            std::fs::rename(&path, work.join("mail/INBOX/cur").join(format!("{base}:2,FS"))).unwrap();
            marked += 1;
        }
    }
    mbsync(mbsync_config(&work, &nodes[1])).await.unwrap();
    assert_eq!(
        far_search(&nodes[2], "FLAGGED SEEN").await.len(),
        10,
        "near flags went up"
    );
    let unflagged = far_search(&nodes[2], "UNFLAGGED").await;
    {
        let (mut c, _) = Raw::connect(nodes[2].imap()).await;
        c.cmd("a", "LOGIN user0001@example.com pass0001").await;
        c.cmd("b", "SELECT INBOX").await;
        let set = unflagged[..5].join(",");
        let (_, tagged) = c.cmd("c", &format!("UID STORE {set} +FLAGS.SILENT (\\Flagged)")).await;
        assert!(tagged.starts_with("OK"), "{tagged}");
    }
    mbsync(mbsync_config(&work, &nodes[0])).await.unwrap();
    let flagged_near = ["new", "cur"]
        .iter()
        .flat_map(|sub| std::fs::read_dir(work.join("mail/INBOX").join(sub)).unwrap())
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name().to_string_lossy().into_owned();
            name.rsplit_once(":2,").is_some_and(|(_, f)| f.contains('F'))
        })
        .count();
    assert_eq!(flagged_near, 15, "far flags came down");
    assert_eq!(far_search(&nodes[0], "FLAGGED").await.len(), 15);
}

/// UIDs of the far INBOX matching a SEARCH.
async fn far_search(node: &NodeProcess, criteria: &str) -> Vec<String> {
    let (mut c, _) = Raw::connect(node.imap()).await;
    c.cmd("a", "LOGIN user0001@example.com pass0001").await;
    c.cmd("b", "SELECT INBOX").await;
    let (got, _) = c.cmd("c", &format!("UID SEARCH {criteria}")).await;
    got[0]
        .trim_start_matches("* SEARCH")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}
