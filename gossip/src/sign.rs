//! Who may speak for what in gossip (docs/ARCHITECTURE.md#signed-gossip): owner keys,
//! registry certificates, and the signatures on rows and snapshots. Sans-IO: no clock, no
//! file, no socket; the caller passes the time.
//!
//! - The **registry key** ([`SigningKey`]) signs [`Certificate`]s and registry snapshots.
//!   Agents are configured with its public half ([`PublicKey`]).
//! - Each agent has its own **owner key**. A certificate binds that key to the agent's IP
//!   (and, for a service-scoped host token, to those services) for a short validity;
//!   receivers honour it for a grace period beyond, so a registry outage does not unsign the
//!   fleet.
//! - Every **row** is signed by its owner over its canonical bytes ([`row_message`]). A row
//!   is accepted only if its owner's certificate verifies, covers the owner address's IP and
//!   the endpoint's IP and service, and the signature verifies under the certified key.
//!   Tombstones obey the same scope, so a tombstone can only shadow the owner's own rows and
//!   registry entries for the owner's own IP.
//! - **Snapshots** are signed by the registry over their canonical bytes.
//!
//! Every message is prefixed by a domain tag, so a signature over one kind of message can
//! never be replayed as another.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signer as _;
use schema::ServiceName;
use schema::codec;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::rows::Row;
use crate::snapshot::Snapshot;

pub const PUBLIC_KEY_LEN: usize = 32;
pub const SEED_LEN: usize = 32;
pub const SIGNATURE_LEN: usize = 64;

const CERT_TAG: &[u8] = b"tidings-cert-v1\0";
const ROW_TAG: &[u8] = b"tidings-row-v1\0";
const SNAPSHOT_TAG: &[u8] = b"tidings-snapshot-v1\0";

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

    fn from_slice(b: &[u8]) -> Option<Self> {
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

fn tagged<T: Serialize>(tag: &[u8], value: &T) -> Option<Vec<u8>> {
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

    /// Checks the registry's signature and the validity at `now_ms`, honouring the
    /// certificate `grace_ms` past its end (fail-static while the registry is down).
    pub fn check(&self, registry: &PublicKey, now_ms: u64, grace_ms: u64) -> Result<(), Reject> {
        if !self.signed_by(registry) {
            return Err(Reject::BadCertificate);
        }
        self.check_dates(now_ms, grace_ms)
    }

    /// Whether the registry key signed this certificate.
    pub fn signed_by(&self, registry: &PublicKey) -> bool {
        tagged(CERT_TAG, &self.body).is_some_and(|m| registry.verifies(&m, &self.sig))
    }

    /// The validity part of [`check`](Self::check), for a certificate whose signature was
    /// checked when it was stored.
    pub fn check_dates(&self, now_ms: u64, grace_ms: u64) -> Result<(), Reject> {
        if now_ms < self.body.not_before_ms
            || now_ms > self.body.not_after_ms.saturating_add(grace_ms)
        {
            return Err(Reject::ExpiredCertificate);
        }
        Ok(())
    }

    /// The text form carried in a check-in answer: base64 of the binary encoding.
    pub fn to_base64(&self) -> Option<String> {
        codec::encode_file(self).ok().map(|b| B64.encode(b))
    }

    /// Parses [`to_base64`](Self::to_base64)'s form. Checks nothing: see [`Self::check`].
    pub fn from_base64(s: &str) -> Option<Certificate> {
        let bytes = B64.decode(s.trim()).ok()?;
        codec::decode_file(&bytes).ok()
    }

    /// Whether this certificate lets its key write `row`: the owner address, the endpoint
    /// and (when scoped) the service must all be this certificate's.
    pub fn covers(&self, row: &Row) -> bool {
        row.owner.ip() == self.body.ip
            && row.key.ip == self.body.ip
            && self
                .body
                .services
                .as_ref()
                .is_none_or(|s| s.contains(&row.key.service))
    }
}

/// The bytes an owner signs for one row: owner, key, value and version.
pub fn row_message(row: &Row) -> Option<Vec<u8>> {
    tagged(ROW_TAG, row)
}

pub fn sign_row(owner: &SigningKey, row: &Row) -> Option<Signature> {
    row_message(row).map(|m| owner.sign(&m))
}

pub fn sign_snapshot(registry: &SigningKey, snap: &Snapshot) -> Option<Signature> {
    tagged(SNAPSHOT_TAG, snap).map(|m| registry.sign(&m))
}

/// Why a signed item was not accepted. Never changes any state. The label is the `reason`
/// of `tidings_gossip_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum Reject {
    #[error("no signature, and signatures are required")]
    Unsigned,
    #[error("no certificate known for the owner")]
    NoCertificate,
    #[error("certificate not signed by the registry key")]
    BadCertificate,
    #[error("certificate outside its validity and grace period")]
    ExpiredCertificate,
    #[error("signature does not verify")]
    BadSignature,
    #[error("owner address, endpoint IP or service outside the certificate's scope")]
    OutOfScope,
}

impl Reject {
    pub const ALL: [Reject; 6] = [
        Reject::Unsigned,
        Reject::NoCertificate,
        Reject::BadCertificate,
        Reject::ExpiredCertificate,
        Reject::BadSignature,
        Reject::OutOfScope,
    ];

    /// Position in [`Reject::ALL`], for counters.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Reject::Unsigned => "unsigned",
            Reject::NoCertificate => "no_certificate",
            Reject::BadCertificate => "bad_certificate",
            Reject::ExpiredCertificate => "expired_certificate",
            Reject::BadSignature => "bad_signature",
            Reject::OutOfScope => "out_of_scope",
        }
    }
}

/// How a node treats signatures (`--gossip-signing`), for rolling a fleet from unsigned to
/// signed: `off` neither signs nor checks; `accept` signs what it writes and checks what is
/// signed but still takes unsigned items (old agents); `require` drops anything unsigned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigningMode {
    #[default]
    Off,
    Accept,
    Require,
}

impl FromStr for SigningMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(SigningMode::Off),
            "accept" => Ok(SigningMode::Accept),
            "require" => Ok(SigningMode::Require),
            other => Err(format!(
                "gossip signing must be off, accept or require, not {other:?}"
            )),
        }
    }
}

/// A receiver's trust: the registry key, the mode and the certificate grace.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub registry: Option<PublicKey>,
    pub mode: SigningMode,
    pub grace_ms: u64,
}

impl Trust {
    /// Checks a row with its signature (if any) against the owner's certificate (if any).
    pub fn check_row(
        &self,
        row: &Row,
        sig: Option<&Signature>,
        cert: Option<&Certificate>,
        now_ms: u64,
    ) -> Result<(), Reject> {
        if let (Some(c), Some(_)) = (cert, sig)
            && self.mode != SigningMode::Off
            && !self.registry.as_ref().is_some_and(|r| c.signed_by(r))
        {
            return Err(Reject::BadCertificate);
        }
        self.check_row_stored(row, sig, cert, now_ms)
    }

    /// [`check_row`](Self::check_row) with a certificate taken from the store, whose
    /// registry signature was checked when it was stored ([`check_cert`](Self::check_cert)):
    /// only its dates and scope are checked again, so a row costs one verification.
    pub fn check_row_stored(
        &self,
        row: &Row,
        sig: Option<&Signature>,
        cert: Option<&Certificate>,
        now_ms: u64,
    ) -> Result<(), Reject> {
        match (self.mode, sig) {
            (SigningMode::Off, _) => Ok(()),
            (SigningMode::Accept, None) => Ok(()),
            (SigningMode::Require, None) => Err(Reject::Unsigned),
            (_, Some(sig)) => {
                let cert = cert.ok_or(Reject::NoCertificate)?;
                if self.registry.is_none() {
                    return Err(Reject::BadCertificate);
                }
                cert.check_dates(now_ms, self.grace_ms)?;
                if !cert.covers(row) {
                    return Err(Reject::OutOfScope);
                }
                let ok = row_message(row).is_some_and(|m| cert.body.owner_key.verifies(&m, sig));
                if ok {
                    Ok(())
                } else {
                    Err(Reject::BadSignature)
                }
            }
        }
    }

    /// Checks a registry snapshot with its signature (if any).
    pub fn check_snapshot(&self, snap: &Snapshot, sig: Option<&Signature>) -> Result<(), Reject> {
        match (self.mode, sig) {
            (SigningMode::Off, _) => Ok(()),
            (SigningMode::Accept, None) => Ok(()),
            (SigningMode::Require, None) => Err(Reject::Unsigned),
            (_, Some(sig)) => {
                let registry = self.registry.as_ref().ok_or(Reject::BadSignature)?;
                let ok = tagged(SNAPSHOT_TAG, snap).is_some_and(|m| registry.verifies(&m, sig));
                if ok {
                    Ok(())
                } else {
                    Err(Reject::BadSignature)
                }
            }
        }
    }

    /// Checks a certificate received from gossip before it is stored for `owner`.
    pub fn check_cert(
        &self,
        owner: SocketAddr,
        cert: &Certificate,
        now_ms: u64,
    ) -> Result<(), Reject> {
        let registry = self.registry.as_ref().ok_or(Reject::BadCertificate)?;
        cert.check(registry, now_ms, self.grace_ms)?;
        if owner.ip() != cert.body.ip {
            return Err(Reject::OutOfScope);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "sign_tests.rs"]
mod tests;
