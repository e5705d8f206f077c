//! Reads of the index: listings, anti-entropy items and digests, usage,
//! counts, bodies.

use std::sync::atomic::Ordering;

use super::*;
use crate::{BodyHash, EntryMeta, MessageId, Moved, SyncItem, Tombstone};

impl FragmentStore {
    /// The user's mailbox entries, oldest first.
    pub fn list(&self, user: &str) -> Vec<EntryMeta> {
        let index = self.shared.index();
        index
            .mailboxes
            .get(user)
            .map(|m| m.entries.values().map(|e| e.meta.clone()).collect())
            .unwrap_or_default()
    }

    /// Every message of the user held here or deleted here (tombstones),
    /// restricted to those whose replica set includes `peer` when given.
    pub fn sync_items(&self, user: &str, peer: Option<u64>) -> Vec<SyncItem> {
        let index = self.shared.index();
        let Some(m) = index.mailboxes.get(user) else {
            return Vec::new();
        };
        let wanted = |replicas: &[u64]| peer.is_none_or(|p| replicas.contains(&p));
        let mut out: Vec<SyncItem> = m
            .entries
            .values()
            .filter(|e| peer.is_none_or(|p| e.meta.involves(p)))
            .map(|e| SyncItem::Live(e.meta.clone()))
            .chain(
                m.tombstones
                    .iter()
                    .filter(|(_, t)| wanted(&t.replicas))
                    .map(|(id, t)| match &t.moved {
                        None => SyncItem::Dead(Tombstone {
                            id: *id,
                            hlc: t.hlc,
                            replicas: t.replicas.clone(),
                        }),
                        Some((to, placed)) => SyncItem::Moved(Moved {
                            id: *id,
                            replicas: t.replicas.clone(),
                            to: to.clone(),
                            placed: *placed,
                        }),
                    }),
            )
            .collect();
        out.sort_by_key(|i| i.id());
        out
    }

    /// For every user with messages (or tombstones) whose replica set
    /// includes `peer`: a digest of those messages' ids and whether each is
    /// held or deleted. Two replicas that agree compute the same digest.
    /// A walk of the whole index: it takes the index lock for
    /// [`WALK_CHUNK_USERS`] mailboxes at a time, so the writer (and every
    /// delivery) waits for one chunk, not for the walk. Blocking for as long
    /// as the walk takes: from async code use
    /// [`FragmentStore::peer_digests_async`].
    pub fn peer_digests(&self, peer: u64) -> Vec<(String, [u8; 32])> {
        peer_digests(&self.shared, peer)
    }

    /// [`FragmentStore::peer_digests`] on a blocking thread.
    pub async fn peer_digests_async(&self, peer: u64) -> Vec<(String, [u8; 32])> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || peer_digests(&shared, peer))
            .await
            .unwrap_or_default()
    }

    /// The digest [`FragmentStore::peer_digests`] computes for one user
    /// (all zeros when nothing of the user concerns `peer`).
    pub fn digest(&self, user: &str, peer: u64) -> [u8; 32] {
        let index = self.shared.index();
        index
            .mailboxes
            .get(user)
            .and_then(|m| mailbox_digest(m, peer))
            .unwrap_or([0; 32])
    }

    /// Those of `ids` that the user's tombstones here name (deleted here).
    pub fn tombstoned(&self, user: &str, ids: &[MessageId]) -> Vec<MessageId> {
        let index = self.shared.index();
        let Some(m) = index.mailboxes.get(user) else {
            return Vec::new();
        };
        ids.iter()
            .copied()
            .filter(|id| m.tombstones.get(id).is_some_and(|t| t.is_deletion()))
            .collect()
    }

    /// Whether any entry of the user is held here.
    pub fn holds(&self, user: &str) -> bool {
        let index = self.shared.index();
        index.mailboxes.get(user).is_some_and(|m| !m.entries.is_empty())
    }

    /// Entries and bytes per user held here (users with entries only), a
    /// chunk of mailboxes at a time.
    pub fn usage(&self) -> Vec<UserUsage> {
        FragmentStore::usage_of(&self.shared)
    }

    fn usage_of(shared: &Shared) -> Vec<UserUsage> {
        let mut out = Vec::new();
        for_each_mailbox_chunk(shared, |index, users| {
            for user in users {
                if let Some(m) = index.mailboxes.get(user)
                    && !m.entries.is_empty()
                {
                    out.push(UserUsage {
                        user: user.clone(),
                        entries: m.entries.len() as u64,
                        bytes: m.usage_bytes,
                    });
                }
            }
        });
        out.sort_by(|a, b| a.user.cmp(&b.user));
        out
    }

    /// [`FragmentStore::usage`] on a blocking thread.
    pub async fn usage_async(&self) -> Vec<UserUsage> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || FragmentStore::usage_of(&shared))
            .await
            .unwrap_or_default()
    }

    /// Whether a body is held here (so a copy need not travel).
    pub fn has_body(&self, hash: &BodyHash) -> bool {
        self.shared.index().bodies.contains_key(hash)
    }

    /// Entries held here whose replica set has fewer than `n_replicas`
    /// nodes that `up` accepts, counted only where this node (`me`) is the
    /// lowest up holder, so that summing over nodes counts each message
    /// once.
    pub fn under_replicated(&self, me: u64, n_replicas: usize, up: impl Fn(u64) -> bool) -> u64 {
        let index = self.shared.index();
        // By replica set (few of them), not by entry.
        index
            .replica_sets
            .iter()
            .filter(|(replicas, _)| {
                let mut live = replicas.iter().filter(|r| up(**r));
                live.clone().count() < n_replicas && live.all(|r| *r >= me)
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// Whether `f(replicas, added_ms)` holds for every deletion held here
    /// (move markers aside).
    pub fn every_deletion(&self, f: impl Fn(&[u64], u64) -> bool) -> bool {
        let index = self.shared.index();
        index
            .mailboxes
            .values()
            .flat_map(|m| m.tombstones.values())
            .filter(|t| t.is_deletion())
            .all(|t| f(&t.replicas, t.added_ms))
    }

    /// The distinct replica sets of the entries held here (sorted ids).
    pub fn replica_sets(&self) -> Vec<Vec<u64>> {
        self.shared.index().replica_sets.keys().cloned().collect()
    }

    /// Forgets tombstones older than `hlc_before`: after that a copy that
    /// shows up again is taken as new mail. Returns how many went.
    pub fn expire_tombstones(&self, hlc_before: u64) -> usize {
        self.forget_tombstones(|_, hlc, _, _| hlc < hlc_before)
    }

    /// Forgets the tombstones for which `drop(user, hlc, replicas,
    /// added_ms)` holds (see [`FragmentStore::expire_tombstones`]). A walk
    /// of the whole index, a chunk of mailboxes at a time (see
    /// [`FragmentStore::peer_digests`]); from async code use
    /// [`FragmentStore::forget_tombstones_async`].
    pub fn forget_tombstones(&self, drop: impl Fn(&str, u64, &[u64], u64) -> bool) -> usize {
        forget_tombstones(&self.shared, drop)
    }

    /// [`FragmentStore::forget_tombstones`] on a blocking thread.
    pub async fn forget_tombstones_async(
        &self,
        drop: impl Fn(&str, u64, &[u64], u64) -> bool + Send + 'static,
    ) -> usize {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || forget_tombstones(&shared, drop))
            .await
            .unwrap_or(0)
    }

    /// Bytes of the user's messages (for quotas).
    pub fn usage_bytes(&self, user: &str) -> u64 {
        self.shared.index().mailboxes.get(user).map_or(0, |m| m.usage_bytes)
    }

    /// Entries and bytes of the user's mailbox held here, without listing
    /// it.
    pub fn size(&self, user: &str) -> (u64, u64) {
        self.shared
            .index()
            .mailboxes
            .get(user)
            .map_or((0, 0), |m| (m.entries.len() as u64, m.usage_bytes))
    }

    /// Reads a body back and checks it against its hash.
    pub async fn read_body(&self, hash: BodyHash) -> Result<Vec<u8>, StoreError> {
        let (file, offset, len) = {
            let index = self.shared.index();
            let b = index.bodies.get(&hash).ok_or(StoreError::NoSuchBody)?;
            let seg = index.segments.get(&b.seg).ok_or(StoreError::NoSuchBody)?;
            (seg.file.clone(), b.body_offset, b.body_len)
        };
        tokio::task::spawn_blocking(move || read_checked(&file, offset, len, hash))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    pub fn stats(&self) -> StoreStats {
        let index = self.shared.index();
        StoreStats {
            entries: index.entries,
            tombstones: index.tombstones,
            bodies: index.bodies.len() as u64,
            body_bytes: index.body_bytes,
            segments: index.segments.len() as u64,
            disk_bytes: index.segments.values().map(|s| s.len).sum(),
            live_bytes: index.segments.values().map(|s| s.live_bytes).sum(),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
            ops: self.shared.ops.load(Ordering::Relaxed),
        }
    }
}

pub(super) fn mailbox_digest(m: &Mailbox, peer: u64) -> Option<[u8; 32]> {
    // Both maps are sorted by id; merge them so the digest follows id order.
    // A copy's folder and flags count only towards a peer meant to hold a
    // copy too (an earlier member holds at most a move marker).
    let live = m.entries.iter().filter(|(_, e)| e.meta.involves(peer)).map(|(id, e)| {
        let marks = if e.meta.replicas.contains(&peer) {
            e.meta.marks.fingerprint(&e.meta.folder)
        } else {
            0
        };
        (*id, 0u8, e.meta.placed, marks)
    });
    let dead = m
        .tombstones
        .iter()
        .filter(|(_, t)| t.replicas.contains(&peer))
        .map(|(id, t)| match &t.moved {
            None => (*id, 1u8, 0, 0),
            // A move marker and a copy of the same set agree.
            Some((_, placed)) => (*id, 0u8, *placed, 0),
        });
    let mut all: Vec<(MessageId, u8, u64, u64)> = live.chain(dead).collect();
    if all.is_empty() {
        return None;
    }
    all.sort_unstable();
    let mut h = blake3::Hasher::new();
    for (id, state, placed, marks) in all {
        h.update(&id.0);
        h.update(&[state]);
        // Copies under different replica sets differ (the newer set wins).
        if placed != 0 {
            h.update(&placed.to_le_bytes());
        }
        // So do copies with different folders or flags (merged both ways).
        if marks != 0 {
            h.update(&marks.to_le_bytes());
        }
    }
    Some(*h.finalize().as_bytes())
}

/// Mailboxes a whole-index walk handles under one hold of the index lock.
pub const WALK_CHUNK_USERS: usize = 256;
/// The pause between two chunks of a walk.
pub(super) const WALK_PAUSE: std::time::Duration = std::time::Duration::from_micros(200);

/// Runs `f` over every mailbox's user, [`WALK_CHUNK_USERS`] at a time, each
/// chunk under its own hold of the index lock (the names are taken first,
/// under one short hold). A mailbox made meanwhile is missed and one
/// removed meanwhile is skipped: a walk is as of no single moment, which
/// anti-entropy and expiry accept (they run again).
pub(super) fn for_each_mailbox_chunk(shared: &Shared, mut f: impl FnMut(&mut Index, &[String])) {
    let users: Vec<String> = shared.index().mailboxes.keys().cloned().collect();
    for chunk in users.chunks(WALK_CHUNK_USERS) {
        let mut index = shared.index();
        f(&mut index, chunk);
        drop(index);
        // The lock is not fair: without a pause the walk takes it again
        // before the writer, woken by the release, gets to run.
        std::thread::sleep(WALK_PAUSE);
    }
}

fn peer_digests(shared: &Shared, peer: u64) -> Vec<(String, [u8; 32])> {
    let mut out = Vec::new();
    for_each_mailbox_chunk(shared, |index, users| {
        for user in users {
            if let Some(d) = index.mailboxes.get(user).and_then(|m| mailbox_digest(m, peer)) {
                out.push((user.clone(), d));
            }
        }
    });
    out.sort();
    out
}

fn forget_tombstones(shared: &Shared, drop: impl Fn(&str, u64, &[u64], u64) -> bool) -> usize {
    let mut n = 0;
    for_each_mailbox_chunk(shared, |index, users| {
        for user in users {
            let old: Vec<MessageId> = match index.mailboxes.get(user) {
                Some(m) => m
                    .tombstones
                    .iter()
                    .filter(|(_, t)| drop(user, t.hlc, &t.replicas, t.added_ms))
                    .map(|(id, _)| *id)
                    .collect(),
                None => continue,
            };
            for id in &old {
                index.remove_tomb(user, id);
            }
            n += old.len();
        }
    });
    n
}
