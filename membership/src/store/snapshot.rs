//! Snapshots on disk and in flight, as files: the state is encoded into a
//! file as it is made, sent from it in chunks, received into a file chunk
//! by chunk and decoded from it, so that no node holds a snapshot in one
//! buffer (a directory of 10 million users is about 1.5 GB encoded; up to
//! 0.2.0 a snapshot was a frame of at most 1 GiB, built, sent and received
//! whole in memory, so a larger directory could not be snapshotted).
//!
//! Files in the Raft folder:
//! * `snapshot-<n>.state`: the encoded state ([`crate::formats`]), exactly
//!   the bytes a follower is sent;
//! * `snapshot.meta`: one frame naming it, with the snapshot's meta, the
//!   state's length and its blake3 hash, checked as the state is read (a
//!   torn or altered state file is refused, never misread);
//! * `snapshot-<n>.part`: a state being written or received, removed
//!   when it is done with;
//! * `snapshot`: the format before level 3 (one frame: meta and state),
//!   still written while the cluster runs below level 3, so that a node
//!   rolled back to 0.2.0 reads it; removed once `snapshot.meta` is.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};

use crate::codec::{self, DISK_BYTES_MAX};
use crate::command::ClusterState;
use crate::formats::{decode_state_from, encode_state_into};
use crate::store::frame;
use crate::types::SnapshotMeta;

pub(crate) const META_FILE: &str = "snapshot.meta";
pub(crate) const LEGACY_FILE: &str = "snapshot";

/// Largest state read from disk or received from the leader (8 GiB, some
/// 50 million users); the decoder bounds what it sets aside by the file's
/// length.
pub const SNAPSHOT_BYTES_MAX: u64 = 1 << 33;

/// A snapshot's data as openraft moves it: the state's file, read and
/// written in chunks. One that is `temporary` (being received, or a
/// state that was never kept) is removed when dropped.
pub struct SnapshotData {
    file: tokio::fs::File,
    path: PathBuf,
    temporary: bool,
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotData").field("path", &self.path).finish()
    }
}

impl SnapshotData {
    /// Opens `path` to read (and, when `temporary`, to write).
    pub(crate) fn open(path: PathBuf, temporary: bool) -> io::Result<SnapshotData> {
        let file = fs::OpenOptions::new().read(true).write(temporary).open(&path)?;
        Ok(SnapshotData {
            file: tokio::fs::File::from_std(file),
            path,
            temporary,
        })
    }

    /// A new, empty part file in `dir` to receive a snapshot into.
    pub(crate) fn receive_into(dir: &Path) -> io::Result<SnapshotData> {
        let path = new_part(dir);
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        SnapshotData::open(path, true)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until what was written is on disk.
    pub(crate) async fn sync(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        self.file.sync_all().await
    }
}

impl Drop for SnapshotData {
    fn drop(&mut self) {
        if self.temporary {
            // Already renamed into place, or never complete: either way,
            // nothing to keep under this name.
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl tokio::io::AsyncRead for SnapshotData {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SnapshotData {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncSeek for SnapshotData {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }
    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

/// What `snapshot.meta` holds.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotIndex {
    pub(crate) meta: SnapshotMeta,
    /// The state file's name, in the same folder.
    state_file: String,
    len: u64,
    hash: [u8; 32],
}

/// The format before level 3 (`snapshot`).
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotFile {
    pub(crate) meta: SnapshotMeta,
    /// The encoded [`ClusterState`], as shipped to followers.
    pub(crate) data: Vec<u8>,
}

/// A state file's length and blake3 hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sum {
    pub(crate) len: u64,
    pub(crate) hash: [u8; 32],
}

/// Hashes and counts what goes through it.
struct Hashing<T> {
    inner: T,
    hasher: blake3::Hasher,
    len: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Hashing {
            inner,
            hasher: blake3::Hasher::new(),
            len: 0,
        }
    }
    fn sum(&self) -> Sum {
        Sum {
            len: self.len,
            hash: *self.hasher.finalize().as_bytes(),
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// A fresh part file name in `dir`.
fn new_part(dir: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("snapshot-{nanos:x}-{n}.part"))
}

/// Encodes `state` into a new part file in `dir`, synced; its path and sum.
pub(crate) fn write_part(dir: &Path, state: &ClusterState) -> io::Result<(PathBuf, Sum)> {
    let path = new_part(dir);
    let file = File::create_new(&path)?;
    let mut w = BufWriter::with_capacity(1 << 20, Hashing::new(file));
    let written = encode_state_into(state, &mut w)
        .map_err(io::Error::other)
        .and_then(|()| w.flush());
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    let hashing = w.into_inner().map_err(|e| e.into_error())?;
    hashing.inner.sync_all()?;
    Ok((path, hashing.sum()))
}

/// Decodes the state in `path`, checking as it goes that the file is
/// whole: its length within the limit, its sum `expected` when given.
pub(crate) fn read_state(path: &Path, expected: Option<Sum>) -> io::Result<(ClusterState, Sum)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len > SNAPSHOT_BYTES_MAX {
        return Err(frame::bad_data(
            path,
            &format!("{len} bytes is over the snapshot limit of {SNAPSHOT_BYTES_MAX}"),
        ));
    }
    if expected.is_some_and(|s| s.len != len) {
        return Err(frame::bad_data(path, "not the length its snapshot.meta says: torn"));
    }
    let mut r = BufReader::with_capacity(1 << 20, Hashing::new(file));
    let decoded = decode_state_from(&mut r, len);
    let sum = r.get_ref().sum();
    // The checksum speaks first: a torn file may also fail to decode.
    if expected.is_some_and(|s| s != sum) {
        return Err(frame::bad_data(
            path,
            "not the state its snapshot.meta names (hash differs)",
        ));
    }
    let state = decoded.map_err(|e| frame::bad_data(path, &e.to_string()))?;
    Ok((state, sum))
}

/// The snapshot on disk.
pub(crate) enum OnDisk {
    /// Level 3 on: the index, and the state file it names.
    Files { index: SnapshotIndex, path: PathBuf },
    /// Before: meta and state in one frame.
    Legacy(SnapshotFile),
}

impl OnDisk {
    pub(crate) fn meta(&self) -> &SnapshotMeta {
        match self {
            OnDisk::Files { index, .. } => &index.meta,
            OnDisk::Legacy(f) => &f.meta,
        }
    }

    /// The state, checked whole.
    pub(crate) fn state(&self) -> io::Result<ClusterState> {
        match self {
            OnDisk::Files { index, path } => Ok(read_state(
                path,
                Some(Sum {
                    len: index.len,
                    hash: index.hash,
                }),
            )?
            .0),
            OnDisk::Legacy(f) => crate::formats::decode_state(&f.data, DISK_BYTES_MAX)
                .map_err(|e| frame::bad_data(Path::new(LEGACY_FILE), &e.to_string())),
        }
    }

    /// Its data for openraft to send: the state file itself, or (legacy)
    /// the state written out to a temporary one.
    pub(crate) fn data(self, dir: &Path) -> io::Result<SnapshotData> {
        match self {
            OnDisk::Files { path, .. } => SnapshotData::open(path, false),
            OnDisk::Legacy(f) => {
                let path = new_part(dir);
                let mut file = File::create_new(&path)?;
                file.write_all(&f.data)?;
                SnapshotData::open(path, true)
            }
        }
    }
}

/// The snapshot in `dir`, if there is one: the index when there is one
/// (it is written before the legacy file is removed, so with both the
/// index is the newer), else the legacy file.
pub(crate) fn find(dir: &Path) -> io::Result<Option<OnDisk>> {
    let meta_path = dir.join(META_FILE);
    if let Some(payload) = frame::read_file(&meta_path, DISK_BYTES_MAX)? {
        let index: SnapshotIndex =
            codec::decode(&payload, DISK_BYTES_MAX).map_err(|e| frame::bad_data(&meta_path, &e.to_string()))?;
        if index.state_file.contains('/') || !index.state_file.ends_with(".state") {
            return Err(frame::bad_data(&meta_path, "names a file outside the folder"));
        }
        let path = dir.join(&index.state_file);
        return Ok(Some(OnDisk::Files { index, path }));
    }
    let path = dir.join(LEGACY_FILE);
    match frame::read_file(&path, DISK_BYTES_MAX)? {
        None => Ok(None),
        Some(payload) => Ok(Some(OnDisk::Legacy(
            codec::decode(&payload, DISK_BYTES_MAX).map_err(|e| frame::bad_data(&path, &e.to_string()))?,
        ))),
    }
}

/// Makes the synced state in `part` the snapshot of `meta`. From format 3:
/// the part becomes a state file, the index names it (written atomically),
/// then the former state file and any legacy file go. Below: the legacy
/// frame a 0.2.0 node reads (the state read back whole: at those levels
/// it is what 0.2.0 wrote, under its 1 GiB limit); the part stays with
/// its owner.
pub(crate) fn keep(dir: &Path, meta: &SnapshotMeta, part: &Path, sum: Sum, format: u32) -> io::Result<()> {
    if format <= 2 {
        if sum.len > DISK_BYTES_MAX as u64 {
            return Err(frame::bad_data(
                part,
                "a state over 1 GiB cannot be kept below feature level 3 (run upgrade-finish)",
            ));
        }
        let data = fs::read(part)?;
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        let payload = codec::encode(&file).map_err(io::Error::other)?;
        return frame::write_file_atomic(dir, LEGACY_FILE, &payload);
    }
    let before = find(dir).ok().flatten();
    let name = part
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".part"))
        .map(|n| format!("{n}.state"))
        .ok_or_else(|| frame::bad_data(part, "not a part file"))?;
    fs::rename(part, dir.join(&name))?;
    frame::sync_dir(dir)?;
    let index = SnapshotIndex {
        meta: meta.clone(),
        state_file: name.clone(),
        len: sum.len,
        hash: sum.hash,
    };
    frame::write_file_atomic(dir, META_FILE, &codec::encode(&index).map_err(io::Error::other)?)?;
    if let Some(OnDisk::Files { path, .. }) = before
        && path != dir.join(&name)
    {
        let _ = fs::remove_file(path);
    }
    match fs::remove_file(dir.join(LEGACY_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    remove_strays(dir, &name);
    Ok(())
}

/// State files the index does not name (a crash between a rename and the
/// index, or before the former file went); part files are left to their
/// owners, and removed at start.
fn remove_strays(dir: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("snapshot-") && name.ends_with(".state") && name != keep {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// For `examples/snapshot_bench`: a state written as a snapshot is
/// (path, bytes), and read back as an installed one is.
#[doc(hidden)]
pub fn bench_write(dir: &Path, state: &ClusterState) -> io::Result<(PathBuf, u64)> {
    write_part(dir, state).map(|(p, sum)| (p, sum.len))
}

#[doc(hidden)]
pub fn bench_read(path: &Path) -> io::Result<ClusterState> {
    read_state(path, None).map(|(s, _)| s)
}

/// At start: parts left by a run that stopped while writing or receiving.
pub(crate) fn remove_parts(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        if name
            .to_str()
            .is_some_and(|n| n.starts_with("snapshot-") && n.ends_with(".part"))
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::DirectoryCommand;
    use crate::formats::encode_state;
    use crate::test_dir::TestDir;
    use crate::view::NodeInfo;

    fn state(level: u32, users: usize) -> ClusterState {
        let mut s = ClusterState {
            feature_level: level,
            ..ClusterState::default()
        };
        s.view.epoch = 7;
        s.view.nodes.insert(1, NodeInfo::new(1, "127.0.0.1:7000"));
        s.directory
            .apply(&DirectoryCommand::AddDomain {
                domain: "example.org".into(),
            })
            .unwrap();
        for i in 0..users {
            s.directory
                .apply(&DirectoryCommand::AddUser {
                    address: format!("user{i}@example.org"),
                    password_hash: format!("$argon2id$v=19$m=19456,t=2,p=1${i:022}${i:043}"),
                    quota_bytes: None,
                })
                .unwrap();
        }
        s
    }

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
            last_membership: Default::default(),
            snapshot_id: format!("1-1-{index}"),
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .map(|n| if n.ends_with(".state") { "*.state".into() } else { n })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_streamed_encoding_is_the_one_sent_and_read_back() {
        for level in [1, 2, 3] {
            let s = state(level, 50);
            let whole = encode_state(&s).unwrap();
            let mut streamed = Vec::new();
            encode_state_into(&s, &mut streamed).unwrap();
            assert_eq!(streamed, whole, "level {level}");
            let back = decode_state_from(&mut &whole[..], whole.len() as u64).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn level_three_keeps_a_state_file_named_by_the_index_and_drops_the_rest() {
        let dir = TestDir::new("snap3");
        // A legacy snapshot, as 0.2.0 left it.
        let (part, sum) = write_part(dir.path(), &state(2, 3)).unwrap();
        keep(dir.path(), &meta(5), &part, sum, 2).unwrap();
        fs::remove_file(&part).unwrap();
        assert_eq!(files(dir.path()), vec![LEGACY_FILE]);
        assert!(matches!(find(dir.path()).unwrap(), Some(OnDisk::Legacy(_))));
        // Two level-3 snapshots: one state file, the index, nothing else.
        for (i, users) in [(9, 10), (12, 20)] {
            let s = state(3, users);
            let (part, sum) = write_part(dir.path(), &s).unwrap();
            keep(dir.path(), &meta(i), &part, sum, 3).unwrap();
            assert_eq!(files(dir.path()), vec!["*.state", META_FILE]);
            let found = find(dir.path()).unwrap().unwrap();
            assert_eq!(found.meta().last_log_id.unwrap().index, i);
            assert_eq!(found.state().unwrap(), s);
        }
    }

    #[test]
    fn a_torn_or_altered_state_file_is_refused_at_every_offset() {
        let dir = TestDir::new("snaptorn");
        let s = state(3, 5);
        let (part, sum) = write_part(dir.path(), &s).unwrap();
        keep(dir.path(), &meta(3), &part, sum, 3).unwrap();
        let Some(OnDisk::Files { path, .. }) = find(dir.path()).unwrap() else {
            panic!("no index")
        };
        let good = fs::read(&path).unwrap();
        for cut in 0..good.len() {
            fs::write(&path, &good[..cut]).unwrap();
            let err = find(dir.path()).unwrap().unwrap().state().err();
            assert!(err.is_some(), "torn at {cut} and read");
        }
        for at in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            let err = find(dir.path()).unwrap().unwrap().state().err();
            assert!(err.is_some(), "byte {at} altered and read");
        }
        fs::write(&path, &good).unwrap();
        assert_eq!(find(dir.path()).unwrap().unwrap().state().unwrap(), s);
    }

    #[test]
    fn a_received_state_that_claims_more_than_it_holds_is_refused() {
        // The format header, then a view epoch, then a node map claiming
        // 2^60 entries: refused, nothing of that size set aside.
        let mut bytes = vec![crate::formats::TAG];
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.push(7);
        bytes.push(255);
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let dir = TestDir::new("snaphostile");
        let path = dir.path().join("x.part");
        fs::write(&path, &bytes).unwrap();
        assert!(read_state(&path, None).is_err());
        // A string whose length prefix (2^40) is over what the input's
        // size allows the decoder to set aside: refused before any
        // allocation (without the bound this would abort the process).
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let r = codec::decode_from::<String, _>(&mut &bytes[..], bytes.len() as u64);
        assert!(matches!(r, Err(codec::CodecError::Decode(_))), "{r:?}");
    }
}
