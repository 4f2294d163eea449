//! Chaos: the registry is gone for longer than the TTL, then back — and no host is removed
//! anywhere (docs/ARCHITECTURE.md#fail-static-rules, docs/ARCHITECTURE.md#expiry-self-preservation-and-warm-up).
//!
//! Real processes on a loopback /24 of this run: a memory registry with a 3 s TTL and a 1 s
//! check-in interval, three agents (each host's `web` endpoint), a host without an agent that
//! checks in "by cron" every 300 ms, a backend per host, and a proxy whose membership comes
//! from agent 1. Two outages, each longer than the TTL:
//!   (a) SIGKILL, then a restart on an empty store (the warm-up path);
//!   (b) SIGSTOP, then SIGCONT: the registry wakes with every entry older than the TTL.
//! Throughout, every poll checks that every agent lists every host, that the proxy routes
//! to every host, and client traffic through the proxy must not see a single error. After
//! each outage the registry lists everyone again; after SIGCONT every registry answer must
//! list everyone (those hosts never stopped checking in).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use schema::wire::{HEADER_STALE, HEADER_WARMING, TRUE};
use tests::backend::Backend;
use tests::fleet::{self, Agent, lookup};
use tests::hammer::Hammer;
use tests::traffic::Load;
use tests::{Proc, http, poll};

const START: Duration = Duration::from_secs(20);
const TTL: Duration = Duration::from_secs(3);
/// Each outage: twice the TTL, so every entry is well past it when the registry returns.
const OUTAGE: Duration = Duration::from_secs(6);
/// The host that checks in without an agent (registry snapshot entries only: no agent
/// owns its row, so only the registry's answers keep it in the agents' views).
const CRON_HOST: u8 = 50;

fn ip(host: u8) -> String {
    fleet::loopback(1, host)
}

fn registry(addr: &str) -> Result<Proc> {
    fleet::registry(addr, "3s", "1s")
}

/// A cron host at test speed: one check-in every 300 ms, one try each, as a crontab line
/// would (the one-shot CLI retries for seconds, which at a 1 s interval is out of scale).
fn cron(registry: String, ip: String, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut ok = 0;
        let url = format!("{registry}/v1/registration/web");
        let form = format!("ip={ip}&port=8080");
        for _ in 0..10_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let r = http::request(
                "POST",
                &url,
                Some("application/x-www-form-urlencoded"),
                form.as_bytes(),
                Duration::from_millis(300),
            );
            ok += u64::from(r.is_ok_and(|r| r.status == 200));
            std::thread::sleep(Duration::from_millis(300));
        }
        ok
    })
}

/// What one registry read said: hosts of `web`, and its stale / warming flags.
struct RegistryAnswer {
    hosts: BTreeSet<String>,
    stale: bool,
    warming: bool,
}

fn registry_web(reg_url: &str) -> Result<RegistryAnswer> {
    let r = http::get(&format!("{reg_url}/v1/registration/web"))?;
    ensure!(r.status == 200, "registry: status {}", r.status);
    let hosts = r.json()?["hosts"]
        .as_array()
        .context("hosts")?
        .iter()
        .map(|h| format!("{}:{}", h["ip_address"].as_str().unwrap_or("?"), h["port"]))
        .collect();
    Ok(RegistryAnswer {
        hosts,
        stale: r.header(HEADER_STALE) == Some(TRUE),
        warming: r.header(HEADER_WARMING) == Some(TRUE),
    })
}

/// The registry holds self-preservation for one renewal window (1.25 check-in intervals)
/// after a blind spot longer than `ttl - check_in_interval`.
fn policy_window() -> Duration {
    Duration::from_millis(1250)
}

/// Polls until every agent has synced with the registry after `since` (its registry age is
/// younger than that), and returns how long that took from `since`.
fn synced_after(agents: &[&Agent], since: Instant) -> Result<Duration> {
    for a in agents {
        poll(
            &format!("{} to sync again", a.url()),
            Duration::from_secs(15),
            || {
                let l = lookup(&a.url(), "web").ok()?;
                let age = u128::try_from(l.age_ms).ok()?;
                (age < since.elapsed().as_millis()).then_some(())
            },
        )?;
    }
    Ok(since.elapsed())
}

#[test]
fn registry_down_longer_than_the_ttl_removes_no_host() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rt = tests::backend::runtime()?;
    let hosts = [1u8, 2, 3, CRON_HOST];
    let mut backends = Vec::new();
    for h in hosts {
        backends.push(rt.block_on(Backend::start_on(&ip(h), 8080, &format!("host-{h}")))?);
    }
    let all: BTreeSet<String> = hosts.iter().map(|h| format!("{}:8080", ip(*h))).collect();

    let reg_addr = format!("{}:7700", ip(100));
    let reg_url = format!("http://{reg_addr}");
    let mut reg = registry(&reg_addr)?;
    let cron_stop = Arc::new(AtomicBool::new(false));
    let cron_thread = cron(reg_url.clone(), ip(CRON_HOST), cron_stop.clone());

    let agents = fleet::local_web_agents(&[1, 2, 3], ip, tmp.path(), &reg_url)?;
    let agent_refs: Vec<&Agent> = agents.iter().collect();
    let urls: Vec<String> = agents.iter().map(Agent::url).collect();
    for a in &agents {
        poll(&format!("{} to list every host", a.url()), START, || {
            let l = lookup(&a.url(), "web").ok()?;
            (l.hosts == all && l.source == "registry").then_some(())
        })?;
    }
    let (_proxy, admin, listen) = tests::proxy::start_routing(None, &ip(1), &urls[0], &all)?;

    // From here on, every round checks every agent and the proxy's routing.
    let expect = vec![("web", all.clone())];
    let (check_admin, check_all) = (admin.clone(), all.clone());
    let routed_checks = Arc::new(AtomicU64::new(0));
    let counter = routed_checks.clone();
    let hammer = Hammer::with_check(
        urls.clone(),
        expect,
        Duration::from_millis(10),
        Box::new(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            tests::proxy::all_routed(&check_admin, &check_all)
        }),
    );
    let load = Load::start(
        format!("http://{listen}/"),
        "web".into(),
        50_000,
        Duration::from_secs(90),
    );
    load.wait_for(50)?;

    // (a) SIGKILL, down for twice the TTL, restart on an empty store.
    reg.signal("KILL")?;
    reg.wait_exit(Duration::from_secs(5))?;
    let killed = Instant::now();
    hammer.hold(OUTAGE)?;
    reg = registry(&reg_addr)?;
    let down_a = killed.elapsed();
    let back = Instant::now();
    let mut warming_answers = 0;
    let repopulated_a = poll("the restarted registry to list every host", START, || {
        let r = registry_web(&reg_url).ok()?;
        warming_answers += u32::from(r.warming);
        (r.hosts == all && !r.warming).then(|| back.elapsed())
    })?;
    let synced_a = synced_after(&agent_refs, back)?;
    println!(
        "(a) registry SIGKILLed for {down_a:.1?} (TTL {TTL:?}): relisted every host {repopulated_a:.1?} \
         after its restart ({warming_answers} warming answers seen), every agent synced again \
         after {synced_a:.1?}; lookups/checks failed so far: {}",
        hammer.counts().1
    );

    // (b) SIGSTOP for twice the TTL: the registry wakes with every entry past the TTL.
    reg.signal("STOP")?;
    let stopped = Instant::now();
    hammer.hold(OUTAGE)?;
    reg.signal("CONT")?;
    let down_b = stopped.elapsed();
    let woke = Instant::now();
    // Every registry answer from now on must list every host: each one kept checking in
    // (their check-ins were queued or retried), none of them went away.
    let (mut answers, mut stale) = (0u32, 0u32);
    let mut short: Vec<String> = Vec::new();
    let mut released = None;
    while woke.elapsed() < 2 * TTL {
        match registry_web(&reg_url) {
            Ok(r) => {
                answers += 1;
                stale += u32::from(r.stale);
                if r.hosts != all {
                    short.push(format!(
                        "{:?} after wake: {:?} (stale {}, warming {})",
                        woke.elapsed(),
                        r.hosts,
                        r.stale,
                        r.warming
                    ));
                } else if !r.stale && released.is_none() {
                    released = Some(woke.elapsed());
                }
            }
            Err(e) => short.push(format!("{:?} after wake: {e:#}", woke.elapsed())),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Agents' blocking catalog queries simply resume after SIGCONT (nothing they hold
    // changed), so there is no re-sync to wait for; their views are what the hammer checks.
    let released_text = released.map_or("never".to_string(), |d| format!("{d:.1?}"));
    println!(
        "(b) registry SIGSTOPped for {down_b:.1?} (TTL {TTL:?}): {answers} registry answers in the \
         {:?} after SIGCONT, {} incomplete, {stale} flagged stale (self-preservation); complete \
         and no longer stale {released_text} after SIGCONT",
        2 * TTL,
        short.len()
    );
    for s in &short {
        println!("incomplete registry answer {s}");
    }
    let released = released.context("the registry stayed stale: expiry never resumed")?;
    ensure!(
        released >= policy_window(),
        "stale flag dropped after {released:?}, before one renewal window"
    );

    let report = load.finish()?;
    let (lookups, rounds) = hammer.finish()?;
    cron_stop.store(true, Ordering::Relaxed);
    let cron_ok = cron_thread
        .join()
        .map_err(|_| anyhow::anyhow!("cron thread panicked"))?;
    println!(
        "agents: {lookups} lookups and {} proxy routing checks in {rounds} rounds, every one complete",
        routed_checks.load(Ordering::Relaxed)
    );
    println!("traffic through the proxy: {}", report.line());
    println!("cron host: {cron_ok} successful check-ins");
    if !short.is_empty() {
        bail!(
            "the registry dropped hosts that kept checking in, after SIGCONT: {:?}",
            &short[..short.len().min(5)]
        );
    }
    report.ensure_no_errors()?;
    ensure!(
        report.by_backend.len() == all.len(),
        "traffic did not reach every host: {:?}",
        report.by_backend
    );
    for b in backends {
        rt.block_on(b.kill());
    }
    Ok(())
}
