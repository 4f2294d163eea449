//! The proxy's metric families, described once per process on the global recorder through
//! `serve::Registrar`, the way the registry and the agent describe theirs. The proxy records
//! on the process-global recorder (`crate::telemetry` installs it) rather than one it owns,
//! since it may be embedded in a binary that reads the same registry; its handles are
//! registered once per cluster or host and kept (`super::handle`, `super::gauges`).

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Level, Metadata};
use serve::{Family, Registrar};

static META: Metadata<'static> = Metadata::new("proxy", Level::INFO, Some(module_path!()));

/// Every family the proxy records into, with its help text.
pub(crate) struct Families {
    pub requests: Family<Counter, 2>,
    pub request_duration: Family<Histogram, 1>,
    pub upstream_requests: Family<Counter, 3>,
    pub retries: Family<Counter, 1>,
    pub retry_overflow: Family<Counter, 2>,
    pub overflow: Family<Counter, 2>,
    pub membership_errors: Family<Counter, 1>,
    pub health_checks: Family<Counter, 3>,
    pub ejections: Family<Counter, 2>,
    pub tcp_connections: Family<Counter, 1>,
    pub tcp_bytes: Family<Counter, 2>,
    pub tcp_idle_timeouts: Family<Counter, 1>,
    /// Host gauges: active requests, ejected, routable; and healthy.
    pub host: [Family<Gauge, 2>; 3],
    pub host_healthy: Family<Gauge, 2>,
    /// Cluster gauges: routable hosts, panic, active requests, retries in flight.
    pub cluster: [Family<Gauge, 1>; 4],
}

/// The families, described on first use on the global recorder. `Proxy::bind` installs the
/// Prometheus recorder before it builds any cluster, so the descriptions land where
/// `/metrics` reads.
pub(crate) fn families() -> &'static Families {
    static FAMILIES: OnceLock<Families> = OnceLock::new();
    FAMILIES.get_or_init(|| metrics::with_recorder(|r| describe(&Registrar::new(r, &META))))
}

fn describe<R: metrics::Recorder + ?Sized>(reg: &Registrar<'_, R>) -> Families {
    const CLUSTER_HOST: [&str; 2] = ["cluster", "host"];
    Families {
        requests: reg.family(
            "tidings_proxy_requests_total",
            "Downstream requests answered, by status code; those no route took under cluster=\"\".",
            ["cluster", "code"],
        ),
        request_duration: reg.family(
            "tidings_proxy_request_duration_seconds",
            "Downstream request latency, from the request head to the response head.",
            ["cluster"],
        ),
        upstream_requests: reg.family(
            "tidings_proxy_upstream_requests_total",
            "Upstream attempts by outcome: 1xx to 5xx, connect_failure, reset, timeout; connected (TCP listeners).",
            ["cluster", "host", "outcome"],
        ),
        retries: reg.family(
            "tidings_proxy_retries_total",
            "Retries made, failovers after a refused connect included.",
            ["cluster"],
        ),
        retry_overflow: reg.family(
            "tidings_proxy_retry_overflow_total",
            "Retries refused by the retry budget or the breaker's max_retries.",
            ["cluster", "limit"],
        ),
        overflow: reg.family(
            "tidings_proxy_overflow_total",
            "Requests refused by a full circuit breaker, by resource.",
            ["cluster", "resource"],
        ),
        membership_errors: reg.family(
            "tidings_proxy_membership_errors_total",
            "Failed membership queries; the cluster keeps its last hosts.",
            ["cluster"],
        ),
        health_checks: reg.family(
            "tidings_proxy_health_checks_total",
            "Active health checks by result.",
            ["cluster", "host", "result"],
        ),
        ejections: reg.family(
            "tidings_proxy_ejections_total",
            "Outlier ejections of a host.",
            CLUSTER_HOST,
        ),
        tcp_connections: reg.family(
            "tidings_proxy_tcp_connections_total",
            "Connections accepted by the TCP listeners sending to the cluster.",
            ["cluster"],
        ),
        tcp_bytes: reg.family(
            "tidings_proxy_tcp_bytes_total",
            "Bytes copied by TCP listeners: received from clients, sent to clients.",
            ["cluster", "direction"],
        ),
        tcp_idle_timeouts: reg.family(
            "tidings_proxy_tcp_idle_timeouts_total",
            "TCP connections closed after idle_timeout without a byte either way.",
            ["cluster"],
        ),
        host: [
            reg.family(
                "tidings_proxy_host_active_requests",
                "Requests in flight to the host.",
                CLUSTER_HOST,
            ),
            reg.family(
                "tidings_proxy_host_ejected",
                "1 while outlier detection ejects the host.",
                CLUSTER_HOST,
            ),
            reg.family(
                "tidings_proxy_host_routable",
                "1 while the host takes traffic.",
                CLUSTER_HOST,
            ),
        ],
        host_healthy: reg.family(
            "tidings_proxy_host_healthy",
            "1 while active health checks find the host healthy (from its first check on).",
            CLUSTER_HOST,
        ),
        cluster: [
            reg.family(
                "tidings_proxy_cluster_routable_hosts",
                "Hosts taking traffic.",
                ["cluster"],
            ),
            reg.family(
                "tidings_proxy_cluster_panic",
                "1 while too few hosts are healthy and the cluster routes to all (panic mode).",
                ["cluster"],
            ),
            reg.family(
                "tidings_proxy_cluster_active_requests",
                "Requests in flight in the cluster.",
                ["cluster"],
            ),
            reg.family(
                "tidings_proxy_cluster_retries_active",
                "Retries in flight in the cluster (what the retry budget bounds).",
                ["cluster"],
            ),
        ],
    }
}
