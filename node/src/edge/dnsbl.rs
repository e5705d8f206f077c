//! DNS blocklists (RFC 5782): `--dnsbl ZONE`, asked once a connection, at
//! connect, through the node's caching resolver. An `A` answer in
//! 127.0.0.0/8 means listed, except 127.255.255.0/24 (the error codes
//! Spamhaus and others answer to an open resolver or a refused query). A
//! lookup that fails or does not answer in time is not a listing: the
//! mail is taken, and the failure logged and counted.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;

/// All zones of one connection are asked at once and answered within
/// this, or counted as not answering.
pub const LOOKUP_WITHIN: Duration = Duration::from_millis(1500);

/// The name asked for `ip` in `zone`: reversed octets for IPv4
/// (`4.3.2.1.zone.`), reversed nibbles for IPv6.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.{zone}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let mut s = String::with_capacity(64 + zone.len() + 1);
            for b in a.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str(zone);
            s.push('.');
            s
        }
    }
}

/// Whether an answer means listed.
pub fn is_listing(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 127 && !(o[1] == 255 && o[2] == 255)
}

/// What one zone said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Listed,
    NotListed,
    /// No answer in time, or a DNS failure (not a listing).
    Failed(String),
}

async fn ask(resolver: &TokioResolver, name: &str) -> Answer {
    match resolver.ipv4_lookup(name).await {
        Ok(lookup) => {
            let listed = lookup.answers().iter().any(|r| match &r.data {
                RData::A(a) => is_listing(a.0),
                _ => false,
            });
            if listed { Answer::Listed } else { Answer::NotListed }
        }
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => Answer::NotListed,
        Err(e) => Answer::Failed(e.to_string()),
    }
}

/// Asks every zone about `ip` at once, bounded by [`LOOKUP_WITHIN`]: each
/// zone's answer, in the zones' order.
pub async fn lookup(resolver: &TokioResolver, ip: IpAddr, zones: &[String]) -> Vec<(String, Answer)> {
    let asks = zones.iter().map(|z| async move {
        let name = query_name(ip, z);
        let a = match tokio::time::timeout(LOOKUP_WITHIN, ask(resolver, &name)).await {
            Ok(a) => a,
            Err(_) => Answer::Failed(format!("no answer within {LOOKUP_WITHIN:?}")),
        };
        (z.clone(), a)
    });
    futures::future::join_all(asks).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_reversed_octets_or_nibbles() {
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        assert_eq!(query_name(ip, "bl.test"), "4.3.2.1.bl.test.");
        assert_eq!(query_name(ip, "bl.test."), "4.3.2.1.bl.test.");
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(query_name(mapped, "z"), "1.0.0.127.z.");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            query_name(v6, "z"),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.z."
        );
    }

    #[test]
    fn error_codes_are_not_listings() {
        assert!(is_listing(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(is_listing(Ipv4Addr::new(127, 0, 0, 11)));
        assert!(!is_listing(Ipv4Addr::new(127, 255, 255, 254)));
        assert!(!is_listing(Ipv4Addr::new(127, 255, 255, 252)));
        assert!(!is_listing(Ipv4Addr::new(10, 0, 0, 2)));
    }
}
