//! The agent against hostile input, as the real `tidings` binary: a huge file where its disk
//! cache should be, requests from web pages that rebound their DNS name to loopback, and
//! local processes registering endpoints on addresses not their host's.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tests::fleet::{self, lookup, loopback};
use tests::{START, http, poll, run};

/// Peak resident memory of a process, from `/proc/PID/status` (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .context("no VmHWM line")?
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// The agent starts although its data dir holds a 4 GiB file (sparse: no disk used) in
/// place of its cache: it refuses the file from its size without reading it, sets it aside
/// with one log line, and serves what the registry knows — in little memory.
#[test]
fn a_huge_cache_file_is_set_aside_unread_and_the_agent_serves_the_registry() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let reg_addr = format!("{}:7700", loopback(41, 1));
    let reg_url = format!("http://{reg_addr}");
    let _reg = fleet::registry(&reg_addr, "10s", "2s")?;
    let (code, out, err) = run(
        &[
            "checkin",
            "--registry",
            &reg_url,
            "--service",
            "billing",
            "--port",
            "9000",
            "--ip",
            "10.41.0.1",
            "--no-splay",
        ],
        START,
    )?;
    ensure!(code == 0, "checkin failed: {out} {err}");

    let dir = tmp.path().join("agent");
    std::fs::create_dir_all(&dir)?;
    let cache = dir.join("view.cache");
    std::fs::File::create(&cache)?.set_len(4 << 30)?;

    let ip = loopback(41, 2);
    let agent = fleet::local_agent("agent", &ip, &dir, &reg_url, &[])?;
    let base = agent.url();
    poll("the agent to list billing from the registry", START, || {
        lookup(&base, "billing")
            .ok()
            .filter(|l| l.hosts.contains("10.41.0.1:9000"))
    })?;

    let peak = peak_rss(agent.proc.pid())?;
    ensure!(
        peak < 100 << 20,
        "peak RSS {} MiB: the bad cache was read into memory",
        peak >> 20
    );
    let set_aside: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("view.cache.bad-"))
        })
        .collect();
    ensure!(set_aside.len() == 1, "set aside: {set_aside:?}");
    ensure!(
        set_aside[0].metadata()?.len() == 4 << 30,
        "the set-aside file is not the bad cache"
    );
    let log = agent.proc.log_text();
    ensure!(
        log.contains("disk cache ignored and set aside") && log.contains("over the limit"),
        "no log line naming the reason:\n{log}"
    );
    // A fresh cache is written from the live view, and is small.
    fleet::wait_cache_current(&base)?;
    ensure!(
        std::fs::metadata(&cache)?.len() < 1 << 20,
        "cache not rewritten"
    );
    Ok(())
}

/// The local API refuses requests whose Host names another site (a DNS-rebinding page) and
/// registrations on addresses that are not the host's; its own clients still work.
#[test]
fn the_local_api_refuses_rebound_pages_and_foreign_registrations() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let reg_addr = format!("{}:7700", loopback(42, 1));
    let reg_url = format!("http://{reg_addr}");
    let _reg = fleet::registry(&reg_addr, "10s", "2s")?;
    let ip = loopback(42, 2);
    let agent = fleet::local_agent("agent", &ip, &tmp.path().join("agent"), &reg_url, &[])?;
    let base = agent.url();
    let t = Duration::from_secs(5);

    let url = format!("{base}/v1/agent/self");
    let r = http::request_with("GET", &url, &[("host", "evil.example:7701")], b"", t)?;
    ensure!(r.status == 403, "rebound page answered {}", r.status);
    ensure!(r.json()?["error"]["code"] == "forbidden");
    let r = http::request_with("GET", &url, &[("host", "localhost:7701")], b"", t)?;
    ensure!(r.status == 200, "localhost answered {}", r.status);
    ensure!(
        http::get(&format!("{base}/ui/"))?.status == 200,
        "dashboard"
    );

    let put = |body: &str| {
        http::request(
            "PUT",
            &format!("{base}/v1/agent/endpoints"),
            Some("application/json"),
            body.as_bytes(),
            t,
        )
    };
    let r = put(r#"{"service":"evil","port":443,"ip":"10.66.0.1"}"#)?;
    ensure!(
        r.status == 403,
        "foreign registration answered {}",
        r.status
    );
    ensure!(
        lookup(&base, "evil")?.hosts.is_empty(),
        "a foreign endpoint entered the view"
    );
    fleet::register(&base, r#"{"service":"api","port":9000}"#)?;
    poll("the host's own endpoint to be listed", START, || {
        lookup(&base, "api")
            .ok()
            .filter(|l| l.hosts.contains(&format!("{ip}:9000")))
    })?;
    Ok(())
}
