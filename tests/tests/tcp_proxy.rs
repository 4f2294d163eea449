//! The proxy's TCP listener as an operator runs it: a real registry, check-ins for echo
//! backends (a TCP service that greets with its name, then echoes) on their own 127.0.0.x
//! addresses, and `tidings proxy` with a `protocol = "tcp"` listener in front of them. Traffic
//! is spread, a backend dies mid-run, hosts are added and drained through the registry,
//! half-closes pass through, idle and endless clients are closed, and the connections breaker
//! holds.
//!
//! Backends and clients run on a private tokio runtime; every loop is bounded in count and
//! time, and everything stays on loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tests::echo::{self, EchoBackend};
use tests::{Proc, http, poll, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

const START: Duration = Duration::from_secs(20);
/// One exchange through the proxy, connect to close.
const EXCHANGE: Duration = Duration::from_secs(10);
/// The idle timeout of the test of idle clients; the other test's is long enough never to
/// cut a connection it holds.
const IDLE: Duration = Duration::from_secs(2);
const NEVER_IDLE: Duration = Duration::from_secs(600);

fn checkin(registry: &str, b: &EchoBackend, tags: &[&str]) -> Result<()> {
    let (ip, port) = (b.addr.ip().to_string(), b.addr.port().to_string());
    let mut args = vec![
        "checkin",
        "--registry",
        registry,
        "--service",
        "cache",
        "--ip",
        &ip,
        "--port",
        &port,
        "--no-splay",
    ];
    for t in tags {
        args.extend(["--tag", t]);
    }
    let (code, out, err) = run(&args, START)?;
    ensure!(code == 0, "checkin of {} exited {code}: {out}{err}", b.name);
    Ok(())
}

fn config(registry: &str, idle: Duration) -> String {
    format!(
        r#"
[admin]
address = "127.0.0.1:0"

[[listeners]]
address = "127.0.0.1:0"
protocol = "tcp"
cluster = "cache"
idle_timeout = "{idle}ms"

[[clusters]]
name = "cache"
service = "cache"
membership_url = "{registry}"
connect_timeout = "1s"
health_check = {{ kind = "tcp", interval = "300ms", timeout = "500ms" }}
outlier_detection = {{ consecutive_failures = 2, max_ejection_percent = 50 }}
circuit_breakers = {{ max_connections = 6 }}
"#,
        idle = idle.as_millis()
    )
}

/// The `cache` cluster's hosts by address: (health, decision).
fn hosts(admin: SocketAddr) -> Result<BTreeMap<String, (String, String)>> {
    let v = http::get(&format!("http://{admin}/clusters"))?.json()?;
    let hosts = v["clusters"][0]["hosts"]
        .as_array()
        .with_context(|| format!("no hosts: {v}"))?;
    let s = |h: &serde_json::Value, k: &str| h[k].as_str().unwrap_or("?").to_string();
    Ok(hosts
        .iter()
        .map(|h| (s(h, "address"), (s(h, "health"), s(h, "decision"))))
        .collect())
}

fn routed(admin: SocketAddr) -> Result<Vec<String>> {
    Ok(hosts(admin)?
        .into_iter()
        .filter(|(_, (_, d))| d == "route")
        .map(|(a, _)| a)
        .collect())
}

/// `n` exchanges in a row; the backends that answered, by name, and the failures.
fn spread(rt: &Runtime, proxy: SocketAddr, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut by = BTreeMap::new();
    let mut errors = Vec::new();
    for i in 0..n {
        let msg = format!("hello {i}");
        match rt.block_on(echo::exchange(proxy, msg.as_bytes(), EXCHANGE)) {
            Ok(e) if e.echo == msg.as_bytes() => *by.entry(e.backend).or_default() += 1,
            Ok(e) => errors.push(format!("bad echo {e:?}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    (by, errors)
}

struct Rig {
    rt: Runtime,
    _registry: Proc,
    reg_url: String,
    proxy: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
    backends: Vec<EchoBackend>,
    _dir: tempfile::TempDir,
}

fn start(names: &[&str], idle: Duration) -> Result<Rig> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let registry = Proc::start(
        "registry",
        &["registry", "--listen", "127.0.0.1:0"],
        1,
        START,
    )?;
    let reg_url = format!("http://{}", registry.addr("registry")?);
    let mut backends = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let b = rt.block_on(EchoBackend::start(&format!("127.0.0.{}", 41 + i), name))?;
        checkin(&reg_url, &b, &[])?;
        backends.push(b);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(&reg_url, idle))?;
    let path = path.display().to_string();
    let args = ["proxy", "--config", &path, "--worker-threads", "2"];
    let proxy = Proc::start("proxy", &args, 2, START)?;
    let listen = proxy.addr("tcp listening")?;
    let admin = proxy.addr("admin")?;
    let want = backends.len();
    poll("every backend routed", START, || {
        (routed(admin).ok()?.len() == want).then_some(())
    })?;
    Ok(Rig {
        rt,
        _registry: registry,
        reg_url,
        proxy,
        listen,
        admin,
        backends,
        _dir: dir,
    })
}

#[test]
fn tcp_listener_spreads_connections_survives_a_dead_backend_and_follows_discovery() -> Result<()> {
    let mut rig = start(&["cache-1", "cache-2", "cache-3"], NEVER_IDLE)?;
    let (rt, listen, admin) = (&rig.rt, rig.listen, rig.admin);

    let (by, errors) = spread(rt, listen, 30);
    ensure!(errors.is_empty(), "{errors:?}");
    for b in &rig.backends {
        let n = by.get(&b.name).copied().unwrap_or(0);
        ensure!(n >= 5, "{} got {n} of 30: {by:?}", b.name);
    }

    // Half-close: the client shuts its side, then reads a reply larger than any buffer.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let e = rt.block_on(echo::exchange(listen, &big, EXCHANGE))?;
    ensure!(
        e.echo == big,
        "echo of {} bytes came back as {}",
        big.len(),
        e.echo.len()
    );

    // A backend dies mid-run: new connections go to the others at once (a refused connect
    // fails over), and health checks and outlier detection take it out.
    let dead = rig.backends.remove(0);
    let (dead_name, dead_addr) = (dead.name.clone(), dead.addr);
    rt.block_on(dead.kill());
    let (by, errors) = spread(rt, listen, 20);
    ensure!(errors.is_empty(), "after the kill: {errors:?}");
    ensure!(!by.contains_key(&dead_name), "{by:?}");
    poll("the dead backend is out of rotation", START, || {
        let h = hosts(admin).ok()?;
        let (_, decision) = h.get(&dead_addr.to_string())?;
        (decision != "route").then_some(())
    })?;

    // Discovery adds a host: it takes connections.
    let fresh = rt.block_on(EchoBackend::start("127.0.0.44", "cache-4"))?;
    checkin(&rig.reg_url, &fresh, &[])?;
    poll("the new host is routed", START, || {
        routed(admin)
            .ok()?
            .contains(&fresh.addr.to_string())
            .then_some(())
    })?;
    let (by, errors) = spread(rt, listen, 20);
    ensure!(errors.is_empty(), "{errors:?}");
    ensure!(by.contains_key("cache-4"), "{by:?}");

    // Discovery drains a host: an open connection to it keeps working, new ones go elsewhere.
    let (draining, held) = loop_until_connected_to(rt, listen, "cache-2")?;
    let drained = rig
        .backends
        .iter()
        .find(|b| b.name == "cache-2")
        .context("cache-2")?;
    checkin(&rig.reg_url, drained, &["draining=true"])?;
    poll("the drained host takes no new connections", START, || {
        let h = hosts(admin).ok()?;
        let (_, decision) = h.get(&drained.addr.to_string())?;
        (decision == "drain").then_some(())
    })?;
    drop(draining);
    let (by, errors) = spread(rt, listen, 20);
    ensure!(errors.is_empty(), "{errors:?}");
    ensure!(!by.contains_key("cache-2"), "{by:?}");
    let echoed = rt.block_on(finish(held))?;
    ensure!(
        echoed == b"still here",
        "the open connection was cut: {echoed:?}"
    );

    let received = http::metric(
        &format!("http://{admin}"),
        "tidings_proxy_tcp_bytes_total",
        "direction=\"received\"",
    )?;
    ensure!(received >= big.len() as f64, "bytes received {received}");
    rig.backends.push(fresh);
    stop(rig)
}

/// Opens connections until one lands on `name` (others are closed); returns the connections
/// opened on the way and the one that landed, its greeting read.
fn loop_until_connected_to(
    rt: &Runtime,
    listen: SocketAddr,
    name: &str,
) -> Result<(Vec<TcpStream>, TcpStream)> {
    let mut others = Vec::new();
    for _ in 0..20 {
        let mut s = rt.block_on(TcpStream::connect(listen))?;
        if rt.block_on(echo::greeting(&mut s, EXCHANGE))? == name {
            return Ok((others, s));
        }
        others.push(s);
    }
    bail!("20 connections and none reached {name}")
}

/// Sends a last message on a held connection, half-closes and reads the echo.
async fn finish(mut s: TcpStream) -> Result<Vec<u8>> {
    s.write_all(b"still here").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(EXCHANGE, s.read_to_end(&mut got)).await??;
    Ok(got)
}

fn stop(mut rig: Rig) -> Result<()> {
    rig.proxy.signal("TERM")?;
    let exit = rig.proxy.wait_exit(START)?;
    ensure!(exit.success(), "{exit}; log:\n{}", rig.proxy.log_text());
    for b in rig.backends.drain(..) {
        rig.rt.block_on(b.kill());
    }
    Ok(())
}

#[test]
fn tcp_listener_closes_idle_and_endless_clients_and_holds_the_connections_breaker() -> Result<()> {
    let rig = start(&["idle-1"], IDLE)?;
    let (rt, listen, admin) = (&rig.rt, rig.listen, rig.admin);

    // Silent after the greeting: closed after the idle timeout, not before.
    let mut silent = rt.block_on(TcpStream::connect(listen))?;
    rt.block_on(echo::greeting(&mut silent, EXCHANGE))?;
    let t = Instant::now();
    let mut b = [0u8; 1];
    let n = rt.block_on(async { tokio::time::timeout(START, silent.read(&mut b)).await })??;
    ensure!(n == 0, "read {n} bytes from an idle connection");
    ensure!(t.elapsed() >= IDLE / 2, "closed after {:?}", t.elapsed());

    // Endless: a client that writes and never reads fills every buffer on the way; once
    // nothing moves the idle timeout closes it and its writes fail. At most 256 MiB.
    let endless = rt.block_on(async {
        let mut s = TcpStream::connect(listen).await?;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..4096 {
            match tokio::time::timeout(START, s.write_all(&chunk)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return anyhow::Ok(true),
                Err(_) => return anyhow::Ok(false),
            }
        }
        anyhow::Ok(false)
    })?;
    ensure!(endless, "an endless writer was never closed");

    // Breaker: six upstream connections at most; the seventh client is closed at once.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut s = rt.block_on(TcpStream::connect(listen))?;
        rt.block_on(echo::greeting(&mut s, EXCHANGE))?;
        held.push(s);
    }
    let refused = rt.block_on(echo::exchange(listen, b"one too many", EXCHANGE));
    ensure!(
        refused.is_err(),
        "a seventh connection got through: {refused:?}"
    );
    let overflows = http::metric(
        &format!("http://{admin}"),
        "tidings_proxy_overflow_total",
        "resource=\"connections\"",
    )?;
    ensure!(overflows >= 1.0, "overflow not counted");
    drop(held);
    poll("a slot comes back", START, || {
        rt.block_on(echo::exchange(listen, b"again", EXCHANGE)).ok()
    })?;
    let idle = http::metric(
        &format!("http://{admin}"),
        "tidings_proxy_tcp_idle_timeouts_total",
        "",
    )?;
    ensure!(idle >= 2.0, "idle timeouts counted {idle}");
    stop(rig)
}
