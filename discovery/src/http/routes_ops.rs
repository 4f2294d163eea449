//! Operational routes: lyft's `/healthcheck`, liveness, readiness, Prometheus metrics, the
//! registry's status and the OpenAPI document.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::decide::status::Status;
use crate::http::openapi;
use crate::registry::Registry;

/// `GET /healthcheck`: `200 OK`, as lyft/discovery answers.
pub async fn healthcheck() -> &'static str {
    "OK"
}

/// `GET /live`: the process is up and serving.
pub async fn live() -> Json<Value> {
    Json(json!({"status": "live"}))
}

/// `GET /ready`: 503 once draining has started, so load balancers move away first.
pub async fn ready(State(registry): State<Registry>) -> Response {
    if registry.is_ready() {
        Json(json!({"status": "ready", "warming": registry.is_warming()})).into_response()
    } else {
        let body = schema::api::ErrorBody::new("draining", "the registry is shutting down");
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(State(registry): State<Registry>) -> Response {
    let mut resp = registry.render_metrics().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// `GET /v1/ops/status`: store kind, warm-up, self-preservation and the last sweep.
pub async fn status(State(registry): State<Registry>) -> Json<Status> {
    Json(registry.status())
}

/// `GET /openapi.json`.
pub async fn openapi() -> Json<Value> {
    Json(openapi::document())
}
