//! The dashboard (`/ui` and its assets) and the JSON it renders from `/v1/ops/status`.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;

use crate::common::{Harness, fleet_check_in};

fn assert_dashboard_headers(r: &crate::common::Resp, content_type: &str) {
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some(content_type));
    let csp = r.header("content-security-policy").expect("CSP header");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn the_dashboard_and_its_assets_are_served_with_a_strict_csp() {
    let h = Harness::new();
    for path in ["/ui", "/ui/"] {
        let r = h.get(path).await;
        assert_dashboard_headers(&r, "text/html; charset=utf-8");
        let html = String::from_utf8_lossy(&r.body);
        assert!(html.contains("<title>Tidings registry</title>"), "{html}");
        // Inline script would be blocked by the CSP: every script is a same-origin file.
        assert!(!html.contains("<script>"), "{html}");
        for asset in ["/ui/app.js", "/ui/common.js", "/ui/ui.css"] {
            assert!(html.contains(asset), "{path} does not load {asset}");
        }
    }
    let js = h.get("/ui/app.js").await;
    assert_dashboard_headers(&js, "text/javascript; charset=utf-8");
    assert!(String::from_utf8_lossy(&js.body).contains("/v1/ops/status"));
    assert_dashboard_headers(
        &h.get("/ui/common.js").await,
        "text/javascript; charset=utf-8",
    );
    assert_dashboard_headers(&h.get("/ui/ui.css").await, "text/css; charset=utf-8");
    h.get("/ui/nope.js")
        .await
        .assert_error(404, "route_not_found");
    h.get("/ui/..%2Fopenapi.json")
        .await
        .assert_error(404, "route_not_found");
    let r = h.call("POST", "/ui", &[], "").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn status_reports_warm_up_and_self_preservation_with_its_counts() {
    let h = Harness::new();
    let s = h.get("/v1/ops/status").await.json();
    assert_eq!(s["store"], "memory");
    assert_eq!(s["ready"], true);
    assert_eq!(s["self_preservation"]["enabled"], true);
    assert_eq!(
        s["self_preservation"]["renewals"],
        json!(null),
        "no sweep yet"
    );
    assert_eq!(s["last_sweep"], json!(null));

    fleet_check_in(&h, 0..20).await;
    let s = h.get("/v1/ops/status").await.json();
    assert_eq!(s["warming"], true, "started on an empty store: {s}");
    h.registry.sweep_once().await.expect("sweep");
    let s = h.get("/v1/ops/status").await.json();
    let sp = &s["self_preservation"];
    assert_eq!(sp["active"], false, "{s}");
    assert_eq!(sp["expected_renewals"], 20, "{s}");
    assert_eq!(sp["min_renewals"], 17, "ceil(0.85 * 20): {s}");
    assert_eq!(sp["renewals"], 20, "{s}");
    assert_eq!(s["last_sweep"]["live"], 20, "{s}");

    // Half the fleet goes quiet for longer than the renewal window: preservation holds.
    h.clock.advance(Duration::from_secs(100));
    fleet_check_in(&h, 0..10).await;
    let rep = h.registry.sweep_once().await.expect("sweep");
    assert!(rep.preserving, "{rep:?}");
    let s = h.get("/v1/ops/status").await.json();
    assert_eq!(s["warming"], false, "one check-in interval has passed: {s}");
    let sp = &s["self_preservation"];
    assert_eq!(sp["active"], true, "{s}");
    assert_eq!(
        (sp["renewals"].clone(), sp["expected_renewals"].clone()),
        (json!(10), json!(20))
    );
    assert_eq!(s["last_sweep"]["stored"], 20, "{s}");

    // An unreachable store: the status still answers, and says the sweep failed.
    h.store.fail(true);
    assert!(h.registry.sweep_once().await.is_err());
    let r = h.get("/v1/ops/status").await;
    assert_eq!(r.status, StatusCode::OK);
    let s = r.json();
    assert!(
        s["last_sweep_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("injected failure")),
        "{s}"
    );
    assert_eq!(
        s["last_sweep"]["renewed"], 10,
        "the last good sweep stays: {s}"
    );
}
