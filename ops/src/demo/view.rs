//! What the demo shows while it runs: a redrawn screen on a terminal, one plain line a
//! second otherwise. Everything shown is read from the components' own APIs.

use std::fmt::Write as _;
use std::time::Duration;

use schema::agent_api::Members;
use schema::api::V1Listing;
use schema::wire::{HEADER_REGISTRY_AGE, HEADER_SOURCE};
use serde_json::Value;

use super::traffic::{HttpClient, get};

/// One agent as its local API describes itself.
pub struct AgentRow {
    pub name: String,
    pub up: bool,
    pub members: usize,
    /// Hosts per service, in the order of the demo's services.
    pub hosts: Vec<usize>,
    pub source: String,
    pub registry_age_ms: Option<u64>,
}

/// One proxy upstream host.
pub struct HostRow {
    pub cluster: String,
    pub address: String,
    pub discovery: String,
    pub health: String,
    pub decision: String,
}

pub async fn agent_row(
    client: &HttpClient,
    name: &str,
    api: &str,
    services: &[String],
) -> AgentRow {
    let t = Duration::from_millis(800);
    let mut row = AgentRow {
        name: name.to_string(),
        up: false,
        members: 0,
        hosts: Vec::new(),
        source: "-".into(),
        registry_age_ms: None,
    };
    for svc in services {
        match get(
            client,
            &format!("http://{api}/v1/registration/{svc}"),
            None,
            t,
        )
        .await
        {
            Ok((200, headers, body)) => {
                row.up = true;
                let listing = serde_json::from_slice::<V1Listing>(&body);
                row.hosts.push(listing.map_or(0, |l| l.hosts.len()));
                let header = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                };
                row.source = header(HEADER_SOURCE).unwrap_or_else(|| "-".into());
                row.registry_age_ms = header(HEADER_REGISTRY_AGE).and_then(|a| a.parse().ok());
            }
            _ => row.hosts.push(0),
        }
    }
    if let Ok((200, _, body)) =
        get(client, &format!("http://{api}/v1/agent/members"), None, t).await
    {
        row.members = serde_json::from_slice::<Members>(&body).map_or(0, |m| m.members.len());
    }
    row
}

pub async fn proxy_hosts(client: &HttpClient, admin: &str) -> Vec<HostRow> {
    let Ok((200, _, body)) = get(
        client,
        &format!("http://{admin}/clusters"),
        None,
        Duration::from_millis(800),
    )
    .await
    else {
        return Vec::new();
    };
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut rows = Vec::new();
    for c in v["clusters"].as_array().into_iter().flatten() {
        for h in c["hosts"].as_array().into_iter().flatten() {
            let s = |k: &str| h[k].as_str().unwrap_or("-").to_string();
            rows.push(HostRow {
                cluster: c["name"].as_str().unwrap_or("-").to_string(),
                address: s("address"),
                discovery: s("discovery"),
                health: s("health"),
                decision: s("decision"),
            });
        }
    }
    rows.sort_by(|a, b| (&a.cluster, &a.address).cmp(&(&b.cluster, &b.address)));
    rows
}

pub struct Frame<'a> {
    pub elapsed: Duration,
    pub total: Duration,
    pub phase: &'a str,
    pub registry_up: bool,
    pub rps: u64,
    pub errors: u64,
    pub requests: u64,
    pub errors_total: u64,
    pub services: &'a [String],
    pub agents: &'a [AgentRow],
    pub hosts: &'a [HostRow],
    pub events: &'a [String],
}

/// The full-screen view for a terminal.
pub fn screen(f: &Frame<'_>) -> String {
    let mut s = String::from("\x1b[2J\x1b[H");
    let _ = writeln!(
        s,
        "Tidings demo — {:>4.0}s of {:.0}s — {}",
        f.elapsed.as_secs_f64(),
        f.total.as_secs_f64(),
        f.phase
    );
    let _ = writeln!(
        s,
        "registry: {}",
        if f.registry_up {
            "\x1b[32mUP\x1b[0m"
        } else {
            "\x1b[31mDOWN (killed)\x1b[0m"
        }
    );
    let _ = writeln!(
        s,
        "traffic:  {} req/s, {} errors/s   (total {} requests, {} errors)\n",
        f.rps, f.errors, f.requests, f.errors_total
    );
    let _ = writeln!(
        s,
        "{:<10}{:>8}  {}  {:>10}  {:>14}",
        "agent",
        "members",
        header_services(f.services),
        "source",
        "registry age"
    );
    for a in f.agents {
        let hosts: Vec<String> = a.hosts.iter().map(|h| format!("{h:>6}")).collect();
        let age = a
            .registry_age_ms
            .map_or("-".to_string(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let state = if a.up {
            a.members.to_string()
        } else {
            "down".into()
        };
        let _ = writeln!(
            s,
            "{:<10}{:>8}  {}  {:>10}  {:>14}",
            a.name,
            state,
            hosts.join(" "),
            a.source,
            age
        );
    }
    let _ = writeln!(
        s,
        "\n{:<8}{:<22}{:<10}{:<11}decision",
        "cluster", "host", "discovery", "health"
    );
    for h in f.hosts {
        let _ = writeln!(
            s,
            "{:<8}{:<22}{:<10}{:<11}{}",
            h.cluster, h.address, h.discovery, h.health, h.decision
        );
    }
    let _ = writeln!(s, "\nevents:");
    for e in f.events.iter().rev().take(8).rev() {
        let _ = writeln!(s, "  {e}");
    }
    s
}

fn header_services(services: &[String]) -> String {
    services
        .iter()
        .map(|s| format!("{s:>6}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line a second, for logs and pipes.
pub fn line(f: &Frame<'_>) -> String {
    let agents_up = f.agents.iter().filter(|a| a.up).count();
    let min_hosts: Vec<String> = (0..f.services.len())
        .map(|i| {
            let min = f
                .agents
                .iter()
                .filter(|a| a.up)
                .map(|a| a.hosts.get(i).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            format!("{}={min}", f.services[i])
        })
        .collect();
    let routable = f.hosts.iter().filter(|h| h.decision == "route").count();
    format!(
        "t={:>3}s registry={} rps={} errors={} agents_up={}/{} min_hosts_per_agent[{}] proxy_routable={}/{}",
        f.elapsed.as_secs(),
        if f.registry_up { "up" } else { "DOWN" },
        f.rps,
        f.errors,
        agents_up,
        f.agents.len(),
        min_hosts.join(" "),
        routable,
        f.hosts.len()
    )
}
