//! IMAP UIDs: per folder, ascending, never reused within a UIDVALIDITY,
//! the same on every node. A folder's UIDs are a named sequence in the
//! replicated (Raft) state (`membership::sequence`): a session that lists
//! a folder and finds messages without a UID asks for numbers with one
//! committed entry, which every node applies in the same order, so two
//! nodes that disagree about the view can at worst ask twice for the same
//! message and get the same answer. Reads are local. Why this and not the
//! manager or a quorum register: ARCHITECTURE.md, "IMAP UIDs".

use std::sync::Mutex;

use membership::Membership;
use membership::sequence::Sequences;
use replication::replica::BoxFuture;

/// Ids one request carries at most (a Raft entry's worth).
pub const CHUNK: usize = membership::sequence::IDS_PER_COMMAND_MAX;

/// A folder's UIDs as this node knows them now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbers {
    pub validity: u32,
    pub next: u32,
    /// Per id asked, its UID if it has one.
    pub uids: Vec<Option<u32>>,
}

pub trait Uids: Send + Sync + 'static {
    /// Gives UIDs to the ids that have none (in the order given).
    fn assign<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Forgets expunged ids (their UIDs are never given again).
    fn forget<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>>;
    /// The folder's validity, UIDNEXT and the UIDs of `ids`; `None` if the
    /// folder has no sequence yet.
    fn numbers(&self, name: &str, ids: &[[u8; 16]]) -> Option<Numbers>;
}

/// The sequence name of a user's folder.
pub fn sequence_name(mailbox: &str, folder: &str) -> String {
    format!("imap/{mailbox}/{folder}")
}

fn read(seqs: Option<&membership::sequence::Sequence>, ids: &[[u8; 16]]) -> Option<Numbers> {
    seqs.map(|s| Numbers {
        validity: s.validity,
        next: s.next,
        uids: ids.iter().map(|id| s.number(id)).collect(),
    })
}

impl Uids for Membership {
    fn assign<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            // An empty request still creates the sequence (an empty folder
            // gets its UIDVALIDITY).
            if ids.is_empty() {
                return Ok(self.assign_numbers(name.to_owned(), ids).await?);
            }
            for chunk in ids.chunks(CHUNK) {
                self.assign_numbers(name.to_owned(), chunk.to_vec()).await?;
            }
            Ok(())
        })
    }

    fn forget<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for chunk in ids.chunks(CHUNK) {
                self.forget_numbers(name.to_owned(), chunk.to_vec()).await?;
            }
            Ok(())
        })
    }

    fn numbers(&self, name: &str, ids: &[[u8; 16]]) -> Option<Numbers> {
        self.with_sequence(name, |s| read(s, ids))
    }
}

/// One node's sequences in memory (tests of the sessions without Raft).
#[derive(Debug, Default)]
pub struct LocalUids(Mutex<Sequences>);

impl LocalUids {
    fn seqs(&self) -> std::sync::MutexGuard<'_, Sequences> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Uids for LocalUids {
    fn assign<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(self.seqs().assign(name, &[], 1)?);
            }
            for chunk in ids.chunks(CHUNK) {
                self.seqs().assign(name, chunk, 1)?;
            }
            Ok(())
        })
    }

    fn forget<'a>(&'a self, name: &'a str, ids: Vec<[u8; 16]>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for chunk in ids.chunks(CHUNK) {
                self.seqs().forget(name, chunk)?;
            }
            Ok(())
        })
    }

    fn numbers(&self, name: &str, ids: &[[u8; 16]]) -> Option<Numbers> {
        read(self.seqs().get(name), ids)
    }
}
