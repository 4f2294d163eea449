//! The merged view the local API serves (docs/ARCHITECTURE.md#what-the-agent-answers), as a sans-IO [`Merger`]: gossip's
//! view (live owned rows ∪ registry snapshots, already merged by the `gossip` crate) plus
//! what the disk cache held at start, until live data covers it. Time is passed in.
//!
//! Cache rules: an entry loaded from disk is served until live data replaces it —
//! - any entry, as soon as a registry snapshot in gossip's view lists its key or a tombstone
//!   removes it; while only a live row has the key, the row is served and the entry kept
//!   (a row hides again if SWIM stops counting its owner alive, and the view must not
//!   shrink meanwhile);
//! - a registry-snapshot entry, when gossip holds a registry-dated snapshot of its service
//!   at least as new — never a lower bound, which may lack hosts that have not checked in
//!   again since the registry restarted (the first authoritative registry answer brings one for every such service, an empty
//!   one for a service the registry no longer lists: see [`crate::sync::plan`]);
//! - an owned-row entry, when its owner has been alive in SWIM for `settle` (repair has then
//!   brought the owner's current rows), when SWIM declares it down, or when it was our own;
//! - any entry an authoritative registry answer does not list, unless it is a row whose
//!   owner is alive ([`Merger::registry_answered`]).
//!
//! Provenance of a host (and the `X-Tidings-Source` rule): `registry` when the registry's
//! newest snapshot of the service lists it (even if an owned row overrides its fields);
//! `gossip` when only a live owned row has it (e.g. it joined while the registry was down);
//! `cache` when only the disk cache has it. An answer's source is its weakest host's
//! (`cache` < `gossip` < `registry`); an empty answer takes the view's fallback.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::Arc;

use gossip::{GossipView, Snapshot, Source, ViewEntry};
use schema::{Endpoint, EndpointKey, ServiceName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::answers::Answers;

/// Where a host of an answer is known from, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Provenance {
    Registry,
    Gossip,
    Cache,
}

impl Provenance {
    pub fn as_str(self) -> &'static str {
        match self {
            Provenance::Registry => "registry",
            Provenance::Gossip => "gossip",
            Provenance::Cache => "cache",
        }
    }
}

/// Where a cached entry originally came from; decides when live data supersedes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Origin {
    Row { owner: SocketAddr },
    Registry { generated_at_ms: u64 },
}

/// One host as the disk cache stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedHost {
    pub endpoint: Arc<Endpoint>,
    pub origin: Origin,
    pub last_check_in_ms: u64,
}

/// One host of the merged view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Shared with the registry snapshot or the gossip row it came from (one copy of each
    /// endpoint however many views hold it).
    pub endpoint: Arc<Endpoint>,
    pub provenance: Provenance,
    /// Registry clock when the registry lists it; else when this agent first saw it.
    pub last_check_in_ms: u64,
    pub origin: Origin,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServiceHosts {
    pub hosts: Vec<Host>,
    /// Content hash of the hosts' endpoints: moves only when they change.
    pub index: u64,
    /// The API's bodies for these hosts, encoded on first request.
    pub(crate) answers: Answers,
}

/// How long an explicitly deregistered host is still listed, tagged `draining`, to callers
/// that ask for it (`?draining=true`, as the proxy does). A proxy's blocking query sees the
/// removal within milliseconds; the window covers proxies that are reconnecting or backing
/// off. Without it a deregistered host that still passes health checks would stay routed,
/// because for a host that is merely absent from discovery, health checks win (docs/ARCHITECTURE.md#merge-table).
pub const DRAIN_LISTING_MS: u64 = 60_000;

/// A host that left the view because its owner deregistered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drain {
    pub endpoint: Arc<Endpoint>,
    /// When this agent saw the deregistration (unix ms).
    pub since_ms: u64,
}

/// A published state of the view. Immutable; the API reads it through a watch channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedView {
    /// Shared with the previous view for each service whose hosts did not change, so the
    /// bodies kept with them survive (see [`crate::answers`]).
    services: BTreeMap<ServiceName, Arc<ServiceHosts>>,
    index: u64,
    fallback: Provenance,
    draining: BTreeMap<ServiceName, Vec<Drain>>,
}

/// Feeds `Hash` output into SHA-256, so a derived `Hash` can digest a value without
/// encoding it. Only `write` is used; `finish` is never called by `Hash` impls.
pub(crate) struct Sha256Hasher(pub(crate) Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        0
    }
}

/// The first 53 bits of a digest: exact in a JSON number in any client, and never 0 (clients
/// use 0 for "no index yet").
fn index_of(h: Sha256Hasher) -> u64 {
    let digest = h.0.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11).max(1)
}

/// The index of one service's hosts: a SHA-256 over each endpoint's `Hash` form (every field
/// an answer shows; a host's check-in time is not an endpoint field), in key order. The
/// registry hashes a JSON encoding of each endpoint so that every replica computes the same
/// index; the agent's index is its own (the API says so), and encoding every endpoint as
/// JSON was half of a 100 000-endpoint start from the disk cache.
pub(crate) fn service_index<'a>(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> u64 {
    let mut h = Sha256Hasher(Sha256::new());
    let mut n = 0usize;
    for ep in endpoints {
        ep.hash(&mut h);
        n += 1;
    }
    n.hash(&mut h);
    index_of(h)
}

/// The index of a whole view from its services' indexes: a SHA-256 over each service's name
/// and index, in service order. Hashing every endpoint instead cost a tenth of a second per
/// merge at 100 000 endpoints; this costs one hash step per service. Equal content still
/// gives the same index.
fn view_index(services: &Services) -> u64 {
    let mut h = Sha256Hasher(Sha256::new());
    for (name, s) in services {
        let name = name.as_str().as_bytes();
        h.0.update((name.len() as u64).to_be_bytes());
        h.0.update(name);
        h.0.update(s.index.to_be_bytes());
    }
    index_of(h)
}

impl Default for MergedView {
    fn default() -> Self {
        MergedView {
            services: BTreeMap::new(),
            index: view_index(&Services::new()),
            fallback: Provenance::Gossip,
            draining: BTreeMap::new(),
        }
    }
}

impl MergedView {
    /// Whether the merge that made it still held disk-cache entries (served or waiting for
    /// live data to cover them).
    pub fn holds_cache(&self) -> bool {
        self.fallback == Provenance::Cache
    }

    pub fn hosts(&self, service: &ServiceName) -> &[Host] {
        self.services.get(service).map_or(&[], |s| &s.hosts)
    }

    /// The hosts of a service the view lists.
    pub fn service(&self, service: &ServiceName) -> Option<&ServiceHosts> {
        self.services.get(service).map(|s| &**s)
    }

    /// The index of one service (the empty-list index for an unknown one).
    pub fn service_index(&self, service: &ServiceName) -> u64 {
        self.services
            .get(service)
            .map_or_else(|| service_index(std::iter::empty()), |s| s.index)
    }

    /// The index of the whole view.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Hosts of `service` deregistered within the last [`DRAIN_LISTING_MS`].
    pub fn draining(&self, service: &ServiceName) -> &[Drain] {
        self.draining.get(service).map_or(&[], Vec::as_slice)
    }

    /// How many hosts are listed as draining, all services together.
    pub fn draining_len(&self) -> usize {
        self.draining.values().map(Vec::len).sum()
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceName, &ServiceHosts)> {
        self.services.iter().map(|(n, s)| (n, &**s))
    }

    pub fn all_hosts(&self) -> impl Iterator<Item = &Host> {
        self.services.values().flat_map(|s| s.hosts.iter())
    }

    pub fn len(&self) -> usize {
        self.services.values().map(|s| s.hosts.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The source of an answer made of `hosts`: the weakest provenance among them.
    pub fn source_of<'a>(&self, hosts: impl IntoIterator<Item = &'a Host>) -> Provenance {
        hosts
            .into_iter()
            .map(|h| h.provenance)
            .max()
            .unwrap_or(self.fallback)
    }
}

/// The newest registry snapshot of each service gossip holds.
type Snapshots<'a> = BTreeMap<&'a ServiceName, &'a Arc<Snapshot>>;

/// The check-in time of each host a snapshot lists, by `(ip, port)`, sorted for lookup.
fn listed_times(snap: &Snapshot) -> Vec<((IpAddr, NonZeroU16), u64)> {
    let mut times: Vec<_> = snap
        .entries
        .iter()
        .map(|e| ((e.endpoint.ip, e.endpoint.port), e.last_check_in_ms))
        .collect();
    times.sort_unstable_by_key(|(k, _)| *k);
    times
}

/// One host of a service before it is built: what decides each of its fields, borrowed.
/// A merge compares these with the previous view's hosts and builds (clones) only the
/// services that differ: at 100 000 endpoints, building every host on every merge was most
/// of a quarter-second merge on the agent's one worker.
enum Candidate<'a> {
    /// A host gossip lists: `listed` is the newest snapshot's time and the host's check-in
    /// time when the registry lists it too; `seen` when this agent first saw it as a row the
    /// registry does not list.
    Live {
        entry: &'a ViewEntry,
        listed: Option<(u64, u64)>,
        seen: u64,
    },
    Cached(&'a CachedHost),
}

impl Candidate<'_> {
    fn endpoint(&self) -> &Arc<Endpoint> {
        match self {
            Candidate::Live { entry, .. } => &entry.endpoint,
            Candidate::Cached(c) => &c.endpoint,
        }
    }

    /// Provenance, check-in time and origin of the host.
    fn parts(&self) -> (Provenance, u64, Origin) {
        match self {
            Candidate::Live {
                entry,
                listed,
                seen,
            } => match (&entry.source, listed) {
                (
                    Source::Registry {
                        generated_at_ms,
                        last_check_in_ms,
                    },
                    _,
                ) => (
                    Provenance::Registry,
                    *last_check_in_ms,
                    Origin::Registry {
                        generated_at_ms: *generated_at_ms,
                    },
                ),
                // The registry lists it too: confirmed; cache it as registry data, which is
                // kept until a newer snapshot (fail static), unlike a row of a dead owner.
                (Source::Gossip { .. }, Some((generated_at_ms, lci))) => (
                    Provenance::Registry,
                    *lci,
                    Origin::Registry {
                        generated_at_ms: *generated_at_ms,
                    },
                ),
                (Source::Gossip { owner }, None) => {
                    (Provenance::Gossip, *seen, Origin::Row { owner: *owner })
                }
            },
            Candidate::Cached(c) => (Provenance::Cache, c.last_check_in_ms, c.origin),
        }
    }

    fn is(&self, host: &Host) -> bool {
        let (provenance, last_check_in_ms, origin) = self.parts();
        host.provenance == provenance
            && host.last_check_in_ms == last_check_in_ms
            && host.origin == origin
            && host.endpoint == *self.endpoint()
    }

    fn build(&self) -> Host {
        let (provenance, last_check_in_ms, origin) = self.parts();
        Host {
            endpoint: self.endpoint().clone(),
            provenance,
            last_check_in_ms,
            origin,
        }
    }
}

type Services = BTreeMap<ServiceName, Arc<ServiceHosts>>;

/// A service's hosts from its candidates; the previous entry (and the bodies encoded for it)
/// when they are the same hosts.
fn service_hosts(
    mut candidates: Vec<Candidate<'_>>,
    previous: Option<&Arc<ServiceHosts>>,
) -> Arc<ServiceHosts> {
    let at = |c: &Candidate<'_>| (c.endpoint().ip, c.endpoint().port);
    if !candidates.is_sorted_by_key(at) {
        candidates.sort_by_key(at);
    }
    if let Some(p) = previous.filter(|p| {
        p.hosts.len() == candidates.len() && candidates.iter().zip(&p.hosts).all(|(c, h)| c.is(h))
    }) {
        return Arc::clone(p);
    }
    let hosts: Vec<Host> = candidates.iter().map(Candidate::build).collect();
    let index = service_index(hosts.iter().map(|h| &*h.endpoint));
    Arc::new(ServiceHosts {
        hosts,
        index,
        answers: Answers::default(),
    })
}

/// The endpoint of `key` in `services` (each service's hosts are sorted by key).
fn find<'a>(services: &'a Services, key: &EndpointKey) -> Option<&'a Arc<Endpoint>> {
    let hosts = &services.get(&key.service)?.hosts;
    // Within a service, key order is (ip, port) order.
    let i = hosts
        .binary_search_by(|h| (h.endpoint.ip, h.endpoint.port).cmp(&(key.ip, key.port)))
        .ok()?;
    Some(&hosts[i].endpoint)
}

/// The merge state: cache entries not yet superseded, and when each member came alive.
#[derive(Debug, Clone)]
pub struct Merger {
    me: SocketAddr,
    settle_ms: u64,
    cache: BTreeMap<EndpointKey, CachedHost>,
    alive_since: BTreeMap<SocketAddr, u64>,
    /// When this agent first saw each row the registry does not list, per service.
    first_seen: BTreeMap<ServiceName, BTreeMap<(IpAddr, NonZeroU16), u64>>,
    draining: BTreeMap<EndpointKey, Drain>,
    /// The services of the last merge, shared with the view it published: they also name
    /// what a deregistration removed (a tombstone carries no endpoint).
    services: Services,
    /// What each service of the last merge was built from, when gossip alone made it.
    inputs: BTreeMap<ServiceName, Inputs>,
}

/// Gossip's entries of a service and the service's snapshot, as one merge used them. Both
/// are shared and never changed in place, so the very same two (by pointer) give the very
/// same hosts, and the merge reuses them without looking at a single host.
#[derive(Debug, Clone)]
struct Inputs {
    entries: Arc<[ViewEntry]>,
    snapshot: Option<Arc<Snapshot>>,
}

impl Inputs {
    fn are(&self, entries: &Arc<[ViewEntry]>, snapshot: Option<&Arc<Snapshot>>) -> bool {
        Arc::ptr_eq(&self.entries, entries)
            && match (&self.snapshot, snapshot) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Merger {
    /// `me` is this agent's gossip address: cached rows it owned are dropped at once (the
    /// agent republishes what it serves now).
    pub fn new(me: SocketAddr, settle_ms: u64, cached: Vec<CachedHost>) -> Self {
        let cache = cached
            .into_iter()
            .filter(|c| c.origin != Origin::Row { owner: me })
            .map(|c| (c.endpoint.key(), c))
            .collect();
        Merger {
            me,
            settle_ms,
            cache,
            alive_since: BTreeMap::new(),
            first_seen: BTreeMap::new(),
            draining: BTreeMap::new(),
            services: Services::new(),
            inputs: BTreeMap::new(),
        }
    }

    /// How many cache entries are still served.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// An authoritative registry answer listed `listed`: it is the truth about the disk
    /// cache too. A cached entry it does not list goes at once — a registry entry (even one
    /// whose snapshot is dated ahead of the answer), and a row whose owner is not alive in
    /// SWIM (an owner that never comes back would otherwise keep it forever). A row of a live
    /// owner still waits for `settle`, and a listed entry stays until the answer's snapshot
    /// covers it. Returns how many entries went.
    pub fn registry_answered(&mut self, listed: &BTreeSet<EndpointKey>) -> usize {
        let before = self.cache.len();
        let alive = &self.alive_since;
        self.cache.retain(|key, c| {
            listed.contains(key)
                || matches!(c.origin, Origin::Row { owner } if alive.contains_key(&owner))
        });
        before - self.cache.len()
    }

    /// Whether the view will change with time alone, so it must be recomputed even without
    /// gossip events: a cached row whose owner is alive and not yet settled, or a drain that
    /// will end. Cached registry entries do not count: only a newer snapshot or a registry
    /// answer retires them, and both arrive as events. (At 100 000 cached registry entries,
    /// counting them had the agent re-merge its whole view every second for as long as the
    /// registry was down.)
    pub fn time_pending(&self) -> bool {
        !self.draining.is_empty()
            || self.cache.values().any(|c| {
                matches!(c.origin, Origin::Row { owner } if self.alive_since.contains_key(&owner))
            })
    }

    /// Merges gossip's view with what is left of the cache at `now_ms`.
    pub fn merge(&mut self, gossip: &GossipView, now_ms: u64) -> MergedView {
        let down = self.track_members(gossip, now_ms);
        let snaps: Snapshots<'_> = gossip.snapshots.iter().map(|s| (&s.service, s)).collect();
        if !self.cache.is_empty() {
            // Covered for good: a registry snapshot lists the key, or a tombstone removed it.
            // A key only a live row has stays cached, unserved while the row shows: a row
            // hides again when SWIM stops counting its owner alive, which a restarted agent
            // sees while membership settles, and if the snapshot has not arrived by then the
            // host would drop out of the view for a moment.
            let covered: BTreeSet<EndpointKey> = gossip
                .endpoints
                .iter()
                .filter(|e| matches!(e.source, Source::Registry { .. }))
                .map(|e| e.endpoint.key())
                .chain(gossip.deregistered.iter().cloned())
                .collect();
            self.drop_covered_cache(&snaps, &covered, &down, now_ms);
        }

        // Per service: gossip's hosts and the cache's, less cached hosts gossip shows.
        type Group<'a> = (Option<&'a Arc<[ViewEntry]>>, Vec<&'a CachedHost>);
        let mut groups: BTreeMap<&ServiceName, Group<'_>> = BTreeMap::new();
        for (name, entries) in gossip.endpoints.services() {
            groups.entry(name).or_default().0 = Some(entries);
        }
        for c in self.cache.values() {
            groups.entry(&c.endpoint.service).or_default().1.push(c);
        }
        let mut first_seen = BTreeMap::new();
        let mut inputs = BTreeMap::new();
        let mut services = Services::new();
        for (name, (live, mut cached)) in groups {
            if let Some(live) = live {
                let at = |e: &ViewEntry| (e.endpoint.ip, e.endpoint.port);
                cached.retain(|c| {
                    live.binary_search_by_key(&(c.endpoint.ip, c.endpoint.port), at)
                        .is_err()
                });
            }
            let snapshot = snaps.get(name).copied();
            // The very inputs of last time: the very hosts of last time.
            if let (Some(entries), true) = (live, cached.is_empty())
                && let Some(before) = self.inputs.remove(name)
                && before.are(entries, snapshot)
                && let Some(hosts) = self.services.get(name)
            {
                services.insert(name.clone(), Arc::clone(hosts));
                inputs.insert(name.clone(), before);
                if let Some(seen) = self.first_seen.remove(name) {
                    first_seen.insert(name.clone(), seen);
                }
                continue;
            }
            let live: &[ViewEntry] = live.map_or(&[], |e| &e[..]);
            let needs_listing = live
                .iter()
                .any(|e| matches!(e.source, Source::Gossip { .. }));
            let listing = needs_listing
                .then(|| snapshot.map(|s| (s.generated_at_ms, listed_times(s))))
                .flatten();
            // Only rows the registry does not list show when this agent first saw them.
            let seen_before = self.first_seen.get(name);
            let mut seen_now = BTreeMap::new();
            let mut candidates = Vec::with_capacity(live.len() + cached.len());
            for entry in live {
                let at = (entry.endpoint.ip, entry.endpoint.port);
                let listed = match (&entry.source, &listing) {
                    (Source::Gossip { .. }, Some((t, times))) => times
                        .binary_search_by_key(&at, |(k, _)| *k)
                        .ok()
                        .map(|i| (*t, times[i].1)),
                    _ => None,
                };
                let mut seen = 0;
                if listed.is_none() && matches!(entry.source, Source::Gossip { .. }) {
                    seen = seen_before
                        .and_then(|m| m.get(&at))
                        .copied()
                        .unwrap_or(now_ms);
                    seen_now.insert(at, seen);
                }
                candidates.push(Candidate::Live {
                    entry,
                    listed,
                    seen,
                });
            }
            if !seen_now.is_empty() {
                first_seen.insert(name.clone(), seen_now);
            }
            if let (Some(entries), true) = (gossip.endpoints.service(name), cached.is_empty()) {
                let used = Inputs {
                    entries: Arc::clone(entries),
                    snapshot: snapshot.cloned(),
                };
                inputs.insert(name.clone(), used);
            }
            candidates.extend(cached.into_iter().map(Candidate::Cached));
            services.insert(
                name.clone(),
                service_hosts(candidates, self.services.get(name)),
            );
        }
        self.first_seen = first_seen;
        self.inputs = inputs;

        let index = view_index(&services);
        let fallback = if !self.cache.is_empty() {
            Provenance::Cache
        } else if gossip.snapshots.is_empty() {
            Provenance::Gossip
        } else {
            Provenance::Registry
        };
        let draining = self.track_drains(&services, &gossip.deregistered, now_ms);
        self.services.clone_from(&services);
        MergedView {
            services,
            index,
            fallback,
            draining,
        }
    }

    /// Notes when each member came alive and forgets members gossip no longer knows;
    /// returns the members that are down.
    fn track_members(&mut self, gossip: &GossipView, now_ms: u64) -> BTreeSet<SocketAddr> {
        let mut down = BTreeSet::new();
        for m in &gossip.members {
            if m.active {
                self.alive_since.entry(m.id.addr).or_insert(now_ms);
            } else {
                self.alive_since.remove(&m.id.addr);
                down.insert(m.id.addr);
            }
        }
        let known: BTreeSet<SocketAddr> = gossip.members.iter().map(|m| m.id.addr).collect();
        self.alive_since.retain(|a, _| known.contains(a));
        down
    }

    /// Drops cache entries that live data now covers: a host a registry snapshot lists or a
    /// tombstone removed (`covered`), a registry entry older than the service's newest
    /// snapshot, a row whose owner is this agent, is down, or has been alive long enough to
    /// have republished it.
    fn drop_covered_cache(
        &mut self,
        snaps: &Snapshots<'_>,
        live: &BTreeSet<EndpointKey>,
        down: &BTreeSet<SocketAddr>,
        now_ms: u64,
    ) {
        let alive_since = &self.alive_since;
        let settle_ms = self.settle_ms;
        let settled = |owner: &SocketAddr| {
            alive_since
                .get(owner)
                .is_some_and(|since| now_ms.saturating_sub(*since) >= settle_ms)
        };
        let me = self.me;
        self.cache.retain(|key, c| {
            if live.contains(key) {
                return false;
            }
            match c.origin {
                // A lower bound (a warming answer's union, dated at the start of time) never
                // retires anything: it may lack hosts that have not checked in again since
                // the registry restarted, and the entry may be a lower bound's itself.
                Origin::Registry { generated_at_ms } => snaps
                    .get(&key.service)
                    .is_none_or(|s| s.is_lower_bound() || s.generated_at_ms < generated_at_ms),
                Origin::Row { owner } => owner != me && !down.contains(&owner) && !settled(&owner),
            }
        });
    }

    /// A host listed last time, gone now, with a tombstone: deregistered, so drained for
    /// [`DRAIN_LISTING_MS`] unless it comes back. Anything else that disappears (expired,
    /// owner crashed) is merely absent.
    fn track_drains(
        &mut self,
        services: &Services,
        deregistered: &[EndpointKey],
        now_ms: u64,
    ) -> BTreeMap<ServiceName, Vec<Drain>> {
        for key in deregistered {
            if find(services, key).is_some() {
                continue;
            }
            if let Some(endpoint) = find(&self.services, key) {
                self.draining.entry(key.clone()).or_insert_with(|| Drain {
                    endpoint: endpoint.clone(),
                    since_ms: now_ms,
                });
            }
        }
        self.draining.retain(|key, d| {
            find(services, key).is_none() && now_ms.saturating_sub(d.since_ms) < DRAIN_LISTING_MS
        });
        let mut out: BTreeMap<ServiceName, Vec<Drain>> = BTreeMap::new();
        for (key, d) in &self.draining {
            out.entry(key.service.clone()).or_default().push(d.clone());
        }
        out
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
