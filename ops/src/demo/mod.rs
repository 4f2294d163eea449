//! `tidings demo`: the whole system on loopback in one command (README.md, "The two commands").
//!
//! A registry (memory store), N hosts (each an agent plus two backend services on its own
//! 127.0.0.x address) and a proxy; steady traffic through the proxy and lookups against every
//! agent; then the chaos: SIGKILL the registry, kill a backend, bring the registry back empty.
//! It exits 0 only if no request and no lookup failed while the registry was down.

mod backends;
mod procs;
mod script;
mod traffic;
mod view;

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::cli::parse_duration;
use backends::Backend;
use procs::Proc;
use script::Script;
use traffic::Stats;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the scripted run lasts (traffic, registry kill, backend kill, restart).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub duration: Duration,
    /// Hosts, each with an agent and two backend services (2-40).
    #[arg(long, default_value_t = 4)]
    pub hosts: usize,
    /// Requests per second through the proxy.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Print the final summary as JSON (and no live view).
    #[arg(long)]
    pub json: bool,
}

const SERVICES: [&str; 2] = ["web", "api"];
/// Short on purpose so the demo shows a whole check-in cycle in seconds.
const CHECK_IN: &str = "2s";

fn host_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11 + u8::try_from(i).unwrap_or(0)))
}

pub async fn main(args: DemoArgs) -> ExitCode {
    if !(2..=40).contains(&args.hosts)
        || args.duration < Duration::from_secs(10)
        || args.rate == 0
        || args.rate > 5000
    {
        eprintln!("tidings demo: --hosts must be 2-40, --duration at least 10s, --rate 1-5000");
        return ExitCode::from(crate::EXIT_USAGE);
    }
    // On SIGTERM or Ctrl-C, dropping `run` drops every child process handle, and each kills
    // its process: an interrupted demo leaves no registry, agent or proxy behind.
    let outcome = tokio::select! {
        res = run(args) => res,
        () = crate::telemetry::shutdown_signal() => {
            Err(anyhow::anyhow!("interrupted; every process it started is stopped"))
        }
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tidings demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    registry: Proc,
    registry_addr: SocketAddr,
    /// Held, not read: the agent processes live (kill_on_drop) as long as the demo does.
    _agents: Vec<Proc>,
    agent_apis: Vec<String>,
    backends: Vec<Backend>,
    proxy: Proc,
    proxy_addr: String,
    admin_addr: String,
}

async fn start(args: &DemoArgs, say: &impl Fn(&str)) -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let (registry, registry_addr) = start_registry(args.json, dir.path(), say).await?;
    let hosts = start_hosts(args, dir.path(), registry_addr, say).await?;
    let proxy = start_proxy(args.json, dir.path(), &hosts.agent_apis[0], say).await?;
    Ok(Cluster {
        dir,
        registry,
        registry_addr,
        _agents: hosts.agents,
        agent_apis: hosts.agent_apis,
        backends: hosts.backends,
        proxy: proxy.proc,
        proxy_addr: proxy.addr,
        admin_addr: proxy.admin_addr,
    })
}

/// The registry's command line, listening on `listen` (its first start and its restart).
fn registry_args(listen: &str) -> Vec<String> {
    strings(&[
        "registry",
        "--listen",
        listen,
        "--ttl",
        "10s",
        "--check-in-interval",
        CHECK_IN,
    ])
}

/// Where the process `name` logs, in the demo's directory.
fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

/// Starts the registry (memory store) on a free port.
async fn start_registry(json: bool, dir: &Path, say: &impl Fn(&str)) -> Result<(Proc, SocketAddr)> {
    let registry = Proc::start(
        "registry",
        &registry_args("127.0.0.2:0"),
        1,
        log_path(dir, "registry"),
    )
    .await?;
    let registry_addr = registry.addr("registry")?;
    announce(json, "registry", registry_addr);
    say(&format!(
        "registry (memory store) listening on {registry_addr}, dashboard http://{registry_addr}/ui"
    ));
    Ok((registry, registry_addr))
}

/// Every host's agent and backends, in host order.
struct Hosts {
    agents: Vec<Proc>,
    agent_apis: Vec<String>,
    backends: Vec<Backend>,
}

/// Starts each host: its backends, then its agent (the first agent is the others' seed).
async fn start_hosts(
    args: &DemoArgs,
    dir: &Path,
    registry_addr: SocketAddr,
    say: &impl Fn(&str),
) -> Result<Hosts> {
    let key_file = dir.join("gossip.key");
    std::fs::write(&key_file, gossip::generate_key())?;
    let mut hosts = Hosts {
        agents: Vec::new(),
        agent_apis: Vec::new(),
        backends: Vec::new(),
    };
    let mut seed: Option<String> = None;
    for i in 0..args.hosts {
        let ip = host_ip(i);
        let mut a = agent_args(i, registry_addr, dir, &key_file);
        for svc in SERVICES {
            let b = Backend::start(svc, i, ip).await?;
            a.extend(strings(&[
                "--endpoint",
                &format!("{svc}:{}@{ip}", b.addr.port()),
            ]));
            hosts.backends.push(b);
        }
        if let Some(s) = &seed {
            a.extend(strings(&["--join", s]));
        }
        let name = format!("agent-{i}");
        let agent = Proc::start(&name, &a, 2, log_path(dir, &name)).await?;
        let api_addr = agent.addr("api")?;
        let api = api_addr.to_string();
        if seed.is_none() {
            seed = Some(agent.addr("gossip")?.to_string());
        }
        announce(args.json, &format!("agent-{i} api"), api_addr);
        say(&format!(
            "host-{i} on {ip}: agent api {api} (dashboard http://{api}/ui), backends web+api"
        ));
        hosts.agent_apis.push(api);
        hosts.agents.push(agent);
    }
    Ok(hosts)
}

/// Agent `i`'s command line, before its endpoints and seed.
fn agent_args(i: usize, registry_addr: SocketAddr, dir: &Path, key_file: &Path) -> Vec<String> {
    let ip = host_ip(i);
    let mut a = strings(&["agent", "--registry", &format!("http://{registry_addr}")]);
    a.extend(strings(&[
        "--api",
        &format!("{ip}:0"),
        "--gossip",
        &format!("{ip}:0"),
        "--dns",
        &format!("{ip}:0"),
    ]));
    a.extend(strings(&[
        "--data-dir",
        &dir.join(format!("agent-{i}")).to_string_lossy(),
    ]));
    a.extend(strings(&[
        "--gossip-key-file",
        &key_file.to_string_lossy(),
        "--check-in-interval",
        CHECK_IN,
    ]));
    a.extend(strings(&["--zone", &format!("zone-{}", i % 2)]));
    a
}

/// The running proxy and where it listens.
struct ProxyProc {
    proc: Proc,
    addr: String,
    admin_addr: String,
}

/// Starts the proxy, routing the demo's services through the first agent.
async fn start_proxy(
    json: bool,
    dir: &Path,
    agent_api: &str,
    say: &impl Fn(&str),
) -> Result<ProxyProc> {
    let mut p = strings(&["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    p.extend(strings(&[
        "--agent",
        &format!("http://{agent_api}"),
        "--health-interval",
        "1s",
        "--zone",
        "zone-0",
    ]));
    for svc in SERVICES {
        p.extend(strings(&["--route", svc]));
    }
    let proxy = Proc::start("proxy", &p, 2, log_path(dir, "proxy")).await?;
    let admin = proxy.addr("admin")?;
    let admin_addr = admin.to_string();
    let listener = proxy
        .addrs
        .iter()
        .find(|(m, _)| !m.contains("admin"))
        .map(|(_, a)| *a)
        .context("the proxy reported no listener")?;
    let proxy_addr = listener.to_string();
    announce(json, "proxy", listener);
    announce(json, "proxy admin", admin);
    say(&format!(
        "proxy listening on {proxy_addr}, admin on {admin_addr} (dashboard http://{admin_addr}/ui)"
    ));
    Ok(ProxyProc {
        proc: proxy,
        addr: proxy_addr,
        admin_addr,
    })
}

/// With `--json` stdout carries only the summary, so the demo logs where its parts listen
/// instead, as every `tidings` process does ("... listening", with `addr`): that is how a
/// harness finds the running demo's APIs and dashboards.
fn announce(json: bool, what: &str, addr: std::net::SocketAddr) {
    if json {
        tracing::info!(%addr, "demo {what} listening");
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Waits until the proxy routes to every backend (gossip and checks have settled).
async fn settle(c: &Cluster, expected: usize) -> Result<()> {
    let client = traffic::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let hosts = view::proxy_hosts(&client, &c.admin_addr).await;
        if hosts.iter().filter(|h| h.decision == "route").count() >= expected {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "the proxy did not see all {expected} backends healthy within 60 s (logs in {})",
        c.dir.path().display()
    )
}

async fn run(args: DemoArgs) -> Result<bool> {
    let live = !args.json && std::io::stdout().is_terminal();
    let quiet = args.json;
    let say = |m: &str| {
        if !quiet {
            println!("{m}");
        }
    };
    let mut c = start(&args, &say).await?;
    let services: Vec<String> = SERVICES.iter().map(|s| s.to_string()).collect();
    settle(&c, args.hosts * SERVICES.len()).await?;
    say("all backends routable; starting traffic");

    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let start_at = Instant::now();
    let deadline = start_at + args.duration;
    let driver = tokio::spawn(traffic::drive(
        c.proxy_addr.clone(),
        services.clone(),
        args.rate,
        deadline,
        stats.clone(),
        stop.clone(),
    ));
    let looker = tokio::spawn(traffic::lookups(
        c.agent_apis.clone(),
        services.clone(),
        deadline,
        stats.clone(),
        stop.clone(),
    ));

    let expected_endpoints = args.hosts * SERVICES.len();
    let killed_backend = c.backends.len() - 2; // the last host's web service
    let mut script = Script::new(
        args.duration,
        live,
        quiet,
        expected_endpoints,
        killed_backend,
    );
    let client = traffic::client();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < deadline {
        tick.tick().await;
        let elapsed = start_at.elapsed();
        script.step(&mut c, &stats, elapsed).await?;
        script.check_repopulated(&client, &c, elapsed).await;
        if quiet {
            continue;
        }
        script.show(&client, &c, &services, &stats, elapsed).await;
    }
    stop.cancel();
    let _ = driver.await;
    let _ = looker.await;
    script.end_outage();
    let counts = stats.counts.lock().map(|c| c.clone()).unwrap_or_default();
    let summary = summary(&counts, script.downtime, script.repopulated, args.duration);
    let ok = counts.errors_while_registry_down == 0
        && counts.lookups_while_registry_down > 0
        && counts.lookups_served_while_registry_down == counts.lookups_while_registry_down;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary, ok, c.dir.path());
    }
    drop(c.proxy);
    Ok(ok)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

fn summary(
    c: &traffic::Counts,
    downtime: Duration,
    repopulated: Option<Duration>,
    duration: Duration,
) -> serde_json::Value {
    let mut lat = c.latencies_us.clone();
    lat.sort_unstable();
    serde_json::json!({
        "duration_s": duration.as_secs_f64(),
        "requests": c.requests,
        "errors": c.errors,
        "errors_while_registry_down": c.errors_while_registry_down,
        "requests_while_registry_down": c.requests_while_registry_down,
        "p50_ms": percentile(&lat, 0.50),
        "p99_ms": percentile(&lat, 0.99),
        "registry_down_s": downtime.as_secs_f64(),
        "lookups": c.lookups,
        "lookups_failed": c.lookups_failed,
        "lookups_while_registry_down": c.lookups_while_registry_down,
        "lookups_served_while_registry_down": c.lookups_served_while_registry_down,
        "registry_repopulated_s": repopulated.map(|d| d.as_secs_f64()),
        "last_error": c.last_error,
    })
}

fn print_summary(s: &serde_json::Value, ok: bool, logs: &std::path::Path) {
    println!("\n=== Tidings demo summary ===");
    println!(
        "requests through the proxy: {}   errors: {}   p50 {:.2} ms   p99 {:.2} ms",
        s["requests"],
        s["errors"],
        s["p50_ms"].as_f64().unwrap_or(0.0),
        s["p99_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "registry down for {:.1} s: {} requests, {} errors",
        s["registry_down_s"].as_f64().unwrap_or(0.0),
        s["requests_while_registry_down"],
        s["errors_while_registry_down"]
    );
    println!(
        "lookups while the registry was down: {} of {} served",
        s["lookups_served_while_registry_down"], s["lookups_while_registry_down"]
    );
    match s["registry_repopulated_s"].as_f64() {
        Some(t) => println!("registry repopulated {t:.1} s after its restart"),
        None => println!("registry NOT repopulated before the end"),
    }
    if let Some(e) = s["last_error"].as_str() {
        println!("last error: {e}");
    }
    println!("logs: {} (removed on exit)", logs.display());
    println!(
        "{}",
        if ok {
            "PASS: the registry outage cost no request and no lookup"
        } else {
            "FAIL: the registry outage was visible to clients"
        }
    );
}
