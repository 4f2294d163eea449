//! What gossip replicates ([`Store`]) and the items that spread it ([`BroadcastItem`]): an
//! item is news, and worth passing on ([`crate::spread`]), exactly when merging it changed
//! the store; a newer version of the same row or service supersedes a queued older one.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use schema::codec::{self, CodecError};
use schema::{EndpointKey, ServiceName};
use serde::{Deserialize, Serialize};

use crate::rows::{Merge, Row, RowStore, Version};
use crate::snapshot::{Snapshot, SnapshotMerge, SnapshotStore};

/// Everything gossip replicates.
#[derive(Debug, Default)]
pub struct Store {
    pub rows: RowStore,
    pub snapshots: SnapshotStore,
    /// The node's clock at its last entry point, so merges can stamp receive times.
    pub now_ms: u64,
    pub rows_received: u64,
}

impl Store {
    /// Tombstone collection ([`RowStore::gc_tombstones`]), keeping the tombstones
    /// that hide an entry of a registry snapshot held here.
    pub fn gc_tombstones(
        &mut self,
        now_ms: u64,
        retention_ms: u64,
        me: SocketAddr,
        live_peers: &BTreeSet<SocketAddr>,
    ) {
        let listed: BTreeSet<EndpointKey> = self
            .snapshots
            .iter()
            .flat_map(|(s, _)| s.entries.iter().map(|e| e.endpoint.key()))
            .collect();
        self.rows
            .gc_tombstones(now_ms, retention_ms, me, live_peers, &listed);
    }
}

/// One item of dissemination: a row or a registry snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BroadcastItem {
    Row(Box<Row>),
    Snapshot(Snapshot),
}

impl BroadcastItem {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_packet(self)
    }
}

/// What foca keeps per queued broadcast, to retire superseded ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BroadcastKey {
    Row {
        owner: SocketAddr,
        key: EndpointKey,
        version: Version,
    },
    Snapshot {
        service: ServiceName,
        rank: (u64, u64),
    },
}

impl BroadcastKey {
    /// Whether `self` supersedes `other` (same row or service, newer).
    pub fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Self::Row {
                    owner,
                    key,
                    version,
                },
                Self::Row {
                    owner: o2,
                    key: k2,
                    version: v2,
                },
            ) => owner == o2 && key == k2 && version > v2,
            (
                Self::Snapshot { service, rank },
                Self::Snapshot {
                    service: s2,
                    rank: r2,
                },
            ) => service == s2 && rank > r2,
            _ => false,
        }
    }
}

/// Merges one item into the store: its key when it was news (it changed the store), which
/// is exactly when the node should pass it on.
pub(crate) fn merge(store: &mut Store, item: BroadcastItem) -> Option<BroadcastKey> {
    let now = store.now_ms;
    match item {
        BroadcastItem::Row(row) => {
            let row = *row;
            let key = BroadcastKey::Row {
                owner: row.owner,
                key: row.key.clone(),
                version: row.version(),
            };
            let applied = store.rows.merge(row, now) == Merge::Applied;
            store.rows_received += u64::from(applied);
            applied.then_some(key)
        }
        BroadcastItem::Snapshot(snap) => {
            let key = snapshot_key(&snap);
            (store.snapshots.merge(snap, now) == SnapshotMerge::Applied).then_some(key)
        }
    }
}

/// [`merge`] for a registry answer this node fetched itself ([`SnapshotStore::merge_direct`]).
///
/// [`SnapshotStore::merge_direct`]: crate::snapshot::SnapshotStore::merge_direct
pub(crate) fn merge_direct(store: &mut Store, item: BroadcastItem) -> Option<BroadcastKey> {
    match item {
        BroadcastItem::Snapshot(snap) => {
            let key = snapshot_key(&snap);
            let now = store.now_ms;
            (store.snapshots.merge_direct(snap, now) == SnapshotMerge::Applied).then_some(key)
        }
        row => merge(store, row),
    }
}

fn snapshot_key(snap: &Snapshot) -> BroadcastKey {
    let s = snap.summary();
    BroadcastKey::Snapshot {
        service: s.service,
        rank: (s.generated_at_ms, s.hash),
    }
}
