//! The agent's Prometheus metrics on `metrics` + `metrics-exporter-prometheus`, owned by the
//! agent's state rather than a process-global recorder (as the registry's are), so tests that
//! run several agents in one process never share counters. Counters are registered once and
//! bumped through lock-free handles; gauges and the gossip core's counters are read when
//! `/metrics` is rendered.

use gossip::MetricsSnapshot;
use metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

static META: Metadata<'static> = Metadata::new("agent", Level::INFO, Some(module_path!()));

/// What `/metrics` reads at render time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Readings {
    /// Seconds since the registry data was last known current (as the
    /// `X-Tidings-Registry-Age-Ms` header); -1 if it never was.
    pub registry_age_s: f64,
    pub view_endpoints: usize,
    pub view_services: usize,
    pub draining_endpoints: usize,
    pub members_alive: usize,
    pub members_down: usize,
    pub local_endpoints: usize,
    pub gossip: MetricsSnapshot,
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub checkins_ok: Counter,
    pub checkins_failed: Counter,
    pub sync_applied: Counter,
    pub sync_warming: Counter,
    pub sync_errors: Counter,
    pub cache_writes: Counter,
    pub cache_write_errors: Counter,
    pub cache_load_errors: Counter,
    /// Endpoints the registry refused on their own (the rest of the batch checked in).
    pub checkin_refused: Counter,
    /// Local API requests refused: a foreign `Host` header, or a registration on an
    /// address that is not this host's.
    pub api_refused_host: Counter,
    pub api_refused_ip: Counter,
    pub api_refused_waiters: Counter,
    pub requests: Counter,
    registry_age: Gauge,
    view_endpoints: Gauge,
    view_services: Gauge,
    draining_endpoints: Gauge,
    members_alive: Gauge,
    members_down: Gauge,
    local_endpoints: Gauge,
    /// The local API listener's connections.
    pub connections: serve::ConnMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn gossip_name(field: &str) -> String {
    format!("tidings_gossip_{field}_total")
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let counter = |name: &'static str, help: &'static str, result: Option<&'static str>| {
            recorder.describe_counter(
                KeyName::from_const_str(name),
                Some(Unit::Count),
                SharedString::const_str(help),
            );
            let key = match result {
                Some(r) => Key::from_parts(name, vec![Label::from_static_parts("result", r)]),
                None => Key::from_static_name(name),
            };
            recorder.register_counter(&key, &META)
        };
        let gauge = |name: &'static str, help: &'static str, state: Option<&'static str>| {
            recorder.describe_gauge(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
            let key = match state {
                Some(s) => Key::from_parts(name, vec![Label::from_static_parts("state", s)]),
                None => Key::from_static_name(name),
            };
            recorder.register_gauge(&key, &META)
        };
        const CHECKINS: &str = "tidings_agent_checkins_total";
        const CHECKINS_HELP: &str = "Check-in rounds by result.";
        const SYNCS: &str = "tidings_agent_registry_syncs_total";
        const SYNCS_HELP: &str = "Catalog answers by outcome (applied, warming: ignored, error).";
        const CACHE: &str = "tidings_agent_cache_writes_total";
        const CACHE_HELP: &str = "Disk cache writes by result.";
        const REFUSED: &str = "tidings_agent_api_refused_total";
        const REFUSED_HELP: &str = "Local API requests refused, by reason (403 host: a Host header naming another site; 403 foreign_ip: a registration on an address not this host's, without the operator token; 429 max_blocking_waiters: too many blocking queries waiting).";
        const MEMBERS: &str = "tidings_agent_gossip_members";
        const MEMBERS_HELP: &str = "Gossip members by state, this agent excluded.";
        MetricsSnapshot::default().each(|field, help, _| {
            recorder.describe_counter(
                KeyName::from(gossip_name(field)),
                Some(Unit::Count),
                SharedString::const_str(help),
            );
        });
        let connections = serve::ConnMetrics::register(&recorder, "agent");
        Metrics {
            connections,
            checkins_ok: counter(CHECKINS, CHECKINS_HELP, Some("ok")),
            checkins_failed: counter(CHECKINS, CHECKINS_HELP, Some("failed")),
            sync_applied: counter(SYNCS, SYNCS_HELP, Some("applied")),
            sync_warming: counter(SYNCS, SYNCS_HELP, Some("warming")),
            sync_errors: counter(SYNCS, SYNCS_HELP, Some("error")),
            cache_writes: counter(CACHE, CACHE_HELP, Some("ok")),
            cache_write_errors: counter(CACHE, CACHE_HELP, Some("error")),
            cache_load_errors: counter(
                "tidings_agent_cache_load_errors_total",
                "Disk cache files that could not be loaded (ignored).",
                None,
            ),
            checkin_refused: counter(
                "tidings_agent_checkin_refused_endpoints_total",
                "Endpoints the registry refused one by one (4xx), newly or again after being accepted; the rest of the host's endpoints still check in.",
                None,
            ),
            api_refused_host: counter(REFUSED, REFUSED_HELP, Some("host")),
            api_refused_ip: counter(REFUSED, REFUSED_HELP, Some("foreign_ip")),
            api_refused_waiters: counter(REFUSED, REFUSED_HELP, Some("max_blocking_waiters")),
            requests: counter("tidings_agent_requests_total", "Local API requests.", None),
            registry_age: gauge(
                "tidings_agent_registry_age_seconds",
                "Seconds since the registry data was last known current: an authoritative answer, or a blocking query waiting at a healthy registry (-1: never).",
                None,
            ),
            view_endpoints: gauge(
                "tidings_agent_view_endpoints",
                "Endpoints in the merged view.",
                None,
            ),
            view_services: gauge(
                "tidings_agent_view_services",
                "Services in the merged view.",
                None,
            ),
            draining_endpoints: gauge(
                "tidings_agent_draining_endpoints",
                "Deregistered endpoints still listed as draining to proxies.",
                None,
            ),
            members_alive: gauge(MEMBERS, MEMBERS_HELP, Some("alive")),
            members_down: gauge(MEMBERS, MEMBERS_HELP, Some("down")),
            local_endpoints: gauge(
                "tidings_agent_local_endpoints",
                "Endpoints this host serves (the agent's own included).",
                None,
            ),
            recorder,
            handle,
        }
    }

    /// The Prometheus text exposition, with gauges and gossip counters as of `now`.
    pub fn render(&self, now: &Readings) -> String {
        self.registry_age.set(now.registry_age_s);
        self.view_endpoints.set(now.view_endpoints as f64);
        self.view_services.set(now.view_services as f64);
        self.draining_endpoints.set(now.draining_endpoints as f64);
        self.members_alive.set(now.members_alive as f64);
        self.members_down.set(now.members_down as f64);
        self.local_endpoints.set(now.local_endpoints as f64);
        now.gossip.each(|field, _, value| {
            self.recorder
                .register_counter(&Key::from_name(gossip_name(field)), &META)
                .absolute(value);
        });
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
