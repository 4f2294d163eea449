//! Load balancers (docs/ARCHITECTURE.md#load-balancing): pure algorithms over the routable set, plus the
//! [`Balancer`] that keeps their per-host-set state and applies zone-aware routing.
//!
//! Every algorithm takes its randomness from the caller, so distributions are tested with a
//! seeded RNG and no sockets.

mod edf;
pub mod least_request;
pub mod maglev;
pub mod random;
pub mod ring_hash;
pub mod wrr;
pub mod zone;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use self::least_request::WeightedLeastRequest;
use self::maglev::Maglev;
use self::ring_hash::Ring;
use self::wrr::RoundRobin;
use self::zone::ZonePlan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

/// One routable host as a balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbHost {
    /// Stable identity for hashing (`ip:port`).
    pub key: Arc<str>,
    pub weight: u32,
    pub active: u32,
    pub zone: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
enum Algo {
    RoundRobin(RoundRobin),
    P2c,
    WeightedLeastRequest(WeightedLeastRequest),
    Random,
    Ring(Ring),
    Maglev(Maglev),
}

impl Algo {
    /// `view[j]` is the j-th host of the subset the algorithm balances over.
    fn build(policy: LbPolicy, view: View<'_>, rng: &mut impl Rng) -> Self {
        let weights: Vec<u32> = view.iter().map(|h| h.weight).collect();
        let keyed = || {
            view.iter()
                .map(|h| (h.key.to_string(), h.weight))
                .collect::<Vec<_>>()
        };
        match policy {
            LbPolicy::RoundRobin => Algo::RoundRobin(RoundRobin::new(&weights, rng)),
            LbPolicy::LeastRequest if weights.windows(2).all(|w| w[0] == w[1]) => Algo::P2c,
            LbPolicy::LeastRequest => {
                let active: Vec<u32> = view.iter().map(|h| h.active).collect();
                Algo::WeightedLeastRequest(WeightedLeastRequest::new(
                    &weights,
                    &active,
                    least_request::DEFAULT_BIAS,
                ))
            }
            LbPolicy::Random => Algo::Random,
            LbPolicy::RingHash => Algo::Ring(Ring::build(
                &keyed(),
                ring_hash::MIN_RING_SIZE,
                ring_hash::MAX_RING_SIZE,
            )),
            LbPolicy::Maglev => Algo::Maglev(Maglev::build(&keyed(), maglev::TABLE_SIZE)),
        }
    }

    /// Picks an index into `view`; allocates nothing.
    fn pick(&mut self, view: View<'_>, hash: u64, rng: &mut impl Rng) -> Option<usize> {
        match self {
            Algo::RoundRobin(rr) => rr.pick(),
            Algo::P2c => least_request::p2c_with(view.len(), |j| view.get(j).active, rng),
            Algo::WeightedLeastRequest(lr) => lr.pick_with(
                |j| {
                    let h = view.get(j);
                    (h.weight, h.active)
                },
                least_request::DEFAULT_BIAS,
            ),
            Algo::Random => random::pick_with(view.len(), |j| view.get(j).weight, rng),
            Algo::Ring(r) => r.pick(hash),
            Algo::Maglev(m) => m.pick(hash),
        }
    }
}

/// A subset of the hosts, by index, without copying them; `None` is all of them.
#[derive(Clone, Copy)]
struct View<'a> {
    hosts: &'a [LbHost],
    subset: Option<&'a [usize]>,
}

impl<'a> View<'a> {
    fn len(&self) -> usize {
        self.subset.map_or(self.hosts.len(), <[usize]>::len)
    }
    /// Callers index within `0..len()`; out of range falls back to the first host rather
    /// than panicking.
    fn get(&self, j: usize) -> &'a LbHost {
        let i = match self.subset {
            Some(s) => s.get(j).copied().unwrap_or(0),
            None => j,
        };
        &self.hosts[i.min(self.hosts.len().saturating_sub(1))]
    }
    fn iter(&self) -> impl Iterator<Item = &'a LbHost> + '_ {
        (0..self.len()).map(|j| self.get(j))
    }
}

/// Picks hosts for one cluster. Algorithm state (schedules, rings, tables) is rebuilt only
/// when the routable set's membership or weights change.
#[derive(Debug)]
pub struct Balancer {
    policy: LbPolicy,
    local_zone: Option<String>,
    min_cluster_size: u64,
    fingerprint: Vec<(Arc<str>, u32, Option<Arc<str>>)>,
    /// Per zone subset (`None` = every host).
    algos: HashMap<Option<String>, Algo>,
    /// Indices of the hosts in the zone being picked from; reused so picks do not allocate.
    subset: Vec<usize>,
}

impl Balancer {
    pub fn new(policy: LbPolicy, local_zone: Option<String>) -> Self {
        Balancer {
            policy,
            local_zone,
            min_cluster_size: zone::MIN_CLUSTER_SIZE,
            fingerprint: Vec::new(),
            algos: HashMap::new(),
            subset: Vec::new(),
        }
    }

    pub fn with_min_cluster_size(mut self, n: u64) -> Self {
        self.min_cluster_size = n;
        self
    }

    pub fn policy(&self) -> LbPolicy {
        self.policy
    }

    /// Picks an index into `hosts`. `hash` is the request's hash for ring hash and Maglev
    /// (a random one when absent); `panic` turns zone awareness off, as in Envoy.
    pub fn pick(
        &mut self,
        hosts: &[LbHost],
        panic: bool,
        hash: Option<u64>,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        self.set_hosts(hosts);
        self.pick_current(hosts, panic, hash, rng)
    }

    /// Tells the balancer the routable set; its algorithm state is rebuilt only if the hosts,
    /// weights or zones differ from last time.
    pub fn set_hosts(&mut self, hosts: &[LbHost]) {
        // Compared in place: the common case (same hosts as last time) allocates nothing.
        let same = self.fingerprint.len() == hosts.len()
            && hosts
                .iter()
                .zip(&self.fingerprint)
                .all(|(h, (k, w, z))| h.key == *k && h.weight == *w && h.zone == *z);
        if !same {
            self.fingerprint = hosts
                .iter()
                .map(|h| (h.key.clone(), h.weight, h.zone.clone()))
                .collect();
            self.algos.clear();
        }
    }

    /// [`Self::pick`] over the set last given to [`Self::set_hosts`], which `hosts` must be
    /// (their in-flight counts may have changed).
    pub fn pick_current(
        &mut self,
        hosts: &[LbHost],
        panic: bool,
        hash: Option<u64>,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        if hosts.is_empty() {
            return None;
        }
        let hash = hash.unwrap_or_else(|| rng.random());
        let zone = if panic {
            None
        } else {
            self.choose_zone(hosts, rng)
        };
        let Balancer {
            policy,
            subset,
            algos,
            ..
        } = self;
        // Without zones the view is every host: no per-pick walk over the set.
        let view = match &zone {
            Some(z) => {
                subset.clear();
                subset.extend(
                    (0..hosts.len())
                        .filter(|&i| hosts[i].zone.as_deref().unwrap_or("") == z.as_str()),
                );
                View {
                    hosts,
                    subset: Some(subset),
                }
            }
            None => View {
                hosts,
                subset: None,
            },
        };
        let algo = algos
            .entry(zone)
            .or_insert_with(|| Algo::build(*policy, view, rng));
        let j = algo.pick(view, hash, rng)?;
        match view.subset {
            Some(s) => s.get(j).copied(),
            None => (j < hosts.len()).then_some(j),
        }
    }

    /// The zone to pick from, if zone-aware routing applies. Without a view of the local
    /// fleet we assume the proxies are spread evenly over the upstream's zones, so the local
    /// zone is preferred in proportion to its share of capacity and overflows to the rest.
    fn choose_zone(&self, hosts: &[LbHost], rng: &mut impl Rng) -> Option<String> {
        let local = self.local_zone.as_ref()?;
        let mut zones: Vec<&str> = vec![local.as_str()];
        for h in hosts {
            let z = h.zone.as_deref().unwrap_or("");
            if !zones.contains(&z) {
                zones.push(z);
            }
        }
        let upstream: Vec<u64> = zones
            .iter()
            .map(|z| {
                hosts
                    .iter()
                    .filter(|h| h.zone.as_deref().unwrap_or("") == *z)
                    .count() as u64
            })
            .collect();
        let local_counts = vec![1u64; zones.len()];
        let plan = zone::plan(&local_counts, &upstream, self.min_cluster_size);
        if plan == ZonePlan::AllZones {
            return None;
        }
        zone::pick_zone(&plan, rng)
            .and_then(|i| zones.get(i))
            .map(|z| z.to_string())
    }
}
