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
use schema::api::{Catalog, CatalogChanges, HostKey, V1Host};
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

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

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.verbatim.is_empty()
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

/// A `GET /v2/catalog?delta=true` answer (`schema::api::CatalogChanges`, same fields and
/// defaults) with each service's hosts parsed straight into the form the agent keeps, one
/// service at a time: a whole catalog of 100 000 endpoints parsed first into `V1Host`s (each
/// with its JSON tag map) was most of the agent's peak memory, beside the body itself.
#[derive(Debug, Deserialize)]
pub struct Answer {
    pub index: u64,
    pub generated_at_ms: u64,
    pub warming: bool,
    pub stale: bool,
    #[serde(default = "yes")]
    pub full: bool,
    #[serde(default)]
    pub from: Option<u64>,
    #[serde(default)]
    pub digest: String,
    #[serde(deserialize_with = "held_per_service")]
    services: BTreeMap<String, Held>,
    #[serde(default)]
    pub removed: BTreeMap<String, Vec<HostKey>>,
    #[serde(default)]
    pub removed_services: Vec<String>,
    #[serde(default)]
    pub signatures: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// `services`, each service's hosts kept as [`Held`] as soon as they are read.
fn held_per_service<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Held>, D::Error> {
    struct PerService;
    impl<'de> Visitor<'de> for PerService {
        type Value = BTreeMap<String, Held>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of service names to host lists")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((name, hosts)) = map.next_entry::<String, Vec<V1Host>>()? {
                let held = Held::new(&name, hosts);
                out.insert(name, held);
            }
            Ok(out)
        }
    }
    d.deserialize_map(PerService)
}

impl Answer {
    /// The services the answer names (touched, for a delta).
    pub fn scope(&self) -> BTreeSet<String> {
        self.services
            .keys()
            .chain(self.removed.keys())
            .chain(&self.removed_services)
            .cloned()
            .collect()
    }
}

impl From<CatalogChanges> for Answer {
    fn from(c: CatalogChanges) -> Self {
        Answer {
            index: c.index,
            generated_at_ms: c.generated_at_ms,
            warming: c.warming,
            stale: c.stale,
            full: c.full,
            from: c.from,
            digest: c.digest,
            services: c
                .services
                .into_iter()
                .map(|(name, hosts)| {
                    let held = Held::new(&name, hosts);
                    (name, held)
                })
                .collect(),
            removed: c.removed,
            removed_services: c.removed_services,
            signatures: c.signatures,
        }
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
    /// The last answer's signatures of the listings it sent, as of `generated_at_ms` (see
    /// `crate::signing::registry_signatures`).
    pub signatures: BTreeMap<String, String>,
}

/// A whole catalog as a replica (the form tests and tools hold).
impl From<Catalog> for Replica {
    fn from(c: Catalog) -> Self {
        Replica::whole(Answer::from(CatalogChanges {
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
            signatures: c.signatures,
        }))
    }
}

impl Replica {
    /// From a whole catalog answer (its `services`; the rest of `changes` is ignored).
    pub fn whole(changes: Answer) -> Self {
        let services = changes
            .services
            .into_iter()
            .filter(|(_, held)| !held.is_empty())
            .collect();
        Replica {
            index: changes.index,
            generated_at_ms: changes.generated_at_ms,
            warming: changes.warming,
            stale: changes.stale,
            services,
            signatures: changes.signatures,
        }
    }

    /// The digest of the catalog held, as the registry computes it.
    pub fn digest_hex(&self) -> String {
        hex::encode(catalog_digest(self.services.values().map(|h| &h.digest)))
    }

    /// Applies a delta answer: the result is the registry's catalog at `changes.index`.
    /// Refused (and the replica consumed) when the answer is not a delta from the index held
    /// or what it rebuilds does not match its digest, as `discovery::delta::Replica::apply`.
    pub fn apply(mut self, changes: Answer) -> Result<Replica, DeltaError> {
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
            upsert_hosts(hosts, upserts.wire());
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
        self.signatures = changes.signatures;
        Ok(self)
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
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
