//! Prometheus metrics. The proxy records through the `metrics` facade; this module installs a
//! Prometheus recorder once per process and keeps its handle for `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use. `None` when some
/// other recorder was installed first (then `/metrics` says so rather than lying).
/// A host binary that wants the same registry for its own metrics calls this before
/// installing anything else.
pub fn prometheus_handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "could not install the Prometheus recorder");
                None
            }
        })
        .clone()
}
