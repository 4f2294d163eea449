//! The proxy as the end-to-end tests drive it: start `tidings proxy` for one service and
//! read its `/clusters` — which hosts it knows and which it routes to.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use anyhow::{Context, Result, bail};

use crate::{Proc, START, http, poll};

/// Starts `tidings proxy` routing `Host: <service>` to the cluster of that name, with its
/// membership from `agent` and health checks every 300 ms; inside `netns` if given.
pub fn start(netns: Option<&str>, ip: &str, agent: &str, service: &str) -> Result<Proc> {
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

/// [`start`], once it routes to every host of `all`: (the proxy, its admin address, its
/// listener).
pub fn start_routing(
    netns: Option<&str>,
    ip: &str,
    agent: &str,
    all: &BTreeSet<String>,
) -> Result<(Proc, String, SocketAddr)> {
    let proxy = start(netns, ip, agent, "web")?;
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
