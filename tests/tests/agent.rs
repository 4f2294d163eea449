//! The agent as an operator runs it: a registry and several agents, real `tidings`
//! processes on their own loopback addresses, through kills and restarts. The registry's
//! outage must not cost a single lookup (DESIGN.md §1: answers never depend on the registry).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tests::{Proc, http, poll, run};

const START: Duration = Duration::from_secs(20);

/// A per-run /24 of loopback, so parallel runs and other suites don't collide.
fn ip(host: u8) -> String {
    let net = 100 + std::process::id() % 100;
    format!("127.0.{net}.{host}")
}

struct Agent {
    proc: Proc,
    host: u8,
    dir: PathBuf,
    args: Vec<String>,
}

impl Agent {
    fn start(host: u8, dir: &Path, registry: &str, extra: &[&str]) -> Result<Agent> {
        let me = ip(host);
        let mut args: Vec<String> = [
            "agent",
            "--registry",
            registry,
            "--api",
            &format!("{me}:7701"),
            "--gossip",
            &format!("{me}:7702"),
            "--check-in-interval",
            "1s",
            "--gossip-insecure",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--data-dir".into());
        args.push(dir.display().to_string());
        // Test-speed gossip (SWIM probes and anti-entropy repair); flags cover the rest.
        std::fs::create_dir_all(dir)?;
        let config = dir.with_extension("toml");
        std::fs::write(
            &config,
            "[gossip]\nprobe_period_ms = 500\nprobe_rtt_ms = 200\nrepair_interval_ms = 1000\n",
        )?;
        args.push("--config".into());
        args.push(config.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Self::spawn(host, &args)?;
        Ok(Agent {
            proc,
            host,
            dir: dir.to_path_buf(),
            args,
        })
    }

    fn spawn(host: u8, args: &[String]) -> Result<Proc> {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::start(&format!("agent-{host}"), &refs, 2, START)
    }

    fn restart(&mut self) -> Result<()> {
        self.proc = Self::spawn(self.host, &self.args)?;
        Ok(())
    }

    fn url(&self) -> String {
        format!("http://{}:7701", ip(self.host))
    }

    fn gossip(&self) -> String {
        format!("{}:7702", ip(self.host))
    }
}

/// One lookup: the set of `ip:port` of a service, the source and the registry age.
struct Lookup {
    hosts: BTreeSet<String>,
    source: String,
    age_ms: i64,
}

fn lookup(base: &str, service: &str) -> Result<Lookup> {
    let r = http::get(&format!("{base}/v1/registration/{service}"))?;
    ensure!(r.status == 200, "{base}: status {}", r.status);
    let v = r.json()?;
    let hosts = v["hosts"]
        .as_array()
        .context("hosts")?
        .iter()
        .map(|h| format!("{}:{}", h["ip_address"].as_str().unwrap_or("?"), h["port"]))
        .collect();
    Ok(Lookup {
        hosts,
        source: r.header("x-tidings-source").unwrap_or("").to_string(),
        age_ms: r
            .header("x-tidings-registry-age-ms")
            .and_then(|a| a.parse().ok())
            .context("registry age header")?,
    })
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

/// Lookups on every target, all the time: every one must answer 200 with at least the
/// expected hosts of each service.
type Expect = Vec<(&'static str, BTreeSet<String>)>;

struct Hammer {
    targets: Arc<Mutex<(Vec<String>, Expect)>>,
    stop: Arc<AtomicBool>,
    total: Arc<AtomicU64>,
    rounds: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Hammer {
    fn start(targets: Vec<String>, expect: Expect) -> Hammer {
        let targets = Arc::new(Mutex::new((targets, expect)));
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let rounds = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (t, s, n, r, f) = (
            targets.clone(),
            stop.clone(),
            total.clone(),
            rounds.clone(),
            failures.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (list, expect) = t.lock().map(|l| l.clone()).unwrap_or_default();
                for base in list {
                    for (service, want) in &expect {
                        n.fetch_add(1, Ordering::Relaxed);
                        let problem = match lookup(&base, service) {
                            Ok(l) if l.hosts.is_superset(want) => None,
                            Ok(l) => Some(format!(
                                "{base} {service}: {:?} lacks some of {want:?}",
                                l.hosts
                            )),
                            Err(e) => Some(format!("{base} {service}: {e:#}")),
                        };
                        if let Some(p) = problem {
                            if let Ok(mut f) = f.lock() {
                                f.push(p);
                            }
                        }
                    }
                }
                r.fetch_add(1, Ordering::Relaxed);
                // Pacing, not waiting: keep a steady stream without starving the agents.
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Hammer {
            targets,
            stop,
            total,
            rounds,
            failures,
            thread: Some(thread),
        }
    }

    /// Replaces the targets; returns once no round on the old list is still running.
    fn set_targets(&self, targets: Vec<String>) -> Result<()> {
        if let Ok(mut t) = self.targets.lock() {
            t.0 = targets;
        }
        self.settle()
    }

    /// Raises what every lookup must include (views only ever grow in this test).
    fn set_expect(&self, expect: Expect) -> Result<()> {
        if let Ok(mut t) = self.targets.lock() {
            t.1 = expect;
        }
        self.settle()
    }

    fn settle(&self) -> Result<()> {
        let r0 = self.rounds.load(Ordering::Relaxed);
        poll("the hammer to pick up new targets", START, || {
            (self.rounds.load(Ordering::Relaxed) >= r0 + 2).then_some(())
        })
    }

    fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        let total = self.total.load(Ordering::Relaxed);
        ensure!(
            failures.is_empty(),
            "{} of {total} lookups failed, first: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        Ok(total)
    }
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
    Proc::start(
        "registry",
        &[
            "registry",
            "--listen",
            addr,
            "--ttl",
            "10s",
            "--check-in-interval",
            "4s",
        ],
        1,
        START,
    )
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
    let a1 = Agent::start(
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
    let mut a2 = Agent::start(2, &dir(2), &reg_url, &["--endpoint", "web:8080"])?;
    let mut a3 = Agent::start(3, &dir(3), &reg_url, &["--endpoint", "web:8080"])?;
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
    for a in [&a1, &a2, &a3] {
        poll(&format!("{} synced", a.url()), START, || {
            lookup(&a.url(), "web").ok().filter(|l| l.age_ms >= 0)
        })?;
    }
    let members = http::get(&format!("{}/v1/agent/members", a1.url()))?.json()?;
    assert_eq!(
        members["members"].as_array().map(Vec::len),
        Some(3),
        "{members}"
    );

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
    let a4 = Agent::start(
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
    let mut a5 = Agent::start(
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
    let a6 = Agent::start(6, &dir(6), &reg_url, &["--endpoint", "solo:6000"])?;
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
    // Its disk cache holds the current view (it is written at most once a second).
    poll("agent 3's disk cache to be current", START, || {
        let v = http::get(&format!("{}/v1/agent/self", a3.url()))
            .ok()?
            .json()
            .ok()?;
        (v["cache"]["stored_index"] == v["view"]["index"]).then_some(())
    })?;
    a3.proc.signal("KILL")?;
    a3.proc.wait_exit(Duration::from_secs(5))?;
    a3.restart()?;
    let first = lookup(&a3.url(), "web")?;
    ensure!(
        first.hosts.is_superset(&all_web),
        "restarted agent lost hosts: {:?}",
        first.hosts
    );
    assert_eq!(
        first.source, "cache",
        "first answer after a restart comes from the disk cache"
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
            let v = http::get(&format!("{}/v1/agent/members", a6.url()))
                .ok()?
                .json()
                .ok()?;
            let members = v["members"].as_array()?.clone();
            (members.len() == 6 && members.iter().all(|m| m["state"] == "alive")).then_some(())
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

    let lookups = hammer.finish()?;
    eprintln!("{lookups} lookups during the outage and restarts, all served");

    // Endpoints registered at runtime through the local API reach every agent and the
    // registry; deregistered ones leave both.
    let r = http::request(
        "PUT",
        &format!("{}/v1/agent/endpoints", a2.url()),
        Some("application/json"),
        br#"{"service": "exporter", "port": 9100}"#,
        Duration::from_secs(5),
    )?;
    ensure!(r.status == 200, "PUT: {}", String::from_utf8_lossy(&r.body));
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
    let r = http::request(
        "DELETE",
        &format!("{}/v1/agent/endpoints/exporter/9100", a2.url()),
        None,
        b"",
        Duration::from_secs(5),
    )?;
    ensure!(
        r.status == 200,
        "DELETE: {}",
        String::from_utf8_lossy(&r.body)
    );
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
