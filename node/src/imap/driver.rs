//! The IMAP driver: owns the client's stream and imap-next's sans-I/O
//! server, feeds the server the bytes it reads and writes what the server
//! produces, hands each command to the [`Handler`] and queues its
//! responses; swaps the stream for TLS after STARTTLS (a fresh protocol
//! state: anything pipelined behind the command is dropped, never
//! executed); and while the client idles, asks the handler for changes
//! when told of them (`replication::replica::watch`: a delivery placed, a
//! change made through any node), with a slow safety look, or every
//! [`IDLE_POLL`] where changes are not told.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imap_next::imap_types::auth::AuthenticateData;
use imap_next::imap_types::core::Tag;
use imap_next::imap_types::response::{Code, CommandContinuationRequest, Greeting};
use imap_next::server::{Event, ResponseHandle, Server};
use imap_next::{Interrupt, Io, State};
use quill_proto::imap::reply::{bad, ok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{Instrument, debug};

use replication::replica::watch::{SAFETY_LOOK, SOON_CHECKS, Subscription};

use super::handler::{AuthStep, Handler, Reply, Response, Then};
use crate::net::stream::{Stream, Transport, accept_tls};
use crate::services::Services;

/// RFC 2177: clients re-issue IDLE at least every 29 minutes; a session
/// idling longer than this is ended.
pub const IDLE_MAX: Duration = Duration::from_secs(30 * 60);
/// How often an idling session looks for changes when they are not told.
pub const IDLE_POLL: Duration = Duration::from_millis(500);

struct Driver<S> {
    stream: Stream<S>,
    server: Server,
    handler: Handler,
    services: Arc<Services>,
    /// IDLE in progress: its tag and since when.
    idling: Option<(Tag<'static>, Instant)>,
    /// While idling: the wait on the mailbox's changes, and when to look
    /// next for a change told to be coming.
    watch: Option<Subscription>,
    looks: Vec<Instant>,
    /// After this response is sent: start TLS.
    starttls_after: Option<ResponseHandle>,
    /// After this response is sent: close.
    close_after: Option<ResponseHandle>,
    buf: Vec<u8>,
}

/// Serves one connection, plaintext (STARTTLS offered) or already under
/// TLS (`--imaps`).
pub async fn serve_on<S: Transport>(
    stream: Stream<S>,
    peer: SocketAddr,
    services: Arc<Services>,
    mut shutdown: watch::Receiver<bool>,
) {
    services.counters().imap_sessions.inc();
    let span = tracing::info_span!("session", proto = "imap", %peer, user = tracing::field::Empty);
    async move {
        let tls = matches!(stream, Stream::Tls(_));
        let handler = Handler::new(services.clone(), peer, tls);
        let caps = handler.capabilities();
        let greeting = Greeting::ok(Some(Code::Capability(caps)), "Quill IMAP ready").expect("valid greeting");
        let server = Server::new(options(&services), greeting);
        let mut d = Driver {
            stream,
            server,
            handler,
            services,
            idling: None,
            watch: None,
            looks: Vec::new(),
            starttls_after: None,
            close_after: None,
            buf: vec![0; 16 * 1024],
        };
        if let Err(e) = d.run(&mut shutdown).await {
            debug!(error = %e, "imap session ended with an i/o error");
        }
    }
    .instrument(span)
    .await
}

fn options(services: &Services) -> imap_next::server::Options {
    quill_proto::imap::server_options(services.limits().message_bytes_max)
}

impl<S: Transport> Driver<S> {
    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<()> {
        loop {
            match self.server.next() {
                Ok(Event::GreetingSent { .. }) => {}
                Ok(Event::ResponseSent { handle, .. }) => {
                    if self.close_after == Some(handle) {
                        return Ok(());
                    }
                    if self.starttls_after == Some(handle) {
                        self.starttls_after = None;
                        if !self.start_tls().await? {
                            return Ok(());
                        }
                    }
                }
                // After BYE nothing more is executed.
                Ok(Event::CommandReceived { .. } | Event::CommandAuthenticateReceived { .. })
                    if self.close_after.is_some() => {}
                Ok(Event::CommandReceived { command }) => {
                    let reply = match self.handler.count_command() {
                        Some(bye) => bye,
                        None => self.handler.command(command).await,
                    };
                    self.send(reply);
                }
                Ok(Event::CommandAuthenticateReceived {
                    command_authenticate: c,
                }) => {
                    if let Some(bye) = self.handler.count_command() {
                        self.send(bye);
                        continue;
                    }
                    let initial = c.initial_response.map(|r| r.declassify().to_vec());
                    match self.handler.authenticate(c.tag, c.mechanism, initial).await {
                        AuthStep::Continue(req) => {
                            let _ = self.server.authenticate_continue(req);
                        }
                        AuthStep::Finish(reply) => self.finish_authenticate(reply),
                    }
                }
                Ok(Event::AuthenticateDataReceived { authenticate_data }) => {
                    let data = match authenticate_data {
                        AuthenticateData::Continue(data) => Some(data.declassify().to_vec()),
                        AuthenticateData::Cancel => None,
                    };
                    let reply = self.handler.authenticate_data(data).await;
                    self.finish_authenticate(reply);
                }
                Ok(Event::IdleCommandReceived { tag }) => {
                    if let Some(bye) = self.handler.count_command() {
                        self.send(bye);
                        continue;
                    }
                    if self.handler.can_idle() {
                        let _ = self
                            .server
                            .idle_accept(CommandContinuationRequest::basic(None, "idling").expect("valid"));
                        self.idling = Some((tag, Instant::now()));
                        self.watch = self.handler.user().and_then(|u| self.services.mail.subscribe(&u));
                    } else {
                        let _ = self.server.idle_reject(bad(Some(tag), "IDLE needs a selected folder"));
                    }
                }
                Ok(Event::IdleDoneReceived) => {
                    self.watch = None;
                    self.looks.clear();
                    if let Some((tag, _)) = self.idling.take() {
                        self.server.enqueue_status(ok(tag, None, "IDLE terminated"));
                    }
                }
                Err(Interrupt::Io(Io::Output(bytes))) => {
                    let limit = self.services.limits().idle_timeout;
                    let write = async {
                        self.stream.write_all(&bytes).await?;
                        self.stream.flush().await
                    };
                    match tokio::time::timeout(limit, write).await {
                        Ok(r) => r?,
                        Err(_) => {
                            debug!("a write stalled past the idle timeout: the client stopped reading");
                            return Ok(());
                        }
                    }
                }
                Err(Interrupt::Io(Io::NeedMoreInput)) => {
                    if self.close_after.is_some() {
                        return Ok(());
                    }
                    if !self.read_more(shutdown).await? {
                        return Ok(());
                    }
                }
                Err(Interrupt::Error(e)) => {
                    use imap_next::server::Error as E;
                    let reply = match &e {
                        E::ExpectedCrlfGotLf { discarded_bytes } => self
                            .handler
                            .malformed(discarded_bytes.declassify(), "lines must end with CRLF"),
                        E::MalformedMessage { discarded_bytes } => {
                            self.handler.malformed(discarded_bytes.declassify(), "syntax error")
                        }
                        // Refused already (tagged BAD) by the protocol layer.
                        E::LiteralTooLong { .. } => self.handler.literal_refused(),
                        E::CommandTooLong { .. } => self.handler.command_too_long(),
                    };
                    self.send(reply);
                }
            }
        }
    }

    /// Queues a command's responses and notes what follows the last.
    fn send(&mut self, reply: Reply) {
        let mut last = None;
        for r in reply.responses {
            match r {
                Response::Data(d) => {
                    self.server.enqueue_data(d);
                }
                Response::Status(s) => last = Some(self.server.enqueue_status(s)),
            }
        }
        self.then(reply.then, last);
    }

    /// Finishes an AUTHENTICATE with the reply's first response (its
    /// status), then queues the rest.
    fn finish_authenticate(&mut self, reply: Reply) {
        let mut responses = reply.responses.into_iter();
        let mut last = None;
        if let Some(Response::Status(s)) = responses.next() {
            last = self.server.authenticate_finish(s).ok();
        }
        for r in responses {
            match r {
                Response::Data(d) => {
                    self.server.enqueue_data(d);
                }
                Response::Status(s) => last = Some(self.server.enqueue_status(s)),
            }
        }
        self.then(reply.then, last);
    }

    fn then(&mut self, then: Then, last: Option<ResponseHandle>) {
        match (then, last) {
            (Then::Close, Some(h)) => {
                debug!("closing the session after its last response");
                self.close_after = Some(h);
            }
            (Then::StartTls, Some(h)) => self.starttls_after = Some(h),
            _ => {}
        }
    }

    /// When an idling session looks for changes next: at the next look a
    /// told change asked for, else after [`SAFETY_LOOK`] when changes are
    /// told, [`IDLE_POLL`] when not.
    fn next_look(&self, now: Instant) -> Instant {
        let told = self.watch.as_ref().is_some_and(|w| w.told());
        let every = if told { SAFETY_LOOK } else { IDLE_POLL };
        self.looks.first().copied().unwrap_or(now + every).min(now + every)
    }

    /// Reads more input into the protocol state. While idling, looks for
    /// changes when told and at [`Driver::next_look`]. False: the session
    /// is over.
    async fn read_more(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<bool> {
        let idle_timeout = self.services.limits().idle_timeout;
        loop {
            let now = Instant::now();
            let wait = if self.idling.is_some() {
                self.next_look(now).saturating_duration_since(now)
            } else {
                idle_timeout
            };
            let told = async {
                match self.watch.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                r = tokio::time::timeout(wait, self.stream.read(&mut self.buf)) => r,
                change = told => {
                    // A message placed is looked for until it shows; a
                    // change made shows already (looks still due for a
                    // message placed earlier are kept).
                    let now = Instant::now();
                    if change.soon {
                        self.looks = SOON_CHECKS.iter().map(|d| now + *d).collect();
                    } else {
                        self.looks.insert(0, now);
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    let bye = self.handler.bye("server shutting down");
                    self.send(bye);
                    return Ok(true);
                }
            };
            match read {
                Ok(Ok(0)) => return Ok(false),
                Ok(Ok(n)) => {
                    self.stream.quick_ack();
                    self.server.enqueue_input(&self.buf[..n]);
                    return Ok(true);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    let Some((_, since)) = &self.idling else {
                        let bye = self.handler.bye("idle for too long");
                        self.send(bye);
                        return Ok(true);
                    };
                    if since.elapsed() > IDLE_MAX {
                        self.idling = None;
                        let bye = self.handler.bye("IDLE for more than 30 minutes");
                        self.send(bye);
                        return Ok(true);
                    }
                    let now = Instant::now();
                    self.looks.retain(|t| *t > now);
                    let updates = self.handler.idle_updates().await;
                    if !updates.is_empty() {
                        for r in updates {
                            match r {
                                Response::Data(d) => {
                                    self.server.enqueue_data(d);
                                }
                                Response::Status(s) => {
                                    self.server.enqueue_status(s);
                                }
                            }
                        }
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// STARTTLS's handshake, after its OK went out. Input the client sent
    /// behind the command is dropped with the old protocol state (never
    /// executed); the new state starts as after a greeting. False: the
    /// handshake failed (the session is over).
    async fn start_tls(&mut self) -> std::io::Result<bool> {
        let Some(tls) = self.services.env.tls.clone() else {
            return Ok(false);
        };
        let stream = std::mem::replace(&mut self.stream, Stream::Gone);
        let Stream::Plain(plain) = stream else { return Ok(false) };
        let env = &self.services.env;
        let Some(t) = accept_tls(&tls, plain, env.handshake_deadline(), &env.counters).await else {
            return Ok(false);
        };
        self.stream = Stream::Tls(Box::new(t));
        self.handler.tls_started();
        // A fresh protocol state: its greeting is produced and not sent.
        let greeting = Greeting::ok(None, "TLS").expect("valid");
        let mut server = Server::new(options(&self.services), greeting);
        loop {
            match server.next() {
                Ok(Event::GreetingSent { .. }) => break,
                Err(Interrupt::Io(Io::Output(_))) => {}
                _ => return Ok(false),
            }
        }
        self.server = server;
        Ok(true)
    }
}
