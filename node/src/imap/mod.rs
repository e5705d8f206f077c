//! IMAP4rev1 (RFC 3501) on the cluster's mail: folders, flags and UIDs
//! that are the same on every node (see [`crate::uids`] and
//! `quill_proto::imap::folders`), over plaintext, STARTTLS or implicit TLS.
//!
//! Three layers: imap-next's sans-I/O server (the grammar, literals,
//! AUTHENTICATE and IDLE flows), the [`driver`] that owns the stream and
//! that server (bytes in and out, STARTTLS, IDLE's waiting), and the
//! [`handler`] that owns the session's state and turns each command into
//! responses; the rules that need no mail are the protocol cores'
//! (`quill_proto::imap`).
//!
//! Served: CAPABILITY, NOOP, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE PLAIN
//! (with SASL-IR), ID, NAMESPACE, ENABLE, LIST, LSUB, STATUS, SELECT,
//! EXAMINE, CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, CHECK, CLOSE,
//! UNSELECT, EXPUNGE, UID EXPUNGE, FETCH and UID FETCH (FLAGS, UID,
//! INTERNALDATE, RFC822.SIZE, RFC822, RFC822.HEADER, RFC822.TEXT, `BODY[]`,
//! `BODY.PEEK[]`, `BODY[HEADER]`, `BODY[HEADER.FIELDS (...)]`, `BODY[TEXT]`,
//! MIME parts, ENVELOPE, BODY, BODYSTRUCTURE, partial ranges), SEARCH and UID
//! SEARCH, STORE and UID STORE (+/-FLAGS, .SILENT), COPY, MOVE and their
//! UID forms (with COPYUID), APPEND (with flags, date and APPENDUID), IDLE.
//!
//! Flags (system flags and keywords) are stored: each flag of each message
//! is a register, last writer wins by HLC, sent to every replica and
//! merged by anti-entropy (`replication::marks`); so is the folder a
//! message is in, which is how MOVE works (the message keeps its id and
//! body, gets a UID in the destination and loses the one in the source).
//! COPY stores a new message (the body is shared by hash on each node).

pub mod driver;
pub mod handler;

pub use driver::serve_on;
