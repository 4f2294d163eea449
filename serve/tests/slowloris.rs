//! Slowloris: far more half-open connections than the cap, and a client that must still be
//! answered.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{HALF_HEAD, closed_within, limits, live_within_retrying_connect, start};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const ATTACKERS: usize = 200;
const CAP: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_is_answered_while_200_attackers_hold_half_heads_against_a_cap_of_64() {
    let header_read_timeout = Duration::from_millis(1000);
    let server = start(serve::Limits {
        header_read_timeout,
        ..limits(CAP)
    })
    .await;
    let stop = CancellationToken::new();
    // Slowest close an attacker saw (ms), and connections closed.
    let slowest = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    for _ in 0..ATTACKERS {
        let (stop, slowest, closed) = (stop.clone(), slowest.clone(), closed.clone());
        let addr = server.addr;
        attackers.push(tokio::spawn(async move {
            // Each attacker reconnects as soon as it is thrown out, for as long as the test.
            while !stop.is_cancelled() {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    continue;
                };
                if s.write_all(HALF_HEAD).await.is_err() {
                    continue;
                }
                let wait = header_read_timeout + Duration::from_secs(2);
                tokio::select! {
                    () = stop.cancelled() => return,
                    after = closed_within(&mut s, wait) => {
                        let after = after.unwrap_or(wait);
                        slowest.fetch_max(after.as_millis() as u64, Ordering::Relaxed);
                        closed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // Throughout several attacker generations, a well-behaved client is always answered.
    let until = Instant::now() + header_read_timeout * 3;
    let mut answered = 0;
    let mut worst = Duration::ZERO;
    while Instant::now() < until {
        let took = live_within_retrying_connect(server.addr, Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "/live after {answered} answers: {e}; evicted {}, refused {}, open {}",
                    server.metric("tidings_test_connections_evicted_total{reason=\"oldest_idle\"}"),
                    server.metric("tidings_test_connections_evicted_total{reason=\"at_capacity\"}"),
                    server.metric("tidings_test_connections_open")
                )
            });
        worst = worst.max(took);
        answered += 1;
    }
    stop.cancel();
    for a in attackers {
        a.await.expect("attacker");
    }
    let slowest = Duration::from_millis(slowest.load(Ordering::Relaxed));
    let closed = closed.load(Ordering::Relaxed);
    eprintln!(
        "answered {answered} (worst {worst:?}); attackers closed {closed}, slowest {slowest:?}"
    );
    assert!(
        slowest <= header_read_timeout + Duration::from_millis(500),
        "an attacker stayed {slowest:?}"
    );
    // Everyone beyond the cap was thrown out at least once.
    assert!(closed >= (ATTACKERS - CAP) as u64, "closed {closed}");
    assert!(server.metric("tidings_test_connections_evicted_total{reason=\"oldest_idle\"}") > 0.0);
    assert!(server.metric("tidings_test_connections_open") <= CAP as f64 + 1.0);
}
