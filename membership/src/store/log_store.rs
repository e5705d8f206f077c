//! The Raft log and vote, in a folder.
//!
//! Files:
//! * `log`: append-only frames (see `frame`), each a [`LogRecord`]: an
//!   entry, a truncation, a purge or the committed log id. Replaying them in
//!   order gives the log. A bad frame ends the replay and is cut off (a torn
//!   tail); a whole frame that does not decode is not torn but of another
//!   format, and the folder is refused rather than cut. When dead records
//!   outweigh live ones the file is rewritten (temporary file, fsync,
//!   rename, fsync the folder). An entry of a command newer than the
//!   folder's format raises the folder's `format` file first (see
//!   [`crate::formats`]).
//! * `vote`: one frame, replaced atomically on every vote.
//! * `lock`: held (`flock`) while the store is open, so two processes never
//!   share a folder.
//!
//! Entries are also kept in memory (the log is short: it is purged after
//! every snapshot), so reads never touch the disk.
//!
//! Durability: `append` answers openraft only after `fdatasync`; a truncation
//! is synced before it returns; a vote is synced before it returns. Purges
//! and the committed id are written without a sync: losing them only keeps
//! more log or re-applies less at start, both safe.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes).
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::store::FormatMark;
use crate::store::frame::{self, Frame};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// Largest record (one log entry). Entries are bounded far below this by
/// `ENTRY_BYTES_MAX` at the write path; membership entries grow with the
/// node count (tens of bytes a node).
const RECORD_BYTES_MAX: usize = 16 << 20;
/// The `log` file is rewritten when it is over this size and more than
/// twice what its live entries take.
const COMPACT_FILE_BYTES_MIN: u64 = 4 << 20;

/// One record of the `log` file. Short-lived (encoded, then replayed), so
/// the size gap between variants costs nothing. Positional, like
/// everything in the folder: as release 0.1.0 wrote it; a new kind of
/// record would go at the end, written only at the feature level that
/// brings it (`crate::formats`).
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
enum LogRecord {
    Entry(Entry),
    /// Entries at and after this index are gone.
    Truncate {
        since_index: u64,
    },
    /// Entries up to and including this id are gone.
    Purge(LogId),
    Committed(Option<LogId>),
}

#[derive(Debug, Default)]
struct MemLog {
    /// index -> (entry, bytes of its record in the file).
    entries: BTreeMap<u64, (Entry, u64)>,
    live_bytes: u64,
    last_purged: Option<LogId>,
    committed: Option<LogId>,
    vote: Option<Vote>,
}

impl MemLog {
    fn replay(&mut self, rec: LogRecord, record_bytes: u64) {
        match rec {
            LogRecord::Entry(e) => {
                let index = e.log_id.index;
                // openraft truncates before it overwrites; keep the newest anyway.
                if let Some((_, old)) = self.entries.insert(index, (e, record_bytes)) {
                    self.live_bytes -= old;
                }
                self.live_bytes += record_bytes;
            }
            LogRecord::Truncate { since_index } => {
                let gone = self.entries.split_off(&since_index);
                self.live_bytes -= gone.values().map(|(_, b)| b).sum::<u64>();
            }
            LogRecord::Purge(upto) => {
                let kept = self.entries.split_off(&(upto.index + 1));
                let gone = std::mem::replace(&mut self.entries, kept);
                self.live_bytes -= gone.values().map(|(_, b)| b).sum::<u64>();
                if self.last_purged < Some(upto) {
                    self.last_purged = Some(upto);
                }
            }
            LogRecord::Committed(c) => self.committed = c,
        }
    }
}

#[derive(Debug)]
struct LogWriter {
    dir: PathBuf,
    file: File,
    file_bytes: u64,
    /// Held for the store's lifetime: the folder's `flock`.
    _lock: File,
}

/// The Raft log store of one node. Clones share the same files and memory
/// (openraft's log reader is a clone).
#[derive(Debug, Clone)]
pub struct LogStore {
    mem: Arc<Mutex<MemLog>>,
    writer: Arc<Mutex<LogWriter>>,
    format: Arc<FormatMark>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_err(e: io::Error) -> StorageError {
    StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Write, e)
}

/// The format an entry needs its folder to be of: its command's level.
fn entry_format(e: &Entry) -> u32 {
    match &e.payload {
        // A release that knows `SetFeatureLevel` but not the level it sets
        // would refuse it and go on at its own level, apart from the
        // others: the folder is marked with the level, so that release
        // refuses the folder instead.
        EntryPayload::Normal(req) => match req.command {
            crate::command::Command::SetFeatureLevel { level } => level.max(req.command.feature_level()),
            ref c => c.feature_level(),
        },
        _ => 1,
    }
}

fn encode_record(rec: &LogRecord, out: &mut Vec<u8>) -> io::Result<u64> {
    let payload = codec::encode(rec).map_err(io::Error::other)?;
    if payload.len() > RECORD_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("log record of {} bytes", payload.len()),
        ));
    }
    frame::push_frame(out, &payload);
    Ok((frame::HEADER_BYTES + payload.len()) as u64)
}

impl LogStore {
    /// Opens (or creates) the log in `dir`. Blocking: call it off the async
    /// threads.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        fs::create_dir_all(dir)?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another process", dir.display()),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }

        let mut mem = MemLog::default();
        let log_path = dir.join("log");
        let buf = match fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut at = 0;
        loop {
            match frame::read_frame(&buf, at, RECORD_BYTES_MAX) {
                Frame::Whole { payload, next } => match codec::decode::<LogRecord>(payload, RECORD_BYTES_MAX) {
                    Ok(rec) => {
                        mem.replay(rec, (next - at) as u64);
                        at = next;
                    }
                    Err(e) => {
                        // Whole and checked, yet unreadable: written by a
                        // release this one cannot read (or a bug). Cutting
                        // it would drop committed entries: refuse instead.
                        return Err(frame::bad_data(
                            &log_path,
                            &format!(
                                "record at offset {at} does not decode ({e}): written by another release; \
                                 run the release that wrote it"
                            ),
                        ));
                    }
                },
                Frame::End => break,
                Frame::Bad(why) => {
                    tracing::warn!(path = %log_path.display(), offset = at, "raft log ends in a torn record ({why})");
                    break;
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&log_path)?;
        if at < buf.len() {
            tracing::warn!(
                path = %log_path.display(),
                cut_bytes = buf.len() - at,
                "cutting the raft log after its last good record"
            );
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        frame::sync_dir(dir)?;

        if let Some(payload) = frame::read_file(&dir.join("vote"), RECORD_BYTES_MAX)? {
            let vote: Vote = codec::decode(&payload, RECORD_BYTES_MAX).map_err(io::Error::other)?;
            mem.vote = Some(vote);
        }
        tracing::debug!(
            entries = mem.entries.len(),
            last_purged = ?mem.last_purged,
            committed = ?mem.committed,
            vote = ?mem.vote,
            "raft log opened"
        );
        Ok(LogStore {
            format: Arc::new(FormatMark::open(dir)?),
            mem: Arc::new(Mutex::new(mem)),
            writer: Arc::new(Mutex::new(LogWriter {
                dir: dir.to_path_buf(),
                file,
                file_bytes: at as u64,
                _lock: lock_file,
            })),
        })
    }

    /// Runs file work on a blocking thread, one operation at a time.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut LogWriter, &Mutex<MemLog>) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let writer = self.writer.clone();
        let mem = self.mem.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&writer), &mem))
            .await
            .map_err(|e| write_err(io::Error::other(e.to_string())))?
    }
}

impl LogStore {
    /// Writes and fsyncs entries, then makes them visible.
    async fn append_entries(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        let format = entries.iter().map(entry_format).max().unwrap_or(1);
        let records: Vec<LogRecord> = entries.into_iter().map(LogRecord::Entry).collect();
        let mark = self.format.clone();
        self.blocking(move |w, mem| {
            mark.raise_to(format).map_err(write_err)?;
            let sizes = w.write(&records, true).map_err(write_err)?;
            let mut m = lock(mem);
            for (rec, bytes) in records.into_iter().zip(sizes) {
                m.replay(rec, bytes);
            }
            Ok(())
        })
        .await
    }
}

impl LogWriter {
    /// Appends records; syncs when asked. Returns each record's bytes.
    fn write(&mut self, records: &[LogRecord], sync: bool) -> io::Result<Vec<u64>> {
        let mut buf = Vec::new();
        let sizes = records
            .iter()
            .map(|r| encode_record(r, &mut buf))
            .collect::<io::Result<Vec<u64>>>()?;
        self.file.write_all(&buf)?;
        if sync {
            self.file.sync_data()?;
        }
        self.file_bytes += buf.len() as u64;
        Ok(sizes)
    }

    /// Rewrites the file with only what is live when dead records dominate.
    fn maybe_compact(&mut self, mem: &Mutex<MemLog>) -> io::Result<()> {
        let (records, live_bytes) = {
            let m = lock(mem);
            if self.file_bytes < COMPACT_FILE_BYTES_MIN || self.file_bytes < 2 * m.live_bytes {
                return Ok(());
            }
            let mut records: Vec<LogRecord> = Vec::with_capacity(m.entries.len() + 2);
            if let Some(p) = m.last_purged {
                records.push(LogRecord::Purge(p));
            }
            records.push(LogRecord::Committed(m.committed));
            records.extend(m.entries.values().map(|(e, _)| LogRecord::Entry(e.clone())));
            (records, m.live_bytes)
        };
        let mut buf = Vec::new();
        for r in &records {
            encode_record(r, &mut buf)?;
        }
        let tmp = self.dir.join("log.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        drop(f);
        let path = self.dir.join("log");
        fs::rename(&tmp, &path)?;
        frame::sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        tracing::info!(
            before_bytes = self.file_bytes,
            after_bytes = buf.len(),
            live_bytes,
            "raft log compacted"
        );
        self.file_bytes = buf.len() as u64;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let m = lock(&self.mem);
        Ok(m.entries.range(range).map(|(_, (e, _))| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let m = lock(&self.mem);
        let last = m.entries.last_key_value().map(|(_, (e, _))| e.log_id);
        Ok(LogState {
            last_purged_log_id: m.last_purged,
            last_log_id: last.or(m.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(move |w, mem| {
            let payload = codec::encode(&vote).map_err(|e| write_err(io::Error::other(e)))?;
            frame::write_file_atomic(&w.dir, "vote", &payload)
                .map_err(|e| StorageError::from_io_error(ErrorSubject::Vote, ErrorVerb::Write, e))?;
            lock(mem).vote = Some(vote);
            Ok(())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(lock(&self.mem).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Memory first: a read right after must see it even before the write.
        lock(&self.mem).committed = committed;
        self.blocking(move |w, _| {
            w.write(&[LogRecord::Committed(committed)], false).map_err(write_err)?;
            Ok(())
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(lock(&self.mem).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let result = self.append_entries(entries.into_iter().collect()).await;
        // Only now, after the fdatasync, is the append acknowledged.
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(since = %log_id, "raft log truncate");
        self.blocking(move |w, mem| {
            let rec = LogRecord::Truncate {
                since_index: log_id.index,
            };
            let sizes = w.write(std::slice::from_ref(&rec), true).map_err(write_err)?;
            lock(mem).replay(rec, sizes[0]);
            w.maybe_compact(mem).map_err(write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(upto = %log_id, "raft log purge");
        self.blocking(move |w, mem| {
            let rec = LogRecord::Purge(log_id);
            let sizes = w.write(std::slice::from_ref(&rec), false).map_err(write_err)?;
            lock(mem).replay(rec, sizes[0]);
            w.maybe_compact(mem).map_err(write_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use openraft::testing::log_id;

    fn blank(term: u64, index: u64) -> Entry {
        openraft::testing::blank_ent::<TypeConfig>(term, 1, index)
    }

    async fn append(s: &mut LogStore, entries: Vec<Entry>) {
        // `LogFlushed` cannot be made outside openraft; the callback path is
        // covered by openraft's suite (tests/storage.rs).
        s.append_entries(entries).await.unwrap();
    }

    #[tokio::test]
    async fn reopen_keeps_log_vote_and_cuts_a_torn_tail() {
        let dir = TestDir::new("log-reopen");
        {
            let mut s = LogStore::open(dir.path()).unwrap();
            append(&mut s, (1..=10).map(|i| blank(1, i)).collect()).await;
            s.truncate(log_id(1, 1, 8)).await.unwrap();
            s.purge(log_id(1, 1, 2)).await.unwrap();
            s.save_vote(&Vote::new(3, 2)).await.unwrap();
            s.save_committed(Some(log_id(1, 1, 6))).await.unwrap();
        }
        // A torn record at the end, as after a crash mid-write.
        let log = dir.path().join("log");
        let good_bytes = fs::metadata(&log).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"QRF1\x40\x00\x00\x00garbage").unwrap();
        drop(f);

        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(fs::metadata(&log).unwrap().len(), good_bytes);
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 1, 2)));
        assert_eq!(st.last_log_id, Some(log_id(1, 1, 7)));
        let got: Vec<u64> = s
            .try_get_log_entries(0..100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(got, vec![3, 4, 5, 6, 7]);
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        assert_eq!(s.read_committed().await.unwrap(), Some(log_id(1, 1, 6)));
        // And it still appends after the cut.
        append(&mut s, vec![blank(2, 8)]).await;
        drop(s);
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(s.get_log_state().await.unwrap().last_log_id, Some(log_id(2, 1, 8)));
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_folder_is_refused() {
        let dir = TestDir::new("log-lock");
        let s = LogStore::open(dir.path()).unwrap();
        let e = LogStore::open(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(s);
        LogStore::open(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn compaction_keeps_the_live_log() {
        let dir = TestDir::new("log-compact");
        let mut s = LogStore::open(dir.path()).unwrap();
        let big = |i: u64| {
            let mut e = blank(1, i);
            e.payload = openraft::EntryPayload::Normal(crate::command::Request {
                client: crate::command::ClientId {
                    node: 1,
                    incarnation: 1,
                },
                serial: i,
                command: crate::command::Command::Directory(crate::directory::DirectoryCommand::AddDomain {
                    domain: "x".repeat(60_000),
                }),
            });
            e
        };
        for chunk in (1..=200u64).collect::<Vec<_>>().chunks(20) {
            append(&mut s, chunk.iter().map(|&i| big(i)).collect()).await;
        }
        let before = fs::metadata(dir.path().join("log")).unwrap().len();
        s.purge(log_id(1, 1, 190)).await.unwrap();
        let after = fs::metadata(dir.path().join("log")).unwrap().len();
        assert!(after < before / 10, "{before} -> {after}");
        drop(s);
        let mut s = LogStore::open(dir.path()).unwrap();
        let got = s.try_get_log_entries(0..1000).await.unwrap();
        assert_eq!(got.len(), 10);
        assert_eq!(got[0].log_id.index, 191);
        assert_eq!(
            s.get_log_state().await.unwrap().last_purged_log_id,
            Some(log_id(1, 1, 190))
        );
    }
}
