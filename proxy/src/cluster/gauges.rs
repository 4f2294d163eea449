//! The cluster's and its hosts' gauges, set once a second by upkeep (and a host's health on
//! each check) through handles registered on first use.
//!
//! The exporter drops a gauge left unset for `crate::telemetry::GAUGE_IDLE_TIMEOUT`: that is
//! how a forgotten host's gauges leave `/metrics`. A dropped gauge's handle writes nowhere,
//! so after a stall that long (the process stopped or starved) the handles are registered
//! again ([`HostGauges::forget`]) rather than kept.

use metrics::Gauge;

use super::HostHandle;
use super::families::families;

/// One host's gauges; they live in the cluster's table and go with the host.
#[derive(Default)]
pub(super) struct HostGauges {
    /// Active requests, ejected, routable.
    state: Option<[Gauge; 3]>,
    /// From the host's first health check on.
    healthy: Option<Gauge>,
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

impl HostGauges {
    pub(super) fn publish(&mut self, host: &HostHandle, ejected: bool, routable: bool) {
        let [active, ej, routed] = self.state.get_or_insert_with(|| {
            let [cluster, addr] = host.label_values();
            families()
                .host
                .each_ref()
                .map(|f| f.global([&cluster, &addr]))
        });
        active.set(f64::from(host.active()));
        ej.set(flag(ejected));
        routed.set(flag(routable));
    }

    /// Publishes `tidings_proxy_host_healthy`.
    pub(super) fn publish_health(&mut self, host: &HostHandle, healthy: bool) {
        self.healthy
            .get_or_insert_with(|| {
                let [cluster, addr] = host.label_values();
                families().host_healthy.global([&cluster, &addr])
            })
            .set(flag(healthy));
    }

    /// Drops the handles: the next publish registers them again.
    pub(super) fn forget(&mut self) {
        *self = HostGauges::default();
    }
}

/// The cluster's gauges: routable hosts, panic, active requests, retries in flight.
#[derive(Default)]
pub(super) struct ClusterGauges(Option<[Gauge; 4]>);

impl ClusterGauges {
    pub(super) fn publish(
        &mut self,
        cluster: &str,
        routable_hosts: usize,
        panic: bool,
        active_requests: u32,
        active_retries: u32,
    ) {
        let [routable, panicking, active, retries] = self
            .0
            .get_or_insert_with(|| families().cluster.each_ref().map(|f| f.global([cluster])));
        routable.set(routable_hosts as f64);
        panicking.set(flag(panic));
        active.set(f64::from(active_requests));
        retries.set(f64::from(active_retries));
    }

    pub(super) fn forget(&mut self) {
        self.0 = None;
    }
}
