//! Expiry, warm-up, self-preservation and the sweeper, on a `ManualClock`; and the last-good
//! cache when the store fails.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use discovery::{RegistryConfig, Store};
use schema::ServiceName;
use serde_json::json;

use crate::common::{FlakyStore, Harness, T0, fleet_check_in};

const TTL: Duration = Duration::from_secs(180);

#[tokio::test]
async fn expired_hosts_are_filtered_on_read_and_reads_never_write() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    // The sweeper counts the fleet as it runs in production (a registry that counted
    // nothing for longer than `ttl - check_in_interval` is blind and expires nobody).
    h.clock.advance(TTL / 2);
    h.registry.sweep_once().await.expect("sweep");
    h.clock.advance(TTL / 2 - Duration::from_millis(1));
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 1);
    h.clock.advance(Duration::from_millis(1));
    assert!(
        h.get("/v1/registration/web").await.hosts().is_empty(),
        "expired at exactly the TTL"
    );
    assert_eq!(
        h.store.inner.list_all().await.expect("ok").len(),
        1,
        "the read deleted nothing"
    );
    // A check-in brings it back.
    h.register("web", "10.0.0.1", 80).await;
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 1);
}

#[tokio::test]
async fn warming_for_one_interval_after_an_empty_start() {
    let h = Harness::new();
    let r = h.get("/v1/registration/web").await;
    assert!(r.warming());
    assert_eq!(h.get("/v2/catalog").await.json()["warming"], true);
    assert!(
        h.post_form("/v1/registration/web", "ip=10.0.0.1&port=80")
            .await
            .warming()
    );
    h.clock.advance(Duration::from_secs(60));
    let r = h.get("/v2/catalog").await;
    assert!(!r.warming());
    assert_eq!(r.json()["warming"], false);
}

/// Fault campaign seeds 17376954526109724119 and 11199349668018104125: a registry restarted
/// empty, saw the fleet check in for a second, then was paused (SIGSTOP) past the TTL. It
/// woke with no baseline (its only count had seen an empty store) and its warm-up spent:
/// it expired every host and answered agents, authoritatively, with nobody. A blind spot
/// must protect the fleet the registry last saw, and warm-up lasts one interval of the
/// registry being able to see.
#[tokio::test]
async fn a_registry_paused_during_its_warm_up_wakes_warming_and_expires_nobody() {
    let h = Harness::new();
    assert!(h.get("/v1/registration/web").await.warming());
    fleet_check_in(&h, 0..10).await;
    // Paused for twice the TTL before any count saw those hosts.
    h.clock.advance(2 * TTL);
    let r = h.get("/v1/registration/web").await;
    assert_eq!(
        r.hosts().len(),
        10,
        "the first read after waking expires nobody"
    );
    assert!(
        r.warming(),
        "warm-up starts again: it saw one second of check-ins"
    );
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert!(rep.preserving && rep.deleted == 0, "{rep:?}");
    // The hosts check in again within the renewal window; the one that never does expires
    // once the window has passed, and warm-up ends one interval after waking.
    h.clock.advance(Duration::from_secs(1));
    fleet_check_in(&h, 0..9).await;
    h.clock.advance(Duration::from_secs(75));
    fleet_check_in(&h, 0..9).await;
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert!(!rep.preserving, "{rep:?}");
    assert_eq!(rep.deleted, 1);
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 9);
    assert!(!r.warming());
}

#[tokio::test]
async fn a_wall_clock_step_neither_ends_nor_stretches_warm_up() {
    // Found by the fault campaign: a registry restarted empty while its clock was stepped
    // back, then stepped forward again, ended warm-up at once; the first authoritative answer
    // then left out the hosts whose check-ins the stepped clock had dated in the past, and
    // every agent dropped them.
    let h = Harness::new();
    h.clock.advance(Duration::from_secs(2));
    h.clock.step_wall(25_000);
    let r = h.get("/v2/catalog").await;
    assert!(r.warming(), "a forward step ended warm-up");
    assert_eq!(r.json()["warming"], true);
    h.clock.step_wall(-3_600_000);
    h.clock.advance(Duration::from_secs(58));
    assert!(
        !h.get("/v2/catalog").await.warming(),
        "a backward step stretched warm-up"
    );
}

#[tokio::test]
async fn no_warming_when_the_store_already_had_rows() {
    let store = Arc::new(FlakyStore::default());
    let ep = schema::Endpoint::new(
        ServiceName::new("web").expect("name"),
        "10.0.0.1".parse().expect("ip"),
        std::num::NonZeroU16::new(80).expect("port"),
    );
    store.inner.check_in(&[ep], T0).await.expect("ok");
    let h = Harness::with_store(RegistryConfig::default(), store);
    let r = h.get("/v2/catalog").await;
    assert!(!r.warming());
    assert_eq!(r.json()["warming"], false);
}

#[tokio::test]
async fn a_restart_after_an_outage_longer_than_the_ttl_preserves_the_last_fleet() {
    let store = Arc::new(FlakyStore::default());
    let eps: Vec<_> = (0..10u8)
        .map(|i| {
            let ip = std::net::IpAddr::from([10, 0, 0, i]);
            schema::Endpoint::new(
                ServiceName::new("web").expect("name"),
                ip,
                std::num::NonZeroU16::new(80).expect("port"),
            )
        })
        .collect();
    // The fleet last checked in an hour before this registry starts.
    store
        .inner
        .check_in(&eps, T0 - 3_600_000)
        .await
        .expect("ok");
    let h = Harness::with_store(RegistryConfig::default(), store);
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 10, "preserved from the first answer");
    assert!(r.stale());
    assert!(!r.warming());
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert!(rep.preserving);
    assert_eq!((rep.baseline, rep.deleted), (10, 0));

    fleet_check_in(&h, 0..10).await;
    assert!(!h.registry.sweep_once().await.expect("sweep").preserving);
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 10);
    assert!(!r.stale());
}

#[tokio::test]
async fn a_replica_restarted_on_a_shared_store_keeps_the_hosts_that_could_not_reach_it() {
    // Found by the fault campaign: two replicas share one table; replica A was killed for
    // longer than the TTL, so the hosts checking in to it expired while B (preserving, as
    // half its fleet was silent) kept them. A came back, took its baseline from the recent
    // check-ins (B's hosts only), judged renewals healthy and swept the rows B was
    // preserving, and its first answers lacked them: every agent dropped those hosts until
    // they checked in again.
    let store = Arc::new(FlakyStore::default());
    let eps: Vec<_> = (0..10u8)
        .map(|i| {
            schema::Endpoint::new(
                ServiceName::new("web").expect("name"),
                std::net::IpAddr::from([10, 0, 0, i]),
                std::num::NonZeroU16::new(80).expect("port"),
            )
        })
        .collect();
    // Hosts 0..5 (A's) last checked in just past the TTL ago; hosts 5..10 (B's) just now.
    let ttl_ms = u64::try_from(TTL.as_millis()).expect("ttl");
    store
        .inner
        .check_in(&eps[..5], T0 - ttl_ms - 1_000)
        .await
        .expect("ok");
    store.inner.check_in(&eps[5..], T0).await.expect("ok");
    let h = Harness::with_store(RegistryConfig::default(), store);
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 10, "the first answer dropped A's hosts");
    assert!(r.stale());
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert!(rep.preserving, "{rep:?}");
    assert_eq!(rep.deleted, 0, "swept rows the other replica preserves");

    // A's hosts find it again within the renewal window (75 s), except host 4.
    h.clock.advance(Duration::from_secs(30));
    fleet_check_in(&h, 0..4).await;
    fleet_check_in(&h, 5..10).await;
    assert!(h.registry.sweep_once().await.expect("sweep").preserving);
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 10);
    // The window is over: host 4, which never returned, expires as usual.
    h.clock.advance(Duration::from_secs(46));
    fleet_check_in(&h, 0..4).await;
    fleet_check_in(&h, 5..10).await;
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert!(!rep.preserving, "{rep:?}");
    assert_eq!(rep.deleted, 1);
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 9);
    assert!(!r.stale());
}

#[tokio::test]
async fn self_preservation_stops_expiry_when_check_ins_collapse_and_recovers() {
    let h = Harness::new();
    fleet_check_in(&h, 0..20).await;
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert_eq!(rep.baseline, 20);
    assert!(!rep.preserving);

    // Only half the fleet gets through for the next intervals (a broken path, a cron failure).
    for _ in 0..4 {
        h.clock.advance(Duration::from_secs(60));
        fleet_check_in(&h, 0..10).await;
        let rep = h.registry.sweep_once().await.expect("sweep");
        if h.clock_elapsed() > Duration::from_secs(100) {
            assert!(rep.preserving, "{rep:?}");
            assert_eq!(rep.deleted, 0);
        }
    }
    assert!(h.registry.self_preservation_active());
    // Past the TTL for the silent half, yet every host is still served, flagged stale.
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 20);
    assert!(r.stale());
    let c = h.get("/v2/catalog").await;
    assert_eq!(c.json()["stale"], true);
    assert_eq!(
        h.store.inner.list_all().await.expect("ok").len(),
        20,
        "the sweeper deleted nothing"
    );

    // The path heals: everyone checks in, expiry resumes.
    fleet_check_in(&h, 0..20).await;
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert!(!rep.preserving, "{rep:?}");
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 20);
    assert!(!r.stale());

    // One host really stops: it expires normally while the rest renew.
    for _ in 0..4 {
        h.clock.advance(Duration::from_secs(60));
        fleet_check_in(&h, 1..20).await;
        assert!(!h.registry.sweep_once().await.expect("sweep").preserving);
    }
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 19);
    assert_eq!(
        h.store.inner.list_all().await.expect("ok").len(),
        19,
        "swept"
    );
}

#[tokio::test]
async fn a_registry_paused_past_the_ttl_serves_every_host_until_they_check_in_again() {
    let h = Harness::new();
    fleet_check_in(&h, 0..10).await;
    assert!(!h.registry.sweep_once().await.expect("sweep").preserving);
    // SIGSTOP (or a VM pause) for twice the TTL: no sweep ran, no check-in got through.
    h.clock.advance(2 * TTL);
    let r = h.get("/v1/registration/web").await;
    assert_eq!(
        r.hosts().len(),
        10,
        "the first read after waking expires nobody"
    );
    assert!(r.stale());
    // Most hosts are back within moments; one is slower. Renewals are above 85 %, yet every
    // host gets one renewal window (75 s) before expiry resumes.
    h.clock.advance(Duration::from_secs(1));
    fleet_check_in(&h, 0..9).await;
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert!(rep.preserving && rep.deleted == 0, "{rep:?}");
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 10);
    // The window has passed and host 9 never came back: it expires as usual.
    h.clock.advance(Duration::from_secs(75));
    fleet_check_in(&h, 0..9).await;
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert!(!rep.preserving, "{rep:?}");
    assert_eq!(rep.deleted, 1);
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 9);
    assert!(!r.stale());
}

#[tokio::test]
async fn reads_racing_the_first_count_after_a_pause_wait_for_its_decision() {
    use std::sync::atomic::Ordering;
    let h = Harness::new();
    fleet_check_in(&h, 0..10).await;
    h.registry.sweep_once().await.expect("sweep");
    h.clock.advance(2 * TTL);
    // The count's store read yields, so the second read runs while the first one counts: it
    // must wait for that decision, not answer from the one made before the pause.
    h.store.slow.store(true, Ordering::SeqCst);
    let (a, b) = tokio::join!(h.get("/v1/registration/web"), h.get("/v1/registration/web"));
    assert_eq!((a.hosts().len(), b.hosts().len()), (10, 10));
    assert!(a.stale() && b.stale());
}

/// A read judges expiry only with a fleet count newer than the shelf life. Here the count
/// after a pause fails (the store answers single-service reads but not the scan), so the
/// decision from before the pause is all there is: hosts past the TTL stay, flagged stale,
/// instead of being expired by a verdict nobody made. (Campaign seed 17376954526109724119
/// saw hosts vanish from the first answers after a SIGSTOP past the TTL.)
#[tokio::test]
async fn reads_never_expire_hosts_on_a_fleet_count_older_than_the_shelf_life() {
    use std::sync::atomic::Ordering;
    let h = Harness::new();
    fleet_check_in(&h, 0..10).await;
    assert!(!h.registry.sweep_once().await.expect("sweep").preserving);
    h.clock.advance(2 * TTL);
    h.store.scans_failing.store(true, Ordering::SeqCst);
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 10, "expired on an outdated decision");
    assert!(r.stale());
    // Once a count succeeds, its decision rules (here: the blind spot holds preservation).
    h.store.scans_failing.store(false, Ordering::SeqCst);
    h.registry.sweep_once().await.expect("sweep");
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 10);
}

#[tokio::test]
async fn deregistration_lowers_the_baseline_so_scale_down_does_not_preserve() {
    let h = Harness::new();
    fleet_check_in(&h, 0..20).await;
    h.registry.sweep_once().await.expect("sweep");
    for i in 10..20 {
        let r = h
            .call(
                "DELETE",
                &format!("/v1/registration/web/10.0.0.{i}"),
                &[],
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    h.clock.advance(Duration::from_secs(60));
    fleet_check_in(&h, 0..10).await;
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert_eq!(rep.baseline, 10);
    assert!(!rep.preserving);
}

#[tokio::test]
async fn sweeper_deletes_at_a_bounded_rate() {
    let cfg = RegistryConfig {
        sweep_max_per_pass: 10,
        self_preservation: false,
        ..Default::default()
    };
    let h = Harness::with_config(cfg);
    fleet_check_in(&h, 0..35).await;
    h.clock.advance(TTL);
    let mut deleted = Vec::new();
    for _ in 0..5 {
        deleted.push(h.registry.sweep_once().await.expect("sweep").deleted);
    }
    assert_eq!(deleted, vec![10, 10, 10, 5, 0]);
    assert!(h.store.inner.is_empty());
}

#[tokio::test]
async fn store_failure_answers_503_for_writes_and_stale_cache_for_reads() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 1);
    assert_eq!(h.get("/v2/catalog").await.status, StatusCode::OK);
    h.store.fail(true);
    h.clock.advance(Duration::from_secs(5));

    let r = h
        .post_form("/v1/registration/web", "ip=10.0.0.1&port=80")
        .await;
    r.assert_error(503, "store_unavailable");
    assert_eq!(r.header("retry-after"), Some("5"));
    h.post_json(
        "/v2/checkin",
        &json!({"ip": "10.0.0.1", "endpoints": [{"service": "web", "port": 80}]}),
    )
    .await
    .assert_error(503, "store_unavailable");

    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.stale());
    assert_eq!(r.hosts().len(), 1);
    let c = h.get("/v2/catalog").await;
    assert!(c.stale());
    assert_eq!(c.json()["stale"], true);
    let repo = h.get("/v1/registration/repo/x").await;
    assert!(repo.stale(), "repo reads fall back to the cached catalog");

    h.get("/v1/registration/never-read")
        .await
        .assert_error(503, "store_unavailable");

    h.store.fail(false);
    let r = h.get("/v1/registration/web").await;
    assert!(!r.stale());
}

impl Harness {
    fn clock_elapsed(&self) -> Duration {
        use discovery::Clock;
        Duration::from_millis(self.clock.now_ms() - T0)
    }
}

#[tokio::test(start_paused = true)]
async fn a_hanging_store_times_out_into_503_and_stale_reads() {
    use std::sync::atomic::Ordering;
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 1);
    h.store.hang.store(true, Ordering::SeqCst);
    h.clock.advance(Duration::from_secs(5));
    let start = tokio::time::Instant::now();
    h.post_form("/v1/registration/web", "ip=10.0.0.1&port=80")
        .await
        .assert_error(503, "store_unavailable");
    assert_eq!(start.elapsed(), h.registry.config().store_timeout);
    let r = h.get("/v1/registration/web").await;
    assert!(r.stale());
    assert_eq!(r.hosts().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn handler_timeout_is_a_json_503() {
    use std::sync::atomic::Ordering;
    let cfg = RegistryConfig {
        handler_timeout: Duration::from_millis(1500),
        store_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let h = Harness::with_config(cfg);
    h.store.hang.store(true, Ordering::SeqCst);
    // Two store calls of 1 s each (the start-up look at the store, then the write) outlast
    // the handler's own limit, which answers.
    let start = tokio::time::Instant::now();
    let r = h
        .post_form("/v1/registration/web", "ip=10.0.0.1&port=80")
        .await;
    r.assert_error(503, "timeout");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
}

#[tokio::test]
async fn a_replica_whose_clock_stepped_back_still_sees_the_other_replicas_writes() {
    // Found by the fault campaign (seed 3095031893209821760): replica B's clock ran 20 s
    // ahead, then was stepped back. The answers it had cached while ahead were dated fresh
    // until 20 s past the real time, so for 20 s it kept answering its old listing and
    // never saw the cron host that had just checked in through replica A: every agent
    // syncing from B lacked it. How long a cached answer is reused is a span of this
    // process, not a wall-clock date.
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    h.clock.step_wall(20_000);
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 1);
    assert_eq!(
        h.get("/v2/catalog").await.json()["services"]["web"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    h.clock.step_wall(-20_000);
    // Replica A (sharing the table) stores a second host with the right time.
    let other = schema::Endpoint::new(
        ServiceName::new("web").expect("name"),
        "10.0.0.2".parse().expect("ip"),
        std::num::NonZeroU16::new(80).expect("port"),
    );
    h.store
        .inner
        .check_in(&[other], h.registry.now_ms())
        .await
        .expect("direct write");
    // Past the read cache's reuse time (1 s by default), both answers list it.
    h.clock.advance(Duration::from_millis(1_100));
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 2);
    assert_eq!(
        h.get("/v2/catalog").await.json()["services"]["web"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}
