//! What the request path needs of a host and of a cluster without taking the cluster lock or
//! allocating: the host's upstream authority, its active-request count, its pooled upstream
//! connections, and metric handles registered once (a `metrics::counter!` with labels builds and hashes its key every call).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::uri::Authority;
use metrics::{Counter, Gauge, Histogram};

use crate::upstream::HostConns;

/// Outcome labels of `tidings_proxy_upstream_requests_total`, in a fixed order.
pub const OUTCOMES: [&str; 8] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "connect_failure",
    "reset",
    "timeout",
];

/// One host, shared between the cluster's table and the requests in flight to it.
#[derive(Debug)]
pub struct HostHandle {
    pub addr: SocketAddr,
    /// `ip:port` as the upstream URI's authority, built once.
    pub authority: Authority,
    pub(super) active: AtomicU32,
    /// Idle keep-alive connections to this host; they close when the host is forgotten.
    pub conns: HostConns,
    cluster: std::sync::Arc<str>,
    outcomes: [OnceLock<Counter>; OUTCOMES.len()],
    /// Active requests, ejected, routable: set once a second, registered once.
    gauges: OnceLock<[Gauge; 3]>,
}

impl HostHandle {
    pub(super) fn new(addr: SocketAddr, cluster: std::sync::Arc<str>) -> Self {
        // A socket address always forms a valid authority (`[v6]:port` for IPv6).
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid:0"));
        HostHandle {
            addr,
            authority,
            active: AtomicU32::new(0),
            conns: HostConns::default(),
            cluster,
            outcomes: Default::default(),
            gauges: OnceLock::new(),
        }
    }

    /// Publishes the host's gauges.
    pub(super) fn publish(&self, ejected: bool, routable: bool) {
        let [active, ej, routed] = self.gauges.get_or_init(|| {
            let labels = [
                ("cluster", self.cluster.to_string()),
                ("host", self.addr.to_string()),
            ];
            [
                metrics::gauge!("tidings_proxy_host_active_requests", &labels),
                metrics::gauge!("tidings_proxy_host_ejected", &labels),
                metrics::gauge!("tidings_proxy_host_routable", &labels),
            ]
        });
        active.set(f64::from(self.active()));
        ej.set(if ejected { 1.0 } else { 0.0 });
        routed.set(if routable { 1.0 } else { 0.0 });
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    /// Counts one attempt's outcome (an index into [`OUTCOMES`]).
    pub fn count_outcome(&self, outcome: usize) {
        let Some(slot) = self.outcomes.get(outcome) else {
            return;
        };
        slot.get_or_init(|| {
            metrics::counter!(
                "tidings_proxy_upstream_requests_total",
                "cluster" => self.cluster.to_string(),
                "host" => self.addr.to_string(),
                "outcome" => OUTCOMES[outcome]
            )
        })
        .increment(1);
    }
}

/// Per-cluster request metrics, by status code, registered on first use.
pub struct ClusterMetrics {
    name: std::sync::Arc<str>,
    /// Index `code - 100` for codes 100-599.
    by_code: Box<[OnceLock<Counter>]>,
    duration: OnceLock<Histogram>,
    /// Routable hosts, panic, active requests, retries in flight.
    gauges: OnceLock<[Gauge; 4]>,
}

impl ClusterMetrics {
    pub(super) fn new(name: std::sync::Arc<str>) -> Self {
        ClusterMetrics {
            name,
            by_code: (100..600).map(|_| OnceLock::new()).collect(),
            duration: OnceLock::new(),
            gauges: OnceLock::new(),
        }
    }

    /// Publishes the cluster's gauges.
    pub(super) fn publish(
        &self,
        routable_hosts: usize,
        panic: bool,
        active_requests: u32,
        active_retries: u32,
    ) {
        let [routable, panicking, active, retries] = self.gauges.get_or_init(|| {
            let name = self.name.to_string();
            [
                metrics::gauge!("tidings_proxy_cluster_routable_hosts", "cluster" => name.clone()),
                metrics::gauge!("tidings_proxy_cluster_panic", "cluster" => name.clone()),
                metrics::gauge!("tidings_proxy_cluster_active_requests", "cluster" => name.clone()),
                metrics::gauge!("tidings_proxy_cluster_retries_active", "cluster" => name),
            ]
        });
        routable.set(routable_hosts as f64);
        panicking.set(if panic { 1.0 } else { 0.0 });
        active.set(f64::from(active_requests));
        retries.set(f64::from(active_retries));
    }

    /// Counts a retry refused by `limit` (the request keeps the answer it had).
    pub fn retry_overflow(&self, limit: crate::retry::RetryOverflow) {
        metrics::counter!("tidings_proxy_retry_overflow_total", "cluster" => self.name.to_string(), "limit" => limit.as_str()).increment(1);
    }

    /// Records one downstream request answered with `code` after `elapsed`.
    pub fn request(&self, code: u16, elapsed: Duration) {
        let counter = |code: u16| metrics::counter!("tidings_proxy_requests_total", "cluster" => self.name.to_string(), "code" => code.to_string());
        match self.by_code.get(usize::from(code).wrapping_sub(100)) {
            Some(slot) => slot.get_or_init(|| counter(code)).increment(1),
            None => counter(code).increment(1),
        }
        self.duration
            .get_or_init(|| {
                metrics::histogram!("tidings_proxy_request_duration_seconds", "cluster" => self.name.to_string())
            })
            .record(elapsed.as_secs_f64());
    }
}
