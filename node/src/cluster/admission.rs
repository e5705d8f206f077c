//! Admission to the cluster, both sides: a new node proves the join
//! secret to a seed and gets its certificate ([`enroll`]); a member checks
//! an enrollment ([`enroll_request`]): throttled per source address, fail
//! closed without a join secret, the certificate issued here or, without
//! the CA key, by a voter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use membership::Membership;
use quinn::Endpoint;
use tracing::{info, warn};

use super::rpc::{ClusterReply, ClusterRequest, QuicTransport, STATS_TIMEOUT};
use super::wire::{self, ClusterCa, JoinToken, NodeIdentity};
use crate::files::write_secret;

/// First start of a joining node: proves the token to a seed and gets a
/// certificate. Tries every seed until one admits it.
pub async fn enroll(
    data_dir: &Path,
    name: &str,
    cluster_addr: SocketAddr,
    seeds: &[SocketAddr],
    token: &JoinToken,
) -> anyhow::Result<(NodeIdentity, SocketAddr)> {
    let endpoint = Endpoint::client(SocketAddr::new(cluster_addr.ip(), 0))?;
    let mut last = anyhow!("no seed given");
    for &seed in seeds {
        let attempt = async {
            let conn = wire::connect(&endpoint, wire::joiner_client_config(token)?, seed)
                .await
                .with_context(|| format!("seed {seed}"))?;
            let req = ClusterRequest::Enroll {
                secret: token.secret.clone(),
                name: name.to_owned(),
            };
            match wire::call::<_, ClusterReply>(&conn, &req).await? {
                ClusterReply::Enrolled {
                    cert,
                    key,
                    ca_cert,
                    ca_key_pem,
                } => {
                    let identity = NodeIdentity {
                        cert: cert.into(),
                        key: rustls::pki_types::PrivatePkcs8KeyDer::from(key),
                        ca: ca_cert.into(),
                    };
                    if !ca_key_pem.is_empty() {
                        // From a seed of an earlier version.
                        let dir = data_dir.join("cluster");
                        std::fs::create_dir_all(&dir)?;
                        write_secret(&dir.join("ca.key"), &ca_key_pem)?;
                    }
                    Ok(identity)
                }
                ClusterReply::Refused(why) => bail!("seed {seed} refused to admit this node: {why}"),
                other => bail!("seed {seed} answered {other:?}"),
            }
        };
        match attempt.await {
            Ok(identity) => {
                endpoint.close(0u32.into(), b"enrolled");
                return Ok((identity, seed));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Enrollment attempts allowed per source address per window.
const JOIN_ATTEMPTS_PER_WINDOW: u32 = 10;
const JOIN_WINDOW: Duration = Duration::from_secs(60);
/// Source addresses tracked at most; when full of live windows, every new
/// address is refused until one expires (fail closed).
const JOIN_SOURCES_MAX: usize = 4096;

/// Counts enrollment attempts per source address in fixed windows.
#[derive(Debug, Default)]
pub struct JoinLimiter {
    seen: HashMap<std::net::IpAddr, (Instant, u32)>,
}

impl JoinLimiter {
    /// Whether one more attempt from `ip` at `now` is allowed (and counts it).
    pub fn allow(&mut self, ip: std::net::IpAddr, now: Instant) -> bool {
        if !self.seen.contains_key(&ip) && self.seen.len() >= JOIN_SOURCES_MAX {
            self.seen
                .retain(|_, (start, _)| now.duration_since(*start) < JOIN_WINDOW);
            if self.seen.len() >= JOIN_SOURCES_MAX {
                return false;
            }
        }
        let (start, n) = self.seen.entry(ip).or_insert((now, 0));
        if now.duration_since(*start) >= JOIN_WINDOW {
            *start = now;
            *n = 0;
        }
        *n += 1;
        *n <= JOIN_ATTEMPTS_PER_WINDOW
    }
}

/// The join secret this node checks enrollments against: `None` (admit
/// nobody) when the file is missing, unreadable or empty.
pub fn join_secret(dir: &Path) -> Option<String> {
    let s = std::fs::read_to_string(dir.join("token")).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// A certificate for `name` from this node's CA, if it holds the key.
pub fn issue_here(dir: &Path, name: &str) -> anyhow::Result<ClusterReply> {
    let ca = ClusterCa::load(dir)?;
    let id = ca.issue(name)?;
    Ok(ClusterReply::Enrolled {
        cert: id.cert.to_vec(),
        key: id.key.secret_pkcs8_der().to_vec(),
        ca_cert: id.ca.to_vec(),
        ca_key_pem: String::new(),
    })
}

/// A new node asks to be admitted: throttled per source address, refused
/// outright when this node has no join secret, then the secret checked,
/// and the certificate issued here or, without the CA key, by a voter.
pub async fn enroll_request(
    dir: &Path,
    membership: &Membership,
    transport: &QuicTransport,
    joins: &Mutex<JoinLimiter>,
    peer: SocketAddr,
    secret: &str,
    name: &str,
) -> ClusterReply {
    let allowed = joins
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow(peer.ip(), Instant::now());
    if !allowed {
        warn!(%peer, %name, "join refused: too many attempts from this address");
        return ClusterReply::Refused("too many join attempts from this address; try again later".into());
    }
    let Some(token) = join_secret(dir) else {
        warn!(%peer, %name, "join refused: this node has no join secret (cluster/token missing, unreadable or empty)");
        return ClusterReply::Refused("this node cannot admit nodes (no join secret)".into());
    };
    let expected = JoinToken {
        ca_fingerprint: String::new(),
        secret: token,
    };
    if !expected.secret_matches(secret) {
        warn!(%peer, %name, "join refused: wrong join token");
        return ClusterReply::Refused("wrong join token".into());
    }
    if dir.join("ca.key").exists() {
        return match issue_here(dir, name) {
            Ok(r) => {
                info!(%peer, %name, "admitted a new node");
                r
            }
            Err(e) => ClusterReply::Refused(format!("cannot issue a certificate: {e:#}")),
        };
    }
    let view = membership.view();
    let me = membership.id();
    for n in view.nodes.values().filter(|n| n.voter && n.id != me) {
        let req = ClusterRequest::IssueCert { name: name.to_owned() };
        match tokio::time::timeout(STATS_TIMEOUT * 10, transport.request(&n.addrs.cluster, &req)).await {
            Ok(Ok(r @ ClusterReply::Enrolled { .. })) => {
                info!(%peer, %name, issuer = n.id, "admitted a new node (certificate issued by a voter)");
                return r;
            }
            other => warn!(issuer = n.id, reply = ?other.map(|r| r.map(|_| ())), "voter did not issue a certificate"),
        }
    }
    ClusterReply::Refused("no member holding the CA key answered; try another seed".into())
}

#[cfg(test)]
mod tests {
    use super::{JOIN_ATTEMPTS_PER_WINDOW, JOIN_SOURCES_MAX, JOIN_WINDOW, JoinLimiter, join_secret};
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Instant;

    #[test]
    fn join_secret_is_none_when_missing_unreadable_or_empty() {
        let dir = testkit::TempDir::new("join-secret").unwrap();
        assert_eq!(join_secret(dir.path()), None, "missing");
        std::fs::write(dir.path().join("token"), " \n").unwrap();
        assert_eq!(join_secret(dir.path()), None, "empty");
        std::fs::write(dir.path().join("token"), [0xff, 0xfe]).unwrap();
        assert_eq!(join_secret(dir.path()), None, "not UTF-8");
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        assert_eq!(join_secret(dir.path()).as_deref(), Some("s3cret"));
    }

    #[test]
    fn join_attempts_are_limited_per_address_with_bounded_memory() {
        let mut l = JoinLimiter::default();
        let t0 = Instant::now();
        let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
        for _ in 0..JOIN_ATTEMPTS_PER_WINDOW {
            assert!(l.allow(a, t0));
        }
        assert!(!l.allow(a, t0), "over the limit");
        assert!(
            l.allow(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)), t0),
            "others unaffected"
        );
        assert!(l.allow(a, t0 + JOIN_WINDOW), "a new window");
        // Many addresses: full means refused (fail closed) until windows end.
        for i in 0..JOIN_SOURCES_MAX as u32 {
            l.allow(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), t0);
        }
        assert!(l.seen.len() <= JOIN_SOURCES_MAX);
        assert!(!l.allow(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), t0 + JOIN_WINDOW / 2));
        assert!(l.allow(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), t0 + JOIN_WINDOW * 2));
        assert!(l.seen.len() <= JOIN_SOURCES_MAX);
    }
}
