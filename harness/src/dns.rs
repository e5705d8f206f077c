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
    /// only: no upstream, no /etc/hosts.
    pub fn start(records: &[String]) -> anyhow::Result<Dnsmasq> {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
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
        Ok(Dnsmasq {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }
}
