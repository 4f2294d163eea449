//! The agent's copy of the registry's catalog, the base the next delta applies to
//! (docs/API.md#catalog-deltas), held in the form the agent serves: per service the
//! registry snapshot entries gossip is fed, whose endpoints are the very ones (shared, not
//! copied) that gossip's snapshots and the served view hold. `discovery::delta::Replica`
//! keeps the wire form instead — every host as a `V1Host`, its tags a JSON map — which at
//! 100 000 endpoints was the agent's largest single structure, a fourth full copy of the
//! catalog beside the three views that share one now.
//!
//! Digests are the registry's (`discovery::delta::service_digest` over the wire form): a
//! touched service is turned back into `V1Host`s, the delta applied with discovery's own
//! functions, the digest computed, and the result kept compact again. A host whose wire form
//! the agent could not rebuild exactly from its endpoint (it does not validate, or its text
//! differs from the canonical one, e.g. an IPv6 address written uncompressed) is kept as sent,
//! so what the agent hashes is always what the registry hashed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use discovery::delta::{
    DeltaError, Hash, catalog_digest, host_order, remove_hosts, same_host, service_digest,
    upsert_hosts,
};
use gossip::SnapshotEntry;
use schema::ServiceName;
use schema::api::{Catalog, CatalogChanges, V1Host};

/// One service's hosts.
#[derive(Debug, Clone, Default)]
struct Held {
    /// Hosts that validate and rebuild exactly, sorted by key.
    entries: Vec<SnapshotEntry>,
    /// Hosts kept as the registry sent them (see the module doc).
    verbatim: Vec<V1Host>,
    digest: Hash,
}

impl Held {
    /// From the wire form, `hosts` in any order.
    fn new(service: &str, mut hosts: Vec<V1Host>) -> Self {
        hosts.sort_by(host_order);
        let digest = service_digest(service, &hosts);
        let mut held = Held {
            digest,
            ..Held::default()
        };
        for h in hosts {
            match h.to_endpoint() {
                Ok((endpoint, last_check_in_ms))
                    if endpoint.service.as_str() == service
                        && same_host(&V1Host::from_endpoint(&endpoint, last_check_in_ms), &h) =>
                {
                    held.entries.push(SnapshotEntry {
                        endpoint: Arc::new(endpoint),
                        last_check_in_ms,
                    });
                }
                _ => held.verbatim.push(h),
            }
        }
        held.entries.sort_by_key(|e| e.endpoint.key());
        held
    }

    /// Back to the wire form (check-in times as the entries hold them).
    fn wire(&self) -> Vec<V1Host> {
        self.entries
            .iter()
            .map(|e| V1Host::from_endpoint(&e.endpoint, e.last_check_in_ms))
            .chain(self.verbatim.iter().cloned())
            .collect()
    }

    /// The entries a snapshot of the service lists, and how many hosts do not validate.
    fn listed(&self, service: &ServiceName) -> (Vec<SnapshotEntry>, usize) {
        let mut entries = self.entries.clone();
        let mut invalid = 0;
        for h in &self.verbatim {
            match h.to_endpoint() {
                Ok((endpoint, last_check_in_ms)) if endpoint.service == *service => {
                    entries.push(SnapshotEntry {
                        endpoint: Arc::new(endpoint),
                        last_check_in_ms,
                    });
                }
                _ => invalid += 1,
            }
        }
        if !self.verbatim.is_empty() {
            entries.sort_by_key(|e| e.endpoint.key());
        }
        (entries, invalid)
    }
}

/// The registry's catalog at `index`, as the agent holds it.
#[derive(Debug, Clone)]
pub struct Replica {
    pub index: u64,
    pub generated_at_ms: u64,
    pub warming: bool,
    pub stale: bool,
    services: BTreeMap<String, Held>,
}

/// A whole catalog as a replica (the form tests and tools hold).
impl From<Catalog> for Replica {
    fn from(c: Catalog) -> Self {
        Replica::whole(CatalogChanges {
            index: c.index,
            generated_at_ms: c.generated_at_ms,
            warming: c.warming,
            stale: c.stale,
            full: true,
            from: None,
            digest: String::new(),
            services: c.services,
            removed: BTreeMap::new(),
            removed_services: Vec::new(),
        })
    }
}

impl Replica {
    /// From a whole catalog answer (its `services`; the rest of `changes` is ignored).
    pub fn whole(changes: CatalogChanges) -> Self {
        let services = changes
            .services
            .into_iter()
            .filter(|(_, hosts)| !hosts.is_empty())
            .map(|(service, hosts)| {
                let held = Held::new(&service, hosts);
                (service, held)
            })
            .collect();
        Replica {
            index: changes.index,
            generated_at_ms: changes.generated_at_ms,
            warming: changes.warming,
            stale: changes.stale,
            services,
        }
    }

    /// The digest of the catalog held, as the registry computes it.
    pub fn digest_hex(&self) -> String {
        hex::encode(catalog_digest(self.services.values().map(|h| &h.digest)))
    }

    /// Applies a delta answer: the result is the registry's catalog at `changes.index`.
    /// Refused (and the replica consumed) when the answer is not a delta from the index held
    /// or what it rebuilds does not match its digest, as `discovery::delta::Replica::apply`.
    pub fn apply(mut self, changes: CatalogChanges) -> Result<Replica, DeltaError> {
        if changes.full {
            return Err(DeltaError::NotADelta);
        }
        if changes.from != Some(self.index) {
            return Err(DeltaError::WrongBase {
                held: self.index,
                from: changes.from,
            });
        }
        for service in &changes.removed_services {
            self.services.remove(service);
        }
        let mut touched: BTreeMap<String, Vec<V1Host>> = BTreeMap::new();
        let wire = |services: &BTreeMap<String, Held>, name: &String| {
            services.get(name).map(Held::wire).unwrap_or_default()
        };
        for (service, gone) in changes.removed {
            let hosts = touched
                .entry(service.clone())
                .or_insert_with(|| wire(&self.services, &service));
            remove_hosts(hosts, &gone);
        }
        for (service, upserts) in changes.services {
            let hosts = touched
                .entry(service.clone())
                .or_insert_with(|| wire(&self.services, &service));
            upsert_hosts(hosts, upserts);
        }
        for (service, hosts) in touched {
            if hosts.is_empty() {
                self.services.remove(&service);
            } else {
                let held = Held::new(&service, hosts);
                self.services.insert(service, held);
            }
        }
        let got = self.digest_hex();
        if got != changes.digest {
            return Err(DeltaError::Digest {
                expected: changes.digest,
                got,
            });
        }
        self.index = changes.index;
        self.generated_at_ms = changes.generated_at_ms;
        self.warming = changes.warming;
        self.stale = changes.stale;
        Ok(self)
    }

    /// The services' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// Per service in `in_scope`: the entries a snapshot lists (sorted by key), and how many
    /// hosts did not validate. A name that is not a valid service name counts its hosts as
    /// invalid.
    pub fn listed(
        &self,
        in_scope: impl Fn(&str) -> bool,
    ) -> (BTreeMap<ServiceName, Vec<SnapshotEntry>>, usize) {
        let mut invalid = 0;
        let mut out = BTreeMap::new();
        for (name, held) in self.services.iter().filter(|(n, _)| in_scope(n)) {
            let Ok(service) = ServiceName::new(name.clone()) else {
                invalid += held.entries.len() + held.verbatim.len();
                continue;
            };
            let (entries, bad) = held.listed(&service);
            invalid += bad;
            out.insert(service, entries);
        }
        (out, invalid)
    }

    /// The services a delta touches (before it is applied).
    pub fn scope_of(changes: &CatalogChanges) -> BTreeSet<String> {
        changes
            .services
            .keys()
            .chain(changes.removed.keys())
            .chain(&changes.removed_services)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
