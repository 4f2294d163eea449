//! The registry's web dashboard, `GET /ui` (docs/OPERATING.md#dashboards): services and their hosts with
//! check-in ages, warm-up, self-preservation (expected against actual renewals) and
//! staleness, rendered in the browser from `/v2/catalog` and `/v1/ops/status`. The page,
//! its script and the shared assets ([`schema::ui`]) are embedded in the binary.
//!
//! [`respond`] is also how the agent serves its own dashboard.

use axum::body::Body;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use schema::ui::Page;

use crate::errors::ApiError;

/// The registry's page and script.
pub const PAGE: Page = Page {
    title: "Tidings registry",
    body: include_str!("ui/body.html"),
    app_js: include_str!("ui/app.js"),
};

/// `path`'s asset of `page` with the dashboard headers (CSP, `no-store`), or the usual JSON
/// 404.
pub fn respond(page: &Page, path: &str) -> Response {
    match page.asset(path) {
        Some(asset) => schema::ui::response(asset, Body::from),
        None => ApiError::NoRoute(format!("GET {path}")).into_response(),
    }
}

/// `GET /ui` and `GET /ui/{asset}`.
pub async fn handler(uri: Uri) -> Response {
    respond(&PAGE, uri.path())
}
