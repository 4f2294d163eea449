//! The active health-check state machine of one host (docs/ARCHITECTURE.md#health-checks).
//!
//! Sans-IO: the shell runs a check when [`HealthState::next_check_at`] comes, then feeds the
//! outcome back with the time and an RNG for the jittered next interval.

use std::time::{Duration, Instant};

use rand::{Rng, RngExt};
use serde::Serialize;

/// How often and how strictly to check.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthPolicy {
    pub interval: Duration,
    /// Each wait is `interval` ± this share of it, so a fleet of proxies does not check in lockstep.
    pub jitter_percent: u32,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            interval: Duration::from_secs(5),
            jitter_percent: 10,
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    Success,
    /// Connect failure, reset or timeout: may be transient, so it counts toward the threshold.
    NetworkFailure,
    /// The host answered, and the answer was wrong (an unexpected status). Envoy treats this as
    /// definite and marks a healthy host unhealthy at once.
    BadResponse,
}

/// Where a host stands with its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// No check has finished yet: not routable (Envoy starts new hosts as `FAILED_ACTIVE_HC`).
    Unchecked,
    Healthy,
    Unhealthy,
}

/// Whether a result changed the host's routability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    /// A threshold is being approached but not yet crossed.
    Pending,
    Changed,
}

#[derive(Debug, Clone)]
pub struct HealthState {
    status: HealthStatus,
    num_healthy: u32,
    num_unhealthy: u32,
    next_check_at: Instant,
    checks: u64,
}

impl HealthState {
    /// A newly discovered host: its first check is due at once.
    pub fn new(now: Instant) -> Self {
        HealthState {
            status: HealthStatus::Unchecked,
            num_healthy: 0,
            num_unhealthy: 0,
            next_check_at: now,
            checks: 0,
        }
    }

    pub fn status(&self) -> HealthStatus {
        self.status
    }

    pub fn is_healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }

    pub fn next_check_at(&self) -> Instant {
        self.next_check_at
    }

    pub fn checks(&self) -> u64 {
        self.checks
    }

    /// Applies one result at `now` and schedules the next check.
    pub fn on_result(
        &mut self,
        outcome: CheckOutcome,
        now: Instant,
        policy: &HealthPolicy,
        rng: &mut impl Rng,
    ) -> Transition {
        self.checks += 1;
        self.next_check_at = now + next_interval(policy, rng);
        match outcome {
            CheckOutcome::Success => self.on_success(policy),
            CheckOutcome::NetworkFailure => self.on_failure(policy, false),
            CheckOutcome::BadResponse => self.on_failure(policy, true),
        }
    }

    fn on_success(&mut self, policy: &HealthPolicy) -> Transition {
        self.num_unhealthy = 0;
        match self.status {
            HealthStatus::Healthy => Transition::Unchanged,
            // A never-checked host needs one success: startup is faster (Envoy's first_check).
            HealthStatus::Unchecked => {
                self.status = HealthStatus::Healthy;
                self.num_healthy = 0;
                Transition::Changed
            }
            HealthStatus::Unhealthy => {
                self.num_healthy += 1;
                if self.num_healthy >= policy.healthy_threshold.max(1) {
                    self.status = HealthStatus::Healthy;
                    self.num_healthy = 0;
                    Transition::Changed
                } else {
                    Transition::Pending
                }
            }
        }
    }

    fn on_failure(&mut self, policy: &HealthPolicy, definite: bool) -> Transition {
        self.num_healthy = 0;
        match self.status {
            HealthStatus::Unhealthy => Transition::Unchanged,
            // An unchecked host is already unroutable; a failure makes that explicit.
            HealthStatus::Unchecked => {
                self.status = HealthStatus::Unhealthy;
                Transition::Changed
            }
            HealthStatus::Healthy => {
                self.num_unhealthy += 1;
                if definite || self.num_unhealthy >= policy.unhealthy_threshold.max(1) {
                    self.status = HealthStatus::Unhealthy;
                    self.num_unhealthy = 0;
                    Transition::Changed
                } else {
                    Transition::Pending
                }
            }
        }
    }

    /// Marks the host healthy without a check (used when a cluster has no health check).
    pub fn force_healthy(&mut self) {
        self.status = HealthStatus::Healthy;
    }
}

/// `interval` ± `jitter_percent`, never below 1 ms (Envoy clamps the same way).
pub fn next_interval(policy: &HealthPolicy, rng: &mut impl Rng) -> Duration {
    let base = policy.interval.as_micros() as u64;
    let spread = base.saturating_mul(u64::from(policy.jitter_percent.min(100))) / 100;
    let micros = if spread == 0 {
        base
    } else {
        base - spread + rng.random_range(0..=2 * spread)
    };
    Duration::from_micros(micros.max(1_000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn setup() -> (HealthState, HealthPolicy, SmallRng, Instant) {
        let now = Instant::now();
        (
            HealthState::new(now),
            HealthPolicy::default(),
            SmallRng::seed_from_u64(7),
            now,
        )
    }

    #[test]
    fn first_check_is_due_at_once() {
        let (s, _, _, now) = setup();
        assert_eq!(s.next_check_at(), now);
        assert_eq!(s.status(), HealthStatus::Unchecked);
    }

    #[test]
    fn never_checked_host_needs_one_success_even_with_threshold_three() {
        let (mut s, mut p, mut rng, now) = setup();
        p.healthy_threshold = 3;
        assert_eq!(
            s.on_result(CheckOutcome::Success, now, &p, &mut rng),
            Transition::Changed
        );
        assert!(s.is_healthy());
    }

    #[test]
    fn healthy_host_needs_two_network_failures() {
        let (mut s, p, mut rng, now) = setup();
        s.on_result(CheckOutcome::Success, now, &p, &mut rng);
        assert_eq!(
            s.on_result(CheckOutcome::NetworkFailure, now, &p, &mut rng),
            Transition::Pending
        );
        assert!(s.is_healthy());
        assert_eq!(
            s.on_result(CheckOutcome::NetworkFailure, now, &p, &mut rng),
            Transition::Changed
        );
        assert_eq!(s.status(), HealthStatus::Unhealthy);
    }

    #[test]
    fn success_between_failures_resets_the_count() {
        let (mut s, p, mut rng, now) = setup();
        s.on_result(CheckOutcome::Success, now, &p, &mut rng);
        s.on_result(CheckOutcome::NetworkFailure, now, &p, &mut rng);
        s.on_result(CheckOutcome::Success, now, &p, &mut rng);
        assert_eq!(
            s.on_result(CheckOutcome::NetworkFailure, now, &p, &mut rng),
            Transition::Pending
        );
        assert!(s.is_healthy());
    }

    #[test]
    fn bad_response_marks_healthy_host_unhealthy_at_once() {
        let (mut s, p, mut rng, now) = setup();
        s.on_result(CheckOutcome::Success, now, &p, &mut rng);
        assert_eq!(
            s.on_result(CheckOutcome::BadResponse, now, &p, &mut rng),
            Transition::Changed
        );
        assert_eq!(s.status(), HealthStatus::Unhealthy);
    }

    #[test]
    fn unhealthy_host_needs_two_successes() {
        let (mut s, p, mut rng, now) = setup();
        s.on_result(CheckOutcome::NetworkFailure, now, &p, &mut rng);
        assert_eq!(s.status(), HealthStatus::Unhealthy);
        assert_eq!(
            s.on_result(CheckOutcome::Success, now, &p, &mut rng),
            Transition::Pending
        );
        assert!(!s.is_healthy());
        assert_eq!(
            s.on_result(CheckOutcome::Success, now, &p, &mut rng),
            Transition::Changed
        );
        assert!(s.is_healthy());
    }

    #[test]
    fn failure_on_unchecked_host_makes_it_unhealthy() {
        let (mut s, p, mut rng, now) = setup();
        assert_eq!(
            s.on_result(CheckOutcome::NetworkFailure, now, &p, &mut rng),
            Transition::Changed
        );
        assert_eq!(s.status(), HealthStatus::Unhealthy);
    }

    #[test]
    fn next_check_is_interval_plus_minus_ten_percent() {
        let (mut s, p, mut rng, now) = setup();
        let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
        for _ in 0..2_000 {
            s.on_result(CheckOutcome::Success, now, &p, &mut rng);
            let d = s.next_check_at() - now;
            assert!(
                d >= Duration::from_millis(4_500) && d <= Duration::from_millis(5_500),
                "{d:?}"
            );
            lo = lo.min(d);
            hi = hi.max(d);
        }
        // The jitter is actually used, in both directions.
        assert!(
            lo < Duration::from_millis(4_600) && hi > Duration::from_millis(5_400),
            "{lo:?} {hi:?}"
        );
    }

    #[test]
    fn zero_jitter_and_tiny_interval_are_clamped() {
        let mut rng = SmallRng::seed_from_u64(1);
        let p = HealthPolicy {
            interval: Duration::ZERO,
            jitter_percent: 0,
            ..HealthPolicy::default()
        };
        assert_eq!(next_interval(&p, &mut rng), Duration::from_millis(1));
    }
}
