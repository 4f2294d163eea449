//! Prometheus metrics. The proxy records on the process-global recorder, in families described
//! once (`crate::cluster::families`) with handles registered once per cluster or host; this
//! module installs a Prometheus recorder once per process and keeps its handle for `/metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets from 0.5 ms to 10 s, as the registry's: histograms (unlike summaries)
/// aggregate across proxies, and recording into buckets is cheaper.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A gauge not set for this long leaves `/metrics`. The proxy sets every live cluster's and
/// host's gauges once a second, so only a forgotten host's go: its last value would
/// otherwise stay forever, as if it were still there. Counters and histograms are kept.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The process's Prometheus handle, installing the recorder on first use. `None` when some
/// other recorder was installed first (then `/metrics` says so rather than lying).
/// A host binary that wants the same registry for its own metrics calls this before
/// installing anything else.
pub fn prometheus_handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            // `set_buckets` only fails on an empty list.
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT));
            match builder.install_recorder() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "could not install the Prometheus recorder");
                    None
                }
            }
        })
        .clone()
}
