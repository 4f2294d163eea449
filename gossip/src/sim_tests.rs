use std::num::NonZeroU16;

use schema::{Endpoint, ServiceName};

use super::*;

#[test]
fn small_cluster_converges() {
    let r = simulate(SimConfig {
        nodes: 20,
        seed: 7,
        warmup_ms: 10_000,
        steady_ms: 5_000,
        ..Default::default()
    });
    println!("{r}");
    assert!(r.secs_to_all.is_some(), "{r}");
    assert!(r.secs_dead_hidden.is_some(), "{r}");
    assert_eq!(r.false_down_verdicts, 0, "{r}");
    assert_eq!(r.node_drops, 0, "{r}");
}

#[test]
fn hostile_settings_are_clamped_not_a_panic() {
    let r = simulate(SimConfig {
        nodes: 0,
        loss: f64::NAN,
        min_delay_ms: u64::MAX,
        max_delay_ms: 0,
        probe_period_ms: 0,
        gossip_interval_ms: 0,
        repair_interval_ms: u64::MAX,
        warmup_ms: 1_000,
        steady_ms: 0,
        phase_timeout_ms: 1_000,
        ..Default::default()
    });
    assert_eq!(r.nodes, 2);
}

/// Rounds an infection with fan-out `f` needs to reach `n` nodes when nothing is lost:
/// ⌈log_(f+1) n⌉ to reach them all with every hop doubling up, plus ⌈ln n / f⌉ for the tail
/// (docs/OPERATING.md#benchmarks, the "clearly beats serf" target: 8 rounds at N = 1 000, where serf's
/// model needs 11 without loss and 15 at 25 % loss).
fn epidemic_rounds(n: usize) -> u64 {
    let (n, f) = (n as f64, crate::spread::FANOUT as f64);
    (n.ln() / (f + 1.0).ln()).ceil() as u64 + (n.ln() / f).ceil() as u64
}

#[test]
fn hundred_nodes_with_loss_and_a_healing_partition() {
    let r = simulate(SimConfig {
        nodes: 120,
        loss: 0.10,
        seed: 42,
        partition_ms: 15_000,
        ..Default::default()
    });
    println!("{r}");
    assert!(
        r.rounds_to_9999.is_some_and(|x| x <= epidemic_rounds(120)),
        "{r}"
    );
    assert!(r.secs_dead_hidden.is_some_and(|s| s <= 20.0), "{r}");
    assert_eq!((r.false_down_verdicts, r.rejoins), (0, 0), "{r}");
    assert!(r.steady_bytes_per_node_sec <= 1024.0, "{r}");
    assert!(
        r.secs_partition_members_healed.is_some_and(|s| s <= 30.0),
        "{r}"
    );
    // Repair (every 5 s) must converge the halves within 3 periods of the heal.
    assert!(r.secs_partition_converged.is_some_and(|s| s <= 15.0), "{r}");
    assert_eq!(r.node_drops, 0, "{r}");
}

/// Under heavy loss the epidemic alone reaches every node, well within the model bound:
/// repair runs once a minute here, so it cannot be what closes the tail.
#[test]
fn quarter_loss_the_epidemic_alone_reaches_everyone() {
    let r = simulate(SimConfig {
        nodes: 200,
        loss: 0.25,
        seed: 3,
        warmup_ms: 10_000,
        steady_ms: 2_000,
        repair_interval_ms: 60_000,
        phase_timeout_ms: 30_000,
        ..Default::default()
    });
    println!("{r}");
    assert!(
        r.rounds_to_9999.is_some_and(|x| x <= epidemic_rounds(200)),
        "{r}"
    );
    assert!(r.secs_to_all.is_some_and(|s| s <= 2.0), "{r}");
    assert_eq!(r.reached_by_repair, 0, "{r}");
    // Indirect probes scale with the loss, so no healthy member is declared down, nor
    // told so.
    assert_eq!((r.false_down_verdicts, r.rejoins), (0, 0), "{r}");
    assert!(r.mean_indirect_probes > 10.0, "{r}");
    assert!(r.secs_dead_hidden.is_some_and(|s| s <= 20.0), "{r}");
    assert_eq!(r.node_drops, 0, "{r}");
}

/// The bandwidth budget holds under 10 % loss too: suspicions, each gossiped to the
/// whole cluster, stay rare because the indirect probe count follows the loss.
#[test]
fn ten_percent_loss_stays_within_a_kilobyte_per_node() {
    let r = simulate(SimConfig {
        nodes: 200,
        loss: 0.10,
        seed: 8,
        warmup_ms: 20_000,
        steady_ms: 10_000,
        phase_timeout_ms: 30_000,
        ..Default::default()
    });
    println!("{r}");
    assert!(r.steady_bytes_per_node_sec <= 1024.0, "{r}");
    assert_eq!((r.false_down_verdicts, r.rejoins), (0, 0), "{r}");
    assert!(r.mean_indirect_probes > 3.0, "{r}");
    assert!(
        r.rounds_to_9999.is_some_and(|x| x <= epidemic_rounds(200)),
        "{r}"
    );
}

#[test]
fn steady_state_bandwidth_is_flat_in_cluster_size() {
    let quick = |nodes| SimConfig {
        nodes,
        seed: 11,
        warmup_ms: 15_000,
        steady_ms: 10_000,
        phase_timeout_ms: 30_000,
        ..Default::default()
    };
    let small = simulate(quick(40));
    let big = simulate(quick(120));
    println!("{small}\n{big}");
    for r in [&small, &big] {
        assert!(r.steady_bytes_per_node_sec <= 1024.0, "{r}");
        assert_eq!(r.false_down_verdicts, 0, "{r}");
    }
    let ratio = big.steady_bytes_per_node_sec / small.steady_bytes_per_node_sec;
    assert!((0.67..1.5).contains(&ratio), "not flat: {ratio:.2}");
}

#[test]
fn snapshots_and_tombstones_reach_everyone() {
    let mut sim = Sim::new(SimConfig {
        nodes: 12,
        seed: 5,
        encrypt: true,
        ..Default::default()
    });
    let roster: Vec<_> = sim.nodes.iter().map(Node::id).collect();
    for i in 0..12 {
        sim.nodes[i].assume_members(0, roster.iter().copied());
        sim.nodes[i].start(0);
        sim.nodes[i].publish_local(0, vec![endpoint_of(i, 8080)]);
        sim.flush(i);
    }
    sim.run_until(5_000);
    // A registry snapshot too big for a broadcast (it travels by repair only) and a small one.
    let big_service = ServiceName::new("big").unwrap();
    let entries = (1..200u16)
        .map(|p| crate::SnapshotEntry {
            endpoint: Endpoint::new(
                big_service.clone(),
                "10.8.0.1".parse().unwrap(),
                NonZeroU16::new(p).unwrap(),
            )
            .into(),
            last_check_in_ms: 1,
        })
        .collect();
    let big = crate::Snapshot {
        service: big_service,
        generated_at_ms: 10,
        entries,
    };
    let small_ep = Endpoint::new(
        ServiceName::new("cron").unwrap(),
        "10.8.0.2".parse().unwrap(),
        NonZeroU16::new(80).unwrap(),
    );
    let small = crate::Snapshot {
        service: small_ep.service.clone(),
        generated_at_ms: 10,
        entries: vec![crate::SnapshotEntry {
            endpoint: small_ep.clone().into(),
            last_check_in_ms: 9,
        }],
    };
    sim.nodes[0].apply_registry_snapshot(sim.now, big);
    sim.nodes[0].apply_registry_snapshot(sim.now, small);
    sim.flush(0);
    // Node 3 deregisters its endpoint: a tombstone.
    sim.publish(3, vec![]);
    let gone = endpoint_of(3, 8080);
    let done = sim.run_until_cond(100, 30_000, |s| {
        s.nodes.iter().all(|n| {
            let view = n.visible_endpoints();
            view.len() == 11 + 199 + 1
                && !view.iter().any(|e| *e.endpoint == gone)
                && view.iter().any(|e| *e.endpoint == small_ep)
        })
    });
    assert!(done.is_some(), "snapshots and tombstone did not converge");
    assert_eq!(
        sim.nodes
            .iter()
            .map(|n| n.metrics().snapshot().dropped_total())
            .sum::<u64>(),
        0
    );
}

/// Every node knows the roster, starts and publishes one endpoint.
fn bootstrap(sim: &mut Sim) {
    let roster: Vec<_> = sim.nodes.iter().map(Node::id).collect();
    for i in 0..sim.nodes.len() {
        sim.nodes[i].assume_members(0, roster.iter().copied());
        sim.nodes[i].start(0);
        sim.nodes[i].publish_local(0, vec![endpoint_of(i, 8080)]);
        sim.flush(i);
    }
}

/// The cluster's key ring, as node 0 was given it.
fn ring(sim: &Sim) -> Option<KeyRing> {
    let keys = &sim.nodes[0].cfg.keys;
    (!keys.is_empty()).then(|| KeyRing::parse(keys).unwrap())
}

/// Replaces node `i` by a new process with `epoch` (after a crash: it left nothing behind
/// but what peers remember). It finds the cluster through its seed, as an agent does.
fn restart(sim: &mut Sim, i: usize, epoch: u64, endpoints: Vec<Endpoint>) {
    // Timers and traffic addressed to the dead process must not reach the new one.
    sim.events.retain(|_, ev| match ev {
        Event::Timer { node, .. } | Event::Fetch { node, .. } => *node != i,
        Event::Packet { to, .. } | Event::Frame { to, .. } => *to != i,
    });
    sim.nodes[i] = node_of(&sim.cfg, ring(sim).as_ref(), i, epoch, 1);
    sim.alive[i] = true;
    let now = sim.now;
    sim.nodes[i].start(now);
    sim.nodes[i].publish_local(now, endpoints);
    sim.flush(i);
}

/// A start after the wall clock was stepped back an hour still takes a larger epoch (the
/// last one is persisted), so peers take the restarted agent's identity and rows at once
/// instead of ignoring them as leftovers of its previous process.
#[test]
fn a_member_restarted_with_its_clock_stepped_back_an_hour_is_accepted_by_its_peers() {
    const WALL_MS: u64 = 1_780_000_000_000;
    const HOUR_MS: u64 = 3_600_000;
    let dir = tempfile::tempdir().unwrap();
    let mut sim = Sim::new(SimConfig {
        nodes: 8,
        seed: 13,
        ..Default::default()
    });
    let victim = 3;
    // The victim's epochs come from its wall clock (sim time + WALL_MS) and its data dir.
    let wall = |sim: &Sim| WALL_MS + sim.now;
    let first = crate::epoch::next_epoch(dir.path(), wall(&sim)).unwrap();
    sim.nodes[victim] = node_of(&sim.cfg, ring(&sim).as_ref(), victim, first, 0);
    bootstrap(&mut sim);
    let old = endpoint_of(victim, 8080).key();
    let everyone_sees = |s: &Sim, key: &EndpointKey| {
        (0..s.nodes.len())
            .filter(|&i| i != victim)
            .all(|i| s.nodes[i].sees_row(&addr_of(victim), key))
    };
    assert!(
        sim.run_until_cond(100, 10_000, |s| everyone_sees(s, &old))
            .is_some()
    );

    sim.alive[victim] = false;
    sim.run_until(sim.now + 1_000);
    let second = crate::epoch::next_epoch(dir.path(), wall(&sim) - HOUR_MS).unwrap();
    assert!(second > first, "epoch {second} after {first}");
    let fresh = endpoint_of(victim, 9191);
    restart(&mut sim, victim, second, vec![fresh.clone()]);
    let took = sim.run_until_cond(100, 10_000, |s| {
        everyone_sees(s, &fresh.key())
            && (0..s.nodes.len()).all(|i| !s.nodes[i].sees_row(&addr_of(victim), &old))
    });
    assert!(
        took.is_some(),
        "peers ignored the restarted member's rows (epoch {second}, previous {first})"
    );
    // SWIM too: every peer replaces the old identity by the new one.
    let swim_took = sim.run_until_cond(100, 10_000, |s| {
        (0..s.nodes.len()).filter(|&i| i != victim).all(|i| {
            s.nodes[i]
                .members()
                .iter()
                .any(|m| m.id.addr == addr_of(victim) && m.id.epoch == second && m.active)
        })
    });
    assert!(
        swim_took.is_some(),
        "peers kept the old identity of the restarted member"
    );
}

fn registry_snapshot(service: &str, at: u64, port: u16) -> crate::Snapshot {
    let ep = Endpoint::new(
        ServiceName::new(service).unwrap(),
        "10.9.0.1".parse().unwrap(),
        NonZeroU16::new(port).unwrap(),
    );
    crate::Snapshot {
        service: ep.service.clone(),
        generated_at_ms: at,
        entries: vec![crate::SnapshotEntry {
            endpoint: ep.into(),
            last_check_in_ms: at,
        }],
    }
}

/// Whether every node lists exactly `port` for the `cron` service, from the registry.
fn all_list(sim: &Sim, port: u16) -> bool {
    sim.nodes.iter().all(|n| {
        let ports: Vec<u16> = n
            .visible_endpoints()
            .iter()
            .filter(|e| e.endpoint.service.as_str() == "cron")
            .map(|e| e.endpoint.port.get())
            .collect();
        ports == [port]
    })
}

/// Registry replicas whose clocks run ahead: one 20 s ahead (within the skew bound) and
/// then back, one an hour ahead and then back. Neither may freeze any node's registry data
/// beyond the next honest answer: that answer wins everywhere as soon as gossip carries it.
#[test]
fn registry_replicas_running_ahead_never_freeze_the_views() {
    let mut sim = Sim::new(SimConfig {
        nodes: 6,
        seed: 21,
        ..Default::default()
    });
    bootstrap(&mut sim);
    sim.run_until(60_000);
    // Agent 0 syncs from a replica 20 s ahead; everyone learns its answer.
    sim.nodes[0].apply_registry_snapshot(sim.now, registry_snapshot("cron", sim.now + 20_000, 1));
    sim.flush(0);
    assert!(sim.run_until_cond(50, 5_000, |s| all_list(s, 1)).is_some());
    // The replica is back on time; agent 2's next sync reads an honest answer dated now,
    // older than what everyone holds. It still wins, within a few gossip hops.
    sim.nodes[2].apply_registry_snapshot(sim.now, registry_snapshot("cron", sim.now, 2));
    sim.flush(2);
    let took = sim.run_until_cond(50, 5_000, |s| all_list(s, 2));
    assert!(took.is_some_and(|ms| ms <= 1_000), "took {took:?}");

    // Agent 1 reads a replica an hour ahead: refused and counted, nothing changes.
    let hour_ahead = registry_snapshot("cron", sim.now + 3_600_000, 3);
    sim.nodes[1].apply_registry_snapshot(sim.now, hour_ahead);
    sim.flush(1);
    sim.run_until(sim.now + 2_000);
    assert!(all_list(&sim, 2));
    assert_eq!(
        sim.nodes[1].metrics().snapshot().snapshots_refused_future,
        1
    );
    // Its next sync reaches an honest replica: that answer wins at once everywhere.
    sim.nodes[1].apply_registry_snapshot(sim.now, registry_snapshot("cron", sim.now, 4));
    sim.flush(1);
    let took = sim.run_until_cond(50, 5_000, |s| all_list(s, 4));
    assert!(took.is_some_and(|ms| ms <= 1_000), "took {took:?}");
}

/// The registry snapshot of service `svc-5` listing node 5's endpoint again, dated `at`.
fn relisted(at: u64) -> crate::Snapshot {
    let ep = endpoint_of(5, 8080);
    crate::Snapshot {
        service: ep.service.clone(),
        generated_at_ms: at,
        entries: vec![crate::SnapshotEntry {
            endpoint: ep.into(),
            last_check_in_ms: at,
        }],
    }
}

/// Campaign seed 9294334021625524411: an agent deregisters (its tombstone reaches everyone),
/// re-registers while partitioned from half the cluster, and the registry lists it again.
/// When the partition heals, the far half sees the owner alive while it still holds only
/// the old tombstone: that tombstone must not hide the registry's newer entry until the
/// owner's current rows arrive. The host is live throughout, so no node may drop it.
#[test]
fn a_stale_tombstone_of_a_returning_owner_never_hides_the_registry_entry() {
    let mut sim = Sim::new(SimConfig {
        nodes: 6,
        seed: 33,
        frame_extra_delay_ms: 400,
        // Repair is rare here, so the tombstone is not collected during the partition and
        // the owner's new row comes back by repair only long after SWIM sees it alive.
        repair_interval_ms: 20_000,
        ..Default::default()
    });
    bootstrap(&mut sim);
    sim.run_until(20_000);
    let ep = endpoint_of(5, 8080);
    let lists = |n: &Node| n.visible_endpoints().iter().any(|e| *e.endpoint == ep);
    // Deregistered: everyone drops it.
    sim.publish(5, vec![]);
    let gone = sim.run_until_cond(50, 10_000, |s| s.nodes.iter().all(|n| !lists(n)));
    assert!(gone.is_some(), "the tombstone did not spread");
    // Nodes 0..3 are cut off from 3..6 until SWIM declares the other half down.
    sim.partition = Some(3);
    sim.run_until(sim.now + 12_000);
    assert!(!sim.nodes[0].owner_alive(&addr_of(5)), "partition not seen");
    assert!(
        (0..3).all(|i| sim.nodes[i].deregistered_keys().contains(&ep.key())),
        "the far half must still hold the tombstone for this test to mean anything"
    );
    // Node 5 registers again; the registry lists it and the near-registry half learns it.
    sim.publish(5, vec![ep.clone()]);
    let snap = relisted(sim.now);
    sim.nodes[0].apply_registry_snapshot(sim.now, snap);
    sim.flush(0);
    let relisted_far = sim.run_until_cond(50, 10_000, |s| (0..3).all(|i| lists(&s.nodes[i])));
    assert!(relisted_far.is_some(), "the registry entry did not spread");
    // Heal. From now on every node of the far half lists the host at every instant, and the
    // owner's own row reaches them all.
    sim.partition = None;
    let heal = sim.now;
    let mut back = None;
    while sim.now < heal + 40_000 {
        sim.run_until(sim.now + 20);
        for i in 0..3 {
            assert!(
                lists(&sim.nodes[i]),
                "node {i} lost the live host {} ms after the heal (owner alive: {})",
                sim.now - heal,
                sim.nodes[i].owner_alive(&addr_of(5))
            );
        }
        if back.is_none() && (0..6).all(|i| sim.nodes[i].sees_row(&addr_of(5), &ep.key())) {
            back = Some(sim.now - heal);
        }
    }
    assert!(back.is_some(), "the owner's row never reached everyone");
}

/// The other side of the same wait: the tombstone we hold is the owner's current word and
/// only a stale registry listing shows the host (the registry never got the delete). When
/// the owner comes back, one digest exchange settles it: the host is hidden again within
/// a moment, long before the bound of two repair intervals.
#[test]
fn a_returning_owner_in_step_with_us_has_its_tombstones_count_at_once() {
    let mut sim = Sim::new(SimConfig {
        nodes: 6,
        seed: 34,
        frame_extra_delay_ms: 400,
        repair_interval_ms: 20_000,
        ..Default::default()
    });
    bootstrap(&mut sim);
    sim.run_until(20_000);
    let ep = endpoint_of(5, 8080);
    let lists = |n: &Node| n.visible_endpoints().iter().any(|e| *e.endpoint == ep);
    // The registry's stale listing (it missed the delete) reaches everyone first.
    sim.nodes[0].apply_registry_snapshot(sim.now, relisted(sim.now));
    sim.flush(0);
    sim.run_until(sim.now + 2_000);
    sim.publish(5, vec![]);
    let gone = sim.run_until_cond(50, 10_000, |s| s.nodes.iter().all(|n| !lists(n)));
    assert!(gone.is_some(), "the tombstone did not spread");
    sim.partition = Some(3);
    sim.run_until(sim.now + 12_000);
    assert!(!sim.nodes[0].owner_alive(&addr_of(5)), "partition not seen");
    sim.partition = None;
    let seen = sim.run_until_cond(10, 30_000, |s| {
        (0..3).all(|i| s.nodes[i].owner_alive(&addr_of(5)))
    });
    assert!(seen.is_some(), "the owner never came back");
    let hidden = sim.run_until_cond(10, 40_000, |s| (0..6).all(|i| !lists(&s.nodes[i])));
    assert!(
        hidden.is_some_and(|ms| ms <= 2_000),
        "the current tombstone took {hidden:?} ms to count again"
    );
}
