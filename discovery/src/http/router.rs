//! The HTTP surface: [`router`] assembles every route (docs/API.md#registry-api) with the layers all
//! of them share — body limit, handler timeout and request metrics with the warm-up header
//! (both in [`super::layers`]), gzip/zstd compression of large answers
//! ([`serve::compression`]) — and
//! JSON answers for unknown routes, wrong methods and unreadable requests.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use schema::wire::{HEADER_INDEX, HEADER_STALE, TRUE};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;

use super::layers::{Limits, Observe};
use super::{routes_eds, routes_ops, routes_v1, routes_v2, ui};
use crate::errors::ApiError;
use crate::registry::{Registry, View};

/// The registry's axum router. Tests drive it with `tower::ServiceExt::oneshot`; [`crate::serve`]
/// puts it on a socket.
pub fn router(registry: Registry) -> Router {
    let cfg = registry.config().clone();
    // Blocking queries may legitimately run for their whole wait; everything else gets the
    // plain handler timeout.
    let blocking_timeout = cfg.max_wait + cfg.max_wait / 16 + cfg.handler_timeout;
    let blocking = Router::new()
        .route("/v2/services/{service}", get(routes_v2::service))
        .route("/v2/catalog", get(routes_v2::catalog))
        .layer(Limits::timeout(blocking_timeout));
    // Probes, metrics, status and the dashboard are never shed: an overloaded registry
    // must still say so.
    let ops = Router::new()
        .route("/healthcheck", get(routes_ops::healthcheck))
        .route("/live", get(routes_ops::live))
        .route("/ready", get(routes_ops::ready))
        .route("/metrics", get(routes_ops::metrics))
        .route("/openapi.json", get(routes_ops::openapi))
        .route("/v1/ops/status", get(routes_ops::status))
        .route("/ui", get(ui::handler))
        .route("/ui/", get(ui::handler))
        .route("/ui/{asset}", get(ui::handler))
        .layer(Limits::timeout(cfg.handler_timeout));
    let in_flight = Some(Arc::new(Semaphore::new(
        cfg.max_in_flight.min(Semaphore::MAX_PERMITS),
    )));
    let api = Router::new()
        .route(
            "/v1/registration/{service}",
            get(routes_v1::list).post(routes_v1::register),
        )
        .route(
            "/v1/registration/{service}/{ip}",
            axum::routing::delete(routes_v1::deregister),
        )
        // lyft's repo route shadows `DELETE /v1/registration/repo/{ip}` for a service called
        // `repo`; serve that delete here so no service name is unreachable.
        .route(
            "/v1/registration/repo/{repo}",
            get(routes_v1::list_repo).delete(routes_v1::deregister_repo_service),
        )
        .route(
            "/v1/loadbalancing/{service}",
            post(routes_v1::weight_service),
        )
        .route(
            "/v1/loadbalancing/{service}/{ip}",
            post(routes_v1::weight_host),
        )
        .route("/v2/checkin", post(routes_v2::checkin))
        .route("/v3/discovery:endpoints", post(routes_eds::endpoints))
        .route("/v2/services", get(routes_v2::services))
        .layer(Limits {
            timeout: cfg.handler_timeout,
            in_flight,
        });
    api.merge(ops)
        .merge(blocking)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        // One `layer` call for the three (outermost first): each call boxes every route
        // once more per request.
        .layer(
            ServiceBuilder::new()
                .layer(serve::compression())
                .layer(DefaultBodyLimit::max(cfg.body_limit))
                .layer(Observe(registry.clone())),
        )
        .with_state(registry)
}

async fn no_route(req: Request) -> ApiError {
    ApiError::NoRoute(format!("{} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A request body, read whole under the body limit; over the limit is a JSON 413, any other
/// failure a JSON 400.
pub struct Body(pub Bytes);

impl FromRequest<Registry> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, registry: &Registry) -> Result<Self, ApiError> {
        match Bytes::from_request(req, registry).await {
            Ok(b) => Ok(Body(b)),
            Err(e) => Err(body_error(&e, registry.config().body_limit)),
        }
    }
}

fn body_error(e: &BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(limit)
    } else {
        ApiError::BadRequest(format!("cannot read the request body: {}", e.body_text()))
    }
}

/// The request headers and body of a write, as [`Body`]; the headers are moved out of the
/// request rather than copied, as the `HeaderMap` extractor does.
pub struct HeadersAndBody(pub HeaderMap, pub Bytes);

impl FromRequest<Registry> for HeadersAndBody {
    type Rejection = ApiError;

    async fn from_request(mut req: Request, registry: &Registry) -> Result<Self, ApiError> {
        let headers = std::mem::take(req.headers_mut());
        let Body(body) = Body::from_request(req, registry).await?;
        Ok(HeadersAndBody(headers, body))
    }
}

/// `Path` with JSON rejections.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// Whether a write body is JSON (else it is form-encoded, as lyft's clients send).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"))
}

/// Adds the read headers (`X-Tidings-Index`, `X-Tidings-Stale`) to an answer.
pub fn with_view_headers(mut resp: Response, view: &View) -> Response {
    let h = resp.headers_mut();
    h.insert(HEADER_INDEX, HeaderValue::from(view.data.index));
    if view.stale() {
        h.insert(HEADER_STALE, HeaderValue::from_static(TRUE));
    }
    resp
}
