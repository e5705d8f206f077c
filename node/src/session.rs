//! The scaffold every line protocol session stands on (SMTP, LMTP, POP3;
//! IMAP next): bounded reads with an idle deadline and shutdown, replies
//! held back while pipelined commands are already buffered, and the count
//! of commands and bad commands that ends an abusive session. Each
//! protocol gives its own words for these events ([`Dialect`]) and keeps
//! only its own state and commands.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::watch;

use crate::conn::{Line, read_line};
use crate::services::{Services, bump};

/// What a protocol answers to the scaffold's events.
#[derive(Debug)]
pub struct Dialect {
    /// The longest command line, terminator included.
    pub line_bytes_max: usize,
    pub line_too_long: &'static str,
    pub too_many_errors: &'static str,
    pub too_many_commands: &'static str,
    pub idle: &'static str,
    pub shutting_down: &'static str,
}

/// A client connection, in the clear or under TLS (from the start on an
/// implicit-TLS port, or after STARTTLS).
pub enum Stream<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Stands in while a session swaps its stream for TLS.
    Gone,
}

/// How a STARTTLS ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// TLS is on; the session starts over.
    Done,
    /// The handshake failed or timed out: the connection is unusable.
    Failed,
}

/// One client connection: its buffered halves and its counters.
pub struct LineSession<S> {
    pub r: BufReader<ReadHalf<Stream<S>>>,
    pub w: BufWriter<Stalled<WriteHalf<Stream<S>>>>,
    pub services: Arc<Services>,
    dialect: &'static Dialect,
    n_commands: u32,
    n_bad: u32,
    bufs: (usize, usize),
    /// The TLS version and cipher suite, once TLS is on.
    tls: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LineSession<S> {
    pub fn new(
        stream: Stream<S>,
        services: Arc<Services>,
        dialect: &'static Dialect,
        read_buf: usize,
        write_buf: usize,
    ) -> Self {
        let tls = match &stream {
            Stream::Tls(t) => Some(crate::tls::describe(t.get_ref().1)),
            _ => None,
        };
        let (r, w) = halves(stream, &services, (read_buf, write_buf));
        LineSession {
            r,
            w,
            services,
            dialect,
            n_commands: 0,
            n_bad: 0,
            bufs: (read_buf, write_buf),
            tls,
        }
    }

    /// The TLS version and cipher suite, when the session is encrypted.
    pub fn tls(&self) -> Option<&str> {
        self.tls.as_deref()
    }

    /// Whether a password may be sent on this session now (see
    /// `--plaintext-auth`).
    pub fn may_send_password(&self, peer: std::net::IpAddr) -> bool {
        self.services.plaintext_auth.allows(self.tls.is_some(), peer)
    }

    /// Whether STARTTLS is offered: TLS is configured and not on yet.
    pub fn can_start_tls(&self) -> bool {
        self.tls.is_none() && self.services.tls.is_some()
    }

    /// Turns TLS on after the protocol's go-ahead reply (which this flushes).
    /// Whatever the client sent after the STARTTLS command and before the
    /// handshake is thrown away unread, never executed (the STARTTLS
    /// command-injection class of bugs, CVE-2011-0411); the caller resets
    /// its protocol state when this returns `Done`.
    pub async fn start_tls(&mut self) -> std::io::Result<Upgrade> {
        let Some(tls) = self.services.tls.clone() else {
            return Ok(Upgrade::Failed);
        };
        self.w.flush().await?;
        let injected = self.r.buffer().len();
        if injected > 0 {
            bump(&self.services.metrics.tls_injected);
            tracing::warn!(
                bytes = injected,
                "input sent after STARTTLS before the handshake discarded"
            );
        }
        let (dr, dw) = halves(Stream::Gone, &self.services, (1, 1));
        let r = std::mem::replace(&mut self.r, dr);
        let w = std::mem::replace(&mut self.w, dw);
        // Dropping the read buffer is the discarding.
        let stream = r.into_inner().unsplit(w.into_inner().into_inner());
        let Stream::Plain(plain) = stream else {
            return Ok(Upgrade::Failed);
        };
        match tokio::time::timeout(
            crate::tls::handshake_deadline(&self.services.limits),
            tls.acceptor.accept(plain),
        )
        .await
        {
            Ok(Ok(t)) => {
                bump(&self.services.metrics.tls_handshakes);
                self.tls = Some(crate::tls::describe(t.get_ref().1));
                let (r, w) = halves(Stream::Tls(Box::new(t)), &self.services, self.bufs);
                self.r = r;
                self.w = w;
                Ok(Upgrade::Done)
            }
            Ok(Err(e)) => {
                bump(&self.services.metrics.tls_handshake_failures);
                tracing::debug!(error = %e, "STARTTLS handshake failed");
                Ok(Upgrade::Failed)
            }
            Err(_) => {
                bump(&self.services.metrics.tls_handshake_failures);
                Ok(Upgrade::Failed)
            }
        }
    }

    /// Writes one reply line (CRLF added). It goes out at once unless more
    /// commands are already buffered (PIPELINING): then with the last one.
    pub async fn reply(&mut self, text: &str) -> std::io::Result<()> {
        self.w.write_all(text.as_bytes()).await?;
        self.w.write_all(b"\r\n").await?;
        if self.r.buffer().is_empty() {
            self.w.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush().await
    }

    /// Counts a bad command; true (after saying so) when the session must
    /// end.
    pub async fn bad(&mut self) -> std::io::Result<bool> {
        self.n_bad += 1;
        if self.n_bad >= self.services.limits.bad_commands_max {
            bump(&self.services.metrics.limit_refusals);
            self.reply(self.dialect.too_many_errors).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The next command line (terminator included), or `None` when the
    /// session is over: the client left, went idle, sent too many bad or
    /// too long lines or too many commands, or the node shuts down (each
    /// told with the dialect's reply, flushed).
    pub async fn next_command(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<Option<Vec<u8>>> {
        let idle = self.services.limits.idle_timeout;
        loop {
            let line = tokio::select! {
                l = read_line(&mut self.r, self.dialect.line_bytes_max, idle) => l?,
                _ = shutdown.changed() => {
                    self.reply(self.dialect.shutting_down).await?;
                    self.flush().await?;
                    return Ok(None);
                }
            };
            match line {
                Line::Ok(l) => {
                    self.n_commands += 1;
                    if self.n_commands > self.services.limits.commands_max {
                        bump(&self.services.metrics.limit_refusals);
                        self.reply(self.dialect.too_many_commands).await?;
                        self.flush().await?;
                        return Ok(None);
                    }
                    return Ok(Some(l));
                }
                Line::TooLong { .. } => {
                    bump(&self.services.metrics.limit_refusals);
                    self.reply(self.dialect.line_too_long).await?;
                    if self.bad().await? {
                        self.flush().await?;
                        return Ok(None);
                    }
                }
                Line::Eof => return Ok(None),
                Line::Idle => {
                    self.reply(self.dialect.idle).await?;
                    self.flush().await?;
                    return Ok(None);
                }
            }
        }
    }
}

type Halves<S> = (BufReader<ReadHalf<Stream<S>>>, BufWriter<Stalled<WriteHalf<Stream<S>>>>);

fn halves<S: AsyncRead + AsyncWrite + Unpin>(
    stream: Stream<S>,
    services: &Services,
    bufs: (usize, usize),
) -> Halves<S> {
    let (r, w) = tokio::io::split(stream);
    let stall = services.limits.idle_timeout;
    (
        BufReader::with_capacity(bufs.0, r),
        BufWriter::with_capacity(bufs.1, Stalled::new(w, stall)),
    )
}

macro_rules! each_stream {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = std::pin::Pin::new($s.as_mut());
                $e
            }
            Stream::Gone => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the stream is being upgraded",
            ))),
        }
    };
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each_stream!(self, s => s.poll_read(cx, buf))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        each_stream!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each_stream!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each_stream!(self, s => s.poll_shutdown(cx))
    }
}

/// A writer that fails with `TimedOut` when one write (or flush) makes no
/// progress for `limit`: a client that stops reading (its TCP window
/// closed) cannot hold a session, and its slot, forever.
pub struct Stalled<W> {
    inner: W,
    limit: std::time::Duration,
    since: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<W> Stalled<W> {
    pub fn into_inner(self) -> W {
        self.inner
    }

    pub fn new(inner: W, limit: std::time::Duration) -> Self {
        Stalled {
            inner,
            limit,
            since: None,
        }
    }

    fn pending<T>(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        let limit = self.limit;
        let sleep = self.since.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.since = None;
                std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client stopped reading",
                )))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Stalled<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write(cx, buf) {
            std::task::Poll::Pending => self.pending(cx),
            done => {
                self.since = None;
                done
            }
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_flush(cx) {
            std::task::Poll::Pending => self.pending(cx),
            done => {
                self.since = None;
                done
            }
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_shutdown(cx) {
            std::task::Poll::Pending => self.pending(cx),
            done => {
                self.since = None;
                done
            }
        }
    }
}
