//! The slot table: `2^slot_bits` slots, each owned by the weighted
//! rendezvous winner among the up nodes, computed without evaluating every
//! (slot, node) pair.
//!
//! # Definition
//!
//! Slots are grouped in blocks of [`BLOCK_SLOTS`]. For every block, every
//! node runs its own Poisson process of "arrivals": a splitmix64 stream
//! seeded from `(node seed, block)`, each output giving a slot in the block
//! (top bits) and an `Exp(1)` gap (low bits), with the node's times scaled by
//! `1 / weight`. A slot belongs to the node whose arrival reaches it first;
//! exact ties (never seen in practice) go to the lower node id.
//!
//! Per slot, node `i`'s first arrival is `Exp(weight_i / BLOCK_SLOTS)`,
//! independent of every other node and slot, so the owner is a weighted
//! rendezvous draw: node `i` wins with probability `weight_i / total
//! weight` (exactly, but for the logarithm's 2e-6 absolute error in the
//! exponential gaps, far below anything measurable). And because each
//! node's stream depends only on
//! its own id, the block and its weight:
//! * adding a node only takes slots (to it); removing one only frees its own;
//! * raising a node's weight only shrinks its times, so it only gains slots.
//!
//! # Cost
//!
//! Direct rendezvous costs `slots × nodes` score evaluations (4 G at 1 000
//! nodes and 2^22 slots). The race only has to run each block until every
//! slot has been reached once: about `BLOCK_SLOTS × (ln BLOCK_SLOTS + 0.6)`
//! arrivals per block whatever the node count, plus one stream start per
//! (node, block). How far to run is a scheduling choice that cannot change
//! the result: any slot reached before the current horizon has its true
//! first arrival, because every stream has been run up to that horizon.

use std::hint::select_unpredictable;

use crate::hash::{exp1, mix64, splitmix_next};

/// log2 of the slots per block: 1 024 slots keep a block's scratch arrays
/// (10 KiB) in L1 and the per-(node, block) start-up cost small next to the
/// ~7.5 arrivals per slot the race needs.
pub(crate) const BLOCK_BITS: u32 = 10;
/// Slots per block.
pub(crate) const BLOCK_SLOTS: usize = 1 << BLOCK_BITS;

/// Salt separating block stream seeds from any other use of the node seed.
const BLOCK_SALT: u64 = 0x5ca1_ab1e_b10c_0000;

/// One racing node, as the table builder sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Racer {
    /// Index of the node in the view's sorted node list (the table's value).
    pub(crate) index: u16,
    /// The node's seed (see `hash::node_seed`).
    pub(crate) seed: u64,
    /// The node's weight, > 0.
    pub(crate) weight: u32,
}

/// A node's arrival stream within one block.
struct Stream {
    index: u16,
    state: u64,
    /// Sum of the `Exp(1)` gaps so far (unscaled time).
    elapsed: f64,
    inv_weight: f64,
    next_slot: usize,
    next_time: f64,
}

impl Stream {
    fn start(racer: &Racer, block: u64) -> Stream {
        let mut stream = Stream {
            index: racer.index,
            state: mix64(racer.seed ^ mix64(block ^ BLOCK_SALT)),
            elapsed: 0.0,
            inv_weight: 1.0 / f64::from(racer.weight),
            next_slot: 0,
            next_time: 0.0,
        };
        stream.advance();
        stream
    }

    fn advance(&mut self) {
        let x = splitmix_next(&mut self.state);
        self.next_slot = slot_of(x);
        self.elapsed += gap_of(x);
        self.next_time = self.elapsed * self.inv_weight;
    }
}

/// The slot of an arrival: the top `BLOCK_BITS` bits of the stream output.
#[inline]
fn slot_of(x: u64) -> usize {
    (x >> (64 - BLOCK_BITS)) as usize
}

/// The `Exp(1)` gap before the next arrival, from the low 53 bits of the same
/// output (disjoint from the slot bits: 10 + 53 < 64, so slot and gap are
/// independent).
#[inline]
fn gap_of(x: u64) -> f64 {
    exp1(x)
}

/// Builds the slot table for `racers` (non-empty, distinct indices, sorted by
/// index) with `1 << slot_bits` slots (`slot_bits >= BLOCK_BITS`). Entry `s`
/// is the view index of slot `s`'s owner.
pub(crate) fn build(racers: &[Racer], slot_bits: u32) -> Vec<u16> {
    assert!(!racers.is_empty(), "slot table needs at least one racer");
    assert!(slot_bits >= BLOCK_BITS, "slot table smaller than one block");
    let n_slots = 1usize << slot_bits;
    let n_blocks = n_slots / BLOCK_SLOTS;
    let total_weight: f64 = racers.iter().map(|r| f64::from(r.weight)).sum();
    // Horizon schedule (cost only, never the result; `ln` here may come
    // from any libm). A slot is still unreached at horizon h with
    // probability exp(-h * total_weight / BLOCK_SLOTS): the first horizon
    // leaves 1/e of a slot per block unreached on average, and each later
    // step divides that by e again.
    let step = BLOCK_SLOTS as f64 / total_weight;
    let first_horizon = step * ((BLOCK_SLOTS as f64).ln() + 1.0);

    let mut table = Vec::with_capacity(n_slots);
    let mut best_time = vec![f64::INFINITY; BLOCK_SLOTS];
    let mut owner = vec![u16::MAX; BLOCK_SLOTS];
    let mut streams: Vec<Stream> = Vec::with_capacity(racers.len());
    for block in 0..n_blocks {
        best_time.fill(f64::INFINITY);
        owner.fill(u16::MAX);
        streams.clear();
        streams.extend(racers.iter().map(|r| Stream::start(r, block as u64)));
        let mut horizon = first_horizon;
        loop {
            for stream in &mut streams {
                // Work on locals: keeping the stream's fields in registers
                // instead of memory halves the cost of an arrival.
                let mut next_time = stream.next_time;
                if next_time >= horizon {
                    continue;
                }
                let mut next_slot = stream.next_slot;
                let mut state = stream.state;
                let mut elapsed = stream.elapsed;
                let inv_weight = stream.inv_weight;
                let index = stream.index;
                while next_time < horizon {
                    // Strictly earlier only: streams run in index (= id) order
                    // and a slot settled in an earlier round holds a time below
                    // every time seen now, so an exact tie keeps the lower id.
                    // Branch-free select: whether an arrival wins is a coin
                    // toss the predictor cannot learn, and a mispredict waits
                    // on the whole hash-and-logarithm chain behind it.
                    let held_time = best_time[next_slot];
                    let wins = next_time < held_time;
                    best_time[next_slot] = select_unpredictable(wins, next_time, held_time);
                    owner[next_slot] = select_unpredictable(wins, index, owner[next_slot]);
                    let x = splitmix_next(&mut state);
                    next_slot = slot_of(x);
                    elapsed += gap_of(x);
                    next_time = elapsed * inv_weight;
                }
                *stream = Stream {
                    index,
                    state,
                    elapsed,
                    inv_weight,
                    next_slot,
                    next_time,
                };
            }
            if owner.iter().all(|&o| o != u16::MAX) {
                break;
            }
            horizon += step;
        }
        table.extend_from_slice(&owner);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn racers(n: u16) -> Vec<Racer> {
        (0..n)
            .map(|i| Racer {
                index: i,
                seed: mix64(u64::from(i) + 1),
                weight: 1,
            })
            .collect()
    }

    #[test]
    fn single_racer_owns_everything() {
        let t = build(&racers(1), BLOCK_BITS + 2);
        assert_eq!(t.len(), 4 * BLOCK_SLOTS);
        assert!(t.iter().all(|&o| o == 0));
    }

    #[test]
    fn adding_a_racer_only_takes_slots() {
        let before = build(&racers(5), 14);
        let after = build(&racers(6), 14);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(*a, 5, "a slot moved between old racers");
                moved += 1;
            }
        }
        let expected = (1usize << 14) / 6;
        assert!(moved > expected * 8 / 10 && moved < expected * 12 / 10, "moved {moved}");
    }

    #[test]
    fn heavier_weight_only_gains() {
        let light = racers(4);
        let mut heavy = light.clone();
        heavy[2].weight = 3;
        let a = build(&light, 14);
        let b = build(&heavy, 14);
        for (x, y) in a.iter().zip(&b) {
            if x != y {
                assert_eq!(*y, 2);
            }
        }
        let share = b.iter().filter(|&&o| o == 2).count() as f64 / b.len() as f64;
        assert!((share - 0.5).abs() < 0.03, "share {share}");
    }
}
