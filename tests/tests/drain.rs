//! An endpoint deregistered through its agent while its backend stays up and keeps passing
//! health checks: the proxy must stop sending it new requests (`Drained`, docs/ARCHITECTURE.md#draining),
//! not keep routing it as "absent from discovery but healthy" (where health checks win), and
//! the client must not see a single failed request meanwhile.
//!
//! Real processes on a loopback /24 of this run: a registry, three agents, three backends
//! (`web:8080` on each host; host 3's registered at runtime through its agent's API), and a
//! proxy whose membership comes from agent 1 — so the deregistration reaches the proxy only
//! through gossip and agent 1's `?draining=true` listing.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tests::fleet::{self, lookup};
use tests::traffic::Load;
use tests::{http, poll};

const START: Duration = Duration::from_secs(20);

fn ip(host: u8) -> String {
    fleet::loopback(3, host)
}

/// What agent `base` lists for `web` with `?draining=true`: (ip:port, draining tag).
fn listing_with_draining(base: &str) -> Result<Vec<(String, bool)>> {
    let v = http::get(&format!("{base}/v2/services/web?draining=true"))?.json()?;
    let hosts = v["hosts"]
        .as_array()
        .with_context(|| format!("no hosts in {v}"))?;
    Ok(hosts
        .iter()
        .map(|h| {
            (
                format!("{}:{}", h["ip_address"].as_str().unwrap_or("?"), h["port"]),
                h["tags"]["draining"] == "true",
            )
        })
        .collect())
}

#[test]
fn a_deregistered_endpoint_is_drained_although_it_stays_healthy() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rt = tests::backend::runtime()?;
    let (backends, all) = tests::backend::start_web(&rt, 3, ip)?;
    let leaving = format!("{}:8080", ip(3));

    let reg_addr = format!("{}:7700", ip(100));
    let reg_url = format!("http://{reg_addr}");
    let _reg = fleet::registry(&reg_addr, "10s", "1s")?;
    let seed = format!("{}:7702", ip(1));
    let mut agents = Vec::new();
    for h in 1..=3u8 {
        let endpoint: &[&str] = if h == 3 {
            &[]
        } else {
            &["--endpoint", "web:8080"]
        };
        let extra = fleet::joining(h == 1, &seed, endpoint);
        let dir = tmp.path().join(format!("agent-{h}"));
        agents.push(fleet::local_agent(
            &format!("agent-{h}"),
            &ip(h),
            &dir,
            &reg_url,
            &extra,
        )?);
    }
    fleet::register(&agents[2].url(), r#"{"service": "web", "port": 8080}"#)?;
    let a1 = agents[0].url();
    poll("agent 1 to list every host", START, || {
        (lookup(&a1, "web").ok()?.hosts == all).then_some(())
    })?;
    let (_proxy, admin, listen) = tests::proxy::start_routing(None, &ip(1), &a1, &all)?;
    let load = Load::start(
        format!("http://{listen}/"),
        "web".into(),
        50_000,
        Duration::from_secs(60),
    );
    load.wait_for(100)?;

    // Host 3 leaves discovery on purpose; its backend keeps running and stays healthy.
    fleet::deregister(&agents[2].url(), "web", 8080)?;
    let left = Instant::now();
    let listed_draining = poll("agent 1 to list host 3 as draining", START, || {
        let l = listing_with_draining(&a1).ok()?;
        l.contains(&(leaving.clone(), true)).then(|| left.elapsed())
    })?;
    let unrouted = poll("the proxy to stop routing host 3", START, || {
        let (hosts, _) = tests::proxy::routing(&admin).ok()?;
        let h = hosts.get(&leaving);
        h.is_none_or(|h| h.decision != "route")
            .then(|| (left.elapsed(), h.cloned()))
    })?;
    println!(
        "host 3 listed as draining by agent 1 after {listed_draining:?}; out of routing after {:?} ({:?})",
        unrouted.0, unrouted.1
    );
    if let Some(h) = &unrouted.1 {
        ensure!(
            h.discovery == "drained",
            "host 3 left routing without being drained: {h:?}"
        );
    }
    // The plain listing (what applications read) no longer has it at all.
    ensure!(
        !lookup(&a1, "web")?.hosts.contains(&leaving),
        "host 3 is still in agent 1's plain listing"
    );

    // No request failed while it left.
    load.wait_for(300)?;
    let report = load.finish()?;
    println!("traffic across the drain: {}", report.line());
    report.ensure_no_errors()?;

    // From now on no request reaches host 3, though its backend is still up and healthy.
    ensure!(
        http::get(&format!("http://{leaving}/"))?.status == 200,
        "host 3's backend should still answer"
    );
    let after = Load::start(
        format!("http://{listen}/"),
        "web".into(),
        200,
        Duration::from_secs(30),
    );
    after.wait_for(200)?;
    let after = after.finish()?;
    after.ensure_no_errors()?;
    ensure!(
        !after.by_backend.contains_key("host-3"),
        "host 3 still got requests after it was drained: {}",
        after.line()
    );
    ensure!(
        after.by_backend.contains_key("host-1") && after.by_backend.contains_key("host-2"),
        "the remaining hosts share the load: {}",
        after.line()
    );
    println!("after the drain: {}", after.line());
    drop(backends);
    Ok(())
}
