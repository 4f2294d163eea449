//! `serve`: the registry on a socket, with the sweeper, until a shutdown token fires.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::router::router;
use crate::registry::Registry;
use crate::sweep::run_sweeper;

/// Serves the registry on `listener` (the caller binds it, so tests can use port 0) and runs
/// the sweeper beside it — do not start [`run_sweeper`] yourself as well.
///
/// When `shutdown` fires: readiness fails and blocking queries answer at once; after
/// `shutdown_delay` (for load balancers to notice) the listener closes; in-flight requests get
/// `drain_timeout` to finish before their connections are dropped. Returns once stopped.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let cfg = registry.config().clone();
    // Loaded before anything starts: a registry must not come up without the certificate
    // it was told to serve.
    let tls = match &cfg.tls {
        Some(files) => {
            Some(std::sync::Arc::new(files.load().map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
            })?))
        }
        None => None,
    };
    if cfg.secret.is_none() {
        tracing::warn!(
            "no write secret configured: writes are open: anyone who reaches the registry can \
             register or deregister anything"
        );
    } else if tls.is_none() {
        tracing::warn!(
            "write tokens cross the network in clear: the registry serves plain HTTP; \
             configure [tls] (or --tls-cert and --tls-key) unless a TLS proxy fronts it"
        );
    }
    let sweeper_stop = CancellationToken::new();
    let sweeper = tokio::spawn(run_sweeper(registry.clone(), sweeper_stop.clone()));

    let signal = {
        let registry = registry.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            registry.start_draining();
            tracing::info!(delay = ?cfg.shutdown_delay, "registry draining: readiness failed");
            tokio::time::sleep(cfg.shutdown_delay).await;
        }
    };
    // The hardened listener (connection cap with oldest-idle eviction, header, idle and
    // write timeouts, TCP_NODELAY, the peer address for v1 `auto_ip`); it stops accepting
    // when `signal` resolves and gives in-flight requests `drain_timeout`.
    let result = match cfg.listener_limits() {
        Ok(limits) => {
            let options = serve::Options {
                component: "registry",
                limits,
                metrics: registry.inner.metrics.connections.clone(),
                drain: cfg.drain_timeout,
                tls,
            };
            serve::http(listener, router(registry.clone()), options, signal).await
        }
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)),
    };
    sweeper_stop.cancel();
    if let Err(e) = sweeper.await {
        tracing::warn!(error = %e, "sweeper task failed");
    }
    tracing::info!("registry stopped");
    result
}
