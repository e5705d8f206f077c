//! The cluster's blocklists and access rules as this node looks them up:
//! each list decoded once into a [`RangeTable`] when the Raft state's
//! version of it changes (not per connection), shared by every session.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use membership::blocklist::{Blocklists, RANGES_MAX, Range, RangeTable, parse_range};
use tokio::sync::watch;
use tracing::{info, warn};

/// How often a node looks for a change of the lists.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// What the lists and rules say about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// An `access allow` rule: no list, DNS blocklist or greylisting.
    Allowed,
    /// An `access deny` rule.
    Denied,
    /// Listed by this list (the first by name).
    Listed(String),
    Clear,
}

/// The tables of one version of the Raft state's lists.
#[derive(Debug, Default)]
pub struct Tables {
    pub version: u64,
    /// Name -> (the list's version, its table).
    pub lists: BTreeMap<String, (u64, Arc<RangeTable>)>,
    pub allow: RangeTable,
    pub deny: RangeTable,
}

impl Tables {
    pub fn check(&self, ip: IpAddr) -> Local {
        if self.allow.contains(ip) {
            return Local::Allowed;
        }
        if self.deny.contains(ip) {
            return Local::Denied;
        }
        for (name, (_, t)) in &self.lists {
            if t.contains(ip) {
                return Local::Listed(name.clone());
            }
        }
        Local::Clear
    }

    /// The next tables for `state`, reusing those of lists whose version
    /// did not change.
    pub fn rebuild(&self, state: &Blocklists) -> Tables {
        let mut lists = BTreeMap::new();
        for (name, l) in &state.lists {
            match self.lists.get(name) {
                Some((v, t)) if *v == l.version => {
                    lists.insert(name.clone(), (*v, t.clone()));
                }
                _ => match RangeTable::decode(&l.data, RANGES_MAX) {
                    Ok(t) => {
                        lists.insert(name.clone(), (l.version, Arc::new(t)));
                    }
                    // The state machine checked it: not expected.
                    Err(e) => warn!(list = %name, error = %e, "blocklist not readable; skipped"),
                },
            }
        }
        let (mut allow, mut deny) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for (cidr, yes) in &state.access {
            let to = if *yes { &mut allow } else { &mut deny };
            match parse_range(cidr) {
                Ok(Range::V4(a, b)) => to.0.push((a, b)),
                Ok(Range::V6(a, b)) => to.1.push((a, b)),
                Err(e) => warn!(%cidr, error = %e, "access rule not readable; skipped"),
            }
        }
        Tables {
            version: state.version,
            lists,
            allow: RangeTable::from_ranges(allow.0, allow.1),
            deny: RangeTable::from_ranges(deny.0, deny.1),
        }
    }
}

/// The tables in force on this node.
#[derive(Debug, Default)]
pub struct Lists {
    now: RwLock<Arc<Tables>>,
}

impl Lists {
    pub fn get(&self) -> Arc<Tables> {
        self.now.read().expect("lists lock").clone()
    }

    pub fn set(&self, t: Tables) {
        *self.now.write().expect("lists lock") = Arc::new(t);
    }

    pub fn check(&self, ip: IpAddr) -> Local {
        self.get().check(ip)
    }
}

/// Keeps `lists` at the Raft state's, from start to shutdown.
pub async fn follow(lists: Arc<Lists>, membership: membership::Membership, mut stop: watch::Receiver<bool>) {
    loop {
        refresh(&lists, &membership).await;
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Brings `lists` to the Raft state's as applied here, if it changed
/// (also once at start, before the listeners open).
pub async fn refresh(lists: &Lists, membership: &membership::Membership) {
    let version = membership.blocklists_version();
    if version == lists.get().version {
        return;
    }
    let started = Instant::now();
    let old = lists.get();
    // Copy out the lists that changed (the read lock holds up applying
    // entries): decoding happens after.
    let state = membership.with_blocklists(|b| Blocklists {
        version: b.version,
        lists: b
            .lists
            .iter()
            .map(|(n, l)| match old.lists.get(n) {
                Some((v, _)) if *v == l.version => (
                    n.clone(),
                    membership::blocklist::StoredList {
                        version: l.version,
                        loaded_at_ms: l.loaded_at_ms,
                        ranges: l.ranges,
                        data: Vec::new(),
                    },
                ),
                _ => (n.clone(), l.clone()),
            })
            .collect(),
        staging: BTreeMap::new(),
        access: b.access.clone(),
    });
    match tokio::task::spawn_blocking(move || old.rebuild(&state)).await {
        Ok(t) => {
            let ranges: usize = t.lists.values().map(|(_, t)| t.len()).sum();
            info!(
                version = t.version,
                lists = t.lists.len(),
                ranges,
                ms = started.elapsed().as_millis() as u64,
                "blocklists applied"
            );
            lists.set(t);
        }
        Err(e) => warn!(error = %e, "blocklists not rebuilt"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membership::blocklist::{BlocklistCommand, load_commands};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_wins_then_deny_then_the_lists_and_unchanged_lists_are_reused() {
        let mut state = Blocklists::default();
        let load = |state: &mut Blocklists, name: &str, text: &str| {
            let t = RangeTable::parse(text).unwrap();
            for c in load_commands(name, 1, &t.encode(), 5) {
                state.apply(&c).unwrap();
            }
        };
        load(&mut state, "a", "10.0.0.0/8\n");
        load(&mut state, "b", "192.0.2.0/24\n2001:db8::/32\n");
        let t1 = Tables::default().rebuild(&state);
        assert_eq!(t1.check(ip("10.1.2.3")), Local::Listed("a".into()));
        assert_eq!(t1.check(ip("::ffff:192.0.2.7")), Local::Listed("b".into()));
        assert_eq!(t1.check(ip("2001:db8::5")), Local::Listed("b".into()));
        assert_eq!(t1.check(ip("11.0.0.1")), Local::Clear);
        for (cidr, allow) in [("10.9.0.0/16", true), ("10.9.9.9", false), ("11.0.0.0/8", false)] {
            let c = BlocklistCommand::SetAccess {
                cidr: cidr.into(),
                allow,
            };
            state.apply(&c).unwrap();
        }
        load(&mut state, "a", "10.0.0.0/8\n172.16.0.0/12\n");
        let t2 = t1.rebuild(&state);
        assert_eq!(t2.check(ip("10.9.9.9")), Local::Allowed, "allow wins over deny");
        assert_eq!(t2.check(ip("11.2.3.4")), Local::Denied);
        assert_eq!(t2.check(ip("172.20.0.1")), Local::Listed("a".into()));
        assert!(
            Arc::ptr_eq(&t1.lists["b"].1, &t2.lists["b"].1),
            "b was not decoded again"
        );
        assert!(!Arc::ptr_eq(&t1.lists["a"].1, &t2.lists["a"].1));
    }
}
