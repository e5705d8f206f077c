//! Greylisting (`--greylist DURATION`): the first try of a triplet (the
//! client's /24 or /64, MAIL FROM, RCPT) gets `451 4.7.1`; a retry after
//! the delay, within [`LIFETIME`], passes, through any node: the triplet
//! is kept at its manager node (a hash of it is the key), like the login
//! throttles. A triplet whose manager does not answer is taken (an
//! annoyance filter, not security) and counted. Postmaster and clients an
//! access rule allows are not greylisted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use quill_proto::smtp::Reply;
use tracing::{debug, warn};

use super::{Check, Edge};
use crate::mail::Mail;

/// How long a deferred triplet waits for its retry, and a passed one is
/// remembered after its last pass.
pub const LIFETIME: Duration = Duration::from_secs(36 * 3600);

pub const REPLY_DEFERRED: &str = "451 4.7.1 Greylisted, try again later";

/// The manager key of a triplet.
pub fn key(ip: IpAddr, from: &str, rcpt: &str) -> String {
    let net = match ip.to_canonical() {
        IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) & !0xff).to_string(),
        IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) & !(u128::from(u64::MAX))).to_string(),
    };
    let triplet = format!("{net}\0{}\0{}", from.to_ascii_lowercase(), rcpt.to_ascii_lowercase());
    let h = blake3::hash(triplet.as_bytes()).to_hex();
    format!("greylist/{}", &h[..32])
}

/// The deferral of a first try, if greylisting is on and applies.
pub async fn check(edge: &Edge, mail: &dyn Mail, client: &Check, from: &str, rcpt: &str) -> Option<Reply> {
    let delay = edge.options.greylist?;
    let stats = &edge.stats;
    if client.allowed() || super::check::is_postmaster(rcpt) {
        stats.count(&stats.greylist, "exempt");
        return None;
    }
    let key = key(client.ip(), from, rcpt);
    match mail.greylist(&key, delay, LIFETIME).await {
        Some(true) => {
            stats.count(&stats.greylist, "passed");
            None
        }
        Some(false) => {
            stats.count(&stats.greylist, "deferred");
            debug!(ip = %client.ip(), %from, %rcpt, "greylisted");
            Some(Reply::ok(REPLY_DEFERRED))
        }
        None => {
            stats.count(&stats.greylist, "unavailable");
            warn!(ip = %client.ip(), %rcpt, "greylisting not answered: taken");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_triplet_is_the_clients_network_and_both_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let k = key(ip("192.0.2.1"), "a@x.test", "b@y.test");
        assert_eq!(k, key(ip("192.0.2.200"), "A@x.test", "b@Y.test"), "same /24, case");
        assert_eq!(k, key(ip("::ffff:192.0.2.9"), "a@x.test", "b@y.test"));
        assert_ne!(k, key(ip("192.0.3.1"), "a@x.test", "b@y.test"));
        assert_ne!(k, key(ip("192.0.2.1"), "c@x.test", "b@y.test"));
        assert_ne!(k, key(ip("192.0.2.1"), "a@x.test", "c@y.test"));
        let v6 = key(ip("2001:db8:0:1::1"), "", "b@y.test");
        assert_eq!(v6, key(ip("2001:db8:0:1:ffff::2"), "", "b@y.test"), "same /64");
        assert_ne!(v6, key(ip("2001:db8:0:2::1"), "", "b@y.test"));
    }
}
