//! The binary wire format for gossip and the disk cache: one version byte, then the value in
//! bincode 2 (serde mode, `standard()` config, with a size limit).
//!
//! This module is the only code that names bincode, so the format can change in one place.
//! Decoding never panics and never allocates more than the limit: bincode checks every
//! length prefix against the configured limit before it reserves memory, and inputs longer
//! than the limit are refused before decoding starts.

use bincode::config::{self, Config};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// The current wire version. Bump it when a wire type changes shape.
pub const WIRE_VERSION: u8 = 1;

/// Limit for one gossip packet or TCP frame.
pub const PACKET_LIMIT: usize = 64 * 1024;
/// Limit for one disk-cache file or repair stream message (tens of thousands of endpoints).
pub const FILE_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("empty message")]
    Empty,
    #[error("unknown wire version {0} (this build speaks {WIRE_VERSION})")]
    UnknownVersion(u8),
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("cannot encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

fn cfg<const LIMIT: usize>() -> impl Config {
    config::standard().with_limit::<LIMIT>()
}

/// Encodes `value` behind the version byte. Fails if it would exceed `LIMIT`.
pub fn encode<T: Serialize, const LIMIT: usize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![WIRE_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, cfg::<LIMIT>())?;
    if out.len() > LIMIT {
        return Err(CodecError::TooLarge {
            len: out.len(),
            limit: LIMIT,
        });
    }
    Ok(out)
}

/// Decodes a message produced by [`encode`] with the same limit. Rejects an unknown version,
/// input over the limit, malformed data and trailing bytes.
pub fn decode<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > LIMIT {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit: LIMIT,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != WIRE_VERSION {
        return Err(CodecError::UnknownVersion(version));
    }
    let (value, used) = bincode::serde::decode_from_slice(body, cfg::<LIMIT>())?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

/// [`encode`] with the packet limit.
pub fn encode_packet<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    encode::<T, PACKET_LIMIT>(value)
}

/// [`decode`] with the packet limit.
pub fn decode_packet<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode::<T, PACKET_LIMIT>(bytes)
}

/// [`encode`] with the file limit.
pub fn encode_file<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    encode::<T, FILE_LIMIT>(value)
}

/// A writer that refuses to take more than `left` bytes: [`encode_file_to`] stops at the
/// limit instead of writing a file no reader would accept.
struct Bounded<W> {
    inner: W,
    left: usize,
    over: bool,
}

impl<W: std::io::Write> std::io::Write for Bounded<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.left {
            self.over = true;
            return Err(std::io::Error::other("over the size limit"));
        }
        let n = self.inner.write(buf)?;
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// [`encode_file`] straight into `out` (a buffered file), without the whole encoding in
/// memory: at 100 000 endpoints the disk cache is 6 MB, and a `Vec` of it (grown by
/// doubling, then copied) stayed in the writer thread's malloc arena. Returns the bytes
/// written. Past `limit` bytes (at most [`FILE_LIMIT`]) it stops with
/// [`CodecError::TooLarge`] (`len` is then a lower bound); what was written by then must be
/// discarded.
pub fn encode_file_to<T: Serialize, W: std::io::Write>(
    value: &T,
    out: W,
    limit: usize,
) -> Result<usize, CodecError> {
    let limit = limit.min(FILE_LIMIT);
    let mut w = Bounded {
        inner: out,
        left: limit,
        over: false,
    };
    let result = std::io::Write::write_all(&mut w, &[WIRE_VERSION])
        .map_err(|e| bincode::error::EncodeError::Io { inner: e, index: 0 })
        .and_then(|()| bincode::serde::encode_into_std_write(value, &mut w, cfg::<FILE_LIMIT>()));
    match result {
        Ok(n) => Ok(n + 1),
        Err(_) if w.over => Err(CodecError::TooLarge {
            len: limit + 1,
            limit,
        }),
        Err(e) => Err(e.into()),
    }
}

/// [`decode`] with the file limit.
pub fn decode_file<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode::<T, FILE_LIMIT>(bytes)
}
