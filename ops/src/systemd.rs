//! systemd integration for `Type=notify` units (ops/deploy/systemd/): READY=1 once every
//! listener is bound, WATCHDOG=1 while the runtime is responsive, STOPPING=1 on shutdown.
//! Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Tells systemd the service is up, with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
}

/// Tells systemd the service is draining.
pub fn stopping() {
    let _ = sd_notify::notify(
        false,
        &[NotifyState::Stopping, NotifyState::Status("draining")],
    );
}

/// When the unit sets `WatchdogSec=`, pings systemd at half the interval from a tokio task:
/// a wedged runtime stops the pings and systemd restarts the service.
pub fn spawn_watchdog(shutdown: CancellationToken) {
    let Some(usec) = watchdog_usec() else { return };
    let period = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = tick.tick() => { let _ = sd_notify::notify(false, &[NotifyState::Watchdog]); }
                () = shutdown.cancelled() => break,
            }
        }
    });
}

/// `WATCHDOG_USEC`, as libsystemd's `sd_watchdog_enabled` reads it: `WATCHDOG_PID` is optional
/// but, when present, must name this process (sd-notify's helper insists on it being set).
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then_some(usec)
}
