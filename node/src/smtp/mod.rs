//! SMTP (RFC 5321), LMTP (RFC 2033) and submission (RFC 6409) sessions:
//! one per connection. Commands are parsed by `smtp-proto`; what each is
//! answered is the protocol cores' (`quill_proto::smtp`); this module
//! reads and writes, asks the services who a recipient is, and stores the
//! message (`data`) or hands it to the outbound queue. AUTH's exchange
//! is in `auth`.
//!
//! The reply to the end of DATA is sent only after the message is fsynced.

mod auth;
mod data;
mod deliver;
mod edge;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quill_proto::message::domain_of;
use quill_proto::smtp::{Dest, Offer, Rcpt, Reply, SMTP_COMMAND_BYTES_MAX, State};
use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::{Instrument, debug, warn};

pub use quill_proto::smtp::Mode;

use crate::net::session::{Dialect, LineSession, Upgrade};
use crate::net::stream::Stream;
use crate::services::Services;
use crate::services::routing::Unroutable;

/// How long a `550` for an unknown recipient waits once a session has
/// named more than `UNKNOWN_RCPT_FREE` (Postfix's error sleep).
const UNKNOWN_RCPT_DELAY: Duration = Duration::from_secs(1);

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
    peer: SocketAddr,
    state: State,
    /// The sender's checks of the transaction under way (`--smtp`, from
    /// an untrusted network: see [`crate::edge`]).
    checks: Option<crate::edge::verify::Pending>,
    /// A postmaster address is among the transaction's recipients (never
    /// refused by policy).
    to_postmaster: bool,
    /// The edge checks of the client (`--smtp` only).
    edge: Option<crate::edge::Check>,
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

/// Serves one connection, plaintext or already under TLS (`--smtps`,
/// submission over implicit TLS).
pub async fn serve_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: Stream<S>,
    peer: SocketAddr,
    services: Arc<Services>,
    mode: Mode,
    mut shutdown: watch::Receiver<bool>,
) {
    let counters = services.counters();
    match mode {
        Mode::Lmtp => counters.lmtp_sessions.inc(),
        Mode::Smtp | Mode::Submission => counters.smtp_sessions.inc(),
    };
    let proto = match mode {
        Mode::Smtp => "smtp",
        Mode::Lmtp => "lmtp",
        Mode::Submission => "submission",
    };
    let span = tracing::info_span!("session", proto, %peer, user = tracing::field::Empty);
    async move {
        let mut s = Session {
            io: LineSession::new(stream, services.env(), &DIALECT, 16 * 1024, 16 * 1024),
            state: State {
                send_as: services.limits().send_as.clone(),
                ..State::new(mode, services.hostname.clone())
            },
            edge: (mode == Mode::Smtp).then(|| services.edge.check(peer.ip(), &services.dns)),
            services,
            peer,
            checks: None,
            to_postmaster: false,
        };
        if let Some(refusal) = s.edge_at_connect().await {
            let _ = s.io.reply(&refusal).await;
            let _ = s.io.flush().await;
            return;
        }
        let greeting = s.state.greeting();
        if s.io.reply(&greeting).await.is_err() {
            return;
        }
        if let Err(e) = s.run(&mut shutdown).await {
            debug!(error = %e, "session ended with an i/o error");
        }
    }
    .instrument(span)
    .await
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<()> {
        while let Some(line) = self.io.next_command(shutdown).await? {
            if !self.command(&line).await? {
                return self.io.flush().await;
            }
        }
        Ok(())
    }

    /// Sends a reply the protocol cores made, with its consequences;
    /// false when the session must end.
    async fn send(&mut self, r: Reply) -> std::io::Result<bool> {
        if r.limit {
            self.services.counters().limit_refusals.inc();
        }
        self.io.reply(&r.text).await?;
        if r.close {
            return Ok(false);
        }
        if r.bad {
            return Ok(!self.io.bad().await?);
        }
        Ok(true)
    }

    fn offer(&self) -> Offer {
        Offer {
            starttls: self.io.can_start_tls(),
            password: self.io.may_send_password(self.peer.ip()),
            size: self.services.limits().message_bytes_max,
        }
    }

    /// Handles one command line; false ends the session.
    async fn command(&mut self, line: &[u8]) -> std::io::Result<bool> {
        // read_line always hands over the line feed smtp-proto wants.
        let req = match Request::parse(&mut line.iter()) {
            Ok(r) => r,
            Err(e) => return self.send(quill_proto::smtp::parse_error(e)).await,
        };
        let reply = match req {
            Request::Ehlo { host } | Request::Lhlo { host } | Request::Helo { host } => {
                let verb = line.get(..4).unwrap_or_default();
                let offer = self.offer();
                self.state.hello(verb, &host, offer)
            }
            Request::Mail { from } => {
                let reply = self.state.mail(&from, self.services.limits().message_bytes_max);
                self.to_postmaster = false;
                self.checks = match (&self.services.mail_auth, &self.state.tx) {
                    (Some(edge), Some(tx)) if edge.checks(self.peer.ip(), self.state.mode) => {
                        let helo = self.state.helo.as_deref().unwrap_or_default();
                        Some(edge.start(self.peer.ip(), helo, &tx.mail_from))
                    }
                    _ => None,
                };
                reply
            }
            Request::Rcpt { to } if to.address.is_empty() => {
                // smtp-proto hands `<Postmaster>` (no domain) over as "".
                let lower = String::from_utf8_lossy(line).to_ascii_lowercase();
                if lower.contains("<postmaster>") {
                    return self.rcpt("postmaster").await;
                }
                Reply::bad("501 5.1.3 Bad recipient address syntax")
            }
            Request::Rcpt { to } => return self.rcpt(&to.address).await,
            Request::Data => return self.data().await,
            Request::StartTls => return self.start_tls(line).await,
            Request::Auth {
                mechanism,
                initial_response,
            } if self.state.mode == Mode::Submission => {
                return self.auth(mechanism, initial_response.into_owned()).await;
            }
            Request::Rset => self.state.rset(),
            Request::Noop { .. } => Reply::ok("250 2.0.0 Ok"),
            Request::Vrfy { .. } => Reply::ok(quill_proto::smtp::REPLY_VRFY),
            Request::Help { .. } => Reply::ok(quill_proto::smtp::REPLY_HELP),
            Request::Quit => Reply::ok("221 2.0.0 Bye").close(),
            other => Reply::ok(format!("502 5.5.1 {} not implemented", other.name())),
        };
        self.send(reply).await
    }

    /// `STARTTLS` (RFC 3207): on success the session starts over, as if
    /// just connected (no greeting): the client must send EHLO again, and
    /// nothing it sent before the handshake is executed.
    async fn start_tls(&mut self, line: &[u8]) -> std::io::Result<bool> {
        let (go, reply) = self
            .state
            .starttls(line, self.io.tls().is_some(), self.io.can_start_tls());
        let alive = self.send(reply).await?;
        if !go || !alive {
            return Ok(alive);
        }
        match self.io.start_tls().await? {
            Upgrade::Done => {
                self.state.tls_started();
                Ok(true)
            }
            Upgrade::Failed => Ok(false),
        }
    }

    /// Handles `RCPT TO`; false ends the session.
    async fn rcpt(&mut self, address: &str) -> std::io::Result<bool> {
        if let Err(r) = self.state.rcpt_check(address, self.services.limits().recipients_max) {
            return self.send(r).await;
        }
        if let Some(r) = self.edge_rcpt(address).await {
            return self.send(r).await;
        }
        // An address that has named too many unknown users lately is told
        // to come back, whoever it names now: the answer says nothing
        // about who exists.
        let ip = self.peer.ip();
        let routing = &self.services.routing;
        if routing.unknown_recipients_exhausted(ip) {
            let r = Reply::limit("450 4.7.1 Too many unknown recipients from your address, try again later");
            return self.send(r).await;
        }
        let day = (crate::time::now_ms() / 86_400_000) as u32;
        let expansion = match routing.route(address, day) {
            Ok(e) => e,
            Err(Unroutable::Unknown) => {
                routing.note_unknown_recipient(ip);
                let (delay, reply) = self.state.unknown_recipient();
                if delay {
                    self.io.flush().await?;
                    tokio::time::sleep(UNKNOWN_RCPT_DELAY).await;
                }
                return self.send(reply).await;
            }
            Err(Unroutable::NotLocal) if self.state.mode == Mode::Submission => {
                if routing.queue_full() {
                    return self
                        .send(Reply::limit("451 4.3.1 Outbound queue full, try again later"))
                        .await;
                }
                if domain_of(address).is_none() {
                    return self
                        .send(Reply::ok("553 5.1.3 A recipient address needs a domain"))
                        .await;
                }
                if let Some(user) = self.state.authed.clone()
                    && let Err(reply) = routing.spend_sending_allowance(&user, true).await
                {
                    return self.send(Reply::limit(reply)).await;
                }
                let reply = self.state.add_remote(address);
                return self.send(reply).await;
            }
            Err(Unroutable::NotLocal) => return self.send(Reply::ok("550 5.7.1 Relaying denied")).await,
            Err(Unroutable::Loop) => {
                warn!(rcpt = %address, "recipient refused: its aliases loop");
                return self
                    .send(Reply::ok("554 5.4.6 Alias loop detected for this recipient"))
                    .await;
            }
            Err(Unroutable::TooMany) => {
                warn!(rcpt = %address, "recipient refused: its aliases expand beyond the bounds");
                return self
                    .send(Reply::ok("550 5.7.0 This address expands to too many recipients"))
                    .await;
            }
            Err(Unroutable::BadSrs) => {
                return self
                    .send(Reply::ok("550 5.1.1 Invalid or expired forwarding (SRS) address"))
                    .await;
            }
        };
        if !expansion.remote.is_empty() && routing.queue_full() {
            return self
                .send(Reply::limit("451 4.3.1 Outbound queue full, try again later"))
                .await;
        }
        // Quotas (a mailbox at or past its quota; counted exactly near
        // it): a user named directly over quota refuses the recipient; an
        // alias skips its members that are full, unless all are.
        let mut dests = Vec::with_capacity(expansion.local.len());
        let mut full = 0;
        for (user, tag) in &expansion.local {
            let mailbox = user.mailbox();
            if let Some(quota) = user.quota_bytes
                && crate::mail::over_quota(&*self.services.mail, &mailbox, quota, 1).await
            {
                full += 1;
                continue;
            }
            dests.push(Dest {
                user: user.address.clone(),
                mailbox,
                tag: tag.clone(),
                tap: false,
            });
        }
        // Taps on the address as named, or on its domain: the archive's
        // copy, whatever filters and aliases do with the rest.
        for archive in self.services.directory.taps_for(address) {
            dests.push(Dest {
                user: archive.address.clone(),
                mailbox: archive.mailbox(),
                tag: None,
                tap: true,
            });
        }
        if full > 0 && dests.is_empty() && expansion.remote.is_empty() {
            // Temporary (RFC 3463 4.2.2): the sender retries, the user
            // can make room.
            return self.send(Reply::limit("452 4.2.2 Mailbox full, try again later")).await;
        }
        let named = match (&expansion.local[..], expansion.routed) {
            ([(user, _)], false) => user.address.clone(),
            _ => membership::normalize_address(address).unwrap_or_else(|_| address.to_owned()),
        };
        let rcpt = Rcpt {
            address: named,
            dests,
            forwards: !expansion.remote.is_empty(),
        };
        if let Some(r) = self.edge_greylist(address).await {
            return self.send(r).await;
        }
        let reply = self.state.add_local(rcpt, expansion.remote);
        if reply.text.starts_with('2') {
            let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
            self.to_postmaster |= local.eq_ignore_ascii_case("postmaster");
        }
        self.send(reply).await
    }
}
