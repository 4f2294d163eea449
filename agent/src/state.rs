//! What the agent's tasks share: config, the registry client, the gossip handle, the
//! published merged view, this host's endpoints, registry freshness and metrics.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use discovery::RegistryClient;
use gossip::GossipHandle;
use schema::timefmt::unix_ms_now;
use schema::{Endpoint, EndpointKey};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::metrics::{Metrics, Readings};
use crate::view::MergedView;

/// This host's endpoints: from the config, registered at runtime, and the agent's own.
#[derive(Debug, Clone, Default)]
pub struct LocalEndpoints {
    pub configured: Vec<Endpoint>,
    pub runtime: BTreeMap<EndpointKey, Endpoint>,
    pub agent: Option<Endpoint>,
}

impl LocalEndpoints {
    /// Everything this host serves; a runtime registration overrides a configured one.
    pub fn all(&self) -> Vec<Endpoint> {
        let mut by_key: BTreeMap<EndpointKey, Endpoint> = self
            .configured
            .iter()
            .chain(self.agent.as_ref())
            .map(|e| (e.key(), e.clone()))
            .collect();
        by_key.extend(self.runtime.iter().map(|(k, e)| (k.clone(), e.clone())));
        by_key.into_values().collect()
    }
}

pub struct Shared {
    pub config: AgentConfig,
    pub client: RegistryClient,
    pub gossip: GossipHandle,
    pub gossip_addr: SocketAddr,
    pub host_ip: IpAddr,
    pub view: watch::Receiver<Arc<MergedView>>,
    pub local: Mutex<LocalEndpoints>,
    /// Bumped on every change of `local`: the cache writer persists runtime endpoints.
    pub local_version: watch::Sender<u64>,
    /// Check in now (after a small random delay): the registry restarted or endpoints changed.
    pub recheck: Notify,
    /// A check-in succeeded after failures: the registry is back, sync now.
    pub registry_back: Notify,
    /// Wall-clock ms of the last successful registry sync (0: never, here or in the cache).
    pub last_sync_ms: AtomicU64,
    /// Index of the view the disk cache last stored (0: none yet).
    pub cache_index: AtomicU64,
    registry_ok: AtomicBool,
    /// Fires when the agent starts shutting down: readiness fails, blocking queries answer.
    pub draining: CancellationToken,
    pub metrics: Metrics,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: AgentConfig,
        client: RegistryClient,
        gossip: GossipHandle,
        host_ip: IpAddr,
        view: watch::Receiver<Arc<MergedView>>,
        local: LocalEndpoints,
        last_sync_ms: u64,
        draining: CancellationToken,
    ) -> Self {
        let gossip_addr = gossip.id().addr;
        Shared {
            config,
            client,
            gossip,
            gossip_addr,
            host_ip,
            view,
            local: Mutex::new(local),
            local_version: watch::Sender::new(0),
            recheck: Notify::new(),
            registry_back: Notify::new(),
            last_sync_ms: AtomicU64::new(last_sync_ms),
            cache_index: AtomicU64::new(0),
            registry_ok: AtomicBool::new(false),
            draining,
            metrics: Metrics::default(),
        }
    }

    pub fn local(&self) -> MutexGuard<'_, LocalEndpoints> {
        // A panic while holding the lock cannot leave the endpoint set half-updated (every
        // update is a single insert or remove), so a poisoned lock is still usable.
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes this host's current endpoints to gossip and asks for a check-in.
    pub async fn local_changed(&self) {
        let all = self.local().all();
        if self.gossip.publish_local(all).await.is_err() {
            tracing::warn!("gossip has stopped; local endpoints not published");
        }
        self.local_version.send_modify(|v| *v += 1);
        self.recheck.notify_one();
    }

    pub fn mark_synced(&self) {
        self.last_sync_ms.store(unix_ms_now(), Ordering::Relaxed);
    }

    pub fn set_registry_ok(&self, ok: bool) {
        self.registry_ok.store(ok, Ordering::Relaxed);
    }

    /// Whether the last registry sync attempt succeeded.
    pub fn registry_ok(&self) -> bool {
        self.registry_ok.load(Ordering::Relaxed)
    }

    /// Age of the freshest registry data this agent holds: milliseconds since its own last
    /// successful sync (or the one recorded in the disk cache) or since the newest registry
    /// snapshot it received through gossip, whichever is more recent. `None`: never any.
    pub fn registry_age_ms(&self) -> Option<u64> {
        let own = self.last_sync_ms.load(Ordering::Relaxed);
        let relayed = self
            .gossip
            .view()
            .borrow()
            .snapshots
            .iter()
            .map(|s| s.generated_at_ms)
            .max()
            .unwrap_or(0);
        match own.max(relayed) {
            0 => None,
            at => Some(unix_ms_now().saturating_sub(at)),
        }
    }

    pub fn current_view(&self) -> Arc<MergedView> {
        self.view.borrow().clone()
    }

    /// Prometheus text exposition of the agent's metrics.
    pub fn render_metrics(&self) -> String {
        let view = self.current_view();
        let members = self.gossip.members();
        let alive = members.iter().filter(|m| m.active).count();
        self.metrics.render(&Readings {
            registry_age_s: self.registry_age_ms().map_or(-1.0, |ms| ms as f64 / 1000.0),
            view_endpoints: view.len(),
            view_services: view.services().count(),
            draining_endpoints: view.draining_len(),
            members_alive: alive,
            members_down: members.len() - alive,
            local_endpoints: self.local().all().len(),
            gossip: self.gossip.metrics(),
        })
    }
}
