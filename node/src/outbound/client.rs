//! The SMTP client of outbound delivery: mail-send's `SmtpClient` (its
//! per-recipient replies are what bounces need), opportunistic STARTTLS,
//! and idle connections kept a few seconds per remote address for the
//! next transaction.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mail_send::SmtpClient;
use prometheus_client::metrics::counter::Counter;
use quill_proto::queue::{Failed, Outcome, reply_line, status_of};
use tokio::io::{AsyncRead, AsyncWrite};

/// Connect, greeting and each command's reply, at most.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// A DATA transfer and its reply, at most.
const DATA_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an idle connection is kept, and how many per address.
const POOL_IDLE: Duration = Duration::from_secs(5);
const POOL_PER_ADDRESS_MAX: usize = 20;

/// A connection to a remote server, after EHLO (and STARTTLS if offered).
enum Client {
    Plain(SmtpClient<tokio::net::TcpStream>),
    Tls(Box<SmtpClient<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>),
}

/// Sends transactions to remote servers, reusing idle connections.
#[derive(Default)]
pub struct Sender {
    /// Idle connections, per remote address.
    pool: Mutex<HashMap<SocketAddr, Vec<(Instant, Client)>>>,
    /// Transactions cut after DATA was sent (a duplicate is possible).
    pub cut: Counter,
}

impl Sender {
    pub fn new(cut: Counter) -> Sender {
        Sender {
            pool: Mutex::default(),
            cut,
        }
    }

    /// Drops the connections idle too long.
    pub fn prune(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|_, conns| {
            conns.retain(|(at, _)| at.elapsed() < POOL_IDLE);
            !conns.is_empty()
        });
    }

    fn pooled(&self, addr: SocketAddr) -> Option<Client> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.get_mut(&addr)?;
        while let Some((at, c)) = conns.pop() {
            if at.elapsed() < POOL_IDLE {
                return Some(c);
            }
        }
        None
    }

    fn give_back(&self, addr: SocketAddr, c: Client) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.entry(addr).or_default();
        if conns.len() < POOL_PER_ADDRESS_MAX {
            conns.push((Instant::now(), c));
        }
    }

    /// One SMTP transaction, over an idle connection to the host if there
    /// is one (a fresh one if that fails before DATA); `Err` when this host
    /// could not take it at all (the next one is tried). `helo` is this
    /// node's name.
    pub async fn transaction(
        &self,
        helo: &str,
        host: &str,
        addr: SocketAddr,
        from: &str,
        rcpts: &[&str],
        message: &[u8],
    ) -> Result<Vec<Outcome>, String> {
        if let Some(mut c) = self.pooled(addr) {
            let r = match &mut c {
                Client::Plain(c) => self.send(c, host, from, rcpts, message).await,
                Client::Tls(c) => self.send(c, host, from, rcpts, message).await,
            };
            if let Ok(outcomes) = r {
                self.give_back(addr, c);
                return Ok(outcomes);
            }
        }
        let mut c = connect(helo, host, addr).await?;
        let r = match &mut c {
            Client::Plain(c) => self.send(c, host, from, rcpts, message).await,
            Client::Tls(c) => self.send(c, host, from, rcpts, message).await,
        };
        if r.is_ok() {
            self.give_back(addr, c);
        }
        r
    }

    async fn send<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<T>,
        host: &str,
        from: &str,
        rcpts: &[&str],
        message: &[u8],
    ) -> Result<Vec<Outcome>, String> {
        let remote = Some(host.to_owned());
        let reply_of = |e: mail_send::Error| -> Result<smtp_proto::Response<String>, String> {
            match e {
                mail_send::Error::UnexpectedReply(r) => Ok(r),
                other => Err(other.to_string()),
            }
        };
        let outcome = |rcpt: &str, r: &smtp_proto::Response<String>| {
            let esc = (r.esc[0] != 0).then(|| format!("{}.{}.{}", r.esc[0], r.esc[1], r.esc[2]));
            let status = esc.clone().unwrap_or_else(|| status_of(r.code, &r.message));
            let diagnostic = match &esc {
                Some(e) => format!("{} {e} {}", r.code, reply_line(&r.message)),
                None => format!("{} {}", r.code, reply_line(&r.message)),
            };
            let failed = Failed {
                rcpt: rcpt.to_owned(),
                status,
                diagnostic,
                remote: remote.clone(),
            };
            Outcome::of_reply(r.code, failed)
        };
        if let Err(e) = client
            .mail_from(from, &mail_send::smtp::message::Parameters::new())
            .await
        {
            let r = reply_of(e)?;
            return Ok(rcpts.iter().map(|rc| outcome(rc, &r)).collect());
        }
        let mut out: Vec<Option<Outcome>> = Vec::with_capacity(rcpts.len());
        let mut accepted = Vec::new();
        for (i, rcpt) in rcpts.iter().enumerate() {
            match client.rcpt_to(rcpt, &mail_send::smtp::message::Parameters::new()).await {
                Ok(()) => {
                    accepted.push(i);
                    out.push(None);
                }
                Err(e) => {
                    let r = reply_of(e)?;
                    out.push(Some(outcome(rcpt, &r)));
                }
            }
        }
        if accepted.is_empty() {
            // MAIL was taken: clear it for the next transaction.
            client.rset().await.map_err(|e| e.to_string())?;
        } else {
            // mail-send ends the data with CRLF.CRLF itself.
            let body = message.strip_suffix(b"\r\n").unwrap_or(message);
            let sent = tokio::time::timeout(DATA_TIMEOUT, client.data(body)).await;
            let cut = |why: String| {
                self.cut.inc();
                Outcome::Deferred(Failed {
                    rcpt: String::new(),
                    status: "4.4.2".into(),
                    diagnostic: why,
                    remote: remote.clone(),
                })
            };
            let per_accepted: Outcome = match sent {
                Ok(Ok(_)) => Outcome::Delivered,
                Ok(Err(mail_send::Error::UnexpectedReply(r))) => outcome(rcpts[accepted[0]], &r),
                Ok(Err(e)) => cut(format!("connection lost during DATA: {e}")),
                Err(_) => cut("timed out during DATA".into()),
            };
            for i in accepted {
                out[i] = Some(per_accepted.for_rcpt(rcpts[i]));
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every recipient answered")).collect())
    }
}

/// A new connection: greeting, EHLO, and STARTTLS when offered.
async fn connect(helo: &str, host: &str, addr: SocketAddr) -> Result<Client, String> {
    let mut client = SmtpClient::connect(addr, SMTP_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    // mail-send writes a message and its final dot in separate writes:
    // with Nagle's algorithm the dot waits for the peer's delayed ACK
    // (40 ms a message).
    let _ = client.stream.set_nodelay(true);
    let greeting = client.read().await.map_err(|e| e.to_string())?;
    if greeting.code / 100 != 2 {
        return Err(format!("greeting {} {}", greeting.code, reply_line(&greeting.message)));
    }
    let ehlo = client.ehlo(helo).await.map_err(|e| e.to_string())?;
    if !ehlo.has_capability(smtp_proto::EXT_START_TLS) {
        return Ok(Client::Plain(client));
    }
    // Opportunistic TLS does not fall back to plain text on the same
    // connection: a failed handshake spends it (the next host, or the
    // retry, goes on).
    let mut tls = client
        .start_tls(&tls_connector(), host)
        .await
        .map_err(|e| format!("STARTTLS: {e}"))?;
    tls.ehlo(helo).await.map_err(|e| e.to_string())?;
    Ok(Client::Tls(Box::new(tls)))
}

/// Opportunistic TLS: encryption against passive listeners, with no
/// certificate check (RFC 7435; MX hosts rarely have certificates for
/// their names, and refusing them would bounce mail: DANE/MTA-STS are not
/// built).
fn tls_connector() -> tokio_rustls::TlsConnector {
    mail_send::smtp::tls::build_tls_connector(true).expect("a TLS client config")
}
