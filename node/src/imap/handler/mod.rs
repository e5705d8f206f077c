//! The IMAP handler: one session's state and the commands, returning
//! responses without touching a socket (the driver sends them). Split by
//! what the commands act on: logging in and dispatch (`commands`),
//! folders (`folders`), the selected folder (`mailbox`), messages
//! (`messages`), new messages in a folder (`copy`), and CONDSTORE and
//! QRESYNC's modifiers and resynchronization (`condstore`).

mod commands;
mod condstore;
mod copy;
mod folders;
mod mailbox;
mod messages;
mod quota;
mod state;

pub use commands::AuthStep;
pub use state::{Handler, Reply, Response, Then};
