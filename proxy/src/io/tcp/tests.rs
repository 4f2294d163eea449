//! TCP listeners on loopback against echo backends: relay and half-close, failover and
//! ejection on connect failures, the connections breaker, the idle timeout and the drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::serve;
use crate::cluster::{Cluster, ListedHost};
use crate::config::{ClusterConfig, HealthCheckKind, ProxyConfig};

/// Long enough for anything on loopback; every wait below is bounded by it.
const WITHIN: Duration = Duration::from_secs(10);

/// An echo server: copies what it reads back until the client half-closes, then closes.
async fn echo() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// An address nothing listens on: connecting is refused.
async fn refused() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// A cluster over `hosts` (no active checks: routable at once), `tune`d.
fn cluster(hosts: &[SocketAddr], tune: impl FnOnce(&mut ClusterConfig)) -> Arc<Cluster> {
    let mut cfg = ClusterConfig {
        name: "tcp".into(),
        service: "tcp".into(),
        connect_timeout: Duration::from_secs(1),
        ..ClusterConfig::default()
    };
    cfg.health_check.kind = HealthCheckKind::None;
    tune(&mut cfg);
    let c = crate::build_cluster(
        &cfg,
        &ProxyConfig::default(),
        &TaskTracker::new(),
        &CancellationToken::new(),
    )
    .expect("cluster");
    let listed = |&addr: &SocketAddr| ListedHost {
        addr,
        weight: 1,
        zone: None,
        canary: false,
        draining: false,
    };
    c.apply_listing(hosts.iter().map(listed).collect(), None, false);
    c
}

struct Listener {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

async fn listen(cluster: Arc<Cluster>, idle: Duration, drain: Duration) -> Listener {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(l, cluster, idle, stop.clone(), drain));
    Listener { addr, stop, task }
}

/// Sends `msg`, half-closes, and reads until the proxy closes.
async fn round_trip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    try_round_trip(addr, msg).await.expect("io")
}

/// Whether the proxy closed the connection without a byte: with the client's bytes unread,
/// the close may come as a reset.
async fn closed_without_reply(addr: SocketAddr) -> bool {
    match try_round_trip(addr, b"lost").await {
        Ok(got) => got.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

async fn try_round_trip(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(msg).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        std::io::Result::Ok(got)
    };
    tokio::time::timeout(WITHIN, io).await.expect("in time")
}

#[tokio::test]
async fn bytes_flow_both_ways_and_a_half_close_still_gets_the_reply() {
    let (backend, _b) = echo().await;
    let l = listen(cluster(&[backend], |_| {}), WITHIN, WITHIN).await;
    // Larger than one copy buffer, so the reply streams while the request does.
    let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(l.addr, &msg).await, msg);
    assert_eq!(round_trip(l.addr, b"ping").await, b"ping");
    l.stop.cancel();
    tokio::time::timeout(WITHIN, l.task)
        .await
        .expect("stops")
        .expect("no panic");
}

#[tokio::test]
async fn a_refused_connect_fails_over_and_consecutive_failures_eject_the_host() {
    let (live, _b) = echo().await;
    let dead = refused().await;
    let c = cluster(&[dead, live], |c| {
        c.outlier_detection.consecutive_failures = 2;
        c.outlier_detection.max_ejection_percent = 50;
    });
    let l = listen(c.clone(), WITHIN, WITHIN).await;
    for i in 0..6u8 {
        assert_eq!(round_trip(l.addr, &[i]).await, [i], "connection {i}");
    }
    let snap = c.snapshot();
    let dead_host = snap
        .hosts
        .iter()
        .find(|h| h.address == dead.to_string())
        .expect("dead host listed");
    assert!(dead_host.ejected, "{snap:?}");
    assert_eq!(snap.routable_hosts, 1);
    // Ejected, it is not tried any more: every connection goes straight to the live host.
    assert_eq!(round_trip(l.addr, b"after").await, b"after");
}

#[tokio::test]
async fn with_no_host_to_connect_to_the_client_is_closed() {
    let dead = refused().await;
    let l = listen(cluster(&[dead], |_| {}), WITHIN, WITHIN).await;
    assert!(closed_without_reply(l.addr).await);
}

#[tokio::test]
async fn the_connections_breaker_refuses_past_its_limit_and_frees_the_slot_on_close() {
    let (backend, _b) = echo().await;
    let c = cluster(&[backend], |c| c.circuit_breakers.max_connections = 1);
    let l = listen(c, WITHIN, WITHIN).await;
    let mut held = TcpStream::connect(l.addr).await.expect("connect");
    held.write_all(b"1").await.expect("write");
    let mut one = [0u8; 1];
    tokio::time::timeout(WITHIN, held.read_exact(&mut one))
        .await
        .expect("in time")
        .expect("echoed");
    // The one upstream connection is held: the next client gets nothing but a close.
    assert!(closed_without_reply(l.addr).await);
    drop(held);
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        if try_round_trip(l.addr, b"3")
            .await
            .is_ok_and(|got| got == b"3")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let (backend, _b) = echo().await;
    let idle = Duration::from_millis(300);
    let l = listen(cluster(&[backend], |_| {}), idle, WITHIN).await;
    let mut s = TcpStream::connect(l.addr).await.expect("connect");
    // Busy for three idle timeouts: each write and its echo count as activity.
    let busy_until = tokio::time::Instant::now() + idle * 3;
    let mut buf = [0u8; 1];
    while tokio::time::Instant::now() < busy_until {
        s.write_all(b"x").await.expect("write while busy");
        tokio::time::timeout(WITHIN, s.read_exact(&mut buf))
            .await
            .expect("in time")
            .expect("echo while busy");
        tokio::time::sleep(idle / 4).await;
    }
    // Silent: the proxy closes it (EOF) within the timeout and a little.
    let start = tokio::time::Instant::now();
    let n = tokio::time::timeout(WITHIN, s.read(&mut buf))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(n, 0);
    assert!(start.elapsed() >= idle / 2, "{:?}", start.elapsed());
}

#[tokio::test]
async fn at_shutdown_open_connections_get_the_drain_then_are_closed() {
    let (backend, _b) = echo().await;
    let drain = Duration::from_millis(200);
    let l = listen(cluster(&[backend], |_| {}), WITHIN, drain).await;
    let mut s = TcpStream::connect(l.addr).await.expect("connect");
    s.write_all(b"x").await.expect("write");
    let mut buf = [0u8; 1];
    s.read_exact(&mut buf).await.expect("echo");
    l.stop.cancel();
    tokio::time::timeout(WITHIN, l.task)
        .await
        .expect("the listener stops within the drain")
        .expect("no panic");
    let n = tokio::time::timeout(WITHIN, s.read(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(TcpStream::connect(l.addr).await.is_err(), "still accepting");
}
