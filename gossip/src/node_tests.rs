use super::*;
use crate::crypto::SEAL_OVERHEAD;

#[test]
fn foca_config_scales_with_cluster_and_period() {
    let cfg = GossipConfig {
        insecure: true,
        ..Default::default()
    };
    let small = foca_config(&cfg, 10, 3);
    let big = foca_config(&cfg, 1000, 8);
    assert!(big.max_transmissions > small.max_transmissions);
    assert!(big.suspect_to_down_after > small.suspect_to_down_after);
    assert_eq!(big.num_indirect_probes.get(), 8);
    assert_eq!(big.max_packet_size.get() + SEAL_OVERHEAD + 1, MAX_DATAGRAM);
    let fast = foca_config(
        &GossipConfig::for_tests("127.0.0.1:1".parse().unwrap()),
        10,
        3,
    );
    assert!(fast.suspect_to_down_after < small.suspect_to_down_after);
}

fn node(epoch: u64) -> Node {
    Node::new(
        GossipConfig::for_tests("127.0.0.1:7702".parse().unwrap()),
        epoch,
        1,
    )
    .unwrap()
}

fn ep(port: u16) -> Endpoint {
    let service = schema::ServiceName::new("web").unwrap();
    Endpoint::new(
        service,
        "10.0.0.1".parse().unwrap(),
        std::num::NonZeroU16::new(port).unwrap(),
    )
}

fn own_versions(n: &Node) -> Vec<Version> {
    n.store
        .rows
        .owner_rows(&n.id().addr)
        .iter()
        .map(Row::version)
        .collect()
}

proptest::proptest! {
    /// Whatever a process published, its successor (started later, so with a larger
    /// epoch) only writes strictly larger versions, and `seq` grows by one per change.
    #[test]
    fn versions_are_never_reused_across_restarts(
        first in proptest::collection::vec(proptest::collection::btree_set(1u16..6, 0..4), 1..6),
        second in proptest::collection::vec(proptest::collection::btree_set(1u16..6, 0..4), 1..6),
        epoch in 1u64..1_000_000,
        gap in 1u64..1_000,
    ) {
        let mut a = node(epoch);
        let mut seen = Vec::new();
        for set in &first {
            a.publish_local(0, set.iter().map(|p| ep(*p)).collect());
            seen.extend(own_versions(&a));
        }
        let max_first = seen.iter().copied().max().unwrap_or_default();
        proptest::prop_assert!(a.local_version().seq as usize <= first.iter().map(|s| s.len()).sum::<usize>() * 2);
        let mut b = node(epoch + gap);
        for set in &second {
            b.publish_local(0, set.iter().map(|p| ep(*p)).collect());
            for v in own_versions(&b) {
                proptest::prop_assert!(v > max_first);
            }
        }
    }
}

#[test]
fn hostile_packets_and_frames_are_dropped_and_counted() {
    let ring = KeyRing::parse(&[crate::generate_key()]).unwrap();
    let cfg = GossipConfig {
        keys: vec![ring.primary.to_base64()],
        insecure: false,
        ..GossipConfig::for_tests("127.0.0.1:1".parse().unwrap())
    };
    let mut n = Node::new(cfg, 1, 1).unwrap();
    let from: SocketAddr = "127.0.0.1:2".parse().unwrap();
    n.handle_packet(0, from, &[]);
    n.handle_packet(0, from, &[1, 2, 3]);
    n.handle_packet(0, from, &[9u8; 200]);
    n.handle_packet(0, from, &vec![0u8; MAX_DATAGRAM + 1]);
    // Sealed with the right key but garbage inside.
    let mut rng = StdRng::seed_from_u64(9);
    let sealer = Sealer::new("tidings", Some(&ring));
    n.handle_packet(0, from, &sealer.seal(&[0, 0xff, 0xff, 1], &mut rng));
    n.handle_packet(0, from, &sealer.seal(&[1, 1, 2, 3], &mut rng));
    n.handle_packet(0, from, &sealer.seal(&[7], &mut rng));
    assert_eq!(n.handle_repair_frame(0, &[5u8; 100]), None);
    assert_eq!(
        n.handle_repair_frame(0, &sealer.seal(b"nonsense", &mut rng)),
        None
    );
    let m = n.metrics().snapshot();
    assert_eq!(m.dropped_truncated, 2, "{m}");
    // Repair frames reach the node already opened (the runtime authenticates them), so
    // both bad frames count as malformed.
    assert_eq!(m.dropped_unknown_key, 1, "{m}");
    assert_eq!(m.dropped_oversize, 1, "{m}");
    assert_eq!(m.dropped_malformed, 5, "{m}");
    assert!(n.take_effects().is_empty());
}

/// Delivers `node`'s timers in order up to `until` (ms); returns every datagram it sent.
fn run_timers(
    node: &mut Node,
    timers: &mut Vec<(u64, Timer)>,
    now: &mut u64,
    until: u64,
) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut sent = Vec::new();
    loop {
        for effect in node.take_effects() {
            match effect {
                Effect::Schedule { after, timer } => {
                    timers.push((*now + after.as_millis() as u64, timer));
                }
                Effect::Send { to, packet } => sent.push((to, packet)),
                Effect::Repair { .. } => {}
            }
        }
        let Some(next) = timers
            .iter()
            .enumerate()
            .filter(|(_, (at, _))| *at <= until)
            .min_by_key(|(_, (at, _))| *at)
            .map(|(i, _)| i)
        else {
            *now = until;
            return sent;
        };
        let (at, timer) = timers.swap_remove(next);
        *now = at;
        node.handle_timer(at, timer);
    }
}

/// foca 2.0.0 sends "you are down" (TurnUndead) at the end of every suspicion, even one the
/// member refuted; the member would then renew its identity and miss gossip addressed to the
/// old one. The node must drop that message and keep the member.
#[test]
fn a_refuted_suspicion_does_not_tell_the_member_it_is_down() {
    let peer = NodeId::new("127.0.0.1:7703".parse().unwrap(), 5);
    let mut n = node(1);
    n.assume_members(0, [peer]);
    n.start(0);
    let (mut timers, mut now) = (Vec::new(), 0);
    // The peer answers nothing, so a probe fails and the peer becomes suspect.
    let mut suspicion = None;
    for step in 1..=20 {
        run_timers(&mut n, &mut timers, &mut now, step * 100);
        suspicion = timers.iter().find_map(|(at, t)| match t {
            Timer::Swim(foca::Timer::ChangeSuspectToDown { member_id, .. })
                if *member_id == peer =>
            {
                Some(*at)
            }
            _ => None,
        });
        if suspicion.is_some() {
            break;
        }
    }
    let due = suspicion.expect("the silent peer was never suspected");
    // The peer refutes: any message from it with a higher incarnation.
    let header = foca::Header {
        src: peer,
        src_incarnation: 1,
        dst: n.id(),
        message: foca::Message::Gossip,
    };
    let mut plain = vec![PacketKind::Swim as u8];
    foca::Codec::encode_header(&mut FocaCodec::default(), &header, &mut plain).unwrap();
    plain.extend_from_slice(&0u16.to_be_bytes());
    let packet = Sealer::new("tidings", None).seal(&plain, &mut StdRng::seed_from_u64(1));
    n.handle_packet(now, peer.addr, &packet);
    assert!(n.is_member_active(&peer.addr));
    let sent = run_timers(&mut n, &mut timers, &mut now, due);
    let told_down = sent.iter().any(|(to, packet)| {
        let body = Sealer::new("tidings", None).open(packet).unwrap();
        *to == peer.addr
            && body.first() == Some(&(PacketKind::Swim as u8))
            && foca::Codec::decode_header(&mut FocaCodec::default(), &body[1..])
                .is_ok_and(|h| h.message == foca::Message::TurnUndead)
    });
    assert!(!told_down, "the refuted member was told it is down");
    assert_eq!(n.metrics().snapshot().spurious_turn_undead, 1);
    assert!(n.is_member_active(&peer.addr));
}

#[test]
fn a_digest_equal_to_ours_gets_the_short_answer() {
    let mut n = node(1);
    n.publish_local(0, [ep(80)].into_iter().collect());
    let from: SocketAddr = "127.0.0.1:7709".parse().unwrap();
    let sealer = Sealer::new("tidings", None);
    let mut rng = StdRng::seed_from_u64(3);
    let digest_packet = |d: &Digest, rng: &mut StdRng| {
        let mut plain = vec![PacketKind::Digest as u8];
        plain.extend_from_slice(&schema::codec::encode_packet(d).unwrap());
        sealer.seal(&plain, rng)
    };
    let answer_to = |n: &mut Node, d: &Digest, rng: &mut StdRng| -> Digest {
        n.take_effects();
        n.handle_packet(0, from, &digest_packet(d, rng));
        n.take_effects()
            .into_iter()
            .find_map(|e| match e {
                Effect::Send { to, packet } if to == from => {
                    let body = sealer.open(&packet).unwrap();
                    (body.first() == Some(&(PacketKind::Digest as u8)))
                        .then(|| schema::codec::decode_packet::<Digest>(&body[1..]).unwrap())
                }
                _ => None,
            })
            .expect("an answer")
    };
    let ours = Digest::of(&n.store);
    let short = answer_to(&mut n, &ours, &mut rng);
    assert!(short.reply);
    assert_eq!(short.buckets, vec![repair::buckets_hash(&ours.buckets)]);
    // A different digest gets the full answer, which a repair can work from.
    let mut other = ours.clone();
    other.buckets[0] ^= 1;
    let full = answer_to(&mut n, &other, &mut rng);
    assert_eq!(full.buckets, ours.buckets);
    // The short answer is evidence only while our buckets are still those it matched.
    assert!(repair::on_equal_answer(
        &mut n.store,
        from,
        short.buckets[0]
    ));
    n.publish_local(0, [ep(81)].into_iter().collect());
    assert!(!repair::on_equal_answer(
        &mut n.store,
        from,
        short.buckets[0]
    ));
}

/// A forged snapshot dated far ahead (an hour, the year 2100), arriving by gossip or by
/// repair, is refused and counted; one within the skew bound is taken.
#[test]
fn snapshots_from_the_future_are_refused_whichever_way_they_come() {
    const NOW: u64 = 1_780_000_000_000;
    let mut n = node(1);
    n.start(NOW);
    let from: SocketAddr = "127.0.0.1:7709".parse().unwrap();
    let sealer = Sealer::new("tidings", None);
    let mut rng = StdRng::seed_from_u64(4);
    let snap = |at: u64, port: u16| Snapshot {
        service: ep(port).service,
        generated_at_ms: at,
        entries: vec![crate::SnapshotEntry {
            endpoint: ep(port).into(),
            last_check_in_ms: at,
        }],
    };
    let gossiped = |s: Snapshot, rng: &mut StdRng| {
        let item = BroadcastItem::Snapshot(s).encode().unwrap();
        let mut plain = vec![PacketKind::Rows as u8];
        plain.extend_from_slice(&u16::try_from(item.len()).unwrap().to_be_bytes());
        plain.extend_from_slice(&item);
        sealer.seal(&plain, rng)
    };
    let pushed = |s: Snapshot| {
        let frame = RepairFrame::Push(repair::RepairPush {
            from,
            rows: Vec::new(),
            snapshots: vec![s],
        });
        codec::encode::<_, MAX_FRAME>(&frame).unwrap()
    };
    let held = |n: &Node| n.snapshots().first().map(|s| s.generated_at_ms);

    n.handle_packet(NOW, from, &gossiped(snap(NOW + 3_600_000, 80), &mut rng));
    assert_eq!(held(&n), None);
    assert_eq!(
        n.handle_repair_frame(NOW, &pushed(snap(4_102_444_800_000, 81))),
        None
    );
    assert_eq!(held(&n), None);
    let m = n.metrics().snapshot();
    assert_eq!(m.snapshots_refused_future, 2, "{m}");
    assert_eq!(m.dropped_total(), 0, "{m}");
    // 20 s ahead is within the default bound of 30 s.
    n.handle_packet(NOW, from, &gossiped(snap(NOW + 20_000, 82), &mut rng));
    assert_eq!(held(&n), Some(NOW + 20_000));
    // The bound follows the node's clock: what was too far ahead is taken once time has
    // caught up.
    n.handle_packet(
        NOW + 3_600_000,
        from,
        &gossiped(snap(NOW + 3_600_000, 80), &mut rng),
    );
    assert_eq!(held(&n), Some(NOW + 3_600_000));
    assert_eq!(n.metrics().snapshot().snapshots_refused_future, 2);
}

/// A registry answer dated `at` listing one endpoint on `port`.
fn snap(at: u64, port: u16) -> Snapshot {
    Snapshot {
        service: ep(port).service,
        generated_at_ms: at,
        entries: vec![crate::SnapshotEntry {
            endpoint: ep(port).into(),
            last_check_in_ms: at,
        }],
    }
}

/// The date and port of the snapshot `n` holds.
fn held(n: &Node) -> Option<(u64, u16)> {
    n.snapshots()
        .first()
        .map(|s| (s.generated_at_ms, s.entries[0].endpoint.port.get()))
}

/// The agent's own direct registry answers: a fresh one supersedes what is held even when
/// dated older (the held one came from a replica a little ahead), by being stamped just
/// after it; one dated beyond the bound is refused and counted.
#[test]
fn a_direct_registry_answer_supersedes_what_is_held() {
    const NOW: u64 = 1_780_000_000_000;
    let mut n = node(1);
    n.start(NOW);
    n.apply_registry_snapshot(NOW, snap(NOW, 80));
    assert_eq!(held(&n), Some((NOW, 80)));
    n.apply_registry_snapshot(NOW, snap(NOW + 20_000, 81));
    assert_eq!(held(&n), Some((NOW + 20_000, 81)));
    n.apply_registry_snapshot(NOW + 1_000, snap(NOW + 1_000, 82));
    assert_eq!(held(&n), Some((NOW + 20_001, 82)));
    n.apply_registry_snapshot(NOW + 2_000, snap(NOW + 2_000 + 3_600_000, 83));
    assert_eq!(held(&n), Some((NOW + 20_001, 82)));
    assert_eq!(n.metrics().snapshot().snapshots_refused_future, 1);
    // Once real time passes the held stamp, answers carry their own date again.
    n.apply_registry_snapshot(NOW + 30_000, snap(NOW + 30_000, 84));
    assert_eq!(held(&n), Some((NOW + 30_000, 84)));
}

/// An agent whose own clock runs half an hour behind (restarted so, without its disk cache,
/// in the fault campaign) takes its registry's answers: there is nothing held to protect,
/// and then each answer is judged against the registry data held, not the slow clock. A
/// replica an hour ahead of that data is still refused.
#[test]
fn a_host_whose_clock_runs_behind_takes_its_registrys_answers() {
    const NOW: u64 = 1_780_000_000_000;
    const SLOW: u64 = NOW - 2_038_514;
    let mut n = node(1);
    n.start(SLOW);
    n.apply_registry_snapshot(SLOW, snap(NOW, 80));
    assert_eq!(held(&n), Some((NOW, 80)), "nothing held: taken");
    n.apply_registry_snapshot(SLOW + 1_000, snap(NOW + 1_000, 81));
    assert_eq!(
        held(&n),
        Some((NOW + 1_000, 81)),
        "within the bound of what is held"
    );
    n.apply_registry_snapshot(SLOW + 2_000, snap(NOW + 3_600_000, 82));
    assert_eq!(held(&n), Some((NOW + 1_000, 81)), "a replica an hour ahead");
    assert_eq!(n.metrics().snapshot().snapshots_refused_future, 1);
}
