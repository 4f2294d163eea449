//! Owners coming back into contact, and the tombstones that must wait for them.
//!
//! While we cannot hear an owner (a partition, loss, SWIM holding it down) it may have
//! written rows we never got: typically it deregistered an endpoint, then registered it
//! again. We still hold the old tombstone; the registry, which the owner could reach,
//! lists the endpoint again. When SWIM sees the owner alive again, that stale tombstone
//! would hide the registry's newer entry until repair brings the owner's current rows — a
//! live host gone from every view on our side for a repair period or more (fault campaign
//! seed 9294334021625524411).
//!
//! So a returning owner's tombstones do not hide anything until we know we hold what it
//! holds of itself: its own summary equals ours (a digest, request or response from it),
//! or its authoritative row set arrived. The node sends it a digest at once to get there
//! in one exchange. The wait is bounded (two repair intervals): a deregistration during
//! the partition still takes effect, at worst that much later, and the registry drops the
//! endpoint on its own. The owner's `Up` rows count at once, as always; only removal
//! waits — the fail-static direction (docs/ARCHITECTURE.md#what-the-agent-answers).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::node::Node;

/// Immediate digests to returning owners per probe period: after a large partition heals,
/// half the cluster returns at once, and the rest is left to periodic repair and the bound.
const DIGESTS_PER_PERIOD: u32 = 4;

#[derive(Debug, Default)]
pub(crate) struct Returning {
    /// Owner → when it came back (ms) and whether it was sent a digest.
    owners: BTreeMap<SocketAddr, (u64, bool)>,
    /// Immediate digests left in this probe period.
    budget: u32,
}

impl Returning {
    /// A new probe period: a fresh digest budget.
    pub(crate) fn refill(&mut self) {
        self.budget = DIGESTS_PER_PERIOD;
    }
}

impl Node {
    fn returning_hold_ms(&self) -> u64 {
        self.cfg.repair_interval_ms.saturating_mul(2)
    }

    /// `owner` became active after being down or unknown. Evidence that it held our
    /// summary of itself predates the gap and says nothing about what it wrote since.
    pub(crate) fn note_return(&mut self, owner: SocketAddr) {
        if owner == self.me.addr || !self.store.rows.has_owner(&owner) {
            return;
        }
        self.store.rows.forget_synced(&owner, &owner);
        self.returning.owners.insert(owner, (self.now_ms, false));
    }

    /// Whether `owner`'s tombstones may remove registry entries from the view now.
    pub(crate) fn tombstones_settled(&self, owner: &SocketAddr) -> bool {
        self.returning
            .owners
            .get(owner)
            .is_none_or(|(since, _)| self.now_ms.saturating_sub(*since) >= self.returning_hold_ms())
    }

    /// Ends the wait of every owner we are now in step with (or that went away, or whose
    /// bound passed), and sends a digest to those not asked yet, within the budget.
    pub(crate) fn settle_returning(&mut self) {
        if self.returning.owners.is_empty() {
            return;
        }
        let hold = self.returning_hold_ms();
        let now = self.now_ms;
        let (store, members) = (&self.store, &self.members);
        let before = self.returning.owners.len();
        self.returning.owners.retain(|owner, (since, _)| {
            members.get(owner).is_some_and(|m| m.active)
                && store.rows.has_owner(owner)
                && !store.rows.is_synced(owner, owner)
                && now.saturating_sub(*since) < hold
        });
        if self.returning.owners.len() != before {
            // Tombstones that now count change the view: it must be published again.
            self.membership_changes += 1;
        }
        let mut ask = Vec::new();
        for (owner, (_, asked)) in self.returning.owners.iter_mut() {
            if !*asked && self.returning.budget > 0 {
                *asked = true;
                self.returning.budget -= 1;
                ask.push(*owner);
            }
        }
        for owner in ask {
            self.digest_to(owner, false, None);
        }
    }
}
