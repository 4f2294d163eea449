//! `GET /v1/ops/status`: the registry's own state as JSON — what backs it, whether it is
//! warming up, whether self-preservation holds and why (expected against actual renewals),
//! and what the last sweep found. The dashboard (`/ui`) renders it; operators can script it.
//! It reads only in-memory state (the last sweep's census), never the store, so it stays
//! cheap to poll and answers while the store is down.

use std::sync::PoisonError;

use serde::Serialize;

use crate::policy::Census;
use crate::registry::Registry;
use crate::store::StoreError;
use crate::sweep::SweepReport;

/// The last sweep that worked and the last that failed, with when (registry clock, ms).
#[derive(Debug, Default)]
pub(crate) struct SweepLog {
    ok: Option<(SweepReport, u64)>,
    failed: Option<(String, u64)>,
}

impl SweepLog {
    pub(crate) fn record(&mut self, res: &Result<SweepReport, StoreError>, now_ms: u64) {
        match res {
            Ok(r) => self.ok = Some((*r, now_ms)),
            Err(e) => self.failed = Some((e.to_string(), now_ms)),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `memory`, `dynamodb`, or `custom` for a store embedded by another program.
    pub store: &'static str,
    pub env: String,
    /// How writes are authorised: `open` (no secret: anyone who reaches the registry can
    /// register or deregister anything) or `tokens` (host, scoped or operator tokens).
    pub auth: &'static str,
    /// False once draining has started.
    pub ready: bool,
    /// Reads carry `X-Tidings-Warming: true` (started on an empty store less than one
    /// check-in interval ago).
    pub warming: bool,
    pub uptime_ms: u64,
    pub ttl_ms: u64,
    pub check_in_interval_ms: u64,
    pub self_preservation: PreservationStatus,
    /// Counts from the last successful sweep; `None` before the first one.
    pub last_sweep: Option<SweepStatus>,
    /// The last failed sweep (the store was unreachable), if any.
    pub last_sweep_error: Option<SweepError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PreservationStatus {
    pub enabled: bool,
    /// Expiry is paused and reads are flagged `X-Tidings-Stale`.
    pub active: bool,
    /// Share of the expected renewals below which it turns on.
    pub threshold: f64,
    /// Check-ins expected per check-in interval (the baseline).
    pub expected_renewals: u64,
    /// Fewest renewals that keep it off: `ceil(threshold * expected_renewals)`.
    pub min_renewals: u64,
    /// Renewals counted by the last sweep (rows that checked in within the last interval).
    pub renewals: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SweepStatus {
    pub ms_ago: u64,
    /// Rows within the TTL.
    pub live: u64,
    /// Every stored row, expired or not.
    pub stored: u64,
    pub renewed: u64,
    pub deleted: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepError {
    pub ms_ago: u64,
    pub message: String,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Registry {
    /// The registry's state, as `GET /v1/ops/status` answers it.
    pub fn status(&self) -> Status {
        let inner = &self.inner;
        let cfg = &inner.config;
        let now = self.now_ms();
        let baseline = inner
            .preservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .baseline();
        let (ok, failed) = {
            let log = inner.sweeps.lock().unwrap_or_else(PoisonError::into_inner);
            (log.ok, log.failed.clone())
        };
        let last_sweep = ok.map(|(r, at)| {
            let Census {
                live,
                stored,
                renewed,
            } = r.census;
            SweepStatus {
                ms_ago: now.saturating_sub(at),
                live,
                stored,
                renewed,
                deleted: r.deleted,
            }
        });
        Status {
            store: inner.store.kind(),
            env: cfg.env.clone(),
            auth: inner.auth.mode(),
            ready: self.is_ready(),
            warming: self.is_warming(),
            uptime_ms: inner.clock.elapsed_ms().saturating_sub(inner.started_ms),
            ttl_ms: ms(cfg.ttl),
            check_in_interval_ms: ms(cfg.check_in_interval),
            self_preservation: PreservationStatus {
                enabled: cfg.self_preservation,
                active: self.self_preservation_active(),
                threshold: cfg.renewal_threshold,
                expected_renewals: baseline,
                // `as` saturates (NaN and negatives become 0), so no check is needed.
                min_renewals: (cfg.renewal_threshold * baseline as f64).ceil() as u64,
                renewals: last_sweep.map(|s| s.renewed),
            },
            last_sweep,
            last_sweep_error: failed.map(|(message, at)| SweepError {
                ms_ago: now.saturating_sub(at),
                message,
            }),
        }
    }
}
