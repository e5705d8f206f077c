//! dnsmasq on a free loopback port as a real DNS server for tests and
//! benchmarks: the records (MX, TXT, A, PTR) from its command-line flags
//! (`--txt-record=NAME,TEXT,...`: no quotes, commas separate strings).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A running dnsmasq; killed on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dnsmasq {
    /// Starts dnsmasq on 127.0.0.1 answering from `records` (its flags)
    /// only: no upstream, no /etc/hosts. Returns once it answers a query.
    /// dnsmasq listens on UDP and TCP: a port free for one may be taken
    /// for the other by another test's process (it then exits at once,
    /// and every lookup timed out), so a port free for both is chosen,
    /// and another tried if it does not come up.
    pub fn start(records: &[String]) -> anyhow::Result<Dnsmasq> {
        let mut last = None;
        for _ in 0..5 {
            let port = free_udp_and_tcp_port()?;
            let child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--pid-file=",
                    "--user=root",
                    "--log-facility=-",
                    &format!("--port={port}"),
                ])
                .args(records)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("dnsmasq (Debian's dnsmasq-base) does not start")?;
            let mut dns = Dnsmasq {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            match dns.wait_answering(std::time::Duration::from_secs(5)) {
                Ok(()) => return Ok(dns),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("dnsmasq did not start")))
    }

    /// Waits until dnsmasq answers a query (any answer), or fails when it
    /// exited or `within` passed.
    fn wait_answering(&mut self, within: std::time::Duration) -> anyhow::Result<()> {
        // A query for `up.test` A: header (id, recursion desired, one
        // question), the name, type A, class IN.
        let mut query = vec![0x51, 0x11, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        query.extend_from_slice(b"\x02up\x04test\x00\x00\x01\x00\x01");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(std::time::Duration::from_millis(100)))?;
        let deadline = std::time::Instant::now() + within;
        let mut buf = [0u8; 512];
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("dnsmasq on port {} exited: {status}", self.addr.port());
            }
            socket.send_to(&query, self.addr)?;
            if let Ok((n, _)) = socket.recv_from(&mut buf)
                && n >= 2
                && buf[..2] == query[..2]
            {
                return Ok(());
            }
        }
        anyhow::bail!("dnsmasq on port {} did not answer within {within:?}", self.addr.port())
    }
}

/// A loopback port that is free for both UDP and TCP right now.
fn free_udp_and_tcp_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no loopback port free for both UDP and TCP")
}
