//! `quill-harness` as a user runs it: a command against a cluster
//! directory, its output shown in the test's log.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use quill_harness::process::quill_binary;

pub fn harness() -> PathBuf {
    let quill = quill_binary().expect("quill binary");
    let h = quill.with_file_name("quill-harness");
    assert!(h.is_file(), "no {} (cargo build --bins)", h.display());
    h
}

pub fn run(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(harness())
        .args(args)
        .arg("--dir")
        .arg(dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("quill-harness runs");
    eprintln!(
        "$ quill-harness {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(out.status.success(), "quill-harness {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stops the cluster if the test ends early.
pub struct Down(pub PathBuf);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = run(&self.0, &["down"]);
    }
}
