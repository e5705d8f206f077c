//! The one caching resolver a node asks: mail exchangers for outbound
//! delivery, and SPF, DKIM, DMARC, reverse DNS and blocklists at the edge
//! (`--dns ADDR`, or the system's resolv.conf without). Built on first use,
//! so a node that never asks needs no resolver configuration.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use hickory_resolver::TokioResolver;

/// How long one query waits for an answer before trying again.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// Names and answers kept by the resolver's cache.
pub const CACHE_ENTRIES: u64 = 32 * 1024;
/// How long "no such name" is remembered at least (RFC 2308's negative
/// caching; an answer without an SOA would not be remembered at all):
/// DMARC's tree walk and SPF ask about names that do not exist for most
/// messages.
pub const NEGATIVE_TTL_MIN: Duration = Duration::from_secs(30);

/// The node's resolver, made on first use.
#[derive(Default)]
pub struct Dns {
    server: Option<SocketAddr>,
    resolver: OnceLock<Result<TokioResolver, String>>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").field("server", &self.server).finish()
    }
}

impl Dns {
    /// A resolver asking `server` (the system's resolv.conf without).
    pub fn new(server: Option<SocketAddr>) -> Dns {
        Dns {
            server,
            resolver: OnceLock::new(),
        }
    }

    /// The resolver, or why it could not be made (no resolv.conf, ...).
    pub fn resolver(&self) -> anyhow::Result<&TokioResolver> {
        self.resolver
            .get_or_init(|| build(self.server).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("no DNS resolver: {e}"))
    }
}

fn build(server: Option<SocketAddr>) -> anyhow::Result<TokioResolver> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    let mut builder = match server {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![ns]),
                hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    let opts = builder.options_mut();
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = 1;
    opts.cache_size = CACHE_ENTRIES;
    opts.negative_min_ttl = Some(NEGATIVE_TTL_MIN);
    Ok(builder.build()?)
}
