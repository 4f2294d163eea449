//! What the agent's registry tests share: an in-process registry on a loopback socket that
//! can be killed, an in-process agent, and polling of its local API.

#![allow(dead_code)] // each test binary uses part of it

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::{AgentConfig, AgentError};
use discovery::{ManualClock, MemoryStore, Registry, RegistryClient, RegistryConfig};
use gossip::GossipConfig;
use schema::{Endpoint, ServiceName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const DEADLINE: Duration = Duration::from_secs(15);
pub const POLL: Duration = Duration::from_millis(20);

/// A registry with an in-memory store on its own runtime.
pub struct TestRegistry {
    rt: Option<tokio::runtime::Runtime>,
    pub addr: SocketAddr,
    pub registry: Registry,
    pub clock: Arc<ManualClock>,
}

impl TestRegistry {
    /// Listens on `addr` (port 0: any). Its store is empty, so it warms up for one
    /// check-in interval of its clock from `clock_ms` on.
    pub async fn start(addr: SocketAddr, clock_ms: u64) -> TestRegistry {
        Self::start_with(addr, clock_ms, RegistryConfig::default()).await
    }

    /// [`TestRegistry::start`] with `config`.
    pub async fn start_with(
        addr: SocketAddr,
        clock_ms: u64,
        config: RegistryConfig,
    ) -> TestRegistry {
        Self::start_on(addr, clock_ms, config, Arc::new(MemoryStore::new())).await
    }

    /// [`TestRegistry::start_with`] on `store`, which another registry may share (replicas of
    /// one table).
    pub async fn start_on(
        addr: SocketAddr,
        clock_ms: u64,
        config: RegistryConfig,
        store: Arc<MemoryStore>,
    ) -> TestRegistry {
        let clock = Arc::new(ManualClock::new(clock_ms));
        let registry = Registry::new(store, config, clock.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("registry runtime");
        // Bound within the registry's runtime, so shutting it down closes the listener. The
        // port of a registry just killed may take a moment to be released.
        let started = Instant::now();
        let listener = loop {
            let bound = {
                let _in = rt.enter();
                TcpSocket::new_v4().and_then(|s| {
                    s.set_reuseaddr(true)?;
                    s.bind(addr)?;
                    s.listen(128)
                })
            };
            match bound {
                Ok(l) => break l,
                Err(e) => {
                    assert!(started.elapsed() < DEADLINE, "cannot bind {addr}: {e}");
                    tokio::time::sleep(POLL).await;
                }
            }
        };
        let addr = listener.local_addr().expect("local addr");
        let app = discovery::router(registry.clone());
        rt.spawn(async move { axum::serve(listener, app).await });
        TestRegistry {
            rt: Some(rt),
            addr,
            registry,
            clock,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url(), None, Duration::from_secs(2)).expect("client")
    }

    /// The registry process dies: listener and connections close.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    pub fn blocking_queries(&self) -> f64 {
        let text = self.registry.render_metrics();
        text.lines()
            .find_map(|l| {
                l.strip_prefix("tidings_registry_blocking_queries ")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn ep(service: &str, ip: &str, port: u16) -> Endpoint {
    Endpoint::new(
        ServiceName::new(service).expect("name"),
        ip.parse().expect("ip"),
        NonZeroU16::new(port).expect("port"),
    )
}

pub fn config(registry: &TestRegistry, dir: &Path) -> AgentConfig {
    config_for(&registry.url(), dir)
}

/// [`config`] for a registry at `url`.
pub fn config_for(url: &str, dir: &Path) -> AgentConfig {
    AgentConfig {
        registry: Some(url.to_string()),
        data_dir: dir.to_path_buf(),
        // Short, so warming polls come every half second.
        check_in_interval: Duration::from_secs(2),
        request_timeout: Duration::from_secs(1),
        sync_retry_max: Duration::from_secs(1),
        deregister_on_shutdown: false,
        gossip: GossipConfig::for_tests("127.0.0.1:0".parse().expect("addr")),
        // A DNS port of its own: several agents run in one test.
        dns: agent::dns::DnsConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..Default::default()
        },
        xds: agent::xds::XdsConfig {
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            ..Default::default()
        },
        ..Default::default()
    }
}

pub struct RunningAgent {
    pub api: SocketAddr,
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    pub async fn start(config: AgentConfig) -> RunningAgent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("api listener");
        let api = listener.local_addr().expect("api addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(agent::run(config, listener, stop.clone()));
        RunningAgent { api, stop, task }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("joined").expect("agent ran");
    }
}

/// A plain HTTP/1.1 GET: the status line's code, the headers (lower-case names), the body.
pub async fn get_text(addr: SocketAddr, path: &str) -> (u16, BTreeMap<String, String>, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").expect("a full answer");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// [`get_text`] with a JSON body (`Null` when it is not JSON).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, BTreeMap<String, String>, Value) {
    let (status, headers, body) = get_text(addr, path).await;
    (
        status,
        headers,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

/// The `ip:port`s an agent lists for `service`, sorted, and the answer's source.
pub async fn listed(api: SocketAddr, service: &str) -> (Vec<String>, String) {
    let (status, headers, v) = get(api, &format!("/v1/registration/{service}")).await;
    assert_eq!(status, 200, "{v}");
    let mut hosts: Vec<String> = v["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| format!("{}:{}", h["ip_address"].as_str().unwrap_or("?"), h["port"]))
        .collect();
    hosts.sort();
    let source = headers
        .get(schema::wire::HEADER_SOURCE)
        .cloned()
        .unwrap_or_default();
    (hosts, source)
}

/// Polls until the agent lists exactly `want` for `service`; `check` sees every listing on
/// the way (to assert what must never happen meanwhile).
pub async fn wait_listed(api: SocketAddr, service: &str, want: &[&str], check: impl Fn(&[String])) {
    let started = Instant::now();
    loop {
        let (hosts, _) = listed(api, service).await;
        check(&hosts);
        if hosts == want {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{service}: still {hosts:?}, want {want:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}
