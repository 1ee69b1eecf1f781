//! The binary codec for everything Resolute persists or sends.
//!
//! All encoding goes through these two functions so that the format (bincode 2 with
//! its standard configuration today) can be swapped in one place.

use serde::{de::DeserializeOwned, Serialize};

/// Why bytes could not be turned into a value (or the reverse).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded (a serializer refused it).
    #[error("codec: encode failed: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The bytes are not a valid encoding of the expected type.
    #[error("codec: decode failed: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The value encodes to more bytes than the decoder would take back
    /// (`DECODE_LIMIT_BYTES`): refused, so nothing is written that cannot be read.
    #[error("codec: {bytes} bytes encoded, more than the {DECODE_LIMIT_BYTES} a decoder accepts")]
    TooLarge {
        /// The encoded size.
        bytes: usize,
    },
    /// The bytes decoded, but not all of them were used: the input is not one value.
    #[error("codec: {trailing} trailing bytes after the value")]
    Trailing {
        /// How many bytes were left over.
        trailing: usize,
    },
}

/// Largest single value the decoder accepts, in bytes; protects against a corrupt
/// length prefix that would make the decoder allocate without bound.
pub const DECODE_LIMIT_BYTES: usize = 256 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>()
}

/// Encodes `value` to bytes; refuses what [`decode`] would refuse for its size.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, config())?;
    if bytes.len() > DECODE_LIMIT_BYTES {
        return Err(CodecError::TooLarge { bytes: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes exactly one `T` from `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(CodecError::Trailing {
            trailing: bytes.len() - used,
        });
    }
    Ok(value)
}
