//! The one compression policy of the registry's and the agent's HTTP APIs: gzip or zstd, as
//! the client's `Accept-Encoding` asks, for answers of at least [`MIN_COMPRESSED_BYTES`].
//!
//! Only gzip and zstd: every HTTP client has gzip, zstd is the cheaper one per byte saved,
//! and each other codec would be one more C or Rust library to build for no client we know.
//! Small answers (errors, check-in acks, probes) stay identity: compressing them costs more
//! CPU than it saves bytes. tower-http's default exclusions stay too: images, gRPC and
//! server-sent events, and any answer that already has a `Content-Encoding` or a
//! `Content-Range`.
//!
//! The layer compresses the body as the handler hands it over, so a blocking query that wakes
//! is answered as at once as without it. A compressed answer loses its `Content-Length` (it is
//! sent chunked). Every answer large enough to be compressed carries `Vary: Accept-Encoding`,
//! whether or not this client asked for compression, so caches keep the two forms apart.

use tower_http::compression::predicate::{And, DefaultPredicate, Predicate, SizeAbove};
use tower_http::compression::{CompressionLayer, CompressionLevel};

/// Answers smaller than this are never compressed.
pub const MIN_COMPRESSED_BYTES: u16 = 1024;

/// What [`compression`] returns, for routers that name their layers' types.
pub type Compression = CompressionLayer<And<DefaultPredicate, SizeAbove>>;

/// The compression layer to put outermost on an API router.
pub fn compression() -> Compression {
    CompressionLayer::new()
        .gzip(true)
        .zstd(true)
        .no_br()
        .no_deflate()
        .quality(CompressionLevel::Default)
        .compress_when(DefaultPredicate::new().and(SizeAbove::new(MIN_COMPRESSED_BYTES)))
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use http::{HeaderMap, Request, header};
    use tower::ServiceExt;

    use super::*;

    const BIG: usize = MIN_COMPRESSED_BYTES as usize;

    fn app() -> Router {
        Router::new()
            .route("/big", get(|| async { "x".repeat(BIG) }))
            .route("/small", get(|| async { "x".repeat(BIG - 1) }))
            .route(
                "/events",
                get(|| async {
                    (
                        [(header::CONTENT_TYPE, "text/event-stream")],
                        "x".repeat(BIG),
                    )
                }),
            )
            .layer(compression())
    }

    async fn headers(path: &str, accept: Option<&str>) -> HeaderMap {
        let mut req = Request::get(path);
        if let Some(a) = accept {
            req = req.header(header::ACCEPT_ENCODING, a);
        }
        let req = req.body(Body::empty()).expect("request");
        app()
            .oneshot(req)
            .await
            .expect("infallible")
            .headers()
            .clone()
    }

    fn encoding(h: &HeaderMap) -> Option<&str> {
        h.get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn gzip_and_zstd_are_served_as_asked_with_vary() {
        for codec in ["gzip", "zstd"] {
            let h = headers("/big", Some(codec)).await;
            assert_eq!(encoding(&h), Some(codec));
            assert_eq!(
                h.get(header::VARY).and_then(|v| v.to_str().ok()),
                Some("accept-encoding")
            );
            assert!(h.get(header::CONTENT_LENGTH).is_none());
        }
    }

    #[tokio::test]
    async fn br_deflate_and_no_header_get_identity_that_still_varies() {
        for accept in [None, Some("br"), Some("deflate"), Some("identity")] {
            let h = headers("/big", accept).await;
            assert_eq!(encoding(&h), None, "{accept:?}");
            assert!(h.contains_key(header::VARY), "{accept:?}");
        }
    }

    #[tokio::test]
    async fn answers_below_the_minimum_and_event_streams_are_left_alone() {
        for path in ["/small", "/events"] {
            let h = headers(path, Some("gzip, zstd")).await;
            assert_eq!(encoding(&h), None, "{path}");
            assert!(!h.contains_key(header::VARY), "{path}");
        }
    }
}
