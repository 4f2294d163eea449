//! "Health checks win": how discovery status and active health combine (docs/ARCHITECTURE.md#merge-table),
//! and the panic threshold. Pure functions; the cluster state applies their answers.

use serde::Serialize;

use crate::core::health::HealthStatus;

/// What discovery says about a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryStatus {
    /// Listed by the membership source.
    Present,
    /// No longer listed. Discovery can be wrong or down, so this alone never removes a
    /// healthy host.
    Absent,
    /// Explicitly deregistered (listed with the `draining` tag): finish in-flight requests,
    /// take no new ones, then remove.
    Drained,
}

/// What to do with a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Route,
    /// Keep the host and keep checking it, but send it nothing.
    Hold,
    /// Send nothing new; remove once its in-flight requests are done.
    Drain,
    /// Forget the host now (and stop checking it).
    Remove,
}

/// The merge table. `checked` is false when the cluster has no active health check, in
/// which case discovery alone decides (Envoy: every member is healthy, absent means gone).
pub fn decide(discovery: DiscoveryStatus, health: HealthStatus, checked: bool) -> Decision {
    use DiscoveryStatus::*;
    use HealthStatus::*;
    if !checked {
        return match discovery {
            Present => Decision::Route,
            Absent => Decision::Remove,
            Drained => Decision::Drain,
        };
    }
    match (discovery, health) {
        (Present, Healthy) => Decision::Route,
        (Present, Unhealthy | Unchecked) => Decision::Hold,
        (Absent, Healthy) => Decision::Route,
        // Never proven healthy and no longer listed: nothing argues for keeping it.
        (Absent, Unhealthy | Unchecked) => Decision::Remove,
        (Drained, _) => Decision::Drain,
    }
}

/// Whether a host in `decision` can be forgotten now, given its in-flight requests.
pub fn can_forget(decision: Decision, in_flight: u32) -> bool {
    match decision {
        Decision::Remove => true,
        Decision::Drain => in_flight == 0,
        Decision::Route | Decision::Hold => false,
    }
}

/// One host as the routable-set computation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub decision: Decision,
    /// Ejected by passive outlier detection.
    pub ejected: bool,
}

/// The hosts new requests may go to, as indices into the input, and whether the cluster is
/// in panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routable {
    pub hosts: Vec<usize>,
    pub panic: bool,
}

/// Applies the panic threshold (percent, 0 disables): when fewer than that share of the known
/// hosts is routable, route to every known host, because spreading load over possibly-bad
/// hosts beats overloading the few good ones. Draining hosts are not "known" here: they take
/// no new requests even in panic.
pub fn routable(candidates: &[Candidate], panic_threshold_percent: u32) -> Routable {
    let mut hosts = Vec::new();
    let panic = routable_into(candidates, panic_threshold_percent, &mut hosts);
    Routable { hosts, panic }
}

/// [`routable`] into a caller's buffer (cleared first), for the per-request path; returns
/// whether the cluster is in panic.
pub fn routable_into(
    candidates: &[Candidate],
    panic_threshold_percent: u32,
    hosts: &mut Vec<usize>,
) -> bool {
    let is_known: fn(&Candidate) -> bool =
        |c| matches!(c.decision, Decision::Route | Decision::Hold);
    let is_healthy: fn(&Candidate) -> bool = |c| c.decision == Decision::Route && !c.ejected;
    let known = candidates.iter().filter(|c| is_known(c)).count();
    let healthy = candidates.iter().filter(|c| is_healthy(c)).count();
    let threshold = u64::from(panic_threshold_percent.min(100));
    let panic = known > 0 && (healthy as u64) * 100 < threshold * known as u64;
    let keep = if panic { is_known } else { is_healthy };
    hosts.clear();
    hosts.extend((0..candidates.len()).filter(|&i| keep(&candidates[i])));
    panic
}

#[cfg(test)]
mod tests {
    use super::DiscoveryStatus::*;
    use super::*;
    use crate::core::health::HealthStatus::*;

    #[test]
    fn present_healthy_routes() {
        assert_eq!(decide(Present, Healthy, true), Decision::Route);
    }

    #[test]
    fn present_failing_is_held_and_kept_checking() {
        assert_eq!(decide(Present, Unhealthy, true), Decision::Hold);
    }

    #[test]
    fn present_never_checked_is_held() {
        assert_eq!(decide(Present, Unchecked, true), Decision::Hold);
    }

    #[test]
    fn absent_healthy_still_routes_health_checks_win() {
        assert_eq!(decide(Absent, Healthy, true), Decision::Route);
    }

    #[test]
    fn absent_failing_is_removed() {
        assert_eq!(decide(Absent, Unhealthy, true), Decision::Remove);
        assert!(can_forget(Decision::Remove, 3));
    }

    #[test]
    fn absent_never_checked_is_removed() {
        assert_eq!(decide(Absent, Unchecked, true), Decision::Remove);
    }

    #[test]
    fn drained_stops_new_requests_and_waits_for_in_flight() {
        for h in [Healthy, Unhealthy, Unchecked] {
            assert_eq!(decide(Drained, h, true), Decision::Drain);
        }
        assert!(!can_forget(Decision::Drain, 1));
        assert!(can_forget(Decision::Drain, 0));
        let r = routable(
            &[Candidate {
                decision: Decision::Drain,
                ejected: false,
            }],
            50,
        );
        assert!(r.hosts.is_empty());
    }

    #[test]
    fn without_health_checks_discovery_decides() {
        assert_eq!(decide(Present, Unchecked, false), Decision::Route);
        assert_eq!(decide(Absent, Healthy, false), Decision::Remove);
        assert_eq!(decide(Drained, Healthy, false), Decision::Drain);
    }

    #[test]
    fn held_and_routed_hosts_are_never_forgotten() {
        assert!(!can_forget(Decision::Route, 0));
        assert!(!can_forget(Decision::Hold, 0));
    }

    fn c(decision: Decision, ejected: bool) -> Candidate {
        Candidate { decision, ejected }
    }

    #[test]
    fn routes_only_healthy_hosts_above_threshold() {
        let hosts = [
            c(Decision::Route, false),
            c(Decision::Route, false),
            c(Decision::Hold, false),
        ];
        assert_eq!(
            routable(&hosts, 50),
            Routable {
                hosts: vec![0, 1],
                panic: false
            }
        );
    }

    #[test]
    fn exactly_at_threshold_is_not_panic() {
        let hosts = [c(Decision::Route, false), c(Decision::Hold, false)];
        assert_eq!(
            routable(&hosts, 50),
            Routable {
                hosts: vec![0],
                panic: false
            }
        );
    }

    #[test]
    fn below_threshold_routes_to_all_known_hosts() {
        let hosts = [
            c(Decision::Route, false),
            c(Decision::Hold, false),
            c(Decision::Hold, false),
            c(Decision::Drain, false),
            c(Decision::Remove, false),
        ];
        assert_eq!(
            routable(&hosts, 50),
            Routable {
                hosts: vec![0, 1, 2],
                panic: true
            }
        );
    }

    #[test]
    fn ejected_hosts_count_as_unhealthy_for_panic() {
        let hosts = [
            c(Decision::Route, true),
            c(Decision::Route, true),
            c(Decision::Route, false),
        ];
        assert_eq!(
            routable(&hosts, 50),
            Routable {
                hosts: vec![0, 1, 2],
                panic: true
            }
        );
        assert_eq!(
            routable(&hosts, 30),
            Routable {
                hosts: vec![2],
                panic: false
            }
        );
    }

    #[test]
    fn zero_threshold_never_panics() {
        let hosts = [c(Decision::Hold, false)];
        assert_eq!(
            routable(&hosts, 0),
            Routable {
                hosts: vec![],
                panic: false
            }
        );
    }

    #[test]
    fn empty_cluster_is_empty() {
        assert_eq!(
            routable(&[], 50),
            Routable {
                hosts: vec![],
                panic: false
            }
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn decision() -> impl Strategy<Value = Decision> {
        prop_oneof![
            Just(Decision::Route),
            Just(Decision::Hold),
            Just(Decision::Drain),
            Just(Decision::Remove)
        ]
    }

    proptest! {
        #[test]
        fn routable_set_invariants(
            hosts in proptest::collection::vec((decision(), any::<bool>()), 0..40),
            threshold in 0u32..=100,
        ) {
            let c: Vec<Candidate> = hosts.iter().map(|&(decision, ejected)| Candidate { decision, ejected }).collect();
            let r = routable(&c, threshold);
            for &i in &r.hosts {
                // Draining and removed hosts never take new requests, panic or not.
                prop_assert!(matches!(c[i].decision, Decision::Route | Decision::Hold));
                if !r.panic {
                    prop_assert!(c[i].decision == Decision::Route && !c[i].ejected);
                }
            }
            let healthy = c.iter().filter(|x| x.decision == Decision::Route && !x.ejected).count();
            if !r.panic {
                prop_assert_eq!(r.hosts.len(), healthy);
            }
            if threshold == 0 {
                prop_assert!(!r.panic);
            }
        }
    }
}
