//! Registry sync (DESIGN.md §5.1): blocking queries on `/v2/catalog`; a successful,
//! non-warming answer becomes per-service registry snapshots fed into gossip, and the
//! registry's `tidings-agent` listing brings in agents gossip does not know yet. The
//! decisions — whether an answer may replace what we hold, whom to join, how long to wait
//! before the next attempt — are pure functions ([`plan`], [`seeds_to_join`], [`Pacer`]);
//! [`run_sync`] is the IO shell.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use discovery::ReadMeta;
use gossip::{MemberInfo, Snapshot, SnapshotEntry};
use schema::ServiceName;
use schema::api::Catalog;
use tokio_util::sync::CancellationToken;

use crate::config::AGENT_SERVICE;
use crate::state::Shared;

/// What to do with one catalog answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The registry restarted empty and is still warming up: its answer may be incomplete,
    /// so it replaces nothing (§4.2).
    Warming,
    /// Feed these snapshots into gossip: services whose hosts changed, and an empty
    /// snapshot for every service we hold that the registry no longer lists.
    Apply {
        snapshots: Vec<Snapshot>,
        /// Hosts the registry listed that do not validate (skipped, counted).
        invalid: usize,
    },
}

/// Decides what a catalog answer does to the `held` snapshots (gossip's newest per service).
/// Only a successful, non-warming answer gets here as `Apply`; a failed one never reaches
/// `plan` at all, so neither can replace a snapshot.
pub fn plan(catalog: &Catalog, meta: &ReadMeta, held: &[Snapshot]) -> Plan {
    if catalog.warming || meta.warming {
        return Plan::Warming;
    }
    let held: BTreeMap<&ServiceName, &Snapshot> = held.iter().map(|s| (&s.service, s)).collect();
    let mut invalid = 0;
    let mut fresh: BTreeMap<ServiceName, Snapshot> = BTreeMap::new();
    for (name, hosts) in &catalog.services {
        let Ok(service) = ServiceName::new(name.clone()) else {
            invalid += hosts.len();
            continue;
        };
        let mut entries = Vec::with_capacity(hosts.len());
        for h in hosts {
            match h.to_endpoint() {
                Ok((endpoint, last_check_in_ms)) if endpoint.service == service => {
                    entries.push(SnapshotEntry {
                        endpoint,
                        last_check_in_ms,
                    });
                }
                _ => invalid += 1,
            }
        }
        entries.sort_by_key(|e| e.endpoint.key());
        fresh.insert(
            service.clone(),
            Snapshot {
                service,
                generated_at_ms: catalog.generated_at_ms,
                entries,
            },
        );
    }
    for (service, old) in &held {
        if !fresh.contains_key(*service) && !old.entries.is_empty() {
            fresh.insert(
                (*service).clone(),
                Snapshot {
                    service: (*service).clone(),
                    generated_at_ms: catalog.generated_at_ms,
                    entries: Vec::new(),
                },
            );
        }
    }
    // Unchanged hosts need no new snapshot: re-check-ins only move `last_check_in`, and
    // re-gossiping every service on every answer would be pure overhead.
    let snapshots = fresh
        .into_values()
        .filter(|s| {
            held.get(&s.service)
                .is_none_or(|old| old.generated_at_ms < s.generated_at_ms && !same_hosts(old, s))
        })
        .collect();
    Plan::Apply { snapshots, invalid }
}

fn same_hosts(a: &Snapshot, b: &Snapshot) -> bool {
    let mut x: Vec<_> = a.entries.iter().map(|e| &e.endpoint).collect();
    let mut y: Vec<_> = b.entries.iter().map(|e| &e.endpoint).collect();
    x.sort_by_key(|e| e.key());
    y.sort_by_key(|e| e.key());
    x == y
}

/// Agents the registry lists that gossip should announce to: all of them when this agent is
/// alone, else those SWIM has never heard of (e.g. two halves that started while the
/// registry was down, each without seeds).
pub fn seeds_to_join(catalog: &Catalog, me: SocketAddr, members: &[MemberInfo]) -> Vec<SocketAddr> {
    let alone = !members.iter().any(|m| m.active);
    let known: BTreeSet<SocketAddr> = members.iter().map(|m| m.id.addr).collect();
    catalog
        .services
        .get(AGENT_SERVICE)
        .into_iter()
        .flatten()
        .filter_map(|h| h.to_endpoint().ok())
        .map(|(e, _)| e.socket_addr())
        .filter(|a| *a != me && (alone || !known.contains(a)))
        .collect()
}

/// Pacing of sync attempts. `jitter` arguments are uniform in `[0, 1)`.
#[derive(Debug, Clone)]
pub struct Pacer {
    pub poll_interval: Duration,
    pub retry_max: Duration,
    failures: u32,
}

impl Pacer {
    pub fn new(poll_interval: Duration, retry_max: Duration) -> Self {
        Pacer {
            poll_interval,
            retry_max,
            failures: 0,
        }
    }

    /// After a failed attempt: 1 s, 2 s, 4 s … up to `retry_max`, ± 10 %.
    pub fn after_failure(&mut self, jitter: f64) -> Duration {
        let base = Duration::from_secs(1)
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.retry_max);
        self.failures = self.failures.saturating_add(1);
        spread(base, jitter)
    }

    /// After a success. Returns whether the previous attempts had failed (the registry is
    /// back: worth a re-check-in).
    pub fn after_success(&mut self) -> bool {
        std::mem::take(&mut self.failures) > 0
    }

    /// When the registry answered at once although we passed a current index, it cannot
    /// block: poll every `poll_interval` ± 10 % instead.
    pub fn poll(&self, jitter: f64) -> Duration {
        spread(self.poll_interval, jitter)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// `base` ± 10 %.
fn spread(base: Duration, jitter: f64) -> Duration {
    base.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0))
}

/// While the registry warms up, ask again this often (warm-up ends by time, not by an index
/// change, so a blocking query would sleep through it).
fn warming_poll(check_in_interval: Duration) -> Duration {
    (check_in_interval / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

/// The sync loop: runs until `stop`.
pub async fn run_sync(shared: Arc<Shared>, stop: CancellationToken) {
    let cfg = &shared.config;
    let mut pacer = Pacer::new(cfg.poll_interval, cfg.sync_retry_max);
    let mut index: Option<u64> = None;
    let mut warming_noted = false;
    loop {
        let started = Instant::now();
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            r = shared.client.catalog(index, Some(cfg.sync_wait)) => r,
        };
        let pause = match answer {
            Err(e) => {
                shared.metrics.sync_errors.increment(1);
                shared.set_registry_ok(false);
                index = None;
                let pause = pacer.after_failure(rand::random());
                if pacer.failures() == 1 {
                    tracing::warn!(error = %e, retry_in = ?pause, "registry sync failed; serving the last view");
                } else {
                    tracing::debug!(error = %e, retry_in = ?pause, "registry sync failed again");
                }
                Some(pause)
            }
            Ok((catalog, meta)) => {
                if pacer.after_success() {
                    tracing::info!("registry reachable again");
                    shared.recheck.notify_one();
                }
                shared.set_registry_ok(true);
                let held = shared.gossip.view().borrow().snapshots.clone();
                match plan(&catalog, &meta, &held) {
                    Plan::Warming => {
                        shared.metrics.sync_warming.increment(1);
                        if !warming_noted {
                            warming_noted = true;
                            tracing::info!(
                                "registry is warming up (restarted empty): keeping our view, re-checking in"
                            );
                            shared.recheck.notify_one();
                        }
                        index = None;
                        Some(warming_poll(cfg.check_in_interval))
                    }
                    Plan::Apply { snapshots, invalid } => {
                        warming_noted = false;
                        if invalid > 0 {
                            tracing::warn!(
                                invalid,
                                "registry listed hosts that do not validate; skipped"
                            );
                        }
                        let changed = snapshots.len();
                        for s in snapshots {
                            if shared.gossip.apply_registry_snapshot(s).await.is_err() {
                                tracing::warn!("gossip has stopped; registry snapshot not applied");
                            }
                        }
                        let members = shared.gossip.members();
                        let join = seeds_to_join(&catalog, shared.gossip_addr, &members);
                        if !join.is_empty() {
                            tracing::info!(seeds = ?join, "joining agents the registry lists");
                            if shared.gossip.join(join).await.is_err() {
                                tracing::warn!("gossip has stopped; cannot join");
                            }
                        }
                        shared.metrics.sync_applied.increment(1);
                        shared.mark_synced();
                        tracing::debug!(
                            index = catalog.index,
                            changed,
                            "registry snapshot applied"
                        );
                        let same = index == Some(catalog.index);
                        let quick = started.elapsed() < cfg.sync_wait / 2;
                        index = Some(meta.index.unwrap_or(catalog.index));
                        (same && quick).then(|| pacer.poll(rand::random()))
                    }
                }
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
                // A successful check-in after failures: the registry is back, sync now.
                () = shared.registry_back.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use schema::Endpoint;
    use schema::api::V1Host;

    use super::*;

    fn host(service: &str, port: u16) -> V1Host {
        let ep = Endpoint::new(
            ServiceName::new(service).expect("name"),
            "10.0.0.1".parse().expect("ip"),
            NonZeroU16::new(port).expect("port"),
        );
        V1Host::from_endpoint(&ep, 1_000)
    }

    fn catalog(at: u64, warming: bool, services: &[(&str, &[u16])]) -> Catalog {
        Catalog {
            index: at,
            generated_at_ms: at,
            warming,
            stale: false,
            services: services
                .iter()
                .map(|(s, ports)| (s.to_string(), ports.iter().map(|p| host(s, *p)).collect()))
                .collect(),
        }
    }

    fn snaps(p: Plan) -> Vec<Snapshot> {
        match p {
            Plan::Apply { snapshots, .. } => snapshots,
            Plan::Warming => panic!("expected Apply"),
        }
    }

    #[test]
    fn a_warming_answer_replaces_nothing() {
        let c = catalog(10, true, &[("web", &[])]);
        assert_eq!(plan(&c, &ReadMeta::default(), &[]), Plan::Warming);
        let c = catalog(10, false, &[]);
        let meta = ReadMeta {
            warming: true,
            ..Default::default()
        };
        assert_eq!(plan(&c, &meta, &[]), Plan::Warming);
    }

    #[test]
    fn a_successful_answer_replaces_changed_services_and_empties_vanished_ones() {
        let first = snaps(plan(
            &catalog(10, false, &[("web", &[1, 2]), ("db", &[5])]),
            &ReadMeta::default(),
            &[],
        ));
        assert_eq!(first.len(), 2);
        // Same web hosts, db gone, api new.
        let next = snaps(plan(
            &catalog(20, false, &[("web", &[2, 1]), ("api", &[9])]),
            &ReadMeta::default(),
            &first,
        ));
        let got: Vec<(&str, usize, u64)> = next
            .iter()
            .map(|s| (s.service.as_str(), s.entries.len(), s.generated_at_ms))
            .collect();
        assert_eq!(got, vec![("api", 1, 20), ("db", 0, 20)]);
    }

    #[test]
    fn invalid_hosts_are_skipped_and_counted() {
        let mut c = catalog(10, false, &[("web", &[1])]);
        let mut bad = host("web", 2);
        bad.ip_address = "nope".into();
        c.services.get_mut("web").expect("web").push(bad);
        c.services.insert("Bad Name".into(), vec![host("web", 3)]);
        match plan(&c, &ReadMeta::default(), &[]) {
            Plan::Apply { snapshots, invalid } => {
                assert_eq!(invalid, 2);
                assert_eq!(snapshots.len(), 1);
                assert_eq!(snapshots[0].entries.len(), 1);
            }
            Plan::Warming => panic!("not warming"),
        }
    }

    #[test]
    fn alone_agents_join_everyone_listed_others_only_strangers() {
        let agents = catalog(10, false, &[("tidings-agent", &[7702, 7703, 7704])]);
        let me: SocketAddr = "10.0.0.1:7702".parse().expect("addr");
        let addr = |p: u16| SocketAddr::new(me.ip(), p);
        let member = |p: u16, active: bool| MemberInfo {
            id: gossip::NodeId::new(addr(p), 1),
            active,
        };
        assert_eq!(
            seeds_to_join(&agents, me, &[]),
            vec![addr(7703), addr(7704)]
        );
        assert_eq!(
            seeds_to_join(&agents, me, &[member(7703, false)]),
            vec![addr(7703), addr(7704)],
            "only down members known: still alone"
        );
        assert_eq!(
            seeds_to_join(&agents, me, &[member(7703, true)]),
            vec![addr(7704)]
        );
        let both = [member(7703, true), member(7704, false)];
        assert!(seeds_to_join(&agents, me, &both).is_empty());
    }

    #[test]
    fn pacing_backs_off_to_the_cap_and_polls_within_ten_percent() {
        let mut p = Pacer::new(Duration::from_secs(30), Duration::from_secs(8));
        let waits: Vec<u64> = (0..6).map(|_| p.after_failure(0.5).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 8, 8]);
        assert!(p.after_success());
        assert!(!p.after_success());
        assert_eq!(p.poll(0.0), Duration::from_secs(27));
        assert!(p.poll(0.999_999) <= Duration::from_secs(33));
        assert_eq!(
            warming_poll(Duration::from_secs(1)),
            Duration::from_millis(250)
        );
    }
}
