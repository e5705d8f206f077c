//! DKIM signing keys (feature level 3), per domain, shared by the cluster:
//! every node signs outgoing mail with the same key, and a key added
//! through any node is used by every node as soon as it is applied there.
//!
//! A domain has at most [`SELECTORS_PER_DOMAIN_MAX`] selectors: two while
//! a key is rotated (the new one published in DNS, then the old one
//! removed once the record of the new one has spread). The newest by
//! creation time signs ([`DkimKeys::signing_key`]). The node generates a
//! key (`quill admin dkim create`) and proposes it with the proposer's
//! clock as its creation time; the state machine checks the bounds only
//! (it reads no clock and parses no key).
//!
//! Private keys are in the replicated state, like the TLS keys are: on
//! every node's disk, private to its data directory. [`DkimKey`]'s
//! `Debug` does not show them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The level that brought DKIM keys (release 0.3.0).
pub const DKIM_FEATURE_LEVEL: u32 = 3;
/// Domains with keys, at most.
pub const DKIM_DOMAINS_MAX: usize = 1000;
/// Selectors of one domain at once, at most (a rotation needs two).
pub const SELECTORS_PER_DOMAIN_MAX: usize = 4;
/// Longest private key (DER): an RSA 4096 key in PKCS#1 is about 2.4 KB.
pub const PRIVATE_KEY_BYTES_MAX: usize = 4096;
/// Longest public key, base64 (an RSA 4096 SubjectPublicKeyInfo is 736).
pub const PUBLIC_KEY_B64_BYTES_MAX: usize = 1024;

/// The signing algorithm of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DkimAlgorithm {
    /// rsa-sha256 with a 2048-bit key (PKCS#1 DER private key).
    Rsa2048,
    /// ed25519-sha256 (RFC 8463; PKCS#8 DER private key).
    Ed25519,
}

impl DkimAlgorithm {
    /// The name the admin commands use.
    pub fn name(self) -> &'static str {
        match self {
            DkimAlgorithm::Rsa2048 => "rsa2048",
            DkimAlgorithm::Ed25519 => "ed25519",
        }
    }

    pub fn parse(s: &str) -> Option<DkimAlgorithm> {
        match s {
            "rsa2048" | "rsa" => Some(DkimAlgorithm::Rsa2048),
            "ed25519" => Some(DkimAlgorithm::Ed25519),
            _ => None,
        }
    }

    /// The `k=` tag of its DNS record.
    pub fn key_type(self) -> &'static str {
        match self {
            DkimAlgorithm::Rsa2048 => "rsa",
            DkimAlgorithm::Ed25519 => "ed25519",
        }
    }
}

/// One selector's key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DkimKey {
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// The private key, DER (never shown: see the `Debug` below).
    pub private_der: Vec<u8>,
    /// The `p=` value of the DNS record, base64.
    pub public_b64: String,
    /// When the proposer made it, Unix seconds.
    pub created_secs: u64,
}

impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimKey")
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .field(
                "private_der",
                &format_args!("<{} bytes, redacted>", self.private_der.len()),
            )
            .field("public_b64", &self.public_b64)
            .field("created_secs", &self.created_secs)
            .finish()
    }
}

/// The cluster's DKIM keys: domain (lowercase, no trailing dot) to its
/// selectors' keys, and a counter moved by every change (so that a node
/// notices one without comparing them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DkimKeys {
    pub version: u64,
    pub domains: BTreeMap<String, Vec<DkimKey>>,
}

/// A change to the keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DkimCommand {
    /// Adds a selector's key to a domain (refused if the selector exists:
    /// a key is never replaced in place, a rotation adds a new selector).
    Add { domain: String, key: DkimKey },
    /// Removes a selector's key (the domain goes with its last one).
    Remove { domain: String, selector: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DkimError {
    #[error("{0:?} is not a domain name")]
    BadDomain(String),
    #[error("{0:?} is not a selector (a DNS label: 1 to 63 of a-z, 0-9 and '-', not at either end)")]
    BadSelector(String),
    #[error(
        "a key must be 1 to {PRIVATE_KEY_BYTES_MAX} bytes and its public part 1 to {PUBLIC_KEY_B64_BYTES_MAX} base64 characters"
    )]
    BadKey,
    #[error("{domain} already has selector {selector}")]
    SelectorExists { domain: String, selector: String },
    #[error("{0} has {SELECTORS_PER_DOMAIN_MAX} selectors already: remove one first")]
    TooManySelectors(String),
    #[error("at most {DKIM_DOMAINS_MAX} domains have DKIM keys")]
    TooManyDomains,
    #[error("{domain} has no DKIM selector {selector}")]
    NoSuchSelector { domain: String, selector: String },
}

/// A domain as keys are filed under: lowercase, without a trailing dot.
pub fn normalize_domain(d: &str) -> Result<String, DkimError> {
    crate::directory::normalize_domain(d).map_err(|_| DkimError::BadDomain(d.to_owned()))
}

/// Whether `s` is a selector: one DNS label, lowercase.
pub fn valid_selector(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl DkimKeys {
    pub fn apply(&mut self, c: &DkimCommand) -> Result<(), DkimError> {
        match c {
            DkimCommand::Add { domain, key } => {
                let domain = normalize_domain(domain)?;
                if !valid_selector(&key.selector) {
                    return Err(DkimError::BadSelector(key.selector.clone()));
                }
                let b64_ok = |s: &str| {
                    s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
                };
                if key.private_der.is_empty()
                    || key.private_der.len() > PRIVATE_KEY_BYTES_MAX
                    || key.public_b64.is_empty()
                    || key.public_b64.len() > PUBLIC_KEY_B64_BYTES_MAX
                    || !b64_ok(&key.public_b64)
                {
                    return Err(DkimError::BadKey);
                }
                if !self.domains.contains_key(&domain) && self.domains.len() >= DKIM_DOMAINS_MAX {
                    return Err(DkimError::TooManyDomains);
                }
                let keys = self.domains.get(&domain).map(Vec::as_slice).unwrap_or_default();
                if keys.iter().any(|k| k.selector == key.selector) {
                    return Err(DkimError::SelectorExists {
                        domain,
                        selector: key.selector.clone(),
                    });
                }
                if keys.len() >= SELECTORS_PER_DOMAIN_MAX {
                    return Err(DkimError::TooManySelectors(domain));
                }
                self.domains.entry(domain).or_default().push(key.clone());
            }
            DkimCommand::Remove { domain, selector } => {
                let domain = normalize_domain(domain)?;
                let missing = || DkimError::NoSuchSelector {
                    domain: domain.clone(),
                    selector: selector.clone(),
                };
                let keys = self.domains.get_mut(&domain).ok_or_else(missing)?;
                let at = keys.iter().position(|k| &k.selector == selector).ok_or_else(missing)?;
                keys.remove(at);
                if keys.is_empty() {
                    self.domains.remove(&domain);
                }
            }
        }
        self.version += 1;
        Ok(())
    }

    /// The key that signs for `domain` (any case, a trailing dot or not):
    /// its newest by creation (of two created in the same second, the
    /// later added).
    pub fn signing_key(&self, domain: &str) -> Option<&DkimKey> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.domains
            .get(&domain)?
            .iter()
            .enumerate()
            .max_by_key(|(i, k)| (k.created_secs, *i))
            .map(|(_, k)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(selector: &str, created_secs: u64) -> DkimKey {
        DkimKey {
            selector: selector.into(),
            algorithm: DkimAlgorithm::Ed25519,
            private_der: vec![7; 48],
            public_b64: "AAAA".into(),
            created_secs,
        }
    }

    fn add(domain: &str, key: DkimKey) -> DkimCommand {
        DkimCommand::Add {
            domain: domain.into(),
            key,
        }
    }

    #[test]
    fn the_newest_key_of_a_domain_signs_and_removal_goes_back_to_the_other() {
        let mut k = DkimKeys::default();
        k.apply(&add("Example.ORG.", key("old", 100))).unwrap();
        k.apply(&add("example.org", key("new", 200))).unwrap();
        assert_eq!(k.version, 2);
        assert_eq!(k.domains.len(), 1, "filed under one normalized name");
        assert_eq!(k.signing_key("EXAMPLE.org").unwrap().selector, "new");
        assert_eq!(k.signing_key("other.org"), None);
        let rm = DkimCommand::Remove {
            domain: "example.org".into(),
            selector: "new".into(),
        };
        k.apply(&rm).unwrap();
        assert_eq!(k.signing_key("example.org").unwrap().selector, "old");
        assert_eq!(
            k.apply(&rm),
            Err(DkimError::NoSuchSelector {
                domain: "example.org".into(),
                selector: "new".into()
            })
        );
        assert_eq!(k.version, 3, "a refusal changes nothing");
        k.apply(&DkimCommand::Remove {
            domain: "example.org".into(),
            selector: "old".into(),
        })
        .unwrap();
        assert!(k.domains.is_empty(), "the domain goes with its last key");
    }

    #[test]
    fn names_keys_and_counts_are_bounded() {
        let mut k = DkimKeys::default();
        for bad in ["", "a b", "-x.org", "x..org", &format!("{}.org", "a".repeat(64))] {
            assert!(
                matches!(k.apply(&add(bad, key("s", 1))), Err(DkimError::BadDomain(_))),
                "{bad:?}"
            );
        }
        for bad in ["", "Big", "a.b", "-a", "a-", "a_b", &"s".repeat(64)] {
            assert!(
                matches!(
                    k.apply(&add("example.org", key(bad, 1))),
                    Err(DkimError::BadSelector(_))
                ),
                "{bad:?}"
            );
        }
        let mut big = key("s", 1);
        big.private_der = vec![0; PRIVATE_KEY_BYTES_MAX + 1];
        assert_eq!(k.apply(&add("example.org", big)), Err(DkimError::BadKey));
        let mut empty = key("s", 1);
        empty.private_der.clear();
        assert_eq!(k.apply(&add("example.org", empty)), Err(DkimError::BadKey));
        let mut quote = key("s", 1);
        quote.public_b64 = "AA\"; p=".into();
        assert_eq!(k.apply(&add("example.org", quote)), Err(DkimError::BadKey));
        assert_eq!(k.version, 0);

        for i in 0..SELECTORS_PER_DOMAIN_MAX {
            k.apply(&add("example.org", key(&format!("s{i}"), i as u64))).unwrap();
        }
        assert_eq!(
            k.apply(&add("example.org", key("s0", 9))),
            Err(DkimError::SelectorExists {
                domain: "example.org".into(),
                selector: "s0".into()
            })
        );
        assert_eq!(
            k.apply(&add("example.org", key("more", 9))),
            Err(DkimError::TooManySelectors("example.org".into()))
        );
        for i in 1..DKIM_DOMAINS_MAX {
            k.apply(&add(&format!("d{i}.test"), key("s", 1))).unwrap();
        }
        assert_eq!(k.apply(&add("last.test", key("s", 1))), Err(DkimError::TooManyDomains));
        // A domain that has keys still takes another selector.
        k.apply(&add("d1.test", key("t", 2))).unwrap();
    }

    #[test]
    fn debug_output_hides_the_private_key() {
        let mut k = key("s", 1);
        k.private_der = b"SECRET-KEY-BYTES".to_vec();
        let shown = format!(
            "{:?}",
            DkimKeys {
                version: 1,
                domains: BTreeMap::from([("example.org".to_owned(), vec![k])]),
            }
        );
        assert!(!shown.contains("83, 69, 67"), "{shown}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}

#[cfg(test)]
mod level_tests {
    use super::*;
    use crate::command::{ClusterState, Command, CommandError, CommittedBy};
    use std::collections::BTreeSet;

    #[test]
    fn keys_are_refused_below_level_three_and_kept_in_the_state_from_it() {
        let mut s = ClusterState::default();
        let (v, by) = (BTreeSet::new(), CommittedBy::default());
        let add = Command::Dkim(DkimCommand::Add {
            domain: "example.org".into(),
            key: DkimKey {
                selector: "quill202612".into(),
                algorithm: DkimAlgorithm::Rsa2048,
                private_der: vec![1; 1200],
                public_b64: "MIIB".into(),
                created_secs: 1,
            },
        });
        assert!(matches!(
            s.apply(&add, &v, by).result,
            Err(CommandError::FeatureLevel { asked: 3, .. })
        ));
        assert!(s.dkim.domains.is_empty());
        s.apply(&Command::SetFeatureLevel { level: 3 }, &v, by).result.unwrap();
        s.apply(&add, &v, by).result.unwrap();
        assert!(matches!(
            s.apply(&add, &v, by).result,
            Err(CommandError::Dkim(DkimError::SelectorExists { .. }))
        ));
        let bytes = crate::formats::encode_state(&s).unwrap();
        let back = crate::formats::decode_state(&bytes, 1 << 20).unwrap();
        assert_eq!(back.dkim, s.dkim);
        assert_eq!(back.dkim.signing_key("example.org").unwrap().private_der.len(), 1200);
    }
}
