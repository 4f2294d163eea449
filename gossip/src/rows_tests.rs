use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;

use proptest::prelude::*;
use schema::{Endpoint, ServiceName};

use super::*;

fn owner(i: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)), 7702)
}

fn endpoint(svc: u8, port: u16) -> Endpoint {
    let service = ServiceName::new(format!("svc{svc}")).unwrap();
    Endpoint::new(
        service,
        IpAddr::V4(Ipv4Addr::new(10, 1, 0, svc)),
        NonZeroU16::new(port).unwrap(),
    )
}

/// A row as an honest owner would write it: the value is a function of
/// (owner, key, version), because an owner never reuses a version.
fn arb_row() -> impl Strategy<Value = Row> {
    (0u8..3, 0u8..3, 1u16..4, 0u64..3, 0u64..6).prop_map(|(o, svc, port, epoch, seq)| {
        let ep = endpoint(svc, port);
        let status = if (seq + u64::from(o)) % 3 == 0 {
            RowStatus::Deregistered
        } else {
            RowStatus::Up(ep.clone().into())
        };
        Row::new(owner(o), ep.key(), status, Version { epoch, seq })
    })
}

fn apply(rows: &[Row]) -> RowStore {
    let mut s = RowStore::default();
    for r in rows {
        s.merge(r.clone(), 0);
    }
    s
}

fn state(s: &RowStore) -> (Vec<Row>, Vec<Option<OwnerSummary>>) {
    let owners: Vec<_> = (0..3).map(owner).collect();
    (s.all_rows(), owners.iter().map(|o| s.summary(o)).collect())
}

/// Merging stores = applying every row of one store to the other.
fn join(a: &RowStore, b: &RowStore) -> RowStore {
    let mut out = a.clone();
    for r in b.all_rows() {
        out.merge(r, 0);
    }
    out
}

proptest! {
    #[test]
    fn merge_is_commutative_associative_idempotent(
        a in proptest::collection::vec(arb_row(), 0..12),
        b in proptest::collection::vec(arb_row(), 0..12),
        c in proptest::collection::vec(arb_row(), 0..12),
    ) {
        let (sa, sb, sc) = (apply(&a), apply(&b), apply(&c));
        prop_assert_eq!(state(&join(&sa, &sb)).0, state(&join(&sb, &sa)).0);
        prop_assert_eq!(
            state(&join(&join(&sa, &sb), &sc)).0,
            state(&join(&sa, &join(&sb, &sc))).0
        );
        prop_assert_eq!(state(&join(&sa, &sa)).0, state(&sa).0);
    }

    #[test]
    fn any_subset_in_any_order_converges(
        rows in proptest::collection::vec(arb_row(), 1..24),
        order in any::<u64>(),
        keep in proptest::collection::vec(any::<bool>(), 24),
    ) {
        let full = apply(&rows);
        // A subset applied in a shuffled order, then the rest: same final state.
        let mut shuffled = rows.clone();
        let n = shuffled.len();
        for i in 0..n {
            let j = (order.wrapping_mul(i as u64 + 7) % n as u64) as usize;
            shuffled.swap(i, j);
        }
        let (first, rest): (Vec<_>, Vec<_>) = shuffled.iter().cloned().enumerate().partition(|(i, _)| keep[*i]);
        let mut s = RowStore::default();
        for (_, r) in first.into_iter().chain(rest) {
            s.merge(r, 0);
        }
        prop_assert_eq!(state(&s), state(&full));
    }
}

#[test]
fn older_epochs_are_dropped_and_refused() {
    let ep = endpoint(1, 1);
    let mut s = RowStore::default();
    let old = Row::new(
        owner(1),
        ep.key(),
        RowStatus::Up(ep.clone().into()),
        Version { epoch: 5, seq: 9 },
    );
    assert_eq!(s.merge(old.clone(), 0), Merge::Applied);
    let other = endpoint(2, 1);
    let new = Row::new(
        owner(1),
        other.key(),
        RowStatus::Up(other.into()),
        Version { epoch: 6, seq: 1 },
    );
    assert_eq!(s.merge(new, 0), Merge::Applied);
    assert_eq!(s.len(), 1, "the previous process' rows are gone");
    assert_eq!(s.merge(old, 0), Merge::Stale);
    s.observe_epoch(owner(1), 7);
    assert!(s.is_empty());
}

#[test]
fn inconsistent_rows_are_refused() {
    let ep = endpoint(1, 1);
    let row = Row::new(
        owner(1),
        endpoint(1, 2).key(),
        RowStatus::Up(ep.into()),
        Version { epoch: 1, seq: 1 },
    );
    assert_eq!(RowStore::default().merge(row, 0), Merge::Invalid);
}

#[test]
fn tombstones_are_collected_and_not_resurrected() {
    let ep = endpoint(1, 1);
    let up = Row::new(
        owner(1),
        ep.key(),
        RowStatus::Up(ep.clone().into()),
        Version { epoch: 1, seq: 1 },
    );
    let tomb = Row::new(
        owner(1),
        ep.key(),
        RowStatus::Deregistered,
        Version { epoch: 1, seq: 2 },
    );
    let mut s = RowStore::default();
    s.merge(up.clone(), 0);
    let before = s.summary(&owner(1)).unwrap();
    s.merge(tomb, 10);
    let after = s.summary(&owner(1)).unwrap();
    assert_ne!(before, after);
    let peers: BTreeSet<_> = [owner(2)].into();
    s.gc_tombstones(20, 1_000, owner(9), &peers, &BTreeSet::new());
    assert_eq!(s.len(), 1, "not every peer has it yet");
    s.mark_synced(&owner(1), owner(2));
    s.gc_tombstones(20, 1_000, owner(9), &peers, &BTreeSet::new());
    assert!(s.is_empty());
    assert_eq!(
        s.summary(&owner(1)).unwrap(),
        after,
        "dropping a tombstone keeps the summary"
    );
    assert_eq!(s.merge(up, 30), Merge::Stale, "no resurrection");
    // Retention alone also drops them.
    let mut s = RowStore::default();
    s.merge(
        Row::new(
            owner(3),
            ep.key(),
            RowStatus::Deregistered,
            Version { epoch: 1, seq: 1 },
        ),
        0,
    );
    s.gc_tombstones(999, 1_000, owner(9), &BTreeSet::new(), &BTreeSet::new());
    assert_eq!(s.len(), 1);
    s.gc_tombstones(1_000, 1_000, owner(9), &BTreeSet::new(), &BTreeSet::new());
    assert!(s.is_empty());
}
