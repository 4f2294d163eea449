//! Rows and small snapshots ride foca custom broadcasts. foca owns the handler, so the
//! handler shares the node's [`Store`] and merges items as they arrive: an item is
//! "new" (and foca keeps spreading it, at most `max_transmissions` times) exactly when it
//! changed the store, and a newer version of the same row invalidates a queued older one.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use foca::{BroadcastHandler, Invalidates};
use schema::codec::{self, CodecError};
use schema::{EndpointKey, ServiceName};
use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::rows::{Merge, Row, RowStore, Version};
use crate::snapshot::{Snapshot, SnapshotStore};

/// Everything gossip replicates, shared by the node and foca's broadcast handler.
#[derive(Debug, Default)]
pub struct Store {
    pub rows: RowStore,
    pub snapshots: SnapshotStore,
    /// The node's clock at its last entry point, so merges can stamp receive times.
    pub now_ms: u64,
    pub rows_received: u64,
}

impl Store {
    /// Tombstone collection ([`RowStore::gc_tombstones_keeping`]), keeping the tombstones
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
            .gc_tombstones_keeping(now_ms, retention_ms, me, live_peers, &listed);
    }
}

pub(crate) type SharedStore = Arc<Mutex<Store>>;

/// Locks the store. The lock is only held by straight-line code that cannot panic half-way
/// through an update, so a poisoned lock still guards consistent data.
pub(crate) fn lock(store: &SharedStore) -> MutexGuard<'_, Store> {
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One custom broadcast.
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

impl Invalidates for BroadcastKey {
    fn invalidates(&self, other: &Self) -> bool {
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

#[derive(Debug, thiserror::Error)]
pub enum BroadcastError {
    #[error("undecodable broadcast: {0}")]
    Decode(#[from] CodecError),
}

pub struct RowBroadcasts {
    pub(crate) store: SharedStore,
}

impl BroadcastHandler<NodeId> for RowBroadcasts {
    type Key = BroadcastKey;
    type Error = BroadcastError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeId>,
    ) -> Result<Option<BroadcastKey>, BroadcastError> {
        let item: BroadcastItem = codec::decode_packet(data)?;
        let mut store = lock(&self.store);
        let now = store.now_ms;
        Ok(match item {
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
                let s = snap.summary();
                let key = BroadcastKey::Snapshot {
                    service: s.service,
                    rank: (s.generated_at_ms, s.hash),
                };
                store.snapshots.merge(snap).then_some(key)
            }
        })
    }
}
