//! The cluster wire's messages and frames. One bidirectional stream per
//! request: `version:u16le deadline:u32le len:u32le bincode(body)`,
//! answered the same way (deadline 0). The length is checked from the
//! header, before the body is read. The messages are generic over the Raft
//! and replica payloads, which membership and replication own; the node
//! names the concrete types and carries the frames over QUIC.
//!
//! # Versions
//! A connection speaks one [`Protocol`], chosen when it opens: each side
//! offers (TLS ALPN) every protocol it speaks, and the newest both know is
//! taken, so a node of the new release talks to one of the previous
//! release in that release's protocol while a cluster is upgraded node by
//! node. A protocol fixes the frame version in every header and the
//! messages the connection may carry: the messages are positional
//! (bincode writes a variant's index), so a new message is a new variant
//! at the end of [`ClusterRequest`] or [`ClusterReply`], sent only on a
//! connection whose protocol has it ([`ClusterRequest::protocol`]); an
//! existing variant never changes.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A cluster protocol: what a connection may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// Release 0.1.0's: frame version 2 (the caller's deadline in the
    /// header); the messages up to `TakeLeadership` / `CaKey`.
    V1,
    /// Release 0.2.0's: frame version 3; adds `Describe` (a node's release
    /// and the feature levels it supports).
    V2,
}

impl Protocol {
    /// Every protocol this build speaks, newest first: the order offered
    /// in ALPN (the server takes the first of its list the client offers).
    pub const ALL: [Protocol; 2] = [Protocol::V2, Protocol::V1];
    pub const NEWEST: Protocol = Protocol::V2;

    /// Its ALPN name.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Protocol::V1 => b"quill-cluster/1",
            Protocol::V2 => b"quill-cluster/2",
        }
    }

    /// The protocol an ALPN name stands for, if this build speaks it.
    pub fn from_alpn(name: &[u8]) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.alpn() == name)
    }

    /// The version in the header of every frame of a connection of this
    /// protocol.
    pub fn frame_version(self) -> u16 {
        match self {
            Protocol::V1 => 2,
            Protocol::V2 => 3,
        }
    }

    /// The release a peer is known to run when this is the newest
    /// protocol it offers: only release 0.1.0 stops at V1; from V2 on a
    /// peer says its release itself (`Describe`).
    pub fn oldest_release(self) -> &'static str {
        match self {
            Protocol::V1 => "0.1.0",
            Protocol::V2 => "0.2.0",
        }
    }
}

/// Bytes before the body: version, deadline, length.
pub const HEADER_BYTES: usize = 10;
/// A frame larger than this is refused (a Raft snapshot of a large
/// directory is the biggest thing that travels).
pub const FRAME_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of wire version {got} on a connection of version {want}")]
    Version { got: u16, want: u16 },
    #[error("frame of {0} bytes exceeds the {FRAME_BYTES_MAX} limit")]
    TooLarge(usize),
    #[error("short frame")]
    Short,
    #[error("frame length {0} does not match its {1} bytes")]
    Length(usize, usize),
    #[error("trailing bytes in frame")]
    Trailing,
    #[error("frame does not decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("frame does not encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

/// Counts what is written to it (a frame's size before it is built).
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A frame of a connection of protocol `p`: `deadline` is the caller's
/// budget (0 in replies). Its size is counted first, then the body is
/// encoded in place after the header: a message body is copied once.
pub fn encode<T: Serialize>(v: &T, deadline: Duration, p: Protocol) -> Result<Vec<u8>, FrameError> {
    let deadline_ms = u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX);
    let size = bincode::serde::encode_into_std_write(v, &mut Counter(0), bincode::config::standard())?;
    if size > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(size));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + size);
    out.extend_from_slice(&p.frame_version().to_le_bytes());
    out.extend_from_slice(&deadline_ms.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let n = bincode::serde::encode_into_std_write(v, &mut out, bincode::config::standard())?;
    debug_assert_eq!(n, size);
    out[HEADER_BYTES - 4..HEADER_BYTES].copy_from_slice(&(n as u32).to_le_bytes());
    Ok(out)
}

/// The header of a frame on a connection of protocol `p`: the deadline it
/// carries and its body's length (checked against the limit before
/// anything more is read). A frame of another version is refused.
pub fn header(h: &[u8; HEADER_BYTES], p: Protocol) -> Result<(Duration, usize), FrameError> {
    let version = u16::from_le_bytes([h[0], h[1]]);
    if version != p.frame_version() {
        return Err(FrameError::Version {
            got: version,
            want: p.frame_version(),
        });
    }
    let deadline = Duration::from_millis(u32::from_le_bytes(h[2..6].try_into().expect("4 bytes")).into());
    let len = u32::from_le_bytes(h[6..10].try_into().expect("4 bytes")) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    Ok((deadline, len))
}

/// A body of `len` bytes, as the header announced it.
pub fn decode_body<T: DeserializeOwned>(body: &[u8], len: usize) -> Result<T, FrameError> {
    if len != body.len() {
        return Err(FrameError::Length(len, body.len()));
    }
    let config = bincode::config::standard().with_limit::<FRAME_BYTES_MAX>();
    let (v, used) = bincode::serde::decode_from_slice(body, config)?;
    if used != len {
        return Err(FrameError::Trailing);
    }
    Ok(v)
}

/// A whole frame (header and body) as it comes off a stream of a
/// connection of protocol `p`.
pub fn decode<T: DeserializeOwned>(frame: &[u8], p: Protocol) -> Result<T, FrameError> {
    let Some(h) = frame.first_chunk::<HEADER_BYTES>() else {
        return Err(FrameError::Short);
    };
    let (_, len) = header(h, p)?;
    decode_body(&frame[HEADER_BYTES..], len)
}

/// What nodes say to each other. `R` is a Raft message, `C` a replica
/// protocol call.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClusterRequest<R, C> {
    /// A new node proves the join secret and asks for a certificate. The
    /// only request a peer without a cluster certificate may send.
    Enroll {
        secret: String,
        name: String,
    },
    /// Raft traffic for node `to` (0: whichever node answers, for a leader
    /// request sent to a seed): refused by any other identity, e.g. the
    /// new one of a machine that came back at the same address with an
    /// empty disk (its empty log would otherwise look like the old
    /// follower's log going backwards).
    Raft {
        to: u64,
        msg: Box<R>,
    },
    Ping,
    Stats,
    /// The replica protocol.
    Replica(Box<C>),
    /// `quill admin log-level --all`: set this node's log filter.
    SetLogLevel {
        filter: String,
    },
    /// A seed without the CA key asks a member that holds it to issue a
    /// certificate for an enrollment the seed has already checked.
    IssueCert {
        name: String,
    },
    /// A Raft voter without the CA key asks another for it (answered only
    /// to a voter of the answering node's view).
    CaKey,
    /// A draining leader hands leadership over: the receiving voter calls
    /// an election (answered only to the leader of the receiver's view).
    TakeLeadership,
    /// [`Protocol::V2`]: the node's release, the feature levels it can run
    /// at, and its figures ([`ClusterReply::Described`]).
    Describe,
    /// An operator's question to every node (live sessions, top senders,
    /// a log watch), as JSON ([`crate::admin::NodeQuery`]); answered with
    /// [`ClusterReply::Json`]. Added in 0.3.0: an older node cannot read
    /// it and the asking node reports that node as not answering.
    Query {
        json: String,
    },
    /// The failure detector's report to the leader (added in 0.3.0, sent
    /// only at feature level 3, when every node reads it): of the nodes
    /// `from` pings on the ring, those `silent` for the failure timeout
    /// and the down ones that `answered`. The leader pings each itself
    /// before it decides; answered with [`ClusterReply::Done`].
    Suspects {
        from: u64,
        silent: Vec<u64>,
        answered: Vec<u64>,
    },
}

impl<R, C> ClusterRequest<R, C> {
    /// The oldest protocol that carries this request: it is sent only on a
    /// connection of that protocol or a newer one.
    pub fn protocol(&self) -> Protocol {
        match self {
            ClusterRequest::Describe | ClusterRequest::Query { .. } | ClusterRequest::Suspects { .. } => Protocol::V2,
            _ => Protocol::V1,
        }
    }
}

/// The answers. `R` is a Raft reply, `A` a replica protocol answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClusterReply<R, A> {
    /// `ca_key_pem` is empty: joiners no longer get the CA key (voters
    /// fetch it with `CaKey`). Kept for the wire layout.
    Enrolled {
        cert: Vec<u8>,
        key: Vec<u8>,
        ca_cert: Vec<u8>,
        ca_key_pem: String,
    },
    Refused(String),
    Raft(R),
    /// With the epoch of the view the answering node has applied, and its
    /// id: a ping answered at a node's address by another identity (the
    /// machine came back with an empty disk) is not that node alive.
    Pong {
        epoch: u64,
        id: u64,
    },
    Stats(NodeStats),
    Replica(Box<A>),
    /// A request that needs no more than "done".
    Done,
    /// The CA key, PEM.
    CaKey(String),
    /// [`Protocol::V2`]: the answer to `Describe`.
    Described(NodeDescription),
    /// The answer to `Query`, JSON.
    Json(String),
}

/// What a node says of itself (`Describe`): what `cluster status` shows
/// and what the leader checks before it raises the cluster's feature level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDescription {
    /// Its release, e.g. `0.2.0`.
    pub version: String,
    /// The newest feature level it can run at (membership's
    /// `FEATURE_LEVEL_MAX` of its build).
    pub feature_level_max: u32,
    pub stats: NodeStats,
}

/// One node's figures for `cluster status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Entries (message copies) and body bytes in its store.
    pub messages: u64,
    pub bytes: u64,
    /// Messages it counts as having fewer than R live copies.
    pub under_replicated: u64,
    /// Repairs and hand-offs it coordinates that its running round has not
    /// done yet, and the copies it has made since it started.
    pub repair_pending: u64,
    pub repairs_copied: u64,
    /// Outbound queue entries stored here (copies: each entry is on R
    /// nodes).
    pub queued: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any serde value frames; a pair will do.
    type Req = (u32, String);

    #[test]
    fn frames_are_versioned_and_bounded() {
        let p = Protocol::NEWEST;
        let f = encode(&(5u32, "echo".to_owned()), Duration::from_secs(7), p).unwrap();
        assert_eq!(decode::<Req>(&f, p).unwrap(), (5, "echo".to_owned()));
        let h = f.first_chunk::<HEADER_BYTES>().unwrap();
        assert_eq!(header(h, p).unwrap().0, Duration::from_secs(7), "the deadline travels");
        let mut other = f.clone();
        other[0] = 1;
        assert!(decode::<Req>(&other, p).unwrap_err().to_string().contains("version"));
        // A frame of one protocol is refused on a connection of another.
        assert!(
            decode::<Req>(&f, Protocol::V1)
                .unwrap_err()
                .to_string()
                .contains("version")
        );
        assert!(decode::<Req>(&f[..f.len() - 1], p).is_err());
        assert!(decode::<Req>(&[2, 0], p).is_err());
        // A length over the limit is refused from the header alone.
        let mut huge = f.clone();
        huge[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            header(huge.first_chunk().unwrap(), p)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        let join = (0u32, "x".to_owned());
        assert_eq!(
            decode::<Req>(&encode(&join, Duration::ZERO, p).unwrap(), p).unwrap(),
            join
        );
    }

    #[test]
    fn the_layout_of_the_messages_is_positional() {
        // The variant index is the first byte of a body: a new variant goes
        // last, or peers of another build misread every later one.
        let v1 = Protocol::V1;
        let ping = encode(&ClusterRequest::<(), ()>::Ping, Duration::ZERO, v1).unwrap();
        assert_eq!(ping[HEADER_BYTES], 2);
        let pong = encode(&ClusterReply::<(), ()>::Pong { epoch: 1, id: 2 }, Duration::ZERO, v1).unwrap();
        assert_eq!(pong[HEADER_BYTES], 3);
        // Release 0.1.0 spoke frame version 2: a V1 connection still does.
        assert_eq!(&ping[..2], &2u16.to_le_bytes());
        // The messages V2 added come after every V1 one.
        let describe = encode(&ClusterRequest::<(), ()>::Describe, Duration::ZERO, Protocol::V2).unwrap();
        assert_eq!(describe[HEADER_BYTES], 9);
        assert_eq!(ClusterRequest::<(), ()>::Describe.protocol(), Protocol::V2);
        assert_eq!(ClusterRequest::<(), ()>::Ping.protocol(), Protocol::V1);
    }

    #[test]
    fn alpn_names_round_trip_newest_first() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_alpn(p.alpn()), Some(p));
        }
        assert_eq!(Protocol::ALL[0], Protocol::NEWEST);
        assert!(Protocol::ALL.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(Protocol::from_alpn(b"quill-cluster/9"), None);
    }
}
