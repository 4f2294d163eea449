//! What the request path needs of a host and of a cluster without taking the cluster lock or
//! allocating: the host's upstream authority, its active-request count, its pooled upstream
//! connections, and counter handles registered once (registering builds and hashes the
//! labelled key, too much per request) in the families of `families`. Gauges are in `gauges`.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::uri::Authority;
use metrics::{Counter, Histogram};
use serve::Family;

use super::families::families;

use crate::core::breaker::Resource;
use crate::core::retry::RetryOverflow;
use crate::io::upstream::HostConns;

/// Outcome labels of `tidings_proxy_upstream_requests_total`, in a fixed order.
pub const OUTCOMES: [&str; 9] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "connect_failure",
    "reset",
    "timeout",
    // A TCP listener's connection made.
    "connected",
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
    /// Health checks by result: success, failure.
    checks: [OnceLock<Counter>; 2],
    ejections: OnceLock<Counter>,
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
            checks: Default::default(),
            ejections: OnceLock::new(),
        }
    }

    /// The values of the `cluster` and `host` labels.
    pub(super) fn label_values(&self) -> [String; 2] {
        [self.cluster.to_string(), self.addr.to_string()]
    }

    /// Counts one health check.
    pub(super) fn count_check(&self, success: bool) {
        let (slot, result) = if success {
            (&self.checks[0], "success")
        } else {
            (&self.checks[1], "failure")
        };
        slot.get_or_init(|| {
            let [cluster, host] = self.label_values();
            families().health_checks.global([&cluster, &host, result])
        })
        .increment(1);
    }

    /// Counts one ejection by outlier detection.
    pub(super) fn count_ejection(&self) {
        self.ejections
            .get_or_init(|| {
                let [cluster, host] = self.label_values();
                families().ejections.global([&cluster, &host])
            })
            .increment(1);
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
            let [cluster, host] = self.label_values();
            families()
                .upstream_requests
                .global([&cluster, &host, OUTCOMES[outcome]])
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
    /// Overflows by breaker resource, indexed by the enum's order.
    overflows: [OnceLock<Counter>; 4],
    retries: OnceLock<Counter>,
    /// Retries refused, by limit: budget, max_retries.
    retry_overflows: [OnceLock<Counter>; 2],
    membership_errors: OnceLock<Counter>,
    tcp_connections: OnceLock<Counter>,
    /// Bytes received from and sent to TCP clients.
    tcp_bytes: [OnceLock<Counter>; 2],
    tcp_idle_timeouts: OnceLock<Counter>,
}

impl ClusterMetrics {
    /// The metrics of cluster `name`; `""` for requests no route took.
    pub(crate) fn new(name: std::sync::Arc<str>) -> Self {
        ClusterMetrics {
            name,
            by_code: (100..600).map(|_| OnceLock::new()).collect(),
            duration: OnceLock::new(),
            overflows: Default::default(),
            retries: OnceLock::new(),
            retry_overflows: Default::default(),
            membership_errors: OnceLock::new(),
            tcp_connections: OnceLock::new(),
            tcp_bytes: Default::default(),
            tcp_idle_timeouts: OnceLock::new(),
        }
    }

    fn counter(&self, slot: &OnceLock<Counter>, family: &Family<Counter, 1>) {
        slot.get_or_init(|| family.global([&self.name]))
            .increment(1);
    }

    /// Counts a retry refused by `limit` (the request keeps the answer it had).
    pub fn retry_overflow(&self, limit: RetryOverflow) {
        let slot = match limit {
            RetryOverflow::Budget => &self.retry_overflows[0],
            RetryOverflow::MaxRetries => &self.retry_overflows[1],
        };
        slot.get_or_init(|| {
            families()
                .retry_overflow
                .global([&self.name, limit.as_str()])
        })
        .increment(1);
    }

    /// Counts a retry granted.
    pub fn retry(&self) {
        self.counter(&self.retries, &families().retries);
    }

    /// Counts a request refused because breaker `resource` was full.
    pub fn overflow(&self, resource: Resource) {
        let slot = &self.overflows[resource as usize];
        slot.get_or_init(|| families().overflow.global([&self.name, resource.as_str()]))
            .increment(1);
    }

    /// Counts a failed membership query.
    pub fn membership_error(&self) {
        self.counter(&self.membership_errors, &families().membership_errors);
    }

    /// Counts a connection accepted by a TCP listener.
    pub fn tcp_connection(&self) {
        self.counter(&self.tcp_connections, &families().tcp_connections);
    }

    /// Counts a TCP connection closed by its idle timeout.
    pub fn tcp_idle_timeout(&self) {
        self.counter(&self.tcp_idle_timeouts, &families().tcp_idle_timeouts);
    }

    /// The byte counters of TCP connections: (received from clients, sent to clients).
    pub fn tcp_bytes(&self) -> (Counter, Counter) {
        let [rx, tx] = [("received", 0), ("sent", 1)].map(|(direction, i)| {
            self.tcp_bytes[i]
                .get_or_init(|| families().tcp_bytes.global([&self.name, direction]))
                .clone()
        });
        (rx, tx)
    }

    /// Counts one downstream request answered with `code`.
    pub fn count(&self, code: u16) {
        let counter = |code: u16| families().requests.global([&self.name, &code.to_string()]);
        match self.by_code.get(usize::from(code).wrapping_sub(100)) {
            Some(slot) => slot.get_or_init(|| counter(code)).increment(1),
            // Codes outside 100-599 cannot come from hyper or the fast path's parser.
            None => counter(code).increment(1),
        }
    }

    /// Records one downstream request answered with `code` after `elapsed`.
    pub fn request(&self, code: u16, elapsed: Duration) {
        self.count(code);
        self.duration
            .get_or_init(|| families().request_duration.global([&self.name]))
            .record(elapsed.as_secs_f64());
    }
}
