//! The processes a campaign runs itself besides the fleet's agents and proxy: registry
//! replicas (restartable with the same command line) and cron-only hosts.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::bounds::HOST_INTERVAL;
use super::world::SETTLE;
use crate::{Proc, run};

pub(super) fn seconds(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A registry replica, restartable with the same command line and clock file.
pub(super) struct Registry {
    pub(super) proc: Option<Proc>,
    pub(super) name: String,
    pub(super) args: Vec<String>,
    pub(super) clock: PathBuf,
}

impl Registry {
    pub(super) fn start(&mut self) -> Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let clock = self.clock.display().to_string();
        let env = [(schema_clock_env(), clock.as_str())];
        self.proc = Some(Proc::start_in_env(
            None, &self.name, &args, &env, 1, SETTLE,
        )?);
        Ok(())
    }

    pub(super) fn proc(&self) -> Result<&Proc> {
        self.proc.as_ref().context("registry not running")
    }
}

/// The clock hook's variable (`schema::timefmt::CLOCK_OFFSET_ENV`; the tests library does
/// not depend on schema).
pub(super) fn schema_clock_env() -> &'static str {
    "TIDINGS_CLOCK_OFFSET_FILE"
}

/// A cron-only host: `tidings checkin` once per check-in interval, on its own thread.
pub(super) struct Cron {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Cron {
    pub(super) fn start(registry: String, service: String, port: u16, ip: String) -> Cron {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let port = port.to_string();
            let timeout = seconds(HOST_INTERVAL);
            let args = [
                "checkin",
                "--registry",
                &registry,
                "--service",
                &service,
                "--port",
                &port,
                "--ip",
                &ip,
                "--no-splay",
                "--timeout",
                &timeout,
            ];
            let started = Instant::now();
            // Bounded: a day of check-ins at most; the flag ends it long before.
            for _ in 0..100_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let began = Instant::now();
                // The outcome is not judged: a check-in while the registry is down fails, and
                // the next one retries, as cron would. A failure is printed, with when it
                // ended, so a late host in a violation can be told from a slow check-in.
                let failed = match run(&args, Duration::from_secs(5)) {
                    Ok((0, _, _)) => None,
                    Ok((code, _, stderr)) => Some(format!(
                        "exit {code}: {}",
                        stderr.lines().last().unwrap_or_default()
                    )),
                    // `run`'s deadline error repeats every argument; say it short.
                    Err(e) if e.to_string().contains("did not finish") => {
                        Some("no exit within 5 s, killed".to_string())
                    }
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = failed {
                    eprintln!(
                        "  cron {ip}:{port}: check-in that began {:.1?} after the host started \
                         failed after {:.1?}: {why}",
                        began.duration_since(started),
                        began.elapsed()
                    );
                }
                let left = HOST_INTERVAL.saturating_sub(began.elapsed());
                std::thread::sleep(left);
            }
        });
        Cron {
            stop,
            thread: Some(thread),
        }
    }

    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Cron {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
