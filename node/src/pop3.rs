//! POP3 (RFC 1939), with CAPA (RFC 2449), AUTH PLAIN (RFC 5034) and STLS
//! (RFC 2595).
//!
//! A session sees the mailbox as it was at login; deletions are marked and
//! applied, durably, only at QUIT. One session per mailbox at a time.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use replication::EntryMeta;
use replication::replica::Listed;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::conn::trim_eol;
use crate::services::{Auth, MailboxLock, POP3_LINE_BYTES_MAX, Services, bump};
use crate::session::{Dialect, LineSession, Stream, Upgrade};

/// Failed logins in one session before it is closed.
const SESSION_AUTH_FAILURES_MAX: u32 = 3;

/// One parsed POP3 command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    User(String),
    Pass(String),
    /// `AUTH` alone lists mechanisms; otherwise mechanism and initial response.
    Auth(Option<(String, Option<String>)>),
    Capa,
    Quit,
    Stat,
    List(Option<u32>),
    Uidl(Option<u32>),
    Retr(u32),
    Top(u32, u32),
    Dele(u32),
    Rset,
    Noop,
    /// RFC 6856: UTF-8 user names and passwords (always accepted here).
    Utf8,
    /// RFC 2595: TLS from here on.
    Stls,
}

/// Parses one command line (terminator already removed). Pure: table-tested.
pub fn parse(line: &[u8]) -> Result<Command, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "command is not UTF-8")?;
    let (verb, rest) = match line.split_once(' ') {
        Some((v, r)) => (v, r),
        None => (line, ""),
    };
    let args: Vec<&str> = rest.split(' ').filter(|a| !a.is_empty()).collect();
    let num = |s: &str| -> Result<u32, &'static str> {
        match s.parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err("invalid message number"),
        }
    };
    let opt_num = |args: &[&str]| -> Result<Option<u32>, &'static str> {
        match args {
            [] => Ok(None),
            [n] => num(n).map(Some),
            _ => Err("too many arguments"),
        }
    };
    let none = |args: &[&str], c: Command| {
        if args.is_empty() {
            Ok(c)
        } else {
            Err("no arguments expected")
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "USER" => match args.as_slice() {
            [u] => Ok(Command::User((*u).to_owned())),
            _ => Err("usage: USER name"),
        },
        // A password may hold spaces: it is the rest of the line.
        "PASS" if !rest.is_empty() => Ok(Command::Pass(rest.to_owned())),
        "PASS" => Err("usage: PASS password"),
        "AUTH" => match args.as_slice() {
            [] => Ok(Command::Auth(None)),
            [m] => Ok(Command::Auth(Some((m.to_ascii_uppercase(), None)))),
            [m, ir] => Ok(Command::Auth(Some((m.to_ascii_uppercase(), Some((*ir).to_owned()))))),
            _ => Err("usage: AUTH mechanism [initial-response]"),
        },
        "CAPA" => none(&args, Command::Capa),
        "QUIT" => none(&args, Command::Quit),
        "STAT" => none(&args, Command::Stat),
        "RSET" => none(&args, Command::Rset),
        "NOOP" => none(&args, Command::Noop),
        "UTF8" => none(&args, Command::Utf8),
        "STLS" => none(&args, Command::Stls),
        "LIST" => opt_num(&args).map(Command::List),
        "UIDL" => opt_num(&args).map(Command::Uidl),
        "RETR" => match args.as_slice() {
            [n] => num(n).map(Command::Retr),
            _ => Err("usage: RETR msg"),
        },
        "DELE" => match args.as_slice() {
            [n] => num(n).map(Command::Dele),
            _ => Err("usage: DELE msg"),
        },
        "TOP" => match args.as_slice() {
            [n, k] => Ok(Command::Top(num(n)?, k.parse().map_err(|_| "invalid line count")?)),
            _ => Err("usage: TOP msg lines"),
        },
        _ => Err("unknown command"),
    }
}

/// The CAPA reply: USER and SASL only where a password may be sent now
/// (RFC 2595 4: not before STLS where plaintext logins are refused), STLS
/// while TLS can still be started.
fn capa(login: bool, stls: bool) -> String {
    let mut c = String::from("+OK Capability list follows\r\n");
    if login {
        c.push_str("USER\r\nSASL PLAIN\r\n");
    }
    if stls {
        c.push_str("STLS\r\n");
    }
    c.push_str("TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUTF8 USER\r\nEXPIRE NEVER\r\nIMPLEMENTATION Quill\r\n.");
    c
}

/// The answer to a login sent in the clear where `--plaintext-auth` refuses it.
const PLAINTEXT_REFUSED: &str =
    "-ERR [AUTH] Plaintext authentication disallowed on an unencrypted connection; use STLS (or port 995) first";

struct Mailbox {
    user: String,
    entries: Vec<EntryMeta>,
    /// The same messages with the nodes that hold them.
    listed: Vec<Listed>,
    deleted: Vec<bool>,
    _lock: MailboxLock,
}

/// What POP3 answers to the session scaffold's events.
static DIALECT: Dialect = Dialect {
    line_bytes_max: POP3_LINE_BYTES_MAX,
    line_too_long: "-ERR line too long",
    too_many_errors: "-ERR too many errors, closing connection",
    too_many_commands: "-ERR too many commands in one session, closing connection",
    idle: "-ERR [SYS/TEMP] idle timeout, closing connection",
    shutting_down: "-ERR [SYS/TEMP] server shutting down",
};

struct Session<S> {
    io: LineSession<S>,
    services: Arc<Services>,
    peer: SocketAddr,
    user: Option<String>,
    mailbox: Option<Mailbox>,
    auth_failures: u32,
}

/// Serves one plaintext connection (STLS offered when TLS is set up).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    services: Arc<Services>,
    shutdown: watch::Receiver<bool>,
) {
    serve_on(Stream::Plain(stream), peer, services, shutdown).await
}

/// Serves one connection, plaintext or already under TLS (`--pop3s`).
pub async fn serve_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: Stream<S>,
    peer: SocketAddr,
    services: Arc<Services>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut s = Session {
        io: LineSession::new(stream, services.clone(), &DIALECT, 8 * 1024, 64 * 1024),
        services,
        peer,
        user: None,
        mailbox: None,
        auth_failures: 0,
    };
    let result = async {
        s.reply("+OK Quill POP3 server ready").await?;
        s.run(&mut shutdown).await
    }
    .await;
    if let Err(e) = result {
        debug!(peer = %s.peer, error = %e, "pop3 session ended with an i/o error");
    }
}

enum Flow {
    Continue,
    Close,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn reply(&mut self, text: &str) -> std::io::Result<()> {
        self.io.reply(text).await
    }

    /// The next command line without its terminator, or `None` when the
    /// session is over (see [`LineSession::next_command`]).
    async fn read(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.io.next_command(shutdown).await?.map(|l| trim_eol(&l).to_vec()))
    }

    async fn bad(&mut self) -> std::io::Result<bool> {
        self.io.bad().await
    }

    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<()> {
        while let Some(line) = self.read(shutdown).await? {
            let cmd = match parse(&line) {
                Ok(c) => c,
                Err(why) => {
                    self.reply(&format!("-ERR {why}")).await?;
                    if self.bad().await? {
                        break;
                    }
                    continue;
                }
            };
            let flow = if self.mailbox.is_none() {
                self.authorization(cmd, shutdown).await?
            } else {
                self.transaction(cmd).await?
            };
            if let Flow::Close = flow {
                break;
            }
        }
        self.io.flush().await
    }

    async fn authorization(&mut self, cmd: Command, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<Flow> {
        let login = self.io.may_send_password(self.peer.ip());
        match cmd {
            Command::Capa => {
                let c = capa(login, self.io.can_start_tls());
                self.reply(&c).await?
            }
            Command::Stls if self.io.tls().is_some() => self.reply("-ERR TLS already active").await?,
            Command::Stls if !self.io.can_start_tls() => self.reply("-ERR [SYS/TEMP] TLS not available").await?,
            Command::Stls => {
                self.reply("+OK Begin TLS negotiation").await?;
                match self.io.start_tls().await? {
                    // Start over: no USER given before counts.
                    Upgrade::Done => self.user = None,
                    Upgrade::Failed => return Ok(Flow::Close),
                }
            }
            Command::Utf8 => self.reply("+OK UTF8 enabled").await?,
            Command::User(_) | Command::Pass(_) | Command::Auth(Some(_)) if !login => {
                bump(&self.services.metrics.plaintext_auth_refused);
                self.user = None;
                self.reply(PLAINTEXT_REFUSED).await?;
                if self.bad().await? {
                    return Ok(Flow::Close);
                }
            }
            Command::Quit => {
                self.reply("+OK Quill POP3 server signing off").await?;
                return Ok(Flow::Close);
            }
            Command::User(u) => {
                self.user = Some(u);
                self.reply("+OK send PASS").await?;
            }
            Command::Pass(pw) => match self.user.take() {
                None => self.reply("-ERR USER first").await?,
                Some(user) => return self.login(&user, &pw).await,
            },
            Command::Auth(None) => self.reply("+OK mechanisms follow\r\nPLAIN\r\n.").await?,
            Command::Auth(Some((mech, initial))) => {
                if mech != "PLAIN" {
                    self.reply("-ERR unsupported authentication mechanism").await?;
                    return Ok(Flow::Continue);
                }
                let response = match initial {
                    Some(r) => r,
                    None => {
                        self.reply("+ ").await?;
                        match self.read(shutdown).await? {
                            None => return Ok(Flow::Close),
                            Some(l) => String::from_utf8_lossy(&l).into_owned(),
                        }
                    }
                };
                if response == "*" {
                    self.reply("-ERR authentication cancelled").await?;
                    return Ok(Flow::Continue);
                }
                match decode_plain(&response) {
                    Ok((user, pw)) => return self.login(&user, &pw).await,
                    Err(reply) => self.reply(reply).await?,
                }
            }
            _ => self.reply("-ERR not allowed before login").await?,
        }
        Ok(Flow::Continue)
    }

    async fn login(&mut self, user: &str, password: &str) -> std::io::Result<Flow> {
        match self.services.authenticate(self.peer.ip(), user, password).await {
            Auth::Blocked => {
                bump(&self.services.metrics.limit_refusals);
                self.reply("-ERR [SYS/TEMP] too many authentication failures, try again later")
                    .await?;
                Ok(Flow::Close)
            }
            Auth::Failed => {
                self.auth_failures += 1;
                self.reply("-ERR [AUTH] invalid user name or password").await?;
                if self.auth_failures >= SESSION_AUTH_FAILURES_MAX {
                    return Ok(Flow::Close);
                }
                Ok(Flow::Continue)
            }
            Auth::Ok(record) => {
                let mailbox = record.mailbox();
                let Some(mut lock) = self.services.lock_mailbox(&mailbox) else {
                    self.reply("-ERR [IN-USE] mailbox is locked by another session").await?;
                    return Ok(Flow::Close);
                };
                // And cluster-wide, at the user's manager.
                match self.services.mail.lock_mailbox(&mailbox).await {
                    Ok(granted) => lock.hold_cluster(granted),
                    Err(replication::replica::MailboxInUse) => {
                        self.reply("-ERR [IN-USE] mailbox is locked by another session").await?;
                        return Ok(Flow::Close);
                    }
                }
                // The union of the user's fragments across the cluster.
                let listed: Vec<Listed> = self
                    .services
                    .mail
                    .mailbox(&mailbox)
                    .await
                    .into_iter()
                    .filter(|l| l.meta.folder == "INBOX")
                    .collect();
                let entries: Vec<EntryMeta> = listed.iter().map(|l| l.meta.clone()).collect();
                let octets: u64 = entries.iter().map(|e| e.size_bytes).sum();
                let n = entries.len();
                bump(&self.services.metrics.pop3_sessions);
                debug!(peer = %self.peer, user = %record.address, messages = n, "pop3 login");
                self.mailbox = Some(Mailbox {
                    user: mailbox,
                    deleted: vec![false; n],
                    entries,
                    listed,
                    _lock: lock,
                });
                self.reply(&format!("+OK maildrop has {n} messages ({octets} octets)"))
                    .await?;
                Ok(Flow::Continue)
            }
        }
    }

    /// The entry numbered `n` (1-based) unless absent or marked deleted.
    fn message(&self, n: u32) -> Result<&EntryMeta, String> {
        let mb = self.mailbox.as_ref().expect("in transaction state");
        let i = n as usize - 1;
        match mb.entries.get(i) {
            None => Err(format!("-ERR no such message {n}")),
            Some(_) if mb.deleted[i] => Err(format!("-ERR message {n} already deleted")),
            Some(e) => Ok(e),
        }
    }

    async fn transaction(&mut self, cmd: Command) -> std::io::Result<Flow> {
        let mb = self.mailbox.as_ref().expect("in transaction state");
        let live = || {
            mb.entries
                .iter()
                .zip(&mb.deleted)
                .enumerate()
                .filter(|(_, (_, d))| !**d)
        };
        match cmd {
            Command::Capa => self.reply(&capa(false, false)).await?,
            Command::Stls => self.reply("-ERR STLS only before login").await?,
            Command::Noop => self.reply("+OK").await?,
            // RFC 6856 §2: not permitted after authentication.
            Command::Utf8 => self.reply("-ERR UTF8 must come before login").await?,
            Command::Stat => {
                let (n, octets) = live().fold((0, 0), |(n, o), (_, (e, _))| (n + 1, o + e.size_bytes));
                self.reply(&format!("+OK {n} {octets}")).await?;
            }
            Command::List(None) | Command::Uidl(None) => {
                let uidl = matches!(cmd, Command::Uidl(None));
                let mut out = String::from("+OK\r\n");
                for (i, (e, _)) in live() {
                    if uidl {
                        out.push_str(&format!("{} {}\r\n", i + 1, e.id.to_hex()));
                    } else {
                        out.push_str(&format!("{} {}\r\n", i + 1, e.size_bytes));
                    }
                }
                out.push('.');
                self.reply(&out).await?;
            }
            Command::List(Some(n)) => {
                let text = self.message(n).map(|e| format!("+OK {n} {}", e.size_bytes));
                self.reply(&text.unwrap_or_else(|e| e)).await?;
            }
            Command::Uidl(Some(n)) => {
                let text = self.message(n).map(|e| format!("+OK {n} {}", e.id.to_hex()));
                self.reply(&text.unwrap_or_else(|e| e)).await?;
            }
            Command::Retr(n) => self.send_message(n, None).await?,
            Command::Top(n, k) => self.send_message(n, Some(k)).await?,
            Command::Dele(n) => match self.message(n) {
                Err(e) => self.reply(&e).await?,
                Ok(_) => {
                    self.mailbox.as_mut().expect("in transaction").deleted[n as usize - 1] = true;
                    self.reply(&format!("+OK message {n} deleted")).await?;
                }
            },
            Command::Rset => {
                let mb = self.mailbox.as_mut().expect("in transaction");
                mb.deleted.iter_mut().for_each(|d| *d = false);
                let n = mb.entries.len();
                self.reply(&format!("+OK maildrop has {n} messages")).await?;
            }
            Command::Quit => {
                let mb = self.mailbox.take().expect("in transaction");
                let victims: Vec<Listed> = mb
                    .listed
                    .iter()
                    .zip(&mb.deleted)
                    .filter(|(_, d)| **d)
                    .map(|(l, _)| l.clone())
                    .collect();
                let n_deleted = victims.len();
                let left = mb.entries.len() - n_deleted;
                // To every replica of each message; a replica that is down
                // gets it from the update log when it returns.
                let outcome = self.services.mail.delete(&mb.user, &victims).await;
                // RFC 1939 §6: the lock goes before the reply, not after.
                let Mailbox { user, _lock: lock, .. } = mb;
                lock.release().await;
                match outcome {
                    Ok(_) => {
                        // A POP3 DELE is an IMAP expunge: the UIDs are
                        // forgotten (after the reply; best effort: a number
                        // left behind costs memory, never a wrong UID).
                        let ids: Vec<[u8; 16]> = victims.iter().map(|l| l.meta.id.0).collect();
                        if !ids.is_empty() {
                            let (services, name) = (self.services.clone(), crate::uids::sequence_name(&user, "INBOX"));
                            tokio::spawn(async move { services.uids.forget(&name, ids).await });
                        }
                        self.services
                            .metrics
                            .messages_deleted
                            .fetch_add(n_deleted as u64, std::sync::atomic::Ordering::Relaxed);
                        info!(peer = %self.peer, user = %user, deleted = n_deleted, "pop3 update");
                        self.reply(&format!("+OK Quill POP3 server signing off ({left} messages left)"))
                            .await?;
                    }
                    Err(e) => {
                        warn!(user = %user, error = %e, "pop3 update failed");
                        self.reply("-ERR [SYS/TEMP] some deleted messages not removed").await?;
                    }
                }
                return Ok(Flow::Close);
            }
            Command::User(_) | Command::Pass(_) | Command::Auth(_) => self.reply("-ERR already logged in").await?,
        }
        Ok(Flow::Continue)
    }

    async fn send_message(&mut self, n: u32, top_lines: Option<u32>) -> std::io::Result<()> {
        let entry = match self.message(n) {
            Err(e) => return self.reply(&e).await,
            Ok(e) => e.clone(),
        };
        let listed = self.mailbox.as_ref().expect("in transaction").listed[n as usize - 1].clone();
        // From a live replica, this node first.
        let started = std::time::Instant::now();
        let read = self.services.mail.read(&listed).await;
        if top_lines.is_none() {
            crate::metrics::Latencies::observe(&self.services.latency.retrieval, started.elapsed());
        }
        let body = match read {
            Ok(b) => b,
            Err(e) => {
                warn!(id = %entry.id, error = %e, "cannot read message body");
                return self.reply("-ERR [SYS/TEMP] message cannot be read now").await;
            }
        };
        let body = match top_lines {
            None => &body[..],
            Some(k) => top(&body, k),
        };
        self.io
            .w
            .write_all(format!("+OK {} octets\r\n", entry.size_bytes).as_bytes())
            .await?;
        write_dot_stuffed(&mut self.io.w, body).await?;
        if top_lines.is_none() {
            bump(&self.services.metrics.messages_retrieved);
        }
        if self.io.r.buffer().is_empty() {
            self.io.flush().await?;
        }
        Ok(())
    }
}

/// The header, the blank line and the first `k` body lines of a message.
fn top(msg: &[u8], k: u32) -> &[u8] {
    let header_end = msg
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(msg.len());
    let mut end = header_end;
    for _ in 0..k {
        match msg[end..].windows(2).position(|w| w == b"\r\n") {
            Some(i) => end += i + 2,
            None => {
                end = msg.len();
                break;
            }
        }
    }
    &msg[..end]
}

/// Writes a multi-line response body: a dot before every line that starts
/// with one, CRLF at the end, then the terminating `.` line.
async fn write_dot_stuffed<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    let mut start = 0;
    let mut at_line_start = true;
    for (i, &b) in body.iter().enumerate() {
        if at_line_start && b == b'.' {
            w.write_all(&body[start..i]).await?;
            w.write_all(b".").await?;
            start = i;
        }
        at_line_start = b == b'\n';
    }
    w.write_all(&body[start..]).await?;
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        w.write_all(b"\r\n").await?;
    }
    w.write_all(b".\r\n").await
}

/// `authzid NUL authcid NUL password`, base64 (RFC 4616). The authorization
/// identity must be empty or the same as the authentication identity
/// (nobody may act as another user); the error is the reply to send.
fn decode_plain(b64: &str) -> Result<(String, String), &'static str> {
    const MALFORMED: &str = "-ERR malformed AUTH PLAIN response";
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| MALFORMED)?;
    let mut parts = raw.split(|&b| b == 0);
    let (Some(authz), Some(authc), Some(pw), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(MALFORMED);
    };
    if authc.is_empty() {
        return Err(MALFORMED);
    }
    if !authz.is_empty() && authz != authc {
        return Err("-ERR [AUTH] logging in as another user (authorization identity) is not permitted");
    }
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| MALFORMED);
    Ok((text(authc)?, text(pw)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<Command, &str>)] = &[
            ("USER alice@example.org", Ok(Command::User("alice@example.org".into()))),
            ("user bob", Ok(Command::User("bob".into()))),
            ("USER", Err("usage: USER name")),
            ("PASS two words", Ok(Command::Pass("two words".into()))),
            ("PASS", Err("usage: PASS password")),
            ("STAT", Ok(Command::Stat)),
            ("STAT 1", Err("no arguments expected")),
            ("LIST", Ok(Command::List(None))),
            ("LIST 3", Ok(Command::List(Some(3)))),
            ("LIST 0", Err("invalid message number")),
            ("LIST -1", Err("invalid message number")),
            ("LIST 99999999999", Err("invalid message number")),
            ("UIDL 2", Ok(Command::Uidl(Some(2)))),
            ("RETR 1", Ok(Command::Retr(1))),
            ("RETR", Err("usage: RETR msg")),
            ("TOP 1 0", Ok(Command::Top(1, 0))),
            ("TOP 1 x", Err("invalid line count")),
            ("DELE 7", Ok(Command::Dele(7))),
            ("AUTH", Ok(Command::Auth(None))),
            (
                "AUTH plain AGEAYg==",
                Ok(Command::Auth(Some(("PLAIN".into(), Some("AGEAYg==".into()))))),
            ),
            ("CAPA", Ok(Command::Capa)),
            ("QUIT", Ok(Command::Quit)),
            ("APOP a b", Err("unknown command")),
            ("", Err("unknown command")),
        ];
        for (line, want) in cases {
            assert_eq!(&parse(line.as_bytes()), want, "{line:?}");
        }
        assert_eq!(parse(b"USER \xff"), Err("command is not UTF-8"));
    }

    #[test]
    fn plain() {
        let enc = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(decode_plain(&enc(b"\0alice\0pw")), Ok(("alice".into(), "pw".into())));
        assert_eq!(
            decode_plain(&enc(b"alice\0alice\0pw")),
            Ok(("alice".into(), "pw".into()))
        );
        assert!(decode_plain(&enc(b"bob\0alice\0pw")).is_err_and(|e| e.contains("not permitted")));
        assert!(decode_plain(&enc(b"alice\0pw")).is_err_and(|e| e.contains("malformed")));
        assert!(decode_plain("!!!").is_err_and(|e| e.contains("malformed")));
        // UTF-8 identities (RFC 6531 users) pass through.
        assert_eq!(
            decode_plain(&enc("\0jürgen@example.org\0pw".as_bytes())),
            Ok(("jürgen@example.org".into(), "pw".into()))
        );
    }

    #[tokio::test]
    async fn dot_stuffing_and_top() {
        let mut out = Vec::new();
        write_dot_stuffed(&mut out, b"a\r\n.b\r\n..\r\n").await.unwrap();
        assert_eq!(out, b"a\r\n..b\r\n...\r\n.\r\n");
        let mut out = Vec::new();
        write_dot_stuffed(&mut out, b".x").await.unwrap();
        assert_eq!(out, b"..x\r\n.\r\n");
        let msg = b"H: 1\r\nH: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        assert_eq!(top(msg, 0), b"H: 1\r\nH: 2\r\n\r\n");
        assert_eq!(top(msg, 2), b"H: 1\r\nH: 2\r\n\r\nl1\r\nl2\r\n");
        assert_eq!(top(msg, 9), &msg[..]);
    }
}
