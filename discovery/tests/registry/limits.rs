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

fn checkin(endpoints: &[(&str, &str, u16)]) -> serde_json::Value {
    let eps: Vec<_> = endpoints
        .iter()
        .map(|(s, ip, port)| serde_json::json!({"service": s, "ip": ip, "port": port}))
        .collect();
    serde_json::json!({ "endpoints": eps })
}

fn assert_quota(r: &crate::common::Resp, limit: &str, value: u64) {
    r.assert_error(403, "quota_exceeded");
    let msg = r.json()["error"]["message"].to_string();
    assert!(msg.contains(&format!("{limit} = {value}")), "{msg}");
}

#[tokio::test]
async fn endpoints_per_ip_quota_refuses_newcomers_but_renews_what_is_stored() {
    let h = Harness::with_config(RegistryConfig {
        max_endpoints_per_ip: 2,
        ..Default::default()
    });
    let two = [("web", "10.0.0.1", 80), ("api", "10.0.0.1", 81)];
    let r = h.post_json("/v2/checkin", &checkin(&two)).await;
    assert_eq!(r.status, StatusCode::OK);

    // A batch with one endpoint too many is refused, naming the quota...
    h.clock.advance(Duration::from_secs(100));
    let three = [two[0], two[1], ("db", "10.0.0.1", 82)];
    let r = h.post_json("/v2/checkin", &checkin(&three)).await;
    assert_quota(&r, "max_endpoints_per_ip", 2);
    assert_eq!(rejected(&h, "max_endpoints_per_ip"), 1);
    // ...but the two it already held were renewed: 200 s after their first check-in (past
    // the 180 s TTL) they are still live.
    h.clock.advance(Duration::from_secs(100));
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 1);
    assert_eq!(h.get("/v1/registration/api").await.hosts().len(), 1);
    assert!(h.get("/v1/registration/db").await.hosts().is_empty());

    // v1 the same: a newcomer is refused, a renewal is not, another ip is not affected.
    let r = h
        .post_form("/v1/registration/db", "ip=10.0.0.1&port=82")
        .await;
    assert_quota(&r, "max_endpoints_per_ip", 2);
    h.register("web", "10.0.0.1", 80).await;
    h.register("db", "10.0.0.2", 82).await;
    let r = h.post_json("/v2/checkin", &checkin(&two)).await;
    assert_eq!(r.status, StatusCode::OK);

    // Deregistering frees the slot.
    let r = h
        .call(
            "DELETE",
            "/v1/registration/api/10.0.0.1",
            &[],
            axum::body::Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    h.register("db", "10.0.0.1", 82).await;
}

#[tokio::test]
async fn service_and_catalog_byte_quotas_refuse_growth_only() {
    let h = Harness::with_config(RegistryConfig {
        max_services: 2,
        ..Default::default()
    });
    h.register("web", "10.0.0.1", 80).await;
    h.register("api", "10.0.0.1", 81).await;
    h.register("web", "10.0.0.2", 80).await; // a known service may grow
    let r = h
        .post_form("/v1/registration/db", "ip=10.0.0.3&port=80")
        .await;
    assert_quota(&r, "max_services", 2);
    assert_eq!(rejected(&h, "max_services"), 1);
    h.register("api", "10.0.0.1", 81).await;

    // Each endpoint here takes a few hundred bytes: room for about three.
    let h = Harness::with_config(RegistryConfig {
        max_catalog_bytes: 700,
        ..Default::default()
    });
    let mut refused = None;
    for i in 1..=10u8 {
        let r = h
            .post_form("/v1/registration/web", &format!("ip=10.0.0.{i}&port=80"))
            .await;
        if r.status != StatusCode::OK {
            refused = Some((i, r));
            break;
        }
    }
    let (i, r) = refused.expect("the byte quota refuses some endpoint");
    assert!(i > 1, "the first endpoint fits");
    assert_quota(&r, "max_catalog_bytes", 700);
    h.register("web", "10.0.0.1", 80).await; // renewals still pass
    assert_eq!(
        h.get("/v1/registration/web").await.hosts().len(),
        usize::from(i) - 1,
        "nothing stored was dropped"
    );
}

#[tokio::test]
async fn quota_counts_follow_the_table_at_each_sweep() {
    use discovery::Store;
    let h = Harness::with_config(RegistryConfig {
        max_services: 2,
        ..Default::default()
    });
    h.register("web", "10.0.0.1", 80).await;
    // Another replica sharing the table stores a second service: this one learns of it
    // at its next fleet count.
    let other = schema::Endpoint::new(
        schema::ServiceName::new("api").expect("name"),
        "10.0.0.9".parse().expect("ip"),
        std::num::NonZeroU16::new(80).expect("port"),
    );
    h.store
        .inner
        .check_in(&[other], crate::common::T0)
        .await
        .expect("direct write");
    h.registry.sweep_once().await.expect("sweep");
    let r = h
        .post_form("/v1/registration/db", "ip=10.0.0.3&port=80")
        .await;
    assert_quota(&r, "max_services", 2);
}
