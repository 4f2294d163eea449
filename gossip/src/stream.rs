//! Repair streams over TCP, sans-IO: each repair frame is cut into sealed chunks of at most
//! [`CHUNK_DATA`] bytes, and each chunk is authenticated before the next one is read. A host
//! without the cluster key therefore never makes a node buffer more than one chunk
//! ([`MAX_SEALED_CHUNK`] bytes), whatever lengths it claims; only authenticated plaintext
//! accumulates, up to [`MAX_FRAME`].
//!
//! Wire: on connecting, each side sends a hello, `MAGIC (4) | challenge (8 random bytes)`.
//! Then each direction carries chunks,
//! `length (u16 BE) | sealed(challenge of the receiver (8) | chunk number (u32 BE) | last (u8) | data)`.
//! The chunk number counts from 0 across the frames of that direction, so chunks cannot be
//! reordered, dropped or spliced in from another stream without the receiver noticing; and
//! since every chunk names the challenge its receiver picked for this connection, chunks
//! recorded from another connection are refused too: only a live key holder gets past the
//! first chunk. `last` ends a frame.
//!
//! Version 1 (a u32 length prefix and the whole frame sealed as one message) is not
//! accepted: its first four bytes never equal [`MAGIC`]. A version-1 node reading
//! [`MAGIC`] sees a length beyond its limit and closes at once; repair between the two
//! versions fails cleanly (UDP gossip is unchanged and keeps working).

use rand::{Rng, RngExt};
use thiserror::Error;

use crate::crypto::{OpenError, SEAL_OVERHEAD, Sealer};
use crate::node::MAX_FRAME;

/// First bytes of each direction of a repair connection: "TDR" and the stream version 2.
/// Read as a version-1 u32 length it is about 1.4 GB, far above that version's limit.
pub const MAGIC: [u8; 4] = *b"TDR\x02";
/// Bytes of a hello: [`MAGIC`] and the sender's challenge.
pub const HELLO_LEN: usize = 12;
/// Most frame bytes per chunk.
pub const CHUNK_DATA: usize = 32 * 1024;
const CHUNK_HEADER: usize = 8 + 4 + 1;
/// Largest sealed chunk, the one buffer a connection holds before authentication.
pub const MAX_SEALED_CHUNK: usize = SEAL_OVERHEAD + CHUNK_HEADER + CHUNK_DATA;
const LAST: u8 = 1;

/// Why a repair stream was closed. Never changes node state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum StreamError {
    #[error("stream does not start with the repair stream preamble (an older or foreign peer)")]
    Preamble,
    #[error("chunk of {0} bytes exceeds the limit")]
    OversizeChunk(usize),
    #[error("frame exceeds {MAX_FRAME} bytes")]
    OversizeFrame,
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("chunk header malformed")]
    Malformed,
    #[error("chunk out of order or from another stream")]
    OutOfOrder,
}

/// A fresh challenge and the hello that carries it.
pub fn hello(rng: &mut impl Rng) -> ([u8; 8], [u8; HELLO_LEN]) {
    let challenge: [u8; 8] = rng.random();
    let mut hello = [0u8; HELLO_LEN];
    let (magic, rest) = hello.split_at_mut(4);
    magic.copy_from_slice(&MAGIC);
    rest.copy_from_slice(&challenge);
    (challenge, hello)
}

/// The peer's challenge from its hello.
pub fn parse_hello(hello: [u8; HELLO_LEN]) -> Result<[u8; 8], StreamError> {
    let (magic, challenge) = hello.split_at(4);
    if magic != MAGIC {
        return Err(StreamError::Preamble);
    }
    challenge.try_into().map_err(|_| StreamError::Preamble)
}

/// The sending half of one direction of a repair connection.
pub struct StreamWriter {
    id: [u8; 8],
    next: u32,
}

impl StreamWriter {
    /// `peer_challenge`: from the peer's hello.
    pub fn new(peer_challenge: [u8; 8]) -> Self {
        StreamWriter {
            id: peer_challenge,
            next: 0,
        }
    }

    /// The wire bytes of one frame.
    pub fn frame(&mut self, sealer: &Sealer, frame: &[u8], rng: &mut impl Rng) -> Vec<u8> {
        let chunks = frame.len().div_ceil(CHUNK_DATA).max(1);
        let mut out =
            Vec::with_capacity(frame.len() + chunks * (2 + MAX_SEALED_CHUNK - CHUNK_DATA));
        let mut plain = Vec::with_capacity(CHUNK_HEADER + CHUNK_DATA);
        for i in 0..chunks {
            let data = frame
                .get(i * CHUNK_DATA..frame.len().min((i + 1) * CHUNK_DATA))
                .unwrap_or_default();
            plain.clear();
            plain.extend_from_slice(&self.id);
            plain.extend_from_slice(&self.next.to_be_bytes());
            plain.push(if i + 1 == chunks { LAST } else { 0 });
            plain.extend_from_slice(data);
            // Wraps only after 2^32 chunks (128 TiB): the receiver then sees a chunk out of
            // order and closes, which is the right outcome for such a stream.
            self.next = self.next.wrapping_add(1);
            let sealed = sealer.seal(&plain, rng);
            // At most MAX_SEALED_CHUNK < 65536 bytes.
            out.extend_from_slice(&(sealed.len() as u16).to_be_bytes());
            out.extend_from_slice(&sealed);
        }
        out
    }
}

/// The receiving half of one direction of a repair connection.
pub struct StreamReader {
    id: [u8; 8],
    next: u32,
    frame: Vec<u8>,
}

impl StreamReader {
    /// `challenge`: the one this side sent in its hello.
    pub fn new(challenge: [u8; 8]) -> Self {
        StreamReader {
            id: challenge,
            next: 0,
            frame: Vec::new(),
        }
    }

    /// Whether at least one chunk was authenticated: the peer holds a cluster key and
    /// answered this connection's challenge.
    pub fn authenticated(&self) -> bool {
        self.next > 0
    }

    /// Bytes held for the frame in progress (all authenticated).
    pub fn buffered(&self) -> usize {
        self.frame.capacity()
    }

    /// Checks a chunk's length prefix before its bytes are read.
    pub fn chunk_len(&self, prefix: [u8; 2]) -> Result<usize, StreamError> {
        let len = usize::from(u16::from_be_bytes(prefix));
        if len > MAX_SEALED_CHUNK {
            return Err(StreamError::OversizeChunk(len));
        }
        Ok(len)
    }

    /// Opens one sealed chunk; returns the frame it completes, if any.
    pub fn chunk(
        &mut self,
        sealer: &Sealer,
        sealed: &[u8],
    ) -> Result<Option<Vec<u8>>, StreamError> {
        if sealed.len() > MAX_SEALED_CHUNK {
            return Err(StreamError::OversizeChunk(sealed.len()));
        }
        let plain = sealer.open(sealed)?;
        if plain.len() < CHUNK_HEADER || plain.len() > CHUNK_HEADER + CHUNK_DATA {
            return Err(StreamError::Malformed);
        }
        let (header, data) = plain.split_at(CHUNK_HEADER);
        let (id, rest) = header.split_at(8);
        let (num, flags) = rest.split_at(4);
        let id: [u8; 8] = id.try_into().map_err(|_| StreamError::Malformed)?;
        let num = u32::from_be_bytes(num.try_into().map_err(|_| StreamError::Malformed)?);
        if id != self.id || num != self.next {
            return Err(StreamError::OutOfOrder);
        }
        self.next = self.next.wrapping_add(1);
        if self.frame.len() + data.len() > MAX_FRAME {
            return Err(StreamError::OversizeFrame);
        }
        self.frame.extend_from_slice(data);
        match flags {
            [LAST] => Ok(Some(std::mem::take(&mut self.frame))),
            [0] => Ok(None),
            _ => Err(StreamError::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::crypto::{KeyRing, SecretKey};

    fn sealer(seed: u64) -> Sealer {
        let key = SecretKey::random(&mut StdRng::seed_from_u64(seed));
        Sealer::new("c", Some(&KeyRing::new(key)))
    }

    /// A connected pair of halves: the reader's hello answered by the writer.
    fn pair(rng: &mut StdRng) -> (StreamWriter, StreamReader) {
        let (challenge, hello) = hello(rng);
        let peer = parse_hello(hello).unwrap();
        (StreamWriter::new(peer), StreamReader::new(challenge))
    }

    /// Feeds wire bytes to a reader the way the runtime does; returns the frames.
    fn read_all(
        s: &Sealer,
        rd: &mut StreamReader,
        mut wire: &[u8],
    ) -> Result<Vec<Vec<u8>>, StreamError> {
        let mut frames = Vec::new();
        while !wire.is_empty() {
            let n = rd.chunk_len([wire[0], wire[1]])?;
            let (chunk, rest) = wire[2..].split_at(n);
            frames.extend(rd.chunk(s, chunk)?);
            wire = rest;
        }
        Ok(frames)
    }

    #[test]
    fn frames_round_trip_in_chunks() {
        let mut rng = StdRng::seed_from_u64(1);
        let s = sealer(1);
        let (mut w, mut rd) = pair(&mut rng);
        let big: Vec<u8> = (0..3 * CHUNK_DATA + 5).map(|i| i as u8).collect();
        for f in [vec![], b"small".to_vec(), big.clone(), vec![7; CHUNK_DATA]] {
            let wire = w.frame(&s, &f, &mut rng);
            assert_eq!(read_all(&s, &mut rd, &wire).unwrap(), vec![f]);
        }
        assert!(rd.authenticated());
    }

    #[test]
    fn forged_replayed_reordered_and_oversized_chunks_are_refused() {
        let mut rng = StdRng::seed_from_u64(2);
        let s = sealer(2);
        let data = vec![1u8; 2 * CHUNK_DATA + 1];
        let (mut w, _) = pair(&mut rng);
        let wire = w.frame(&s, &data, &mut rng);
        let first_len = 2 + usize::from(u16::from_be_bytes([wire[0], wire[1]]));
        // Wrong key: refused at the first chunk, nothing buffered.
        let (mut w2, mut rd) = pair(&mut rng);
        let wire2 = w2.frame(&s, &data, &mut rng);
        assert_eq!(
            read_all(&sealer(3), &mut rd, &wire2),
            Err(StreamError::Open(OpenError::UnknownKey))
        );
        assert_eq!(rd.buffered(), 0);
        assert!(!rd.authenticated());
        // Not a hello (a version-1 length prefix).
        assert_eq!(
            parse_hello([0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(StreamError::Preamble)
        );
        // A length claim beyond one sealed chunk, e.g. the first bytes of a 4 GiB prefix.
        assert_eq!(
            rd.chunk_len([0xff, 0xff]),
            Err(StreamError::OversizeChunk(0xffff))
        );
        // A whole stream recorded from another connection (replay): other challenge.
        let (_, mut rd) = pair(&mut rng);
        assert_eq!(read_all(&s, &mut rd, &wire), Err(StreamError::OutOfOrder));
        assert_eq!(rd.buffered(), 0);
        // Within a connection: a chunk repeated, or chunks skipped.
        let (mut w, mut rd) = pair(&mut rng);
        let wire = w.frame(&s, &data, &mut rng);
        let mut repeated = wire[..first_len].to_vec();
        repeated.extend_from_slice(&wire[..first_len]);
        assert_eq!(
            read_all(&s, &mut rd, &repeated),
            Err(StreamError::OutOfOrder)
        );
        let (mut w, mut rd) = pair(&mut rng);
        let wire = w.frame(&s, &data, &mut rng);
        assert_eq!(
            read_all(&s, &mut rd, &wire[first_len..]),
            Err(StreamError::OutOfOrder)
        );
    }
}
