//! The admin listener: `/clusters`, `/ready`, `/live`, `/metrics`, `/config`. Loopback only
//! by default; it exposes topology, never secrets (TLS paths are shown, not keys).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::Shared;
use crate::forward::{full, local_reply};
use crate::upstream::ProxyBody;

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

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
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
        _ => local_reply(
            StatusCode::NOT_FOUND,
            "not_found",
            "try /clusters, /ready, /live, /metrics or /config",
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
