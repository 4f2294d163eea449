//! The agent's side of signed gossip (docs/ARCHITECTURE.md#signed-gossip): its owner key,
//! offered to the registry at every check-in, and the certificate the registry answers
//! with, handed to gossip and kept in the data dir.
//!
//! The registry issues a fresh certificate at every check-in, but each one adopted is
//! gossiped to the whole cluster, so a certificate is adopted only once the one held has
//! less than half its validity left: with the default day of validity, one per agent every
//! twelve hours. A kept certificate is handed to gossip at start, so a restart while the
//! registry is down still signs under a certificate peers honour (fail-static).
//!
//! A registry with a signing key also signs each listing of a catalog answer the agent asks
//! with `signed=true` ([`registry_signatures`]); gossip checks each signature and passes the
//! snapshot on with it.

use std::path::PathBuf;
use std::sync::Mutex;

use gossip::owner_key::{self, OwnerKeyError};
use gossip::sign::{Certificate, Signature};
use gossip::{GossipHandle, Snapshot};

use crate::replica::Replica;

/// What the check-in loop needs to ask for and adopt certificates.
#[derive(Debug)]
pub struct Signing {
    public_key: String,
    dir: PathBuf,
    held: Mutex<Option<Certificate>>,
}

impl Signing {
    /// Loads (or creates) the owner key and the kept certificate, and hands both to gossip.
    pub async fn start(dir: PathBuf, gossip: &GossipHandle) -> Result<Signing, OwnerKeyError> {
        let key = owner_key::load_or_create(&dir)?;
        let public_key = key.public().to_base64();
        let _ = gossip.set_owner_key(key).await;
        let held = owner_key::load_cert(&dir);
        if let Some(cert) = &held {
            let _ = gossip.set_certificate(cert.clone()).await;
        }
        tracing::info!(owner_key = %public_key, certificate = held.is_some(), "gossip signing on");
        Ok(Signing {
            public_key,
            dir,
            held: Mutex::new(held),
        })
    }

    /// The owner key, base64, as the check-in carries it.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// Takes the certificate of a check-in answer if the one held is due for renewal.
    pub async fn offer(&self, gossip: &GossipHandle, text: &str, now_ms: u64) {
        let Some(cert) = Certificate::from_base64(text) else {
            tracing::warn!("the registry answered with a gossip certificate that does not decode");
            return;
        };
        if !self.due(now_ms, &cert) {
            return;
        }
        if let Err(e) = owner_key::store_cert(&self.dir, &cert) {
            tracing::warn!(error = %e, "gossip certificate not kept for the next start");
        }
        if let Ok(mut held) = self.held.lock() {
            *held = Some(cert.clone());
        }
        let _ = gossip.set_certificate(cert).await;
    }

    fn due(&self, now_ms: u64, offered: &Certificate) -> bool {
        let Ok(held) = self.held.lock() else {
            return true;
        };
        renewal_due(held.as_ref(), offered, now_ms)
    }
}

/// Whether `offered` should replace `held`: nothing held, a different key (the data dir
/// was reset) or ip, or less than half of the held one's validity left.
pub fn renewal_due(held: Option<&Certificate>, offered: &Certificate, now_ms: u64) -> bool {
    let Some(held) = held else {
        return true;
    };
    let (h, o) = (&held.body, &offered.body);
    if h.owner_key != o.owner_key || h.ip != o.ip || h.services != o.services {
        return true;
    }
    let half = h.not_after_ms.saturating_sub(h.not_before_ms) / 2;
    o.not_after_ms > h.not_after_ms && now_ms >= h.not_after_ms.saturating_sub(half)
}

/// Pairs each snapshot an answer made with the registry's signature of its listing, when
/// the answer had one and the snapshot is the answer's listing as it came: dated by the
/// answer and not from a warming answer, whose snapshots are lower bounds this agent made
/// (unions with what it held), which no registry signed. A signature that does not match
/// (a host this agent could not read) is caught by gossip's check.
pub fn registry_signatures(
    snapshots: Vec<Snapshot>,
    catalog: &Replica,
    warming: bool,
) -> Vec<(Snapshot, Option<Signature>)> {
    snapshots
        .into_iter()
        .map(|s| {
            let sig = (!warming && s.generated_at_ms == catalog.generated_at_ms)
                .then(|| catalog.signatures.get(s.service.as_str()))
                .flatten()
                .and_then(|b| Signature::from_base64(b));
            (s, sig)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use gossip::sign::{CertBody, SigningKey};

    use super::*;

    fn cert(owner: &SigningKey, from: u64, to: u64) -> Certificate {
        let registry = SigningKey::from_seed([1; 32]).unwrap();
        let body = CertBody {
            owner_key: owner.public(),
            ip: "10.0.0.1".parse().unwrap(),
            services: None,
            not_before_ms: from,
            not_after_ms: to,
        };
        Certificate::issue(&registry, body).unwrap()
    }

    #[test]
    fn a_certificate_is_renewed_at_half_its_validity_or_when_the_key_changed() {
        let me = SigningKey::from_seed([2; 32]).unwrap();
        let held = cert(&me, 0, 100);
        assert!(renewal_due(None, &held, 0));
        assert!(!renewal_due(Some(&held), &cert(&me, 10, 110), 10));
        assert!(!renewal_due(Some(&held), &cert(&me, 49, 149), 49));
        assert!(renewal_due(Some(&held), &cert(&me, 50, 150), 50));
        let other = SigningKey::from_seed([3; 32]).unwrap();
        assert!(renewal_due(Some(&held), &cert(&other, 10, 110), 10));
    }
}
