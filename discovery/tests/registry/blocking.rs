//! Blocking queries under paused tokio time: they wake on a change, not on a plain
//! re-check-in, and otherwise answer at their (jittered) wait.

use std::time::Duration;

use axum::http::StatusCode;
use tokio::time::Instant;

use crate::common::{Harness, get_req, send};

/// Yields (a bounded number of times) until `n` queries are blocked inside the registry, so
/// the test acts only once the waiter is really waiting.
pub(crate) async fn blocked(h: &Harness, n: usize) {
    let needle = format!("tidings_registry_blocking_queries {n}");
    for _ in 0..10_000 {
        if h.registry.render_metrics().contains(&needle) {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never saw {n} blocked queries");
}

fn within(elapsed: Duration, lo: Duration, hi: Duration) {
    assert!(
        elapsed >= lo && elapsed <= hi,
        "{elapsed:?} not within [{lo:?}, {hi:?}]"
    );
}

#[tokio::test(start_paused = true)]
async fn service_query_answers_at_once_without_or_with_an_old_index() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let start = Instant::now();
    let r = h.get("/v2/services/web?wait=30s").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = h
        .get(&format!(
            "/v2/services/web?index={}&wait=30s",
            r.index() + 1
        ))
        .await;
    assert_eq!(r.hosts().len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn service_query_is_not_woken_by_a_plain_re_check_in() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let index = h.get("/v2/services/web").await.index();
    let start = Instant::now();
    let waiter = tokio::spawn(send(
        h.app.clone(),
        get_req(&format!("/v2/services/web?index={index}&wait=32s")),
    ));
    blocked(&h, 1).await;
    tokio::time::advance(Duration::from_secs(5)).await;
    h.clock.advance(Duration::from_secs(5));
    h.register("web", "10.0.0.1", 80).await;
    let r = waiter.await.expect("join");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.index(), index);
    // 32 s ± 1/16.
    within(
        start.elapsed(),
        Duration::from_secs(30),
        Duration::from_secs(34),
    );
}

#[tokio::test(start_paused = true)]
async fn service_query_wakes_on_a_change() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let index = h.get("/v2/services/web").await.index();
    let start = Instant::now();
    let waiter = tokio::spawn(send(
        h.app.clone(),
        get_req(&format!("/v2/services/web?index={index}&wait=60s")),
    ));
    blocked(&h, 1).await;
    tokio::time::advance(Duration::from_millis(2500)).await;
    h.register("web", "10.0.0.2", 80).await;
    let r = waiter.await.expect("join");
    assert_ne!(r.index(), index);
    assert_eq!(r.hosts().len(), 2);
    within(
        start.elapsed(),
        Duration::from_millis(2500),
        Duration::from_millis(2600),
    );
}

#[tokio::test(start_paused = true)]
async fn catalog_query_wakes_on_a_change_and_on_expiry() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let index = h.get("/v2/catalog").await.index();
    let start = Instant::now();
    let waiter = tokio::spawn(send(
        h.app.clone(),
        get_req(&format!("/v2/catalog?index={index}&wait=5m")),
    ));
    blocked(&h, 1).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    h.register("api", "10.0.0.2", 80).await;
    let r = waiter.await.expect("join");
    assert!(start.elapsed() < Duration::from_secs(2));
    let v = r.json();
    assert!(v["services"]["api"].is_array(), "{v}");

    // Nothing is written when rows expire: the periodic re-check notices.
    let index = r.index();
    let waiter = tokio::spawn(send(
        h.app.clone(),
        get_req(&format!("/v2/catalog?index={index}&wait=5m")),
    ));
    blocked(&h, 1).await;
    tokio::time::advance(Duration::from_millis(100)).await;
    // The sweeper counted half-way, as it does in production (without any count for longer
    // than `ttl - check_in_interval` the registry is blind and expires nobody); the expiry
    // itself is still written by no one.
    h.clock.advance(Duration::from_secs(90));
    h.registry.sweep_once().await.expect("sweep");
    h.clock.advance(Duration::from_secs(91));
    let start = Instant::now();
    let r = waiter.await.expect("join");
    within(start.elapsed(), Duration::ZERO, Duration::from_millis(1100));
    assert_eq!(r.json()["services"], serde_json::json!({}));
}

#[tokio::test(start_paused = true)]
async fn catalog_query_returns_at_wait_and_wait_is_capped() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let index = h.get("/v2/catalog").await.index();
    let start = Instant::now();
    let r = h.get(&format!("/v2/catalog?index={index}&wait=10s")).await;
    assert_eq!(r.index(), index);
    within(
        start.elapsed(),
        Duration::from_millis(9375),
        Duration::from_millis(10625),
    );

    let start = Instant::now();
    let r = h.get(&format!("/v2/catalog?index={index}&wait=2h")).await;
    assert_eq!(r.status, StatusCode::OK);
    let max = h.registry.config().max_wait;
    within(start.elapsed(), max - max / 16, max + max / 16);
}

#[tokio::test(start_paused = true)]
async fn draining_releases_blocked_queries() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let index = h.get("/v2/catalog").await.index();
    let waiter = tokio::spawn(send(
        h.app.clone(),
        get_req(&format!("/v2/catalog?index={index}&wait=5m")),
    ));
    blocked(&h, 1).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let start = Instant::now();
    h.registry.start_draining();
    let r = waiter.await.expect("join");
    assert_eq!(r.status, StatusCode::OK);
    assert!(start.elapsed() < Duration::from_millis(10));
    assert_eq!(
        h.get("/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(start_paused = true)]
async fn a_change_wakes_many_watchers_with_one_store_read() {
    use std::sync::atomic::Ordering;
    let h = Harness::new();
    h.store.slow.store(true, Ordering::SeqCst);
    h.register("web", "10.0.0.1", 80).await;
    let index = h.get("/v2/catalog").await.index();
    let uri = format!("/v2/catalog?index={index}&wait=5m");
    let waiters: Vec<_> = (0..50)
        .map(|_| tokio::spawn(send(h.app.clone(), get_req(&uri))))
        .collect();
    blocked(&h, 50).await;
    let before = h.store.list_all_calls.load(Ordering::SeqCst);
    h.register("web", "10.0.0.2", 80).await;
    for w in waiters {
        let r = w.await.expect("join");
        assert_ne!(r.index(), index);
    }
    let reads = h.store.list_all_calls.load(Ordering::SeqCst) - before;
    assert_eq!(reads, 1, "one shared store read for 50 woken watchers");
}
