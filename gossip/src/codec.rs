//! `foca::Codec` over `schema::codec`, and the plaintext envelope of our UDP packets.
//!
//! foca decodes a header then a run of members from one buffer, so each item is framed
//! with a u16 length prefix; inside it is a `schema::codec` message (version byte + bincode
//! with the packet limit). The prefix costs 2 bytes per item but keeps bincode out of this
//! crate and every item independently bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, BufMut};
use foca::{Header, Member};
use schema::codec::{self, CodecError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::NodeId;

#[derive(Debug, Error)]
pub enum FocaCodecError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("truncated item: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("item of {0} bytes does not fit a u16 length prefix")]
    TooLarge(usize),
    #[error("output buffer full")]
    BufferFull,
    #[error("identity epoch {0} is further ahead than this node accepts")]
    FutureEpoch(u64),
}

/// The codec foca uses for every SWIM message.
///
/// With signed gossip on, it refuses identities whose epoch is further ahead than
/// `max_epoch` (set by the node from its clock): an identity's epoch is the wall clock at its
/// start, and one claimed far in the future for another member's address would win every
/// address conflict in foca and hide that member until the date passed.
#[derive(Debug, Clone, Default)]
pub struct FocaCodec {
    max_epoch: Option<Arc<AtomicU64>>,
}

impl FocaCodec {
    pub(crate) fn bounded(max_epoch: Arc<AtomicU64>) -> Self {
        FocaCodec {
            max_epoch: Some(max_epoch),
        }
    }

    fn check(&self, id: &NodeId) -> Result<(), FocaCodecError> {
        match &self.max_epoch {
            Some(max) if id.epoch > max.load(Ordering::Relaxed) => {
                Err(FocaCodecError::FutureEpoch(id.epoch))
            }
            _ => Ok(()),
        }
    }
}

fn put<T: Serialize>(value: &T, mut buf: impl BufMut) -> Result<(), FocaCodecError> {
    let bytes = codec::encode_packet(value)?;
    let len = u16::try_from(bytes.len()).map_err(|_| FocaCodecError::TooLarge(bytes.len()))?;
    // foca needs the buffer left clean when an item does not fit, so check before writing.
    if buf.remaining_mut() < 2 + bytes.len() {
        return Err(FocaCodecError::BufferFull);
    }
    buf.put_u16(len);
    buf.put_slice(&bytes);
    Ok(())
}

fn take<T: DeserializeOwned>(mut buf: impl Buf) -> Result<T, FocaCodecError> {
    if buf.remaining() < 2 {
        return Err(FocaCodecError::Truncated {
            need: 2,
            have: buf.remaining(),
        });
    }
    let len = usize::from(buf.get_u16());
    if buf.remaining() < len {
        return Err(FocaCodecError::Truncated {
            need: len,
            have: buf.remaining(),
        });
    }
    let item = buf.copy_to_bytes(len);
    Ok(codec::decode_packet(&item)?)
}

impl foca::Codec<NodeId> for FocaCodec {
    type Error = FocaCodecError;

    fn encode_header(
        &mut self,
        header: &Header<NodeId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put(header, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<NodeId>, Self::Error> {
        let header: Header<NodeId> = take(buf)?;
        self.check(&header.src)?;
        Ok(header)
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put(member, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<NodeId>, Self::Error> {
        let member: Member<NodeId> = take(buf)?;
        self.check(member.id())?;
        Ok(member)
    }
}

/// What the first plaintext byte of a UDP packet says it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum PacketKind {
    /// A foca (SWIM) message, passed to `Foca::handle_data` as is.
    Swim = 0,
    /// A repair digest (`repair::Digest` in `schema::codec`).
    Digest = 1,
    /// Rows and snapshots (`crate::spread`): `[u16 length][BroadcastItem]`...
    Rows = 2,
}

impl PacketKind {
    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Swim),
            1 => Some(Self::Digest),
            2 => Some(Self::Rows),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use foca::{Codec, Message};

    use super::*;

    #[test]
    fn header_and_member_round_trip_and_truncation_fails() {
        let a = NodeId::new("127.0.0.1:1".parse().unwrap(), 5);
        let b = NodeId::new("127.0.0.1:2".parse().unwrap(), 6);
        let header = Header {
            src: a,
            src_incarnation: 3,
            dst: b,
            message: Message::Ping(7),
        };
        let mut buf = Vec::new();
        FocaCodec::default()
            .encode_header(&header, &mut buf)
            .unwrap();
        FocaCodec::default()
            .encode_member(&Member::alive(b), &mut buf)
            .unwrap();
        let mut rd = &buf[..];
        assert_eq!(FocaCodec::default().decode_header(&mut rd).unwrap(), header);
        assert_eq!(
            FocaCodec::default().decode_member(&mut rd).unwrap(),
            Member::alive(b)
        );
        assert!(rd.is_empty());
        assert!(
            FocaCodec::default()
                .decode_header(&buf[..buf.len() / 2])
                .is_err()
        );
        assert!(
            FocaCodec::default()
                .decode_header(&[0xff, 0xff, 1][..])
                .is_err()
        );
    }

    #[test]
    fn a_bounded_codec_refuses_identities_dated_past_its_bound() {
        let max = Arc::new(AtomicU64::new(1_000));
        let mut bounded = FocaCodec::bounded(max.clone());
        let (now, future) = (
            NodeId::new("127.0.0.1:1".parse().unwrap(), 1_000),
            NodeId::new("127.0.0.1:2".parse().unwrap(), 4_102_444_800_000),
        );
        for (id, ok) in [(now, true), (future, false)] {
            let header = Header {
                src: id,
                src_incarnation: 0,
                dst: now,
                message: Message::Ping(1),
            };
            let mut buf = Vec::new();
            bounded.encode_header(&header, &mut buf).unwrap();
            assert_eq!(bounded.decode_header(&buf[..]).is_ok(), ok);
            let mut buf = Vec::new();
            bounded.encode_member(&Member::alive(id), &mut buf).unwrap();
            assert_eq!(bounded.decode_member(&buf[..]).is_ok(), ok);
        }
        // The bound moves with the node's clock.
        max.store(u64::MAX, Ordering::Relaxed);
        let mut buf = Vec::new();
        bounded
            .encode_member(&Member::alive(future), &mut buf)
            .unwrap();
        assert!(bounded.decode_member(&buf[..]).is_ok());
    }
}
