//! Loopback harness for the proxy's integration tests: small hyper backends, a fake
//! membership server with blocking-query semantics, the proxy itself, and polling helpers.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy::config::{ClusterConfig, HealthCheckKind, ListenerConfig, RouteConfig};
use proxy::{Proxy, ProxyConfig};
use schema::api::{V1Host, V1Listing};
use schema::{Endpoint, ServiceName, TagKey, TagValue};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod scripted;

pub const SERVICE: &str = "svc";

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Backend {
    pub id: usize,
    pub addr: SocketAddr,
    pub healthy: Arc<AtomicBool>,
    pub hits: Arc<AtomicU64>,
    pub slow_started: Arc<AtomicU64>,
    /// When set, every non-health-check request is answered with 503.
    pub failing: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Backend {
    /// `/healthcheck` answers 200 while healthy, 503 otherwise; `/slow` takes `slow`; every
    /// other path answers `backend-<id>` and echoes the request id it saw.
    pub async fn start(id: usize, slow: Duration) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let healthy = Arc::new(AtomicBool::new(true));
        let hits = Arc::new(AtomicU64::new(0));
        let slow_started = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let failing = Arc::new(AtomicBool::new(false));
        let (h, n, s, st, f) = (
            healthy.clone(),
            hits.clone(),
            slow_started.clone(),
            stop.clone(),
            failing.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (h, n, s, st, f) = (h.clone(), n.clone(), s.clone(), st.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (h, n, s, f) = (h.clone(), n.clone(), s.clone(), f.clone());
                        async move {
                            let resp = match req.uri().path() {
                                "/healthcheck" => {
                                    let code = if h.load(Ordering::SeqCst) {
                                        StatusCode::OK
                                    } else {
                                        StatusCode::SERVICE_UNAVAILABLE
                                    };
                                    Response::builder()
                                        .status(code)
                                        .body(Full::new(Bytes::from_static(b"hc")))
                                }
                                path => {
                                    if path == "/slow" {
                                        s.fetch_add(1, Ordering::SeqCst);
                                        tokio::time::sleep(slow).await;
                                    }
                                    n.fetch_add(1, Ordering::SeqCst);
                                    let rid = req.headers().get("x-request-id").cloned();
                                    let code = if f.load(Ordering::SeqCst) {
                                        StatusCode::SERVICE_UNAVAILABLE
                                    } else {
                                        StatusCode::OK
                                    };
                                    let mut b = Response::builder()
                                        .status(code)
                                        .header("x-backend", id.to_string());
                                    if let Some(rid) = rid {
                                        b = b.header("x-seen-request-id", rid);
                                    }
                                    b.body(Full::new(Bytes::from(format!("backend-{id}"))))
                                }
                            };
                            Ok::<_, Infallible>(resp.expect("response"))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        Backend {
            id,
            addr,
            healthy,
            hits,
            slow_started,
            failing,
            stop,
        }
    }

    pub fn kill(&self) {
        self.stop.cancel();
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A raw TCP upstream: answers every connection with `reply` (or nothing, if `None`) and
/// closes, or with `hold` keeps the connection open afterwards.
pub async fn raw_upstream(reply: Option<&'static [u8]>) -> SocketAddr {
    raw_upstream_with(reply, false).await
}

pub async fn raw_upstream_with(reply: Option<&'static [u8]>, hold: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind raw");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Some(r) = reply {
                    let mut buf = [0u8; 4096];
                    let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                    let _ = stream.write_all(r).await;
                    if hold {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    let _ = stream.shutdown().await;
                } else {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                drop(stream);
            });
        }
    });
    addr
}

/// One entry of the fake listing.
#[derive(Clone, Debug)]
pub struct Listed {
    pub addr: SocketAddr,
    pub draining: bool,
    pub zone: Option<&'static str>,
}

impl Listed {
    pub fn up(addr: SocketAddr) -> Self {
        Listed {
            addr,
            draining: false,
            zone: None,
        }
    }

    pub fn draining(addr: SocketAddr) -> Self {
        Listed {
            addr,
            draining: true,
            zone: None,
        }
    }

    pub fn in_zone(addr: SocketAddr, zone: &'static str) -> Self {
        Listed {
            addr,
            draining: false,
            zone: Some(zone),
        }
    }
}

fn v1_host(l: &Listed) -> V1Host {
    let port = NonZeroU16::new(l.addr.port()).expect("port");
    let mut ep = Endpoint::new(ServiceName::new(SERVICE).expect("name"), l.addr.ip(), port);
    if let Some(z) = l.zone {
        ep.tags.az = Some(TagValue::new(z).expect("zone"));
    }
    if l.draining {
        ep.tags.extra.insert(
            TagKey::new("draining").expect("key"),
            TagValue::new("true").expect("value"),
        );
    }
    V1Host::from_endpoint(&ep, 0)
}

/// Serves `GET /v2/services/svc?index=I&wait=..` like the agent: answers when the index
/// differs from `I`, or after at most one second (shorter than the agent's wait, so tests run fast).
pub struct Membership {
    pub addr: SocketAddr,
    index: tokio::sync::watch::Sender<u64>,
    hosts: Arc<Mutex<Vec<Listed>>>,
    pub queries: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Membership {
    pub async fn start(initial: Vec<Listed>) -> Membership {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind membership");
        let addr = listener.local_addr().expect("addr");
        let (index, _) = tokio::sync::watch::channel(1u64);
        let hosts = Arc::new(Mutex::new(initial));
        let queries = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (tx, hs, q, st) = (index.clone(), hosts.clone(), queries.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (tx, hs, q, st) = (tx.clone(), hs.clone(), q.clone(), st.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (tx, hs, q) = (tx.clone(), hs.clone(), q.clone());
                        async move {
                            q.fetch_add(1, Ordering::SeqCst);
                            let asked: u64 = req
                                .uri()
                                .query()
                                .and_then(|qs| {
                                    qs.split('&').find_map(|kv| kv.strip_prefix("index="))
                                })
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            let mut rx = tx.subscribe();
                            if *rx.borrow() == asked {
                                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed())
                                    .await;
                            }
                            let idx = *rx.borrow();
                            let listing = V1Listing {
                                service: SERVICE.into(),
                                env: "test".into(),
                                hosts: hs.lock().expect("lock").iter().map(v1_host).collect(),
                            };
                            let body = serde_json::to_vec(&listing).expect("json");
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("x-tidings-index", idx.to_string())
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("response"),
                            )
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        Membership {
            addr,
            index,
            hosts,
            queries,
            stop,
        }
    }

    pub fn set(&self, hosts: Vec<Listed>) {
        *self.hosts.lock().expect("lock") = hosts;
        self.index.send_modify(|i| *i += 1);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kill(&self) {
        self.stop.cancel();
    }
}

/// A config with one listener, one catch-all route and one cluster watching `membership_url`,
/// health-checking every 100 ms.
pub fn config(membership_url: &str) -> ProxyConfig {
    let mut cluster = ClusterConfig {
        name: "c".into(),
        service: SERVICE.into(),
        membership_url: membership_url.into(),
        ..ClusterConfig::default()
    };
    cluster.health_check.interval = Duration::from_millis(100);
    cluster.health_check.timeout = Duration::from_millis(500);
    cluster.connect_timeout = Duration::from_secs(1);
    let mut cfg = ProxyConfig {
        listeners: vec![ListenerConfig {
            address: "127.0.0.1:0".parse().expect("addr"),
            ..ListenerConfig::default()
        }],
        routes: vec![RouteConfig {
            cluster: "c".into(),
            timeout: Duration::from_secs(5),
            ..RouteConfig::default()
        }],
        clusters: vec![cluster],
        drain_timeout: Duration::from_secs(2),
        ..ProxyConfig::default()
    };
    cfg.admin.address = "127.0.0.1:0".parse().expect("addr");
    cfg
}

pub fn without_health_checks(mut cfg: ProxyConfig, kind: HealthCheckKind) -> ProxyConfig {
    cfg.clusters[0].health_check.kind = kind;
    cfg
}

pub struct Running {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), proxy::ProxyError>>,
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub handle: proxy::ProxyHandle,
}

pub async fn start(cfg: ProxyConfig) -> Running {
    let p = Proxy::bind(cfg).await.expect("bind proxy");
    let (addr, admin) = (p.listen_addrs[0], p.admin_addr);
    let shutdown = CancellationToken::new();
    let handle = p.handle();
    let task = tokio::spawn(p.run(shutdown.clone()));
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    Running {
        addr,
        admin,
        shutdown,
        task,
        client,
        handle,
    }
}

/// Two backends listed by a membership server and a proxy (the default test config) that
/// routes to both.
/// A proxy routing to `backend` alone (no health checks), once it routes there.
pub async fn routed_to(backend: SocketAddr) -> (Running, Membership) {
    let m = Membership::start(vec![Listed::up(backend)]).await;
    let p = start(without_health_checks(
        config(&m.url()),
        HealthCheckKind::None,
    ))
    .await;
    p.wait_routed(&[backend]).await;
    (p, m)
}

pub async fn two_routed() -> (Backend, Backend, Membership, Running) {
    let (a, b) = (
        Backend::start(1, Duration::ZERO).await,
        Backend::start(2, Duration::ZERO).await,
    );
    let m = Membership::start(vec![Listed::up(a.addr), Listed::up(b.addr)]).await;
    let p = start(config(&m.url())).await;
    p.wait_routed(&[a.addr, b.addr]).await;
    (a, b, m, p)
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Running {
    pub async fn get(&self, path: &str) -> Reply {
        self.send(
            Request::get(format!("http://{}{path}", self.addr))
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let resp = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .expect("no answer in 20 s")
            .expect("request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    pub async fn admin(&self, path: &str) -> (StatusCode, String) {
        let req = Request::get(format!("http://{}{path}", self.admin))
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = self.client.request(req).await.expect("admin request");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The `/clusters` entry of host `addr`, if the proxy knows it.
    pub async fn host(&self, addr: SocketAddr) -> Option<serde_json::Value> {
        let (_, body) = self.admin("/clusters").await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["clusters"][0]["hosts"]
            .as_array()?
            .iter()
            .find(|h| h["address"] == addr.to_string())
            .cloned()
    }

    pub async fn decision(&self, addr: SocketAddr) -> Option<String> {
        self.host(addr)
            .await
            .and_then(|h| h["decision"].as_str().map(str::to_string))
    }

    pub async fn wait_routed(&self, addrs: &[SocketAddr]) {
        for &a in addrs {
            eventually(
                Duration::from_secs(5),
                &format!("{a} routed"),
                || async move { self.decision(a).await.as_deref() == Some("route") },
            )
            .await;
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("proxy stops in time")
            .expect("join");
        r.expect("proxy ran cleanly");
    }
}
