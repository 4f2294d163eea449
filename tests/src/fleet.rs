//! The pieces of a fleet as the end-to-end tests drive them: a registry, agents (on a
//! loopback address or inside a network namespace), and what their local API says —
//! lookups, members, the whole catalog — and the runtime endpoints registered through it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use schema::agent_api::{AgentSelf, MemberState, Members};

use crate::{Proc, START, http, poll};

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
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn start(spec: AgentSpec<'_>) -> Result<Agent> {
        Agent::start_env(spec, Vec::new(), "")
    }

    /// [`Agent::start`] with extra environment variables (kept for [`Agent::restart`]) and
    /// top-level config keys (`key = value` lines) ahead of the gossip section.
    pub fn start_env(
        spec: AgentSpec<'_>,
        env: Vec<(String, String)>,
        config_top: &str,
    ) -> Result<Agent> {
        std::fs::create_dir_all(spec.dir)?;
        let config = spec.dir.with_extension("toml");
        std::fs::write(&config, format!("{config_top}{FAST_GOSSIP}"))?;
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
        let proc = spawn(spec.netns.as_deref(), &spec.name, &args, &env)?;
        Ok(Agent {
            proc,
            name: spec.name,
            dir: spec.dir.to_path_buf(),
            netns: spec.netns,
            url: spec.url,
            gossip: spec.gossip,
            args,
            env,
        })
    }

    /// Starts the same agent again (after a kill): same flags, same disk cache.
    pub fn restart(&mut self) -> Result<()> {
        self.proc = spawn(self.netns.as_deref(), &self.name, &self.args, &self.env)?;
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
    local_agent_with(name, ip, dir, registry, extra, "")
}

/// [`local_agent`] with top-level config keys (or whole sections) ahead of the gossip section.
pub fn local_agent_with(
    name: &str,
    ip: &str,
    dir: &Path,
    registry: &str,
    extra: &[&str],
    config_top: &str,
) -> Result<Agent> {
    Agent::start_env(
        AgentSpec {
            name: name.to_string(),
            netns: None,
            gossip: format!("{ip}:7702"),
            api: format!("{ip}:7701"),
            url: format!("http://{ip}:7701"),
            registry,
            dir,
            extra,
        },
        Vec::new(),
        config_top,
    )
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
    deregister_at(base, service, port, None)
}

/// [`deregister`] of an endpoint registered with an `ip` other than the host's.
pub fn deregister_at(base: &str, service: &str, port: u16, ip: Option<&str>) -> Result<()> {
    let query = ip.map(|ip| format!("?ip={ip}")).unwrap_or_default();
    let r = http::request(
        "DELETE",
        &format!("{base}/v1/agent/endpoints/{service}/{port}{query}"),
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

fn spawn(
    netns: Option<&str>,
    name: &str,
    args: &[String],
    env: &[(String, String)],
) -> Result<Proc> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Proc::start_in_env(netns, name, &refs, &env, 2, START)
}

/// One lookup: the set of `ip:port` of a service, the source and the registry age.
pub struct Lookup {
    pub hosts: BTreeSet<String>,
    pub source: String,
    pub age_ms: i64,
}

pub fn lookup(base: &str, service: &str) -> Result<Lookup> {
    lookup_within(base, service, Duration::from_secs(10))
}

/// [`lookup`] that fails after `timeout`.
pub fn lookup_within(base: &str, service: &str, timeout: Duration) -> Result<Lookup> {
    let url = format!("{base}/v1/registration/{service}");
    let r = http::request("GET", &url, None, b"", timeout)?;
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
        source: r
            .header(schema::wire::HEADER_SOURCE)
            .unwrap_or("")
            .to_string(),
        age_ms: r
            .header(schema::wire::HEADER_REGISTRY_AGE)
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
    let answer: Members = http::get(&format!("{base}/v1/agent/members"))?.parse()?;
    Ok(answer
        .members
        .into_iter()
        .map(|m| Member {
            addr: m.addr,
            epoch: m.epoch,
            alive: m.state == MemberState::Alive,
            is_self: m.is_self,
        })
        .collect())
}

pub fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

/// A loopback address of its own for each test and run: `127.<run>.<test>.<host>`, so
/// suites that run at the same time (other test binaries, other checkouts) never share an
/// address, whatever ports they use.
pub fn loopback(test: u8, host: u8) -> String {
    let run = 1 + std::process::id() % 250;
    format!("127.{run}.{test}.{host}")
}

/// Polls until the agent's disk cache holds its current view (it is written at most once a
/// second), so that a crash now loses nothing.
pub fn wait_cache_current(base: &str) -> Result<()> {
    poll(&format!("{base}'s disk cache to be current"), START, || {
        let me: AgentSelf = http::get(&format!("{base}/v1/agent/self"))
            .ok()?
            .parse()
            .ok()?;
        (me.cache.stored_index == me.view.index).then_some(())
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

/// An agent on `ip` (gossip :7702, API :7701) that seals its gossip with the key in
/// `key_file`, checking in every second (fleet agents run insecure).
pub fn keyed_agent(
    ip: &str,
    dir: &Path,
    registry: &str,
    key_file: &Path,
    extra: &[&str],
) -> Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let config = dir.with_extension("toml");
    std::fs::write(&config, FAST_GOSSIP)?;
    let (gossip, api) = (format!("{ip}:7702"), format!("{ip}:7701"));
    let (dir, config, key) = (
        dir.display().to_string(),
        config.display().to_string(),
        key_file.display().to_string(),
    );
    let mut args = vec![
        "agent",
        "--registry",
        registry,
        "--api",
        &api,
        "--gossip",
        &gossip,
        "--check-in-interval",
        "1s",
        "--gossip-key-file",
        &key,
        "--data-dir",
        &dir,
        "--config",
        &config,
    ];
    args.extend_from_slice(extra);
    Proc::start(&format!("agent-{ip}"), &args, 2, START)
}

/// The keys of a signed-gossip fleet, written in `dir`: the cluster key, the registry's
/// signing key and its public half (for agents' `--registry-key-file`).
pub struct SigningKeys {
    pub cluster: PathBuf,
    pub registry: PathBuf,
    pub registry_public: PathBuf,
}

impl SigningKeys {
    pub fn create(dir: &Path) -> Result<SigningKeys> {
        let keys = SigningKeys {
            cluster: dir.join("cluster-key"),
            registry: dir.join("registry-key"),
            registry_public: dir.join("registry-key.pub"),
        };
        let (code, key, err) = crate::run(&["gossip", "keygen"], Duration::from_secs(10))?;
        ensure!(code == 0, "gossip keygen: {err}");
        std::fs::write(&keys.cluster, key)?;
        let out = keys.registry.display().to_string();
        let args = ["registry", "keygen", "--out", &out];
        let (code, public, err) = crate::run(&args, Duration::from_secs(10))?;
        ensure!(code == 0, "registry keygen: {err}");
        std::fs::write(&keys.registry_public, public)?;
        Ok(keys)
    }

    /// A memory registry on `addr` that certifies agents' owner keys (TTL 300 s, check-ins
    /// every 2 s).
    pub fn registry(&self, addr: &str) -> Result<Proc> {
        let key = self.registry.display().to_string();
        let args = [
            "registry",
            "--listen",
            addr,
            "--ttl",
            "300s",
            "--check-in-interval",
            "2s",
            "--signing-key-file",
            &key,
        ];
        Proc::start("registry", &args, 1, START)
    }
}

/// One `tidings_gossip_<field>` counter from the `/metrics` of the agent at `base`.
pub fn gossip_counter(base: &str, field: &str) -> Result<u64> {
    let text = String::from_utf8(http::get(&format!("{base}/metrics"))?.body.to_vec())?;
    let name = format!("tidings_gossip_{field}_total");
    text.lines()
        .find(|l| l.starts_with(&name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .with_context(|| format!("{name} not in /metrics"))
}

/// A v2 check-in of `endpoints` (service, port) on `ip` straight to the registry at
/// `registry` (a cron job's, owned by no agent); asserts it succeeded.
pub fn registry_check_in(registry: &str, ip: &str, endpoints: &[(String, u16)]) -> Result<()> {
    post_check_in(registry, &checkin_body(ip, endpoints, "1"))
}

/// `POST /v2/checkin` of a JSON `body` to `registry`; asserts it succeeded.
pub fn post_check_in(registry: &str, body: &str) -> Result<()> {
    let r = http::request(
        "POST",
        &format!("{registry}/v2/checkin"),
        Some("application/json"),
        body.as_bytes(),
        Duration::from_secs(5),
    )?;
    ensure!(
        r.status == 200,
        "check-in: {}",
        String::from_utf8_lossy(&r.body)
    );
    Ok(())
}

/// A [`keyed_agent`] with `--gossip-signing require` under the registry key in `pubkey`,
/// joining `seed` unless it is the agent's own gossip address.
pub fn signed_agent(
    ip: &str,
    seed: &str,
    dir: &Path,
    registry: &str,
    keys: &SigningKeys,
    extra: &[&str],
) -> Result<Proc> {
    let pubkey = keys.registry_public.display().to_string();
    let mut args = vec![
        "--gossip-signing",
        "require",
        "--registry-key-file",
        &pubkey,
    ];
    if seed != format!("{ip}:7702") {
        args.extend_from_slice(&["--join", seed]);
    }
    args.extend_from_slice(extra);
    keyed_agent(ip, dir, registry, &keys.cluster, &args)
}

/// A v2 check-in body: `endpoints` as (service, port), every one with `revision`.
pub fn checkin_body(ip: &str, endpoints: &[(String, u16)], revision: &str) -> String {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(service, port)| serde_json::json!({"service": service, "port": port, "revision": revision}))
        .collect();
    serde_json::json!({"ip": ip, "endpoints": endpoints}).to_string()
}
