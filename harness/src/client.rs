//! Minimal SMTP/LMTP and POP3 clients for tests and load. They check every
//! reply and bound every read (line length and time).

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf,
};
use tokio::net::TcpStream;

/// Any reply must come within this time.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Replies longer than this are a protocol error.
const LINE_BYTES_MAX: usize = 64 * 1024;

/// The server ended the session before the transaction (a 421 reply to
/// MAIL): nothing was taken, and a client opens another session.
#[derive(Debug)]
pub struct SessionClosed(pub Reply);

impl std::fmt::Display for SessionClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server ended the session: {:?}", self.0)
    }
}

impl std::error::Error for SessionClosed {}

/// One SMTP reply (all its lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

/// A byte stream a session runs over: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a client speaks TLS to a node: trusting one certificate (a node's
/// self-signed one) for one name (the node's address).
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Tls {
    /// Trusts the PEM certificate in `cert` for `name` (an IP address or a
    /// DNS name), TLS 1.2 and 1.3 with ring, as the nodes serve; no
    /// session resumption.
    pub fn trusting(cert: &std::path::Path, name: &str) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(cert).with_context(|| format!("reading {}", cert.display()))? {
            roots.add(c?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every handshake a full one: what a benchmark of handshakes
        // measures, and what a client meeting a node for the first time does.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Tls {
            config: Arc::new(config),
            name: ServerName::try_from(name.to_owned())?,
        })
    }
}

struct Conn {
    r: BufReader<ReadHalf<Box<dyn Io>>>,
    w: BufWriter<WriteHalf<Box<dyn Io>>>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connect to {addr} timed out"))?
            .with_context(|| format!("connect to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Conn::over(Box::new(s)))
    }

    fn over(s: Box<dyn Io>) -> Self {
        let (r, w) = tokio::io::split(s);
        Conn {
            r: BufReader::with_capacity(64 * 1024, r),
            w: BufWriter::with_capacity(64 * 1024, w),
        }
    }

    /// The TLS handshake over this connection (after the server's go-ahead
    /// for STARTTLS, or at once for implicit TLS). Anything the server sent
    /// before it is an error: it would be plaintext injected into the
    /// encrypted session.
    async fn tls(self, tls: &Tls) -> anyhow::Result<Self> {
        if !self.r.buffer().is_empty() {
            bail!("the server sent data before the TLS handshake");
        }
        let s = self.r.into_inner().unsplit(self.w.into_inner());
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let t = tokio::time::timeout(REPLY_TIMEOUT, connector.connect(tls.name.clone(), s))
            .await
            .map_err(|_| anyhow!("TLS handshake timed out"))?
            .context("TLS handshake")?;
        Ok(Conn::over(Box::new(t)))
    }

    async fn line(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(
            REPLY_TIMEOUT,
            (&mut self.r).take(LINE_BYTES_MAX as u64).read_until(b'\n', &mut buf),
        )
        .await
        .map_err(|_| anyhow!("no reply within {REPLY_TIMEOUT:?}"))??;
        if n == 0 {
            bail!("connection closed by server");
        }
        if !buf.ends_with(b"\n") {
            bail!("reply line too long or cut");
        }
        Ok(buf)
    }

    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.w.write_all(data).await?;
        self.w.flush().await?;
        Ok(())
    }
}

/// An SMTP or LMTP client session.
pub struct SmtpClient {
    c: Conn,
    lmtp: bool,
    pub greeting: Reply,
    pub ehlo: Reply,
}

impl SmtpClient {
    /// Connects and says EHLO (or LHLO); fails unless both are positive.
    pub async fn connect(addr: SocketAddr, lmtp: bool) -> anyhow::Result<Self> {
        Self::hello(Conn::connect(addr).await?, lmtp).await
    }

    async fn hello(mut c: Conn, lmtp: bool) -> anyhow::Result<Self> {
        let greeting = read_reply(&mut c).await?;
        if greeting.code != 220 {
            bail!("greeting: {greeting:?}");
        }
        let verb = if lmtp { "LHLO" } else { "EHLO" };
        c.send(format!("{verb} harness.quill.test\r\n").as_bytes()).await?;
        let ehlo = read_reply(&mut c).await?;
        if ehlo.code != 250 {
            bail!("{verb}: {ehlo:?}");
        }
        Ok(SmtpClient {
            c,
            lmtp,
            greeting,
            ehlo,
        })
    }

    /// Connects with implicit TLS (SMTPS), then as `connect`.
    pub async fn connect_tls(addr: SocketAddr, tls: &Tls) -> anyhow::Result<Self> {
        let c = Conn::connect(addr).await?.tls(tls).await?;
        Self::hello(c, false).await
    }

    /// STARTTLS, the handshake, and EHLO again (RFC 3207: the session
    /// starts over).
    pub async fn starttls(self, tls: &Tls) -> anyhow::Result<Self> {
        let mut me = self;
        let r = me.command("STARTTLS").await?;
        if r.code != 220 {
            bail!("STARTTLS: {r:?}");
        }
        let c = me.c.tls(tls).await?;
        let verb = if me.lmtp { "LHLO" } else { "EHLO" };
        let mut s = SmtpClient { c, ..me };
        s.c.send(format!("{verb} harness.quill.test\r\n").as_bytes()).await?;
        s.ehlo = read_reply(&mut s.c).await?;
        if s.ehlo.code != 250 {
            bail!("{verb} after STARTTLS: {:?}", s.ehlo);
        }
        Ok(s)
    }

    /// Connects and returns the greeting without saying hello.
    pub async fn connect_raw(addr: SocketAddr) -> anyhow::Result<(Self, Reply)> {
        let mut c = Conn::connect(addr).await?;
        let greeting = read_reply(&mut c).await?;
        let dummy = Reply {
            code: 0,
            text: String::new(),
        };
        Ok((
            SmtpClient {
                c,
                lmtp: false,
                greeting: greeting.clone(),
                ehlo: dummy,
            },
            greeting,
        ))
    }

    /// Sends one command line (CRLF added) and reads one reply.
    pub async fn command(&mut self, line: &str) -> anyhow::Result<Reply> {
        self.c.send(format!("{line}\r\n").as_bytes()).await?;
        read_reply(&mut self.c).await
    }

    /// Sends raw bytes and reads one reply.
    pub async fn raw(&mut self, bytes: &[u8]) -> anyhow::Result<Reply> {
        self.c.send(bytes).await?;
        read_reply(&mut self.c).await
    }

    pub async fn read_reply(&mut self) -> anyhow::Result<Reply> {
        read_reply(&mut self.c).await
    }

    /// One transaction: MAIL, RCPT for each, DATA, the dot-stuffed body.
    /// A 421 to MAIL (the server ends the session) is [`SessionClosed`].
    /// Returns the final reply (SMTP) or the replies per accepted recipient
    /// (LMTP). An RCPT refusal is an error naming it.
    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> anyhow::Result<Vec<Reply>> {
        let r = self.command(&format!("MAIL FROM:<{from}>")).await?;
        if r.code == 421 {
            return Err(SessionClosed(r).into());
        }
        if r.code != 250 {
            bail!("MAIL: {r:?}");
        }
        for rcpt in rcpts {
            let r = self.command(&format!("RCPT TO:<{rcpt}>")).await?;
            if r.code != 250 {
                let _ = self.command("RSET").await;
                bail!("RCPT {rcpt}: {r:?}");
            }
        }
        let r = self.command("DATA").await?;
        if r.code != 354 {
            bail!("DATA: {r:?}");
        }
        self.c.send(&dot_stuff(body)).await?;
        let n = if self.lmtp { rcpts.len() } else { 1 };
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            replies.push(read_reply(&mut self.c).await?);
        }
        Ok(replies)
    }

    /// As [`Self::send_mail`], pipelined (RFC 2920), as Postfix sends:
    /// MAIL, every RCPT and DATA in one write, their replies read after;
    /// then the body. A refused recipient is an error naming it; the
    /// others still get the message when DATA was taken (as Postfix does:
    /// after 354 the message is sent), and the session goes on.
    pub async fn send_mail_pipelined(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> anyhow::Result<Vec<Reply>> {
        let mut group = format!("MAIL FROM:<{from}>\r\n");
        for rcpt in rcpts {
            group.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
        }
        group.push_str("DATA\r\n");
        self.c.send(group.as_bytes()).await?;
        let mail = read_reply(&mut self.c).await?;
        let mut refused = None;
        let mut accepted = 0;
        for rcpt in rcpts {
            let r = read_reply(&mut self.c).await?;
            if r.code == 250 {
                accepted += 1;
            } else if refused.is_none() {
                refused = Some(format!("RCPT {rcpt}: {r:?}"));
            }
        }
        let data = read_reply(&mut self.c).await?;
        if mail.code == 421 {
            return Err(SessionClosed(mail).into());
        }
        if mail.code != 250 {
            refused.get_or_insert(format!("MAIL: {mail:?}"));
        }
        if data.code != 354 {
            bail!(refused.unwrap_or(format!("DATA: {data:?}")));
        }
        self.c.send(&dot_stuff(body)).await?;
        let n = if self.lmtp { accepted } else { 1 };
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            replies.push(read_reply(&mut self.c).await?);
        }
        if let Some(why) = refused {
            bail!(why);
        }
        Ok(replies)
    }

    pub async fn quit(mut self) -> anyhow::Result<()> {
        let _ = self.command("QUIT").await?;
        Ok(())
    }
}

/// The DATA section for a message: dot-stuffed, CRLF-terminated, ending
/// with `.` CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    quill_proto::message::dot_stuff(body, &mut out);
    out
}

async fn read_reply(c: &mut Conn) -> anyhow::Result<Reply> {
    let mut text = String::new();
    loop {
        let line = c.line().await?;
        let s = String::from_utf8_lossy(&line);
        let s = s.trim_end();
        if s.len() < 3 {
            bail!("malformed reply line {s:?}");
        }
        let code: u16 = s[..3].parse().with_context(|| format!("malformed reply line {s:?}"))?;
        text.push_str(s);
        text.push('\n');
        if s.as_bytes().get(3) != Some(&b'-') {
            return Ok(Reply { code, text });
        }
    }
}

/// A POP3 client session.
pub struct Pop3Client {
    c: Conn,
    pub greeting: String,
}

impl Pop3Client {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut c = Conn::connect(addr).await?;
        let greeting = String::from_utf8_lossy(&c.line().await?).trim_end().to_owned();
        if !greeting.starts_with("+OK") {
            bail!("greeting: {greeting}");
        }
        Ok(Pop3Client { c, greeting })
    }

    /// Sends a command, returns the status line (`+OK ...` or `-ERR ...`).
    pub async fn command(&mut self, line: &str) -> anyhow::Result<String> {
        self.c.send(format!("{line}\r\n").as_bytes()).await?;
        Ok(String::from_utf8_lossy(&self.c.line().await?).trim_end().to_owned())
    }

    async fn ok(&mut self, line: &str) -> anyhow::Result<String> {
        let r = self.command(line).await?;
        if !r.starts_with("+OK") {
            bail!("{}: {r}", line.split(' ').next().unwrap_or(line));
        }
        Ok(r)
    }

    /// Reads a multi-line body after a `+OK`, undoing dot-stuffing; CRLFs kept.
    async fn multiline(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let line = self.c.line().await?;
            if line == b".\r\n" {
                return Ok(out);
            }
            let l = line.strip_prefix(b".").unwrap_or(&line);
            out.extend_from_slice(l);
        }
    }

    pub async fn login(&mut self, user: &str, password: &str) -> anyhow::Result<String> {
        self.ok(&format!("USER {user}")).await?;
        self.ok(&format!("PASS {password}")).await
    }

    /// The capability lines of CAPA.
    pub async fn capa(&mut self) -> anyhow::Result<Vec<String>> {
        self.ok("CAPA").await?;
        let body = self.multiline().await?;
        Ok(String::from_utf8_lossy(&body).lines().map(str::to_owned).collect())
    }

    /// (messages, octets)
    pub async fn stat(&mut self) -> anyhow::Result<(usize, u64)> {
        let r = self.ok("STAT").await?;
        let mut it = r.split_whitespace().skip(1);
        let n = it
            .next()
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| anyhow!("bad STAT {r}"))?;
        let o = it
            .next()
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| anyhow!("bad STAT {r}"))?;
        Ok((n, o))
    }

    /// (message number, unique id) for every message not deleted.
    pub async fn uidl(&mut self) -> anyhow::Result<Vec<(u32, String)>> {
        self.ok("UIDL").await?;
        let body = self.multiline().await?;
        String::from_utf8_lossy(&body)
            .lines()
            .map(|l| {
                let (n, u) = l.split_once(' ').ok_or_else(|| anyhow!("bad UIDL line {l}"))?;
                Ok((n.parse()?, u.to_owned()))
            })
            .collect()
    }

    pub async fn retr(&mut self, n: u32) -> anyhow::Result<Vec<u8>> {
        self.ok(&format!("RETR {n}")).await?;
        self.multiline().await
    }

    pub async fn top(&mut self, n: u32, lines: u32) -> anyhow::Result<Vec<u8>> {
        self.ok(&format!("TOP {n} {lines}")).await?;
        self.multiline().await
    }

    pub async fn dele(&mut self, n: u32) -> anyhow::Result<()> {
        self.ok(&format!("DELE {n}")).await.map(drop)
    }

    /// QUIT, which commits deletions; fails unless the server says +OK.
    pub async fn quit(mut self) -> anyhow::Result<String> {
        self.ok("QUIT").await
    }
}

/// Removes the `Received:` header the server prepends (the first header
/// field, with its continuation lines), giving back what the client sent.
pub fn strip_received(msg: &[u8]) -> Option<&[u8]> {
    if !msg.starts_with(b"Received: ") {
        return None;
    }
    let mut pos = 0;
    loop {
        let eol = msg[pos..].windows(2).position(|w| w == b"\r\n")? + pos + 2;
        pos = eol;
        if !matches!(msg.get(pos), Some(b' ') | Some(b'\t')) {
            return Some(&msg[pos..]);
        }
    }
}

impl crate::process::NodeProcess {
    /// `quill admin --node ADMIN --token TOKEN` against this node (its own
    /// binary), ready for the command's arguments.
    pub fn admin_command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.opts.binary);
        c.args([
            "admin",
            "--node",
            &self.admin_addr().to_string(),
            "--token",
            &self.opts.admin_token,
        ]);
        c
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stuffing_and_received() {
        assert_eq!(super::dot_stuff(b"a\r\n.b"), b"a\r\n..b\r\n.\r\n");
        let m = b"Received: from x\r\n\tby y;\r\n\tdate\r\nSubject: s\r\n\r\nbody\r\n";
        assert_eq!(super::strip_received(m).unwrap(), b"Subject: s\r\n\r\nbody\r\n");
        assert!(super::strip_received(b"Subject: s\r\n").is_none());
    }
}
