//! HTTP/2 without TLS (h2c) beside HTTP/1.1, and the request-head size limit.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{KeepAlive, limits, start};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn h2c_prior_knowledge_is_served_and_its_idle_connection_closes() {
    let server = start(serve::Limits {
        idle_timeout: Duration::from_millis(500),
        ..limits(16)
    })
    .await;
    let stream = TcpStream::connect(server.addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let driver = tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::get("http://test/live")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("answered over h2");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"live\n");
    }
    // Idle with no stream open: the server says GOAWAY and the connection ends.
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("connection ends after the idle timeout")
        .expect("driver task")
        .expect("ends cleanly, not with an error");
    assert_eq!(
        server.metric("tidings_test_connections_timed_out_total{reason=\"idle\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_request_head_over_max_header_bytes_is_refused() {
    let server = start(limits(16)).await; // 16 KiB heads
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    let big = format!(
        "GET /live HTTP/1.1\r\nHost: test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    // The server may stop reading part-way: a failed write is an acceptable refusal too.
    let _ = s.write_all(big.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("the server answers or closes");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer:?}"
    );
    assert!(!answer.contains("live"), "{answer:?}");
}

#[tokio::test]
async fn handlers_see_the_peer_address_as_connect_info() {
    let server = start(limits(16)).await;
    let mut c = KeepAlive::connect(server.addr).await;
    let local = c.stream.local_addr().expect("local addr");
    let (status, body) = c.get("/peer").await.expect("answered");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, local.to_string());
}
