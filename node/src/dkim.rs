//! DKIM signing of outgoing mail with the cluster's keys
//! (`membership::dkim`): key generation for `quill admin dkim create`, the
//! DNS record to publish, and the [`Signer`] outbound delivery signs with.
//!
//! A message is signed with the newest key of the domain of its `From:`
//! (RFC 5322.From) if the cluster has one, else of its envelope sender's
//! domain, else not at all; relaxed/relaxed, rsa-sha256 or
//! ed25519-sha256. Parsed keys are kept per version of the keys in the
//! Raft state, not parsed again for every message. Nothing here logs or
//! shows a private key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow};
use base64::Engine;
use mail_auth::common::crypto::{DkimKey as SigningKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use membership::dkim::{DkimAlgorithm, DkimKey, DkimKeys};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer};

/// The header fields signed, those of them a message has (RFC 6376 5.4.1's
/// advice: what a recipient sees and what a replay would change).
pub const SIGNED_HEADERS: [&str; 12] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// A new key for `selector`, made now (`now_secs`: its creation time).
pub fn generate(algorithm: DkimAlgorithm, selector: &str, now_secs: u64) -> anyhow::Result<DkimKey> {
    use mail_auth::dkim::generate::DkimKeyPair;
    let pair = match algorithm {
        DkimAlgorithm::Rsa2048 => DkimKeyPair::generate_rsa(2048),
        DkimAlgorithm::Ed25519 => DkimKeyPair::generate_ed25519(),
    }
    .map_err(|e| anyhow!("cannot generate a DKIM key: {e}"))?;
    let (private_der, public) = pair.into_inner();
    // RSA: mail-auth gives the public key as PKCS#1; DNS records carry a
    // SubjectPublicKeyInfo (what verifiers such as dkimpy and OpenDKIM
    // read). Ed25519: the bare 32 bytes (RFC 8463).
    let public = match algorithm {
        DkimAlgorithm::Rsa2048 => rsa_spki(&public),
        DkimAlgorithm::Ed25519 => public,
    };
    let key = DkimKey {
        selector: selector.to_owned(),
        algorithm,
        private_der,
        public_b64: base64::engine::general_purpose::STANDARD.encode(public),
        created_secs: now_secs,
    };
    // Refused here rather than at the first message.
    signing_key(&key).context("the generated key does not load")?;
    Ok(key)
}

/// An RSA public key (PKCS#1 `RSAPublicKey`, DER) as a
/// `SubjectPublicKeyInfo` (DER).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    fn der(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = body.len();
        if n < 0x80 {
            out.push(n as u8);
        } else if n < 0x100 {
            out.extend([0x81, n as u8]);
        } else {
            out.extend([0x82, (n >> 8) as u8, n as u8]);
        }
        out.extend_from_slice(body);
        out
    }
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }.
    const RSA_ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut body = RSA_ALGORITHM.to_vec();
    body.extend(der(0x03, &bits));
    der(0x30, &body)
}

fn signing_key(k: &DkimKey) -> anyhow::Result<SigningKey> {
    Ok(match k.algorithm {
        DkimAlgorithm::Rsa2048 => SigningKey::Rsa(
            RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(k.private_der.as_slice())))
                .map_err(|e| anyhow!("RSA key of selector {}: {e}", k.selector))?,
        ),
        DkimAlgorithm::Ed25519 => SigningKey::Ed25519(
            Ed25519Key::from_pkcs8_der(&k.private_der)
                .map_err(|e| anyhow!("Ed25519 key of selector {}: {e}", k.selector))?,
        ),
    })
}

/// The TXT record's text: `v=DKIM1; k=rsa; p=...`.
pub fn record_text(algorithm: DkimAlgorithm, public_b64: &str) -> String {
    format!("v=DKIM1; k={}; p={public_b64}", algorithm.key_type())
}

/// The record to publish, as one zone-file line:
/// `S._domainkey.DOMAIN. IN TXT "v=DKIM1; k=rsa; p=..."`, the text cut in
/// quoted strings of at most 255 bytes (a TXT string's limit), which a
/// verifier joins again.
pub fn zone_line(domain: &str, selector: &str, algorithm: DkimAlgorithm, public_b64: &str) -> String {
    let text = record_text(algorithm, public_b64);
    // ASCII only (base64 and the tags): cut anywhere.
    let strings: Vec<String> = text
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!("{selector}._domainkey.{domain}. IN TXT {}", strings.join(" "))
}

/// The selector `dkim create` gives when none is asked for: `quill` and
/// the year and month (`quill202612`), with `-2`, `-3`, ... if taken.
pub fn default_selector(now_secs: u64, taken: &[&str]) -> String {
    // "Mon, 07 Dec 2026 ...": the month's name and the year.
    let date = quill_proto::message::rfc5322_date(now_secs);
    let parts: Vec<&str> = date.split(' ').collect();
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| Some(m) == parts.get(2)).map_or(0, |i| i + 1);
    let base = format!("quill{}{month:02}", parts.get(3).unwrap_or(&"0"));
    let mut s = base.clone();
    let mut n = 1;
    while taken.contains(&s.as_str()) {
        n += 1;
        s = format!("{base}-{n}");
    }
    s
}

type Built = DkimSigner<SigningKey, Done>;

/// The signing keys as parsed for one version of the cluster's keys: per
/// domain, its newest key's signer (or why it would not load).
struct Parsed {
    version: u64,
    by_domain: HashMap<String, Result<Arc<Built>, String>>,
}

/// Where the keys come from: their version (cheap) and the keys.
pub trait KeySource: Send + Sync {
    fn version(&self) -> u64;
    fn keys(&self) -> DkimKeys;
}

/// A fixed set of keys (a node without a cluster's, tests).
impl KeySource for DkimKeys {
    fn version(&self) -> u64 {
        self.version
    }
    fn keys(&self) -> DkimKeys {
        self.clone()
    }
}

impl KeySource for membership::Membership {
    fn version(&self) -> u64 {
        self.dkim_version()
    }
    fn keys(&self) -> DkimKeys {
        self.dkim_keys()
    }
}

/// Signs outgoing messages with the cluster's keys.
pub struct Signer {
    source: Arc<dyn KeySource>,
    parsed: Mutex<Option<Arc<Parsed>>>,
}

impl Signer {
    pub fn new(source: Arc<dyn KeySource>) -> Signer {
        Signer {
            source,
            parsed: Mutex::new(None),
        }
    }

    /// The parsed keys of the current version (parsed again only when
    /// the version moved).
    fn current(&self) -> Arc<Parsed> {
        let version = self.source.version();
        let mut slot = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = slot.as_ref()
            && p.version == version
        {
            return p.clone();
        }
        let keys = self.source.keys();
        let by_domain = keys
            .domains
            .keys()
            .filter_map(|d| {
                let k = keys.signing_key(d)?;
                let built = signing_key(k).map(|key| {
                    Arc::new(
                        DkimSigner::from_key(key)
                            .domain(d.clone())
                            .selector(k.selector.clone())
                            .headers(SIGNED_HEADERS)
                            .header_canonicalization(Canonicalization::Relaxed)
                            .body_canonicalization(Canonicalization::Relaxed),
                    )
                });
                Some((d.clone(), built.map_err(|e| format!("{e:#}"))))
            })
            .collect();
        let p = Arc::new(Parsed {
            version: keys.version,
            by_domain,
        });
        *slot = Some(p.clone());
        p
    }

    /// The `DKIM-Signature:` field (with its CRLF) to put in front of
    /// `message`, signed with the key of its `From:` domain, else of the
    /// envelope sender `mail_from`'s; `None` if the cluster has no key for
    /// either, or signing failed (logged: the message goes unsigned rather
    /// than not at all).
    pub fn signature(&self, mail_from: &str, message: &[u8]) -> Option<String> {
        let parsed = self.current();
        if parsed.by_domain.is_empty() {
            return None;
        }
        let domains = [
            quill_proto::message::from_domain(message),
            quill_proto::message::domain_of(mail_from),
        ];
        let (domain, signer) = domains
            .into_iter()
            .flatten()
            .find_map(|d| parsed.by_domain.get(&d).map(|s| (d, s)))?;
        let signer = match signer {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(%domain, %why, "DKIM key does not load: sent unsigned");
                return None;
            }
        };
        match signer.sign(message) {
            Ok(sig) => Some(sig.to_header()),
            Err(e) => {
                tracing::warn!(%domain, error = %e, "DKIM signing failed: sent unsigned");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membership::dkim::DkimCommand;

    struct Fixed(Mutex<DkimKeys>);

    impl KeySource for Fixed {
        fn version(&self) -> u64 {
            self.0.lock().unwrap().version
        }
        fn keys(&self) -> DkimKeys {
            self.0.lock().unwrap().clone()
        }
    }

    const MSG: &[u8] = b"From: Alice <alice@example.org>\r\nTo: bob@remote.test\r\nSubject: hi\r\n\r\nhello\r\n";

    #[test]
    fn records_are_split_in_strings_of_at_most_255_bytes() {
        let key = generate(DkimAlgorithm::Rsa2048, "s1", 1).unwrap();
        let line = zone_line("example.org", "s1", DkimAlgorithm::Rsa2048, &key.public_b64);
        assert!(
            line.starts_with("s1._domainkey.example.org. IN TXT \"v=DKIM1; k=rsa; p=MII"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let strings: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert!(strings.len() >= 2, "{line}");
        assert!(strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), record_text(DkimAlgorithm::Rsa2048, &key.public_b64));
        let ed = generate(DkimAlgorithm::Ed25519, "s2", 1).unwrap();
        let line = zone_line("example.org", "s2", DkimAlgorithm::Ed25519, &ed.public_b64);
        assert_eq!(line.matches('"').count(), 2, "{line}");
        assert!(line.contains("k=ed25519; p="), "{line}");
        // 32 bytes of key.
        assert_eq!(ed.public_b64.len(), 44);
    }

    #[test]
    fn default_selectors_name_the_month_and_avoid_those_taken() {
        // 2026-12-07.
        let t = 1_796_601_600;
        assert_eq!(default_selector(t, &[]), "quill202612");
        assert_eq!(default_selector(t, &["quill202612"]), "quill202612-2");
        assert_eq!(default_selector(t, &["quill202612", "quill202612-2"]), "quill202612-3");
    }

    #[test]
    fn messages_are_signed_by_the_from_domain_else_the_sender_domain_and_keys_are_parsed_once_per_version() {
        let mut keys = DkimKeys::default();
        let add = |keys: &mut DkimKeys, domain: &str, k: DkimKey| {
            keys.apply(&DkimCommand::Add {
                domain: domain.into(),
                key: k,
            })
            .unwrap()
        };
        add(
            &mut keys,
            "example.org",
            generate(DkimAlgorithm::Ed25519, "old", 1).unwrap(),
        );
        add(
            &mut keys,
            "example.org",
            generate(DkimAlgorithm::Ed25519, "new", 2).unwrap(),
        );
        add(
            &mut keys,
            "sender.test",
            generate(DkimAlgorithm::Rsa2048, "env", 1).unwrap(),
        );
        let source = Arc::new(Fixed(Mutex::new(keys)));
        let s = Signer::new(source.clone());
        let sig = s.signature("x@sender.test", MSG).expect("signed");
        assert!(sig.starts_with("DKIM-Signature:"), "{sig}");
        assert!(sig.ends_with("\r\n"));
        assert!(sig.contains("d=example.org"), "{sig}");
        assert!(sig.contains("s=new"), "the newest key signs: {sig}");
        assert!(sig.contains("a=ed25519-sha256"), "{sig}");
        assert!(sig.contains("c=relaxed/relaxed"), "{sig}");
        let h = sig
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_ascii_lowercase();
        assert!(h.contains("from") && h.contains("subject") && h.contains("to"), "{h}");
        let first = s.current();
        assert!(Arc::ptr_eq(&first, &s.current()), "parsed once per version");

        let other = b"From: someone@elsewhere.test\r\nSubject: x\r\n\r\nbody\r\n";
        let sig = s
            .signature("bounce@sender.test", other)
            .expect("signed by the sender's domain");
        assert!(sig.contains("d=sender.test") && sig.contains("a=rsa-sha256"), "{sig}");
        assert_eq!(s.signature("a@nowhere.test", other), None);
        assert_eq!(s.signature("", other), None, "a bounce's empty sender");

        // A key that does not load: sent unsigned, not lost.
        let mut broken = generate(DkimAlgorithm::Ed25519, "bad", 9).unwrap();
        broken.private_der = vec![1, 2, 3];
        add(&mut source.0.lock().unwrap(), "example.org", broken);
        assert!(!Arc::ptr_eq(&first, &s.current()), "a new version is parsed again");
        assert_eq!(s.signature("", MSG), None);
    }
}
