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

/// One client connection: its buffered halves and its counters.
pub struct LineSession<S> {
    pub r: BufReader<ReadHalf<S>>,
    pub w: BufWriter<Stalled<WriteHalf<S>>>,
    pub services: Arc<Services>,
    dialect: &'static Dialect,
    n_commands: u32,
    n_bad: u32,
}

impl<S: AsyncRead + AsyncWrite> LineSession<S> {
    pub fn new(
        stream: S,
        services: Arc<Services>,
        dialect: &'static Dialect,
        read_buf: usize,
        write_buf: usize,
    ) -> Self {
        let (r, w) = tokio::io::split(stream);
        let stall = services.limits.idle_timeout;
        LineSession {
            r: BufReader::with_capacity(read_buf, r),
            w: BufWriter::with_capacity(write_buf, Stalled::new(w, stall)),
            services,
            dialect,
            n_commands: 0,
            n_bad: 0,
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

/// A writer that fails with `TimedOut` when one write (or flush) makes no
/// progress for `limit`: a client that stops reading (its TCP window
/// closed) cannot hold a session, and its slot, forever.
pub struct Stalled<W> {
    inner: W,
    limit: std::time::Duration,
    since: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<W> Stalled<W> {
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
