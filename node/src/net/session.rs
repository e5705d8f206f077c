//! The scaffold every line protocol session stands on (SMTP, LMTP, POP3):
//! bounded reads with an idle deadline and shutdown, replies held back
//! while pipelined commands are buffered, STARTTLS, and the count of
//! commands and bad commands that ends an abusive session. Each protocol
//! gives its own words for these events ([`Dialect`]) and keeps only its
//! own state and commands. (IMAP's driver reads through imap-next
//! instead, on the same [`Stream`].)

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::watch;

use super::Env;
use super::conn::{Line, read_line};
use super::stream::{Stalled, Stream, accept_tls};

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
    pub env: Env,
    dialect: &'static Dialect,
    n_commands: u32,
    n_bad: u32,
    bufs: (usize, usize),
    /// The TLS version and cipher suite, once TLS is on.
    tls: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LineSession<S> {
    pub fn new(stream: Stream<S>, env: Env, dialect: &'static Dialect, read_buf: usize, write_buf: usize) -> Self {
        let tls = match &stream {
            Stream::Tls(t) => Some(crate::tls::describe(t.get_ref().1)),
            _ => None,
        };
        let (r, w) = halves(stream, &env, (read_buf, write_buf));
        LineSession {
            r,
            w,
            env,
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
        self.env.plaintext_auth.allows(self.tls.is_some(), peer)
    }

    /// Whether STARTTLS is offered: TLS is configured and not on yet.
    pub fn can_start_tls(&self) -> bool {
        self.tls.is_none() && self.env.tls.is_some()
    }

    /// Turns TLS on after the protocol's go-ahead reply (which this flushes).
    /// Whatever the client sent after the STARTTLS command and before the
    /// handshake is thrown away unread, never executed (the STARTTLS
    /// command-injection class of bugs, CVE-2011-0411); the caller resets
    /// its protocol state when this returns `Done`.
    pub async fn start_tls(&mut self) -> std::io::Result<Upgrade> {
        let Some(tls) = self.env.tls.clone() else {
            return Ok(Upgrade::Failed);
        };
        self.w.flush().await?;
        let injected = self.r.buffer().len();
        if injected > 0 {
            self.env.counters.tls_injected.inc();
            tracing::warn!(
                bytes = injected,
                "input sent after STARTTLS before the handshake discarded"
            );
        }
        let (dr, dw) = halves(Stream::Gone, &self.env, (1, 1));
        let r = std::mem::replace(&mut self.r, dr);
        let w = std::mem::replace(&mut self.w, dw);
        // Dropping the read buffer is the discarding.
        let stream = r.into_inner().unsplit(w.into_inner().into_inner());
        let Stream::Plain(plain) = stream else {
            return Ok(Upgrade::Failed);
        };
        match accept_tls(&tls, plain, self.env.handshake_deadline(), &self.env.counters).await {
            Some(t) => {
                self.tls = Some(crate::tls::describe(t.get_ref().1));
                let (r, w) = halves(Stream::Tls(Box::new(t)), &self.env, self.bufs);
                self.r = r;
                self.w = w;
                Ok(Upgrade::Done)
            }
            None => Ok(Upgrade::Failed),
        }
    }

    /// Writes one reply line (CRLF added). It goes out at once unless more
    /// commands are already buffered (PIPELINING): then with the last one.
    pub async fn reply(&mut self, text: &str) -> std::io::Result<()> {
        self.w.write_all(text.as_bytes()).await?;
        self.w.write_all(b"\r\n").await?;
        self.flush_unless_pipelined().await
    }

    /// Flushes what is written unless more commands are already buffered.
    pub async fn flush_unless_pipelined(&mut self) -> std::io::Result<()> {
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
        if self.n_bad >= self.env.bad_commands_max {
            self.env.counters.limit_refusals.inc();
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
        let idle = self.env.idle_timeout;
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
                    super::slots::log_command(&l);
                    self.n_commands += 1;
                    if self.n_commands > self.env.commands_max {
                        self.env.counters.limit_refusals.inc();
                        self.reply(self.dialect.too_many_commands).await?;
                        self.flush().await?;
                        return Ok(None);
                    }
                    return Ok(Some(l));
                }
                Line::TooLong { .. } => {
                    self.env.counters.limit_refusals.inc();
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

    /// A line that is not a command (an AUTH response, a DATA line): at
    /// most `max_bytes`, within `idle`.
    pub async fn read_line(&mut self, max_bytes: usize, idle: std::time::Duration) -> std::io::Result<Line> {
        read_line(&mut self.r, max_bytes, idle).await
    }
}

type Halves<S> = (BufReader<ReadHalf<Stream<S>>>, BufWriter<Stalled<WriteHalf<Stream<S>>>>);

fn halves<S: AsyncRead + AsyncWrite + Unpin>(stream: Stream<S>, env: &Env, bufs: (usize, usize)) -> Halves<S> {
    let (r, w) = tokio::io::split(stream);
    (
        BufReader::with_capacity(bufs.0, r),
        BufWriter::with_capacity(bufs.1, Stalled::new(w, env.idle_timeout)),
    )
}
