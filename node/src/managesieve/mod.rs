//! ManageSieve sessions (RFC 5804, `--managesieve`, port 4190): users
//! upload, check, list, fetch, rename, delete and activate their Sieve
//! scripts (kept in the Raft state, so every node has them at once), as
//! Roundcube, Thunderbird's sieve add-on and `sieve-connect` do it.
//! STARTTLS, and AUTHENTICATE PLAIN where `--plaintext-auth` lets a
//! password be sent, with the same login throttles as every protocol.
//! The grammar is the protocol cores' (`quill_proto::managesieve`); a
//! script is checked by `quill_proto::sieve::compile` before it is stored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use membership::{CommandError, RouteError, RoutesCommand, RoutesWriteError};
use quill_proto::managesieve::{self as ms, LINE_BYTES_MAX, Word, capability, no, string};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;
use tracing::{Instrument, debug, info};

use crate::net::conn::{Line, trim_eol};
use crate::net::session::{Dialect, LineSession, Upgrade};
use crate::net::stream::Stream;
use crate::services::{Auth, Services};

static DIALECT: Dialect = Dialect {
    line_bytes_max: LINE_BYTES_MAX,
    line_too_long: "NO \"line too long\"",
    too_many_errors: "BYE \"too many errors\"",
    too_many_commands: "BYE \"too many commands in one session\"",
    idle: "BYE (TRYLATER) \"idle timeout\"",
    shutting_down: "BYE (TRYLATER) \"server shutting down\"",
};

/// Failed logins in one session before it ends.
const SESSION_AUTH_FAILURES_MAX: u32 = 3;

struct Session<S> {
    io: LineSession<S>,
    services: Arc<Services>,
    peer: SocketAddr,
    /// The logged-in user's address.
    user: Option<String>,
    auth_failures: u32,
}

/// Serves one connection (plaintext; STARTTLS offered when TLS is set up).
pub async fn serve_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: Stream<S>,
    peer: SocketAddr,
    services: Arc<Services>,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("session", proto = "managesieve", %peer, user = tracing::field::Empty);
    async move {
        let mut s = Session {
            io: LineSession::new(stream, services.env(), &DIALECT, 8 * 1024, 16 * 1024),
            services,
            peer,
            user: None,
            auth_failures: 0,
        };
        let result = async {
            s.capabilities().await?;
            s.run(&mut shutdown).await
        }
        .await;
        if let Err(e) = result {
            debug!(error = %e, "managesieve session ended with an i/o error");
        }
    }
    .instrument(span)
    .await
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn capabilities(&mut self) -> std::io::Result<()> {
        let sasl = self.user.is_none() && self.io.may_send_password(self.peer.ip());
        let text = capability(self.io.can_start_tls(), sasl);
        self.io.reply(&text).await
    }

    /// One command's words, its literals read in (each within the size
    /// bound and the idle time); `Err` with the reply for a bad command.
    async fn command(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> std::io::Result<Option<Result<Vec<Word>, &'static str>>> {
        let Some(first) = self.io.next_command(shutdown).await? else {
            return Ok(None);
        };
        let mut line = trim_eol(&first).to_vec();
        let mut words = Vec::new();
        loop {
            let l = match ms::words(&line) {
                Ok(l) => l,
                Err(why) => return Ok(Some(Err(why))),
            };
            words.extend(l.words);
            let Some(n) = l.literal else {
                return Ok(Some(Ok(words)));
            };
            let mut buf = vec![0u8; n];
            let idle = self.services.env.idle_timeout;
            match tokio::time::timeout(idle, self.io.r.read_exact(&mut buf)).await {
                Ok(r) => {
                    r?;
                }
                Err(_) => return Ok(None),
            }
            let Ok(text) = String::from_utf8(buf) else {
                return Ok(Some(Err("a literal is not UTF-8")));
            };
            words.push(Word::Str(text));
            if words.len() > ms::ARGS_MAX + 1 {
                return Ok(Some(Err("too many arguments")));
            }
            line = match self.io.read_line(LINE_BYTES_MAX, idle).await? {
                Line::Ok(l) => trim_eol(&l).to_vec(),
                _ => return Ok(None),
            };
        }
    }

    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<()> {
        while let Some(cmd) = self.command(shutdown).await? {
            let words = match cmd {
                Ok(w) => w,
                Err(why) => {
                    self.io.reply(&no(None, why)).await?;
                    if self.io.bad().await? {
                        break;
                    }
                    continue;
                }
            };
            let mut it = words.into_iter();
            let Some(Word::Atom(verb)) = it.next() else {
                self.io.reply(&no(None, "expected a command")).await?;
                if self.io.bad().await? {
                    break;
                }
                continue;
            };
            let args: Vec<String> = it
                .map(|w| match w {
                    Word::Str(s) | Word::Atom(s) => s,
                })
                .collect();
            if !self.dispatch(&verb, args).await? {
                break;
            }
        }
        self.io.flush().await
    }

    /// One command; false ends the session.
    async fn dispatch(&mut self, verb: &str, args: Vec<String>) -> std::io::Result<bool> {
        let arg = |i: usize| args.get(i).cloned();
        match (verb, self.user.clone()) {
            ("CAPABILITY", _) => self.capabilities().await?,
            ("LOGOUT", _) => {
                self.io.reply("OK \"Bye\"").await?;
                return Ok(false);
            }
            ("NOOP", _) => match arg(0) {
                Some(tag) => self.io.reply(&format!("OK (TAG {}) \"Done\"", string(&tag))).await?,
                None => self.io.reply("OK \"Done\"").await?,
            },
            ("STARTTLS", None) if self.io.can_start_tls() => {
                self.io.reply("OK \"Begin TLS negotiation now\"").await?;
                match self.io.start_tls().await? {
                    // RFC 5804 2.2: the capabilities again, under TLS.
                    Upgrade::Done => self.capabilities().await?,
                    Upgrade::Failed => return Ok(false),
                }
            }
            ("STARTTLS", _) => self.io.reply(&no(None, "TLS is not available here")).await?,
            ("AUTHENTICATE", Some(_)) => self.io.reply(&no(None, "already authenticated")).await?,
            ("AUTHENTICATE", None) => return self.authenticate(args).await,
            (_, None) => {
                self.io.reply(&no(None, "authenticate first")).await?;
                return Ok(!self.io.bad().await?);
            }
            ("HAVESPACE", Some(_)) => {
                let size: u64 = arg(1).and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
                if size > quill_proto::sieve::SCRIPT_BYTES_MAX as u64 {
                    let why = format!("a script is at most {} bytes", quill_proto::sieve::SCRIPT_BYTES_MAX);
                    self.io.reply(&no(Some("QUOTA/MAXSIZE"), &why)).await?;
                } else {
                    self.io.reply("OK").await?;
                }
            }
            ("CHECKSCRIPT", Some(_)) => match arg(0) {
                Some(src) => match quill_proto::sieve::compile(&src) {
                    Ok(_) => self.io.reply("OK").await?,
                    Err(e) => self.io.reply(&no(None, &e.to_string())).await?,
                },
                None => self.io.reply(&no(None, "CHECKSCRIPT takes a script")).await?,
            },
            ("PUTSCRIPT", Some(user)) => {
                let (Some(name), Some(src)) = (arg(0), arg(1)) else {
                    self.io.reply(&no(None, "PUTSCRIPT takes a name and a script")).await?;
                    return Ok(true);
                };
                if let Err(e) = quill_proto::sieve::compile(&src) {
                    self.io.reply(&no(None, &e.to_string())).await?;
                    return Ok(true);
                }
                let srs_key = crate::files::random_bytes().unwrap_or([0; 32]);
                let cmd = RoutesCommand::PutSieve {
                    user,
                    name,
                    script: Some(src),
                    activate: false,
                    srs_key,
                };
                self.write(cmd).await?;
            }
            ("LISTSCRIPTS", Some(user)) => {
                let all = self.services.directory.sieve_scripts(&user);
                let mut out = String::new();
                for name in all.scripts.keys() {
                    out.push_str(&string(name));
                    if all.active.as_ref() == Some(name) {
                        out.push_str(" ACTIVE");
                    }
                    out.push_str("\r\n");
                }
                out.push_str("OK");
                self.io.reply(&out).await?;
            }
            ("GETSCRIPT", Some(user)) => {
                let all = self.services.directory.sieve_scripts(&user);
                match arg(0).and_then(|n| all.scripts.get(&n).cloned()) {
                    Some(src) => self.io.reply(&format!("{{{}}}\r\n{src}\r\nOK", src.len())).await?,
                    None => self.io.reply(&no(Some("NONEXISTENT"), "no such script")).await?,
                }
            }
            ("SETACTIVE", Some(user)) => {
                let name = arg(0).filter(|n| !n.is_empty());
                self.write(RoutesCommand::ActivateSieve { user, name }).await?;
            }
            ("DELETESCRIPT", Some(user)) => {
                let Some(name) = arg(0) else {
                    self.io.reply(&no(None, "DELETESCRIPT takes a name")).await?;
                    return Ok(true);
                };
                let cmd = RoutesCommand::PutSieve {
                    user,
                    name,
                    script: None,
                    activate: false,
                    srs_key: [0; 32],
                };
                self.write(cmd).await?;
            }
            ("RENAMESCRIPT", Some(user)) => {
                let (Some(from), Some(to)) = (arg(0), arg(1)) else {
                    self.io.reply(&no(None, "RENAMESCRIPT takes two names")).await?;
                    return Ok(true);
                };
                self.write(RoutesCommand::RenameSieve { user, from, to }).await?;
            }
            (other, _) => {
                let why = format!("unknown command {other}");
                self.io.reply(&no(None, &why)).await?;
                return Ok(!self.io.bad().await?);
            }
        }
        Ok(true)
    }

    /// Commits a change to the user's scripts; OK or NO with the reason.
    async fn write(&mut self, cmd: RoutesCommand) -> std::io::Result<()> {
        let reply = match self.services.directory.apply_routes(cmd).await {
            Ok(()) => "OK".to_owned(),
            Err(RoutesWriteError::Refused(CommandError::Route(e))) => {
                let code = match &e {
                    RouteError::NoSuchScript(_) => Some("NONEXISTENT"),
                    RouteError::ScriptExists(_) => Some("ALREADYEXISTS"),
                    RouteError::ScriptActive => Some("ACTIVE"),
                    RouteError::ScriptLimit => Some("QUOTA"),
                    _ => None,
                };
                no(code, &e.to_string())
            }
            Err(e) => no(Some("TRYLATER"), &e.to_string()),
        };
        self.io.reply(&reply).await
    }

    /// AUTHENTICATE "PLAIN" [initial response]; false ends the session.
    async fn authenticate(&mut self, args: Vec<String>) -> std::io::Result<bool> {
        if !self.io.may_send_password(self.peer.ip()) {
            self.io.reply(&no(Some("ENCRYPT-NEEDED"), "start TLS first")).await?;
            return Ok(true);
        }
        if !args.first().is_some_and(|m| m.eq_ignore_ascii_case("PLAIN")) {
            self.io.reply(&no(None, "only PLAIN is offered")).await?;
            return Ok(true);
        }
        let response = match args.get(1) {
            Some(r) => r.clone(),
            None => {
                self.io.reply("\"\"").await?;
                self.io.flush().await?;
                let idle = self.services.env.idle_timeout.min(Duration::from_secs(60));
                let line = match self.io.read_line(LINE_BYTES_MAX, idle).await? {
                    Line::Ok(l) => trim_eol(&l).to_vec(),
                    _ => return Ok(false),
                };
                match ms::words(&line) {
                    Ok(l) if l.literal.is_none() => match l.words.first() {
                        Some(Word::Str(s)) if s == "*" => {
                            self.io.reply(&no(None, "authentication cancelled")).await?;
                            return Ok(true);
                        }
                        Some(Word::Str(s)) => s.clone(),
                        _ => String::new(),
                    },
                    _ => String::new(),
                }
            }
        };
        let (user, password) = match quill_proto::pop3::decode_plain(&response) {
            Ok(c) => c,
            Err(_) => {
                self.io.reply(&no(None, "malformed PLAIN response")).await?;
                return Ok(!self.io.bad().await?);
            }
        };
        match self.services.auth.authenticate(self.peer.ip(), &user, &password).await {
            Auth::Ok(u) => {
                tracing::Span::current().record("user", u.address.as_str());
                info!("managesieve login");
                self.user = Some(u.address);
                self.io.reply("OK \"Logged in\"").await?;
                Ok(true)
            }
            Auth::Failed => {
                self.auth_failures += 1;
                self.io.reply(&no(None, "authentication failed")).await?;
                Ok(self.auth_failures < SESSION_AUTH_FAILURES_MAX)
            }
            Auth::Blocked => {
                self.io
                    .reply(&no(Some("TRYLATER"), "too many failed logins from your address"))
                    .await?;
                Ok(false)
            }
        }
    }
}
