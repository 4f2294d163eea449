//! Rolling a running fleet from unsigned to signed gossip (issue #17) loses no view. Three
//! agents start mixed — one with signing off (as an agent from before signing), two with
//! `accept` — then roll one at a time to `accept` and on to `require`. At every step an
//! endpoint is registered on some agent and must reach every view, and none learned before
//! may go. The registry is up during the roll (agents need it for certificates), so views
//! are fed by it and by gossip; once every agent requires signatures the registry is
//! stopped and a last endpoint must reach every view through signed gossip alone.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tests::fleet::{self, register};
use tests::{Proc, START, poll};

/// A per-run /24 of loopback, apart from the other suites' ranges.
fn ip(host: u8) -> String {
    let net = 1 + std::process::id() % 100;
    format!("127.203.{net}.{host}")
}

fn url(host: u8) -> String {
    format!("http://{}:7701", ip(host))
}

struct Fleet {
    registry: String,
    key: PathBuf,
    pubkey: PathBuf,
    dir: PathBuf,
}

impl Fleet {
    fn agent(&self, host: u8, mode: &str) -> Result<Proc> {
        let seed = format!("{}:7702", ip(1));
        let pubkey = self.pubkey.display().to_string();
        let mut extra = vec![
            "--endpoint",
            "web:8080",
            "--keep-registered",
            "--gossip-signing",
            mode,
        ];
        if mode != "off" {
            extra.extend_from_slice(&["--registry-key-file", &pubkey]);
        }
        if host != 1 {
            extra.extend_from_slice(&["--join", &seed]);
        }
        let dir = self.dir.join(format!("agent-{host}"));
        fleet::keyed_agent(&ip(host), &dir, &self.registry, &self.key, &extra)
    }
}

fn restart(fleet: &Fleet, agents: &mut [Proc], host: u8, mode: &str) -> Result<()> {
    let i = usize::from(host - 1);
    agents[i].signal("TERM")?;
    agents[i].wait_exit(Duration::from_secs(20))?;
    agents[i] = fleet.agent(host, mode)?;
    Ok(())
}

/// Registers `probe-<n>` on `host` and waits until every view holds it and all of `held`.
fn spread(host: u8, n: u16, held: &mut BTreeSet<String>) -> Result<()> {
    register(
        &url(host),
        &format!(r#"{{"service":"probe-{n}","port":{}}}"#, 7000 + n),
    )?;
    held.insert(format!("probe-{n} {}:{}", ip(host), 7000 + n));
    poll(
        &format!("probe-{n} and everything before it in every view"),
        START,
        || {
            [1, 2, 3]
                .iter()
                .all(|h| fleet::catalog(&url(*h)).is_ok_and(|v| v.is_superset(held)))
                .then_some(())
        },
    )
    .with_context(|| {
        let missing: Vec<_> = [1, 2, 3]
            .iter()
            .map(|h| match fleet::catalog(&url(*h)) {
                Ok(v) => format!(
                    "agent {h} lacks {:?}",
                    held.difference(&v).collect::<Vec<_>>()
                ),
                Err(e) => format!("agent {h}: {e}"),
            })
            .collect();
        missing.join("; ")
    })
}

#[test]
fn a_fleet_rolls_from_unsigned_to_required_signatures_without_losing_view() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let keys = fleet::SigningKeys::create(tmp.path())?;
    let reg_addr = format!("{}:7700", ip(100));
    let reg = keys.registry(&reg_addr)?;
    let fleet = Fleet {
        registry: format!("http://{reg_addr}"),
        key: keys.cluster,
        pubkey: keys.registry_public,
        dir: tmp.path().to_path_buf(),
    };
    let mut agents = vec![
        fleet.agent(1, "off")?,
        fleet.agent(2, "accept")?,
        fleet.agent(3, "accept")?,
    ];
    let mut held: BTreeSet<String> = [1, 2, 3]
        .iter()
        .map(|h| format!("web {}:8080", ip(*h)))
        .collect();
    // Mixed: unsigned rows from the off agent, signed (and unsigned copies) from the others.
    spread(1, 1, &mut held)?;
    spread(2, 2, &mut held)?;
    // Everyone to accept, then one at a time to require; an accept agent's rows must reach
    // the require ones.
    restart(&fleet, &mut agents, 1, "accept")?;
    spread(1, 3, &mut held)?;
    restart(&fleet, &mut agents, 2, "require")?;
    spread(3, 4, &mut held)?;
    spread(2, 5, &mut held)?;
    restart(&fleet, &mut agents, 3, "require")?;
    restart(&fleet, &mut agents, 1, "require")?;
    spread(1, 6, &mut held)?;
    spread(3, 7, &mut held)?;
    // With the registry gone, only signed gossip can carry a new endpoint.
    drop(reg);
    spread(2, 8, &mut held)?;
    Ok(())
}
