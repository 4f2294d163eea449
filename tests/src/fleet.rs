//! The pieces of a fleet as the end-to-end tests drive them: agents (on a loopback address or
//! inside a network namespace), lookups and member lists read from their local API, and a
//! [`Hammer`] that reads every agent all the time and records every answer that lacks a host.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::{Proc, http, poll};

const START: Duration = Duration::from_secs(20);

/// Test-speed gossip (SWIM probes and anti-entropy repair); flags cover the rest.
pub const FAST_GOSSIP: &str =
    "[gossip]\nprobe_period_ms = 500\nprobe_rtt_ms = 200\nrepair_interval_ms = 1000\n";

/// Starts a memory registry on `addr` with the given TTL and check-in interval (which is
/// also its warm-up after an empty start).
pub fn registry(addr: &str, ttl: &str, check_in_interval: &str) -> Result<Proc> {
    Proc::start(
        "registry",
        &[
            "registry",
            "--listen",
            addr,
            "--ttl",
            ttl,
            "--check-in-interval",
            check_in_interval,
        ],
        1,
        START,
    )
}

/// How to run one agent.
pub struct AgentSpec<'a> {
    pub name: String,
    /// Run inside this network namespace (`ip netns exec`); `None`: the test's own.
    pub netns: Option<String>,
    /// Gossip address (UDP and TCP); its ip is the host's.
    pub gossip: String,
    /// Local API address (loopback, as the agent insists).
    pub api: String,
    /// Where the test reaches the local API (differs from `api` inside a namespace).
    pub url: String,
    pub registry: &'a str,
    /// Data directory (disk cache); its `.toml` sibling gets the gossip config.
    pub dir: &'a Path,
    pub extra: &'a [&'a str],
}

pub struct Agent {
    pub proc: Proc,
    pub name: String,
    pub dir: PathBuf,
    netns: Option<String>,
    url: String,
    gossip: String,
    args: Vec<String>,
}

impl Agent {
    pub fn start(spec: AgentSpec<'_>) -> Result<Agent> {
        std::fs::create_dir_all(spec.dir)?;
        let config = spec.dir.with_extension("toml");
        std::fs::write(&config, FAST_GOSSIP)?;
        let mut args: Vec<String> = [
            "agent",
            "--registry",
            spec.registry,
            "--api",
            &spec.api,
            "--gossip",
            &spec.gossip,
            "--check-in-interval",
            "1s",
            "--gossip-insecure",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--data-dir".into());
        args.push(spec.dir.display().to_string());
        args.push("--config".into());
        args.push(config.display().to_string());
        args.extend(spec.extra.iter().map(|s| s.to_string()));
        let proc = spawn(spec.netns.as_deref(), &spec.name, &args)?;
        Ok(Agent {
            proc,
            name: spec.name,
            dir: spec.dir.to_path_buf(),
            netns: spec.netns,
            url: spec.url,
            gossip: spec.gossip,
            args,
        })
    }

    /// Starts the same agent again (after a kill): same flags, same disk cache.
    pub fn restart(&mut self) -> Result<()> {
        self.proc = spawn(self.netns.as_deref(), &self.name, &self.args)?;
        Ok(())
    }

    /// Base URL of the local API, as the test reaches it.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The gossip address (`ip:port`), also this agent's identity among its peers.
    pub fn gossip(&self) -> String {
        self.gossip.clone()
    }
}

/// Starts agent `name` on loopback address `ip` (API on 7701, gossip on 7702), its disk
/// cache in `dir`.
pub fn local_agent(
    name: &str,
    ip: &str,
    dir: &Path,
    registry: &str,
    extra: &[&str],
) -> Result<Agent> {
    Agent::start(AgentSpec {
        name: name.to_string(),
        netns: None,
        gossip: format!("{ip}:7702"),
        api: format!("{ip}:7701"),
        url: format!("http://{ip}:7701"),
        registry,
        dir,
        extra,
    })
}

/// Agents `hosts` on `ip(host)`, each with a `web:8080` endpoint, all joining the first;
/// disk caches under `dir`.
pub fn local_web_agents(
    hosts: &[u8],
    ip: impl Fn(u8) -> String,
    dir: &Path,
    registry: &str,
) -> Result<Vec<Agent>> {
    let seed = format!("{}:7702", ip(hosts.first().copied().unwrap_or(1)));
    hosts
        .iter()
        .enumerate()
        .map(|(n, &h)| {
            let extra = joining(n == 0, &seed, &["--endpoint", "web:8080"]);
            let d = dir.join(format!("agent-{h}"));
            local_agent(&format!("agent-{h}"), &ip(h), &d, registry, &extra)
        })
        .collect()
}

/// `extra` plus `--join seed`, except for the seed itself (agent 1 of a test).
pub fn joining<'a>(first: bool, seed: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut all = extra.to_vec();
    if !first {
        all.extend_from_slice(&["--join", seed]);
    }
    all
}

/// `PUT /v1/agent/endpoints` on the agent at `base` (`spec`: the JSON endpoint).
pub fn register(base: &str, spec: &str) -> Result<()> {
    let r = http::request(
        "PUT",
        &format!("{base}/v1/agent/endpoints"),
        Some("application/json"),
        spec.as_bytes(),
        Duration::from_secs(5),
    )?;
    ensure!(r.status == 200, "PUT: {}", String::from_utf8_lossy(&r.body));
    Ok(())
}

/// `DELETE /v1/agent/endpoints/{service}/{port}` on the agent at `base`.
pub fn deregister(base: &str, service: &str, port: u16) -> Result<()> {
    let r = http::request(
        "DELETE",
        &format!("{base}/v1/agent/endpoints/{service}/{port}"),
        None,
        b"",
        Duration::from_secs(5),
    )?;
    ensure!(
        r.status == 200,
        "DELETE: {}",
        String::from_utf8_lossy(&r.body)
    );
    Ok(())
}

fn spawn(netns: Option<&str>, name: &str, args: &[String]) -> Result<Proc> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    match netns {
        Some(ns) => Proc::start_in(ns, name, &refs, 2, START),
        None => Proc::start(name, &refs, 2, START),
    }
}

/// One lookup: the set of `ip:port` of a service, the source and the registry age.
pub struct Lookup {
    pub hosts: BTreeSet<String>,
    pub source: String,
    pub age_ms: i64,
}

pub fn lookup(base: &str, service: &str) -> Result<Lookup> {
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

/// One gossip member as an agent's `/v1/agent/members` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub addr: String,
    pub epoch: u64,
    pub alive: bool,
    pub is_self: bool,
}

pub fn members(base: &str) -> Result<Vec<Member>> {
    let v = http::get(&format!("{base}/v1/agent/members"))?.json()?;
    v["members"]
        .as_array()
        .context("members")?
        .iter()
        .map(|m| {
            Ok(Member {
                addr: m["addr"].as_str().context("addr")?.to_string(),
                epoch: m["epoch"].as_u64().context("epoch")?,
                alive: m["state"] == "alive",
                is_self: m["self"] == true,
            })
        })
        .collect()
}

pub fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

/// What every lookup must include: (service, hosts).
pub type Expect = Vec<(&'static str, BTreeSet<String>)>;

/// A check run once per round besides the lookups (e.g. the proxy's routing); `Err` is
/// recorded as a failure.
pub type Check = Box<dyn FnMut() -> Result<()> + Send>;

/// Lookups on every target, all the time: every one must answer 200 with at least the
/// expected hosts of each service.
pub struct Hammer {
    targets: Arc<Mutex<(Vec<String>, Expect)>>,
    stop: Arc<AtomicBool>,
    total: Arc<AtomicU64>,
    rounds: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Hammer {
    pub fn start(targets: Vec<String>, expect: Expect) -> Hammer {
        Hammer::with_check(
            targets,
            expect,
            Duration::from_millis(10),
            Box::new(|| Ok(())),
        )
    }

    /// [`Hammer::start`] that also runs `check` once per round, and pauses `pause` between
    /// rounds.
    pub fn with_check(
        targets: Vec<String>,
        expect: Expect,
        pause: Duration,
        mut check: Check,
    ) -> Hammer {
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
        let t0 = std::time::Instant::now();
        let record = move |p: String| {
            if let Ok(mut f) = f.lock() {
                f.push(format!("{:.1?} in: {p}", t0.elapsed()));
            }
        };
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (list, expect) = t.lock().map(|l| l.clone()).unwrap_or_default();
                for base in list {
                    for (service, want) in &expect {
                        n.fetch_add(1, Ordering::Relaxed);
                        match lookup(&base, service) {
                            Ok(l) if l.hosts.is_superset(want) => {}
                            Ok(l) => record(format!(
                                "{base} {service}: {:?} lacks some of {want:?}",
                                l.hosts
                            )),
                            Err(e) => record(format!("{base} {service}: {e:#}")),
                        }
                    }
                }
                if let Err(e) = check() {
                    record(format!("check: {e:#}"));
                }
                r.fetch_add(1, Ordering::Relaxed);
                // Pacing, not waiting: keep a steady stream without starving the agents.
                std::thread::sleep(pause);
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
    pub fn set_targets(&self, targets: Vec<String>) -> Result<()> {
        if let Ok(mut t) = self.targets.lock() {
            t.0 = targets;
        }
        self.settle()
    }

    /// Raises what every lookup must include (views only ever grow in this test).
    pub fn set_expect(&self, expect: Expect) -> Result<()> {
        if let Ok(mut t) = self.targets.lock() {
            t.1 = expect;
        }
        self.settle()
    }

    /// Returns once two more rounds have completed.
    pub fn settle(&self) -> Result<()> {
        let r0 = self.rounds.load(Ordering::Relaxed);
        poll("the hammer to complete two rounds", START, || {
            (self.rounds.load(Ordering::Relaxed) >= r0 + 2).then_some(())
        })
    }

    /// Keeps watching for `d` (a fault's planned length), failing as soon as a lookup or
    /// check fails rather than at the end.
    pub fn hold(&self, d: Duration) -> Result<()> {
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end {
            if let Some(first) = self.failures.lock().ok().and_then(|f| f.first().cloned()) {
                bail!("while holding for {d:?}: {first}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Lookups so far, and failures so far.
    pub fn counts(&self) -> (u64, usize) {
        let failed = self.failures.lock().map(|f| f.len()).unwrap_or(0);
        (self.total.load(Ordering::Relaxed), failed)
    }

    /// Stops; fails if any lookup or check failed. Returns (lookups, rounds).
    pub fn finish(mut self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        let total = self.total.load(Ordering::Relaxed);
        ensure!(
            failures.is_empty(),
            "{} of {total} lookups/checks failed, first: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        Ok((total, self.rounds.load(Ordering::Relaxed)))
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A loopback address of its own for each test and run: `127.<run>.<test>.<host>`, so
/// suites that run at the same time (other test binaries, other checkouts) never share an
/// address, whatever ports they use.
pub fn loopback(test: u8, host: u8) -> String {
    let run = 1 + std::process::id() % 250;
    format!("127.{run}.{test}.{host}")
}

/// Starts `tidings proxy` routing `Host: <service>` to the cluster of that name, with its
/// membership from `agent` and health checks every 300 ms; inside `netns` if given.
pub fn proxy(netns: Option<&str>, ip: &str, agent: &str, service: &str) -> Result<Proc> {
    let (listen, admin) = (format!("{ip}:0"), format!("{ip}:0"));
    let args = [
        "proxy",
        "--listen",
        &listen,
        "--admin",
        &admin,
        "--agent",
        agent,
        "--route",
        service,
        "--health-interval",
        "300ms",
        "--worker-threads",
        "2",
    ];
    match netns {
        Some(ns) => Proc::start_in(ns, "proxy", &args, 2, START),
        None => Proc::start("proxy", &args, 2, START),
    }
}

/// [`proxy`], once it routes to every host of `all`: (the proxy, its admin address, its
/// listener).
pub fn routing_proxy(
    netns: Option<&str>,
    ip: &str,
    agent: &str,
    all: &BTreeSet<String>,
) -> Result<(Proc, String, std::net::SocketAddr)> {
    let proxy = self::proxy(netns, ip, agent, "web")?;
    let admin = proxy.addr("admin")?.to_string();
    let listen = proxy.addr("proxy listening")?;
    poll("the proxy to route to every host", START, || {
        all_routed(&admin, all).ok()
    })?;
    Ok((proxy, admin, listen))
}

/// One host of a proxy cluster as `/clusters` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedHost {
    pub discovery: String,
    pub health: String,
    pub decision: String,
}

/// The first cluster's hosts (`ip:port` → status) and its routable count.
pub fn routing(admin: &str) -> Result<(BTreeMap<String, RoutedHost>, u64)> {
    let v = http::get(&format!("http://{admin}/clusters"))?.json()?;
    let cluster = &v["clusters"][0];
    let s = |h: &serde_json::Value, k: &str| h[k].as_str().unwrap_or("?").to_string();
    let hosts = cluster["hosts"]
        .as_array()
        .with_context(|| format!("no hosts in /clusters: {v}"))?
        .iter()
        .map(|h| {
            (
                s(h, "address"),
                RoutedHost {
                    discovery: s(h, "discovery"),
                    health: s(h, "health"),
                    decision: s(h, "decision"),
                },
            )
        })
        .collect();
    let routable = cluster["routable_hosts"]
        .as_u64()
        .context("routable_hosts")?;
    Ok((hosts, routable))
}

/// Fails unless every host of `want` is in the proxy's cluster with decision `route`.
pub fn all_routed(admin: &str, want: &BTreeSet<String>) -> Result<()> {
    let (hosts, routable) = routing(admin)?;
    for addr in want {
        match hosts.get(addr) {
            Some(h) if h.decision == "route" => {}
            other => bail!("{addr} not routed ({routable} routable): {other:?}"),
        }
    }
    Ok(())
}

/// Polls until the agent's disk cache holds its current view (it is written at most once a
/// second), so that a crash now loses nothing.
pub fn wait_cache_current(base: &str) -> Result<()> {
    poll(&format!("{base}'s disk cache to be current"), START, || {
        let v = http::get(&format!("{base}/v1/agent/self"))
            .ok()?
            .json()
            .ok()?;
        (v["cache"]["stored_index"] == v["view"]["index"]).then_some(())
    })
}

/// An agent's whole view: every `service ip:port` of its `/v2/catalog`.
pub fn catalog(base: &str) -> Result<BTreeSet<String>> {
    let v = http::get(&format!("{base}/v2/catalog"))?.json()?;
    let services = v["services"].as_object().context("services")?;
    Ok(services
        .iter()
        .flat_map(|(name, hosts)| {
            hosts.as_array().into_iter().flatten().map(move |h| {
                let ip = h["ip_address"].as_str().unwrap_or("?");
                format!("{name} {ip}:{}", h["port"])
            })
        })
        .collect())
}
