//! What the agent's tasks share: config, the registry client, the gossip handle, the
//! published merged view, this host's endpoints, registry freshness and metrics.
//!
//! Registry freshness ([`Freshness`], behind `X-Tidings-Registry-Age-Ms` and the
//! `tidings_agent_registry_age_seconds` metric) is how long since this agent last *knew* its
//! registry data was current. It knows it when an authoritative (not warming) catalog answer
//! arrives, and all along while a blocking catalog query is in flight that was sent after
//! such an answer: the registry would have answered it had anything changed. That claim
//! ends when the query fails, or when it has been out longer than its wait plus margin; the
//! age then grows from the last moment known current. A registry snapshot relayed by a peer
//! counts from its registry date, but never from later than this agent first saw it (a
//! snapshot dated in the future cannot make the age 0). Time comes from an injected
//! [`Clock`], so tests move it by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use discovery::{Clock, RegistryClient};
use gossip::GossipHandle;
use schema::{Endpoint, EndpointKey};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::metrics::{Metrics, Readings};
use crate::view::MergedView;

/// This host's endpoints: from the config, registered at runtime, and the agent's own.
#[derive(Debug, Clone, Default)]
pub struct LocalEndpoints {
    pub configured: Vec<Endpoint>,
    pub runtime: BTreeMap<EndpointKey, Endpoint>,
    pub agent: Option<Endpoint>,
}

impl LocalEndpoints {
    /// Everything this host serves; a runtime registration overrides a configured one.
    pub fn all(&self) -> Vec<Endpoint> {
        let mut by_key: BTreeMap<EndpointKey, Endpoint> = self
            .configured
            .iter()
            .chain(self.agent.as_ref())
            .map(|e| (e.key(), e.clone()))
            .collect();
        by_key.extend(self.runtime.iter().map(|(k, e)| (k.clone(), e.clone())));
        by_key.into_values().collect()
    }
}

pub struct Shared {
    pub config: AgentConfig,
    pub client: RegistryClient,
    pub gossip: GossipHandle,
    pub gossip_addr: SocketAddr,
    pub host_ip: IpAddr,
    pub view: watch::Receiver<Arc<MergedView>>,
    pub local: Mutex<LocalEndpoints>,
    /// Bumped on every change of `local`: the cache writer persists runtime endpoints.
    pub local_version: watch::Sender<u64>,
    /// Check in now (after a small random delay): the registry restarted or endpoints changed.
    pub recheck: Notify,
    /// A check-in succeeded after failures: the registry is back, sync now.
    pub registry_back: Notify,
    /// Signed gossip: the owner key offered at check-in (unset while signing is off).
    pub signing: std::sync::OnceLock<crate::signing::Signing>,
    /// When the registry data was last known current; see [`Freshness`].
    freshness: Mutex<Freshness>,
    /// Ms for freshness: a [`SteadyClock`] (tests inject a manual one).
    clock: Arc<dyn Clock>,
    /// Every key the last authoritative registry answer listed (`None`: none yet): the view
    /// task drops disk-cache entries it does not list.
    pub registry_listed: watch::Sender<Option<Arc<BTreeSet<EndpointKey>>>>,
    /// Index of the view the disk cache last stored (0: none yet).
    pub cache_index: AtomicU64,
    registry_ok: AtomicBool,
    /// The digest of the registry catalog last taken ([`crate::sync`]), for `/v1/agent/self`.
    registry_digest: Mutex<Option<String>>,
    /// Fires when the agent starts shutting down: readiness fails, blocking queries answer.
    pub draining: CancellationToken,
    /// One permit per blocking query waiting on the local API (`max_blocking_waiters`).
    pub waiters: Arc<tokio::sync::Semaphore>,
    /// Endpoints withdrawn here whose deletion the registry has not confirmed yet
    /// ([`crate::checkin::retry_deregistrations`]).
    pub pending_deregistrations: Mutex<BTreeMap<EndpointKey, Endpoint>>,
    pub metrics: Metrics,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: AgentConfig,
        client: RegistryClient,
        gossip: GossipHandle,
        host_ip: IpAddr,
        view: watch::Receiver<Arc<MergedView>>,
        local: LocalEndpoints,
        known_current_ms: u64,
        draining: CancellationToken,
    ) -> Self {
        let gossip_addr = gossip.id().addr;
        let waiters = Arc::new(tokio::sync::Semaphore::new(
            config
                .max_blocking_waiters
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let clock = Arc::new(SteadyClock::starting_now());
        let freshness = Freshness::new(known_current_ms, clock.now_ms());
        Shared {
            config,
            client,
            gossip,
            gossip_addr,
            host_ip,
            view,
            local: Mutex::new(local),
            local_version: watch::Sender::new(0),
            recheck: Notify::new(),
            registry_back: Notify::new(),
            signing: std::sync::OnceLock::new(),
            freshness: Mutex::new(freshness),
            clock,
            registry_listed: watch::Sender::new(None),
            cache_index: AtomicU64::new(0),
            registry_ok: AtomicBool::new(false),
            registry_digest: Mutex::new(None),
            waiters,
            draining,
            pending_deregistrations: Mutex::new(BTreeMap::new()),
            metrics: Metrics::default(),
        }
    }

    pub fn local(&self) -> MutexGuard<'_, LocalEndpoints> {
        // A panic while holding the lock cannot leave the endpoint set half-updated (every
        // update is a single insert or remove), so a poisoned lock is still usable.
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes this host's current endpoints to gossip and asks for a check-in.
    pub async fn local_changed(&self) {
        let all = self.local().all();
        if self.gossip.publish_local(all).await.is_err() {
            tracing::warn!("gossip has stopped; local endpoints not published");
        }
        self.local_version.send_modify(|v| *v += 1);
        self.recheck.notify_one();
    }

    /// Replaces the clock freshness is measured with (tests).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub(crate) fn freshness(&self) -> MutexGuard<'_, Freshness> {
        // Every update is a few plain stores: a panic cannot leave it inconsistent.
        self.freshness.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_registry_ok(&self, ok: bool) {
        self.registry_ok.store(ok, Ordering::Relaxed);
    }

    /// Whether the last registry sync attempt succeeded.
    pub fn set_registry_digest(&self, digest: Option<String>) {
        *self
            .registry_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = digest;
    }

    pub fn registry_digest(&self) -> Option<String> {
        self.registry_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn registry_ok(&self) -> bool {
        self.registry_ok.load(Ordering::Relaxed)
    }

    /// Takes note of the newest registry snapshot gossip holds (ours or a peer's).
    pub fn note_relayed(&self) {
        let newest = self
            .gossip
            .view()
            .borrow()
            .snapshots
            .iter()
            .map(|s| s.generated_at_ms)
            .max()
            .unwrap_or(0);
        let now = self.now_ms();
        self.freshness().relayed(newest, now);
    }

    /// Wall-clock ms up to which the registry data is known current (0: never); what the
    /// disk cache stores, so a restarted agent goes on counting from there.
    pub fn known_current_ms(&self) -> u64 {
        self.note_relayed();
        let now = self.now_ms();
        self.freshness().current_at(now)
    }

    /// Milliseconds since the registry data was last known current: an authoritative answer,
    /// or a blocking query still waiting at a registry that answered the one before; `None`:
    /// never, neither here, in the disk cache nor from a peer.
    pub fn registry_age_ms(&self) -> Option<u64> {
        self.note_relayed();
        let now = self.now_ms();
        self.freshness().age_ms(now)
    }

    pub fn current_view(&self) -> Arc<MergedView> {
        self.view.borrow().clone()
    }

    /// Prometheus text exposition of the agent's metrics.
    pub fn render_metrics(&self) -> String {
        let view = self.current_view();
        let members = self.gossip.members();
        let alive = members.iter().filter(|m| m.active).count();
        self.metrics.render(&Readings {
            registry_age_s: self.registry_age_ms().map_or(-1.0, |ms| ms as f64 / 1000.0),
            view_endpoints: view.len(),
            view_services: view.services().count(),
            draining_endpoints: view.draining_len(),
            members_alive: alive,
            members_down: members.len() - alive,
            local_endpoints: self.local().all().len(),
            gossip: self.gossip.metrics(),
        })
    }
}

/// The clock freshness is measured with: the wall clock read once at start, then advanced by
/// the monotonic clock. An age is elapsed time, and elapsed time must not shrink because NTP
/// (or an operator) stepped the wall clock back after start: a stepped clock would make the
/// header claim data fresher than it is. Values stay comparable with wall-clock dates (relayed
/// snapshots, the disk cache) up to the size of any step since start; relayed dates are
/// clamped to their arrival on this clock, so such a step errs towards an older age.
#[derive(Debug, Clone, Copy)]
pub struct SteadyClock {
    wall_at_start_ms: u64,
    start: Instant,
}

impl SteadyClock {
    pub fn starting_now() -> Self {
        SteadyClock::starting_at(schema::timefmt::unix_ms_now())
    }

    pub fn starting_at(wall_ms: u64) -> Self {
        SteadyClock {
            wall_at_start_ms: wall_ms,
            start: Instant::now(),
        }
    }
}

impl Clock for SteadyClock {
    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.wall_at_start_ms.saturating_add(elapsed)
    }
}

/// Registry freshness bookkeeping, sans-IO: every time is ms of the freshness clock
/// ([`SteadyClock`] in production) passed in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Freshness {
    /// The last moment known current, outside any query in flight (0: never).
    known_ms: u64,
    /// A blocking query sent after an authoritative answer is out: the data counts as
    /// current up to now, but not past this deadline (its wait plus margin).
    in_flight_until: Option<u64>,
    /// The last answer was authoritative (a warming one or a failure clears it).
    healthy: bool,
    /// The newest registry snapshot date gossip holds, and when this agent first saw it.
    relayed_ms: u64,
    relayed_seen_ms: u64,
}

impl Freshness {
    /// `known_ms`: from the disk cache (0: none); `now`: this clock at start. A cached
    /// moment ahead of `now` is not taken: this host's clock was stepped back since it was
    /// written, so how long ago it was cannot be told, and clamping it to `now` would claim
    /// the data fresh for as long as the step (long campaign run 7, seed
    /// 6050724522341991563: an agent restarted with its clock 34 min behind said "0 ms" while
    /// its registry was dead). "Never" is the honest answer until the registry answers.
    pub fn new(known_ms: u64, now: u64) -> Self {
        Freshness {
            known_ms: if known_ms > now { 0 } else { known_ms },
            ..Default::default()
        }
    }

    /// A catalog query goes out at `now`. `blocking`: it passes a current index and may be
    /// held this long by the registry (plus its jitter); `timeout` is the request timeout
    /// on top, the margin before a silent query stops counting.
    pub fn query_sent(&mut self, now: u64, blocking: Option<Duration>, timeout: Duration) {
        self.in_flight_until = match blocking {
            Some(wait) if self.healthy => {
                let margin = wait + wait / 16 + timeout;
                Some(now.saturating_add(u64::try_from(margin.as_millis()).unwrap_or(u64::MAX)))
            }
            _ => None,
        };
    }

    /// An answer to the query sent at `sent` arrived at `now`. An authoritative one makes
    /// the data current as of `now` if the query was in flight under the claim (the
    /// registry held it while nothing changed), else as of when it was asked.
    pub fn answered(&mut self, now: u64, sent: u64, authoritative: bool) {
        if authoritative {
            let held_current = self.in_flight_until.is_some_and(|until| now <= until);
            let at = if held_current { now } else { sent.min(now) };
            self.known_ms = self.known_ms.max(at);
        }
        self.healthy = authoritative;
        self.in_flight_until = None;
    }

    /// The query failed (error or timeout): nothing it covered counts any more.
    pub fn failed(&mut self) {
        self.healthy = false;
        self.in_flight_until = None;
    }

    /// Gossip's newest registry snapshot is dated `newest` (registry clock); seen at `now`.
    /// A lower bound (a warming answer dated at the start of time) says nothing of when the
    /// data was current.
    pub fn relayed(&mut self, newest: u64, now: u64) {
        if gossip::is_lower_bound_date(newest) {
            return;
        }
        if newest > self.relayed_ms {
            self.relayed_ms = newest;
            self.relayed_seen_ms = now;
        }
    }

    /// The last moment the data is known current, as of `now` (0: never).
    pub fn current_at(&self, now: u64) -> u64 {
        let in_flight = self.in_flight_until.map_or(0, |until| until.min(now));
        // Clamped to when we first saw it: a snapshot dated ahead of our clock says nothing
        // about any moment after its arrival.
        let relayed = self.relayed_ms.min(self.relayed_seen_ms);
        self.known_ms.max(in_flight).max(relayed).min(now)
    }

    /// Milliseconds since the data was last known current; `None`: never.
    pub fn age_ms(&self, now: u64) -> Option<u64> {
        match self.current_at(now) {
            0 => None,
            at => Some(now.saturating_sub(at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steady_clock_starts_at_the_wall_reading_and_only_moves_forward() {
        let clock = SteadyClock::starting_at(5_000_000);
        let first = clock.now_ms();
        assert!((5_000_000..5_060_000).contains(&first), "{first}");
        let mut last = first;
        for _ in 0..1_000 {
            let now = clock.now_ms();
            assert!(now >= last, "went back from {last} to {now}");
            last = now;
        }
    }

    const S: u64 = 1_000;
    const WAIT: Duration = Duration::from_secs(30);
    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn a_healthy_blocking_query_in_flight_keeps_the_data_current() {
        let t0 = 1_000_000;
        let mut f = Freshness::new(0, 0);
        assert_eq!(f.age_ms(t0), None, "never synced");
        // First query: no index, answered at once.
        f.query_sent(t0, None, TIMEOUT);
        f.answered(t0 + 5, t0, true);
        assert_eq!(f.age_ms(t0 + 5), Some(5), "current as of when it was asked");
        // Blocking query held 25 s by a healthy registry: the age stays 0 all along.
        f.query_sent(t0 + 10, Some(WAIT), TIMEOUT);
        for dt in [0, S, 20 * S, 25 * S] {
            assert_eq!(f.age_ms(t0 + 10 + dt), Some(0), "+{dt} ms");
        }
        f.answered(t0 + 10 + 25 * S, t0 + 10, true);
        assert_eq!(f.age_ms(t0 + 10 + 25 * S + 3), Some(3));
    }

    #[test]
    fn the_age_grows_from_the_last_known_moment_once_a_query_fails_or_overstays() {
        let t0 = 1_000_000;
        let mut f = Freshness::new(0, 0);
        f.query_sent(t0, None, TIMEOUT);
        f.answered(t0, t0, true);
        f.query_sent(t0 + S, Some(WAIT), TIMEOUT);
        f.failed();
        assert_eq!(
            f.age_ms(t0 + 9 * S),
            Some(9 * S),
            "the failed query claims nothing"
        );
        // After failures the next query claims nothing while in flight, even if blocking.
        f.query_sent(t0 + 10 * S, Some(WAIT), TIMEOUT);
        assert_eq!(f.age_ms(t0 + 11 * S), Some(11 * S));
        // A success then is current as of when it was asked.
        f.answered(t0 + 12 * S, t0 + 10 * S, true);
        assert_eq!(f.age_ms(t0 + 12 * S), Some(2 * S));
        // A query that hangs past wait + wait/16 + timeout stops counting at its deadline.
        f.query_sent(t0 + 20 * S, Some(Duration::from_secs(16)), TIMEOUT);
        let deadline = t0 + 20 * S + 22 * S;
        assert_eq!(f.age_ms(deadline), Some(0));
        assert_eq!(f.age_ms(deadline + 7 * S), Some(7 * S));
        // Its late answer is current as of when it was asked, not when it came.
        f.answered(deadline + 8 * S, t0 + 20 * S, true);
        assert_eq!(f.age_ms(deadline + 8 * S), Some(30 * S));
    }

    #[test]
    fn a_relayed_lower_bound_makes_nothing_current() {
        // Found by the fault campaign: an age of 56 years, from a lower bound dated 1 ms.
        let mut f = Freshness::new(0, 0);
        f.relayed(gossip::LOWER_BOUND_MS + 3, 1_800_000_000_000);
        assert_eq!(f.age_ms(1_800_000_000_000), None);
    }

    #[test]
    fn a_cached_moment_ahead_of_a_stepped_back_clock_counts_as_never() {
        let t0 = 1_800_000_000_000;
        let f = Freshness::new(t0 + 34 * 60 * S, t0);
        assert_eq!(f.age_ms(t0 + 2 * S), None, "not 0 ms for 34 minutes");
        let f = Freshness::new(t0 - S, t0);
        assert_eq!(
            f.age_ms(t0 + 2 * S),
            Some(3 * S),
            "a cached moment behind is taken"
        );
    }

    #[test]
    fn warming_answers_claim_nothing_and_end_the_in_flight_claim() {
        let t0 = 1_000_000;
        let mut f = Freshness::new(t0 - 4 * S, t0);
        assert_eq!(f.age_ms(t0), Some(4 * S), "from the disk cache");
        f.answered(t0 + S, t0, false);
        f.query_sent(t0 + S, Some(WAIT), TIMEOUT);
        assert_eq!(f.age_ms(t0 + 2 * S), Some(6 * S));
    }

    #[test]
    fn relayed_snapshots_count_from_their_date_but_never_after_their_arrival() {
        let t0 = 1_800_000_000_000;
        let mut f = Freshness::new(0, 0);
        f.relayed(t0 - 2 * S, t0);
        assert_eq!(f.age_ms(t0), Some(2 * S));
        // Dated an hour ahead: counts as of its arrival, and then ages.
        f.relayed(t0 + 3_600 * S, t0 + S);
        assert_eq!(f.age_ms(t0 + S), Some(0));
        assert_eq!(f.age_ms(t0 + 61 * S), Some(60 * S));
        // Seeing it again changes nothing.
        f.relayed(t0 + 3_600 * S, t0 + 61 * S);
        assert_eq!(f.age_ms(t0 + 61 * S), Some(60 * S));
    }
}
