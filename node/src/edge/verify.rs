//! SPF (RFC 7208) of MAIL FROM and HELO, DKIM (RFC 6376), ARC (RFC 8617),
//! DMARC (RFC 7489) and iprev of mail arriving on `--smtp`, through
//! `mail-auth` over the node's one caching resolver ([`crate::dns`]).
//!
//! SPF and iprev start at MAIL FROM, in the background, so that they are
//! answered while DATA is read; DKIM, ARC and DMARC need the message and
//! run once it is in. The lookups of one transaction are bounded
//! ([`LOOKUPS_BUDGET`] in all): past that a check is `temperror` and the
//! message is taken, tagged. A DNS failure is never a pass and never a
//! refusal.
//!
//! The outcome is one `Authentication-Results:` (RFC 8601) with the
//! node's authserv-id (`--hostname`), prepended once any field that
//! claims our id is taken out ([`quill_proto::authres`]); and, with
//! `--auth-policy enforce`, a DMARC `p=reject` failure refused at the end
//! of DATA and a `p=quarantine` failure filed in `Junk`. Mail for a
//! postmaster address is never refused by policy.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    ArcOutput, AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcOutput, DmarcResult,
    IprevOutput, IprevResult, MessageAuthenticator, SpfOutput, SpfResult,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use super::cache::Caches;
use crate::dns::Dns;

/// How long the DNS lookups of one transaction may take in all.
pub const LOOKUPS_BUDGET: Duration = Duration::from_secs(2);
/// DKIM signatures checked per message (the first ones): each may ask
/// DNS for a key and hash the body, and a sender chooses how many it
/// sends. Mail is rarely signed more than twice or thrice.
pub const DKIM_SIGNATURES_MAX: usize = 8;

/// What the checks' outcome does (`--auth-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthPolicy {
    /// DMARC `p=reject` failures refused, `p=quarantine` ones in Junk.
    #[default]
    Enforce,
    /// Only the `Authentication-Results:` header.
    Tag,
}

/// How a node checks incoming mail.
#[derive(Debug, Clone, Default)]
pub struct MailAuthConfig {
    /// Relays whose mail is taken as it is (`--trusted-networks`).
    pub trusted: Vec<IpNet>,
    pub policy: AuthPolicy,
    /// Check mail arriving over LMTP too (`--check-lmtp`; by default an
    /// MTA in front checked it).
    pub lmtp: bool,
}

/// What the end of DATA does with a checked message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Deliver,
    /// Into each user's `Junk` folder instead of INBOX.
    Junk,
    /// Refused: the reply's text.
    Refuse(String),
}

/// The checks' outcome for one message.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// `Authentication-Results: ...\r\n`, to prepend.
    pub header: String,
    pub action: Action,
    /// One line for the delivery log: `spf=pass dkim=pass dmarc=pass ...`.
    pub summary: String,
}

/// The checks of one node.
pub struct MailAuth {
    cfg: MailAuthConfig,
    authserv_id: String,
    dns: Arc<Dns>,
    /// Parsed answers, kept for their TTL.
    caches: Arc<Caches>,
    /// Results counted by (method, result), for `/metrics`.
    tally: Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>,
}

impl std::fmt::Debug for MailAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailAuth").field("cfg", &self.cfg).finish()
    }
}

/// The sender's checks, started at MAIL FROM; aborted if the transaction
/// ends first.
pub struct Pending {
    task: JoinHandle<SenderChecks>,
    ip: IpAddr,
    helo: String,
    mail_from: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct SenderChecks {
    spf_helo: Option<SpfOutput>,
    spf_mail: Option<SpfOutput>,
    iprev: Option<IprevOutput>,
    /// How much of the budget they took.
    spent: Duration,
}

impl MailAuth {
    pub fn new(cfg: MailAuthConfig, authserv_id: String, dns: Arc<Dns>) -> MailAuth {
        MailAuth {
            cfg,
            authserv_id,
            dns,
            caches: Arc::default(),
            tally: Arc::default(),
        }
    }

    /// Whether mail from `ip` over `mode` is checked: `--smtp`, or LMTP
    /// if asked; not from a trusted network.
    pub fn checks(&self, ip: IpAddr, mode: quill_proto::smtp::Mode) -> bool {
        let asked = match mode {
            quill_proto::smtp::Mode::Smtp => true,
            quill_proto::smtp::Mode::Lmtp => self.cfg.lmtp,
            quill_proto::smtp::Mode::Submission => false,
        };
        asked && !self.cfg.trusted.iter().any(|n| n.contains(&ip))
    }

    pub fn authserv_id(&self) -> &str {
        &self.authserv_id
    }

    /// The `/metrics` collector of the results counted.
    pub fn figures(&self) -> Box<dyn Collector> {
        Box::new(Figures(self.tally.clone()))
    }

    fn authenticator(&self) -> Option<MessageAuthenticator> {
        match self.dns.resolver() {
            Ok(r) => Some(MessageAuthenticator(r.clone())),
            Err(e) => {
                debug!("checks of incoming mail without DNS: {e:#}");
                None
            }
        }
    }

    /// Starts SPF (HELO and MAIL FROM) and iprev for a transaction.
    pub fn start(&self, ip: IpAddr, helo: &str, mail_from: &str) -> Pending {
        let auth = self.authenticator();
        let (h, m, me) = (helo.to_owned(), mail_from.to_owned(), self.authserv_id.clone());
        let caches = self.caches.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let deadline = started + LOOKUPS_BUDGET;
            let Some(auth) = auth else {
                return SenderChecks {
                    spf_helo: None,
                    spf_mail: None,
                    iprev: None,
                    spent: Duration::ZERO,
                };
            };
            let helo_id = caches.params(SpfParameters::verify_ehlo(ip, &h, &me));
            let mail_id = caches.params(SpfParameters::verify_mail_from(ip, &h, &me, &m));
            let (spf_helo, spf_mail, iprev) = tokio::join!(
                tokio::time::timeout_at(deadline, auth.verify_spf(helo_id)),
                tokio::time::timeout_at(deadline, auth.verify_spf(mail_id)),
                tokio::time::timeout_at(deadline, auth.verify_iprev(caches.params(ip))),
            );
            SenderChecks {
                spf_helo: spf_helo.ok(),
                spf_mail: spf_mail.ok(),
                iprev: iprev.ok(),
                spent: started.elapsed(),
            }
        });
        Pending {
            task,
            ip,
            helo: helo.to_owned(),
            mail_from: mail_from.to_owned(),
        }
    }

    /// Checks `message` (as received, before our header) with the
    /// sender's checks; `postmaster`: a recipient is a postmaster address.
    pub async fn finish(&self, mut pending: Pending, message: &[u8], postmaster: bool) -> Verdict {
        let sender = (&mut pending.task).await.unwrap_or(SenderChecks {
            spf_helo: None,
            spf_mail: None,
            iprev: None,
            spent: LOOKUPS_BUDGET,
        });
        let deadline = Instant::now() + LOOKUPS_BUDGET.saturating_sub(sender.spent);
        let (ip, helo, mail_from) = (pending.ip, pending.helo.as_str(), pending.mail_from.as_str());
        let mut parsed = AuthenticatedMessage::parse(message);
        if let Some(m) = parsed.as_mut() {
            m.dkim_headers.truncate(DKIM_SIGNATURES_MAX);
        }
        let auth = self.authenticator();
        let (mut dkim, mut arc): (Option<Vec<DkimOutput>>, Option<ArcOutput>) = (None, None);
        if let (Some(msg), Some(auth)) = (&parsed, &auth) {
            let (d, a) = tokio::join!(
                tokio::time::timeout_at(deadline, auth.verify_dkim(self.caches.params(msg))),
                tokio::time::timeout_at(deadline, auth.verify_arc(self.caches.params(msg))),
            );
            (dkim, arc) = (d.ok(), a.ok());
        }
        let mail_domain = mail_from.rsplit_once('@').map_or(helo, |(_, d)| d);
        // DMARC needs both: with either unknown it is a temporary error,
        // never a failure the policy would act on.
        let mut dmarc: Option<DmarcOutput> = None;
        if let (Some(msg), Some(auth), Some(d), Some(spf)) = (&parsed, &auth, &dkim, &sender.spf_mail) {
            let params = self.caches.params(DmarcParameters::new(msg, d, mail_domain, spf));
            dmarc = tokio::time::timeout_at(deadline, auth.verify_dmarc(params)).await.ok();
        }
        let header_from = parsed
            .as_ref()
            .and_then(|m| m.from.first().cloned())
            .unwrap_or_default();
        let mut ar = AuthenticationResults::new(&self.authserv_id);
        let mut extra = String::new();
        let late = |extra: &mut String, method: &str| {
            extra.push_str(&format!(
                ";\r\n\t{method}=temperror (DNS lookups past {} s)",
                LOOKUPS_BUDGET.as_secs()
            ))
        };
        let mut summary = Vec::new();
        // mail-auth reports some malformed signatures (bad base64, ...)
        // by no result at all: an error, not "none".
        let unparsed = parsed.as_ref().is_some_and(|m| m.has_dkim_errors)
            && dkim
                .as_ref()
                .is_some_and(|d| !d.iter().any(|o| matches!(o.result(), DkimResult::Neutral(_))));
        if unparsed {
            extra.push_str(";\r\n\tdkim=permerror (a DKIM-Signature that cannot be parsed)");
        }
        match &dkim {
            Some(d) if d.is_empty() && unparsed => {}
            Some(d) if d.is_empty() => extra.push_str(";\r\n\tdkim=none"),
            Some(d) => ar = ar.with_dkim_results(d, &header_from),
            None if parsed.is_none() => extra.push_str(";\r\n\tdkim=permerror (message not parsed)"),
            None => late(&mut extra, "dkim"),
        }
        let dkim_seen = match &dkim {
            None => "temperror",
            Some(d) if d.is_empty() && unparsed => "permerror",
            Some(d) if d.is_empty() => "none",
            Some(d) if d.iter().any(|o| *o.result() == DkimResult::Pass) => "pass",
            Some(d) => dkim_word(d[0].result()),
        };
        summary.push(("dkim", dkim_seen));
        match &sender.spf_helo {
            Some(s) => ar = ar.with_spf_ehlo_result(s, ip, helo),
            None => late(&mut extra, "spf"),
        }
        match &sender.spf_mail {
            Some(s) => {
                ar = ar.with_spf_mailfrom_result(s, ip, mail_from, helo);
                summary.push(("spf", spf_word(s.result())));
            }
            None => {
                late(&mut extra, "spf");
                summary.push(("spf", "temperror"));
            }
        }
        match &arc {
            Some(a) => {
                summary.push(("arc", dkim_word(a.result())));
                ar = ar.with_arc_result(a, ip);
            }
            None => summary.push(("arc", "temperror")),
        }
        let dmarc_word = match &dmarc {
            Some(d) => {
                ar = ar.with_dmarc_result(d);
                dmarc_word(&d.result())
            }
            None => {
                late(&mut extra, "dmarc");
                "temperror"
            }
        };
        summary.push(("dmarc", dmarc_word));
        match &sender.iprev {
            Some(i) => {
                summary.push(("iprev", iprev_word(&i.result)));
                ar = ar.with_iprev_result(i, ip);
            }
            None => summary.push(("iprev", "temperror")),
        }
        let action = match (&dmarc, self.cfg.policy) {
            (Some(d), AuthPolicy::Enforce) if matches!(d.result(), DmarcResult::Fail(_)) => match d.policy() {
                Policy::Reject if !postmaster => Action::Refuse(format!(
                    "550 5.7.1 Message rejected: it fails the DMARC policy of {} (p=reject)",
                    d.domain()
                )),
                Policy::Reject | Policy::Quarantine => Action::Junk,
                Policy::None | Policy::Unspecified => Action::Deliver,
            },
            _ => Action::Deliver,
        };
        {
            let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
            for (method, result) in &summary {
                *t.entry((method, result)).or_default() += 1;
            }
        }
        let summary = summary
            .iter()
            .map(|(m, r)| format!("{m}={r}"))
            .collect::<Vec<_>>()
            .join(" ");
        Verdict {
            header: format!("Authentication-Results: {ar}{extra}\r\n"),
            action,
            summary,
        }
    }
}

fn spf_word(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_word(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn dmarc_word(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

fn iprev_word(r: &IprevResult) -> &'static str {
    match r {
        IprevResult::Pass => "pass",
        IprevResult::Fail(_) => "fail",
        IprevResult::TempError(_) => "temperror",
        IprevResult::PermError(_) => "permerror",
        IprevResult::None => "none",
    }
}

/// `quill_mail_auth_results_total{method, result}`.
struct Figures(Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>);

impl std::fmt::Debug for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Figures")
    }
}

impl Collector for Figures {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut m = enc.encode_descriptor(
            "quill_mail_auth_results",
            "Checks of incoming mail by method (spf, dkim, dmarc, arc, iprev) and result.",
            None,
            MetricType::Counter,
        )?;
        for ((method, result), n) in counts {
            ConstCounter::new(n).encode(m.encode_family(&[("method", method), ("result", result)])?)?;
        }
        Ok(())
    }
}
