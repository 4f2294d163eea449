//! The runtime cluster applying the merge table to listings and health results. Health
//! checkers are not started (the shutdown token is cancelled up front), so results are fed
//! by hand.

use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::config::{ClusterConfig, HealthCheckKind};
use crate::io::upstream::{Connector, Upstream};

fn cluster(kind: HealthCheckKind) -> Arc<Cluster> {
    let mut cfg = ClusterConfig {
        name: "c".into(),
        service: "svc".into(),
        ..ClusterConfig::default()
    };
    cfg.health_check.kind = kind;
    let connector = Connector::new(Duration::from_secs(1), None, None);
    let stopped = CancellationToken::new();
    stopped.cancel();
    Cluster::new(
        cfg,
        None,
        CircuitBreaker::default(),
        upstream(connector.clone()),
        upstream(connector),
        TaskTracker::new(),
        stopped,
    )
}

fn upstream(connector: Connector) -> Upstream {
    Upstream::new(connector, false, Duration::from_secs(90), 8)
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 80))
}

fn listed(i: u8) -> ListedHost {
    ListedHost {
        addr: addr(i),
        weight: 100,
        zone: None,
        canary: false,
        draining: false,
    }
}

fn decision(c: &Cluster, i: u8) -> Option<Decision> {
    c.snapshot()
        .hosts
        .iter()
        .find(|h| h.address == addr(i).to_string())
        .map(|h| h.decision)
}

#[tokio::test]
async fn new_hosts_wait_for_their_first_check() {
    let c = cluster(HealthCheckKind::Http);
    c.apply_listing(vec![listed(1), listed(2)], Some("1".into()), false);
    assert_eq!(decision(&c, 1), Some(Decision::Hold));
    assert!(c.record_health(addr(2), CheckOutcome::Success));
    for _ in 0..10 {
        assert_eq!(c.pick(None, &[]).map(|(a, _)| a), Some(addr(2)));
    }
    assert!(c.record_health(addr(1), CheckOutcome::Success));
    assert!((0..10).any(|_| c.pick(None, &[]).map(|(a, _)| a) == Some(addr(1))));
}

#[tokio::test]
async fn when_too_few_hosts_are_healthy_the_cluster_panics_and_uses_all() {
    let c = cluster(HealthCheckKind::Http);
    c.apply_listing(vec![listed(1), listed(2), listed(3)], None, false);
    c.record_health(addr(1), CheckOutcome::Success);
    // One of three routable (33 % < 50 %): every known host gets traffic.
    let picked: std::collections::BTreeSet<_> = (0..30)
        .filter_map(|_| c.pick(None, &[]).map(|(a, _)| a))
        .collect();
    assert_eq!(picked.len(), 3);
    assert!(c.snapshot().panic);
}

#[tokio::test]
async fn absent_healthy_host_stays_and_reappearing_keeps_its_health() {
    let c = cluster(HealthCheckKind::Http);
    c.apply_listing(vec![listed(1), listed(2)], None, false);
    c.record_health(addr(1), CheckOutcome::Success);
    c.record_health(addr(2), CheckOutcome::Success);
    c.apply_listing(vec![listed(2)], None, false);
    assert_eq!(decision(&c, 1), Some(Decision::Route));
    c.apply_listing(vec![listed(1), listed(2)], None, false);
    let h = c
        .snapshot()
        .hosts
        .into_iter()
        .find(|h| h.address == addr(1).to_string())
        .expect("host");
    assert_eq!(
        (h.discovery, h.health),
        (DiscoveryStatus::Present, HealthStatus::Healthy)
    );
}

#[tokio::test]
async fn absent_host_that_fails_is_removed() {
    let c = cluster(HealthCheckKind::Http);
    c.apply_listing(vec![listed(1), listed(2)], None, false);
    c.record_health(addr(1), CheckOutcome::Success);
    c.apply_listing(vec![listed(2)], None, false);
    assert!(
        !c.record_health(addr(1), CheckOutcome::BadResponse),
        "host is gone"
    );
    assert_eq!(decision(&c, 1), None);
}

#[tokio::test]
async fn drained_host_leaves_once_idle() {
    let c = cluster(HealthCheckKind::None);
    c.apply_listing(vec![listed(1), listed(2)], None, false);
    let (_, guard) = loop {
        let (a, g) = c.pick(None, &[]).expect("pick");
        if a == addr(2) {
            break (a, g);
        }
    };
    c.apply_listing(
        vec![
            listed(1),
            ListedHost {
                draining: true,
                ..listed(2)
            },
        ],
        None,
        false,
    );
    assert_eq!(decision(&c, 2), Some(Decision::Drain));
    for _ in 0..10 {
        assert_eq!(c.pick(None, &[]).map(|(a, _)| a), Some(addr(1)));
    }
    c.maintain(false);
    assert_eq!(
        decision(&c, 2),
        Some(Decision::Drain),
        "still has a request in flight"
    );
    drop(guard);
    c.maintain(false);
    assert_eq!(decision(&c, 2), None);
}

#[tokio::test]
async fn without_health_checks_absent_hosts_go_at_once() {
    let c = cluster(HealthCheckKind::None);
    c.apply_listing(vec![listed(1), listed(2)], None, false);
    assert_eq!(decision(&c, 1), Some(Decision::Route));
    c.apply_listing(vec![listed(2)], None, false);
    assert_eq!(decision(&c, 1), None);
}

#[tokio::test]
async fn a_warming_sources_empty_answer_is_ignored() {
    let c = cluster(HealthCheckKind::None);
    c.apply_listing(vec![listed(1)], None, false);
    c.apply_listing(vec![], None, true);
    assert_eq!(decision(&c, 1), Some(Decision::Route));
    c.apply_listing(vec![], None, false);
    assert_eq!(decision(&c, 1), None);
}

#[tokio::test]
async fn retries_avoid_the_previous_host() {
    let c = cluster(HealthCheckKind::None);
    c.apply_listing(vec![listed(1), listed(2), listed(3)], None, false);
    for _ in 0..30 {
        let (a, _) = c.pick(Some(42), &[addr(2)]).expect("pick");
        assert_ne!(a, addr(2));
    }
    // With one host there is no choice.
    let c = cluster(HealthCheckKind::None);
    c.apply_listing(vec![listed(1)], None, false);
    assert_eq!(c.pick(None, &[addr(1)]).map(|(a, _)| a), Some(addr(1)));
}

#[tokio::test]
async fn outlier_ejection_takes_a_host_out_of_rotation() {
    let c = cluster(HealthCheckKind::None);
    c.apply_listing(vec![listed(1), listed(2)], None, false);
    for _ in 0..5 {
        c.record_result(addr(1), RequestResult::Failure);
    }
    for _ in 0..10 {
        assert_eq!(c.pick(None, &[]).map(|(a, _)| a), Some(addr(2)));
    }
    let h = c
        .snapshot()
        .hosts
        .into_iter()
        .find(|h| h.address == addr(1).to_string())
        .expect("host");
    assert!(h.ejected);
}

#[tokio::test(start_paused = true)]
async fn an_ejection_ends_on_its_own_and_the_host_is_picked_again() {
    let c = cluster(HealthCheckKind::None);
    c.apply_listing(vec![listed(1), listed(2)], None, false);
    let both = |c: &Cluster| {
        (0..20)
            .filter_map(|_| c.pick(None, &[]).map(|(a, _)| a))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(both(&c).len(), 2);
    for _ in 0..5 {
        c.record_result(addr(1), RequestResult::Failure);
    }
    assert_eq!(both(&c).into_iter().collect::<Vec<_>>(), vec![addr(2)]);
    // No event marks the end of an ejection: the routable set must notice the time.
    tokio::time::advance(c.config.outlier_detection.base_ejection_time + Duration::from_secs(1))
        .await;
    assert_eq!(both(&c).len(), 2);
}

#[tokio::test]
async fn a_thousand_hosts_are_balanced_and_a_leaving_one_is_never_picked() {
    let c = cluster(HealthCheckKind::None);
    let hosts = |n: u16| -> Vec<ListedHost> {
        (0..n)
            .map(|i| ListedHost {
                addr: SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 80)),
                ..listed(1)
            })
            .collect()
    };
    c.apply_listing(hosts(1000), None, false);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..3000 {
        let (a, _) = c.pick(None, &[]).expect("pick");
        *counts.entry(a).or_insert(0u32) += 1;
    }
    // Weighted round robin over equal weights: every host exactly three times.
    assert_eq!(counts.len(), 1000);
    assert!(
        counts.values().all(|&n| n == 3),
        "{:?}",
        counts.values().max()
    );
    let leaving = hosts(1000)[0].addr;
    c.apply_listing(hosts(1000)[1..].to_vec(), None, false);
    assert!((0..3000).all(|_| c.pick(None, &[]).map(|(a, _)| a) != Some(leaving)));
}

#[tokio::test(start_paused = true)]
async fn checker_runs_the_first_check_at_once_then_every_interval_with_jitter() {
    let mut cfg = ClusterConfig {
        name: "c".into(),
        service: "svc".into(),
        ..ClusterConfig::default()
    };
    cfg.health_check.kind = HealthCheckKind::Tcp;
    let connector = Connector::new(Duration::from_secs(1), None, None);
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let c = Cluster::new(
        cfg,
        None,
        CircuitBreaker::default(),
        upstream(connector.clone()),
        upstream(connector),
        tracker.clone(),
        stop.clone(),
    );
    // Nothing listens on port 1: every check fails fast (refused, or the 1 s timeout).
    let dead = SocketAddr::from(([127, 0, 0, 1], 1));
    let start = tokio::time::Instant::now();
    c.apply_listing(
        vec![ListedHost {
            addr: dead,
            weight: 1,
            zone: None,
            canary: false,
            draining: false,
        }],
        None,
        false,
    );
    let checks = |c: &Cluster| {
        c.snapshot()
            .hosts
            .first()
            .map(|h| h.health_checks)
            .unwrap_or(0)
    };
    for _ in 0..200 {
        if checks(&c) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(checks(&c), 1, "first check ran at once");
    assert!(start.elapsed() < Duration::from_millis(4_500));
    assert_eq!(c.snapshot().hosts[0].health, HealthStatus::Unhealthy);
    // The next check is due 5 s ± 10 % after the first one finished.
    tokio::time::sleep_until(start + Duration::from_millis(4_400)).await;
    assert_eq!(checks(&c), 1, "no check before interval - 10 %");
    tokio::time::sleep_until(start + Duration::from_millis(6_700)).await;
    assert_eq!(
        checks(&c),
        2,
        "second check within interval + 10 % (+ the 1 s timeout)"
    );
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}
