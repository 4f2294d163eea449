//! What the components' web dashboards (`GET /ui`) share: the page shell, one stylesheet, one
//! small JS library, and the response headers that keep the pages safe. Each component
//! brings its own title, body sections and script ([`Page`]) and serves them, with these,
//! from the same origin as its JSON API — no CDN, no build step, nothing fetched from
//! anywhere else.
//!
//! The pages render API data with `textContent` only (never `innerHTML`): service names and
//! tags come from hosts, so they are untrusted. The CSP forbids inline script and every
//! origin but the page's own as a second line of defence.

use std::borrow::Cow;

use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};

/// `Content-Security-Policy` for every dashboard response: scripts, styles and fetches from
/// the page's own origin only, nothing inline, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// Headers every dashboard response carries besides its content type. `no-store` so an
/// upgraded binary's page is never mixed with a cached older script.
pub const HEADERS: [(&str, &str); 4] = [
    ("content-security-policy", CSP),
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];

pub const HTML: &str = "text/html; charset=utf-8";
pub const JS: &str = "text/javascript; charset=utf-8";
pub const CSS_TYPE: &str = "text/css; charset=utf-8";

/// The shared stylesheet, served at `/ui/ui.css`.
pub const CSS: &str = include_str!("ui/ui.css");
/// The shared helpers (`T.el`, `T.getJson`, `T.start`, ...), served at `/ui/common.js`.
pub const COMMON_JS: &str = include_str!("ui/common.js");
/// The page every dashboard shares: head, header (title, flags, refresh status), error
/// banner; `{{title}}` and `{{body}}` are the component's.
const SHELL: &str = include_str!("ui/page.html");

/// One file of a dashboard and its content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: Cow<'static, str>,
}

/// A component's dashboard: its title and body sections (the page at `/ui`) and its script
/// (at `/ui/app.js`). All three are the component's own constants, never request data.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub title: &'static str,
    pub body: &'static str,
    pub app_js: &'static str,
}

impl Page {
    /// The asset served at `path`, or `None` (the component answers its usual 404).
    pub fn asset(&self, path: &str) -> Option<Asset> {
        let (content_type, body) = match path {
            "/ui" | "/ui/" => (HTML, Cow::Owned(self.html())),
            "/ui/app.js" => (JS, Cow::Borrowed(self.app_js)),
            "/ui/common.js" => (JS, Cow::Borrowed(COMMON_JS)),
            "/ui/ui.css" => (CSS_TYPE, Cow::Borrowed(CSS)),
            _ => return None,
        };
        Some(Asset { content_type, body })
    }

    /// The whole HTML page.
    pub fn html(&self) -> String {
        SHELL
            .replace("{{title}}", self.title)
            .replace("{{body}}", self.body)
    }
}

/// `asset` as an HTTP response with the dashboard headers; `body` turns the text into the
/// server's body type (axum's, hyper's).
pub fn response<B>(asset: Asset, body: impl FnOnce(Cow<'static, str>) -> B) -> http::Response<B> {
    let mut resp = http::Response::new(body(asset.body));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    for (name, value) in HEADERS {
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: Page = Page {
        title: "Tidings test",
        body: "<section id=\"x\"></section>\n",
        app_js: "app",
    };

    fn body(path: &str) -> Option<String> {
        PAGE.asset(path).map(|a| a.body.into_owned())
    }

    #[test]
    fn every_path_maps_to_its_asset_and_nothing_else() {
        let html = body("/ui").expect("page");
        assert!(html.starts_with("<!doctype html>"), "{html}");
        assert!(html.contains("<title>Tidings test</title>"), "{html}");
        assert!(
            html.contains("<section id=\"x\"></section>\n</body>"),
            "{html}"
        );
        assert!(!html.contains("{{"), "{html}");
        assert_eq!(body("/ui/"), Some(html));
        assert_eq!(PAGE.asset("/ui").map(|a| a.content_type), Some(HTML));
        assert_eq!(body("/ui/app.js").as_deref(), Some("app"));
        assert_eq!(body("/ui/common.js").as_deref(), Some(COMMON_JS));
        assert_eq!(
            PAGE.asset("/ui/ui.css").map(|a| a.content_type),
            Some(CSS_TYPE)
        );
        for p in ["/ui/x.js", "/ui/../etc/passwd", "/uix", "/", ""] {
            assert_eq!(PAGE.asset(p), None, "{p}");
        }
    }

    #[test]
    fn responses_carry_the_content_type_and_the_strict_headers() {
        let asset = PAGE.asset("/ui/app.js").expect("asset");
        let resp = response(asset, |b| b.len());
        assert_eq!(*resp.body(), 3);
        let h = resp.headers();
        assert_eq!(
            h.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
            Some(JS.as_bytes())
        );
        for (name, value) in HEADERS {
            assert_eq!(
                h.get(name).map(HeaderValue::as_bytes),
                Some(value.as_bytes())
            );
        }
    }

    #[test]
    fn the_shared_script_never_writes_html_from_data() {
        // Data reaches the DOM through textContent only; innerHTML/outerHTML/insertAdjacentHTML
        // or document.write would turn a hostile tag value into markup.
        for bad in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!COMMON_JS.contains(bad), "common.js uses {bad}");
        }
        assert!(SHELL.contains("<script src=\"/ui/app.js\"") && !SHELL.contains("<script>"));
        assert!(CSP.contains("script-src 'self'") && !CSP.contains("unsafe"));
    }
}
