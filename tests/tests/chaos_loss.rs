//! Chaos: 20 % packet loss on gossip for 30 s with the registry down (root only; CI runs as
//! root). No healthy host may leave any agent's view or the proxy's routing: SWIM may
//! wrongly declare members down and hide their rows, but the registry's snapshot entries are
//! fail-static and the proxy's health checks have the last word (docs/ARCHITECTURE.md#fail-static-rules, docs/ARCHITECTURE.md#merge-table).
//!
//! Six agents, each in its own namespace on a bridge ([`tests::netns::Lab`]); their `web`
//! backends run in this process on the bridge address, and a proxy runs beside agent 1 in
//! its namespace, its membership from that agent. The loss is an nftables rule on every
//! agent's input: each UDP or TCP packet to or from the gossip port is dropped with
//! probability 1/5 (the kernel here has no netem). The test prints how often members were
//! falsely seen down, and the smallest and largest views.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use tests::backend::Backend;
use tests::fleet::{self, Agent, lookup, members};
use tests::hammer::Hammer;
use tests::netns::{API_PORT, GOSSIP_PORT, Lab};
use tests::poll;
use tests::traffic::Load;

const START: Duration = Duration::from_secs(30);
const AGENTS: usize = 6;
const LOSS_PERCENT: u8 = 20;
const LOSS_FOR: Duration = Duration::from_secs(30);

/// What the observer saw while the loss lasted.
#[derive(Debug, Default)]
struct Seen {
    rounds: u64,
    /// (observer, member) "down" verdicts summed over every round.
    down_verdicts: u64,
    /// Distinct (observer, member) pairs ever seen down.
    down_pairs: BTreeSet<(usize, String)>,
    /// Rounds in which at least one member was seen down somewhere.
    rounds_with_down: u64,
    first_down: Option<Duration>,
    alive_min: usize,
    alive_max: usize,
    view_min: usize,
    view_max: usize,
}

/// One observation round: every agent's `web` view must hold every host; members seen down
/// are counted (not failed: gossip under loss is another engineer's tuning).
fn observe(urls: &[String], all: &BTreeSet<String>, t0: Instant, seen: &mut Seen) -> Result<()> {
    let mut downs = 0;
    for (i, url) in urls.iter().enumerate() {
        let l = lookup(url, "web")?;
        seen.view_min = seen.view_min.min(l.hosts.len());
        seen.view_max = seen.view_max.max(l.hosts.len());
        if !l.hosts.is_superset(all) {
            bail!(
                "agent {} lost hosts: {:?}",
                i + 1,
                all.difference(&l.hosts).collect::<Vec<_>>()
            );
        }
        let ms = members(url)?;
        let alive = ms.iter().filter(|m| m.alive).count();
        seen.alive_min = seen.alive_min.min(alive);
        seen.alive_max = seen.alive_max.max(alive);
        for m in ms.iter().filter(|m| !m.alive) {
            downs += 1;
            seen.down_pairs.insert((i + 1, m.addr.clone()));
        }
    }
    seen.rounds += 1;
    seen.down_verdicts += downs;
    if downs > 0 {
        seen.rounds_with_down += 1;
        seen.first_down.get_or_insert(t0.elapsed());
    }
    Ok(())
}

#[test]
fn twenty_percent_gossip_loss_removes_no_healthy_host_from_routing() -> Result<()> {
    let lab = Lab::new('l', AGENTS)?;
    let tmp = tempfile::tempdir()?;
    let rt = tests::backend::runtime()?;
    let gw = lab.gateway();
    let port = |i: usize| 8080 + i as u16;
    let mut backends = Vec::new();
    for i in 1..=AGENTS {
        backends.push(rt.block_on(Backend::start_on(&gw, port(i), &format!("host-{i}")))?);
    }
    let all: BTreeSet<String> = (1..=AGENTS).map(|i| format!("{gw}:{}", port(i))).collect();

    let reg_url = format!("http://{gw}:7700");
    let mut reg = fleet::registry(&format!("{gw}:7700"), "10s", "4s")?;
    let gossip = |i: usize| format!("{}:{GOSSIP_PORT}", lab.ip(i));
    let mut agents = Vec::new();
    let seed = gossip(1);
    for i in 1..=AGENTS {
        // Each host's backend listens on the bridge address (this process), one port each.
        let endpoint = format!("web:{}@{gw}", port(i));
        let extra = fleet::joining(i == 1, &seed, &["--endpoint", &endpoint]);
        let dir = tmp.path().join(format!("agent-{i}"));
        agents.push(lab.agent(i, &dir, &reg_url, &extra)?);
    }
    let urls: Vec<String> = agents.iter().map(Agent::url).collect();
    for url in &urls {
        poll(&format!("{url} to sync the whole fleet"), START, || {
            let l = lookup(url, "web").ok()?;
            let alive = members(url).ok()?.iter().filter(|m| m.alive).count();
            (l.hosts == all && l.source == "registry" && alive == AGENTS).then_some(())
        })?;
    }
    let agent_api = format!("http://127.0.0.1:{API_PORT}");
    let (_proxy, admin, listen) =
        tests::proxy::start_routing(Some(&lab.ns(1)), &lab.ip(1), &agent_api, &all)?;
    reg.signal("KILL")?;
    reg.wait_exit(Duration::from_secs(5))?;

    let load = Load::start(
        format!("http://{listen}/"),
        "web".into(),
        50_000,
        LOSS_FOR + Duration::from_secs(30),
    );
    load.wait_for(20)?;
    for i in 1..=AGENTS {
        lab.gossip_loss(i, GOSSIP_PORT, LOSS_PERCENT)?;
    }
    let t0 = Instant::now();
    let seen = Arc::new(Mutex::new(Seen {
        alive_min: usize::MAX,
        view_min: usize::MAX,
        ..Seen::default()
    }));
    let (obs_urls, obs_all, obs_admin, obs_seen) =
        (urls.clone(), all.clone(), admin.clone(), seen.clone());
    let watcher = Hammer::with_check(
        Vec::new(),
        Vec::new(),
        Duration::from_millis(100),
        Box::new(move || {
            let mut s = obs_seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            observe(&obs_urls, &obs_all, t0, &mut s)?;
            tests::proxy::all_routed(&obs_admin, &obs_all)
        }),
    );
    watcher.hold(LOSS_FOR)?;

    let mut per_host = BTreeMap::new();
    for i in 1..=AGENTS {
        per_host.insert(i, lab.loss_counters(i)?);
        lab.clear_loss(i)?;
    }
    let cleared = Instant::now();
    let recovered = poll("every agent to see every member alive again", START, || {
        urls.iter()
            .all(|u| members(u).is_ok_and(|ms| ms.iter().all(|m| m.alive)))
            .then(|| cleared.elapsed())
    })?;
    let (_, rounds) = watcher.finish()?;
    let report = load.finish()?;

    let (seen_pkts, dropped): (u64, u64) = per_host
        .values()
        .fold((0, 0), |(a, b), (s, d)| (a + s, b + d));
    let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    println!(
        "{LOSS_PERCENT} % loss on gossip for {LOSS_FOR:?}: {dropped} of {seen_pkts} gossip packets \
         dropped ({:.1} %), per host (seen, dropped) {per_host:?}",
        100.0 * dropped as f64 / seen_pkts.max(1) as f64
    );
    println!(
        "false 'down' verdicts in /v1/agent/members: {} over {} rounds ({} rounds with any; \
         first after {:?}); distinct (observer, member) pairs: {} {:?}; alive members seen \
         per agent: min {} max {} of {AGENTS}; every member alive again {recovered:.1?} after \
         the loss ended",
        s.down_verdicts,
        s.rounds,
        s.rounds_with_down,
        s.first_down,
        s.down_pairs.len(),
        s.down_pairs,
        s.alive_min,
        s.alive_max
    );
    println!(
        "web view sizes on every agent: min {} max {} (of {}); the proxy routed every host in \
         all {rounds} rounds",
        s.view_min,
        s.view_max,
        all.len()
    );
    println!("traffic through the proxy: {}", report.line());
    report.ensure_no_errors()?;
    ensure!(
        dropped > 0,
        "the loss rule dropped nothing: the test did not test"
    );
    for b in backends {
        rt.block_on(b.kill());
    }
    Ok(())
}
