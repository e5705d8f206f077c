//! CONDSTORE and QRESYNC (RFC 7162): what turns them on (ENABLE, SELECT
//! parameters, the first command that uses a mod-sequence), the
//! resynchronization a SELECT (QRESYNC ...) asks for, and the FETCH and
//! STORE modifiers. The mod-sequences themselves are the cluster's
//! (`membership::modseq`, through `crate::uids`); sessions only read them.
//!
//! Known gaps, until the numbers move out of the Raft state to a single
//! writer per folder: a node killed between writing a flag change to the
//! replicas and committing its stamp leaves the change unstamped (a client
//! that read HIGHESTMODSEQ before it does not find it by CHANGEDSINCE;
//! one that lists the folder does); UNCHANGEDSINCE is tested against the
//! session's last look (a UID STORE looks first), not in one step with
//! the change.

use imap_next::imap_types::command::{FetchModifier, SelectParameter, StoreModifier};
use imap_next::imap_types::extensions::enable::CapabilityEnable;
use imap_next::imap_types::response::Data;
use imap_next::imap_types::sequence::SequenceSet;
use quill_proto::imap::Message;
use quill_proto::imap::sets::{missing_ranges, set_of_ranges};
use quill_proto::imap::sync::flags_fetch;

use std::sync::atomic::{AtomicUsize, Ordering};

use tracing::{debug, warn};

use super::state::{Handler, Msg, Phase};
use crate::services::Services;
use crate::uids::sequence_name;

/// Why a command that needs mod-sequences is refused where they are not
/// kept (a cluster below feature level 3).
const NOT_KEPT: &str = "CONDSTORE and QRESYNC need the cluster at feature level 3";

/// What a SELECT (QRESYNC ...) says the client knows.
pub(super) struct Resync {
    validity: u32,
    modseq: u64,
    known_uids: Option<SequenceSet>,
}

/// What a FETCH's modifiers ask.
#[derive(Debug, Default)]
pub(super) struct FetchAsk {
    /// CHANGEDSINCE: only messages changed after it, MODSEQ with each.
    pub changed_since: Option<u64>,
    /// VANISHED: expunged UIDs of the set first (UID FETCH, QRESYNC).
    pub vanished: bool,
}

impl Handler {
    /// ENABLE (RFC 5161): the extensions it turns on now, as the ENABLED
    /// response names them; QRESYNC turns CONDSTORE on too.
    pub(super) fn enable(&mut self, asked: &[CapabilityEnable<'static>]) -> Vec<CapabilityEnable<'static>> {
        if !self.services.uids.modseqs_kept() {
            return Vec::new();
        }
        let mut enabled = Vec::new();
        for c in asked {
            match c {
                CapabilityEnable::CondStore if !self.condstore => {
                    self.condstore = true;
                    enabled.push(CapabilityEnable::CondStore);
                }
                CapabilityEnable::Other(_) if c.to_string().eq_ignore_ascii_case("QRESYNC") && !self.qresync => {
                    self.qresync = true;
                    self.condstore = true;
                    enabled.push(c.clone());
                }
                _ => {}
            }
        }
        enabled
    }

    /// SELECT and EXAMINE's parameters: CONDSTORE turns it on; QRESYNC
    /// (once enabled) asks for a resynchronization.
    pub(super) fn select_parameters(&mut self, params: Vec<SelectParameter>) -> Result<Option<Resync>, &'static str> {
        let mut resync = None;
        for p in params {
            if !self.services.uids.modseqs_kept() {
                return Err(NOT_KEPT);
            }
            match p {
                SelectParameter::CondStore => self.condstore = true,
                SelectParameter::QResync {
                    uid_validity,
                    mod_sequence_value,
                    known_uids,
                    ..
                } => {
                    if !self.qresync {
                        return Err("QRESYNC is not enabled: ENABLE QRESYNC first");
                    }
                    resync = Some(Resync {
                        validity: uid_validity.get(),
                        modseq: mod_sequence_value.get(),
                        known_uids,
                    });
                }
            }
        }
        Ok(resync)
    }

    /// A SELECT (QRESYNC ...)'s answer once the folder is listed
    /// (RFC 7162 3.2.5.1): the client's known UIDs that are gone, as one
    /// VANISHED (EARLIER), then each message changed since its
    /// mod-sequence. The folder keeps no record of when a message was
    /// expunged, so every UID the client names that is gone is said (the
    /// RFC allows UIDs expunged earlier). Nothing when the UIDVALIDITY the
    /// client knows is not the folder's: it starts over.
    pub(super) fn resync(&mut self, r: &Resync, validity: u32, uid_next: u32, msgs: &[Msg]) {
        if r.validity != validity {
            return;
        }
        let present: Vec<u32> = msgs.iter().map(|m| m.uid).collect();
        let gone = missing_ranges(r.known_uids.as_ref(), uid_next.saturating_sub(1), &present);
        if let Some(known_uids) = set_of_ranges(gone) {
            self.data(Data::Vanished {
                earlier: true,
                known_uids,
            });
        }
        let tell = self.tell();
        for (i, m) in msgs.iter().enumerate() {
            if m.modseq() > r.modseq {
                self.data(flags_fetch(i as u32 + 1, m, tell));
            }
        }
    }

    /// A FETCH's modifiers; `Err` with the reason to refuse it.
    pub(super) fn fetch_modifiers(&mut self, mods: Vec<FetchModifier>, uid: bool) -> Result<FetchAsk, &'static str> {
        let mut ask = FetchAsk::default();
        for m in mods {
            if !self.services.uids.modseqs_kept() {
                return Err(NOT_KEPT);
            }
            match m {
                FetchModifier::ChangedSince(v) => {
                    self.condstore = true;
                    ask.changed_since = Some(v.get());
                }
                FetchModifier::Vanished => ask.vanished = true,
            }
        }
        if ask.vanished && !(uid && self.qresync && ask.changed_since.is_some()) {
            return Err("VANISHED needs UID FETCH, CHANGEDSINCE and QRESYNC enabled");
        }
        Ok(ask)
    }

    /// A STORE's UNCHANGEDSINCE, if any; `Err` with the reason to refuse
    /// it.
    pub(super) fn store_modifiers(&mut self, mods: Vec<StoreModifier>) -> Result<Option<u64>, &'static str> {
        let mut since = None;
        for m in mods {
            if !self.services.uids.modseqs_kept() {
                return Err(NOT_KEPT);
            }
            match m {
                StoreModifier::UnchangedSince(v) => {
                    if since.is_some() {
                        return Err("UNCHANGEDSINCE given twice");
                    }
                    self.condstore = true;
                    since = Some(v);
                }
            }
        }
        Ok(since)
    }

    /// UID FETCH ... (CHANGEDSINCE m VANISHED): the UIDs of `set` below
    /// UIDNEXT that are not `present` (sorted), as one VANISHED (EARLIER).
    pub(super) fn vanished_in(&mut self, set: &SequenceSet, present: &[u32], uid_next: u32) {
        let gone = missing_ranges(Some(set), uid_next.saturating_sub(1), present);
        if let Some(known_uids) = set_of_ranges(gone) {
            self.data(Data::Vanished {
                earlier: true,
                known_uids,
            });
        }
    }

    /// One change each to the selected folder's messages at `positions`,
    /// whose flags were just written to their replicas: the folder's
    /// mod-sequence goes up (`crate::uids::Uids::touch`).
    ///
    /// A session with CONDSTORE on waits for it and reads the new values
    /// (its STORE answers with them). One without does not wait: the stamp
    /// only has to land after the change is on the replicas, which it
    /// does; the session's client reads no mod-sequence (at most
    /// [`STAMPS_IN_BACKGROUND_MAX`] wait at once, beyond which the session
    /// waits too). A stamp that cannot land now (no Raft majority) is
    /// retried in the background for a while, so that clients that ask
    /// for changes since a mod-sequence are told of it once it does.
    pub(super) async fn stamp(&mut self, positions: &[usize]) {
        let Phase::Selected(sel) = &self.phase else { return };
        if positions.is_empty() || !self.services.uids.modseqs_kept() {
            return;
        }
        let name = sequence_name(&sel.user, &sel.folder.id);
        let ids: Vec<[u8; 16]> = positions.iter().map(|&i| sel.msgs[i].listed.meta.id.0).collect();
        let room = |n: usize| (n < STAMPS_IN_BACKGROUND_MAX).then_some(n + 1);
        if !self.condstore
            && STAMPS_IN_BACKGROUND
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, room)
                .is_ok()
        {
            let services = self.services.clone();
            tokio::spawn(async move {
                touch_until_done(&services, &name, ids, true).await;
                STAMPS_IN_BACKGROUND.fetch_sub(1, Ordering::Relaxed);
            });
            return;
        }
        if self.services.uids.touch(&name, ids.clone()).await.is_err() {
            let services = self.services.clone();
            tokio::spawn(async move { touch_until_done(&services, &name, ids, false).await });
            return;
        }
        let Some(n) = self.services.uids.numbers(&name, &ids) else {
            return;
        };
        let Phase::Selected(sel) = &mut self.phase else { return };
        // A message expunged meanwhile (through another session) has no
        // mod-sequence any more: it keeps the one shown.
        for ((&i, v), uid) in positions.iter().zip(n.modseqs).zip(n.uids) {
            if uid.is_some() {
                sel.msgs[i].modseq = sel.msgs[i].modseq.max(v);
            }
        }
        sel.highest_modseq = sel.highest_modseq.max(n.highest_modseq);
    }
}

/// Stamps waiting in the background now (see [`Handler::stamp`]).
static STAMPS_IN_BACKGROUND: AtomicUsize = AtomicUsize::new(0);
/// At most this many stamps wait in the background at once.
pub const STAMPS_IN_BACKGROUND_MAX: usize = 10_000;

/// Touches `ids` of sequence `name` (once first if `first`), then again
/// after each of [`STAMP_RETRIES`] until it lands.
async fn touch_until_done(services: &Services, name: &str, ids: Vec<[u8; 16]>, first: bool) {
    if first && services.uids.touch(name, ids.clone()).await.is_ok() {
        return;
    }
    debug!(name, "mod-sequences not stamped now; retrying in the background");
    for wait in STAMP_RETRIES {
        tokio::time::sleep(wait).await;
        if services.uids.touch(name, ids.clone()).await.is_ok() {
            return;
        }
    }
    warn!(name, "mod-sequences of a flag change never stamped");
}

/// The waits between tries of a stamp that failed (about ten minutes in
/// all: long enough for a partition to heal or a leader to be elected).
const STAMP_RETRIES: [std::time::Duration; 8] = [
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(2),
    std::time::Duration::from_secs(5),
    std::time::Duration::from_secs(10),
    std::time::Duration::from_secs(30),
    std::time::Duration::from_secs(60),
    std::time::Duration::from_secs(180),
    std::time::Duration::from_secs(300),
];
