//! SMTP, LMTP and POP3 behaviour of one node, through real sockets.

mod common;

use common::{PASSWORD, node};
use quill_harness::client::strip_received;
use quill_harness::{Pop3Client, SmtpClient};

const MSG: &[u8] = b"Subject: hello\r\n\r\nfirst line\r\n.starts with a dot\r\n..two dots\r\n\r\nlast\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_in_pop3_out_byte_exact() {
    let (_d, node) = node("roundtrip", &[]).await;
    let mut s = SmtpClient::connect(node.smtp(), false).await.unwrap();
    for ext in [
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
    ] {
        assert!(s.ehlo.text.contains(ext), "EHLO lacks {ext}: {}", s.ehlo.text);
    }
    let r = s.send_mail("x@remote.test", &["Alice@Example.org"], MSG).await.unwrap();
    assert_eq!(r[0].code, 250, "{r:?}");
    s.quit().await.unwrap();

    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    p.login("alice@example.org", PASSWORD).await.unwrap();
    let (n, octets) = p.stat().await.unwrap();
    assert_eq!(n, 1);
    let got = p.retr(1).await.unwrap();
    assert_eq!(got.len() as u64, octets, "STAT octets are the exact size");
    assert_eq!(
        strip_received(&got).expect("a Received header first"),
        MSG,
        "body comes back byte for byte"
    );
    let received = String::from_utf8_lossy(&got[..got.len() - MSG.len()]).into_owned();
    assert!(
        received.contains("with ESMTP id") && received.contains("for <alice@example.org>"),
        "{received}"
    );
    let top = p.top(1, 1).await.unwrap();
    assert!(
        top.ends_with(b"\r\n\r\nfirst line\r\n"),
        "TOP 1 1 gives headers and one line: {top:?}"
    );
    p.quit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lmtp_replies_per_recipient_and_stores_body_once() {
    let (_d, node) = node("lmtp", &[]).await;
    let mut s = SmtpClient::connect(node.lmtp(), true).await.unwrap();
    let r = s
        .send_mail(
            "x@remote.test",
            &["alice@example.org", "bob@example.org", "carol@example.org"],
            MSG,
        )
        .await;
    let r = r.unwrap();
    assert_eq!(r.len(), 3, "one reply per recipient: {r:?}");
    for (reply, who) in r.iter().zip(["alice", "bob", "carol"]) {
        assert_eq!(reply.code, 250, "{reply:?}");
        assert!(reply.text.contains(&format!("<{who}@example.org>")), "{reply:?}");
    }
    // EHLO is not LMTP.
    let (mut raw, _) = SmtpClient::connect_raw(node.lmtp()).await.unwrap();
    assert_eq!(raw.command("EHLO x").await.unwrap().code, 500);
    assert_eq!(
        node.metric("quill_store_entries").await.unwrap(),
        3.0,
        "three mailbox entries"
    );
    assert_eq!(
        node.metric("quill_store_bodies").await.unwrap(),
        1.0,
        "one body for three recipients"
    );
    for who in ["alice", "bob", "carol"] {
        let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
        p.login(&format!("{who}@example.org"), PASSWORD).await.unwrap();
        let got = p.retr(1).await.unwrap();
        assert_eq!(strip_received(&got).unwrap(), MSG);
        p.quit().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_replies_follow_rfc5321() {
    let (_d, node) = node("smtp-replies", &[]).await;
    node.add_user("postmaster@example.org", common::PASSWORD, None)
        .await
        .unwrap();
    let (mut s, greeting) = SmtpClient::connect_raw(node.smtp()).await.unwrap();
    assert_eq!(greeting.code, 220);
    let table: &[(&str, u16, &str)] = &[
        ("MAIL FROM:<a@b.test>", 503, "5.5.1"),
        ("HELO client.test", 250, ""),
        ("RCPT TO:<alice@example.org>", 503, "5.5.1"),
        ("DATA", 503, "5.5.1"),
        ("MAIL FROM:<a@b.test>", 250, "2.1.0"),
        ("MAIL FROM:<a@b.test>", 503, "5.5.1"),
        ("RCPT TO:<nobody@example.org>", 550, "5.1.1"),
        ("RCPT TO:<someone@elsewhere.test>", 550, "5.7.1"),
        ("RCPT TO:<alice@example.org>", 250, "2.1.5"),
        ("RCPT TO:<Postmaster>", 250, "2.1.5"),
        ("RCPT TO:<>", 501, "5.1.3"),
        ("VRFY alice", 252, "2.5.0"),
        ("NOOP", 250, "2.0.0"),
        ("HELP", 214, "2.0.0"),
        ("EXPN list", 502, "5.5.1"),
        ("STARTTLS now", 501, "5.5.4"),
        ("FOO bar", 500, "5.5.1"),
        ("RCPT TO:alice", 501, "5.5.4"),
        ("RSET", 250, "2.0.0"),
        ("DATA", 503, "5.5.1"),
        ("EHLO client.test", 250, ""),
        ("MAIL FROM:<> SIZE=100", 250, "2.1.0"),
        ("RSET", 250, "2.0.0"),
        ("MAIL FROM:<a@b.test> FOO=bar", 555, "5.5.4"),
        ("QUIT", 221, "2.0.0"),
    ];
    for (cmd, code, enhanced) in table {
        let r = s.command(cmd).await.unwrap();
        assert_eq!(r.code, *code, "{cmd} -> {r:?}");
        assert!(r.text.contains(enhanced), "{cmd} -> {r:?} lacks {enhanced}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_transaction_gets_replies_in_order() {
    let (_d, node) = node("pipelining", &[]).await;
    let (mut s, _) = SmtpClient::connect_raw(node.smtp()).await.unwrap();
    let batch = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n";
    let first = s.raw(batch).await.unwrap();
    assert_eq!(first.code, 250);
    let mut codes = vec![];
    for _ in 0..4 {
        codes.push(s.read_reply().await.unwrap().code);
    }
    assert_eq!(codes, vec![250, 250, 550, 354]);
    let r = s.raw(b"Subject: p\r\n\r\nx\r\n.\r\n").await.unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    // The load generator's pipelined transactions (bench --pipelining),
    // over SMTP and LMTP: delivered; a refused recipient is an error by
    // name and the session goes on.
    for (addr, lmtp) in [(node.smtp(), false), (node.lmtp(), true)] {
        let mut c = SmtpClient::connect(addr, lmtp).await.unwrap();
        let r = c
            .send_mail_pipelined("x@remote.test", &["alice@example.org", "bob@example.org"], MSG)
            .await
            .unwrap();
        assert!(
            r.iter().all(|r| r.code == 250) && r.len() == if lmtp { 2 } else { 1 },
            "{r:?}"
        );
        let e = c
            .send_mail_pipelined("x@remote.test", &["alice@example.org", "nobody@example.org"], MSG)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nobody@example.org"), "{e}");
        let r = c
            .send_mail_pipelined("x@remote.test", &["bob@example.org"], MSG)
            .await
            .unwrap();
        assert_eq!(r[0].code, 250, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_deletes_only_at_quit_and_uidls_are_stable() {
    let (_d, mut node) = node("pop3", &[]).await;
    let mut s = SmtpClient::connect(node.smtp(), false).await.unwrap();
    for i in 0..3 {
        let body = format!("Subject: {i}\r\n\r\nbody {i}\r\n");
        s.send_mail("x@remote.test", &["bob@example.org"], body.as_bytes())
            .await
            .unwrap();
    }
    s.quit().await.unwrap();

    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    p.login("bob@example.org", PASSWORD).await.unwrap();
    let uidls = p.uidl().await.unwrap();
    assert_eq!(uidls.len(), 3);
    // A second session on the same mailbox is refused.
    let mut q = Pop3Client::connect(node.pop3()).await.unwrap();
    q.command("USER bob@example.org").await.unwrap();
    let r = q.command(&format!("PASS {PASSWORD}")).await.unwrap();
    assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
    p.dele(1).await.unwrap();
    assert!(
        p.command("RETR 1").await.unwrap().starts_with("-ERR"),
        "a deleted message can't be read"
    );
    assert!(
        p.command("DELE 1").await.unwrap().starts_with("-ERR"),
        "nor deleted twice"
    );
    assert!(p.command("RETR 9").await.unwrap().starts_with("-ERR"));
    assert_eq!(p.stat().await.unwrap().0, 2);
    assert!(p.command("RSET").await.unwrap().starts_with("+OK"));
    assert_eq!(p.stat().await.unwrap().0, 3, "RSET unmarks");
    p.dele(1).await.unwrap();
    drop(p); // connection lost without QUIT: nothing is deleted

    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    common::wait_for(
        "the lock of the dropped session to go",
        std::time::Duration::from_secs(10),
        || async {
            let mut t = Pop3Client::connect(node.pop3()).await.unwrap();
            let ok = t.login("bob@example.org", PASSWORD).await.is_ok();
            // QUIT releases the lock before its +OK; a dropped connection
            // only once the node has seen it go (the login below raced it).
            if ok {
                t.quit().await.unwrap();
            }
            ok
        },
    )
    .await;
    p.login("bob@example.org", PASSWORD).await.unwrap();
    assert_eq!(p.uidl().await.unwrap(), uidls, "no QUIT, no deletion; same UIDLs");
    p.dele(2).await.unwrap();
    p.quit().await.unwrap();

    node.restart().await.unwrap();
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    p.login("bob@example.org", PASSWORD).await.unwrap();
    let after = p.uidl().await.unwrap();
    let want: Vec<String> = vec![uidls[0].1.clone(), uidls[2].1.clone()];
    assert_eq!(
        after.iter().map(|(_, u)| u.clone()).collect::<Vec<_>>(),
        want,
        "UIDLs survive restart"
    );
    p.quit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_auth_plain_and_capa() {
    let (_d, node) = node("pop3-auth", &["--default-login-domain", "example.org"]).await;
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    let capa = p.capa().await.unwrap();
    for c in ["USER", "SASL PLAIN", "TOP", "UIDL", "RESP-CODES", "PIPELINING"] {
        assert!(capa.iter().any(|l| l == c), "CAPA lacks {c}: {capa:?}");
    }
    // AUTH PLAIN with a continuation; "\0alice@example.org\0correct horse".
    let r = p.command("AUTH PLAIN").await.unwrap();
    assert_eq!(r, "+");
    let r = p.command("AGFsaWNlQGV4YW1wbGUub3JnAGNvcnJlY3QgaG9yc2U=").await.unwrap();
    assert!(r.starts_with("+OK"), "{r}");
    assert!(p.quit().await.is_ok());
    let mut p = Pop3Client::connect(node.pop3()).await.unwrap();
    let r = p.command("AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHdyb25n").await.unwrap();
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert!(
        p.command("STAT").await.unwrap().starts_with("-ERR"),
        "STAT needs a login"
    );
}
