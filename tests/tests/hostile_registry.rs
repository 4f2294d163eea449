//! The registry binary against hostile clients: a slowloris flood larger than its file
//! limit, a flood of blocking queries, and a client that reads a large answer a byte a
//! second. Throughout each, a well-behaved client (a fresh connection for `GET /live`, a
//! plain read, a v2 check-in) must keep getting answers within a second.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tests::fleet::checkin_body;
use tests::http::metric;
use tests::{Proc, START, http, poll};

/// What a well-behaved client may wait for an answer.
const PROMPT: Duration = Duration::from_secs(1);

/// How long a probe may take before it counts as failed outright (it is then reported, not
/// left hanging).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

struct Registry {
    proc: Proc,
    addr: SocketAddr,
    url: String,
    _dir: tempfile::TempDir,
}

/// Starts `tidings registry` on an ephemeral loopback port with `config` as its file.
fn registry(config: &str) -> Result<Registry> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("registry.toml");
    std::fs::write(&path, config)?;
    let path = path.to_str().context("temp dir path is not UTF-8")?;
    let proc = Proc::start(
        "registry",
        &["registry", "--listen", "127.0.0.1:0", "--config", path],
        1,
        START,
    )?;
    let addr = proc.addr("registry")?;
    Ok(Registry {
        url: format!("http://{addr}"),
        proc,
        addr,
        _dir: dir,
    })
}

/// One request on a fresh connection; its status and how long the answer took.
fn timed(method: &str, url: &str, body: Option<&str>) -> Result<(u16, Duration)> {
    let t0 = Instant::now();
    let ct = body.map(|_| "application/json");
    let r = http::request(
        method,
        url,
        ct,
        body.unwrap_or("").as_bytes(),
        PROBE_TIMEOUT,
    )
    .with_context(|| format!("{method} {url}"))?;
    Ok((r.status, t0.elapsed()))
}

/// `method url` answers 200 within [`PROMPT`]; returns how long it took.
fn prompt(method: &str, url: &str, body: Option<&str>) -> Result<Duration> {
    let (status, took) = timed(method, url, body)?;
    ensure!(status == 200, "{method} {url} answered {status}");
    ensure!(took < PROMPT, "{method} {url} took {took:?}");
    Ok(took)
}

/// A one-endpoint v2 check-in that must be answered 200 within [`PROMPT`].
fn checkin(url: &str, ip: &str, service: &str, port: u16) -> Result<Duration> {
    let body = checkin_body(ip, &[(service.to_string(), port)], "r1");
    prompt("POST", &format!("{url}/v2/checkin"), Some(&body))
}

/// Probes `GET /live` on a fresh connection every `every` for `span`, in a thread; each
/// result is the answer time, or what went wrong.
fn prober(
    url: String,
    every: Duration,
    span: Duration,
) -> thread::JoinHandle<Vec<Result<Duration, String>>> {
    thread::spawn(move || {
        let end = Instant::now() + span;
        let mut out = Vec::new();
        while Instant::now() < end {
            out.push(match timed("GET", &format!("{url}/live"), None) {
                Ok((200, took)) => Ok(took),
                Ok((status, took)) => Err(format!("status {status} after {took:?}")),
                Err(e) => Err(format!("{e:#}")),
            });
            // Pacing of the well-behaved client, not a wait for a condition.
            thread::sleep(every);
        }
        out
    })
}

/// Every probe answered, within [`PROMPT`]; at least `min` of them.
fn check_probes(probes: &[Result<Duration, String>], min: usize) -> Result<()> {
    ensure!(
        probes.len() >= min,
        "only {} probes ran (want {min})",
        probes.len()
    );
    let failed: Vec<_> = probes.iter().filter_map(|p| p.as_ref().err()).collect();
    ensure!(
        failed.is_empty(),
        "{} of {} probes failed: {failed:?}",
        failed.len(),
        probes.len()
    );
    let slowest = probes.iter().filter_map(|p| p.as_ref().ok()).max();
    if let Some(slowest) = slowest {
        ensure!(*slowest < PROMPT, "slowest /live probe took {slowest:?}");
    }
    Ok(())
}

/// The soft "Max open files" of process `pid`.
fn open_files_limit(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no Max open files line")?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()
        .context("no soft limit")?;
    Ok(soft.parse()?)
}

/// Half a request head: the connection has started a request and never finishes it.
const HALF_HEAD: &[u8] = b"GET /live HTTP/1.1\r\nHost: registry\r\nUser-Agent: slow";

/// 1 100 half-open requests against a registry whose file limit (256) is far below them: the
/// connection cap (200) evicts the oldest idle ones, so the process never runs out of files
/// and `/live` on a fresh connection answers within a second throughout; check-ins still work.
#[test]
fn slowloris_past_the_file_limit_leaves_the_registry_answering() -> Result<()> {
    let mut reg = registry("[registry.connections]\nmax_connections = 200\n")?;
    let pid = reg.proc.pid();
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=256:256"])
        .output()
        .context("running prlimit (util-linux)")?;
    ensure!(
        out.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(open_files_limit(pid)? == 256, "prlimit did not apply");
    checkin(&reg.url, "10.11.0.1", "web", 8080)?;

    let probes = prober(
        reg.url.clone(),
        Duration::from_millis(50),
        Duration::from_secs(5),
    );
    let mut held = Vec::new();
    let mut connect_failures = 0;
    let mut batch_probes = Vec::new();
    for _batch in 0..11 {
        for _ in 0..100 {
            match TcpStream::connect_timeout(&reg.addr, Duration::from_secs(2)) {
                Ok(mut s) => {
                    // An already evicted connection may refuse the write: that is the point.
                    let _ = s.write_all(HALF_HEAD);
                    held.push(s);
                }
                Err(_) => connect_failures += 1,
            }
        }
        // Between batches, a well-behaved client on its own connection.
        batch_probes.push(
            timed("GET", &format!("{}/live", reg.url), None)
                .map_err(|e| format!("{e:#}"))
                .and_then(|(status, took)| {
                    if status == 200 {
                        Ok(took)
                    } else {
                        Err(format!("status {status}"))
                    }
                }),
        );
    }
    let probes = probes
        .join()
        .map_err(|_| anyhow::anyhow!("prober panicked"))?;
    ensure!(
        !reg.proc.exited(),
        "the registry died; log:\n{}",
        reg.proc.log_text()
    );
    eprintln!(
        "slowloris: {} probes, slowest {:?}",
        probes.len() + batch_probes.len(),
        probes
            .iter()
            .chain(&batch_probes)
            .filter_map(|p| p.as_ref().ok())
            .max()
    );
    check_probes(&batch_probes, 11).context("probes between batches")?;
    check_probes(&probes, 40).context("probes every 50 ms")?;
    ensure!(
        connect_failures == 0,
        "{connect_failures} of 1100 attacker connects failed"
    );

    // The cap did the work: old idle connections were closed to make room, the open count
    // stayed within it, and accepting never ran out of files.
    let evicted = metric(
        &reg.url,
        "tidings_registry_connections_evicted_total",
        "oldest_idle",
    )?;
    eprintln!("slowloris: {evicted} connections evicted");
    ensure!(evicted >= 800.0, "only {evicted} connections evicted");
    let open = metric(&reg.url, "tidings_registry_connections_open", "")?;
    ensure!(open <= 200.0, "{open} connections open past the cap of 200");
    let accept_errors = metric(&reg.url, "tidings_registry_accept_errors_total", "")?;
    ensure!(
        accept_errors == 0.0,
        "{accept_errors} accepts failed (out of files?)"
    );

    // Check-ins still work while the attackers hold their sockets.
    checkin(&reg.url, "10.11.0.2", "web", 8080)?;
    let catalog = http::get(&format!("{}/v2/catalog", reg.url))?.json()?;
    let hosts = catalog["services"]["web"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    ensure!(hosts == 2, "web has {hosts} hosts: {catalog}");
    drop(held);
    Ok(())
}

/// A raw blocking catalog query on its own connection: (status, Retry-After, answer time).
fn blocking_catalog(addr: SocketAddr, index: &str) -> Result<(u16, Option<String>, Duration)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(45)))?;
    let t0 = Instant::now();
    write!(
        s,
        "GET /v2/catalog?index={index}&wait=30s HTTP/1.1\r\nHost: registry\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line: {text:.200}"))?;
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let retry_after = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().to_string())
    });
    Ok((status, retry_after, took))
}

/// 100 blocking catalog queries against `max_blocking_waiters = 50`: the 50 past the bound
/// get 429 with Retry-After at once, `/live` and plain reads keep answering within a second,
/// and the 50 that wait are all answered when the catalog changes.
#[test]
fn a_flood_of_blocking_waiters_is_bounded_and_reads_still_answer() -> Result<()> {
    let reg = registry("[registry]\nmax_blocking_waiters = 50\n")?;
    checkin(&reg.url, "10.12.0.1", "web", 8080)?;
    let catalog = http::get(&format!("{}/v2/catalog", reg.url))?.json()?;
    let index = catalog["index"].to_string();
    ensure!(index != "null", "no index in {catalog}");

    let (tx, rx) = mpsc::channel();
    for _ in 0..100 {
        let tx = tx.clone();
        let (addr, index) = (reg.addr, index.clone());
        thread::spawn(move || {
            let _ = tx.send(blocking_catalog(addr, &index).map_err(|e| format!("{e:#}")));
        });
    }
    drop(tx);

    // The excess is refused at once.
    let mut refused = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while refused.len() < 50 {
        let left = end.saturating_duration_since(Instant::now());
        let Ok(answer) = rx.recv_timeout(left) else {
            bail!(
                "only {} of 100 blocking queries answered within 10 s (want 50 refused)",
                refused.len()
            );
        };
        let (status, retry_after, took) = answer.map_err(anyhow::Error::msg)?;
        ensure!(status == 429, "a blocking query answered {status} early");
        ensure!(took < PROMPT, "a 429 took {took:?}");
        let secs: u64 = retry_after
            .context("429 without Retry-After")?
            .parse()
            .context("Retry-After is not seconds")?;
        ensure!((1..=5).contains(&secs), "Retry-After: {secs}");
        refused.push(secs);
    }

    eprintln!("waiters: 50 refused, Retry-After {refused:?}");
    // The waiters hold their slots, and everything else still answers promptly.
    let reads = [
        format!("{}/live", reg.url),
        format!("{}/v2/catalog", reg.url),
        format!("{}/v2/catalog?index=0&wait=30s", reg.url),
        format!("{}/v1/registration/web", reg.url),
        format!("{}/v2/services", reg.url),
    ];
    for _round in 0..5 {
        for url in &reads {
            prompt("GET", url, None)?;
        }
    }
    ensure!(
        rx.try_recv().is_err(),
        "a blocking query within the bound answered before the catalog changed"
    );
    let rejected = metric(
        &reg.url,
        "tidings_registry_rejected_total",
        "max_blocking_waiters",
    )?;
    ensure!(rejected == 50.0, "{rejected} rejections counted (want 50)");

    // A change wakes every waiter.
    checkin(&reg.url, "10.12.0.2", "web", 8080)?;
    let mut woken = 0;
    while woken < 50 {
        let answer = rx
            .recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("only {woken} of 50 waiters answered after the change"))?;
        let (status, _, _) = answer.map_err(anyhow::Error::msg)?;
        ensure!(status == 200, "a woken waiter answered {status}");
        woken += 1;
    }
    Ok(())
}

/// A connection to `addr` with a tiny receive buffer, so the server's answer cannot hide in
/// the client's kernel.
fn small_window_connect(addr: SocketAddr) -> Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let stream = socket.connect(addr).await?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        Ok(stream)
    })
}

/// How the slow reader's connection ended.
#[derive(Debug)]
struct SlowRead {
    /// Bytes read in all (head and body).
    bytes: usize,
    /// `None`: the answer ended normally (EOF after all of it was read).
    error: Option<ErrorKind>,
}

/// A client that asks for the whole catalog (several MB) and reads it a byte a second: with
/// `write_timeout = "2s"` its connection is reset within a few seconds, and meanwhile other
/// clients (`/live`, a listing, a check-in) are answered within a second.
#[test]
fn a_slow_reader_of_a_large_catalog_is_reset_and_others_are_served() -> Result<()> {
    let reg = registry("[registry.connections]\nwrite_timeout = \"2s\"\n")?;
    // 60 hosts x 256 endpoints with long revisions: a catalog of about 5 MB, more than the
    // kernel can buffer for it (the sender's buffer grows at most to tcp_wmem's maximum, the
    // receiver's is 8 KiB), so the registry's writes must stall.
    let revision = "r".repeat(128);
    for host in 0..60u16 {
        let endpoints: Vec<_> = (0..256u16)
            .map(|i| (format!("svc-{:02}", i % 40), 10_000 + i))
            .collect();
        let ip = format!("10.13.{}.{}", host / 200, host % 200 + 1);
        let body = checkin_body(&ip, &endpoints, &revision);
        let (status, _) = timed("POST", &format!("{}/v2/checkin", reg.url), Some(&body))?;
        ensure!(status == 200, "fill check-in answered {status}");
    }
    let full = http::request(
        "GET",
        &format!("{}/v2/catalog", reg.url),
        None,
        b"",
        Duration::from_secs(30),
    )?;
    let size = full.body.len();
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")?
        .split_whitespace()
        .nth(2)
        .context("tcp_wmem has no maximum")?
        .parse::<usize>()?;
    ensure!(
        size > wmem_max + (256 << 10),
        "catalog is only {size} bytes; the kernel may buffer {wmem_max}"
    );

    let mut slow = small_window_connect(reg.addr)?;
    slow.write_all(b"GET /v2/catalog HTTP/1.1\r\nHost: registry\r\n\r\n")?;
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started) = mpsc::channel();
    let reader = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<SlowRead> {
            // Building the answer costs the same for any reader; the slow read starts with
            // its first byte.
            slow.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut byte = [0u8; 1];
            let mut bytes = slow.read(&mut byte)?;
            let _ = started_tx.send(());
            let end = |bytes, e: Option<std::io::Error>| SlowRead {
                bytes,
                error: e.map(|e| e.kind()),
            };
            // A byte a second until told the server has given up on us.
            while !stop.load(Ordering::Relaxed) {
                // The slow client's pace, not a wait for a condition.
                thread::sleep(Duration::from_secs(1));
                match slow.read(&mut byte) {
                    Ok(0) => return Ok(end(bytes, None)),
                    Ok(n) => bytes += n,
                    Err(e) => return Ok(end(bytes, Some(e))),
                }
            }
            // Then drain what is left as fast as possible: a cut connection ends short.
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match slow.read(&mut buf) {
                    Ok(0) => return Ok(end(bytes, None)),
                    Ok(n) => bytes += n,
                    Err(e) => return Ok(end(bytes, Some(e))),
                }
            }
        })
    };
    started
        .recv_timeout(Duration::from_secs(30))
        .context("the slow reader got no first byte")?;
    let asked = Instant::now();

    // Until the registry gives up on the slow reader, others are served promptly.
    let timed_out_write = || {
        metric(
            &reg.url,
            "tidings_registry_connections_timed_out_total",
            "reason=\"write\"",
        )
    };
    let mut served = 0;
    let reset_after = loop {
        prompt("GET", &format!("{}/live", reg.url), None)?;
        prompt("GET", &format!("{}/v1/registration/svc-01", reg.url), None)?;
        checkin(&reg.url, "10.13.9.9", "probe", 9000)?;
        served += 1;
        if timed_out_write()? >= 1.0 {
            break asked.elapsed();
        }
        ensure!(
            asked.elapsed() < Duration::from_secs(15),
            "the slow reader was not cut off within 15 s (write_timeout 2 s)"
        );
    };
    stop.store(true, Ordering::Relaxed);
    let read = reader
        .join()
        .map_err(|_| anyhow::anyhow!("slow reader panicked"))??;
    eprintln!(
        "slow reader: catalog {size} bytes, cut off {reset_after:?} after its first byte, \
         {served} rounds of other clients served meanwhile, {read:?}"
    );
    ensure!(
        reset_after < Duration::from_secs(8),
        "cut off only after {reset_after:?}"
    );
    ensure!(served >= 1, "no other client was served meanwhile");
    ensure!(
        read.bytes < size,
        "the slow reader got the whole answer ({} bytes): {read:?}",
        read.bytes
    );
    ensure!(
        read.error.is_some(),
        "the slow reader's connection ended with a FIN, not a reset: {read:?}"
    );
    // And the registry is fine afterwards.
    poll("the slow connection to be gone", START, || {
        metric(&reg.url, "tidings_registry_connections_open", "")
            .ok()
            .filter(|open| *open <= 2.0)
    })?;
    prompt("GET", &format!("{}/live", reg.url), None)?;
    Ok(())
}
