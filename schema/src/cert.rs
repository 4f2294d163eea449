//! Registry certificates and the Ed25519 keys behind them (docs/ARCHITECTURE.md#signed-gossip),
//! sans IO. The registry issues a [`Certificate`] on check-in binding an agent's owner key
//! to its IP (and, for a service-scoped token, to those services); gossip checks rows and
//! snapshots against them (`gossip::sign`). Here because both the registry and gossip need
//! them, and neither may depend on the other.
//!
//! Every signed message is prefixed by a domain tag ([`tagged`]), so a signature over one
//! kind of message can never be replayed as another.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec;
use crate::{Endpoint, ServiceName};

pub const PUBLIC_KEY_LEN: usize = 32;
pub const SEED_LEN: usize = 32;
pub const SIGNATURE_LEN: usize = 64;

const CERT_TAG: &[u8] = b"tidings-cert-v1\0";
const LISTING_TAG: &[u8] = b"tidings-listing-v1\0";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignKeyError {
    #[error("key is not valid base64: {0}")]
    Base64(String),
    #[error("key must be {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error("not an Ed25519 key")]
    Rejected,
}

fn decode_fixed<const N: usize>(s: &str) -> Result<[u8; N], SignKeyError> {
    let bytes = B64
        .decode(s.trim())
        .map_err(|e| SignKeyError::Base64(e.to_string()))?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| SignKeyError::Length {
            expected: N,
            got: bytes.len(),
        })
}

/// An Ed25519 public key (registry or owner).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Whether `sig` is this key's signature of `msg`.
    pub fn verifies(&self, msg: &[u8], sig: &Signature) -> bool {
        // Strict: refuses small-order keys and non-canonical signatures, so no signature
        // verifies under two keys and none can be malleated into another that verifies.
        ed25519_dalek::VerifyingKey::from_bytes(&self.0).is_ok_and(|key| {
            key.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig.to_bytes()))
                .is_ok()
        })
    }
}

/// Whether every `(key, message, signature)` verifies, checked as one batch (ed25519-dalek's
/// `verify_batch`: one multiscalar multiplication for all, several times cheaper per
/// signature than one by one). For a repair frame's rows and certificates: `false` says
/// only that one of them failed, so the caller checks them one by one to learn which.
///
/// The batch equation is not the strict one ([`PublicKey::verifies`]): weak (small-order)
/// keys are refused here first, as strict verification refuses them; what it still takes
/// that strict would not is a signature with a small-order component of `R`, which only its
/// own signer can make (no forgery) and which strict receivers downstream refuse.
pub fn verify_all(items: &[(&PublicKey, &[u8], &Signature)]) -> bool {
    use std::collections::HashMap;
    let mut keys: HashMap<[u8; PUBLIC_KEY_LEN], ed25519_dalek::VerifyingKey> = HashMap::new();
    let mut verifying = Vec::with_capacity(items.len());
    for (key, _, _) in items {
        // Decompressing a key costs a tenth of a verification: once per owner, not per row.
        let k = match keys.get(&key.0) {
            Some(k) => *k,
            None => match ed25519_dalek::VerifyingKey::from_bytes(&key.0) {
                Ok(k) if !k.is_weak() => *keys.entry(key.0).or_insert(k),
                _ => return false,
            },
        };
        verifying.push(k);
    }
    let messages: Vec<&[u8]> = items.iter().map(|(_, m, _)| *m).collect();
    let sigs: Vec<ed25519_dalek::Signature> = items
        .iter()
        .map(|(_, _, s)| ed25519_dalek::Signature::from_bytes(&s.to_bytes()))
        .collect();
    ed25519_dalek::verify_batch(&messages, &sigs, &verifying).is_ok()
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl FromStr for PublicKey {
    type Err = SignKeyError;
    fn from_str(s: &str) -> Result<Self, SignKeyError> {
        decode_fixed::<PUBLIC_KEY_LEN>(s).map(PublicKey)
    }
}

/// An Ed25519 signature. Two halves because serde derives arrays only up to 32 bytes;
/// bincode writes it as 64 bytes with no length prefix either way.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Signature(pub [u8; 32], pub [u8; 32]);

impl Signature {
    pub fn to_bytes(&self) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out[..32].copy_from_slice(&self.0);
        out[32..].copy_from_slice(&self.1);
        out
    }

    /// The text form in a catalog answer's `signatures`.
    pub fn to_base64(&self) -> String {
        B64.encode(self.to_bytes())
    }

    /// Parses [`to_base64`](Self::to_base64)'s form; `None` if it is not 64 bytes of base64.
    pub fn from_base64(s: &str) -> Option<Self> {
        Self::from_slice(&B64.decode(s.trim()).ok()?)
    }

    /// A signature from its 64 wire bytes; `None` when the length is wrong.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let (lo, hi) = b.split_at_checked(32)?;
        Some(Signature(lo.try_into().ok()?, hi.try_into().ok()?))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

/// A private Ed25519 key, kept as its 32-byte seed. Debug output never shows it.
pub struct SigningKey {
    seed: [u8; SEED_LEN],
    pair: ed25519_dalek::SigningKey,
}

impl SigningKey {
    pub fn from_seed(seed: [u8; SEED_LEN]) -> Result<Self, SignKeyError> {
        let pair = ed25519_dalek::SigningKey::from_bytes(&seed);
        Ok(SigningKey { seed, pair })
    }

    /// A fresh key from the OS RNG.
    pub fn generate() -> Self {
        let mut seed = [0u8; SEED_LEN];
        rand::RngExt::fill(&mut rand::rng(), &mut seed);
        // Every 32-byte seed is a valid Ed25519 private key.
        Self::from_seed(seed).unwrap_or_else(|_| unreachable!("any seed is a key"))
    }

    /// The base64 text form of the seed, for key files.
    pub fn to_base64(&self) -> String {
        B64.encode(self.seed)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.pair.verifying_key().to_bytes())
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        let sig = self.pair.sign(msg).to_bytes();
        Signature::from_slice(&sig).unwrap_or_else(|| unreachable!("Ed25519 signs 64 bytes"))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public={})", self.public().to_base64())
    }
}

impl FromStr for SigningKey {
    type Err = SignKeyError;
    fn from_str(s: &str) -> Result<Self, SignKeyError> {
        Self::from_seed(decode_fixed::<SEED_LEN>(s)?)
    }
}

/// What the registry vouches for: this key speaks for this IP (and these services).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertBody {
    pub owner_key: PublicKey,
    pub ip: IpAddr,
    /// `None`: any service (a host token); `Some`: only these (a service-scoped token).
    pub services: Option<Vec<ServiceName>>,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// A [`CertBody`] signed by the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub body: CertBody,
    pub sig: Signature,
}

/// `tag` followed by the binary encoding of `value`: the bytes a signature covers.
pub fn tagged<T: Serialize>(tag: &[u8], value: &T) -> Option<Vec<u8>> {
    let body = codec::encode_file(value).ok()?;
    let mut msg = Vec::with_capacity(tag.len() + body.len());
    msg.extend_from_slice(tag);
    msg.extend_from_slice(&body);
    Some(msg)
}

impl Certificate {
    /// Signs `body` with the registry key.
    pub fn issue(registry: &SigningKey, body: CertBody) -> Option<Certificate> {
        let sig = registry.sign(&tagged(CERT_TAG, &body)?);
        Some(Certificate { body, sig })
    }

    /// The bytes the registry signs for this certificate.
    pub fn message(&self) -> Option<Vec<u8>> {
        tagged(CERT_TAG, &self.body)
    }

    /// Whether the registry key signed this certificate.
    pub fn signed_by(&self, registry: &PublicKey) -> bool {
        tagged(CERT_TAG, &self.body).is_some_and(|m| registry.verifies(&m, &self.sig))
    }

    /// Whether `now_ms` is within the validity, honouring the certificate `grace_ms` past
    /// its end (fail-static while the registry is down).
    pub fn valid_at(&self, now_ms: u64, grace_ms: u64) -> bool {
        now_ms >= self.body.not_before_ms
            && now_ms <= self.body.not_after_ms.saturating_add(grace_ms)
    }

    /// The text form carried in a check-in answer: base64 of the binary encoding.
    pub fn to_base64(&self) -> Option<String> {
        codec::encode_file(self).ok().map(|b| B64.encode(b))
    }

    /// Parses [`to_base64`](Self::to_base64)'s form. Checks nothing: see
    /// [`signed_by`](Self::signed_by) and [`valid_at`](Self::valid_at).
    pub fn from_base64(s: &str) -> Option<Certificate> {
        let bytes = B64.decode(s.trim()).ok()?;
        codec::decode_file(&bytes).ok()
    }
}

/// The bytes the registry signs for one service's listing at `generated_at_ms` (registry
/// clock): the service, the date and every endpoint listed, in key order whatever order
/// they come in. Both the registry (which answers) and gossip (which checks the snapshot an
/// agent made of the answer) build it here, from the domain type, so neither depends on
/// the other's JSON.
///
/// Check-in times are not covered: a delta answer does not carry a host whose only change
/// is its check-in, so an agent's copy of them is older than the registry's, and a
/// signature over them could not be checked by the agent that received it. They change no
/// routing (docs/ARCHITECTURE.md#signed-gossip).
pub fn listing_message<'a>(
    service: &ServiceName,
    generated_at_ms: u64,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
) -> Option<Vec<u8>> {
    let mut endpoints: Vec<&Endpoint> = endpoints.into_iter().collect();
    endpoints.sort_by_key(|e| e.key());
    tagged(LISTING_TAG, &(service, generated_at_ms, endpoints))
}
