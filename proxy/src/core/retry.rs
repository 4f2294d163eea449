//! Retry policy, jittered back-off and the retry budget (docs/ARCHITECTURE.md#retry-budget).

use std::time::Duration;

use http::Method;
use rand::{Rng, RngExt};

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub num_retries: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Status codes that are retried (connect failures and resets always are).
    pub retry_statuses: Vec<u16>,
    /// Share of the cluster's active requests that may be retries at once.
    pub budget_percent: u32,
    /// Retries always allowed regardless of the budget (Envoy's `min_retry_concurrency`).
    pub min_retry_concurrency: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            num_retries: 1,
            base_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            retry_statuses: vec![502, 503, 504],
            budget_percent: 20,
            min_retry_concurrency: 3,
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// No connection could be made: the request was never sent.
    ConnectFailure,
    /// The connection broke after the request may have been sent.
    Reset,
    /// The per-try or route timeout fired.
    Timeout,
    Status(u16),
    /// A TCP listener's connection was made: its whole outcome, as far as the policy goes.
    Connected,
}

/// Methods that may be repeated without changing the result (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether the outcome of attempt number `attempt` (0 = first try) warrants another try.
/// Timeouts are not retried: the route timeout covers every try, so a timed-out request has
/// no time left (Envoy behaves the same without a per-try timeout).
pub fn should_retry(
    policy: &RetryPolicy,
    method: &Method,
    outcome: AttemptOutcome,
    attempt: u32,
) -> bool {
    if attempt >= policy.num_retries || !is_idempotent(method) {
        return false;
    }
    match outcome {
        AttemptOutcome::ConnectFailure | AttemptOutcome::Reset => true,
        AttemptOutcome::Status(s) => policy.retry_statuses.contains(&s),
        AttemptOutcome::Timeout | AttemptOutcome::Connected => false,
    }
}

/// Fully jittered exponential back-off before retry number `retry` (1-based): uniform in
/// `[0, (2^retry - 1) × base)`, the window capped at `max`.
pub fn backoff(policy: &RetryPolicy, retry: u32, rng: &mut impl Rng) -> Duration {
    let base = policy.base_backoff.as_millis() as u64;
    let factor = (1u64 << retry.clamp(1, 32)) - 1;
    let window = base
        .saturating_mul(factor)
        .min(policy.max_backoff.as_millis() as u64);
    if window == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rng.random_range(0..window))
}

/// Which limit refused a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOverflow {
    /// The retry budget: a share of the cluster's active requests.
    Budget,
    /// The circuit breaker's `max_retries`.
    MaxRetries,
}

impl RetryOverflow {
    /// The `limit` label of `tidings_proxy_retry_overflow_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOverflow::Budget => "budget",
            RetryOverflow::MaxRetries => "max_retries",
        }
    }
}

/// How many retries the budget lets run at once among `active_requests`: `budget_percent`
/// of them, rounded down, but never fewer than `min_retry_concurrency` (so a quiet cluster
/// can still retry).
pub fn budget(policy: &RetryPolicy, active_requests: u32) -> u32 {
    let share = u64::from(active_requests) * u64::from(policy.budget_percent) / 100;
    u32::try_from(share)
        .unwrap_or(u32::MAX)
        .max(policy.min_retry_concurrency)
}

/// May one more retry start while `in_flight` retries run among `active_requests`? Both the
/// budget and the breaker's `max_retries` bound the same count of retries in flight; the
/// stricter one decides.
pub fn admit(
    policy: &RetryPolicy,
    max_retries: u32,
    active_requests: u32,
    in_flight: u32,
) -> Result<(), RetryOverflow> {
    if in_flight >= max_retries {
        return Err(RetryOverflow::MaxRetries);
    }
    if in_flight >= budget(policy, active_requests) {
        return Err(RetryOverflow::Budget);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn get_is_retried_once_on_connect_failure_reset_and_gateway_errors() {
        let p = RetryPolicy::default();
        for o in [
            AttemptOutcome::ConnectFailure,
            AttemptOutcome::Reset,
            AttemptOutcome::Status(502),
            AttemptOutcome::Status(503),
            AttemptOutcome::Status(504),
        ] {
            assert!(should_retry(&p, &Method::GET, o, 0), "{o:?}");
            assert!(!should_retry(&p, &Method::GET, o, 1), "{o:?} second retry");
        }
    }

    #[test]
    fn other_statuses_and_timeouts_are_not_retried() {
        let p = RetryPolicy::default();
        for o in [
            AttemptOutcome::Status(500),
            AttemptOutcome::Status(404),
            AttemptOutcome::Status(200),
            AttemptOutcome::Timeout,
        ] {
            assert!(!should_retry(&p, &Method::GET, o, 0), "{o:?}");
        }
    }

    #[test]
    fn non_idempotent_methods_are_not_retried() {
        let p = RetryPolicy::default();
        assert!(!should_retry(
            &p,
            &Method::POST,
            AttemptOutcome::Status(503),
            0
        ));
        assert!(!should_retry(&p, &Method::PATCH, AttemptOutcome::Reset, 0));
        assert!(should_retry(&p, &Method::PUT, AttemptOutcome::Reset, 0));
    }

    #[test]
    fn backoff_windows_follow_envoy() {
        let p = RetryPolicy::default();
        let mut rng = SmallRng::seed_from_u64(3);
        for (retry, window) in [(1, 25), (2, 75), (3, 175), (4, 250), (10, 250)] {
            let mut hi = Duration::ZERO;
            for _ in 0..2_000 {
                let d = backoff(&p, retry, &mut rng);
                assert!(d < Duration::from_millis(window), "retry {retry}: {d:?}");
                hi = hi.max(d);
            }
            assert!(
                hi >= Duration::from_millis(window * 8 / 10),
                "retry {retry}: max {hi:?}"
            );
        }
    }

    #[test]
    fn budget_is_twenty_percent_with_a_floor_of_three() {
        let p = RetryPolicy::default();
        let open = u32::MAX;
        assert_eq!(budget(&p, 0), 3);
        assert_eq!(admit(&p, open, 0, 2), Ok(()));
        assert_eq!(admit(&p, open, 0, 3), Err(RetryOverflow::Budget));
        assert_eq!(budget(&p, 100), 20);
        assert_eq!(admit(&p, open, 100, 19), Ok(()));
        assert_eq!(admit(&p, open, 100, 20), Err(RetryOverflow::Budget));
        assert_eq!(budget(&p, 19), 3, "3.8 rounds down, then the floor");
        assert_eq!(budget(&p, u32::MAX), u32::MAX / 5);
    }

    #[test]
    fn the_stricter_of_budget_and_max_retries_decides() {
        let p = RetryPolicy::default();
        // Budget 20 of 100 active, breaker 3 (Envoy's default).
        assert_eq!(admit(&p, 3, 100, 2), Ok(()));
        assert_eq!(admit(&p, 3, 100, 3), Err(RetryOverflow::MaxRetries));
        // Breaker wide open: the budget decides.
        assert_eq!(admit(&p, 1_000, 100, 20), Err(RetryOverflow::Budget));
        // A zero breaker refuses every retry, even under the floor.
        assert_eq!(admit(&p, 0, 100, 0), Err(RetryOverflow::MaxRetries));
    }
}
