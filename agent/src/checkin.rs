//! The check-in loop (DESIGN.md §5.1): every interval, at this host's stable splay offset,
//! `POST /v2/checkin` with all of the host's endpoints; failed attempts are retried with
//! backoff within the round and never stop other loops. A re-check-in is made at once (after
//! a small random delay, so a fleet does not stampede) when the registry restarted or the
//! host's endpoints changed. Scheduling is pure ([`splay`], [`next_due`]).

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use discovery::ClientError;
use schema::timefmt::unix_ms_now;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// A stable offset in `[0, interval)` from the host's identity: the same host checks in at
/// the same point of every interval, and a fleet spreads evenly across it.
pub fn splay(identity: &str, interval: Duration) -> Duration {
    let max = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    if max == 0 {
        return Duration::ZERO;
    }
    let d = Sha256::digest(identity.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    Duration::from_millis(u64::from_be_bytes(first) % max)
}

/// The first wall-clock time (ms) after `now_ms` that is `offset` into an interval: check-ins
/// stay on the host's slot across restarts.
pub fn next_due(now_ms: u64, interval: Duration, offset: Duration) -> u64 {
    let interval = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let offset = u64::try_from(offset.as_millis()).unwrap_or(0) % interval;
    let base = now_ms - now_ms % interval + offset;
    if base > now_ms { base } else { base + interval }
}

/// The small random delay before an unscheduled re-check-in.
fn recheck_delay(interval: Duration, jitter: f64) -> Duration {
    (interval / 4)
        .min(Duration::from_secs(1))
        .mul_f64(jitter.clamp(0.0, 1.0))
}

/// Runs until `stop`.
pub async fn run_checkin(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = shared.config.check_in_interval;
    let offset = splay(&shared.gossip_addr.to_string(), interval);
    tracing::debug!(?offset, ?interval, "check-in slot");
    let mut failing = false;
    // First round at once: the registry should hear about a new agent without waiting.
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = shared.recheck.notified() => {
                let delay = recheck_delay(interval, rand::random());
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            r = check_in_round(&shared, interval) => r,
        };
        match outcome {
            Ok(n) => {
                shared.metrics.checkins_ok.increment(1);
                if failing {
                    tracing::info!(endpoints = n, "check-in succeeded again");
                    shared.registry_back.notify_one();
                }
                failing = false;
            }
            Err(e) => {
                shared.metrics.checkins_failed.increment(1);
                if !failing {
                    tracing::warn!(error = %e, "check-in failed; will retry next interval");
                }
                failing = true;
                // The registry forgot us (restarted): check in again right away.
                if e.status() == Some(404) {
                    shared.recheck.notify_one();
                }
            }
        }
        let now = unix_ms_now();
        wait = Duration::from_millis(next_due(now, interval, offset).saturating_sub(now));
    }
}

/// One round: the host's endpoints in one request, retried with jittered backoff for at
/// most about a quarter of the interval.
async fn check_in_round(shared: &Shared, interval: Duration) -> Result<usize, ClientError> {
    let endpoints = shared.local().all();
    let backoff = ExponentialBuilder::default()
        .with_min_delay((interval / 20).clamp(Duration::from_millis(50), Duration::from_secs(1)))
        .with_max_delay((interval / 8).max(Duration::from_millis(100)))
        .with_max_times(3)
        .with_jitter();
    let attempt = || async { shared.client.check_in(&endpoints).await };
    attempt
        .retry(backoff)
        .when(ClientError::is_transient)
        .await
        .map(|_| endpoints.len())
}

/// Best-effort deregistration of `endpoints` from the registry (on SIGTERM).
pub async fn deregister_all(shared: &Shared, endpoints: &[schema::Endpoint]) {
    for ep in endpoints {
        match shared
            .client
            .deregister(&ep.service, ep.ip, Some(ep.port))
            .await
        {
            Ok(()) => tracing::info!(endpoint = %ep.key(), "deregistered"),
            Err(e) if e.status() == Some(404) => {}
            Err(e) => tracing::warn!(endpoint = %ep.key(), error = %e, "deregistration failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splay_is_stable_bounded_and_spread() {
        let i = Duration::from_secs(60);
        assert_eq!(splay("10.0.0.1:7702", i), splay("10.0.0.1:7702", i));
        let mut buckets = [0u32; 6];
        for n in 0..6000u32 {
            let s = splay(&format!("10.0.{}.{}:7702", n / 256, n % 256), i);
            assert!(s < i);
            buckets[usize::try_from(s.as_secs() / 10).expect("small")] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (850..1150).contains(&b)),
            "{buckets:?}"
        );
        assert_eq!(splay("x", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn next_due_keeps_the_slot() {
        let i = Duration::from_secs(60);
        let off = Duration::from_secs(7);
        assert_eq!(next_due(120_000, i, off), 127_000);
        assert_eq!(next_due(127_000, i, off), 187_000);
        assert_eq!(next_due(130_000, i, off), 187_000);
        assert_eq!(next_due(0, Duration::ZERO, off), 1);
    }

    #[test]
    fn rechecks_wait_a_little_at_most_a_second() {
        assert_eq!(recheck_delay(Duration::from_secs(60), 0.0), Duration::ZERO);
        assert!(recheck_delay(Duration::from_secs(60), 0.99) < Duration::from_secs(1));
        assert!(recheck_delay(Duration::from_secs(1), 0.99) < Duration::from_millis(250));
    }
}
