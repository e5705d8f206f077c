//! The edge checks' options, one connection's verdict, and what they count.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::blocklist::{Lists, Local};
use super::dnsbl::{self, Answer};

/// Where a listed client is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stage {
    /// At the greeting (`554`, then the connection is closed).
    Connect,
    /// At each RCPT but postmaster's (RFC 5321 §4.5.1).
    #[default]
    Rcpt,
}

impl std::str::FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Stage, String> {
        match s {
            "connect" => Ok(Stage::Connect),
            "rcpt" => Ok(Stage::Rcpt),
            _ => Err(format!("{s:?}: connect or rcpt")),
        }
    }
}

/// The `quill node` flags of the edge checks.
#[derive(Debug, Clone, Default)]
pub struct EdgeOptions {
    /// DNS blocklist zones (`--dnsbl`).
    pub dnsbl: Vec<String>,
    /// Where a listed client is refused (`--dnsbl-at`): DNS blocklists and
    /// the cluster's lists alike.
    pub dnsbl_at: Stage,
    /// Greylisting's delay (`--greylist`); off without.
    pub greylist: Option<Duration>,
}

/// The edge checks of one node.
#[derive(Debug, Default)]
pub struct Edge {
    pub lists: Arc<Lists>,
    pub options: EdgeOptions,
    pub stats: Arc<Stats>,
}

/// What one connection's client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// An access rule allows it: no other check applies.
    Allowed,
    Clear,
    /// Refused, with the reply's text.
    Refused(String),
}

/// One connection's checks: the local lists' answer at once, the DNS
/// blocklists' asked at connect and awaited when first needed.
#[derive(Debug)]
pub struct Check {
    ip: IpAddr,
    local: Local,
    dnsbl: Option<JoinHandle<Vec<(String, Answer)>>>,
    verdict: Option<Verdict>,
    stage: Stage,
    stats: Arc<Stats>,
}

impl Edge {
    pub fn new(options: EdgeOptions) -> Edge {
        Edge {
            options,
            ..Edge::default()
        }
    }

    /// Starts the checks of a client at connect.
    pub fn check(&self, ip: IpAddr, dns: &crate::dns::Dns) -> Check {
        let ip = ip.to_canonical();
        let local = self.lists.check(ip);
        let mut dnsbl = None;
        if local == Local::Clear && !self.options.dnsbl.is_empty() {
            match dns.resolver() {
                Ok(r) => {
                    let (r, zones) = (r.clone(), self.options.dnsbl.clone());
                    dnsbl = Some(tokio::spawn(async move { dnsbl::lookup(&r, ip, &zones).await }));
                }
                Err(e) => {
                    warn!(error = %e, "DNS blocklists not asked");
                    self.stats.count(&self.stats.dnsbl_failures, "resolver");
                }
            }
        }
        Check {
            ip,
            local,
            dnsbl,
            verdict: None,
            stage: self.options.dnsbl_at,
            stats: self.stats.clone(),
        }
    }
}

impl Check {
    /// The verdict, waiting for the DNS blocklists the first time.
    pub async fn verdict(&mut self) -> &Verdict {
        if self.verdict.is_none() {
            let ip = self.ip;
            let refused = |by: &str| Verdict::Refused(format!("554 5.7.1 Client address {ip} is listed by {by}"));
            let v = match &self.local {
                Local::Allowed => Verdict::Allowed,
                Local::Denied => {
                    self.stats.count(&self.stats.blocklist_hits, "access");
                    Verdict::Refused(format!("554 5.7.1 Client address {ip} is refused by the access rules"))
                }
                Local::Listed(name) => {
                    self.stats.count(&self.stats.blocklist_hits, name);
                    info!(%ip, list = %name, "client listed");
                    refused(name)
                }
                Local::Clear => {
                    let answers = match self.dnsbl.take() {
                        Some(h) => h.await.unwrap_or_default(),
                        None => Vec::new(),
                    };
                    let mut v = Verdict::Clear;
                    for (zone, a) in answers {
                        match a {
                            Answer::Listed if v == Verdict::Clear => {
                                self.stats.count(&self.stats.dnsbl_hits, &zone);
                                info!(%ip, %zone, "client listed by a DNS blocklist");
                                v = refused(&zone);
                            }
                            Answer::Failed(e) => {
                                self.stats.count(&self.stats.dnsbl_failures, &zone);
                                warn!(%ip, %zone, error = %e, "DNS blocklist did not answer: not a listing");
                            }
                            _ => {}
                        }
                    }
                    v
                }
            };
            self.verdict = Some(v);
        }
        self.verdict.as_ref().expect("set")
    }

    /// The reply that refuses the connection at the greeting, if the
    /// client is refused and `--dnsbl-at connect`.
    pub async fn at_connect(&mut self) -> Option<String> {
        if self.stage != Stage::Connect {
            return None;
        }
        match self.verdict().await {
            Verdict::Refused(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// The reply that refuses a recipient (never postmaster).
    pub async fn at_rcpt(&mut self, address: &str) -> Option<String> {
        if is_postmaster(address) {
            return None;
        }
        match self.verdict().await {
            Verdict::Refused(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// An access rule allows the client (greylisting passes it).
    pub fn allowed(&self) -> bool {
        self.local == Local::Allowed
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

/// `postmaster`, or `postmaster@` any domain (a domain that is not local
/// is refused for relaying anyway).
pub fn is_postmaster(address: &str) -> bool {
    let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
    local.eq_ignore_ascii_case("postmaster")
}

/// What the edge checks count, by list, zone or outcome.
#[derive(Debug, Default)]
pub struct Stats {
    pub blocklist_hits: Mutex<BTreeMap<String, u64>>,
    pub dnsbl_hits: Mutex<BTreeMap<String, u64>>,
    pub dnsbl_failures: Mutex<BTreeMap<String, u64>>,
    pub greylist: Mutex<BTreeMap<String, u64>>,
}

/// Labels kept per counter, at most (lists are bounded; zones are flags).
const LABELS_MAX: usize = 256;

impl Stats {
    pub fn count(&self, m: &Mutex<BTreeMap<String, u64>>, label: &str) {
        let mut m = m.lock().expect("stats lock");
        if let Some(n) = m.get_mut(label) {
            *n += 1;
        } else if m.len() < LABELS_MAX {
            m.insert(label.to_owned(), 1);
        }
    }
}

/// The counters in `/metrics`.
#[derive(Debug)]
pub struct Figures(pub Arc<Stats>);

impl Collector for Figures {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        for (name, help, label, m) in [
            (
                "quill_blocklist_hits",
                "Connections from clients listed by a cluster blocklist (or denied by an access rule: list=\"access\").",
                "list",
                &s.blocklist_hits,
            ),
            (
                "quill_dnsbl_hits",
                "Connections from clients listed by a DNS blocklist.",
                "zone",
                &s.dnsbl_hits,
            ),
            (
                "quill_dnsbl_failures",
                "DNS blocklist lookups that failed or timed out (the mail was taken).",
                "zone",
                &s.dnsbl_failures,
            ),
            (
                "quill_greylist",
                "Greylisting outcomes: deferred, passed, unavailable (no manager answered: taken), exempt.",
                "outcome",
                &s.greylist,
            ),
        ] {
            let rows: Vec<(String, u64)> = m
                .lock()
                .expect("stats lock")
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            let mut d = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (k, v) in rows {
                ConstCounter::new(v).encode(d.encode_family(&[(label, k.as_str())])?)?;
            }
        }
        Ok(())
    }
}
