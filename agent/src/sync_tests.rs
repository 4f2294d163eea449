use std::num::NonZeroU16;

use schema::Endpoint;
use schema::api::V1Host;

use super::*;

fn host(service: &str, port: u16) -> V1Host {
    let ep = Endpoint::new(
        ServiceName::new(service).expect("name"),
        "10.0.0.1".parse().expect("ip"),
        NonZeroU16::new(port).expect("port"),
    );
    V1Host::from_endpoint(&ep, 1_000)
}

/// Registry dates in these tests are `BASE + t`; [`date`] gives `t` back.
const BASE: u64 = 1_800_000_000_000;

/// A snapshot's date as `t` of `BASE + t`; 0 for a lower bound (dated at the start of time).
fn date(s: &Snapshot) -> u64 {
    if s.is_lower_bound() {
        0
    } else {
        s.generated_at_ms - BASE
    }
}

fn catalog(at: u64, warming: bool, services: &[(&str, &[u16])]) -> Catalog {
    Catalog {
        index: at,
        generated_at_ms: BASE + at,
        warming,
        stale: false,
        services: services
            .iter()
            .map(|(s, ports)| (s.to_string(), ports.iter().map(|p| host(s, *p)).collect()))
            .collect(),
        signatures: Default::default(),
    }
}

fn snaps(p: Plan) -> Vec<Snapshot> {
    assert!(!p.warming, "expected an authoritative answer");
    p.snapshots
}

/// (service, ports, generated_at) of each snapshot.
fn summary(snapshots: &[Snapshot]) -> Vec<(&str, Vec<u16>, u64)> {
    snapshots
        .iter()
        .map(|s| {
            let ports = s.entries.iter().map(|e| e.endpoint.port.get()).collect();
            (s.service.as_str(), ports, date(s))
        })
        .collect()
}

fn entry(service: &str, port: u16, last_check_in_ms: u64) -> SnapshotEntry {
    let (endpoint, _) = host(service, port).to_endpoint().expect("valid");
    SnapshotEntry {
        endpoint: endpoint.into(),
        last_check_in_ms,
    }
}

/// A cache entry from a registry-dated snapshot.
fn cached(service: &str, port: u16, last_check_in_ms: u64) -> CachedEntry {
    CachedEntry {
        entry: entry(service, port, last_check_in_ms),
        dated: true,
    }
}

fn snapshot(service: &str, at: u64, ports: &[u16]) -> Snapshot {
    Snapshot {
        service: ServiceName::new(service).expect("name"),
        generated_at_ms: BASE + at,
        entries: ports.iter().map(|p| entry(service, *p, 1)).collect(),
    }
}

#[test]
fn a_warming_answer_adds_and_updates_but_never_removes() {
    let held = [snapshot("web", 10, &[1, 2]), snapshot("db", 10, &[5])];
    let cached = [cached("web", 3, 7), cached("api", 8, 7)];
    // The registry restarted empty: it knows web:2 (with new tags), a new web:4, and
    // nothing of web:1, web:3, db or api yet.
    let mut c = catalog(20, true, &[("web", &[2, 4])]);
    c.services.get_mut("web").expect("web")[0]
        .tags
        .insert("az".into(), serde_json::json!("zone-b"));
    let p = plan(&c, &ReadMeta::default(), &held, &cached);
    assert!(p.warming);
    assert_eq!(p.listed, None, "a warming answer retires nothing");
    assert_eq!(summary(&p.snapshots), vec![("web", vec![1, 2, 3, 4], 20)]);
    let web2 = &p.snapshots[0].entries[1];
    assert_ne!(web2.endpoint, held[0].entries[1].endpoint, "updated tags");
    assert_eq!(web2.last_check_in_ms, 1_000, "the answer's version wins");
    assert_eq!(
        p.snapshots[0].entries[2].last_check_in_ms, 7,
        "cache entry kept"
    );

    // Flagged by header only, and listing nothing new: nothing to feed.
    let c = catalog(30, false, &[("web", &[1, 2]), ("db", &[])]);
    let meta = ReadMeta {
        warming: true,
        ..Default::default()
    };
    let p = plan(&c, &meta, &held, &[]);
    assert!(p.warming);
    assert!(p.snapshots.is_empty(), "{:?}", p.snapshots);
    // An empty warming answer removes nothing either.
    let p = plan(
        &catalog(30, true, &[]),
        &ReadMeta::default(),
        &held,
        &cached,
    );
    assert!(p.snapshots.is_empty(), "{:?}", p.snapshots);
}

#[test]
fn the_first_answer_after_warm_up_removes_what_the_registry_no_longer_lists() {
    let held = [snapshot("web", 10, &[1, 2])];
    let c = catalog(20, true, &[("web", &[3])]);
    let warm = plan(&c, &ReadMeta::default(), &held, &[]);
    assert_eq!(summary(&warm.snapshots), vec![("web", vec![1, 2, 3], 20)]);
    let done = snaps(plan(
        &catalog(30, false, &[("web", &[3])]),
        &ReadMeta::default(),
        &warm.snapshots,
        &[],
    ));
    assert_eq!(summary(&done), vec![("web", vec![3], 30)]);
}

#[test]
fn an_authoritative_answer_covers_what_the_disk_cache_holds() {
    // Restarted from the cache: gossip holds an old web snapshot, the cache holds newer
    // registry entries of web and of db, which the registry no longer lists at all.
    let held = [snapshot("web", 10, &[1])];
    let cached = [cached("web", 2, 15), cached("db", 5, 15)];
    let got = snaps(plan(
        &catalog(20, false, &[("web", &[1])]),
        &ReadMeta::default(),
        &held,
        &cached,
    ));
    // web: same hosts as the held snapshot, but only a newer one makes web:2 give way.
    assert_eq!(
        summary(&got),
        vec![("db", vec![], 20), ("web", vec![1], 20)]
    );
    let p = plan(
        &catalog(20, false, &[("web", &[1])]),
        &ReadMeta::default(),
        &held,
        &cached,
    );
    let want: BTreeSet<EndpointKey> = [entry("web", 1, 0).endpoint.key()].into();
    assert_eq!(
        p.listed,
        Some(want),
        "what the view task retires the cache by"
    );
}

#[test]
fn a_successful_answer_replaces_changed_services_and_empties_vanished_ones() {
    let first = snaps(plan(
        &catalog(10, false, &[("web", &[1, 2]), ("db", &[5])]),
        &ReadMeta::default(),
        &[] as &[Snapshot],
        &[],
    ));
    assert_eq!(first.len(), 2);
    // Same web hosts, db gone, api new.
    let next = snaps(plan(
        &catalog(20, false, &[("web", &[2, 1]), ("api", &[9])]),
        &ReadMeta::default(),
        &first,
        &[],
    ));
    let got: Vec<(&str, usize, u64)> = next
        .iter()
        .map(|s| (s.service.as_str(), s.entries.len(), date(s)))
        .collect();
    assert_eq!(got, vec![("api", 1, 20), ("db", 0, 20)]);
}

#[test]
fn a_changed_answer_replaces_a_held_snapshot_dated_ahead_of_it() {
    // A registry replica whose clock ran ahead answered before: what gossip holds is dated
    // after this honest answer. Gossip stamps a direct answer after the snapshot it holds,
    // so a change must still be fed to it, or it would wait until real time caught up.
    let held = [snapshot("web", 50, &[1, 2]), snapshot("db", 50, &[5])];
    let got = snaps(plan(
        &catalog(20, false, &[("web", &[1])]),
        &ReadMeta::default(),
        &held,
        &[],
    ));
    assert_eq!(
        summary(&got),
        vec![("db", vec![], 20), ("web", vec![1], 20)]
    );
    // Unchanged hosts still need nothing, whatever the dates.
    let got = snaps(plan(
        &catalog(20, false, &[("web", &[1, 2]), ("db", &[5])]),
        &ReadMeta::default(),
        &held,
        &[],
    ));
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn invalid_hosts_are_skipped_and_counted() {
    let mut c = catalog(10, false, &[("web", &[1])]);
    let mut bad = host("web", 2);
    bad.ip_address = "nope".into();
    c.services.get_mut("web").expect("web").push(bad);
    c.services.insert("Bad Name".into(), vec![host("web", 3)]);
    let p = plan(&c, &ReadMeta::default(), &[] as &[Snapshot], &[]);
    assert_eq!(p.invalid, 2);
    assert_eq!(p.snapshots.len(), 1);
    assert_eq!(p.snapshots[0].entries.len(), 1);
}

#[test]
fn alone_agents_join_everyone_listed_others_only_strangers() {
    let agents = Replica::from(catalog(
        10,
        false,
        &[("tidings-agent", &[7702, 7703, 7704])],
    ));
    let me: SocketAddr = "10.0.0.1:7702".parse().expect("addr");
    let addr = |p: u16| SocketAddr::new(me.ip(), p);
    let member = |p: u16, active: bool| MemberInfo {
        id: gossip::NodeId::new(addr(p), 1),
        active,
    };
    assert_eq!(
        seeds_to_join(&agents, me, &[]),
        vec![addr(7703), addr(7704)]
    );
    assert_eq!(
        seeds_to_join(&agents, me, &[member(7703, false)]),
        vec![addr(7703), addr(7704)],
        "only down members known: still alone"
    );
    assert_eq!(
        seeds_to_join(&agents, me, &[member(7703, true)]),
        vec![addr(7704)]
    );
    let both = [member(7703, true), member(7704, false)];
    assert!(seeds_to_join(&agents, me, &both).is_empty());
}

#[test]
fn pacing_backs_off_to_the_cap_and_polls_within_ten_percent() {
    let mut p = Pacer::new(Duration::from_secs(30), Duration::from_secs(8));
    let waits: Vec<u64> = (0..6).map(|_| p.after_failure(0.5).as_secs()).collect();
    assert_eq!(waits, vec![1, 2, 4, 8, 8, 8]);
    assert!(p.after_success());
    assert!(!p.after_success());
    assert_eq!(p.poll(0.0), Duration::from_secs(27));
    assert!(p.poll(0.999_999) <= Duration::from_secs(33));
    assert_eq!(
        warming_poll(Duration::from_secs(1), 0.5),
        Duration::from_millis(250)
    );
    assert_eq!(
        warming_poll(Duration::from_secs(60), 0.0),
        Duration::from_millis(4_500)
    );
    assert!(warming_poll(Duration::from_secs(60), 0.999_999) < Duration::from_millis(5_500));
}

#[test]
fn a_warming_answer_for_a_service_held_nothing_of_is_dated_at_the_start_of_time() {
    // Restarted without a disk cache, before repair brought the peers' snapshots: dated like
    // the answer, the lower bound would outrank the peers' fuller snapshots and spread over
    // them (campaign seed 12860982494713673050). Dated at the start of time it is served
    // here at once, and any snapshot a registry dated outranks it.
    let c = catalog(20, true, &[("web", &[1, 2])]);
    let p = plan(&c, &ReadMeta::default(), &[] as &[Snapshot], &[]);
    assert_eq!(summary(&p.snapshots), vec![("web", vec![1, 2], 0)]);
    assert_eq!(p.snapshots[0].generated_at_ms, gossip::LOWER_BOUND_MS);
    let peers = snapshot("web", 5, &[1, 2, 3]);
    assert!(peers.generated_at_ms > p.snapshots[0].generated_at_ms);

    // Holding only lower bounds (its own, or a peer's) is still holding nothing real: the
    // union keeps the start-of-time date, so it never outranks a registry-dated snapshot.
    let held = p.snapshots;
    let p = plan(
        &catalog(25, true, &[("web", &[2, 4])]),
        &ReadMeta::default(),
        &held,
        &[],
    );
    assert_eq!(summary(&p.snapshots), vec![("web", vec![1, 2, 4], 0)]);

    // Holding real data of the service, or cache entries for it: the union holds everything
    // this agent knew, and carries the answer's date.
    let held = [snapshot("web", 10, &[1])];
    let p = plan(
        &catalog(30, true, &[("web", &[2])]),
        &ReadMeta::default(),
        &held,
        &[],
    );
    assert_eq!(summary(&p.snapshots), vec![("web", vec![1, 2], 30)]);
    let cached = [cached("web", 3, 7)];
    let p = plan(
        &catalog(30, true, &[("web", &[2])]),
        &ReadMeta::default(),
        &[] as &[Snapshot],
        &cached,
    );
    assert_eq!(summary(&p.snapshots), vec![("web", vec![2, 3], 30)]);

    // Per service: real data of one service does not date another's lower bound.
    let p = plan(
        &catalog(40, true, &[("web", &[2]), ("api", &[8])]),
        &ReadMeta::default(),
        &held,
        &[],
    );
    assert_eq!(
        summary(&p.snapshots),
        vec![("api", vec![8], 0), ("web", vec![1, 2], 40)]
    );

    // The first authoritative answer replaces lower bounds, dated as the registry dated it.
    let lower = [Snapshot {
        generated_at_ms: gossip::LOWER_BOUND_MS,
        ..snapshot("web", 0, &[1, 2, 4])
    }];
    let done = snaps(plan(
        &catalog(50, false, &[("web", &[2])]),
        &ReadMeta::default(),
        &lower,
        &[],
    ));
    assert_eq!(summary(&done), vec![("web", vec![2], 50)]);
}

/// A cache of lower bounds is no registry data: a warming answer's union with it stays a
/// lower bound, so it cannot outrank a peer's fuller lower bound (which may list hosts that
/// checked in after this agent's cache was written) and hide them fleet-wide.
#[test]
fn a_cache_of_lower_bounds_does_not_date_a_warming_answer() {
    let lower = [CachedEntry {
        dated: false,
        ..cached("web", 3, 7)
    }];
    let p = plan(
        &catalog(30, true, &[("web", &[2])]),
        &ReadMeta::default(),
        &[] as &[Snapshot],
        &lower,
    );
    assert_eq!(summary(&p.snapshots), vec![("web", vec![2, 3], 0)]);
    // One registry-dated entry makes it real data.
    let mixed = [lower[0].clone(), cached("web", 4, 7)];
    let p = plan(
        &catalog(30, true, &[("web", &[2])]),
        &ReadMeta::default(),
        &[] as &[Snapshot],
        &mixed,
    );
    assert_eq!(summary(&p.snapshots), vec![("web", vec![2, 3, 4], 30)]);
}

proptest::proptest! {
    /// A delta's plan, made over the services it touched, is the whole catalog's plan: every
    /// other service is as the previous answer left it, so the whole plan has nothing for it
    /// either. (Fails if a removed service, or a touched one, is left out of the scope.)
    #[test]
    fn a_deltas_plan_over_what_it_touched_is_the_whole_plan(
        before in proptest::collection::btree_map(0u8..6, proptest::collection::btree_set(1u16..8, 0..4), 0..6),
        after in proptest::collection::btree_map(0u8..6, proptest::collection::btree_set(1u16..8, 0..4), 0..6),
    ) {
        let name = |s: &u8| format!("svc{s}");
        let whole = |services: &BTreeMap<u8, BTreeSet<u16>>, at| {
            let owned: Vec<(String, Vec<u16>)> = services
                .iter()
                .filter(|(_, p)| !p.is_empty())
                .map(|(s, p)| (name(s), p.iter().copied().collect()))
                .collect();
            let refs: Vec<(&str, &[u16])> =
                owned.iter().map(|(s, p)| (s.as_str(), p.as_slice())).collect();
            catalog(at, false, &refs)
        };
        let (a, b) = (whole(&before, 10), whole(&after, 20));
        let held = snaps(plan(&a, &ReadMeta::default(), &[] as &[Snapshot], &[]));
        let touched: BTreeSet<String> = a
            .services
            .keys()
            .chain(b.services.keys())
            .filter(|s| a.services.get(*s) != b.services.get(*s))
            .cloned()
            .collect();
        let full = plan(&b, &ReadMeta::default(), &held, &[]);
        let scoped = plan_scoped(&Replica::from(b.clone()), &ReadMeta::default(), &held, &[], Some(&touched));
        proptest::prop_assert_eq!(full.snapshots, scoped.snapshots);
        proptest::prop_assert!(scoped.listed.is_none());
    }
}

/// `c` with the registry's signature of each listing, as a registry with `key` answers.
fn signed(mut c: Catalog, key: &gossip::sign::SigningKey) -> Catalog {
    for (name, hosts) in &c.services {
        let service = ServiceName::new(name.clone()).expect("name");
        let eps: Vec<Endpoint> = hosts
            .iter()
            .map(|h| h.to_endpoint().expect("valid").0)
            .collect();
        let msg =
            schema::cert::listing_message(&service, c.generated_at_ms, &eps).expect("encodes");
        c.signatures
            .insert(name.clone(), key.sign(&msg).to_base64());
    }
    c
}

#[test]
fn the_snapshots_of_a_signed_answer_carry_signatures_gossip_verifies() {
    let key = gossip::sign::SigningKey::generate();
    let trust = gossip::sign::Trust {
        registry: Some(key.public()),
        mode: gossip::sign::SigningMode::Require,
        grace_ms: 0,
    };
    let answer = signed(
        catalog(5, false, &[("web", &[80, 81]), ("db", &[5432])]),
        &key,
    );
    let p = plan(&answer, &ReadMeta::default(), &[] as &[Snapshot], &[]);
    let paired =
        crate::signing::registry_signatures(p.snapshots, &Replica::from(answer.clone()), p.warming);
    assert_eq!(paired.len(), 2);
    for (snap, sig) in &paired {
        assert_eq!(trust.check_snapshot(snap, sig.as_ref()), Ok(()), "{snap:?}");
        // A host added or the date moved: the signature no longer holds.
        let mut added = snap.clone();
        added.entries.push(entry(snap.service.as_str(), 9, 1));
        assert!(trust.check_snapshot(&added, sig.as_ref()).is_err());
        let mut later = snap.clone();
        later.generated_at_ms += 1;
        assert!(trust.check_snapshot(&later, sig.as_ref()).is_err());
    }
    // A warming answer's snapshots are lower bounds this agent made: none is signed, even
    // where the registry signed its own listing.
    let warming = signed(catalog(6, true, &[("web", &[82])]), &key);
    let held = [snapshot("web", 5, &[80, 81])];
    let p = plan(&warming, &ReadMeta::default(), &held, &[]);
    assert!(p.warming);
    let paired = crate::signing::registry_signatures(
        p.snapshots,
        &Replica::from(warming.clone()),
        p.warming,
    );
    assert!(!paired.is_empty() && paired.iter().all(|(_, sig)| sig.is_none()));
}

#[test]
fn an_answer_after_the_warm_up_replaces_a_lower_bound_listing_the_same_hosts() {
    let mut lower = snapshot("web", 0, &[80]);
    lower.generated_at_ms = gossip::LOWER_BOUND_MS;
    let answer = catalog(7, false, &[("web", &[80])]);
    let p = plan(&answer, &ReadMeta::default(), &[lower], &[]);
    assert_eq!(summary(&snaps(p)), [("web", vec![80], 7)]);
    // A dated snapshot with the same hosts needs none.
    let p = plan(
        &answer,
        &ReadMeta::default(),
        &[snapshot("web", 3, &[80])],
        &[],
    );
    assert!(snaps(p).is_empty());
}
