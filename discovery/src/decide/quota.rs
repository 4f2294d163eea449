//! Storage quotas: how many endpoints one host ip may hold, how many services the catalog
//! may name, and roughly how many bytes all stored endpoints may take. They bound what a
//! buggy or hostile client can make every reader download.
//!
//! The decision ([`Usage::admit`]) is a pure function over counts the registry keeps in
//! memory ([`Usage`]), never a store scan per write. The counts are rebuilt from the whole
//! table at every fleet count (each sweep) and updated by this replica's own writes in
//! between, so with the memory store they are exact up to races between concurrent writes,
//! and with DynamoDB they miss other replicas' writes until the next sweep: several replicas
//! can together overshoot a quota by what they accept within one sweep interval.
//!
//! Only endpoints the registry does not hold yet are counted against a quota: a renewal of a
//! stored endpoint is never refused, so nothing already stored is dropped by a quota.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU16;

use schema::{Endpoint, EndpointKey, ServiceName, TagValue};
use thiserror::Error;

use crate::config::RegistryConfig;

/// The configured quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub max_endpoints_per_ip: usize,
    pub max_services: usize,
    pub max_catalog_bytes: u64,
}

impl Quotas {
    pub fn from_config(cfg: &RegistryConfig) -> Self {
        Quotas {
            max_endpoints_per_ip: cfg.max_endpoints_per_ip,
            max_services: cfg.max_services,
            max_catalog_bytes: cfg.max_catalog_bytes,
        }
    }
}

/// A write refused by a quota: which one (its config key), its value, and what the write
/// would have made of it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "quota exceeded: {limit} = {value} ({detail}); deregister endpoints or ask the operator \
     to raise {limit}"
)]
pub struct QuotaExceeded {
    pub limit: &'static str,
    pub value: u64,
    pub detail: String,
}

/// What the registry believes the table holds: every endpoint key with its approximate size,
/// and the per-ip and per-service counts derived from them.
#[derive(Debug, Default, Clone)]
pub struct Usage {
    rows: BTreeMap<EndpointKey, u64>,
    per_ip: HashMap<IpAddr, usize>,
    per_service: HashMap<ServiceName, usize>,
    bytes: u64,
}

impl Usage {
    pub fn from_endpoints<'a>(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> Self {
        let mut u = Usage::default();
        for ep in endpoints {
            u.record(ep);
        }
        u
    }

    pub fn endpoints(&self) -> usize {
        self.rows.len()
    }

    pub fn services(&self) -> usize {
        self.per_service.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn contains(&self, key: &EndpointKey) -> bool {
        self.rows.contains_key(key)
    }

    /// Adds or replaces one stored endpoint.
    pub fn record(&mut self, ep: &Endpoint) {
        let size = approx_size(ep);
        match self.rows.insert(ep.key(), size) {
            Some(old) => self.bytes = self.bytes.saturating_sub(old).saturating_add(size),
            None => {
                self.bytes = self.bytes.saturating_add(size);
                *self.per_ip.entry(ep.ip).or_default() += 1;
                *self.per_service.entry(ep.service.clone()).or_default() += 1;
            }
        }
    }

    /// Forgets the service's endpoints on `ip` (only the one on `port` when given).
    pub fn remove(&mut self, service: &ServiceName, ip: IpAddr, port: Option<NonZeroU16>) {
        let key = |port| EndpointKey {
            service: service.clone(),
            ip,
            port,
        };
        let keys: Vec<EndpointKey> = match port {
            Some(p) => vec![key(p)],
            None => self
                .rows
                .range(key(NonZeroU16::MIN)..=key(NonZeroU16::MAX))
                .map(|(k, _)| k.clone())
                .collect(),
        };
        for k in keys {
            let Some(size) = self.rows.remove(&k) else {
                continue;
            };
            self.bytes = self.bytes.saturating_sub(size);
            decrement(&mut self.per_ip, &k.ip);
            decrement(&mut self.per_service, &k.service);
        }
    }

    /// Whether storing `incoming` keeps every quota. Endpoints already held are renewals and
    /// never count; a key listed twice counts once.
    pub fn admit(&self, incoming: &[Endpoint], q: &Quotas) -> Result<(), QuotaExceeded> {
        let mut seen = BTreeSet::new();
        let mut per_ip: BTreeMap<IpAddr, usize> = BTreeMap::new();
        let mut services = BTreeSet::new();
        let mut bytes = 0u64;
        for ep in incoming {
            let key = ep.key();
            if self.rows.contains_key(&key) || !seen.insert(key) {
                continue;
            }
            *per_ip.entry(ep.ip).or_default() += 1;
            if !self.per_service.contains_key(&ep.service) {
                services.insert(&ep.service);
            }
            bytes = bytes.saturating_add(approx_size(ep));
        }
        for (ip, added) in per_ip {
            let total = self.per_ip.get(&ip).copied().unwrap_or(0) + added;
            if total > q.max_endpoints_per_ip {
                return Err(QuotaExceeded {
                    limit: "max_endpoints_per_ip",
                    value: q.max_endpoints_per_ip as u64,
                    detail: format!("{ip} would hold {total} endpoints"),
                });
            }
        }
        let total = self.per_service.len() + services.len();
        if total > q.max_services {
            return Err(QuotaExceeded {
                limit: "max_services",
                value: q.max_services as u64,
                detail: format!("the catalog would name {total} services"),
            });
        }
        let total = self.bytes.saturating_add(bytes);
        if total > q.max_catalog_bytes {
            return Err(QuotaExceeded {
                limit: "max_catalog_bytes",
                value: q.max_catalog_bytes,
                detail: format!("stored endpoints would take about {total} bytes"),
            });
        }
        Ok(())
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = map.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            map.remove(k);
        }
    }
}

/// Roughly the bytes one endpoint adds to a catalog answer: its strings plus a fixed
/// allowance for field names and punctuation. Cheap (no serialisation), so the whole table
/// can be recounted at every sweep.
pub fn approx_size(ep: &Endpoint) -> u64 {
    const FIXED: usize = 160;
    let opt = |v: &Option<TagValue>| v.as_ref().map_or(0, |v| v.as_str().len() + 16);
    let t = &ep.tags;
    let extra: usize = t
        .extra
        .iter()
        .map(|(k, v)| k.as_str().len() + v.as_str().len() + 6)
        .sum();
    let n = FIXED
        + ep.service.as_str().len()
        + 39 // the longest ip text
        + ep.revision.as_str().len()
        + ep.service_repo_name.as_ref().map_or(0, |r| r.as_str().len())
        + opt(&t.az)
        + opt(&t.region)
        + opt(&t.instance_id)
        + extra;
    n as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(service: &str, ip: &str, port: u16) -> Endpoint {
        Endpoint::new(
            ServiceName::new(service).expect("name"),
            ip.parse().expect("ip"),
            NonZeroU16::new(port).expect("port"),
        )
    }

    fn quotas() -> Quotas {
        Quotas {
            max_endpoints_per_ip: 2,
            max_services: 2,
            max_catalog_bytes: 10_000,
        }
    }

    #[test]
    fn new_endpoints_count_and_renewals_never_do() {
        let q = quotas();
        let mut u = Usage::from_endpoints(&[ep("a", "10.0.0.1", 1), ep("a", "10.0.0.1", 2)]);
        assert_eq!((u.endpoints(), u.services()), (2, 1));
        // Renewals of what is held pass even though the ip is at its quota.
        assert!(
            u.admit(&[ep("a", "10.0.0.1", 1), ep("a", "10.0.0.1", 2)], &q)
                .is_ok()
        );
        let e = u
            .admit(&[ep("b", "10.0.0.1", 3)], &q)
            .expect_err("third on ip");
        assert_eq!((e.limit, e.value), ("max_endpoints_per_ip", 2));
        // The same new key twice is one endpoint.
        let twice = [ep("b", "10.0.0.2", 3), ep("b", "10.0.0.2", 3)];
        assert!(u.admit(&twice, &q).is_ok());
        u.record(&twice[0]);
        let e = u
            .admit(&[ep("c", "10.0.0.3", 1)], &q)
            .expect_err("third service");
        assert_eq!(e.limit, "max_services");
        u.remove(
            &ServiceName::new("a").expect("name"),
            "10.0.0.1".parse().expect("ip"),
            None,
        );
        assert_eq!((u.endpoints(), u.services()), (1, 1));
        assert!(u.admit(&[ep("c", "10.0.0.3", 1)], &q).is_ok());
        let big = Quotas {
            max_catalog_bytes: u.bytes() + approx_size(&ep("b", "10.0.0.9", 1)) - 1,
            ..q
        };
        let e = u.admit(&[ep("b", "10.0.0.9", 1)], &big).expect_err("bytes");
        assert_eq!(e.limit, "max_catalog_bytes");
    }

    #[test]
    fn bytes_follow_replacements_and_removals() {
        let mut u = Usage::default();
        let mut e = ep("a", "10.0.0.1", 1);
        u.record(&e);
        let small = u.bytes();
        e.tags.az = Some(TagValue::new("us-east-1a").expect("az"));
        u.record(&e);
        assert!(u.bytes() > small);
        assert_eq!(u.endpoints(), 1);
        u.remove(&e.service, e.ip, Some(e.port));
        assert_eq!((u.bytes(), u.endpoints(), u.services()), (0, 0, 0));
    }
}
