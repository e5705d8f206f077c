//! POP3 sessions (RFC 1939, with CAPA, AUTH PLAIN, STLS and UTF8): the
//! parser, the maildrop and every reply are the protocol cores'
//! (`quill_proto::pop3`); this module reads and writes, logs in, holds the
//! mailbox lock (on this node and at the user's manager), reads bodies
//! from a live replica and applies the deletions at QUIT.
//!
//! A session sees the mailbox as it was at login; deletions are marked and
//! applied, durably, only at QUIT. One session per mailbox at a time.

use std::net::SocketAddr;
use std::sync::Arc;

use quill_proto::pop3::{
    Action, Command, Maildrop, Message, PLAINTEXT_REFUSED, POP3_LINE_BYTES_MAX, SESSION_AUTH_FAILURES_MAX, capa,
    decode_plain, dot_stuff, parse, sending, top,
};
use replication::replica::Listed;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, warn};

use crate::metrics::Latencies;
use crate::net::conn::trim_eol;
use crate::net::session::{Dialect, LineSession, Upgrade};
use crate::net::stream::Stream;
use crate::services::{Auth, MailboxLock, Services};

/// What POP3 answers to the session scaffold's events.
static DIALECT: Dialect = Dialect {
    line_bytes_max: POP3_LINE_BYTES_MAX,
    line_too_long: "-ERR line too long",
    too_many_errors: "-ERR too many errors, closing connection",
    too_many_commands: "-ERR too many commands in one session, closing connection",
    idle: "-ERR [SYS/TEMP] idle timeout, closing connection",
    shutting_down: "-ERR [SYS/TEMP] server shutting down",
};

/// A mailbox held by a session.
struct Held {
    mailbox: String,
    drop: Maildrop,
    /// The messages with the nodes that hold them, in maildrop order.
    listed: Vec<Listed>,
    lock: MailboxLock,
}

struct Session<S> {
    io: LineSession<S>,
    services: Arc<Services>,
    peer: SocketAddr,
    user: Option<String>,
    held: Option<Held>,
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
    let span = tracing::info_span!("session", proto = "pop3", %peer, user = tracing::field::Empty);
    async move {
        let mut s = Session {
            io: LineSession::new(stream, services.env(), &DIALECT, 8 * 1024, 64 * 1024),
            services,
            peer,
            user: None,
            held: None,
            auth_failures: 0,
        };
        let result = async {
            s.io.reply("+OK Quill POP3 server ready").await?;
            s.run(&mut shutdown).await
        }
        .await;
        if let Err(e) = result {
            debug!(error = %e, "pop3 session ended with an i/o error");
        }
    }
    .instrument(span)
    .await
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

    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<()> {
        while let Some(line) = self.read(shutdown).await? {
            let cmd = match parse(&line) {
                Ok(c) => c,
                Err(why) => {
                    self.reply(&format!("-ERR {why}")).await?;
                    if self.io.bad().await? {
                        break;
                    }
                    continue;
                }
            };
            let flow = if self.held.is_none() {
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
                self.services.counters().plaintext_auth_refused.inc();
                self.user = None;
                self.reply(PLAINTEXT_REFUSED).await?;
                if self.io.bad().await? {
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
        match self.services.auth.authenticate(self.peer.ip(), user, password).await {
            Auth::Blocked => {
                self.services.counters().limit_refusals.inc();
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
                let Some(mut lock) = self.services.locks.lock_mailbox(&mailbox) else {
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
                let drop = Maildrop::new(
                    listed
                        .iter()
                        .map(|l| Message {
                            uidl: l.meta.id.to_hex(),
                            size: l.meta.size_bytes,
                        })
                        .collect(),
                );
                self.services.counters().pop3_sessions.inc();
                tracing::Span::current().record("user", record.address.as_str());
                debug!(messages = listed.len(), "pop3 login");
                let opened = drop.opened();
                self.held = Some(Held {
                    mailbox,
                    drop,
                    listed,
                    lock,
                });
                self.reply(&opened).await?;
                Ok(Flow::Continue)
            }
        }
    }

    async fn transaction(&mut self, cmd: Command) -> std::io::Result<Flow> {
        let held = self.held.as_mut().expect("in transaction state");
        match held.drop.command(cmd) {
            Action::Reply(text) => self.reply(&text).await?,
            Action::Send { index, top_lines } => self.send_message(index, top_lines).await?,
            Action::Quit => {
                self.quit().await?;
                return Ok(Flow::Close);
            }
        }
        Ok(Flow::Continue)
    }

    /// QUIT: the marked messages are deleted on every replica (a replica
    /// that is down gets it from the update log when it returns), the lock
    /// goes (RFC 1939 §6: before the reply, not after), then the reply.
    async fn quit(&mut self) -> std::io::Result<()> {
        let Held {
            mailbox,
            drop,
            listed,
            lock,
        } = self.held.take().expect("in transaction");
        let victims: Vec<Listed> = drop.deleted().into_iter().map(|i| listed[i].clone()).collect();
        let n_deleted = victims.len();
        let outcome = self.services.mail.delete(&mailbox, &victims).await;
        lock.release().await;
        match outcome {
            Ok(_) => {
                // A POP3 DELE is an IMAP expunge: the UIDs are forgotten
                // (after the reply; best effort: a number left behind
                // costs memory, never a wrong UID).
                let ids: Vec<[u8; 16]> = victims.iter().map(|l| l.meta.id.0).collect();
                if !ids.is_empty() {
                    let (services, name) = (self.services.clone(), crate::uids::sequence_name(&mailbox, "INBOX"));
                    tokio::spawn(async move { services.uids.forget(&name, ids).await });
                }
                self.services.counters().messages_deleted.inc_by(n_deleted as u64);
                info!(deleted = n_deleted, "pop3 update");
                self.reply(&format!(
                    "+OK Quill POP3 server signing off ({} messages left)",
                    drop.left()
                ))
                .await
            }
            Err(e) => {
                warn!(error = %e, "pop3 update failed");
                self.reply("-ERR [SYS/TEMP] some deleted messages not removed").await
            }
        }
    }

    async fn send_message(&mut self, index: usize, top_lines: Option<u32>) -> std::io::Result<()> {
        let held = self.held.as_ref().expect("in transaction");
        let (listed, size) = (held.listed[index].clone(), held.drop.message(index).size);
        // From a live replica, this node first.
        let started = std::time::Instant::now();
        let read = self.services.mail.read(&listed).await;
        if top_lines.is_none() {
            Latencies::observe(&self.services.metrics.latency.retrieval, started.elapsed());
        }
        let body = match read {
            Ok(b) => b,
            Err(e) => {
                warn!(id = %listed.meta.id, error = %e, "cannot read message body");
                return self.reply("-ERR [SYS/TEMP] message cannot be read now").await;
            }
        };
        let body = match top_lines {
            None => &body[..],
            Some(k) => top(&body, k),
        };
        let mut out = Vec::with_capacity(body.len() + 64);
        out.extend_from_slice(sending(size).as_bytes());
        out.extend_from_slice(b"\r\n");
        dot_stuff(body, &mut out);
        self.io.w.write_all(&out).await?;
        if top_lines.is_none() {
            self.services.counters().messages_retrieved.inc();
        }
        self.io.flush_unless_pipelined().await
    }
}
