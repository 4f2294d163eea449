//! The repair TCP listener of real nodes on 127.0.0.1 under hostile clients: stalled half
//! frames, idle connections, and a flood of connections from a host without the key.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use gossip::{GossipConfig, GossipHandle, Source, generate_key, run};
use schema::{Endpoint, ServiceName, TagKey, TagValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

fn endpoint(i: usize) -> Endpoint {
    let service = ServiceName::new(format!("svc-{i}")).unwrap();
    Endpoint::new(
        service,
        "10.9.0.1".parse().unwrap(),
        NonZeroU16::new(8000 + i as u16).unwrap(),
    )
}

/// An endpoint too large to be broadcast (over 1000 bytes encoded): nodes learn it only
/// through repair over TCP.
fn bulky_endpoint() -> Endpoint {
    let mut ep = endpoint(0);
    for i in 0..5 {
        let key = TagKey::new(format!("k{i}")).unwrap();
        ep.tags
            .extra
            .insert(key, TagValue::new("v".repeat(250)).unwrap());
    }
    ep
}

fn config(keys: &[String], seeds: Vec<SocketAddr>) -> GossipConfig {
    GossipConfig {
        keys: keys.to_vec(),
        insecure: false,
        seeds,
        ..GossipConfig::for_tests("127.0.0.1:0".parse().unwrap())
    }
}

async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

fn sees(h: &GossipHandle, ep: &Endpoint) -> bool {
    h.view()
        .borrow()
        .endpoints
        .iter()
        .any(|e| *e.endpoint == *ep && matches!(e.source, Source::Gossip { .. }))
}

/// A hello (preamble and challenge), then the start of a chunk that claims 32 768 bytes,
/// of which only 10 follow.
fn half_frame() -> Vec<u8> {
    let mut b = b"TDR\x02challnge\x80\x00".to_vec();
    b.extend_from_slice(&[0x5a; 10]);
    b
}

/// Waits for the server to close `s`; returns how long after `start` that was.
async fn closed_within(s: &mut TcpStream, start: Instant, limit: Duration) -> Duration {
    let mut buf = [0u8; 64];
    loop {
        match timeout(limit, s.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_half_frames_and_idle_connections_are_closed() {
    let keys = vec![generate_key()];
    let stop = CancellationToken::new();
    let cfg = GossipConfig {
        repair_frame_timeout_ms: 300,
        repair_idle_timeout_ms: 600,
        ..config(&keys, vec![])
    };
    let a = run(cfg, vec![], stop.child_token()).await.unwrap();
    let addr = a.id().addr;

    let start = Instant::now();
    let mut staller = TcpStream::connect(addr).await.unwrap();
    staller.write_all(&half_frame()).await.unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    // The staller goes at the frame timeout, long before the idle timeout...
    let took = closed_within(&mut staller, start, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_millis(550),
        "staller closed after {took:?}"
    );
    // ...and a connection that never sends goes at the idle timeout.
    let took = closed_within(&mut idle, start, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(550),
        "idle closed after {took:?}"
    );
    eventually("timeouts counted", Duration::from_secs(5), || {
        a.metrics().tcp_timeouts >= 2
    })
    .await;
    stop.cancel();
    a.closed().await;
}

/// Keeps `n` connections to `addr` open, each holding half a frame, and opens a new one
/// as soon as the server closes one: a host without the key trying to hold every slot.
fn flood(addr: SocketAddr, n: usize, stop: &CancellationToken) {
    for _ in 0..n {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(mut s) = TcpStream::connect(addr).await {
                    let _ = s.write_all(&half_frame()).await;
                    let mut buf = [0u8; 16];
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = s.read(&mut buf) => continue,
                    }
                }
                sleep(Duration::from_millis(50)).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_stalled_connections_does_not_block_repair() {
    let keys = vec![generate_key()];
    let stop = CancellationToken::new();
    let attack = CancellationToken::new();
    let a = run(
        config(&keys, vec![]),
        vec![bulky_endpoint()],
        stop.child_token(),
    )
    .await
    .unwrap();
    // The row is too large to be broadcast, so only repair over TCP can teach it to the
    // other node. Both listeners are flooded, whichever side starts the exchange.
    let late = run(config(&keys, vec![]), vec![], stop.child_token())
        .await
        .unwrap();
    // Three times the connection cap (64) on each node: enough that every slot is taken
    // over and over, not so many that a loaded 2-core CI machine spends the test's whole
    // budget scheduling the attackers.
    flood(a.id().addr, 200, &attack);
    flood(late.id().addr, 200, &attack);
    eventually("flood holds the slots", Duration::from_secs(10), || {
        a.metrics().tcp_evicted > 0 && late.metrics().tcp_evicted > 0
    })
    .await;
    late.join(vec![a.id().addr]).await.unwrap();
    eventually("late node repaired", Duration::from_secs(40), || {
        sees(&late, &bulky_endpoint())
    })
    .await;
    assert!(late.metrics().repair_rows_applied > 0, "{}", late.metrics());
    let m = a.metrics();
    assert_eq!(m.repair_sessions_busy, 0, "{m}");
    attack.cancel();
    stop.cancel();
    a.closed().await;
    late.closed().await;
}
