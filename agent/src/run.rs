//! `run`: the agent's tasks wired together, from start (disk cache first, so the API answers
//! at once) to shutdown (readiness fails, optional deregistration, final cache write).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gossip::{GossipHandle, GossipView};
use schema::timefmt::unix_ms_now;
use schema::{EndpointKey, ServiceName};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{self, CacheFile};
use crate::checkin::{deregister_all, run_checkin};
use crate::config::{AGENT_SERVICE, AgentConfig, ConfigError};
use crate::state::{LocalEndpoints, Shared};
use crate::sync::run_sync;
use crate::view::{CachedHost, MergedView, Merger};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot use the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gossip: {0}")]
    Gossip(#[from] gossip::RuntimeError),
    #[error("gossip signing: {0}")]
    Signing(#[from] gossip::owner_key::OwnerKeyError),
    #[error("local API: {0}")]
    Serve(std::io::Error),
    #[error("cannot listen for DNS on {addr}: {source}")]
    Dns {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("xDS listener: {0}")]
    Xds(std::io::Error),
    #[error("local API TLS: {0}")]
    Tls(#[from] serve::TlsError),
    #[error("cannot read the operator token file {path}: {source}")]
    OperatorToken {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long a start waits for the registry's agent listing when it has no other seeds.
const SEED_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// After publishing tombstones on shutdown, time for them to leave before gossip stops.
const TOMBSTONE_FLUSH: Duration = Duration::from_millis(300);
const GOSSIP_STOP_TIMEOUT: Duration = Duration::from_secs(3);
const API_DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the agent until `shutdown` fires. The caller binds the local API's listener (and
/// logs its address), so tests can use port 0.
pub async fn run(
    mut config: AgentConfig,
    api: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    config.validate()?;
    let api_limits = config.api_limits().map_err(ConfigError::from)?;
    // From the configured API address: a test's port 0 gives the xDS listener port 0 too.
    let xds = crate::xds::bind(&config).await.map_err(AgentError::Xds)?;
    // The address actually bound (the configured one may name port 0): the API's Host check
    // accepts it.
    if let Ok(bound) = api.local_addr() {
        config.api = bound;
    }
    read_operator_token(&mut config)?;
    let client = config.client()?;
    // Loaded before anything starts: the API must not come up without its certificate.
    let api_tls = match &config.tls {
        Some(files) => Some(std::sync::Arc::new(files.load()?)),
        None => None,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AgentError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let (cached, cache_failed) = load_cache(&config);
    let dns = bind_dns(&config.dns).await?;

    let gcfg = gossip_config(&config, &cached, &client).await?;
    let gossip_stop = CancellationToken::new();
    let gossip = start_gossip(&config, gcfg, gossip_stop.clone()).await?;
    let gossip_addr = gossip.id().addr;

    let host_ip: IpAddr = config.host_ip.unwrap_or(gossip_addr.ip());
    let local = LocalEndpoints {
        configured: config.endpoints(host_ip)?,
        runtime: cached
            .runtime
            .iter()
            .map(|e| (e.key(), e.clone()))
            .collect(),
        agent: config.agent_endpoint(gossip_addr),
    };
    // Before the first endpoints are published, so every row this process writes is signed.
    let signing = if config.gossip.signing == gossip::sign::SigningMode::Off {
        None
    } else {
        Some(crate::signing::Signing::start(config.data_dir.clone(), &gossip).await?)
    };
    let (merger, first) = first_view(&config, &gossip, cached.hosts);
    let (view_tx, view_rx) = watch::channel(Arc::new(first));
    let draining = CancellationToken::new();
    let shared = Arc::new(Shared::new(
        config,
        client,
        gossip.clone(),
        host_ip,
        view_rx,
        local,
        cached.last_sync_ms,
        draining.clone(),
    ));
    if let Some(s) = signing {
        let _ = shared.signing.set(s);
    }
    if cache_failed {
        shared.metrics.cache_load_errors.increment(1);
    }
    shared.local_changed().await;

    let loops = Loops::spawn(&shared, merger, &gossip, view_tx);
    let api = ApiServer::spawn(api, &shared, api_limits, api_tls);
    let dns_stop = CancellationToken::new();
    let dns = dns.map(|bound| {
        // Logged once gossip is up, after the lines callers wait for at start.
        if let Ok(addr) = bound.local_addr() {
            tracing::info!(%addr, "dns listening");
        }
        let config = shared.config.dns.clone();
        tokio::spawn(crate::dns::serve(
            bound,
            shared.clone(),
            config,
            dns_stop.clone(),
        ))
    });
    let xds = xds.map(|l| crate::xds::spawn(l, &shared));
    shutdown.cancelled().await;
    let running = Running {
        shared,
        gossip,
        gossip_stop,
        draining,
        loops,
        api,
        xds,
    };
    let result = running.shut_down().await;
    // Last, with the API: local resolvers keep answers from the last view until then.
    dns_stop.cancel();
    if let Some(dns) = dns {
        let _ = tokio::time::timeout(API_DRAIN_TIMEOUT, dns).await;
    }
    result
}

/// Binds the DNS sockets when DNS is on, and logs where.
async fn bind_dns(config: &crate::dns::DnsConfig) -> Result<Option<crate::dns::Bound>, AgentError> {
    if !config.enabled {
        return Ok(None);
    }
    let addr = config.listen;
    let bound = crate::dns::bind(addr)
        .await
        .map_err(|source| AgentError::Dns { addr, source })?;
    Ok(Some(bound))
}

/// Reads the operator token from its file when the config names only the file.
fn read_operator_token(config: &mut AgentConfig) -> Result<(), AgentError> {
    if let (None, Some(path)) = (&config.operator_token, &config.operator_token_file) {
        let token = std::fs::read_to_string(path).map_err(|source| AgentError::OperatorToken {
            path: path.clone(),
            source,
        })?;
        config.operator_token = Some(token.trim().to_string()).filter(|t| !t.is_empty());
    }
    Ok(())
}

/// Gossip's settings for this start: the configured seeds, else the disk cache's agents,
/// else the registry's; and the address to advertise when bound to a wildcard address.
async fn gossip_config(
    config: &AgentConfig,
    cached: &CacheFile,
    client: &discovery::RegistryClient,
) -> Result<gossip::GossipConfig, AgentError> {
    let mut gcfg = config.gossip.clone();
    if gcfg.seeds.is_empty() {
        gcfg.seeds = seeds_from_cache(cached, gcfg.bind);
    }
    if gcfg.advertise.is_none() && gcfg.bind.ip().is_unspecified() {
        match (config.host_ip, gcfg.bind.port()) {
            (Some(ip), port) if port != 0 => gcfg.advertise = Some(SocketAddr::new(ip, port)),
            _ => return Err(ConfigError::NoHostIp(gcfg.bind).into()),
        }
    }
    if gcfg.seeds.is_empty() {
        // Known before binding unless the port is 0 (tests).
        let planned = gcfg.advertise.unwrap_or(gcfg.bind);
        let me = (planned.port() != 0)
            .then(|| config.agent_endpoint(planned))
            .flatten();
        gcfg.seeds = seeds_from_registry(client, me).await;
    }
    Ok(gcfg)
}

/// Starts gossip under an epoch newer than any earlier start's.
async fn start_gossip(
    config: &AgentConfig,
    gcfg: gossip::GossipConfig,
    stop: CancellationToken,
) -> Result<GossipHandle, AgentError> {
    // The epoch must grow across restarts even if the clock stepped back: peers ignore an
    // identity or rows with an older epoch than they have seen.
    let epoch = gossip::epoch::next_epoch(&config.data_dir, unix_ms_now()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "a restart with the clock stepped back may be ignored by peers");
        e.epoch()
    });
    let gossip = gossip::run_with_epoch(gcfg.clone(), epoch, Vec::new(), stop).await?;
    tracing::info!(addr = %gossip.id().addr, seeds = ?gcfg.seeds, "gossip listening");
    Ok(gossip)
}

/// The merger, holding the disk cache's hosts until live data covers them, and the first
/// view it serves.
fn first_view(
    config: &AgentConfig,
    gossip: &GossipHandle,
    cached: Vec<CachedHost>,
) -> (Merger, MergedView) {
    let settle_ms = u64::try_from(config.cache_settle.as_millis()).unwrap_or(u64::MAX);
    let mut merger = Merger::new(gossip.id().addr, settle_ms, cached);
    let first = merger.merge(&gossip.view().borrow(), unix_ms_now());
    tracing::info!(
        hosts = first.len(),
        from_cache = merger.cache_len(),
        "serving the view"
    );
    (merger, first)
}

/// The agent's background loops (view, sync, check-in, cache writer) and their stop tokens.
struct Loops {
    tracker: TaskTracker,
    /// Stops sync and check-in.
    loops: CancellationToken,
    view_stop: CancellationToken,
    writer_stop: CancellationToken,
    writer: JoinHandle<()>,
}

impl Loops {
    /// Spawns the loops.
    fn spawn(
        shared: &Arc<Shared>,
        merger: Merger,
        gossip: &GossipHandle,
        view_tx: watch::Sender<Arc<MergedView>>,
    ) -> Loops {
        let tracker = TaskTracker::new();
        let loops = CancellationToken::new();
        let view_stop = CancellationToken::new();
        let listed = shared.registry_listed.subscribe();
        tracker.spawn(run_view(
            merger,
            gossip.clone(),
            listed,
            view_tx,
            view_stop.clone(),
        ));
        tracker.spawn(run_sync(shared.clone(), loops.clone()));
        tracker.spawn(run_checkin(shared.clone(), loops.clone()));
        let writer_stop = CancellationToken::new();
        let writer = tokio::spawn(cache::run_writer(shared.clone(), writer_stop.clone()));
        Loops {
            tracker,
            loops,
            view_stop,
            writer_stop,
            writer,
        }
    }
}

/// The local API's server task and its stop token.
struct ApiServer {
    stop: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
}

impl ApiServer {
    /// Serves the local API on `api`.
    fn spawn(
        api: TcpListener,
        shared: &Arc<Shared>,
        limits: serve::Limits,
        tls: Option<Arc<serve::ServerTls>>,
    ) -> ApiServer {
        let api_stop = CancellationToken::new();
        let server = {
            let stop = api_stop.clone();
            let app = crate::api::router(shared.clone());
            let options = serve::Options {
                component: "agent",
                limits,
                metrics: shared.metrics.connections.clone(),
                drain: API_DRAIN_TIMEOUT,
                tls,
            };
            tokio::spawn(
                async move { serve::http(api, app, options, stop.cancelled_owned()).await },
            )
        };
        ApiServer {
            stop: api_stop,
            server,
        }
    }
}

/// Everything `run` started, stopped in order by [`Running::shut_down`].
struct Running {
    shared: Arc<Shared>,
    gossip: GossipHandle,
    gossip_stop: CancellationToken,
    draining: CancellationToken,
    loops: Loops,
    api: ApiServer,
    xds: Option<crate::xds::XdsServer>,
}

impl Running {
    /// Readiness fails, the loops stop, (optionally) this host deregisters, gossip stops,
    /// the cache is written a last time, and the API drains.
    async fn shut_down(self) -> Result<(), AgentError> {
        tracing::info!("shutting down: readiness fails");
        self.draining.cancel();
        self.loops.loops.cancel();
        if self.shared.config.deregister_on_shutdown {
            deregister(&self.shared, &self.gossip).await;
        }
        self.gossip_stop.cancel();
        if tokio::time::timeout(GOSSIP_STOP_TIMEOUT, self.gossip.closed())
            .await
            .is_err()
        {
            tracing::warn!("gossip did not stop in time");
        }
        self.loops.view_stop.cancel();
        self.loops.tracker.close();
        self.loops.tracker.wait().await;
        self.loops.writer_stop.cancel();
        if let Err(e) = self.loops.writer.await {
            tracing::warn!(error = %e, "cache writer failed");
        }
        if let Some(xds) = self.xds {
            xds.stop().await;
        }
        self.api.stop.cancel();
        let served = tokio::time::timeout(API_DRAIN_TIMEOUT, self.api.server).await;
        tracing::info!("agent stopped");
        match served {
            Ok(Ok(Err(e))) => Err(AgentError::Serve(e)),
            _ => Ok(()),
        }
    }
}

/// SIGTERM with `deregister_on_shutdown`: tombstones to gossip, deletes to the registry.
async fn deregister(shared: &Shared, gossip: &GossipHandle) {
    let endpoints = shared.local().all();
    tracing::info!(
        endpoints = endpoints.len(),
        "deregistering this host's endpoints"
    );
    if gossip.publish_local(Vec::new()).await.is_ok() {
        tokio::time::sleep(TOMBSTONE_FLUSH).await;
    }
    let limit = shared.config.request_timeout * 2;
    if tokio::time::timeout(limit, deregister_all(shared, &endpoints))
        .await
        .is_err()
    {
        tracing::warn!("registry deregistration did not finish in time");
    }
}

/// Loads the disk cache; a missing file is normal, a bad one is logged, set aside and
/// ignored (the agent starts from the registry and gossip).
fn load_cache(config: &AgentConfig) -> (CacheFile, bool) {
    let path = cache::path(&config.data_dir);
    match cache::load(&config.data_dir, config.cache_max_bytes) {
        Ok(Some(file)) => {
            tracing::info!(path = %path.display(), hosts = file.hosts.len(), "disk cache loaded");
            (file, false)
        }
        Ok(None) => {
            tracing::info!(path = %path.display(), "no disk cache yet");
            (CacheFile::default(), false)
        }
        Err(e) if e.is_bad_file() => {
            match cache::set_aside(&config.data_dir, unix_ms_now()) {
                Ok(to) => tracing::warn!(
                    path = %path.display(), reason = %e, set_aside = %to.display(),
                    "bad disk cache ignored and set aside; starting from the registry and gossip"
                ),
                Err(io) => tracing::warn!(
                    path = %path.display(), reason = %e, error = %io,
                    "bad disk cache ignored (could not be set aside); starting from the registry and gossip"
                ),
            }
            (CacheFile::default(), true)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "disk cache unreadable, ignored; starting from the registry and gossip");
            (CacheFile::default(), true)
        }
    }
}

fn seeds_from_cache(cached: &CacheFile, bind: SocketAddr) -> Vec<SocketAddr> {
    cached
        .hosts
        .iter()
        .filter(|h| h.endpoint.service.as_str() == AGENT_SERVICE)
        .map(|h| h.endpoint.socket_addr())
        .filter(|a| *a != bind)
        .collect()
}

/// The registry's listing of agents, when it answers quickly; empty otherwise. `me` is
/// checked in first: of two agents starting at once, the one that reads second then finds
/// the other, so no two agents stay alone (gossip takes seeds only at start).
async fn seeds_from_registry(
    client: &discovery::RegistryClient,
    me: Option<schema::Endpoint>,
) -> Vec<SocketAddr> {
    let Ok(service) = ServiceName::new(AGENT_SERVICE) else {
        return Vec::new();
    };
    let own = me.as_ref().map(schema::Endpoint::socket_addr);
    let lookup = async {
        if let Some(me) = me {
            let _ = client.check_in(&[me]).await;
        }
        client.service(&service).await
    };
    // One budget for both: a blackholed registry must not hold the start up for long.
    match tokio::time::timeout(SEED_LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(listing)) => listing
            .hosts
            .iter()
            .filter_map(|h| h.to_endpoint().ok())
            .map(|(e, _)| e.socket_addr())
            .filter(|a| Some(*a) != own)
            .collect(),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "no gossip seeds from the registry");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

/// Recomputes the merged view when gossip's view changes, when an authoritative registry
/// answer may retire disk-cache entries, and every second while a cached row of a live owner
/// waits out its `settle` time (it passes without any gossip event) or deregistered hosts
/// are listed as draining ([`Merger::time_pending`]).
async fn run_view(
    mut merger: Merger,
    gossip: GossipHandle,
    mut listed: watch::Receiver<Option<Arc<BTreeSet<EndpointKey>>>>,
    tx: watch::Sender<Arc<MergedView>>,
    stop: CancellationToken,
) {
    let mut rx = gossip.view();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listening = true;
    loop {
        let time_pending = merger.time_pending();
        tokio::select! {
            () = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            r = listed.changed(), if listening && merger.cache_len() > 0 => match r {
                Err(_) => listening = false,
                Ok(()) => {
                    if let Some(keys) = listed.borrow_and_update().clone() {
                        merger.registry_answered(&keys);
                    }
                }
            },
            _ = tick.tick(), if time_pending => {}
        }
        let g: Arc<GossipView> = rx.borrow_and_update().clone();
        let before = merger.cache_len();
        let view = merger.merge(&g, unix_ms_now());
        if before > 0 && merger.cache_len() == 0 {
            tracing::info!("every disk-cache entry is now covered by live data");
        }
        tx.send_if_modified(|cur| {
            let changed = **cur != view;
            if changed {
                *cur = Arc::new(view);
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gossip epoch continues from the one persisted in the data dir, here by a start
    /// whose clock was an hour ahead of the current one (i.e. this clock stepped back).
    #[tokio::test]
    async fn the_gossip_epoch_continues_from_the_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let previous = gossip::epoch::next_epoch(dir.path(), unix_ms_now() + 3_600_000)
            .expect("epoch persisted");
        let config = AgentConfig {
            // Nothing listens there: the agent starts without its registry.
            registry: Some("http://127.0.0.1:9".into()),
            data_dir: dir.path().to_path_buf(),
            deregister_on_shutdown: false,
            gossip: gossip::GossipConfig::for_tests(SocketAddr::from(([127, 0, 0, 1], 0))),
            dns: crate::dns::DnsConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..Default::default()
            },
            xds: crate::xds::XdsConfig {
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                ..Default::default()
            },
            ..Default::default()
        };
        let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let shutdown = CancellationToken::new();
        let agent = tokio::spawn(run(config, api, shutdown.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while gossip::epoch::load(dir.path()) != Some(previous + 1) {
            assert!(
                tokio::time::Instant::now() < deadline && !agent.is_finished(),
                "the agent did not continue from epoch {previous}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        agent.await.expect("agent task").expect("agent run");
    }
}
