//! The Tidings proxy (docs/ARCHITECTURE.md#proxy): a sidecar or edge HTTP proxy that watches the agent for
//! each upstream service, health-checks the hosts itself, and load-balances over the ones the
//! *health checks win* table lets through.
//!
//! Listeners are HTTP (routed per request) or TCP (`protocol = "tcp"`: every connection to one
//! cluster, through the same balancer, health, outlier and breaker state).
//!
//! Layout (the folders say which is which):
//! - `core/`: sans-IO cores, pure and tested without sockets: [`health`] (active check state
//!   machine), [`merge`] (discovery × health → route/hold/drain/remove, panic threshold),
//!   [`outlier`] (passive ejection), [`lb`] (round robin, least request, random, ring hash,
//!   Maglev, zone-aware routing), [`retry`] (policy, back-off, budget), [`breaker`] (circuit
//!   breakers) and `policy` (the request policy's pure parts: local answers, attempt
//!   classification, the retry decision).
//! - `io/`: the IO shells: `server` (listeners), two request paths — [`forward`] (hyper) and
//!   `h1` (the HTTP/1.1 fast path) — that run one attempt loop (`attempts`), which the TCP
//!   listeners (`tcp`) use to connect too, `upstream`
//!   (dialling, pool), `checker` (health-check tasks), [`membership`] (blocking-query watch),
//!   `admin` (with its web dashboard, `admin_ui`), [`tls`].
//! - At the top: [`config`], [`cluster`] (the runtime state the shells share, where the cores'
//!   answers are applied) and [`telemetry`].
//!
//! The modules keep their `proxy::<name>` paths (re-exported here) whichever folder they are in.
//!
//! Entry points: [`run`] for the binary, or [`Proxy::bind`] then [`Proxy::run`] for callers
//! that need the bound addresses (tests bind port 0); [`Proxy::handle`] gives an in-process
//! view ([`ProxyHandle`]) of what the admin listener serves.
//!
//! Observability: one `tracing` event per request on target `tidings_proxy::access` (fields
//! `request_id`, `method`, `host`, `path`, `status`, `cluster`, `upstream`, `attempts`,
//! `flag`, `duration_ms`; JSON when the subscriber formats JSON); Prometheus metrics named
//! `tidings_proxy_<thing>_<unit>` with `cluster` and `host` labels (see [`telemetry`]).
//!
//! Discovery statuses: a host listed by the membership source is `Present`; one no longer
//! listed is `Absent`; one listed with the free-form tag `draining = "true"` is `Drained`
//! (an explicit deregistration: no new requests, in-flight ones finish, then it goes).
//!
//! Invariants: nothing from outside the process can make the proxy panic; on any membership
//! error a cluster keeps its last set of hosts (fail static); a host that keeps passing its
//! health checks keeps receiving traffic even when discovery forgets it.

pub mod cluster;
pub mod config;
mod core;
mod io;
pub mod telemetry;

// The public paths other crates and `proxy/tests` use, whichever folder the module is in.
pub use self::core::{breaker, health, lb, merge, outlier, retry};
pub use self::io::{forward, membership, tls};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ProxyConfig;

use crate::cluster::Cluster;
use crate::config::ListenerConfig;
use crate::core::breaker::CircuitBreaker;
use crate::io::forward::Route;
use crate::io::upstream::{Connector, Upstream};
use crate::io::{admin, server, tcp};

/// How long an upstream connection may sit idle before the proxy closes it: above common
/// backend keep-alive timeouts is harmless (a request that finds its pooled connection closed
/// before sending goes out on another), so this only bounds idle sockets.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by every listener and the admin server.
pub(crate) struct Shared {
    pub config: ProxyConfig,
    pub routes: Vec<Route>,
    pub clusters: Vec<Arc<Cluster>>,
    pub draining: AtomicBool,
}

/// What a listener serves.
enum Served {
    /// HTTP over its routes, with TLS when it has an acceptor.
    Http(Option<TlsAcceptor>),
    /// Every connection to this cluster.
    Tcp(Arc<Cluster>),
}

/// A proxy whose sockets are bound but which serves nothing until [`Proxy::run`].
pub struct Proxy {
    /// The traffic listeners' addresses, in config order.
    pub listen_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    listeners: Vec<(TcpListener, ListenerConfig, Served)>,
    admin: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    background: CancellationToken,
}

async fn bind_addr(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { addr, source })
}

fn local_addr(l: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, ProxyError> {
    l.local_addr()
        .map_err(|source| ProxyError::Bind { addr, source })
}

/// One cluster with its breaker and its two pools: traffic (counted against the breaker) and
/// health checks (outside it).
fn build_cluster(
    c: &config::ClusterConfig,
    config: &ProxyConfig,
    tracker: &TaskTracker,
    background: &CancellationToken,
) -> Result<Arc<Cluster>, ProxyError> {
    let tls = match &c.tls {
        Some(t) => {
            let name = ServerName::try_from(t.server_name.clone())
                .map_err(|e| ProxyError::Config(e.to_string()))?;
            Some((tls::client_config(t, c.http2)?, name))
        }
        None => None,
    };
    let breaker = CircuitBreaker::new(c.circuit_breakers);
    let traffic = Upstream::new(
        Connector::new(c.connect_timeout, tls.clone(), Some(breaker.clone())),
        c.http2,
        UPSTREAM_IDLE_TIMEOUT,
        // Idle connections hold breaker slots too, so the limit bounds them anyway.
        c.circuit_breakers.max_connections as usize,
    );
    // A checker sends one request at a time: it never needs a second connection.
    let checks = Upstream::new(
        Connector::new(c.connect_timeout, tls, None),
        c.http2,
        UPSTREAM_IDLE_TIMEOUT,
        1,
    );
    Ok(Cluster::new(
        c.clone(),
        config.zone.clone(),
        breaker,
        traffic,
        checks,
        tracker.clone(),
        background.child_token(),
    ))
}

impl Proxy {
    /// Validates the config, loads TLS material and binds every socket. Nothing is spawned yet.
    pub async fn bind(config: ProxyConfig) -> Result<Proxy, ProxyError> {
        config.validate()?;
        // Install the recorder before any metric is recorded, so none is lost.
        let _ = telemetry::prometheus_handle();
        let tracker = TaskTracker::new();
        let background = CancellationToken::new();
        let clusters = config
            .clusters
            .iter()
            .map(|c| build_cluster(c, &config, &tracker, &background))
            .collect::<Result<Vec<_>, _>>()?;
        let routes = config
            .routes
            .iter()
            .filter_map(|r| {
                let cluster = clusters.iter().find(|c| c.name() == r.cluster)?.clone();
                Some(Route {
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    cluster,
                    timeout: r.timeout,
                })
            })
            .collect();
        let mut listeners = Vec::new();
        let mut listen_addrs = Vec::new();
        for l in &config.listeners {
            let served = match (&l.tls, &l.cluster) {
                // `validate` made sure a TCP listener's cluster exists.
                (_, Some(name)) if l.is_tcp() => match clusters.iter().find(|c| c.name() == name) {
                    Some(c) => Served::Tcp(c.clone()),
                    None => return Err(ProxyError::Config(format!("unknown cluster {name:?}"))),
                },
                (Some(t), _) => Served::Http(Some(TlsAcceptor::from(tls::server_config(t)?))),
                (None, _) => Served::Http(None),
            };
            let socket = bind_addr(l.address).await?;
            listen_addrs.push(local_addr(&socket, l.address)?);
            listeners.push((socket, l.clone(), served));
        }
        let admin = bind_addr(config.admin.address).await?;
        let admin_addr = local_addr(&admin, config.admin.address)?;
        let shared = Arc::new(Shared {
            config,
            routes,
            clusters,
            draining: AtomicBool::new(false),
        });
        Ok(Proxy {
            listen_addrs,
            admin_addr,
            listeners,
            admin,
            shared,
            tracker,
            background,
        })
    }

    /// A view of this proxy that stays valid after [`Proxy::run`] takes it.
    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` is cancelled, then fails readiness, stops accepting, lets
    /// in-flight requests finish within the drain timeout and stops the background tasks.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ProxyError> {
        let Proxy {
            listen_addrs,
            admin_addr,
            listeners,
            admin,
            shared,
            tracker,
            background,
        } = self;
        let drain = shared.config.drain_timeout;
        let watch_clients = watch_clients(&shared.clusters)?;
        for (cluster, watch_client) in shared.clusters.iter().zip(watch_clients) {
            tracker.spawn(membership::watch(
                cluster.clone(),
                watch_client,
                background.clone(),
            ));
            tracker.spawn(maintain(cluster.clone(), background.clone()));
        }
        let traffic = CancellationToken::new();
        let servers = TaskTracker::new();
        for ((socket, cfg, served), addr) in listeners.into_iter().zip(&listen_addrs) {
            match served {
                Served::Http(acceptor) => {
                    tracing::debug!(%addr, tls = acceptor.is_some(), "serving listener");
                    servers.spawn(server::serve(
                        socket,
                        cfg,
                        acceptor,
                        shared.clone(),
                        traffic.clone(),
                        drain,
                    ));
                }
                Served::Tcp(cluster) => {
                    tracing::debug!(%addr, cluster = %cluster.name(), "serving tcp listener");
                    let idle = cfg.tcp_idle_timeout();
                    servers.spawn(tcp::serve(socket, cluster, idle, traffic.clone(), drain));
                }
            }
        }
        tracing::debug!(addr = %admin_addr, "serving admin");
        let admin_stop = CancellationToken::new();
        servers.spawn(admin::serve(admin, shared.clone(), admin_stop.clone()));
        servers.close();

        shutdown.cancelled().await;
        tracing::info!(?drain, "shutting down: failing readiness, draining");
        shared.draining.store(true, Ordering::Release);
        traffic.cancel();
        // Listeners drain within `drain`; the admin listener stays up meanwhile so that
        // operators can watch the drain, then goes too.
        let _ = tokio::time::timeout(drain + Duration::from_secs(1), async {
            while servers.len() > 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        admin_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), servers.wait()).await;
        background.cancel();
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        tracing::info!("proxy stopped");
        Ok(())
    }
}

/// One watch client per (scheme, CA file), in cluster order: clusters watching the same source
/// share its pooled connections, and the system's CAs are loaded once at most. All are built
/// before any task starts, so a bad CA file fails the start cleanly.
fn watch_clients(clusters: &[Arc<Cluster>]) -> Result<Vec<membership::WatchClient>, ProxyError> {
    let mut by_source = std::collections::HashMap::new();
    let mut watch_clients = Vec::with_capacity(clusters.len());
    for cluster in clusters {
        let scheme = cluster.config.membership_scheme().map_err(|e| {
            ProxyError::Config(format!("cluster {}: membership_url: {e}", cluster.name()))
        })?;
        let ca = cluster.config.membership_ca_file.clone();
        let client = match by_source.get(&(scheme, ca.clone())) {
            Some(c) => membership::WatchClient::clone(c),
            None => {
                let c = membership::watch_client(scheme, ca.as_deref()).map_err(|err| {
                    ProxyError::Tls(format!("cluster {}: membership: {err}", cluster.name()))
                })?;
                by_source.insert((scheme, ca), c.clone());
                c
            }
        };
        watch_clients.push(client);
    }
    Ok(watch_clients)
}

/// A cheap, cloneable view of a running proxy, for in-process callers (the demo's live view,
/// tests) that want what `/clusters` and `/ready` say without going through HTTP.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// Every cluster with every host: discovery status, health, weight, zone, active
    /// requests, ejections.
    pub fn clusters(&self) -> Vec<cluster::ClusterSnapshot> {
        self.shared.clusters.iter().map(|c| c.snapshot()).collect()
    }

    /// What `/ready` answers: every cluster has heard from its membership source and the
    /// proxy is not draining.
    pub fn is_ready(&self) -> bool {
        !self.shared.draining.load(Ordering::Acquire)
            && self
                .shared
                .clusters
                .iter()
                .all(|c| c.membership_initialized())
    }
}

/// Binds and serves `config` until `shutdown` is cancelled.
pub async fn run(config: ProxyConfig, shutdown: CancellationToken) -> Result<(), ProxyError> {
    Proxy::bind(config).await?.run(shutdown).await
}

/// Per-cluster upkeep: drained hosts leave once idle (checked every second), outlier
/// multipliers decay once per outlier interval, and the metrics recorder is drained every second.
async fn maintain(cluster: Arc<Cluster>, stop: CancellationToken) {
    let sweep_every = cluster.config.outlier_detection.interval;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = tokio::time::Instant::now();
    let mut last_tick = last_sweep;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if last_tick.elapsed() >= telemetry::GAUGE_IDLE_TIMEOUT / 2 {
            // Stopped or starved for a while: the exporter may have dropped live gauges.
            cluster.reregister_gauges();
        }
        last_tick = tokio::time::Instant::now();
        let sweep = last_sweep.elapsed() >= sweep_every;
        if sweep {
            last_sweep = tokio::time::Instant::now();
        }
        // Histogram samples pile up in the recorder until upkeep drains them: at tens of
        // thousands of requests a second, draining every second keeps that to a few hundred KB.
        if let Some(h) = telemetry::prometheus_handle() {
            h.run_upkeep();
        }
        cluster.maintain(sweep);
    }
}
