//! The admin listener's connection hygiene: a client that never finishes its request head,
//! or sits idle on a keep-alive connection, is closed in time; at the connection cap the
//! longest-waiting connection makes room, so a slowloris cannot lock probes out of `/ready`.

mod support;

use std::time::Duration;

use proxy::config::HealthCheckKind;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const READY: &[u8] = b"GET /ready HTTP/1.1\r\nHost: admin\r\n\r\n";
/// Half a request head: what a slowloris sends, and then nothing.
const HALF: &[u8] = b"GET /ready HTTP/1.1\r\nHost: admin\r\nX-Slow: ";

async fn proxy_with(tune: impl FnOnce(&mut proxy::config::AdminConfig)) -> (Running, Membership) {
    let b = Backend::start(1, Duration::ZERO).await;
    let m = Membership::start(vec![Listed::up(b.addr)]).await;
    let mut cfg = without_health_checks(config(&m.url()), HealthCheckKind::None);
    tune(&mut cfg.admin);
    let p = start(cfg).await;
    eventually(Duration::from_secs(5), "ready", || async {
        p.admin("/ready").await.0 == 200
    })
    .await;
    (p, m)
}

/// Reads one response (head and `Content-Length` body) from a keep-alive connection.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed mid-response: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits (at most `within`) for the server to close `s`; returns how long after `since`.
async fn closed_within(s: &mut TcpStream, since: Instant, within: Duration) -> Duration {
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(since + within, s.read(&mut chunk)).await {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Whether the server still holds `s` open (nothing to read, no end of stream).
async fn still_open(s: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 64];
    tokio::time::timeout(Duration::from_millis(5), s.read(&mut chunk))
        .await
        .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_must_arrive_in_time_and_idle_connections_close() {
    let head = Duration::from_millis(300);
    let idle = Duration::from_millis(900);
    let (p, _m) = proxy_with(|a| {
        a.header_read_timeout = head;
        a.idle_timeout = idle;
    })
    .await;

    // Connects and sends nothing; sends half a head.
    let opened = Instant::now();
    let mut silent = TcpStream::connect(p.admin).await.expect("connect");
    let mut slow = TcpStream::connect(p.admin).await.expect("connect");
    slow.write_all(HALF).await.expect("write");
    for s in [&mut silent, &mut slow] {
        let took = closed_within(s, opened, Duration::from_secs(3)).await;
        assert!(
            took >= head - Duration::from_millis(50),
            "closed after {took:?}"
        );
    }

    // A keep-alive client may wait longer than the header timeout between requests...
    let mut kept = TcpStream::connect(p.admin).await.expect("connect");
    kept.write_all(READY).await.expect("write");
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(head * 2).await;
    kept.write_all(READY).await.expect("write");
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    // ...but not longer than the idle timeout.
    let answered = Instant::now();
    let took = closed_within(&mut kept, answered, Duration::from_secs(5)).await;
    assert!(
        took >= idle - Duration::from_millis(50),
        "idle connection closed after {took:?}, idle timeout {idle:?}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_cannot_lock_probes_out() {
    let cap = 16;
    // Header timeout far beyond the test: only the cap stands between slowloris and /ready.
    let (p, _m) = proxy_with(|a| {
        a.max_connections = cap;
        a.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let admin = p.admin;

    let mut held = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(admin).await.expect("connect");
        s.write_all(HALF).await.expect("write");
        held.push(s);
    }
    let attack = tokio::spawn(async move {
        // And keeps coming, a connection every 10 ms.
        let mut more = Vec::new();
        loop {
            if let Ok(mut s) = TcpStream::connect(admin).await {
                let _ = s.write_all(HALF).await;
                more.push(s);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    for i in 0..20 {
        let probe = async {
            let mut s = TcpStream::connect(admin).await.expect("connect");
            s.write_all(READY).await.expect("write");
            read_response(&mut s).await
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(1), probe)
            .await
            .unwrap_or_else(|_| panic!("probe {i}: no /ready within a second"));
        assert!(answer.starts_with("HTTP/1.1 200"), "probe {i}: {answer}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    attack.abort();
    let _ = attack.await;

    // The proxy holds at most `cap` of the slowloris connections.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut open = 0;
        for s in held.iter_mut() {
            open += usize::from(still_open(s).await);
        }
        if open <= cap {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} slowloris connections open, cap {cap}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = p.admin("/metrics").await;
    let evicted = metrics
        .lines()
        .find(|l| {
            l.starts_with("tidings_proxy_admin_connections_evicted_total")
                && l.contains("reason=\"oldest_idle\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(evicted.is_some_and(|n| n >= 84.0), "{metrics}");
    p.stop().await;
}
