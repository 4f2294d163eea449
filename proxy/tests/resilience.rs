//! Failures and bad input: none of them takes the proxy down or leaks an error to clients
//! that retries could have hidden.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use proxy::config::HealthCheckKind;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_backends_under_load_gives_no_client_errors() {
    kill_under_load(&[2]).await;
}

/// Two hosts dying at the same instant: a request whose first try and one retry both land
/// on them still reaches the live one, since a refused connect goes on to every host not
/// tried yet (the fault campaign killed two of eight backends at once and saw 503s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_two_of_three_backends_at_once_under_load_gives_no_client_errors() {
    kill_under_load(&[1, 2]).await;
}

/// Three backends under steady GETs from three workers; the `killed` ones die together
/// midway. No client may see an error, and health checks take the dead ones out.
async fn kill_under_load(killed: &[usize]) {
    let bs = [
        Backend::start(1, Duration::ZERO).await,
        Backend::start(2, Duration::ZERO).await,
        Backend::start(3, Duration::ZERO).await,
    ];
    let m = Membership::start(bs.iter().map(|b| Listed::up(b.addr)).collect()).await;
    let p = Arc::new(start(config(&m.url())).await);
    p.wait_routed(&bs.iter().map(|b| b.addr).collect::<Vec<_>>())
        .await;

    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut workers = Vec::new();
    // Three workers stay within the default retry concurrency floor, so every failed first
    // attempt may be retried.
    for _ in 0..3 {
        let (p, ok, failed) = (p.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..2_000 {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let r = p.get("/").await;
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::SeqCst)
                } else {
                    failed.fetch_add(1, Ordering::SeqCst)
                };
            }
        }));
    }
    eventually(Duration::from_secs(3), "load running", || async {
        ok.load(Ordering::SeqCst) >= 100
    })
    .await;
    for &i in killed {
        bs[i].kill();
    }
    for w in workers {
        w.await.expect("worker");
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "client-visible errors (ok: {})",
        ok.load(Ordering::SeqCst)
    );
    // And health checks take the dead backends out.
    for &i in killed {
        eventually(Duration::from_secs(3), "dead backend held", || async {
            p.decision(bs[i].addr).await.as_deref() != Some("route")
        })
        .await;
    }
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("shared"),
    }
}

async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_the_proxy_survives() {
    let a = Backend::start(1, Duration::ZERO).await;
    let m = Membership::start(vec![Listed::up(a.addr)]).await;
    let mut cfg = config(&m.url());
    cfg.listeners[0].max_header_bytes = 16 * 1024;
    cfg.listeners[0].header_read_timeout = Duration::from_millis(500);
    let p = start(cfg).await;
    p.wait_routed(&[a.addr]).await;

    let malformed = raw_exchange(p.addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed:?}");

    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let oversized = raw_exchange(p.addr, big.as_bytes()).await;
    assert!(
        oversized.starts_with("HTTP/1.1 431") || oversized.starts_with("HTTP/1.1 400"),
        "{:?}",
        &oversized[..oversized.len().min(80)]
    );

    // Slowloris: half a request, then silence. The proxy must hang up on its own.
    let started = tokio::time::Instant::now();
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "slow client was not cut off");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A silent client that never sends a byte is cut off too.
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "idle client was not cut off");

    let r = p.get("/").await;
    assert_eq!(r.status, 200, "proxy still serves");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_answers_gives_504_within_the_route_timeout() {
    let silent = raw_upstream(None).await;
    let m = Membership::start(vec![Listed::up(silent)]).await;
    let mut cfg = without_health_checks(config(&m.url()), HealthCheckKind::Tcp);
    cfg.routes[0].timeout = Duration::from_millis(600);
    let p = start(cfg).await;
    p.wait_routed(&[silent]).await;
    let started = tokio::time::Instant::now();
    let r = p.get("/").await;
    assert_eq!(r.status, 504, "{}", r.body);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(p.admin("/live").await.0, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_sends_garbage_gives_502() {
    let junk = raw_upstream(Some(b"SSH-2.0-definitely-not-http\r\n\r\n")).await;
    let m = Membership::start(vec![Listed::up(junk)]).await;
    let p = start(without_health_checks(
        config(&m.url()),
        HealthCheckKind::None,
    ))
    .await;
    p.wait_routed(&[junk]).await;
    let r = p.get("/").await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("upstream_reset"), "{}", r.body);
    assert_eq!(p.admin("/live").await.0, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_upstream_is_503_and_unknown_route_is_404() {
    let m = Membership::start(vec![]).await;
    let mut cfg = config(&m.url());
    cfg.routes[0].host = Some("svc.internal".into());
    let p = start(cfg).await;
    let req = Request::get(format!("http://{}/", p.addr))
        .header("host", "svc.internal:80")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let r = p.send(req).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("no_healthy_upstream"));
    let r = p.get("/").await; // Host is the proxy's address: no route.
    assert_eq!(r.status, 404);
    assert!(r.headers.contains_key("x-request-id"));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_overflow_is_503_with_header() {
    let a = Backend::start(1, Duration::from_millis(500)).await;
    let m = Membership::start(vec![Listed::up(a.addr)]).await;
    let mut cfg = config(&m.url());
    cfg.clusters[0].circuit_breakers.max_requests = 1;
    let p = Arc::new(start(cfg).await);
    p.wait_routed(&[a.addr]).await;
    let p2 = p.clone();
    let first = tokio::spawn(async move { p2.get("/slow").await });
    eventually(
        Duration::from_secs(3),
        "first request in flight",
        || async { a.slow_started.load(Ordering::SeqCst) == 1 },
    )
    .await;
    let r = p.get("/").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.headers.get("x-tidings-overflow").map(|v| v.as_bytes()),
        Some(&b"requests"[..])
    );
    assert_eq!(first.await.expect("join").status, 200);
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_generated_or_propagated_and_admin_answers() {
    let a = Backend::start(1, Duration::ZERO).await;
    let m = Membership::start(vec![Listed::up(a.addr)]).await;
    let p = start(config(&m.url())).await;
    p.wait_routed(&[a.addr]).await;

    let r = p.get("/").await;
    let generated = r.headers.get("x-request-id").expect("generated id").clone();
    assert_eq!(
        r.headers.get("x-seen-request-id"),
        Some(&generated),
        "upstream saw the same id"
    );
    let req = Request::get(format!("http://{}/", p.addr))
        .header("x-request-id", "abc-123")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let r = p.send(req).await;
    assert_eq!(
        r.headers.get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"abc-123"[..])
    );
    assert_eq!(
        r.headers.get("x-seen-request-id").map(|v| v.as_bytes()),
        Some(&b"abc-123"[..])
    );

    assert_eq!(p.admin("/ready").await.0, 200);
    assert_eq!(p.admin("/live").await.0, 200);
    let (status, config) = p.admin("/config").await;
    assert_eq!(status, 200);
    assert!(config.contains("\"service\": \"svc\""), "{config}");
    let (status, metrics) = p.admin("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tidings_proxy_requests_total"),
        "{metrics}"
    );
    // Host and cluster gauges come from the once-a-second upkeep.
    let gauges = [
        format!(
            "tidings_proxy_host_routable{{cluster=\"c\",host=\"{}\"}} 1",
            a.addr
        ),
        "tidings_proxy_cluster_routable_hosts{cluster=\"c\"} 1".to_string(),
    ];
    support::eventually(Duration::from_secs(5), "gauges published", || async {
        let metrics = p.admin("/metrics").await.1;
        gauges.iter().all(|g| metrics.contains(g.as_str()))
    })
    .await;
    let host = p.host(a.addr).await.expect("host");
    for key in [
        "discovery",
        "health",
        "weight",
        "zone",
        "active_requests",
        "ejections_total",
    ] {
        assert!(host.get(key).is_some(), "/clusters lacks {key}: {host}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_a_host_and_retries_hide_them() {
    let (a, b) = (
        Backend::start(1, Duration::ZERO).await,
        Backend::start(2, Duration::ZERO).await,
    );
    let m = Membership::start(vec![Listed::up(a.addr), Listed::up(b.addr)]).await;
    let mut cfg = config(&m.url());
    // Fast health checks would end the ejection at once (Envoy's default); keep it visible.
    cfg.clusters[0]
        .outlier_detection
        .uneject_on_health_check_success = false;
    let p = start(cfg).await;
    p.wait_routed(&[a.addr, b.addr]).await;
    a.failing.store(true, Ordering::SeqCst);
    for _ in 0..20 {
        let r = p.get("/").await;
        assert_eq!(r.status, 200, "a retry to the healthy host hides the 503");
    }
    let host = p.host(a.addr).await.expect("a");
    assert_eq!(host["ejected"], true, "{host}");
    assert_eq!(host["ejections_total"], 1);
    let hits = a.hits();
    for _ in 0..10 {
        assert_eq!(p.get("/").await.body, "backend-2");
    }
    assert_eq!(a.hits(), hits, "an ejected host gets no traffic");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_requests_are_retried() {
    let a = Backend::start(1, Duration::ZERO).await;
    let m = Membership::start(vec![Listed::up(a.addr)]).await;
    let mut cfg = config(&m.url());
    cfg.clusters[0].outlier_detection.enabled = false;
    let p = start(cfg).await;
    p.wait_routed(&[a.addr]).await;
    a.failing.store(true, Ordering::SeqCst);
    let post = Request::post(format!("http://{}/", p.addr))
        .body(Full::new(Bytes::from_static(b"x")))
        .expect("req");
    assert_eq!(p.send(post).await.status, 503);
    assert_eq!(a.hits(), 1, "POST is not retried");
    assert_eq!(p.get("/").await.status, 503);
    assert_eq!(a.hits(), 3, "GET is retried once");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_readiness_and_lets_in_flight_requests_finish() {
    let a = Backend::start(1, Duration::from_millis(700)).await;
    let m = Membership::start(vec![Listed::up(a.addr)]).await;
    let p = Arc::new(start(config(&m.url())).await);
    p.wait_routed(&[a.addr]).await;
    let p2 = p.clone();
    let slow = tokio::spawn(async move { p2.get("/slow").await });
    eventually(Duration::from_secs(3), "request in flight", || async {
        a.slow_started.load(Ordering::SeqCst) == 1
    })
    .await;
    p.shutdown.cancel();
    eventually(
        Duration::from_secs(2),
        "not ready while draining",
        || async { p.admin("/ready").await.0 == 503 },
    )
    .await;
    assert_eq!(
        slow.await.expect("join").status,
        200,
        "in-flight request finished"
    );
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => panic!("shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_that_stalls_is_cut_at_the_route_timeout() {
    let stall = raw_upstream_with(
        Some(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial"),
        true,
    )
    .await;
    let m = Membership::start(vec![Listed::up(stall)]).await;
    let mut cfg = without_health_checks(config(&m.url()), HealthCheckKind::Tcp);
    cfg.routes[0].timeout = Duration::from_millis(600);
    let p = start(cfg).await;
    p.wait_routed(&[stall]).await;
    let started = tokio::time::Instant::now();
    let req = Request::get(format!("http://{}/", p.addr))
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = p.client.request(req).await.expect("headers arrive");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(
        Duration::from_secs(5),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("body ends");
    assert!(body.is_err(), "a truncated body must not look complete");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(p.admin("/live").await.0, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_overflow_is_503_with_header() {
    let a = Backend::start(1, Duration::ZERO).await;
    let m = Membership::start(vec![Listed::up(a.addr)]).await;
    let mut cfg = config(&m.url());
    cfg.clusters[0].circuit_breakers.max_connections = 0;
    let p = start(cfg).await;
    // Health checks have their own connections, outside the breaker.
    p.wait_routed(&[a.addr]).await;
    let r = p.get("/").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        r.headers.get("x-tidings-overflow").map(|v| v.as_bytes()),
        Some(&b"connections"[..])
    );
    assert_eq!(a.hits(), 0);
    p.stop().await;
}
