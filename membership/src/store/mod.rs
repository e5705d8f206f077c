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
