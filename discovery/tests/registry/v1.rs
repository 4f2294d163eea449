//! lyft/discovery v1 compatibility, route by route.

use std::sync::Arc;

use axum::http::StatusCode;
use schema::ServiceName;
use serde_json::json;

use crate::common::Harness;

#[tokio::test]
async fn healthcheck_is_plain_ok() {
    let h = Harness::new();
    let r = h.get("/healthcheck").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"OK");
}

#[tokio::test]
async fn unknown_service_is_200_with_no_hosts() {
    let h = Harness::new();
    let r = h.get("/v1/registration/nobody").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["service"], "nobody");
    assert_eq!(v["env"], "production");
    assert_eq!(v["hosts"], json!([]));
}

#[tokio::test]
async fn lyft_form_check_in_with_tags_as_a_json_string() {
    let h = Harness::new();
    let tags = r#"{"az":"us-east-1a","region":"us-east-1","instance_id":"i-1","canary":true,"team":"core"}"#;
    let body = format!(
        "ip=10.0.0.7&port=8080&revision=abc123&service_repo_name=web-repo&tags={}",
        urlencode(tags)
    );
    let r = h.post_form("/v1/registration/web", &body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({}));

    let v = h.get("/v1/registration/web").await.json();
    let host = &v["hosts"][0];
    assert_eq!(host["service"], "web");
    assert_eq!(host["ip_address"], "10.0.0.7");
    assert_eq!(host["port"], 8080);
    assert_eq!(host["revision"], "abc123");
    assert_eq!(host["service_repo_name"], "web-repo");
    assert_eq!(host["tags"]["az"], "us-east-1a");
    assert_eq!(host["tags"]["canary"], true);
    assert_eq!(host["tags"]["load_balancing_weight"], 100);
    assert_eq!(host["tags"]["team"], "core");
    assert!(
        host["last_check_in"]
            .as_str()
            .is_some_and(|t| t.starts_with("2026-01-01T")),
        "{host}"
    );

    let repo = h.get("/v1/registration/repo/web-repo").await;
    assert_eq!(repo.status, StatusCode::OK);
    assert_eq!(repo.json()["service_repo_name"], "web-repo");
    assert_eq!(repo.hosts(), vec![("10.0.0.7".to_string(), 8080)]);
    assert!(
        h.get("/v1/registration/repo/other")
            .await
            .hosts()
            .is_empty()
    );
}

#[tokio::test]
async fn bad_tags_json_is_a_400_with_lyfts_message() {
    let h = Harness::new();
    let r = h
        .post_form("/v1/registration/web", "ip=10.0.0.7&port=8080&tags=%7Bnope")
        .await;
    r.assert_error(400, "invalid_request");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("Invalid json supplied in tags")
    );
}

#[tokio::test]
async fn json_check_in_and_ipv6() {
    let h = Harness::new();
    let r = h
        .post_json(
            "/v1/registration/web",
            &json!({"ip": "2001:db8::7", "port": 443, "tags": {"az": "b"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        h.get("/v1/registration/web").await.hosts(),
        vec![("2001:db8::7".to_string(), 443)]
    );
    let r = h
        .call(
            "DELETE",
            "/v1/registration/web/2001:db8::7?port=443",
            &[],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(h.get("/v1/registration/web").await.hosts().is_empty());
}

#[tokio::test]
async fn two_ports_on_one_ip_are_two_endpoints() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 8080).await;
    h.register("web", "10.0.0.1", 8081).await;
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 2);
    // Deregistering one port leaves the other; without a port, every port on the ip goes.
    let r = h
        .call("DELETE", "/v1/registration/web/10.0.0.1?port=8081", &[], "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        h.get("/v1/registration/web").await.hosts(),
        vec![("10.0.0.1".to_string(), 8080)]
    );
    h.register("web", "10.0.0.1", 8082).await;
    assert_eq!(
        h.call("DELETE", "/v1/registration/web/10.0.0.1", &[], "")
            .await
            .status,
        StatusCode::OK
    );
    assert!(h.get("/v1/registration/web").await.hosts().is_empty());
}

#[tokio::test]
async fn deregistering_an_unknown_host_is_a_json_404() {
    let h = Harness::new();
    h.call("DELETE", "/v1/registration/web/10.0.0.9", &[], "")
        .await
        .assert_error(404, "not_found");
    h.register("web", "10.0.0.1", 80).await;
    h.call("DELETE", "/v1/registration/web/10.0.0.1?port=81", &[], "")
        .await
        .assert_error(404, "not_found");
    h.call("DELETE", "/v1/registration/web/not-an-ip", &[], "")
        .await
        .assert_error(400, "invalid_request");
    h.call("DELETE", "/v1/registration/web/10.0.0.1?port=0", &[], "")
        .await
        .assert_error(400, "invalid_request");
}

#[tokio::test]
async fn a_service_named_repo_can_still_be_deregistered() {
    let h = Harness::new();
    h.register("repo", "10.0.0.1", 80).await;
    assert_eq!(h.get("/v1/registration/repo").await.hosts().len(), 1);
    assert_eq!(
        h.call("DELETE", "/v1/registration/repo/10.0.0.1", &[], "")
            .await
            .status,
        StatusCode::OK
    );
    assert!(h.get("/v1/registration/repo").await.hosts().is_empty());
}

#[tokio::test]
async fn weight_survives_re_check_in_like_lyft() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    h.register("web", "10.0.0.2", 80).await;
    let r = h
        .post_form("/v1/loadbalancing/web/10.0.0.1", "load_balancing_weight=20")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
    h.register("web", "10.0.0.1", 80).await;
    let v = h.get("/v1/registration/web").await.json();
    assert_eq!(v["hosts"][0]["tags"]["load_balancing_weight"], 20);
    assert_eq!(v["hosts"][1]["tags"]["load_balancing_weight"], 100);

    // Service-wide, and JSON bodies work too.
    let r = h
        .post_json(
            "/v1/loadbalancing/web",
            &json!({"load_balancing_weight": 7}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let v = h.get("/v1/registration/web").await.json();
    assert_eq!(v["hosts"][0]["tags"]["load_balancing_weight"], 7);
    assert_eq!(v["hosts"][1]["tags"]["load_balancing_weight"], 7);
}

#[tokio::test]
async fn weight_errors_match_lyft() {
    let h = Harness::new();
    h.post_form("/v1/loadbalancing/web/10.0.0.1", "load_balancing_weight=5")
        .await
        .assert_error(404, "not_found");
    h.register("web", "10.0.0.1", 80).await;
    h.post_form(
        "/v1/loadbalancing/web/10.0.0.1",
        "load_balancing_weight=9001",
    )
    .await
    .assert_error(400, "invalid_request");
    h.post_form(
        "/v1/loadbalancing/web/10.0.0.1",
        "load_balancing_weight=ten",
    )
    .await
    .assert_error(400, "invalid_request");
    h.post_form("/v1/loadbalancing/web/10.0.0.1", "")
        .await
        .assert_error(400, "invalid_request");
    h.post_form("/v1/loadbalancing/web", "weight=0")
        .await
        .assert_error(400, "invalid_request");
}

#[tokio::test]
async fn invalid_service_names_are_400() {
    let h = Harness::new();
    h.get("/v1/registration/Web")
        .await
        .assert_error(400, "invalid_request");
    h.post_form("/v1/registration/-x", "ip=10.0.0.1&port=80")
        .await
        .assert_error(400, "invalid_request");
    h.get("/v1/registration/%FF")
        .await
        .assert_error(400, "bad_request");
}

/// Percent-encodes everything but unreserved characters (enough for form values).
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The cached view of an unchanged service is kept, bodies and all, when its entry ages out;
/// a plain renewal leaves it in place (no index move, no dropped body) and the renewed
/// `last_check_in` shows once `read_cache_ttl` has passed.
#[tokio::test]
async fn a_renewal_keeps_the_cached_answer_for_at_most_the_cache_ttl() {
    let h = Harness::new();
    let ttl = h.registry.config().read_cache_ttl;
    let service = ServiceName::new("web").expect("valid");
    h.register("web", "10.0.0.1", 80).await;
    let first = h.get("/v1/registration/web").await;
    let a = h.registry.read_service(&service).await.expect("read");

    h.clock.advance(ttl * 2);
    let b = h.registry.read_service(&service).await.expect("read");
    assert!(Arc::ptr_eq(&a.data, &b.data), "same rows: same view");
    assert_eq!(h.get("/v1/registration/web").await.body, first.body);

    h.register("web", "10.0.0.1", 80).await;
    let c = h.registry.read_service(&service).await.expect("read");
    assert!(Arc::ptr_eq(&a.data, &c.data), "a renewal drops nothing");
    assert_eq!(h.get("/v1/registration/web").await.body, first.body);

    h.clock.advance(ttl);
    let d = h.get("/v1/registration/web").await;
    assert_eq!(d.index(), first.index(), "a renewal never moves the index");
    assert_ne!(d.body, first.body, "the renewed last_check_in shows");
    let at = |r: &crate::common::Resp| r.json()["hosts"][0]["last_check_in"].clone();
    assert_eq!(at(&d), json!("2026-01-01T00:00:02Z"));
    assert_ne!(at(&first), at(&d));
}
