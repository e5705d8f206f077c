//! Recipients that are not users (feature level 3): aliases, domain
//! aliases, catch-all addresses and sub-addressing, and their expansion to
//! the users and remote addresses that get the mail.
//!
//! Kept in the Raft state beside the directory, so that every node expands
//! an address the same way, locally. [`Routes::apply`] is the write logic
//! (deterministic, checked against the directory: an alias that would reach
//! itself is refused with the loop it makes); [`expand`] is the read side,
//! bounded in depth and in final recipients, run at RCPT.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::directory::{DirectoryState, UserRecord, normalize_address, normalize_domain};

mod expand;
use expand::is_local;
pub use expand::{ExpandError, Expansion, expand, normalize_user};

/// The level that brought routes (the same release as folder keywords).
pub const ROUTES_FEATURE_LEVEL: u32 = 3;
/// How many aliases one expansion may pass through, one below another.
pub const EXPANSION_DEPTH_MAX: usize = 8;
/// How many final recipients (users and remote addresses) one address may
/// expand to.
pub const EXPANSION_RECIPIENTS_MAX: usize = 1000;
/// Targets of one alias.
pub const ALIAS_TARGETS_MAX: usize = 1000;
/// Aliases, domain aliases and catch-alls in the cluster, each.
pub const ROUTES_MAX: usize = 100_000;
/// The largest Sieve script a user may keep (it travels in one Raft
/// entry).
pub const SIEVE_SCRIPT_BYTES_MAX: usize = 32 * 1024;
/// Named scripts one user may keep (one of them active).
pub const SIEVE_SCRIPTS_MAX: usize = 8;
/// Longest script name.
pub const SIEVE_NAME_BYTES_MAX: usize = 128;
/// What separates a user from a tag in `user+tag@domain` (RFC 5233).
pub const SUBADDRESS_SEPARATOR: char = '+';

/// The routing table: every address here is normalized.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    /// An address to the addresses its mail goes to (local or remote).
    pub aliases: BTreeMap<String, Vec<String>>,
    /// A domain whose every address is the same address of another.
    pub domain_aliases: BTreeMap<String, String>,
    /// A local domain's address for mail to addresses it does not know.
    pub catch_all: BTreeMap<String, String>,
    /// The key of the Sender Rewriting Scheme for forwarded mail: set once,
    /// by the first alias written (from the proposer's randomness, so that
    /// every node applies the same key).
    pub srs_key: Option<[u8; 32]>,
    /// Users' Sieve scripts, by user address (checked by the node before
    /// they are proposed: membership knows nothing about Sieve).
    pub sieve: BTreeMap<String, SieveScripts>,
    /// Taps: a local domain or address to the user that gets a copy of
    /// every message accepted for it (archiving, lawful interception).
    pub taps: BTreeMap<String, String>,
}

/// One user's Sieve scripts (ManageSieve keeps several by name, one of
/// them active).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SieveScripts {
    pub active: Option<String>,
    pub scripts: BTreeMap<String, String>,
}

impl SieveScripts {
    /// The active script's source.
    pub fn active_script(&self) -> Option<&str> {
        self.active
            .as_ref()
            .and_then(|n| self.scripts.get(n))
            .map(String::as_str)
    }
}

/// A change to the routing table: what a Raft log entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoutesCommand {
    /// Adds or replaces an alias. `srs_key` is the key used if none is set
    /// yet (fresh random bytes from the proposer).
    SetAlias {
        address: String,
        targets: Vec<String>,
        srs_key: [u8; 32],
    },
    RemoveAlias {
        address: String,
    },
    /// Makes `alias` a local domain whose addresses are those of `target`.
    SetDomainAlias {
        alias: String,
        target: String,
    },
    RemoveDomainAlias {
        alias: String,
    },
    /// Sets (or with `None` clears) a domain's catch-all address.
    SetCatchAll {
        domain: String,
        address: Option<String>,
    },
    /// Stores (`Some`) or deletes (`None`) a user's script `name`, and
    /// makes it the active one if `activate`.
    PutSieve {
        user: String,
        name: String,
        script: Option<String>,
        activate: bool,
        /// The SRS key, if none is set yet (a script may redirect).
        srs_key: [u8; 32],
    },
    /// Makes script `name` active (`None`: none is).
    ActivateSieve {
        user: String,
        name: Option<String>,
    },
    RenameSieve {
        user: String,
        from: String,
        to: String,
    },
    /// Copies every message accepted for `target` (a local domain or an
    /// address of one) to the user `archive`; `None` removes the tap.
    SetTap {
        target: String,
        archive: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RouteError {
    #[error("invalid address: {0}")]
    BadAddress(String),
    #[error("invalid domain: {0}")]
    BadDomain(String),
    #[error("{0} is not a local domain")]
    NotLocal(String),
    #[error("{0} is a user; remove the user first")]
    IsUser(String),
    #[error("no such alias: {0}")]
    NoSuchAlias(String),
    #[error("no user or alias {0} (targets in local domains must exist)")]
    NoSuchTarget(String),
    #[error("an alias needs 1 to {ALIAS_TARGETS_MAX} targets")]
    TargetCount,
    #[error("{0} has users of its own")]
    DomainHasUsers(String),
    #[error("{0} is a domain alias")]
    IsDomainAlias(String),
    #[error("{0} is not a domain alias")]
    NoSuchDomainAlias(String),
    #[error("alias loop: {}", .0.join(" -> "))]
    Loop(Vec<String>),
    #[error("too many routes ({ROUTES_MAX} of each kind)")]
    TooMany,
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error("no tap on {0}")]
    NoSuchTap(String),
    #[error("no such script: {0}")]
    NoSuchScript(String),
    #[error("script {0} already exists")]
    ScriptExists(String),
    #[error("the active script cannot be deleted; deactivate it first")]
    ScriptActive,
    #[error(
        "a script is at most {SIEVE_SCRIPT_BYTES_MAX} bytes, a name 1 to {SIEVE_NAME_BYTES_MAX} printable characters, and a user keeps at most {SIEVE_SCRIPTS_MAX}"
    )]
    ScriptLimit,
    #[error(transparent)]
    Expansion(#[from] ExpandError),
}

impl Routes {
    /// Applies one command, checked against the directory it routes into.
    /// On error nothing changes. A domain alias takes its domain out of the
    /// directory's own domains (it had no users).
    pub fn apply(&mut self, cmd: &RoutesCommand, dir: &mut DirectoryState) -> Result<(), RouteError> {
        match cmd {
            RoutesCommand::SetAlias {
                address,
                targets,
                srs_key,
            } => {
                let a = self.local_address(dir, address)?;
                if dir.users.contains_key(&a) {
                    return Err(RouteError::IsUser(a));
                }
                if targets.is_empty() || targets.len() > ALIAS_TARGETS_MAX {
                    return Err(RouteError::TargetCount);
                }
                let mut ts: Vec<String> = Vec::with_capacity(targets.len());
                for t in targets {
                    let t = normalize_address(t).map_err(|_| RouteError::BadAddress(t.clone()))?;
                    if !ts.contains(&t) {
                        ts.push(t);
                    }
                }
                if !self.aliases.contains_key(&a) && self.aliases.len() >= ROUTES_MAX {
                    return Err(RouteError::TooMany);
                }
                // Tried in place and put back if refused: a copy of the
                // whole table (scripts included) per entry would cost every
                // node O(state) on every alias written.
                let before = self.aliases.insert(a.clone(), ts.clone());
                let checked = self.check_alias(dir, &a, &ts);
                if checked.is_err() {
                    match before {
                        Some(old) => self.aliases.insert(a, old),
                        None => self.aliases.remove(&a),
                    };
                    return checked;
                }
                self.srs_key.get_or_insert(*srs_key);
            }
            RoutesCommand::RemoveAlias { address } => {
                let a = normalize_address(address).map_err(|_| RouteError::BadAddress(address.clone()))?;
                if self.aliases.remove(&a).is_none() {
                    return Err(RouteError::NoSuchAlias(a));
                }
            }
            RoutesCommand::SetDomainAlias { alias, target } => {
                let alias = normalize_domain(alias).map_err(|_| RouteError::BadDomain(alias.clone()))?;
                let target = normalize_domain(target).map_err(|_| RouteError::BadDomain(target.clone()))?;
                if !dir.domains.contains(&target) {
                    return Err(RouteError::NotLocal(target));
                }
                let suffix = format!("@{alias}");
                if dir.users.keys().any(|u| u.ends_with(&suffix)) {
                    return Err(RouteError::DomainHasUsers(alias));
                }
                if self.aliases.keys().any(|u| u.ends_with(&suffix)) || self.catch_all.contains_key(&alias) {
                    return Err(RouteError::DomainHasUsers(alias));
                }
                if alias == target {
                    return Err(RouteError::Loop(vec![alias.clone(), target]));
                }
                if !self.domain_aliases.contains_key(&alias) && self.domain_aliases.len() >= ROUTES_MAX {
                    return Err(RouteError::TooMany);
                }
                self.domain_aliases.insert(alias.clone(), target);
                dir.domains.remove(&alias);
            }
            RoutesCommand::RemoveDomainAlias { alias } => {
                let alias = normalize_domain(alias).map_err(|_| RouteError::BadDomain(alias.clone()))?;
                if self.domain_aliases.remove(&alias).is_none() {
                    return Err(RouteError::NoSuchDomainAlias(alias));
                }
            }
            RoutesCommand::PutSieve {
                user,
                name,
                script,
                activate,
                srs_key,
            } => {
                let u = Self::sieve_user(dir, user)?;
                let entry = self.sieve.entry(u.clone()).or_default();
                match script {
                    Some(src) => {
                        let fresh = !entry.scripts.contains_key(name);
                        if src.len() > SIEVE_SCRIPT_BYTES_MAX
                            || name.is_empty()
                            || name.len() > SIEVE_NAME_BYTES_MAX
                            || name.chars().any(char::is_control)
                            || (fresh && entry.scripts.len() >= SIEVE_SCRIPTS_MAX)
                        {
                            return Err(RouteError::ScriptLimit);
                        }
                        entry.scripts.insert(name.clone(), src.clone());
                        if *activate {
                            entry.active = Some(name.clone());
                        }
                        self.srs_key.get_or_insert(*srs_key);
                    }
                    None => {
                        if !entry.scripts.contains_key(name) {
                            return Err(RouteError::NoSuchScript(name.clone()));
                        }
                        if entry.active.as_ref() == Some(name) && !*activate {
                            return Err(RouteError::ScriptActive);
                        }
                        entry.scripts.remove(name);
                        if entry.active.as_ref() == Some(name) {
                            entry.active = None;
                        }
                    }
                }
                if entry.scripts.is_empty() {
                    self.sieve.remove(&u);
                }
            }
            RoutesCommand::ActivateSieve { user, name } => {
                let u = Self::sieve_user(dir, user)?;
                match name {
                    Some(n) => {
                        let entry = self.sieve.get_mut(&u).filter(|e| e.scripts.contains_key(n));
                        let Some(entry) = entry else {
                            return Err(RouteError::NoSuchScript(n.clone()));
                        };
                        entry.active = Some(n.clone());
                    }
                    None => {
                        if let Some(e) = self.sieve.get_mut(&u) {
                            e.active = None;
                        }
                    }
                }
            }
            RoutesCommand::RenameSieve { user, from, to } => {
                let u = Self::sieve_user(dir, user)?;
                if to.is_empty() || to.len() > SIEVE_NAME_BYTES_MAX || to.chars().any(char::is_control) {
                    return Err(RouteError::ScriptLimit);
                }
                let Some(entry) = self.sieve.get_mut(&u).filter(|e| e.scripts.contains_key(from)) else {
                    return Err(RouteError::NoSuchScript(from.clone()));
                };
                if entry.scripts.contains_key(to) {
                    return Err(RouteError::ScriptExists(to.clone()));
                }
                let src = entry.scripts.remove(from).expect("checked");
                entry.scripts.insert(to.clone(), src);
                if entry.active.as_ref() == Some(from) {
                    entry.active = Some(to.clone());
                }
            }
            RoutesCommand::SetTap { target, archive } => {
                let t = match target.contains('@') {
                    true => normalize_address(target).map_err(|_| RouteError::BadAddress(target.clone()))?,
                    false => normalize_domain(target).map_err(|_| RouteError::BadDomain(target.clone()))?,
                };
                let Some(archive) = archive else {
                    if self.taps.remove(&t).is_none() {
                        return Err(RouteError::NoSuchTap(t));
                    }
                    return Ok(());
                };
                let domain = t.rsplit_once('@').map_or(t.as_str(), |(_, d)| d);
                if !is_local(dir, self, domain) {
                    return Err(RouteError::NotLocal(domain.to_owned()));
                }
                let a = Self::sieve_user(dir, archive)?;
                if !self.taps.contains_key(&t) && self.taps.len() >= ROUTES_MAX {
                    return Err(RouteError::TooMany);
                }
                self.taps.insert(t, a);
            }
            RoutesCommand::SetCatchAll { domain, address } => {
                let domain = normalize_domain(domain).map_err(|_| RouteError::BadDomain(domain.clone()))?;
                if self.domain_aliases.contains_key(&domain) {
                    return Err(RouteError::IsDomainAlias(domain));
                }
                if !dir.domains.contains(&domain) {
                    return Err(RouteError::NotLocal(domain));
                }
                let Some(address) = address else {
                    self.catch_all.remove(&domain);
                    return Ok(());
                };
                let t = normalize_address(address).map_err(|_| RouteError::BadAddress(address.clone()))?;
                if !self.catch_all.contains_key(&domain) && self.catch_all.len() >= ROUTES_MAX {
                    return Err(RouteError::TooMany);
                }
                let before = self.catch_all.insert(domain.clone(), t.clone());
                let checked = self.check_catch_all(dir, &t);
                if checked.is_err() {
                    match before {
                        Some(old) => self.catch_all.insert(domain, old),
                        None => self.catch_all.remove(&domain),
                    };
                    return checked;
                }
            }
        }
        Ok(())
    }

    /// With the alias `a` -> `targets` in place: every local target leads
    /// somewhere (a typo is caught here, not at the first delivery), and
    /// the alias does not reach itself.
    fn check_alias(&self, dir: &DirectoryState, a: &str, targets: &[String]) -> Result<(), RouteError> {
        for t in targets {
            let domain = t.rsplit_once('@').expect("normalized").1;
            if is_local(dir, self, domain) && expand(dir, self, t).is_err_and(|e| e == ExpandError::Unknown) {
                return Err(RouteError::NoSuchTarget(t.clone()));
            }
        }
        self.check_reaches(dir, a)
    }

    /// With a catch-all onto `t` in place: a local `t` reaches someone, by
    /// a way that does not come back to itself.
    fn check_catch_all(&self, dir: &DirectoryState, t: &str) -> Result<(), RouteError> {
        let t_domain = t.rsplit_once('@').expect("normalized").1;
        if !is_local(dir, self, t_domain) {
            return Ok(());
        }
        match expand(dir, self, t) {
            Ok(_) => Ok(()),
            Err(ExpandError::Unknown) => Err(RouteError::NoSuchTarget(t.to_owned())),
            Err(ExpandError::Loop(l)) => Err(RouteError::Loop(l)),
            Err(e) => Err(e.into()),
        }
    }

    /// A user's normalized address, if the user exists.
    fn sieve_user(dir: &DirectoryState, user: &str) -> Result<String, RouteError> {
        let u = normalize_address(user).map_err(|_| RouteError::BadAddress(user.to_owned()))?;
        if !dir.users.contains_key(&u) {
            return Err(RouteError::NoSuchUser(u));
        }
        Ok(u)
    }

    /// The archives that get a copy of mail for `address` (as RCPT named
    /// it, normalized): its own tap and its domain's, each once.
    pub fn taps_for(&self, address: &str) -> Vec<&str> {
        if self.taps.is_empty() {
            return Vec::new();
        }
        let Ok(a) = normalize_address(address) else {
            return Vec::new();
        };
        let domain = a.rsplit_once('@').expect("normalized").1;
        let mut out: Vec<&str> = Vec::new();
        for key in [a.as_str(), domain] {
            if let Some(t) = self.taps.get(key)
                && !out.contains(&t.as_str())
            {
                out.push(t);
            }
        }
        out
    }

    /// A removed user's scripts go with the user.
    pub fn user_removed(&mut self, address: &str) {
        if let Ok(a) = normalize_address(address) {
            self.sieve.remove(&a);
        }
    }

    /// The active Sieve script of a user, if any.
    pub fn active_sieve(&self, user: &str) -> Option<&str> {
        self.sieve.get(user).and_then(SieveScripts::active_script)
    }

    /// `address` normalized, in a domain the directory holds (an alias
    /// domain's addresses are its target's).
    fn local_address(&self, dir: &DirectoryState, address: &str) -> Result<String, RouteError> {
        let a = normalize_address(address).map_err(|_| RouteError::BadAddress(address.to_owned()))?;
        let domain = a.rsplit_once('@').expect("normalized").1;
        if self.domain_aliases.contains_key(domain) {
            return Err(RouteError::IsDomainAlias(domain.to_owned()));
        }
        if !dir.domains.contains(domain) {
            return Err(RouteError::NotLocal(domain.to_owned()));
        }
        Ok(a)
    }

    /// Whether `a` expands within the bounds; a loop is named.
    fn check_reaches(&self, dir: &DirectoryState, a: &str) -> Result<(), RouteError> {
        match expand(dir, self, a) {
            Ok(_) | Err(ExpandError::Unknown) => Ok(()),
            Err(ExpandError::Loop(l)) => Err(RouteError::Loop(l)),
            Err(e) => Err(e.into()),
        }
    }

    /// What the directory must refuse because of routes: a domain added
    /// that is an alias domain.
    pub fn is_domain_alias(&self, domain: &str) -> bool {
        normalize_domain(domain).is_ok_and(|d| self.domain_aliases.contains_key(&d))
    }

    /// Whether removing `domain` would leave routes dangling (aliases in it
    /// or domain aliases onto it); its catch-all goes with it.
    pub fn blocks_domain_removal(&self, domain: &str) -> bool {
        let Ok(d) = normalize_domain(domain) else {
            return false;
        };
        let suffix = format!("@{d}");
        self.aliases.keys().any(|a| a.ends_with(&suffix)) || self.domain_aliases.values().any(|t| *t == d)
    }

    /// Forgets a removed domain's catch-all.
    pub fn domain_removed(&mut self, domain: &str) {
        if let Ok(d) = normalize_domain(domain) {
            self.catch_all.remove(&d);
        }
    }

    /// The aliases as operators see them, in address order.
    pub fn alias_list(&self) -> Vec<(String, Vec<String>)> {
        self.aliases.iter().map(|(a, t)| (a.clone(), t.clone())).collect()
    }
}

#[cfg(test)]
mod tests;
