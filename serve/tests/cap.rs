//! The connection cap: the oldest idle connection makes room; with none idle, refusal.

mod common;

use std::time::Duration;

use common::{KeepAlive, closed_within, limits, start};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn at_the_cap_the_oldest_idle_connection_is_evicted() {
    let server = start(limits(3)).await;
    let mut a = KeepAlive::connect(server.addr).await;
    let mut b = KeepAlive::connect(server.addr).await;
    let mut c = KeepAlive::connect(server.addr).await;
    for conn in [&mut a, &mut b, &mut c] {
        let (status, _) = conn.get("/live").await.expect("answered");
        assert!(status.contains("200"), "{status}");
    }
    // A is used again: B is now the one idle the longest, though A connected first.
    a.get("/live").await.expect("A answered again");

    let mut d = KeepAlive::connect(server.addr).await;
    let (status, _) = d.get("/live").await.expect("D admitted at the cap");
    assert!(status.contains("200"), "{status}");
    assert!(
        closed_within(&mut b.stream, Duration::from_secs(2))
            .await
            .is_some(),
        "B, idle the longest, must be closed"
    );
    for (name, conn) in [("A", &mut a), ("C", &mut c), ("D", &mut d)] {
        conn.get("/live")
            .await
            .unwrap_or_else(|e| panic!("{name} must stay open: {e}"));
    }
    assert_eq!(
        server.metric("tidings_test_connections_evicted_total{reason=\"oldest_idle\"}"),
        1.0
    );
    assert_eq!(server.metric("tidings_test_connections_open"), 3.0);
}

#[tokio::test]
async fn at_the_cap_with_every_connection_busy_a_new_one_gets_503_retry_after() {
    let mut server = start(limits(1)).await;
    let mut a = KeepAlive::connect(server.addr).await;
    let addr = server.addr;
    let held = tokio::spawn(async move {
        let r = a.get("/hold").await;
        (a, r)
    });
    server.held.recv().await.expect("/hold is running");

    let mut d = TcpStream::connect(addr).await.expect("connect");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), d.read_to_end(&mut answer))
        .await
        .expect("refused at once")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("retry-after: 1"), "{answer:?}");

    server.release.add_permits(1);
    let (_a, r) = held.await.expect("task");
    let (status, body) = r.expect("the busy connection is not disturbed");
    assert!(
        status.contains("200") && body == "released\n",
        "{status} {body}"
    );
    assert_eq!(
        server.metric("tidings_test_connections_evicted_total{reason=\"at_capacity\"}"),
        1.0
    );
}
