//! v2: batch check-in, the service list, the catalog, and the index.

use axum::http::StatusCode;
use serde_json::json;

use crate::common::Harness;

#[tokio::test]
async fn batch_check_in_answers_accepted_and_ttl() {
    let h = Harness::new();
    let body = json!({"ip": "10.0.0.1", "endpoints": [
        {"service": "web", "port": 80, "tags": {"az": "a"}},
        {"service": "web", "port": 81},
        {"service": "api", "ip": "10.0.0.1", "port": "9000", "revision": "v1"}
    ]});
    let r = h.post_json("/v2/checkin", &body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"accepted": 3, "ttl_secs": 180}));

    let v = h.get("/v2/services").await;
    assert_eq!(v.status, StatusCode::OK);
    let v = v.json();
    assert_eq!(
        v["services"],
        json!([{"service": "api", "hosts": 1}, {"service": "web", "hosts": 2}])
    );
    assert!(v["index"].as_u64().is_some());
}

#[tokio::test]
async fn batch_check_in_refuses_bad_entries_whole() {
    let h = Harness::new();
    let body = json!({"endpoints": [{"service": "web", "ip": "10.0.0.1", "port": 80}, {"service": "web", "port": 81}]});
    h.post_json("/v2/checkin", &body)
        .await
        .assert_error(400, "invalid_request");
    assert!(
        h.get("/v1/registration/web").await.hosts().is_empty(),
        "nothing stored from a refused batch"
    );
    let many: Vec<_> = (1..=257)
        .map(|p| json!({"service": "web", "port": p}))
        .collect();
    let r = h
        .post_json("/v2/checkin", &json!({"ip": "10.0.0.1", "endpoints": many}))
        .await;
    r.assert_error(400, "invalid_request");
}

#[tokio::test]
async fn catalog_lists_every_service_with_flags() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    h.register("api", "10.0.0.2", 90).await;
    let r = h.get("/v2/catalog").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["services"]["web"][0]["ip_address"], "10.0.0.1");
    assert_eq!(v["services"]["api"][0]["port"], 90);
    assert_eq!(v["index"].as_u64(), Some(r.index()));
    assert_eq!(v["stale"], false);
    assert_eq!(v["warming"], true, "fresh registry on an empty store");
    assert!(v["generated_at_ms"].as_u64().is_some());
}

#[tokio::test]
async fn index_moves_on_changes_only() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let i1 = h.get("/v2/services/web").await.index();
    let c1 = h.get("/v2/catalog").await.index();
    h.clock.advance(std::time::Duration::from_secs(30));
    h.register("web", "10.0.0.1", 80).await;
    assert_eq!(
        h.get("/v2/services/web").await.index(),
        i1,
        "a re-check-in is not a change"
    );
    assert_eq!(h.get("/v2/catalog").await.index(), c1);

    let r = h
        .post_form("/v1/registration/web", "ip=10.0.0.1&port=80&revision=v2")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let i2 = h.get("/v2/services/web").await.index();
    assert_ne!(i2, i1, "a new revision is a change");
    assert_eq!(
        h.post_form("/v1/loadbalancing/web", "load_balancing_weight=3")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let i3 = h.get("/v2/services/web").await.index();
    assert_ne!(i3, i2, "a weight is a change");
    h.register("api", "10.0.0.2", 80).await;
    assert_eq!(
        h.get("/v2/services/web").await.index(),
        i3,
        "another service's change is not this one's"
    );
    assert_ne!(h.get("/v2/catalog").await.index(), c1);
}

#[tokio::test]
async fn blocking_params_are_validated() {
    let h = Harness::new();
    h.get("/v2/catalog?index=abc")
        .await
        .assert_error(400, "bad_request");
    h.get("/v2/services/web?index=1&wait=forever")
        .await
        .assert_error(400, "bad_request");
    h.get("/v2/services/BAD?index=1")
        .await
        .assert_error(400, "invalid_request");
    // Unknown parameters are ignored, as Consul does.
    assert_eq!(h.get("/v2/catalog?stale&dc=x").await.status, StatusCode::OK);
}
