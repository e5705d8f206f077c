//! SMTP (RFC 5321) and LMTP (RFC 2033) for inbound mail: one session per
//! connection. Commands are parsed by `smtp-proto`; this module keeps the
//! session state, applies the limits and talks to the store.
//!
//! The reply to the end of DATA is sent only after the message is fsynced.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use membership::{Recipient, needs_smtputf8};
use smtp_proto::{Error as ParseError, MAIL_SMTPUTF8, Request};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::conn::{Line, read_line};
use crate::data::{DATA_LINE_BYTES_MAX, DataReader, Refusal, Step};
use crate::services::{SMTP_COMMAND_BYTES_MAX, Services, bump};
use crate::session::{Dialect, LineSession, Stream, Upgrade};
use crate::time::{now_ms, rfc5322_date};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Smtp,
    Lmtp,
    /// Message submission (RFC 6409, `--submission`): AUTH required; the
    /// envelope sender and `From:` must be the authenticated user.
    Submission,
}

/// How a DATA section ended.
enum Body {
    /// With its share of the node's memory budget, held until delivered.
    Ok(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>),
    Refused(Refusal),
    Closed,
}

struct Transaction {
    mail_from: String,
    /// `MAIL FROM ... SMTPUTF8` (RFC 6531): UTF-8 addresses allowed.
    smtputf8: bool,
    /// Accepted recipients in RCPT order, without duplicates (but for LMTP,
    /// which owes one reply per RCPT).
    rcpts: Vec<Rcpt>,
    /// Recipients in other domains (submission only): the outbound queue's.
    remote: Vec<String>,
}

#[derive(Clone, PartialEq, Eq)]
struct Rcpt {
    /// The user's normalized address (replies, headers).
    address: String,
    /// Where their mail is stored (`UserRecord::mailbox`).
    mailbox: String,
}

/// Unknown recipients in one session answered at once; past this each
/// `550` waits [`UNKNOWN_RCPT_DELAY`] (Postfix's error sleep), so that
/// guessing addresses is slow.
const UNKNOWN_RCPT_FREE: u32 = 3;
const UNKNOWN_RCPT_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// Unknown recipients that end one session with `421`.
const UNKNOWN_RCPT_SESSION_MAX: u32 = 10;

/// What SMTP and LMTP answer to the session scaffold's events.
static DIALECT: Dialect = Dialect {
    line_bytes_max: SMTP_COMMAND_BYTES_MAX,
    line_too_long: "500 5.5.2 Line too long (512 octets max)",
    too_many_errors: "421 4.7.0 Too many errors, closing connection",
    too_many_commands: "421 4.7.0 Too many commands in one session, closing connection",
    idle: "421 4.4.2 Idle timeout, closing connection",
    shutting_down: "421 4.3.2 Service shutting down, closing transmission channel",
};

struct Session<S> {
    io: LineSession<S>,
    services: Arc<Services>,
    mode: Mode,
    peer: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    /// Unknown recipients named in this session.
    n_unknown: u32,
    /// Submission: the authenticated user's address.
    authed: Option<String>,
    auth_failures: u32,
}

/// Failed AUTH attempts in one submission session before it is closed.
const AUTH_FAILURES_MAX: u32 = 3;
/// Longest AUTH response line (base64 of a PLAIN response).
const AUTH_LINE_BYTES_MAX: usize = 12 * 1024;

/// Sanitizes a client-supplied name for a `Received:` header: printable
/// ASCII only, at most 255 bytes.
fn clean_name(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic()).take(255).collect()
}

/// Serves one plaintext connection (STARTTLS offered when TLS is set up).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    services: Arc<Services>,
    mode: Mode,
    shutdown: watch::Receiver<bool>,
) {
    serve_on(Stream::Plain(stream), peer, services, mode, shutdown).await
}

/// Serves one connection, plaintext or already under TLS (`--smtps`).
pub async fn serve_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: Stream<S>,
    peer: SocketAddr,
    services: Arc<Services>,
    mode: Mode,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut s = Session {
        io: LineSession::new(stream, services.clone(), &DIALECT, 16 * 1024, 16 * 1024),
        services,
        mode,
        peer,
        helo: None,
        esmtp: false,
        tx: None,
        n_unknown: 0,
        authed: None,
        auth_failures: 0,
    };
    let proto = if mode == Mode::Lmtp { "LMTP" } else { "ESMTP" };
    let host = s.services.hostname.clone();
    if s.reply(&format!("220 {host} {proto} Quill ready")).await.is_err() {
        return;
    }
    if let Err(e) = s.run(&mut shutdown).await {
        debug!(peer = %s.peer, error = %e, "session ended with an i/o error");
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn reply(&mut self, text: &str) -> std::io::Result<()> {
        self.io.reply(text).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.io.flush().await
    }

    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<()> {
        while let Some(line) = self.io.next_command(shutdown).await? {
            if !self.command(&line).await? {
                return self.flush().await;
            }
        }
        Ok(())
    }

    /// Counts a bad command; true when the session must end.
    async fn bad(&mut self) -> std::io::Result<bool> {
        self.io.bad().await
    }

    /// Handles one command line; false ends the session.
    async fn command(&mut self, line: &[u8]) -> std::io::Result<bool> {
        // read_line always hands over the line feed smtp-proto wants.
        let req = match Request::parse(&mut line.iter()) {
            Ok(r) => r,
            Err(e) => {
                let text = match e {
                    ParseError::UnknownCommand => "500 5.5.1 Command unrecognized".to_owned(),
                    ParseError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
                    ParseError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".to_owned(),
                    ParseError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax".to_owned(),
                    ParseError::InvalidParameter { param } => format!("501 5.5.4 Invalid parameter {param}"),
                    ParseError::UnsupportedParameter { param } => {
                        format!("555 5.5.4 Unsupported parameter {}", clean_name(&param))
                    }
                    _ => "500 5.5.2 Syntax error".to_owned(),
                };
                self.reply(&text).await?;
                return Ok(!self.bad().await?);
            }
        };
        let lmtp = self.mode == Mode::Lmtp;
        match req {
            Request::Ehlo { host } | Request::Lhlo { host } | Request::Helo { host } => {
                let verb = line.get(..4).unwrap_or_default();
                let (is_lhlo, is_helo) = (verb.eq_ignore_ascii_case(b"LHLO"), verb.eq_ignore_ascii_case(b"HELO"));
                if lmtp != is_lhlo {
                    let want = if lmtp { "LHLO" } else { "EHLO or HELO" };
                    self.reply(&format!("500 5.5.1 This service wants {want}")).await?;
                    return Ok(!self.bad().await?);
                }
                self.tx = None;
                self.helo = Some(clean_name(&host));
                self.esmtp = !is_helo;
                let me = self.services.hostname.clone();
                if is_helo {
                    self.reply(&format!("250 {me}")).await?;
                } else {
                    let size = self.services.limits.message_bytes_max;
                    let starttls = if self.io.can_start_tls() { "250-STARTTLS\r\n" } else { "" };
                    // RFC 4954: AUTH only where a password may be sent.
                    let auth = if self.mode == Mode::Submission
                        && self.authed.is_none()
                        && self.io.may_send_password(self.peer.ip())
                    {
                        "250-AUTH PLAIN LOGIN\r\n"
                    } else {
                        ""
                    };
                    self.reply(&format!(
                        "250-{me}\r\n250-PIPELINING\r\n250-SIZE {size}\r\n250-8BITMIME\r\n\
                         {starttls}{auth}250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 HELP"
                    ))
                    .await?;
                }
            }
            Request::Mail { from } => {
                if self.helo.is_none() {
                    let hello = if lmtp { "LHLO" } else { "EHLO/HELO" };
                    self.reply(&format!("503 5.5.1 Send {hello} first")).await?;
                } else if self.mode == Mode::Submission && self.authed.is_none() {
                    self.reply("530 5.7.0 Authentication required").await?;
                } else if self.mode == Mode::Submission
                    && !self.authed.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(&from.address))
                {
                    self.reply("553 5.7.1 Sender address not owned by the authenticated user").await?;
                } else if self.tx.is_some() {
                    self.reply("503 5.5.1 Sender already specified").await?;
                } else if from.size > self.services.limits.message_bytes_max {
                    bump(&self.services.metrics.limit_refusals);
                    self.reply("552 5.3.4 Message size exceeds fixed maximum message size").await?;
                } else if needs_smtputf8(&from.address) && from.flags & MAIL_SMTPUTF8 == 0 {
                    self.reply("553 5.6.7 A UTF-8 address needs the SMTPUTF8 parameter (RFC 6531)")
                        .await?;
                } else {
                    self.tx = Some(Transaction {
                        mail_from: from.address.chars().filter(|c| !c.is_control()).take(256).collect(),
                        smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
                        rcpts: Vec::new(),
                        remote: Vec::new(),
                    });
                    self.reply("250 2.1.0 Sender ok").await?;
                }
            }
            Request::Rcpt { to } if to.address.is_empty() => {
                // smtp-proto hands `<Postmaster>` (no domain) over as "".
                let lower = String::from_utf8_lossy(line).to_ascii_lowercase();
                if lower.contains("<postmaster>") {
                    return self.rcpt("postmaster").await;
                } else {
                    self.reply("501 5.1.3 Bad recipient address syntax").await?;
                    return Ok(!self.bad().await?);
                }
            }
            Request::Rcpt { to } => return self.rcpt(&to.address).await,
            Request::Data => return self.data().await,
            Request::StartTls => return self.start_tls(line).await,
            Request::Auth {
                mechanism,
                initial_response,
            } if self.mode == Mode::Submission => return self.auth(mechanism, initial_response.into_owned()).await,
            Request::Rset => {
                self.tx = None;
                self.reply("250 2.0.0 Ok").await?;
            }
            Request::Noop { .. } => self.reply("250 2.0.0 Ok").await?,
            Request::Vrfy { .. } => self.reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery").await?,
            Request::Help { .. } => {
                self.reply("214-2.0.0 Commands: EHLO HELO LHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT\r\n214 2.0.0 End of HELP").await?
            }
            Request::Quit => {
                self.reply("221 2.0.0 Bye").await?;
                return Ok(false);
            }
            other => {
                self.reply(&format!("502 5.5.1 {} not implemented", other.name())).await?;
            }
        }
        Ok(true)
    }

    /// `STARTTLS` (RFC 3207): on success the session starts over, as if
    /// just connected (no greeting): the client must send EHLO again, and
    /// nothing it sent before the handshake is executed.
    async fn start_tls(&mut self, line: &[u8]) -> std::io::Result<bool> {
        if crate::conn::trim_eol(line).len() != b"STARTTLS".len() {
            self.reply("501 5.5.4 Syntax: STARTTLS takes no parameters").await?;
            return Ok(!self.bad().await?);
        }
        if self.io.tls().is_some() {
            self.reply("503 5.5.1 TLS already active").await?;
            return Ok(!self.bad().await?);
        }
        if !self.io.can_start_tls() {
            self.reply("454 4.7.0 TLS not available").await?;
            return Ok(true);
        }
        self.reply("220 2.0.0 Ready to start TLS").await?;
        match self.io.start_tls().await? {
            Upgrade::Done => {
                self.helo = None;
                self.esmtp = false;
                self.tx = None;
                self.authed = None;
                Ok(true)
            }
            Upgrade::Failed => Ok(false),
        }
    }

    /// Handles `RCPT TO`; false ends the session.
    async fn rcpt(&mut self, address: &str) -> std::io::Result<bool> {
        let Some(tx) = &self.tx else {
            self.reply("503 5.5.1 Need MAIL command first").await?;
            return Ok(true);
        };
        if tx.rcpts.len() + tx.remote.len() >= self.services.limits.recipients_max {
            bump(&self.services.metrics.limit_refusals);
            self.reply("452 4.5.3 Too many recipients").await?;
            return Ok(true);
        }
        if needs_smtputf8(address) && !tx.smtputf8 {
            self.reply("553 5.6.7 A UTF-8 address needs the SMTPUTF8 parameter (RFC 6531)")
                .await?;
            return Ok(true);
        }
        // An address that has named too many unknown users lately is told
        // to come back, whoever it names now: the answer says nothing
        // about who exists.
        let ip = self.peer.ip();
        if self.services.unknown_recipients_exhausted(ip) {
            bump(&self.services.metrics.limit_refusals);
            self.reply("450 4.7.1 Too many unknown recipients from your address, try again later")
                .await?;
            return Ok(true);
        }
        let user = match self.services.resolve_recipient(address) {
            Recipient::Local(user) => user,
            Recipient::UnknownUser => return self.unknown_recipient(ip).await,
            Recipient::NotLocal if self.mode == Mode::Submission => {
                if self.services.queue_full() {
                    bump(&self.services.metrics.limit_refusals);
                    self.reply("451 4.3.1 Outbound queue full, try again later").await?;
                    return Ok(true);
                }
                if crate::queue::domain_of(address).is_none() {
                    self.reply("553 5.1.3 A recipient address needs a domain").await?;
                    return Ok(true);
                }
                if let Some(user) = self.authed.clone()
                    && let Err(reply) = self.services.spend_sending_allowance(&user, true).await
                {
                    bump(&self.services.metrics.limit_refusals);
                    self.reply(reply).await?;
                    return Ok(true);
                }
                let tx = self.tx.as_mut().expect("checked above");
                let address: String = address.chars().filter(|c| !c.is_control()).take(320).collect();
                if !tx.remote.contains(&address) {
                    tx.remote.push(address);
                }
                self.reply("250 2.1.5 Recipient ok (queued for remote delivery)")
                    .await?;
                return Ok(true);
            }
            Recipient::NotLocal => {
                self.reply("550 5.7.1 Relaying denied").await?;
                return Ok(true);
            }
        };
        let mailbox = user.mailbox();
        // The mailbox size as the user's manager knows it (this node's
        // share only if the manager does not answer).
        if let Some(quota) = user.quota_bytes
            && self.services.mail.usage_bytes(&mailbox).await >= quota
        {
            bump(&self.services.metrics.limit_refusals);
            self.reply("552 5.2.2 Mailbox full").await?;
            return Ok(true);
        }
        let tx = self.tx.as_mut().expect("checked above");
        let rcpt = Rcpt {
            address: user.address,
            mailbox,
        };
        // One entry per mailbox, however often it is named; LMTP still
        // owes one reply per RCPT, so keep duplicates there.
        if self.mode == Mode::Lmtp || !tx.rcpts.contains(&rcpt) {
            tx.rcpts.push(rcpt);
        }
        self.reply("250 2.1.5 Recipient ok").await?;
        Ok(true)
    }

    /// `550` for an unknown user, slowed down after a few and ending the
    /// session after more (directory harvesting).
    async fn unknown_recipient(&mut self, ip: std::net::IpAddr) -> std::io::Result<bool> {
        self.n_unknown += 1;
        self.services.note_unknown_recipient(ip);
        if self.n_unknown > UNKNOWN_RCPT_FREE {
            self.flush().await?;
            tokio::time::sleep(UNKNOWN_RCPT_DELAY).await;
        }
        self.reply("550 5.1.1 No such user here").await?;
        if self.n_unknown >= UNKNOWN_RCPT_SESSION_MAX {
            bump(&self.services.metrics.limit_refusals);
            self.reply("421 4.7.0 Too many unknown recipients, closing connection")
                .await?;
            return Ok(false);
        }
        Ok(true)
    }

    async fn data(&mut self) -> std::io::Result<bool> {
        let rcpts = match &self.tx {
            None => {
                self.reply("503 5.5.1 Need MAIL command first").await?;
                return Ok(true);
            }
            Some(tx) if tx.rcpts.is_empty() && tx.remote.is_empty() => {
                self.reply("554 5.5.1 No valid recipients").await?;
                return Ok(true);
            }
            Some(tx) => tx.rcpts.clone(),
        };
        let remote = self.tx.as_ref().is_some_and(|t| !t.remote.is_empty());
        if remote
            && let Some(user) = self.authed.clone()
            && let Err(reply) = self.services.spend_sending_allowance(&user, false).await
        {
            bump(&self.services.metrics.limit_refusals);
            self.tx = None;
            self.reply(reply).await?;
            return Ok(true);
        }
        self.reply("354 Start mail input; end with <CRLF>.<CRLF>").await?;
        self.flush().await?;
        let arrival_ms = now_ms();
        let id = self.services.mail.new_message_id(arrival_ms);
        // One copy per mailbox; the header names addresses.
        let mut unique: Vec<String> = rcpts.iter().map(|r| r.mailbox.clone()).collect();
        unique.sort();
        unique.dedup();
        let mut addresses: Vec<&str> = rcpts.iter().map(|r| r.address.as_str()).collect();
        addresses.sort_unstable();
        addresses.dedup();
        let received = self.received_header(&id.to_hex(), &addresses, arrival_ms);
        let (body, _budget) = match self.read_body(received).await? {
            Body::Ok(b, budget) => (b, budget),
            Body::Closed => return Ok(false),
            Body::Refused(why) => {
                self.tx = None;
                bump(&self.services.metrics.limit_refusals);
                let text = match why {
                    Refusal::TooBig => "552 5.3.4 Message size exceeds fixed maximum message size".to_owned(),
                    Refusal::LineTooLong => {
                        format!("500 5.5.2 Message has a line longer than {DATA_LINE_BYTES_MAX} octets (CRLF included)")
                    }
                    Refusal::BareLineEnd => {
                        warn!(peer = %self.peer, "message with a bare CR or LF refused");
                        "500 5.5.2 Message has a bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)".to_owned()
                    }
                    Refusal::NoMemory => {
                        warn!(peer = %self.peer, "message refused: the node's memory budget for messages is spent");
                        "452 4.3.1 Insufficient system resources, try again later".to_owned()
                    }
                };
                self.reply(&text).await?;
                return Ok(true);
            }
        };
        // A message that has been through too many hops is looping (RFC
        // 5321 6.3), as is one that says it was already delivered to one
        // of its recipients here.
        // (`body` starts with this node's own `Received:`.)
        let looping = crate::queue::received_count(&body) > crate::queue::RECEIVED_MAX + 1
            || rcpts.iter().any(|r| crate::queue::delivered_to(&body, &r.address));
        if looping {
            self.tx = None;
            bump(&self.services.metrics.limit_refusals);
            warn!(peer = %self.peer, "message refused: mail loop");
            self.reply("554 5.4.6 Too many hops or already delivered here: mail loop detected")
                .await?;
            return Ok(true);
        }
        // Submission: every From: address must be the authenticated user.
        if self.mode == Mode::Submission
            && let Some(user) = &self.authed
            && !from_is(&body, user)
        {
            self.tx = None;
            self.reply("553 5.7.1 From: header not owned by the authenticated user")
                .await?;
            return Ok(true);
        }
        let size = body.len();
        let (from, remote) = self.tx.take().map(|t| (t.mail_from, t.remote)).unwrap_or_default();
        // Remote recipients: into the outbound queue (R copies, fsynced).
        let queued = if remote.is_empty() {
            true
        } else {
            let env = crate::queue::Envelope {
                from: from.clone(),
                rcpts: remote.clone(),
                queued_ms: arrival_ms,
                submitter: self.authed.clone(),
            };
            let ok = crate::outbound::enqueue(&self.services, &env, &body).await;
            if ok {
                info!(peer = %self.peer, %id, from = %from, rcpts = remote.len(), size, "message queued for remote delivery");
            }
            ok
        };
        // To R nodes per recipient, one body per node; each has it on disk
        // before the reply.
        let started = std::time::Instant::now();
        let outcome = if unique.is_empty() {
            replication::replica::DeliverOutcome {
                id,
                stored: vec![],
                copies: vec![],
                under_replicated: false,
            }
        } else {
            self.services
                .mail
                .deliver_as(id, &unique, "INBOX", arrival_ms, body)
                .await
        };
        crate::metrics::Latencies::observe(&self.services.latency.delivery, started.elapsed());
        let stored = |rcpt: &str| unique.iter().position(|u| u == rcpt).is_some_and(|i| outcome.stored[i]);
        let all_stored = outcome.stored.iter().all(|s| *s) && queued;
        if all_stored {
            bump(&self.services.metrics.messages_accepted);
            info!(peer = %self.peer, %id, from = %from, rcpts = unique.len(), size,
                copies = ?outcome.copies, under_replicated = outcome.under_replicated, "message stored");
        } else {
            bump(&self.services.metrics.deliveries_failed);
            warn!(peer = %self.peer, %id, stored = ?outcome.stored, "delivery failed for some recipients");
        }
        match self.mode {
            Mode::Smtp | Mode::Submission => {
                // One reply for the transaction: a partial failure must be
                // retried for everyone (the stored copies of this attempt
                // stay; a client retry may duplicate them, never lose them).
                let text = if all_stored {
                    format!("250 2.0.0 Ok: stored as {id}")
                } else {
                    "451 4.3.0 Mail store unavailable, try again later".to_owned()
                };
                self.reply(&text).await?
            }
            Mode::Lmtp => {
                for rcpt in &rcpts {
                    let addr = &rcpt.address;
                    let per = if stored(&rcpt.mailbox) {
                        format!("250 2.0.0 <{addr}> Ok: stored as {id}")
                    } else {
                        format!("451 4.3.0 <{addr}> Mail store unavailable, try again later")
                    };
                    self.io.w.write_all(per.as_bytes()).await?;
                    self.io.w.write_all(b"\r\n").await?;
                }
                if self.io.r.buffer().is_empty() {
                    self.flush().await?;
                }
            }
        }
        Ok(true)
    }

    /// AUTH PLAIN (RFC 4616) or LOGIN on submission (RFC 4954).
    async fn auth(&mut self, mechanism: u64, initial: String) -> std::io::Result<bool> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        if self.authed.is_some() {
            self.reply("503 5.5.1 Already authenticated").await?;
            return Ok(true);
        }
        if self.tx.is_some() {
            self.reply("503 5.5.1 AUTH not allowed during a mail transaction")
                .await?;
            return Ok(true);
        }
        if !self.io.may_send_password(self.peer.ip()) {
            bump(&self.services.metrics.plaintext_auth_refused);
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism (STARTTLS first)")
                .await?;
            return Ok(true);
        }
        // One response line from the client after a 334 challenge; None:
        // cancelled (`*`), malformed, or the client went away.
        async fn response<S: AsyncRead + AsyncWrite + Unpin>(
            s: &mut Session<S>,
            challenge: &str,
        ) -> std::io::Result<Option<Vec<u8>>> {
            s.reply(&format!("334 {challenge}")).await?;
            s.flush().await?;
            let idle = s.services.limits.idle_timeout;
            match read_line(&mut s.io.r, AUTH_LINE_BYTES_MAX, idle).await? {
                Line::Ok(l) => {
                    let l = crate::conn::trim_eol(&l);
                    if l == b"*" {
                        return Ok(None);
                    }
                    Ok(base64::engine::general_purpose::STANDARD.decode(l).ok())
                }
                _ => Ok(None),
            }
        }
        let decoded = |s: &str| {
            if s.is_empty() || s == "=" {
                Some(Vec::new())
            } else {
                b64.decode(s).ok()
            }
        };
        let creds: Option<(String, String)> = if mechanism == smtp_proto::AUTH_PLAIN {
            let data = if initial.is_empty() {
                response(self, "").await?
            } else {
                decoded(&initial)
            };
            data.and_then(|d| {
                let parts: Vec<&[u8]> = d.split(|b| *b == 0).collect();
                match parts.as_slice() {
                    [authz, user, pass] if authz.is_empty() || authz == user => Some((
                        String::from_utf8_lossy(user).into_owned(),
                        String::from_utf8_lossy(pass).into_owned(),
                    )),
                    _ => None,
                }
            })
        } else if mechanism == smtp_proto::AUTH_LOGIN {
            let user = if initial.is_empty() {
                response(self, "VXNlcm5hbWU6").await?
            } else {
                decoded(&initial)
            };
            match user {
                Some(u) => response(self, "UGFzc3dvcmQ6").await?.map(|p| {
                    (
                        String::from_utf8_lossy(&u).into_owned(),
                        String::from_utf8_lossy(&p).into_owned(),
                    )
                }),
                None => None,
            }
        } else {
            self.reply("504 5.5.4 Unrecognized authentication type (PLAIN, LOGIN)")
                .await?;
            return Ok(!self.bad().await?);
        };
        let Some((user, pass)) = creds else {
            self.reply("501 5.5.2 Cannot decode the response (or cancelled)")
                .await?;
            return Ok(!self.bad().await?);
        };
        match self.services.authenticate(self.peer.ip(), &user, &pass).await {
            crate::services::Auth::Ok(record) => {
                info!(peer = %self.peer, user = %record.address, "submission login");
                self.authed = Some(record.address.clone());
                self.reply("235 2.7.0 Authentication successful").await?;
                Ok(true)
            }
            crate::services::Auth::Failed => {
                self.auth_failures += 1;
                self.reply("535 5.7.8 Authentication credentials invalid").await?;
                if self.auth_failures >= AUTH_FAILURES_MAX {
                    self.reply("421 4.7.0 Too many authentication failures, closing connection")
                        .await?;
                    return Ok(false);
                }
                Ok(true)
            }
            crate::services::Auth::Blocked => {
                bump(&self.services.metrics.limit_refusals);
                self.reply("421 4.7.0 Too many authentication failures, try again later")
                    .await?;
                Ok(false)
            }
        }
    }

    fn received_header(&self, id: &str, rcpts: &[&str], arrival_ms: u64) -> Vec<u8> {
        // RFC 3848: an S for TLS.
        let tls = self.io.tls();
        let with = match (self.mode, self.esmtp, tls.is_some()) {
            (Mode::Lmtp, _, false) => "LMTP",
            (Mode::Lmtp, _, true) => "LMTPS",
            (Mode::Smtp, true, false) => "ESMTP",
            (Mode::Smtp, true, true) => "ESMTPS",
            (Mode::Smtp, false, _) => "SMTP",
            // RFC 3848: A for authenticated.
            (Mode::Submission, _, false) => "ESMTPA",
            (Mode::Submission, _, true) => "ESMTPSA",
        };
        let using = tls.map(|t| format!(" (using {t})")).unwrap_or_default();
        let helo = self.helo.as_deref().unwrap_or("unknown");
        let for_clause = match rcpts {
            [one] => format!("\r\n\tfor <{one}>"),
            _ => String::new(),
        };
        format!(
            "Received: from {helo} ({ip}){using}\r\n\tby {me} (Quill) with {with} id {id}{for_clause};\r\n\t{date}\r\n",
            ip = self.peer.ip(),
            me = self.services.hostname,
            date = rfc5322_date(arrival_ms / 1000),
        )
        .into_bytes()
    }

    /// Reads the DATA section (see [`crate::data`]): past a limit it keeps
    /// reading (and dropping) until the end so that the session stays in
    /// step with the client.
    async fn read_body(&mut self, head: Vec<u8>) -> std::io::Result<Body> {
        let limits = &self.services.limits;
        let (idle, grace, rate) = (
            limits.idle_timeout,
            limits.transfer_grace,
            limits.transfer_bytes_per_sec_min.max(1),
        );
        let mut reader = DataReader::new(head, limits.message_bytes_max);
        let start = tokio::time::Instant::now();
        let mut received: u64 = 0;
        // The node-wide budget for message bytes held in memory, taken in
        // chunks as the message grows (see `Services::data_budget`).
        let mut budget: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut budget_bytes: usize = 0;
        loop {
            // The transfer as a whole must keep up the minimum rate: the
            // next line is due when the bytes so far stop paying for the
            // time taken (and within the idle timeout in any case).
            let allowed = grace + Duration::from_secs_f64(received as f64 / rate as f64);
            let left = allowed.saturating_sub(start.elapsed());
            let line = read_line(&mut self.io.r, DATA_LINE_BYTES_MAX, left.min(idle)).await?;
            match line {
                Line::Eof => return Ok(Body::Closed),
                Line::Idle if left <= idle => {
                    bump(&self.services.metrics.limit_refusals);
                    self.reply("421 4.4.2 Message transfer too slow, closing connection")
                        .await?;
                    self.flush().await?;
                    return Ok(Body::Closed);
                }
                Line::Idle => {
                    self.reply("421 4.4.2 Idle timeout, closing connection").await?;
                    self.flush().await?;
                    return Ok(Body::Closed);
                }
                Line::Ok(ref l) => received += l.len() as u64,
                Line::TooLong { .. } => received += DATA_LINE_BYTES_MAX as u64,
            }
            let step = reader.line(&line);
            while reader.held() > budget_bytes {
                let chunk = crate::services::DATA_BUDGET_CHUNK;
                match self.services.data_budget.clone().try_acquire_owned() {
                    Ok(p) => {
                        match budget.as_mut() {
                            Some(b) => b.merge(p),
                            None => budget = Some(p),
                        }
                        budget_bytes += chunk;
                    }
                    Err(_) => {
                        bump(&self.services.metrics.limit_refusals);
                        reader.refuse(Refusal::NoMemory);
                        budget = None;
                        budget_bytes = 0;
                    }
                }
            }
            if let Step::End(outcome) = step {
                return Ok(match outcome {
                    Ok(body) => Body::Ok(body, budget),
                    Err(r) => Body::Refused(r),
                });
            }
        }
    }
}

/// Whether every `From:` address of the message is `user` (and there is
/// one): RFC 6409 8.1's check that a submitter sends as itself.
fn from_is(message: &[u8], user: &str) -> bool {
    let Some(m) = mail_parser::MessageParser::default().parse_headers(message) else {
        return false;
    };
    let Some(from) = m.from() else { return false };
    let mut any = false;
    for a in from.iter() {
        any = true;
        if !a.address.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(user)) {
            return false;
        }
    }
    any
}
