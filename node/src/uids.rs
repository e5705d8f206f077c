//! IMAP UIDs: per folder, ascending, never reused within a UIDVALIDITY,
//! the same on every node. A folder's UIDs are a named sequence in the
//! replicated (Raft) state (`membership::sequence`): a session that lists
//! a folder and finds messages without a UID asks for numbers with one
//! committed entry, which every node applies in the same order, so two
//! nodes that disagree about the view can at worst ask twice for the same
//! message and get the same answer. Reads are local.
//!
//! A user's folders are named bindings in the same state
//! (`membership::names`): a folder's name is bound to its id, which is
//! what its messages and its UID sequence are named by, so a rename is one
//! committed entry and moves no message.
//!
//! # Why the Raft state
//! UIDs must be per folder, strictly ascending, never reused within a
//! UIDVALIDITY, and the same whichever node a client reaches, after any
//! failure. Three ways were weighed:
//!
//! - *The user's manager assigns them and stores them on the user's
//!   replicas.* The manager is soft state chosen by placement over a view;
//!   two nodes that disagree about the view (a partition, a manager change
//!   half-way) each believe they manage the user, and both would number the
//!   same new message or give one number to two messages. Fencing that needs
//!   a quorum per assignment, which is what the next option is.
//! - *Derived from replicated data* (e.g. the rank of a message's id). A
//!   message that arrives late (a partition heals, a copy comes back from a
//!   node that was down) would rank below UIDs clients have already seen:
//!   either it is invisible or the UIDs move (a UIDVALIDITY change every
//!   time): not acceptable.
//! - *A register written with a quorum and fenced*: the cluster already has
//!   one, Raft, on every node, committed by a majority and fenced by terms.
//!   **This is what Quill does**: a folder's UIDs are a named sequence in the
//!   Raft state (`membership::sequence`). A session that lists a folder and
//!   finds messages without a UID asks for numbers with one committed entry
//!   (`AssignNumbers`/`AssignMany`); the state machine numbers, in the given
//!   order, only ids it has not numbered, so the entry is idempotent.
//!
//! Failure cases: two sessions on nodes with different views ask for the
//! same message: the second entry applies after the first and finds it
//! numbered, same answer. A node cut off from the majority cannot commit: it
//! gives no UID (new mail stays out of its IMAP sessions, counted in
//! `quill_imap_uid_failures_total`), never a conflicting one. A request whose
//! answer is lost is retried with the same serial and answered from the
//! session table, or re-asked and found numbered. The manager may change or
//! die at any time: it plays no part. A node restart, kill -9, a new leader:
//! the numbers are in the replicated log and snapshots. UIDVALIDITY changes
//! only when a sequence is made anew: a folder deleted and created again
//! (RFC 3501 asks for exactly that), or a user removed; a rename keeps it (the
//! sequence is named by the folder's id, not its name); it is set from the
//! proposer's clock and above every earlier
//! validity, so a cluster whose Raft state was lost and rebuilt starts above
//! what clients saw, as long as clocks move forward. Expunged messages'
//! numbers are forgotten (`ForgetNumbers`) and never given again. Tests: the
//! seeded interleavings in `sequence.rs` (stale, partial, duplicated and lost
//! requests: no number to two ids, none changes, replicas agree), the
//! partition test in `membership/tests/cluster.rs`, and imaplib/mbsync across
//! real nodes with a kill -9 (`tests/tests/imap.rs`).
//!
//! Mod-sequences (CONDSTORE, QRESYNC) come from the same state: numbering
//! new messages, forgetting expunged ones and [`Uids::touch`] (a flag
//! change, after it is on the replicas) each raise the folder's counter
//! (`membership::modseq`), batched into shared entries like the numbers.
//!
//! Costs: one Raft entry per batch of new messages (the delivery path is
//! untouched: numbering happens when an IMAP session first sees a message,
//! or at APPEND), and 16 bytes plus a number per message of every folder in
//! every node's memory and in the Raft snapshot (the directory already puts
//! every user there): 1 M messages ≈ 40 MB, and a mod-sequence per message
//! as much again (a state of 100 000 numbered messages encodes to 20 bytes
//! a message for the UIDs and 17 more for the mod-sequences). Past tens of
//! millions of messages both should move out of the Raft state (a lease
//! per folder, the numbers kept with the messages' replicas: what is left
//! of the issue on IMAP state); what sessions see through [`Uids`] stays
//! the same.

use std::sync::Mutex;

use membership::Membership;
use membership::names::Names;
use membership::sequence::Sequences;
use replication::replica::BoxFuture;

/// Ids one request carries at most (a Raft entry's worth).
pub const CHUNK: usize = membership::sequence::IDS_PER_COMMAND_MAX;

/// A folder's UIDs and mod-sequences as this node knows them now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbers {
    pub validity: u32,
    pub next: u32,
    /// Per id asked, its UID if it has one.
    pub uids: Vec<Option<u32>>,
    /// HIGHESTMODSEQ (`membership::modseq`), at least 1.
    pub highest_modseq: u64,
    /// Per id asked, its mod-sequence (1 where none was stamped).
    pub modseqs: Vec<u64>,
}

pub trait Uids: Send + Sync + 'static {
    /// Gives UIDs to the ids that have none (in the order given).
    fn assign<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>>;
    /// One change each to `ids` (their flags, already written to their
    /// replicas): the folder's mod-sequence goes up and they take it
    /// (`membership::modseq`). Does nothing below feature level 3.
    fn touch<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Whether mod-sequences are kept (feature level 3): CONDSTORE and
    /// QRESYNC are served only then.
    fn modseqs_kept(&self) -> bool;
    /// Forgets expunged ids (their UIDs are never given again).
    fn forget<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Drops a folder's sequence (its user is removed): a later folder of
    /// that name gets a new UIDVALIDITY.
    fn drop_folder<'a>(&'a self, name: &'a str) -> BoxFuture<'a, anyhow::Result<()>>;
    /// The folder's validity, UIDNEXT and the UIDs of `ids`; `None` if the
    /// folder has no sequence yet.
    fn numbers(&self, name: &str, ids: &[[u8; 16]]) -> Option<Numbers>;
    /// The names bound in `scope` (a user's folders), as applied here.
    fn names(&self, scope: &str) -> BTreeMap<String, [u8; 16]>;
    /// Takes this node's `\Recent` claims on `ids` of folder sequence
    /// `name` (`membership::recent`): the ids returned are recent to the
    /// caller and to no other session.
    fn take_recent(&self, name: &str, ids: &[[u8; 16]]) -> Vec<[u8; 16]>;
    /// How many of `ids` this node claims as recent, untaken.
    fn count_recent(&self, name: &str, ids: &[[u8; 16]]) -> usize;
    /// The UIDs of the folder's messages (numbered, not forgotten) from
    /// `from` up.
    fn numbered_from(&self, name: &str, from: u32) -> Vec<u32>;
    /// The IMAP keywords the folder defines (`membership::keywords`).
    fn keywords(&self, name: &str) -> Vec<String>;
    /// Defines keywords for the folder, once every node can keep them
    /// (feature level 3); below it, does nothing.
    fn define_keywords<'a>(&'a self, name: &'a str, keywords: Vec<String>) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Binds names (see `membership::names::Names::bind`).
    fn bind<'a>(&'a self, scope: &'a str, items: Vec<(String, [u8; 16])>) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Unbinds names bound to the ids given.
    fn unbind<'a>(&'a self, scope: &'a str, items: Vec<(String, [u8; 16])>) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Renames at once: `(from, id, to)`.
    fn rename<'a>(
        &'a self,
        scope: &'a str,
        moves: Vec<(String, [u8; 16], String)>,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}

use std::collections::BTreeMap;

use membership::keywords::{FolderKeywords, KEYWORDS_FEATURE_LEVEL};
use membership::modseq::{FolderModSeqs, MODSEQ_FEATURE_LEVEL, MODSEQ_UNSTAMPED, ModSeqs};

/// The sequence name of a user's folder.
pub fn sequence_name(mailbox: &str, folder: &str) -> String {
    format!("imap/{mailbox}/{folder}")
}

fn numbered_from(seq: Option<&membership::sequence::Sequence>, from: u32) -> Vec<u32> {
    seq.map(|s| s.ids.values().copied().filter(|u| *u >= from).collect())
        .unwrap_or_default()
}

fn read(
    seqs: Option<&membership::sequence::Sequence>,
    modseqs: Option<&FolderModSeqs>,
    ids: &[[u8; 16]],
) -> Option<Numbers> {
    seqs.map(|s| Numbers {
        validity: s.validity,
        next: s.next,
        uids: ids.iter().map(|id| s.number(id)).collect(),
        highest_modseq: modseqs.map_or(MODSEQ_UNSTAMPED, FolderModSeqs::highest),
        modseqs: ids
            .iter()
            .map(|id| modseqs.map_or(MODSEQ_UNSTAMPED, |m| m.of(id)))
            .collect(),
    })
}

/// Raft entries carrying assignments at once, at most: while they commit,
/// new requests gather into the next ones.
const BATCHES_IN_FLIGHT: usize = 4;
/// Bytes of names and ids one entry carries at most (a Raft entry is at
/// most 64 KiB).
const BATCH_BYTES_MAX: usize = 48 * 1024;

/// What a batched request asks (a batch holds one kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// UIDs for new messages (`Command::AssignMany`).
    Numbers,
    /// A change each (`Command::Touch`).
    Touch,
}

struct Pending {
    ask: Ask,
    name: String,
    ids: Vec<[u8; 16]>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.name.len() + 16 + self.ids.len() * 17
    }
}

/// The cluster's UIDs and mod-sequences: requests from every session of
/// this node are batched into as few Raft entries as the commits allow
/// (one entry per request made APPEND wait for a log fsync each: ~360/s on
/// this VM).
pub struct RaftUids {
    membership: Membership,
    tx: tokio::sync::mpsc::Sender<Pending>,
}

impl RaftUids {
    /// Starts the batching task (on the current runtime).
    pub fn new(membership: Membership) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(batcher(membership.clone(), rx));
        RaftUids { membership, tx }
    }
}

async fn batcher(membership: Membership, mut rx: tokio::sync::mpsc::Receiver<Pending>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut carry: Option<Pending> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let (mut ids, mut bytes, ask) = (first.ids.len().max(1), first.bytes(), first.ask);
        let mut batch = vec![first];
        while let Ok(p) = rx.try_recv() {
            if p.ask != ask || ids + p.ids.len().max(1) > CHUNK || bytes + p.bytes() > BATCH_BYTES_MAX {
                carry = Some(p);
                break;
            }
            ids += p.ids.len().max(1);
            bytes += p.bytes();
            batch.push(p);
        }
        let m = membership.clone();
        tokio::spawn(async move {
            let items = batch.iter().map(|p| (p.name.clone(), p.ids.clone())).collect();
            let r = match ask {
                Ask::Numbers => m.assign_many(items).await,
                Ask::Touch => m.touch_many(items).await,
            }
            .map_err(|e| e.to_string());
            for p in batch {
                let _ = p.done.send(r.clone());
            }
            drop(slot);
        });
    }
}

impl RaftUids {
    /// Sends `ids` to the batcher in chunks and waits for each entry.
    async fn batched(&self, ask: Ask, name: &str, ids: Vec<[u8; 16]>) -> anyhow::Result<()> {
        // An empty request still creates the sequence (an empty folder
        // gets its UIDVALIDITY).
        let chunks: Vec<Vec<[u8; 16]>> = if ids.is_empty() {
            vec![vec![]]
        } else {
            ids.chunks(CHUNK / 2).map(|c| c.to_vec()).collect()
        };
        for ids in chunks {
            let (done, rx) = tokio::sync::oneshot::channel();
            let p = Pending {
                ask,
                name: name.to_owned(),
                ids,
                done,
            };
            self.tx.send(p).await.map_err(|_| anyhow::anyhow!("UID batcher gone"))?;
            // An error may be another request's in the same entry: the
            // caller reads its numbers back either way.
            rx.await
                .map_err(|_| anyhow::anyhow!("UID batcher gone"))?
                .map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }
}

impl Uids for RaftUids {
    fn assign<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.batched(Ask::Numbers, name, ids))
    }

    fn touch<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if ids.is_empty() || self.membership.feature_level() < MODSEQ_FEATURE_LEVEL {
                return Ok(());
            }
            self.batched(Ask::Touch, name, ids).await
        })
    }

    fn modseqs_kept(&self) -> bool {
        self.membership.feature_level() >= MODSEQ_FEATURE_LEVEL
    }

    fn forget<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for chunk in ids.chunks(CHUNK) {
                self.membership.forget_numbers(name.to_owned(), chunk.to_vec()).await?;
            }
            Ok(())
        })
    }

    fn drop_folder<'a>(&'a self, name: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.membership.drop_sequence(name.to_owned()).await?) })
    }

    fn numbers(&self, name: &str, ids: &[[u8; 16]]) -> Option<Numbers> {
        self.membership.with_numbers(name, |s, m| read(s, m, ids))
    }

    fn names(&self, scope: &str) -> BTreeMap<String, [u8; 16]> {
        self.membership.names(scope)
    }

    fn take_recent(&self, name: &str, ids: &[[u8; 16]]) -> Vec<[u8; 16]> {
        self.membership.take_recent(name, ids)
    }

    fn count_recent(&self, name: &str, ids: &[[u8; 16]]) -> usize {
        self.membership.count_recent(name, ids)
    }

    fn numbered_from(&self, name: &str, from: u32) -> Vec<u32> {
        self.membership.with_sequence(name, |s| numbered_from(s, from))
    }

    fn keywords(&self, name: &str) -> Vec<String> {
        self.membership.folder_keywords(name)
    }

    fn define_keywords<'a>(&'a self, name: &'a str, keywords: Vec<String>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if self.membership.feature_level() < KEYWORDS_FEATURE_LEVEL || keywords.is_empty() {
                return Ok(());
            }
            Ok(self.membership.define_keywords(name.to_owned(), keywords).await?)
        })
    }

    fn bind<'a>(&'a self, scope: &'a str, items: Vec<(String, [u8; 16])>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.membership.bind_names(scope.to_owned(), items).await?) })
    }

    fn unbind<'a>(&'a self, scope: &'a str, items: Vec<(String, [u8; 16])>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.membership.unbind_names(scope.to_owned(), items).await?) })
    }

    fn rename<'a>(
        &'a self,
        scope: &'a str,
        moves: Vec<(String, [u8; 16], String)>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.membership.rename_names(scope.to_owned(), moves).await?) })
    }
}

/// One node's sequences and folder names in memory (tests of the
/// sessions without Raft).
#[derive(Debug, Default)]
pub struct LocalUids(
    Mutex<Sequences>,
    Mutex<Names>,
    Mutex<membership::recent::RecentClaims>,
    Mutex<FolderKeywords>,
    Mutex<ModSeqs>,
);

impl LocalUids {
    fn seqs(&self) -> std::sync::MutexGuard<'_, Sequences> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn names_mut(&self) -> std::sync::MutexGuard<'_, Names> {
        self.1.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, membership::recent::RecentClaims> {
        self.2.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keywords_mut(&self) -> std::sync::MutexGuard<'_, FolderKeywords> {
        self.3.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn modseqs(&self) -> std::sync::MutexGuard<'_, ModSeqs> {
        self.4.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Uids for LocalUids {
    fn assign<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(self.seqs().assign(name, &[], 1)?);
            }
            for chunk in ids.chunks(CHUNK) {
                let mut seqs = self.seqs();
                let new: Vec<[u8; 16]> = chunk
                    .iter()
                    .filter(|id| seqs.get(name).is_none_or(|s| s.number(id).is_none()))
                    .copied()
                    .collect();
                seqs.assign(name, chunk, 1)?;
                self.modseqs().stamp(name, &new);
                self.recent().claim(name, new);
            }
            Ok(())
        })
    }

    fn touch<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let seqs = self.seqs();
            if let Some(seq) = seqs.get(name) {
                let numbered: Vec<[u8; 16]> = ids.into_iter().filter(|id| seq.number(id).is_some()).collect();
                self.modseqs().stamp(name, &numbered);
            }
            Ok(())
        })
    }

    fn modseqs_kept(&self) -> bool {
        true
    }

    fn forget<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for chunk in ids.chunks(CHUNK) {
                let mut seqs = self.seqs();
                let numbered: Vec<[u8; 16]> = chunk
                    .iter()
                    .filter(|id| seqs.get(name).is_some_and(|s| s.number(id).is_some()))
                    .copied()
                    .collect();
                seqs.forget(name, chunk)?;
                self.modseqs().forget(name, &numbered);
            }
            Ok(())
        })
    }

    fn drop_folder<'a>(&'a self, name: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.seqs().drop_sequence(name)?;
            self.keywords_mut().drop_folder(name);
            self.modseqs().drop_folder(name);
            Ok(())
        })
    }

    fn numbers(&self, name: &str, ids: &[[u8; 16]]) -> Option<Numbers> {
        read(self.seqs().get(name), self.modseqs().get(name), ids)
    }

    fn names(&self, scope: &str) -> BTreeMap<String, [u8; 16]> {
        self.names_mut().get(scope).cloned().unwrap_or_default()
    }

    fn take_recent(&self, name: &str, ids: &[[u8; 16]]) -> Vec<[u8; 16]> {
        self.recent().take(name, ids)
    }

    fn count_recent(&self, name: &str, ids: &[[u8; 16]]) -> usize {
        self.recent().count(name, ids)
    }

    fn numbered_from(&self, name: &str, from: u32) -> Vec<u32> {
        numbered_from(self.seqs().get(name), from)
    }

    fn keywords(&self, name: &str) -> Vec<String> {
        self.keywords_mut()
            .get(name)
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn define_keywords<'a>(&'a self, name: &'a str, keywords: Vec<String>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if self.seqs().get(name).is_some() {
                self.keywords_mut().define(name, &keywords);
            }
            Ok(())
        })
    }

    fn bind<'a>(&'a self, scope: &'a str, items: Vec<(String, [u8; 16])>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.names_mut().bind(scope, &items)?) })
    }

    fn unbind<'a>(&'a self, scope: &'a str, items: Vec<(String, [u8; 16])>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.names_mut().unbind(scope, &items)?) })
    }

    fn rename<'a>(
        &'a self,
        scope: &'a str,
        moves: Vec<(String, [u8; 16], String)>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { Ok(self.names_mut().rename(scope, &moves)?) })
    }
}
