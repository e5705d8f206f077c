//! An in-memory network of nodes for tests: a router that delivers each
//! [`RaftMessage`] to the registered node's [`Membership::handle`], with
//! faults drawn from a seeded generator: lost requests, lost replies,
//! delays, partitions and stopped nodes.
//!
//! Every message and reply goes through the wire codec
//! ([`crate::codec::encode_message`]), so what works here also encodes for
//! the real wire.
//!
//! The fault stream is a function of the seed and the order in which
//! messages are sent; openraft's election timers are randomized by
//! openraft itself, so a seed fixes the faults, not every interleaving.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::cluster::Membership;
use crate::codec;
use crate::network::{RaftCall, RaftMessage, RaftReply, Transport, TransportError};

/// The seeded generator of the faults (testkit's SplitMix64).
pub use testkit::Rng as SplitMix64;

#[derive(Debug)]
struct RouterState {
    nodes: BTreeMap<u64, Membership>,
    /// node -> partition group; nodes in different groups cannot talk.
    /// Absent means group 0.
    groups: BTreeMap<u64, u32>,
    rng: SplitMix64,
    /// Chance that a request, and separately its reply, is lost.
    loss_per_million: u32,
    /// Each delivery waits a uniform 0..=delay_ms_max.
    delay_ms_max: u64,
    sent: u64,
    lost: u64,
}

impl RouterState {
    fn connected(&self, a: u64, b: u64) -> bool {
        self.groups.get(&a).copied().unwrap_or(0) == self.groups.get(&b).copied().unwrap_or(0)
    }
}

/// The in-memory network. Register each node's [`Membership`] after
/// starting it; unregister it before stopping it.
#[derive(Debug)]
pub struct MemRouter {
    state: Mutex<RouterState>,
}

/// One node's end of the [`MemRouter`].
#[derive(Debug, Clone)]
pub struct MemTransport {
    router: Arc<MemRouter>,
    from: u64,
}

/// Where a message goes, decided under the router lock.
enum Route {
    Deliver {
        to: Membership,
        delay: Duration,
        lose_reply: bool,
    },
    Unreachable(&'static str),
    Lost,
}

impl MemRouter {
    pub fn new(seed: u64) -> Arc<MemRouter> {
        Arc::new(MemRouter {
            state: Mutex::new(RouterState {
                nodes: BTreeMap::new(),
                groups: BTreeMap::new(),
                rng: SplitMix64::new(seed),
                loss_per_million: 0,
                delay_ms_max: 0,
                sent: 0,
                lost: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transport node `from` sends with.
    pub fn transport(self: &Arc<Self>, from: u64) -> Arc<dyn Transport> {
        Arc::new(MemTransport {
            router: self.clone(),
            from,
        })
    }

    pub fn register(&self, m: Membership) {
        self.lock().nodes.insert(m.id(), m);
    }

    /// Takes a node off the network (as if stopped); returns its handle.
    pub fn unregister(&self, id: u64) -> Option<Membership> {
        self.lock().nodes.remove(&id)
    }

    pub fn set_loss_per_million(&self, per_million: u32) {
        self.lock().loss_per_million = per_million.min(1_000_000);
    }

    pub fn set_delay_ms_max(&self, ms: u64) {
        self.lock().delay_ms_max = ms;
    }

    /// Splits the network: nodes of different groups cannot talk; nodes in
    /// no group form one more group.
    pub fn partition(&self, groups: &[&[u64]]) {
        let mut s = self.lock();
        s.groups.clear();
        for (i, g) in groups.iter().enumerate() {
            for &id in g.iter() {
                s.groups.insert(id, i as u32 + 1);
            }
        }
    }

    /// Removes every partition.
    pub fn heal(&self) {
        self.lock().groups.clear();
    }

    /// (messages sent, messages or replies lost) so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.sent, s.lost)
    }

    fn route(&self, from: u64, target: u64, addr: &str) -> Route {
        let mut s = self.lock();
        s.sent += 1;
        // Target 0 (a join through a seed): find the node by its address.
        let to = if target == 0 {
            s.nodes
                .values()
                .find(|m| m.view().node(m.id()).is_some_and(|n| n.addrs.cluster == addr))
        } else {
            s.nodes.get(&target)
        };
        let Some(to) = to.cloned() else {
            return Route::Unreachable("not running");
        };
        if !s.connected(from, to.id()) {
            return Route::Unreachable("partitioned");
        }
        let loss = s.loss_per_million;
        if s.rng.chance_per_million(loss) {
            s.lost += 1;
            return Route::Lost;
        }
        let lose_reply = s.rng.chance_per_million(loss);
        if lose_reply {
            s.lost += 1;
        }
        let delay_ms_max = s.delay_ms_max;
        let delay = Duration::from_millis(if delay_ms_max == 0 {
            0
        } else {
            s.rng.below(delay_ms_max + 1)
        });
        Route::Deliver { to, delay, lose_reply }
    }
}

fn failed(node: u64, why: impl ToString) -> TransportError {
    TransportError::Failed {
        node,
        why: why.to_string(),
    }
}

impl Transport for MemTransport {
    fn call<'a>(&'a self, target: u64, addr: &'a str, msg: RaftMessage) -> RaftCall<'a> {
        Box::pin(async move {
            let (to, delay, lose_reply) = match self.router.route(self.from, target, addr) {
                Route::Deliver { to, delay, lose_reply } => (to, delay, lose_reply),
                Route::Unreachable(why) => {
                    return Err(TransportError::Unreachable {
                        node: target,
                        addr: addr.to_owned(),
                        why: why.to_owned(),
                    });
                }
                Route::Lost => return Err(failed(target, "request lost")),
            };
            // Through the wire codec, both ways.
            let bytes = codec::encode_message(&msg).map_err(|e| failed(target, e))?;
            let msg: RaftMessage = codec::decode_message(&bytes).map_err(|e| failed(target, e))?;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let reply = to.handle(msg).await;
            let bytes = codec::encode_message(&reply).map_err(|e| failed(target, e))?;
            let reply: RaftReply = codec::decode_message(&bytes).map_err(|e| failed(target, e))?;
            // The reply crosses the network again: a partition made meanwhile
            // stops it too.
            if lose_reply || !self.router.lock().connected(self.from, to.id()) {
                return Err(failed(target, "reply lost"));
            }
            Ok(reply)
        })
    }
}
