//! The fault campaign (see `tests::campaign`): seeded, randomized faults against real
//! processes in network namespaces (root only; CI runs as root), with named invariants
//! checked throughout. By default a short CI campaign of fixed seeds that together inject
//! every fault kind; `ops/bench/campaign.sh` runs a long one with random seeds.
//!
//! `TIDINGS_CAMPAIGN_SEEDS=1,2,3` picks the seeds, `TIDINGS_CAMPAIGN_SECS=60` the length of
//! each, `TIDINGS_CAMPAIGN_STORE=memory|dynamodb` forces the store. A failure prints each
//! failing seed with its whole schedule; the same seed and length replay it.

// One moto launcher for the whole workspace: discovery's test harness, compiled in here.
#[path = "../../discovery/tests/support/moto.rs"]
mod moto;

use anyhow::{Result, bail};
use tests::campaign::{self, Config, run::run_seed};

/// CI seeds and length: together they inject every fault kind, with both stores, in about
/// three minutes (see `ci_seeds_cover_every_fault_kind`).
const CI_SEEDS: [u64; 2] = [3, 11];
const CI_SECS: u64 = 60;

fn start_moto() -> Result<(Box<dyn std::any::Any>, String)> {
    let m = moto::Moto::start();
    let endpoint = m.endpoint();
    Ok((Box::new(m), endpoint))
}

#[test]
fn ci_seeds_cover_every_fault_kind() {
    let cfg = Config {
        secs: CI_SECS,
        agents: 6,
        cron_hosts: 2,
        store: None,
    };
    let mut kinds = std::collections::BTreeSet::new();
    let mut stores = std::collections::BTreeSet::new();
    for seed in CI_SEEDS {
        let s = cfg.schedule(seed);
        kinds.extend(s.kinds());
        stores.insert(s.store);
    }
    let missing: Vec<&str> = campaign::schedule::KIND_NAMES
        .iter()
        .copied()
        .filter(|k| !kinds.contains(k))
        .collect();
    assert!(missing.is_empty(), "CI seeds never inject {missing:?}");
    assert_eq!(stores.len(), 2, "CI seeds run only {stores:?}");
}

#[test]
fn campaign() -> Result<()> {
    let cfg = Config::from_env(CI_SECS)?;
    let seeds = campaign::seeds_from_env(&CI_SEEDS)?;
    let mut failed = Vec::new();
    for seed in seeds {
        let outcome = run_seed(seed, &cfg, &start_moto)?;
        println!("{}", outcome.summary());
        if outcome.failed() {
            failed.push(seed);
        }
    }
    if !failed.is_empty() {
        bail!("campaign seeds {failed:?} found violations (their schedules are printed above)");
    }
    Ok(())
}
