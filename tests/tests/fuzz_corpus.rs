//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and every
//! input the fuzzers kept, crashes they found included once fixed) through
//! the same entry points the libfuzzer targets call. A panic here is a
//! regression of a bug a fuzzer once found, or a new one. The long runs are
//! by hand (FUZZING.md).

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("entry").path();
            let bytes = std::fs::read(&p).expect("readable");
            (p, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no corpus for {target}");
    out
}

fn replay(target: &str, f: impl Fn(&[u8])) {
    let inputs = corpus(target);
    for (path, bytes) in &inputs {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(bytes)));
        assert!(r.is_ok(), "{target}: {} makes it panic", path.display());
    }
    eprintln!("{target}: {} inputs replayed", inputs.len());
}

#[test]
fn smtp() {
    replay("smtp", quill_proto::fuzz::smtp);
}

#[test]
fn imap() {
    replay("imap", quill_proto::fuzz::imap);
}

#[test]
fn sieve() {
    replay("sieve", quill_proto::fuzz::sieve);
}

#[test]
fn pop3() {
    replay("pop3", quill_proto::fuzz::pop3);
}

#[test]
fn cluster_frame() {
    use quill_node::cluster::{ClusterReply, ClusterRequest};
    replay(
        "cluster_frame",
        quill_proto::fuzz::cluster_frame::<ClusterRequest, ClusterReply>,
    );
}

#[test]
fn mbox() {
    replay("mbox", quill_proto::fuzz::mbox);
}

#[test]
fn admin_json() {
    replay("admin_json", quill_proto::fuzz::admin_json);
}

#[test]
fn store_records() {
    replay("store_records", replication::fuzz::records);
}

#[test]
fn store_recovery() {
    replay("store_recovery", replication::fuzz::recovery);
}
