//! Shutdown: stop accepting, let in-flight requests finish within the drain time.

mod common;

use std::time::Duration;

use common::{HALF_HEAD, KeepAlive, closed_within, limits, start_with_drain};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_closes_idle_connections() {
    let mut server = start_with_drain(limits(16), Duration::from_secs(10)).await;
    let mut busy = KeepAlive::connect(server.addr).await;
    let held = tokio::spawn(async move { busy.get("/hold").await });
    server.held.recv().await.expect("/hold is running");
    let mut idle = KeepAlive::connect(server.addr).await;
    idle.get("/live")
        .await
        .expect("idle connection served once");
    let mut half = TcpStream::connect(server.addr).await.expect("connect");
    half.write_all(HALF_HEAD).await.expect("write");

    server.shutdown.cancel();
    for (name, s) in [("idle", &mut idle.stream), ("half a head", &mut half)] {
        closed_within(s, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("{name} connection must close on shutdown"));
    }
    assert!(
        !server.task.is_finished(),
        "waits for the request in flight"
    );
    server.release.add_permits(1);
    let (status, body) = held.await.expect("task").expect("answered");
    assert!(
        status.contains("200") && body == "released\n",
        "{status} {body}"
    );
    tokio::time::timeout(Duration::from_secs(3), server.task)
        .await
        .expect("stops once drained")
        .expect("task")
        .expect("serve");
}

#[tokio::test]
async fn shutdown_drops_requests_still_running_after_the_drain_time() {
    let mut server = start_with_drain(limits(16), Duration::from_millis(300)).await;
    let mut busy = KeepAlive::connect(server.addr).await;
    let held = tokio::spawn(async move { busy.get("/hold").await });
    server.held.recv().await.expect("/hold is running");
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), server.task)
        .await
        .expect("stops after the drain time")
        .expect("task")
        .expect("serve");
    assert!(
        held.await.expect("task").is_err(),
        "the held request was cut"
    );
}
