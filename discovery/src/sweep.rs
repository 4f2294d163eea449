//! The background sweeper: self-preservation accounting and bounded deletion of expired
//! rows. Reads never write; this is the only place rows expire from the store.

use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::policy::{self, Census, Fleet};
use crate::registry::Registry;
use crate::store::StoreError;

/// What one sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub census: Census,
    /// Expected renewals per interval after this sweep.
    pub baseline: u64,
    /// Self-preservation holds: nothing was deleted.
    pub preserving: bool,
    pub deleted: usize,
}

/// What one count of the fleet found.
struct FleetCount {
    census: Census,
    preserving: bool,
    baseline: u64,
    now: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Registry {
    /// One sweep: count rows and renewals (from the store, so every replica sharing it
    /// agrees), update self-preservation, then — unless it holds — delete at most
    /// `sweep_max_per_pass` expired rows. [`run_sweeper`] calls this every `sweep_interval`;
    /// tests call it directly after moving a [`crate::ManualClock`].
    pub async fn sweep_once(&self) -> Result<SweepReport, StoreError> {
        let res = self.sweep().await;
        let now = self.now_ms();
        self.inner
            .sweeps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(&res, now);
        res
    }

    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        self.ensure_init().await?;
        let FleetCount {
            census,
            preserving,
            baseline,
            now,
        } = {
            let _one = self.inner.census_lock.lock().await;
            self.count_fleet().await?
        };
        let inner = &self.inner;
        let cfg = &inner.config;
        let m = &inner.metrics;
        let mut deleted = 0;
        if !preserving && census.stored > census.live {
            let ttl_ms = ms(cfg.ttl);
            // Expired means `now - last >= ttl`, i.e. `last < now - ttl + 1`.
            let cutoff = now.saturating_sub(ttl_ms).saturating_add(1);
            deleted = self
                .store_call(
                    "delete_expired",
                    inner.store.delete_expired(cutoff, cfg.sweep_max_per_pass),
                )
                .await?;
            m.swept.increment(deleted as u64);
            if deleted > 0 {
                tracing::debug!(deleted, "swept expired endpoints");
            }
        }
        Ok(SweepReport {
            census,
            baseline,
            preserving,
            deleted,
        })
    }

    /// Before a read filters rows by the TTL: if the fleet was last counted longer than the
    /// [`policy::shelf_life`] ago (the process was stopped or starved, so the sweeper did
    /// not run), the self-preservation decision is stale — count now, and let every other
    /// read wait for that count rather than answer from the stale decision. A failed count
    /// is tried again by a read only after another shelf life, so a dead store does not
    /// double every read's wait.
    pub(crate) async fn recount_if_blind(&self) {
        let inner = &self.inner;
        let shelf = ms(policy::shelf_life(&inner.config));
        let older =
            |at: &AtomicU64| self.now_ms().saturating_sub(at.load(Ordering::Relaxed)) >= shelf;
        if !older(&inner.census_ok_ms) {
            return;
        }
        let _one = inner.census_lock.lock().await;
        if older(&inner.census_ok_ms) && older(&inner.census_try_ms) {
            if let Err(e) = self.count_fleet().await {
                tracing::debug!(error = %e, "fleet count before a read failed");
            }
        }
    }

    /// Counts rows and renewals and updates self-preservation. Callers hold `census_lock`.
    async fn count_fleet(&self) -> Result<FleetCount, StoreError> {
        let inner = &self.inner;
        let cfg = &inner.config;
        let now = self.now_ms();
        inner.census_try_ms.store(now, Ordering::Relaxed);
        let ticket = self.preservation().ticket();
        let rows = self.store_call("list_all", inner.store.list_all()).await?;
        let fleet = Fleet::take(&rows, now, cfg);
        self.recount_usage(&rows);
        // Blind since the last good count: longer than the shelf life, and the renewals
        // counted now reflect the registry's absence, not the fleet's.
        let blind_ms = now.saturating_sub(inner.census_ok_ms.load(Ordering::Relaxed));
        let blind = blind_ms >= ms(policy::shelf_life(cfg));
        // The fleet as the registry last saw it: every row within the TTL of the newest
        // check-in. A baseline that never counted them (a registry paused moments after an
        // empty start) must not leave them unprotected.
        let last_seen = blind.then(|| policy::startup_baseline(&rows, cfg.ttl));
        drop(rows);
        let census = fleet.census;
        if blind {
            self.restart_warm_up_if_cut();
        }
        let (preserving, baseline) = {
            let mut p = self.preservation();
            if let Some(seen) = last_seen {
                p.widen(seen, ticket);
                p.hold(now.saturating_add(ms(policy::renewal_window(cfg.check_in_interval))));
            }
            p.observe(&fleet, ticket, now);
            (p.active(), p.baseline())
        };
        let m = &inner.metrics;
        m.live.set(census.live as f64);
        m.stored.set(census.stored as f64);
        m.renewed.set(census.renewed as f64);
        m.baseline.set(baseline as f64);
        if blind && preserving {
            tracing::warn!(
                blind_ms,
                "no fleet count for longer than ttl - check_in_interval (paused, starved or \
                 store unreadable): self-preservation holds for one renewal window"
            );
        } else if preserving != self.self_preservation_active() {
            if preserving {
                tracing::warn!(
                    renewed = census.renewed,
                    expected = baseline,
                    "self-preservation ON: renewals below threshold, expiry paused"
                );
            } else {
                tracing::info!(
                    renewed = census.renewed,
                    expected = baseline,
                    "self-preservation off: expiry resumes"
                );
            }
        }
        self.set_preserving(preserving);
        // Only now: reads that see a fresh count must also see its decision.
        inner.census_ok_ms.store(now, Ordering::Relaxed);
        inner
            .census_ok_elapsed_ms
            .store(inner.clock.elapsed_ms(), Ordering::Relaxed);
        Ok(FleetCount {
            census,
            preserving,
            baseline,
            now,
        })
    }
}

/// Runs [`Registry::sweep_once`] every `sweep_interval` until `shutdown`. [`crate::serve`]
/// already runs it; call it yourself only when serving the router some other way.
pub async fn run_sweeper(registry: Registry, shutdown: CancellationToken) {
    // Count at least twice per shelf life, or every sweep would look like a blind spot and
    // hold preservation for ever (short TTLs, as in tests).
    let half_shelf = policy::shelf_life(registry.config()) / 2;
    let period = registry
        .config()
        .sweep_interval
        .min(half_shelf)
        .max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = registry.sweep_once().await {
            tracing::warn!(error = %e, "sweep failed; will retry");
        }
        registry.inner.metrics.upkeep();
    }
}
