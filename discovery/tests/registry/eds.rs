//! `POST /v3/discovery:endpoints`, as a stock Envoy polls it.

use axum::http::StatusCode;
use serde_json::json;

use crate::common::Harness;

const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn request(name: &str, version: &str) -> serde_json::Value {
    json!({"version_info": version, "node": {"id": "envoy-1", "cluster": "edge"}, "resource_names": [name], "type_url": CLA})
}

#[tokio::test]
async fn one_assignment_then_304_until_membership_changes() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let r = h
        .post_json("/v3/discovery:endpoints", &request("web", ""))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["type_url"], CLA);
    assert_eq!(v["resources"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["resources"][0]["cluster_name"], "web");
    assert!(
        v["resources"][0].get("policy").is_none(),
        "no endpoint_stale_after: fail static"
    );
    let addr = &v["resources"][0]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(addr["address"], "10.0.0.1");
    assert_eq!(addr["port_value"], 80);
    let version = v["version_info"].as_str().expect("version").to_string();

    let same = h
        .post_json("/v3/discovery:endpoints", &request("web", &version))
        .await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED);
    h.register("web", "10.0.0.1", 80).await;
    let still = h
        .post_json("/v3/discovery:endpoints", &request("web", &version))
        .await;
    assert_eq!(
        still.status,
        StatusCode::NOT_MODIFIED,
        "a plain re-check-in is no change"
    );

    h.register("web", "10.0.0.2", 80).await;
    let changed = h
        .post_json("/v3/discovery:endpoints", &request("web", &version))
        .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_ne!(changed.json()["version_info"], json!(version));
}

#[tokio::test]
async fn unknown_cluster_gets_no_resources_never_an_empty_list() {
    let h = Harness::new();
    let r = h
        .post_json("/v3/discovery:endpoints", &request("nothing", ""))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["resources"], json!([]));
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let h = Harness::new();
    for body in [
        json!({"resource_names": []}),
        json!({"resource_names": ["a", "b"]}),
        json!({"resource_names": ["Bad Name"]}),
        json!({"resource_names": ["a"], "type_url": "x"}),
    ] {
        h.post_json("/v3/discovery:endpoints", &body)
            .await
            .assert_error(400, "invalid_request");
    }
}
