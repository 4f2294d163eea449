use http::Request;
use http::header::{HeaderMap, HeaderValue};
use http::uri::{Authority, Scheme};

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

#[test]
fn every_connection_line_counts_and_the_usual_messages_keep_their_headers() {
    let mut h = HeaderMap::new();
    h.append("connection", HeaderValue::from_static("x-a"));
    h.append("connection", HeaderValue::from_static("X-B, close"));
    for k in ["x-a", "x-b", "x-c", "close"] {
        h.insert(k, HeaderValue::from_static("1"));
    }
    strip_hop_by_hop(&mut h);
    let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    left.sort_unstable();
    // `close` is a connection option, not a header name.
    assert_eq!(left, ["close", "x-c"]);

    // Nothing hop-by-hop: nothing changes.
    let mut h = HeaderMap::new();
    for (k, v) in [("host", "web"), ("user-agent", "t"), ("accept", "*/*")] {
        h.insert(k, HeaderValue::from_static(v));
    }
    let before = h.clone();
    strip_hop_by_hop(&mut h);
    assert_eq!(h, before);
}

#[test]
fn upstream_headers_add_the_request_id_and_the_peer_and_keep_a_host() {
    let upstream = Authority::from_static("10.0.0.1:8080");
    let rid = HeaderValue::from_static("abc");
    let peer = HeaderValue::from_static("192.0.2.7");
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("web"));
    h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    let uri = Uri::from_static("/x");
    let out = headers::upstream_headers(h, &uri, Some(&upstream), &rid, &peer);
    assert_eq!(out.get("host").map(|v| v.as_bytes()), Some(&b"web"[..]));
    assert_eq!(
        out.get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"abc"[..])
    );
    assert_eq!(
        out.get("x-forwarded-for").map(|v| v.as_bytes()),
        Some(&b"198.51.100.1, 192.0.2.7"[..])
    );
    assert!(out.get("keep-alive").is_none());

    // HTTP/1.0 without Host: the upstream's authority, as HTTP/1.1 needs one.
    let out = headers::upstream_headers(HeaderMap::new(), &uri, Some(&upstream), &rid, &peer);
    assert_eq!(
        out.get("host").map(|v| v.as_bytes()),
        Some(&b"10.0.0.1:8080"[..])
    );
    assert_eq!(
        out.get("x-forwarded-for").map(|v| v.as_bytes()),
        Some(&b"192.0.2.7"[..])
    );
}

#[test]
fn http1_targets_are_origin_form_and_http2_targets_absolute() {
    let uri = Uri::from_static("/a/b?c=1");
    let auth = Authority::from_static("10.0.0.1:8080");
    let h1 = headers::target(&uri, None).expect("origin form");
    assert_eq!(h1.to_string(), "/a/b?c=1");
    let h2 = headers::target(&uri, Some((&Scheme::HTTPS, &auth))).expect("absolute");
    assert_eq!(h2.to_string(), "https://10.0.0.1:8080/a/b?c=1");
    let bare = Uri::from_static("http://web");
    assert_eq!(headers::target(&bare, None).expect("root").to_string(), "/");
}
