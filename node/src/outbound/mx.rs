//! Where mail for a domain goes: `--relay-host`, or the domain's mail
//! exchangers by preference (RFC 5321 5.1: the domain itself without MX
//! records, none for a null MX, RFC 7505), looked up through one caching
//! resolver.

use std::net::SocketAddr;

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use tracing::debug;

/// Mail exchangers tried per domain and try, at most.
pub const MX_TRIED_MAX: usize = 5;

/// Why no host can be tried.
#[derive(Debug)]
pub enum Target {
    /// The domain takes no mail: its recipients fail.
    Permanent(String),
    /// Not now: its recipients are tried again later.
    Temporary(String),
}

/// How this node finds mail exchangers.
pub struct Mx {
    relay_host: Option<String>,
    resolver: Option<TokioResolver>,
    port: u16,
}

impl Mx {
    /// The relay host, or the node's resolver (see [`crate::dns`]).
    pub fn new(relay_host: Option<String>, dns: &crate::dns::Dns, port: u16) -> anyhow::Result<Mx> {
        let resolver = if relay_host.is_some() {
            None
        } else {
            Some(dns.resolver()?.clone())
        };
        Ok(Mx {
            relay_host,
            resolver,
            port,
        })
    }

    /// Where mail for `domain` goes, in order: the relay host, or the MX
    /// hosts by preference (the domain itself without MX records; none
    /// for a null MX), each host's addresses.
    pub async fn targets(&self, domain: &str) -> Result<Vec<(String, SocketAddr)>, Target> {
        if let Some(relay) = &self.relay_host {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host(relay.as_str())
                .await
                .map_err(|e| Target::Temporary(format!("relay host {relay}: {e}")))?
                .collect();
            let host = relay
                .rsplit_once(':')
                .map_or(relay.as_str(), |(h, _)| h)
                .trim_matches(['[', ']']);
            return Ok(addrs.into_iter().map(|a| (host.to_owned(), a)).collect());
        }
        let resolver = self.resolver.as_ref().expect("a resolver without --relay-host");
        let fqdn = format!("{domain}.");
        let mut hosts: Vec<(u16, String)> = match resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                    _ => None,
                })
                .collect(),
            Err(e) if no_records(&e) => Vec::new(),
            Err(e) => return Err(Target::Temporary(format!("MX lookup of {domain}: {e}"))),
        };
        if hosts.len() == 1 && (hosts[0].1 == "." || hosts[0].1.is_empty()) {
            return Err(Target::Permanent(format!(
                "{domain} accepts no mail (null MX, RFC 7505)"
            )));
        }
        hosts.retain(|(_, h)| h != "." && !h.is_empty());
        if hosts.is_empty() {
            // Implicit MX (RFC 5321 5.1): the domain's own address.
            hosts.push((0, fqdn.clone()));
        }
        hosts.sort();
        let mut out = Vec::new();
        for (_, host) in hosts.into_iter().take(MX_TRIED_MAX) {
            match resolver.lookup_ip(host.as_str()).await {
                Ok(ips) => out.extend(
                    ips.iter()
                        .map(|ip| (host.trim_end_matches('.').to_owned(), SocketAddr::new(ip, self.port))),
                ),
                Err(e) => debug!(%host, error = %e, "mail exchanger has no address"),
            }
        }
        if out.is_empty() {
            return Err(Target::Temporary(format!(
                "no address for the mail exchangers of {domain}"
            )));
        }
        Ok(out)
    }
}

fn no_records(e: &hickory_resolver::net::NetError) -> bool {
    matches!(
        e,
        hickory_resolver::net::NetError::Dns(hickory_resolver::net::DnsError::NoRecordsFound(_))
    )
}
