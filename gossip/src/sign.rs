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

use std::net::SocketAddr;
use std::str::FromStr;

pub use schema::cert::{
    CertBody, Certificate, PUBLIC_KEY_LEN, PublicKey, SEED_LEN, SIGNATURE_LEN, SignKeyError,
    Signature, SigningKey, tagged,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::rows::Row;
use crate::snapshot::Snapshot;

const ROW_TAG: &[u8] = b"tidings-row-v1\0";
const ROW_SET_TAG: &[u8] = b"tidings-rowset-v1\0";

/// What gossip asks of a [`Certificate`] (the type lives in `schema`, shared with the
/// registry that issues it).
pub trait CertificateChecks {
    /// Checks the registry's signature and the validity at `now_ms`, honouring the
    /// certificate `grace_ms` past its end (fail-static while the registry is down).
    fn check(&self, registry: &PublicKey, now_ms: u64, grace_ms: u64) -> Result<(), Reject>;
    /// The validity part of [`check`](Self::check), for a certificate whose signature was
    /// checked when it was stored.
    fn check_dates(&self, now_ms: u64, grace_ms: u64) -> Result<(), Reject>;
    /// Whether this certificate lets its key write `row`: the owner address, the endpoint
    /// and (when scoped) the service must all be this certificate's.
    fn covers(&self, row: &Row) -> bool;
}

impl CertificateChecks for Certificate {
    fn check(&self, registry: &PublicKey, now_ms: u64, grace_ms: u64) -> Result<(), Reject> {
        if !self.signed_by(registry) {
            return Err(Reject::BadCertificate);
        }
        self.check_dates(now_ms, grace_ms)
    }

    fn check_dates(&self, now_ms: u64, grace_ms: u64) -> Result<(), Reject> {
        self.valid_at(now_ms, grace_ms)
            .then_some(())
            .ok_or(Reject::ExpiredCertificate)
    }

    fn covers(&self, row: &Row) -> bool {
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

/// The bytes an owner signs for its whole row set: the owner and every row it holds of
/// itself (tombstones too), in key order whatever order they come in. One verification
/// then covers all of an owner's rows in a repair frame, where one per row made a node
/// joining a large cluster pay one per row. `None` if a row is another owner's.
pub fn row_set_message<'r>(
    owner: SocketAddr,
    rows: impl IntoIterator<Item = &'r Row>,
) -> Option<Vec<u8>> {
    let mut rows: Vec<&Row> = rows.into_iter().collect();
    if rows.iter().any(|r| r.owner != owner) {
        return None;
    }
    rows.sort_by(|a, b| a.key.cmp(&b.key));
    tagged(ROW_SET_TAG, &(owner, rows))
}

pub fn sign_row_set<'r>(
    owner_key: &SigningKey,
    owner: SocketAddr,
    rows: impl IntoIterator<Item = &'r Row>,
) -> Option<Signature> {
    row_set_message(owner, rows).map(|m| owner_key.sign(&m))
}

/// The bytes the registry signs for a snapshot: its service, date and endpoints
/// ([`schema::cert::listing_message`], which the registry builds from its own answer). Not
/// the hosts' check-in times: see there.
pub fn snapshot_message(snap: &Snapshot) -> Option<Vec<u8>> {
    let endpoints = snap.entries.iter().map(|e| &*e.endpoint);
    schema::cert::listing_message(&snap.service, snap.generated_at_ms, endpoints)
}

/// The registry's signature of `snap` (as the registry gives it in a catalog answer; for
/// tests and the simulator, which play the registry).
pub fn sign_snapshot(registry: &SigningKey, snap: &Snapshot) -> Option<Signature> {
    snapshot_message(snap).map(|m| registry.sign(&m))
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
    /// The signature an item must be checked against under this mode: `None` when it goes
    /// through unchecked (`off`, or unsigned under `accept`); unsigned under `require` is
    /// refused.
    fn to_check<'s>(&self, sig: Option<&'s Signature>) -> Result<Option<&'s Signature>, Reject> {
        match (self.mode, sig) {
            (SigningMode::Off, _) | (SigningMode::Accept, None) => Ok(None),
            (SigningMode::Require, None) => Err(Reject::Unsigned),
            (_, Some(sig)) => Ok(Some(sig)),
        }
    }

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
        let Some(sig) = self.to_check(sig)? else {
            return Ok(());
        };
        let cert = cert.ok_or(Reject::NoCertificate)?;
        self.check_row_scope(row, cert, now_ms)?;
        row_message(row)
            .is_some_and(|m| cert.body.owner_key.verifies(&m, sig))
            .then_some(())
            .ok_or(Reject::BadSignature)
    }

    /// Everything [`check_row_stored`](Self::check_row_stored) checks of a signed row but
    /// its signature: the certificate's dates and scope.
    fn check_row_scope(&self, row: &Row, cert: &Certificate, now_ms: u64) -> Result<(), Reject> {
        if self.registry.is_none() {
            return Err(Reject::BadCertificate);
        }
        cert.check_dates(now_ms, self.grace_ms)?;
        if !cert.covers(row) {
            return Err(Reject::OutOfScope);
        }
        Ok(())
    }

    /// Whether every one of `rows` (a row, its signature, its owner's stored certificate)
    /// passes [`check_row_stored`](Self::check_row_stored), its signatures verified as one
    /// batch ([`schema::cert::verify_all`]). `false` means at least one does not: check them
    /// one by one to tell which (and count why).
    pub fn check_rows_batch(&self, rows: &[(&Row, &Signature, &Certificate)], now_ms: u64) -> bool {
        let items: Vec<_> = rows
            .iter()
            .map(|(row, sig, cert)| (vec![*row], *sig, *cert, false))
            .collect();
        self.check_batch(&items, now_ms)
    }

    /// [`check_rows_batch`](Self::check_rows_batch) over items that are each either one
    /// row and its own signature (`set: false`) or all of an owner's rows and its row-set
    /// signature ([`row_set_message`], `set: true`): every row's certificate dates and
    /// scope are checked, then every signature in one batch.
    pub fn check_batch(
        &self,
        items: &[(Vec<&Row>, &Signature, &Certificate, bool)],
        now_ms: u64,
    ) -> bool {
        if self.mode == SigningMode::Off {
            return false;
        }
        let mut messages = Vec::with_capacity(items.len());
        for (rows, _, cert, set) in items {
            if rows
                .iter()
                .any(|r| self.check_row_scope(r, cert, now_ms).is_err())
            {
                return false;
            }
            let m = match (set, rows.as_slice()) {
                (false, [row]) => row_message(row),
                (true, [first, ..]) => row_set_message(first.owner, rows.iter().copied()),
                _ => None,
            };
            let Some(m) = m else {
                return false;
            };
            messages.push(m);
        }
        let batch: Vec<_> = items
            .iter()
            .zip(&messages)
            .map(|((_, sig, cert, _), m)| (&cert.body.owner_key, m.as_slice(), *sig))
            .collect();
        schema::cert::verify_all(&batch)
    }

    /// Checks a registry snapshot with its signature (if any).
    pub fn check_snapshot(&self, snap: &Snapshot, sig: Option<&Signature>) -> Result<(), Reject> {
        let Some(sig) = self.to_check(sig)? else {
            return Ok(());
        };
        let registry = self.registry.as_ref().ok_or(Reject::BadSignature)?;
        snapshot_message(snap)
            .is_some_and(|m| registry.verifies(&m, sig))
            .then_some(())
            .ok_or(Reject::BadSignature)
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

    /// Whether the registry key signed every one of `certs`, verified as one batch
    /// ([`schema::cert::verify_all`]); their dates and scope are still checked one by one.
    pub fn certs_signed(&self, certs: &[&Certificate]) -> bool {
        let Some(registry) = self.registry.as_ref() else {
            return false;
        };
        let Some(messages) = certs
            .iter()
            .map(|c| c.message())
            .collect::<Option<Vec<_>>>()
        else {
            return false;
        };
        let items: Vec<_> = certs
            .iter()
            .zip(&messages)
            .map(|(c, m)| (registry, m.as_slice(), &c.sig))
            .collect();
        schema::cert::verify_all(&items)
    }

    /// [`check_cert`](Self::check_cert) for a certificate whose registry signature is
    /// known good ([`certs_signed`](Self::certs_signed)).
    pub fn check_cert_signed(
        &self,
        owner: SocketAddr,
        cert: &Certificate,
        now_ms: u64,
    ) -> Result<(), Reject> {
        if self.registry.is_none() {
            return Err(Reject::BadCertificate);
        }
        cert.check_dates(now_ms, self.grace_ms)?;
        if owner.ip() != cert.body.ip {
            return Err(Reject::OutOfScope);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "sign_tests.rs"]
mod tests;
