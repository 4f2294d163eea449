//! The admin listener on the workspace's hardened HTTP listener (`serve`): a connection cap
//! at which the longest-idle connection makes room, header-read, idle and write timeouts,
//! and accept back-off — the same code the registry and the agent API run on.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// How long in-flight admin requests get to finish once the listener stops.
const DRAIN: Duration = Duration::from_secs(1);

/// Serves the admin endpoints on `listener` until `stop`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let cfg = &shared.config.admin;
    let limits = ::serve::Limits {
        header_read_timeout: cfg.header_read_timeout,
        idle_timeout: cfg.idle_timeout,
        ..::serve::Limits::with_max_connections(cfg.max_connections)
    };
    let options = ::serve::Options {
        component: "proxy_admin",
        limits,
        // The proxy records into the global recorder, installed before listeners start.
        metrics: ::serve::ConnMetrics::global("proxy_admin"),
        drain: DRAIN,
        tls: None,
    };
    let app = tower::service_fn(move |req| super::handle(shared.clone(), req));
    if let Err(e) = ::serve::http(listener, app, options, stop.cancelled_owned()).await {
        tracing::error!(error = %e, "admin listener failed");
    }
}
