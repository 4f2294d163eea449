//! The retry budget under a retry storm: a backend that fails every request, many clients at
//! once, retries configured high. Retries in flight must stay within the budget (a share of
//! the active requests, with a floor), requests past it get the failure without a retry, and
//! the refusals are counted. Both request paths: the HTTP/1.1 fast path and hyper's.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proxy::config::HealthCheckKind;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLIENTS: usize = 50;
const ROUNDS: usize = 3;
const NUM_RETRIES: u32 = 5;
const BUDGET_PERCENT: u32 = 20;
const MIN_RETRY_CONCURRENCY: u32 = 3;
/// How long the backend takes to fail: long enough for retries to overlap.
const HOLD: Duration = Duration::from_millis(40);

/// What the failing backend saw, by request id (the proxy forwards the client's).
#[derive(Default)]
struct Seen {
    attempts: Mutex<HashMap<String, u32>>,
    /// Attempts that are retries (their request id came before), being answered now.
    retries_now: AtomicU64,
    retries_max: AtomicU64,
}

/// A backend that answers every request 503 after [`HOLD`].
async fn failing_backend() -> (SocketAddr, Arc<Seen>) {
    failing_backend_with(HOLD, HOLD).await
}

/// A backend that answers every request 503, first attempts after `first`, retries after
/// `retries`.
async fn failing_backend_with(first: Duration, retries: Duration) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let id = req
                            .headers()
                            .get("x-request-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let n = {
                            let mut a = s.attempts.lock().expect("lock");
                            let n = a.entry(id).or_insert(0);
                            *n += 1;
                            *n
                        };
                        if n > 1 {
                            let now = s.retries_now.fetch_add(1, Ordering::SeqCst) + 1;
                            s.retries_max.fetch_max(now, Ordering::SeqCst);
                        }
                        tokio::time::sleep(if n > 1 { retries } else { first }).await;
                        if n > 1 {
                            s.retries_now.fetch_sub(1, Ordering::SeqCst);
                        }
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::SERVICE_UNAVAILABLE)
                                .body(Full::new(Bytes::from_static(b"down")))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Sends one request on a new connection and returns the status line.
async fn send(addr: SocketAddr, version: &str, id: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let close = if version == "HTTP/1.1" {
        "Connection: close\r\n"
    } else {
        ""
    };
    let req = format!("GET /x {version}\r\nHost: svc\r\nx-request-id: {id}\r\n{close}\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "request {id}: no complete answer in 10 s");
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.lines().next().unwrap_or("").to_string()
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn clusters_field(p: &Running, field: &str) -> Option<u64> {
    let (_, body) = p.admin("/clusters").await;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["clusters"][0][field].as_u64()
}

/// A proxy in front of `backend` alone, cluster `cluster`, with the test's retry settings.
async fn proxy_for(backend: SocketAddr, cluster: &str) -> (Running, Membership) {
    let m = Membership::start(vec![Listed::up(backend)]).await;
    let mut cfg = without_health_checks(config(&m.url()), HealthCheckKind::None);
    cfg.routes[0].cluster = cluster.into();
    cfg.routes[0].timeout = Duration::from_secs(30);
    let c = &mut cfg.clusters[0];
    c.name = cluster.into();
    // One failing host must stay routable: this test is about retries, not ejections.
    c.outlier_detection.enabled = false;
    c.circuit_breakers.max_retries = 1_000;
    c.retries.num_retries = NUM_RETRIES;
    c.retries.budget_percent = BUDGET_PERCENT;
    c.retries.min_retry_concurrency = MIN_RETRY_CONCURRENCY;
    c.retries.base_backoff = Duration::from_millis(2);
    c.retries.max_backoff = Duration::from_millis(10);
    let p = start(cfg).await;
    p.wait_routed(&[backend]).await;
    (p, m)
}

async fn storm(version: &'static str, cluster: &'static str) {
    let (backend, seen) = failing_backend().await;
    let (p, _m) = proxy_for(backend, cluster).await;
    let p = Arc::new(p);

    // The proxy's own count, sampled while the storm runs.
    let sampled_max = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (p, max) = (p.clone(), sampled_max.clone());
        tokio::spawn(async move {
            loop {
                // A proxy that does not report the count fails the bound below.
                let n = clusters_field(&p, "active_retries")
                    .await
                    .unwrap_or(u64::MAX);
                max.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let start_line = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (addr, start_line) = (p.addr, start_line.clone());
            tokio::spawn(async move {
                let mut lines = Vec::new();
                for round in 0..ROUNDS {
                    start_line.wait().await;
                    lines.push(send(addr, version, &format!("{cluster}-{round}-{i}")).await);
                }
                lines
            })
        })
        .collect();
    for c in clients {
        for line in c.await.expect("client") {
            assert!(
                line.contains(" 503"),
                "the backend's failure passes through: {line}"
            );
        }
    }
    sampler.abort();
    let _ = sampler.await;

    let attempts: Vec<u32> = seen
        .attempts
        .lock()
        .expect("lock")
        .values()
        .copied()
        .collect();
    assert_eq!(
        attempts.len(),
        CLIENTS * ROUNDS,
        "every request reached the backend"
    );
    let limit = u64::from((CLIENTS as u32 * BUDGET_PERCENT / 100).max(MIN_RETRY_CONCURRENCY));
    let at_backend = seen.retries_max.load(Ordering::SeqCst);
    let in_proxy = sampled_max.load(Ordering::SeqCst);
    eprintln!(
        "{cluster}: at most {at_backend} retries at the backend, {in_proxy} in the proxy, budget {limit}"
    );
    let mut by_attempts = [0usize; NUM_RETRIES as usize + 2];
    for &n in &attempts {
        by_attempts[(n as usize).min(by_attempts.len() - 1)] += 1;
    }
    eprintln!("{cluster}: requests by number of attempts: {by_attempts:?}");
    assert!(
        at_backend <= limit,
        "{at_backend} retries at once at the backend, budget {limit}"
    );
    assert!(
        in_proxy <= limit,
        "{in_proxy} retries in flight in the proxy, budget {limit}"
    );
    let retried = attempts.iter().filter(|&&n| n > 1).count();
    let cut_short = attempts.iter().filter(|&&n| n < NUM_RETRIES + 1).count();
    assert!(retried > 0, "the budget still lets some retries through");
    assert!(cut_short > 0, "requests past the budget are not retried");
    assert_eq!(by_attempts[0], 0);
    assert!(
        attempts.iter().all(|&n| n <= NUM_RETRIES + 1),
        "{by_attempts:?}"
    );

    // Every request stopped short of its retries was refused by the budget, once, and counted.
    let (_, metrics) = p.admin("/metrics").await;
    let cluster_label = format!("cluster=\"{cluster}\"");
    let overflow = sample(
        &metrics,
        "tidings_proxy_retry_overflow_total",
        &[&cluster_label, "limit=\"budget\""],
    );
    assert_eq!(overflow, Some(cut_short as f64), "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "tidings_proxy_retry_overflow_total",
            &[&cluster_label, "limit=\"max_retries\""]
        ),
        None
    );

    // Nothing leaks: once every answer is out, no request or retry is counted any more.
    eventually(Duration::from_secs(3), "counts back to zero", || async {
        clusters_field(&p, "active_retries").await == Some(0)
            && clusters_field(&p, "active_requests").await == Some(0)
    })
    .await;
    let gauge = format!("tidings_proxy_cluster_retries_active{{{cluster_label}}} 0");
    eventually(
        Duration::from_secs(3),
        "retries gauge published",
        || async { p.admin("/metrics").await.1.lines().any(|l| l == gauge) },
    )
    .await;
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("proxy still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_retries_stay_within_the_budget() {
    storm("HTTP/1.1", "fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_path_retries_stay_within_the_budget() {
    storm("HTTP/1.0", "hyper").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_requests_whose_client_left_are_given_back() {
    // First attempts fail at once; retries hang, so they are in flight when the client goes.
    let (backend, seen) = failing_backend_with(Duration::ZERO, Duration::from_secs(60)).await;
    let (p, _m) = proxy_for(backend, "gone").await;
    // HTTP/2 by prior knowledge: hyper's path, where a closed connection cancels its streams.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let req = Request::get(format!("http://{}/x", p.addr))
                .header("x-request-id", format!("gone-{i}"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            tokio::spawn(h2.request(req))
        })
        .collect();
    // The budget lets 3 or 4 retries through (20 % of up to 20 requests, at least 3); the
    // other requests get their 503.
    eventually(Duration::from_secs(5), "retries in flight", || async {
        let in_proxy = clusters_field(&p, "active_retries").await.unwrap_or(0);
        in_proxy >= u64::from(MIN_RETRY_CONCURRENCY)
            && seen.retries_now.load(Ordering::SeqCst) == in_proxy
    })
    .await;
    let held = seen.retries_now.load(Ordering::SeqCst);
    // The client goes away with its requests unanswered.
    for r in requests {
        r.abort();
        let _ = r.await;
    }
    drop(h2);
    eventually(Duration::from_secs(5), "counts given back", || async {
        clusters_field(&p, "active_retries").await == Some(0)
            && clusters_field(&p, "active_requests").await == Some(0)
    })
    .await;
    assert_eq!(
        seen.retries_now.load(Ordering::SeqCst),
        held,
        "the backend still holds the retried attempts: only cancellation gave the slots back"
    );
    p.stop().await;
}
