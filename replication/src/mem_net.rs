//! An in-memory [`Network`] for fast, seeded tests of the replica protocol:
//! nodes register their replicator with a shared [`MemRouter`]; the router
//! can take nodes down and lose requests or replies, deciding each loss from
//! the seed and a per-link counter so that a run repeats from its seed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use crate::replica::{Answer, BoxFuture, Call, Network, NodeId, Replicator, TransportError};

/// Something that serves calls: a replicator.
pub trait Serve: Send + Sync + 'static {
    fn serve_call(&self, call: Call) -> BoxFuture<'_, Answer>;
}

impl<N: Network> Serve for Replicator<N> {
    fn serve_call(&self, call: Call) -> BoxFuture<'_, Answer> {
        Box::pin(self.handle(call))
    }
}

#[derive(Default)]
struct RouterState {
    nodes: HashMap<NodeId, Weak<dyn Serve>>,
    down: HashSet<NodeId>,
    /// Per mille of requests lost before, and of replies lost after, the
    /// receiver acts.
    loss_request: u32,
    loss_reply: u32,
    counters: HashMap<(NodeId, NodeId), u64>,
    lost: u64,
}

/// The shared "network" of one simulated cluster.
#[derive(Default)]
pub struct MemRouter {
    seed: u64,
    state: Mutex<RouterState>,
}

impl std::fmt::Debug for MemRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemRouter").field("seed", &self.seed).finish()
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl MemRouter {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(MemRouter {
            seed,
            state: Mutex::new(RouterState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The network endpoint of node `me`.
    pub fn net(self: &Arc<Self>, me: NodeId) -> MemNet {
        MemNet {
            router: self.clone(),
            me,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn register(&self, id: NodeId, node: Weak<dyn Serve>) {
        self.state().nodes.insert(id, node);
    }

    pub fn set_down(&self, id: NodeId, down: bool) {
        let mut s = self.state();
        if down {
            s.down.insert(id);
        } else {
            s.down.remove(&id);
        }
    }

    /// Loss rates in per mille.
    pub fn set_loss(&self, request: u32, reply: u32) {
        let mut s = self.state();
        s.loss_request = request.min(1000);
        s.loss_reply = reply.min(1000);
    }

    /// Calls lost so far.
    pub fn lost(&self) -> u64 {
        self.state().lost
    }

    /// Whether to lose the next message on `from → to` at `rate` per mille.
    fn roll(&self, from: NodeId, to: NodeId, rate: u32) -> bool {
        if rate == 0 {
            return false;
        }
        let mut s = self.state();
        let c = s.counters.entry((from, to)).or_default();
        *c += 1;
        let r = splitmix(self.seed ^ splitmix(from ^ splitmix(to ^ splitmix(*c)))) % 1000;
        let lose = r < u64::from(rate);
        if lose {
            s.lost += 1;
        }
        lose
    }
}

/// One node's end of the in-memory network.
#[derive(Debug, Clone)]
pub struct MemNet {
    router: Arc<MemRouter>,
    me: NodeId,
}

impl Network for MemNet {
    fn call(&self, to: NodeId, call: Call) -> BoxFuture<'_, Result<Answer, TransportError>> {
        Box::pin(async move {
            let (target, rate_req, rate_rep) = {
                let s = self.router.state();
                if s.down.contains(&to) || s.down.contains(&self.me) {
                    return Err(TransportError(format!("node {to} unreachable")));
                }
                (s.nodes.get(&to).and_then(|w| w.upgrade()), s.loss_request, s.loss_reply)
            };
            let target = target.ok_or_else(|| TransportError(format!("node {to} unknown")))?;
            if self.router.roll(self.me, to, rate_req) {
                return Err(TransportError(format!("request to node {to} lost")));
            }
            let answer = target.serve_call(call).await;
            if self.router.roll(to, self.me, rate_rep) {
                return Err(TransportError(format!("reply from node {to} lost")));
            }
            Ok(answer)
        })
    }
}
