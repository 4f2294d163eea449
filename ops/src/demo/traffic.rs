//! The demo's clients: application traffic through the proxy and lookups against every
//! agent, both at a fixed, bounded rate, counted separately for the time the registry is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::sync::Mutex;
use tokio_util::sync::CancellationToken;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// GET `url` (optionally with a Host header); returns status, headers and body, or an error
/// string. Bounded by `timeout`.
pub async fn get(
    client: &HttpClient,
    url: &str,
    host: Option<&str>,
    timeout: Duration,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let mut req = Request::get(url);
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status.as_u16(), parts.headers, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub errors_while_registry_down: u64,
    pub requests_while_registry_down: u64,
    pub lookups: u64,
    pub lookups_failed: u64,
    pub lookups_while_registry_down: u64,
    pub lookups_served_while_registry_down: u64,
    pub latencies_us: Vec<u32>,
    /// Requests and errors in the current second, for the live view.
    pub window_requests: u64,
    pub window_errors: u64,
    pub last_error: Option<String>,
}

#[derive(Default)]
pub struct Stats {
    pub registry_down: AtomicBool,
    pub counts: Mutex<Counts>,
}

impl Stats {
    fn record_request(&self, ok: Result<Duration, String>) {
        let down = self.registry_down.load(Ordering::Relaxed);
        let Ok(mut c) = self.counts.lock() else {
            return;
        };
        c.requests += 1;
        c.window_requests += 1;
        c.requests_while_registry_down += u64::from(down);
        match ok {
            Ok(lat) => c
                .latencies_us
                .push(u32::try_from(lat.as_micros()).unwrap_or(u32::MAX)),
            Err(e) => {
                c.errors += 1;
                c.window_errors += 1;
                c.errors_while_registry_down += u64::from(down);
                c.last_error = Some(e);
            }
        }
    }

    fn record_lookup(&self, served: bool) {
        let down = self.registry_down.load(Ordering::Relaxed);
        let Ok(mut c) = self.counts.lock() else {
            return;
        };
        c.lookups += 1;
        c.lookups_failed += u64::from(!served);
        c.lookups_while_registry_down += u64::from(down);
        c.lookups_served_while_registry_down += u64::from(down && served);
    }

    /// Takes the per-second window counters (for the live view).
    pub fn take_window(&self) -> (u64, u64) {
        self.counts
            .lock()
            .map(|mut c| {
                (
                    std::mem::take(&mut c.window_requests),
                    std::mem::take(&mut c.window_errors),
                )
            })
            .unwrap_or_default()
    }
}

/// Sends `rate` GETs per second through the proxy, alternating between `services` (by Host
/// header), until `stop` or `deadline`. At most `rate × seconds` requests in all.
pub async fn drive(
    proxy: String,
    services: Vec<String>,
    rate: u32,
    deadline: Instant,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let client = client();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    let mut inflight = tokio::task::JoinSet::new();
    for n in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        if Instant::now() >= deadline {
            break;
        }
        let svc = services[(n as usize) % services.len().max(1)].clone();
        let (client, url, stats) = (client.clone(), format!("http://{proxy}/"), stats.clone());
        inflight.spawn(async move {
            let t = Instant::now();
            let res = match get(&client, &url, Some(&svc), Duration::from_secs(15)).await {
                Ok((200, _, _)) => Ok(t.elapsed()),
                Ok((status, _, body)) => Err(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                )),
                Err(e) => Err(e),
            };
            stats.record_request(res);
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

/// Looks up every service on every agent four times a second; a lookup is served when the
/// agent answers 200 with at least one host.
pub async fn lookups(
    agents: Vec<String>,
    services: Vec<String>,
    deadline: Instant,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let client = client();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while Instant::now() < deadline && !stop.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        for agent in &agents {
            for svc in &services {
                let url = format!("http://{agent}/v1/registration/{svc}");
                let served = match get(&client, &url, None, Duration::from_secs(2)).await {
                    Ok((200, _, body)) => serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| {
                            v.get("hosts")
                                .and_then(|h| h.as_array())
                                .map(|h| !h.is_empty())
                        })
                        .unwrap_or(false),
                    _ => false,
                };
                stats.record_lookup(served);
            }
        }
    }
}
