//! `serve`: the registry on a socket, with the sweeper, until a shutdown token fires.

use std::net::SocketAddr;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::router::router;
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
    if cfg.secret.is_none() {
        tracing::warn!(
            "no write secret configured: writes are open: anyone who reaches the registry can \
             register or deregister anything"
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
    // Check-ins are small request/response pairs: don't let Nagle hold them back.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    // With the peer address, for v1 check-ins that ask for `auto_ip`.
    let app = router(registry.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    let hard_stop = async {
        shutdown.cancelled().await;
        tokio::time::sleep(cfg.shutdown_delay + cfg.drain_timeout).await;
    };
    let result = tokio::select! {
        res = server => res,
        () = hard_stop => {
            tracing::warn!(grace = ?cfg.drain_timeout, "drain grace period over; dropping remaining connections");
            Ok(())
        }
    };
    sweeper_stop.cancel();
    if let Err(e) = sweeper.await {
        tracing::warn!(error = %e, "sweeper task failed");
    }
    tracing::info!("registry stopped");
    result
}
