//! Registry snapshots: what an agent learned from the registry, per service. They gossip
//! so a new agent learns cron-registered hosts while the registry is down. Per service the
//! snapshot with the newest registry timestamp wins (ties broken by content hash, so every
//! node picks the same one).

use std::collections::BTreeMap;

use schema::{Endpoint, ServiceName};
use serde::{Deserialize, Serialize};

use crate::rows::stable_hash;

/// One registry endpoint and its last check-in (registry clock, ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub endpoint: Endpoint,
    pub last_check_in_ms: u64,
}

/// The registry's listing of one service at `generated_at_ms` (registry clock).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    pub service: ServiceName,
    pub generated_at_ms: u64,
    pub entries: Vec<SnapshotEntry>,
}

impl Snapshot {
    /// A deterministic hash of the whole snapshot (tie-break and digest).
    pub fn content_hash(&self) -> u64 {
        let mut parts: Vec<Vec<u8>> = vec![self.service.as_str().as_bytes().to_vec()];
        parts.push(self.generated_at_ms.to_le_bytes().to_vec());
        for e in &self.entries {
            parts.push(schema::codec::encode_file(e).unwrap_or_default());
        }
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        stable_hash(&refs)
    }

    /// Every entry must belong to the snapshot's service.
    pub fn is_consistent(&self) -> bool {
        self.entries
            .iter()
            .all(|e| e.endpoint.service == self.service)
    }

    pub fn summary(&self) -> SnapshotSummary {
        SnapshotSummary {
            service: self.service.clone(),
            generated_at_ms: self.generated_at_ms,
            hash: self.content_hash(),
        }
    }
}

/// What a peer needs to know to tell whether our snapshot of a service is newer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub service: ServiceName,
    pub generated_at_ms: u64,
    pub hash: u64,
}

impl SnapshotSummary {
    fn rank(&self) -> (u64, u64) {
        (self.generated_at_ms, self.hash)
    }
}

#[derive(Debug, Clone, Default)]
pub struct SnapshotStore {
    by_service: BTreeMap<ServiceName, (Snapshot, SnapshotSummary)>,
    changes: u64,
}

impl SnapshotStore {
    /// Keeps `snap` if it is newer than what we hold for its service. Returns whether it was.
    pub fn merge(&mut self, snap: Snapshot) -> bool {
        if !snap.is_consistent() {
            return false;
        }
        let summary = snap.summary();
        if let Some((_, cur)) = self.by_service.get(&snap.service)
            && cur.rank() >= summary.rank()
        {
            return false;
        }
        self.by_service
            .insert(snap.service.clone(), (snap, summary));
        self.changes += 1;
        true
    }

    /// Whether a snapshot with this summary would be news to us.
    pub fn is_newer(&self, s: &SnapshotSummary) -> bool {
        self.by_service
            .get(&s.service)
            .is_none_or(|(_, cur)| s.rank() > cur.rank())
    }

    pub fn get(&self, service: &ServiceName) -> Option<&Snapshot> {
        self.by_service.get(service).map(|(s, _)| s)
    }

    pub fn summary(&self, service: &ServiceName) -> Option<&SnapshotSummary> {
        self.by_service.get(service).map(|(_, s)| s)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Snapshot, &SnapshotSummary)> {
        self.by_service.values().map(|(a, b)| (a, b))
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use super::*;

    fn snap(at: u64, ports: &[u16]) -> Snapshot {
        let service = ServiceName::new("web").unwrap();
        let entries = ports
            .iter()
            .map(|p| SnapshotEntry {
                endpoint: Endpoint::new(
                    service.clone(),
                    "10.0.0.1".parse().unwrap(),
                    NonZeroU16::new(*p).unwrap(),
                ),
                last_check_in_ms: at,
            })
            .collect();
        Snapshot {
            service,
            generated_at_ms: at,
            entries,
        }
    }

    #[test]
    fn newest_wins_in_any_order() {
        let (a, b, c) = (snap(1, &[1]), snap(2, &[1, 2]), snap(2, &[3]));
        let mut x = SnapshotStore::default();
        let mut y = SnapshotStore::default();
        for s in [&a, &b, &c] {
            x.merge(s.clone());
        }
        for s in [&c, &a, &b] {
            y.merge(s.clone());
        }
        let service = ServiceName::new("web").unwrap();
        assert_eq!(x.get(&service), y.get(&service));
        assert!(!x.merge(a));
    }
}
