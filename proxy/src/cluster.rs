//! One upstream cluster at run time: its hosts with their discovery status, health and outlier
//! state, the balancer, the breaker and the pooled clients. The sans-IO cores decide; this
//! module only keeps their state behind one short-held lock and applies their answers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ClusterConfig, HealthCheckKind, Scheme};
use crate::core::breaker::CircuitBreaker;
use crate::core::health::{CheckOutcome, HealthPolicy, HealthState, HealthStatus, Transition};
use crate::core::lb::{Balancer, LbHost, LbPolicy};
use crate::core::merge::{self, Candidate, Decision, DiscoveryStatus};
use crate::core::outlier::{OutlierPolicy, OutlierState, RequestResult};
use crate::core::retry::RetryPolicy;
use crate::io::upstream::Upstream;

mod families;
mod gauges;
mod handle;
mod load;
mod snapshot;

use self::gauges::{ClusterGauges, HostGauges};

pub use self::handle::{ClusterMetrics, HostHandle, OUTCOMES};
pub use self::load::{ActiveRequest, RetrySlot};
pub use self::snapshot::{ClusterSnapshot, HostSnapshot};

/// How many picks a retry makes to avoid the host that just failed.
const HOST_SELECTION_ATTEMPTS: u64 = 3;

/// The clock every runtime decision uses: tokio's, so tests can pause it.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A host as discovery lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedHost {
    pub addr: SocketAddr,
    pub weight: u32,
    pub zone: Option<String>,
    pub canary: bool,
    /// Explicitly deregistered: drain it.
    pub draining: bool,
}

struct HostEntry {
    /// `ip:port`, kept once so that balancing allocates nothing per request.
    key: Arc<str>,
    weight: u32,
    zone: Option<Arc<str>>,
    canary: bool,
    discovery: DiscoveryStatus,
    health: HealthState,
    outlier: OutlierState,
    handle: Arc<HostHandle>,
    gauges: HostGauges,
    checker: Option<CancellationToken>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MembershipStatus {
    /// At least one answer from the membership source has been applied.
    pub initialized: bool,
    pub index: Option<String>,
    /// Milliseconds since the last good answer.
    pub last_ok_ms_ago: Option<u64>,
    pub consecutive_errors: u32,
    pub last_error: Option<String>,
    #[serde(skip)]
    last_ok: Option<Instant>,
}

struct State {
    hosts: BTreeMap<SocketAddr, HostEntry>,
    balancer: Balancer,
    rng: SmallRng,
    membership: MembershipStatus,
    routing: Routing,
    gauges: ClusterGauges,
}

/// The routable set as [`Cluster::pick`] balances over it, rebuilt only when something that
/// decides routability changed: a listing, a health transition, an ejection starting or
/// ending, a host forgotten. A pick is then independent of the cluster's size (it walked
/// every host per request before, which at a thousand hosts cost more than the rest of the
/// request).
#[derive(Default)]
struct Routing {
    fresh: bool,
    /// The earliest end of an ejection in force: the set changes then without any event.
    until: Option<Instant>,
    /// The routable hosts, in the order of `lb`.
    handles: Vec<Arc<HostHandle>>,
    lb: Vec<LbHost>,
    panic: bool,
    // Scratch for rebuilds.
    candidates: Vec<Candidate>,
    routable: Vec<usize>,
}

pub struct Cluster {
    pub config: ClusterConfig,
    health_policy: Option<HealthPolicy>,
    outlier_policy: Option<OutlierPolicy>,
    pub retry_policy: RetryPolicy,
    /// The cluster's load counts (requests, pending attempts, retries, connections), taken
    /// through [`Cluster::try_acquire`] and the guards in `load` only.
    breaker: CircuitBreaker,
    /// Traffic connections, counted against the breaker.
    pub upstream: Upstream,
    /// Health-check connections, outside the breaker.
    pub checks: Upstream,
    /// How upstreams are reached: over TLS when the cluster has a `tls` section.
    pub scheme: Scheme,
    /// Requests in flight, through [`Cluster::start_request`] only.
    active_requests: AtomicU32,
    metrics: ClusterMetrics,
    name: Arc<str>,
    state: Mutex<State>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// Counts a request against its host until dropped.
#[derive(Debug)]
pub struct ActiveGuard(Arc<HostHandle>);

impl ActiveGuard {
    pub fn host(&self) -> &HostHandle {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Cluster {
    pub fn new(
        config: ClusterConfig,
        local_zone: Option<String>,
        breaker: CircuitBreaker,
        upstream: Upstream,
        checks: Upstream,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let health_policy = (config.health_check.kind != HealthCheckKind::None)
            .then(|| config.health_check.policy());
        let outlier_policy = config
            .outlier_detection
            .enabled
            .then(|| config.outlier_detection.policy());
        let zone = if config.zone_aware { local_zone } else { None };
        let state = State {
            hosts: BTreeMap::new(),
            balancer: Balancer::new(config.lb_policy, zone),
            rng: SmallRng::from_rng(&mut rand::rng()),
            membership: MembershipStatus::default(),
            routing: Routing::default(),
            gauges: ClusterGauges::default(),
        };
        let name: Arc<str> = Arc::from(config.name.as_str());
        Arc::new(Cluster {
            retry_policy: config.retries.policy(),
            health_policy,
            outlier_policy,
            breaker,
            scheme: Scheme::tls(upstream.is_tls()),
            upstream,
            checks,
            active_requests: AtomicU32::new(0),
            metrics: ClusterMetrics::new(name.clone()),
            name,
            state: Mutex::new(state),
            tracker,
            shutdown,
            config,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The cluster's metric handles.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    pub fn health_policy(&self) -> Option<&HealthPolicy> {
        self.health_policy.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping traffic would, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one membership answer. A warming source's empty answer never empties a known
    /// cluster (docs/ARCHITECTURE.md#warm-up). New hosts get a health checker whose first check runs at once.
    pub fn apply_listing(
        self: &Arc<Self>,
        listed: Vec<ListedHost>,
        index: Option<String>,
        warming: bool,
    ) {
        let now = now();
        let mut st = self.lock();
        if warming && listed.is_empty() && !st.hosts.is_empty() {
            return;
        }
        let mut seen = BTreeMap::new();
        for h in listed {
            // Duplicate addresses in one answer: the first wins, as in Envoy.
            seen.entry(h.addr).or_insert(h);
        }
        let mut new_hosts = Vec::new();
        for (addr, entry) in st.hosts.iter_mut() {
            match seen.get(addr) {
                Some(h) => {
                    entry.weight = h.weight;
                    entry.zone = h.zone.as_deref().map(Arc::from);
                    entry.canary = h.canary;
                    entry.discovery = if h.draining {
                        DiscoveryStatus::Drained
                    } else {
                        DiscoveryStatus::Present
                    };
                }
                // A drained host stays drained until its requests finish.
                None if entry.discovery == DiscoveryStatus::Drained => {}
                None => entry.discovery = DiscoveryStatus::Absent,
            }
        }
        for (addr, h) in seen {
            if st.hosts.contains_key(&addr) || h.draining {
                continue;
            }
            let entry = self.new_host(addr, &h, now);
            if let Some(token) = &entry.checker {
                new_hosts.push((addr, token.clone()));
            }
            tracing::info!(cluster = %self.name(), host = %addr, "host discovered");
            st.hosts.insert(addr, entry);
        }
        st.routing.fresh = false;
        st.membership.initialized = true;
        st.membership.index = index;
        st.membership.last_ok = Some(now);
        st.membership.consecutive_errors = 0;
        st.membership.last_error = None;
        self.reconcile(&mut st);
        drop(st);
        for (addr, token) in new_hosts {
            crate::io::checker::spawn(self.clone(), addr, token, &self.tracker);
        }
    }

    /// A newly listed host: unhealthy until its first check passes (with a checker to start),
    /// or healthy at once when the cluster does no active checks.
    fn new_host(&self, addr: SocketAddr, h: &ListedHost, now: Instant) -> HostEntry {
        let mut health = HealthState::new(now);
        let checker = match self.health_policy {
            Some(_) => Some(self.shutdown.child_token()),
            None => {
                health.force_healthy();
                None
            }
        };
        HostEntry {
            weight: h.weight.max(1),
            key: Arc::from(addr.to_string()),
            zone: h.zone.as_deref().map(Arc::from),
            canary: h.canary,
            discovery: DiscoveryStatus::Present,
            health,
            outlier: OutlierState::default(),
            handle: Arc::new(HostHandle::new(addr, self.name.clone())),
            gauges: HostGauges::default(),
            checker,
        }
    }

    /// The membership source failed: keep the last set (fail static) and say so.
    pub fn membership_error(&self, error: String) {
        let mut st = self.lock();
        st.membership.consecutive_errors = st.membership.consecutive_errors.saturating_add(1);
        st.membership.last_error = Some(error);
    }

    pub fn membership_initialized(&self) -> bool {
        self.lock().membership.initialized
    }

    /// Forgets hosts the merge table says to remove, and stops their checkers.
    fn reconcile(&self, st: &mut State) {
        let checked = self.health_policy.is_some();
        let gone: Vec<SocketAddr> = st
            .hosts
            .iter()
            .filter(|(_, h)| {
                let d = merge::decide(h.discovery, h.health.status(), checked);
                merge::can_forget(d, h.handle.active())
            })
            .map(|(a, _)| *a)
            .collect();
        for addr in gone {
            st.routing.fresh = false;
            if let Some(h) = st.hosts.remove(&addr) {
                if let Some(t) = h.checker {
                    t.cancel();
                }
                tracing::info!(cluster = %self.name(), host = %addr, discovery = ?h.discovery, health = ?h.health.status(), "host removed");
                // Its gauges are no longer set: the exporter drops them once idle
                // (`crate::telemetry`), rather than keep them at their last value.
            }
        }
    }

    /// When the host's next check is due, or `None` once it is gone.
    pub fn next_check_at(&self, addr: SocketAddr) -> Option<Instant> {
        self.lock()
            .hosts
            .get(&addr)
            .map(|h| h.health.next_check_at())
    }

    /// Applies a health-check result; returns false once the host is gone.
    pub fn record_health(&self, addr: SocketAddr, outcome: CheckOutcome) -> bool {
        let Some(policy) = self.health_policy.clone() else {
            return false;
        };
        let now = now();
        let mut st = self.lock();
        let State {
            hosts,
            rng,
            routing,
            ..
        } = &mut *st;
        let Some(h) = hosts.get_mut(&addr) else {
            return false;
        };
        let was_ejected = h.outlier.is_ejected(now);
        let transition = h.health.on_result(outcome, now, &policy, rng);
        if outcome == CheckOutcome::Success
            && self
                .config
                .outlier_detection
                .uneject_on_health_check_success
        {
            h.outlier.on_health_check_success();
        }
        if transition == Transition::Changed || was_ejected != h.outlier.is_ejected(now) {
            routing.fresh = false;
        }
        let status = h.health.status();
        if transition == Transition::Changed {
            tracing::info!(cluster = %self.name(), host = %addr, ?status, ?outcome, "health changed");
        }
        h.gauges
            .publish_health(&h.handle, status == HealthStatus::Healthy);
        h.handle.count_check(outcome == CheckOutcome::Success);
        self.reconcile(&mut st);
        st.hosts.contains_key(&addr)
    }

    /// Picks a host for a new request and counts the request against it. `avoid` holds the
    /// hosts this request already tried, skipped when there is any other choice.
    pub fn pick(
        &self,
        hash: Option<u64>,
        avoid: &[SocketAddr],
    ) -> Option<(SocketAddr, ActiveGuard)> {
        let mut st = self.lock();
        self.refresh_routing(&mut st);
        let State {
            balancer,
            rng,
            routing,
            ..
        } = &mut *st;
        if balancer.policy() == LbPolicy::LeastRequest {
            // Least request needs live in-flight counts; the rest of the set is cached.
            for (h, handle) in routing.lb.iter_mut().zip(&routing.handles) {
                h.active = handle.active();
            }
        }
        let n = routing.handles.len();
        let avoided = |i: usize| avoid.contains(&routing.handles[i].addr);
        // Envoy's previous-host predicate: re-pick a few times (perturbing the hash, as Envoy
        // does for hash balancers) rather than change the host set, which would reset the
        // balancer's schedule.
        let mut picked = None;
        for attempt in 0..HOST_SELECTION_ATTEMPTS {
            let h = hash.map(|h| h.wrapping_add(attempt.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            picked = balancer.pick_current(&routing.lb, routing.panic, h, rng);
            match picked {
                Some(i) if avoided(i) => continue,
                _ => break,
            }
        }
        let mut picked = picked?;
        if avoided(picked) {
            // Unlucky draws: take the next host not tried yet rather than repeat a failed one;
            // when every host was tried, the balancer's choice stands.
            if let Some(next) = (1..n).map(|k| (picked + k) % n).find(|&i| !avoided(i)) {
                picked = next;
            }
        }
        let handle = routing.handles.get(picked)?.clone();
        handle.active.fetch_add(1, Ordering::AcqRel);
        Some((handle.addr, ActiveGuard(handle)))
    }

    /// Whether a routable host exists that is neither `last` (the attempt just made) nor in
    /// `tried`: a failed connect may then go on to it.
    pub fn has_untried(&self, tried: &[SocketAddr], last: SocketAddr) -> bool {
        let mut st = self.lock();
        self.refresh_routing(&mut st);
        st.routing
            .handles
            .iter()
            .any(|h| h.addr != last && !tried.contains(&h.addr))
    }

    /// Recomputes the routable set from the hosts' discovery, health and ejections, if
    /// something changed since the last time or an ejection has ended.
    fn refresh_routing(&self, st: &mut State) {
        // The clock is read only while an ejection is in force.
        if st.routing.fresh && st.routing.until.is_none_or(|u| now() < u) {
            return;
        }
        let now = now();
        let checked = self.health_policy.is_some();
        let State {
            hosts,
            balancer,
            routing,
            ..
        } = st;
        routing.candidates.clear();
        routing.until = None;
        for h in hosts.values() {
            let ejected = h.outlier.is_ejected(now);
            if let Some(end) = h.outlier.ejected_until().filter(|_| ejected) {
                routing.until = Some(routing.until.map_or(end, |u| u.min(end)));
            }
            routing.candidates.push(Candidate {
                decision: merge::decide(h.discovery, h.health.status(), checked),
                ejected,
            });
        }
        routing.panic = merge::routable_into(
            &routing.candidates,
            self.config.panic_threshold_percent,
            &mut routing.routable,
        );
        routing.lb.clear();
        routing.handles.clear();
        // `routable` holds ascending indices into `hosts`: one walk collects them.
        let mut wanted = routing.routable.iter().copied().peekable();
        for (i, h) in hosts.values().enumerate() {
            if wanted.next_if_eq(&i).is_some() {
                routing.lb.push(LbHost {
                    key: h.key.clone(),
                    weight: h.weight,
                    active: h.handle.active(),
                    zone: h.zone.clone(),
                });
                routing.handles.push(h.handle.clone());
            }
        }
        balancer.set_hosts(&routing.lb);
        routing.fresh = true;
    }

    /// The connection limit is reached: closes an idle connection of another host so that
    /// this one can dial. With many hosts and
    /// one idle connection each, the limit is otherwise reached by idle connections alone.
    pub fn close_an_idle_connection(&self, except: SocketAddr) -> bool {
        let st = self.lock();
        st.hosts
            .iter()
            .filter(|(a, _)| **a != except)
            .any(|(_, h)| self.upstream.close_one_idle(&h.handle.conns))
    }

    /// Feeds passive outlier detection with one request's result.
    pub fn record_result(&self, addr: SocketAddr, result: RequestResult) {
        let Some(policy) = &self.outlier_policy else {
            return;
        };
        let now = now();
        let mut st = self.lock();
        let total = st.hosts.len();
        let ejected = match result {
            RequestResult::Success => 0,
            RequestResult::Failure => st
                .hosts
                .values()
                .filter(|h| h.outlier.is_ejected(now))
                .count(),
        };
        let Some(h) = st.hosts.get_mut(&addr) else {
            return;
        };
        if let Some(until) = h.outlier.record(result, now, policy, ejected, total) {
            h.handle.count_ejection();
            st.routing.fresh = false;
            tracing::warn!(cluster = %self.name(), host = %addr, ejected_for_ms = (until - now).as_millis() as u64, "host ejected by outlier detection");
        }
    }

    /// Periodic upkeep: outlier sweep (when `sweep_outliers`), closing of upstream connections
    /// idle past the idle timeout, removal of drained hosts whose in-flight requests have
    /// finished, and the cluster's and hosts' gauges (through handles registered once, so a
    /// thousand hosts cost no lookups or allocations here).
    pub fn maintain(&self, sweep_outliers: bool) {
        let now = now();
        let mut st = self.lock();
        let checked = self.health_policy.is_some();
        let mut unejected = false;
        for h in st.hosts.values_mut() {
            if sweep_outliers {
                unejected |= h.outlier.sweep(now);
            }
            self.upstream.evict_idle(&h.handle.conns);
            let ejected = h.outlier.is_ejected(now);
            let routed = merge::decide(h.discovery, h.health.status(), checked) == Decision::Route;
            h.gauges.publish(&h.handle, ejected, routed && !ejected);
            if checked && h.health.checks() > 0 {
                let healthy = h.health.status() == HealthStatus::Healthy;
                h.gauges.publish_health(&h.handle, healthy);
            }
        }
        if unejected {
            st.routing.fresh = false;
        }
        self.reconcile(&mut st);
        self.refresh_routing(&mut st);
        let State {
            gauges, routing, ..
        } = &mut *st;
        gauges.publish(
            self.name(),
            routing.handles.len(),
            routing.panic,
            self.active_requests(),
            self.retries_in_flight(),
        );
    }

    /// Registers every gauge handle again on its next publish: after a stall as long as the
    /// exporter's idle timeout, it may have dropped gauges whose handles we still hold.
    pub fn reregister_gauges(&self) {
        let mut st = self.lock();
        st.gauges.forget();
        for h in st.hosts.values_mut() {
            h.gauges.forget();
        }
    }
}

#[cfg(test)]
mod tests;
