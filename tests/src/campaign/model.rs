//! What must be true: the engine's record of the fleet (who runs, who checks in, what was
//! deregistered, which registry is down since when) and the invariants judged against what
//! the agents and the proxy answer. The engine updates the record as it injects faults; the
//! checker reads a copy each round. No I/O here.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::bounds::*;

/// Who keeps an endpoint checked in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Agent(usize),
    /// A cron-only host checking in to this registry replica.
    Cron(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpState {
    /// Checked in by its owner since `since` (when its owner is up); `life` changes each time
    /// it becomes live again, so a requirement from before a gap never carries over.
    Live { since: Instant, life: u64 },
    /// Deregistered at `at`: it must leave every view.
    Left { at: Instant },
    /// Stopped checking in without a deregistration (a cron host that went away): it may
    /// linger until the TTL; nothing is required of it.
    Idle,
}

#[derive(Debug, Clone)]
pub struct Ep {
    pub service: String,
    /// `ip:port`, as views list it.
    pub addr: String,
    pub owner: Owner,
    pub state: EpState,
    /// Index of its backend, for web endpoints the proxy routes to.
    pub backend: Option<usize>,
    /// How many times it became live: the next `EpState::Live` gets this as its `life`.
    lives: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Up {
    pub up: bool,
    /// When `up` last changed.
    pub since: Instant,
    /// Counts starts, so a requirement made before a restart is dropped by it.
    pub life: u64,
}

impl Up {
    fn new(at: Instant) -> Up {
        Up {
            up: true,
            since: at,
            life: 0,
        }
    }

    pub fn set(&mut self, up: bool, at: Instant) {
        if up && !self.up {
            self.life += 1;
        }
        self.up = up;
        self.since = at;
    }

    /// `Some(since)` when up.
    fn up_since(&self) -> Option<Instant> {
        self.up.then_some(self.since)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Replica {
    pub serving: Up,
    /// Set while it is SIGKILLed (connections refused at once): the moment it died.
    pub killed_at: Option<Instant>,
}

/// The engine's record of the fleet.
#[derive(Debug, Clone)]
pub struct Model {
    pub t0: Instant,
    pub agents: Vec<Up>,
    /// Agent index → the registry replica it talks to.
    pub agent_replica: Vec<usize>,
    pub replicas: Vec<Replica>,
    pub backends: Vec<(String, Up)>,
    /// key (`service addr`) → endpoint.
    pub eps: BTreeMap<String, Ep>,
    /// Agents whose gossip is disturbed (loss or partition) now, and when each last healed.
    pub net_disturbed: BTreeSet<usize>,
    pub net_healed: BTreeMap<usize, Instant>,
    pub proxy_agent: usize,
}

/// A viewer: an agent's local API, or the proxy's routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Viewer {
    Agent(usize),
    Proxy,
}

impl Model {
    pub fn new(
        at: Instant,
        agents: usize,
        replicas: usize,
        backends: Vec<String>,
        proxy_agent: usize,
    ) -> Model {
        Model {
            t0: at,
            agents: vec![Up::new(at); agents],
            agent_replica: (0..agents).map(|a| a % replicas.max(1)).collect(),
            replicas: vec![
                Replica {
                    serving: Up::new(at),
                    killed_at: None,
                };
                replicas
            ],
            backends: backends.into_iter().map(|b| (b, Up::new(at))).collect(),
            eps: BTreeMap::new(),
            net_disturbed: BTreeSet::new(),
            net_healed: BTreeMap::new(),
            proxy_agent,
        }
    }

    pub fn add_ep(
        &mut self,
        service: &str,
        addr: &str,
        owner: Owner,
        backend: Option<usize>,
        since: Instant,
    ) {
        self.eps.insert(
            format!("{service} {addr}"),
            Ep {
                service: service.to_string(),
                addr: addr.to_string(),
                owner,
                state: EpState::Live { since, life: 0 },
                backend,
                lives: 1,
            },
        );
    }

    pub fn set_ep(&mut self, service: &str, addr: &str, state: EpState) {
        if let Some(ep) = self.eps.get_mut(&format!("{service} {addr}")) {
            ep.state = match state {
                EpState::Live { since, .. } => {
                    ep.lives += 1;
                    EpState::Live {
                        since,
                        life: ep.lives,
                    }
                }
                s => s,
            };
        }
    }

    /// The services views are asked about.
    pub fn services(&self) -> BTreeSet<String> {
        self.eps.values().map(|e| e.service.clone()).collect()
    }

    /// Since when every replica has served without a break; `None` while one does not.
    fn registry_healthy_since(&self) -> Option<Instant> {
        let mut latest = None;
        for r in &self.replicas {
            let s = r.serving.up_since()?;
            latest = Some(latest.map_or(s, |l: Instant| l.max(s)));
        }
        latest.or(Some(self.t0))
    }

    /// Since when `agent`'s gossip has been undisturbed; `None` while disturbed.
    fn net_quiet_since(&self, agent: usize) -> Option<Instant> {
        if self.net_disturbed.contains(&agent) {
            return None;
        }
        Some(self.net_healed.get(&agent).copied().unwrap_or(self.t0))
    }

    /// Since when `ep` has been checked in by a running owner; `None` when it is not.
    fn live_since(&self, ep: &Ep) -> Option<(Instant, u64)> {
        let EpState::Live { since, life } = ep.state else {
            return None;
        };
        match ep.owner {
            // Required even while its replica is down (unlike a cron host below): an agent
            // with a gossip path spreads its own row, and one without (partitioned) must be
            // kept by the registry — each replica serves half the fleet, so losing one
            // drops renewals to about half and self-preservation holds on the survivor, and
            // on the restarted replica until those hosts have had a renewal window to
            // return (campaign seed 11).
            Owner::Agent(a) => {
                let up = self.agents.get(a)?;
                let s = up.up_since()?;
                Some((since.max(s), life * 1_000 + up.life))
            }
            // With two replicas, a cron host whose replica is down is not checking in while
            // the other one serves (and expires it after the TTL): its requirement ends,
            // and starts again when its replica returns. With one registry, nothing can
            // expire it while the registry is down: it must stay.
            Owner::Cron(r) if self.replicas.len() > 1 => {
                let rep = self.replicas.get(r)?;
                let s = rep.serving.up_since()?;
                Some((since.max(s), life * 1_000 + rep.serving.life))
            }
            Owner::Cron(_) => Some((since, life)),
        }
    }

    /// The viewer's own up-time (the proxy counts from its agent's, as it reads that agent).
    fn viewer_since(&self, v: Viewer) -> Option<(Instant, u64)> {
        let a = match v {
            Viewer::Agent(a) => a,
            Viewer::Proxy => self.proxy_agent,
        };
        let up = self.agents.get(a)?;
        up.up_since().map(|s| (s, up.life))
    }
}

/// One breach of an invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    pub check: &'static str,
    /// Since the run's start: first seen...
    pub at: Duration,
    /// ...and last seen (a breach that lasts until the end is a stuck state, not a blip).
    pub last: Duration,
    /// Rounds that saw it.
    pub rounds: u64,
    pub details: String,
}

/// What a viewer answered this round: `service` → `addr` set, and for the proxy each
/// address's (discovery, decision).
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub hosts: BTreeMap<String, BTreeSet<String>>,
    /// Agents: `X-Tidings-Registry-Age-Ms` of the web lookup.
    pub age_ms: Option<i64>,
    /// Proxy: addr → (discovery, decision).
    pub routing: BTreeMap<String, (String, String)>,
}

/// The invariants, with the memory they need across rounds.
#[derive(Debug, Default)]
pub struct Judge {
    /// (viewer, viewer life, ep key, ep life): a host that is now required in that view.
    established: HashSet<(Viewer, u64, String, u64)>,
    /// Per check, how many evaluations were made.
    pub checks: BTreeMap<&'static str, u64>,
    /// Registry ages seen while every replica was healthy and settled: (count, max).
    pub healthy_age: (u64, i64),
    pub violations: Vec<Violation>,
    /// (check, subject) of violations already recorded → index in `violations`, so one
    /// breach held for many rounds is reported once (first and last moment, rounds).
    reported: HashMap<(&'static str, String), usize>,
}

impl Judge {
    fn count(&mut self, check: &'static str) {
        *self.checks.entry(check).or_default() += 1;
    }

    fn violate(
        &mut self,
        m: &Model,
        now: Instant,
        check: &'static str,
        subject: String,
        details: String,
    ) {
        let at = now.duration_since(m.t0);
        if let Some(v) = self
            .reported
            .get(&(check, subject.clone()))
            .and_then(|&i| self.violations.get_mut(i))
        {
            v.last = at;
            v.rounds += 1;
            return;
        }
        self.reported
            .insert((check, subject), self.violations.len());
        self.violations.push(Violation {
            check,
            at,
            last: at,
            rounds: 1,
            details,
        });
    }

    /// Judges what `viewer` answered at `now` (an unreachable viewer counts as empty).
    pub fn judge(&mut self, m: &Model, now: Instant, viewer: Viewer, seen: &Seen) {
        let Some((v_since, v_life)) = m.viewer_since(viewer) else {
            return;
        };
        let reg = m.registry_healthy_since();
        let extra = match viewer {
            Viewer::Agent(_) => Duration::ZERO,
            Viewer::Proxy => PROXY_EXTRA,
        };
        for (key, ep) in &m.eps {
            if viewer == Viewer::Proxy && ep.backend.is_none() {
                continue;
            }
            let in_view = match viewer {
                Viewer::Agent(_) => seen
                    .hosts
                    .get(&ep.service)
                    .is_some_and(|h| h.contains(&ep.addr)),
                Viewer::Proxy => seen
                    .routing
                    .get(&ep.addr)
                    .is_some_and(|(_, d)| d == "route"),
            };
            if let Some((since, life)) = m.live_since(ep) {
                // The proxy's requirement also restarts when the backend comes back: health
                // checks must first find it healthy again.
                let life = match (viewer, ep.backend.and_then(|b| m.backends.get(b))) {
                    (Viewer::Proxy, Some((_, u))) => life * 1_000 + u.life,
                    _ => life,
                };
                let id = (viewer, v_life, key.clone(), life);
                if !self.established.contains(&id) {
                    let backend_ok = match (viewer, ep.backend) {
                        (Viewer::Proxy, Some(b)) => m
                            .backends
                            .get(b)
                            .and_then(|(_, u)| u.up_since())
                            .map(|s| s + BACKEND_HEALTHY),
                        _ => Some(since),
                    };
                    let ep_bound = match ep.owner {
                        Owner::Agent(_) => AGENT_EP_VISIBLE,
                        Owner::Cron(_) => CRON_EP_VISIBLE,
                    };
                    let from = reg.zip(backend_ok).map(|(r, b)| {
                        (since + ep_bound)
                            .max(v_since + VIEWER_VISIBLE)
                            .max(r + REGISTRY_VISIBLE)
                            .max(b)
                            + extra
                    });
                    if from.is_some_and(|f| now >= f) {
                        self.established.insert(id.clone());
                    }
                }
                let backend_up = ep
                    .backend
                    .and_then(|b| m.backends.get(b))
                    .is_none_or(|(_, u)| u.up);
                if self.established.contains(&id) && (viewer != Viewer::Proxy || backend_up) {
                    self.count("live_in_views");
                    if !in_view {
                        self.violate(
                            m,
                            now,
                            "live_in_views",
                            format!("{viewer:?} {key}"),
                            format!(
                                "{viewer:?} lacks live {key} (live since {:.1?})",
                                since.duration_since(m.t0)
                            ),
                        );
                    }
                }
            }
            if let EpState::Left { at } = ep.state {
                let owner_net = match ep.owner {
                    Owner::Agent(a) => m.net_quiet_since(a),
                    Owner::Cron(_) => Some(m.t0),
                };
                let me_net = match viewer {
                    Viewer::Agent(a) => m.net_quiet_since(a),
                    Viewer::Proxy => m.net_quiet_since(m.proxy_agent),
                };
                let bound = match viewer {
                    Viewer::Agent(_) => LEAVE,
                    Viewer::Proxy => PROXY_LEAVE,
                };
                let due = reg
                    .zip(owner_net)
                    .zip(me_net)
                    .map(|((r, o), n)| at.max(v_since).max(r).max(o).max(n) + bound);
                if due.is_some_and(|d| now >= d) {
                    self.count("deregistered_leaves");
                    // The proxy may keep routing a healthy host discovery dropped (health
                    // checks win); what must go is its discovery status.
                    let still = match viewer {
                        Viewer::Agent(_) => in_view,
                        Viewer::Proxy => seen
                            .routing
                            .get(&ep.addr)
                            .is_some_and(|(d, _)| d == "present"),
                    };
                    if still {
                        self.violate(
                            m,
                            now,
                            "deregistered_leaves",
                            format!("{viewer:?} {key} {at:?}"),
                            format!(
                                "{viewer:?} still lists {key}, deregistered at {:.1?}",
                                at.duration_since(m.t0)
                            ),
                        );
                    }
                }
            }
        }
        match viewer {
            Viewer::Proxy => self.judge_failing(m, now, seen),
            Viewer::Agent(a) => self.judge_freshness(m, now, a, v_since, seen),
        }
    }

    fn judge_failing(&mut self, m: &Model, now: Instant, seen: &Seen) {
        for (addr, up) in &m.backends {
            if up.up || now < up.since + FAILING {
                continue;
            }
            self.count("no_route_to_failing");
            if seen.routing.get(addr).is_some_and(|(_, d)| d == "route") {
                self.violate(
                    m,
                    now,
                    "no_route_to_failing",
                    format!("{addr} {:?}", up.since),
                    format!(
                        "proxy routes to {addr}, whose backend died at {:.1?}",
                        up.since.duration_since(m.t0)
                    ),
                );
            }
        }
    }

    fn judge_freshness(
        &mut self,
        m: &Model,
        now: Instant,
        agent: usize,
        v_since: Instant,
        seen: &Seen,
    ) {
        let Some(age) = seen.age_ms else { return };
        // Replicas share one table, and agents pass registry data on by gossip: the data is
        // only known stale once every replica is dead, since the last of them died.
        let died = m
            .replicas
            .iter()
            .map(|r| r.killed_at)
            .try_fold(m.t0, |acc, k| k.map(|k| acc.max(k)));
        if let Some(died) = died.filter(|d| *d >= v_since) {
            let floor = now.duration_since(died).saturating_sub(FRESH_SLACK);
            let floor_ms = i64::try_from(floor.as_millis()).unwrap_or(i64::MAX);
            self.count("freshness_honest");
            if age < floor_ms {
                self.violate(
                    m,
                    now,
                    "freshness_honest",
                    format!("agent {agent} {died:?}"),
                    format!(
                        "agent {agent} says its data is {age} ms old, but the registry died {:.1?} ago",
                        now.duration_since(died)
                    ),
                );
            }
        } else if let Some(healthy) = m.registry_healthy_since()
            && now >= healthy.max(v_since) + AGENT_EP_VISIBLE
        {
            self.healthy_age.0 += 1;
            self.healthy_age.1 = self.healthy_age.1.max(age);
            if ASSERT_FRESH_WHEN_HEALTHY {
                self.count("freshness_honest");
                if age > i64::try_from(FRESH_WHEN_HEALTHY.as_millis()).unwrap_or(i64::MAX) {
                    self.violate(
                        m,
                        now,
                        "freshness_honest",
                        format!("agent {agent} healthy age"),
                        format!("agent {agent} says {age} ms old while its registry is healthy"),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "10.0.0.1:8080";

    /// A model of one agent (also the proxy's) and one registry, everything up for a minute.
    fn settled() -> (Model, Instant) {
        let t0 = Instant::now();
        let long_ago = t0.checked_sub(Duration::from_secs(60)).unwrap_or(t0);
        let mut m = Model::new(long_ago, 1, 1, vec![WEB.to_string()], 0);
        m.add_ep("web", WEB, Owner::Agent(0), Some(0), long_ago);
        (m, t0)
    }

    fn seen(with: bool) -> Seen {
        let mut s = Seen::default();
        let hosts = if with {
            [WEB.to_string()].into()
        } else {
            BTreeSet::new()
        };
        s.hosts.insert("web".to_string(), hosts);
        s.age_ms = Some(0);
        s
    }

    #[test]
    fn a_settled_live_host_must_be_in_the_view() {
        let (m, now) = settled();
        let mut j = Judge::default();
        j.judge(&m, now, Viewer::Agent(0), &seen(true));
        assert!(j.violations.is_empty());
        j.judge(&m, now, Viewer::Agent(0), &seen(false));
        assert_eq!(j.violations.len(), 1);
        assert_eq!(j.violations[0].check, "live_in_views");
    }

    #[test]
    fn a_re_registered_host_gets_its_bound_again() {
        let (mut m, now) = settled();
        let mut j = Judge::default();
        j.judge(&m, now, Viewer::Agent(0), &seen(true));
        m.set_ep("web", WEB, EpState::Left { at: now });
        m.set_ep(
            "web",
            WEB,
            EpState::Live {
                since: now,
                life: 0,
            },
        );
        j.judge(
            &m,
            now + Duration::from_millis(100),
            Viewer::Agent(0),
            &seen(false),
        );
        assert!(j.violations.is_empty(), "{:?}", j.violations);
        j.judge(
            &m,
            now + 2 * AGENT_EP_VISIBLE,
            Viewer::Agent(0),
            &seen(false),
        );
        assert_eq!(j.violations.len(), 1);
    }

    #[test]
    fn a_deregistered_host_must_leave_within_the_bound() {
        let (mut m, now) = settled();
        m.set_ep("web", WEB, EpState::Left { at: now });
        let mut j = Judge::default();
        j.judge(&m, now + LEAVE / 2, Viewer::Agent(0), &seen(true));
        assert!(j.violations.is_empty());
        j.judge(&m, now + LEAVE, Viewer::Agent(0), &seen(true));
        assert_eq!(j.violations[0].check, "deregistered_leaves");
    }

    #[test]
    fn an_agent_must_not_claim_fresh_data_after_the_registry_died() {
        let (mut m, now) = settled();
        let mut j = Judge::default();
        // Seen while healthy: from here on the host is required, through the outage too.
        j.judge(&m, now, Viewer::Agent(0), &seen(true));
        m.replicas[0].serving.set(false, now);
        m.replicas[0].killed_at = Some(now);
        j.judge(&m, now + FRESH_SLACK, Viewer::Agent(0), &seen(true));
        assert!(j.violations.is_empty());
        j.judge(&m, now + 2 * FRESH_SLACK, Viewer::Agent(0), &seen(true));
        assert_eq!(j.violations[0].check, "freshness_honest");
        // A host that stays live is still required while the registry is down.
        j.judge(&m, now + 2 * FRESH_SLACK, Viewer::Agent(0), &seen(false));
        assert!(j.violations.iter().any(|v| v.check == "live_in_views"));
    }
}
