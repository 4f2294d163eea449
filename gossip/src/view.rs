//! The merged gossip view (docs/ARCHITECTURE.md#what-the-agent-answers) and membership as the agent sees them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use schema::{Endpoint, EndpointKey};

use crate::NodeId;
use crate::broadcast::Store;
use crate::node::Node;
use crate::rows::RowStatus;
use crate::rows::Version;
use crate::snapshot::Snapshot;
use crate::view_entries::{ViewCache, ViewEntries, view_entries};

/// Where an endpoint of the view comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A live row of this owner (an agent alive in SWIM).
    Gossip { owner: SocketAddr },
    /// The newest registry snapshot of the service.
    Registry {
        generated_at_ms: u64,
        last_check_in_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewEntry {
    pub endpoint: Arc<Endpoint>,
    pub source: Source,
}

/// One member as SWIM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: NodeId,
    /// Alive or suspect (foca treats both as active).
    pub active: bool,
}

/// What the runtime publishes on its watch channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GossipView {
    pub endpoints: ViewEntries,
    pub snapshots: Vec<Arc<Snapshot>>,
    pub members: Vec<MemberInfo>,
    /// Keys whose owner wrote a tombstone (alive or not) and no owner lists as up: what was
    /// explicitly deregistered, as opposed to expired or crashed. The agent lists such hosts
    /// as draining for a while, so proxies finish in-flight requests and stop routing even
    /// when the host still passes health checks (docs/ARCHITECTURE.md#draining).
    pub deregistered: Vec<EndpointKey>,
}

/// Keys with a tombstone and no `Up` row of any owner, whether the owners are alive or not.
pub(crate) fn deregistered(store: &Store) -> Vec<EndpointKey> {
    let mut up = BTreeSet::new();
    let mut gone = BTreeSet::new();
    for (_, key, reg) in store.rows.iter_owner_entries() {
        match reg.val {
            RowStatus::Up(_) => up.insert(key),
            RowStatus::Deregistered => gone.insert(key),
        };
    }
    gone.difference(&up).map(|k| (*k).clone()).collect()
}

/// View queries of a node.
impl Node {
    pub(crate) fn owner_alive(&self, owner: &SocketAddr) -> bool {
        *owner == self.me.addr || self.members.get(owner).is_some_and(|m| m.active)
    }

    /// The merged view: live owned rows ∪ registry snapshot entries (docs/ARCHITECTURE.md#what-the-agent-answers).
    pub fn visible_endpoints(&self) -> Vec<ViewEntry> {
        self.view_entries(&mut ViewCache::default())
            .iter()
            .cloned()
            .collect()
    }

    /// The merged view per service, rebuilding only the services whose snapshot or rows
    /// changed since `cache` was last used (see [`crate::view_entries`]).
    pub fn view_entries(&self, cache: &mut ViewCache) -> ViewEntries {
        view_entries(
            &self.store,
            cache,
            |o| self.owner_alive(o),
            |o| self.tombstones_settled(o),
        )
    }

    /// Keys with a tombstone and no `Up` row of any owner (see [`GossipView::deregistered`]).
    pub fn deregistered_keys(&self) -> Vec<EndpointKey> {
        deregistered(&self.store)
    }

    /// Whether `owner`'s row for `key` is known and visible here (simulator probe).
    pub fn sees_row(&self, owner: &SocketAddr, key: &EndpointKey) -> bool {
        self.owner_alive(owner)
            && self
                .store
                .rows
                .get(owner, key)
                .is_some_and(|r| matches!(r.reg.val, RowStatus::Up(_)))
    }

    /// Whether this node has the row at least at `version` (visible or not).
    pub fn has_row(&self, owner: &SocketAddr, key: &EndpointKey, version: Version) -> bool {
        self.store
            .rows
            .get(owner, key)
            .is_some_and(|r| r.version() >= version)
    }

    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        self.store.snapshots.shared().cloned().collect()
    }

    /// Every member foca knows, down ones included (until it forgets them).
    pub fn members(&self) -> Vec<MemberInfo> {
        self.members.values().copied().collect()
    }

    pub fn is_member_active(&self, addr: &SocketAddr) -> bool {
        self.members.get(addr).is_some_and(|m| m.active)
    }

    /// Moves whenever the view may have changed (rows, snapshots or membership).
    pub fn view_generation(&self) -> u64 {
        let store = &self.store;
        store.rows.changes() + store.snapshots.changes() + self.membership_changes
    }

    /// The version the next local change would get minus one (for tests).
    pub fn local_version(&self) -> Version {
        Version {
            epoch: self.me.epoch,
            seq: self.seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use schema::ServiceName;

    use super::*;
    use crate::rows::Row;
    use crate::snapshot::SnapshotEntry;

    fn merged_view(
        store: &Store,
        alive: impl Fn(&SocketAddr) -> bool,
        settled: impl Fn(&SocketAddr) -> bool,
    ) -> Vec<ViewEntry> {
        view_entries(store, &mut ViewCache::default(), alive, settled)
            .iter()
            .cloned()
            .collect()
    }

    fn ep(port: u16) -> Endpoint {
        let service = ServiceName::new("web").unwrap();
        Endpoint::new(
            service,
            "10.0.0.1".parse().unwrap(),
            NonZeroU16::new(port).unwrap(),
        )
    }

    #[test]
    fn a_tombstone_hiding_a_registry_entry_outlives_every_peer_having_it() {
        let (owner, peer): (SocketAddr, SocketAddr) = (
            "10.0.0.2:7702".parse().unwrap(),
            "10.0.0.3:7702".parse().unwrap(),
        );
        let me: SocketAddr = "10.0.0.9:7702".parse().unwrap();
        let snapshot = |at, ports: &[u16]| Snapshot {
            service: ep(1).service,
            generated_at_ms: crate::LOWER_BOUNDS_BEFORE_MS + at,
            entries: ports
                .iter()
                .map(|p| SnapshotEntry {
                    endpoint: ep(*p).into(),
                    last_check_in_ms: 5,
                })
                .collect(),
        };
        let mut store = Store::default();
        store
            .snapshots
            .merge(snapshot(7, &[1, 2]), crate::LOWER_BOUNDS_BEFORE_MS);
        let v = |seq| Version { epoch: 1, seq };
        for (key, seq) in [(ep(1).key(), 1), (ep(3).key(), 1)] {
            store
                .rows
                .merge(Row::new(owner, key, RowStatus::Deregistered, v(seq)), 0);
        }
        // Every live peer has the owner's rows: only the tombstone of port 3, which hides
        // nothing, may go. Port 1's keeps the registry's (stale) entry hidden.
        let live: BTreeSet<SocketAddr> = [peer].into();
        store.rows.mark_synced(&owner, peer);
        store.gc_tombstones(10, 1_000, me, &live);
        assert_eq!(store.rows.len(), 1);
        let ports = |store: &Store| -> Vec<u16> {
            merged_view(store, |o| *o == owner, |_| true)
                .iter()
                .map(|e| e.endpoint.port.get())
                .collect()
        };
        assert_eq!(ports(&store), vec![2], "port 1 stays deregistered");
        // A newer snapshot without it: the tombstone has nothing left to hide.
        store
            .snapshots
            .merge(snapshot(8, &[2]), crate::LOWER_BOUNDS_BEFORE_MS);
        store.gc_tombstones(11, 1_000, me, &live);
        assert_eq!(store.rows.len(), 0);
        assert_eq!(ports(&store), vec![2]);
        // Retention ends a shadowing tombstone too.
        store
            .snapshots
            .merge(snapshot(9, &[1, 2]), crate::LOWER_BOUNDS_BEFORE_MS);
        store.rows.merge(
            Row::new(owner, ep(1).key(), RowStatus::Deregistered, v(3)),
            20,
        );
        store.gc_tombstones(1_019, 1_000, me, &live);
        assert_eq!(store.rows.len(), 1);
        store.gc_tombstones(1_020, 1_000, me, &live);
        assert_eq!(store.rows.len(), 0);
    }

    #[test]
    fn rows_override_registry_tombstones_remove_and_dead_owners_hide() {
        let (alive, dead): (SocketAddr, SocketAddr) = (
            "10.0.0.2:7702".parse().unwrap(),
            "10.0.0.3:7702".parse().unwrap(),
        );
        let mut store = Store::default();
        let entries = [1, 2, 3]
            .map(|p| SnapshotEntry {
                endpoint: ep(p).into(),
                last_check_in_ms: 5,
            })
            .to_vec();
        store.snapshots.merge(
            Snapshot {
                service: ep(1).service,
                generated_at_ms: 7,
                entries,
            },
            0,
        );
        let v = |seq| Version { epoch: 1, seq };
        let mut tagged = ep(1);
        tagged.tags.canary = true;
        store.rows.merge(
            Row::new(
                alive,
                ep(1).key(),
                RowStatus::Up(tagged.clone().into()),
                v(1),
            ),
            0,
        );
        store.rows.merge(
            Row::new(alive, ep(2).key(), RowStatus::Deregistered, v(2)),
            0,
        );
        store.rows.merge(
            Row::new(dead, ep(3).key(), RowStatus::Deregistered, v(1)),
            0,
        );
        store.rows.merge(
            Row::new(dead, ep(4).key(), RowStatus::Up(ep(4).into()), v(2)),
            0,
        );
        let view = merged_view(&store, |o| *o == alive, |_| true);
        let got: Vec<(u16, Source)> = view
            .iter()
            .map(|e| (e.endpoint.port.get(), e.source.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, Source::Gossip { owner: alive }),
                (
                    3,
                    Source::Registry {
                        generated_at_ms: 7,
                        last_check_in_ms: 5
                    }
                ),
            ]
        );
        assert_eq!(
            view[0].endpoint,
            tagged.into(),
            "the owner's row overrides the registry entry"
        );
        // Tombstones count as deregistrations whether their owner is alive (2) or not (3);
        // a key another owner still lists as up (here 1, re-registered elsewhere) does not.
        store.rows.merge(
            Row::new(dead, ep(1).key(), RowStatus::Deregistered, v(3)),
            0,
        );
        let ports: Vec<u16> = deregistered(&store).iter().map(|k| k.port.get()).collect();
        assert_eq!(ports, vec![2, 3]);
    }
}
