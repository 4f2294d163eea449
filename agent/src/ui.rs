//! The agent's web dashboard, `GET /ui` (docs/ARCHITECTURE.md#what-the-agent-answers, docs/OPERATING.md#dashboards): its merged view per service
//! with check-in ages, how fresh that view is (`X-Tidings-Registry-Age-Ms`,
//! `X-Tidings-Source`), the gossip members it sees, and itself (`/v1/agent/self`), rendered
//! in the browser from those JSON routes. Served with the registry's dashboard headers.

use axum::http::Uri;
use axum::response::Response;
use schema::ui::Page;

/// The agent's page and script; the stylesheet and helpers are shared ([`schema::ui`]).
pub const PAGE: Page = Page {
    title: "Tidings agent",
    body: include_str!("ui/body.html"),
    app_js: include_str!("ui/app.js"),
};

/// `GET /ui` and `GET /ui/{asset}`.
pub async fn handler(uri: Uri) -> Response {
    discovery::ui::respond(&PAGE, uri.path())
}
