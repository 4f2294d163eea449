//! HTTP/2 clients through the proxy to HTTP/1.1 backends, over real sockets: the requests go
//! on the fast path's raw upstream connections (`io::h1::bridge`). Every framing of a
//! response body reaches the client as its data (chunk framing removed), the forwarded
//! request carries the proxy's headers, its body and one joined `cookie`, hop-by-hop response
//! fields (and those `Connection` names) stay behind, connections are
//! reused only after a clean body, a body cut short fails the stream and not the proxy,
//! concurrent streams each get their own answer, and a streamed upload still goes through.

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::routed_to;
use support::scripted::{BIG, big_body, scripted_backend};

const IN_TIME: Duration = Duration::from_secs(10);

fn h2_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends `req` over HTTP/2; the status, the headers and the whole body, or the error.
async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<(u16, http::HeaderMap, Bytes), String> {
    let resp = tokio::time::timeout(IN_TIME, client.request(req))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(IN_TIME, resp.into_body().collect())
        .await
        .map_err(|_| "no body in time".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body))
}

fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_reaches_an_http2_client_as_its_data() {
    let (backend, _) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    let c = h2_client();
    let (status, headers, body) = send(&c, get(p.addr, "/chunked")).await.expect("chunked");
    assert_eq!((status, &body[..]), (200, &b"hello world"[..]));
    assert!(headers.get("transfer-encoding").is_none(), "{headers:?}");
    let (_, _, body) = send(&c, get(p.addr, "/until-close"))
        .await
        .expect("until close");
    assert_eq!(&body[..], b"streamed until close");
    let (status, _, body) = send(&c, get(p.addr, "/204")).await.expect("204");
    assert_eq!((status, body.len()), (204, 0));
    let (status, _, body) = send(&c, get(p.addr, "/early")).await.expect("1xx first");
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    let head = Request::builder()
        .method(Method::HEAD)
        .uri(format!("http://{}/head", p.addr))
        .body(Full::default())
        .expect("request");
    let (status, headers, body) = send(&c, head).await.expect("head");
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"11"[..])
    );
    let (_, _, body) = send(&c, get(p.addr, "/big")).await.expect("big");
    assert_eq!(body.len(), BIG);
    assert!(body[..] == big_body()[..], "1 MiB body intact");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarded_request_carries_our_headers_one_cookie_and_the_body() {
    let (backend, _) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    let c = h2_client();
    let req = Request::post(format!("http://{}/echo?q=1", p.addr))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("x-request-id", "rid-7")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"hello")))
        .expect("request");
    let (status, headers, body) = send(&c, req).await.expect("echo");
    assert_eq!(status, 200);
    assert_eq!(
        headers["x-request-id"], "rid-7",
        "the request's id comes back"
    );
    let echo = String::from_utf8_lossy(&body).to_lowercase();
    assert!(echo.starts_with("post /echo?q=1 http/1.1\r\n"), "{echo}");
    assert!(echo.contains(&format!("host: {}\r\n", p.addr)), "{echo}");
    assert!(echo.contains("cookie: a=1; b=2\r\n"), "{echo}");
    assert_eq!(echo.matches("cookie:").count(), 1, "{echo}");
    assert!(echo.contains("x-request-id: rid-7\r\n"), "{echo}");
    assert!(echo.contains("x-forwarded-for: 127.0.0.1\r\n"), "{echo}");
    assert!(echo.contains("content-length: 5\r\n"), "{echo}");
    assert!(
        !echo.contains("te: trailers"),
        "hop-by-hop header forwarded: {echo}"
    );
    assert!(echo.ends_with("\r\n\r\nhello"), "{echo}");
    // An empty POST says so, as HTTP/1.1 wants.
    let req = Request::post(format!("http://{}/empty", p.addr))
        .body(Full::default())
        .expect("request");
    let (_, _, body) = send(&c, req).await.expect("empty post");
    let echo = String::from_utf8_lossy(&body).to_lowercase();
    assert!(echo.contains("content-length: 0\r\n"), "{echo}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_fields_stay_behind() {
    let (backend, _) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    let c = h2_client();
    for path in ["/hop", "/hop-named"] {
        let (status, headers, body) = send(&c, get(p.addr, path)).await.expect(path);
        assert_eq!((status, &body[..]), (200, &b"ok"[..]), "{path}");
        assert_eq!(headers["x-kept"], "k", "{path}");
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "proxy-authenticate",
            "trailer",
        ] {
            assert!(!headers.contains_key(gone), "{path}: {gone} forwarded");
        }
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_after_clean_bodies_only() {
    let (backend, counts) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    let c = h2_client();
    for path in ["/a", "/chunked", "/b", "/204", "/c"] {
        send(&c, get(p.addr, path)).await.expect("answer");
    }
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        1,
        "one request at a time, every body clean: one upstream connection"
    );
    send(&c, get(p.addr, "/until-close"))
        .await
        .expect("until close");
    send(&c, get(p.addr, "/d")).await.expect("after");
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        2,
        "a body delimited by the close takes its connection with it"
    );
    // The backend closes after an answer that claimed keep-alive: the next request finds the
    // pooled connection dead and goes out on a new one, without an error.
    send(&c, get(p.addr, "/close-after"))
        .await
        .expect("close after");
    let (status, _, body) = send(&c, get(p.addr, "/e"))
        .await
        .expect("after a stale one");
    assert_eq!(status, 200);
    assert!(body.starts_with(b"GET /e "));
    // An answer longer than its Content-Length: the client gets what the length says, and
    // the rest goes with the connection, never to the next request.
    let before = counts.accepted.load(Ordering::SeqCst);
    let (status, headers, body) = send(&c, get(p.addr, "/overlong")).await.expect("overlong");
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    assert_eq!(headers["x-custom"], "kept as sent");
    let (_, _, body) = send(&c, get(p.addr, "/f")).await.expect("after overlong");
    assert!(body.starts_with(b"GET /f "), "{body:?}");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), before + 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_fails_the_stream_and_not_the_proxy() {
    let (backend, _) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    let c = h2_client();
    let cut = send(&c, get(p.addr, "/cut")).await;
    assert!(cut.is_err(), "a cut body must not look complete: {cut:?}");
    let (status, _, body) = send(&c, get(p.addr, "/after"))
        .await
        .expect("still serving");
    assert_eq!(status, 200);
    assert!(body.starts_with(b"GET /after "));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_each_get_their_own_answer() {
    let (backend, counts) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    let c = h2_client();
    let addr = p.addr;
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..64 {
        let c = c.clone();
        streams.spawn(async move { (i, send(&c, get(addr, &format!("/stream-{i}"))).await) });
    }
    let mut answered = 0;
    while let Some(joined) = streams.join_next().await {
        let (i, a) = joined.expect("join");
        let (status, _, body) = a.expect("answer");
        assert_eq!(status, 200);
        let want = format!("GET /stream-{i} HTTP/1.1\r\n");
        assert!(
            body.starts_with(want.as_bytes()),
            "stream {i} got another's answer"
        );
        answered += 1;
    }
    assert_eq!(answered, 64);
    let accepted = counts.accepted.load(Ordering::SeqCst);
    assert!(
        (1..=64).contains(&accepted),
        "at most one connection per stream in flight: {accepted}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_still_goes_through() {
    let (backend, _) = scripted_backend().await;
    let (p, _m) = routed_to(backend).await;
    // No length, sent in pieces: not for a raw connection, which needs the body whole.
    let pieces = Pieces(VecDeque::from([
        Bytes::from_static(b"abc"),
        Bytes::from_static(b"def"),
    ]));
    let c = h2_client::<Pieces>();
    let req = Request::post(format!("http://{}/upload", p.addr))
        .body(pieces)
        .expect("request");
    let resp = tokio::time::timeout(IN_TIME, c.request(req))
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let echo = String::from_utf8_lossy(&body).to_lowercase();
    assert!(echo.starts_with("post /upload http/1.1\r\n"), "{echo}");
    assert!(echo.contains("abc") && echo.contains("def"), "{echo}");
    p.stop().await;
}

/// A request body of unknown length, sent a piece at a time.
struct Pieces(VecDeque<Bytes>);

impl Body for Pieces {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}
