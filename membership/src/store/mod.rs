//! Durable Raft storage in one folder per node: the log and vote
//! ([`LogStore`]) and the state machine with its snapshot
//! ([`StateMachineStore`]). Both are openraft storage-v2 implementations,
//! checked by openraft's storage suite (`tests/storage.rs`).

pub(crate) mod frame;
mod log_store;
mod state_machine;

pub use log_store::LogStore;
pub(crate) use state_machine::Shared;
pub use state_machine::{SnapshotBuilder, StateMachineStore};

use std::io;
use std::path::Path;

use crate::codec;

/// The encoding of everything in the Raft folder (log entries, the
/// snapshot, the state machine's state). bincode is positional: adding a
/// field or a variant to `Command`, `ClusterState` or anything in them
/// changes it, and an older folder would not decode (or, worse, decode
/// into the wrong fields). Bump it with every such change.
///
/// 1: named bindings (`names`), `NodeAddrs::inbound_only`, the sequence
/// commands and `NodeAddrs::imaps` (folders from before format files are
/// taken as format 0).
pub const FORMAT: u32 = 1;

/// Checks `dir/format` against [`FORMAT`], writing it in a new folder: a
/// folder written in another format is refused with the reason, rather
/// than read wrong.
pub(crate) fn check_format(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("format");
    let found: u32 = match frame::read_file(&path, 64)? {
        Some(payload) => codec::decode(&payload, 64).map_err(|e| frame::bad_data(&path, &e.to_string()))?,
        None => {
            let used = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).any(|e| {
                let name = e.file_name();
                name != "format" && !name.to_string_lossy().starts_with('.')
            });
            if !used {
                frame::write_file_atomic(dir, "format", &codec::encode(&FORMAT).map_err(io::Error::other)?)?;
                return Ok(());
            }
            0
        }
    };
    if found != FORMAT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "Raft state written in format {found}, this build reads format {FORMAT} \
                 (the encoding changed): run the build that wrote it, or start the node \
                 from an empty data directory (a cluster member then joins again as a \
                 new node and gets its share of mail from the others)"
            ),
        ));
    }
    Ok(())
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
        check_format(&fresh).expect("a new folder");
        check_format(&fresh).expect("the same format again");
        // A folder from before format files: refused.
        let old = base.join("old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("incarnation"), b"x").unwrap();
        let e = check_format(&old).expect_err("an old folder");
        assert!(e.to_string().contains("format 0"), "{e}");
        // Another format: refused.
        let other = base.join("other");
        std::fs::create_dir_all(&other).unwrap();
        frame::write_file_atomic(&other, "format", &codec::encode(&(FORMAT + 1)).unwrap()).unwrap();
        assert!(check_format(&other).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
