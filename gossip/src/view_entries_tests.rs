use std::net::SocketAddr;
use std::num::NonZeroU16;

use proptest::prelude::*;
use schema::{Endpoint, ServiceName};

use super::*;
use crate::rows::Row;
use crate::snapshot::SnapshotEntry;

const SERVICES: [&str; 3] = ["api", "db", "web"];
const OWNERS: [&str; 3] = ["10.0.0.2:7702", "10.0.0.3:7702", "10.0.0.4:7702"];

fn ep(service: usize, port: u16) -> Endpoint {
    Endpoint::new(
        ServiceName::new(SERVICES[service]).expect("name"),
        "10.0.0.1".parse().expect("ip"),
        NonZeroU16::new(port).expect("port"),
    )
}

fn owner(i: usize) -> SocketAddr {
    OWNERS[i].parse().expect("addr")
}

fn snapshot(service: usize, at: u64, ports: &[u16]) -> Snapshot {
    Snapshot {
        service: ServiceName::new(SERVICES[service]).expect("name"),
        generated_at_ms: crate::LOWER_BOUNDS_BEFORE_MS + at,
        entries: ports
            .iter()
            .map(|p| SnapshotEntry {
                endpoint: ep(service, *p).into(),
                last_check_in_ms: at - 1,
            })
            .collect(),
    }
}

fn entries(store: &Store, cache: &mut ViewCache, alive: &[bool]) -> ViewEntries {
    view_entries(
        store,
        cache,
        |o| {
            OWNERS
                .iter()
                .zip(alive)
                .any(|(a, live)| *live && owner_is(o, a))
        },
        |_| true,
    )
}

fn owner_is(o: &SocketAddr, a: &str) -> bool {
    a.parse::<SocketAddr>().is_ok_and(|a| a == *o)
}

fn service(v: &ViewEntries, name: usize) -> Option<&Arc<[ViewEntry]>> {
    v.service(&ServiceName::new(SERVICES[name]).expect("name"))
}

#[test]
fn a_change_rebuilds_only_its_service() {
    let mut store = Store::default();
    store
        .snapshots
        .merge(snapshot(0, 10, &[1, 2]), crate::LOWER_BOUNDS_BEFORE_MS);
    store
        .snapshots
        .merge(snapshot(2, 10, &[1]), crate::LOWER_BOUNDS_BEFORE_MS);
    let mut cache = ViewCache::default();
    let alive = [true, true, true];
    let first = entries(&store, &mut cache, &alive);
    // A row for `web` moves `web` only.
    store.rows.merge(
        Row::new(
            owner(0),
            ep(2, 5).key(),
            RowStatus::Up(ep(2, 5).into()),
            Version { epoch: 1, seq: 1 },
        ),
        0,
    );
    let second = entries(&store, &mut cache, &alive);
    let (api1, api2) = (
        service(&first, 0).expect("api"),
        service(&second, 0).expect("api"),
    );
    assert!(
        Arc::ptr_eq(api1, api2),
        "api did not change and was not rebuilt"
    );
    assert_eq!(service(&second, 2).map(|s| s.len()), Some(2));
    // A newer snapshot of `api` moves `api` only.
    store
        .snapshots
        .merge(snapshot(0, 20, &[1]), crate::LOWER_BOUNDS_BEFORE_MS);
    let third = entries(&store, &mut cache, &alive);
    assert!(Arc::ptr_eq(
        service(&second, 2).expect("web"),
        service(&third, 2).expect("web")
    ));
    assert_eq!(service(&third, 0).map(|s| s.len()), Some(1));
    // The owner going down hides its row: `web` is rebuilt without it.
    let fourth = entries(&store, &mut cache, &[false, true, true]);
    assert_eq!(service(&fourth, 2).map(|s| s.len()), Some(1));
}

/// (service, port, owner, up, seq) rows and (service, ports) snapshots, per step.
type Step = (
    Vec<(usize, u16, usize, bool, u64)>,
    Vec<(usize, Vec<u16>)>,
    Vec<bool>,
);

fn step() -> impl Strategy<Value = Step> {
    (
        proptest::collection::vec(
            (0..3usize, 1u16..5, 0..3usize, any::<bool>(), 1u64..4),
            0..6,
        ),
        proptest::collection::vec((0..3usize, proptest::collection::vec(1u16..5, 0..4)), 0..3),
        proptest::collection::vec(any::<bool>(), 3),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Over random sequences of row and snapshot changes and owners coming and going, the
    /// entries built with the cache equal the entries built from nothing.
    #[test]
    fn cached_entries_equal_entries_from_nothing(steps in proptest::collection::vec(step(), 1..8)) {
        let mut store = Store::default();
        let mut cache = ViewCache::default();
        for (i, (rows, snaps, alive)) in steps.into_iter().enumerate() {
            let t = 10 + i as u64;
            for (s, port, o, up, seq) in rows {
                let status = if up { RowStatus::Up(ep(s, port).into()) } else { RowStatus::Deregistered };
                let version = Version { epoch: 1, seq: seq + t };
                store.rows.merge(Row::new(owner(o), ep(s, port).key(), status, version), 0);
            }
            for (s, ports) in snaps {
                store.snapshots.merge(snapshot(s, t, &ports), crate::LOWER_BOUNDS_BEFORE_MS);
            }
            let cached = entries(&store, &mut cache, &alive);
            let fresh = entries(&store, &mut ViewCache::default(), &alive);
            prop_assert_eq!(&cached, &fresh);
            prop_assert!(cached.services().all(|(_, e)| !e.is_empty()));
        }
    }
}
