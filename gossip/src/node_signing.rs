//! The node's own side of signed gossip (docs/ARCHITECTURE.md#signed-gossip): its owner
//! key and its registry certificate. Checking what peers send lives in [`crate::broadcast`]
//! and [`crate::sign`].

use crate::broadcast::BroadcastItem;
use crate::node::Node;
use crate::sign::{Certificate, SigningKey, SigningMode};

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

    /// This node's certificate, as peers see it.
    pub fn certificate(&self) -> Option<&Certificate> {
        self.store.certs.get(&self.me.addr)
    }
}
