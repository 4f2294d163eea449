//! Chaos under client traffic: an agent is SIGKILLed on the host whose proxy is routing, and
//! then a backend dies. Real processes on a loopback /24 of this run: a registry, three
//! agents (one `web` endpoint and one backend per host), and a proxy whose membership comes
//! from agent 1. A client sends requests through the proxy the whole time, and the other
//! agents are read all the time; neither may see a single failure.
//!
//! The registry's own SIGKILL under traffic is covered by `demo.rs` (the demo's summary) and
//! `chaos_registry.rs` (outages longer than the TTL).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tests::fleet::{self, Agent, lookup, members};
use tests::hammer::Hammer;
use tests::traffic::Load;
use tests::{http, poll};

const START: Duration = Duration::from_secs(20);
/// The proxy's health checks (fleet::proxy): every 300 ms ± 10 %, unhealthy after 2 failures.
const HEALTH_INTERVAL: Duration = Duration::from_millis(300);
const UNHEALTHY_THRESHOLD: u32 = 2;

fn ip(host: u8) -> String {
    fleet::loopback(2, host)
}

/// Consecutive errors of the proxy's membership watch (on its agent).
fn watch_errors(admin: &str) -> Result<u64> {
    let v = http::get(&format!("http://{admin}/clusters"))?.json()?;
    v["clusters"][0]["membership"]["consecutive_errors"]
        .as_u64()
        .with_context(|| format!("no membership errors in {v}"))
}

/// `addr`'s epoch as the agent at `base` knows it, if it thinks it alive.
fn alive_epoch(base: &str, addr: &str) -> Option<u64> {
    members(base)
        .ok()?
        .into_iter()
        .find(|m| m.addr == addr && m.alive)
        .map(|m| m.epoch)
}

#[test]
fn agent_restarts_and_backend_kills_cost_no_request() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rt = tests::backend::runtime()?;
    let (mut backends, all) = tests::backend::start_web(&rt, 3, ip)?;

    let reg_addr = format!("{}:7700", ip(100));
    let reg_url = format!("http://{reg_addr}");
    let _reg = fleet::registry(&reg_addr, "10s", "4s")?;
    let mut agents = fleet::local_web_agents(&[1, 2, 3], ip, tmp.path(), &reg_url)?;
    for a in &agents {
        // Confirmed by the registry, past its warm-up: while agent 1 is down its peers hide
        // its rows, and only the registry's snapshot keeps host 1 in their views.
        poll(&format!("{} to sync every host", a.url()), START, || {
            let l = lookup(&a.url(), "web").ok()?;
            (l.hosts == all && l.source == "registry").then_some(())
        })?;
    }
    let a1_url = agents[0].url();
    let a1_gossip = agents[0].gossip();
    let peers: Vec<String> = agents[1..].iter().map(Agent::url).collect();
    let old_epoch = poll("agent 2 to know agent 1 alive", START, || {
        alive_epoch(&peers[0], &a1_gossip)
    })?;
    let (_proxy, admin, listen) = tests::proxy::start_routing(None, &ip(1), &a1_url, &all)?;
    let load = Load::start(
        format!("http://{listen}/"),
        "web".into(),
        50_000,
        Duration::from_secs(90),
    );
    load.wait_for(50)?;

    // 1) SIGKILL the proxy's agent: the proxy keeps its last set and routes to every host.
    let (check_admin, check_all) = (admin.clone(), all.clone());
    let hammer = Hammer::with_check(
        peers.clone(),
        vec![("web", all.clone())],
        Duration::from_millis(10),
        Box::new(move || tests::proxy::all_routed(&check_admin, &check_all)),
    );
    fleet::wait_cache_current(&a1_url)?;
    agents[0].proc.signal("KILL")?;
    agents[0].proc.wait_exit(Duration::from_secs(5))?;
    let killed = Instant::now();
    let noticed = poll("the proxy to notice its agent is gone", START, || {
        (watch_errors(&admin).ok()? >= 1).then(|| killed.elapsed())
    })?;
    let sent_before = load.sent();
    hammer.hold(Duration::from_secs(2))?;
    let sent_while_down = load.sent() - sent_before;

    // 2) Restart it: its first answer comes from the disk cache, whole; its peers see its
    // new epoch; the proxy's watch reconnects.
    agents[0].restart()?;
    let restarted = Instant::now();
    let first = lookup(&a1_url, "web")?;
    let first_answer = restarted.elapsed();
    // Whole at once. Its source is usually `cache`; with the registry up, the first sync
    // can win the race with this lookup (`registry`) — either way it never starts empty.
    ensure!(
        first.hosts == all && ["cache", "registry"].contains(&first.source.as_str()),
        "first answer after the restart: {:?} from {:?}",
        first.hosts,
        first.source
    );
    ensure!(
        agents[0].proc.log_text().contains("disk cache loaded"),
        "the restarted agent did not load its disk cache:\n{}",
        agents[0].proc.log_text()
    );
    let mut new_epoch = 0;
    let epoch_seen = poll("every peer to see agent 1's new epoch", START, || {
        for p in &peers {
            new_epoch = alive_epoch(p, &a1_gossip).filter(|e| *e > old_epoch)?;
        }
        Some(restarted.elapsed())
    })?;
    let rewatched = poll("the proxy's watch to reconnect", START, || {
        (watch_errors(&admin).ok()? == 0).then(|| restarted.elapsed())
    })?;
    let (lookups_1, rounds_1) = hammer.finish()?;
    println!(
        "agent 1 SIGKILLed for {:.1?}: the proxy noticed after {noticed:.1?} and kept routing to \
         all {} hosts ({rounds_1} checks), {sent_while_down} requests sent meanwhile; restarted: \
         first answer (every host, source {}) {first_answer:.1?} after start, peers saw epoch \
         {old_epoch} -> {new_epoch} after {epoch_seen:.1?}, proxy watch back after \
         {rewatched:.1?}; {lookups_1} lookups on the other agents, all complete",
        restarted.duration_since(killed),
        all.len(),
        first.source
    );

    // 3) A backend dies under traffic: retries hide it from the client, and health checks
    // take it out within interval × threshold.
    let hammer = Hammer::start(peers.clone(), vec![("web", all.clone())]);
    let dead = backends.pop().context("three backends")?;
    let dead_addr = dead.addr.to_string();
    rt.block_on(dead.kill());
    let killed = Instant::now();
    let removed = poll("health checks to take the dead backend out", START, || {
        let (hosts, _) = tests::proxy::routing(&admin).ok()?;
        let h = hosts.get(&dead_addr)?;
        (h.health == "unhealthy" && h.decision != "route").then(|| killed.elapsed())
    })?;
    let sent_at_removal = load.sent();
    load.wait_for(200)?;
    let report = load.finish()?;
    let (lookups_2, _) = hammer.finish()?;
    let bound = HEALTH_INTERVAL.mul_f64(1.1) * UNHEALTHY_THRESHOLD;
    println!(
        "backend {dead_addr} killed: unhealthy and out of routing after {removed:.0?} \
         (bound: {UNHEALTHY_THRESHOLD} checks × {HEALTH_INTERVAL:?} + 10 % jitter = {bound:.0?}); \
         {} requests after that; {lookups_2} more lookups, all complete",
        report.total() - sent_at_removal
    );
    println!("traffic through the proxy: {}", report.line());
    report.ensure_no_errors()?;
    // One second on top of the bound: this machine's 2 cores are shared with the agents,
    // the registry, the proxy and the client.
    ensure!(
        removed <= bound + Duration::from_secs(1),
        "health checks took {removed:?} (bound {bound:?})"
    );
    for b in backends {
        rt.block_on(b.kill());
    }
    Ok(())
}
