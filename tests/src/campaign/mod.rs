//! The fault campaign: from a seed, a randomized schedule of faults ([`schedule`]) run
//! against real `tidings` processes — registry (memory, or two replicas on one DynamoDB
//! table), agents in network namespaces, cron-only hosts, a proxy with real backends under
//! steady GET traffic — while named invariants ([`model`]) are checked a few times a second.
//! The schedule is a pure function of the seed and the fleet's shape: a failing seed replays.
//!
//! Knobs: `TIDINGS_CAMPAIGN_SEEDS` (comma list of u64), `TIDINGS_CAMPAIGN_SECS` (per seed),
//! `TIDINGS_CAMPAIGN_STORE` (`memory` or `dynamodb`: force the store instead of the seed's).

pub mod model;
pub mod run;
pub mod schedule;
pub mod world;

/// Timing of the fleet under test, and the bound of each invariant derived from it.
pub mod bounds {
    use std::time::Duration;

    /// The registry's TTL (`--ttl`).
    pub const TTL: Duration = Duration::from_secs(3);
    /// The registry's and the agents' check-in interval (`--check-in-interval`), which is
    /// also the warm-up after an empty registry start. Cron hosts check in this often too.
    pub const CHECK_IN: Duration = Duration::from_secs(1);
    /// `repair_interval_ms` of the agents' gossip config (`fleet::FAST_GOSSIP`).
    pub const REPAIR: Duration = Duration::from_secs(1);
    /// The proxy's health-check interval (`tests::proxy::start`) and ±10 % jitter.
    pub const HEALTH: Duration = Duration::from_millis(330);
    /// Headroom for a 2-core machine shared by a dozen processes and the test itself.
    pub const SLACK: Duration = Duration::from_secs(2);

    /// `live_in_views` (agents): a host that starts checking in reaches the registry
    /// within two check-in intervals (its splay, then the interval); after an empty registry
    /// start the warm-up adds one more; agents hear it from the registry's blocking query at
    /// once or from gossip within three repair periods. 2 + 1 + 3 s + slack = 8 s.
    pub const VISIBLE: Duration = Duration::from_secs(8);
    /// `live_in_views` (proxy): the agent's bound, plus the proxy's watch of its agent and
    /// one healthy check (1 s).
    pub const PROXY_VISIBLE: Duration = Duration::from_secs(9);
    /// A returned backend is found healthy within two checks (plus slack).
    pub const BACKEND_HEALTHY: Duration = Duration::from_millis(2 * 330 + 1000);
    /// `deregistered_leaves` (agents): the tombstone spreads within three repair periods
    /// and the registry deletes at once (next blocking-query answer, within a check-in
    /// interval): 3 + 1 s + slack = 6 s.
    pub const LEAVE: Duration = Duration::from_secs(6);
    /// `deregistered_leaves` (proxy's discovery status): one more watch round.
    pub const PROXY_LEAVE: Duration = Duration::from_secs(7);
    /// `no_route_to_failing`: unhealthy after two failed checks (2 × 330 ms), plus 1 s.
    pub const FAILING: Duration = Duration::from_millis(2 * 330 + 1000);
    /// `freshness_honest`: after a registry replica died at T, its agents must say their
    /// data is at least `now - T - FRESH_SLACK` old (one poll round and a request's time).
    pub const FRESH_SLACK: Duration = Duration::from_millis(1500);
    /// `freshness_honest` with a healthy registry: the age must stay under this...
    pub const FRESH_WHEN_HEALTHY: Duration = Duration::from_secs(1);
    /// ...once the agent fix that keeps it there has landed; until then the ages are only
    /// recorded (printed in the summary).
    pub const ASSERT_FRESH_WHEN_HEALTHY: bool = false;
    /// How often the checker asks every view.
    pub const CHECK_EVERY: Duration = Duration::from_millis(300);
}

/// The fleet's size and the run's length.
#[derive(Debug, Clone)]
pub struct Config {
    /// Length of one seed's fault window plus head and tail, in seconds.
    pub secs: u64,
    pub agents: usize,
    pub cron_hosts: usize,
    /// `Some`: every seed runs this store, whatever it would draw.
    pub store: Option<schedule::Store>,
}

impl Config {
    /// Defaults for CI, overridden by `TIDINGS_CAMPAIGN_SECS` and `TIDINGS_CAMPAIGN_STORE`.
    pub fn from_env(default_secs: u64) -> anyhow::Result<Config> {
        let secs = match std::env::var("TIDINGS_CAMPAIGN_SECS") {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("TIDINGS_CAMPAIGN_SECS={s:?}: {e}"))?,
            Err(_) => default_secs,
        };
        anyhow::ensure!(
            (20..=24 * 3600).contains(&secs),
            "TIDINGS_CAMPAIGN_SECS must be 20..=86400"
        );
        let store = match std::env::var("TIDINGS_CAMPAIGN_STORE").as_deref() {
            Err(_) | Ok("") => None,
            Ok("memory") => Some(schedule::Store::Memory),
            Ok("dynamodb") => Some(schedule::Store::Dynamo),
            Ok(other) => anyhow::bail!("TIDINGS_CAMPAIGN_STORE={other:?}: memory or dynamodb"),
        };
        Ok(Config {
            secs,
            agents: 6,
            cron_hosts: 2,
            store,
        })
    }

    /// The shape the schedule is drawn for.
    pub fn shape(&self) -> schedule::Shape {
        schedule::Shape {
            run_ms: self.secs * 1000,
            head_ms: 2_000,
            // Long enough for every late check (a deregistration's leave bound) to run.
            tail_ms: 10_000,
            agents: self.agents,
            cron_hosts: self.cron_hosts,
            proxy_agent: 0,
            ttl_ms: u64::try_from(bounds::TTL.as_millis()).unwrap_or(3_000),
            dynamo_percent: 35,
            max_concurrent: 4,
        }
    }

    /// The schedule of `seed` under this config (the store forced if configured).
    pub fn schedule(&self, seed: u64) -> schedule::Schedule {
        let mut s = schedule::generate(seed, &self.shape());
        if let Some(store) = self.store {
            if store != s.store {
                // Replica indices must exist in the forced store: redraw none, just clamp.
                for f in &mut s.faults {
                    clamp_replica(&mut f.kind, store.replicas());
                }
            }
            s.store = store;
        }
        s
    }
}

fn clamp_replica(kind: &mut schedule::Kind, replicas: usize) {
    use schedule::{ClockTarget, Kind};
    let last = replicas.saturating_sub(1);
    match kind {
        Kind::RegistryKill { replica }
        | Kind::RegistryStop { replica }
        | Kind::RegistryEmptyRestart { replica }
        | Kind::ClockStep {
            target: ClockTarget::Registry(replica),
            ..
        } => *replica = (*replica).min(last),
        _ => {}
    }
}

/// The seeds from `TIDINGS_CAMPAIGN_SEEDS`, else `default`.
pub fn seeds_from_env(default: &[u64]) -> anyhow::Result<Vec<u64>> {
    match std::env::var("TIDINGS_CAMPAIGN_SEEDS") {
        Ok(s) if !s.trim().is_empty() => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("TIDINGS_CAMPAIGN_SEEDS: {x:?}: {e}"))
            })
            .collect(),
        _ => Ok(default.to_vec()),
    }
}
