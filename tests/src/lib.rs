//! Multi-process tests of Quill nodes. Every test starts real `quill node`
//! processes through the harness library and speaks to them only through
//! their public protocols and admin API.
//!
//! Run `cargo build --bins` before `cargo test` so that the `quill` binary
//! exists (README's test command does both).
