//! The one place that turns values into bytes: bincode 2 (serde), with a
//! size limit on every decode.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest value decoded from disk (a snapshot of the whole directory):
/// 1 GiB holds some millions of users.
pub const DISK_BYTES_MAX: usize = 1 << 30;

/// Largest Raft message the node's wire must carry: an AppendEntries of
/// `MAX_PAYLOAD_ENTRIES` entries of at most `ENTRY_BYTES_MAX`, or one
/// snapshot chunk of `SNAPSHOT_CHUNK_BYTES`, plus headers.
pub const MESSAGE_BYTES_MAX: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("decode: {extra_bytes} bytes left over")]
    Trailing { extra_bytes: usize },
    #[error("{bytes} bytes is over the limit of {limit_bytes}")]
    TooLarge { bytes: usize, limit_bytes: usize },
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(v, bincode::config::standard())?)
}

/// Decodes exactly `bytes` (no trailing garbage), refusing inputs over
/// `limit_bytes`.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], limit_bytes: usize) -> Result<T, CodecError> {
    if bytes.len() > limit_bytes {
        return Err(CodecError::TooLarge {
            bytes: bytes.len(),
            limit_bytes,
        });
    }
    // The input length bounds every allocation the decoder makes.
    let config = bincode::config::standard().with_limit::<DISK_BYTES_MAX>();
    let (v, used) = bincode::serde::decode_from_slice(bytes, config)?;
    if used != bytes.len() {
        return Err(CodecError::Trailing {
            extra_bytes: bytes.len() - used,
        });
    }
    Ok(v)
}

/// Encodes a Raft message or reply for the wire.
pub fn encode_message<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = encode(v)?;
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(CodecError::TooLarge {
            bytes: bytes.len(),
            limit_bytes: MESSAGE_BYTES_MAX,
        });
    }
    Ok(bytes)
}

/// Decodes a Raft message or reply from the wire (at most
/// [`MESSAGE_BYTES_MAX`]).
pub fn decode_message<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode(bytes, MESSAGE_BYTES_MAX)
}
