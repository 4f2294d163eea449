//! Membership bookkeeping of a [`Node`]: the member cache behind row visibility, resizing
//! foca as the cluster grows, forgetting owners foca forgot, and the extra care foca needs to
//! heal partitions and spread down verdicts it gave up on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use foca::OwnedNotification;
use rand::RngExt;

use crate::NodeId;
use crate::codec::PacketKind;
use crate::config::foca_config;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::repair;
use crate::sign::SigningMode;
use crate::view::MemberInfo;

impl Node {
    /// Down verdicts to piggyback on a digest: the most recent first (they are the ones a
    /// peer is likely to have missed), then random older ones.
    pub(crate) fn down_sample(&mut self) -> Vec<NodeId> {
        let mut recent: Vec<(u64, SocketAddr)> =
            self.recently_down.iter().map(|(a, t)| (*t, *a)).collect();
        recent.sort_unstable_by(|a, b| b.cmp(a));
        let mut down: Vec<NodeId> = recent
            .iter()
            .filter_map(|(_, a)| self.members.get(a).filter(|m| !m.active).map(|m| m.id))
            .take(repair::DIGEST_MAX_DOWN / 2)
            .collect();
        let mut older: Vec<NodeId> = self
            .members
            .values()
            .filter(|m| !m.active && !down.contains(&m.id))
            .map(|m| m.id)
            .collect();
        while down.len() < repair::DIGEST_MAX_DOWN && !older.is_empty() {
            down.push(older.swap_remove(self.rng.random_range(0..older.len())));
        }
        down
    }

    /// Housekeeping: resync membership from foca, resize foca's config, forget rows of
    /// forgotten owners, collect tombstones, re-announce when alone.
    pub fn tick(&mut self, now_ms: u64) {
        self.set_now(now_ms);
        self.returning.refill();
        self.resync_members();
        let active = self.members.values().filter(|m| m.active).count() as u32 + 1;
        let indirect = self.probing.indirect_probes(active);
        if (active, indirect) != (self.sized_for, self.indirect_probes) {
            if self
                .swim
                .set_config(foca_config(&self.cfg, active, indirect))
                .is_err()
            {
                tracing::warn!("foca rejected the resized config");
            }
            self.sized_for = active;
            self.indirect_probes = indirect;
        }
        self.forget_owners();
        let live: BTreeSet<SocketAddr> = self
            .members
            .values()
            .filter(|m| m.active)
            .map(|m| m.id.addr)
            .collect();
        self.store
            .gc_tombstones(now_ms, self.cfg.tombstone_retention_ms, self.me.addr, &live);
        if self.swim.num_members() == 0 {
            self.announce_to_seeds();
        }
        self.announce_to_recently_down();
    }

    /// memberlist's "gossip to the dead", for foca: after a partition heals both halves hold
    /// each other down, and foca only announces to down members every 65 probe periods.
    /// One announce per tick to a member that went down in the last minute lets the halves
    /// find each other (the peer answers TurnUndead and one side renews) within seconds.
    fn announce_to_recently_down(&mut self) {
        let window = 60 * self.cfg.probe_period_ms;
        let now = self.now_ms;
        self.recently_down
            .retain(|_, since| now.saturating_sub(*since) <= window);
        let candidates: Vec<NodeId> = self
            .recently_down
            .keys()
            .filter_map(|a| self.members.get(a).filter(|m| !m.active).map(|m| m.id))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let target = candidates[self.rng.random_range(0..candidates.len())];
        if let Err(e) = self.swim.announce(target, &mut self.rt) {
            tracing::trace!(?target, error = %e, "announce to down member failed");
        }
    }

    fn resync_members(&mut self) {
        let fresh: BTreeMap<SocketAddr, MemberInfo> = self
            .swim
            .iter_membership_state()
            .map(|m| {
                (
                    m.id().addr,
                    MemberInfo {
                        id: *m.id(),
                        active: m.state() != foca::State::Down,
                    },
                )
            })
            .collect();
        if fresh != self.members {
            for (addr, m) in &fresh {
                if m.active {
                    if self.members.get(addr).is_none_or(|old| !old.active) {
                        self.note_return(*addr);
                    }
                    self.recently_down.remove(addr);
                } else if self.members.get(addr).is_none_or(|old| old.active) {
                    self.recently_down.entry(*addr).or_insert(self.now_ms);
                }
            }
            self.members = fresh;
            self.membership_changes += 1;
        }
        let store = &mut self.store;
        // With signatures required, only an owner's signed rows move its epoch: SWIM
        // identities carry no signature, and a forged one must not drop a member's rows.
        if store.trust.mode != SigningMode::Require {
            for m in self.members.values() {
                store.rows.observe_epoch(m.id.addr, m.id.epoch);
            }
        }
    }

    fn forget_owners(&mut self) {
        let store = &mut self.store;
        let owners: Vec<SocketAddr> = store
            .rows
            .owners()
            .copied()
            .filter(|o| *o != self.me.addr)
            .collect();
        for owner in owners {
            if self.members.contains_key(&owner) {
                self.seen_owners.insert(owner);
                self.unknown_owners.remove(&owner);
            } else if self.seen_owners.remove(&owner) {
                store.rows.drop_owner(&owner);
            } else {
                let since = *self.unknown_owners.entry(owner).or_insert(self.now_ms);
                if self.now_ms.saturating_sub(since) > self.cfg.remove_down_after_ms {
                    store.rows.drop_owner(&owner);
                    self.unknown_owners.remove(&owner);
                }
            }
        }
    }

    /// foca 2.0.0 answers every suspicion timer with a courtesy TurnUndead, even when the
    /// member refuted the suspicion in time and is still alive (`apply_existing_if` returns
    /// `Some` when its condition fails). The healthy member then believes it was declared
    /// down and renews its identity; peers that still address it by the old one have their
    /// payloads ignored (foca checks `dst`), so it misses gossip and answers no probes until
    /// the rename has spread. In the simulator at 1 000 nodes and 10 % loss, 140 healthy
    /// nodes renewed their identity in the first 45 s, and the last new row reached them by
    /// repair seconds later. Called right after such a timer, while the runtime holds only
    /// what the timer produced: if the member is still active, nothing was declared down and
    /// the message is dropped.
    pub(crate) fn drop_spurious_turn_undead(&mut self, addr: SocketAddr) {
        let still_active = self
            .swim
            .iter_membership_state()
            .any(|m| m.id().addr == addr && m.state() != foca::State::Down);
        if !still_active {
            return;
        }
        let mut keep = Vec::new();
        while let Some((to, data)) = self.rt.to_send() {
            if to.addr == addr {
                Metrics::bump(&self.metrics.spurious_turn_undead, 1);
            } else {
                keep.push((to, data));
            }
        }
        for (to, data) in keep {
            self.send_plain(to.addr, PacketKind::Swim, &data);
        }
    }

    pub(crate) fn on_notification(&mut self, n: OwnedNotification<NodeId>) {
        match n {
            OwnedNotification::MemberUp(id) => self.set_member(id, true),
            OwnedNotification::MemberDown(id) => {
                Metrics::bump(&self.metrics.members_declared_down, 1);
                self.set_member(id, false);
            }
            OwnedNotification::Rename(_, new) => self.set_member(new, true),
            OwnedNotification::Rejoin(new) => {
                Metrics::bump(&self.metrics.rejoins, 1);
                tracing::info!(?new, "rejoined the cluster with a renewed identity");
                self.me = new;
            }
            OwnedNotification::Defunct => tracing::warn!("declared down and cannot renew identity"),
            OwnedNotification::Idle => self.announce_to_seeds(),
            OwnedNotification::Active => {}
        }
    }

    fn set_member(&mut self, id: NodeId, active: bool) {
        if active {
            if self.members.get(&id.addr).is_none_or(|old| !old.active) {
                self.note_return(id.addr);
            }
            self.recently_down.remove(&id.addr);
        } else {
            self.recently_down.entry(id.addr).or_insert(self.now_ms);
        }
        let prev = self.members.insert(id.addr, MemberInfo { id, active });
        if prev.map(|p| p.active) != Some(active) || prev.map(|p| p.id) != Some(id) {
            self.membership_changes += 1;
        }
        if self.store.trust.mode != SigningMode::Require {
            self.store.rows.observe_epoch(id.addr, id.epoch);
        }
    }
}
