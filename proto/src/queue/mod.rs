//! The outbound queue's data: what a queued message is, where it is kept,
//! when it is tried again, and the bounce (RFC 3464 DSN) it may end in.
//! Pure: the node's `outbound` module does the I/O.
//!
//! A queued message is mail like any other (the same store and replica
//! protocol: R copies, fsync before `250`), kept in one of
//! [`SHARDS`] queue mailboxes (`queue~K`, a name no user has: user
//! mailboxes hold an `@`). Its body is an envelope ([`Envelope`]) in front
//! of the message. Each recipient's end is a flag register of the entry
//! (`rcpt-ok:I`, `rcpt-failed:I`), replicated like IMAP flags; the entry is
//! deleted (a tombstone) once every recipient has ended. Each shard has one
//! owner at a time ([`owner_of`], over the current view):
//! the work spreads over every node that works the queue and moves when
//! the owner dies.

use serde::{Deserialize, Serialize};

mod decide;
mod dsn;

pub use decide::*;
pub use dsn::{Failed, dsn, status_of};

/// Queue mailboxes (shards): each has one owner at a time.
pub const SHARDS: u32 = 32;
/// What a queued body starts with: the envelope's version is its 7th
/// byte. Version 1's envelope is JSON, so a field added later (with a
/// default) is read by both releases; a change an older release cannot
/// read gets version 2, written only once the cluster's feature level
/// says every node reads it (membership's `formats`).
const MAGIC: &[u8; 8] = b"QUILLQ1\n";
/// What every version's magic starts with.
const MAGIC_PREFIX: &[u8; 6] = b"QUILLQ";
/// Longest envelope (it travels in front of the message).
const ENVELOPE_BYTES_MAX: usize = 256 * 1024;

/// The mailbox of shard `k`.
pub fn shard_mailbox(k: u32) -> String {
    format!("queue~{k}")
}

/// The shard a new message goes to (spread by its id).
pub fn shard_of(id: &[u8; 16]) -> u32 {
    u32::from_le_bytes(id[8..12].try_into().expect("4 bytes")) % SHARDS
}

/// The envelope of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The envelope sender; empty for the null sender `<>` (a bounce).
    pub from: String,
    /// The remote recipients, in RCPT order.
    pub rcpts: Vec<String>,
    /// When it was queued (ms since the epoch): its lifetime counts from here.
    pub queued_ms: u64,
    /// The authenticated user who submitted it, if any.
    pub submitter: Option<String>,
}

/// The queued body: envelope, then the message.
pub fn encode(env: &Envelope, message: &[u8]) -> Vec<u8> {
    let e = serde_json::to_vec(env).expect("an envelope encodes");
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + e.len() + message.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(e.len() as u32).to_le_bytes());
    out.extend_from_slice(&e);
    out.extend_from_slice(message);
    out
}

/// Why a queued body has no envelope this release reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Written by a newer release (a later envelope version): left alone
    /// for a node that reads it, never removed.
    Newer,
    /// Not an envelope at all: nothing can ever deliver it.
    Invalid,
}

/// Splits a queued body into its envelope and message.
pub fn decode(body: &[u8]) -> Result<(Envelope, &[u8]), EnvelopeError> {
    if body.starts_with(MAGIC_PREFIX) && !body.starts_with(MAGIC) {
        return match body.get(MAGIC_PREFIX.len()) {
            Some(v) if v.is_ascii_digit() && *v > b'1' => Err(EnvelopeError::Newer),
            _ => Err(EnvelopeError::Invalid),
        };
    }
    read_v1(body).ok_or(EnvelopeError::Invalid)
}

fn read_v1(body: &[u8]) -> Option<(Envelope, &[u8])> {
    let rest = body.strip_prefix(MAGIC)?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if len > ENVELOPE_BYTES_MAX {
        return None;
    }
    let env: Envelope = serde_json::from_slice(rest.get(4..4 + len)?).ok()?;
    Some((env, &rest[4 + len..]))
}

/// The flag that ends recipient `i` as delivered.
pub fn ok_flag(i: usize) -> String {
    format!("rcpt-ok:{i}")
}

/// The flag that ends recipient `i` as failed (bounced).
pub fn failed_flag(i: usize) -> String {
    format!("rcpt-failed:{i}")
}

/// How retries are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub lifetime_ms: u64,
}

impl Schedule {
    /// The wait before try `n + 1` after `n` failed tries (n ≥ 1): the
    /// initial wait, doubling, at most the maximum.
    pub fn backoff_ms(&self, n: u32) -> u64 {
        let doublings = n.saturating_sub(1).min(40);
        self.initial_ms.saturating_mul(1u64 << doublings).min(self.max_ms)
    }

    /// Whether a message queued at `queued_ms` has outlived the queue.
    pub fn expired(&self, queued_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(queued_ms) >= self.lifetime_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{delivered_to, domain_of, received_count};

    fn env() -> Envelope {
        Envelope {
            from: "alice@example.org".into(),
            rcpts: vec!["bob@remote.test".into(), "carol@other.test".into()],
            queued_ms: 1_700_000_000_000,
            submitter: Some("alice@example.org".into()),
        }
    }

    #[test]
    fn a_queued_body_carries_its_envelope() {
        let msg = b"Subject: hi\r\n\r\nbody\r\n";
        let body = encode(&env(), msg);
        let (e, m) = decode(&body).expect("decodes");
        assert_eq!(e, env());
        assert_eq!(m, msg);
        let invalid = Err(EnvelopeError::Invalid);
        assert_eq!(decode(msg), invalid, "an ordinary message is no queue entry");
        let mut bad = body.clone();
        bad[8..12].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert_eq!(decode(&bad), invalid);
        assert_eq!(decode(&body[..14]), invalid);
        // A later envelope version is a newer release's: never "invalid"
        // (which the worker removes).
        let mut v2 = body.clone();
        v2[6] = b'2';
        assert_eq!(decode(&v2), Err(EnvelopeError::Newer));
        v2[6] = b'x';
        assert_eq!(decode(&v2), invalid);
    }

    #[test]
    fn retries_double_up_to_the_maximum_and_expire() {
        let s = Schedule {
            initial_ms: 60_000,
            max_ms: 3_600_000,
            lifetime_ms: 5 * 86_400_000,
        };
        assert_eq!(s.backoff_ms(1), 60_000);
        assert_eq!(s.backoff_ms(2), 120_000);
        assert_eq!(s.backoff_ms(7), 3_600_000);
        assert_eq!(s.backoff_ms(1000), 3_600_000);
        assert!(!s.expired(0, 5 * 86_400_000 - 1));
        assert!(s.expired(0, 5 * 86_400_000));
    }

    #[test]
    fn loops_and_statuses() {
        let mut m = Vec::new();
        for _ in 0..3 {
            m.extend_from_slice(b"Received: from x by y\r\n");
        }
        m.extend_from_slice(b"Delivered-To: bob@example.org\r\n\r\nReceived: in the body\r\n");
        assert_eq!(received_count(&m), 3);
        assert!(delivered_to(&m, "BOB@example.org"));
        assert!(!delivered_to(&m, "carol@example.org"));
        assert_eq!(status_of(550, "5.1.1 no such user"), "5.1.1");
        assert_eq!(status_of(451, "try later"), "4.0.0");
        assert_eq!(status_of(554, "5.7.1. odd"), "5.0.0");
        assert_eq!(domain_of("a@B.Test."), Some("b.test".into()));
        assert_eq!(domain_of("nodomain"), None);
    }

    #[test]
    fn a_bounce_is_a_delivery_status_report() {
        let original = b"From: alice@example.org\r\nSubject: lost\r\n\r\nbody\r\n";
        let failed = vec![Failed {
            rcpt: "bob@remote.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 <bob@remote.test>: no such user\r\nx".into(),
            remote: Some("mx.remote.test".into()),
        }];
        let d = String::from_utf8(dsn(
            "quill.test",
            &env(),
            original,
            &failed,
            false,
            1_700_000_100_000,
            "abc",
        ))
        .unwrap();
        let w = String::from_utf8(dsn(
            "quill.test",
            &env(),
            original,
            &failed,
            true,
            1_700_000_100_000,
            "abc",
        ))
        .unwrap();
        assert!(w.contains("Action: delayed") && w.contains("Subject: Delayed Mail"));
        assert!(d.contains("report-type=delivery-status"));
        assert!(d.contains("Final-Recipient: rfc822; bob@remote.test\r\nAction: failed\r\nStatus: 5.1.1"));
        assert!(d.contains("Subject: lost"), "the original header is there");
        assert!(!d.contains("\r\nbody"), "the original body is not");
        assert!(d.contains("no such user  x"), "diagnostics are one line");
        assert!(d.ends_with("--=_quill_dsn_abc--\r\n"));
    }
}
