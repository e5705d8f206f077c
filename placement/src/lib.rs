//! Placement: where a user's manager lives and where a message's copies go,
//! computed from the membership view alone.
//!
//! Porcupine keeps no table of where users live: every node computes it from
//! the view. This crate is that computation. It owns
//! * the [`View`] (epoch; nodes with id, weight, zone, state) in the form
//!   placement needs, which membership fills in from its replicated state;
//! * the user manager ([`View::user_manager`], [`View::manager_of`]);
//! * the spread ([`View::spread_set`]), the replica set of a new message
//!   ([`View::replica_set`]; [`View::replica_set_near`] prefers the node
//!   that received it) and the repair plan of an existing one
//!   ([`View::repair`]).
//!
//! What it must not do: placement does no I/O, no async, no clock, no
//! randomness; every result depends only on its arguments. No `HashMap`
//! iteration order, no platform `libm` (the logarithm is the crate's own), no
//! thread or time dependence: two nodes with the same view and inputs get
//! the same bits. Membership, loads and message ids come in as arguments.
//!
//! # Design: weighted rendezvous, compiled into a slot table
//!
//! A user's manager is the weighted rendezvous winner among `Up` nodes, but
//! over *slots* rather than over users: the user key (first 8 bytes of
//! blake3 of the normalized address) picks one of `2^22` slots by its top
//! bits, and each slot is owned by the node that wins the weighted
//! rendezvous race for it (`-ln(u) / weight` smallest). The view build
//! computes the whole slot table; a lookup is one shift and one `u16` load.
//!
//! Why, by measurement (`cargo run --release -p placement --example
//! placement_bench`, one core of the 2-core development VM; full tables in
//! the root BENCHMARKS.md):
//! * per-key rendezvous is exactly balanced (max/mean 1.020 for 1 M users on
//!   100 nodes) and minimally disruptive, but a lookup scores every node:
//!   33 M/s at 10 nodes, 3.5 M/s at 100, 0.4 M/s at 1 000, even with the
//!   cheapest equal-weight score;
//! * a ring with virtual nodes balances only as well as its vnode count
//!   allows (a node's share varies by `1/sqrt(vnodes)`): max/mean 1.106 with
//!   1 000 vnodes per node and 1.048 with 4 000 (at the 1.05 limit), where it
//!   takes 38 MiB and gives 1.5 M lookups/s at 1 000 nodes (a binary search
//!   that misses cache at every level);
//! * the slot table looks up at ~100 M/s at 10, 100 and 1 000 nodes alike,
//!   balances to max/mean 1.027-1.031 over random 100-node views, moves
//!   0.998 % of users when a 101st node joins (ideal 0.990 %), gives weight-2
//!   nodes 1.995-2.015× the users of weight-1 nodes, and takes a fixed
//!   8 MiB. Its cost is the build: 0.24 s at 10 or 100 nodes, 0.38 s at
//!   1 000, where filling the same kind of table by scoring every (slot,
//!   node) pair takes 0.12 s, 1.1 s and ~11 s. The build computes the
//!   rendezvous as a race of per-node Poisson streams (see the `table`
//!   module), so its cost barely depends on the node count. A view is built
//!   once per membership change; call [`View::new`] off any async executor.
//!
//! The string path (`user_manager(&str)`: normalize, blake3, look up) runs at
//! ~4-5 M/s: blake3 of a ~20-byte address alone manages ~14 M/s here, so
//! callers that need more hash once into a [`UserKey`] and reuse it.
//!
//! Spreads and replica sets are computed per call with per-user rendezvous
//! over the up nodes (O(N) scoring, then sorting a handful): they run once
//! per delivered message, not once per lookup. Measured: `spread_set(S=4)`
//! 2.7 M/s at 10 nodes, 0.44 M/s at 100, 68 k/s at 1 000;
//! `replica_set(R=2, S=4)` 1.0 M/s, 0.36 M/s, 53 k/s.

mod hash;
mod select;
mod table;
mod view;

pub use hash::{MessageKey, UserKey, normalize_user};
pub use select::{LoadVector, NEAR_LOAD_SLACK, RepairPlan, UNKNOWN_LOAD};
pub use view::{
    DEFAULT_SLOT_BITS, MAX_NODES, MAX_SLOT_BITS, MIN_SLOT_BITS, NodeId, NodeInfo, NodeState, View, ViewError, ViewSpec,
};
