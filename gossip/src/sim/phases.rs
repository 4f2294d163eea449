//! The scripted phases of one simulation, in the order [`super::simulate`] runs them; each
//! drives the cluster in virtual time and returns what it measured.

use crate::node::Node;

use super::{Sim, addr_of, endpoint_of};
use schema::Endpoint;

/// What the steady window measured.
pub(super) struct Steady {
    pub bytes_per_node_sec: f64,
    pub mean_indirect_probes: f64,
}

/// When the new endpoint reached 99.99 % of the nodes and all of them (ms from publishing).
pub(super) struct Spread {
    pub t_9999: Option<u64>,
    pub t_all: Option<u64>,
}

/// After the partition heals: when both sides' writes are everywhere, and when every live
/// node sees every other one as an active member again (ms from the heal).
pub(super) struct Healing {
    pub converged: Option<u64>,
    pub members: Option<u64>,
}

impl Sim {
    /// Every node knows the roster, starts, and publishes one endpoint.
    pub(super) fn bootstrap(&mut self) {
        let roster: Vec<_> = self.nodes.iter().map(Node::id).collect();
        let now = self.now;
        for i in 0..self.cfg.nodes {
            self.nodes[i].assume_members(now, roster.iter().copied());
            self.nodes[i].start(now);
            self.nodes[i].publish_local(now, vec![endpoint_of(i, 8080)]);
            self.flush(i);
        }
    }

    /// Runs the steady window: no changes, count bytes.
    pub(super) fn steady(&mut self) -> Steady {
        let n = self.cfg.nodes;
        let steady_ms = self.cfg.steady_ms;
        let bytes0 = self.bytes_sent;
        self.run_until(self.now + steady_ms);
        let bytes_per_node_sec =
            (self.bytes_sent - bytes0) as f64 / n as f64 / (steady_ms.max(1) as f64 / 1000.0);
        let mean_indirect_probes = self
            .nodes
            .iter()
            .map(|n| n.indirect_probes as f64)
            .sum::<f64>()
            / n as f64;
        Steady {
            bytes_per_node_sec,
            mean_indirect_probes,
        }
    }

    /// Node 0 publishes `fresh` besides its first endpoint; waits until it is everywhere.
    pub(super) fn disseminate(&mut self, fresh: &Endpoint) -> Spread {
        let n = self.cfg.nodes;
        let (every, timeout) = (
            (self.cfg.gossip_interval_ms / 4).max(1),
            self.cfg.phase_timeout_ms,
        );
        self.publish(0, vec![endpoint_of(0, 8080), fresh.clone()]);
        self.watch_row(0, fresh);
        let target = ((n as f64) * 0.9999).ceil() as usize;
        let t_9999 = self.run_until_cond(every, timeout, |s| s.watch_count >= target);
        let t_all = match t_9999 {
            Some(t) => self
                .run_until_cond(every, timeout, |s| s.watch_count >= n)
                .map(|x| x + t),
            None => None,
        };
        Spread { t_9999, t_all }
    }

    /// Kills `victim`; waits until no live node shows its endpoint.
    pub(super) fn kill_owner(&mut self, victim: usize) -> Option<u64> {
        let n = self.cfg.nodes;
        let victim_key = endpoint_of(victim, 8080).key();
        self.alive[victim] = false;
        self.run_until_cond(100, self.cfg.phase_timeout_ms, |s| {
            (0..n)
                .filter(|&i| s.alive[i])
                .all(|i| !s.nodes[i].sees_row(&addr_of(victim), &victim_key))
        })
    }

    /// Splits the cluster in two halves for `partition_ms`, with a write on each side
    /// (node 0 keeps `fresh`), then heals it.
    pub(super) fn partition_and_heal(&mut self, fresh: &Endpoint) -> Healing {
        let n = self.cfg.nodes;
        let timeout = self.cfg.phase_timeout_ms;
        let split = n / 2;
        self.partition = Some(split);
        let (a, b) = (endpoint_of(0, 7070), endpoint_of(split, 7070));
        self.publish(0, vec![endpoint_of(0, 8080), fresh.clone(), a.clone()]);
        let va = (addr_of(0), a.key(), self.nodes[0].local_version());
        self.publish(split, vec![endpoint_of(split, 8080), b.clone()]);
        let vb = (addr_of(split), b.key(), self.nodes[split].local_version());
        self.run_until(self.now + self.cfg.partition_ms);
        self.partition = None;
        let heal_at = self.now;
        let live = self.live_count();
        let converged = self.run_until_cond(100, timeout, |s| {
            (0..n)
                .filter(|&i| {
                    s.alive[i]
                        && s.nodes[i].has_row(&va.0, &va.1, va.2)
                        && s.nodes[i].has_row(&vb.0, &vb.1, vb.2)
                })
                .count()
                == live
        });
        // Rows of the other half become visible again once SWIM has merged the halves.
        let start = self.now;
        let healed = self.run_until_cond(100, timeout, |s| {
            let alive: Vec<usize> = (0..n).filter(|&i| s.alive[i]).collect();
            alive.iter().all(|&i| {
                alive
                    .iter()
                    .all(|&j| i == j || s.nodes[i].is_member_active(&addr_of(j)))
            })
        });
        Healing {
            converged,
            members: healed.map(|t| t + start - heal_at),
        }
    }
}
