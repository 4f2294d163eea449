//! The demo's scripted outage, tick by tick: kill the registry, kill a backend, bring the
//! registry back empty, and watch it repopulate; with the running log and live view.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::procs::Proc;
use super::traffic::{self, HttpClient, Stats};
use super::{Cluster, SERVICES, log_path, registry_args, view};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Steady,
    RegistryKilled,
    BackendKilled,
    RegistryBack,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Steady => "steady traffic",
            Phase::RegistryKilled => "registry SIGKILLed: lookups and traffic must go on",
            Phase::BackendKilled => "backend killed: health checks take it out",
            Phase::RegistryBack => "registry restarted empty: repopulating from check-ins",
        }
    }
}

/// Where the script is, what it did, and what it measured.
pub(super) struct Script {
    /// The whole run's length; each step comes at a share of it.
    duration: Duration,
    /// Redraw the live view (a terminal) rather than print the log as it goes.
    live: bool,
    /// `--json`: print nothing but the summary.
    quiet: bool,
    expected_endpoints: usize,
    killed_backend: usize,
    phase: Phase,
    events: Vec<String>,
    down_since: Option<Instant>,
    pub(super) downtime: Duration,
    back_at: Option<Instant>,
    pub(super) repopulated: Option<Duration>,
}

impl Script {
    pub(super) fn new(
        duration: Duration,
        live: bool,
        quiet: bool,
        expected_endpoints: usize,
        killed_backend: usize,
    ) -> Script {
        Script {
            duration,
            live,
            quiet,
            expected_endpoints,
            killed_backend,
            phase: Phase::Steady,
            events: Vec::new(),
            down_since: None,
            downtime: Duration::ZERO,
            back_at: None,
            repopulated: None,
        }
    }

    /// Records an event (and prints it, unless the live view or `--json` is on).
    fn note(&mut self, elapsed: Duration, e: String) {
        let line = format!("[{:>3}s] {e}", elapsed.as_secs());
        if !self.live && !self.quiet {
            println!("{line}");
        }
        self.events.push(line);
    }

    /// Takes the next step once its time has come: at most one a tick.
    pub(super) async fn step(
        &mut self,
        c: &mut Cluster,
        stats: &Stats,
        elapsed: Duration,
    ) -> Result<()> {
        let duration = self.duration;
        let at = |share: f64| duration.mul_f64(share);
        if self.phase == Phase::Steady && elapsed >= at(0.15) {
            c.registry.kill().await;
            stats.registry_down.store(true, Ordering::Relaxed);
            self.down_since = Some(Instant::now());
            self.phase = Phase::RegistryKilled;
            self.note(elapsed, "SIGKILL registry".into());
        } else if self.phase == Phase::RegistryKilled && elapsed >= at(0.35) {
            let b = &c.backends[self.killed_backend];
            b.kill();
            self.phase = Phase::BackendKilled;
            self.note(
                elapsed,
                format!(
                    "killed backend {} of host-{} at {}",
                    b.service, b.host, b.addr
                ),
            );
        } else if self.phase == Phase::BackendKilled && elapsed >= at(0.6) {
            self.restart_registry(c, stats, elapsed).await?;
        }
        Ok(())
    }

    /// Restarts the registry on its address with an empty store.
    async fn restart_registry(
        &mut self,
        c: &mut Cluster,
        stats: &Stats,
        elapsed: Duration,
    ) -> Result<()> {
        let listen = c.registry_addr.to_string();
        let log = log_path(c.dir.path(), "registry-2");
        c.registry = Proc::start("registry", &registry_args(&listen), 1, log).await?;
        stats.registry_down.store(false, Ordering::Relaxed);
        self.end_outage();
        self.back_at = Some(Instant::now());
        self.phase = Phase::RegistryBack;
        self.note(
            elapsed,
            format!(
                "registry restarted on {listen} with an empty store (down {:.1}s)",
                self.downtime.as_secs_f64()
            ),
        );
        Ok(())
    }

    /// Ends the registry's downtime, if it is down.
    pub(super) fn end_outage(&mut self) {
        if let Some(t) = self.down_since.take() {
            self.downtime = t.elapsed();
        }
    }

    /// Once the registry is back: notes when it lists every endpoint again.
    pub(super) async fn check_repopulated(
        &mut self,
        client: &HttpClient,
        c: &Cluster,
        elapsed: Duration,
    ) {
        let (Some(t), None) = (self.back_at, self.repopulated) else {
            return;
        };
        let url = format!("http://{}/v2/services", c.registry_addr);
        if let Ok((200, _, body)) = traffic::get(client, &url, None, Duration::from_secs(1)).await {
            let n = demo_endpoints(&body);
            if n as usize >= self.expected_endpoints {
                self.repopulated = Some(t.elapsed());
                self.note(
                    elapsed,
                    format!(
                        "registry repopulated: {n} endpoints after {:.1}s",
                        t.elapsed().as_secs_f64()
                    ),
                );
            }
        }
    }

    /// Prints one frame of the view: the live screen, or one line when not on a terminal.
    pub(super) async fn show(
        &self,
        client: &HttpClient,
        c: &Cluster,
        services: &[String],
        stats: &Stats,
        elapsed: Duration,
    ) {
        let mut agents = Vec::new();
        for (i, api) in c.agent_apis.iter().enumerate() {
            agents.push(view::agent_row(client, &format!("agent-{i}"), api, services).await);
        }
        let hosts = view::proxy_hosts(client, &c.admin_addr).await;
        let (rps, errs) = stats.take_window();
        let (requests, errors_total) = stats
            .counts
            .lock()
            .map(|c| (c.requests, c.errors))
            .unwrap_or_default();
        let frame = view::Frame {
            elapsed,
            total: self.duration,
            phase: self.phase.label(),
            registry_up: !stats.registry_down.load(Ordering::Relaxed),
            rps,
            errors: errs,
            requests,
            errors_total,
            services,
            agents: &agents,
            hosts: &hosts,
            events: &self.events,
        };
        if self.live {
            print!("{}", view::screen(&frame))
        } else {
            println!("{}", view::line(&frame))
        }
    }
}

/// How many hosts of the demo's services a `/v2/services` answer lists.
fn demo_endpoints(body: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| SERVICES.contains(&s["service"].as_str().unwrap_or("")))
        .filter_map(|s| s["hosts"].as_u64())
        .sum()
}
