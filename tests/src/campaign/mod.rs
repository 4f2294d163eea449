//! The fault campaign: from a seed, a randomized schedule of faults ([`schedule`]) run
//! against real `tidings` processes — registry (memory, or two replicas on one DynamoDB
//! table), agents in network namespaces, cron-only hosts, a proxy with real backends under
//! steady GET traffic — while named invariants ([`model`]) are checked a few times a second.
//! The schedule is a pure function of the seed and the fleet's shape: a failing seed replays.
//!
//! Knobs: `TIDINGS_CAMPAIGN_SEEDS` (comma list of u64), `TIDINGS_CAMPAIGN_SECS` (per seed),
//! `TIDINGS_CAMPAIGN_STORE` (`memory` or `dynamodb`: force the store instead of the seed's),
//! `TIDINGS_CAMPAIGN_KEEP_LOGS=1` (keep every process's log even when the seed passes; a
//! failing seed always keeps them, with the replicas' `/v1/ops/status` at each violation, in
//! `$TMPDIR/tidings-campaign-evidence-<seed>`).

pub mod judge;
pub mod model;
mod procs;
pub mod run;
pub mod schedule;
pub mod world;

/// Timing of the fleet under test, and the bound of each invariant derived from it.
pub mod bounds {
    use std::time::Duration;

    /// The registry's `--check-in-interval`: its warm-up after an empty start, and the
    /// renewal interval self-preservation counts with. Longer than the hosts' own interval
    /// so that warm-up lasts longer than the bounds below: an agent that ignored warming
    /// answers would be caught.
    pub const REGISTRY_INTERVAL: Duration = Duration::from_secs(6);
    /// The registry's `--ttl`: two registry intervals.
    pub const TTL: Duration = Duration::from_secs(12);
    /// How often agents (`--check-in-interval`) and cron hosts check in.
    pub const HOST_INTERVAL: Duration = Duration::from_secs(1);
    /// `repair_interval_ms` of the agents' gossip config (`fleet::FAST_GOSSIP`).
    pub const REPAIR: Duration = Duration::from_secs(1);
    /// The agents' sync settings (their config file): the blocking query's wait, the poll
    /// period and the longest retry pause while the registry is unreachable; and how long
    /// rows loaded from the disk cache stand before gossip replaces them.
    pub const AGENT_CONFIG: &str = "sync_wait = \"5s\"\npoll_interval = \"1s\"\n\
        sync_retry_max = \"1s\"\nrequest_timeout = \"2s\"\ncache_settle = \"2s\"\n";
    /// Headroom for a 2-core machine shared by a dozen processes and the test itself.
    pub const SLACK: Duration = Duration::from_secs(2);

    // `live_in_views`: a host must be in a view once all three terms below have passed
    // (each counted from its own moment), and stay there while it keeps checking in.

    /// ...from when an agent's endpoint went live: its first check-in within two host
    /// intervals (the per-host offset, then the interval), gossip to every agent within
    /// three repair periods: 2 + 3 s + slack.
    pub const AGENT_EP_VISIBLE: Duration = Duration::from_secs(7);
    /// ...from when a cron host started: one cron period, the one-shot process's run
    /// (up to one timeout of 1 s), then the agents' blocking query returns at once: 2 s +
    /// slack.
    pub const CRON_EP_VISIBLE: Duration = Duration::from_secs(4);
    /// ...from when the viewing agent (re)started: its first sync is immediate: 1 s
    /// (start and one request) + slack.
    pub const VIEWER_VISIBLE: Duration = Duration::from_secs(3);
    /// ...from when every registry replica serves again: the hosts' next check-in (1 s),
    /// the agents' next sync attempt (`sync_retry_max` 1 s) and slack: 4 s, shorter than the
    /// registry's warm-up (6 s), which must not hide hosts that checked in.
    pub const REGISTRY_VISIBLE: Duration = Duration::from_secs(4);
    /// The proxy adds its watch of its agent and one healthy check to each term.
    pub const PROXY_EXTRA: Duration = Duration::from_secs(1);
    /// A returned backend is found healthy within two checks (plus slack).
    pub const BACKEND_HEALTHY: Duration = Duration::from_millis(2 * 330 + 1000);
    /// `deregistered_leaves` (agents): the tombstone spreads within three repair periods
    /// and the registry deletes at once (next sync, within `sync_retry_max`); rows a
    /// restarted agent loaded from its cache give way after `cache_settle` (2 s), counted
    /// from the later of the deregistration and the viewer's start: 3 + 1 s + slack.
    pub const LEAVE: Duration = Duration::from_secs(6);
    /// `deregistered_leaves` (proxy's discovery status): one more watch round.
    pub const PROXY_LEAVE: Duration = Duration::from_secs(7);
    /// `no_route_to_failing`: the proxy checks every 300 ms ± 10 % (`tests::proxy::start`)
    /// and marks a host unhealthy after two failures: 2 × 330 ms, plus 1 s.
    pub const FAILING: Duration = Duration::from_millis(2 * 330 + 1000);
    /// `freshness_honest`: after the registry died at T, agents must say their data is at
    /// least `now - T - FRESH_SLACK` old (one poll round and a request's time).
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
            ttl_ms: u64::try_from(bounds::TTL.as_millis()).unwrap_or(12_000),
            registry_interval_ms: u64::try_from(bounds::REGISTRY_INTERVAL.as_millis())
                .unwrap_or(6_000),
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
