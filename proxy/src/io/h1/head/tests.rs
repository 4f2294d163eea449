use super::*;

fn request(raw: &[u8]) -> Result<Option<RequestHead>, Slow> {
    parse_request(raw, &mut Vec::new())
}

fn rewrite(raw: &[u8]) -> String {
    let mut fields = Vec::new();
    let head = parse_request(raw, &mut fields)
        .expect("fast")
        .expect("complete");
    let mut out = Vec::new();
    write_request(&mut out, raw, &head, &fields, b"rid-1", b"10.0.0.9");
    String::from_utf8(out).expect("ascii")
}

fn response(raw: &[u8], head_request: bool) -> Result<Option<ResponseHead>, BadResponse> {
    parse_response(raw, &mut Vec::new(), head_request)
}

#[test]
fn a_plain_get_takes_the_fast_path() {
    let raw = b"GET /a/b?x=1 HTTP/1.1\r\nHost: api:80\r\nX-Request-Id: abc\r\n\r\nNEXT";
    let head = request(raw).expect("fast").expect("complete");
    assert_eq!(head.len, raw.len() - 4);
    assert_eq!(head.method, Method::GET);
    assert_eq!(head.path(raw), Some("/a/b"));
    assert_eq!(&raw[head.host.clone()], b"api:80");
    assert_eq!(&raw[head.request_id.clone().expect("id")], b"abc");
    assert!(!head.close);
    assert_eq!(head.content_length, 0);
}

#[test]
fn an_incomplete_head_asks_for_more() {
    assert!(matches!(
        request(b"GET / HTTP/1.1\r\nHost: a\r\n"),
        Ok(None)
    ));
}

#[test]
fn what_the_fast_path_leaves_to_hyper() {
    let slow = [
        &b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"[..],
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n",
    ];
    for raw in slow {
        assert_eq!(
            request(raw).err(),
            Some(Slow::Unsupported),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    let malformed = [
        &b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
        b"\x00\x01garbage\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ];
    for raw in malformed {
        assert!(request(raw).is_err(), "{}", String::from_utf8_lossy(raw));
    }
}

#[test]
fn too_many_headers_leave_the_fast_path() {
    let mut raw = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        raw.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    assert_eq!(request(&raw).err(), Some(Slow::Malformed));
}

#[test]
fn the_upstream_request_drops_hop_by_hop_headers_and_adds_ours() {
    let out = rewrite(
        b"POST /p HTTP/1.1\r\nHost: api\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n\
          Keep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 1.1.1.1\r\nx-request-id: old\r\n\
          Content-Length: 3\r\nAccept: */*\r\n\r\nabcGET",
    );
    assert_eq!(
        out,
        "POST /p HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\nAccept: */*\r\n\
         x-request-id: rid-1\r\nx-forwarded-for: 1.1.1.1, 10.0.0.9\r\n\r\nabc"
    );
}

#[test]
fn connection_close_is_seen_and_not_forwarded() {
    let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    assert!(request(raw).expect("fast").expect("complete").close);
    assert!(!rewrite(raw).to_ascii_lowercase().contains("connection"));
}

#[test]
fn response_framing() {
    let cases: [(&[u8], bool, Framing, bool); 9] = [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            false,
            Framing::Length(3),
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            true,
            Framing::Empty,
            false,
        ),
        (
            b"HTTP/1.1 204 No Content\r\n\r\n",
            false,
            Framing::Empty,
            false,
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
            Framing::Empty,
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
            Framing::Chunked,
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
            Framing::Chunked,
            true,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n", false, Framing::UntilClose, true),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            false,
            Framing::Length(1),
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
            Framing::Empty,
            true,
        ),
    ];
    for (raw, head_req, framing, close) in cases {
        let head = response(raw, head_req).expect("valid").expect("complete");
        assert_eq!(
            (head.framing, head.close),
            (framing, close),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[test]
fn garbage_responses_are_errors() {
    for raw in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 999 What\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"\x16\x03\x01garbage",
    ] {
        assert!(
            response(raw, false).is_err(),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    assert!(matches!(
        response(b"HTTP/1.1 200 OK\r\nA: b", false),
        Ok(None)
    ));
}

#[test]
fn the_downstream_response_keeps_the_status_and_end_to_end_headers() {
    let raw = b"HTTP/1.1 201 Made\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
                Transfer-Encoding: chunked\r\nX-Request-Id: theirs\r\nETag: \"1\"\r\n\r\n";
    let mut fields = Vec::new();
    let head = parse_response(raw, &mut fields, false)
        .expect("valid")
        .expect("complete");
    let mut out = Vec::new();
    write_response(&mut out, raw, &head, &fields, b"ours", false);
    assert_eq!(
        String::from_utf8(out).expect("ascii"),
        "HTTP/1.1 201 Made\r\nETag: \"1\"\r\ntransfer-encoding: chunked\r\nx-request-id: ours\r\n\r\n"
    );
}

#[test]
fn local_replies_are_complete_messages() {
    let mut out = Vec::new();
    write_local_reply(
        &mut out,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "overflow",
        "full",
        Some(("x-tidings-overflow", "requests")),
        b"id",
        true,
    );
    let text = String::from_utf8(out).expect("ascii");
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    assert!(head.contains(&format!("content-length: {}", body.len())));
    assert!(head.contains("x-tidings-overflow: requests") && head.contains("connection: close"));
    assert!(body.contains("\"overflow\""));
}

proptest::proptest! {
    /// Whatever bytes arrive, parsing and rewriting never panic, and a head the fast path
    /// takes is rewritten without touching bytes beyond its body.
    #[test]
    fn any_bytes_are_parsed_or_refused_without_panicking(
        raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        prefix in proptest::sample::select(vec![
            &b""[..],
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"GET /p?q HTTP/1.1\r\nHost: a\r\nConnection: x, close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: te\r\n\r\n5\r\n",
        ]),
    ) {
        let mut buf = prefix.to_vec();
        buf.extend_from_slice(&raw);
        let mut fields = Vec::new();
        if let Ok(Some(head)) = parse_request(&buf, &mut fields) {
            if buf.len() >= head.len + head.content_length as usize {
                write_request(&mut Vec::new(), &buf, &head, &fields, b"id", b"127.0.0.1");
            }
            let _ = head.path(&buf);
        }
        for head_request in [false, true] {
            if let Ok(Some(head)) = parse_response(&buf, &mut fields, head_request) {
                proptest::prop_assert!(head.len <= buf.len());
                write_response(&mut Vec::new(), &buf, &head, &fields, b"id", false);
            }
        }
        let (used, _) = crate::io::h1::chunked::Chunked::default().scan(&buf).unwrap_or((0, false));
        proptest::prop_assert!(used <= buf.len());
    }
}
