//! The proxy as an operator runs it: a real registry, cron check-ins for three backends on
//! their own 127.0.0.x addresses, and `tidings proxy` in front of them — then a backend dies
//! under load, the registry is SIGKILLed, and the proxy is asked to stop.
//!
//! The backends and the load are in this process (a private tokio runtime); every load loop
//! is bounded in count and time, and everything stays on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tests::backend::Backend;
use tests::{Proc, http, poll, run};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

const START: Duration = Duration::from_secs(20);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// `GET http://{proxy}{path}` with `Host: web`; returns (status, body).
async fn get_web(client: &HttpClient, proxy: SocketAddr, path: &str) -> Result<(u16, String)> {
    let req = Request::get(format!("http://{proxy}{path}"))
        .header("host", "web")
        .body(Full::new(Bytes::new()))?;
    let fut = async {
        let resp = client.request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("no answer within 10 s")?
}

/// What a load loop saw.
#[derive(Debug, Default)]
struct Tally {
    ok: HashMap<String, u64>,
    errors: Vec<String>,
}

impl Tally {
    fn total_ok(&self) -> u64 {
        self.ok.values().sum()
    }
    fn merge(&mut self, other: Tally) {
        for (k, v) in other.ok {
            *self.ok.entry(k).or_default() += v;
        }
        self.errors.extend(other.errors);
    }
}

/// Sends GETs until `stop`, `max` requests or `within`, whichever comes first.
async fn load(
    client: HttpClient,
    proxy: SocketAddr,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    max: u64,
    within: Duration,
) -> Tally {
    let end = Instant::now() + within;
    let mut tally = Tally::default();
    for _ in 0..max {
        if stop.load(Ordering::SeqCst) || Instant::now() >= end {
            break;
        }
        match get_web(&client, proxy, "/").await {
            Ok((200, body)) => *tally.ok.entry(body).or_default() += 1,
            Ok((status, body)) => tally.errors.push(format!("{status}: {body}")),
            Err(e) => tally.errors.push(format!("{e:#}")),
        }
        sent.fetch_add(1, Ordering::SeqCst);
    }
    tally
}

/// `load` on `workers` concurrent loops, stopped by the caller.
struct LoadRun {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Tally>>,
}

impl LoadRun {
    fn start(rt: &Runtime, client: &HttpClient, proxy: SocketAddr, workers: usize) -> LoadRun {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let tasks = (0..workers)
            .map(|_| {
                rt.spawn(load(
                    client.clone(),
                    proxy,
                    stop.clone(),
                    sent.clone(),
                    20_000,
                    Duration::from_secs(60),
                ))
            })
            .collect();
        LoadRun { stop, sent, tasks }
    }

    /// Waits until `n` more requests have been answered (or the loops ended).
    fn wait_for(&self, n: u64) -> Result<()> {
        let target = self.sent.load(Ordering::SeqCst) + n;
        poll(
            &format!("{n} more requests"),
            Duration::from_secs(30),
            || (self.sent.load(Ordering::SeqCst) >= target).then_some(()),
        )
    }

    fn finish(self, rt: &Runtime) -> Result<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Tally::default();
        for t in self.tasks {
            all.merge(rt.block_on(t)?);
        }
        Ok(all)
    }
}

fn clusters(admin: SocketAddr) -> Result<serde_json::Value> {
    http::get(&format!("http://{admin}/clusters"))?.json()
}

/// The `/clusters` entry for `addr` in the `web` cluster.
fn host_entry(admin: SocketAddr, addr: SocketAddr) -> Result<serde_json::Value> {
    let v = clusters(admin)?;
    v["clusters"][0]["hosts"]
        .as_array()
        .and_then(|hosts| {
            hosts
                .iter()
                .find(|h| h["address"] == addr.to_string())
                .cloned()
        })
        .with_context(|| format!("{addr} not in /clusters: {v}"))
}

fn checkin(registry: &str, backend: &Backend) -> Result<()> {
    let (code, out, err) = run(
        &[
            "checkin",
            "--registry",
            registry,
            "--service",
            "web",
            "--ip",
            &backend.addr.ip().to_string(),
            "--port",
            &backend.addr.port().to_string(),
            "--no-splay",
        ],
        START,
    )?;
    if code != 0 {
        bail!("checkin of {} exited {code}: {out}{err}", backend.name);
    }
    Ok(())
}

#[test]
fn proxy_spreads_load_survives_a_dead_backend_and_the_registry_and_drains() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut backends = Vec::new();
    for (i, ip) in ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .iter()
        .enumerate()
    {
        backends.push(rt.block_on(Backend::start(ip, &format!("backend-{}", i + 1)))?);
    }

    let mut registry = Proc::start(
        "registry",
        &["registry", "--listen", "127.0.0.1:0"],
        1,
        START,
    )?;
    let reg_url = format!("http://{}", registry.addr("registry")?);
    for b in &backends {
        checkin(&reg_url, b)?;
    }

    let mut proxy = Proc::start(
        "proxy",
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--agent",
            &reg_url,
            "--route",
            "web",
            "--health-interval",
            "300ms",
            "--worker-threads",
            "2",
        ],
        2,
        START,
    )?;
    let listen = proxy.addr("proxy listening")?;
    let admin = proxy.addr("admin")?;
    poll("proxy ready", START, || {
        http::get(&format!("http://{admin}/ready"))
            .ok()
            .filter(|r| r.status == 200)
    })?;
    poll("three routable hosts", START, || {
        let v = clusters(admin).ok()?;
        (v["clusters"][0]["routable_hosts"] == 3).then_some(())
    })?;

    // Traffic is spread over the three backends.
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let stop = Arc::new(AtomicBool::new(false));
    let spread = rt.block_on(load(
        client.clone(),
        listen,
        stop,
        Arc::new(AtomicU64::new(0)),
        90,
        Duration::from_secs(30),
    ));
    assert!(spread.errors.is_empty(), "{:?}", spread.errors);
    assert_eq!(spread.total_ok(), 90, "{spread:?}");
    for b in &backends {
        let n = spread.ok.get(&b.name).copied().unwrap_or(0);
        assert!(n >= 15, "{} got {n} of 90: {:?}", b.name, spread.ok);
    }

    // Kill a backend under load: retries and health checks hide it from every client. Three
    // loops: every failed first attempt may then hold a retry, within the default budget
    // (min_retry_concurrency 3, max_retries 3).
    let loadrun = LoadRun::start(&rt, &client, listen, 3);
    loadrun.wait_for(100)?;
    let dead = backends.remove(0);
    let (dead_name, dead_addr) = (dead.name.clone(), dead.addr);
    rt.block_on(dead.kill());
    poll("the dead backend is unhealthy", START, || {
        let h = host_entry(admin, dead_addr).ok()?;
        (h["health"] == "unhealthy" && h["decision"] == "hold").then_some(())
    })?;
    let sent_at_unhealthy = loadrun.sent.load(Ordering::SeqCst);
    loadrun.wait_for(200)?;
    let tally = loadrun.finish(&rt)?;
    assert!(
        tally.errors.is_empty(),
        "clients saw {} errors: {:?}",
        tally.errors.len(),
        &tally.errors[..tally.errors.len().min(5)]
    );
    assert!(tally.total_ok() >= sent_at_unhealthy + 200, "{tally:?}");
    for b in &backends {
        assert!(tally.ok.contains_key(&b.name), "{} got nothing", b.name);
    }

    // SIGKILL the registry: the proxy keeps its last set (fail static) and traffic flows.
    registry.signal("KILL")?;
    registry.wait_exit(START)?;
    poll("the proxy notices the registry is gone", START, || {
        let v = clusters(admin).ok()?;
        (v["clusters"][0]["membership"]["consecutive_errors"].as_u64()? >= 1).then_some(())
    })?;
    let after = rt.block_on(load(
        client.clone(),
        listen,
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        60,
        Duration::from_secs(30),
    ));
    assert!(after.errors.is_empty(), "{:?}", after.errors);
    assert_eq!(after.total_ok(), 60, "{after:?}");
    assert!(!after.ok.contains_key(&dead_name), "{after:?}");
    for b in &backends {
        assert!(
            after.ok.contains_key(&b.name),
            "{} got nothing: {after:?}",
            b.name
        );
    }

    // SIGTERM: readiness fails at once, the in-flight request finishes, the proxy exits 0.
    let slow_before: u64 = backends
        .iter()
        .map(|b| b.slow_started.load(Ordering::SeqCst))
        .sum();
    let slow = rt.spawn({
        let client = client.clone();
        async move { get_web(&client, listen, "/slow").await }
    });
    poll("the slow request reaches a backend", START, || {
        let n: u64 = backends
            .iter()
            .map(|b| b.slow_started.load(Ordering::SeqCst))
            .sum();
        (n > slow_before).then_some(())
    })?;
    proxy.signal("TERM")?;
    poll("readiness fails while draining", START, || {
        http::get(&format!("http://{admin}/ready"))
            .ok()
            .filter(|r| r.status == 503)
    })?;
    let (status, body) = rt.block_on(slow)??;
    assert_eq!(status, 200, "the in-flight request was cut: {body}");
    let exit = proxy.wait_exit(START)?;
    assert!(
        exit.success(),
        "proxy exited with {exit}; log:\n{}",
        proxy.log_text()
    );
    for b in backends {
        rt.block_on(b.kill());
    }
    Ok(())
}

#[test]
fn bad_configuration_exits_64_with_one_line() -> Result<()> {
    let (code, _, err) = run(&["proxy", "--listen", "127.0.0.1:0"], START)?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--route"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, "[[routes]]\ncluster = \"web\"\ntimeout = \"soon\"\n")?;
    let path = path.display().to_string();
    let (code, _, err) = run(&["proxy", "--config", &path], START)?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    Ok(())
}

#[test]
fn the_deployed_example_config_serves_and_stops() -> Result<()> {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/proxy.toml");
    let example = example.display().to_string();
    // Its membership source is the local agent; none need be running for the proxy to serve
    // (it keeps retrying and says so on /ready).
    let mut proxy = Proc::start(
        "proxy",
        &[
            "proxy",
            "--config",
            &example,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--agent",
            "http://127.0.0.1:9",
            // One thread: the current-thread runtime the benchmark uses.
            "--worker-threads",
            "1",
        ],
        2,
        START,
    )?;
    let admin = proxy.addr("admin")?;
    let live = http::get(&format!("http://{admin}/live"))?;
    assert_eq!(live.status, 200);
    let config = http::get(&format!("http://{admin}/config"))?.json()?;
    assert_eq!(config["clusters"][0]["name"], "users");
    proxy.signal("TERM")?;
    let exit = proxy.wait_exit(START)?;
    assert!(exit.success(), "{exit}; log:\n{}", proxy.log_text());
    Ok(())
}
