//! The engine's record of the fleet (who runs, who checks in, what was deregistered, which
//! registry is down since when), which the invariants ([`super::judge`]) are judged
//! against. The engine updates the record as it injects faults; the checker reads a copy
//! each round. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

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
    pub(super) fn up_since(&self) -> Option<Instant> {
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
    pub(super) fn registry_healthy_since(&self) -> Option<Instant> {
        let mut latest = None;
        for r in &self.replicas {
            let s = r.serving.up_since()?;
            latest = Some(latest.map_or(s, |l: Instant| l.max(s)));
        }
        latest.or(Some(self.t0))
    }

    /// Since when `agent`'s gossip has been undisturbed; `None` while disturbed.
    pub(super) fn net_quiet_since(&self, agent: usize) -> Option<Instant> {
        if self.net_disturbed.contains(&agent) {
            return None;
        }
        Some(self.net_healed.get(&agent).copied().unwrap_or(self.t0))
    }

    /// Since when `ep` has been checked in by a running owner; `None` when it is not.
    pub(super) fn live_since(&self, ep: &Ep) -> Option<(Instant, u64)> {
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
    pub(super) fn viewer_since(&self, v: Viewer) -> Option<(Instant, u64)> {
        let a = match v {
            Viewer::Agent(a) => a,
            Viewer::Proxy => self.proxy_agent,
        };
        let up = self.agents.get(a)?;
        up.up_since().map(|s| (s, up.life))
    }
}
