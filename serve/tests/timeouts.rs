//! Header, idle and write-stall timeouts.

mod common;

use std::time::Duration;

use common::{BIG, HALF_HEAD, KeepAlive, closed_within, limits, live_within, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

#[tokio::test]
async fn a_kept_alive_connection_closes_after_idle_timeout_not_the_header_timeout() {
    let server = start(serve::Limits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(1200),
        ..limits(16)
    })
    .await;
    let mut c = KeepAlive::connect(server.addr).await;
    c.get("/live").await.expect("first");
    c.get("/live").await.expect("second on the same connection");
    let after = closed_within(&mut c.stream, Duration::from_secs(5))
        .await
        .expect("idle connection closed");
    // hyper's own header timer would close it after 300 ms: idle time is ours to set.
    assert!(
        after >= Duration::from_millis(1000) && after < Duration::from_millis(2500),
        "closed after {after:?}"
    );
    assert_eq!(
        server.metric("tidings_test_connections_timed_out_total{reason=\"idle\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_later_request_head_on_a_kept_alive_connection_must_arrive_within_header_timeout() {
    let server = start(serve::Limits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(30),
        ..limits(16)
    })
    .await;
    let mut c = KeepAlive::connect(server.addr).await;
    c.get("/live").await.expect("first");
    c.stream.write_all(HALF_HEAD).await.expect("half a head");
    let after = closed_within(&mut c.stream, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(
        after < Duration::from_millis(1000),
        "closed after {after:?}"
    );
    assert_eq!(
        server.metric("tidings_test_connections_timed_out_total{reason=\"header\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_client_that_sends_nothing_or_half_a_head_is_closed_after_header_timeout() {
    let server = start(serve::Limits {
        header_read_timeout: Duration::from_millis(300),
        ..limits(16)
    })
    .await;
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let mut half = TcpStream::connect(server.addr).await.expect("connect");
    half.write_all(HALF_HEAD).await.expect("write");
    for s in [&mut silent, &mut half] {
        let after = closed_within(s, Duration::from_secs(5))
            .await
            .expect("closed");
        assert!(
            after < Duration::from_millis(1000),
            "closed after {after:?}"
        );
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_write_timeout_while_others_are_served() {
    let server = start(serve::Limits {
        write_timeout: Duration::from_millis(500),
        ..limits(16)
    })
    .await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut slow = socket.connect(server.addr).await.expect("connect");
    slow.write_all(b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("request");
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        // A byte every 100 ms: this pace is the misbehaviour under test, not a wait. The
        // server resets a stalled connection; the reset shows as the socket's error at once,
        // while reads would still return what the receive buffer holds.
        let mut got = 0usize;
        let mut byte = [0u8; 1];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if let Ok(Some(_reset)) = slow.take_error() {
                return (got, t0.elapsed());
            }
            match tokio::time::timeout(Duration::from_secs(5), slow.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (got, t0.elapsed()),
                Ok(Ok(n)) => got += n,
                Err(_) => panic!("server sent nothing for 5 s and did not close"),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "still open after 10 s"
            );
        }
    });
    while !reader.is_finished() {
        live_within(server.addr, Duration::from_secs(1))
            .await
            .expect("others are served meanwhile");
    }
    let (got, after) = reader.await.expect("reader");
    assert!(got < BIG, "read the whole body ({got} bytes)?");
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
    assert_eq!(
        server.metric("tidings_test_connections_timed_out_total{reason=\"write\"}"),
        1.0
    );
}
