//! Hostile-client limits: the blocking-waiter bound and the storage quotas. Past a limit the
//! registry answers at once with a JSON error naming it, counts the refusal in `/metrics`,
//! and keeps serving everything else.

use std::time::Duration;

use axum::http::StatusCode;
use discovery::RegistryConfig;
use tokio::time::Instant;

use crate::common::{Harness, get_req, send};

/// Yields (a bounded number of times) until exactly `n` queries are blocked.
async fn blocked(h: &Harness, n: usize) {
    let needle = format!("tidings_registry_blocking_queries {n}");
    for _ in 0..10_000 {
        if h.registry.render_metrics().contains(&needle) {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never saw {n} blocked queries");
}

fn rejected(h: &Harness, limit: &str) -> u64 {
    let needle = format!("tidings_registry_rejected_total{{limit=\"{limit}\"}} ");
    h.registry
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(str::to_string))
        .map_or(0, |v| v.trim().parse().expect("counter value"))
}

#[tokio::test(start_paused = true)]
async fn blocking_waiters_past_the_bound_get_429_at_once() {
    let h = Harness::with_config(RegistryConfig {
        max_blocking_waiters: 2,
        ..Default::default()
    });
    h.register("web", "10.0.0.1", 80).await;
    let index = h.get("/v2/catalog").await.index();
    let catalog = format!("/v2/catalog?index={index}&wait=5m");
    let service = format!(
        "/v2/services/web?index={}&wait=5m",
        h.get("/v2/services/web").await.index()
    );
    let first = tokio::spawn(send(h.app.clone(), get_req(&catalog)));
    let second = tokio::spawn(send(h.app.clone(), get_req(&service)));
    blocked(&h, 2).await;

    // The bound is shared by both blocking routes, and the refusal does not wait.
    let start = Instant::now();
    for uri in [&catalog, &service] {
        let r = h.get(uri).await;
        r.assert_error(429, "too_many_waiters");
        let secs: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After seconds");
        assert!((1..=5).contains(&secs), "Retry-After {secs}");
        let msg = r.json()["error"]["message"].to_string();
        assert!(msg.contains("max_blocking_waiters = 2"), "{msg}");
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(rejected(&h, "max_blocking_waiters"), 2);

    // Reads that do not wait still answer: no index, or an index that is already old.
    assert_eq!(h.get("/v2/catalog").await.status, StatusCode::OK);
    let old = format!("/v2/catalog?index={}&wait=5m", index + 1);
    assert_eq!(h.get(&old).await.status, StatusCode::OK);
    assert_eq!(h.get("/v1/registration/web").await.status, StatusCode::OK);

    // A waiter that goes away gives its permit back: the next one waits again.
    first.abort();
    assert!(first.await.is_err(), "aborted");
    blocked(&h, 1).await;
    let third = tokio::spawn(send(h.app.clone(), get_req(&catalog)));
    blocked(&h, 2).await;
    h.register("web", "10.0.0.2", 80).await;
    for w in [second, third] {
        let r = w.await.expect("join");
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(rejected(&h, "max_blocking_waiters"), 2);
}
