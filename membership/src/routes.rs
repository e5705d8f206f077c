//! Recipients that are not users (feature level 3): aliases, domain
//! aliases, catch-all addresses and sub-addressing, and their expansion to
//! the users and remote addresses that get the mail.
//!
//! Kept in the Raft state beside the directory, so that every node expands
//! an address the same way, locally. [`Routes::apply`] is the write logic
//! (deterministic, checked against the directory: an alias that would reach
//! itself is refused with the loop it makes); [`expand`] is the read side,
//! bounded in depth and in final recipients, run at RCPT.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::directory::{DirectoryState, UserRecord, normalize_address, normalize_domain};

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

/// Why an address has no recipients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ExpandError {
    /// Not one of our domains (nor an alias of one).
    #[error("not a local domain")]
    NotLocal,
    /// The domain is ours but nothing takes this address, or every target
    /// it names is gone.
    #[error("no such user")]
    Unknown,
    #[error("alias loop: {}", .0.join(" -> "))]
    Loop(Vec<String>),
    #[error("aliases nested deeper than {EXPANSION_DEPTH_MAX}")]
    TooDeep,
    #[error("more than {EXPANSION_RECIPIENTS_MAX} recipients")]
    TooMany,
}

/// Where one address's mail goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// Local users, each once, with the sub-address tag the address named
    /// the user by (`user+tag@`), if any.
    pub local: Vec<(UserRecord, Option<String>)>,
    /// Remote addresses it is forwarded to, each once.
    pub remote: Vec<String>,
    /// Whether the address was reached through an alias, a domain alias or
    /// a catch-all (not a user named directly).
    pub routed: bool,
}

/// A user's address as scripts are kept under.
pub fn normalize_user(user: &str) -> Option<String> {
    normalize_address(user).ok()
}

/// Whether `domain` (normalized) takes mail here.
fn is_local(dir: &DirectoryState, routes: &Routes, domain: &str) -> bool {
    dir.domains.contains(domain) || routes.domain_aliases.contains_key(domain)
}

/// Expands `address` to its final recipients.
pub fn expand(dir: &DirectoryState, routes: &Routes, address: &str) -> Result<Expansion, ExpandError> {
    let Ok(a) = normalize_address(address) else {
        return match address.rsplit_once('@').map(|(_, d)| normalize_domain(d)) {
            Some(Ok(d)) if is_local(dir, routes, &d) => Err(ExpandError::Unknown),
            _ => Err(ExpandError::NotLocal),
        };
    };
    let mut walk = Walk {
        dir,
        routes,
        path: Vec::new(),
        out: Expansion::default(),
        seen: BTreeSet::new(),
    };
    let found = walk.visit(&a, 0)?;
    if !found || (walk.out.local.is_empty() && walk.out.remote.is_empty()) {
        return Err(ExpandError::Unknown);
    }
    Ok(walk.out)
}

struct Walk<'a> {
    dir: &'a DirectoryState,
    routes: &'a Routes,
    /// The addresses from the one asked for to the one being expanded.
    path: Vec<String>,
    out: Expansion,
    /// Final recipients already taken (users by address, remote addresses).
    seen: BTreeSet<String>,
}

impl Walk<'_> {
    /// Expands one normalized address; false if nothing takes it.
    fn visit(&mut self, a: &str, depth: usize) -> Result<bool, ExpandError> {
        if self.path.iter().any(|p| p == a) {
            let mut lp = self.path.clone();
            lp.push(a.to_owned());
            return Err(ExpandError::Loop(lp));
        }
        if depth > EXPANSION_DEPTH_MAX {
            return Err(ExpandError::TooDeep);
        }
        let (local, domain) = a.rsplit_once('@').expect("normalized");
        if !is_local(self.dir, self.routes, domain) {
            if depth == 0 {
                return Err(ExpandError::NotLocal);
            }
            self.take(a.to_owned(), None, None)?;
            return Ok(true);
        }
        if let Some(user) = self.dir.users.get(a) {
            self.take(a.to_owned(), Some(user.clone()), None)?;
            return Ok(true);
        }
        self.path.push(a.to_owned());
        let found = self.visit_routes(a, local, domain, depth);
        self.path.pop();
        found
    }

    fn visit_routes(&mut self, a: &str, local: &str, domain: &str, depth: usize) -> Result<bool, ExpandError> {
        let routes = self.routes;
        if let Some(targets) = routes.aliases.get(a) {
            self.out.routed = true;
            let mut any = false;
            for t in targets {
                any |= self.visit(t, depth + 1)?;
            }
            return Ok(any);
        }
        if let Some(target) = routes.domain_aliases.get(domain) {
            self.out.routed = true;
            return self.visit(&format!("{local}@{target}"), depth + 1);
        }
        if let Some((user, tag)) = local.split_once(SUBADDRESS_SEPARATOR)
            && !user.is_empty()
        {
            let base = format!("{user}@{domain}");
            if let Some(u) = self.dir.users.get(&base) {
                let tag = (!tag.is_empty()).then(|| tag.to_owned());
                self.take(base, Some(u.clone()), tag)?;
                return Ok(true);
            }
            if routes.aliases.contains_key(&base) || routes.domain_aliases.contains_key(domain) {
                return self.visit(&base, depth + 1);
            }
        }
        if let Some(target) = routes.catch_all.get(domain) {
            self.out.routed = true;
            return self.visit(target, depth + 1);
        }
        Ok(false)
    }

    fn take(&mut self, key: String, user: Option<UserRecord>, tag: Option<String>) -> Result<(), ExpandError> {
        if !self.seen.insert(key.clone()) {
            return Ok(());
        }
        if self.seen.len() > EXPANSION_RECIPIENTS_MAX {
            return Err(ExpandError::TooMany);
        }
        match user {
            Some(u) => self.out.local.push((u, tag)),
            None => self.out.remote.push(key),
        }
        Ok(())
    }
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
mod tests {
    use super::*;
    use crate::directory::DirectoryCommand;

    fn dir() -> DirectoryState {
        let mut d = DirectoryState::default();
        for c in [
            DirectoryCommand::AddDomain {
                domain: "example.org".into(),
            },
            DirectoryCommand::AddDomain {
                domain: "other.org".into(),
            },
        ] {
            d.apply(&c).unwrap();
        }
        for u in ["alice@example.org", "bob@example.org", "carol@other.org"] {
            d.apply(&DirectoryCommand::AddUser {
                address: u.into(),
                password_hash: "x".into(),
                quota_bytes: None,
            })
            .unwrap();
        }
        d
    }

    fn alias(a: &str, t: &[&str]) -> RoutesCommand {
        RoutesCommand::SetAlias {
            address: a.into(),
            targets: t.iter().map(|s| s.to_string()).collect(),
            srs_key: [7; 32],
        }
    }

    fn users(e: &Expansion) -> Vec<(&str, Option<&str>)> {
        e.local
            .iter()
            .map(|(u, t)| (u.address.as_str(), t.as_deref()))
            .collect()
    }

    #[test]
    fn aliases_expand_to_users_and_remote_addresses_once_each() {
        let mut d = dir();
        let mut r = Routes::default();
        r.apply(
            &alias("Sales@example.org", &["alice@example.org", "bob@example.org"]),
            &mut d,
        )
        .unwrap();
        r.apply(
            &alias(
                "team@example.org",
                &["sales@example.org", "alice@example.org", "x@remote.net"],
            ),
            &mut d,
        )
        .unwrap();
        let e = expand(&d, &r, "TEAM@example.org").unwrap();
        assert_eq!(users(&e), vec![("alice@example.org", None), ("bob@example.org", None)]);
        assert_eq!(e.remote, vec!["x@remote.net".to_owned()]);
        assert!(e.routed);
        assert_eq!(r.srs_key, Some([7; 32]), "the first alias sets the SRS key");
        // A user named directly is not routed; an unknown one is unknown;
        // a foreign domain is not ours.
        let e = expand(&d, &r, "alice@example.org").unwrap();
        assert!(!e.routed);
        assert_eq!(expand(&d, &r, "nobody@example.org"), Err(ExpandError::Unknown));
        assert_eq!(expand(&d, &r, "x@remote.net"), Err(ExpandError::NotLocal));
    }

    #[test]
    fn an_alias_that_reaches_itself_is_refused_naming_the_loop() {
        let mut d = dir();
        let mut r = Routes::default();
        r.apply(&alias("a@example.org", &["alice@example.org"]), &mut d)
            .unwrap();
        r.apply(&alias("b@example.org", &["a@example.org"]), &mut d).unwrap();
        let before = r.clone();
        let err = r
            .apply(&alias("a@example.org", &["b@example.org"]), &mut d)
            .unwrap_err();
        assert_eq!(
            err,
            RouteError::Loop(vec![
                "a@example.org".into(),
                "b@example.org".into(),
                "a@example.org".into()
            ])
        );
        assert_eq!(
            err.to_string(),
            "alias loop: a@example.org -> b@example.org -> a@example.org"
        );
        assert_eq!(r, before, "a refused alias changes nothing");
        // Direct self-reference too.
        assert!(matches!(
            r.apply(&alias("c@example.org", &["c@example.org"]), &mut d),
            Err(RouteError::Loop(_))
        ));
    }

    #[test]
    fn targets_must_exist_and_bounds_hold() {
        let mut d = dir();
        let mut r = Routes::default();
        assert_eq!(
            r.apply(&alias("a@example.org", &["typo@example.org"]), &mut d),
            Err(RouteError::NoSuchTarget("typo@example.org".into()))
        );
        assert_eq!(
            r.apply(&alias("alice@example.org", &["bob@example.org"]), &mut d),
            Err(RouteError::IsUser("alice@example.org".into()))
        );
        assert_eq!(
            r.apply(&alias("a@nowhere.net", &["bob@example.org"]), &mut d),
            Err(RouteError::NotLocal("nowhere.net".into()))
        );
        assert_eq!(
            r.apply(&alias("a@example.org", &[]), &mut d),
            Err(RouteError::TargetCount)
        );
        // A chain deeper than the bound is refused at add.
        let mut prev = "alice@example.org".to_owned();
        for i in 0..EXPANSION_DEPTH_MAX {
            let a = format!("l{i}@example.org");
            r.apply(&alias(&a, &[&prev]), &mut d).unwrap();
            prev = a;
        }
        assert_eq!(
            r.apply(&alias("deep@example.org", &[&prev]), &mut d),
            Err(RouteError::Expansion(ExpandError::TooDeep))
        );
        // More than 1 000 final recipients: refused too.
        let mut r = Routes::default();
        let many: Vec<String> = (0..600).map(|i| format!("u{i}@remote.net")).collect();
        let more: Vec<String> = (600..1200).map(|i| format!("u{i}@remote.net")).collect();
        let refs = |v: &Vec<String>| RoutesCommand::SetAlias {
            address: String::new(),
            targets: v.clone(),
            srs_key: [0; 32],
        };
        let named = |a: &str, c: RoutesCommand| match c {
            RoutesCommand::SetAlias { targets, srs_key, .. } => RoutesCommand::SetAlias {
                address: a.into(),
                targets,
                srs_key,
            },
            c => c,
        };
        r.apply(&named("m1@example.org", refs(&many)), &mut d).unwrap();
        r.apply(&named("m2@example.org", refs(&more)), &mut d).unwrap();
        assert_eq!(
            r.apply(&alias("all@example.org", &["m1@example.org", "m2@example.org"]), &mut d),
            Err(RouteError::Expansion(ExpandError::TooMany))
        );
    }

    #[test]
    fn taps_copy_an_address_or_a_whole_domain_to_a_user() {
        let mut d = dir();
        let mut r = Routes::default();
        let tap = |t: &str, a: Option<&str>| RoutesCommand::SetTap {
            target: t.into(),
            archive: a.map(str::to_owned),
        };
        assert_eq!(
            r.apply(&tap("nowhere.net", Some("carol@other.org")), &mut d),
            Err(RouteError::NotLocal("nowhere.net".into()))
        );
        assert_eq!(
            r.apply(&tap("example.org", Some("ghost@other.org")), &mut d),
            Err(RouteError::NoSuchUser("ghost@other.org".into()))
        );
        r.apply(&tap("Example.ORG", Some("carol@other.org")), &mut d).unwrap();
        r.apply(&tap("alice@example.org", Some("carol@other.org")), &mut d)
            .unwrap();
        assert_eq!(r.taps_for("ALICE@example.org"), ["carol@other.org"], "once");
        assert_eq!(r.taps_for("anyone@example.org"), ["carol@other.org"]);
        assert!(r.taps_for("carol@other.org").is_empty());
        r.apply(&tap("example.org", None), &mut d).unwrap();
        assert!(r.taps_for("anyone@example.org").is_empty());
        assert_eq!(
            r.apply(&tap("example.org", None), &mut d),
            Err(RouteError::NoSuchTap("example.org".into()))
        );
    }

    #[test]
    fn domain_aliases_catch_alls_and_sub_addresses() {
        let mut d = dir();
        let mut r = Routes::default();
        r.apply(
            &RoutesCommand::SetDomainAlias {
                alias: "example.net".into(),
                target: "example.org".into(),
            },
            &mut d,
        )
        .unwrap();
        assert_eq!(
            users(&expand(&d, &r, "alice@example.net").unwrap()),
            vec![("alice@example.org", None)]
        );
        assert_eq!(expand(&d, &r, "nobody@example.net"), Err(ExpandError::Unknown));
        // A domain with users cannot become an alias.
        assert_eq!(
            r.apply(
                &RoutesCommand::SetDomainAlias {
                    alias: "other.org".into(),
                    target: "example.org".into(),
                },
                &mut d
            ),
            Err(RouteError::DomainHasUsers("other.org".into()))
        );
        // Sub-addresses reach the user with the tag; through a domain alias too.
        assert_eq!(
            users(&expand(&d, &r, "alice+lists@example.org").unwrap()),
            vec![("alice@example.org", Some("lists"))]
        );
        assert_eq!(
            users(&expand(&d, &r, "bob+x@example.net").unwrap()),
            vec![("bob@example.org", Some("x"))]
        );
        assert_eq!(expand(&d, &r, "nobody+x@example.org"), Err(ExpandError::Unknown));
        // A catch-all takes what is unknown, not what exists.
        r.apply(
            &RoutesCommand::SetCatchAll {
                domain: "example.org".into(),
                address: Some("bob@example.org".into()),
            },
            &mut d,
        )
        .unwrap();
        assert_eq!(
            users(&expand(&d, &r, "whoever@example.org").unwrap()),
            vec![("bob@example.org", None)]
        );
        assert_eq!(
            users(&expand(&d, &r, "whoever@example.net").unwrap()),
            vec![("bob@example.org", None)]
        );
        assert_eq!(
            users(&expand(&d, &r, "alice@example.org").unwrap()),
            vec![("alice@example.org", None)]
        );
        // A catch-all onto an address of its own domain that only it would
        // take is a loop.
        assert!(matches!(
            r.apply(
                &RoutesCommand::SetCatchAll {
                    domain: "example.org".into(),
                    address: Some("ghost@example.org".into()),
                },
                &mut d
            ),
            Err(RouteError::Loop(_))
        ));
    }
}
