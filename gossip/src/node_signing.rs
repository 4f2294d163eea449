//! The node's own side of signed gossip (docs/ARCHITECTURE.md#signed-gossip): its owner
//! key and its registry certificate. Checking what peers send lives in [`crate::broadcast`]
//! and [`crate::sign`].

use crate::broadcast::BroadcastItem;
use crate::node::Node;
use crate::sign::{Certificate, Signature, SigningKey, SigningMode};
use crate::snapshot::Snapshot;

impl Node {
    /// Gives the node its owner key: rows it writes from now on are signed (unless
    /// signing is off).
    pub fn set_owner_key(&mut self, key: SigningKey) {
        self.signer = Some(key);
    }

    /// Takes this node's certificate from the registry and passes it on, so peers can check
    /// its rows. A certificate that does not verify here (another registry's, or not for
    /// this node's ip) is refused, counted and logged.
    pub fn set_certificate(&mut self, now_ms: u64, cert: Certificate) {
        self.set_now(now_ms);
        if self.store.trust.mode == SigningMode::Off {
            return;
        }
        if self.store.certs.get(&self.me.addr) == Some(&cert) {
            return;
        }
        let owner_key = cert.body.owner_key;
        let before = self.store.rejected;
        self.learn(BroadcastItem::Cert(self.me.addr, Box::new(cert)));
        if self.store.rejected != before {
            tracing::warn!(
                "the registry's certificate for this node does not verify with the configured registry key, or is not for this node's ip"
            );
        } else if self
            .signer
            .as_ref()
            .is_some_and(|k| k.public() != owner_key)
        {
            tracing::warn!("the registry certified another key than this node's owner key");
        }
        self.spread_now();
        self.drain();
    }

    /// The registry's signature to keep with a snapshot this node made of its registry's
    /// answer, checked under the registry key like a peer's. None when signing is off, when
    /// the snapshot was `restamped` (the registry signed the answer's date, not the stamp),
    /// or when it does not verify (a registry with another key, or a host this agent could
    /// not read as the registry listed it: counted and logged). Without one the snapshot is
    /// this node's alone under `require`, as the lower bounds it makes of a warming answer are.
    pub(crate) fn registry_sig(
        &mut self,
        snapshot: &Snapshot,
        sig: Option<Signature>,
        restamped: bool,
    ) -> Option<Signature> {
        let sig = sig.filter(|_| self.store.trust.mode != SigningMode::Off && !restamped)?;
        match self.store.trust.check_snapshot(snapshot, Some(&sig)) {
            Ok(()) => Some(sig),
            Err(why) => {
                self.store.reject(why);
                tracing::warn!(
                    service = %snapshot.service,
                    "the registry's signature of its answer does not verify with the configured registry key; the snapshot stays local"
                );
                None
            }
        }
    }

    /// Signs this node's whole row set after it changed, and passes the signature on after
    /// the rows (queued after them, so a receiver holds them when it checks it). With it a
    /// repair of this node's rows costs one verification, not one per row.
    pub(crate) fn sign_row_set(&mut self) {
        let (Some(key), SigningMode::Accept | SigningMode::Require) =
            (&self.signer, self.store.trust.mode)
        else {
            return;
        };
        let me = self.me.addr;
        let rows = self.store.rows.owner_rows(&me);
        if let Some(sig) = crate::sign::sign_row_set(key, me, &rows) {
            self.learn(BroadcastItem::RowSet(me, sig));
        }
    }

    /// This node's certificate, as peers see it.
    pub fn certificate(&self) -> Option<&Certificate> {
        self.store.certs.get(&self.me.addr)
    }
}
