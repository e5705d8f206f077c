//! The checks of mail arriving on `--smtp` against a real DNS server
//! (dnsmasq serving SPF, DKIM and DMARC records) with an outside signer
//! (Python's dkimpy): SPF pass, fail, softfail, none; DKIM pass, body
//! changed, key missing, malformed; DMARC reject refused, quarantine in
//! Junk; a forged Authentication-Results taken out; SPF records that
//! recurse or pass the 10-lookup limit; a header folded to great length;
//! a DNS server that never answers; `--auth-policy tag`; trusted networks.

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use quill_harness::SmtpClient;
use quill_harness::process::NodeProcess;

const AUTHSERV: &str = "mx.quill.test";

/// dnsmasq's TXT record for `name`: `text` in strings of at most 255
/// bytes (a DKIM key is longer); on its command line, quotes would be
/// kept and commas separate the strings.
fn txt(name: &str, text: &str) -> String {
    let parts: Vec<String> = text
        .as_bytes()
        .chunks(200)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("--txt-record={name},{}", parts.join(","))
}

/// An RSA key made by openssl: (private key PEM path, DKIM `p=` value).
fn rsa_key(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let key = dir.join("dkim.pem");
    common::run(Command::new("openssl").args(["genrsa", "-out", key.to_str().unwrap(), "2048"]));
    let out = Command::new("openssl")
        .args(["rsa", "-in", key.to_str().unwrap(), "-pubout", "-outform", "DER"])
        .output()
        .expect("openssl runs");
    assert!(out.status.success());
    let b64 = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&out.stdout)?;
            c.wait_with_output()
        })
        .expect("base64 runs");
    (key, String::from_utf8(b64.stdout).unwrap().trim().to_owned())
}

/// `msg` sealed by dkimpy as a forwarder of `domain` would (ARC, RFC
/// 8617) over its own `Authentication-Results` with id `domain`.
fn arc_seal(python: &str, key: &std::path::Path, domain: &str, msg: &[u8]) -> Vec<u8> {
    let script = "import dkim,sys\n\
        msg=sys.stdin.buffer.read()\n\
        key=open(sys.argv[1],'rb').read()\n\
        d=sys.argv[2].encode()\n\
        msg=b'Authentication-Results: '+d+b'; spf=pass smtp.mailfrom=origin.example\\r\\n'+msg\n\
        hs=dkim.arc_sign(msg, b'sel', d, key, d, include_headers=[b'from', b'to', b'subject'])\n\
        sys.stdout.buffer.write(b''.join(hs)+msg)\n";
    python_filter(python, script, &[key.to_str().unwrap(), domain], msg)
}

/// What a Python `script` (with `args`) writes given `input`.
fn python_filter(python: &str, script: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{script}");
    out.stdout
}

/// `msg` signed by dkimpy for `domain` with `selector`.
fn dkim_sign(python: &str, key: &std::path::Path, domain: &str, selector: &str, msg: &[u8]) -> Vec<u8> {
    let script = "import dkim,sys\n\
        msg=sys.stdin.buffer.read()\n\
        key=open(sys.argv[1],'rb').read()\n\
        sig=dkim.sign(msg, sys.argv[3].encode(), sys.argv[2].encode(), key, \
            include_headers=[b'from', b'to', b'subject', b'x-test-seq'])\n\
        sys.stdout.buffer.write(sig+msg)\n";
    python_filter(python, script, &[key.to_str().unwrap(), domain, selector], msg)
}

fn message(from: &str, seq: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "{extra_headers}From: {from}\r\nTo: alice@example.org\r\nSubject: check {seq}\r\nX-Test-Seq: {seq}\r\n\r\nHello from {from}.\r\n"
    )
    .into_bytes()
}

/// Sends one message; the final reply's code and text.
async fn send(node: &NodeProcess, from: &str, rcpt: &str, body: &[u8]) -> (u16, String) {
    send_on(node, false, from, rcpt, body).await
}

async fn send_on(node: &NodeProcess, lmtp: bool, from: &str, rcpt: &str, body: &[u8]) -> (u16, String) {
    let addr = if lmtp { node.lmtp() } else { node.smtp() };
    let mut c = SmtpClient::connect(addr, lmtp).await.expect("connects");
    let r = c.send_mail(from, &[rcpt], body).await.expect("transaction");
    let _ = c.quit().await;
    (r[0].code, r[0].text.clone())
}

/// The header of alice's INBOX message marked `seq`, read over POP3.
async fn inbox_header(node: &NodeProcess, seq: &str) -> Option<String> {
    let all = common::read_all(node, "alice@example.org").await;
    all.values().find(|m| common::marker(m) == seq).map(|m| {
        let text = String::from_utf8_lossy(m).into_owned();
        text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
    })
}

/// Alice's `Junk` folder, every message, read with Python's imaplib.
fn junk(python: &str, node: &NodeProcess) -> String {
    let script = "import imaplib,sys\n\
        host,port=sys.argv[1].rsplit(':',1)\n\
        m=imaplib.IMAP4(host,int(port))\n\
        m.login('alice@example.org',sys.argv[2])\n\
        t,l=m.list()\n\
        print([x.decode() for x in l if b'Junk' in x])\n\
        m.select('Junk', readonly=True)\n\
        t,d=m.uid('FETCH','1:*','(BODY.PEEK[])')\n\
        for p in d:\n\
        \x20 if isinstance(p,tuple): sys.stdout.write(p[1].decode('utf-8','replace'))\n\
        m.logout()\n";
    common::run(Command::new(python).args(["-c", script, &node.imap().to_string(), common::PASSWORD]))
}

/// Every check against records dnsmasq serves, on one node whose
/// loopback clients are checked as the internet's are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_dkim_dmarc_through_a_real_dns_server() {
    if !testkit::program("dnsmasq") || !testkit::program("openssl") {
        return;
    }
    // dkimpy; its ARC sealing needs authres.
    let Some(python) = testkit::python_with("dkim, authres") else {
        return;
    };
    let keys = quill_harness::process::TempDir::new("mail-auth-keys").unwrap();
    let (key, public) = rsa_key(keys.path());
    let mut records = vec![
        // Authoritative for .test: a name it does not know does not exist
        // (NXDOMAIN), as a real zone says, instead of REFUSED.
        "--local=/test/".to_owned(),
        txt("pass.test", "v=spf1 ip4:127.0.0.0/8 -all"),
        txt("fail.test", "v=spf1 -all"),
        txt("soft.test", "v=spf1 ~all"),
        txt("signed.test", "v=spf1 -all"),
        txt("_dmarc.signed.test", "v=DMARC1; p=reject"),
        txt("sel._domainkey.signed.test", &format!("v=DKIM1; k=rsa; p={public}")),
        // A key record that is not one.
        txt("bad._domainkey.signed.test", "v=DKIM1; k=rsa; p=!!not-base64!!"),
        txt("reject.test", "v=spf1 -all"),
        txt("_dmarc.reject.test", "v=DMARC1; p=reject"),
        txt("quar.test", "v=spf1 -all"),
        txt("_dmarc.quar.test", "v=DMARC1; p=quarantine"),
        txt("loop.test", "v=spf1 include:loop.test -all"),
    ];
    // An answer of 8 KB (past UDP's 512 bytes: truncated, asked again
    // over TCP) that lists other addresses.
    records.push(txt(
        "huge.test",
        &format!("v=spf1 {}-all", "ip4:192.0.2.1 ".repeat(600)),
    ));
    // Twelve DNS-querying mechanisms: past RFC 7208's limit of ten.
    let many: Vec<String> = (1..=12).map(|k| format!("a:h{k}.many.test")).collect();
    records.push(txt("many.test", &format!("v=spf1 {} -all", many.join(" "))));
    let dns = common::dns::dnsmasq(&records);
    let dns_addr = dns.addr.to_string();
    let (_dir, node) = common::node_checked("mail-auth", &["--dns", &dns_addr, "--hostname", AUTHSERV]).await;
    let alice = "alice@example.org";

    // SPF: pass, fail, softfail, none (no DMARC record: all taken).
    for (domain, result) in [
        ("pass.test", "spf=pass"),
        ("fail.test", "spf=fail"),
        ("soft.test", "spf=softfail"),
        ("none.test", "spf=none"),
        ("loop.test", "spf=permerror"),
        ("many.test", "spf=permerror"),
        ("huge.test", "spf=fail"),
    ] {
        let from = format!("someone@{domain}");
        let (code, text) = send(&node, &from, alice, &message(&from, domain, "")).await;
        assert_eq!(code, 250, "{domain}: {text}");
        let h = inbox_header(&node, domain).await.expect("delivered");
        assert!(h.starts_with(&format!("Authentication-Results: {AUTHSERV};")), "{h}");
        assert!(h.contains(&format!("{result} ")), "{domain}: {result} in {h}");
        assert!(h.contains("dkim=none"), "{h}");
        assert!(h.contains("dmarc=none"), "no DMARC record: {h}");
    }

    // DKIM by an outside signer: pass (DMARC passes through it though SPF
    // fails); the body changed after signing fails, and DMARC p=reject
    // refuses it; a selector with no key is an error, never a pass.
    let from = "news@signed.test";
    let signed = dkim_sign(&python, &key, "signed.test", "sel", &message(from, "dkim-pass", ""));
    let (code, text) = send(&node, "bounce@signed.test", alice, &signed).await;
    assert_eq!(code, 250, "{text}");
    let h = inbox_header(&node, "dkim-pass").await.expect("delivered");
    assert!(h.contains("dkim=pass header.i=@signed.test header.s=sel"), "{h}");
    assert!(h.contains("dmarc=pass header.from=signed.test"), "{h}");
    assert!(h.contains("spf=fail"), "{h}");

    let mut tampered = dkim_sign(&python, &key, "signed.test", "sel", &message(from, "dkim-changed", ""));
    tampered.extend_from_slice(b"A line added on the way.\r\n");
    let (code, text) = send(&node, "bounce@signed.test", alice, &tampered).await;
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.7.1") && text.contains("DMARC"), "{text}");
    assert!(inbox_header(&node, "dkim-changed").await.is_none());
    // The postmaster is never refused by policy: it lands in Junk.
    let (code, text) = send(&node, "bounce@signed.test", "postmaster@example.org", &tampered).await;
    assert_eq!(code, 250, "{text}");

    let no_key = dkim_sign(&python, &key, "signed.test", "gone", &message(from, "dkim-nokey", ""));
    let (code, _) = send(&node, "bounce@signed.test", alice, &no_key).await;
    assert_eq!(code, 550, "no key, no DMARC pass: refused by p=reject");
    let bad_key = dkim_sign(&python, &key, "signed.test", "bad", &message(from, "dkim-badkey", ""));
    let (code, _) = send(&node, "bounce@signed.test", alice, &bad_key).await;
    assert_eq!(code, 550, "a malformed key is no pass either");

    // ARC: a chain sealed by a forwarder verifies.
    let from = "someone@pass.test";
    let sealed = arc_seal(&python, &key, "signed.test", &message(from, "arc", ""));
    let (code, text) = send(&node, from, alice, &sealed).await;
    assert_eq!(code, 250, "{text}");
    let h = inbox_header(&node, "arc").await.expect("delivered");
    assert!(h.contains("arc=pass"), "{h}");

    // A malformed signature and a header folded to great length: taken,
    // the signature an error.
    let mut folded = String::from("X-Long: start");
    for _ in 0..20_000 {
        folded.push_str("\r\n folded");
    }
    folded.push_str("\r\nDKIM-Signature: v=1; a=rsa-sha256; d=pass.test; s=x; b=!!!; bh=???\r\n");
    let from = "someone@pass.test";
    let (code, text) = send(&node, from, alice, &message(from, "malformed", &folded)).await;
    assert_eq!(code, 250, "{text}");
    let h = inbox_header(&node, "malformed").await.expect("delivered");
    assert!(h.contains("dkim=permerror") || h.contains("dkim=neutral"), "{h}");

    // Twenty signatures, each naming a key that is not there: only the
    // first 8 are checked (each costs a lookup and a body hash).
    let many: String = (1..=20)
        .map(|k| {
            format!(
                "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=pass.test; s=s{k}; h=from; \
                 bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA\r\n"
            )
        })
        .collect();
    let (code, text) = send(&node, from, alice, &message(from, "many-signatures", &many)).await;
    assert_eq!(code, 250, "{text}");
    let h = inbox_header(&node, "many-signatures").await.expect("delivered");
    let results = h.split("Received:").next().unwrap_or_default().matches("dkim=").count();
    assert_eq!(results, 8, "{h}");

    // DMARC p=reject: refused at the end of DATA, with the reason.
    let from = "ceo@reject.test";
    let (code, text) = send(&node, from, alice, &message(from, "reject", "")).await;
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("reject.test"), "{text}");

    // DMARC p=quarantine: into Junk (made, marked \Junk), not INBOX.
    let from = "ceo@quar.test";
    let (code, text) = send(&node, from, alice, &message(from, "quarantine", "")).await;
    assert_eq!(code, 250, "{text}");
    assert!(inbox_header(&node, "quarantine").await.is_none(), "not in INBOX");
    let j = junk(&python, &node);
    assert!(j.contains("\\Junk"), "LIST marks Junk: {j}");
    assert!(j.contains("X-Test-Seq: quarantine"), "in Junk: {j}");
    assert!(j.contains("X-Test-Seq: dkim-changed"), "postmaster's copy in Junk: {j}");
    assert!(j.contains("dmarc=fail"), "{j}");

    // A sender's claim in our name is taken out; another host's stays.
    let forged = format!(
        "Authentication-Results: {AUTHSERV}; dmarc=pass header.from=bank.test\r\n\
         Authentication-Results: (comment)\r\n MX.QUILL.TEST; dkim=pass header.d=bank.test\r\n\
         Authentication-Results: other.example; spf=pass\r\n"
    );
    let from = "someone@pass.test";
    let (code, _) = send(&node, from, alice, &message(from, "forged", &forged)).await;
    assert_eq!(code, 250);
    let h = inbox_header(&node, "forged").await.expect("delivered");
    let ours = h.matches(&format!("Authentication-Results: {AUTHSERV};")).count();
    assert_eq!(ours, 1, "only our own: {h}");
    assert!(!h.contains("bank.test"), "the forged claims are gone: {h}");
    assert!(h.contains("Authentication-Results: other.example; spf=pass"), "{h}");

    // LMTP is an MTA's: not checked unless asked (--check-lmtp, below).
    let from = "ceo@reject.test";
    let (code, text) = send_on(&node, true, from, alice, &message(from, "lmtp", "")).await;
    assert_eq!(code, 250, "{text}");
    let h = inbox_header(&node, "lmtp").await.expect("delivered");
    assert!(!h.contains("Authentication-Results"), "{h}");

    // The delivery log line and /metrics carry the results.
    let fails = node
        .metric("quill_mail_auth_results_total{method=\"dmarc\",result=\"fail\"}")
        .await
        .expect("metric");
    assert!(fails >= 4.0, "DMARC failures counted: {fails}");
    let log = std::fs::read_to_string(node.log_path()).unwrap();
    assert!(
        log.contains("auth=\"dkim=pass spf=fail arc=none dmarc=pass"),
        "delivery log line"
    );
}

/// A DNS server that never answers: the checks give up within their
/// budget and the message is taken, tagged `temperror`; with
/// `--auth-policy tag` nothing is refused. From a trusted network nothing
/// is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_dns_server_and_the_policy_that_only_tags() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let (_dir, node) = common::node_checked(
        "mail-auth-silent",
        &[
            "--dns",
            &silent_addr,
            "--hostname",
            AUTHSERV,
            "--auth-policy",
            "tag",
            "--check-lmtp",
        ],
    )
    .await;
    let from = "ceo@reject.test";
    let started = Instant::now();
    let (code, text) = send(&node, from, "alice@example.org", &message(from, "silent", "")).await;
    let took = started.elapsed();
    assert_eq!(code, 250, "{text}");
    assert!(took < Duration::from_secs(6), "taken promptly: {took:?}");
    let h = inbox_header(&node, "silent").await.expect("delivered");
    assert!(h.contains("spf=temperror"), "{h}");
    assert!(h.contains("dmarc=temperror"), "{h}");
    eprintln!("a message through a DNS server that never answers took {took:?}");
    let (code, _) = send_on(&node, true, from, "alice@example.org", &message(from, "lmtp", "")).await;
    assert_eq!(code, 250);
    let h = inbox_header(&node, "lmtp").await.expect("delivered");
    assert!(h.contains("spf=temperror"), "LMTP checked when asked: {h}");
    drop(silent);

    // Trusted (the harness's default for loopback): no header, no check.
    let (_dir2, trusted) = common::node("mail-auth-trusted", &["--hostname", AUTHSERV]).await;
    let body = message(
        from,
        "trusted",
        &format!("Authentication-Results: {AUTHSERV}; dmarc=pass\r\n"),
    );
    let (code, _) = send(&trusted, from, "alice@example.org", &body).await;
    assert_eq!(code, 250);
    let h = inbox_header(&trusted, "trusted").await.expect("delivered");
    assert_eq!(
        h.matches("Authentication-Results:").count(),
        1,
        "a trusted relay's header is kept as it came, none added: {h}"
    );
}
