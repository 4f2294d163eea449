//! Packet and frame sealing: XChaCha20-Poly1305 under a key ring, cluster name as
//! associated data, a random 24-byte nonce per message.
//!
//! Sealed layout: `key id (1) | nonce (24) | ciphertext + tag (16)`. The key id is the first
//! byte of SHA-256(key): it lets the receiver pick the right key at once during a rotation
//! (on a collision every key with that id is tried). In insecure mode (no key, explicit
//! operator choice) a message is `0x00 | plaintext` and sealed messages are refused.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::{Rng, RngExt};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a sealed message adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
const INSECURE_MARKER: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("gossip key is not valid base64: {0}")]
    Base64(String),
    #[error("gossip key must be {KEY_LEN} bytes (44 base64 characters), got {0} bytes")]
    Length(usize),
    #[error("a gossip key ring needs at least one key (or set insecure = true)")]
    Empty,
}

/// Why a received message was dropped. Never changes any state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OpenError {
    #[error("message too short")]
    Truncated,
    #[error("no key in the ring opens this message")]
    UnknownKey,
    #[error("plaintext message received but a key is configured")]
    Unsealed,
    #[error("sealed message received in insecure mode")]
    Sealed,
}

/// One 256-bit cluster key. Debug output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        SecretKey(bytes)
    }

    /// A fresh key from the given RNG (use an OS-seeded one).
    pub fn random(rng: &mut impl Rng) -> Self {
        let mut k = [0u8; KEY_LEN];
        rng.fill(&mut k);
        SecretKey(k)
    }

    /// The base64 text form used in config files and by `tidings gossip keygen`.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    fn id(&self) -> u8 {
        Sha256::digest(self.0)[0]
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(id={:#04x})", self.id())
    }
}

impl FromStr for SecretKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        let arr: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(SecretKey(arr))
    }
}

/// Generates a new base64 cluster key from the OS RNG (`tidings gossip keygen`).
pub fn generate_key() -> String {
    SecretKey::random(&mut rand::rng()).to_base64()
}

/// The primary key seals; every key (primary included) may open. Rotation: add the new key
/// as accepted everywhere, then make it primary everywhere, then drop the old one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRing {
    pub primary: SecretKey,
    pub accepted: Vec<SecretKey>,
}

impl KeyRing {
    pub fn new(primary: SecretKey) -> Self {
        KeyRing {
            primary,
            accepted: Vec::new(),
        }
    }

    /// Parses base64 keys: the first is primary, the rest are accepted for opening only.
    pub fn parse<S: AsRef<str>>(keys: &[S]) -> Result<Self, KeyError> {
        let mut parsed = keys.iter().map(|k| k.as_ref().parse::<SecretKey>());
        let primary = parsed.next().ok_or(KeyError::Empty)??;
        let accepted = parsed.collect::<Result<Vec<_>, _>>()?;
        Ok(KeyRing { primary, accepted })
    }
}

struct Cipher {
    id: u8,
    aead: XChaCha20Poly1305,
}

/// Seals and opens messages for one cluster. `None` key ring = insecure mode.
pub struct Sealer {
    aad: Vec<u8>,
    /// Index 0 is the primary key.
    ciphers: Vec<Cipher>,
}

impl Sealer {
    pub fn new(cluster: &str, ring: Option<&KeyRing>) -> Self {
        let ciphers = ring
            .map(|r| {
                std::iter::once(&r.primary)
                    .chain(r.accepted.iter())
                    .map(|k| Cipher {
                        id: k.id(),
                        aead: XChaCha20Poly1305::new(Key::from_slice(&k.0)),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Sealer {
            aad: cluster.as_bytes().to_vec(),
            ciphers,
        }
    }

    pub fn is_insecure(&self) -> bool {
        self.ciphers.is_empty()
    }

    /// Seals `plaintext` under the primary key with a fresh nonce from `rng`.
    pub fn seal(&self, plaintext: &[u8], rng: &mut impl Rng) -> Vec<u8> {
        let Some(primary) = self.ciphers.first() else {
            let mut out = Vec::with_capacity(1 + plaintext.len());
            out.push(INSECURE_MARKER);
            out.extend_from_slice(plaintext);
            return out;
        };
        let nonce: [u8; NONCE_LEN] = rng.random();
        let payload = Payload {
            msg: plaintext,
            aad: &self.aad,
        };
        // Encryption only fails for plaintexts beyond the cipher's 256 GiB limit, far above
        // any bound in this crate; an empty body is then refused by the receiver.
        let ct = primary
            .aead
            .encrypt(XNonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(primary.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a message sealed by any key of the ring under this cluster's name.
    pub fn open(&self, data: &[u8]) -> Result<Vec<u8>, OpenError> {
        let (&first, rest) = data.split_first().ok_or(OpenError::Truncated)?;
        if self.is_insecure() {
            return if first == INSECURE_MARKER {
                Ok(rest.to_vec())
            } else {
                Err(OpenError::Sealed)
            };
        }
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError::Truncated);
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce = XNonce::from_slice(nonce);
        let try_open = |c: &Cipher| {
            c.aead
                .decrypt(
                    nonce,
                    Payload {
                        msg: ct,
                        aad: &self.aad,
                    },
                )
                .ok()
        };
        // The id is a hint: try matching keys first, then the rest (an id collision or a
        // sender that computed ids differently must not lose packets).
        self.ciphers
            .iter()
            .filter(|c| c.id == first)
            .chain(self.ciphers.iter().filter(|c| c.id != first))
            .find_map(try_open)
            .ok_or(OpenError::UnknownKey)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn ring(seed: u64) -> KeyRing {
        KeyRing::new(SecretKey::random(&mut StdRng::seed_from_u64(seed)))
    }

    #[test]
    fn seal_open_round_trip_and_rejections() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = Sealer::new("prod", Some(&ring(1)));
        let sealed = a.seal(b"hello", &mut rng);
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(a.open(&sealed).unwrap(), b"hello");
        // Unknown key, other cluster, truncation, random bytes, plaintext.
        assert_eq!(
            Sealer::new("prod", Some(&ring(2))).open(&sealed),
            Err(OpenError::UnknownKey)
        );
        assert_eq!(
            Sealer::new("test", Some(&ring(1))).open(&sealed),
            Err(OpenError::UnknownKey)
        );
        for n in 0..sealed.len() {
            assert!(a.open(&sealed[..n]).is_err());
        }
        let noise: Vec<u8> = (0..200).map(|_| rng.random()).collect();
        assert!(a.open(&noise).is_err());
        let insecure = Sealer::new("prod", None);
        assert_eq!(insecure.open(&sealed), Err(OpenError::Sealed));
        assert!(a.open(&insecure.seal(b"x", &mut rng)).is_err());
    }

    #[test]
    fn accepted_keys_open_and_primary_seals() {
        let mut rng = StdRng::seed_from_u64(3);
        let (old, new) = (ring(10).primary, ring(11).primary);
        let old_only = Sealer::new("c", Some(&KeyRing::new(old.clone())));
        let both = Sealer::new(
            "c",
            Some(&KeyRing {
                primary: new.clone(),
                accepted: vec![old.clone()],
            }),
        );
        assert!(both.open(&old_only.seal(b"a", &mut rng)).is_ok());
        assert!(old_only.open(&both.seal(b"a", &mut rng)).is_err());
    }

    #[test]
    fn key_parsing_and_generation() {
        let k = generate_key();
        assert_eq!(k.len(), 44);
        let ring = KeyRing::parse(&[k.as_str()]).unwrap();
        assert_eq!(ring.primary.to_base64(), k);
        assert!(matches!(
            "!!".parse::<SecretKey>(),
            Err(KeyError::Base64(_))
        ));
        assert_eq!("AAAA".parse::<SecretKey>(), Err(KeyError::Length(3)));
        assert_eq!(KeyRing::parse::<&str>(&[]), Err(KeyError::Empty));
        assert!(!format!("{:?}", ring.primary).contains(&k));
    }
}
