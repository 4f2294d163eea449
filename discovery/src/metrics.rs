//! The registry's Prometheus metrics, owned by each `Registry` (not a process-global
//! recorder), so tests and several registries in one process never share counters. Fixed
//! metrics are registered once and updated through lock-free handles; per-route request
//! metrics are looked up by label on each request.

use metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

static META: Metadata<'static> = Metadata::new("discovery", Level::INFO, Some(module_path!()));

const REQUESTS: &str = "tidings_registry_requests_total";
const REQUEST_SECONDS: &str = "tidings_registry_request_duration_seconds";
const STORE_ERRORS: &str = "tidings_registry_store_errors_total";
const REJECTED: &str = "tidings_registry_rejected_total";

/// Latency buckets from 0.5 ms to 10 s (blocking queries land in `+Inf`).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Endpoints accepted by check-ins.
    pub checkins: Counter,
    /// Reads answered from the last-good cache because the store failed.
    pub stale_reads: Counter,
    /// Expired rows deleted by the sweeper.
    pub swept: Counter,
    pub live: Gauge,
    pub stored: Gauge,
    pub renewed: Gauge,
    pub baseline: Gauge,
    pub preserving: Gauge,
    pub warming: Gauge,
    pub blocking: Gauge,
    /// The HTTP listener's connections (open, evicted, timed out, accept errors).
    pub connections: serve::ConnMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        // `set_buckets` only fails on an empty list; fall back to summaries rather than fail.
        let builder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let counter = |name: &'static str, help: &'static str| {
            recorder.describe_counter(
                KeyName::from_const_str(name),
                Some(Unit::Count),
                SharedString::const_str(help),
            );
            recorder.register_counter(&Key::from_static_name(name), &META)
        };
        let gauge = |name: &'static str, help: &'static str| {
            recorder.describe_gauge(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
            recorder.register_gauge(&Key::from_static_name(name), &META)
        };
        let checkins = counter(
            "tidings_registry_checkins_total",
            "Endpoints accepted by check-ins.",
        );
        let stale_reads = counter(
            "tidings_registry_stale_reads_total",
            "Reads served from the last-good cache after a store failure.",
        );
        let swept = counter(
            "tidings_registry_swept_endpoints_total",
            "Expired endpoints deleted by the sweeper.",
        );
        let live = gauge(
            "tidings_registry_live_endpoints",
            "Endpoints checked in within the TTL (last sweep).",
        );
        let stored = gauge(
            "tidings_registry_stored_endpoints",
            "Rows in the store, expired or not (last sweep).",
        );
        let renewed = gauge(
            "tidings_registry_renewed_endpoints",
            "Endpoints that checked in within the last interval.",
        );
        let baseline = gauge(
            "tidings_registry_expected_renewals",
            "Self-preservation baseline: expected renewals.",
        );
        let preserving = gauge(
            "tidings_registry_self_preservation_active",
            "1 while expiry is paused.",
        );
        let warming = gauge(
            "tidings_registry_warming",
            "1 while the registry is warming up after an empty start.",
        );
        let blocking = gauge(
            "tidings_registry_blocking_queries",
            "Blocking queries waiting now.",
        );
        recorder.describe_counter(
            KeyName::from_const_str(REQUESTS),
            Some(Unit::Count),
            SharedString::const_str("HTTP requests by route, method and status."),
        );
        recorder.describe_histogram(
            KeyName::from_const_str(REQUEST_SECONDS),
            Some(Unit::Seconds),
            SharedString::const_str("HTTP request latency by route."),
        );
        recorder.describe_counter(
            KeyName::from_const_str(STORE_ERRORS),
            Some(Unit::Count),
            SharedString::const_str("Store operations that failed, by operation."),
        );
        recorder.describe_counter(
            KeyName::from_const_str(REJECTED),
            Some(Unit::Count),
            SharedString::const_str(
                "Requests refused by a configured limit (blocking waiters, quotas), by limit.",
            ),
        );
        let connections = serve::ConnMetrics::register(&recorder, "registry");
        Metrics {
            connections,
            recorder,
            handle,
            checkins,
            stale_reads,
            swept,
            live,
            stored,
            renewed,
            baseline,
            preserving,
            warming,
            blocking,
        }
    }

    pub fn request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let labels = vec![
            Label::new("route", route.to_string()),
            Label::new("method", method.to_string()),
            Label::new("status", status.to_string()),
        ];
        self.recorder
            .register_counter(&Key::from_parts(REQUESTS, labels), &META)
            .increment(1);
        let key = Key::from_parts(
            REQUEST_SECONDS,
            vec![Label::new("route", route.to_string())],
        );
        self.recorder
            .register_histogram(&key, &META)
            .record(seconds);
    }

    pub fn store_error(&self, op: &'static str) {
        let key = Key::from_parts(STORE_ERRORS, vec![Label::from_static_parts("op", op)]);
        self.recorder.register_counter(&key, &META).increment(1);
    }

    /// A request refused by the limit named `limit` (its config key).
    pub fn rejected(&self, limit: &'static str) {
        self.rejected_counter(limit).increment(1);
    }

    /// The counter of requests refused by the limit named `limit`.
    pub fn rejected_counter(&self, limit: &'static str) -> Counter {
        let key = Key::from_parts(REJECTED, vec![Label::from_static_parts("limit", limit)]);
        self.recorder.register_counter(&key, &META)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram buckets; the sweeper calls it so memory stays bounded between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
