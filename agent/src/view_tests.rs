use std::net::SocketAddr;
use std::num::NonZeroU16;

use gossip::{GossipView, MemberInfo, NodeId, Snapshot, SnapshotEntry, Source, ViewEntry};
use schema::{Endpoint, ServiceName};

use super::*;

fn ep(service: &str, port: u16) -> Endpoint {
    Endpoint::new(
        ServiceName::new(service).expect("name"),
        "10.0.0.1".parse().expect("ip"),
        NonZeroU16::new(port).expect("port"),
    )
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn ports(view: &MergedView, service: &str) -> Vec<(u16, Provenance)> {
    view.hosts(&ServiceName::new(service).expect("name"))
        .iter()
        .map(|h| (h.endpoint.port.get(), h.provenance))
        .collect()
}

fn row(e: Endpoint, owner: &str) -> ViewEntry {
    ViewEntry {
        endpoint: e.into(),
        source: Source::Gossip { owner: addr(owner) },
    }
}

fn snap(service: &str, at: u64, p: &[u16]) -> Snapshot {
    Snapshot {
        service: ServiceName::new(service).expect("name"),
        generated_at_ms: at,
        entries: p
            .iter()
            .map(|p| SnapshotEntry {
                endpoint: ep(service, *p).into(),
                last_check_in_ms: at - 1,
            })
            .collect(),
    }
}

fn reg(e: Endpoint, at: u64) -> ViewEntry {
    ViewEntry {
        endpoint: e.into(),
        source: Source::Registry {
            generated_at_ms: at,
            last_check_in_ms: at - 1,
        },
    }
}

fn member(a: &str, active: bool) -> MemberInfo {
    MemberInfo {
        id: NodeId::new(addr(a), 1),
        active,
    }
}

const ME: &str = "10.0.0.9:7702";

/// A registry date (registry clock, ms since the Unix epoch); dates below
/// [`gossip::LOWER_BOUNDS_BEFORE_MS`] are lower bounds.
const T: u64 = 1_800_000_000_000;

#[test]
fn provenance_is_registry_when_listed_gossip_when_only_owned() {
    let mut m = Merger::new(addr(ME), 1_000, Vec::new());
    let g = GossipView {
        deregistered: Vec::new(),
        endpoints: vec![
            row(ep("web", 1), "10.0.0.2:7702"),
            row(ep("web", 2), "10.0.0.2:7702"),
        ]
        .into(),
        snapshots: vec![Arc::new(snap("web", 10, &[1]))],
        members: vec![member("10.0.0.2:7702", true)],
    };
    let v = m.merge(&g, 100);
    assert_eq!(
        ports(&v, "web"),
        vec![(1, Provenance::Registry), (2, Provenance::Gossip)]
    );
    let hosts = v.hosts(&ServiceName::new("web").expect("name"));
    assert_eq!(
        v.source_of(hosts),
        Provenance::Gossip,
        "the weakest host decides"
    );
    assert_eq!(v.source_of(&hosts[..1]), Provenance::Registry);
    assert_eq!(hosts[0].last_check_in_ms, 9, "registry time when listed");
    assert_eq!(hosts[1].last_check_in_ms, 100, "first seen otherwise");
}

#[test]
fn cache_entries_are_served_until_live_data_covers_them() {
    let owner = "10.0.0.2:7702";
    let cached = vec![
        CachedHost {
            endpoint: ep("web", 1).into(),
            origin: Origin::Registry {
                generated_at_ms: T + 10,
            },
            last_check_in_ms: 9,
        },
        CachedHost {
            endpoint: ep("web", 2).into(),
            origin: Origin::Row { owner: addr(owner) },
            last_check_in_ms: 9,
        },
        CachedHost {
            endpoint: ep("db", 3).into(),
            origin: Origin::Registry {
                generated_at_ms: T + 10,
            },
            last_check_in_ms: 9,
        },
        // Our own previous rows: republished by this process, never from the cache.
        CachedHost {
            endpoint: ep("mine", 4).into(),
            origin: Origin::Row { owner: addr(ME) },
            last_check_in_ms: 9,
        },
    ];
    let mut m = Merger::new(addr(ME), 1_000, cached);
    // At start, nothing live: everything cached (but our own) is served.
    let v = m.merge(&GossipView::default(), 0);
    assert_eq!(v.len(), 3);
    assert_eq!(v.source_of(v.all_hosts()), Provenance::Cache);
    // Nothing here changes with time alone: the cached row's owner is not even alive, and
    // cached registry entries wait for a snapshot or a registry answer (both events).
    assert!(!m.time_pending());

    // Gossip brings web:1 as a row (replaces the cache entry), an older db snapshot
    // (does not supersede), and the owner comes alive (not settled yet).
    let mut g = GossipView {
        deregistered: Vec::new(),
        endpoints: vec![row(ep("web", 1), owner)].into(),
        snapshots: vec![Arc::new(snap("db", T + 5, &[]))],
        members: vec![member(owner, true)],
    };
    let v = m.merge(&g, 100);
    assert_eq!(
        ports(&v, "web"),
        vec![(1, Provenance::Gossip), (2, Provenance::Cache)]
    );
    assert_eq!(ports(&v, "db"), vec![(3, Provenance::Cache)]);
    // The owner is alive, so its cached row settles with time: the view must be re-merged
    // without any event.
    assert!(m.time_pending());

    // A db snapshot at least as new supersedes the cached db entries, even empty ones.
    g.snapshots = vec![Arc::new(snap("db", T + 10, &[]))];
    let v = m.merge(&g, 200);
    assert!(ports(&v, "db").is_empty());
    // Once the owner has been alive for `settle`, its cached rows give way. The cached
    // registry entry web:1 stays, unserved: only a live row covers it.
    let v = m.merge(&g, 1_100);
    assert_eq!(ports(&v, "web"), vec![(1, Provenance::Gossip)]);
    assert_eq!(m.cache_len(), 1);
    assert!(!m.time_pending());
    // The row's owner stops counting as alive before any web snapshot arrived: web:1 is
    // still served, from the cache, not dropped from the view.
    g.members = vec![member(owner, false)];
    g.endpoints = Vec::new().into();
    let v = m.merge(&g, 1_200);
    assert_eq!(ports(&v, "web"), vec![(1, Provenance::Cache)]);
    // A web snapshot at least as new covers it for good.
    g.snapshots.push(Arc::new(snap("web", T + 10, &[1])));
    g.endpoints = vec![reg(ep("web", 1), T + 10)].into();
    let v = m.merge(&g, 1_300);
    assert_eq!(ports(&v, "web"), vec![(1, Provenance::Registry)]);
    assert_eq!(m.cache_len(), 0);
}

/// A lower bound (an agent's union of warming answers) never retires a cached host: the
/// e2e outage test saw a restarted agent drop a host for a moment when a peer that had
/// started with nothing spread `(lower bound, [web:2])` before the fuller snapshots
/// arrived, and the cached entries, themselves a lower bound's, gave way to it.
#[test]
fn a_lower_bound_snapshot_retires_no_cached_host() {
    let lower = gossip::LOWER_BOUND_MS;
    let cached = |port, generated_at_ms| CachedHost {
        endpoint: ep("web", port).into(),
        origin: Origin::Registry { generated_at_ms },
        last_check_in_ms: 9,
    };
    let mut m = Merger::new(
        addr(ME),
        1_000,
        vec![cached(1, lower), cached(2, lower), cached(3, T)],
    );
    let mut g = GossipView {
        snapshots: vec![Arc::new(snap("web", lower + 1, &[2]))],
        endpoints: vec![reg(ep("web", 2), lower + 1)].into(),
        ..GossipView::default()
    };
    let v = m.merge(&g, 100);
    let served: Vec<u16> = ports(&v, "web").iter().map(|(p, _)| *p).collect();
    assert_eq!(served, vec![1, 2, 3], "a lower bound shrank the view");
    // The key it lists covers that entry; the others wait for a registry-dated snapshot.
    assert_eq!(m.cache_len(), 2);
    g.snapshots = vec![Arc::new(snap("web", T + 1, &[2]))];
    g.endpoints = vec![reg(ep("web", 2), T + 1)].into();
    let v = m.merge(&g, 200);
    assert_eq!(ports(&v, "web"), vec![(2, Provenance::Registry)]);
    assert_eq!(m.cache_len(), 0);
}

/// A tombstone removes a cached host for good, even one a live row had covered.
#[test]
fn a_tombstone_retires_a_cached_host() {
    let cached = vec![CachedHost {
        endpoint: ep("web", 1).into(),
        origin: Origin::Registry {
            generated_at_ms: 10,
        },
        last_check_in_ms: 9,
    }];
    let mut m = Merger::new(addr(ME), 1_000, cached);
    let g = GossipView {
        deregistered: vec![ep("web", 1).key()],
        ..GossipView::default()
    };
    let v = m.merge(&g, 100);
    assert!(ports(&v, "web").is_empty());
    assert_eq!(m.cache_len(), 0);
}

#[test]
fn a_cached_row_of_an_owner_declared_down_is_dropped() {
    let owner = "10.0.0.2:7702";
    let cached = vec![CachedHost {
        endpoint: ep("web", 2).into(),
        origin: Origin::Row { owner: addr(owner) },
        last_check_in_ms: 9,
    }];
    let mut m = Merger::new(addr(ME), 60_000, cached);
    let unknown = GossipView {
        deregistered: Vec::new(),
        members: vec![member("10.0.0.3:7702", true)],
        ..Default::default()
    };
    assert_eq!(m.merge(&unknown, 1).len(), 1, "unknown owner: fail static");
    let down = GossipView {
        deregistered: Vec::new(),
        members: vec![member(owner, false)],
        ..Default::default()
    };
    assert!(m.merge(&down, 2).is_empty());
}

#[test]
fn an_authoritative_answer_retires_the_cache_entries_it_does_not_list() {
    let alive = "10.0.0.2:7702";
    let gone = "10.0.0.3:7702";
    let cached = |port, origin| CachedHost {
        endpoint: ep("web", port).into(),
        origin,
        last_check_in_ms: 9,
    };
    let registry = Origin::Registry {
        generated_at_ms: 50,
    };
    let mut m = Merger::new(
        addr(ME),
        60_000,
        vec![
            cached(1, registry),
            cached(2, registry),
            cached(3, Origin::Row { owner: addr(gone) }),
            cached(4, Origin::Row { owner: addr(alive) }),
        ],
    );
    let g = GossipView {
        members: vec![member(alive, true)],
        ..Default::default()
    };
    assert_eq!(
        m.merge(&g, 1).len(),
        4,
        "fail static until the registry answers"
    );
    // The registry lists only web:2: web:1 and the row of an owner that never shows up go;
    // web:2 waits for its snapshot, the row of a live owner for `settle`.
    let listed: BTreeSet<EndpointKey> = [ep("web", 2).key()].into();
    assert_eq!(m.registry_answered(&listed), 2);
    let v = m.merge(&g, 2);
    assert_eq!(
        ports(&v, "web"),
        vec![(2, Provenance::Cache), (4, Provenance::Cache)]
    );
}

#[test]
fn registry_entries_stay_and_rows_override_them() {
    // The merged view (docs/ARCHITECTURE.md#what-the-agent-answers) as gossip computes it, seen through the agent: registry entries plus rows.
    let mut m = Merger::new(addr(ME), 1_000, Vec::new());
    let mut tagged = ep("web", 1);
    tagged.tags.canary = true;
    let g = GossipView {
        deregistered: Vec::new(),
        endpoints: vec![row(tagged.clone(), "10.0.0.2:7702"), reg(ep("web", 2), 10)].into(),
        snapshots: vec![Arc::new(snap("web", 10, &[1, 2]))],
        members: vec![member("10.0.0.2:7702", true)],
    };
    let v = m.merge(&g, 5);
    let hosts = v.hosts(&ServiceName::new("web").expect("name"));
    assert_eq!(*hosts[0].endpoint, tagged, "the owner's row wins");
    assert_eq!(v.source_of(hosts), Provenance::Registry);
}

#[test]
fn the_index_moves_only_when_endpoints_change() {
    let mut m = Merger::new(addr(ME), 1_000, Vec::new());
    let g1 = GossipView {
        deregistered: Vec::new(),
        endpoints: vec![reg(ep("web", 1), 10)].into(),
        snapshots: vec![Arc::new(snap("web", 10, &[1]))],
        members: Vec::new(),
    };
    let a = m.merge(&g1, 1);
    // A newer snapshot with the same endpoints (a re-check-in): same index.
    let g2 = GossipView {
        deregistered: Vec::new(),
        endpoints: vec![reg(ep("web", 1), 20)].into(),
        snapshots: vec![Arc::new(snap("web", 20, &[1]))],
        members: Vec::new(),
    };
    let b = m.merge(&g2, 2);
    let web = ServiceName::new("web").expect("name");
    assert_eq!(a.index(), b.index());
    assert_eq!(a.service_index(&web), b.service_index(&web));
    let g3 = GossipView {
        deregistered: Vec::new(),
        endpoints: vec![reg(ep("web", 1), 30), reg(ep("web", 2), 30)].into(),
        snapshots: vec![Arc::new(snap("web", 30, &[1, 2]))],
        members: Vec::new(),
    };
    let c = m.merge(&g3, 3);
    assert_ne!(a.index(), c.index());
    assert_ne!(a.service_index(&web), c.service_index(&web));
    let other = ServiceName::new("db").expect("name");
    assert_eq!(a.service_index(&other), c.service_index(&other));
}

/// The merged view (docs/ARCHITECTURE.md#what-the-agent-answers) end to end through the real gossip core (sans-IO, no sockets): registry snapshots,
/// this node's own rows, tombstones, and the agent's merge on top.
mod through_gossip {
    use gossip::{GossipConfig, Node};

    use super::*;

    fn observe(node: &Node, m: &mut Merger, now: u64) -> MergedView {
        let g = GossipView {
            deregistered: node.deregistered_keys(),
            endpoints: node.visible_endpoints().into(),
            snapshots: node.snapshots(),
            members: node.members(),
        };
        m.merge(&g, now)
    }

    #[test]
    fn rows_override_tombstones_remove_and_newer_snapshots_replace() {
        let me = addr(ME);
        let mut node = Node::new(GossipConfig::for_tests(me), 1, 7).expect("node");
        node.start(1);
        let mut m = Merger::new(me, 1_000, Vec::new());
        node.apply_registry_snapshot(2, snap("web", T + 10, &[1, 2]));
        assert_eq!(
            ports(&observe(&node, &mut m, 2), "web"),
            vec![(1, Provenance::Registry), (2, Provenance::Registry)]
        );

        // An owned row overrides the registry's entry for the same key.
        let mut mine = ep("web", 1);
        mine.tags.canary = true;
        node.publish_local(3, vec![mine.clone()]);
        let v = observe(&node, &mut m, 3);
        assert_eq!(*v.hosts(&mine.service)[0].endpoint, mine);

        // The owner's tombstone removes the endpoint, although the registry still lists it.
        node.publish_local(5, Vec::new());
        assert_eq!(
            ports(&observe(&node, &mut m, 5), "web"),
            vec![(2, Provenance::Registry)]
        );

        // A newer successful snapshot replaces the registry entries.
        node.apply_registry_snapshot(6, snap("web", T + 20, &[3]));
        assert_eq!(
            ports(&observe(&node, &mut m, 6), "web"),
            vec![(3, Provenance::Registry)]
        );
    }

    fn drained(v: &MergedView, service: &str) -> Vec<(u16, u64)> {
        v.draining(&ServiceName::new(service).expect("name"))
            .iter()
            .map(|d| (d.endpoint.port.get(), d.since_ms))
            .collect()
    }

    #[test]
    fn a_deregistered_host_is_listed_draining_for_a_window_and_an_expired_one_is_not() {
        let me = addr(ME);
        let mut node = Node::new(GossipConfig::for_tests(me), 1, 7).expect("node");
        node.start(1);
        let mut m = Merger::new(me, 1_000, Vec::new());
        node.publish_local(2, vec![ep("web", 1), ep("web", 2)]);
        node.apply_registry_snapshot(2, snap("web", T + 10, &[3]));
        let v = observe(&node, &mut m, 2);
        assert_eq!(v.hosts(&ServiceName::new("web").expect("name")).len(), 3);
        assert!(drained(&v, "web").is_empty());

        // Port 2 deregistered (a tombstone): gone from the view, listed as draining, with
        // the endpoint it had. Port 3 vanishing from a newer snapshot (it expired) is not a
        // deregistration.
        node.publish_local(1_000, vec![ep("web", 1)]);
        node.apply_registry_snapshot(1_000, snap("web", T + 20, &[]));
        let v = observe(&node, &mut m, 1_000);
        assert_eq!(ports(&v, "web"), vec![(1, Provenance::Gossip)]);
        assert_eq!(drained(&v, "web"), vec![(2, 1_000)]);
        assert!(m.time_pending(), "the drain must end by itself");

        // Still draining just before the window ends, and gone after it.
        let v = observe(&node, &mut m, 1_000 + DRAIN_LISTING_MS - 1);
        assert_eq!(drained(&v, "web"), vec![(2, 1_000)]);
        let v = observe(&node, &mut m, 1_000 + DRAIN_LISTING_MS);
        assert!(drained(&v, "web").is_empty());
        assert!(!m.time_pending());

        // Registered again: listed, not draining, even inside a new window.
        node.publish_local(70_000, vec![ep("web", 1)]);
        let v = observe(&node, &mut m, 70_000);
        assert_eq!(drained(&v, "web"), vec![]);
        node.publish_local(70_001, Vec::new());
        assert_eq!(
            drained(&observe(&node, &mut m, 70_001), "web"),
            vec![(1, 70_001)]
        );
        node.publish_local(70_002, vec![ep("web", 1)]);
        let v = observe(&node, &mut m, 70_002);
        assert_eq!(ports(&v, "web"), vec![(1, Provenance::Gossip)]);
        assert!(drained(&v, "web").is_empty());
    }
}

/// A merge that reuses the previous view's services gives exactly what a merge from nothing
/// gives: same hosts, same per-service and view indexes — over random sequences of gossip
/// views (rows, registry entries, snapshots listing some of them, members coming and going)
/// with a disk cache at start.
mod incremental {
    use proptest::prelude::*;

    use super::*;

    const SERVICES: [&str; 3] = ["api", "db", "web"];
    const OWNERS: [&str; 2] = ["10.0.0.2:7702", "10.0.0.3:7702"];

    /// (service, port, revision, source): source 0 = registry, 1..=2 = a row of that owner.
    type Spec = (usize, u16, u8, usize);

    fn entry((s, port, rev, source): Spec, at: u64) -> ViewEntry {
        let mut e = ep(SERVICES[s], port);
        e.revision = schema::Revision::new(format!("r{rev}")).expect("revision");
        match source {
            0 => reg(e, at),
            o => row(e, OWNERS[o - 1]),
        }
    }

    fn view(specs: &[Spec], listed: &[(usize, u16)], alive: &[bool], at: u64) -> GossipView {
        let mut endpoints: Vec<ViewEntry> = Vec::new();
        for spec in specs {
            let e = entry(*spec, at);
            // Gossip's view holds a key once.
            if !endpoints
                .iter()
                .any(|x| x.endpoint.key() == e.endpoint.key())
            {
                endpoints.push(e);
            }
        }
        let snapshots = SERVICES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let ports: Vec<u16> = listed
                    .iter()
                    .filter(|(s, _)| *s == i)
                    .map(|(_, p)| *p)
                    .collect();
                Arc::new(snap(name, at, &ports))
            })
            .collect();
        GossipView {
            endpoints: endpoints.into(),
            snapshots,
            members: OWNERS
                .iter()
                .zip(alive)
                .map(|(o, a)| member(o, *a))
                .collect(),
            deregistered: Vec::new(),
        }
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (0..SERVICES.len(), 1u16..6, 0u8..2, 0..=OWNERS.len())
    }

    /// One gossip view: its entries, the snapshots' listed ports, owners alive, time step.
    type Step = (Vec<Spec>, Vec<(usize, u16)>, Vec<bool>, u64);

    fn step() -> impl Strategy<Value = Step> {
        (
            proptest::collection::vec(spec(), 0..12),
            proptest::collection::vec((0..SERVICES.len(), 1u16..6), 0..8),
            proptest::collection::vec(any::<bool>(), OWNERS.len()),
            0u64..3,
        )
    }

    fn same(a: &MergedView, b: &MergedView) -> Result<(), TestCaseError> {
        prop_assert_eq!(a.index(), b.index());
        let services = |v: &MergedView| -> Vec<(ServiceName, Vec<Host>, u64)> {
            v.services()
                .map(|(n, s)| (n.clone(), s.hosts.clone(), s.index))
                .collect()
        };
        prop_assert_eq!(services(a), services(b));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn reusing_services_equals_merging_from_nothing(
            cached in proptest::collection::vec(spec(), 0..6),
            steps in proptest::collection::vec(step(), 1..8),
        ) {
            let cached: Vec<CachedHost> = cached
                .into_iter()
                .map(|s| {
                    let e = entry(s, 5_000);
                    let origin = match e.source {
                        Source::Gossip { owner } => Origin::Row { owner },
                        Source::Registry { .. } => Origin::Registry { generated_at_ms: 5_000 },
                    };
                    CachedHost { endpoint: e.endpoint, origin, last_check_in_ms: 4_000 }
                })
                .collect();
            let mut m = Merger::new(addr(ME), 1_000, cached);
            let mut now = 10_000;
            let mut previous = GossipView::default();
            for (specs, listed, alive, dt) in steps {
                now += dt * 700;
                let mut g = view(&specs, &listed, &alive, now);
                // As gossip publishes: what did not change is the very same shared value,
                // so the merge's by-pointer reuse is exercised too.
                g.endpoints.share_with(&previous.endpoints);
                for s in &mut g.snapshots {
                    if let Some(p) = previous.snapshots.iter().find(|p| **p == *s) {
                        *s = Arc::clone(p);
                    }
                }
                let mut fresh = m.clone();
                fresh.services.clear();
                let incremental = m.merge(&g, now);
                let from_nothing = fresh.merge(&g, now);
                same(&incremental, &from_nothing)?;
                previous = g;
            }
        }
    }
}
