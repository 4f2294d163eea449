//! The admin listener: `/clusters`, `/ready`, `/live`, `/metrics`, `/config`, and the web
//! dashboard over them at `/ui` ([`crate::io::admin_ui`]). Loopback only by default; it exposes
//! topology, never secrets (TLS paths are shown, not keys). Its connections are bounded in
//! number and in the time they may wait (`conns`), so slow or idle clients cannot lock
//! operators and probes out.

mod serve;

pub(crate) use self::serve::serve;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::Shared;
use crate::io::forward::{full, local_reply};
use crate::io::upstream::ProxyBody;

fn json_reply(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Generic over the body, which no admin route reads, so tests can call it directly.
pub async fn handle<B>(
    shared: Arc<Shared>,
    req: Request<B>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(local_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "admin endpoints are read-only",
        ));
    }
    let resp = match req.uri().path() {
        "/live" => json_reply(StatusCode::OK, &json!({"live": true})),
        "/ready" => ready(&shared),
        "/clusters" => {
            let clusters: Vec<_> = shared.clusters.iter().map(|c| c.snapshot()).collect();
            json_reply(StatusCode::OK, &json!({ "clusters": clusters }))
        }
        "/config" => match serde_json::to_value(&shared.config) {
            Ok(v) => json_reply(StatusCode::OK, &v),
            Err(e) => local_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            ),
        },
        "/metrics" => match crate::telemetry::prometheus_handle() {
            Some(h) => {
                let mut resp = Response::new(full(Bytes::from(h.render())));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                resp
            }
            None => local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "metrics_unavailable",
                "another metrics recorder is installed in this process",
            ),
        },
        p if p == "/ui" || p.starts_with("/ui/") => crate::io::admin_ui::respond(p),
        _ => local_reply(
            StatusCode::NOT_FOUND,
            "not_found",
            "try /ui, /clusters, /ready, /live, /metrics or /config",
        ),
    };
    Ok(resp)
}

/// Ready once every cluster has heard from its membership source, and until shutdown begins.
fn ready(shared: &Shared) -> Response<ProxyBody> {
    if shared.draining.load(Ordering::Acquire) {
        return json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reason": "draining"}),
        );
    }
    let waiting: Vec<&str> = shared
        .clusters
        .iter()
        .filter(|c| !c.membership_initialized())
        .map(|c| c.name())
        .collect();
    if waiting.is_empty() {
        json_reply(StatusCode::OK, &json!({"ready": true}))
    } else {
        json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reason": "no membership yet", "clusters": waiting}),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use http_body_util::BodyExt;

    use super::*;
    use crate::ProxyConfig;

    async fn get(path: &str) -> (StatusCode, http::HeaderMap, String) {
        let shared = Arc::new(Shared {
            config: ProxyConfig::default(),
            routes: Vec::new(),
            clusters: Vec::new(),
            draining: AtomicBool::new(false),
        });
        let req = Request::get(path).body(()).expect("request");
        let resp = handle(shared, req).await.unwrap_or_else(|e| match e {});
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    fn hdr<'a>(h: &'a http::HeaderMap, name: &str) -> &'a str {
        h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    #[tokio::test]
    async fn the_dashboard_and_its_assets_are_served_with_a_strict_csp() {
        for (path, ct, needle) in [
            (
                "/ui",
                "text/html; charset=utf-8",
                "<title>Tidings proxy</title>",
            ),
            ("/ui/app.js", "text/javascript; charset=utf-8", "/clusters"),
            (
                "/ui/common.js",
                "text/javascript; charset=utf-8",
                "textContent",
            ),
            ("/ui/ui.css", "text/css; charset=utf-8", "table"),
        ] {
            let (status, h, body) = get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(hdr(&h, "content-type"), ct, "{path}");
            let csp = hdr(&h, "content-security-policy");
            assert!(
                csp.contains("script-src 'self'") && !csp.contains("unsafe"),
                "{path}: {csp}"
            );
            assert_eq!(hdr(&h, "cache-control"), "no-store", "{path}");
            assert!(body.contains(needle), "{path} lacks {needle}");
        }
        let (status, h, body) = get("/ui/other.js").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(hdr(&h, "content-type"), "application/json");
        assert!(body.contains("not_found"), "{body}");
        // The page's data sources answer on the same listener.
        assert_eq!(get("/clusters").await.0, StatusCode::OK);
        assert_eq!(get("/ready").await.0, StatusCode::OK);
    }
}
