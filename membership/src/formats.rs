//! Feature levels, and the Raft state's encodings by level.
//!
//! Everything in a node's Raft folder and on the Raft wire is bincode,
//! which is positional: a field or variant added in the middle changes
//! the meaning of every byte after it. So nothing changes in place; each
//! change comes with the **feature level** that brings it, and the
//! cluster runs at one level ([`ClusterState::feature_level`]), raised
//! only once every node runs a release that supports the next
//! (`quill admin cluster upgrade-finish`, or the leader by itself: see the
//! node's `cluster::levels`). While it is not raised, nothing is written
//! that the previous release cannot read, so a node rolled back to it
//! still works; once raised, such a node is refused with the reason.
//!
//! | level | release | what it brought |
//! |---|---|---|
//! | 1 | 0.1.0 | the Raft state as 0.1.0 wrote it, bare |
//! | 2 | 0.2.0 | the level itself ([`Command::SetFeatureLevel`]); snapshots that say their format |
//! | 3 | 0.3.0 | the IMAP keywords each folder defines ([`Command::DefineKeywords`], [`crate::keywords`]); the folders' mod-sequences ([`Command::Touch`], [`crate::modseq`]); aliases, domain aliases, catch-alls ([`Command::Routes`], [`crate::routes`]); cluster settings ([`Command::SetSetting`]); DKIM signing keys ([`Command::Dkim`], [`crate::dkim`]); blocklists and access rules ([`Command::Blocklist`], [`crate::blocklist`]); outside the Raft state, the store's body records of kind 8 (`replication::record`) |
//!
//! What each part does:
//! - **Log entries** (a [`crate::Request`] and its [`Command`]): a command
//!   added by a release is a new variant at the end of [`Command`], with
//!   its level in [`Command::feature_level`]; proposing it is refused, and
//!   the state machine makes it a committed no-op, below that level. An
//!   existing variant never changes.
//! - **The state** (snapshots, on disk and sent to a follower that is
//!   behind): format 1 is release 0.1.0's layout, bare. From format 2 a
//!   snapshot starts with [`TAG`] (a byte no format-1 snapshot starts
//!   with: it begins with the view's epoch, a bincode varint, and a varint
//!   never starts with 0xFF), then its format (u32 LE), then the state. A
//!   node writes the format of the level the cluster runs at: a snapshot
//!   for a node of the previous release is one it reads.
//! - **The folder's `format` file** names the newest format anything in
//!   the folder was written in, and is raised (fsynced) before that thing
//!   is written ([`crate::store`]): a release that cannot read the folder
//!   refuses it at start, with the reason, instead of misreading it.
//!
//! To add to the state (aliases, keys, scripts, settings, ...):
//! 1. add the field to [`ClusterState`], and its commands at the end of
//!    [`Command`] with the new level in [`Command::feature_level`];
//! 2. freeze the previous layout here (`StateV2`, as `StateV1` is: a
//!    type of another module that changes is frozen with it), with a
//!    `From` migration to the new one;
//! 3. raise [`FEATURE_LEVEL_MAX`]; [`encode_state`] writes the frozen
//!    layout while the cluster runs below the new level (nothing is lost:
//!    the new commands are refused until then);
//! 4. keep a fixture the previous release wrote (`tests/fixtures/`) and a
//!    test that reads it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::command::{ClusterState, Session, TlsCerts};
use crate::directory::DirectoryState;
use crate::view::ClusterView;

#[cfg(doc)]
use crate::command::Command;

/// The oldest level this release runs at: release 0.1.0's.
pub const FEATURE_LEVEL_MIN: u32 = 1;
/// The newest level this release supports.
pub const FEATURE_LEVEL_MAX: u32 = 3;

/// The first byte of a snapshot of format 2 or later.
pub const TAG: u8 = 0xFF;
const TAGGED_HEADER_BYTES: usize = 5;

/// Release 0.1.0's state (format 1): [`ClusterState`] without its level.
/// Frozen: a test checks that it encodes what 0.1.0 wrote, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateV1 {
    view: ClusterView,
    directory: DirectoryState,
    sessions: BTreeMap<u64, Session>,
    tls: TlsCerts,
    sequences: crate::sequence::Sequences,
    names: crate::names::Names,
}

/// [`StateV1`]'s layout over a borrowed state, for writing it without a
/// copy.
#[derive(Serialize)]
struct StateV1Ref<'a> {
    view: &'a ClusterView,
    directory: &'a DirectoryState,
    sessions: &'a BTreeMap<u64, Session>,
    tls: &'a TlsCerts,
    sequences: &'a crate::sequence::Sequences,
    names: &'a crate::names::Names,
}

/// The migration from format 1: a cluster of release 0.1.0 runs at level 1.
impl From<StateV1> for ClusterState {
    fn from(v: StateV1) -> ClusterState {
        ClusterState {
            view: v.view,
            directory: v.directory,
            sessions: v.sessions,
            tls: v.tls,
            sequences: v.sequences,
            names: v.names,
            feature_level: 1,
            keywords: Default::default(),
            routes: Default::default(),
            settings: Default::default(),
            dkim: Default::default(),
            blocklists: Default::default(),
            modseqs: Default::default(),
        }
    }
}

/// Release 0.2.0's state (format 2): [`ClusterState`] without the
/// folders' keywords. Frozen: a test reads what 0.2.0 wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateV2 {
    view: ClusterView,
    directory: DirectoryState,
    sessions: BTreeMap<u64, Session>,
    tls: TlsCerts,
    sequences: crate::sequence::Sequences,
    names: crate::names::Names,
    feature_level: u32,
}

/// [`StateV2`]'s layout over a borrowed state.
#[derive(Serialize)]
struct StateV2Ref<'a> {
    view: &'a ClusterView,
    directory: &'a DirectoryState,
    sessions: &'a BTreeMap<u64, Session>,
    tls: &'a TlsCerts,
    sequences: &'a crate::sequence::Sequences,
    names: &'a crate::names::Names,
    feature_level: u32,
}

/// The migration from format 2: no folder has defined keywords yet.
impl From<StateV2> for ClusterState {
    fn from(v: StateV2) -> ClusterState {
        ClusterState {
            view: v.view,
            directory: v.directory,
            sessions: v.sessions,
            tls: v.tls,
            sequences: v.sequences,
            names: v.names,
            feature_level: v.feature_level,
            keywords: Default::default(),
            routes: Default::default(),
            settings: Default::default(),
            dkim: Default::default(),
            blocklists: Default::default(),
            modseqs: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "written in format {0} by a newer release; this release reads formats {FEATURE_LEVEL_MIN} to {FEATURE_LEVEL_MAX}: run that release (or a newer one)"
    )]
    Newer(u32),
    #[error("format {0} is not one any release wrote")]
    Unknown(u32),
    #[error("a snapshot of format {format} holds a state of feature level {level}")]
    Mismatch { format: u32, level: u32 },
    #[error("short snapshot header")]
    Short,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The state in the format of the level it runs at.
pub fn encode_state(s: &ClusterState) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_state_into(s, &mut out)?;
    Ok(out)
}

/// [`encode_state`] into a writer: the same bytes, never all in memory
/// (a directory of millions of users is gigabytes).
pub fn encode_state_into<W: std::io::Write>(s: &ClusterState, w: &mut W) -> Result<(), CodecError> {
    if s.feature_level <= 1 {
        return codec::encode_into(
            &StateV1Ref {
                view: &s.view,
                directory: &s.directory,
                sessions: &s.sessions,
                tls: &s.tls,
                sequences: &s.sequences,
                names: &s.names,
            },
            w,
        );
    }
    let mut header = [0u8; TAGGED_HEADER_BYTES];
    header[0] = TAG;
    header[1..].copy_from_slice(&s.feature_level.to_le_bytes());
    w.write_all(&header)
        .map_err(|e| bincode::error::EncodeError::Io { inner: e, index: 0 })?;
    if s.feature_level == 2 {
        codec::encode_into(
            &StateV2Ref {
                view: &s.view,
                directory: &s.directory,
                sessions: &s.sessions,
                tls: &s.tls,
                sequences: &s.sequences,
                names: &s.names,
                feature_level: s.feature_level,
            },
            w,
        )
    } else {
        codec::encode_into(s, w)
    }
}

/// [`decode_state`] from a reader holding `len` bytes, never all in
/// memory; the same formats and checks.
pub fn decode_state_from<R: std::io::Read>(r: &mut R, len: u64) -> Result<ClusterState, FormatError> {
    let mut first = [0u8; 1];
    r.read_exact(&mut first).map_err(|_| FormatError::Short)?;
    if first[0] != TAG {
        // Format 1 has no header: its first byte is the state's.
        let mut whole = std::io::Read::chain(&first[..], r);
        return Ok(codec::decode_from::<StateV1, _>(&mut whole, len)?.into());
    }
    let mut f = [0u8; TAGGED_HEADER_BYTES - 1];
    r.read_exact(&mut f).map_err(|_| FormatError::Short)?;
    let format = u32::from_le_bytes(f);
    let body = len.saturating_sub(TAGGED_HEADER_BYTES as u64);
    let s: ClusterState = match format {
        f if f > FEATURE_LEVEL_MAX => return Err(FormatError::Newer(f)),
        f if f < 2 => return Err(FormatError::Unknown(f)),
        2 => codec::decode_from::<StateV2, _>(r, body)?.into(),
        _ => codec::decode_from(r, body)?,
    };
    if s.feature_level != format {
        return Err(FormatError::Mismatch {
            format,
            level: s.feature_level,
        });
    }
    Ok(s)
}

/// The format of an encoded state (without decoding it).
pub fn state_format(bytes: &[u8]) -> Result<u32, FormatError> {
    match bytes.first() {
        Some(&TAG) => {
            let f = bytes.get(1..TAGGED_HEADER_BYTES).ok_or(FormatError::Short)?;
            Ok(u32::from_le_bytes(f.try_into().expect("4 bytes")))
        }
        _ => Ok(1),
    }
}

/// A state of any format this release reads, migrated to the current one.
pub fn decode_state(bytes: &[u8], limit_bytes: usize) -> Result<ClusterState, FormatError> {
    match state_format(bytes)? {
        1 => Ok(codec::decode::<StateV1>(bytes, limit_bytes)?.into()),
        f if f > FEATURE_LEVEL_MAX => Err(FormatError::Newer(f)),
        f if f < 2 => Err(FormatError::Unknown(f)),
        f => {
            let body = &bytes[TAGGED_HEADER_BYTES..];
            let s: ClusterState = if f == 2 {
                codec::decode::<StateV2>(body, limit_bytes)?.into()
            } else {
                codec::decode(body, limit_bytes)?
            };
            if s.feature_level != f {
                return Err(FormatError::Mismatch {
                    format: f,
                    level: s.feature_level,
                });
            }
            Ok(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, CommittedBy};
    use crate::directory::DirectoryCommand;
    use crate::view::NodeInfo;
    use std::collections::BTreeSet;

    fn some_state() -> ClusterState {
        let mut s = ClusterState::default();
        let v = BTreeSet::from([1]);
        for c in [
            Command::AddNode(NodeInfo::new(1, "a:1")),
            Command::Directory(DirectoryCommand::AddDomain {
                domain: "example.org".into(),
            }),
            Command::BindNames {
                scope: "alice@example.org".into(),
                items: vec![("INBOX".into(), [1; 16])],
            },
        ] {
            assert_eq!(s.apply(&c, &v, CommittedBy::default()).result, Ok(()));
        }
        s
    }

    #[test]
    fn level_one_is_written_bare_and_read_back() {
        let s = some_state();
        assert_eq!(s.feature_level, 1);
        let bytes = encode_state(&s).unwrap();
        assert_ne!(bytes[0], TAG);
        assert_eq!(state_format(&bytes).unwrap(), 1);
        assert_eq!(decode_state(&bytes, 1 << 20).unwrap(), s);
    }

    #[test]
    fn level_two_says_its_format() {
        let mut s = some_state();
        let r = s.apply(
            &Command::SetFeatureLevel { level: 2 },
            &BTreeSet::new(),
            CommittedBy::default(),
        );
        assert_eq!(r.result, Ok(()));
        let bytes = encode_state(&s).unwrap();
        assert_eq!(bytes[0], TAG);
        assert_eq!(state_format(&bytes).unwrap(), 2);
        assert_eq!(decode_state(&bytes, 1 << 20).unwrap(), s);
        // A release before level 2 reads the tag as a varint that cannot
        // start a u64: it refuses the snapshot rather than misread it.
        assert!(codec::decode::<StateV1>(&bytes, 1 << 20).is_err());
    }

    #[test]
    fn newer_and_inconsistent_formats_are_refused_with_the_reason() {
        let mut s = some_state();
        s.feature_level = 2;
        let mut bytes = encode_state(&s).unwrap();
        bytes[1..5].copy_from_slice(&9u32.to_le_bytes());
        let e = decode_state(&bytes, 1 << 20).unwrap_err();
        assert!(matches!(e, FormatError::Newer(9)), "{e}");
        assert!(e.to_string().contains("newer release"), "{e}");
        bytes[1..5].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(decode_state(&bytes, 1 << 20), Err(FormatError::Unknown(0))));
        assert!(matches!(decode_state(&[TAG, 2], 1 << 20), Err(FormatError::Short)));
    }
}

/// What release 0.1.0 wrote (`tests/fixtures/v0.1.0`, made by
/// `tests/fixtures/make-v0.1.0.sh`), read by this release.
#[cfg(test)]
mod fixture_v0_1_0 {
    use super::*;
    use crate::codec::DISK_BYTES_MAX;
    use crate::store::{LogStore, StateMachineStore, check_format, frame};
    use crate::test_dir::TestDir;
    use std::path::{Path, PathBuf};

    fn fixture() -> PathBuf {
        release("v0.1.0")
    }

    pub(super) fn release(version: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(version)
    }

    /// A copy of node `k`'s Raft folder (opening a folder writes to it).
    fn raft_copy(k: u32) -> TestDir {
        raft_copy_of("v0.1.0", k)
    }

    pub(super) fn raft_copy_of(version: &str, k: u32) -> TestDir {
        let dir = TestDir::new("fixture");
        let from = release(version).join(format!("n{k}/cluster/raft"));
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
        dir
    }

    fn manifest() -> serde_json::Value {
        let text = std::fs::read_to_string(fixture().join("manifest.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn the_snapshot_reads_as_level_one_and_writes_back_byte_for_byte() {
        for k in 1..=3 {
            let dir = raft_copy(k);
            assert_eq!(check_format(dir.path()).unwrap(), 1, "n{k}");
            let payload = frame::read_file(&dir.path().join("snapshot"), DISK_BYTES_MAX)
                .unwrap()
                .expect("the fixture has snapshots");
            #[derive(serde::Deserialize)]
            struct SnapshotFile {
                #[allow(dead_code)]
                meta: crate::types::SnapshotMeta,
                data: Vec<u8>,
            }
            let file: SnapshotFile = codec::decode(&payload, DISK_BYTES_MAX).unwrap();
            assert_eq!(state_format(&file.data).unwrap(), 1);
            let state = decode_state(&file.data, DISK_BYTES_MAX).unwrap();
            assert_eq!(state.feature_level, 1);
            // At level 1 this release writes what 0.1.0 wrote: a snapshot
            // it sends to a node of 0.1.0 is one that node reads.
            assert_eq!(encode_state(&state).unwrap(), file.data, "n{k}");
            let users: Vec<&str> = state.directory.users.keys().map(String::as_str).collect();
            for u in ["alice@example.org", "bob@example.org", "carol@example.org"] {
                assert!(users.contains(&u), "n{k}: {u} in {users:?}");
            }
            assert_eq!(state.view.nodes.len(), 3);
        }
    }

    #[test]
    fn the_log_and_state_machine_open_and_hold_the_folders_and_uids() {
        let want = manifest();
        let dir = raft_copy(1);
        let log = LogStore::open(dir.path()).expect("the 0.1.0 log opens");
        drop(log);
        let sm = StateMachineStore::open(dir.path()).expect("the 0.1.0 snapshot opens");
        let shared = sm.shared();
        let d = shared.read();
        // The snapshot was taken before the last changes, and UIDs are
        // given when a folder is first looked at: what it holds is a
        // prefix of what the manifest shows. Alice's folders were made
        // before it; each sequence it has is one IMAP showed, no further on.
        let alice = d.state.names.get("imap/alice@example.org").cloned().unwrap_or_default();
        for folder in ["Work", "Archive", "Archive/2026"] {
            assert!(alice.contains_key(folder), "alice's {folder} in {alice:?}");
        }
        let shown: BTreeMap<u32, u32> = want["mailboxes"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|m| m["folders"].as_object().unwrap().values())
            .map(|f| {
                (
                    f["uidvalidity"].as_u64().unwrap() as u32,
                    f["uidnext"].as_u64().unwrap() as u32,
                )
            })
            .collect();
        let mut matched = 0;
        for (name, seq) in d.state.sequences.spaces.iter().filter(|(n, _)| n.starts_with("imap/")) {
            let Some(next) = shown.get(&seq.validity) else {
                // A folder deleted since (the churn folder).
                continue;
            };
            assert!(
                seq.next <= *next,
                "{name}: next {} beyond the {next} IMAP showed",
                seq.next
            );
            matched += 1;
        }
        assert!(
            matched >= 3,
            "only {matched} of the folders IMAP showed are in the snapshot"
        );
    }
}

/// What release 0.2.0 wrote (`tests/fixtures/v0.2.0`: node 1's Raft
/// folder and the manifest of a cluster that `make-v0.1.0.sh` filled,
/// run with `QUILL_OLD` set to a 0.2.0 build), read by this release.
#[cfg(test)]
mod fixture_v0_2_0 {
    use super::fixture_v0_1_0::{raft_copy_of, release};
    use super::*;
    use crate::codec::DISK_BYTES_MAX;
    use crate::command::{Command, CommittedBy};
    use crate::store::{StateMachineStore, check_format, frame};
    use std::collections::BTreeSet;

    fn snapshot_state() -> (Vec<u8>, ClusterState) {
        let dir = raft_copy_of("v0.2.0", 1);
        assert_eq!(check_format(dir.path()).unwrap(), 2);
        let payload = frame::read_file(&dir.path().join("snapshot"), DISK_BYTES_MAX)
            .unwrap()
            .expect("the fixture has a snapshot");
        #[derive(serde::Deserialize)]
        struct SnapshotFile {
            #[allow(dead_code)]
            meta: crate::types::SnapshotMeta,
            data: Vec<u8>,
        }
        let file: SnapshotFile = codec::decode(&payload, DISK_BYTES_MAX).unwrap();
        let state = decode_state(&file.data, DISK_BYTES_MAX).unwrap();
        (file.data, state)
    }

    #[test]
    fn the_snapshot_reads_as_level_two_and_writes_back_byte_for_byte() {
        let (bytes, state) = snapshot_state();
        assert_eq!(state_format(&bytes).unwrap(), 2);
        assert_eq!(state.feature_level, 2);
        assert!(state.keywords.is_empty());
        // At level 2 this release writes what 0.2.0 wrote.
        assert_eq!(encode_state(&state).unwrap(), bytes);
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(release("v0.2.0").join("manifest.json")).unwrap()).unwrap();
        for user in manifest["mailboxes"].as_object().unwrap().keys() {
            assert!(state.directory.users.contains_key(user), "{user}");
        }
        assert_eq!(state.view.nodes.len(), 3);
    }

    #[test]
    fn raised_to_level_three_it_keeps_everything_and_defines_keywords() {
        let (_, mut state) = snapshot_state();
        let before = state.clone();
        let name = state
            .sequences
            .spaces
            .keys()
            .find(|n| n.starts_with("imap/"))
            .cloned()
            .expect("the fixture has IMAP folders");
        let define = Command::DefineKeywords {
            name: name.clone(),
            keywords: vec!["$Label1".into()],
        };
        let v = BTreeSet::new();
        let by = CommittedBy::default();
        assert!(state.apply(&define, &v, by).result.is_err(), "refused at level 2");
        let routes = Command::Routes(crate::routes::RoutesCommand::SetDomainAlias {
            alias: "alias.test".into(),
            target: "example.org".into(),
        });
        assert!(state.apply(&routes, &v, by).result.is_err(), "refused at level 2");
        assert_eq!(state.routes, Default::default());
        assert!(state.keywords.is_empty());
        assert_eq!(
            state.apply(&Command::SetFeatureLevel { level: 3 }, &v, by).result,
            Ok(())
        );
        assert_eq!(state.apply(&define, &v, by).result, Ok(()));
        assert!(state.keywords.get(&name).unwrap().contains("$Label1"));
        // Routes come with level 3 too, into the fixture's own users.
        let user = state.directory.users.keys().next().cloned().expect("users");
        let domain = user.rsplit_once('@').unwrap().1.to_owned();
        let alias = Command::Routes(crate::routes::RoutesCommand::SetAlias {
            address: format!("team@{domain}"),
            targets: vec![user.clone()],
            srs_key: [5; 32],
        });
        assert_eq!(state.apply(&alias, &v, by).result, Ok(()));
        let e = crate::routes::expand(&state.directory, &state.routes, &format!("team@{domain}")).unwrap();
        assert_eq!(e.local[0].0.address, user);
        let bytes = encode_state(&state).unwrap();
        assert_eq!(state_format(&bytes).unwrap(), 3);
        let back = decode_state(&bytes, DISK_BYTES_MAX).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.directory, before.directory);
        assert_eq!(back.sequences, before.sequences);
        assert_eq!(back.names, before.names);
    }

    #[test]
    fn the_state_machine_opens_the_folder() {
        let dir = raft_copy_of("v0.2.0", 1);
        let sm = StateMachineStore::open(dir.path()).expect("the 0.2.0 snapshot opens");
        let d = sm.shared();
        let d = d.read();
        assert_eq!(d.state.feature_level, 2);
        assert!(d.state.names.get("imap/alice@example.org").is_some());
    }
}
