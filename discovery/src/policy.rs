//! The registry's decisions as pure functions of rows and time (DESIGN.md §4.2): liveness,
//! self-preservation, warm-up, the content-hash index and blocking-query deadlines. Nothing
//! here touches a store, a socket or a clock, so every rule is unit-tested directly.

use std::time::Duration;

use schema::Endpoint;
use sha2::{Digest, Sha256};

use crate::config::RegistryConfig;
use crate::store::StoredEndpoint;

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

/// When the first visible row will expire (ms), so a cached answer is not served past it.
pub fn next_expiry_ms(rows: &[StoredEndpoint], ttl: Duration) -> Option<u64> {
    rows.iter()
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

/// Eureka-style self-preservation.
///
/// The registry keeps a *baseline*: how many renewals (check-ins per interval) it expects.
/// When fewer than `threshold` (85 %) of them arrive, it assumes the fault is on the path to
/// it (a broken network, a fleet-wide cron failure, its own outage) rather than that most
/// hosts died at once, and stops expiring anything until renewals recover.
///
/// How the baseline moves, and so the scale-down story:
/// - **At start** it is the number of rows that were live when the newest check-in in the
///   store happened ([`startup_baseline`]): a registry back from an outage longer than the
///   TTL expects the fleet it last saw and preserves it until hosts return, while rows that
///   had already expired before the outage do not count.
/// - **Growth is taken at once**: renewals above the baseline raise it (Eureka raises its
///   expectation on every register).
/// - **Deregistration lowers it at once** by the number of rows removed (Eureka's cancel):
///   the supported way to scale down fast is to deregister (agents do on shutdown).
/// - **Every `baseline_refresh` (15 min)** it is recomputed from the renewals, but only when
///   renewals are above the threshold — exactly Eureka's `updateRenewalThreshold`. So a
///   gradual scale-down (less than 15 % per refresh period) is absorbed, while a sudden loss
///   of more than 15 % without deregistration keeps the old baseline, and the registry
///   serves those hosts, flagged stale, until they return, are deregistered, or an operator
///   disables self-preservation. Consumers are not harmed meanwhile: proxies health-check
///   every host and stop routing to dead ones (DESIGN.md §6.3).
#[derive(Debug, Clone, PartialEq)]
pub struct Preservation {
    enabled: bool,
    threshold: f64,
    refresh_ms: u64,
    baseline: u64,
    last_refresh_ms: u64,
    /// Preservation holds until then, whatever the renewals say ([`Preservation::hold`]).
    hold_until_ms: u64,
    active: bool,
}

impl Preservation {
    /// `baseline` is the starting expectation ([`startup_baseline`]; 0 for an empty store).
    pub fn new(cfg: &RegistryConfig, now_ms: u64, baseline: u64) -> Self {
        Preservation {
            enabled: cfg.self_preservation,
            threshold: cfg.renewal_threshold,
            refresh_ms: ms(cfg.baseline_refresh),
            baseline,
            last_refresh_ms: now_ms,
            hold_until_ms: 0,
            active: false,
        }
    }

    /// Folds in a census; returns whether `active` changed.
    pub fn observe(&mut self, census: Census, now_ms: u64) -> bool {
        let healthy = |baseline: u64| census.renewed as f64 >= self.threshold * baseline as f64;
        if census.renewed > self.baseline {
            self.baseline = census.renewed;
        }
        if now_ms.saturating_sub(self.last_refresh_ms) >= self.refresh_ms {
            self.last_refresh_ms = now_ms;
            if healthy(self.baseline) {
                self.baseline = census.renewed;
            }
        }
        let was = self.active;
        let held = now_ms < self.hold_until_ms;
        self.active = self.enabled && self.baseline > 0 && (held || !healthy(self.baseline));
        was != self.active
    }

    /// The registry was blind to check-ins for longer than the [`shelf_life`]: the renewals
    /// it counts now say more about its own absence than about the fleet. Preservation (if
    /// enabled, and once there is a baseline) holds until `until_ms` — one renewal window
    /// after the registry can see again, the time every host needs to check in once.
    pub fn hold(&mut self, until_ms: u64) {
        self.hold_until_ms = self.hold_until_ms.max(until_ms);
    }

    /// Rows were deregistered on purpose: expect that many fewer renewals.
    pub fn on_deregister(&mut self, removed: u64) {
        self.baseline = self.baseline.saturating_sub(removed);
    }

    pub fn active(&self) -> bool {
        self.active
    }

    pub fn baseline(&self) -> u64 {
        self.baseline
    }
}

/// The baseline a registry starts with: rows within the TTL of the newest check-in in the
/// store, i.e. the fleet as it was when check-ins last arrived, however long ago that was.
pub fn startup_baseline(rows: &[StoredEndpoint], ttl: Duration) -> u64 {
    let Some(newest) = rows.iter().map(|r| r.last_check_in_ms).max() else {
        return 0;
    };
    rows.iter()
        .filter(|r| is_live(newest, r.last_check_in_ms, ttl))
        .count() as u64
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

/// The index of a set of visible rows: the first 64 bits of a SHA-256 over every endpoint
/// (tags and effective weight included, `last_check_in` excluded), in key order. A plain
/// re-check-in leaves it unchanged; every registry replica computes the same value from the
/// same rows. Never 0, so clients can use 0 for "no index yet".
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
    u64::from_be_bytes(first).max(1)
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

#[cfg(test)]
mod tests;
