//! Quill's protocol cores: the rules of SMTP, LMTP, POP3 and IMAP, the
//! DATA reader, SASL, what the protocols read out of a message, the
//! outbound queue's decisions, the cluster wire's frames and the admin
//! API's bodies, in the manner of quinn-proto beside quinn.
//!
//! What it must not do: I/O of any kind. No sockets, no files, no clock
//! reads and no async runtime: time comes in as an argument, bytes come in
//! as slices, and every answer is a value (a reply, a decision, a frame)
//! that the node's tokio shell performs. So every rule here is tested
//! without a socket or a store, and the fuzz targets build from this crate
//! alone.

pub mod activity;
pub mod admin;
pub mod authres;
pub mod data;
#[doc(hidden)]
pub mod fuzz;
pub mod imap;
pub mod line;
pub mod managesieve;
pub mod mbox;
pub mod message;
pub mod pop3;
pub mod queue;
pub mod sasl;
pub mod send_as;
pub mod sieve;
pub mod smtp;
pub mod srs;
pub mod topk;
pub mod wire;
