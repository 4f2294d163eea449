//! Owner-written endpoint rows: the CRDT at the heart of gossip (docs/ARCHITECTURE.md#endpoint-rows).
//!
//! A row is keyed `(owner, service, ip, port)`; its value is a `crdts::LWWReg` whose marker
//! is the owner's `Version { epoch, seq }`. Only the owner writes its rows, `seq` grows by one
//! on every change and `epoch` grows on every restart, so markers are never reused and merge
//! (per-key maximum) is commutative, associative and idempotent: any subset of rows, in any
//! order, is a valid delta.
//!
//! Rows of an epoch older than the newest one seen for their owner belong to a previous
//! process of that owner and are dropped: the new process republishes what it still serves.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crdts::{CvRDT, LWWReg};
use schema::{Endpoint, EndpointKey};
use serde::{Deserialize, Serialize};

use crate::sign::Signature;

/// A row version: `(owner epoch, seq)`, compared lexicographically.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Version {
    pub epoch: u64,
    pub seq: u64,
}

/// The value of a row. `Deregistered` is the tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RowStatus {
    Up(Arc<Endpoint>),
    Deregistered,
}

/// One endpoint row as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub owner: SocketAddr,
    pub key: EndpointKey,
    pub reg: LWWReg<RowStatus, Version>,
}

impl Row {
    pub fn new(owner: SocketAddr, key: EndpointKey, status: RowStatus, version: Version) -> Self {
        Row {
            owner,
            key,
            reg: LWWReg {
                val: status,
                marker: version,
            },
        }
    }

    pub fn version(&self) -> Version {
        self.reg.marker
    }

    /// An `Up` row must describe the endpoint it is keyed by.
    fn is_consistent(&self) -> bool {
        match &self.reg.val {
            RowStatus::Up(ep) => ep.key() == self.key,
            RowStatus::Deregistered => true,
        }
    }
}

/// What an owner's rows look like to a peer: equal summaries mean equal visible rows.
/// Tombstones are left out of `hash` so dropping them never makes two nodes disagree;
/// `max` still moves when one is written, so a node that missed it sees the difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerSummary {
    pub owner: SocketAddr,
    pub hash: u64,
    pub max: Version,
}

/// The result of merging one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    Applied,
    Stale,
    Invalid,
}

#[derive(Debug, Clone)]
struct Entry {
    reg: LWWReg<RowStatus, Version>,
    /// Local receive time (ms), for tombstone retention only.
    at_ms: u64,
    /// The owner's signature of this version, passed on with it (`None`: unsigned).
    sig: Option<Signature>,
}

#[derive(Debug, Clone, Default)]
struct OwnerRows {
    rows: BTreeMap<EndpointKey, Entry>,
    epoch: u64,
    max: Version,
    hash: u64,
    /// Highest tombstone version dropped by GC; older copies are refused (no resurrection).
    gc_floor: Version,
    /// Peers seen holding our exact summary since it last changed.
    synced: BTreeSet<SocketAddr>,
}

impl OwnerRows {
    fn advance_epoch(&mut self, epoch: u64) {
        *self = OwnerRows {
            epoch,
            max: Version { epoch, seq: 0 },
            ..Default::default()
        };
    }

    fn toggle_hash(&mut self, key: &EndpointKey, entry: &Entry) {
        if matches!(entry.reg.val, RowStatus::Up(_)) {
            self.hash ^= row_hash(key, entry.reg.marker);
        }
    }
}

/// FNV-1a with a final avalanche: stable across builds and platforms, unlike std's hashers,
/// because digests are compared between nodes.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

pub(crate) fn addr_bytes(addr: &SocketAddr) -> Vec<u8> {
    let mut out = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

fn row_hash(key: &EndpointKey, v: Version) -> u64 {
    let ip = addr_bytes(&key.socket_addr());
    stable_hash(&[
        key.service.as_str().as_bytes(),
        &ip,
        &v.epoch.to_le_bytes(),
        &v.seq.to_le_bytes(),
    ])
}

/// The rows of every owner this node knows.
#[derive(Debug, Clone, Default)]
pub struct RowStore {
    owners: BTreeMap<SocketAddr, OwnerRows>,
    changes: u64,
}

impl RowStore {
    /// Merges one row (per-key maximum). `now_ms` is only used for tombstone retention.
    pub fn merge(&mut self, row: Row, now_ms: u64) -> Merge {
        self.merge_signed(row, None, now_ms)
    }

    /// Whether [`merge`](Self::merge) would apply `row`: checked before its signature, so
    /// old news costs no verification.
    pub fn would_apply(&self, row: &Row) -> bool {
        if !row.is_consistent() {
            return false;
        }
        let v = row.version();
        let Some(o) = self.owners.get(&row.owner) else {
            return true;
        };
        if v.epoch < o.epoch {
            return false;
        }
        if v.epoch > o.epoch {
            return true;
        }
        match o.rows.get(&row.key) {
            Some(e) => e.reg.marker < v,
            None => v > o.gc_floor,
        }
    }

    /// The signature held for exactly this version of a row, if any.
    pub fn sig(
        &self,
        owner: &SocketAddr,
        key: &EndpointKey,
        version: Version,
    ) -> Option<Signature> {
        let e = self.owners.get(owner)?.rows.get(key)?;
        (e.reg.marker == version).then_some(e.sig).flatten()
    }

    /// Whether this exact version is held without a signature (one arriving now, checked,
    /// can then be kept for passing on: see [`attach_sig`](Self::attach_sig)).
    pub fn lacks_sig(&self, row: &Row) -> bool {
        self.owners
            .get(&row.owner)
            .and_then(|o| o.rows.get(&row.key))
            .is_some_and(|e| {
                e.reg.marker == row.version() && e.sig.is_none() && e.reg.val == row.reg.val
            })
    }

    /// Keeps a checked signature for a version held unsigned (learned from an old agent).
    pub fn attach_sig(&mut self, row: &Row, sig: Signature) {
        if let Some(e) = self
            .owners
            .get_mut(&row.owner)
            .and_then(|o| o.rows.get_mut(&row.key))
            && e.reg.marker == row.version()
        {
            e.sig = Some(sig);
        }
    }

    /// [`merge`](Self::merge), keeping the row's (already checked) signature.
    pub fn merge_signed(&mut self, row: Row, sig: Option<Signature>, now_ms: u64) -> Merge {
        if !row.is_consistent() {
            return Merge::Invalid;
        }
        let v = row.version();
        let o = self.owners.entry(row.owner).or_default();
        if v.epoch < o.epoch {
            return Merge::Stale;
        }
        if v.epoch > o.epoch {
            o.advance_epoch(v.epoch);
        }
        match o.rows.get(&row.key) {
            Some(e) if e.reg.marker >= v => return Merge::Stale,
            None if v <= o.gc_floor => return Merge::Stale,
            _ => {}
        }
        let mut entry = Entry {
            reg: row.reg,
            at_ms: now_ms,
            sig,
        };
        if let Some(old) = o.rows.remove(&row.key) {
            o.toggle_hash(&row.key, &old);
            let mut reg = old.reg;
            reg.merge(entry.reg);
            entry.reg = reg;
        }
        o.toggle_hash(&row.key, &entry);
        o.max = o.max.max(v);
        o.synced.clear();
        o.rows.insert(row.key, entry);
        self.changes += 1;
        Merge::Applied
    }

    /// Records that `owner`'s current process has `epoch` (learned from SWIM): rows of
    /// older epochs can never be visible again and are dropped.
    pub fn observe_epoch(&mut self, owner: SocketAddr, epoch: u64) {
        let o = self.owners.entry(owner).or_default();
        if epoch > o.epoch {
            o.advance_epoch(epoch);
            self.changes += 1;
        }
    }

    /// Forgets an owner entirely (foca forgot it).
    pub fn drop_owner(&mut self, owner: &SocketAddr) {
        if self.owners.remove(owner).is_some() {
            self.changes += 1;
        }
    }

    /// A counter that moves whenever the stored rows change.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    pub fn owners(&self) -> impl Iterator<Item = &SocketAddr> {
        self.owners.keys()
    }

    pub fn get(&self, owner: &SocketAddr, key: &EndpointKey) -> Option<Row> {
        let e = self.owners.get(owner)?.rows.get(key)?;
        Some(Row {
            owner: *owner,
            key: key.clone(),
            reg: e.reg.clone(),
        })
    }

    /// Every row of `owner`, tombstones included.
    pub fn owner_rows(&self, owner: &SocketAddr) -> Vec<Row> {
        self.owners
            .get(owner)
            .map(|o| {
                o.rows
                    .iter()
                    .map(|(k, e)| Row {
                        owner: *owner,
                        key: k.clone(),
                        reg: e.reg.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every row of `owner` with its signature, tombstones included (repair).
    pub fn owner_rows_signed(&self, owner: &SocketAddr) -> Vec<(Row, Option<Signature>)> {
        self.owners
            .get(owner)
            .map(|o| {
                o.rows
                    .iter()
                    .map(|(k, e)| {
                        let row = Row {
                            owner: *owner,
                            key: k.clone(),
                            reg: e.reg.clone(),
                        };
                        (row, e.sig)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every row, for tests and full dumps.
    pub fn all_rows(&self) -> Vec<Row> {
        self.owners
            .keys()
            .flat_map(|o| self.owner_rows(o))
            .collect()
    }

    pub fn summary(&self, owner: &SocketAddr) -> Option<OwnerSummary> {
        self.owners.get(owner).map(|o| OwnerSummary {
            owner: *owner,
            hash: o.hash,
            max: o.max,
        })
    }

    /// How many rows (tombstones included) are held of `owner`.
    pub fn row_count(&self, owner: &SocketAddr) -> usize {
        self.owners.get(owner).map_or(0, |o| o.rows.len())
    }

    /// Highest version seen for `owner` (kept even after its tombstones are dropped).
    pub fn max_version(&self, owner: &SocketAddr) -> Option<Version> {
        self.owners.get(owner).map(|o| o.max)
    }

    /// Notes that `peer` holds exactly our summary of `owner` (tombstone GC evidence).
    pub fn mark_synced(&mut self, owner: &SocketAddr, peer: SocketAddr) {
        if let Some(o) = self.owners.get_mut(owner) {
            o.synced.insert(peer);
        }
    }

    /// Whether `peer` was seen holding exactly our summary of `owner` since it last changed.
    pub fn is_synced(&self, owner: &SocketAddr, peer: &SocketAddr) -> bool {
        self.owners
            .get(owner)
            .is_some_and(|o| o.synced.contains(peer))
    }

    /// Forgets that `peer` held our summary of `owner`: evidence from before a gap in
    /// contact says nothing about what was written during it.
    pub fn forget_synced(&mut self, owner: &SocketAddr, peer: &SocketAddr) {
        if let Some(o) = self.owners.get_mut(owner) {
            o.synced.remove(peer);
        }
    }

    /// Whether any row of `owner` is held (tombstones included).
    pub fn has_owner(&self, owner: &SocketAddr) -> bool {
        self.owners.get(owner).is_some_and(|o| !o.rows.is_empty())
    }

    /// After a full answer from the owner itself: its row set is authoritative up to its
    /// `max`, so rows we hold below that which it no longer has were deleted (their
    /// tombstones may already be gone) and are dropped here.
    pub fn prune_to_authoritative(
        &mut self,
        owner: &SocketAddr,
        present: &BTreeSet<EndpointKey>,
        max: Version,
    ) {
        let Some(o) = self.owners.get_mut(owner) else {
            return;
        };
        let stale: Vec<EndpointKey> = o
            .rows
            .iter()
            .filter(|(k, e)| e.reg.marker <= max && !present.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(e) = o.rows.remove(&k) {
                o.toggle_hash(&k, &e);
                o.gc_floor = o.gc_floor.max(e.reg.marker);
                self.changes += 1;
            }
        }
    }

    /// Drops tombstones older than `retention_ms`, and those of owners whose summary every
    /// peer in `live_peers` was seen holding (they all have the tombstones). A node keeps its
    /// own tombstones (`me`) for the full retention: it is the authority peers repair from.
    /// Tombstones of keys in `shadowing` (listed by a registry snapshot this node holds) also
    /// stay until their retention ends: they are what hides that fail-static entry. Dropped
    /// early, the endpoint would come back from the snapshot — and "every live peer has it"
    /// says nothing of peers behind a partition.
    pub fn gc_tombstones(
        &mut self,
        now_ms: u64,
        retention_ms: u64,
        me: SocketAddr,
        live_peers: &BTreeSet<SocketAddr>,
        shadowing: &BTreeSet<EndpointKey>,
    ) {
        for (owner, o) in self.owners.iter_mut() {
            let all_have =
                *owner != me && !live_peers.is_empty() && live_peers.is_subset(&o.synced);
            let dead: Vec<EndpointKey> = o
                .rows
                .iter()
                .filter(|(k, e)| {
                    matches!(e.reg.val, RowStatus::Deregistered)
                        && ((all_have && !shadowing.contains(*k))
                            || now_ms.saturating_sub(e.at_ms) >= retention_ms)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in dead {
                if let Some(e) = o.rows.remove(&k) {
                    o.gc_floor = o.gc_floor.max(e.reg.marker);
                    self.changes += 1;
                }
            }
        }
    }

    /// Number of rows held (tombstones included).
    pub fn len(&self) -> usize {
        self.owners.values().map(|o| o.rows.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn iter_owner_entries(
        &self,
    ) -> impl Iterator<Item = (&SocketAddr, &EndpointKey, &LWWReg<RowStatus, Version>)> {
        self.owners
            .iter()
            .flat_map(|(o, rows)| rows.rows.iter().map(move |(k, e)| (o, k, &e.reg)))
    }
}

#[cfg(test)]
#[path = "rows_tests.rs"]
mod tests;
