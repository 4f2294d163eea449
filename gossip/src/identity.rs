//! The SWIM identity of an agent: its gossip address plus an epoch and a bump counter.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Who a node is in SWIM. `addr` is stable across restarts (it is also the owner of the
/// node's endpoint rows); `epoch` is fixed for the life of one process (wall-clock ms at
/// start, or a persisted value + 1) and is the epoch of every row that process writes;
/// `bump` grows when foca renews the identity after the node was declared down.
///
/// A restarted agent therefore has a strictly larger `(epoch, bump)` than anything its
/// previous process used, so peers that remember it as down do not ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    pub addr: SocketAddr,
    pub epoch: u64,
    pub bump: u32,
}

impl NodeId {
    pub fn new(addr: SocketAddr, epoch: u64) -> Self {
        NodeId {
            addr,
            epoch,
            bump: 0,
        }
    }

    /// An identity to announce to when only a seed's address is known: foca accepts an
    /// Announce addressed to any identity with the right address.
    pub(crate) fn seed(addr: SocketAddr) -> Self {
        NodeId {
            addr,
            epoch: 0,
            bump: 0,
        }
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        self.bump
            .checked_add(1)
            .map(|bump| NodeId { bump, ..*self })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.epoch, self.bump) > (adversary.epoch, adversary.bump)
    }
}

#[cfg(test)]
mod tests {
    use foca::Identity;

    use super::*;

    #[test]
    fn renewed_and_restarted_identities_win() {
        let addr: SocketAddr = "127.0.0.1:7702".parse().unwrap();
        let first = NodeId::new(addr, 1_000);
        let renewed = first.renew().unwrap();
        assert!(renewed.win_addr_conflict(&first));
        assert!(!first.win_addr_conflict(&renewed));
        let restarted = NodeId::new(addr, 2_000);
        assert!(restarted.win_addr_conflict(&renewed));
        assert_eq!(restarted.addr(), addr);
    }
}
