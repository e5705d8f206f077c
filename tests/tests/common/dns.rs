//! dnsmasq on a loopback port as a real DNS server for tests (MX, TXT,
//! A and PTR records from its command-line flags): the harness's.

pub use quill_harness::dns::Dnsmasq as Dns;

/// dnsmasq answering from `records`; killed on drop.
pub fn dnsmasq(records: &[String]) -> Dns {
    Dns::start(records).expect("dnsmasq starts")
}
