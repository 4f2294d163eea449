//! A deterministic simulator: N sans-IO nodes in virtual time with a seeded RNG, packet
//! loss, delay and a partition. It measures what an operator sizing a cluster wants to know
//! (`tidings gossip simulate`): rounds until a new endpoint reaches 99.99 % of nodes, time
//! until a dead owner's endpoints are hidden everywhere, false "down" verdicts, steady-state
//! bytes per node per second, and convergence after a partition heals.
//!
//! Phases: bootstrap (every node knows the roster and publishes one endpoint) → warm-up →
//! steady window (bytes, no changes) → dissemination of one new endpoint → kill one owner →
//! optional partition of the cluster in two halves, a write on each side, heal.
//! Packets are unencrypted unless `encrypt` is set (sealing adds 41 bytes per packet).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use schema::{Endpoint, EndpointKey, ServiceName};

use crate::GossipConfig;
use crate::crypto::{KeyRing, SecretKey};
use crate::node::{Effect, Node, Timer};
use crate::rows::Version;
use crate::sign::{CertBody, Certificate, SigningKey, SigningMode};

mod phases;
mod registry;

pub use registry::{RegistryLoad, RegistryReport, simulate_registry};

/// What to simulate. `Default` is a 100-node LAN cluster with no loss.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: usize,
    /// Probability that a UDP datagram is lost (TCP frames are never lost, only cut by a
    /// partition).
    pub loss: f64,
    pub seed: u64,
    /// One-way delay, uniform in `[min_delay_ms, max_delay_ms]`.
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    pub probe_period_ms: u64,
    pub gossip_interval_ms: u64,
    pub repair_interval_ms: u64,
    /// Bootstrap settling time before measuring.
    pub warmup_ms: u64,
    /// Length of the steady-state bandwidth window.
    pub steady_ms: u64,
    /// Split the cluster in two halves for this long (0 = no partition phase).
    pub partition_ms: u64,
    /// Give up waiting for any one phase after this long.
    pub phase_timeout_ms: u64,
    pub encrypt: bool,
    /// Extra latency of every TCP repair frame: a loaded host, a long frame or a slow
    /// handshake make repair lag behind SWIM's datagrams.
    pub frame_extra_delay_ms: u64,
    /// Signed gossip (`require`): every node has an owner key and a registry certificate,
    /// so rows travel signed and certificates spread once.
    pub sign: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 100,
            loss: 0.0,
            seed: 1,
            min_delay_ms: 1,
            max_delay_ms: 5,
            probe_period_ms: 1_000,
            gossip_interval_ms: 200,
            repair_interval_ms: 5_000,
            warmup_ms: 20_000,
            steady_ms: 10_000,
            partition_ms: 0,
            phase_timeout_ms: 60_000,
            encrypt: false,
            frame_extra_delay_ms: 0,
            sign: false,
        }
    }
}

/// What the simulator measured. `None` means "did not happen within the phase timeout".
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    pub nodes: usize,
    pub loss: f64,
    pub seed: u64,
    pub gossip_interval_ms: u64,
    pub repair_interval_ms: u64,
    /// Gossip rounds (intervals) until a new endpoint was known to 99.99 % of nodes.
    pub rounds_to_9999: Option<u64>,
    pub secs_to_9999: Option<f64>,
    /// Seconds until every node knew it.
    pub secs_to_all: Option<f64>,
    /// Seconds from an owner's crash until no node shows its endpoints.
    pub secs_dead_hidden: Option<f64>,
    /// MemberDown notifications about healthy members outside the kill and partition phases.
    pub false_down_verdicts: u64,
    /// Identity renewals in the same window: a healthy node told it was down. Peers that
    /// still address it by its old identity have their SWIM payloads ignored until the new
    /// one has spread.
    pub rejoins: u64,
    /// Nodes that first got the new endpoint from a repair exchange rather than from gossip
    /// (a repair can also just happen to come first).
    pub reached_by_repair: usize,
    /// Mean number of indirect probes nodes had settled on (`probing`) after the steady
    /// window: 3 on a clean network, more under loss.
    pub mean_indirect_probes: f64,
    /// Mean bytes sent per node per second in the steady window (UDP + TCP).
    pub steady_bytes_per_node_sec: f64,
    /// Seconds from a partition healing until every node has the rows written on both sides.
    pub secs_partition_converged: Option<f64>,
    /// Seconds from the heal until every node sees every live node as alive again.
    pub secs_partition_members_healed: Option<f64>,
    pub udp_lost: u64,
    /// Packets nodes themselves dropped (undecodable, unknown key, ...). Expect 0.
    pub node_drops: u64,
    pub virtual_secs: f64,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<f64>| v.map_or("not reached".to_string(), |s| format!("{s:.2} s"));
        writeln!(
            f,
            "nodes {}  loss {:.1} %  seed {}",
            self.nodes,
            self.loss * 100.0,
            self.seed
        )?;
        let rounds = self
            .rounds_to_9999
            .map_or("not reached".to_string(), |r| r.to_string());
        writeln!(
            f,
            "new endpoint at 99.99 %:  {rounds} rounds of {} ms ({})",
            self.gossip_interval_ms,
            opt(self.secs_to_9999)
        )?;
        writeln!(f, "new endpoint everywhere:  {}", opt(self.secs_to_all))?;
        writeln!(
            f,
            "dead owner hidden:        {}",
            opt(self.secs_dead_hidden)
        )?;
        writeln!(
            f,
            "new endpoint via repair:  {} nodes",
            self.reached_by_repair
        )?;
        writeln!(
            f,
            "false down verdicts:      {}  (identity renewals {})",
            self.false_down_verdicts, self.rejoins
        )?;
        writeln!(
            f,
            "indirect probes:          {:.1} per failed ping (mean)",
            self.mean_indirect_probes
        )?;
        writeln!(
            f,
            "steady state:             {:.0} B/s per node",
            self.steady_bytes_per_node_sec
        )?;
        if let Some(s) = self.secs_partition_converged {
            let periods = s * 1000.0 / self.repair_interval_ms as f64;
            writeln!(
                f,
                "partition healed, converged in {s:.2} s ({periods:.1} repair periods)"
            )?;
            writeln!(
                f,
                "partition healed, membership whole in {}",
                opt(self.secs_partition_members_healed)
            )?;
        } else {
            writeln!(f, "partition healed, converged in: n/a")?;
        }
        write!(
            f,
            "udp lost {}  node drops {}  virtual time {:.1} s",
            self.udp_lost, self.node_drops, self.virtual_secs
        )
    }
}

impl SimConfig {
    /// Largest simulated cluster (addresses are 10.x.y.z).
    pub const MAX_NODES: usize = 1 << 16;

    fn clamped(self) -> SimConfig {
        let probe_period_ms = self.probe_period_ms.clamp(10, 60_000);
        let min_delay_ms = self.min_delay_ms.min(60_000);
        SimConfig {
            nodes: self.nodes.clamp(2, Self::MAX_NODES),
            loss: if self.loss.is_finite() {
                self.loss.clamp(0.0, 1.0)
            } else {
                0.0
            },
            max_delay_ms: self.max_delay_ms.clamp(min_delay_ms, 60_000),
            min_delay_ms,
            probe_period_ms,
            gossip_interval_ms: self.gossip_interval_ms.clamp(1, 60_000),
            repair_interval_ms: self.repair_interval_ms.clamp(1, 3_600_000),
            ..self
        }
    }
}

enum Event {
    Timer {
        node: usize,
        timer: Timer,
    },
    Packet {
        to: usize,
        from: SocketAddr,
        data: Vec<u8>,
    },
    Frame {
        to: usize,
        peer: usize,
        data: Vec<u8>,
    },
    /// A node's sync brings it the registry's answer for one service
    /// ([`registry::simulate_registry`]).
    Fetch {
        node: usize,
        service: usize,
    },
}

struct Sim {
    cfg: SimConfig,
    nodes: Vec<Node>,
    alive: Vec<bool>,
    index: HashMap<SocketAddr, usize>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    next_seq: u64,
    now: u64,
    rng: StdRng,
    /// `Some(split)`: nodes below `split` cannot talk to the others.
    partition: Option<usize>,
    bytes_sent: u64,
    udp_lost: u64,
    /// The row being tracked and who has it.
    watch: Option<(SocketAddr, EndpointKey, Version)>,
    has_watch: Vec<bool>,
    watch_count: usize,
    via_repair: usize,
    /// The registry the nodes sync from, in [`registry::simulate_registry`].
    registry: Option<registry::Table>,
}

pub(crate) fn addr_of(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
    SocketAddr::new(IpAddr::V4(ip), 7702)
}

fn endpoint_of(i: usize, port: u16) -> Endpoint {
    let service =
        ServiceName::new(format!("svc-{}", i % 20)).unwrap_or_else(|_| unreachable!("valid name"));
    let port = NonZeroU16::new(port).unwrap_or(NonZeroU16::MIN);
    Endpoint::new(service, addr_of(i).ip(), port)
}

/// Node `i` of the simulated cluster; `incarnation` varies its RNG seed across restarts.
/// The simulator's clock at start: late enough that the registry dates it hands out are
/// registry dates, not lower bounds (dates before [`crate::LOWER_BOUNDS_BEFORE_MS`] are an
/// agent's union of warming answers, which add up instead of replacing each other).
pub(crate) const SIM_START_MS: u64 = crate::LOWER_BOUNDS_BEFORE_MS;

pub(crate) fn node_of(
    cfg: &SimConfig,
    ring: Option<&KeyRing>,
    i: usize,
    epoch: u64,
    incarnation: u64,
) -> Node {
    let gc = GossipConfig {
        bind: addr_of(i),
        cluster: "sim".into(),
        insecure: ring.is_none(),
        keys: ring.iter().map(|r| r.primary.to_base64()).collect(),
        seeds: vec![addr_of(0)],
        probe_period_ms: cfg.probe_period_ms,
        probe_rtt_ms: cfg.probe_period_ms / 2,
        gossip_interval_ms: cfg.gossip_interval_ms,
        repair_interval_ms: cfg.repair_interval_ms,
        ..GossipConfig::default()
    };
    let registry = cfg.sign.then(|| sim_key(cfg.seed, u64::MAX));
    let gc = GossipConfig {
        signing: if cfg.sign {
            SigningMode::Require
        } else {
            SigningMode::Off
        },
        registry_key: registry.as_ref().map(|k| k.public().to_base64()),
        ..gc
    };
    let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64) ^ (incarnation << 40);
    let mut node = Node::new(gc, epoch, seed)
        .unwrap_or_else(|e| unreachable!("simulator config is valid: {e}"));
    if let Some(registry) = registry {
        let owner = sim_key(cfg.seed, i as u64);
        let body = CertBody {
            owner_key: owner.public(),
            ip: addr_of(i).ip(),
            services: None,
            not_before_ms: 0,
            not_after_ms: u64::MAX / 4,
        };
        node.set_owner_key(owner);
        if let Some(cert) = Certificate::issue(&registry, body) {
            node.set_certificate(0, cert);
        }
        node.take_effects();
    }
    node
}

/// A deterministic Ed25519 key for the simulator (`which`: a node, or `u64::MAX` for the
/// registry).
fn sim_key(seed: u64, which: u64) -> SigningKey {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&which.to_le_bytes());
    SigningKey::from_seed(bytes).unwrap_or_else(|_| unreachable!("any seed is a key"))
}

impl Sim {
    fn new(cfg: SimConfig) -> Sim {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let ring = cfg
            .encrypt
            .then(|| KeyRing::new(SecretKey::random(&mut rng)));
        let nodes: Vec<Node> = (0..cfg.nodes)
            .map(|i| node_of(&cfg, ring.as_ref(), i, 1_000 + i as u64, 0))
            .collect();
        let n = nodes.len();
        Sim {
            index: (0..n).map(|i| (addr_of(i), i)).collect(),
            alive: vec![true; n],
            nodes,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_seq: 0,
            now: SIM_START_MS,
            rng,
            partition: None,
            bytes_sent: 0,
            udp_lost: 0,
            watch: None,
            has_watch: vec![false; n],
            watch_count: 0,
            via_repair: 0,
            registry: None,
            cfg,
        }
    }

    fn push(&mut self, at: u64, ev: Event) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Reverse((at, seq)));
        self.events.insert(seq, ev);
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        self.partition.is_some_and(|s| (a < s) != (b < s))
    }

    fn delay(&mut self) -> u64 {
        self.rng
            .random_range(self.cfg.min_delay_ms..=self.cfg.max_delay_ms.max(self.cfg.min_delay_ms))
    }

    fn flush(&mut self, i: usize) {
        for effect in self.nodes[i].take_effects() {
            match effect {
                Effect::Schedule { after, timer } => {
                    let at = self.now + after.as_millis() as u64;
                    self.push(at, Event::Timer { node: i, timer });
                }
                Effect::Send { to, packet } => {
                    self.bytes_sent += packet.len() as u64;
                    let Some(&j) = self.index.get(&to) else {
                        continue;
                    };
                    if self.cut(i, j) || self.rng.random_bool(self.cfg.loss.clamp(0.0, 1.0)) {
                        self.udp_lost += 1;
                        continue;
                    }
                    let at = self.now + self.delay();
                    self.push(
                        at,
                        Event::Packet {
                            to: j,
                            from: addr_of(i),
                            data: packet,
                        },
                    );
                }
                Effect::Repair { peer, frame } => {
                    if let Some(&j) = self.index.get(&peer) {
                        self.send_frame(i, j, frame);
                    }
                }
            }
        }
    }

    fn send_frame(&mut self, from: usize, to: usize, data: Vec<u8>) {
        self.bytes_sent += data.len() as u64;
        if self.cut(from, to) {
            return;
        }
        // A TCP exchange costs a handshake round trip before the first frame.
        let at = self.now + 2 * self.delay() + self.cfg.frame_extra_delay_ms;
        self.push(
            at,
            Event::Frame {
                to,
                peer: from,
                data,
            },
        );
    }

    fn check_watch(&mut self, i: usize, by_repair: bool) {
        if let Some((owner, key, version)) = &self.watch
            && !self.has_watch[i]
            && self.nodes[i].has_row(owner, key, *version)
        {
            self.has_watch[i] = true;
            self.watch_count += 1;
            self.via_repair += usize::from(by_repair);
        }
    }

    fn step(&mut self) -> bool {
        let Some(Reverse((at, seq))) = self.queue.pop() else {
            return false;
        };
        let Some(ev) = self.events.remove(&seq) else {
            return true;
        };
        self.now = at;
        match ev {
            Event::Timer { node, timer } if self.alive[node] => {
                self.nodes[node].handle_timer(at, timer);
                self.flush(node);
            }
            Event::Packet { to, from, data } if self.alive[to] => {
                self.nodes[to].handle_packet(at, from, &data);
                self.check_watch(to, false);
                self.flush(to);
            }
            Event::Frame { to, peer, data } if self.alive[to] => {
                let reply = self.nodes[to].handle_repair_frame(at, &data);
                self.check_watch(to, true);
                self.flush(to);
                if let Some(reply) = reply {
                    self.send_frame(to, peer, reply);
                }
            }
            Event::Fetch { node, service } if self.alive[node] => self.fetch(node, service),
            _ => {}
        }
        true
    }

    fn run_until(&mut self, t: u64) {
        while self.queue.peek().is_some_and(|Reverse((at, _))| *at <= t) {
            self.step();
        }
        self.now = self.now.max(t);
    }

    /// Runs until `done` holds (checked every `every` ms) or `timeout` ms pass; returns the
    /// elapsed ms.
    fn run_until_cond(
        &mut self,
        every: u64,
        timeout: u64,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Option<u64> {
        let start = self.now;
        while self.now - start <= timeout {
            if done(self) {
                return Some(self.now - start);
            }
            self.run_until(self.now + every);
        }
        None
    }

    fn live_count(&self) -> usize {
        self.alive.iter().filter(|a| **a).count()
    }

    fn downs(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.metrics().snapshot().members_declared_down)
            .sum()
    }

    fn rejoins(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.metrics().snapshot().rejoins)
            .sum()
    }

    fn publish(&mut self, i: usize, endpoints: Vec<Endpoint>) {
        self.nodes[i].publish_local(self.now, endpoints);
        self.flush(i);
    }

    fn watch_row(&mut self, owner: usize, ep: &Endpoint) {
        let version = self.nodes[owner].local_version();
        self.watch = Some((addr_of(owner), ep.key(), version));
        self.has_watch = vec![false; self.nodes.len()];
        self.watch_count = 0;
        self.via_repair = 0;
        for i in 0..self.nodes.len() {
            self.check_watch(i, false);
        }
    }
}

/// Runs one simulation. Deterministic for a given config.
/// Out-of-range settings (they come from a command line) are clamped, never a panic.
pub fn simulate(cfg: SimConfig) -> SimReport {
    let cfg = cfg.clamped();
    let n = cfg.nodes;
    let mut sim = Sim::new(cfg);
    sim.bootstrap();
    let c = sim.cfg.clone();
    sim.run_until(sim.now + c.warmup_ms);

    // Steady state: no changes, count bytes.
    let (downs0, rejoins0) = (sim.downs(), sim.rejoins());
    let steady = sim.steady();

    // Dissemination of one new endpoint from node 0.
    let fresh = endpoint_of(0, 9090);
    let spread = sim.disseminate(&fresh);
    let false_downs = sim.downs() - downs0;
    let rejoins = sim.rejoins() - rejoins0;
    let reached_by_repair = sim.via_repair;

    // Kill the last node; wait until nobody shows its endpoint.
    let t_hidden = sim.kill_owner(n - 1);

    // Partition in two halves, a write on each side, heal.
    let healing = (c.partition_ms > 0 && n >= 4).then(|| sim.partition_and_heal(&fresh));

    let secs = |ms: u64| ms as f64 / 1000.0;
    SimReport {
        nodes: n,
        loss: c.loss,
        seed: c.seed,
        gossip_interval_ms: c.gossip_interval_ms,
        repair_interval_ms: c.repair_interval_ms,
        rounds_to_9999: spread
            .t_9999
            .map(|t| t.div_ceil(c.gossip_interval_ms.max(1))),
        secs_to_9999: spread.t_9999.map(secs),
        secs_to_all: spread.t_all.map(secs),
        secs_dead_hidden: t_hidden.map(secs),
        false_down_verdicts: false_downs,
        rejoins,
        reached_by_repair,
        mean_indirect_probes: steady.mean_indirect_probes,
        steady_bytes_per_node_sec: steady.bytes_per_node_sec,
        secs_partition_converged: healing.as_ref().and_then(|h| h.converged).map(secs),
        secs_partition_members_healed: healing.as_ref().and_then(|h| h.members).map(secs),
        udp_lost: sim.udp_lost,
        node_drops: sim
            .nodes
            .iter()
            .map(|n| n.metrics().snapshot().dropped_total())
            .sum(),
        virtual_secs: secs(sim.now - SIM_START_MS),
    }
}

#[cfg(test)]
#[path = "sim_tests.rs"]
mod tests;
