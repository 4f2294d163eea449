//! Catalog deltas, sans IO (docs/API.md#catalog-deltas): the digest of a catalog, the
//! difference between two catalogs, and [`Replica`], a client's copy of the registry's
//! catalog that applies deltas and checks the digest. The registry computes deltas with
//! [`diff`] over its history of views (`registry/history.rs`); the agent applies them with
//! [`Replica::apply`]. Both compute digests with the same functions, over the hosts as the
//! wire carries them, so what one side hashes the other can hash again.
//!
//! A host's `last_check_in` is outside the delta: it moves every minute on every host
//! without changing anything a reader acts on (the index ignores it too), and sending it
//! would make every delta after a quiet minute as large as the catalog. A rebuilt catalog
//! keeps, for a host unchanged otherwise, the check-in time it was last sent with.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use schema::api::{Catalog, CatalogChanges, HostKey, V1Host};
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// Why a delta was not applied. None of them changes anything the caller can still use: the
/// replica is consumed, and the caller fetches the whole catalog again.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeltaError {
    #[error("the answer is a full catalog, not a delta")]
    NotADelta,
    #[error("the delta applies to index {from:?}, the replica holds {held}")]
    WrongBase { held: u64, from: Option<u64> },
    #[error("the rebuilt catalog's digest {got} differs from the registry's {expected}")]
    Digest { expected: String, got: String },
}

/// The order hosts are listed in within a service, as the registry keeps its rows: by
/// address (every IPv4 before every IPv6, each numerically), then port. A host whose
/// address does not parse (never sent by a registry) sorts first, by its text.
pub fn host_order(a: &V1Host, b: &V1Host) -> Ordering {
    let key = |h: &V1Host| (h.ip_address.parse::<IpAddr>().ok(), h.port);
    key(a)
        .cmp(&key(b))
        .then_with(|| a.ip_address.cmp(&b.ip_address))
}

/// Whether two hosts agree on everything but `last_check_in`.
pub fn same_host(a: &V1Host, b: &V1Host) -> bool {
    a.service == b.service
        && a.ip_address == b.ip_address
        && a.port == b.port
        && a.revision == b.revision
        && a.service_repo_name == b.service_repo_name
        && a.tags == b.tags
}

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// A tag value as the digest reads it: its type, then its text.
fn tag_text(v: &Value) -> String {
    match v {
        Value::String(s) => format!("s{s}"),
        Value::Bool(b) => format!("b{b}"),
        Value::Number(n) => format!("n{n}"),
        other => format!("j{other}"),
    }
}

/// The digest of one service's hosts (in [`host_order`]); see docs/API.md#the-digest.
pub fn service_digest(service: &str, hosts: &[V1Host]) -> Hash {
    let mut h = Sha256::new();
    field(&mut h, service.as_bytes());
    h.update((hosts.len() as u64).to_be_bytes());
    for host in hosts {
        field(&mut h, host.ip_address.as_bytes());
        field(&mut h, host.port.to_string().as_bytes());
        field(&mut h, host.revision.as_bytes());
        match &host.service_repo_name {
            None => h.update([0u8]),
            Some(r) => {
                h.update([1u8]);
                field(&mut h, r.as_bytes());
            }
        }
        let mut tags: Vec<(&String, &Value)> = host.tags.iter().collect();
        tags.sort_by(|a, b| a.0.cmp(b.0));
        h.update((tags.len() as u64).to_be_bytes());
        for (k, v) in tags {
            field(&mut h, k.as_bytes());
            field(&mut h, tag_text(v).as_bytes());
        }
    }
    h.finalize().into()
}

/// The digest of a catalog from its services' digests, in service-name order (byte-wise).
pub fn catalog_digest<'a>(services: impl IntoIterator<Item = &'a Hash>) -> Hash {
    let mut h = Sha256::new();
    for d in services {
        h.update(d);
    }
    h.finalize().into()
}

/// One service's hosts as a history of views holds them: shared by every view in which the
/// service did not change, with its digest.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceHosts {
    pub hosts: Vec<V1Host>,
    pub digest: Hash,
}

impl ServiceHosts {
    /// `hosts` must be in [`host_order`].
    pub fn new(service: &str, hosts: Vec<V1Host>) -> Self {
        let digest = service_digest(service, &hosts);
        ServiceHosts { hosts, digest }
    }
}

/// A service's hosts, whatever holds them: a catalog's `Vec`, or a view's shared entry.
pub trait HostList {
    fn hosts(&self) -> &[V1Host];
    /// True when `self` and `other` are known to be equal without looking inside.
    fn is(&self, _other: &Self) -> bool {
        false
    }
}

impl HostList for Vec<V1Host> {
    fn hosts(&self) -> &[V1Host] {
        self
    }
}

impl HostList for Arc<ServiceHosts> {
    fn hosts(&self) -> &[V1Host] {
        &self.hosts
    }
    fn is(&self, other: &Self) -> bool {
        Arc::ptr_eq(self, other)
    }
}

/// What changed from one catalog to another: the parts of a delta answer that are not
/// per-request fields.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Changes {
    /// Per service, the hosts added or changed (other than in `last_check_in`).
    pub services: BTreeMap<String, Vec<V1Host>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub removed: BTreeMap<String, Vec<HostKey>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_services: Vec<String>,
}

/// The changes that turn `old` into `new`. A service whose entries are the same shared
/// value in both is skipped without looking inside; an empty service counts as absent.
pub fn diff<H: HostList>(old: &BTreeMap<String, H>, new: &BTreeMap<String, H>) -> Changes {
    let mut out = Changes::default();
    for (service, was) in old {
        if new.get(service).is_none_or(|h| h.hosts().is_empty()) && !was.hosts().is_empty() {
            out.removed_services.push(service.clone());
        }
    }
    for (service, now) in new {
        let was: &[V1Host] = match old.get(service) {
            Some(was) if was.is(now) => continue,
            Some(was) => was.hosts(),
            None => &[],
        };
        diff_service(service, was, now.hosts(), &mut out);
    }
    out
}

fn diff_service(service: &str, was: &[V1Host], now: &[V1Host], out: &mut Changes) {
    let before: HashMap<(&str, u16), &V1Host> = was
        .iter()
        .map(|h| ((h.ip_address.as_str(), h.port), h))
        .collect();
    let upserts: Vec<V1Host> = now
        .iter()
        .filter(|h| {
            !before
                .get(&(h.ip_address.as_str(), h.port))
                .is_some_and(|b| same_host(b, h))
        })
        .cloned()
        .collect();
    if !upserts.is_empty() {
        out.services.insert(service.to_string(), upserts);
    }
    if now.is_empty() {
        return;
    }
    let after: BTreeSet<(&str, u16)> = now
        .iter()
        .map(|h| (h.ip_address.as_str(), h.port))
        .collect();
    let gone: Vec<HostKey> = was
        .iter()
        .filter(|h| !after.contains(&(h.ip_address.as_str(), h.port)))
        .map(HostKey::of)
        .collect();
    if !gone.is_empty() {
        out.removed.insert(service.to_string(), gone);
    }
}

/// A client's copy of the registry's catalog, with each service's digest kept so a delta
/// costs hashing only the services it touches.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    catalog: Catalog,
    digests: BTreeMap<String, Hash>,
}

impl Replica {
    /// A replica of a whole catalog (from a full answer). Its hosts are put in
    /// [`host_order`] and empty services dropped, as the registry lists them.
    pub fn new(mut catalog: Catalog) -> Self {
        catalog.services.retain(|_, hosts| !hosts.is_empty());
        let digests = catalog
            .services
            .iter_mut()
            .map(|(service, hosts)| {
                hosts.sort_by(host_order);
                (service.clone(), service_digest(service, hosts))
            })
            .collect();
        Replica { catalog, digests }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The digest of the catalog held.
    pub fn digest(&self) -> Hash {
        catalog_digest(self.digests.values())
    }

    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest())
    }

    /// Applies a delta answer to the catalog held: the result is the registry's catalog at
    /// `changes.index`, with the answer's per-request fields. Refused when the answer is not
    /// a delta from the index held, or when what it rebuilds does not match its digest.
    pub fn apply(mut self, changes: CatalogChanges) -> Result<Replica, DeltaError> {
        if changes.full {
            return Err(DeltaError::NotADelta);
        }
        if changes.from != Some(self.catalog.index) {
            return Err(DeltaError::WrongBase {
                held: self.catalog.index,
                from: changes.from,
            });
        }
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for service in changes.removed_services {
            self.catalog.services.remove(&service);
            self.digests.remove(&service);
        }
        for (service, gone) in changes.removed {
            if let Some(hosts) = self.catalog.services.get_mut(&service) {
                remove_hosts(hosts, &gone);
            }
            touched.insert(service);
        }
        for (service, upserts) in changes.services {
            let hosts = self.catalog.services.entry(service.clone()).or_default();
            upsert_hosts(hosts, upserts);
            touched.insert(service);
        }
        for service in touched {
            match self.catalog.services.get_mut(&service) {
                Some(hosts) if !hosts.is_empty() => {
                    hosts.sort_by(host_order);
                    self.digests
                        .insert(service.clone(), service_digest(&service, hosts));
                }
                _ => {
                    self.catalog.services.remove(&service);
                    self.digests.remove(&service);
                }
            }
        }
        let got = self.digest_hex();
        if got != changes.digest {
            return Err(DeltaError::Digest {
                expected: changes.digest,
                got,
            });
        }
        self.catalog.index = changes.index;
        self.catalog.generated_at_ms = changes.generated_at_ms;
        self.catalog.warming = changes.warming;
        self.catalog.stale = changes.stale;
        // Signatures are of this answer's listings at its date: the held ones are spent.
        self.catalog.signatures = changes.signatures;
        Ok(self)
    }
}

/// Drops the hosts keyed in `gone` (one step of applying a delta to a service's hosts).
pub fn remove_hosts(hosts: &mut Vec<V1Host>, gone: &[HostKey]) {
    let gone: BTreeSet<&HostKey> = gone.iter().collect();
    hosts.retain(|h| !gone.contains(&HostKey::of(h)));
}

/// Puts each of `upserts` in place of the host with its key, or adds it (one step of applying
/// a delta; the caller puts the hosts back in [`host_order`]).
pub fn upsert_hosts(hosts: &mut Vec<V1Host>, upserts: Vec<V1Host>) {
    let at: HashMap<HostKey, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (HostKey::of(h), i))
        .collect();
    for new in upserts {
        match at.get(&HostKey::of(&new)).and_then(|&i| hosts.get_mut(i)) {
            Some(old) => *old = new,
            None => hosts.push(new),
        }
    }
}

/// The catalog a full answer carries (the caller checks its digest with [`Replica::new`]).
/// The delta answer that takes catalog `a` to `b`, as the registry sends it: the changes
/// ([`diff`]), `b`'s per-request fields and digest. (The registry builds its answers from
/// its history of views instead; this is for clients' tests and tools.)
pub fn between(a: &Catalog, b: &Catalog) -> CatalogChanges {
    let changes = diff(&a.services, &b.services);
    CatalogChanges {
        index: b.index,
        generated_at_ms: b.generated_at_ms,
        warming: b.warming,
        stale: b.stale,
        full: false,
        from: Some(a.index),
        digest: Replica::new(b.clone()).digest_hex(),
        services: changes.services,
        removed: changes.removed,
        removed_services: changes.removed_services,
        signatures: BTreeMap::new(),
    }
}

pub fn full_catalog(changes: CatalogChanges) -> Catalog {
    Catalog {
        index: changes.index,
        generated_at_ms: changes.generated_at_ms,
        warming: changes.warming,
        stale: changes.stale,
        services: changes.services,
        signatures: changes.signatures,
    }
}

#[cfg(test)]
mod tests;
