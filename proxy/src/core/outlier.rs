//! Passive outlier detection (docs/ARCHITECTURE.md#outlier-detection): consecutive 5xx or
//! connect failures eject a host for `base × ejections` (capped), never more than a share of
//! the cluster. Sans-IO: the caller passes the time and the cluster size.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
    /// How often ejection multipliers of well-behaved hosts decay.
    pub interval: Duration,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 10,
            interval: Duration::from_secs(10),
        }
    }
}

/// The result of one upstream request, as outlier detection classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestResult {
    Success,
    /// A 5xx answer, a connect failure or a reset.
    Failure,
}

/// Per-host outlier state.
#[derive(Debug, Clone, Default)]
pub struct OutlierState {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    total_ejections: u64,
}

impl OutlierState {
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    pub fn total_ejections(&self) -> u64 {
        self.total_ejections
    }

    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// Records a result. `ejected_now` is how many hosts of the cluster are ejected, `hosts`
    /// its size. Returns the ejection's end if this result ejected the host.
    pub fn record(
        &mut self,
        result: RequestResult,
        now: Instant,
        policy: &OutlierPolicy,
        ejected_now: usize,
        hosts: usize,
    ) -> Option<Instant> {
        match result {
            RequestResult::Success => {
                self.consecutive = 0;
                None
            }
            RequestResult::Failure => {
                self.consecutive += 1;
                if self.consecutive < policy.consecutive_failures.max(1) || self.is_ejected(now) {
                    return None;
                }
                self.consecutive = 0;
                if !may_eject(policy.max_ejection_percent, ejected_now, hosts) {
                    return None;
                }
                self.ejections += 1;
                self.total_ejections += 1;
                let until = now + ejection_time(policy, self.ejections);
                self.ejected_until = Some(until);
                Some(until)
            }
        }
    }

    /// A passing active health check un-ejects the host and clears its counters (Envoy's
    /// `successful_active_health_check_uneject_host`, default on).
    pub fn on_health_check_success(&mut self) {
        self.consecutive = 0;
        self.ejected_until = None;
    }

    /// Periodic sweep: ends expired ejections, and lets a host that stayed un-ejected for a
    /// whole interval work its multiplier back down one step. Returns true if it un-ejected.
    pub fn sweep(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(t) if now >= t => {
                self.ejected_until = None;
                true
            }
            Some(_) => false,
            None => {
                self.ejections = self.ejections.saturating_sub(1);
                false
            }
        }
    }
}

/// `base × n`, capped at `max` (or at `base` when that is larger, as Envoy does).
pub fn ejection_time(policy: &OutlierPolicy, n: u32) -> Duration {
    let cap = policy.max_ejection.max(policy.base_ejection);
    policy.base_ejection.saturating_mul(n.max(1)).min(cap)
}

/// Envoy's rule: eject if the share ejected afterwards stays within the maximum, or if no
/// host is ejected yet, so even a tiny cluster can eject one bad host.
pub fn may_eject(max_percent: u32, ejected_now: usize, hosts: usize) -> bool {
    if hosts == 0 {
        return false;
    }
    ejected_now == 0 || ((ejected_now + 1) as u64) * 100 <= u64::from(max_percent) * hosts as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(
        s: &mut OutlierState,
        n: u32,
        now: Instant,
        p: &OutlierPolicy,
        ejected: usize,
        hosts: usize,
    ) -> Option<Instant> {
        let mut last = None;
        for _ in 0..n {
            last = s.record(RequestResult::Failure, now, p, ejected, hosts);
        }
        last
    }

    #[test]
    fn five_consecutive_failures_eject_for_thirty_seconds() {
        let (p, now) = (OutlierPolicy::default(), Instant::now());
        let mut s = OutlierState::default();
        assert_eq!(fail(&mut s, 4, now, &p, 0, 20), None);
        assert!(!s.is_ejected(now));
        assert_eq!(
            fail(&mut s, 1, now, &p, 0, 20),
            Some(now + Duration::from_secs(30))
        );
        assert!(s.is_ejected(now + Duration::from_secs(29)));
        assert!(!s.is_ejected(now + Duration::from_secs(30)));
    }

    #[test]
    fn a_success_resets_the_count() {
        let (p, now) = (OutlierPolicy::default(), Instant::now());
        let mut s = OutlierState::default();
        fail(&mut s, 4, now, &p, 0, 20);
        s.record(RequestResult::Success, now, &p, 0, 20);
        assert_eq!(fail(&mut s, 4, now, &p, 0, 20), None);
    }

    #[test]
    fn ejection_time_grows_with_count_and_caps_at_300s() {
        let p = OutlierPolicy::default();
        assert_eq!(ejection_time(&p, 1), Duration::from_secs(30));
        assert_eq!(ejection_time(&p, 2), Duration::from_secs(60));
        assert_eq!(ejection_time(&p, 10), Duration::from_secs(300));
        assert_eq!(ejection_time(&p, 50), Duration::from_secs(300));
    }

    #[test]
    fn second_ejection_lasts_twice_as_long() {
        let (p, now) = (OutlierPolicy::default(), Instant::now());
        let mut s = OutlierState::default();
        fail(&mut s, 5, now, &p, 0, 20);
        let later = now + Duration::from_secs(31);
        assert!(s.sweep(later));
        assert_eq!(
            fail(&mut s, 5, later, &p, 0, 20),
            Some(later + Duration::from_secs(60))
        );
        assert_eq!(s.total_ejections(), 2);
    }

    #[test]
    fn multiplier_decays_while_host_behaves() {
        let (p, now) = (OutlierPolicy::default(), Instant::now());
        let mut s = OutlierState::default();
        fail(&mut s, 5, now, &p, 0, 20);
        let later = now + Duration::from_secs(31);
        s.sweep(later); // un-ejects
        s.sweep(later); // one clean interval: multiplier back to 0
        assert_eq!(
            fail(&mut s, 5, later, &p, 0, 20),
            Some(later + Duration::from_secs(30))
        );
    }

    #[test]
    fn never_more_than_ten_percent_of_a_cluster() {
        assert!(may_eject(10, 0, 20));
        assert!(may_eject(10, 1, 20)); // 2 of 20 = 10 %
        assert!(!may_eject(10, 2, 20)); // 3 of 20 = 15 %
    }

    #[test]
    fn small_cluster_can_always_eject_one_host() {
        assert!(may_eject(10, 0, 3));
        assert!(!may_eject(10, 1, 3));
        assert!(!may_eject(10, 0, 0));
    }

    #[test]
    fn refused_ejection_does_not_eject() {
        let (p, now) = (OutlierPolicy::default(), Instant::now());
        let mut s = OutlierState::default();
        assert_eq!(fail(&mut s, 5, now, &p, 1, 3), None);
        assert!(!s.is_ejected(now));
    }

    #[test]
    fn passing_health_check_unejects() {
        let (p, now) = (OutlierPolicy::default(), Instant::now());
        let mut s = OutlierState::default();
        fail(&mut s, 5, now, &p, 0, 20);
        s.on_health_check_success();
        assert!(!s.is_ejected(now));
    }
}
