//! Blocking queries (`?index=I&wait=30s`, Consul-style), as both the registry's v2 routes and
//! the agent's local API answer them: one parser for the parameters and one loop that waits
//! until the index moves, the jittered wait elapses or the server drains.
//!
//! The agent depends on `discovery`, so this module is public for it; nothing here knows the
//! registry's store or the agent's view, only a change signal and a read.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};
use serde::Deserialize;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::config::duration;
use crate::errors::ApiError;
use crate::policy;

/// `index` and `wait` of a blocking query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockingParams {
    /// The index the caller holds: without it, or when it is not current, the answer is
    /// immediate.
    pub index: Option<u64>,
    /// How long to hold the query; the server's maximum when absent.
    pub wait: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawParams {
    index: Option<String>,
    wait: Option<String>,
}

impl BlockingParams {
    /// Reads `index` and `wait` from a query string; other parameters are ignored, as Consul
    /// does. Blank values count as absent.
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let q: RawParams = match query {
            Some(q) => serde_urlencoded::from_str(q)
                .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?,
            None => RawParams::default(),
        };
        let present = |s: &Option<String>| {
            s.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let index = match present(&q.index) {
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("index must be an integer, got {s:?}"))
            })?),
            None => None,
        };
        let wait = match present(&q.wait) {
            Some(s) => {
                Some(duration::parse(&s).map_err(|e| ApiError::BadRequest(format!("wait: {e}")))?)
            }
            None => None,
        };
        Ok(BlockingParams { index, wait })
    }
}

/// What a server holds blocking queries with.
#[derive(Debug, Clone)]
pub struct Blocking<'a> {
    /// One permit per waiting query; none left answers 429 (`max_blocking_waiters`).
    pub waiters: &'a Arc<Semaphore>,
    /// The configured number of permits, for the 429 body.
    pub limit: usize,
    /// The longest wait; also the wait of a query that names none.
    pub max_wait: Duration,
    /// Re-read this often even without a change signal (the registry: expiries and writes by
    /// replicas sharing its store). `None`: only on a signal.
    pub recheck: Option<Duration>,
    /// A query that sees a change sooner than this after it arrived holds its answer until
    /// this much time has passed since it arrived, so the changes of that window travel in
    /// one answer: a client that re-asks at once is answered at most once per this interval
    /// while the catalog churns, and a change to a quiet catalog (the waiter has been
    /// waiting longer than this) is answered at once. `ZERO`: every change answers at once.
    pub coalesce: Duration,
    /// Fired on drain: every waiting query answers at once.
    pub draining: &'a CancellationToken,
    /// Counts queries refused for want of a permit.
    pub refused: Counter,
    /// Up while a query waits.
    pub waiting: Gauge,
}

/// Answers at once unless `params.index` is current; then waits until `index_of` of a read
/// differs from it, the wait (capped at `max_wait`, then moved by up to ±1/16 of itself:
/// [`policy::blocking_wait`]) elapses, or the server drains, and answers with a fresh read
/// (after the change, no sooner than `cfg.coalesce` from the query's arrival).
/// `changes` wakes it; it is subscribed before the first read, so a change between the two
/// is not missed.
pub async fn block<T, S, R, Fut>(
    cfg: Blocking<'_>,
    mut changes: watch::Receiver<S>,
    params: BlockingParams,
    read: R,
    index_of: impl Fn(&T) -> u64,
) -> Result<T, ApiError>
where
    R: Fn() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    changes.borrow_and_update();
    let first = read().await?;
    let Some(index) = params.index else {
        return Ok(first);
    };
    if index_of(&first) != index {
        return Ok(first);
    }
    // Held for the whole wait and released on drop, also when the client goes away.
    let _permit = cfg.waiters.clone().try_acquire_owned().map_err(|_| {
        cfg.refused.increment(1);
        ApiError::TooManyWaiters {
            limit: cfg.limit,
            // Jittered, so refused waiters do not all come back in the same second.
            retry_after_secs: policy::waiter_retry_after(rand::random::<f64>()),
        }
    })?;
    let wait = policy::blocking_wait(
        params.wait.unwrap_or(cfg.max_wait),
        cfg.max_wait,
        rand::random::<f64>(),
    );
    let arrived = tokio::time::Instant::now();
    let deadline = arrived + wait;
    cfg.waiting.increment(1.0);
    let _done = OnDrop(|| cfg.waiting.decrement(1.0));
    loop {
        let recheck = tokio::time::sleep(cfg.recheck.unwrap_or(wait).min(wait));
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => return read().await,
            () = cfg.draining.cancelled() => return read().await,
            res = changes.changed() => {
                if res.is_err() {
                    // The sender is gone; nothing more will change.
                    return read().await;
                }
            }
            () = recheck => {}
        }
        let now = read().await?;
        if index_of(&now) == index {
            continue;
        }
        let hold_until = (arrived + cfg.coalesce).min(deadline);
        if tokio::time::Instant::now() >= hold_until {
            return Ok(now);
        }
        // Changes often come in bursts (a deploy, a zone's hosts checking in): this answer
        // carries whatever else changes until the hold ends, instead of one answer each.
        tokio::select! {
            biased;
            () = cfg.draining.cancelled() => {}
            () = tokio::time::sleep_until(hold_until) => {}
        }
        return read().await;
    }
}

/// Runs its closure when dropped, so the gauge is right even when the client goes away
/// mid-wait.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

#[cfg(test)]
mod tests;
