//! The one place that turns values into bytes: bincode 2 (serde), with a
//! size limit on every decode.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest value decoded from one buffer read from disk: a log entry, a
/// snapshot's index, and the snapshot frame written below feature level 3
/// (about 7 million users). From level 3 a snapshot is a file decoded as
/// it is read, bounded by `store::SNAPSHOT_BYTES_MAX`.
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

/// Encodes `v` into `w` (a snapshot written to its file as it is made).
pub(crate) fn encode_into<T: Serialize, W: std::io::Write>(v: &T, w: &mut W) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(v, w, bincode::config::standard())?;
    Ok(())
}

/// Decodes one value from `r`, which holds `len` bytes (a snapshot read
/// from its file without the whole of it in memory), and checks that
/// nothing follows it. What the decoder may set aside for one value is
/// bounded by eight times `len` (no valid encoding here grows more when
/// decoded: a varint of one byte becomes a `u64`), so a hostile length
/// prefix cannot ask for more than the input could fill.
pub(crate) fn decode_from<T: DeserializeOwned, R: std::io::Read>(r: &mut R, len: u64) -> Result<T, CodecError> {
    use bincode::config::standard;
    fn with<T: DeserializeOwned, R: std::io::Read, const N: usize>(r: &mut R) -> Result<T, CodecError> {
        Ok(bincode::serde::decode_from_std_read(r, standard().with_limit::<N>())?)
    }
    let bound = len.saturating_mul(8);
    let v = match bound {
        b if b <= 1 << 30 => with::<T, R, { 1 << 30 }>(r)?,
        b if b <= 1 << 33 => with::<T, R, { 1 << 33 }>(r)?,
        b if b <= 1 << 36 => with::<T, R, { 1 << 36 }>(r)?,
        _ => {
            return Err(CodecError::TooLarge {
                bytes: len as usize,
                limit_bytes: 1 << 33,
            });
        }
    };
    let mut extra = [0u8; 1];
    match r.read(&mut extra) {
        Ok(0) => Ok(v),
        Ok(_) => Err(CodecError::Trailing { extra_bytes: 1 }),
        Err(e) => Err(CodecError::Decode(bincode::error::DecodeError::Io {
            inner: e,
            additional: 0,
        })),
    }
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
