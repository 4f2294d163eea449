//! The agent's Prometheus metrics on `metrics` + `metrics-exporter-prometheus`, owned by the
//! agent's state rather than a process-global recorder (as the registry's are), so tests that
//! run several agents in one process never share counters. Counters are registered once and
//! bumped through lock-free handles; gauges and the gossip core's counters are read when
//! `/metrics` is rendered.

use gossip::MetricsSnapshot;
use metrics::{Counter, Gauge, Level, Metadata};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serve::{Family, Registrar};

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
    handle: PrometheusHandle,
    /// One per field of [`MetricsSnapshot`], in [`MetricsSnapshot::each`]'s order.
    gossip: Vec<Counter>,
    pub checkins_ok: Counter,
    pub checkins_failed: Counter,
    pub sync_applied: Counter,
    pub sync_warming: Counter,
    pub sync_errors: Counter,
    /// Catalog deltas applied (the registry sent only what changed).
    pub sync_deltas: Counter,
    /// Whole catalogs fetched, by why ([`FULL_REASONS`]).
    sync_full: Vec<Counter>,
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
    /// Blocking queries waiting on the local API now.
    pub blocking: Gauge,
    registry_age: Gauge,
    view_endpoints: Gauge,
    view_services: Gauge,
    draining_endpoints: Gauge,
    members_alive: Gauge,
    members_down: Gauge,
    local_endpoints: Gauge,
    /// The local API listener's connections.
    pub connections: serve::ConnMetrics,
    pub dns: crate::dns::DnsMetrics,
    pub xds: crate::xds::XdsMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Why the agent fetched a whole catalog rather than a delta: `start` (nothing held yet),
/// `error` (the last query failed), `decode` (the last answer was unreadable), `warming`
/// (it polls a warming registry without an index), `unknown_index` (the registry no longer
/// held the agent's view: trimmed from its history, restarted, another replica), `base` (a
/// delta from an index the agent did not hold), `digest` (what the agent rebuilt did not
/// match the registry's digest).
pub const FULL_REASONS: [&str; 7] = [
    "start",
    "error",
    "decode",
    "warming",
    "unknown_index",
    "base",
    "digest",
];

fn gossip_name(field: &str) -> String {
    format!("tidings_gossip_{field}_total")
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let reg = Registrar::new(&recorder, &META);
        let counter = |name: &'static str, help| reg.one::<Counter>(name, help);
        let gauge = |name: &'static str, help| reg.one::<Gauge>(name, help);
        const CHECKINS: &str = "tidings_agent_checkins_total";
        const CHECKINS_HELP: &str = "Check-in rounds by result.";
        const SYNCS: &str = "tidings_agent_registry_syncs_total";
        const SYNCS_HELP: &str = "Catalog answers by outcome (applied, warming: ignored, error).";
        const CACHE: &str = "tidings_agent_cache_writes_total";
        const CACHE_HELP: &str = "Disk cache writes by result.";
        const REFUSED: &str = "tidings_agent_api_refused_total";
        const REFUSED_HELP: &str = "Local API requests refused, by reason (403 host: a Host header naming another site; 403 foreign_ip: a registration on an address not this host's, without the operator token; 429 max_blocking_waiters: too many blocking queries waiting).";
        const FULL: &str = "tidings_agent_registry_full_syncs_total";
        const FULL_HELP: &str = "Whole catalogs fetched from the registry instead of a delta, by reason (start, error, decode, warming, unknown_index: the registry no longer held our view, base: a delta from another index, digest: the rebuilt catalog did not match).";
        const MEMBERS: &str = "tidings_agent_gossip_members";
        const MEMBERS_HELP: &str = "Gossip members by state, this agent excluded.";
        let mut gossip = Vec::new();
        MetricsSnapshot::default().each(|field, help, _| {
            gossip.push(reg.one::<Counter>(gossip_name(field), help));
        });
        let checkins: Family<Counter, 1> = reg.family(CHECKINS, CHECKINS_HELP, ["result"]);
        let syncs: Family<Counter, 1> = reg.family(SYNCS, SYNCS_HELP, ["result"]);
        let cache: Family<Counter, 1> = reg.family(CACHE, CACHE_HELP, ["result"]);
        let refused: Family<Counter, 1> = reg.family(REFUSED, REFUSED_HELP, ["result"]);
        let members: Family<Gauge, 1> = reg.family(MEMBERS, MEMBERS_HELP, ["state"]);
        let full: Family<Counter, 1> = reg.family(FULL, FULL_HELP, ["reason"]);
        let connections = serve::ConnMetrics::register(&recorder, "agent");
        Metrics {
            dns: crate::dns::DnsMetrics::register(&reg),
            xds: crate::xds::XdsMetrics::register(&reg),
            connections,
            checkins_ok: reg.get(&checkins, ["ok"]),
            checkins_failed: reg.get(&checkins, ["failed"]),
            sync_applied: reg.get(&syncs, ["applied"]),
            sync_warming: reg.get(&syncs, ["warming"]),
            sync_errors: reg.get(&syncs, ["error"]),
            sync_deltas: counter(
                "tidings_agent_registry_deltas_total",
                "Catalog deltas applied: the registry sent only what changed since the agent's view.",
            ),
            sync_full: FULL_REASONS.map(|r| reg.get(&full, [r])).to_vec(),
            cache_writes: reg.get(&cache, ["ok"]),
            cache_write_errors: reg.get(&cache, ["error"]),
            cache_load_errors: counter(
                "tidings_agent_cache_load_errors_total",
                "Disk cache files that could not be loaded (ignored).",
            ),
            checkin_refused: counter(
                "tidings_agent_checkin_refused_endpoints_total",
                "Endpoints the registry refused one by one (4xx), newly or again after being accepted; the rest of the host's endpoints still check in.",
            ),
            api_refused_host: reg.get(&refused, ["host"]),
            api_refused_ip: reg.get(&refused, ["foreign_ip"]),
            api_refused_waiters: reg.get(&refused, ["max_blocking_waiters"]),
            requests: counter("tidings_agent_requests_total", "Local API requests."),
            blocking: gauge(
                "tidings_agent_blocking_queries",
                "Blocking queries waiting on the local API now.",
            ),
            registry_age: gauge(
                "tidings_agent_registry_age_seconds",
                "Seconds since the registry data was last known current: an authoritative answer, or a blocking query waiting at a healthy registry (-1: never).",
            ),
            view_endpoints: gauge(
                "tidings_agent_view_endpoints",
                "Endpoints in the merged view.",
            ),
            view_services: gauge(
                "tidings_agent_view_services",
                "Services in the merged view.",
            ),
            draining_endpoints: gauge(
                "tidings_agent_draining_endpoints",
                "Deregistered endpoints still listed as draining to proxies.",
            ),
            members_alive: reg.get(&members, ["alive"]),
            members_down: reg.get(&members, ["down"]),
            local_endpoints: gauge(
                "tidings_agent_local_endpoints",
                "Endpoints this host serves (the agent's own included).",
            ),
            gossip,
            handle,
        }
    }

    /// Counts a whole catalog fetched for `reason`, one of [`FULL_REASONS`].
    pub fn full_sync(&self, reason: &str) {
        let at = FULL_REASONS.iter().position(|r| *r == reason);
        if let Some(c) = at.and_then(|i| self.sync_full.get(i)) {
            c.increment(1);
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
        let mut handles = self.gossip.iter();
        now.gossip.each(|_, _, value| {
            if let Some(c) = handles.next() {
                c.absolute(value);
            }
        });
        let mut text = self.handle.render();
        self.xds.render_last_nacks(&mut text);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
