//! Gossip's view kept per service, so that publishing it after a change rebuilds only the
//! services the change touched.
//!
//! The view (live owned rows ∪ registry snapshot entries, see [`crate::view`]) used to be
//! one flat list rebuilt from every row and every snapshot entry on each change: at 100 000
//! registry endpoints, a hundred thousand cloned endpoints and a B-tree of their keys per
//! change, on the agent's one worker, at every registry change of a fleet. Now each service
//! keeps the entries it was last built with, and what they were built from: the snapshot
//! (compared by identity: snapshots are shared, never changed in place) and a fingerprint of
//! the service's rows that count (their owners, keys and versions: a row's version moves on
//! every change of its value). A service whose snapshot and fingerprint are unchanged keeps
//! its shared entries; a reader can tell an unchanged service by pointer.

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::Arc;

use schema::{Endpoint, EndpointKey, ServiceName};

use crate::broadcast::Store;
use crate::rows::{RowStatus, Version};
use crate::snapshot::Snapshot;
use crate::view::{Source, ViewEntry};

/// The view's entries, per service, each service's sorted by `(ip, port)`. Services with no
/// entry are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewEntries {
    services: BTreeMap<ServiceName, Arc<[ViewEntry]>>,
}

impl ViewEntries {
    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &ViewEntry> {
        self.services.values().flat_map(|s| s.iter())
    }

    /// Each service and its shared entries.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceName, &Arc<[ViewEntry]>)> {
        self.services.iter()
    }

    /// The shared entries of one service.
    pub fn service(&self, name: &ServiceName) -> Option<&Arc<[ViewEntry]>> {
        self.services.get(name)
    }

    /// Takes `previous`'s shared entries for every service whose entries are equal to them,
    /// as a publisher that kept them would have (for views built by hand: tools, tests).
    pub fn share_with(&mut self, previous: &ViewEntries) {
        for (name, entries) in &mut self.services {
            if let Some(p) = previous.services.get(name).filter(|p| p[..] == entries[..]) {
                *entries = Arc::clone(p);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.services.values().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// From loose entries (tests, tools): grouped and sorted; of two entries with one key the
/// last is kept.
impl FromIterator<ViewEntry> for ViewEntries {
    fn from_iter<I: IntoIterator<Item = ViewEntry>>(entries: I) -> Self {
        let mut grouped: BTreeMap<ServiceName, BTreeMap<(IpAddr, NonZeroU16), ViewEntry>> =
            BTreeMap::new();
        for e in entries {
            grouped
                .entry(e.endpoint.service.clone())
                .or_default()
                .insert((e.endpoint.ip, e.endpoint.port), e);
        }
        ViewEntries {
            services: grouped
                .into_iter()
                .map(|(name, entries)| (name, entries.into_values().collect()))
                .collect(),
        }
    }
}

impl From<Vec<ViewEntry>> for ViewEntries {
    fn from(entries: Vec<ViewEntry>) -> Self {
        entries.into_iter().collect()
    }
}

/// What one service's entries were last built from.
#[derive(Debug)]
struct Built {
    snapshot: Option<Arc<Snapshot>>,
    rows: u64,
    entries: Arc<[ViewEntry]>,
}

/// The entries of each service as last built; kept by whoever publishes the view.
#[derive(Debug, Default)]
pub struct ViewCache {
    built: BTreeMap<ServiceName, Built>,
}

/// A row that shapes the view: an `Up` row of a live owner, or a tombstone of a live owner
/// whose current rows we hold (see `crate::returning`).
struct RowRef<'a> {
    owner: &'a SocketAddr,
    key: &'a EndpointKey,
    up: Option<&'a Arc<Endpoint>>,
    version: Version,
}

/// Fingerprint of a service's rows that count: changes whenever one is added, removed, or
/// changes value (its version moves).
fn fingerprint(rows: &[RowRef<'_>]) -> u64 {
    let mut h = DefaultHasher::new();
    for r in rows {
        r.owner.hash(&mut h);
        (r.key.ip, r.key.port).hash(&mut h);
        (r.version.epoch, r.version.seq, r.up.is_some()).hash(&mut h);
    }
    h.finish()
}

/// One service's entries: the snapshot's, less keys a counted tombstone removes and no
/// `Up` row lists, with each `Up` row overriding the snapshot's entry for its key (the first
/// owner in owner order, if several list one key).
fn build(snapshot: Option<&Snapshot>, rows: &[RowRef<'_>]) -> Arc<[ViewEntry]> {
    let mut out: BTreeMap<(IpAddr, NonZeroU16), ViewEntry> = BTreeMap::new();
    for e in snapshot.map_or(&[][..], |s| &s.entries[..]) {
        let source = Source::Registry {
            generated_at_ms: snapshot.map_or(0, |s| s.generated_at_ms),
            last_check_in_ms: e.last_check_in_ms,
        };
        out.insert(
            (e.endpoint.ip, e.endpoint.port),
            ViewEntry {
                endpoint: e.endpoint.clone(),
                source,
            },
        );
    }
    let mut up: BTreeMap<(IpAddr, NonZeroU16), ViewEntry> = BTreeMap::new();
    let mut gone = Vec::new();
    for r in rows {
        let at = (r.key.ip, r.key.port);
        match r.up {
            Some(ep) => {
                up.entry(at).or_insert_with(|| ViewEntry {
                    endpoint: Arc::clone(ep),
                    source: Source::Gossip { owner: *r.owner },
                });
            }
            None => gone.push(at),
        }
    }
    for at in gone.iter().filter(|at| !up.contains_key(*at)) {
        out.remove(at);
    }
    out.extend(up);
    out.into_values().collect()
}

/// Live owned rows ∪ registry entries; an owned row overrides the registry entry for the
/// same key while its owner is alive, and a live owner's tombstone removes the endpoint —
/// once `settled` says we hold the owner's current rows (see `crate::returning`). Services
/// whose snapshot and rows are those `cache` built them from keep their entries.
pub(crate) fn view_entries(
    store: &Store,
    cache: &mut ViewCache,
    alive: impl Fn(&SocketAddr) -> bool,
    settled: impl Fn(&SocketAddr) -> bool,
) -> ViewEntries {
    let mut rows: BTreeMap<&ServiceName, Vec<RowRef<'_>>> = BTreeMap::new();
    for (owner, key, reg) in store.rows.iter_owner_entries() {
        if !alive(owner) {
            continue;
        }
        let up = match &reg.val {
            RowStatus::Up(ep) => Some(ep),
            RowStatus::Deregistered if settled(owner) => None,
            RowStatus::Deregistered => continue,
        };
        rows.entry(&key.service).or_default().push(RowRef {
            owner,
            key,
            up,
            version: reg.marker,
        });
    }
    let snapshots: BTreeMap<&ServiceName, &Arc<Snapshot>> =
        store.snapshots.shared().map(|s| (&s.service, s)).collect();
    let mut names: Vec<&ServiceName> = snapshots.keys().chain(rows.keys()).copied().collect();
    names.sort_unstable();
    names.dedup();

    let mut built = BTreeMap::new();
    let mut services = BTreeMap::new();
    for name in names {
        let snapshot = snapshots.get(name).copied();
        let service_rows = rows.get(name).map_or(&[][..], Vec::as_slice);
        let print = fingerprint(service_rows);
        let entries = match cache.built.remove(name) {
            Some(b)
                if b.rows == print
                    && match (&b.snapshot, snapshot) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    } =>
            {
                b.entries
            }
            _ => build(snapshot.map(|s| &**s), service_rows),
        };
        if !entries.is_empty() {
            services.insert(name.clone(), Arc::clone(&entries));
        }
        built.insert(
            name.clone(),
            Built {
                snapshot: snapshot.cloned(),
                rows: print,
                entries,
            },
        );
    }
    cache.built = built;
    ViewEntries { services }
}

#[cfg(test)]
#[path = "view_entries_tests.rs"]
mod tests;
