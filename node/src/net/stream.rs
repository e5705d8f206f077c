//! A client's byte stream: in the clear or under TLS (from the start on an
//! implicit-TLS port, or after STARTTLS), with a write that may not stall
//! forever, and the one TLS accept every listener and STARTTLS uses.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::slots::Tracked;
use crate::metrics::Counters;
use crate::tls::Tls;

/// What a client session runs over: a TCP connection holding its slot, or
/// (tests) an in-memory pipe.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// Acknowledges the client's data at once instead of up to 40 ms
    /// later (TCP_QUICKACK; Linux clears it on its own, so it is set again
    /// after each read). A client that sends a literal and its closing
    /// CRLF in two writes without TCP_NODELAY (Python's imaplib) has the
    /// CRLF held by Nagle's algorithm until the literal is acknowledged:
    /// with delayed ACKs every APPEND took 44 ms.
    fn quick_ack(&self) {}
}

impl Transport for Tracked<TcpStream> {
    fn quick_ack(&self) {
        let _ = rustix::net::sockopt::set_tcp_quickack(self.get_ref(), true);
    }
}

impl Transport for tokio::io::DuplexStream {}

impl<S: Transport> Stream<S> {
    /// See [`Transport::quick_ack`].
    pub fn quick_ack(&self) {
        match self {
            Stream::Plain(s) => s.quick_ack(),
            Stream::Tls(t) => t.get_ref().0.quick_ack(),
            Stream::Gone => {}
        }
    }
}

/// A client connection, in the clear or under TLS (from the start on an
/// implicit-TLS port, or after STARTTLS).
pub enum Stream<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Stands in while a session swaps its stream for TLS.
    Gone,
}

/// Handshakes TLS on `stream` within `deadline`, counting the outcome;
/// `None` when it failed or timed out (the connection is unusable).
pub async fn accept_tls<S: AsyncRead + AsyncWrite + Unpin>(
    tls: &Tls,
    stream: S,
    deadline: Duration,
    counters: &Counters,
) -> Option<TlsStream<S>> {
    match tokio::time::timeout(deadline, tls.acceptor.accept(stream)).await {
        Ok(Ok(t)) => {
            counters.tls_handshakes.inc();
            super::slots::note_tls();
            Some(t)
        }
        Ok(Err(e)) => {
            counters.tls_handshake_failures.inc();
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            counters.tls_handshake_failures.inc();
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
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
