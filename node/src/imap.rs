//! IMAP4rev1 (RFC 3501) on the cluster's mail: folders, flags and UIDs
//! that are the same on every node (see [`crate::uids`] and
//! [`crate::imap_folders`]), over plaintext, STARTTLS or implicit TLS.
//!
//! The grammar and the protocol flows (literals, AUTHENTICATE, IDLE) are
//! imap-next's sans-I/O server: this module feeds it the bytes read from
//! the client and writes what it produces, so that it runs over the node's
//! own [`Stream`] (and STARTTLS can swap the stream under it).
//!
//! What this version serves: CAPABILITY, NOOP, LOGOUT, STARTTLS, LOGIN,
//! AUTHENTICATE PLAIN (with SASL-IR), ID, NAMESPACE, ENABLE, LIST, LSUB,
//! STATUS, SELECT, EXAMINE, CREATE, DELETE, RENAME, SUBSCRIBE,
//! UNSUBSCRIBE, CHECK, CLOSE, UNSELECT, EXPUNGE, UID EXPUNGE, FETCH and
//! UID FETCH (FLAGS, UID, INTERNALDATE, RFC822.SIZE, RFC822,
//! RFC822.HEADER, RFC822.TEXT, BODY[], BODY.PEEK[], BODY[HEADER],
//! BODY[HEADER.FIELDS (...)], BODY[TEXT], MIME parts, ENVELOPE, BODY,
//! BODYSTRUCTURE, partial ranges), SEARCH and UID SEARCH, STORE and UID
//! STORE (+/-FLAGS, .SILENT), COPY, MOVE and their UID forms (with
//! COPYUID), APPEND (with flags, date and APPENDUID), IDLE.
//!
//! Flags (system flags and keywords) are stored: each flag of each message
//! is a register, last writer wins by HLC, sent to every replica and
//! merged by anti-entropy ([`replication::marks`]); so is the folder a
//! message is in, which is how MOVE works (the message keeps its id and
//! body, gets a UID in the destination and loses the one in the source).
//! COPY stores a new message (the body is shared by hash on each node).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use imap_next::imap_types::IntoStatic;
use imap_next::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_next::imap_types::command::{Command, CommandBody};
use imap_next::imap_types::core::{AString, IString, Literal, NString, QuotedChar, Tag, Text, Vec1};
use imap_next::imap_types::datetime::DateTime;
use imap_next::imap_types::extensions::namespace::Namespace;
use imap_next::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName, Section};
use imap_next::imap_types::flag::{Flag, FlagFetch, FlagNameAttribute, StoreType};
use imap_next::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_next::imap_types::response::{Capability, Code, CommandContinuationRequest, Data, Greeting, Status};
use imap_next::imap_types::search::SearchKey;
use imap_next::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use imap_next::imap_types::status::{StatusDataItem, StatusDataItemName};
use imap_next::server::{Event, Options, ResponseHandle, Server};
use imap_next::{Interrupt, Io, State};
use replication::replica::Listed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::debug;

use crate::imap_folders::{self as folders, Folder};
use crate::services::{Auth, Services, bump};
use crate::session::Stream;
use crate::uids::sequence_name;
use replication::{FlagMark, MarkChange};

/// Failed logins in one session before it is closed.
const SESSION_AUTH_FAILURES_MAX: u32 = 3;
/// Longest command line (without literals): Dovecot's 64 KiB.
pub const COMMAND_BYTES_MAX: u32 = 64 * 1024;
/// RFC 2177: clients re-issue IDLE at least every 29 minutes; a session
/// idling longer than this is ended.
pub const IDLE_MAX: Duration = Duration::from_secs(30 * 60);
/// How often an idling (or NOOPing) session looks for changes.
pub const IDLE_POLL: Duration = Duration::from_millis(500);
/// Messages one SELECT shows at most (a folder holds at most this many).
pub const FOLDER_MESSAGES_MAX: usize = membership::sequence::IDS_PER_SEQUENCE_MAX;
/// Bytes a SEARCH on text may read (bodies), after which it fails.
const SEARCH_BYTES_MAX: u64 = 256 << 20;
/// Flags one STORE or APPEND names at most.
const FLAGS_PER_COMMAND_MAX: usize = 32;
/// Messages one COPY copies at most (each is a new message on R nodes).
const COPY_MESSAGES_MAX: usize = 10_000;

/// One message of the selected folder.
struct Msg {
    uid: u32,
    listed: Listed,
}

impl Msg {
    fn has(&self, flag: &str) -> bool {
        self.listed.meta.marks.has(flag)
    }
}

struct Selected {
    user: String,
    folder: Folder,
    read_only: bool,
    validity: u32,
    uid_next: u32,
    msgs: Vec<Msg>,
}

enum Phase {
    NotAuthenticated,
    Authenticated { user: String },
    Selected(Box<Selected>),
}

struct Session<S> {
    stream: Stream<S>,
    server: Server,
    services: Arc<Services>,
    peer: SocketAddr,
    phase: Phase,
    tls: bool,
    n_commands: u32,
    n_bad: u32,
    auth_failures: u32,
    /// An AUTHENTICATE waiting for its (PLAIN) response.
    authenticating: Option<Tag<'static>>,
    /// IDLE in progress: its tag and since when.
    idling: Option<(Tag<'static>, Instant)>,
    /// After this response is sent: start TLS.
    starttls_after: Option<ResponseHandle>,
    /// After this response is sent: close.
    close_after: Option<ResponseHandle>,
    /// Say BYE (with this reason) after the command's tagged reply.
    bye_after: Option<&'static str>,
    /// This session counted against its user's limit (after login).
    _counted: Option<crate::services::ImapSession>,
    /// The client's TCP socket (owned by `stream`, alive as long as it).
    fd: Option<std::os::fd::RawFd>,
    buf: Vec<u8>,
}

enum Flow {
    Continue,
    Close,
}

fn text(s: &str) -> Text<'static> {
    Text::try_from(s.to_owned()).unwrap_or_else(|_| Text::unvalidated("..."))
}

fn ok(tag: Tag<'static>, code: Option<Code<'static>>, t: &str) -> Status<'static> {
    Status::ok(Some(tag), code, text(t)).expect("valid status")
}
fn no(tag: Tag<'static>, code: Option<Code<'static>>, t: &str) -> Status<'static> {
    Status::no(Some(tag), code, text(t)).expect("valid status")
}
fn bad(tag: Option<Tag<'static>>, t: &str) -> Status<'static> {
    Status::bad(tag, None, text(t)).expect("valid status")
}
fn cannot(tag: Tag<'static>, t: &str) -> Status<'static> {
    no(tag, Some(Code::Other(code_other("CANNOT"))), t)
}
fn code_other(s: &'static str) -> imap_next::imap_types::response::CodeOther<'static> {
    imap_next::imap_types::response::CodeOther::unvalidated(s.as_bytes())
}
fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).expect("nonzero")
}

fn nstring(bytes: Vec<u8>) -> NString<'static> {
    match Literal::try_from(bytes) {
        Ok(l) => NString(Some(IString::Literal(l))),
        // A NUL byte cannot travel in an IMAP4rev1 literal.
        Err(_) => NString(None),
    }
}

/// The capabilities to announce now.
fn capabilities(services: &Services, tls: bool, peer: SocketAddr, authenticated: bool) -> Vec1<Capability<'static>> {
    let mut c = vec![Capability::Imap4Rev1];
    if !authenticated {
        if !tls && services.tls.is_some() {
            c.push(Capability::StartTls);
        }
        if services.plaintext_auth.allows(tls, peer.ip()) {
            c.push(Capability::Auth(AuthMechanism::Plain));
            c.push(Capability::SaslIr);
        } else {
            c.push(Capability::LoginDisabled);
        }
    }
    c.extend([
        Capability::LiteralPlus,
        Capability::Idle,
        Capability::UidPlus,
        Capability::Move,
        Capability::Unselect,
        Capability::Id,
        Capability::Namespace,
        Capability::Enable,
    ]);
    Vec1::unvalidated(c)
}

pub async fn serve_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: Stream<S>,
    peer: SocketAddr,
    services: Arc<Services>,
    mut shutdown: watch::Receiver<bool>,
    fd: Option<std::os::fd::RawFd>,
) {
    let tls = matches!(stream, Stream::Tls(_));
    let caps = capabilities(&services, tls, peer, false);
    let greeting = Greeting::ok(Some(Code::Capability(caps)), "Quill IMAP ready").expect("valid greeting");
    let server = Server::new(options(&services), greeting);
    let mut s = Session {
        stream,
        server,
        services,
        peer,
        phase: Phase::NotAuthenticated,
        tls,
        n_commands: 0,
        n_bad: 0,
        auth_failures: 0,
        authenticating: None,
        idling: None,
        starttls_after: None,
        close_after: None,
        bye_after: None,
        _counted: None,
        fd,
        buf: vec![0; 16 * 1024],
    };
    if let Err(e) = s.run(&mut shutdown).await {
        debug!(peer = %s.peer, error = %e, "imap session ended with an i/o error");
    }
}

fn options(services: &Services) -> Options {
    let mut o = Options::default();
    o.max_literal_size = services.limits.message_bytes_max.min(u32::MAX as usize / 2) as u32;
    o.max_command_size = o.max_literal_size.saturating_add(COMMAND_BYTES_MAX);
    o.set_literal_reject_text("literal larger than the message size limit".into())
        .expect("valid text");
    o
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
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
                    // Flow::Close: BYE is queued; the loop ends once it is written.
                    let _ = self.counted(command).await?;
                }
                Ok(Event::CommandAuthenticateReceived {
                    command_authenticate: c,
                }) => {
                    if let Flow::Close = self.count_command() {
                        continue;
                    }
                    self.authenticate(c.tag, c.mechanism, c.initial_response.map(|r| r.declassify().to_vec()))
                        .await;
                }
                Ok(Event::AuthenticateDataReceived { authenticate_data }) => {
                    let tag = self.authenticating.take().expect("an AUTHENTICATE is waiting");
                    match authenticate_data {
                        AuthenticateData::Continue(data) => {
                            let data = data.declassify().to_vec();
                            self.finish_plain(tag, &data).await;
                        }
                        AuthenticateData::Cancel => {
                            let _ = self
                                .server
                                .authenticate_finish(bad(Some(tag), "authentication cancelled"));
                        }
                    }
                }
                Ok(Event::IdleCommandReceived { tag }) => {
                    if let Flow::Close = self.count_command() {
                        continue;
                    }
                    if matches!(self.phase, Phase::Selected(_)) {
                        let _ = self
                            .server
                            .idle_accept(CommandContinuationRequest::basic(None, "idling").expect("valid"));
                        self.idling = Some((tag, Instant::now()));
                    } else {
                        let _ = self.server.idle_reject(bad(Some(tag), "IDLE needs a selected folder"));
                    }
                }
                Ok(Event::IdleDoneReceived) => {
                    if let Some((tag, _)) = self.idling.take() {
                        self.server.enqueue_status(ok(tag, None, "IDLE terminated"));
                    }
                }
                Err(Interrupt::Io(Io::Output(bytes))) => {
                    let limit = self.services.limits.idle_timeout;
                    let write = async {
                        self.stream.write_all(&bytes).await?;
                        self.stream.flush().await
                    };
                    match tokio::time::timeout(limit, write).await {
                        Ok(r) => r?,
                        Err(_) => return Ok(()),
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
                    let (discarded, why) = match &e {
                        E::ExpectedCrlfGotLf { discarded_bytes } => {
                            (discarded_bytes.declassify(), "lines must end with CRLF")
                        }
                        E::MalformedMessage { discarded_bytes } => (discarded_bytes.declassify(), "syntax error"),
                        E::LiteralTooLong { .. } => {
                            // Refused already (tagged BAD) by the protocol layer.
                            bump(&self.services.metrics.limit_refusals);
                            self.count_bad();
                            continue;
                        }
                        E::CommandTooLong { discarded_bytes } => {
                            bump(&self.services.metrics.limit_refusals);
                            let _ = discarded_bytes;
                            self.bye("command line too long");
                            continue;
                        }
                    };
                    let tag = parse_tag(discarded);
                    self.server.enqueue_status(bad(tag, why));
                    self.count_bad();
                }
            }
        }
    }

    /// Reads more input into the protocol state. While idling, looks for
    /// changes every [`IDLE_POLL`]. False: the session is over.
    async fn read_more(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<bool> {
        let idle_timeout = self.services.limits.idle_timeout;
        loop {
            let wait = if self.idling.is_some() { IDLE_POLL } else { idle_timeout };
            let read = tokio::select! {
                r = tokio::time::timeout(wait, self.stream.read(&mut self.buf)) => r,
                _ = shutdown.changed() => {
                    self.bye("server shutting down");
                    return Ok(true);
                }
            };
            match read {
                Ok(Ok(0)) => return Ok(false),
                Ok(Ok(n)) => {
                    self.quick_ack();
                    self.server.enqueue_input(&self.buf[..n]);
                    return Ok(true);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    let Some((_, since)) = &self.idling else {
                        self.bye("idle for too long");
                        return Ok(true);
                    };
                    if since.elapsed() > IDLE_MAX {
                        self.idling = None;
                        self.bye("IDLE for more than 30 minutes");
                        return Ok(true);
                    }
                    let updates = self.sync().await;
                    if !updates.is_empty() {
                        for d in updates {
                            self.server.enqueue_data(d);
                        }
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Acknowledges the client's data at once instead of up to 40 ms later.
    /// A client that sends a literal and its closing CRLF in two writes
    /// without TCP_NODELAY (Python's imaplib) has the CRLF held by Nagle's
    /// algorithm until the literal is acknowledged: with delayed ACKs every
    /// APPEND took 44 ms. Linux clears the flag on its own, so it is set
    /// again after each read.
    #[allow(unsafe_code)]
    fn quick_ack(&self) {
        if let Some(fd) = self.fd {
            let one: libc::c_int = 1;
            // SAFETY: `fd` is the session's open socket (owned by
            // `self.stream`, which lives as long as the session); the
            // option value is a c_int on the stack, its size passed.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }

    fn bye(&mut self, why: &str) {
        let bye = Status::bye(None, text(why)).expect("valid");
        self.close_after = Some(self.server.enqueue_status(bye));
    }

    fn count_bad(&mut self) {
        self.n_bad += 1;
        if self.n_bad >= self.services.limits.bad_commands_max {
            bump(&self.services.metrics.limit_refusals);
            self.bye("too many bad commands");
        }
    }

    fn count_command(&mut self) -> Flow {
        self.n_commands += 1;
        if self.n_commands > self.services.limits.commands_max {
            bump(&self.services.metrics.limit_refusals);
            self.bye("too many commands in one session");
            return Flow::Close;
        }
        Flow::Continue
    }

    async fn counted(&mut self, command: Command<'static>) -> std::io::Result<Flow> {
        if let Flow::Close = self.count_command() {
            return Ok(Flow::Close);
        }
        self.command(command).await
    }

    /// STARTTLS's handshake, after its OK went out. Input the client sent
    /// behind the command is dropped with the old protocol state (never
    /// executed); the new state starts as after a greeting. False: the
    /// handshake failed (the session is over).
    async fn start_tls(&mut self) -> std::io::Result<bool> {
        let Some(tls) = self.services.tls.clone() else {
            return Ok(false);
        };
        let stream = std::mem::replace(&mut self.stream, Stream::Gone);
        let Stream::Plain(plain) = stream else { return Ok(false) };
        let deadline = crate::tls::handshake_deadline(&self.services.limits);
        match tokio::time::timeout(deadline, tls.acceptor.accept(plain)).await {
            Ok(Ok(t)) => {
                bump(&self.services.metrics.tls_handshakes);
                self.stream = Stream::Tls(Box::new(t));
                self.tls = true;
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
            _ => {
                bump(&self.services.metrics.tls_handshake_failures);
                Ok(false)
            }
        }
    }

    async fn command(&mut self, command: Command<'static>) -> std::io::Result<Flow> {
        let tag = command.tag;
        let status = match command.body {
            CommandBody::Capability => {
                let authed = !matches!(self.phase, Phase::NotAuthenticated);
                let caps = capabilities(&self.services, self.tls, self.peer, authed);
                self.server.enqueue_data(Data::Capability(caps));
                ok(tag, None, "CAPABILITY completed")
            }
            CommandBody::Noop | CommandBody::Check => {
                for d in self.sync().await {
                    self.server.enqueue_data(d);
                }
                ok(tag, None, "completed")
            }
            CommandBody::Logout => {
                self.server
                    .enqueue_status(Status::bye(None, text("Quill IMAP logging out")).expect("valid"));
                let h = self.server.enqueue_status(ok(tag, None, "LOGOUT completed"));
                self.close_after = Some(h);
                return Ok(Flow::Close);
            }
            CommandBody::StartTLS => {
                if self.tls {
                    bad(Some(tag), "TLS is already active")
                } else if !matches!(self.phase, Phase::NotAuthenticated) {
                    bad(Some(tag), "STARTTLS only before authentication")
                } else if self.services.tls.is_none() {
                    no(tag, None, "TLS not available")
                } else {
                    let h = self.server.enqueue_status(ok(tag, None, "begin TLS negotiation now"));
                    self.starttls_after = Some(h);
                    return Ok(Flow::Continue);
                }
            }
            CommandBody::Login { username, password } => {
                if !matches!(self.phase, Phase::NotAuthenticated) {
                    bad(Some(tag), "already authenticated")
                } else if !self.services.plaintext_auth.allows(self.tls, self.peer.ip()) {
                    bump(&self.services.metrics.plaintext_auth_refused);
                    no(
                        tag,
                        Some(Code::Other(code_other("PRIVACYREQUIRED"))),
                        "LOGIN needs TLS (STARTTLS) first",
                    )
                } else {
                    let user = String::from_utf8_lossy(username.as_ref()).into_owned();
                    let pass = String::from_utf8_lossy(password.declassify().as_ref()).into_owned();
                    match self.login(tag.clone(), &user, &pass).await {
                        Ok(s) => s,
                        Err(s) => s,
                    }
                }
            }
            CommandBody::Id { .. } => {
                let params = vec![(
                    IString::try_from("name").expect("valid"),
                    NString(Some(IString::try_from("Quill").expect("valid"))),
                )];
                self.server.enqueue_data(Data::Id {
                    parameters: Some(params),
                });
                ok(tag, None, "ID completed")
            }
            CommandBody::Enable { .. } => {
                if matches!(self.phase, Phase::NotAuthenticated) {
                    bad(Some(tag), "log in first")
                } else {
                    self.server.enqueue_data(Data::Enabled { capabilities: vec![] });
                    ok(tag, None, "ENABLE completed")
                }
            }
            body => {
                let Some(user) = self.user() else {
                    return Ok(self.done(bad(Some(tag), "log in first")));
                };
                self.authenticated(tag, user, body).await
            }
        };
        Ok(self.done(status))
    }

    fn done(&mut self, status: Status<'static>) -> Flow {
        self.server.enqueue_status(status);
        self.then_bye()
    }

    fn then_bye(&mut self) -> Flow {
        match self.bye_after.take() {
            Some(why) => {
                self.bye(why);
                Flow::Close
            }
            None => Flow::Continue,
        }
    }

    fn user(&self) -> Option<String> {
        match &self.phase {
            Phase::NotAuthenticated => None,
            Phase::Authenticated { user } => Some(user.clone()),
            Phase::Selected(s) => Some(s.user.clone()),
        }
    }

    async fn login(
        &mut self,
        tag: Tag<'static>,
        user: &str,
        password: &str,
    ) -> Result<Status<'static>, Status<'static>> {
        match self.services.authenticate(self.peer.ip(), user, password).await {
            Auth::Blocked => {
                bump(&self.services.metrics.limit_refusals);
                self.bye_after = Some("too many authentication failures, try again later");
                Err(no(
                    tag,
                    Some(Code::Other(code_other("UNAVAILABLE"))),
                    "too many authentication failures",
                ))
            }
            Auth::Failed => {
                self.auth_failures += 1;
                if self.auth_failures >= SESSION_AUTH_FAILURES_MAX {
                    self.bye_after = Some("too many authentication failures");
                }
                Err(no(
                    tag,
                    Some(Code::Other(code_other("AUTHENTICATIONFAILED"))),
                    "invalid user name or password",
                ))
            }
            Auth::Ok(record) => {
                let Some(counted) = self.services.imap_session(&record.mailbox()) else {
                    bump(&self.services.metrics.limit_refusals);
                    return Err(no(
                        tag,
                        Some(Code::Other(code_other("LIMIT"))),
                        "too many IMAP sessions for this user on this node",
                    ));
                };
                self._counted = Some(counted);
                bump(&self.services.metrics.imap_logins);
                debug!(peer = %self.peer, user = %record.address, "imap login");
                self.phase = Phase::Authenticated { user: record.mailbox() };
                let caps = capabilities(&self.services, self.tls, self.peer, true);
                Ok(ok(tag, Some(Code::Capability(caps)), "logged in"))
            }
        }
    }

    async fn authenticate(&mut self, tag: Tag<'static>, mechanism: AuthMechanism<'static>, initial: Option<Vec<u8>>) {
        let refuse = |s: &mut Self, st: Status<'static>| {
            let _ = s.server.authenticate_finish(st);
        };
        if !matches!(self.phase, Phase::NotAuthenticated) {
            return refuse(self, bad(Some(tag), "already authenticated"));
        }
        if !self.services.plaintext_auth.allows(self.tls, self.peer.ip()) {
            bump(&self.services.metrics.plaintext_auth_refused);
            return refuse(
                self,
                no(
                    tag,
                    Some(Code::Other(code_other("PRIVACYREQUIRED"))),
                    "authentication needs TLS (STARTTLS) first",
                ),
            );
        }
        if mechanism != AuthMechanism::Plain {
            return refuse(self, no(tag, None, "unsupported mechanism: only PLAIN"));
        }
        match initial {
            Some(data) => self.finish_plain(tag, &data).await,
            None => {
                self.authenticating = Some(tag);
                let _ = self.server.authenticate_continue(
                    CommandContinuationRequest::basic(None, " ")
                        .unwrap_or_else(|_| CommandContinuationRequest::basic(None, "go ahead").expect("valid")),
                );
            }
        }
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd` (already base64-decoded
    /// by the protocol layer).
    async fn finish_plain(&mut self, tag: Tag<'static>, data: &[u8]) {
        let parts: Vec<&[u8]> = data.split(|b| *b == 0).collect();
        let status = match parts.as_slice() {
            [authz, user, pass] if authz.is_empty() || authz == user => {
                let user = String::from_utf8_lossy(user).into_owned();
                let pass = String::from_utf8_lossy(pass).into_owned();
                match self.login(tag, &user, &pass).await {
                    Ok(s) | Err(s) => s,
                }
            }
            _ => bad(Some(tag), "malformed PLAIN response"),
        };
        let _ = self.server.authenticate_finish(status);
        self.then_bye();
    }

    /// Commands of the authenticated and selected states.
    async fn authenticated(&mut self, tag: Tag<'static>, user: String, body: CommandBody<'static>) -> Status<'static> {
        match body {
            CommandBody::Namespace => {
                let personal = vec![Namespace {
                    prefix: IString::try_from("").expect("valid"),
                    delimiter: Some(QuotedChar::try_from(folders::DELIMITER).expect("valid")),
                    extensions: vec![],
                }];
                self.server.enqueue_data(Data::Namespace {
                    personal,
                    other: vec![],
                    shared: vec![],
                });
                ok(tag, None, "NAMESPACE completed")
            }
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => self.list(tag, &user, &reference, &mailbox_wildcard, false),
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => self.list(tag, &user, &reference, &mailbox_wildcard, true),
            CommandBody::Status { mailbox, item_names } => {
                let folder = match self.folder(&user, &mailbox) {
                    Ok(f) => f,
                    Err(s) => return s(tag),
                };
                let (validity, next, msgs) = match self.folder_now(&user, &folder).await {
                    Ok(v) => v,
                    Err(s) => return s(tag),
                };
                let count = |flag: &str| msgs.iter().filter(|(_, l)| l.meta.marks.has(flag)).count() as u32;
                let mut items = Vec::new();
                for name in item_names.iter() {
                    items.push(match name {
                        StatusDataItemName::Messages => StatusDataItem::Messages(msgs.len() as u32),
                        StatusDataItemName::Recent => StatusDataItem::Recent(0),
                        StatusDataItemName::UidNext => StatusDataItem::UidNext(nz(next)),
                        StatusDataItemName::UidValidity => StatusDataItem::UidValidity(nz(validity)),
                        StatusDataItemName::Unseen => StatusDataItem::Unseen(msgs.len() as u32 - count("\\Seen")),
                        StatusDataItemName::Deleted => StatusDataItem::Deleted(count("\\Deleted")),
                        StatusDataItemName::DeletedStorage => StatusDataItem::DeletedStorage(
                            msgs.iter()
                                .filter(|(_, l)| l.meta.marks.has("\\Deleted"))
                                .map(|(_, l)| l.meta.size_bytes)
                                .sum(),
                        ),
                    });
                }
                self.server.enqueue_data(Data::Status {
                    mailbox,
                    items: Cow::Owned(items),
                });
                ok(tag, None, "STATUS completed")
            }
            CommandBody::Select { mailbox, .. } => self.select(tag, user, mailbox, false).await,
            CommandBody::Examine { mailbox, .. } => self.select(tag, user, mailbox, true).await,
            CommandBody::Subscribe { mailbox } => {
                let name = match folders::canonical(mailbox_as_bytes(&mailbox)) {
                    Ok(n) => n,
                    Err(why) => return no(tag, None, why),
                };
                if name == folders::INBOX {
                    return ok(tag, None, "SUBSCRIBE completed");
                }
                // Subscribing to a folder that does not exist (yet) is
                // allowed (RFC 3501 6.3.6 lets a server refuse; clients
                // subscribe before or after CREATE).
                match self
                    .services
                    .uids
                    .bind(&folders::subscriptions(&user), vec![(name, [0; 16])])
                    .await
                {
                    Ok(()) => ok(tag, None, "SUBSCRIBE completed"),
                    Err(e) => self.refused(tag, &e),
                }
            }
            CommandBody::Unsubscribe { mailbox } => {
                let name = match folders::canonical(mailbox_as_bytes(&mailbox)) {
                    Ok(n) => n,
                    Err(why) => return no(tag, None, why),
                };
                let scope = folders::subscriptions(&user);
                if !self.services.uids.names(&scope).contains_key(&name) {
                    return no(tag, Some(Code::Other(code_other("NONEXISTENT"))), "not subscribed");
                }
                match self.services.uids.unbind(&scope, vec![(name, [0; 16])]).await {
                    Ok(()) => ok(tag, None, "UNSUBSCRIBE completed"),
                    Err(e) => self.refused(tag, &e),
                }
            }
            CommandBody::Create { mailbox } => self.create(tag, &user, &mailbox).await,
            CommandBody::Delete { mailbox } => self.delete_folder(tag, &user, &mailbox).await,
            CommandBody::Rename { from, to } => self.rename(tag, &user, &from, &to).await,
            CommandBody::Append {
                mailbox,
                message,
                flags,
                date,
            } => {
                let folder = match self.folder(&user, &mailbox) {
                    Ok(f) => f,
                    Err(_) => return no(tag, Some(Code::TryCreate), "no such folder: CREATE it first"),
                };
                let bytes = match message {
                    imap_next::imap_types::extensions::binary::LiteralOrLiteral8::Literal(l) => {
                        l.into_inner().into_owned()
                    }
                    imap_next::imap_types::extensions::binary::LiteralOrLiteral8::Literal8(l) => l.data.into_owned(),
                };
                let arrival = date.map(|d| d.as_ref().timestamp_millis().max(0) as u64);
                self.append(tag, user, folder, bytes, flags, arrival).await
            }
            body => {
                let Phase::Selected(_) = &self.phase else {
                    return bad(Some(tag), "no folder selected");
                };
                self.selected(tag, body).await
            }
        }
    }

    /// A new folder's id: unique like a message id (time, node nonce,
    /// counter).
    fn new_folder_id(&self) -> [u8; 16] {
        self.services.mail.new_message_id(crate::time::now_ms()).0
    }

    /// A refused Raft change (a limit, or a race with another session).
    fn refused(&self, tag: Tag<'static>, e: &anyhow::Error) -> Status<'static> {
        let why = e.to_string();
        debug!(error = %why, "imap: folder change refused");
        if why.contains("already exists") {
            no(
                tag,
                Some(Code::Other(code_other("ALREADYEXISTS"))),
                "that folder already exists",
            )
        } else if why.contains("at most") {
            no(tag, Some(Code::Other(code_other("LIMIT"))), "too many folders")
        } else if why.contains("does not exist") {
            nonexistent(tag)
        } else {
            no(
                tag,
                Some(Code::Other(code_other("UNAVAILABLE"))),
                "the change could not be made now, try again",
            )
        }
    }

    /// The folder a client's mailbox name names, if it exists.
    #[allow(clippy::result_large_err)]
    fn folder(&self, user: &str, mailbox: &Mailbox<'_>) -> Result<Folder, fn(Tag<'static>) -> Status<'static>> {
        let Ok(name) = folders::canonical(mailbox_as_bytes(mailbox)) else {
            return Err(nonexistent);
        };
        if name == folders::INBOX {
            return Ok(Folder::inbox());
        }
        folders::resolve(&self.services.uids.names(&folders::scope(user)), &name).ok_or(nonexistent as _)
    }

    /// A name for a new folder (CREATE, the target of RENAME): canonical
    /// and not taken; with the user's folders as they are now.
    #[allow(clippy::result_large_err)]
    fn free_name(
        &self,
        tag: &Tag<'static>,
        user: &str,
        mailbox: &Mailbox<'_>,
    ) -> Result<(String, BTreeMap<String, [u8; 16]>), Status<'static>> {
        let name = folders::canonical(mailbox_as_bytes(mailbox)).map_err(|why| no(tag.clone(), None, why))?;
        let names = self.services.uids.names(&folders::scope(user));
        if name == folders::INBOX || names.contains_key(&name) {
            return Err(no(
                tag.clone(),
                Some(Code::Other(code_other("ALREADYEXISTS"))),
                "that folder already exists",
            ));
        }
        Ok((name, names))
    }

    /// The levels above `name` that do not exist, with new ids (CREATE and
    /// RENAME make them, RFC 3501 6.3.3).
    fn missing_superiors(&self, name: &str, names: &BTreeMap<String, [u8; 16]>) -> Vec<(String, [u8; 16])> {
        folders::superiors(name)
            .into_iter()
            .filter(|s| s != folders::INBOX && !names.contains_key(s))
            .map(|s| (s, self.new_folder_id()))
            .collect()
    }

    async fn create(&mut self, tag: Tag<'static>, user: &str, mailbox: &Mailbox<'_>) -> Status<'static> {
        let (name, names) = match self.free_name(&tag, user, mailbox) {
            Ok(v) => v,
            Err(s) => return s,
        };
        let scope = folders::scope(user);
        let mut items = self.missing_superiors(&name, &names);
        items.push((name, self.new_folder_id()));
        if names.len() + items.len() > folders::FOLDERS_MAX {
            return no(
                tag,
                Some(Code::Other(code_other("LIMIT"))),
                "too many folders (at most 1000)",
            );
        }
        match self.services.uids.bind(&scope, items).await {
            Ok(()) => ok(tag, None, "CREATE completed"),
            Err(e) => self.refused(tag, &e),
        }
    }

    async fn delete_folder(&mut self, tag: Tag<'static>, user: &str, mailbox: &Mailbox<'_>) -> Status<'static> {
        let folder = match self.folder(user, mailbox) {
            Ok(f) => f,
            Err(s) => return s(tag),
        };
        if folder.is_inbox() {
            return no(tag, Some(Code::Other(code_other("CANNOT"))), "INBOX cannot be deleted");
        }
        if let Phase::Selected(sel) = &self.phase
            && sel.folder.id == folder.id
        {
            self.phase = Phase::Authenticated { user: user.to_owned() };
        }
        let scope = folders::scope(user);
        if let Err(e) = self
            .services
            .uids
            .unbind(&scope, vec![(folder.name.clone(), folder.raw)])
            .await
        {
            return self.refused(tag, &e);
        }
        // Gone from every listing now; its messages and UIDs follow.
        let msgs: Vec<Listed> = self
            .services
            .mail
            .mailbox(user)
            .await
            .into_iter()
            .filter(|l| l.meta.folder == folder.id)
            .collect();
        if !msgs.is_empty() && self.services.mail.delete(user, &msgs).await.is_err() {
            debug!(user, "imap: a deleted folder's messages are not all deleted yet");
        }
        let _ = self.services.uids.drop_folder(&sequence_name(user, &folder.id)).await;
        ok(tag, None, "DELETE completed")
    }

    async fn rename(&mut self, tag: Tag<'static>, user: &str, from: &Mailbox<'_>, to: &Mailbox<'_>) -> Status<'static> {
        let folder = match self.folder(user, from) {
            Ok(f) => f,
            Err(s) => return s(tag),
        };
        if folder.is_inbox() {
            return no(
                tag,
                Some(Code::Other(code_other("CANNOT"))),
                "renaming INBOX is not supported: MOVE its messages instead",
            );
        }
        let (new, names) = match self.free_name(&tag, user, to) {
            Ok(v) => v,
            Err(s) => return s,
        };
        let scope = folders::scope(user);
        if new.starts_with(&format!("{}{}", folder.name, folders::DELIMITER)) {
            return no(
                tag,
                Some(Code::Other(code_other("CANNOT"))),
                "a folder cannot go below itself",
            );
        }
        let moves = folders::renames(&names, &folder.name, &new);
        if moves
            .iter()
            .any(|(_, _, to)| folders::canonical(to.as_bytes()).is_err())
        {
            return no(tag, None, "a folder below would get a name too long or too deep");
        }
        if let Err(e) = self.services.uids.rename(&scope, moves).await {
            return self.refused(tag, &e);
        }
        // The levels above the new name, as CREATE makes them.
        let names = self.services.uids.names(&scope);
        let missing = self.missing_superiors(&new, &names);
        if !missing.is_empty() {
            let _ = self.services.uids.bind(&scope, missing).await;
        }
        if let Phase::Selected(sel) = &mut self.phase
            && sel.folder.id == folder.id
        {
            sel.folder.name = new;
        }
        ok(tag, None, "RENAME completed")
    }

    /// LIST or LSUB.
    fn list(
        &mut self,
        tag: Tag<'static>,
        user: &str,
        reference: &Mailbox<'_>,
        mailbox_wildcard: &ListMailbox<'_>,
        lsub: bool,
    ) -> Status<'static> {
        let pattern = match mailbox_wildcard {
            ListMailbox::Token(t) => String::from_utf8_lossy(t.as_ref()).into_owned(),
            ListMailbox::String(s) => String::from_utf8_lossy(s.as_ref()).into_owned(),
        };
        let reference = String::from_utf8_lossy(mailbox_as_bytes(reference)).into_owned();
        let delimiter = Some(QuotedChar::try_from(folders::DELIMITER).expect("valid"));
        let done = if lsub { "LSUB completed" } else { "LIST completed" };
        if pattern.is_empty() {
            // The hierarchy delimiter and root.
            let mailbox = Mailbox::try_from("").unwrap_or(Mailbox::Inbox);
            let items = vec![FlagNameAttribute::Noselect];
            self.server.enqueue_data(list_data(lsub, items, delimiter, mailbox));
            return ok(tag, None, done);
        }
        let full = format!("{reference}{pattern}");
        let names = self.services.uids.names(&folders::scope(user));
        let found = folders::list(&names, |n| wildcard_match(&full, n));
        let subscribed = if lsub {
            Some(self.services.uids.names(&folders::subscriptions(user)))
        } else {
            None
        };
        let mut shown = 0usize;
        for l in found {
            if let Some(subs) = &subscribed
                && l.name != folders::INBOX
                && !subs.contains_key(&l.name)
            {
                continue;
            }
            let mut items = Vec::new();
            if l.noselect {
                items.push(FlagNameAttribute::Noselect);
            }
            let children = if l.children { "HasChildren" } else { "HasNoChildren" };
            items.push(FlagNameAttribute::from(imap_next::imap_types::core::Atom::unvalidated(
                children,
            )));
            let Ok(mailbox) = Mailbox::try_from(l.name) else {
                continue;
            };
            self.server.enqueue_data(list_data(lsub, items, delimiter, mailbox));
            shown += 1;
        }
        // Subscriptions to folders that do not exist (any more).
        if let Some(subs) = subscribed {
            for name in subs.keys() {
                if names.contains_key(name) || !wildcard_match(&full, name) {
                    continue;
                }
                let Ok(mailbox) = Mailbox::try_from(name.clone()) else {
                    continue;
                };
                self.server
                    .enqueue_data(list_data(true, vec![FlagNameAttribute::Noselect], delimiter, mailbox));
                shown += 1;
            }
        }
        debug!(user, shown, "imap list");
        ok(tag, None, done)
    }

    /// The folder's UIDs and messages as listed now, numbering new ones.
    #[allow(clippy::type_complexity)]
    async fn folder_now(
        &mut self,
        user: &str,
        folder: &Folder,
    ) -> Result<(u32, u32, Vec<(u32, Listed)>), fn(Tag<'static>) -> Status<'static>> {
        let mut listed: Vec<Listed> = self
            .services
            .mail
            .mailbox(user)
            .await
            .into_iter()
            .filter(|l| l.meta.folder == folder.id)
            .collect();
        listed.sort_by_key(|l| l.meta.id);
        listed.truncate(FOLDER_MESSAGES_MAX);
        let name = sequence_name(user, &folder.id);
        let ids: Vec<[u8; 16]> = listed.iter().map(|l| l.meta.id.0).collect();
        let mut numbers = self.services.uids.numbers(&name, &ids);
        let missing: Vec<[u8; 16]> = match &numbers {
            None => ids.clone(),
            Some(n) => ids
                .iter()
                .zip(&n.uids)
                .filter(|(_, u)| u.is_none())
                .map(|(id, _)| *id)
                .collect(),
        };
        // A folder seen for the first time gets its sequence (and so its
        // UIDVALIDITY) even when it is empty.
        if !missing.is_empty() || numbers.is_none() {
            if let Err(e) = self.services.uids.assign(&name, missing).await {
                bump(&self.services.metrics.imap_uid_failures);
                debug!(user, error = %e, "UIDs for new mail: not all given now");
            }
            numbers = self.services.uids.numbers(&name, &ids);
        }
        let Some(numbers) = numbers else {
            return Err(|tag| {
                no(
                    tag,
                    Some(Code::Other(code_other("UNAVAILABLE"))),
                    "the folder's UIDs cannot be read now, try again",
                )
            });
        };
        let mut msgs: Vec<(u32, Listed)> = listed
            .into_iter()
            .zip(numbers.uids)
            .filter_map(|(l, u)| u.map(|u| (u, l)))
            .collect();
        msgs.sort_by_key(|(u, _)| *u);
        Ok((numbers.validity, numbers.next, msgs))
    }

    async fn select(
        &mut self,
        tag: Tag<'static>,
        user: String,
        mailbox: Mailbox<'static>,
        read_only: bool,
    ) -> Status<'static> {
        // A failed SELECT leaves no folder selected (RFC 3501 6.3.1).
        self.phase = Phase::Authenticated { user: user.clone() };
        let folder = match self.folder(&user, &mailbox) {
            Ok(f) => f,
            Err(s) => return s(tag),
        };
        let (validity, uid_next, msgs) = match self.folder_now(&user, &folder).await {
            Ok(v) => v,
            Err(s) => return s(tag),
        };
        let msgs: Vec<Msg> = msgs.into_iter().map(|(uid, listed)| Msg { uid, listed }).collect();
        let n = msgs.len() as u32;
        let flags = folder_flags(&msgs);
        let mut permanent: Vec<imap_next::imap_types::flag::FlagPerm<'static>> =
            flags.iter().cloned().map(Into::into).collect();
        permanent.push(imap_next::imap_types::flag::FlagPerm::Asterisk);
        self.server.enqueue_data(Data::Flags(flags));
        self.server.enqueue_data(Data::Exists(n));
        self.server.enqueue_data(Data::Recent(0));
        if let Some(first) = msgs.iter().position(|m| !m.has("\\Seen")) {
            self.untagged_ok(Code::Unseen(nz(first as u32 + 1)), "first unseen");
        }
        self.untagged_ok(Code::PermanentFlags(permanent), "flags are stored");
        self.untagged_ok(Code::UidValidity(nz(validity)), "UIDs valid");
        self.untagged_ok(Code::UidNext(nz(uid_next)), "predicted next UID");
        self.phase = Phase::Selected(Box::new(Selected {
            user,
            folder,
            read_only,
            validity,
            uid_next,
            msgs,
        }));
        if read_only {
            ok(tag, Some(Code::ReadOnly), "EXAMINE completed")
        } else {
            ok(tag, Some(Code::ReadWrite), "SELECT completed")
        }
    }

    fn untagged_ok(&mut self, code: Code<'static>, t: &str) {
        self.server
            .enqueue_status(Status::ok(None, Some(code), text(t)).expect("valid"));
    }

    /// What changed in the selected folder since the session last looked:
    /// EXPUNGE for messages gone (deleted, or moved away), FETCH FLAGS for
    /// flags changed (through any node), EXISTS for new ones (only UIDs
    /// above every UID the session has shown: a UID is never shown below
    /// one already seen).
    async fn sync(&mut self) -> Vec<Data<'static>> {
        let Phase::Selected(sel) = &self.phase else {
            return vec![];
        };
        let (user, folder) = (sel.user.clone(), sel.folder.clone());
        if !folder.is_inbox()
            && !self
                .services
                .uids
                .names(&folders::scope(&user))
                .values()
                .any(|id| *id == folder.raw)
        {
            // Deleted by another session: every message goes (and the
            // folder's sequence is not made again by a listing).
            let Phase::Selected(sel) = &mut self.phase else {
                return vec![];
            };
            let n = sel.msgs.len();
            sel.msgs.clear();
            return (0..n).map(|_| Data::Expunge(nz(1))).collect();
        }
        let Ok((validity, next, now)) = self.folder_now(&user, &folder).await else {
            return vec![];
        };
        let Phase::Selected(sel) = &mut self.phase else {
            return vec![];
        };
        let mut out = Vec::new();
        if validity != sel.validity {
            // The folder was made anew: the client must start over.
            return out;
        }
        let mut present: std::collections::HashMap<u32, Listed> = now.iter().map(|(u, l)| (*u, l.clone())).collect();
        let mut i = 0;
        while i < sel.msgs.len() {
            match present.remove(&sel.msgs[i].uid) {
                Some(listed) => {
                    let m = &mut sel.msgs[i];
                    let before: Vec<&str> = m.listed.meta.marks.set_flags().collect();
                    let after: Vec<&str> = listed.meta.marks.set_flags().collect();
                    let changed = before != after;
                    m.listed = listed;
                    if changed {
                        out.push(Data::Fetch {
                            seq: nz(i as u32 + 1),
                            items: Vec1::unvalidated(vec![
                                MessageDataItem::Uid(nz(m.uid)),
                                MessageDataItem::Flags(flags_of(m)),
                            ]),
                        });
                    }
                    i += 1;
                }
                None => {
                    sel.msgs.remove(i);
                    out.push(Data::Expunge(nz(i as u32 + 1)));
                }
            }
        }
        let high = sel.msgs.last().map_or(0, |m| m.uid).max(sel.uid_next.saturating_sub(1));
        let before = sel.msgs.len();
        for (uid, listed) in now {
            if uid > high {
                sel.msgs.push(Msg { uid, listed });
            }
        }
        sel.uid_next = sel.uid_next.max(next);
        if sel.msgs.len() != before || out.iter().any(|d| matches!(d, Data::Expunge(_))) {
            out.push(Data::Exists(sel.msgs.len() as u32));
        }
        out
    }

    async fn append(
        &mut self,
        tag: Tag<'static>,
        user: String,
        folder: Folder,
        bytes: Vec<u8>,
        flags: Vec<Flag<'static>>,
        arrival: Option<u64>,
    ) -> Status<'static> {
        if bytes.len() > self.services.limits.message_bytes_max {
            return no(tag, Some(Code::TooBig), "message larger than the size limit");
        }
        if flags.len() > FLAGS_PER_COMMAND_MAX
            || flags
                .iter()
                .any(|f| name_of_flag(f).len() > replication::marks::FLAG_BYTES_MAX)
        {
            return no(
                tag,
                Some(Code::Other(code_other("LIMIT"))),
                "too many flags, or a flag name over 64 bytes",
            );
        }
        let now = crate::time::now_ms();
        let arrival = arrival.unwrap_or(now);
        let id = self.services.mail.new_message_id(arrival);
        let out = self
            .services
            .mail
            .deliver_as(id, std::slice::from_ref(&user), &folder.id, arrival, bytes)
            .await;
        if !out.stored.first().copied().unwrap_or(false) {
            return no(
                tag,
                Some(Code::Other(code_other("UNAVAILABLE"))),
                "could not store the message, try again",
            );
        }
        if !flags.is_empty() {
            // The copies are where the delivery put them: mark them there.
            let listed = fresh_listed(id, &folder.id, arrival, out.copies.first().cloned().unwrap_or_default());
            let hlc = self.services.mail.hlc_now();
            let change = MarkChange {
                id,
                folder: None,
                flags: flags
                    .iter()
                    .map(|f| FlagMark {
                        name: name_of_flag(f),
                        set: true,
                        hlc,
                    })
                    .collect(),
            };
            if self.services.mail.mark(&user, &[(listed, change)]).await.is_err() {
                debug!(user, "imap append: flags not recorded everywhere");
            }
        }
        let name = sequence_name(&user, &folder.id);
        let _ = self.services.uids.assign(&name, vec![id.0]).await;
        let uid = self.services.uids.numbers(&name, &[id.0]);
        match uid.and_then(|n| n.uids[0].map(|u| (n.validity, u))) {
            Some((validity, uid)) => ok(
                tag,
                Some(Code::AppendUid {
                    uid_validity: nz(validity),
                    uid: nz(uid),
                }),
                "APPEND completed",
            ),
            None => ok(tag, None, "APPEND completed"),
        }
    }

    /// Commands of the selected state.
    async fn selected(&mut self, tag: Tag<'static>, body: CommandBody<'static>) -> Status<'static> {
        match body {
            CommandBody::Unselect => {
                let user = self.user().expect("selected");
                self.phase = Phase::Authenticated { user };
                ok(tag, None, "UNSELECT completed")
            }
            CommandBody::Close => {
                let _ = self.expunge(None, false).await;
                let user = self.user().expect("selected");
                self.phase = Phase::Authenticated { user };
                ok(tag, None, "CLOSE completed")
            }
            CommandBody::Expunge => match self.expunge(None, true).await {
                Ok(()) => ok(tag, None, "EXPUNGE completed"),
                Err(why) => no(tag, None, why),
            },
            CommandBody::ExpungeUid { sequence_set } => match self.expunge(Some(sequence_set), true).await {
                Ok(()) => ok(tag, None, "UID EXPUNGE completed"),
                Err(why) => no(tag, None, why),
            },
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                ..
            } => self.fetch(tag, sequence_set, macro_or_item_names, uid).await,
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                ..
            } => {
                let Phase::Selected(sel) = &self.phase else {
                    unreachable!()
                };
                if sel.read_only {
                    return no(tag, Some(Code::ReadOnly), "the folder is read-only (EXAMINE)");
                }
                if flags.len() > FLAGS_PER_COMMAND_MAX {
                    return no(
                        tag,
                        Some(Code::Other(code_other("LIMIT"))),
                        "too many flags in one STORE",
                    );
                }
                let silent = response == imap_next::imap_types::flag::StoreResponse::Silent;
                let names: Vec<String> = flags.iter().map(name_of_flag).collect();
                if names.iter().any(|n| n.len() > replication::marks::FLAG_BYTES_MAX) {
                    return no(
                        tag,
                        Some(Code::Other(code_other("LIMIT"))),
                        "a flag name is too long (at most 64 bytes)",
                    );
                }
                let largest = largest(sel, uid);
                let hlc = self.services.mail.hlc_now();
                let mut changes: Vec<(usize, Listed, MarkChange)> = Vec::new();
                for (i, m) in sel.msgs.iter().enumerate() {
                    let key = if uid { m.uid } else { i as u32 + 1 };
                    if !set_contains(&sequence_set, key, largest) {
                        continue;
                    }
                    // Keywords are case-insensitive: a change goes to the
                    // register the message already has under another case.
                    let mark = |name: &str, set| FlagMark {
                        name: m
                            .listed
                            .meta
                            .marks
                            .flags
                            .iter()
                            .find(|f| f.name.eq_ignore_ascii_case(name))
                            .map_or_else(|| name.to_owned(), |f| f.name.clone()),
                        set,
                        hlc,
                    };
                    let mut edits: Vec<FlagMark> = match kind {
                        StoreType::Add => names.iter().map(|n| mark(n, true)).collect(),
                        StoreType::Remove => names.iter().map(|n| mark(n, false)).collect(),
                        StoreType::Replace => names.iter().map(|n| mark(n, true)).collect(),
                    };
                    if kind == StoreType::Replace {
                        for old in m.listed.meta.marks.set_flags() {
                            if !names.iter().any(|n| n.eq_ignore_ascii_case(old)) {
                                edits.push(mark(old, false));
                            }
                        }
                    }
                    // Only what changes (a STORE that changes nothing sends nothing).
                    edits.retain(|e| m.has(&e.name) != e.set);
                    let fresh = edits
                        .iter()
                        .filter(|e| !m.listed.meta.marks.flags.iter().any(|f| f.name == e.name))
                        .count();
                    if m.listed.meta.marks.flags.len() + fresh > replication::marks::FLAGS_PER_MESSAGE_MAX {
                        return no(
                            tag,
                            Some(Code::Other(code_other("LIMIT"))),
                            "a message keeps at most 64 flags (set or cleared)",
                        );
                    }
                    let change = MarkChange {
                        id: m.listed.meta.id,
                        folder: None,
                        flags: edits,
                    };
                    changes.push((i, m.listed.clone(), change));
                }
                let user = sel.user.clone();
                let to_send: Vec<(Listed, MarkChange)> = changes
                    .iter()
                    .filter(|(_, _, c)| !c.flags.is_empty())
                    .map(|(_, l, c)| (l.clone(), c.clone()))
                    .collect();
                if !to_send.is_empty() && self.services.mail.mark(&user, &to_send).await.is_err() {
                    return no(
                        tag,
                        Some(Code::Other(code_other("UNAVAILABLE"))),
                        "the flags could not be stored now, try again",
                    );
                }
                bump(&self.services.metrics.imap_stores);
                let Phase::Selected(sel) = &mut self.phase else {
                    unreachable!()
                };
                let mut out = Vec::new();
                for (i, _, change) in changes {
                    let m = &mut sel.msgs[i];
                    m.listed.meta.apply_marks(&change);
                    if !silent {
                        let mut items = vec![MessageDataItem::Flags(flags_of(m))];
                        if uid {
                            items.push(MessageDataItem::Uid(nz(m.uid)));
                        }
                        out.push(Data::Fetch {
                            seq: nz(i as u32 + 1),
                            items: Vec1::unvalidated(items),
                        });
                    }
                }
                for d in out {
                    self.server.enqueue_data(d);
                }
                ok(tag, None, "STORE completed")
            }
            CommandBody::Search { criteria, uid, .. } => {
                let Phase::Selected(sel) = &self.phase else {
                    unreachable!()
                };
                let key = if criteria.as_ref().len() == 1 {
                    criteria.as_ref()[0].clone()
                } else {
                    SearchKey::And(criteria.clone())
                };
                let mut hits = Vec::new();
                let mut budget = SEARCH_BYTES_MAX;
                let n = sel.msgs.len();
                for i in 0..n {
                    let Phase::Selected(sel) = &self.phase else {
                        unreachable!()
                    };
                    let (seq_largest, uid_largest) = (largest(sel, false), largest(sel, true));
                    let m = &sel.msgs[i];
                    let mut ctx = Ctx {
                        seq: i as u32 + 1,
                        seq_largest,
                        uid_largest,
                        msg: m,
                        body: None,
                    };
                    match matches(&key, &mut ctx, &self.services, &mut budget).await {
                        Ok(true) => hits.push(if uid { m.uid } else { i as u32 + 1 }),
                        Ok(false) => {}
                        Err(why) => return no(tag, None, why),
                    }
                }
                self.server
                    .enqueue_data(Data::Search(hits.into_iter().map(nz).collect()));
                ok(tag, None, "SEARCH completed")
            }
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => self.copy_or_move(tag, sequence_set, mailbox, uid, false).await,
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => self.copy_or_move(tag, sequence_set, mailbox, uid, true).await,
            other => bad(Some(tag), &format!("{} is not supported", other.name())),
        }
    }

    /// COPY or MOVE (and their UID forms) to `mailbox`.
    async fn copy_or_move(
        &mut self,
        tag: Tag<'static>,
        set: SequenceSet,
        mailbox: Mailbox<'static>,
        uid: bool,
        is_move: bool,
    ) -> Status<'static> {
        let Phase::Selected(sel) = &self.phase else {
            unreachable!()
        };
        let user = sel.user.clone();
        if is_move && sel.read_only {
            return no(tag, Some(Code::ReadOnly), "the folder is read-only (EXAMINE)");
        }
        let source = sel.folder.clone();
        let dest = match self.folder(&user, &mailbox) {
            Ok(f) => f,
            Err(_) => return no(tag, Some(Code::TryCreate), "no such folder: CREATE it first"),
        };
        let Phase::Selected(sel) = &self.phase else {
            unreachable!()
        };
        let largest = largest(sel, uid);
        let targets: Vec<usize> = (0..sel.msgs.len())
            .filter(|i| set_contains(&set, if uid { sel.msgs[*i].uid } else { *i as u32 + 1 }, largest))
            .collect();
        let verb = if is_move { "MOVE" } else { "COPY" };
        if targets.is_empty() {
            if !uid && !sel.msgs.is_empty() {
                return bad(Some(tag), "no such message");
            }
            return ok(tag, None, &format!("{verb} completed (no message)"));
        }
        if is_move && dest.id == source.id {
            return no(
                tag,
                Some(Code::Other(code_other("CANNOT"))),
                "the source and the destination are the same folder",
            );
        }
        if !is_move && targets.len() > COPY_MESSAGES_MAX {
            return no(
                tag,
                Some(Code::Other(code_other("LIMIT"))),
                "too many messages in one COPY (at most 10 000)",
            );
        }
        let src_uids: Vec<u32> = targets.iter().map(|i| sel.msgs[*i].uid).collect();
        let listed: Vec<Listed> = targets.iter().map(|i| sel.msgs[*i].listed.clone()).collect();
        let dest_seq = sequence_name(&user, &dest.id);
        let unavailable = |tag| {
            no(
                tag,
                Some(Code::Other(code_other("UNAVAILABLE"))),
                "the messages could not be copied now, try again",
            )
        };
        let new_ids: Vec<[u8; 16]> = if is_move {
            let ids: Vec<[u8; 16]> = listed.iter().map(|l| l.meta.id.0).collect();
            // UIDs in the destination first: a session there numbers the
            // messages the same once they show up in it.
            if self.services.uids.assign(&dest_seq, ids.clone()).await.is_err() {
                return unavailable(tag);
            }
            let hlc = self.services.mail.hlc_now();
            let changes: Vec<(Listed, MarkChange)> = listed
                .iter()
                .map(|l| {
                    let change = MarkChange {
                        id: l.meta.id,
                        folder: Some((dest.id.clone(), hlc)),
                        flags: vec![],
                    };
                    (l.clone(), change)
                })
                .collect();
            if self.services.mail.mark(&user, &changes).await.is_err() {
                return unavailable(tag);
            }
            let _ = self
                .services
                .uids
                .forget(&sequence_name(&user, &source.id), ids.clone())
                .await;
            self.services
                .metrics
                .imap_moves
                .fetch_add(ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
            ids
        } else {
            let mut made: Vec<Listed> = Vec::new();
            let mut failed = false;
            for l in &listed {
                let Ok(body) = self.services.mail.read(l).await else {
                    failed = true;
                    break;
                };
                let arrival = l.meta.arrival_ms;
                let id = self.services.mail.new_message_id(arrival);
                let out = self
                    .services
                    .mail
                    .deliver_as(id, std::slice::from_ref(&user), &dest.id, arrival, body)
                    .await;
                if !out.stored.first().copied().unwrap_or(false) {
                    failed = true;
                    break;
                }
                let mut copy = fresh_listed(id, &dest.id, arrival, out.copies.first().cloned().unwrap_or_default());
                copy.meta.marks = l.meta.marks.clone();
                made.push(copy);
            }
            if failed {
                // All or nothing (RFC 3501 6.4.7): the copies made go again.
                let _ = self.services.mail.delete(&user, &made).await;
                return unavailable(tag);
            }
            let hlc = self.services.mail.hlc_now();
            let changes: Vec<(Listed, MarkChange)> = made
                .iter()
                .filter(|c| c.meta.marks.set_flags().next().is_some())
                .map(|c| {
                    let flags = c
                        .meta
                        .marks
                        .set_flags()
                        .map(|name| FlagMark {
                            name: name.to_owned(),
                            set: true,
                            hlc,
                        })
                        .collect();
                    let change = MarkChange {
                        id: c.meta.id,
                        folder: None,
                        flags,
                    };
                    (c.clone(), change)
                })
                .collect();
            if !changes.is_empty() && self.services.mail.mark(&user, &changes).await.is_err() {
                debug!(user, "imap copy: flags of the copies not recorded everywhere");
            }
            let ids: Vec<[u8; 16]> = made.iter().map(|c| c.meta.id.0).collect();
            let _ = self.services.uids.assign(&dest_seq, ids.clone()).await;
            self.services
                .metrics
                .imap_copies
                .fetch_add(ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
            ids
        };
        // COPYUID (RFC 4315): source UIDs and their UIDs in the destination.
        let code = self.services.uids.numbers(&dest_seq, &new_ids).and_then(|n| {
            let pairs: Vec<(u32, u32)> = src_uids
                .iter()
                .zip(&n.uids)
                .filter_map(|(s, d)| d.map(|d| (*s, d)))
                .collect();
            (pairs.len() == src_uids.len()).then(|| {
                let single = |u: u32| imap_next::imap_types::extensions::uidplus::UidElement::Single(nz(u));
                Code::CopyUid {
                    uid_validity: nz(n.validity),
                    source: imap_next::imap_types::extensions::uidplus::UidSet(Vec1::unvalidated(
                        pairs.iter().map(|(s, _)| single(*s)).collect(),
                    )),
                    destination: imap_next::imap_types::extensions::uidplus::UidSet(Vec1::unvalidated(
                        pairs.iter().map(|(_, d)| single(*d)).collect(),
                    )),
                }
            })
        });
        if !is_move {
            return ok(tag, code, "COPY completed");
        }
        // MOVE (RFC 6851): COPYUID untagged, then the expunges.
        if let Some(code) = code {
            self.untagged_ok(code, "moved");
        }
        let Phase::Selected(sel) = &mut self.phase else {
            unreachable!()
        };
        for i in targets.into_iter().rev() {
            sel.msgs.remove(i);
            self.server.enqueue_data(Data::Expunge(nz(i as u32 + 1)));
        }
        ok(tag, None, "MOVE completed")
    }

    /// Deletes the folder's `\Deleted` messages (in `only`, if given) on
    /// every replica, then tells the client (when `tell`).
    async fn expunge(&mut self, only: Option<SequenceSet>, tell: bool) -> Result<(), &'static str> {
        let Phase::Selected(sel) = &mut self.phase else {
            return Ok(());
        };
        if sel.read_only {
            return Ok(());
        }
        let largest = largest(sel, true);
        let victims: Vec<usize> = sel
            .msgs
            .iter()
            .enumerate()
            .filter(|(_, m)| m.has("\\Deleted") && only.as_ref().is_none_or(|s| set_contains(s, m.uid, largest)))
            .map(|(i, _)| i)
            .collect();
        if victims.is_empty() {
            return Ok(());
        }
        let listed: Vec<Listed> = victims.iter().map(|i| sel.msgs[*i].listed.clone()).collect();
        let user = sel.user.clone();
        let seq = sequence_name(&user, &sel.folder.id);
        if self.services.mail.delete(&user, &listed).await.is_err() {
            return Err("the messages could not be deleted now, try again");
        }
        let ids: Vec<[u8; 16]> = listed.iter().map(|l| l.meta.id.0).collect();
        let _ = self.services.uids.forget(&seq, ids).await;
        let Phase::Selected(sel) = &mut self.phase else {
            return Ok(());
        };
        for i in victims.into_iter().rev() {
            sel.msgs.remove(i);
            if tell {
                self.server.enqueue_data(Data::Expunge(nz(i as u32 + 1)));
            }
        }
        Ok(())
    }

    async fn fetch(
        &mut self,
        tag: Tag<'static>,
        set: SequenceSet,
        names: MacroOrMessageDataItemNames<'static>,
        uid: bool,
    ) -> Status<'static> {
        let mut names = match names {
            MacroOrMessageDataItemNames::Macro(m) => m.expand().into_iter().map(|n| n.into_static()).collect(),
            MacroOrMessageDataItemNames::MessageDataItemNames(n) => n,
        };
        if uid && !names.contains(&MessageDataItemName::Uid) {
            names.insert(0, MessageDataItemName::Uid);
        }
        for n in &names {
            if matches!(
                n,
                MessageDataItemName::Binary { .. } | MessageDataItemName::BinarySize { .. }
            ) {
                return cannot(tag, "BINARY is not served yet");
            }
        }
        let needs_body = names.iter().any(|n| {
            matches!(
                n,
                MessageDataItemName::BodyExt { .. }
                    | MessageDataItemName::Body
                    | MessageDataItemName::BodyStructure
                    | MessageDataItemName::Envelope
                    | MessageDataItemName::Rfc822
                    | MessageDataItemName::Rfc822Header
                    | MessageDataItemName::Rfc822Text
            )
        });
        let Phase::Selected(sel) = &self.phase else {
            unreachable!()
        };
        let largest = largest(sel, uid);
        let targets: Vec<usize> = (0..sel.msgs.len())
            .filter(|i| {
                let key = if uid { sel.msgs[*i].uid } else { *i as u32 + 1 };
                set_contains(&set, key, largest)
            })
            .collect();
        if !uid && targets.is_empty() && !sel.msgs.is_empty() {
            return bad(Some(tag), "no such message");
        }
        // Fetching a body (not its PEEK) sets \Seen (RFC 3501 6.4.5),
        // stored like a STORE, and the FLAGS go with the answer.
        let sets_seen = !sel.read_only
            && names.iter().any(|n| {
                matches!(
                    n,
                    MessageDataItemName::BodyExt { peek: false, .. }
                        | MessageDataItemName::Rfc822
                        | MessageDataItemName::Rfc822Text
                )
            });
        let mut now_seen: std::collections::HashSet<usize> = std::collections::HashSet::new();
        if sets_seen {
            let hlc = self.services.mail.hlc_now();
            let changes: Vec<(usize, Listed, MarkChange)> = targets
                .iter()
                .filter(|i| !sel.msgs[**i].has("\\Seen"))
                .map(|i| {
                    let l = &sel.msgs[*i].listed;
                    let change = MarkChange {
                        id: l.meta.id,
                        folder: None,
                        flags: vec![FlagMark {
                            name: "\\Seen".to_owned(),
                            set: true,
                            hlc,
                        }],
                    };
                    (*i, l.clone(), change)
                })
                .collect();
            if !changes.is_empty() {
                let user = sel.user.clone();
                let send: Vec<(Listed, MarkChange)> = changes.iter().map(|(_, l, c)| (l.clone(), c.clone())).collect();
                if self.services.mail.mark(&user, &send).await.is_err() {
                    debug!(user, "imap fetch: \\Seen not stored everywhere");
                }
                let Phase::Selected(sel) = &mut self.phase else {
                    unreachable!()
                };
                for (i, _, change) in changes {
                    sel.msgs[i].listed.meta.apply_marks(&change);
                    now_seen.insert(i);
                }
            }
        }
        for i in targets {
            let Phase::Selected(sel) = &self.phase else {
                unreachable!()
            };
            let m = &sel.msgs[i];
            let body = if needs_body {
                match self.services.mail.read(&m.listed).await {
                    Ok(b) => Some(b),
                    Err(e) => {
                        debug!(error = %e, "imap fetch: message unreadable now");
                        return no(
                            tag,
                            Some(Code::Other(code_other("UNAVAILABLE"))),
                            "a message cannot be read now, try again",
                        );
                    }
                }
            } else {
                None
            };
            let Phase::Selected(sel) = &self.phase else {
                unreachable!()
            };
            let m = &sel.msgs[i];
            let mut items = Vec::with_capacity(names.len());
            for n in &names {
                items.push(match n {
                    MessageDataItemName::Uid => MessageDataItem::Uid(nz(m.uid)),
                    MessageDataItemName::Flags => MessageDataItem::Flags(flags_of(m)),
                    MessageDataItemName::Rfc822Size => MessageDataItem::Rfc822Size(m.listed.meta.size_bytes as u32),
                    MessageDataItemName::InternalDate => {
                        MessageDataItem::InternalDate(internal_date(m.listed.meta.arrival_ms))
                    }
                    MessageDataItemName::Rfc822 => MessageDataItem::Rfc822(nstring(body.clone().unwrap_or_default())),
                    MessageDataItemName::Envelope => {
                        MessageDataItem::Envelope(crate::imap_mime::envelope(body.as_deref().unwrap_or_default()))
                    }
                    MessageDataItemName::BodyStructure => MessageDataItem::BodyStructure(
                        crate::imap_mime::body_structure(body.as_deref().unwrap_or_default(), true),
                    ),
                    MessageDataItemName::Body => MessageDataItem::Body(crate::imap_mime::body_structure(
                        body.as_deref().unwrap_or_default(),
                        false,
                    )),
                    MessageDataItemName::Rfc822Header => {
                        let b = body.as_deref().unwrap_or_default();
                        MessageDataItem::Rfc822Header(nstring(b[..header_end(b)].to_vec()))
                    }
                    MessageDataItemName::Rfc822Text => {
                        let b = body.as_deref().unwrap_or_default();
                        MessageDataItem::Rfc822Text(nstring(b[header_end(b)..].to_vec()))
                    }
                    MessageDataItemName::BodyExt { section, partial, .. } => {
                        let b = body.as_deref().unwrap_or_default();
                        // A part that does not exist is empty (as Dovecot answers).
                        let bytes = section_bytes(b, section.as_ref()).unwrap_or_default();
                        let (origin, bytes) = match *partial {
                            Some((start, len)) => {
                                let s = (start as usize).min(bytes.len());
                                let e = s.saturating_add(len.get() as usize).min(bytes.len());
                                (Some(start), bytes[s..e].to_vec())
                            }
                            None => (None, bytes),
                        };
                        MessageDataItem::BodyExt {
                            section: section.clone(),
                            origin,
                            data: nstring(bytes),
                        }
                    }
                    _ => unreachable!("refused above"),
                });
            }
            if now_seen.contains(&i) && !names.contains(&MessageDataItemName::Flags) {
                items.push(MessageDataItem::Flags(flags_of(m)));
            }
            self.server.enqueue_data(Data::Fetch {
                seq: nz(i as u32 + 1),
                items: Vec1::unvalidated(items),
            });
        }
        ok(tag, None, "FETCH completed")
    }
}

/// One LIST or LSUB answer.
fn list_data(
    lsub: bool,
    items: Vec<FlagNameAttribute<'static>>,
    delimiter: Option<QuotedChar>,
    mailbox: Mailbox<'static>,
) -> Data<'static> {
    if lsub {
        Data::Lsub {
            items,
            delimiter,
            mailbox,
        }
    } else {
        Data::List {
            items,
            delimiter,
            mailbox,
        }
    }
}

/// A message just stored, as a listing would show it (enough to send
/// changes to its copies).
fn fresh_listed(id: replication::MessageId, folder: &str, arrival_ms: u64, replicas: Vec<u64>) -> Listed {
    Listed {
        meta: replication::EntryMeta {
            id,
            body: replication::BodyHash([0; 32]),
            size_bytes: 0,
            arrival_ms,
            folder: folder.to_owned(),
            flags: 0,
            replicas,
            placed: 0,
            prior: Vec::new(),
            marks: Default::default(),
        },
        holders: Vec::new(),
    }
}

fn nonexistent(tag: Tag<'static>) -> Status<'static> {
    no(tag, Some(Code::Other(code_other("NONEXISTENT"))), "no such folder")
}

fn mailbox_as_bytes<'a>(m: &'a Mailbox<'_>) -> &'a [u8] {
    match m {
        Mailbox::Inbox => b"INBOX",
        Mailbox::Other(o) => o.as_ref(),
    }
}

/// The first bytes of a discarded command, if they look like a tag.
fn parse_tag(discarded: &[u8]) -> Option<Tag<'static>> {
    let end = discarded.iter().position(|b| *b == b' ')?;
    Tag::try_from(String::from_utf8(discarded[..end].to_vec()).ok()?).ok()
}

/// IMAP LIST matching: `*` matches anything, `%` anything but `/`;
/// INBOX case-insensitively. Dynamic programming over (pattern, name)
/// positions: a pattern of many wildcards cannot make it backtrack
/// exponentially.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    if p.len() > 1024 {
        return false;
    }
    // ok[j]: the pattern so far matches name[..j].
    let mut ok = vec![false; n.len() + 1];
    ok[0] = true;
    for &c in p {
        let mut next = vec![false; n.len() + 1];
        match c {
            b'*' | b'%' => {
                for j in 0..=n.len() {
                    // Either the wildcard ends here, or it goes on over n[j-1].
                    next[j] = ok[j] || (j > 0 && next[j - 1] && (c == b'*' || n[j - 1] != b'/'));
                }
            }
            _ => {
                for j in 1..=n.len() {
                    next[j] = ok[j - 1] && n[j - 1].eq_ignore_ascii_case(&c);
                }
            }
        }
        ok = next;
    }
    ok[n.len()]
}

fn largest(sel: &Selected, uid: bool) -> u32 {
    if uid {
        sel.msgs.last().map_or(0, |m| m.uid)
    } else {
        sel.msgs.len() as u32
    }
}

/// Whether `n` is in the set, `*` being `largest` (RFC 3501 9: `n:*`
/// includes the largest even when n is above it). Walks the set, never the
/// numbers it spans.
pub fn set_contains(set: &SequenceSet, n: u32, largest: u32) -> bool {
    let v = |s: &SeqOrUid| match s {
        SeqOrUid::Value(x) => x.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|s| match s {
        Sequence::Single(a) => v(a) == n,
        Sequence::Range(a, b) => {
            let (lo, hi) = (v(a).min(v(b)), v(a).max(v(b)));
            lo <= n && n <= hi
        }
    })
}

fn flags_of(m: &Msg) -> Vec<FlagFetch<'static>> {
    m.listed
        .meta
        .marks
        .set_flags()
        .filter_map(flag_of_name)
        .map(FlagFetch::Flag)
        .collect()
}

/// A stored flag name as IMAP shows it.
fn flag_of_name(name: &str) -> Option<Flag<'static>> {
    match name.strip_prefix('\\') {
        Some(system) => imap_next::imap_types::core::Atom::try_from(system.to_owned())
            .ok()
            .map(Flag::system),
        None => imap_next::imap_types::core::Atom::try_from(name.to_owned())
            .ok()
            .map(Flag::Keyword),
    }
}

/// How a flag is stored: `\Seen`-style for system flags (their canonical
/// case), the keyword as given otherwise.
fn name_of_flag(flag: &Flag<'_>) -> String {
    flag.to_string()
}

/// The FLAGS and PERMANENTFLAGS of a folder: the system flags and the
/// keywords its messages carry.
fn folder_flags(msgs: &[Msg]) -> Vec<Flag<'static>> {
    let mut out = vec![Flag::Answered, Flag::Flagged, Flag::Deleted, Flag::Seen, Flag::Draft];
    let mut keywords: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for m in msgs {
        keywords.extend(m.listed.meta.marks.set_flags().filter(|f| !f.starts_with('\\')));
    }
    out.extend(keywords.into_iter().take(256).filter_map(flag_of_name));
    out
}

fn internal_date(arrival_ms: u64) -> DateTime {
    let t = chrono::DateTime::from_timestamp((arrival_ms / 1000) as i64, 0).unwrap_or_default();
    DateTime::unvalidated(t.fixed_offset())
}

/// Where the header ends: after the first empty line (the whole message
/// if there is none).
pub(crate) fn header_end(b: &[u8]) -> usize {
    if b.starts_with(b"\r\n") {
        return 2;
    }
    b.windows(4).position(|w| w == b"\r\n\r\n").map_or(b.len(), |p| p + 4)
}

/// The header's fields: (name, the whole field with its CRLFs).
fn header_fields(header: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out: Vec<(&[u8], &[u8])> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < header.len() {
        let end = header[i..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(header.len(), |p| i + p + 2);
        let line = &header[i..end];
        let continuation = line.first().is_some_and(|c| *c == b' ' || *c == b'\t');
        if !continuation && i > start {
            push_field(&mut out, &header[start..i]);
            start = i;
        }
        i = end;
    }
    if start < header.len() {
        push_field(&mut out, &header[start..]);
    }
    out
}

fn push_field<'a>(out: &mut Vec<(&'a [u8], &'a [u8])>, field: &'a [u8]) {
    if let Some(colon) = field.iter().position(|c| *c == b':') {
        out.push((&field[..colon], field));
    }
}

/// A section's bytes: `[]`, `HEADER`, `HEADER.FIELDS (..)`,
/// `HEADER.FIELDS.NOT (..)`, `TEXT`, `1` of a single-part message, and the
/// MIME parts (`1.2`, `2.MIME`, `3.HEADER`, ..., from mail-parser's tree).
/// `None`: no such part.
fn section_bytes(b: &[u8], section: Option<&Section<'_>>) -> Option<Vec<u8>> {
    let end = header_end(b);
    let (header, rest) = b.split_at(end);
    let pick = |names: &Vec1<AString<'_>>, keep: bool| {
        let wanted: Vec<&[u8]> = names.as_ref().iter().map(|n| n.as_ref()).collect();
        let mut out: Vec<u8> = header_fields(header)
            .into_iter()
            .filter(|(name, _)| wanted.iter().any(|w| w.eq_ignore_ascii_case(name.trim_ascii())) == keep)
            .flat_map(|(_, f)| f.iter().copied())
            .collect();
        out.extend_from_slice(b"\r\n");
        out
    };
    Some(match section {
        None => b.to_vec(),
        Some(Section::Header(None)) => header.to_vec(),
        Some(Section::HeaderFields(None, names)) => pick(names, true),
        Some(Section::HeaderFieldsNot(None, names)) => pick(names, false),
        Some(Section::Text(None)) => rest.to_vec(),
        Some(Section::Part(p)) if p.0.as_ref() == [NonZeroU32::MIN] && !is_multipart(header) => rest.to_vec(),
        Some(s) => return crate::imap_mime::part_section(b, s),
    })
}

fn is_multipart(header: &[u8]) -> bool {
    header_fields(header).iter().any(|(name, f)| {
        name.trim_ascii().eq_ignore_ascii_case(b"content-type")
            && String::from_utf8_lossy(f).to_ascii_lowercase().contains("multipart/")
    })
}

struct Ctx<'m> {
    seq: u32,
    seq_largest: u32,
    uid_largest: u32,
    msg: &'m Msg,
    body: Option<Vec<u8>>,
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// Evaluates a search key on one message (reading its body only for keys
/// that need it, within the search's byte budget).
fn matches<'a>(
    key: &'a SearchKey<'static>,
    c: &'a mut Ctx<'_>,
    services: &'a Services,
    budget: &'a mut u64,
) -> replication::replica::BoxFuture<'a, Result<bool, &'static str>> {
    Box::pin(async move {
        let day = |d: &imap_next::imap_types::datetime::NaiveDate| {
            d.as_ref()
                .and_hms_opt(0, 0, 0)
                .map_or(0, |t| t.and_utc().timestamp_millis() as u64)
        };
        let arrival = c.msg.listed.meta.arrival_ms;
        Ok(match key {
            SearchKey::And(keys) => {
                for k in keys.as_ref() {
                    if !matches(k, c, services, budget).await? {
                        return Ok(false);
                    }
                }
                true
            }
            SearchKey::Or(a, b) => matches(a, c, services, budget).await? || matches(b, c, services, budget).await?,
            SearchKey::Not(k) => !matches(k, c, services, budget).await?,
            SearchKey::All => true,
            SearchKey::SequenceSet(s) => set_contains(s, c.seq, c.seq_largest),
            SearchKey::Uid(s) => set_contains(s, c.msg.uid, c.uid_largest),
            SearchKey::Larger(n) => c.msg.listed.meta.size_bytes > u64::from(*n),
            SearchKey::Smaller(n) => c.msg.listed.meta.size_bytes < u64::from(*n),
            SearchKey::Before(d) => arrival < day(d),
            SearchKey::Since(d) => arrival >= day(d),
            SearchKey::On(d) => arrival >= day(d) && arrival < day(d) + 86_400_000,
            SearchKey::Deleted => c.msg.has("\\Deleted"),
            SearchKey::Undeleted => !c.msg.has("\\Deleted"),
            SearchKey::Answered => c.msg.has("\\Answered"),
            SearchKey::Unanswered => !c.msg.has("\\Answered"),
            SearchKey::Flagged => c.msg.has("\\Flagged"),
            SearchKey::Unflagged => !c.msg.has("\\Flagged"),
            SearchKey::Draft => c.msg.has("\\Draft"),
            SearchKey::Undraft => !c.msg.has("\\Draft"),
            SearchKey::Seen => c.msg.has("\\Seen"),
            SearchKey::Unseen => !c.msg.has("\\Seen"),
            SearchKey::Keyword(k) => c.msg.has(k.as_ref()),
            SearchKey::Unkeyword(k) => !c.msg.has(k.as_ref()),
            // No session is told of a message as recent (\Recent is
            // per session, and no node owns a folder's sessions).
            SearchKey::Recent | SearchKey::New => false,
            SearchKey::Old => true,
            SearchKey::Header(..)
            | SearchKey::Subject(_)
            | SearchKey::From(_)
            | SearchKey::To(_)
            | SearchKey::Cc(_)
            | SearchKey::Bcc(_)
            | SearchKey::Body(_)
            | SearchKey::Text(_) => {
                if c.body.is_none() {
                    let size = c.msg.listed.meta.size_bytes;
                    if size > *budget {
                        return Err("the search reads too many bytes: narrow it down");
                    }
                    *budget -= size;
                    c.body = Some(
                        services
                            .mail
                            .read(&c.msg.listed)
                            .await
                            .map_err(|_| "a message cannot be read now")?,
                    );
                }
                let b = c.body.as_deref().unwrap_or_default();
                let (header, text) = b.split_at(header_end(b));
                let field = |name: &[u8], value: &[u8]| {
                    header_fields(header).iter().any(|(n, f)| {
                        n.trim_ascii().eq_ignore_ascii_case(name) && contains_ci(&f[n.len() + 1..], value)
                    })
                };
                match key {
                    SearchKey::Header(name, value) => field(name.as_ref(), value.as_ref()),
                    SearchKey::Subject(v) => field(b"subject", v.as_ref()),
                    SearchKey::From(v) => field(b"from", v.as_ref()),
                    SearchKey::To(v) => field(b"to", v.as_ref()),
                    SearchKey::Cc(v) => field(b"cc", v.as_ref()),
                    SearchKey::Bcc(v) => field(b"bcc", v.as_ref()),
                    SearchKey::Body(v) => contains_ci(text, v.as_ref()),
                    SearchKey::Text(v) => contains_ci(b, v.as_ref()),
                    _ => unreachable!(),
                }
            }
            _ => return Err("that search key is not supported yet"),
        })
    })
}

/// Base64 of a SASL PLAIN response (tests and clients).
pub fn plain_response(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// For the fuzz target: every kind of section of `message`, each of which
/// must be a slice of it (or the header fields' copy, bounded by it).
#[doc(hidden)]
pub fn fuzz_sections(message: &[u8]) {
    use imap_next::imap_types::fetch::Part;
    let n = |k: u32| NonZeroU32::new(k).expect("nonzero");
    let names = Vec1::unvalidated(vec![AString::try_from("Subject").expect("valid")]);
    let part = |p: &[u32]| Part(Vec1::unvalidated(p.iter().map(|k| n(*k)).collect()));
    let sections = [
        None,
        Some(Section::Header(None)),
        Some(Section::Text(None)),
        Some(Section::HeaderFields(None, names.clone())),
        Some(Section::HeaderFieldsNot(None, names)),
        Some(Section::Part(part(&[1]))),
        Some(Section::Part(part(&[2, 1]))),
        Some(Section::Mime(part(&[1]))),
        Some(Section::Header(Some(part(&[1])))),
        Some(Section::Text(Some(part(&[2])))),
    ];
    for s in &sections {
        if let Some(b) = section_bytes(message, s.as_ref()) {
            assert!(b.len() <= message.len() + 2, "a section larger than its message");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> SequenceSet {
        SequenceSet::try_from(s).unwrap()
    }

    #[test]
    fn sets_match_without_walking_their_span() {
        assert!(set_contains(&set("1:*"), 7, 7));
        assert!(set_contains(&set("4294967295"), 4_294_967_295, 3));
        assert!(!set_contains(&set("2,4:6"), 3, 10));
        assert!(set_contains(&set("6:4"), 5, 10));
        // n:* with n above the largest still names the largest.
        assert!(set_contains(&set("9:*"), 5, 5));
        assert!(!set_contains(&set("9:*"), 4, 5));
    }

    #[test]
    fn list_patterns() {
        assert!(wildcard_match("*", "INBOX"));
        assert!(wildcard_match("%", "INBOX"));
        assert!(wildcard_match("inbox", "INBOX"));
        assert!(wildcard_match("IN*", "INBOX"));
        assert!(!wildcard_match("Sent", "INBOX"));
        assert!(!wildcard_match("INBOX/%", "INBOX"));
        assert!(wildcard_match("I%X", "INBOX"));
        assert!(!wildcard_match("%", "a/b"));
        assert!(wildcard_match("*", "a/b"));
        assert!(wildcard_match("", ""));
        // Many wildcards: linear, not exponential.
        let many = "*".repeat(1000) + "Z";
        assert!(!wildcard_match(&many, "INBOX"));
        assert!(wildcard_match(&"%".repeat(1000), "INBOX"));
    }

    #[test]
    fn sections_of_a_message() {
        let m = b"Subject: hi\r\nFrom: a@b\r\n x\r\nTo: c@d\r\n\r\nbody\r\n";
        assert_eq!(section_bytes(m, None).unwrap(), m.to_vec());
        assert_eq!(section_bytes(m, Some(&Section::Text(None))).unwrap(), b"body\r\n");
        assert_eq!(
            section_bytes(m, Some(&Section::Header(None))).unwrap(),
            b"Subject: hi\r\nFrom: a@b\r\n x\r\nTo: c@d\r\n\r\n"
        );
        let names = Vec1::unvalidated(vec![AString::try_from("FROM").unwrap()]);
        assert_eq!(
            section_bytes(m, Some(&Section::HeaderFields(None, names.clone()))).unwrap(),
            b"From: a@b\r\n x\r\n\r\n"
        );
        assert_eq!(
            section_bytes(m, Some(&Section::HeaderFieldsNot(None, names))).unwrap(),
            b"Subject: hi\r\nTo: c@d\r\n\r\n"
        );
        assert_eq!(header_end(b"no header end"), 13);
    }

    #[test]
    fn tags_of_bad_commands() {
        assert_eq!(
            parse_tag(b"a1 FOO\r\n").map(|t| t.inner().to_owned()),
            Some("a1".to_owned())
        );
        assert!(parse_tag(b"\r\n").is_none());
    }
}
