//! The fleet run's figures: per change, over the churn window (churn plus drain).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Fleet, FleetArgs, NOT_SENT};

pub struct Report<'a> {
    pub args: &'a FleetArgs,
    pub fleet: &'a Fleet,
    /// Clients that held a view when the churn started: a change is complete when it
    /// reached all of them.
    pub clients: usize,
    pub first_sync: Duration,
    pub sent: usize,
    /// How long sending the changes took.
    pub churn_time: Duration,
    pub drained: bool,
    pub window: Duration,
    /// Fleet counters and the registry's (CPU seconds, bytes written), before and after.
    pub before: ([u64; 6], (f64, u64)),
    pub after: ([u64; 6], (f64, u64)),
}

/// The `p` quantile of sorted `v` (nearest rank), 0 when empty.
fn pct(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

impl Report<'_> {
    /// Per complete change, the time from its check-in being sent to its arrival at the last
    /// client (ms), sorted; and how many sent changes did not reach every client.
    fn latencies(&self) -> (Vec<u64>, usize) {
        let f = self.fleet;
        let mut done = Vec::new();
        let mut incomplete = 0;
        for k in 0..f.published.load(Ordering::Relaxed) {
            let sent = f.sent_us[k].load(Ordering::Relaxed);
            if sent == NOT_SENT {
                continue;
            }
            if (f.arrived_count[k].load(Ordering::Relaxed) as usize) < self.clients {
                incomplete += 1;
                continue;
            }
            let last = f.arrived_max_us[k].load(Ordering::Relaxed);
            done.push(last.saturating_sub(sent) / 1000);
        }
        done.sort_unstable();
        (done, incomplete)
    }

    pub fn text(&self) -> String {
        let d = |i: usize| self.after.0[i].saturating_sub(self.before.0[i]);
        let per = self.sent.max(1) as f64;
        let bytes = d(0);
        let cpu = (self.after.1.0 - self.before.1.0).max(0.0);
        let written = self.after.1.1.saturating_sub(self.before.1.1);
        let secs = self.window.as_secs_f64().max(1e-9);
        let (lat, incomplete) = self.latencies();
        let a = self.args;
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "fleet: protocol {:?}, {} of {} clients synced in {:.1} s, {} services x {} hosts, \
             accept-encoding {}",
            a.protocol,
            self.clients,
            a.clients,
            self.first_sync.as_secs_f64(),
            a.services,
            a.hosts,
            a.accept_encoding.as_deref().unwrap_or("(none)")
        ));
        line(format!(
            "churn: {} changes sent ({:.1}/s) in {:.1} s window (churn {:?} planned + drain{}), \
             {} reached every client, {} did not",
            self.sent,
            self.sent as f64 / self.churn_time.as_secs_f64().max(1e-9),
            secs,
            a.churn,
            if self.drained {
                ""
            } else {
                ", drain timed out"
            },
            lat.len(),
            incomplete
        ));
        line(format!(
            "egress (bytes the clients read, headers and bodies): {bytes} total, {:.0} per change, \
             {:.0} per change per client (goal <= 2048)",
            bytes as f64 / per,
            bytes as f64 / per / self.clients.max(1) as f64
        ));
        if !a.registry_pid.is_empty() {
            line(format!(
                "registry: {cpu:.2} CPU s, {:.4} CPU s per change, {:.1} % of one core (goal <= 50 %); \
                 wchar {written} bytes, {:.0} per change",
                cpu / per,
                100.0 * cpu / secs,
                written as f64 / per
            ));
        }
        line(format!(
            "change to all clients: p50 {} ms, p99 {} ms, max {} ms (goal p99 <= 2000 ms)",
            pct(&lat, 0.50),
            pct(&lat, 0.99),
            lat.last().copied().unwrap_or(0)
        ));
        line(format!(
            "clients in the window: {} answers, {} full syncs, {} deltas applied, {} deltas refused, \
             {} errors; whole answers without a matching digest (whole run): {}",
            d(1),
            d(2),
            d(3),
            d(4),
            d(5),
            self.fleet.unverified.load(Ordering::Relaxed)
        ));
        out
    }
}
