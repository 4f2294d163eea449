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

use schema::{Endpoint, ServiceName, TagValue};
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

/// What [`Usage::admit`] saw besides its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Admitted {
    /// Every endpoint admitted was held already: a renewal, which moves no count.
    pub renewal: bool,
}

/// What the registry believes the table holds: every endpoint key with its approximate size,
/// and the per-ip counts derived from them.
#[derive(Debug, Default, Clone)]
pub struct Usage {
    /// Sizes per service, then per (ip, port): a renewal's lookup hashes the service name it
    /// was sent and never copies it (every check-in asks, and most are renewals).
    rows: HashMap<ServiceName, BTreeMap<(IpAddr, NonZeroU16), u64>>,
    endpoints: usize,
    per_ip: HashMap<IpAddr, usize>,
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
        self.endpoints
    }

    /// Services with at least one endpoint.
    pub fn services(&self) -> usize {
        self.rows.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether `ep`'s key is held.
    pub fn holds(&self, ep: &Endpoint) -> bool {
        self.rows
            .get(&ep.service)
            .is_some_and(|rows| rows.contains_key(&(ep.ip, ep.port)))
    }

    /// Adds or replaces one stored endpoint.
    pub fn record(&mut self, ep: &Endpoint) {
        let size = approx_size(ep);
        let rows = match self.rows.get_mut(&ep.service) {
            Some(rows) => rows,
            None => self.rows.entry(ep.service.clone()).or_default(),
        };
        match rows.insert((ep.ip, ep.port), size) {
            Some(old) => self.bytes = self.bytes.saturating_sub(old).saturating_add(size),
            None => {
                self.bytes = self.bytes.saturating_add(size);
                self.endpoints += 1;
                *self.per_ip.entry(ep.ip).or_default() += 1;
            }
        }
    }

    /// Forgets the service's endpoints on `ip` (only the one on `port` when given).
    pub fn remove(&mut self, service: &ServiceName, ip: IpAddr, port: Option<NonZeroU16>) {
        let Some(rows) = self.rows.get_mut(service) else {
            return;
        };
        let ports: Vec<NonZeroU16> = match port {
            Some(p) => vec![p],
            None => rows
                .range((ip, NonZeroU16::MIN)..=(ip, NonZeroU16::MAX))
                .map(|(k, _)| k.1)
                .collect(),
        };
        for p in ports {
            let Some(size) = rows.remove(&(ip, p)) else {
                continue;
            };
            self.bytes = self.bytes.saturating_sub(size);
            self.endpoints -= 1;
            decrement(&mut self.per_ip, &ip);
        }
        if rows.is_empty() {
            self.rows.remove(service);
        }
    }

    /// Whether storing `incoming` keeps every quota. Endpoints already held are renewals and
    /// never count; a key listed twice counts once.
    pub fn admit(&self, incoming: &[Endpoint], q: &Quotas) -> Result<Admitted, QuotaExceeded> {
        let mut seen = BTreeSet::new();
        let mut per_ip: BTreeMap<IpAddr, usize> = BTreeMap::new();
        let mut services = BTreeSet::new();
        let mut bytes = 0u64;
        for ep in incoming {
            if self.holds(ep) || !seen.insert(ep.key()) {
                continue;
            }
            *per_ip.entry(ep.ip).or_default() += 1;
            if !self.rows.contains_key(&ep.service) {
                services.insert(&ep.service);
            }
            bytes = bytes.saturating_add(approx_size(ep));
        }
        // Counts can already be past a quota (replicas overshooting together within a sweep,
        // a quota lowered by a restart): that must not refuse what adds nothing, or stored
        // hosts would stop renewing and expire.
        if seen.is_empty() {
            return Ok(Admitted { renewal: true });
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
        let total = self.rows.len() + services.len();
        if !services.is_empty() && total > q.max_services {
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
        Ok(Admitted { renewal: false })
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
        let renewal = u.admit(&[ep("a", "10.0.0.1", 1), ep("a", "10.0.0.1", 2)], &q);
        assert_eq!(renewal, Ok(Admitted { renewal: true }));
        let e = u
            .admit(&[ep("b", "10.0.0.1", 3)], &q)
            .expect_err("third on ip");
        assert_eq!((e.limit, e.value), ("max_endpoints_per_ip", 2));
        // The same new key twice is one endpoint.
        let twice = [ep("b", "10.0.0.2", 3), ep("b", "10.0.0.2", 3)];
        assert_eq!(u.admit(&twice, &q), Ok(Admitted { renewal: false }));
        let held_and_new = [ep("a", "10.0.0.1", 1), ep("b", "10.0.0.2", 3)];
        assert_eq!(u.admit(&held_and_new, &q), Ok(Admitted { renewal: false }));
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

    /// Counts past a quota (replicas that together accepted more within one sweep, a quota
    /// lowered since) still admit renewals, and new endpoints that add nothing to the quota
    /// that is exceeded: refusing them would let stored hosts expire.
    #[test]
    fn counts_past_a_quota_refuse_only_what_adds_to_it() {
        let q = quotas();
        let held = [
            ep("a", "10.0.0.1", 1),
            ep("b", "10.0.0.2", 1),
            ep("c", "10.0.0.3", 1),
        ];
        let u = Usage::from_endpoints(&held);
        assert_eq!(u.services(), 3, "one past max_services = 2");
        assert_eq!(u.admit(&held, &q), Ok(Admitted { renewal: true }));
        assert_eq!(
            u.admit(&[ep("a", "10.0.0.4", 1)], &q),
            Ok(Admitted { renewal: false }),
            "a new host of a held service names no new service"
        );
        let e = u
            .admit(&[ep("d", "10.0.0.4", 1)], &q)
            .expect_err("a fourth service");
        assert_eq!(e.limit, "max_services");
        let tight = Quotas {
            max_catalog_bytes: u.bytes() - 1,
            ..q
        };
        assert_eq!(u.admit(&held[..1], &tight), Ok(Admitted { renewal: true }));
        let e = u
            .admit(&[ep("a", "10.0.0.4", 1)], &tight)
            .expect_err("more bytes");
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

    #[test]
    fn removing_every_port_of_an_ip_keeps_the_service_s_other_ips() {
        let mut u = Usage::from_endpoints(&[
            ep("a", "10.0.0.1", 1),
            ep("a", "10.0.0.1", 2),
            ep("a", "10.0.0.2", 1),
            ep("b", "10.0.0.1", 1),
        ]);
        let a = ServiceName::new("a").expect("name");
        u.remove(&a, "10.0.0.1".parse().expect("ip"), None);
        assert_eq!((u.endpoints(), u.services()), (2, 2));
        assert!(u.holds(&ep("a", "10.0.0.2", 1)) && u.holds(&ep("b", "10.0.0.1", 1)));
        assert!(!u.holds(&ep("a", "10.0.0.1", 2)));
        u.remove(&a, "10.0.0.2".parse().expect("ip"), Some(NonZeroU16::MIN));
        assert_eq!(
            (u.endpoints(), u.services()),
            (1, 1),
            "an empty service is gone"
        );
        let e = u
            .admit(
                &[ep("c", "10.0.0.1", 1)],
                &Quotas {
                    max_endpoints_per_ip: 1,
                    ..quotas()
                },
            )
            .expect_err("ip count kept");
        assert_eq!(e.limit, "max_endpoints_per_ip");
    }
}
