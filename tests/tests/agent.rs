//! The agent as an operator runs it: a registry and several agents, real `tidings`
//! processes on their own loopback addresses, through kills and restarts. The registry's
//! outage must not cost a single lookup (docs/ARCHITECTURE.md#fail-static-rules: answers never depend on the registry).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use tests::fleet::{self, Agent, lookup, set};
use tests::hammer::Hammer;
use tests::{Proc, http, poll, run};

const START: Duration = Duration::from_secs(20);

/// A per-run /24 of loopback, so parallel runs and other suites don't collide.
fn ip(host: u8) -> String {
    let net = 100 + std::process::id() % 100;
    format!("127.0.{net}.{host}")
}

fn agent(host: u8, dir: &Path, registry: &str, extra: &[&str]) -> Result<Agent> {
    fleet::local_agent(&format!("agent-{host}"), &ip(host), dir, registry, extra)
}

/// A host without an agent, checking in by cron (here: every half second, as long as the
/// test runs; its runs fail while the registry is down, as cron's would).
fn cron(registry: String, ip: String, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let _ = run(
                &[
                    "checkin",
                    "--registry",
                    &registry,
                    "--service",
                    "billing",
                    "--port",
                    "9000",
                    "--ip",
                    &ip,
                    "--no-splay",
                    "--timeout",
                    "1s",
                ],
                Duration::from_secs(15),
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

/// The registry's check-in interval is its warm-up after an empty restart: it must cover
/// the slowest host's next check-in — here the cron host, whose runs take about 2 s while
/// the registry is down (three tries with backoff) — as a minute covers a real crontab.
fn registry(addr: &str) -> Result<Proc> {
    fleet::registry(addr, "10s", "4s")
}

fn wait_for(
    agents: &[&Agent],
    service: &str,
    want: &BTreeSet<String>,
    deadline: Duration,
) -> Result<Duration> {
    let t0 = Instant::now();
    for a in agents {
        poll(
            &format!("{} to list {want:?} for {service}", a.url()),
            deadline,
            || {
                lookup(&a.url(), service)
                    .ok()
                    .filter(|l| l.hosts.is_superset(want))
            },
        )?;
    }
    Ok(t0.elapsed())
}

#[test]
fn agents_serve_through_a_registry_outage_and_restarts() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = |n: u8| tmp.path().join(format!("agent-{n}"));
    let reg_addr = format!("{}:7700", ip(100));
    let reg_url = format!("http://{reg_addr}");
    let mut reg = registry(&reg_addr)?;
    let cron_stop = Arc::new(AtomicBool::new(false));
    let cron_thread = cron(reg_url.clone(), ip(50), cron_stop.clone());

    // Three agents; the first seeds the others through the registry's tidings-agent listing.
    let a1 = agent(
        1,
        &dir(1),
        &reg_url,
        &["--endpoint", "web:8080", "--zone", "zone-a"],
    )?;
    poll("agent 1 in the registry", START, || {
        http::get(&format!("{reg_url}/v1/registration/tidings-agent"))
            .ok()
            .filter(|r| String::from_utf8_lossy(&r.body).contains(&ip(1)))
    })?;
    let mut a2 = agent(2, &dir(2), &reg_url, &["--endpoint", "web:8080"])?;
    let mut a3 = agent(3, &dir(3), &reg_url, &["--endpoint", "web:8080"])?;
    let web = |hosts: &[u8]| {
        set(&hosts
            .iter()
            .map(|h| format!("{}:8080", ip(*h)))
            .collect::<Vec<_>>())
    };
    let billing = set(&[format!("{}:9000", ip(50))]);
    let base_web = web(&[1, 2, 3]);
    wait_for(&[&a1, &a2, &a3], "web", &base_web, START)?;
    wait_for(&[&a1, &a2, &a3], "billing", &billing, START)?;
    // Synced, and the registry's snapshot (not only the owners' gossip rows) lists every
    // web host: the outage below must be served from registry data even if a loaded machine
    // makes SWIM suspect an agent for a moment.
    for a in [&a1, &a2, &a3] {
        poll(&format!("{} synced", a.url()), START, || {
            lookup(&a.url(), "web")
                .ok()
                .filter(|l| l.age_ms >= 0 && l.source == "registry")
        })?;
    }
    let members = fleet::members(&a1.url())?;
    assert_eq!(members.len(), 3, "{members:?}");

    // 1) SIGKILL the registry: every lookup on every agent keeps the same hosts.
    reg.signal("KILL")?;
    reg.wait_exit(Duration::from_secs(5))?;
    let killed = Instant::now();
    let age0 = lookup(&a1.url(), "web")?.age_ms;
    let hammer = Hammer::start(
        vec![a1.url(), a2.url(), a3.url()],
        vec![("web", base_web.clone()), ("billing", billing.clone())],
    );

    // 2) A new host's agent joins while the registry is down: listed everywhere within 5 s.
    let a4 = agent(
        4,
        &dir(4),
        &reg_url,
        &["--endpoint", "web:8080", "--join", &a1.gossip()],
    )?;
    let all_web = web(&[1, 2, 3, 4]);
    let seen_everywhere = wait_for(
        &[&a1, &a2, &a3, &a4],
        "web",
        &all_web,
        Duration::from_secs(5),
    )?;
    eprintln!("new agent listed by every agent after {seen_everywhere:?}");
    wait_for(&[&a4], "billing", &billing, Duration::from_secs(10))?;
    hammer.set_expect(vec![("web", all_web.clone()), ("billing", billing.clone())])?;
    // a4 is known only through gossip (the registry is down): the answer says so.
    assert_eq!(lookup(&a1.url(), "web")?.source, "gossip");
    assert_eq!(lookup(&a1.url(), "billing")?.source, "registry");

    // 3) A fresh agent with no disk cache learns the whole view, cron-only hosts included.
    let joined = Instant::now();
    let mut a5 = agent(
        5,
        &dir(5),
        &reg_url,
        &["--endpoint", "api:7000", "--join", &a2.gossip()],
    )?;
    wait_for(&[&a5], "web", &all_web, Duration::from_secs(15))?;
    wait_for(&[&a5], "billing", &billing, Duration::from_secs(15))?;
    eprintln!(
        "fresh agent learned the whole view after {:?}",
        joined.elapsed()
    );
    let api = set(&[format!("{}:7000", ip(5))]);
    wait_for(&[&a1, &a2, &a3, &a4], "api", &api, Duration::from_secs(5))?;
    // An agent that starts with no seeds at all (no --join, no cache, registry down) is
    // alone in gossip until the registry's agent listing brings it in (step 5).
    let a6 = agent(6, &dir(6), &reg_url, &["--endpoint", "solo:6000"])?;
    let solo = set(&[format!("{}:6000", ip(6))]);

    // The freshness header says how old the registry data is, and it grows.
    let age1 = lookup(&a1.url(), "web")?.age_ms;
    ensure!(
        age0 >= 0 && age1 > age0,
        "registry age did not grow: {age0} -> {age1}; log:\n{}",
        a1.proc.log_text()
    );
    ensure!(
        u128::try_from(age1).unwrap_or(0) >= killed.elapsed().as_millis().saturating_sub(3_000),
        "age {age1} ms is younger than the outage"
    );

    // 4) Restart an agent (crash) while the registry is down: it answers from its cache at once.
    hammer.set_targets(vec![a1.url(), a2.url(), a4.url()])?;
    fleet::wait_cache_current(&a3.url())?;
    a3.proc.signal("KILL")?;
    a3.proc.wait_exit(Duration::from_secs(5))?;
    a3.restart()?;
    let first = lookup(&a3.url(), "web")?;
    ensure!(
        first.hosts.is_superset(&all_web),
        "restarted agent lost hosts: {:?}",
        first.hosts
    );
    // Whether the cache or gossip's join (milliseconds on loopback, from the peers the cache
    // names) answers the first lookup is a race; what must hold is that the agent served the
    // cache's whole view from its first moment, before any peer was heard.
    ensure!(
        first.source == "cache" || first.source == "gossip",
        "first answer after a restart: {}",
        first.source
    );
    let from_cache = poll("the first view's log line", Duration::from_secs(5), || {
        a3.proc.log_text().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "serving the view").then(|| v["from_cache"].as_u64())?
        })
    })?;
    let known = all_web.len() + billing.len();
    ensure!(
        from_cache >= known as u64,
        "the first view after a restart held {from_cache} cached hosts, not the {known} of web and billing"
    );
    ensure!(lookup(&a3.url(), "billing")?.hosts == billing);
    hammer.set_targets(vec![a1.url(), a2.url(), a3.url(), a4.url(), a5.url()])?;

    // 5) The registry comes back empty: it repopulates within about one check-in interval,
    // answering "warming" meanwhile, and no agent's view shrinks (the hammer watches).
    let restarted = Instant::now();
    let reg = registry(&reg_addr)?;
    let full = poll("registry repopulated", Duration::from_secs(10), || {
        let r = http::get(&format!("{reg_url}/v2/catalog")).ok()?;
        let v = r.json().ok()?;
        let count = |s: &str| v["services"][s].as_array().map_or(0, Vec::len);
        (count("web") == 4
            && count("billing") == 1
            && count("api") == 1
            && count("solo") == 1
            && count("tidings-agent") == 6)
            .then(|| restarted.elapsed())
    })?;
    eprintln!("registry repopulated {full:?} after its restart");
    // Every agent syncs again: its registry age drops back to fresh.
    for a in [&a1, &a2, &a3, &a4, &a5] {
        poll(
            &format!("{} synced again", a.url()),
            Duration::from_secs(15),
            || {
                // Synced after the restart, once warm-up was over.
                lookup(&a.url(), "web").ok().filter(|l| {
                    u128::try_from(l.age_ms).is_ok_and(|age| age < restarted.elapsed().as_millis())
                })
            },
        )?;
    }
    wait_for(
        &[&a1, &a2, &a3, &a4, &a5],
        "solo",
        &solo,
        Duration::from_secs(10),
    )?;
    wait_for(&[&a6], "web", &all_web, Duration::from_secs(10))?;
    poll(
        "the lone agent to join through the registry's listing",
        Duration::from_secs(10),
        || {
            let members = fleet::members(&a6.url()).ok()?;
            (members.len() == 6 && members.iter().all(|m| m.alive)).then_some(())
        },
    )?;
    eprintln!(
        "the lone agent joined gossip {:?} after the registry restart",
        restarted.elapsed()
    );
    poll("web confirmed by the registry again", START, || {
        (lookup(&a1.url(), "web").ok()?.source == "registry").then_some(())
    })?;
    eprintln!(
        "every agent synced {:?} after the registry restart",
        restarted.elapsed()
    );

    // 6) A corrupt cache file is ignored with a log line, not a crash.
    hammer.set_targets(vec![a1.url(), a2.url(), a3.url(), a4.url()])?;
    a5.proc.signal("KILL")?;
    a5.proc.wait_exit(Duration::from_secs(5))?;
    std::fs::write(
        a5.dir.join("view.cache"),
        b"\x00garbage, not a cache\xff\xfe",
    )?;
    a5.restart()?;
    wait_for(&[&a5], "web", &all_web, Duration::from_secs(15))?;
    ensure!(
        a5.proc.log_text().contains("disk cache ignored"),
        "no log line about the corrupt cache"
    );
    hammer.set_targets(vec![a1.url(), a2.url(), a3.url(), a4.url(), a5.url()])?;

    let (lookups, _) = hammer.finish()?;
    eprintln!("{lookups} lookups during the outage and restarts, all served");

    // Endpoints registered at runtime through the local API reach every agent and the
    // registry; deregistered ones leave both.
    fleet::register(&a2.url(), r#"{"service": "exporter", "port": 9100}"#)?;
    let exporter = set(&[format!("{}:9100", ip(2))]);
    wait_for(
        &[&a1, &a2, &a3, &a4, &a5],
        "exporter",
        &exporter,
        Duration::from_secs(5),
    )?;
    poll(
        "registry to list the runtime endpoint",
        Duration::from_secs(5),
        || {
            let r = http::get(&format!("{reg_url}/v1/registration/exporter")).ok()?;
            String::from_utf8_lossy(&r.body)
                .contains(&ip(2))
                .then_some(())
        },
    )?;
    fleet::deregister(&a2.url(), "exporter", 9100)?;
    poll(
        "runtime endpoint gone everywhere",
        Duration::from_secs(10),
        || {
            let gone = |base: &str| lookup(base, "exporter").is_ok_and(|l| l.hosts.is_empty());
            let reg_gone = http::get(&format!("{reg_url}/v1/registration/exporter"))
                .is_ok_and(|r| !String::from_utf8_lossy(&r.body).contains(&ip(2)));
            ([&a1, &a2, &a3, &a4, &a5].iter().all(|a| gone(&a.url())) && reg_gone).then_some(())
        },
    )?;

    // SIGTERM deregisters: the host disappears from every view, the agent exits cleanly.
    let mut a4 = a4;
    a4.proc.signal("TERM")?;
    let status = a4.proc.wait_exit(Duration::from_secs(15))?;
    ensure!(
        status.success(),
        "agent exited with {status}; log:\n{}",
        a4.proc.log_text()
    );
    poll("deregistered host gone", Duration::from_secs(10), || {
        [&a1, &a2, &a3, &a5]
            .iter()
            .all(|a| lookup(&a.url(), "web").is_ok_and(|l| l.hosts == base_web))
            .then_some(())
    })?;

    // The CLI readers.
    let (code, out, err) = run(&["lookup", "web", "--agent", &a1.url()], START)?;
    ensure!(code == 0, "lookup failed: {err}");
    ensure!(
        out.contains(&format!("{}:8080", ip(1))) && out.contains("zone-a"),
        "{out}"
    );
    ensure!(out.contains("source: "), "{out}");
    let (code, out, _) = run(&["lookup", "web", "--agent", &a1.url(), "--json"], START)?;
    ensure!(code == 0);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(v["hosts"].as_array().map(Vec::len) == Some(3), "{out}");
    let (code, out, _) = run(&["members", "--agent", &a1.url()], START)?;
    ensure!(
        code == 0 && out.contains(&a2.gossip()) && out.contains("alive"),
        "{out}"
    );

    cron_stop.store(true, Ordering::Relaxed);
    let _ = cron_thread.join();
    drop(reg);
    let _ = &mut a2;
    Ok(())
}

#[test]
fn bad_flags_exit_64_and_the_key_is_required() -> Result<()> {
    let (code, _, err) = run(
        &[
            "agent",
            "--registry",
            "http://127.0.0.1:9",
            "--api",
            "127.0.0.1:0",
        ],
        START,
    )?;
    ensure!(code == 64, "{code}: {err}");
    ensure!(err.contains("key"), "{err}");
    let (code, _, err) = run(
        &[
            "agent",
            "--registry",
            "http://127.0.0.1:9",
            "--gossip-insecure",
            "--endpoint",
            "Bad:1",
        ],
        START,
    )?;
    ensure!(code == 2 || code == 64, "{code}: {err}");
    if code == 0 {
        bail!("accepted a bad endpoint");
    }
    Ok(())
}

/// The registry's digest (docs/API.md#the-digest) and the agent's: equal once the agent holds
/// exactly the registry's catalog.
fn digests(reg_url: &str, agent: &Agent) -> Result<(String, Option<String>)> {
    let reg: schema::api::CatalogChanges =
        http::get(&format!("{reg_url}/v2/catalog?delta=true"))?.parse()?;
    let me: schema::agent_api::AgentSelf =
        http::get(&format!("{}/v1/agent/self", agent.url()))?.parse()?;
    Ok((reg.digest, me.registry_digest))
}

fn wait_same_digest(reg_url: &str, agent: &Agent) -> Result<()> {
    poll("the agent to hold the registry's catalog", START, || {
        digests(reg_url, agent)
            .ok()
            .filter(|(reg, mine)| mine.as_deref() == Some(reg.as_str()))
    })?;
    Ok(())
}

/// A counter on the agent's `/metrics`, 0 when absent.
fn agent_metric(agent: &Agent, line_start: &str) -> Result<f64> {
    let text = http::get(&format!("{}/metrics", agent.url()))?;
    Ok(String::from_utf8_lossy(&text.body)
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0))
}

fn checkin(reg_url: &str, service: &str, ip: &str, port: &str) -> Result<()> {
    let args = [
        "checkin",
        "--registry",
        reg_url,
        "--service",
        service,
        "--port",
        port,
        "--ip",
        ip,
        "--no-splay",
    ];
    let (code, _, err) = run(&args, Duration::from_secs(15))?;
    ensure!(code == 0, "checkin failed: {err}");
    Ok(())
}

fn warmed_up(reg_url: &str) -> Result<()> {
    poll("the registry to finish warming up", START, || {
        let r = http::get(&format!("{reg_url}/v2/catalog?delta=true")).ok()?;
        let c: schema::api::CatalogChanges = r.parse().ok()?;
        (!c.warming).then_some(())
    })
}

#[test]
fn an_agent_syncs_by_deltas_and_recovers_whole_catalogs_after_kills() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ip = |host: u8| fleet::loopback(43, host);
    let reg_addr = format!("{}:7700", ip(100));
    let reg_url = format!("http://{reg_addr}");
    let mut reg = registry(&reg_addr)?;
    let mut a1 = fleet::local_agent("agent-1", &ip(1), &tmp.path().join("a1"), &reg_url, &[])?;
    checkin(&reg_url, "billing", &ip(50), "9000")?;
    // A warming registry is polled for whole catalogs: deltas start once it has warmed up.
    warmed_up(&reg_url)?;
    wait_same_digest(&reg_url, &a1)?;
    for host in 51..54 {
        checkin(&reg_url, "billing", &ip(host), "9000")?;
        wait_same_digest(&reg_url, &a1)?;
    }
    let deltas = agent_metric(&a1, "tidings_agent_registry_deltas_total")?;
    ensure!(deltas >= 1.0, "no change came as a delta");

    // Killed mid-stream: a change goes by while it is down; it starts with a whole catalog.
    a1.proc.signal("KILL")?;
    a1.proc.wait_exit(START)?;
    checkin(&reg_url, "billing", &ip(60), "9000")?;
    a1.restart()?;
    wait_same_digest(&reg_url, &a1)?;

    // The registry is killed and restarts empty: the agent's view is unknown to it; once it
    // has warmed up and the hosts are back, the agent holds exactly what it lists.
    reg.signal("KILL")?;
    reg.wait_exit(START)?;
    let mut reg = registry(&reg_addr)?;
    for host in [50, 51, 52, 53, 60] {
        checkin(&reg_url, "billing", &ip(host), "9000")?;
    }
    warmed_up(&reg_url)?;
    wait_same_digest(&reg_url, &a1)?;
    reg.signal("TERM")?;
    reg.wait_exit(START)?;
    Ok(())
}
