//! The merge table (docs/ARCHITECTURE.md#merge-table) end to end: discovery and health checks merged on real sockets.

mod support;

use std::time::Duration;

use support::*;

async fn hits_of(p: &Running, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = p.get("/").await;
        assert_eq!(r.status, 200, "{}", r.body);
        out.push(r.body);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_absent_from_discovery_but_passing_checks_keeps_traffic() {
    let (a, b, m, p) = two_routed().await;

    m.set(vec![Listed::up(a.addr)]);
    eventually(Duration::from_secs(5), "b absent", || async {
        p.host(b.addr)
            .await
            .is_some_and(|h| h["discovery"] == "absent")
    })
    .await;
    // Health checks win: still routed, and round robin still sends it half the traffic.
    assert_eq!(p.decision(b.addr).await.as_deref(), Some("route"));
    let bodies = hits_of(&p, 20).await;
    assert_eq!(
        bodies.iter().filter(|b| *b == "backend-2").count(),
        10,
        "{bodies:?}"
    );

    // Once it also fails its checks, it is removed.
    b.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually(Duration::from_secs(5), "b removed", || async {
        p.host(b.addr).await.is_none()
    })
    .await;
    assert!(hits_of(&p, 10).await.iter().all(|b| b == "backend-1"));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_failing_checks_stops_receiving_traffic_within_interval_times_threshold() {
    let (_a, b, _m, p) = two_routed().await;

    b.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    eventually(Duration::from_secs(3), "b held", || async {
        p.decision(b.addr).await.as_deref() == Some("hold")
    })
    .await;
    // interval 100 ms ± 10 % × threshold 2, plus scheduling slack.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let before = b.hits();
    assert!(hits_of(&p, 20).await.iter().all(|x| x == "backend-1"));
    assert_eq!(b.hits(), before);
    // Still listed, so it is kept and checked; when it recovers it is routed again.
    b.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    p.wait_routed(&[b.addr]).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistered_endpoint_is_drained_without_failing_in_flight_requests() {
    let (a, b) = (
        Backend::start(1, Duration::from_millis(800)).await,
        Backend::start(2, Duration::from_millis(800)).await,
    );
    let m = Membership::start(vec![Listed::up(a.addr), Listed::up(b.addr)]).await;
    let p = std::sync::Arc::new(start(config(&m.url())).await);
    p.wait_routed(&[a.addr, b.addr]).await;

    // Four slow requests: round robin puts two on b.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let p = p.clone();
        slow.push(tokio::spawn(async move { p.get("/slow").await }));
    }
    eventually(Duration::from_secs(3), "slow requests reach b", || async {
        b.slow_started.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;

    m.set(vec![Listed::up(a.addr), Listed::draining(b.addr)]);
    eventually(Duration::from_secs(3), "b draining", || async {
        p.decision(b.addr).await.as_deref() == Some("drain")
    })
    .await;
    let before = b.hits();
    assert!(
        hits_of(&p, 10).await.iter().all(|x| x == "backend-1"),
        "no new requests to a draining host"
    );
    for s in slow {
        let r = s.await.expect("join");
        assert_eq!(r.status, 200, "in-flight request failed: {}", r.body);
    }
    assert!(b.hits() > before, "b finished its in-flight requests");
    eventually(Duration::from_secs(5), "b removed after drain", || async {
        p.host(b.addr).await.is_none()
    })
    .await;
    match std::sync::Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("proxy handle still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_on_with_the_membership_server_down() {
    let (a, _b, m, p) = two_routed().await;

    m.kill();
    eventually(
        Duration::from_secs(10),
        "membership errors seen",
        || async {
            let (_, body) = p.admin("/clusters").await;
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            v["clusters"][0]["membership"]["consecutive_errors"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        },
    )
    .await;
    let bodies = hits_of(&p, 20).await;
    assert_eq!(
        bodies.iter().filter(|b| *b == "backend-1").count(),
        10,
        "{bodies:?}"
    );
    // Both hosts are still present as far as the proxy knows: fail static.
    assert_eq!(p.host(a.addr).await.expect("a")["discovery"], "present");
    let (status, _) = p.admin("/ready").await;
    assert_eq!(status, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_host_needs_one_passing_check_and_unhealthy_new_host_is_never_routed() {
    let a = Backend::start(1, Duration::ZERO).await;
    let b = Backend::start(2, Duration::ZERO).await;
    b.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    let m = Membership::start(vec![Listed::up(a.addr), Listed::up(b.addr)]).await;
    let p = start(config(&m.url())).await;
    p.wait_routed(&[a.addr]).await;
    eventually(Duration::from_secs(3), "b checked", || async {
        p.host(b.addr)
            .await
            .is_some_and(|h| h["health"] == "unhealthy")
    })
    .await;
    assert!(hits_of(&p, 10).await.iter().all(|x| x == "backend-1"));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_aware_proxy_keeps_traffic_in_its_zone_and_fails_over() {
    let mut bs = Vec::new();
    for i in 0..6 {
        bs.push(Backend::start(i, Duration::ZERO).await);
    }
    let zone = |i: usize| if i < 3 { "a" } else { "b" };
    let listed = |bs: &[Backend]| {
        bs.iter()
            .map(|b| Listed::in_zone(b.addr, zone(b.id)))
            .collect::<Vec<_>>()
    };
    let m = Membership::start(listed(&bs)).await;
    let mut cfg = config(&m.url());
    cfg.zone = Some("a".into());
    let p = start(cfg).await;
    p.wait_routed(&bs.iter().map(|b| b.addr).collect::<Vec<_>>())
        .await;
    // Half the capacity is local and proxies are assumed spread evenly: all traffic stays local.
    let bodies = hits_of(&p, 30).await;
    assert!(
        bodies
            .iter()
            .all(|b| ["backend-0", "backend-1", "backend-2"].contains(&b.as_str())),
        "{bodies:?}"
    );
    // The local zone fails its checks: all zones take the traffic.
    for b in &bs[..3] {
        b.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    }
    for b in &bs[..3] {
        eventually(Duration::from_secs(3), "zone a held", || async {
            p.decision(b.addr).await.as_deref() == Some("hold")
        })
        .await;
    }
    let bodies = hits_of(&p, 30).await;
    assert!(
        bodies
            .iter()
            .all(|b| ["backend-3", "backend-4", "backend-5"].contains(&b.as_str())),
        "{bodies:?}"
    );
    assert!(p.handle.is_ready());
    assert_eq!(p.handle.clusters()[0].hosts.len(), 6);
    p.stop().await;
}
