//! The registry's Prometheus metrics, owned by each `Registry` (not a process-global
//! recorder), so tests and several registries in one process never share counters. Fixed
//! metrics are registered once and updated through lock-free handles; per-route request
//! metrics are looked up by label on each request.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use metrics::{Counter, Gauge, Histogram, Level, Metadata};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serve::{Family, Registrar};

static META: Metadata<'static> = Metadata::new("discovery", Level::INFO, Some(module_path!()));

/// Latency buckets from 0.5 ms to 10 s (blocking queries land in `+Inf`).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    requests: Family<Counter, 3>,
    /// The request handles by route, so a request does not build labels and look them up in
    /// the recorder each time. Bounded: routes, methods and statuses are finite sets.
    routes: RwLock<HashMap<String, RouteHandles>>,
    request_seconds: Family<Histogram, 1>,
    store_errors: Family<Counter, 1>,
    rejected: Family<Counter, 1>,
    stream: StreamMetrics,
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

struct RouteHandles {
    seconds: Histogram,
    requests: HashMap<(&'static str, u16), Counter>,
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
        let reg = Registrar::new(&recorder, &META);
        let counter = |name: &'static str, help| reg.one::<Counter>(name, help);
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
        let gauges = gauges(&reg);
        let families = families(&reg);
        let connections = serve::ConnMetrics::register(&recorder, "registry");
        let stream = StreamMetrics::register(&reg);
        Metrics {
            stream,
            connections,
            requests: families.requests,
            routes: RwLock::default(),
            request_seconds: families.request_seconds,
            store_errors: families.store_errors,
            rejected: families.rejected,
            recorder,
            handle,
            checkins,
            stale_reads,
            swept,
            live: gauges.live,
            stored: gauges.stored,
            renewed: gauges.renewed,
            baseline: gauges.baseline,
            preserving: gauges.preserving,
            warming: gauges.warming,
            blocking: gauges.blocking,
        }
    }

    pub fn request(&self, route: &str, method: &'static str, status: u16, seconds: f64) {
        let cached = {
            let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
            routes.get(route).map(|r| {
                let counter = r.requests.get(&(method, status)).cloned();
                (r.seconds.clone(), counter)
            })
        };
        let (seconds_h, counter) = match cached {
            Some((h, Some(c))) => (h, c),
            // First sight of this route, method or status: label, look up and keep.
            _ => {
                let c = self
                    .requests
                    .on(&self.recorder, [route, method, &status.to_string()]);
                let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
                let r = routes
                    .entry(route.to_string())
                    .or_insert_with(|| RouteHandles {
                        seconds: self.request_seconds.on(&self.recorder, [route]),
                        requests: HashMap::new(),
                    });
                r.requests.insert((method, status), c.clone());
                (r.seconds.clone(), c)
            }
        };
        counter.increment(1);
        seconds_h.record(seconds);
    }

    pub fn store_error(&self, op: &'static str) {
        self.store_errors.on(&self.recorder, [op]).increment(1);
    }

    /// A request refused by the limit named `limit` (its config key).
    pub fn rejected(&self, limit: &'static str) {
        self.rejected_counter(limit).increment(1);
    }

    /// The counter of requests refused by the limit named `limit`.
    pub fn rejected_counter(&self, limit: &'static str) -> Counter {
        self.rejected.on(&self.recorder, [limit])
    }

    /// Copies what the store's stream follower counted (a DynamoDB store keeps its own
    /// counts; they are read at each scrape).
    pub fn follow(&self, stats: &crate::store::FollowStats) {
        let m = &self.stream;
        m.records.absolute(stats.records_applied);
        for (reason, n) in &stats.rescans {
            m.rescans.on(&self.recorder, [reason.label()]).absolute(*n);
        }
        m.followed.set(f64::from(u8::from(stats.followed)));
        m.lag.set(stats.lag_ms as f64 / 1000.0);
        m.mirror_rows.set(stats.mirror_rows as f64);
        m.reads
            .on(&self.recorder, ["table"])
            .absolute(stats.table_reads);
        m.reads
            .on(&self.recorder, ["mirror"])
            .absolute(stats.mirror_reads);
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

/// The registry's fixed gauges: the last sweep's counts and the server's current state.
struct Gauges {
    live: Gauge,
    stored: Gauge,
    renewed: Gauge,
    baseline: Gauge,
    preserving: Gauge,
    warming: Gauge,
    blocking: Gauge,
}

/// Registers the fixed gauges.
fn gauges(reg: &Registrar<'_, PrometheusRecorder>) -> Gauges {
    let gauge = |name: &'static str, help| reg.one::<Gauge>(name, help);
    Gauges {
        live: gauge(
            "tidings_registry_live_endpoints",
            "Endpoints checked in within the TTL (last sweep).",
        ),
        stored: gauge(
            "tidings_registry_stored_endpoints",
            "Rows in the store, expired or not (last sweep).",
        ),
        renewed: gauge(
            "tidings_registry_renewed_endpoints",
            "Endpoints that checked in within the last interval.",
        ),
        baseline: gauge(
            "tidings_registry_expected_renewals",
            "Self-preservation baseline: expected renewals.",
        ),
        preserving: gauge(
            "tidings_registry_self_preservation_active",
            "1 while expiry is paused.",
        ),
        warming: gauge(
            "tidings_registry_warming",
            "1 while the registry is warming up after an empty start.",
        ),
        blocking: gauge(
            "tidings_registry_blocking_queries",
            "Blocking queries waiting now.",
        ),
    }
}

/// How a DynamoDB store follows the table's stream.
struct StreamMetrics {
    records: Counter,
    rescans: Family<Counter, 1>,
    followed: Gauge,
    lag: Gauge,
    mirror_rows: Gauge,
    reads: Family<Counter, 1>,
}

impl StreamMetrics {
    fn register(reg: &Registrar<'_, PrometheusRecorder>) -> Self {
        StreamMetrics {
            records: reg.one(
                "tidings_registry_stream_records_total",
                "DynamoDB stream records applied to the replica's mirror of the table.",
            ),
            rescans: reg.family(
                "tidings_registry_stream_rescans_total",
                "Full reads of the table into the mirror, by reason.",
                ["reason"],
            ),
            followed: reg.one(
                "tidings_registry_stream_followed",
                "1 while reads are answered from the mirror the table's stream keeps current.",
            ),
            lag: reg.one(
                "tidings_registry_stream_lag_seconds",
                "Age of the newest stream record when it was applied.",
            ),
            mirror_rows: reg.one(
                "tidings_registry_stream_mirror_rows",
                "Rows in the replica's mirror of the table.",
            ),
            reads: reg.family(
                "tidings_registry_store_reads_total",
                "Store reads (list calls), by what answered them: the table or the mirror.",
                ["source"],
            ),
        }
    }
}

/// The per-label metric families, looked up by label on each request.
struct Families {
    requests: Family<Counter, 3>,
    request_seconds: Family<Histogram, 1>,
    store_errors: Family<Counter, 1>,
    rejected: Family<Counter, 1>,
}

/// Registers the per-label families.
fn families(reg: &Registrar<'_, PrometheusRecorder>) -> Families {
    Families {
        requests: reg.family(
            "tidings_registry_requests_total",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
        ),
        request_seconds: reg.family(
            "tidings_registry_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
        ),
        store_errors: reg.family(
            "tidings_registry_store_errors_total",
            "Store operations that failed, by operation.",
            ["op"],
        ),
        rejected: reg.family(
            "tidings_registry_rejected_total",
            "Requests refused by a configured limit (blocking waiters, quotas), by limit.",
            ["limit"],
        ),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
