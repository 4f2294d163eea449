//! Registry snapshots at fleet size: every node holds the registry's catalog as per-service
//! snapshots (100 000 endpoints in 1 000 services, say), the registry changes some endpoints
//! every second, and every agent learns each change from the registry itself a little later
//! than the others, as the sync loop does. What gossip must still carry is what some agent
//! could not fetch; what it must not carry is what every agent fetched on its own.
//!
//! The agents' answers differ even when they list the same hosts: each is dated by the
//! request that fetched it, and each carries the hosts' latest check-in times, which move
//! every minute. The model keeps both, so snapshot repair sees what a real fleet shows it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU16;
use std::sync::Arc;

use rand::RngExt;
use schema::{Endpoint, Revision, ServiceName, TagValue};

use super::Sim;
use crate::snapshot::{Snapshot, SnapshotEntry};

/// The registry side of [`crate::sim::simulate_registry`].
#[derive(Debug, Clone)]
pub struct RegistryLoad {
    pub services: usize,
    pub hosts_per_service: usize,
    /// Endpoint changes per second (new revision, new host, removed host).
    pub changes_per_sec: u32,
    /// Length of the churn window.
    pub churn_ms: u64,
    /// How long after a change each agent's sync brings it: uniform in this range.
    pub fetch_min_ms: u64,
    pub fetch_max_ms: u64,
    /// Share of nodes that cannot reach the registry and learn changes only by gossip.
    pub blind: f64,
    /// Hosts check in this often; an answer carries each host's latest check-in.
    pub check_in_ms: u64,
}

impl Default for RegistryLoad {
    fn default() -> Self {
        RegistryLoad {
            services: 1_000,
            hosts_per_service: 100,
            changes_per_sec: 10,
            churn_ms: 30_000,
            fetch_min_ms: 20,
            fetch_max_ms: 1_000,
            blind: 0.01,
            check_in_ms: 60_000,
        }
    }
}

/// One host of the simulated registry.
#[derive(Debug, Clone)]
struct Host {
    endpoint: Endpoint,
    /// Where in the check-in period this host checks in.
    phase_ms: u64,
}

/// The registry's table: services by index, hosts by their number.
pub(super) struct Table {
    services: Vec<(ServiceName, BTreeMap<u32, Host>)>,
    next_host: u32,
    check_in_ms: u64,
}

fn host_endpoint(service: &ServiceName, n: u32, revision: u64) -> Endpoint {
    let ip = Ipv4Addr::new(10, 128 | ((n >> 16) as u8 & 0x7f), (n >> 8) as u8, n as u8);
    let port = NonZeroU16::new(8000 + (n % 1000) as u16).unwrap_or(NonZeroU16::MIN);
    let mut ep = Endpoint::new(service.clone(), IpAddr::V4(ip), port);
    // About as much as a real host sends: a commit, an AZ and an instance id.
    ep.revision = Revision::new(format!("{revision:012x}{n:028x}")).unwrap_or_default();
    ep.tags.az = TagValue::new(format!("us-east-1{}", ["a", "b", "c"][n as usize % 3])).ok();
    ep.tags.instance_id = TagValue::new(format!("i-{n:017x}")).ok();
    ep
}

impl Table {
    pub(super) fn new(load: &RegistryLoad, rng: &mut impl RngExt) -> Table {
        let mut next_host = 0u32;
        let services = (0..load.services)
            .map(|s| {
                let name = ServiceName::new(format!("fleet-{s:04}"))
                    .unwrap_or_else(|_| unreachable!("valid name"));
                let hosts = (0..load.hosts_per_service)
                    .map(|_| {
                        next_host += 1;
                        let host = Host {
                            endpoint: host_endpoint(&name, next_host, 1),
                            phase_ms: rng.random_range(0..load.check_in_ms.max(1)),
                        };
                        (next_host, host)
                    })
                    .collect();
                (name, hosts)
            })
            .collect();
        Table {
            services,
            next_host,
            check_in_ms: load.check_in_ms.max(1),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.services.len()
    }

    /// One endpoint change in a random service: a new revision (most), a new host or a host
    /// gone, as deploys and autoscaling make them. Returns the service changed.
    pub(super) fn change(&mut self, rng: &mut impl RngExt, at_ms: u64) -> usize {
        let s = rng.random_range(0..self.services.len());
        let check_in_ms = self.check_in_ms;
        let (name, hosts) = &mut self.services[s];
        let roll = rng.random_range(0..10u32);
        if roll == 0 || hosts.is_empty() {
            self.next_host += 1;
            let host = Host {
                endpoint: host_endpoint(name, self.next_host, at_ms),
                phase_ms: at_ms % check_in_ms,
            };
            hosts.insert(self.next_host, host);
        } else {
            let nth = rng.random_range(0..hosts.len());
            let Some(&n) = hosts.keys().nth(nth) else {
                return s;
            };
            if roll == 1 {
                hosts.remove(&n);
            } else if let Some(h) = hosts.get_mut(&n) {
                h.endpoint = host_endpoint(name, n, at_ms);
                h.phase_ms = at_ms % check_in_ms;
            }
        }
        s
    }

    /// What the registry answers for service `s` at `at_ms`: every host with its latest
    /// check-in, dated `at_ms`.
    pub(super) fn answer(&self, s: usize, at_ms: u64) -> Snapshot {
        let (name, hosts) = &self.services[s];
        let entries = hosts
            .values()
            .map(|h| {
                let since = at_ms.saturating_sub(h.phase_ms) % self.check_in_ms;
                SnapshotEntry {
                    endpoint: Arc::new(h.endpoint.clone()),
                    last_check_in_ms: at_ms.saturating_sub(since),
                }
            })
            .collect();
        Snapshot {
            service: name.clone(),
            generated_at_ms: at_ms,
            entries,
        }
    }

    /// Whether `snap` lists exactly the hosts service `s` has now (check-in times aside).
    pub(super) fn same_hosts(&self, s: usize, snap: Option<&Snapshot>) -> bool {
        let hosts = &self.services[s].1;
        snap.is_some_and(|snap| {
            snap.entries.len() == hosts.len()
                && snap
                    .entries
                    .iter()
                    .zip(hosts.values())
                    .all(|(e, h)| *e.endpoint == h.endpoint)
        })
    }
}

/// What a node does with an answer, as the agent's sync plan does: publish it only when its
/// hosts differ from the snapshot held (a re-check-in alone is not news).
pub(super) fn hosts_differ(held: Option<&Snapshot>, fresh: &Snapshot) -> bool {
    held.is_none_or(|h| {
        h.entries.len() != fresh.entries.len()
            || h.entries
                .iter()
                .zip(&fresh.entries)
                .any(|(a, b)| a.endpoint != b.endpoint)
    })
}

impl Sim {
    /// Node `i`'s sync returns with the registry's answer for service `s`, as it is now.
    pub(super) fn fetch(&mut self, i: usize, s: usize) {
        let Some(table) = &self.registry else {
            return;
        };
        let answer = table.answer(s, self.now);
        let held = self.nodes[i].store.snapshots.get(&answer.service);
        if hosts_differ(held, &answer) {
            self.nodes[i].apply_registry_snapshot(self.now, answer);
            self.flush(i);
        }
    }

    /// Services for which some node's snapshot lists other hosts than the registry has.
    fn diverged(&self) -> usize {
        let Some(table) = &self.registry else {
            return 0;
        };
        (0..table.len())
            .filter(|&s| {
                let name = &table.services[s].0;
                self.nodes
                    .iter()
                    .any(|n| !table.same_hosts(s, n.store.snapshots.get(name)))
            })
            .count()
    }

    /// Gives every node the registry's whole catalog as it stands at `now`, shared: a
    /// thousand nodes each holding their own copy of 100 000 endpoints would not fit the
    /// simulator's memory, and identical snapshots are what a settled fleet holds anyway.
    pub(super) fn seed_registry(&mut self, table: &Table) {
        let now = self.now;
        for s in 0..table.len() {
            let snap = Arc::new(table.answer(s, now));
            for node in &mut self.nodes {
                node.store.snapshots.insert_shared(snap.clone());
            }
        }
    }
}

/// What [`crate::sim::simulate_registry`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryReport {
    pub nodes: usize,
    pub endpoints: usize,
    pub services: usize,
    pub changes: u64,
    pub changes_per_sec: u32,
    pub blind_nodes: usize,
    /// Bytes sent per node per second with the catalog held and nothing changing.
    pub steady_bytes_per_node_sec: f64,
    /// The same during the churn window.
    pub churn_bytes_per_node_sec: f64,
    /// From the last change until every node, blind ones included, held every service's
    /// current hosts (`None`: not within the phase timeout).
    pub secs_converged_after_churn: Option<f64>,
    /// Services whose hosts some node still got wrong at the end.
    pub services_diverged_at_end: usize,
    pub virtual_secs: f64,
}

impl std::fmt::Display for RegistryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} nodes ({} blind), {} endpoints in {} services, {} changes at {}/s",
            self.nodes,
            self.blind_nodes,
            self.endpoints,
            self.services,
            self.changes,
            self.changes_per_sec
        )?;
        writeln!(
            f,
            "steady state, catalog held: {:.0} B/s per node",
            self.steady_bytes_per_node_sec
        )?;
        writeln!(
            f,
            "during churn: {:.0} B/s per node",
            self.churn_bytes_per_node_sec
        )?;
        let conv = self
            .secs_converged_after_churn
            .map_or("not reached".to_string(), |s| format!("{s:.2} s"));
        writeln!(f, "every node current after the last change: {conv}")?;
        write!(
            f,
            "services diverged at the end: {}  virtual time {:.1} s",
            self.services_diverged_at_end, self.virtual_secs
        )
    }
}

/// Runs the registry-snapshot workload on a cluster of `cfg`: settle, hand every node the
/// catalog, measure a quiet window, then churn, then wait until every node is current.
/// Deterministic for a given pair of configs.
pub fn simulate_registry(cfg: super::SimConfig, load: RegistryLoad) -> RegistryReport {
    let cfg = cfg.clamped();
    let n = cfg.nodes;
    let mut sim = Sim::new(cfg);
    sim.bootstrap();
    let c = sim.cfg.clone();
    sim.run_until(sim.now + c.warmup_ms);
    let table = Table::new(&load, &mut sim.rng);
    sim.seed_registry(&table);
    let endpoints = table.services.iter().map(|(_, h)| h.len()).sum();
    sim.registry = Some(table);
    let blind: Vec<bool> = (0..n)
        .map(|_| sim.rng.random_bool(load.blind.clamp(0.0, 1.0)))
        .collect();
    let steady = sim.steady();

    let every = 1_000 / u64::from(load.changes_per_sec.max(1));
    let (fetch_min, fetch_max) = (load.fetch_min_ms, load.fetch_max_ms.max(load.fetch_min_ms));
    let (start, bytes0) = (sim.now, sim.bytes_sent);
    let mut changes = 0u64;
    while sim.now < start + load.churn_ms {
        let at = sim.now;
        let Some(table) = sim.registry.as_mut() else {
            break;
        };
        let s = table.change(&mut sim.rng, at);
        changes += 1;
        for (i, blind) in blind.iter().enumerate() {
            if !blind {
                let when = at + sim.rng.random_range(fetch_min..=fetch_max);
                sim.push(
                    when,
                    super::Event::Fetch {
                        node: i,
                        service: s,
                    },
                );
            }
        }
        sim.run_until(at + every);
    }
    let churn_secs = (sim.now - start).max(1) as f64 / 1000.0;
    let churn_bytes = (sim.bytes_sent - bytes0) as f64 / n as f64 / churn_secs;
    let converged = sim
        .run_until_cond(500, c.phase_timeout_ms, |s| s.diverged() == 0)
        .map(|ms| ms as f64 / 1000.0);
    RegistryReport {
        nodes: n,
        endpoints,
        services: load.services,
        changes,
        changes_per_sec: load.changes_per_sec,
        blind_nodes: blind.iter().filter(|b| **b).count(),
        steady_bytes_per_node_sec: steady.bytes_per_node_sec,
        churn_bytes_per_node_sec: churn_bytes,
        secs_converged_after_churn: converged,
        services_diverged_at_end: sim.diverged(),
        virtual_secs: (sim.now - super::SIM_START_MS) as f64 / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimConfig;
    use rand::SeedableRng;

    fn small() -> (SimConfig, RegistryLoad) {
        let cfg = SimConfig {
            nodes: 30,
            warmup_ms: 5_000,
            steady_ms: 5_000,
            ..SimConfig::default()
        };
        let load = RegistryLoad {
            services: 40,
            hosts_per_service: 10,
            churn_ms: 10_000,
            blind: 0.2,
            ..RegistryLoad::default()
        };
        (cfg, load)
    }

    /// Nodes that cannot reach the registry still end with every service's current hosts:
    /// what the others fetched reaches them by gossip.
    #[test]
    fn blind_nodes_catch_up_with_the_churned_catalog() {
        let (cfg, load) = small();
        let report = simulate_registry(cfg, load);
        assert!(report.blind_nodes > 0, "{report}");
        assert_eq!(report.changes, 100, "{report}");
        assert!(report.secs_converged_after_churn.is_some(), "{report}");
        assert_eq!(report.services_diverged_at_end, 0, "{report}");
    }

    /// The same under random loss, whatever the seed: a cut-off node's changes reach it by
    /// repair only, and the digest hiding a change in flight must not keep them from it.
    #[test]
    fn blind_nodes_catch_up_under_loss() {
        for seed in [2, 3] {
            let (mut cfg, load) = small();
            cfg.loss = 0.1;
            cfg.seed = seed;
            let report = simulate_registry(cfg, load);
            assert!(report.blind_nodes > 0, "seed {seed}: {report}");
            assert!(
                report.secs_converged_after_churn.is_some(),
                "seed {seed}: {report}"
            );
            assert_eq!(report.services_diverged_at_end, 0, "seed {seed}: {report}");
        }
    }

    /// The table's answers list exactly its hosts, and a change is seen as one.
    #[test]
    fn a_change_is_news_and_a_re_check_in_is_not() {
        let (_, load) = small();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut table = Table::new(&load, &mut rng);
        let before = table.answer(0, 10_000);
        assert!(table.same_hosts(0, Some(&before)));
        let later = table.answer(0, 70_000);
        assert!(
            !hosts_differ(Some(&before), &later),
            "a re-check-in is not news"
        );
        let mut changed = table.change(&mut rng, 80_000);
        while changed != 0 {
            changed = table.change(&mut rng, 80_000);
        }
        let after = table.answer(0, 80_000);
        assert!(hosts_differ(Some(&before), &after));
        assert!(!table.same_hosts(0, Some(&before)));
    }
}
