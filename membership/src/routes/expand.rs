//! The read side: an address expanded to the users and remote addresses
//! that get its mail, bounded in depth and in final recipients, run at
//! RCPT on every node alike.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::*;
use crate::directory::{DirectoryState, normalize_address, normalize_domain};

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
pub(super) fn is_local(dir: &DirectoryState, routes: &Routes, domain: &str) -> bool {
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
