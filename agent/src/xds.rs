//! The agent's xDS server (docs/ARCHITECTURE.md#xds-server): Envoy's aggregated discovery
//! service (ADS) over gRPC on its own loopback listener (default `127.0.0.1:7703`), both
//! state-of-the-world and incremental, for listeners, routes, clusters and endpoints made
//! from the merged view — enough for an Envoy with one `ads_config`, or a proxyless gRPC
//! client resolving `xds:///SERVICE`.
//!
//! - [`resources`]: the resources of a view and their versions ([`Catalog`]), rebuilt per
//!   view change, re-encoding only the services that changed.
//! - [`protocol`]: one stream's protocol state, sans IO (subscriptions, nonces, ACK/NACK).
//! - `server`: the tonic shell: one task per stream, pushing as soon as the view changes.
//! - `grpc`: the ADS methods' routing and response encoding (each message in a buffer of
//!   its own size, freed once written).
//! - `held`: what a client holds of a type, shared with the catalog once it has caught up.

use std::net::SocketAddr;
use std::sync::Mutex;

use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::PrometheusRecorder;
use serde::{Deserialize, Serialize};
use serve::{Family, Registrar};

mod grpc;
mod held;
pub mod protocol;
pub mod resources;
mod server;

pub use resources::{Catalog, Kind};
pub use server::{XdsServer, bind, spawn};

/// The xDS listener's port when `listen` is not set.
pub const DEFAULT_PORT: u16 = 7703;

/// `[xds]` of the agent's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XdsConfig {
    /// Serve xDS at all.
    pub enabled: bool,
    /// Loopback address of the xDS listener; default: the local API's address with port
    /// 7703 (`127.0.0.1:7703`; port 0 when the API's is 0, as in tests).
    pub listen: Option<SocketAddr>,
    /// Open ADS streams at most; one more is refused (`RESOURCE_EXHAUSTED`).
    pub max_streams: usize,
    /// Resource names one type's subscription on one stream may hold.
    pub max_resource_names: usize,
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            enabled: true,
            listen: None,
            max_streams: 1024,
            max_resource_names: 16_384,
        }
    }
}

impl XdsConfig {
    /// Where to listen, given the local API's configured address; `None`: xDS is off.
    pub fn address(&self, api: SocketAddr) -> Option<SocketAddr> {
        if !self.enabled {
            return None;
        }
        Some(self.listen.unwrap_or_else(|| {
            let port = if api.port() == 0 { 0 } else { DEFAULT_PORT };
            SocketAddr::new(api.ip(), port)
        }))
    }

    pub fn validate(&self, api: SocketAddr) -> Result<(), &'static str> {
        if !self.enabled {
            return Ok(());
        }
        if self.address(api).is_some_and(|a| !a.ip().is_loopback()) {
            return Err("the xDS server must listen on a loopback address");
        }
        if self.max_streams == 0 || self.max_resource_names == 0 {
            return Err("xds.max_streams and xds.max_resource_names must be > 0");
        }
        Ok(())
    }
}

/// The xDS server's metrics (registered with the agent's others, in [`crate::metrics`]).
pub struct XdsMetrics {
    pub streams: Gauge,
    pub refused_streams: Counter,
    pub bad_requests: Counter,
    responses: Vec<Counter>,
    nacks: Vec<Counter>,
    /// The error of the last NACK of each type, shown by `/metrics` as an info metric.
    last_nack: Mutex<[Option<String>; 4]>,
}

const LAST_NACK: &str = "tidings_agent_xds_last_nack_info";
/// Longest NACK error shown: the client's text, cut so a metric line stays readable.
const MAX_NACK_TEXT: usize = 200;

impl XdsMetrics {
    pub fn register(reg: &Registrar<'_, PrometheusRecorder>) -> Self {
        let responses: Family<Counter, 1> = reg.family(
            "tidings_agent_xds_responses_total",
            "xDS responses sent, by type (lds, rds, cds, eds), both variants.",
            ["type"],
        );
        let nacks: Family<Counter, 1> = reg.family(
            "tidings_agent_xds_nacks_total",
            "xDS responses a client rejected (NACK), by type; the client keeps its last accepted version. The last error per type is tidings_agent_xds_last_nack_info.",
            ["type"],
        );
        let refused: Family<Counter, 1> = reg.family(
            "tidings_agent_xds_refused_total",
            "ADS streams refused or ended by the server, by reason (max_streams: over xds.max_streams; bad_request: an unknown type_url or too many resource names).",
            ["reason"],
        );
        XdsMetrics {
            streams: reg.one("tidings_agent_xds_streams", "Open ADS streams."),
            refused_streams: reg.get(&refused, ["max_streams"]),
            bad_requests: reg.get(&refused, ["bad_request"]),
            responses: Kind::ALL.map(|k| reg.get(&responses, [k.label()])).to_vec(),
            nacks: Kind::ALL.map(|k| reg.get(&nacks, [k.label()])).to_vec(),
            last_nack: Mutex::new(Default::default()),
        }
    }

    pub fn responded(&self, kind: Kind) {
        if let Some(c) = self.responses.get(kind as usize) {
            c.increment(1);
        }
    }

    pub fn nacked(&self, kind: Kind, error: &str) {
        if let Some(c) = self.nacks.get(kind as usize) {
            c.increment(1);
        }
        let text: String = error.chars().take(MAX_NACK_TEXT).collect();
        let mut last = self.last_nack.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = last.get_mut(kind as usize) {
            *slot = Some(text);
        }
    }

    /// Appends the last NACK error per type to a Prometheus text exposition.
    pub fn render_last_nacks(&self, out: &mut String) {
        let last = self.last_nack.lock().unwrap_or_else(|p| p.into_inner());
        if last.iter().all(Option::is_none) {
            return;
        }
        out.push_str(&format!(
            "# HELP {LAST_NACK} The error of the last xDS NACK of each type (1 per type that had one).\n# TYPE {LAST_NACK} gauge\n"
        ));
        for (kind, error) in Kind::ALL.iter().zip(last.iter()) {
            if let Some(e) = error {
                out.push_str(&format!(
                    "{LAST_NACK}{{type=\"{}\",error=\"{}\"}} 1\n",
                    kind.label(),
                    escape_label(e)
                ));
            }
        }
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
