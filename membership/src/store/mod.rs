//! Durable Raft storage in one folder per node: the log and vote
//! ([`LogStore`]) and the state machine with its snapshot
//! ([`StateMachineStore`]). Both are openraft storage-v2 implementations,
//! checked by openraft's storage suite (`tests/storage.rs`).

pub(crate) mod frame;
mod log_store;
pub mod snapshot;
mod state_machine;

pub use log_store::LogStore;
pub use snapshot::{SNAPSHOT_BYTES_MAX, SnapshotData};
pub(crate) use state_machine::Shared;
pub use state_machine::{SnapshotBuilder, StateMachineStore};

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::codec;
use crate::formats::{FEATURE_LEVEL_MAX, FEATURE_LEVEL_MIN};

/// Checks the folder's `format` file: the newest format anything in the
/// folder was written in (see [`crate::formats`]). A new folder gets
/// format 1 (what every release reads); a folder of a format this
/// release does not read, or one from before format files (format 0), is
/// refused with the reason rather than misread. Returns the format.
pub(crate) fn check_format(dir: &Path) -> io::Result<u32> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("format");
    let found = match read_format(&path)? {
        Some(f) => f,
        None => {
            let used = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).any(|e| {
                let name = e.file_name();
                name != "format" && !name.to_string_lossy().starts_with('.')
            });
            if !used {
                write_format(dir, FEATURE_LEVEL_MIN)?;
                return Ok(FEATURE_LEVEL_MIN);
            }
            0
        }
    };
    if found > FEATURE_LEVEL_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "Raft state written in format {found} by a newer release; this release reads formats \
                 {FEATURE_LEVEL_MIN} to {FEATURE_LEVEL_MAX}: run that release or a newer one (the cluster's \
                 feature level was raised after this node ran it)"
            ),
        ));
    }
    if found < FEATURE_LEVEL_MIN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "Raft state written in format {found} (a build before format files), this release reads \
                 formats {FEATURE_LEVEL_MIN} to {FEATURE_LEVEL_MAX}: start the node from an empty data \
                 directory (a cluster member then joins again as a new node and gets its share of mail \
                 from the others)"
            ),
        ));
    }
    Ok(found)
}

/// The format a Raft folder is marked with (`None`: no mark yet), for
/// tools and tests: the node checks it at start.
pub fn folder_format(dir: &Path) -> io::Result<Option<u32>> {
    read_format(&dir.join("format"))
}

fn read_format(path: &Path) -> io::Result<Option<u32>> {
    match frame::read_file(path, 64)? {
        Some(payload) => Ok(Some(
            codec::decode(&payload, 64).map_err(|e| frame::bad_data(path, &e.to_string()))?,
        )),
        None => Ok(None),
    }
}

fn write_format(dir: &Path, format: u32) -> io::Result<()> {
    frame::write_file_atomic(dir, "format", &codec::encode(&format).map_err(io::Error::other)?)
}

/// The folder's `format` file, raised before anything of a newer format
/// is written in the folder (a log entry of a newer command, a snapshot
/// in a newer format), so that a release that cannot read the folder
/// refuses it at start. Each store of the folder holds one.
#[derive(Debug)]
pub(crate) struct FormatMark {
    dir: PathBuf,
    known: AtomicU32,
}

/// Serializes raises of every folder's mark in this process (the log and
/// the state machine of one folder may raise it at once).
static RAISING: Mutex<()> = Mutex::new(());

impl FormatMark {
    /// The mark of `dir` as it is on disk (1 if there is none yet).
    pub(crate) fn open(dir: &Path) -> io::Result<FormatMark> {
        let known = read_format(&dir.join("format"))?.unwrap_or(FEATURE_LEVEL_MIN);
        Ok(FormatMark {
            dir: dir.to_path_buf(),
            known: AtomicU32::new(known),
        })
    }

    /// Makes the folder's format at least `format`, durably, before the
    /// caller writes something of that format. Blocking.
    pub(crate) fn raise_to(&self, format: u32) -> io::Result<()> {
        if self.known.load(Ordering::Acquire) >= format {
            return Ok(());
        }
        let _one = RAISING.lock().unwrap_or_else(|p| p.into_inner());
        let on_disk = read_format(&self.dir.join("format"))?.unwrap_or(FEATURE_LEVEL_MIN);
        if on_disk < format {
            write_format(&self.dir, format)?;
            tracing::info!(dir = %self.dir.display(), from = on_disk, to = format, "raft folder format raised");
        }
        self.known.store(on_disk.max(format), Ordering::Release);
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn current(&self) -> u32 {
        self.known.load(Ordering::Acquire)
    }
}

/// Reads, bumps and durably writes the counter of starts kept in
/// `dir/incarnation`; returns the new value (1 on the first start).
pub(crate) fn next_incarnation(dir: &Path) -> io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("incarnation");
    let last: u64 = match frame::read_file(&path, 64)? {
        Some(payload) => codec::decode(&payload, 64).map_err(|e| frame::bad_data(&path, &e.to_string()))?,
        None => 0,
    };
    let next = last + 1;
    frame::write_file_atomic(dir, "incarnation", &codec::encode(&next).map_err(io::Error::other)?)?;
    Ok(next)
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn a_new_folder_gets_the_format_and_another_format_is_refused() {
        let base = std::env::temp_dir().join(format!("quill-format-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let fresh = base.join("fresh");
        assert_eq!(check_format(&fresh).expect("a new folder"), 1);
        assert_eq!(check_format(&fresh).expect("the same format again"), 1);
        // Every format this release writes is read.
        for f in FEATURE_LEVEL_MIN..=FEATURE_LEVEL_MAX {
            write_format(&fresh, f).unwrap();
            assert_eq!(check_format(&fresh).unwrap(), f);
        }
        // A folder from before format files: refused.
        let old = base.join("old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("incarnation"), b"x").unwrap();
        let e = check_format(&old).expect_err("an old folder");
        assert!(e.to_string().contains("format 0"), "{e}");
        // A newer release's format: refused, saying so.
        let other = base.join("other");
        std::fs::create_dir_all(&other).unwrap();
        write_format(&other, FEATURE_LEVEL_MAX + 1).unwrap();
        let e = check_format(&other).expect_err("a newer format");
        assert!(e.to_string().contains("newer release"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn the_mark_only_rises() {
        let dir = crate::test_dir::TestDir::new("format-mark");
        check_format(dir.path()).unwrap();
        let a = FormatMark::open(dir.path()).unwrap();
        let b = FormatMark::open(dir.path()).unwrap();
        assert_eq!(a.current(), 1);
        a.raise_to(2).unwrap();
        assert_eq!(check_format(dir.path()).unwrap(), 2);
        // Another store of the folder, with an older idea of it, does not
        // lower it.
        b.raise_to(1).unwrap();
        assert_eq!(check_format(dir.path()).unwrap(), 2);
        b.raise_to(2).unwrap();
        assert_eq!(b.current(), 2);
    }
}
