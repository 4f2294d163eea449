//! Signed gossip against a member that holds the cluster key but not the registry's trust
//! (issue #17). Three agents gossip with signatures required; the registry certifies their
//! owner keys at check-in and lists a cron-only host no agent owns. A hostile process
//! seals with the cluster key and sends every agent: a foreign `Up` row under another
//! member's address, a tombstone for the cron-only host, a row dated in 2100 for another
//! member's address, and a registry snapshot dated in 2100 — unsigned, signed with its own
//! key, and under a certificate it made itself. No agent's view changes, and every drop is
//! counted by reason.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroU16;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gossip::broadcast::BroadcastItem;
use gossip::crypto::{KeyRing, Sealer};
use gossip::sign::{CertBody, Certificate, SigningKey, sign_row, sign_snapshot};
use gossip::{Row, RowStatus, Snapshot, SnapshotEntry, Version};
use schema::{Endpoint, ServiceName};
use tests::fleet::{self, set};
use tests::{Proc, START, poll};

/// A per-run /24 of loopback, apart from the other suites' ranges.
fn ip(host: u8) -> String {
    let net = 1 + std::process::id() % 100;
    format!("127.202.{net}.{host}")
}

fn gossip_addr(host: u8) -> SocketAddr {
    format!("{}:7702", ip(host))
        .parse()
        .expect("a socket address")
}

fn url(host: u8) -> String {
    format!("http://{}:7701", ip(host))
}

const YEAR_2100_MS: u64 = 4_102_444_800_000;

fn signed_agent(host: u8, dir: &Path, registry: &str, keys: &fleet::SigningKeys) -> Result<Proc> {
    let seed = format!("{}:7702", ip(1));
    let extra = ["--endpoint", "web:8080"];
    fleet::signed_agent(&ip(host), &seed, dir, registry, keys, &extra)
}

fn counter(host: u8, field: &str) -> Result<u64> {
    fleet::gossip_counter(&url(host), field)
}

fn endpoint(service: &str, host: u8, port: u16) -> Result<Endpoint> {
    Ok(Endpoint::new(
        ServiceName::new(service)?,
        ip(host).parse()?,
        NonZeroU16::new(port).context("port")?,
    ))
}

fn up(owner: u8, ep: Endpoint, version: Version) -> Row {
    Row::new(
        gossip_addr(owner),
        ep.key(),
        RowStatus::Up(ep.clone().into()),
        version,
    )
}

/// The four attacks, each unsigned and signed with the hostile member's own key (and, for
/// the tombstone, under a certificate it issued itself).
fn attacks(hostile: &SigningKey, now_ms: u64) -> Result<Vec<Vec<BroadcastItem>>> {
    let sign = |r: &Row| sign_row(hostile, r).context("sign");
    let both = |r: Row| -> Result<Vec<BroadcastItem>> {
        let sig = sign(&r)?;
        Ok(vec![
            BroadcastItem::Row(Box::new(r.clone())),
            BroadcastItem::SignedRow(Box::new(r), sig),
        ])
    };
    let later = Version {
        epoch: now_ms,
        seq: 1_000,
    };
    // 1. A foreign Up row under agent 1's address.
    let foreign = both(up(1, endpoint("web", 1, 9999)?, later))?;
    // 2. A tombstone for the cron-only host, under its own address and agent 2's, and a
    //    certificate it made itself for the cron host's ip.
    let cron = endpoint("cron", 5, 9000)?;
    let tomb = |owner: u8| {
        Row::new(
            gossip_addr(owner),
            cron.key(),
            RowStatus::Deregistered,
            later,
        )
    };
    let self_made = Certificate::issue(
        hostile,
        CertBody {
            owner_key: hostile.public(),
            ip: ip(5).parse()?,
            services: None,
            not_before_ms: 0,
            not_after_ms: YEAR_2100_MS,
        },
    )
    .context("issue")?;
    let mut tombstones = vec![BroadcastItem::Cert(gossip_addr(5), Box::new(self_made))];
    tombstones.extend(both(tomb(5))?);
    tombstones.extend(both(tomb(2))?);
    // 3. A far-future epoch for agent 3's address.
    let future = Version {
        epoch: YEAR_2100_MS,
        seq: 1,
    };
    let epoch = both(up(3, endpoint("web", 3, 8080)?, future))?;
    // 4. A registry snapshot dated 2100 listing a rogue host for the cron service.
    let snap = Snapshot {
        service: ServiceName::new("cron")?,
        generated_at_ms: YEAR_2100_MS,
        entries: vec![SnapshotEntry {
            endpoint: std::sync::Arc::new(endpoint("cron", 9, 6666)?),
            last_check_in_ms: YEAR_2100_MS,
        }],
    };
    let sig = sign_snapshot(hostile, &snap).context("sign snapshot")?;
    let snapshot = vec![
        BroadcastItem::Snapshot(snap.clone()),
        BroadcastItem::SignedSnapshot(snap, sig),
    ];
    Ok(vec![foreign, tombstones, epoch, snapshot])
}

fn views() -> Result<Vec<BTreeSet<String>>> {
    [1, 2, 3].iter().map(|h| fleet::catalog(&url(*h))).collect()
}

#[test]
fn a_member_without_the_registrys_trust_changes_no_view() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let keys = fleet::SigningKeys::create(tmp.path())?;
    let key = std::fs::read_to_string(&keys.cluster)?;
    let reg_addr = format!("{}:7700", ip(100));
    let reg_url = format!("http://{reg_addr}");
    let _reg = keys.registry(&reg_addr)?;
    // A cron-only host: listed by the registry, owned by no agent.
    fleet::registry_check_in(&reg_url, &ip(5), &[("cron".to_string(), 9000)])?;

    let dir = |n: u8| tmp.path().join(format!("agent-{n}"));
    let _agents = [1, 2, 3]
        .iter()
        .map(|h| signed_agent(*h, &dir(*h), &reg_url, &keys))
        .collect::<Result<Vec<_>>>()?;
    let web: BTreeSet<String> = set(&[1, 2, 3].map(|h| format!("{}:8080", ip(h))));
    let cron = format!("cron {}:9000", ip(5));
    // Signatures are required, so web on all three hosts in every view means every agent
    // was certified and its rows checked.
    let before = poll(
        "three signed agents and the cron host in every view",
        START,
        || {
            let views = views().ok()?;
            let ok = views.iter().all(|v| {
                let hosts: BTreeSet<String> = v
                    .iter()
                    .filter_map(|e| e.strip_prefix("web ").map(str::to_string))
                    .collect();
                hosts == web && v.contains(&cron)
            });
            ok.then_some(views)
        },
    )?;
    ensure!(
        before[0] == before[1] && before[1] == before[2],
        "views differ: {before:?}"
    );

    let ring = KeyRing::parse(&[key.trim()])?;
    let sealer = Sealer::new("tidings", Some(&ring));
    let hostile = SigningKey::generate();
    let sock = UdpSocket::bind(format!("{}:7702", ip(9)))?;
    let base = |h: u8, f: &str| counter(h, f).unwrap_or(0);
    let start: Vec<(u64, u64)> = [1, 2, 3]
        .iter()
        .map(|h| {
            (
                base(*h, "rejected_bad_signature"),
                base(*h, "rejected_bad_certificate"),
            )
        })
        .collect();
    let now_ms = schema::timefmt::unix_ms_now();
    for packet in attacks(&hostile, now_ms)? {
        let plain = gossip::spread::rows_packet(&packet).context("packet too big")?;
        let sealed = sealer.seal(&plain, &mut rand::rng());
        for h in [1, 2, 3] {
            sock.send_to(&sealed, gossip_addr(h))?;
        }
    }
    // Every agent took in the packets (its refusals moved): the foreign row, the far-future
    // row and the snapshot, signed with the wrong key (3); the self-made certificate.
    poll(
        "every forgery refused and counted",
        Duration::from_secs(10),
        || {
            [1u8, 2, 3]
                .iter()
                .zip(&start)
                .all(|(h, (sig, cert))| {
                    counter(*h, "rejected_bad_signature").is_ok_and(|n| n >= sig + 3)
                        && counter(*h, "rejected_bad_certificate").is_ok_and(|n| n > *cert)
                })
                .then_some(())
        },
    )?;
    // A barrier: an honest change made after the attack reaches every view, so each view
    // has been republished since the forgeries arrived. It must be the only change.
    fleet::register(&url(2), r#"{"service":"probe","port":7000}"#)?;
    let probe = format!("probe {}:7000", ip(2));
    let after = poll("the honest change in every view", START, || {
        let v = views().ok()?;
        v.iter().all(|v| v.contains(&probe)).then_some(v)
    })?;
    for (h, view) in after.iter().enumerate() {
        let mut expected = before[h].clone();
        expected.insert(probe.clone());
        ensure!(
            *view == expected,
            "agent {}'s view changed: {:?} -> {view:?}",
            h + 1,
            before[h]
        );
    }
    for h in [1, 2, 3] {
        ensure!(
            counter(h, "rejected_unsigned")? >= 5,
            "unsigned forgeries not counted on {h}"
        );
    }
    Ok(())
}
