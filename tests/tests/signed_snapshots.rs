//! Registry-signed snapshots across agents (issue #17). With `--gossip-signing require`,
//! gossip drops any snapshot the registry did not sign; the registry signs each listing of
//! the catalog answers agents ask with `signed=true`. Two agents sync from a signing
//! registry that lists a cron-only host (owned by no agent); a third cannot reach any
//! registry and still learns the cron host, from its peers' signed snapshots alone.

use anyhow::{Result, ensure};
use std::collections::BTreeSet;
use tests::fleet;
use tests::{START, http, poll};

/// A per-run /24 of loopback, apart from the other suites' ranges.
fn ip(host: u8) -> String {
    let net = 1 + std::process::id() % 100;
    format!("127.204.{net}.{host}")
}

fn url(host: u8) -> String {
    format!("http://{}:7701", ip(host))
}

#[test]
fn an_agent_cut_off_from_the_registry_learns_a_cron_host_from_signed_snapshots() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let keys = fleet::SigningKeys::create(tmp.path())?;
    let reg_addr = format!("{}:7700", ip(100));
    let reg_url = format!("http://{reg_addr}");
    let _reg = keys.registry(&reg_addr)?;
    fleet::registry_check_in(&reg_url, &ip(5), &[("cron".to_string(), 9000)])?;

    // Agent 3's registry address has nothing listening: it never gets an answer.
    let nowhere = format!("http://{}:7700", ip(101));
    let dir = |n: u8| tmp.path().join(format!("agent-{n}"));
    let seed = format!("{}:7702", ip(1));
    let _agents = [(1, &reg_url), (2, &reg_url), (3, &nowhere)]
        .iter()
        .map(|(h, reg)| fleet::signed_agent(&ip(*h), &seed, &dir(*h), reg, &keys, &[]))
        .collect::<Result<Vec<_>>>()?;
    let cron = format!("cron {}:9000", ip(5));
    let has_cron = |h: u8| fleet::catalog(&url(h)).is_ok_and(|v| v.contains(&cron));
    poll("the cron host in the synced agents' views", START, || {
        (has_cron(1) && has_cron(2)).then_some(())
    })?;
    poll(
        "the cron host in the view of the agent without a registry",
        START,
        || has_cron(3).then_some(()),
    )?;
    // It came over gossip, from a registry listing: the agent never synced.
    let syncs = "tidings_agent_registry_syncs_total";
    let synced =
        http::metric(&url(3), syncs, "applied")? + http::metric(&url(3), syncs, "warming")?;
    ensure!(synced == 0.0, "agent 3 synced {synced} answers");
    let view: BTreeSet<String> = fleet::catalog(&url(3))?;
    ensure!(view.contains(&cron), "{view:?}");
    Ok(())
}
