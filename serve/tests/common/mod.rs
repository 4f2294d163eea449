//! Helpers for the listener tests: a server on a loopback port with a few routes, and raw
//! HTTP/1.1 clients that can misbehave on purpose.

#![allow(dead_code)] // each test file uses a different subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const BIG: usize = 32 * 1024 * 1024;
pub const HALF_HEAD: &[u8] = b"GET /live HTTP/1.1\r\nHost: test\r\nUser-Agent: slow";

pub struct Server {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<std::io::Result<()>>,
    pub metrics: PrometheusHandle,
    /// `/hold` waits for a permit here.
    pub release: Arc<Semaphore>,
    /// `/hold` sends here once it is running.
    pub held: mpsc::UnboundedReceiver<()>,
}

impl Server {
    /// The value of a rendered metric line starting with `prefix`, 0 if absent.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

pub async fn start(limits: serve::Limits) -> Server {
    start_with_drain(limits, Duration::from_secs(5)).await
}

pub async fn start_with_drain(limits: serve::Limits, drain: Duration) -> Server {
    start_full(limits, drain, None).await
}

/// The same server behind TLS.
pub async fn start_tls(limits: serve::Limits, tls: Arc<serve::ServerTls>) -> Server {
    start_full(limits, Duration::from_secs(5), Some(tls)).await
}

async fn start_full(
    limits: serve::Limits,
    drain: Duration,
    tls: Option<Arc<serve::ServerTls>>,
) -> Server {
    let release = Arc::new(Semaphore::new(0));
    let (held_tx, held) = mpsc::unbounded_channel();
    let app = {
        let release = release.clone();
        Router::new()
            .route("/live", get(|| async { "live\n" }))
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            )
            .route("/big", get(|| async { vec![b'x'; BIG] }))
            .route(
                "/hold",
                get(move || {
                    let release = release.clone();
                    let held_tx = held_tx.clone();
                    async move {
                        let _ = held_tx.send(());
                        match release.acquire().await {
                            Ok(permit) => permit.forget(),
                            Err(_) => return "closed\n",
                        }
                        "released\n"
                    }
                }),
            )
    };
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let conn_metrics = serve::ConnMetrics::register(&recorder, "test");
    let listener = serve::bind(([127, 0, 0, 1], 0).into()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let options = serve::Options {
        component: "test",
        limits,
        metrics: conn_metrics,
        drain,
        tls,
    };
    let stop = shutdown.clone();
    let task = tokio::spawn(serve::http(listener, app, options, stop.cancelled_owned()));
    Server {
        addr,
        shutdown,
        task,
        metrics,
        release,
        held,
    }
}

/// Fresh connection, one `GET` with `Connection: close`; the whole answer, or why not.
pub async fn get_once(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .await
        .map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `GET /live` on a fresh connection must answer 200 within `within`.
pub async fn live_within(addr: SocketAddr, within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    match tokio::time::timeout(within, get_once(addr, "/live")).await {
        Ok(Ok(resp)) if resp.starts_with("HTTP/1.1 200") => Ok(t0.elapsed()),
        Ok(Ok(resp)) => Err(format!("unexpected answer {resp:?}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// As [`live_within`], but a failed `connect` is tried again within the same time: under a
/// flood of thousands of connects a second over loopback the kernel now and then resets a
/// SYN before the server ever sees the connection (nothing the server decides). A
/// connection the server accepted and then dropped still fails.
pub async fn live_within_retrying_connect(
    addr: SocketAddr,
    within: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let attempt = async {
        loop {
            match get_once(addr, "/live").await {
                Err(e) if e.starts_with("connect:") => continue,
                other => return other,
            }
        }
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(Ok(resp)) if resp.starts_with("HTTP/1.1 200") => Ok(t0.elapsed()),
        Ok(Ok(resp)) => Err(format!("unexpected answer {resp:?}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// Waits until the peer closes `s` (EOF or reset), at most `within`; returns how long it took.
/// Bytes the server sends first (a 503) are skipped.
pub async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    let deadline = t0 + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// A kept-alive HTTP/1.1 connection that reads answers by `Content-Length`.
pub struct KeepAlive {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> Self {
        KeepAlive {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    /// Sends `GET path` and reads the answer: (status line, body).
    pub async fn get(&mut self, path: &str) -> Result<(String, String), String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        self.stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let fut = self.read_answer();
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .map_err(|_| "no answer within 5s".to_string())?
    }

    async fn read_answer(&mut self) -> Result<(String, String), String> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| format!("no content-length in {head:?}"))?;
        while self.buf.len() < head_end + len {
            self.fill().await?;
        }
        let body = String::from_utf8_lossy(&self.buf[head_end..head_end + len]).into_owned();
        self.buf.drain(..head_end + len);
        let status = head.lines().next().unwrap_or_default().to_string();
        Ok((status, body))
    }

    async fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Err("closed".to_string()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

/// Limits with short timeouts for tests.
pub fn limits(max_connections: usize) -> serve::Limits {
    serve::Limits {
        max_connections,
        header_read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
        write_timeout: Duration::from_secs(30),
        max_header_bytes: 16 * 1024,
    }
}
