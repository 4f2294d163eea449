//! The campaign's schedule: which faults happen when, as a pure function of a seed and the
//! fleet's shape. No clock, no I/O, no global randomness — the same seed and [`Shape`] give
//! the same [`Schedule`] on every machine, so a failing seed replays exactly.

use std::collections::BTreeSet;
use std::fmt;

/// A small, fixed PRNG (SplitMix64): its sequence never changes with a crate upgrade, which
/// a replayable seed needs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (`lo` if the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// An index below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent` %.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// What the fleet looks like, as far as the schedule cares. The engine builds it from its
/// config; the schedule never reads the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Length of the run in ms; every fault ends [`Shape::tail_ms`] before it.
    pub run_ms: u64,
    /// Quiet time at the start (the fleet settles) and at the end (late checks run).
    pub head_ms: u64,
    pub tail_ms: u64,
    pub agents: usize,
    /// Hosts without an agent, checking in by cron.
    pub cron_hosts: usize,
    /// The agent the proxy reads its membership from (never deregistered: its web endpoint
    /// is where the proxy listens in a real deployment, and traffic must keep a route).
    pub proxy_agent: usize,
    /// The registry's TTL and check-in interval, so registry outages are drawn both inside
    /// and beyond the blind spot that turns self-preservation on (`ttl - interval`).
    pub ttl_ms: u64,
    pub registry_interval_ms: u64,
    /// Percent of seeds that run the DynamoDB store with two registry replicas.
    pub dynamo_percent: u64,
    /// The most faults running at once.
    pub max_concurrent: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Store {
    Memory,
    /// DynamoDB (moto) with two registry replicas on one table.
    Dynamo,
}

impl Store {
    pub fn replicas(self) -> usize {
        match self {
            Store::Memory => 1,
            Store::Dynamo => 2,
        }
    }
}

/// A process whose wall clock can be stepped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClockTarget {
    Agent(usize),
    Registry(usize),
}

/// One fault. Indices: agents and web hosts are 0-based; web host `h < agents` is agent
/// `h`'s host, the others are cron hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// SIGKILL the replica; start it again (same port, same store) at the end.
    RegistryKill { replica: usize },
    /// SIGSTOP the replica; SIGCONT at the end.
    RegistryStop { replica: usize },
    /// SIGKILL and start again at once: a memory store comes back empty (warm-up).
    RegistryEmptyRestart { replica: usize },
    /// SIGKILL the agent; start it at the end, with or without its disk cache.
    AgentRestart { agent: usize, keep_cache: bool },
    /// The web backend of a host dies; it returns at the end.
    BackendKill { host: usize },
    /// The agent deregisters its host's web endpoint; registers it again at the end.
    Deregister { agent: usize },
    /// The agent registers an endpoint of another service and a new cron-only host of that
    /// service appears; at the end the endpoint is deregistered and the cron host stops.
    Churn { agent: usize, service: String },
    /// The process's clock jumps by `offset_ms`; it jumps back at the end.
    ClockStep { target: ClockTarget, offset_ms: i64 },
    /// Each agent of `agents` drops `percent` % of the gossip packets it receives.
    GossipLoss { agents: Vec<usize>, percent: u8 },
    /// Gossip (all traffic between agents' hosts) is cut between `side` and the others.
    Partition { side: Vec<usize> },
}

/// The kinds by name, to count coverage.
pub const KIND_NAMES: [&str; 10] = [
    "registry_kill",
    "registry_stop",
    "registry_empty_restart",
    "agent_restart",
    "backend_kill",
    "deregister",
    "churn",
    "clock_step",
    "gossip_loss",
    "partition",
];

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::RegistryKill { .. } => KIND_NAMES[0],
            Kind::RegistryStop { .. } => KIND_NAMES[1],
            Kind::RegistryEmptyRestart { .. } => KIND_NAMES[2],
            Kind::AgentRestart { .. } => KIND_NAMES[3],
            Kind::BackendKill { .. } => KIND_NAMES[4],
            Kind::Deregister { .. } => KIND_NAMES[5],
            Kind::Churn { .. } => KIND_NAMES[6],
            Kind::ClockStep { .. } => KIND_NAMES[7],
            Kind::GossipLoss { .. } => KIND_NAMES[8],
            Kind::Partition { .. } => KIND_NAMES[9],
        }
    }

    /// What the fault holds while it runs; two faults holding the same resource never
    /// overlap (the engine could not undo them in either order).
    fn resources(&self) -> Vec<Resource> {
        match self {
            // One registry fault at a time: the model of "the registry has been healthy since"
            // stays one timeline per replica, and a kill during a stop has no sane end.
            Kind::RegistryKill { .. }
            | Kind::RegistryStop { .. }
            | Kind::RegistryEmptyRestart { .. } => vec![Resource::Registry],
            // An agent restart re-applies the command line's endpoints, so it must not meet a
            // deregistration or churn on the same agent.
            Kind::AgentRestart { agent, .. }
            | Kind::Deregister { agent }
            | Kind::Churn { agent, .. } => vec![Resource::Agent(*agent)],
            Kind::BackendKill { host } => vec![Resource::Backend(*host)],
            Kind::ClockStep { target, .. } => vec![Resource::Clock(*target)],
            Kind::GossipLoss { agents, .. } => agents.iter().map(|&a| Resource::Loss(a)).collect(),
            // One partition table per namespace: partitions never overlap.
            Kind::Partition { .. } => vec![Resource::Partition],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Resource {
    Registry,
    Agent(usize),
    Backend(usize),
    Clock(ClockTarget),
    Loss(usize),
    Partition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// ms after the run's start.
    pub start_ms: u64,
    pub dur_ms: u64,
    pub kind: Kind,
}

impl Fault {
    pub fn end_ms(&self) -> u64 {
        self.start_ms + self.dur_ms
    }

    fn overlaps(&self, other: &Fault) -> bool {
        self.start_ms < other.end_ms() && other.start_ms < self.end_ms()
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "t={:>6.1}s..{:>6.1}s {:?}",
            self.start_ms as f64 / 1000.0,
            self.end_ms() as f64 / 1000.0,
            self.kind
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub store: Store,
    /// Sorted by start.
    pub faults: Vec<Fault>,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} store {:?}: {} faults",
            self.seed,
            self.store,
            self.faults.len()
        )?;
        for fault in &self.faults {
            writeln!(f, "  {fault}")?;
        }
        Ok(())
    }
}

impl Schedule {
    /// The distinct fault kinds this schedule runs.
    pub fn kinds(&self) -> BTreeSet<&'static str> {
        self.faults.iter().map(|f| f.kind.name()).collect()
    }
}

/// How many times the generator draws a fault per second of fault window; draws that clash
/// with a fault already placed are dropped, so this bounds the work, not the count.
const DRAWS_PER_SEC: u64 = 1;
/// The fewest draws, so a short CI run still sees several faults.
const MIN_DRAWS: u64 = 12;
/// Percent of faults placed near another fault's start or end...
const ANCHORED_PERCENT: u64 = 40;
/// ...within this many ms either side.
const ANCHOR_JITTER_MS: u64 = 1_500;
/// The most backends down at once: traffic must always have healthy hosts left.
const MAX_BACKENDS_DOWN: usize = 2;

/// The schedule for `seed` on a fleet of `shape`.
pub fn generate(seed: u64, shape: &Shape) -> Schedule {
    let mut rng = Rng::new(seed);
    let store = if rng.chance(shape.dynamo_percent) {
        Store::Dynamo
    } else {
        Store::Memory
    };
    let window_end = shape.run_ms.saturating_sub(shape.tail_ms);
    let window = window_end.saturating_sub(shape.head_ms);
    let draws = (window / 1000 * DRAWS_PER_SEC).max(MIN_DRAWS);
    let mut faults: Vec<Fault> = Vec::new();
    let mut churns = 0;
    for _ in 0..draws {
        let kind = draw_kind(&mut rng, shape, store, &mut churns);
        let (lo, hi) = duration_range(&kind, shape);
        let dur_ms = rng.range(lo, hi);
        if window < dur_ms || shape.agents == 0 {
            continue;
        }
        let latest = shape.head_ms + window - dur_ms;
        // Faults meet by chance only rarely in a short run, and the interesting bugs live
        // where they meet (a deregistration while an agent is down, a new host during a
        // warm-up): so some faults start near the start or end of one already placed.
        let start_ms = if !faults.is_empty() && rng.chance(ANCHORED_PERCENT) {
            let other = &faults[rng.below(faults.len())];
            let anchor = if rng.chance(50) {
                other.start_ms
            } else {
                other.end_ms()
            };
            (anchor + rng.range(0, 2 * ANCHOR_JITTER_MS))
                .saturating_sub(ANCHOR_JITTER_MS)
                .clamp(shape.head_ms, latest)
        } else {
            shape.head_ms + rng.range(0, window - dur_ms)
        };
        let fault = Fault {
            start_ms,
            dur_ms,
            kind,
        };
        if fits(&fault, &faults, shape) {
            faults.push(fault);
        }
    }
    faults.sort_by_key(|f| (f.start_ms, f.end_ms()));
    Schedule {
        seed,
        store,
        faults,
    }
}

/// Whether `fault` can join `placed`: no shared resource while both run, at most
/// [`MAX_BACKENDS_DOWN`] backends and `max_concurrent` faults at any moment.
fn fits(fault: &Fault, placed: &[Fault], shape: &Shape) -> bool {
    let overlapping: Vec<&Fault> = placed.iter().filter(|p| p.overlaps(fault)).collect();
    let mine = fault.kind.resources();
    if overlapping
        .iter()
        .any(|p| p.kind.resources().iter().any(|r| mine.contains(r)))
    {
        return false;
    }
    // The counts are highest at some fault's start: check at each start inside `fault`.
    let mut starts: Vec<u64> = overlapping.iter().map(|p| p.start_ms).collect();
    starts.push(fault.start_ms);
    starts.into_iter().all(|t| {
        let at_t: Vec<&Fault> = overlapping
            .iter()
            .copied()
            .chain(std::iter::once(fault))
            .filter(|f| f.start_ms <= t && t < f.end_ms().max(f.start_ms + 1))
            .collect();
        let backends = at_t
            .iter()
            .filter(|f| matches!(f.kind, Kind::BackendKill { .. }))
            .count();
        at_t.len() <= shape.max_concurrent && backends <= MAX_BACKENDS_DOWN
    })
}

fn draw_kind(rng: &mut Rng, shape: &Shape, store: Store, churns: &mut usize) -> Kind {
    let replica = rng.below(store.replicas());
    let agent = rng.below(shape.agents);
    match rng.below(KIND_NAMES.len()) {
        0 => Kind::RegistryKill { replica },
        1 => Kind::RegistryStop { replica },
        2 => Kind::RegistryEmptyRestart { replica },
        3 => Kind::AgentRestart {
            agent,
            keep_cache: rng.chance(60),
        },
        4 => Kind::BackendKill {
            host: rng.below(shape.agents + shape.cron_hosts),
        },
        5 if agent != shape.proxy_agent => Kind::Deregister { agent },
        // The proxy's own host: redraw as a deregistration of the next agent.
        5 => Kind::Deregister {
            agent: (agent + 1) % shape.agents,
        },
        6 => {
            *churns += 1;
            Kind::Churn {
                agent,
                service: format!("churn{churns}"),
            }
        }
        7 => {
            let target = if rng.chance(50) {
                ClockTarget::Agent(agent)
            } else {
                ClockTarget::Registry(replica)
            };
            // Seconds to an hour, either way; a third of them large.
            let magnitude = if rng.chance(33) {
                rng.range(60_000, 3_600_000)
            } else {
                rng.range(1_000, 30_000)
            };
            let offset_ms = i64::try_from(magnitude).unwrap_or(i64::MAX);
            Kind::ClockStep {
                target,
                offset_ms: if rng.chance(50) {
                    offset_ms
                } else {
                    -offset_ms
                },
            }
        }
        8 => {
            let n = rng.range(1, shape.agents.div_ceil(2) as u64) as usize;
            Kind::GossipLoss {
                agents: pick(rng, shape.agents, n),
                percent: rng.range(10, 60) as u8,
            }
        }
        _ => {
            let n = rng.range(1, (shape.agents / 2).max(1) as u64) as usize;
            Kind::Partition {
                side: pick(rng, shape.agents, n),
            }
        }
    }
}

/// `n` distinct indices below `of`, sorted.
fn pick(rng: &mut Rng, of: usize, n: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..of).collect();
    // Partial Fisher-Yates: the first n are a uniform sample.
    for i in 0..n.min(of) {
        let j = i + rng.below(of - i);
        all.swap(i, j);
    }
    let mut chosen: Vec<usize> = all.into_iter().take(n.min(of)).collect();
    chosen.sort_unstable();
    chosen
}

/// (shortest, longest) duration of a fault in ms.
fn duration_range(kind: &Kind, shape: &Shape) -> (u64, u64) {
    let (ttl, interval) = (shape.ttl_ms, shape.registry_interval_ms);
    match kind {
        // Outages both inside and beyond `ttl - interval`: the self-preservation path.
        Kind::RegistryKill { .. } | Kind::RegistryStop { .. } => (interval / 2, ttl + interval / 2),
        // Held for the warm-up that follows, so no other registry fault hides it.
        Kind::RegistryEmptyRestart { .. } => (interval + 1_000, interval + 1_000),
        Kind::AgentRestart { .. } => (500, 4_000),
        Kind::BackendKill { .. } => (1_000, 6_000),
        Kind::Deregister { .. } | Kind::Churn { .. } => (3_000, 10_000),
        Kind::ClockStep { .. } => (2_000, 10_000),
        Kind::GossipLoss { .. } | Kind::Partition { .. } => (3_000, 10_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(run_ms: u64) -> Shape {
        Shape {
            run_ms,
            head_ms: 5_000,
            tail_ms: 10_000,
            agents: 6,
            cron_hosts: 2,
            proxy_agent: 0,
            ttl_ms: 12_000,
            registry_interval_ms: 6_000,
            dynamo_percent: 35,
            max_concurrent: 4,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(
                generate(seed, &shape(60_000)),
                generate(seed, &shape(60_000))
            );
        }
        assert_ne!(generate(1, &shape(60_000)), generate(2, &shape(60_000)));
    }

    #[test]
    fn faults_are_bounded_and_never_clash() {
        for seed in 0..300 {
            let s = shape(20_000 + seed * 1_000);
            let sched = generate(seed, &s);
            for (i, f) in sched.faults.iter().enumerate() {
                assert!(f.start_ms >= s.head_ms, "seed {seed}: {f}");
                assert!(f.end_ms() <= s.run_ms - s.tail_ms, "seed {seed}: {f}");
                if let Kind::ClockStep { offset_ms, .. } = f.kind {
                    assert!((1_000..=3_600_000).contains(&offset_ms.abs()), "{f}");
                }
                if let Kind::Deregister { agent } = f.kind {
                    assert_ne!(agent, s.proxy_agent, "seed {seed}: {f}");
                }
                for g in &sched.faults[i + 1..] {
                    if f.overlaps(g) {
                        let (a, b) = (f.kind.resources(), g.kind.resources());
                        assert!(
                            !a.iter().any(|r| b.contains(r)),
                            "seed {seed}: {f} clashes with {g}"
                        );
                    }
                }
            }
            // At every start, the limits hold.
            for f in &sched.faults {
                let live: Vec<&Fault> = sched
                    .faults
                    .iter()
                    .filter(|g| g.start_ms <= f.start_ms && f.start_ms < g.end_ms())
                    .collect();
                assert!(live.len() <= s.max_concurrent, "seed {seed} at {f}");
                let down = live
                    .iter()
                    .filter(|g| matches!(g.kind, Kind::BackendKill { .. }))
                    .count();
                assert!(down <= MAX_BACKENDS_DOWN, "seed {seed} at {f}");
            }
            let replicas = sched.store.replicas();
            for f in &sched.faults {
                match &f.kind {
                    Kind::RegistryKill { replica }
                    | Kind::RegistryStop { replica }
                    | Kind::RegistryEmptyRestart { replica }
                    | Kind::ClockStep {
                        target: ClockTarget::Registry(replica),
                        ..
                    } => assert!(*replica < replicas),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn a_zero_length_window_gives_no_faults() {
        let mut s = shape(10_000);
        s.run_ms = 12_000;
        assert!(generate(7, &s).faults.is_empty());
    }

    #[test]
    fn pick_is_distinct_and_sorted() {
        let mut rng = Rng::new(9);
        for n in 0..=6 {
            let p = pick(&mut rng, 6, n);
            assert_eq!(p.len(), n);
            assert!(p.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
