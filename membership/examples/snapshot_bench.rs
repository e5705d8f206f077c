//! What a snapshot of a large directory costs: a state of USERS users
//! (argon2id hashes of the length nodes write) is written as a snapshot
//! and read back, the way a node builds one and a joining node installs
//! it, with the time and the peak memory of the process.
//!
//!     cargo run --release -p membership --example snapshot_bench -- files USERS
//!     cargo run --release -p membership --example snapshot_bench -- buffer USERS
//!
//! `files`: this release (encoded into a file as it is made, decoded from
//! it). `buffer`: as up to 0.2.0 (the encoding in one buffer, decoded from
//! it; over 1 GiB refused). Run each in its own process: the peak memory
//! (VmHWM) is the process's. Bounded: one state, a temporary folder
//! removed at the end.

use std::time::Instant;

use membership::ClusterState;
use membership::DirectoryCommand;

fn peak_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let how = args.next().unwrap_or_else(|| "files".into());
    let users: usize = args.next().map_or(1_000_000, |a| a.parse().expect("USERS is a number"));
    let mut state = ClusterState::default();
    state.feature_level = membership::FEATURE_LEVEL_MAX;
    state
        .directory
        .apply(&DirectoryCommand::AddDomain {
            domain: "example.org".into(),
        })
        .expect("domain");
    for i in 0..users {
        state
            .directory
            .apply(&DirectoryCommand::AddUser {
                address: format!("user{i}@example.org"),
                password_hash: format!("$argon2id$v=19$m=19456,t=2,p=1${i:022}${i:043}"),
                quota_bytes: Some(1 << 30),
            })
            .expect("user");
    }
    let base = peak_mib();
    println!("{users} users; the state in memory: peak {base} MiB before the snapshot");
    let dir = std::env::temp_dir().join(format!("quill-snapshot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    match how.as_str() {
        "files" => {
            let t = Instant::now();
            let (path, len) = membership::store::snapshot::bench_write(&dir, &state).expect("write");
            let write_s = t.elapsed().as_secs_f64();
            drop(state);
            let t = Instant::now();
            let back = membership::store::snapshot::bench_read(&path).expect("read");
            let read_s = t.elapsed().as_secs_f64();
            println!(
                "files: {len} bytes; written in {write_s:.2} s, read and installed in {read_s:.2} s; {} users back; \
                 peak {} MiB",
                back.directory.users.len(),
                peak_mib()
            );
        }
        "buffer" => {
            let t = Instant::now();
            let bytes = membership::formats::encode_state(&state).expect("encode");
            let write_s = t.elapsed().as_secs_f64();
            drop(state);
            let t = Instant::now();
            match membership::formats::decode_state(&bytes, membership::codec::DISK_BYTES_MAX) {
                Ok(back) => println!(
                    "buffer: {} bytes; encoded in {write_s:.2} s, decoded in {:.2} s; {} users back; peak {} MiB",
                    bytes.len(),
                    t.elapsed().as_secs_f64(),
                    back.directory.users.len(),
                    peak_mib()
                ),
                Err(e) => println!(
                    "buffer: {} bytes; encoded in {write_s:.2} s; refused: {e}; peak {} MiB",
                    bytes.len(),
                    peak_mib()
                ),
            }
        }
        other => panic!("files or buffer, not {other}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
