//! Runs one seed: starts the fleet, plays the schedule on this thread while a checker
//! thread asks every view a few times a second, and returns what the invariants saw.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use super::Config;
use super::bounds::{AGENT_EP_VISIBLE, CHECK_EVERY};
use super::judge::{HealthyAge, Judge, Seen, Violation};
use super::model::{EpState, Model, Owner, Viewer};
use super::schedule::Schedule;
use super::world::{DynamoStarter, Effect, World, host_ip};
use crate::fleet::lookup_within;
use crate::traffic::Report;

/// What one seed's run saw.
#[derive(Debug)]
pub struct Outcome {
    pub schedule: Schedule,
    pub violations: Vec<Violation>,
    /// Per check, evaluations made.
    pub checks: BTreeMap<&'static str, u64>,
    /// Faults started, by kind.
    pub injected: BTreeMap<&'static str, u64>,
    /// Faults the engine could not apply or undo (an engine or process failure, not a
    /// verdict on an invariant).
    pub engine_errors: Vec<String>,
    pub traffic: String,
    /// Registry ages seen while healthy.
    pub healthy_age: HealthyAge,
    pub took: Duration,
    /// On failure: where every process's log and the replicas' `/v1/ops/status` answers at
    /// each new violation were written (kept after the run).
    pub evidence: Option<std::path::PathBuf>,
}

impl Outcome {
    pub fn failed(&self) -> bool {
        !self.violations.is_empty() || !self.engine_errors.is_empty()
    }

    /// The summary printed after every seed; on failure, also the whole schedule.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "campaign seed {} ({:?}, {:.0?}): faults injected {:?}; invariant checks {:?}; \
             registry age while healthy: {}; traffic: {}",
            self.schedule.seed,
            self.schedule.store,
            self.took,
            self.injected,
            self.checks,
            self.healthy_age,
            self.traffic
        );
        let _ = writeln!(s, "{} violations", self.violations.len());
        for v in &self.violations {
            let _ = writeln!(
                s,
                "  VIOLATION {} at {:.1?} (seen until {:.1?}, {} rounds): {}",
                v.check, v.at, v.last, v.rounds, v.details
            );
        }
        for e in &self.engine_errors {
            let _ = writeln!(s, "  ENGINE ERROR {e}");
        }
        if let Some(dir) = &self.evidence {
            let _ = writeln!(
                s,
                "logs and registry status at each violation: {}",
                dir.display()
            );
        }
        if self.failed() {
            let _ = writeln!(
                s,
                "replay with TIDINGS_CAMPAIGN_SEEDS={} (same TIDINGS_CAMPAIGN_SECS); schedule:\n{}",
                self.schedule.seed, self.schedule
            );
        }
        s
    }
}

/// Runs `seed` under `cfg`.
pub fn run_seed(seed: u64, cfg: &Config, dynamo: DynamoStarter<'_>) -> Result<Outcome> {
    let schedule = cfg.schedule(seed);
    println!("campaign start: {schedule}");
    let began = Instant::now();
    let tmp = tempfile_dir(seed)?;
    let run_for = Duration::from_secs(cfg.secs);
    let mut world = World::start(
        schedule.store,
        cfg.agents,
        cfg.cron_hosts,
        &tmp,
        dynamo,
        run_for + Duration::from_secs(30),
    )?;
    let t0 = Instant::now();
    let model = Arc::new(Mutex::new(settled_model(cfg, &schedule, t0)));
    let judge = Arc::new(Mutex::new(Judge::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(String::new()));
    let checker = {
        let (m, j, s) = (model.clone(), judge.clone(), stop.clone());
        let views = Views {
            agents: world.agent_urls(),
            admin: world.admin.clone(),
            registries: world.registry_urls(),
            statuses: statuses.clone(),
        };
        std::thread::spawn(move || check_loop(&m, &j, &s, &views))
    };

    let (injected, mut engine_errors) = play(&schedule, &mut world, &model, t0);
    std::thread::sleep((t0 + run_for).saturating_duration_since(Instant::now()));
    engine_errors.extend(world.crashed());
    stop.store(true, Ordering::Relaxed);
    checker
        .join()
        .map_err(|_| anyhow!("checker thread panicked"))?;
    let load = world.load.take().ok_or_else(|| anyhow!("no load"))?;
    let report = load.finish()?;
    let mut judge = std::mem::take(&mut *judge.lock().map_err(|_| anyhow!("judge lock"))?);
    judge_get_errors(&mut judge, &report);
    judge.violations.sort_by_key(|v| v.at);
    let passed = judge.violations.is_empty();
    let evidence = keep_evidence(seed, &world, &statuses, passed, &mut engine_errors);
    drop(world);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(Outcome {
        schedule,
        violations: judge.violations,
        checks: judge.checks,
        injected,
        engine_errors,
        traffic: report.line(),
        healthy_age: judge.healthy_age,
        took: began.elapsed(),
        evidence,
    })
}

/// The record of the fleet `World::start` just saw whole, as of `t0`.
fn settled_model(cfg: &Config, schedule: &Schedule, t0: Instant) -> Model {
    let web = |h: usize| format!("{}:8080", host_ip(h));
    let backends: Vec<String> = (0..cfg.agents + cfg.cron_hosts).map(web).collect();
    let mut model = Model::new(t0, cfg.agents, schedule.store.replicas(), backends, 0);
    // The fleet was just seen whole: every host counts as visible from now on.
    let seen_since = t0.checked_sub(3 * AGENT_EP_VISIBLE).unwrap_or(t0);
    for h in 0..cfg.agents + cfg.cron_hosts {
        let owner = if h < cfg.agents {
            Owner::Agent(h)
        } else {
            // As `World::start` spreads them.
            Owner::Cron((h - cfg.agents) % schedule.store.replicas())
        };
        model.add_ep("web", &web(h), owner, Some(h), seen_since);
    }
    for u in model
        .agents
        .iter_mut()
        .chain(model.backends.iter_mut().map(|(_, u)| u))
    {
        u.since = seen_since;
    }
    for r in &mut model.replicas {
        r.serving.since = seen_since;
    }
    model
}

/// Plays the schedule's fault starts and ends at their times (from `t0`), telling the model
/// each change: the faults started by kind, and the engine errors. A fault that failed to
/// start or end is not touched again.
fn play(
    schedule: &Schedule,
    world: &mut World,
    model: &Mutex<Model>,
    t0: Instant,
) -> (BTreeMap<&'static str, u64>, Vec<String>) {
    let mut actions: Vec<(u64, bool, usize)> = Vec::new();
    for (i, f) in schedule.faults.iter().enumerate() {
        actions.push((f.start_ms, true, i));
        actions.push((f.end_ms(), false, i));
    }
    // Ends before starts at the same moment: a resource is free before it is taken again.
    actions.sort_by_key(|&(ms, begin, i)| (ms, begin, i));
    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut engine_errors = Vec::new();
    let mut failed: BTreeSet<usize> = BTreeSet::new();
    for (ms, begin, i) in actions {
        let at = t0 + Duration::from_millis(ms);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let fault = &schedule.faults[i];
        if failed.contains(&i) {
            continue;
        }
        let mut report = |e: Effect| apply(model, e);
        let res = if begin {
            *injected.entry(fault.kind.name()).or_default() += 1;
            world.begin(&fault.kind, &mut report)
        } else {
            world.end(&fault.kind, &mut report)
        };
        if let Err(e) = res {
            failed.insert(i);
            engine_errors.push(format!(
                "at {:.1?}, {} of {fault}: {e:#}",
                t0.elapsed(),
                if begin { "start" } else { "end" }
            ));
        }
    }
    (injected, engine_errors)
}

/// Counts the proxy traffic's GETs as `no_get_errors` checks, and its first ten errors
/// (then one line for the rest) as violations.
fn judge_get_errors(judge: &mut Judge, report: &Report) {
    *judge.checks.entry("no_get_errors").or_default() += report.total();
    for (n, (at, e)) in report.errors.iter().enumerate() {
        if n == 10 {
            judge.violations.push(Violation {
                check: "no_get_errors",
                at: *at,
                last: *at,
                rounds: 1,
                details: format!("... {} GET errors in all", report.errors.len()),
            });
            break;
        }
        judge.violations.push(Violation {
            check: "no_get_errors",
            at: *at,
            last: *at,
            rounds: 1,
            details: format!("GET through the proxy failed: {e}"),
        });
    }
}

/// Writes every log and the registry statuses of a failed seed (`passed`: no violation)
/// to a directory kept after the run; `None` for a passing seed, or if writing failed
/// (an engine error then).
fn keep_evidence(
    seed: u64,
    world: &World,
    statuses: &Mutex<String>,
    passed: bool,
    engine_errors: &mut Vec<String>,
) -> Option<std::path::PathBuf> {
    // `TIDINGS_CAMPAIGN_KEEP_LOGS=1` keeps them for a passing seed too (to compare a run
    // that failed with one that did not).
    let keep = std::env::var_os("TIDINGS_CAMPAIGN_KEEP_LOGS").is_some_and(|v| v == "1");
    if !keep && passed && engine_errors.is_empty() {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("tidings-campaign-evidence-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    let statuses = statuses.lock().map(|s| s.clone()).unwrap_or_default();
    match world
        .dump_logs(&dir)
        .and_then(|()| Ok(std::fs::write(dir.join("registry-status.txt"), statuses)?))
    {
        Ok(()) => Some(dir),
        Err(e) => {
            engine_errors.push(format!("writing the evidence failed: {e:#}"));
            None
        }
    }
}

fn tempfile_dir(seed: u64) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("tidings-campaign-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Tells the model what a fault changed, at the moment it changed.
fn apply(model: &Mutex<Model>, effect: Effect) {
    let Ok(mut m) = model.lock() else { return };
    let now = Instant::now();
    match effect {
        Effect::None => {}
        Effect::AgentDown(a) => {
            if let Some(u) = m.agents.get_mut(a) {
                u.set(false, now);
            }
        }
        Effect::AgentUp(a) => {
            if let Some(u) = m.agents.get_mut(a) {
                u.set(true, now);
            }
        }
        Effect::RegistryDown { replica, killed } => {
            if let Some(r) = m.replicas.get_mut(replica) {
                r.serving.set(false, now);
                r.killed_at = killed.then_some(now);
            }
        }
        Effect::RegistryUp(replica) => {
            if let Some(r) = m.replicas.get_mut(replica) {
                r.serving.set(true, now);
                r.killed_at = None;
            }
        }
        Effect::BackendDown(h) => {
            if let Some((_, u)) = m.backends.get_mut(h) {
                u.set(false, now);
            }
        }
        Effect::BackendUp(h) => {
            if let Some((_, u)) = m.backends.get_mut(h) {
                u.set(true, now);
            }
        }
        Effect::Deregistered { service, addr } => {
            m.set_ep(&service, &addr, EpState::Left { at: now });
        }
        Effect::Registered { service, addr } => {
            m.set_ep(
                &service,
                &addr,
                EpState::Live {
                    since: now,
                    life: 0,
                },
            );
        }
        Effect::Added {
            service,
            addr,
            agent,
        } => {
            // Churn cron hosts check in to replica 0 (see `World::begin`).
            let owner = agent.map_or(Owner::Cron(0), Owner::Agent);
            m.add_ep(&service, &addr, owner, None, now);
        }
        Effect::CronStopped { service, addr } => m.set_ep(&service, &addr, EpState::Idle),
        Effect::NetDisturbed(agents) => m.net_disturbed.extend(agents),
        Effect::NetHealed(agents) => {
            for a in agents {
                m.net_disturbed.remove(&a);
                m.net_healed.insert(a, now);
            }
        }
    }
}

fn snapshot(model: &Mutex<Model>) -> Option<Model> {
    model.lock().ok().map(|m| m.clone())
}

/// What the checker asks.
struct Views {
    /// Agents' local API URLs.
    agents: Vec<String>,
    /// The proxy's admin address.
    admin: String,
    /// Registry replicas' URLs: asked for `/v1/ops/status` whenever a round records a new
    /// violation, appended to `statuses`.
    registries: Vec<String>,
    statuses: Arc<Mutex<String>>,
}

impl Views {
    fn record_statuses(&self, at: Duration, violations: &[Violation]) {
        let mut out = String::new();
        let _ = writeln!(out, "=== at {at:.1?}, new violations:");
        for v in violations {
            let _ = writeln!(out, "  {}: {}", v.check, v.details);
        }
        for (r, url) in self.registries.iter().enumerate() {
            let status = crate::http::request(
                "GET",
                &format!("{url}/v1/ops/status"),
                None,
                b"",
                Duration::from_secs(1),
            );
            let body = match status {
                Ok(resp) => String::from_utf8_lossy(&resp.body).into_owned(),
                Err(e) => format!("unreachable: {e:#}"),
            };
            let _ = writeln!(out, "replica {r}: {body}");
        }
        if let Ok(mut s) = self.statuses.lock() {
            s.push_str(&out);
        }
    }
}

/// Asks every view once per [`CHECK_EVERY`] until `stop`, and judges the answers.
fn check_loop(model: &Mutex<Model>, judge: &Mutex<Judge>, stop: &AtomicBool, views: &Views) {
    let (urls, admin) = (&views.agents, views.admin.as_str());
    let timeout = Duration::from_secs(2);
    // Bounded: a day of rounds at most; `stop` ends it long before.
    for _ in 0..(24 * 3600 * 1000 / CHECK_EVERY.as_millis().max(1)) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let round = Instant::now();
        let Some(before) = snapshot(model) else { break };
        let services = before.services();
        let mut answers: Vec<(Viewer, Seen)> = Vec::new();
        for (a, url) in urls.iter().enumerate() {
            if !before.agents.get(a).is_some_and(|u| u.up) {
                continue;
            }
            let mut seen = Seen::default();
            for service in &services {
                // An agent that does not answer lists nothing: that is what a reader gets.
                if let Ok(l) = lookup_within(url, service, timeout) {
                    if service == "web" {
                        seen.age_ms = Some(l.age_ms);
                    }
                    seen.hosts.insert(service.clone(), l.hosts);
                }
            }
            answers.push((Viewer::Agent(a), seen));
        }
        let mut proxy = Seen::default();
        if let Ok((hosts, _)) = crate::proxy::routing(admin) {
            proxy.routing = hosts
                .into_iter()
                .map(|(addr, h)| (addr, (h.discovery, h.decision)))
                .collect();
        }
        answers.push((Viewer::Proxy, proxy));
        // Judged against the record as it is *after* the questions, at the moment they
        // began: whatever changed meanwhile (a kill, a deregistration) then dates from after
        // that moment, so its bound has not run yet and it is not judged this round.
        let Some(after) = snapshot(model) else { break };
        let fresh = judge.lock().ok().map(|mut j| {
            let before = j.violations.len();
            for (viewer, seen) in &answers {
                j.judge(&after, round, *viewer, seen);
            }
            j.violations.get(before..).unwrap_or_default().to_vec()
        });
        if let Some(fresh) = fresh.filter(|f| !f.is_empty()) {
            views.record_statuses(round.duration_since(after.t0), &fresh);
        }
        std::thread::sleep(CHECK_EVERY.saturating_sub(round.elapsed()));
    }
}
