//! Chaos: a gossip partition between two groups of agents, made with network namespaces
//! (root only; CI runs as root), that heals and converges (docs/ARCHITECTURE.md#dissemination-and-repair).
//!
//! Six agents, each in its own namespace on a bridge of a private /24 ([`tests::netns::Lab`]);
//! the registry runs in the test's namespace at the bridge address until everyone has synced,
//! then is SIGKILLed so that gossip alone carries changes. nftables rules cut group A (agents
//! 1–3) from group B (4–6). During the cut an endpoint is registered on one side and another
//! deregistered on the other; each side must see only its own change. After the heal every
//! agent must converge on one view holding both changes; the time is printed against the
//! DESIGN target (rows within 3 repair periods of the heal).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use tests::fleet::{self, catalog, lookup, members};
use tests::netns::{GOSSIP_PORT, Lab};
use tests::poll;

const START: Duration = Duration::from_secs(30);
const AGENTS: usize = 6;
const A: [usize; 3] = [1, 2, 3];
const B: [usize; 3] = [4, 5, 6];
/// `repair_interval_ms` of [`fleet::FAST_GOSSIP`].
const REPAIR: Duration = Duration::from_secs(1);

/// Whether the agent at `base` thinks every member at `addrs` is in state `alive`.
fn sees(base: &str, addrs: &[String], alive: bool) -> bool {
    members(base).is_ok_and(|ms| {
        addrs
            .iter()
            .all(|a| ms.iter().any(|m| &m.addr == a && m.alive == alive))
    })
}

fn hosts(base: &str, service: &str) -> Option<BTreeSet<String>> {
    lookup(base, service).ok().map(|l| l.hosts)
}

#[test]
fn a_gossip_partition_heals_and_converges() -> Result<()> {
    let lab = Lab::new('p', AGENTS)?;
    let tmp = tempfile::tempdir()?;
    let reg_url = format!("http://{}:7700", lab.gateway());
    let mut reg = fleet::registry(&format!("{}:7700", lab.gateway()), "10s", "4s")?;
    let gossip = |i: usize| format!("{}:{GOSSIP_PORT}", lab.ip(i));
    let mut agents = Vec::new();
    let seed = gossip(1);
    for i in 1..=AGENTS {
        let extra = fleet::joining(i == 1, &seed, &["--endpoint", "web:8080"]);
        let dir = tmp.path().join(format!("agent-{i}"));
        agents.push(lab.agent(i, &dir, &reg_url, &extra)?);
    }
    let url = |i: usize| agents[i - 1].url();
    let all_web: BTreeSet<String> = (1..=AGENTS)
        .map(|i| format!("{}:8080", lab.ip(i)))
        .collect();
    let everyone: Vec<String> = (1..=AGENTS).map(gossip).collect();
    // The exporter lives on host 6 (group B); it is withdrawn during the partition.
    let exporter: BTreeSet<String> = [format!("{}:9100", lab.ip(6))].into();
    fleet::register(&url(6), r#"{"service": "exporter", "port": 9100}"#)?;
    for i in 1..=AGENTS {
        poll(&format!("agent {i} to see the whole fleet"), START, || {
            let ok = hosts(&url(i), "web")? == all_web
                && hosts(&url(i), "exporter")? == exporter
                && sees(&url(i), &everyone, true);
            ok.then_some(())
        })?;
    }
    // Every agent holds the registry's snapshot of everything (so each side keeps listing
    // the other side's endpoints when SWIM hides their rows); then the registry goes, and
    // gossip alone carries changes.
    for i in 1..=AGENTS {
        poll(
            &format!("agent {i} to sync from the registry"),
            START,
            || {
                let confirmed = |s: &str| lookup(&url(i), s).is_ok_and(|l| l.source == "registry");
                (confirmed("web") && confirmed("exporter")).then_some(())
            },
        )?;
    }
    reg.signal("KILL")?;
    reg.wait_exit(Duration::from_secs(5))?;

    // Cut A from B, and wait until SWIM on each side has declared the other side down.
    lab.partition(&A, &B)?;
    let cut = Instant::now();
    let side = |g: &[usize]| g.iter().map(|&i| gossip(i)).collect::<Vec<_>>();
    let (side_a, side_b) = (side(&A), side(&B));
    for (mine, theirs) in [(&A, &side_b), (&B, &side_a)] {
        for &i in mine.iter() {
            poll(
                &format!("agent {i} to declare the other side down"),
                START,
                || sees(&url(i), theirs, false).then_some(()),
            )?;
        }
    }
    let detected = cut.elapsed();

    // One change on each side.
    let api: BTreeSet<String> = [format!("{}:9200", lab.ip(1))].into();
    fleet::register(&url(1), r#"{"service": "api", "port": 9200}"#)?;
    fleet::deregister(&url(6), "exporter", 9100)?;
    let changed = Instant::now();
    let empty = BTreeSet::new();
    for &i in &A {
        poll(&format!("agent {i} (A) to see the new api"), START, || {
            (hosts(&url(i), "api")? == api).then_some(())
        })?;
    }
    for &i in &B {
        poll(
            &format!("agent {i} (B) to drop the exporter"),
            START,
            || (hosts(&url(i), "exporter")? == empty).then_some(()),
        )?;
    }
    let spread_in_side = changed.elapsed();
    // Each side sees only its own change, for as long as the cut lasts (every poll of a
    // few seconds, several repair periods): A still lists the exporter (B's tombstone
    // cannot reach it; the registry's snapshot keeps it), B has no api and keeps the
    // exporter withdrawn. Web stays whole on
    // both sides: the other side's rows are hidden, the registry's snapshot entries stay.
    let mut polls = 0;
    while changed.elapsed() < spread_in_side + 3 * REPAIR {
        for &i in &A {
            let got = hosts(&url(i), "exporter");
            ensure!(
                got == Some(exporter.clone()),
                "agent {i} (A) lost the exporter during the cut: {got:?}; members: {:?}",
                members(&url(i))
            );
        }
        for &i in &B {
            ensure!(
                hosts(&url(i), "api") == Some(empty.clone()),
                "agent {i} (B) sees the api across the cut"
            );
            ensure!(
                hosts(&url(i), "exporter") == Some(empty.clone()),
                "agent {i} (B) lists the withdrawn exporter again"
            );
        }
        for i in 1..=AGENTS {
            ensure!(
                hosts(&url(i), "web") == Some(all_web.clone()),
                "agent {i} lost web hosts during the cut"
            );
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut_for = cut.elapsed();

    // Heal; every agent converges on one view with both changes.
    lab.heal(&(1..=AGENTS).collect::<Vec<_>>())?;
    let healed = Instant::now();
    let rows = poll("every agent to hold both changes", START, || {
        (1..=AGENTS)
            .all(|i| {
                hosts(&url(i), "api").as_ref() == Some(&api)
                    && hosts(&url(i), "exporter").as_ref() == Some(&empty)
            })
            .then(|| healed.elapsed())
    })
    .map_err(|e| {
        let state: Vec<String> = (1..=AGENTS)
            .map(|i| {
                let alive = members(&url(i))
                    .map(|ms| ms.iter().filter(|m| m.alive).count())
                    .unwrap_or(0);
                format!(
                    "agent {i}: api {:?}, exporter {:?}, {alive} members alive",
                    hosts(&url(i), "api"),
                    hosts(&url(i), "exporter")
                )
            })
            .collect();
        e.context(state.join("; "))
    })?;
    let membership = poll("every agent to see every member alive", START, || {
        (1..=AGENTS)
            .all(|i| sees(&url(i), &everyone, true))
            .then(|| healed.elapsed())
    })?;
    let same = poll("every agent to hold the same whole view", START, || {
        let first = catalog(&url(1)).ok()?;
        let all_same = (2..=AGENTS).all(|i| catalog(&url(i)).ok().as_ref() == Some(&first));
        all_same.then(|| (healed.elapsed(), first.len()))
    })?;
    let target = 3 * REPAIR;
    println!(
        "partition A={A:?} | B={B:?}: SWIM declared the other side down on every agent \
         {detected:.1?} after the cut; each side's change reached its side in \
         {spread_in_side:.1?}; {polls} polls saw each side with only its own change; cut for \
         {cut_for:.1?}"
    );
    println!(
        "after the heal: both changes on every agent in {rows:.1?} (DESIGN target for rows: \
         3 repair periods = {target:?}: {}), every member alive everywhere in \
         {membership:.1?}, identical views ({} entries) in {:.1?}",
        if rows <= target { "met" } else { "MISSED" },
        same.1,
        same.0
    );
    ensure!(
        rows <= target,
        "rows converged {rows:?} after the heal, beyond 3 repair periods ({target:?})"
    );
    Ok(())
}
