//! The request written straight from the downstream map says what `upstream_headers` and
//! a plain encoding of its map say, field for field.

use http::header::{HeaderMap, HeaderValue};
use http::{Method, Request, Version};

use super::{Forwarded, encode_request};
use crate::io::forward::headers::upstream_headers;

/// The request line, the sorted header lines and the body of an HTTP/1.1 message.
fn split(msg: &[u8]) -> (String, Vec<String>, Vec<u8>) {
    let text = String::from_utf8_lossy(msg).into_owned();
    let (head, _) = text.split_once("\r\n\r\n").expect("a head");
    let body = msg[head.len() + 4..].to_vec();
    let mut lines = head.split("\r\n").map(str::to_string);
    let first = lines.next().expect("request line");
    let mut fields: Vec<String> = lines.collect();
    fields.sort();
    (first, fields, body)
}

/// The reference: the map `upstream_headers` makes, each field on a line, cookies joined,
/// then the length as `encode_request` writes it.
fn reference(method: &Method, map: &HeaderMap, body: &[u8]) -> Vec<String> {
    let mut lines = Vec::new();
    let cookies: Vec<&str> = map
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .collect();
    if !cookies.is_empty() {
        lines.push(format!("cookie: {}", cookies.join("; ")));
    }
    for (name, value) in map {
        if name != "cookie" && name != "content-length" {
            lines.push(format!("{name}: {}", value.to_str().expect("ascii")));
        }
    }
    if !body.is_empty() || !matches!(*method, Method::GET | Method::HEAD | Method::DELETE) {
        lines.push(format!("content-length: {}", body.len()));
    }
    lines.sort();
    lines
}

/// Method, URI, the downstream fields in order, the body.
type Case<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>, &'a [u8]);

#[test]
fn direct_encoding_matches_upstream_headers_on_every_kind_of_field() {
    let rid = HeaderValue::from_static("0123abcd");
    let peer = HeaderValue::from_static("127.0.0.9");
    let cases: Vec<Case<'_>> = vec![
        (Method::GET, "https://svc.example:8443/a?b=c", vec![], b""),
        (
            Method::POST,
            "http://svc/p",
            vec![
                ("cookie", "a=1"),
                ("user-agent", "t"),
                ("cookie", "b=2"),
                ("cookie", "c=3"),
                ("te", "trailers"),
                ("proxy-authorization", "secret"),
                ("x-request-id", "theirs"),
                ("content-length", "5"),
                ("accept", "*/*"),
                ("accept", "text/plain"),
            ],
            b"hello",
        ),
        (
            Method::PUT,
            "http://svc/put",
            vec![
                ("host", "given.example"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-for", "10.0.0.2"),
            ],
            b"",
        ),
        (
            Method::DELETE,
            "http://svc/d",
            vec![("x-forwarded-for", "10.1.1.1")],
            b"",
        ),
    ];
    for (method, uri, fields, body) in cases {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .version(Version::HTTP_2);
        for (k, v) in &fields {
            req = req.header(*k, *v);
        }
        let (parts, ()) = req.body(()).expect("request").into_parts();
        let ids = Forwarded {
            request_id: &rid,
            peer_ip: &peer,
        };
        let (line, got, got_body) = split(&encode_request(&parts, ids, body));
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        assert_eq!(line, format!("{} {target} HTTP/1.1", parts.method));
        let map = upstream_headers(parts.headers.clone(), &parts.uri, None, &rid, &peer);
        assert_eq!(got, reference(&method, &map, body), "{method} {uri}");
        assert_eq!(got_body, body);
    }
}
