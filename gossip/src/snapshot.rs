//! Registry snapshots: what an agent learned from the registry, per service. They gossip
//! so a new agent learns cron-registered hosts while the registry is down. Per service the
//! snapshot with the newest timestamp wins (ties broken by content hash, so every node picks
//! the same one).
//!
//! Timestamps come from registry clocks, which this node does not control. Unbounded, one
//! replica whose clock runs ahead (or one forged snapshot dated in 2100) would win every
//! comparison until real time caught up, freezing the registry data of every agent. So a
//! snapshot dated more than `max_skew_ms` ahead of the receiver's clock is refused and
//! counted ([`Refusals`]). What a bounded but nonzero skew still allows — a snapshot from a
//! replica a little ahead, then an honest one dated older — is handled where an agent
//! publishes a fresh registry answer (`Node::apply_registry_snapshot`): it stamps it after
//! the one it holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use schema::{Endpoint, ServiceName};
use serde::{Deserialize, Serialize};

use crate::rows::stable_hash;
use crate::sign::Signature;

/// One registry endpoint and its last check-in (registry clock, ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub endpoint: Arc<Endpoint>,
    pub last_check_in_ms: u64,
}

/// The date an agent gives a warming registry answer for a service it holds nothing real
/// of: the start of time, so every snapshot dated by a registry outranks it wherever they
/// meet, and the lower bound only fills services nobody holds.
pub const LOWER_BOUND_MS: u64 = 1;

/// Snapshots dated before this are lower bounds ([`LOWER_BOUND_MS`], restamped one ms later
/// each time a holder republishes): no registry answers with a date in January 1970.
pub const LOWER_BOUNDS_BEFORE_MS: u64 = 1_000_000_000;

/// Whether a snapshot dated `generated_at_ms` is a lower bound (see [`LOWER_BOUND_MS`]):
/// the one place the rule is written, for snapshots, their summaries and bare dates.
pub fn is_lower_bound_date(generated_at_ms: u64) -> bool {
    generated_at_ms < LOWER_BOUNDS_BEFORE_MS
}

/// The registry's listing of one service at `generated_at_ms` (registry clock).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    pub service: ServiceName,
    pub generated_at_ms: u64,
    pub entries: Vec<SnapshotEntry>,
}

impl Snapshot {
    /// A warming answer's lower bound from an agent that held nothing real of the service
    /// (see [`LOWER_BOUND_MS`]).
    pub fn is_lower_bound(&self) -> bool {
        is_lower_bound_date(self.generated_at_ms)
    }

    /// A deterministic hash of what the snapshot *lists*: its service, its hosts (every
    /// endpoint field, in any order) and whether it is a lower bound — not its date nor its
    /// hosts' check-in times. Every agent fetches each change from the registry itself, and
    /// no two of their copies agree on those two (each request has its own date, hosts renew
    /// in between); compared whole, the copies made every repair digest differ after every
    /// change and repair pushed the newest copy to nodes that held the same hosts (217 KB/s
    /// per node at 100 000 endpoints and 10 changes/s in the simulator). Compared by this
    /// hash, copies listing the same hosts are equal for repair; the date still orders
    /// copies whose hosts differ, and breaks ties between equal dates.
    pub fn hosts_hash(&self) -> u64 {
        let mut hosts: Vec<Vec<u8>> = self
            .entries
            .iter()
            .map(|e| schema::codec::encode_file(&e.endpoint).unwrap_or_default())
            .collect();
        hosts.sort_unstable();
        let mut parts: Vec<&[u8]> = vec![
            b"hosts",
            self.service.as_str().as_bytes(),
            if self.is_lower_bound() {
                b"lower"
            } else {
                b"dated"
            },
        ];
        parts.extend(hosts.iter().map(Vec::as_slice));
        stable_hash(&parts)
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
            hash: self.hosts_hash(),
        }
    }
}

/// What a peer needs to know to tell whether our snapshot of a service is newer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub service: ServiceName,
    pub generated_at_ms: u64,
    /// [`Snapshot::hosts_hash`]. (Nodes before it sent a hash of the whole snapshot; the
    /// two never match, so a mixed fleet repairs as it did before, by date.)
    pub hash: u64,
}

impl SnapshotSummary {
    fn rank(&self) -> (u64, u64) {
        (self.generated_at_ms, self.hash)
    }
}

/// Two lower bounds of one service, added up: every host either lists, each key's entry the
/// one checked in last (ties broken by content, so any order of merges gives the same
/// snapshot), dated the later of the two. Replacing one lower bound by another by date, as
/// registry-dated snapshots replace each other, let an agent that started with nothing
/// (its union holding only what a just-restarted registry had heard again) hide hosts a
/// fuller lower bound listed from every peer it reached, until they checked in again.
pub fn union_of_lower_bounds(a: &Snapshot, b: &Snapshot) -> Snapshot {
    let mut by_key: BTreeMap<(std::net::IpAddr, std::num::NonZeroU16), &SnapshotEntry> =
        BTreeMap::new();
    for e in a.entries.iter().chain(&b.entries) {
        let at = (e.endpoint.ip, e.endpoint.port);
        let keep = by_key.get(&at).is_none_or(|held| {
            let order = |x: &SnapshotEntry| (x.last_check_in_ms, entry_hash(x));
            order(e) > order(held)
        });
        if keep {
            by_key.insert(at, e);
        }
    }
    Snapshot {
        service: a.service.clone(),
        generated_at_ms: a.generated_at_ms.max(b.generated_at_ms),
        entries: by_key.into_values().cloned().collect(),
    }
}

fn entry_hash(e: &SnapshotEntry) -> u64 {
    let bytes = schema::codec::encode_file(&e.endpoint).unwrap_or_default();
    stable_hash(&[b"entry", &bytes])
}

/// Whether a change dated `since_ms` (registry clock) is younger than `window_ms` at
/// `now_ms`. Both ways: a date far ahead of our clock (a replica running ahead, within the
/// skew bound) must not hide a change for longer either.
fn younger_than(since_ms: u64, now_ms: u64, window_ms: u64) -> bool {
    since_ms.abs_diff(now_ms) < window_ms
}

/// The outcome of merging one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMerge {
    Applied,
    /// Not newer than the one held.
    Stale,
    /// An entry of another service (refused).
    Inconsistent,
    /// Dated too far ahead of this node's clock (refused).
    Future,
}

/// Snapshots refused so far, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    pub future: u64,
    pub inconsistent: u64,
}

/// The hosts a service listed before its newest change, and when that change began
/// (registry clock): while the change is younger than [`crate::repair::REGISTRY_SPREAD_MS`]
/// the repair digest counts the service by these hosts, so a node that has fetched the
/// change and one that has not yet still agree (see [`SnapshotStore::digest_hash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Change {
    /// `None`: the service was not held before.
    replaced: Option<u64>,
    since_ms: u64,
}

#[derive(Debug, Clone)]
pub struct SnapshotStore {
    /// Shared with every published [`crate::GossipView`]: a view holds the snapshots, not
    /// copies of them.
    by_service: BTreeMap<ServiceName, (Arc<Snapshot>, SnapshotSummary)>,
    /// The registry's signature of the snapshot held, where it has one (signed gossip):
    /// kept to pass on with it, in broadcasts and in repair.
    sigs: BTreeMap<ServiceName, Signature>,
    /// At most one per service held; an entry no longer in flight counts for nothing.
    changes_in_flight: BTreeMap<ServiceName, Change>,
    changes: u64,
    max_skew_ms: u64,
    refused: Refusals,
}

impl Default for SnapshotStore {
    fn default() -> Self {
        Self::with_max_skew(crate::config::DEFAULT_MAX_SNAPSHOT_SKEW_MS)
    }
}

impl SnapshotStore {
    /// A store that refuses snapshots dated more than `max_skew_ms` ahead of its clock.
    pub fn with_max_skew(max_skew_ms: u64) -> Self {
        SnapshotStore {
            by_service: BTreeMap::new(),
            sigs: BTreeMap::new(),
            changes_in_flight: BTreeMap::new(),
            changes: 0,
            max_skew_ms,
            refused: Refusals::default(),
        }
    }

    /// Keeps `snap` if it is newer than what we hold for its service and not dated beyond
    /// the skew bound ahead of `now_ms` (this node's clock).
    pub fn merge(&mut self, snap: Snapshot, now_ms: u64) -> SnapshotMerge {
        self.merge_signed(snap, None, now_ms)
    }

    /// [`merge`](Self::merge) of a snapshot with the registry's signature `sig` (checked by
    /// the caller), kept with it. A union of lower bounds is no registry's listing: unsigned.
    pub fn merge_signed(
        &mut self,
        snap: Snapshot,
        sig: Option<Signature>,
        now_ms: u64,
    ) -> SnapshotMerge {
        let mut sig = sig;
        if !snap.is_consistent() {
            self.refused.inconsistent += 1;
            return SnapshotMerge::Inconsistent;
        }
        if snap.generated_at_ms > self.latest_acceptable(now_ms) {
            self.refused.future += 1;
            tracing::debug!(
                service = %snap.service,
                generated_at_ms = snap.generated_at_ms,
                now_ms,
                "registry snapshot dated too far in the future, refused"
            );
            return SnapshotMerge::Future;
        }
        let mut snap = snap;
        let mut summary = snap.summary();
        if let Some((held, cur)) = self.by_service.get(&snap.service) {
            if held.is_lower_bound() && snap.is_lower_bound() {
                // Two lower bounds are two agents' partial knowledge of a warming registry:
                // neither replaces the other, they add up (see [`union_of_lower_bounds`]).
                let union = union_of_lower_bounds(held, &snap);
                if union.hosts_hash() == cur.hash {
                    return SnapshotMerge::Stale;
                }
                snap = union;
                summary = snap.summary();
                sig = None;
            } else if cur.rank() >= summary.rank() {
                return SnapshotMerge::Stale;
            }
        }
        self.note_change(&summary, now_ms);
        match sig {
            Some(sig) => self.sigs.insert(snap.service.clone(), sig),
            None => self.sigs.remove(&snap.service),
        };
        self.by_service
            .insert(snap.service.clone(), (Arc::new(snap), summary));
        self.changes += 1;
        SnapshotMerge::Applied
    }

    /// Records what `new` replaces. A change made while an earlier one is still in flight
    /// keeps that one's replaced hosts and start: the digest hides a service's changes for
    /// at most one spread, however fast it changes, so a node cut off from the registry is
    /// never kept from repair for longer.
    fn note_change(&mut self, new: &SnapshotSummary, now_ms: u64) {
        let held = self.by_service.get(&new.service).map(|(_, s)| s);
        if held.is_some_and(|h| h.hash == new.hash) {
            // Same hosts, later copy: not a change (a refresh must not restart the clock).
            return;
        }
        let change = match self.changes_in_flight.get(&new.service) {
            Some(c) if younger_than(c.since_ms, now_ms, crate::repair::REGISTRY_SPREAD_MS) => *c,
            _ => Change {
                replaced: held.map(|h| h.hash),
                since_ms: new.generated_at_ms,
            },
        };
        self.changes_in_flight.insert(new.service.clone(), change);
    }

    /// The hosts hash the repair digest counts for `service` at `now_ms`: the hosts its
    /// change replaced if that change is younger than `window_ms` (`None`: it counts for
    /// nothing, as on a node that has not heard of the service), else those it lists.
    pub fn digest_hash(&self, service: &ServiceName, now_ms: u64, window_ms: u64) -> Option<u64> {
        let (_, held) = self.by_service.get(service)?;
        match self.changes_in_flight.get(service) {
            Some(c) if younger_than(c.since_ms, now_ms, window_ms) => c.replaced,
            _ => Some(held.hash),
        }
    }

    /// Holds `snap` as it is, shared, with no check: for the simulator, which hands a
    /// thousand nodes the same catalog.
    pub(crate) fn insert_shared(&mut self, snap: Arc<Snapshot>) {
        let summary = snap.summary();
        self.sigs.remove(&snap.service);
        self.by_service
            .insert(snap.service.clone(), (snap, summary));
        self.changes += 1;
    }

    /// Merges a snapshot this node just fetched from its own registry. It is judged against
    /// the later of this node's clock and the registry data held for the service: the
    /// registry defines its own dates, and a host whose clock runs behind (an agent
    /// restarted with its clock half an hour slow, in the fault campaign) would otherwise
    /// refuse every answer and serve nothing. Where the node holds nothing of the service
    /// the answer is taken whatever its date: there is nothing to protect, and the next direct answer is stamped after it
    /// (`Node::apply_registry_snapshot`), so a replica that ran ahead pins nothing past its
    /// next answer. (A lower bound held counts as held: an agent restarted without its cache
    /// during a warm-up with its clock far behind keeps its lower bound until its clock is
    /// right.) Snapshots from peers stay judged by this node's clock alone.
    pub fn merge_direct(
        &mut self,
        snap: Snapshot,
        sig: Option<Signature>,
        now_ms: u64,
    ) -> SnapshotMerge {
        let clock = match self.by_service.get(&snap.service) {
            Some((_, held)) => now_ms.max(held.generated_at_ms),
            None => u64::MAX,
        };
        self.merge_signed(snap, sig, clock)
    }

    /// The registry's signature of the snapshot held for `service`, if it has one.
    pub fn sig(&self, service: &ServiceName) -> Option<&Signature> {
        self.sigs.get(service)
    }

    /// The newest `generated_at_ms` accepted at `now_ms`.
    pub fn latest_acceptable(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.max_skew_ms)
    }

    pub fn refusals(&self) -> Refusals {
        self.refused
    }

    pub fn get(&self, service: &ServiceName) -> Option<&Snapshot> {
        self.by_service.get(service).map(|(s, _)| &**s)
    }

    /// Every snapshot held, shared.
    pub fn shared(&self) -> impl Iterator<Item = &Arc<Snapshot>> {
        self.by_service.values().map(|(s, _)| s)
    }

    pub fn summary(&self, service: &ServiceName) -> Option<&SnapshotSummary> {
        self.by_service.get(service).map(|(_, s)| s)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Snapshot, &SnapshotSummary)> {
        self.by_service.values().map(|(a, b)| (&**a, b))
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
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
                )
                .into(),
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
        const T: u64 = 1_800_000_000_000;
        let (a, b, c) = (snap(T + 1, &[1]), snap(T + 2, &[1, 2]), snap(T + 2, &[3]));
        let mut x = SnapshotStore::default();
        let mut y = SnapshotStore::default();
        for s in [&a, &b, &c] {
            x.merge(s.clone(), T);
        }
        for s in [&c, &a, &b] {
            y.merge(s.clone(), T);
        }
        let service = ServiceName::new("web").unwrap();
        assert_eq!(x.get(&service), y.get(&service));
        assert_eq!(x.merge(a, T), SnapshotMerge::Stale);
    }

    proptest::proptest! {
        /// Lower bounds add up, in any order, to one snapshot listing every host any of
        /// them listed (the fault this guards against: a lower bound from an agent that
        /// started with nothing replaced a fuller one and hid hosts fleet-wide).
        #[test]
        fn lower_bounds_add_up_in_any_order(
            parts in proptest::collection::vec(
                (1u64..50, proptest::collection::btree_map(1u16..20, 0u64..5, 0..6)),
                1..6,
            ),
        ) {
            let lower_bound = |(at, hosts): &(u64, BTreeMap<u16, u64>)| {
                let mut s = snap(*at, &hosts.keys().copied().collect::<Vec<_>>());
                for e in &mut s.entries {
                    e.last_check_in_ms = hosts[&e.endpoint.port.get()];
                }
                s
            };
            let snaps: Vec<Snapshot> = parts.iter().map(lower_bound).collect();
            let (mut x, mut y) = (SnapshotStore::default(), SnapshotStore::default());
            for s in &snaps {
                x.merge(s.clone(), 0);
            }
            for s in snaps.iter().rev() {
                y.merge(s.clone(), 0);
            }
            let service = ServiceName::new("web").unwrap();
            // Both hold the same hosts (a copy with the same hosts is not news, so which
            // date and check-in times each keeps depends on the order, as for dated ones).
            let got = x.get(&service).unwrap();
            proptest::prop_assert_eq!(got.hosts_hash(), y.get(&service).unwrap().hosts_hash());
            let ports: BTreeSet<u16> = got.entries.iter().map(|e| e.endpoint.port.get()).collect();
            let want: BTreeSet<u16> = parts.iter().flat_map(|(_, h)| h.keys().copied()).collect();
            proptest::prop_assert_eq!(ports, want);
            proptest::prop_assert!(got.is_lower_bound());
        }
    }

    #[test]
    fn a_lower_bound_fills_an_empty_service_and_gives_way_to_any_registry_date() {
        const NOW: u64 = 1_780_000_000_000;
        let service = ServiceName::new("web").unwrap();
        let lower = |bump: u64, ports: &[u16]| snap(LOWER_BOUND_MS + bump, ports);
        let registry = snap(NOW - 3_600_000, &[1, 2, 3]);
        assert!(lower(5, &[1]).is_lower_bound() && !registry.is_lower_bound());
        // Held nothing: the lower bound is taken, and a registry-dated snapshot (even an
        // hour old) replaces it.
        let mut store = SnapshotStore::default();
        assert_eq!(store.merge(lower(0, &[1]), NOW), SnapshotMerge::Applied);
        assert_eq!(store.merge(registry.clone(), NOW), SnapshotMerge::Applied);
        // Holding registry data: a lower bound, restamped however often, never replaces it.
        assert_eq!(store.merge(lower(1_000, &[4]), NOW), SnapshotMerge::Stale);
        assert_eq!(store.get(&service), Some(&registry));
    }

    #[test]
    fn snapshots_dated_beyond_the_skew_are_refused_and_counted() {
        const NOW: u64 = 1_780_000_000_000;
        let mut store = SnapshotStore::with_max_skew(30_000);
        let service = ServiceName::new("web").unwrap();
        assert_eq!(store.merge(snap(NOW, &[1]), NOW), SnapshotMerge::Applied);
        // A replica an hour ahead, and a forged snapshot from 2100: refused, counted.
        let year_2100 = 4_102_444_800_000;
        for at in [NOW + 3_600_000, year_2100, u64::MAX] {
            assert_eq!(store.merge(snap(at, &[2]), NOW), SnapshotMerge::Future);
        }
        assert_eq!(store.refusals().future, 3);
        assert_eq!(store.get(&service).unwrap().generated_at_ms, NOW);
        // Within the bound (a replica 20 s ahead) is accepted; the bound is inclusive.
        assert_eq!(
            store.merge(snap(NOW + 20_000, &[3]), NOW),
            SnapshotMerge::Applied
        );
        assert_eq!(
            store.merge(snap(NOW + 30_000, &[4]), NOW),
            SnapshotMerge::Applied
        );
        // Entries of another service: refused, counted apart.
        let mut bad = snap(NOW + 40_000, &[5]);
        bad.service = ServiceName::new("db").unwrap();
        assert_eq!(store.merge(bad, NOW), SnapshotMerge::Inconsistent);
        assert_eq!(
            store.refusals(),
            Refusals {
                future: 3,
                inconsistent: 1
            }
        );
    }
}
