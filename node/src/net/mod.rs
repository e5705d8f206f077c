//! The connection layer: client listeners, connection slots, the one TLS
//! accept, streams and the line-session scaffold. Below the protocols: it
//! may use `tls` (certificates) and `metrics` (its counters), never a
//! protocol, the services, the store or the cluster. A protocol gets a
//! [`Client`] (a stream that holds a slot, under TLS where the port wants
//! it) and an [`Env`] (the bounds and TLS of its session).

pub mod conn;
pub mod session;
pub mod slots;
pub mod stream;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::metrics::Counters;
use crate::tls::Tls;
use slots::{Slots, Tracked};
use stream::{Stream, accept_tls};

/// A TLS handshake must finish within this (or the session idle timeout,
/// if shorter: a client silent that long is gone either way).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The first wait after a failed accept (out of file descriptors and the
/// like), doubling up to [`ACCEPT_BACKOFF_MAX`] while accepts keep failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where passwords may be sent without TLS (`--plaintext-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PlaintextAuth {
    /// Only from loopback clients (Dovecot's default).
    #[default]
    Loopback,
    /// Never: TLS first.
    Never,
    /// From anywhere (only behind a network you trust).
    Always,
}

impl PlaintextAuth {
    /// Whether a password may be sent on a session that is (or is not)
    /// encrypted, from `peer`.
    pub fn allows(self, encrypted: bool, peer: IpAddr) -> bool {
        encrypted
            || match self {
                PlaintextAuth::Always => true,
                PlaintextAuth::Loopback => peer.is_loopback(),
                PlaintextAuth::Never => false,
            }
    }
}

/// What a client session needs of the node to run its connection: the
/// bounds, TLS, where passwords may be sent, and the counters.
#[derive(Clone)]
pub struct Env {
    /// Silence allowed; also the longest a command line may take to
    /// arrive, and a write may stall.
    pub idle_timeout: Duration,
    pub commands_max: u32,
    pub bad_commands_max: u32,
    /// Client TLS; `None`: no STARTTLS offered (tests only: a node always
    /// has a certificate, its own self-signed one at least).
    pub tls: Option<Tls>,
    pub plaintext_auth: PlaintextAuth,
    pub counters: Counters,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("idle_timeout", &self.idle_timeout).finish()
    }
}

impl Env {
    /// The deadline of one TLS handshake.
    pub fn handshake_deadline(&self) -> Duration {
        HANDSHAKE_TIMEOUT.min(self.idle_timeout)
    }
}

/// The client protocols a node listens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Smtp,
    Submission,
    Lmtp,
    Pop3,
    Smtps,
    Pop3s,
    Imap,
    Imaps,
    ManageSieve,
}

impl Proto {
    /// As the session list shows it.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Smtp => "smtp",
            Proto::Submission => "submission",
            Proto::Lmtp => "lmtp",
            Proto::Pop3 => "pop3",
            Proto::Smtps => "smtps",
            Proto::Pop3s => "pop3s",
            Proto::Imap => "imap",
            Proto::Imaps => "imaps",
            Proto::ManageSieve => "managesieve",
        }
    }

    pub fn implicit_tls(self) -> bool {
        matches!(self, Proto::Smtps | Proto::Pop3s | Proto::Imaps)
    }

    /// What a connection over the limit is told before it is closed.
    fn too_many(self) -> &'static [u8] {
        match self {
            Proto::Smtp | Proto::Submission | Proto::Lmtp => b"421 4.7.0 Too many connections, try again later\r\n",
            Proto::Pop3 => b"-ERR [SYS/TEMP] too many connections, try again later\r\n",
            Proto::Imap => b"* BYE [UNAVAILABLE] too many connections, try again later\r\n",
            Proto::ManageSieve => b"BYE (TRYLATER) \"too many connections, try again later\"\r\n",
            // A TLS client cannot read plaintext: just close.
            Proto::Smtps | Proto::Pop3s | Proto::Imaps => b"",
        }
    }
}

/// One bound client listener.
#[derive(Debug)]
pub struct Listener {
    pub proto: Proto,
    pub addr: SocketAddr,
    listener: TcpListener,
}

/// Binds every listener of the table (an address in use fails the start,
/// naming it).
pub async fn bind(table: &[(Proto, SocketAddr)]) -> anyhow::Result<Vec<Listener>> {
    let mut out = Vec::with_capacity(table.len());
    for &(proto, addr) in table {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({proto:?})"))?;
        let addr = listener.local_addr()?;
        info!(%addr, ?proto, "listening");
        out.push(Listener { proto, addr, listener });
    }
    Ok(out)
}

/// Accepts connections until `stop`, each served by the future `serve`
/// makes of it (`None`: dropped at once) in a task of its own; returns
/// the tasks still running, for the caller to wait on. An accept that
/// fails (out of file descriptors) is retried after a wait that doubles
/// while failures go on.
pub async fn accept_loop<S, F>(
    listener: &TcpListener,
    what: &'static str,
    mut stop: watch::Receiver<bool>,
    mut serve: S,
) -> JoinSet<()>
where
    S: FnMut(TcpStream, SocketAddr) -> Option<F>,
    F: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    x
                }
                Err(e) => {
                    warn!(error = %e, listener = what, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            _ = stop.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        if let Some(f) = serve(stream, peer) {
            tasks.spawn(f);
        }
    }
    tasks
}

/// A client connection as a protocol gets it: it holds its slot, is under
/// TLS on an implicit-TLS port, and `stop` says when it must end (the
/// slot was taken for a newcomer, or the node stops).
pub struct Client {
    pub stream: Stream<Tracked<TcpStream>>,
    pub peer: SocketAddr,
    pub stop: watch::Receiver<bool>,
}

/// Serves a client listener until `stop`: a slot for each connection
/// (else a refusal in the protocol's words), the TLS handshake on an
/// implicit-TLS port, then `serve`. At the end every session is told to
/// close, and waited for.
pub async fn serve_clients<S, F>(l: Listener, env: Env, slots: Arc<Slots>, stop: watch::Receiver<bool>, serve: S)
where
    S: Fn(Proto, Client) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let proto = l.proto;
    let mut tasks = accept_loop(&l.listener, "client", stop, |stream, peer| {
        let _ = stream.set_nodelay(true);
        let slot = match slots.acquire_session(proto.name(), peer, std::time::Instant::now()) {
            Ok(slot) => slot,
            Err(why) => {
                env.counters.connections_refused.inc();
                tracing::debug!(%peer, ?why, "connection refused: no slot");
                return Some(Box::pin(refuse(stream, proto)) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>);
            }
        };
        let stream = Tracked::new(stream, &slots, &slot);
        let (env, serve) = (env.clone(), serve.clone());
        let info = slot.info.clone();
        Some(Box::pin(slots::scope(info, async move {
            let stop = slot.close.clone();
            let _held = slot;
            let stream = if proto.implicit_tls() {
                // The handshake first, within its deadline, holding the slot.
                let Some(tls) = &env.tls else { return };
                match accept_tls(tls, stream, env.handshake_deadline(), &env.counters).await {
                    Some(t) => Stream::Tls(Box::new(t)),
                    None => return,
                }
            } else {
                Stream::Plain(stream)
            };
            serve(proto, Client { stream, peer, stop }).await
        })))
    })
    .await;
    // The node stops: every session of every listener is told.
    slots.close_all();
    while tasks.join_next().await.is_some() {}
}

/// Tells a client it is one connection too many, then closes.
async fn refuse(mut stream: TcpStream, proto: Proto) {
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(proto.too_many())).await;
    let _ = stream.shutdown().await;
}
