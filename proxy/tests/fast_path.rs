//! The HTTP/1.1 fast path over real sockets: every way a response body can be delimited
//! passes through intact, pipelined requests are answered in order, the forwarded request
//! carries the proxy's headers and the body, idle upstream connections the backend closed
//! cost no errors, a response cut short closes the client connection, and what the fast path
//! leaves to hyper (HTTP/1.0, chunked uploads, HTTP/2 prior knowledge) is still served.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use proxy::config::HealthCheckKind;
use support::scripted::{big_body, scripted_backend};
use support::{Listed, Membership, config, routed_to, start, without_health_checks};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `bytes` on a new connection and reads until the proxy closes it (at most 5 s).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the proxy did not close the connection");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_passes_through_intact() {
    let (backend, counts) = scripted_backend().await;
    let accepted = counts.accepted;
    let (p, _m) = routed_to(backend).await;
    for _ in 0..2 {
        let r = p.get("/chunked").await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "hello world"));
        let r = p.get("/until-close").await;
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (200, "streamed until close")
        );
        let head = Request::head(format!("http://{}/head", p.addr))
            .body(Full::new(Bytes::new()))
            .expect("req");
        let r = p.send(head).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.headers.get("content-length").map(|v| v.as_bytes()),
            Some(&b"11"[..])
        );
        assert!(r.body.is_empty());
        assert_eq!(p.get("/204").await.status, 204);
        let r = p.get("/early").await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
        let resp = p
            .client
            .get(format!("http://{}/big", p.addr).parse().expect("uri"))
            .await
            .expect("big");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(body[..] == big_body()[..], "1 MiB body changed on the way");
    }
    // Keep-alive upstream: everything but the until-close answers reused connections.
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..50 {
        assert_eq!(p.get("/echo").await.status, 200);
    }
    assert!(
        accepted.load(Ordering::SeqCst) - before <= 1,
        "upstream connections not reused"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (backend, _) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    let text = raw(
        p.addr,
        b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\nGET /first HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let hello = text.find("hello").expect("chunked body");
    let first = text.find("GET /first").expect("first echo");
    let second = text.find("GET /second").expect("second echo");
    assert!(hello < first && first < second, "{text}");
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    assert!(
        text.contains("x-trailer: t"),
        "trailers are passed on: {text}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarded_request_carries_our_headers_and_the_body() {
    let (backend, _) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    let text = raw(
        p.addr,
        b"POST /echo HTTP/1.1\r\nHost: svc\r\nConnection: close, x-secret\r\nx-secret: s\r\n\
          Keep-Alive: 5\r\nX-Forwarded-For: 1.2.3.4\r\nX-Request-Id: req-7\r\n\
          Content-Length: 5\r\n\r\nhello",
    )
    .await;
    let (head, echo) = text.split_once("\r\n\r\n").expect("response head");
    let echo = echo.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("x-request-id: req-7"), "{head}");
    assert!(
        echo.starts_with("post /echo http/1.1\r\nhost: svc\r\n"),
        "{echo}"
    );
    assert!(
        echo.contains("x-forwarded-for: 1.2.3.4, 127.0.0.1\r\n"),
        "{echo}"
    );
    assert!(echo.contains("x-request-id: req-7\r\n"), "{echo}");
    assert!(echo.ends_with("\r\n\r\nhello"), "{echo}");
    for hop in ["x-secret", "keep-alive", "connection"] {
        assert!(!echo.contains(hop), "{hop} was forwarded: {echo}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_the_backend_closed_cost_no_errors() {
    let (backend, counts) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    // The connections go stale while idle: each request starts once the backend has closed
    // every connection it answered on (as a backend's keep-alive timeout does), not in the
    // microseconds between its answer and its close.
    let all_closed =
        || async { counts.closed.load(Ordering::SeqCst) == counts.accepted.load(Ordering::SeqCst) };
    for i in 0..20 {
        support::eventually(Duration::from_secs(5), "backend closed", all_closed).await;
        let r = p.get("/close-after").await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"), "GET {i}");
        support::eventually(Duration::from_secs(5), "backend closed", all_closed).await;
        let post = Request::post(format!("http://{}/close-after", p.addr))
            .body(Full::new(Bytes::from_static(b"x")))
            .expect("req");
        assert_eq!(p.send(post).await.status, 200, "POST {i}");
    }
    assert!(
        counts.accepted.load(Ordering::SeqCst) >= 40,
        "each answer closed its connection"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_short_closes_the_client_connection() {
    let (backend, _) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    let text = raw(p.addr, b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.contains("Content-Length: 10"), "{head}");
    assert_eq!(body, "abc", "only what the backend sent, then the close");
    assert_eq!(p.get("/echo").await.status, 200, "proxy still serves");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_fast_path_leaves_are_served_by_hyper() {
    let (backend, _) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    // Fast first, then a chunked upload on the same connection: handed to hyper mid-stream.
    let text = raw(
        p.addr,
        b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\nPOST /slow HTTP/1.1\r\nHost: x\r\n\
          Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    let fast = text.find("GET /fast").expect("fast echo");
    let slow = text.find("POST /slow").expect("slow echo");
    // The scripted backend does not decode chunked uploads: hyper's framing shows it came.
    assert!(fast < slow, "{text}");
    assert!(
        text[slow..].contains("transfer-encoding: chunked"),
        "{text}"
    );
    // HTTP/1.0, which the fast path leaves alone.
    let text = raw(p.addr, b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(text.contains("GET /old"), "{text}");
    // HTTP/2 with prior knowledge.
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        h2.get(format!("http://{}/h2", p.addr).parse().expect("uri")),
    )
    .await
    .expect("h2 answer in time")
    .expect("h2");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).starts_with("GET /h2 HTTP/1.1"));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_request_without_host_names_the_upstream_each_attempt_went_to() {
    let (echo, _) = scripted_backend().await;
    let failing = support::raw_upstream(Some(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    ))
    .await;
    let m = Membership::start(vec![Listed::up(echo), Listed::up(failing)]).await;
    let p = start(without_health_checks(
        config(&m.url()),
        HealthCheckKind::None,
    ))
    .await;
    p.wait_routed(&[echo, failing]).await;
    // Round robin sends about half of these to the failing host first; the retry goes to the
    // echo, which must see its own address as Host, not the failing host's.
    for i in 0..6 {
        let text = raw(p.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
        if text.contains(" 200 ") {
            assert!(
                text.to_ascii_lowercase()
                    .contains(&format!("host: {echo}\r\n")),
                "request {i}: {text}"
            );
        }
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_give_way_when_the_connection_limit_is_reached() {
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(scripted_backend().await.0);
    }
    let m = Membership::start(backends.iter().copied().map(Listed::up).collect()).await;
    let mut cfg = without_health_checks(config(&m.url()), HealthCheckKind::None);
    // Two connections for three hosts: each keeps its idle one after its first request.
    cfg.clusters[0].circuit_breakers.max_connections = 2;
    let p = start(cfg).await;
    p.wait_routed(&backends).await;
    for i in 0..12 {
        let r = p.get("/echo").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_read_every_framing_and_refuse_garbage() {
    let (backend, _) = scripted_backend().await;
    let garbage = support::raw_upstream(Some(b"SSH-2.0-not-http\r\n\r\n")).await;
    for path in ["/chunked", "/until-close", "/close-after", "/204"] {
        let m = Membership::start(vec![Listed::up(backend), Listed::up(garbage)]).await;
        let mut cfg = config(&m.url());
        cfg.clusters[0].health_check.path = path.into();
        cfg.clusters[0].health_check.expected_statuses = vec![200, 204];
        let p = start(cfg).await;
        // Several checks in a row over the same (or a replaced) connection.
        support::eventually(Duration::from_secs(5), "checks pass repeatedly", || async {
            let host = p.host(backend).await;
            host.is_some_and(|h| h["health"] == "healthy" && h["health_checks"].as_u64() >= Some(3))
        })
        .await;
        let bad = p.host(garbage).await.expect("listed");
        assert_ne!(bad["health"], "healthy", "{path}: garbage passed: {bad}");
        assert_eq!(p.get("/echo").await.status, 200, "{path}");
        p.stop().await;
    }
}
