//! Every error the HTTP API can answer, each with its status and a stable machine-readable
//! code, rendered as `{"error": {"code", "message"}}` (docs/API.md#errors).

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use schema::ValidationError;
use schema::api::ErrorBody;
use thiserror::Error;

use crate::quota::QuotaExceeded;
use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{0}")]
    Validation(#[from] ValidationError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body exceeds the limit of {0} bytes")]
    TooLarge(usize),
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    /// `max_blocking_waiters` blocking queries are already waiting.
    #[error(
        "too many blocking queries are waiting (max_blocking_waiters = {limit}); retry after \
         {retry_after_secs}s, or read without `index` for an immediate answer"
    )]
    TooManyWaiters { limit: usize, retry_after_secs: u64 },
    /// A write that would take a storage quota past its configured value. 403, as for a
    /// Kubernetes ResourceQuota: retrying the same write will not help until something is
    /// deregistered or the operator raises the limit.
    #[error("{0}")]
    Quota(#[from] QuotaExceeded),
    #[error("the store is unavailable: {message}")]
    Unavailable {
        message: String,
        retry_after: Duration,
    },
    #[error("the request did not complete within {0:?}")]
    Timeout(Duration),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::Quota(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded | ApiError::TooManyWaiters { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } | ApiError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Validation(_) => "invalid_request",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::NoRoute(_) => "route_not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::TooLarge(_) => "body_too_large",
            ApiError::Overloaded => "overloaded",
            ApiError::TooManyWaiters { .. } => "too_many_waiters",
            ApiError::Quota(_) => "quota_exceeded",
            ApiError::Unavailable { .. } => "store_unavailable",
            ApiError::Timeout(_) => "timeout",
        }
    }

    /// A store failure as the API reports it: 503 with `Retry-After` (a write the store
    /// refused as invalid: 400). A corrupt row is the operator's problem, not the client's,
    /// and must not be a 500 either.
    pub fn from_store(e: &StoreError, retry_after: Duration) -> Self {
        if let StoreError::Invalid(v) = e {
            return ApiError::Validation(v.clone());
        }
        ApiError::Unavailable {
            message: e.to_string(),
            retry_after,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody::new(self.code(), self.to_string());
        let mut resp = (status, Json(body)).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::Unavailable { retry_after, .. } => {
                let secs = retry_after.as_secs().max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            ApiError::TooManyWaiters {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Timeout(_) | ApiError::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}
