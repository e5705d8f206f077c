//! The first step of a commit: what a batch writes, decided under the
//! index lock against the index as it was before the batch (which bodies,
//! entries and tombstones; one change per entry and batch: a change of an
//! entry the batch already changes waits for the next batch). Nothing is
//! written here and the index is not changed.

use std::collections::HashSet;

use tracing::error;

use super::*;
use crate::record::DeleteRecord;
use crate::{BodyHash, MarkChange, MessageId, SetChange, Tombstone};

/// What a batch will do, decided.
#[derive(Default)]
pub(super) struct Plan {
    /// The records to write, in order.
    pub(super) pieces: Vec<Piece>,
    /// Who to answer once they are durable, and with what.
    pub(super) dones: Vec<Done>,
    /// Segments to drop once the batch is durable.
    pub(super) drops: Vec<(u32, Reply<bool>)>,
    /// Operations put off to the next batch.
    pub(super) carry: Vec<Op>,
    /// Whether the batch delivers (a full disk reclaims only otherwise).
    pub(super) delivered: bool,
    new_bodies: HashSet<BodyHash>,
    deleted: HashSet<(String, MessageId)>,
    moved_bodies: HashSet<BodyHash>,
    new_entries: HashSet<(String, MessageId)>,
    /// Entries this batch marks (a later Place of one waits for the next
    /// batch, and a later Mark merges into the same record).
    marked: HashSet<(String, MessageId)>,
}

impl Plan {
    pub(super) fn decide(index: &Index, batch: Vec<Op>) -> Plan {
        let mut plan = Plan::default();
        for op in batch {
            plan.op(index, op);
        }
        plan
    }

    fn op(&mut self, index: &Index, op: Op) {
        match op {
            Op::Deliver {
                delivery,
                hash,
                copy,
                reply,
            } => self.deliver(index, delivery, hash, copy, reply),
            Op::Delete { user, tombs, reply } => self.delete(index, user, tombs, reply),
            Op::Relocate { seg, items, reply } => self.relocate(index, seg, items, reply),
            Op::DropSegment { seg, reply } => self.drops.push((seg, reply)),
            Op::Place {
                user,
                changes,
                me,
                reply,
            } if changes.iter().any(|c| self.marked.contains(&(user.clone(), c.id))) => {
                self.carry.push(Op::Place {
                    user,
                    changes,
                    me,
                    reply,
                });
            }
            Op::Mark { user, changes, reply }
                if changes.iter().any(|c| {
                    let key = (user.clone(), c.id);
                    self.new_entries.contains(&key) && !self.marked.contains(&key)
                }) =>
            {
                self.carry.push(Op::Mark { user, changes, reply });
            }
            Op::Mark { user, changes, reply } => self.mark(index, user, changes, reply),
            Op::Place {
                user,
                changes,
                me,
                reply,
            } => self.place(index, user, changes, me, reply),
        }
    }

    fn deliver(&mut self, index: &Index, delivery: Delivery, hash: BodyHash, copy: CopyOf, reply: Reply<()>) {
        let CopyOf { placed, prior, marks } = copy;
        self.delivered = true;
        let size = delivery.body.len() as u64;
        let live = index.bodies.get(&hash).is_some_and(|b| b.refs > 0);
        let mut delivery = delivery;
        if !live && self.new_bodies.insert(hash) {
            self.pieces.push(Piece::Body {
                hash,
                bytes: std::mem::take(&mut delivery.body),
            });
        }
        for user in delivery.users {
            // Delivering the same id again is a no-op
            // (idempotent); a deleted id stays deleted.
            let key = (user.clone(), delivery.id);
            // A move marker refuses only copies of sets as
            // old as the one it was dropped for.
            let refused = index
                .tomb(&user, &delivery.id)
                .is_some_and(|t| t.moved.as_ref().is_none_or(|(_, v)| placed <= *v));
            if index.entry(&user, &delivery.id).is_some()
                || refused
                || self.deleted.contains(&key)
                || !self.new_entries.insert(key)
            {
                continue;
            }
            let rec = EntryRecord {
                user,
                meta: EntryMeta {
                    placed,
                    prior: prior.clone(),
                    marks: marks.clone(),
                    ..EntryMeta::delivered(
                        delivery.id,
                        hash,
                        size,
                        delivery.arrival_ms,
                        delivery.folder.clone(),
                        delivery.replicas.clone(),
                    )
                },
            };
            self.pieces.push(Piece::Entry(rec));
        }
        self.dones.push(Done::Deliver(reply));
    }

    fn delete(&mut self, index: &Index, user: String, tombs: Vec<Tombstone>, reply: Reply<usize>) {
        let mut n = 0;
        for t in tombs {
            let key = (user.clone(), t.id);
            // A deletion replaces a move marker.
            if index.tomb(&user, &t.id).is_some_and(Tomb::is_deletion) || !self.deleted.insert(key.clone()) {
                continue;
            }
            let entry = index.entry(&user, &t.id);
            // Sent to the earlier members too: one may still
            // hold a copy of an older set.
            let replicas = match (entry, index.tomb(&user, &t.id)) {
                (Some(e), _) => e.meta.everyone(),
                // Over a move marker: to the nodes it names
                // too (the new set among them).
                (None, Some(marker)) => {
                    let mut all: Vec<u64> = marker.replicas.iter().chain(&t.replicas).copied().collect();
                    all.sort_unstable();
                    all.dedup();
                    all
                }
                (None, None) => t.replicas,
            };
            if entry.is_some() || self.new_entries.contains(&key) {
                n += 1;
            }
            let rec = DeleteRecord {
                user: user.clone(),
                id: t.id,
                hlc: t.hlc,
                replicas,
                moved: None,
            };
            self.pieces.push(Piece::Tomb(rec));
        }
        self.dones.push(Done::Delete(reply, n));
    }

    fn relocate(&mut self, index: &Index, from: u32, items: Vec<Relocation>, reply: Reply<u64>) {
        let mut n = 0;
        for item in items {
            match item {
                Relocation::Body { hash, bytes } => {
                    let still = index.bodies.get(&hash).is_some_and(|b| b.seg == from && b.refs > 0);
                    if still && self.moved_bodies.insert(hash) && self.new_bodies.insert(hash) {
                        self.pieces.push(Piece::Body { hash, bytes });
                        n += 1;
                    }
                }
                Relocation::Lost { hash } => {
                    let victims: Vec<(String, MessageId)> = index
                        .mailboxes
                        .iter()
                        .flat_map(|(user, m)| {
                            m.entries
                                .values()
                                .filter(|e| e.meta.body == hash)
                                .map(|e| (user.clone(), e.meta.id))
                        })
                        .collect();
                    for (user, id) in victims {
                        if self.deleted.insert((user.clone(), id)) {
                            // Not a deletion, so no tombstone (it would
                            // spread to the other replicas): the entry
                            // is forgotten here, and stays forgotten
                            // after a restart because its body record
                            // goes with this segment. Anti-entropy
                            // brings a good copy back from a replica.
                            error!(%user, %id, "message body corrupt on disk; copy removed here");
                            self.pieces.push(Piece::Forget { user, id });
                        }
                    }
                }
                Relocation::Tomb(rec) => {
                    let still = index.tomb(&rec.user, &rec.id).is_some_and(|t| t.loc.seg == from)
                        && !self.deleted.contains(&(rec.user.clone(), rec.id));
                    if still {
                        self.pieces.push(Piece::Tomb(rec));
                        n += 1;
                    }
                }
                Relocation::Entry(rec) => {
                    let still = index.entry(&rec.user, &rec.meta.id).is_some_and(|e| e.loc.seg == from)
                        && !self.deleted.contains(&(rec.user.clone(), rec.meta.id));
                    if still {
                        self.pieces.push(Piece::Entry(rec));
                        n += 1;
                    }
                }
            }
        }
        self.dones.push(Done::Relocate(reply, n));
    }

    fn mark(&mut self, index: &Index, user: String, changes: Vec<MarkChange>, reply: Reply<usize>) {
        let mut n = 0;
        for c in changes {
            let key = (user.clone(), c.id);
            if self.deleted.contains(&key) {
                continue;
            }
            if self.marked.contains(&key) {
                // Marked twice in this batch: merged into
                // the record the first one wrote.
                let Some(Piece::Entry(rec)) = self
                    .pieces
                    .iter_mut()
                    .rev()
                    .find(|p| matches!(p, Piece::Entry(r) if r.meta.id == c.id && r.user == user))
                else {
                    continue;
                };
                if rec.meta.apply_marks(&c) {
                    n += 1;
                }
                continue;
            }
            // Not held: nothing to mark (a copy made later
            // gets the marks of the copy it is made from,
            // and anti-entropy merges the rest).
            let Some(e) = index.entry(&user, &c.id) else {
                continue;
            };
            let mut meta = e.meta.clone();
            if meta.apply_marks(&c) {
                self.marked.insert(key.clone());
                self.new_entries.insert(key);
                self.pieces.push(Piece::Entry(record_of(&user, &meta)));
                n += 1;
            }
        }
        self.dones.push(Done::Mark(reply, n));
    }

    fn place(&mut self, index: &Index, user: String, changes: Vec<SetChange>, me: u64, reply: Reply<Vec<Placed>>) {
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            let SetChange {
                id,
                replicas,
                prior,
                placed,
            } = change;
            let key = (user.clone(), id);
            let tomb = index.tomb(&user, &id);
            if let Some(t) = tomb.filter(|t| t.is_deletion()) {
                out.push(Placed::Deleted(Tombstone {
                    id,
                    hlc: t.hlc,
                    replicas: t.replicas.clone(),
                }));
                continue;
            }
            // A move marker naming the set and its earlier
            // members, this node among them.
            let marker = |old: &[u64]| {
                let mut all: Vec<u64> = replicas.iter().chain(&prior).chain(old).copied().collect();
                all.push(me);
                all.sort_unstable();
                all.dedup();
                DeleteRecord {
                    user: user.clone(),
                    id,
                    hlc: placed,
                    replicas: all,
                    moved: Some((replicas.clone(), placed)),
                }
            };
            // Decided against the index as it was before
            // this batch: one change per entry and batch.
            let entry = index.entry(&user, &id);
            let fresh = !self.deleted.contains(&key) && self.new_entries.insert(key.clone());
            if !fresh {
                out.push(Placed::Absent);
                continue;
            }
            let Some(e) = entry else {
                // Not held: a marker if this node is among
                // the earlier members (so that it refuses a
                // copy of an older set and agrees with the
                // holders in anti-entropy); a member of the
                // new set fetches its copy instead.
                let older = tomb.is_none_or(|t| t.moved.as_ref().is_some_and(|(_, v)| *v < placed));
                if !replicas.contains(&me) && prior.contains(&me) && older {
                    self.deleted.insert(key.clone());
                    self.pieces.push(Piece::Tomb(marker(&[])));
                }
                out.push(Placed::Absent);
                continue;
            };
            if e.meta.placed >= placed {
                out.push(Placed::Kept { placed: e.meta.placed });
            } else if replicas.contains(&me) {
                let mut meta = e.meta.clone();
                meta.replicas = replicas;
                meta.prior = prior;
                meta.placed = placed;
                self.pieces.push(Piece::Entry(record_of(&user, &meta)));
                out.push(Placed::Updated);
            } else {
                // Dropped here, with a marker naming the new set.
                self.deleted.insert(key.clone());
                self.pieces.push(Piece::Tomb(marker(&e.meta.replicas)));
                out.push(Placed::Dropped);
            }
        }
        self.dones.push(Done::Place(reply, out));
    }
}
