//! The background sweeper: self-preservation accounting and bounded deletion of expired
//! rows. Reads never write; this is the only place rows expire from the store.

use std::sync::PoisonError;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::policy::Census;
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
        let inner = &self.inner;
        let cfg = &inner.config;
        let now = self.now_ms();
        let rows = self.store_call("list_all", inner.store.list_all()).await?;
        let census = Census::take(&rows, now, cfg);
        drop(rows);
        let (preserving, baseline) = {
            let mut p = inner
                .preservation
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            p.observe(census, now);
            (p.active(), p.baseline())
        };
        let m = &inner.metrics;
        m.live.set(census.live as f64);
        m.stored.set(census.stored as f64);
        m.renewed.set(census.renewed as f64);
        m.baseline.set(baseline as f64);
        if preserving != self.self_preservation_active() {
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
        let mut deleted = 0;
        if !preserving && census.stored > census.live {
            let ttl_ms = u64::try_from(cfg.ttl.as_millis()).unwrap_or(u64::MAX);
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
}

/// Runs [`Registry::sweep_once`] every `sweep_interval` until `shutdown`. [`crate::serve`]
/// already runs it; call it yourself only when serving the router some other way.
pub async fn run_sweeper(registry: Registry, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(registry.config().sweep_interval);
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
