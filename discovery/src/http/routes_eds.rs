//! `POST /v3/discovery:endpoints`: Envoy EDS over REST-JSON, so a stock Envoy can read the
//! registry directly (docs/API.md#envoy-eds). The shapes live in `schema::eds`.
//!
//! The version is the service's content index, so an unchanged membership answers 304 and
//! Envoy keeps what it has. We deliberately set no `policy.endpoint_stale_after`: Envoy would
//! drop every host when refreshes stop, which is exactly the registry outage Tidings is built
//! to survive (fail static).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use schema::ServiceName;
use schema::eds::DiscoveryRequest;

use crate::errors::ApiError;
use crate::http::answers;
use crate::http::router::{Body, with_view_headers};
use crate::registry::Registry;

pub async fn endpoints(
    State(registry): State<Registry>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let (req, name) = DiscoveryRequest::parse(&body)?;
    // A valid name is its own `ServiceName`, so the cached body names the cluster as asked.
    let service = ServiceName::new(name)?;
    let view = registry.read_service(&service).await?;
    let version = view.data.index.to_string();
    if req.version_info == version {
        return Ok(with_view_headers(
            StatusCode::NOT_MODIFIED.into_response(),
            &view,
        ));
    }
    answers::respond(&registry, answers::eds(&view, &service), &view)
}
