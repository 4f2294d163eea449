//! Auth (docs/API.md#authentication), limits, error shapes, and the OpenAPI document.

use axum::http::StatusCode;
use discovery::{RegistryConfig, host_token, operator_token};
use serde_json::json;

use crate::common::Harness;

const SECRET: &str = "s3cret";

fn secured() -> Harness {
    Harness::with_config(RegistryConfig {
        secret: Some(SECRET.into()),
        ..Default::default()
    })
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

#[tokio::test]
async fn writes_need_a_token_and_host_tokens_are_bound_to_their_ip() {
    let h = secured();
    let host1 = bearer(&host_token(SECRET, "10.0.0.1".parse().expect("ip")));
    let op = bearer(&operator_token(SECRET));
    let body = "ip=10.0.0.1&port=80";

    h.call("POST", "/v1/registration/web", &[FORM], body)
        .await
        .assert_error(401, "unauthorized");
    let garbled = [FORM, ("authorization", "Bearer not-hex")];
    let r = h.call("POST", "/v1/registration/web", &garbled, body).await;
    r.assert_error(401, "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let wrong = bearer(&host_token(SECRET, "10.0.0.2".parse().expect("ip")));
    h.call(
        "POST",
        "/v1/registration/web",
        &[FORM, ("authorization", &wrong)],
        body,
    )
    .await
    .assert_error(403, "forbidden");
    let ok = h
        .call(
            "POST",
            "/v1/registration/web",
            &[FORM, ("authorization", &host1)],
            body,
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let ok = h
        .call(
            "POST",
            "/v1/registration/web",
            &[FORM, ("authorization", &op)],
            "ip=10.0.0.3&port=80",
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);

    // Reads stay open.
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 2);
    assert_eq!(h.get("/v2/catalog").await.status, StatusCode::OK);

    // A v2 batch with any other ip is refused whole.
    let batch = json!({"endpoints": [
        {"service": "web", "ip": "10.0.0.1", "port": 81},
        {"service": "web", "ip": "10.0.0.3", "port": 81}
    ]})
    .to_string();
    let json_ct = ("content-type", "application/json");
    h.call(
        "POST",
        "/v2/checkin",
        &[json_ct, ("authorization", &host1)],
        batch.clone(),
    )
    .await
    .assert_error(403, "forbidden");
    assert_eq!(
        h.call(
            "POST",
            "/v2/checkin",
            &[json_ct, ("authorization", &op)],
            batch
        )
        .await
        .status,
        StatusCode::OK
    );

    // Deletes and weights on other ips, and service-wide weights, need more than a host token.
    h.call(
        "DELETE",
        "/v1/registration/web/10.0.0.3",
        &[("authorization", &host1)],
        "",
    )
    .await
    .assert_error(403, "forbidden");
    h.call("DELETE", "/v1/registration/web/10.0.0.3", &[], "")
        .await
        .assert_error(401, "unauthorized");
    let w = "load_balancing_weight=5";
    h.call(
        "POST",
        "/v1/loadbalancing/web/10.0.0.3",
        &[FORM, ("authorization", &host1)],
        w,
    )
    .await
    .assert_error(403, "forbidden");
    h.call(
        "POST",
        "/v1/loadbalancing/web",
        &[FORM, ("authorization", &host1)],
        w,
    )
    .await
    .assert_error(403, "forbidden");
    let r = h
        .call(
            "POST",
            "/v1/loadbalancing/web/10.0.0.1",
            &[FORM, ("authorization", &host1)],
            w,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = h
        .call(
            "POST",
            "/v1/loadbalancing/web",
            &[FORM, ("authorization", &op)],
            w,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = h
        .call(
            "DELETE",
            "/v1/registration/web/10.0.0.1",
            &[("authorization", &host1)],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn ipv6_host_tokens_use_the_canonical_form() {
    let h = secured();
    let token = bearer(&host_token(SECRET, "2001:db8::1".parse().expect("ip")));
    let r = h
        .call(
            "POST",
            "/v1/registration/web",
            &[FORM, ("authorization", &token)],
            "ip=2001:0db8:0:0::1&port=80",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_are_413_json() {
    let h = Harness::new();
    let big = format!("ip=10.0.0.1&port=80&revision={}", "x".repeat(70 * 1024));
    h.post_form("/v1/registration/web", &big)
        .await
        .assert_error(413, "body_too_large");
    let big_json = json!({"endpoints": [], "pad": "y".repeat(70 * 1024)});
    h.post_json("/v2/checkin", &big_json)
        .await
        .assert_error(413, "body_too_large");
}

#[tokio::test]
async fn malformed_bodies_are_400_json() {
    let h = Harness::new();
    let json_ct = [("content-type", "application/json")];
    for body in [
        "",
        "{",
        "[]",
        "null",
        r#"{"endpoints": 5}"#,
        r#"{"endpoints": [{"port": 80}]}"#,
    ] {
        h.call("POST", "/v2/checkin", &json_ct, body)
            .await
            .assert_error(400, "invalid_request");
    }
    h.call("POST", "/v1/registration/web", &json_ct, "{\"ip\":")
        .await
        .assert_error(400, "invalid_request");
    h.post_form("/v1/registration/web", "ip=10.0.0.1&port=eighty")
        .await
        .assert_error(400, "invalid_request");
    h.post_form("/v1/registration/web", "%%%")
        .await
        .assert_error(400, "invalid_request");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let h = Harness::new();
    h.get("/nope").await.assert_error(404, "route_not_found");
    h.get("/v3/discovery:endpoints")
        .await
        .assert_error(405, "method_not_allowed");
    h.call("PUT", "/v2/checkin", &[], "")
        .await
        .assert_error(405, "method_not_allowed");
    h.call("DELETE", "/v2/catalog", &[], "")
        .await
        .assert_error(405, "method_not_allowed");
}

#[tokio::test]
async fn ops_routes_answer() {
    let h = Harness::new();
    assert_eq!(h.get("/live").await.status, StatusCode::OK);
    assert_eq!(h.get("/ready").await.status, StatusCode::OK);
    h.register("web", "10.0.0.1", 80).await;
    let m = h.get("/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("tidings_registry_checkins_total 1"), "{text}");
    assert!(text.contains("tidings_registry_requests_total{"), "{text}");
    // Each registry has its own metrics: a second one starts from zero.
    let other = Harness::new();
    let text = String::from_utf8_lossy(&other.get("/metrics").await.body).to_string();
    assert!(text.contains("tidings_registry_checkins_total 0"), "{text}");
}

#[tokio::test]
async fn every_route_in_the_openapi_document_exists() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let doc = h.get("/openapi.json").await.json();
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 14, "{}", paths.len());
    let mut checked = 0;
    for (path, methods) in paths {
        let uri = path
            .replace("{service}", "web")
            .replace("{ip}", "10.0.0.9")
            .replace("{repo}", "r");
        for method in methods.as_object().expect("methods").keys() {
            let r = h
                .call(
                    &method.to_uppercase(),
                    &uri,
                    &[FORM],
                    "load_balancing_weight=5",
                )
                .await;
            let code = serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()
                .map(|v| v["error"]["code"].clone());
            let missing = matches!(
                code.as_ref().and_then(|c| c.as_str()),
                Some("route_not_found" | "method_not_allowed")
            );
            assert!(
                !missing && r.status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {:?}",
                r.status
            );
            checked += 1;
        }
    }
    assert!(checked >= 15);
}

#[tokio::test(start_paused = true)]
async fn past_max_in_flight_the_api_sheds_with_429_but_probes_answer() {
    use std::sync::atomic::Ordering;
    let h = Harness::with_config(RegistryConfig {
        max_in_flight: 1,
        ..Default::default()
    });
    h.register("web", "10.0.0.1", 80).await;
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 1);
    h.clock.advance(std::time::Duration::from_secs(5));
    h.store.hang.store(true, Ordering::SeqCst);
    let stuck = tokio::spawn(crate::common::send(
        h.app.clone(),
        crate::common::get_req("/v1/registration/web"),
    ));
    // Bounded: yield until the first request holds the only slot.
    let mut shed = None;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
        let r = h.get("/v2/services").await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            shed = Some(r);
            break;
        }
    }
    let r = shed.expect("a second request is shed while the first holds the slot");
    r.assert_error(429, "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(h.get("/live").await.status, StatusCode::OK);
    assert_eq!(h.get("/healthcheck").await.status, StatusCode::OK);
    h.store.hang.store(false, Ordering::SeqCst);
    let first = stuck.await.expect("join");
    assert!(first.stale(), "the stuck read timed out into the cache");
    assert_eq!(h.get("/v2/services").await.status, StatusCode::OK);
}
