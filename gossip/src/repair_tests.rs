use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;

use schema::{Endpoint, ServiceName};

use super::*;
use crate::snapshot::SnapshotEntry;

const DAY: u64 = 1_800_000_000_000;

fn snap(at: u64, checked_in: u64, ports: &[u16]) -> Snapshot {
    let service = ServiceName::new("web").unwrap();
    let entries = ports
        .iter()
        .map(|&p| SnapshotEntry {
            endpoint: Endpoint::new(
                service.clone(),
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                NonZeroU16::new(p).unwrap(),
            )
            .into(),
            last_check_in_ms: checked_in,
        })
        .collect();
    Snapshot {
        service,
        generated_at_ms: at,
        entries,
    }
}

fn store(s: Snapshot) -> Store {
    let mut store = Store {
        now_ms: DAY + 10_000,
        ..Store::default()
    };
    assert_eq!(
        store.snapshots.merge(s, DAY + 10_000),
        crate::snapshot::SnapshotMerge::Applied
    );
    store
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, n)), 7702)
}

/// What `holder` sends `asker` in a repair over every bucket.
fn sent(holder: &Store, asker: &Store) -> Vec<Snapshot> {
    let req = RepairRequest {
        from: addr(1),
        buckets: (0..DIGEST_BUCKETS as u8).collect(),
        owners: Vec::new(),
        snapshots: asker.snapshots.iter().map(|(_, s)| s.clone()).collect(),
    };
    respond(holder, addr(2), &req).snapshots
}

/// Two agents fetched the same hosts at different moments: their copies differ in date
/// and check-in times, and repair has nothing to do.
#[test]
fn copies_listing_the_same_hosts_are_not_repaired() {
    let early = store(snap(DAY, DAY - 5_000, &[80, 81]));
    let late = store(snap(DAY + 700, DAY + 600, &[81, 80]));
    assert_eq!(Digest::of(&early), Digest::of(&late));
    assert!(sent(&late, &early).is_empty());
    assert!(sent(&early, &late).is_empty());
}

/// Copies whose hosts differ still repair, newest first.
#[test]
fn a_copy_with_other_hosts_is_sent_when_newer() {
    let old = store(snap(DAY, DAY, &[80, 81]));
    let new = store(snap(DAY + 700, DAY, &[80, 81, 82]));
    assert_ne!(Digest::of(&old), Digest::of(&new));
    let pushed = sent(&new, &old);
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0].entries.len(), 3);
    assert!(sent(&old, &new).is_empty(), "the older copy is not sent");
}

/// A change younger than the registry's own spread is left to the registry for a peer
/// that holds the service, and sent once older; a peer without it gets it at once.
#[test]
fn a_fresh_change_is_left_to_the_registry_for_a_while() {
    let old = store(snap(DAY, DAY, &[80]));
    let mut new = store(snap(DAY + 9_000, DAY, &[80, 81]));
    assert!(
        sent(&new, &old).is_empty(),
        "1 s old: on its way from the registry"
    );
    new.now_ms = DAY + 9_000 + REGISTRY_SPREAD_MS;
    assert_eq!(sent(&new, &old).len(), 1);
    new.now_ms = DAY + 10_000;
    let mut empty = store(snap(DAY, DAY, &[80]));
    empty.snapshots = Default::default();
    assert_eq!(
        sent(&new, &empty).len(),
        1,
        "a peer without the service gets it"
    );
}

/// A node that has fetched a change and one that has not yet agree while the change is
/// younger than the registry's spread (no repair exchange at all), and differ once it
/// is older, when repair sends it.
#[test]
fn a_change_in_flight_counts_as_the_hosts_it_replaced() {
    let behind = store(snap(DAY, DAY, &[80]));
    let mut ahead = store(snap(DAY, DAY, &[80]));
    let fetched_at = DAY + 9_500;
    assert_eq!(
        ahead
            .snapshots
            .merge(snap(fetched_at, DAY, &[80, 81]), fetched_at),
        crate::snapshot::SnapshotMerge::Applied
    );
    assert_eq!(Digest::of(&ahead), Digest::of(&behind));
    // A later copy of the same hosts does not restart the clock.
    let refetched = snap(fetched_at + 1_500, DAY, &[81, 80]);
    assert_eq!(
        ahead.snapshots.merge(refetched, fetched_at + 1_500),
        crate::snapshot::SnapshotMerge::Applied
    );
    for now in [fetched_at + REGISTRY_SPREAD_MS, fetched_at + 60_000] {
        ahead.now_ms = now;
        let mut behind = store(snap(DAY, DAY, &[80]));
        behind.now_ms = now;
        assert_ne!(Digest::of(&ahead), Digest::of(&behind), "at {now}");
    }
    // The snapshot itself goes once the copy held is past the spread too (by its own date).
    assert_eq!(sent(&ahead, &behind).len(), 1);
}

/// Changes made one after another while the first is in flight hide it no longer than
/// one spread from the first: a node cut off from the registry is repaired in time.
#[test]
fn a_burst_of_changes_is_hidden_one_spread_at_most() {
    let behind = store(snap(DAY, DAY, &[80]));
    let mut ahead = store(snap(DAY, DAY, &[80]));
    let first = DAY + 9_000;
    for (i, at) in (first..first + 3 * REGISTRY_SPREAD_MS)
        .step_by(500)
        .enumerate()
    {
        let port = 81 + u16::try_from(i).unwrap();
        ahead.snapshots.merge(snap(at, DAY, &[80, port]), at);
        ahead.now_ms = at;
        let hidden = at < first + REGISTRY_SPREAD_MS;
        assert_eq!(Digest::of(&ahead) == Digest::of(&behind), hidden, "at {at}");
    }
}

/// A service new to a node counts for nothing while in flight (as on a node without
/// it), and for its hosts after.
#[test]
fn a_new_service_in_flight_counts_for_nothing() {
    let mut empty = store(snap(DAY, DAY, &[80]));
    empty.snapshots = Default::default();
    let mut fresh = store(snap(DAY + 9_500, DAY, &[80]));
    fresh.snapshots = Default::default();
    fresh
        .snapshots
        .merge(snap(DAY + 9_500, DAY, &[80]), DAY + 9_500);
    assert_eq!(Digest::of(&fresh), Digest::of(&empty));
    fresh.now_ms = DAY + 9_500 + REGISTRY_SPREAD_MS;
    assert_ne!(Digest::of(&fresh), Digest::of(&empty));
}

fn differs(receiver: &Store, sender: &Store) -> bool {
    !Digest::differing(receiver, &Digest::of(sender).buckets)
        .unwrap()
        .is_empty()
}

/// Agents date a change by their own fetch, so one may be past its spread while another
/// still counts the change as in flight: a receiver does not take that for a difference.
/// A node that never fetched the change differs from one past its spread, and past two
/// spreads only the hosts held count.
#[test]
fn nodes_past_and_within_the_spread_agree_and_a_node_without_the_change_does_not() {
    let fetch = |at: u64| {
        let mut s = store(snap(DAY, DAY, &[80]));
        s.snapshots.merge(snap(at, DAY, &[80, 81]), at);
        s
    };
    let (mut early, mut late) = (fetch(DAY + 7_600), fetch(DAY + 8_500));
    let mut blind = store(snap(DAY, DAY, &[80]));
    for s in [&mut early, &mut late, &mut blind] {
        s.now_ms = DAY + 8_500 + REGISTRY_SPREAD_MS - 100;
    }
    // `early` is past its spread, `late` is not.
    assert_ne!(Digest::of(&early), Digest::of(&late));
    assert!(!differs(&late, &early) && !differs(&early, &late));
    assert!(
        !differs(&blind, &late),
        "within the spread: the registry's turn"
    );
    assert!(differs(&blind, &early), "past it: repair's");
    for s in [&mut early, &mut late, &mut blind] {
        s.now_ms = DAY + 8_500 + 2 * REGISTRY_SPREAD_MS;
    }
    assert!(differs(&early, &blind) && differs(&late, &blind));
    assert!(!differs(&early, &late) && !differs(&late, &early));
}

/// A node from before in-flight changes sends the hosts it holds: a new node holding
/// the same hosts sees no difference, even while it counts its change as in flight.
#[test]
fn a_node_from_before_sends_digests_new_nodes_match() {
    let mut new = store(snap(DAY, DAY, &[80]));
    new.snapshots
        .merge(snap(DAY + 9_500, DAY, &[80, 81]), DAY + 9_500);
    let old_form = Digest::counting_changes_younger_than(&new, 0);
    assert_ne!(old_form, Digest::of(&new));
    assert!(
        Digest::differing(&new, &old_form.buckets)
            .unwrap()
            .is_empty()
    );
}

/// A lower bound listing the same hosts as a dated copy still gives way to it.
#[test]
fn a_lower_bound_is_repaired_even_with_the_same_hosts() {
    let lower = store(snap(crate::LOWER_BOUND_MS, DAY, &[80]));
    let dated = store(snap(DAY, DAY, &[80]));
    assert_ne!(Digest::of(&lower), Digest::of(&dated));
    assert_eq!(sent(&dated, &lower).len(), 1);
}

/// Two different lower bounds travel both ways, whichever is dated later, and each side
/// adds the other's up: both end with every host either listed.
#[test]
fn different_lower_bounds_are_repaired_both_ways_into_their_union() {
    let lower = crate::LOWER_BOUND_MS;
    let mut fuller = store(snap(lower, DAY, &[80, 81, 82]));
    let mut later = store(snap(lower + 5, DAY, &[81]));
    let (to_later, to_fuller) = (sent(&fuller, &later), sent(&later, &fuller));
    assert_eq!((to_later.len(), to_fuller.len()), (1, 1));
    for s in to_later {
        later.snapshots.merge(s, DAY + 10_000);
    }
    for s in to_fuller {
        fuller.snapshots.merge(s, DAY + 10_000);
    }
    let ports = |s: &Store| -> Vec<u16> {
        let held = s.snapshots.get(&ServiceName::new("web").unwrap()).unwrap();
        held.entries.iter().map(|e| e.endpoint.port.get()).collect()
    };
    assert_eq!(ports(&fuller), vec![80, 81, 82]);
    assert_eq!(ports(&later), vec![80, 81, 82]);
    assert!(sent(&fuller, &later).is_empty() && sent(&later, &fuller).is_empty());
}
