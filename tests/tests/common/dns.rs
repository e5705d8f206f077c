//! dnsmasq on a loopback port as a real DNS server for tests (MX, TXT,
//! A and PTR records from its command-line flags).

use std::net::SocketAddr;
use std::process::Command;

/// dnsmasq on a loopback port answering for the test domains; killed on drop.
pub struct Dns {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn dnsmasq(records: &[String]) -> Dns {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
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
    ]);
    cmd.args(records);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = cmd.spawn().expect("dnsmasq starts");
    Dns {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}
