//! The admin listener's web dashboard, `GET /ui` (docs/OPERATING.md#dashboards): every cluster's hosts as
//! `/clusters` reports them (discovery status, health, routing decision, weight, zone, active
//! requests, ejections) and `/ready`, rendered in the browser. The page, its script and the
//! shared assets ([`schema::ui`]) are embedded; responses carry the same strict headers as
//! the registry's and the agent's dashboards.

use std::borrow::Cow;

use bytes::Bytes;
use http::{Response, StatusCode};
use schema::ui::Page;

use crate::io::forward::{full, local_reply};
use crate::io::upstream::ProxyBody;

pub const PAGE: Page = Page {
    title: "Tidings proxy",
    body: include_str!("admin_ui/body.html"),
    app_js: include_str!("admin_ui/app.js"),
};

/// The asset at `path` (`/ui`, `/ui/app.js`, ...), or the admin listener's JSON 404.
pub fn respond(path: &str) -> Response<ProxyBody> {
    match PAGE.asset(path) {
        Some(asset) => schema::ui::response(asset, |body| {
            full(match body {
                Cow::Borrowed(s) => Bytes::from_static(s.as_bytes()),
                Cow::Owned(s) => Bytes::from(s),
            })
        }),
        None => local_reply(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such dashboard asset",
        ),
    }
}
