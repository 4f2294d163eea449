//! The registry's decisions as pure functions of rows and time: liveness,
//! self-preservation, warm-up, the content-hash index and blocking-query deadlines. Nothing
//! here touches a store, a socket or a clock, so every rule is unit-tested directly.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use schema::{Endpoint, EndpointKey, ServiceName};
use sha2::{Digest, Sha256};

use crate::config::RegistryConfig;
use crate::store::{ServiceRows, StoredEndpoint};

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Live while `now - last_check_in < ttl`. A check-in stamped in the future (another
/// replica's clock running ahead) counts as just now.
pub fn is_live(now_ms: u64, last_check_in_ms: u64, ttl: Duration) -> bool {
    now_ms.saturating_sub(last_check_in_ms) < ms(ttl)
}

/// The renewal window: a row renewed "this interval" if it checked in within the check-in
/// interval plus a quarter, so cron jitter and a retried check-in don't count as missing.
pub fn renewal_window(check_in_interval: Duration) -> Duration {
    check_in_interval + check_in_interval / 4
}

/// What readers see: live rows, or every row while self-preservation holds (nothing expires
/// then). Sorted by (service, ip, port) so answers and indexes are deterministic.
pub fn visible(
    mut rows: Vec<StoredEndpoint>,
    now_ms: u64,
    ttl: Duration,
    preserving: bool,
) -> Vec<StoredEndpoint> {
    if !preserving {
        rows.retain(|r| is_live(now_ms, r.last_check_in_ms, ttl));
    }
    rows.sort_by(|a, b| {
        let (a, b) = (&a.endpoint, &b.endpoint);
        (&a.service, a.ip, a.port).cmp(&(&b.service, b.ip, b.port))
    });
    rows
}

/// [`visible`] for rows held as one shared list per service (in service order, each in key
/// order): a list with no row past the TTL is kept as it is, shared, and a list left with
/// none is dropped.
pub fn visible_shared(
    services: Vec<ServiceRows>,
    now_ms: u64,
    ttl: Duration,
    preserving: bool,
) -> Vec<ServiceRows> {
    if preserving {
        return services;
    }
    services
        .into_iter()
        .filter_map(|rows| {
            if rows
                .iter()
                .all(|r| is_live(now_ms, r.last_check_in_ms, ttl))
            {
                return Some(rows);
            }
            let live: Vec<StoredEndpoint> = rows
                .iter()
                .filter(|r| is_live(now_ms, r.last_check_in_ms, ttl))
                .cloned()
                .collect();
            (!live.is_empty()).then(|| ServiceRows::from(live))
        })
        .collect()
}

/// When the first visible row will expire (ms), so a cached answer is not served past it.
pub fn next_expiry_ms<'a>(
    rows: impl IntoIterator<Item = &'a StoredEndpoint>,
    ttl: Duration,
) -> Option<u64> {
    rows.into_iter()
        .map(|r| r.last_check_in_ms.saturating_add(ms(ttl)))
        .min()
}

/// How long a self-preservation decision can be trusted: `ttl - check_in_interval`. A
/// registry that has not counted its fleet for that long (its process was paused, its runtime
/// starved, its store unreadable) may find that hosts which checked in just before look
/// expired, only because their check-ins could not reach it. Eureka compensates evictions
/// for such pauses; we count again before answering, and hold preservation for a renewal
/// window ([`Preservation::hold`]) so every host gets its chance to check in.
pub fn shelf_life(cfg: &RegistryConfig) -> Duration {
    cfg.ttl.saturating_sub(cfg.check_in_interval)
}

/// Counts for self-preservation, taken from the store so they hold across replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Rows that checked in within the TTL.
    pub live: u64,
    /// Rows that checked in within the renewal window (the last check-in interval).
    pub renewed: u64,
    /// Every stored row, expired or not.
    pub stored: u64,
}

impl Census {
    pub fn take(rows: &[StoredEndpoint], now_ms: u64, cfg: &RegistryConfig) -> Census {
        let window = renewal_window(cfg.check_in_interval);
        let count = |d: Duration| {
            rows.iter()
                .filter(|r| is_live(now_ms, r.last_check_in_ms, d))
                .count() as u64
        };
        Census {
            live: count(cfg.ttl),
            renewed: count(window),
            stored: rows.len() as u64,
        }
    }
}

/// One count of the fleet as self-preservation needs it: the numbers, and *which* rows
/// renewed, so the baseline can remember the endpoints it is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    pub census: Census,
    /// Keys of the rows that checked in within the renewal window.
    pub renewed: BTreeSet<EndpointKey>,
}

impl Fleet {
    pub fn take(rows: &[StoredEndpoint], now_ms: u64, cfg: &RegistryConfig) -> Fleet {
        let window = renewal_window(cfg.check_in_interval);
        Fleet {
            census: Census::take(rows, now_ms, cfg),
            renewed: rows
                .iter()
                .filter(|r| is_live(now_ms, r.last_check_in_ms, window))
                .map(|r| r.endpoint.key())
                .collect(),
        }
    }
}

/// A deregistration as the baseline sees it: the service's rows on `ip`, or only the one on
/// `port` when given (the same selection the store deletes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deregistration {
    pub service: ServiceName,
    pub ip: IpAddr,
    pub port: Option<NonZeroU16>,
}

impl Deregistration {
    fn matches(&self, key: &EndpointKey) -> bool {
        key.service == self.service && key.ip == self.ip && self.port.is_none_or(|p| p == key.port)
    }
}

/// Eureka-style self-preservation.
///
/// The registry keeps a *baseline*: the set of endpoints it expects to renew every interval
/// (its size is the expected renewal count). When fewer than `threshold` (85 %) of them
/// renew, it assumes the fault is on the path to it (a broken network, a fleet-wide cron
/// failure, its own outage) rather than that most hosts died at once, and stops expiring
/// anything until renewals recover.
///
/// The baseline is a set of keys, not a number, so that what leaves it is exactly what was
/// counted into it: nothing done to *other* endpoints (registering and deleting endpoints
/// of another service, say) can lower the protection of the ones already counted. How it
/// moves, and so the scale-down story:
/// - **At start** it is the rows that were live when the newest check-in in the store
///   happened ([`startup_baseline`]): a registry back from an outage longer than the TTL
///   expects the fleet it last saw and preserves it until hosts return, while rows that had
///   already expired before the outage do not count.
/// - **Growth is taken at once**: every renewing endpoint joins the baseline (Eureka raises
///   its expectation on every register). A new endpoint adds to the expectation; it never
///   replaces the silent ones.
/// - **Deregistration takes out what it removes, and only that** (Eureka's cancel): the
///   deregistered endpoints leave the baseline if they were in it; an endpoint registered
///   and deleted again leaves the baseline where it was before. The supported way to scale
///   down fast is to deregister (agents do on shutdown).
/// - **Every `baseline_refresh` (15 min)** it is recomputed as the renewing endpoints, but
///   only when renewals are above the threshold — exactly Eureka's `updateRenewalThreshold`.
///   So a gradual scale-down (less than 15 % per refresh period) is absorbed, while a sudden
///   loss of more than 15 % without deregistration keeps the old baseline, and the registry
///   serves those hosts, flagged stale, until they return, are deregistered, or an operator
///   disables self-preservation. Consumers are not harmed meanwhile: proxies health-check
///   every host and stop routing to dead ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Preservation {
    enabled: bool,
    threshold: f64,
    refresh_ms: u64,
    counted: BTreeSet<EndpointKey>,
    last_refresh_ms: u64,
    /// Preservation holds until then, whatever the renewals say ([`Preservation::hold`]).
    hold_until_ms: u64,
    active: bool,
    /// Deregistrations since the oldest count still in flight, numbered by `seq`: a count
    /// read before a deregistration still lists the removed rows as renewed, and must not
    /// put them back into the baseline ([`Preservation::ticket`]).
    deregistered: Vec<(u64, Deregistration)>,
    seq: u64,
}

impl Preservation {
    /// `counted` is the starting baseline ([`startup_baseline`]; empty for an empty store).
    pub fn new(cfg: &RegistryConfig, now_ms: u64, counted: BTreeSet<EndpointKey>) -> Self {
        Preservation {
            enabled: cfg.self_preservation,
            threshold: cfg.renewal_threshold,
            refresh_ms: ms(cfg.baseline_refresh),
            counted,
            last_refresh_ms: now_ms,
            hold_until_ms: 0,
            active: false,
            deregistered: Vec::new(),
            seq: 0,
        }
    }

    /// The first count after start: the baseline becomes `counted` ([`startup_baseline`]),
    /// less whatever was deregistered since `ticket` was taken, then `fleet` is folded in.
    pub fn start(
        &mut self,
        counted: BTreeSet<EndpointKey>,
        fleet: &Fleet,
        ticket: u64,
        now_ms: u64,
    ) -> bool {
        let late = &self.deregistered;
        self.counted = counted
            .into_iter()
            .filter(|k| !late.iter().any(|(seq, d)| *seq > ticket && d.matches(k)))
            .collect();
        self.last_refresh_ms = now_ms;
        self.observe(fleet, ticket, now_ms)
    }

    /// Take one before reading the rows of a count, and pass it to [`Preservation::observe`]
    /// with that count: deregistrations that happen meanwhile are then not undone by it.
    pub fn ticket(&self) -> u64 {
        self.seq
    }

    /// Folds in a count of the fleet read after `ticket` was taken; returns whether `active`
    /// changed.
    pub fn observe(&mut self, fleet: &Fleet, ticket: u64, now_ms: u64) -> bool {
        let late: Vec<&Deregistration> = self
            .deregistered
            .iter()
            .filter(|(seq, _)| *seq > ticket)
            .map(|(_, d)| d)
            .collect();
        let renewed: BTreeSet<&EndpointKey> = fleet
            .renewed
            .iter()
            .filter(|k| !late.iter().any(|d| d.matches(k)))
            .collect();
        // Counts are serialised (one at a time), so entries this one has seen are done.
        self.deregistered.retain(|(seq, _)| *seq > ticket);
        // Growth first, so new endpoints are judged as additions to the expectation: they
        // must not make renewals look healthy while the counted ones are silent.
        self.counted.extend(renewed.iter().map(|k| (*k).clone()));
        if now_ms.saturating_sub(self.last_refresh_ms) >= self.refresh_ms {
            self.last_refresh_ms = now_ms;
            if self.healthy(renewed.len()) {
                self.counted = renewed.iter().map(|k| (*k).clone()).collect();
            }
        }
        let was = self.active;
        let held = now_ms < self.hold_until_ms;
        self.active =
            self.enabled && !self.counted.is_empty() && (held || !self.healthy(renewed.len()));
        was != self.active
    }

    /// Whether `renewed` renewals (every one of them from a counted endpoint) meet the
    /// threshold of the baseline.
    fn healthy(&self, renewed: usize) -> bool {
        renewed as f64 >= self.threshold * self.counted.len() as f64
    }

    /// The registry was blind to check-ins for longer than the [`shelf_life`]: the renewals
    /// it counts now say more about its own absence than about the fleet. Preservation (if
    /// enabled, and once there is a baseline) holds until `until_ms` — one renewal window
    /// after the registry can see again, the time every host needs to check in once.
    pub fn hold(&mut self, until_ms: u64) {
        self.hold_until_ms = self.hold_until_ms.max(until_ms);
    }

    /// After a blind spot: the endpoints the registry last saw live join the baseline (less
    /// any deregistered since `ticket`), so a baseline that never counted them — taken on
    /// an empty store just before a pause — still protects them.
    pub fn widen(&mut self, seen: BTreeSet<EndpointKey>, ticket: u64) {
        let late = &self.deregistered;
        self.counted.extend(
            seen.into_iter()
                .filter(|k| !late.iter().any(|(seq, d)| *seq > ticket && d.matches(k))),
        );
    }

    /// Rows were deregistered on purpose: the ones the baseline counted leave it (and no
    /// count read before this call puts them back). Returns how many left.
    pub fn on_deregister(&mut self, d: Deregistration) -> usize {
        let before = self.counted.len();
        // Keys sort by service, then ip, then port: the matches are one range, found in
        // O(log n) rather than by walking a baseline of the whole fleet per deregistration.
        let key = |port| EndpointKey {
            service: d.service.clone(),
            ip: d.ip,
            port,
        };
        let (lo, hi) = match d.port {
            Some(p) => (key(p), key(p)),
            None => (key(NonZeroU16::MIN), key(NonZeroU16::MAX)),
        };
        let gone: Vec<EndpointKey> = self.counted.range(lo..=hi).cloned().collect();
        for k in &gone {
            self.counted.remove(k);
        }
        self.seq += 1;
        self.deregistered.push((self.seq, d));
        before - self.counted.len()
    }

    pub fn active(&self) -> bool {
        self.active
    }

    /// The expected renewals per interval: how many endpoints the baseline counts.
    pub fn baseline(&self) -> u64 {
        self.counted.len() as u64
    }

    /// Whether the baseline counts this endpoint.
    pub fn counts(&self, key: &EndpointKey) -> bool {
        self.counted.contains(key)
    }
}

/// The baseline a registry starts with: rows within the TTL of the newest check-in in the
/// store, i.e. the fleet as it was when check-ins last arrived, however long ago that was.
pub fn startup_baseline(rows: &[StoredEndpoint], ttl: Duration) -> BTreeSet<EndpointKey> {
    let Some(newest) = rows.iter().map(|r| r.last_check_in_ms).max() else {
        return BTreeSet::new();
    };
    rows.iter()
        .filter(|r| is_live(newest, r.last_check_in_ms, ttl))
        .map(|r| r.endpoint.key())
        .collect()
}

/// A registry whose store was empty at start answers `warming` for one check-in interval:
/// until every host had its chance to check in, its view may be incomplete.
pub fn warming(
    store_was_empty: bool,
    started_ms: u64,
    now_ms: u64,
    check_in_interval: Duration,
) -> bool {
    store_was_empty && now_ms.saturating_sub(started_ms) < ms(check_in_interval)
}

/// The index of a set of endpoints: the first 53 bits of a SHA-256 over every endpoint (tags
/// and effective weight included, `last_check_in` excluded), in key order. A plain
/// re-check-in leaves it unchanged; every registry replica computes the same value from the
/// same rows. At most 2^53 - 1, so it
/// survives a JSON number in any client (a double); never 0, so clients can use 0 for "no
/// index yet".
pub fn content_index<'a>(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> u64 {
    let mut h = Sha256::new();
    for ep in endpoints {
        // serde_json of the derived form is deterministic (tag maps are BTreeMaps); length
        // prefixes keep two different sequences from hashing the same bytes.
        let bytes = serde_json::to_vec(ep).unwrap_or_default();
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(&bytes);
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11).max(1)
}

/// How long a blocking query waits: the requested wait capped at `max_wait`, then moved by up
/// to ±1/16 of itself (`unit` in [0, 1) picks where) so a fleet that synced together does not
/// come back together. Clients should time out after `wait * 17/16` plus their usual margin.
pub fn blocking_wait(requested: Duration, max_wait: Duration, unit: f64) -> Duration {
    let wait = requested.min(max_wait);
    let spread = wait.as_secs_f64() / 16.0;
    let offset = (unit.clamp(0.0, 1.0) * 2.0 - 1.0) * spread;
    Duration::try_from_secs_f64((wait.as_secs_f64() + offset).max(0.0)).unwrap_or(wait)
}

/// `Retry-After` seconds for a blocking query refused past `max_blocking_waiters`: 1 to 5,
/// spread by `unit` (uniform in [0, 1]) so a refused crowd does not return in lockstep.
pub fn waiter_retry_after(unit: f64) -> u64 {
    // `as` saturates; the clamp keeps NaN and out-of-range draws inside 1..=5.
    1 + (unit.clamp(0.0, 1.0) * 4.0).round() as u64
}

#[cfg(test)]
mod tests;
