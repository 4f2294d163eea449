use http::Request;
use http::header::{HeaderMap, HeaderValue};

use super::*;

#[test]
fn hop_by_hop_headers_and_those_named_by_connection_are_stripped() {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("connection", "keep-alive, x-private"),
        ("keep-alive", "timeout=5"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("te", "trailers"),
        ("x-private", "secret"),
        ("x-kept", "yes"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 1);
    assert_eq!(h.get("x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
}

#[test]
fn request_host_comes_from_authority_or_host_header_without_port() {
    let r = Request::get("http://api.internal:8080/x")
        .body(())
        .expect("req");
    assert_eq!(request_host(&r).as_deref(), Some("api.internal"));
    let r = Request::get("/x")
        .header("host", "Svc.Internal:7710")
        .body(())
        .expect("req");
    assert_eq!(request_host(&r).as_deref(), Some("Svc.Internal"));
    let r = Request::get("/x")
        .header("host", "[::1]:80")
        .body(())
        .expect("req");
    assert_eq!(request_host(&r).as_deref(), Some("::1"));
    let r = Request::get("/x")
        .header("host", "bad host")
        .body(())
        .expect("req");
    assert_eq!(request_host(&r), None);
    let r = Request::get("/x").body(()).expect("req");
    assert_eq!(request_host(&r), None);
}

#[test]
fn local_replies_use_the_json_error_shape() {
    let r = local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_healthy_upstream",
        "none",
    );
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
}

#[test]
fn host_of_refuses_malformed_host_headers_without_allocating() {
    let uri: Uri = "/x".parse().expect("uri");
    let host =
        |h: &'static str| host_of(&uri, Some(&HeaderValue::from_static(h))).map(str::to_string);
    assert_eq!(host("web").as_deref(), Some("web"));
    assert_eq!(host("web:").as_deref(), Some("web"));
    assert_eq!(host("[::1]").as_deref(), Some("::1"));
    for bad in ["", "a]b", "[::1]x", "web:80:90", "web:http", "we b", "a/b"] {
        assert_eq!(host(bad), None, "{bad:?}");
    }
}
