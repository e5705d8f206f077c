//! Client TLS with clients nobody here wrote: Python's smtplib `starttls()`
//! and `SMTP_SSL`, poplib `stls()` and `POP3_SSL`, `openssl s_client
//! -starttls`, swaks `--tls`; the STARTTLS injection case; plaintext logins
//! refused with `--plaintext-auth never`; certificate files replaced under
//! a running node, and a bad pair refused with the old one still served.
//!
//! Certificates are made with the `openssl` command line (Debian's
//! `openssl`, installed by `.ci/run`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{PASSWORD, node, run, wait_for};
use quill_harness::fresh_loopback;
use quill_harness::process::{NodeOptions, NodeProcess, TempDir};

/// A self-signed certificate for `cn` (also its DNS name), key and
/// certificate written to `dir/{name}.key` and `dir/{name}.crt`.
fn make_cert(dir: &Path, name: &str, cn: &str) {
    let (key, crt) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.crt")));
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "30",
        "-subj",
        &format!("/CN={cn}"),
        "-addext",
        &format!("subjectAltName=DNS:{cn}"),
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]));
}

fn tools() -> bool {
    testkit::program("python3") && testkit::program("openssl")
}

/// Replaces `to` by `from`'s contents the way certificate tools do: write
/// aside, then rename over.
fn replace_by_rename(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// The common name of the certificate a TLS port serves (implicit TLS).
fn served_cn(addr: std::net::SocketAddr) -> String {
    let script = r#"
import socket, ssl, sys, subprocess
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
    with ctx.wrap_socket(s) as t:
        der = t.getpeercert(binary_form=True)
pem = ssl.DER_cert_to_PEM_cert(der)
out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "multiline"], input=pem.encode(), capture_output=True).stdout.decode()
print([l.split("=", 1)[1].strip() for l in out.splitlines() if "commonName" in l][0])
"#;
    run(Command::new("python3").args(["-c", script, &addr.ip().to_string(), &addr.port().to_string()]))
        .trim()
        .to_owned()
}

const PY_TLS: &str = r#"
import poplib, smtplib, socket, ssl, sys
host, smtp, smtps, pop, pops, cafile, pw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7]
ctx = ssl.create_default_context(cafile=cafile)
ctx.check_hostname = False  # the certificate names mail.example.org; we dial an IP
body = b"Subject: over tls\r\n\r\nsecret\r\n"
with smtplib.SMTP(host, smtp, timeout=30) as s:
    s.ehlo("python.test")
    assert s.has_extn("starttls"), s.esmtp_features
    s.starttls(context=ctx)
    s.ehlo("python.test")
    assert not s.has_extn("starttls"), "STARTTLS offered again under TLS"
    assert s.sendmail("py@remote.test", ["bob@example.org"], body) == {}
# Port 465 is submission over implicit TLS (RFC 8314): AUTH offered and
# required, the sender checked, as a mail client set to "SSL/TLS" uses it.
with smtplib.SMTP_SSL(host, smtps, context=ctx, timeout=30) as s:
    s.ehlo("python.test")
    assert "PLAIN" in s.esmtp_features.get("auth", ""), s.esmtp_features
    try:
        s.sendmail("py@remote.test", ["bob@example.org"], body)
        raise SystemExit("mail taken on the SMTPS port without AUTH")
    except smtplib.SMTPSenderRefused as e:
        assert e.smtp_code == 530, e
    s.login("bob@example.org", pw)
    try:
        s.sendmail("eve@example.org", ["bob@example.org"], body)
        raise SystemExit("a sender not the authenticated user was taken")
    except smtplib.SMTPSenderRefused as e:
        assert e.smtp_code == 553, e
    assert s.sendmail("bob@example.org", ["bob@example.org"], b"From: bob@example.org\r\n" + body) == {}

# POP3 in the clear: no USER or SASL offered, USER refused with the reason.
p = poplib.POP3(host, pop, timeout=30)
caps = p.capa()
assert "STLS" in caps and "USER" not in caps and "SASL" not in caps, caps
try:
    p.user("bob@example.org")
    raise SystemExit("USER accepted in the clear")
except poplib.error_proto as e:
    assert b"Plaintext authentication disallowed" in e.args[0], e
p.stls(context=ctx)
caps = p.capa()
assert "STLS" not in caps and "USER" in caps, caps
p.user("bob@example.org"); p.pass_(pw)
n, _ = p.stat()
assert n == 2, n
msg = b"\r\n".join(p.retr(1)[1])
assert b"with ESMTPS" in msg and b"(using TLSv1_3" in msg, msg
p.quit()
p = poplib.POP3_SSL(host, pops, context=ctx, timeout=30)
p.user("bob@example.org"); p.pass_(pw)
assert p.stat()[0] == 2
p.quit()

# STARTTLS with a command in the same packet: the command is discarded.
s = socket.create_connection((host, smtp), timeout=30)
f = s.makefile("rb")
assert f.readline().startswith(b"220")
s.sendall(b"EHLO x\r\n")
while not f.readline().startswith(b"250 "):
    pass
s.sendall(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\n")
assert f.readline().startswith(b"220 2.0.0"), "no go-ahead"
t = ctx.wrap_socket(s)
tf = t.makefile("rb")
t.sendall(b"EHLO y\r\n")
while not tf.readline().startswith(b"250 "):
    pass
t.sendall(b"RCPT TO:<bob@example.org>\r\n")
reply = tf.readline()
assert reply.startswith(b"503"), ("the injected MAIL FROM was executed", reply)
t.sendall(b"QUIT\r\n")
t.close()

# The same on POP3: USER injected after STLS does not count.
s = socket.create_connection((host, pop), timeout=30)
f = s.makefile("rb")
assert f.readline().startswith(b"+OK")
s.sendall(b"STLS\r\nUSER bob@example.org\r\n")
assert f.readline().startswith(b"+OK"), "no go-ahead"
t = ctx.wrap_socket(s)
tf = t.makefile("rb")
t.sendall(("PASS " + pw + "\r\n").encode())
reply = tf.readline()
assert reply.startswith(b"-ERR USER first"), ("the injected USER was executed", reply)
t.close()
print("python tls ok")
"#;

/// A node with `name.crt`/`name.key` from `dir`, and its extra flags.
async fn tls_node(label: &str, dir: &Path, name: &str, extra: &[&str]) -> (TempDir, NodeProcess) {
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let mut args = vec!["--tls-cert", crt.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    args.extend_from_slice(extra);
    node(label, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_over_starttls_and_implicit_tls() {
    if !tools() {
        return;
    }
    let certs = TempDir::new("tls-certs").unwrap();
    make_cert(certs.path(), "mail", "mail.example.org");
    let (_d, node) = tls_node("tls-python", certs.path(), "mail", &["--plaintext-auth", "never"]).await;
    let cafile = certs.path().join("mail.crt");
    let (smtp, smtps, pop, pops) = (node.smtp(), node.smtps(), node.pop3(), node.pop3s());
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new("python3").args([
            "-c",
            PY_TLS,
            &smtp.ip().to_string(),
            &smtp.port().to_string(),
            &smtps.port().to_string(),
            &pop.port().to_string(),
            &pops.port().to_string(),
            cafile.to_str().unwrap(),
            PASSWORD,
        ]))
    })
    .await
    .unwrap();
    assert!(out.contains("python tls ok"), "{out}");
    let metrics = node.metrics().await.unwrap();
    let get = |k: &str| metrics.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    assert_eq!(get("quill_starttls_injections_total"), Some(2.0), "{metrics:?}");
    assert_eq!(get("quill_plaintext_auth_refused_total"), Some(1.0), "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_and_swaks_starttls() {
    if !tools() || !testkit::program("swaks") {
        return;
    }
    let certs = TempDir::new("tls-certs").unwrap();
    make_cert(certs.path(), "mail", "mail.example.org");
    let (_d, node) = tls_node("tls-openssl", certs.path(), "mail", &[]).await;
    let cafile = certs.path().join("mail.crt").to_str().unwrap().to_owned();
    let (smtp, pop) = (node.smtp().to_string(), node.pop3().to_string());
    tokio::task::spawn_blocking(move || {
        for (addr, proto, cmd) in [(&smtp, "smtp", "QUIT\n"), (&pop, "pop3", "QUIT\n")] {
            let mut child = Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    addr,
                    "-starttls",
                    proto,
                    "-CAfile",
                    &cafile,
                    "-verify_return_error",
                    "-servername",
                    "mail.example.org",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            // s_client reads stdin after the handshake; QUIT ends the session.
            child.stdin.take().unwrap().write_all(cmd.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("Verify return code: 0 (ok)"), "{proto}: {text}");
            assert!(text.contains("TLSv1.3"), "{proto}: {text}");
        }
        let out = run(Command::new("swaks").args([
            "--server",
            &smtp,
            "--tls",
            "--from",
            "s@remote.test",
            "--to",
            "carol@example.org",
        ]));
        assert!(out.contains("<-  220 2.0.0 Ready to start TLS"), "{out}");
        assert!(out.contains("TLS started"), "{out}");
        assert!(out.contains("<~  250 2.0.0 Ok: stored as"), "{out}");
    })
    .await
    .unwrap();
    let mut pop = quill_harness::Pop3Client::connect(node.pop3()).await.unwrap();
    pop.login("carol@example.org", PASSWORD).await.unwrap();
    assert_eq!(pop.stat().await.unwrap().0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_are_reloaded_and_a_bad_pair_is_refused() {
    if !tools() {
        return;
    }
    let certs = TempDir::new("tls-certs").unwrap();
    for (name, cn) in [
        ("one", "one.example.org"),
        ("two", "two.example.org"),
        ("three", "three.example.org"),
    ] {
        make_cert(certs.path(), name, cn);
    }
    let dir = certs.path();
    for ext in ["crt", "key"] {
        std::fs::copy(dir.join(format!("one.{ext}")), dir.join(format!("live.{ext}"))).unwrap();
    }
    let (_d, node) = tls_node("tls-reload", dir, "live", &[]).await;
    let smtps = node.smtps();
    let cn = move || tokio::task::spawn_blocking(move || served_cn(smtps));
    assert_eq!(cn().await.unwrap(), "one.example.org");

    // Renewed by rename, key first then certificate: served without a restart.
    replace_by_rename(&dir.join("two.key"), &dir.join("live.key"));
    replace_by_rename(&dir.join("two.crt"), &dir.join("live.crt"));
    wait_for("the renewed certificate served", Duration::from_secs(20), || async {
        cn().await.unwrap() == "two.example.org"
    })
    .await;

    // A certificate whose key is another's: refused, the old one stays.
    replace_by_rename(&dir.join("three.crt"), &dir.join("live.crt"));
    let log = node.log_path();
    wait_for(
        "the mismatched pair refused in the log",
        Duration::from_secs(20),
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("the private key does not match the certificate")
            }
        },
    )
    .await;
    assert_eq!(cn().await.unwrap(), "two.example.org");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_mismatched_pair_does_not_start() {
    if !tools() {
        return;
    }
    let certs = TempDir::new("tls-certs").unwrap();
    make_cert(certs.path(), "a", "a.example.org");
    make_cert(certs.path(), "b", "b.example.org");
    let dir = TempDir::new("tls-bad").unwrap();
    let mut opts = NodeOptions::new(dir.path().join("node"), fresh_loopback()).unwrap();
    let (crt, key) = (certs.path().join("a.crt"), certs.path().join("b.key"));
    opts.extra_args = vec![
        "--tls-cert".into(),
        crt.to_str().unwrap().into(),
        "--tls-key".into(),
        key.to_str().unwrap().into(),
    ];
    let Err(err) = NodeProcess::start(opts).await else {
        panic!("a node with a mismatched certificate and key started");
    };
    let text = format!("{err:#}");
    assert!(
        text.contains("the private key does not match the certificate"),
        "{text}"
    );
}

/// `quill admin tls set` through one node of three: the other two serve
/// the certificate within seconds, without a restart; a mismatched pair is
/// refused with the reason and the stored one stays served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_set_through_one_node_is_served_by_every_node() {
    if !tools() {
        return;
    }
    let _slot = common::cluster_slot().await;
    let certs = TempDir::new("tls-certs").unwrap();
    make_cert(certs.path(), "shared", "shared.example.org");
    make_cert(certs.path(), "other", "other.example.org");
    let dir = TempDir::new("tls-cluster").unwrap();
    let nodes = quill_harness::process::start_cluster(dir.path(), 3, "tls-secret", "info")
        .await
        .unwrap();
    let admin = |args: Vec<String>| {
        let (addr, binary) = (
            nodes[0].admin_addr().to_string(),
            quill_harness::process::quill_binary().unwrap(),
        );
        tokio::task::spawn_blocking(move || {
            Command::new(binary)
                .args(["admin", "--node", &addr, "--token", "harness-token", "tls"])
                .args(args)
                .output()
                .unwrap()
        })
    };
    let path = |f: &str| certs.path().join(f).to_str().unwrap().to_owned();
    let set = |crt: &str, key: &str| {
        vec![
            "set".to_owned(),
            "--cert".to_owned(),
            path(crt),
            "--key".to_owned(),
            path(key),
        ]
    };
    // The status names every node's TLS addresses.
    let status = nodes[1].status().await.unwrap();
    for n in status["nodes"].as_array().unwrap() {
        assert!(
            n["addrs"]["smtps"].as_str().is_some_and(|a| a.ends_with(":2465")),
            "{status}"
        );
        assert!(
            n["addrs"]["pop3s"].as_str().is_some_and(|a| a.ends_with(":2995")),
            "{status}"
        );
    }
    let before = served_cn(nodes[2].smtps());
    assert!(before.contains("self-signed"), "{before}");
    let out = admin(set("shared.crt", "shared.key")).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for n in &nodes[1..] {
        let addr = n.smtps();
        wait_for("the cluster certificate served", Duration::from_secs(10), || async move {
            tokio::task::spawn_blocking(move || served_cn(addr)).await.unwrap() == "shared.example.org"
        })
        .await;
    }
    let out = admin(set("other.crt", "shared.key")).await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the private key does not match the certificate"), "{err}");
    let addr = nodes[2].smtps();
    assert_eq!(
        tokio::task::spawn_blocking(move || served_cn(addr)).await.unwrap(),
        "shared.example.org"
    );
    let out = admin(vec!["list".to_owned()]).await.unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("cluster default") && listed.contains("shared.example.org"),
        "{listed}"
    );
}

/// The harness's own rustls client (what `bench-tls` measures with):
/// STARTTLS and implicit TLS, trusting the node's self-signed certificate
/// for its address, deliver mail that arrives marked as sent over TLS; a
/// client trusting another certificate is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_client_delivers_over_starttls_and_smtps() {
    use quill_harness::client::{Pop3Client, SmtpClient, Tls};
    let (_d, n) = node("tls-harness-client", &[]).await;
    let ip = n.opts.ip.to_string();
    let tls = Tls::trusting(&n.self_signed_cert(), &ip).unwrap();
    let s = SmtpClient::connect(n.smtp(), false).await.unwrap();
    assert!(s.ehlo.text.contains("STARTTLS"), "{:?}", s.ehlo);
    let mut s = s.starttls(&tls).await.unwrap();
    assert!(
        !s.ehlo.text.contains("STARTTLS"),
        "offered again under TLS: {:?}",
        s.ehlo
    );
    let r = s
        .send_mail(
            "a@remote.test",
            &["bob@example.org"],
            b"Subject: one\r\n\r\nover starttls\r\n",
        )
        .await
        .unwrap();
    assert_eq!(r[0].code, 250, "{r:?}");
    s.quit().await.unwrap();
    // SMTPS is submission (RFC 8314): no mail before AUTH.
    let mut s = SmtpClient::connect_tls(n.smtps(), &tls).await.unwrap();
    assert!(s.ehlo.text.contains("AUTH PLAIN"), "{:?}", s.ehlo);
    let r = s.command("MAIL FROM:<a@remote.test>").await.unwrap();
    assert_eq!(r.code, 530, "{r:?}");
    let creds = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("\0bob@example.org\0{PASSWORD}"),
    );
    let r = s.command(&format!("AUTH PLAIN {creds}")).await.unwrap();
    assert_eq!(r.code, 235, "{r:?}");
    let r = s
        .send_mail(
            "bob@example.org",
            &["bob@example.org"],
            b"From: bob@example.org\r\nSubject: two\r\n\r\nover smtps\r\n",
        )
        .await
        .unwrap();
    assert_eq!(r[0].code, 250, "{r:?}");
    s.quit().await.unwrap();

    let mut p = Pop3Client::connect(n.pop3()).await.unwrap();
    p.login("bob@example.org", PASSWORD).await.unwrap();
    let (count, _) = p.stat().await.unwrap();
    assert_eq!(count, 2);
    for i in 1..=2 {
        let m = String::from_utf8_lossy(&p.retr(i).await.unwrap()).into_owned();
        assert!(
            m.contains("with ESMTPS"),
            "message {i} not marked as received over TLS:\n{m}"
        );
    }
    p.quit().await.unwrap();

    // Trusting some other node's certificate: the handshake must fail.
    let (_d2, other) = node("tls-harness-other", &[]).await;
    let wrong = Tls::trusting(&other.self_signed_cert(), &ip).unwrap();
    let err = SmtpClient::connect_tls(n.smtps(), &wrong)
        .await
        .err()
        .expect("untrusted certificate accepted");
    assert!(format!("{err:#}").contains("TLS handshake"), "{err:#}");
}

/// A client that stops in the middle of a handshake (implicit TLS, and
/// after STARTTLS's go-ahead) is cut off at the handshake deadline (here
/// the session idle timeout, 2 s, which is shorter than 30 s), counted as a
/// failed handshake, and the node serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_cut_off_at_its_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_d, n) = node("tls-stalled", &["--idle-timeout", "2"]).await;
    // Reads until the node closes the connection; the time it took.
    async fn closed_after(mut s: tokio::net::TcpStream) -> Duration {
        let t0 = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the node kept a stalled handshake open for 20 s");
        t0.elapsed()
    }
    // Implicit TLS: the first bytes of a ClientHello record, then nothing.
    let mut s = tokio::net::TcpStream::connect(n.smtps()).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let took = closed_after(s).await;
    assert!(
        took >= Duration::from_millis(1500),
        "cut off before its deadline: {took:?}"
    );
    // STARTTLS, the go-ahead, then silence.
    let mut s = tokio::net::TcpStream::connect(n.smtp()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let got = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..got].starts_with(b"220 "),
        "{:?}",
        String::from_utf8_lossy(&buf[..got])
    );
    s.write_all(b"STARTTLS\r\n").await.unwrap();
    let got = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..got].starts_with(b"220 2.0.0"),
        "{:?}",
        String::from_utf8_lossy(&buf[..got])
    );
    closed_after(s).await;
    let metrics = n.metrics().await.unwrap();
    let get = |k: &str| metrics.iter().find(|(m, _)| m == k).map(|(_, v)| *v);
    assert_eq!(get("quill_tls_handshake_failures_total"), Some(2.0), "{metrics:?}");
    // Still serving.
    let tls = quill_harness::client::Tls::trusting(&n.self_signed_cert(), &n.opts.ip.to_string()).unwrap();
    quill_harness::client::SmtpClient::connect_tls(n.smtps(), &tls)
        .await
        .unwrap()
        .quit()
        .await
        .unwrap();
}
