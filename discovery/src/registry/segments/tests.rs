use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU16;

use proptest::prelude::*;
use schema::{Endpoint, Revision, ServiceName, Weight};

use super::*;
use crate::decide::policy;
use crate::registry::rows::Rows;

const SERVICES: [&str; 4] = ["api", "db", "tidings-agent", "web"];

fn row(service: &str, host: u8, port: u16, rev: &str, weight: u64, at: u64) -> StoredEndpoint {
    let mut endpoint = Endpoint::new(
        ServiceName::new(service.to_string()).expect("valid name"),
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, host)),
        NonZeroU16::new(port).expect("non-zero port"),
    );
    endpoint.revision = Revision::new(rev.to_string()).expect("valid revision");
    endpoint.tags.load_balancing_weight = Weight::new(weight).expect("valid weight");
    StoredEndpoint {
        endpoint,
        last_check_in_ms: at,
        weight_override: None,
    }
}

/// Rows as a store holds them: one per key, sorted by service then address.
fn sorted(rows: Vec<StoredEndpoint>) -> Vec<StoredEndpoint> {
    let mut rows = policy::visible(rows, 0, std::time::Duration::from_secs(1), true);
    rows.dedup_by(|a, b| a.endpoint.key() == b.endpoint.key());
    rows
}

fn view(rows: &[StoredEndpoint]) -> Rows {
    Rows::from_vec(rows.to_vec())
}

fn catalog() -> Vec<StoredEndpoint> {
    sorted(vec![
        row("api", 1, 80, "a", 100, 5),
        row("api", 2, 80, "a", 100, 6),
        row("db", 3, 5432, "b", 100, 7),
        row("web", 1, 8080, "c", 100, 8),
        row("web", 4, 8080, "c", 100, 9),
    ])
}

#[test]
fn segments_cover_every_service_in_order() {
    let rows = view(&catalog());
    let cut = cut(&rows, None);
    let names: Vec<&str> = cut.segments.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(names, ["api", "db", "web"]);
    let sizes: Vec<usize> = rows.services().iter().map(|s| s.len()).collect();
    assert_eq!(sizes, [2, 1, 2]);
    for (s, list) in cut.segments.iter().zip(rows.services()) {
        assert_eq!(s.hash, content_hash(list));
    }
    assert!(!cut.identical, "nothing to be identical to");
}

#[test]
fn a_change_rehashes_only_its_service() {
    let old = view(&catalog());
    let before = cut(&old, None);
    let mut rows = catalog();
    rows[2].endpoint.revision = Revision::new("b2".to_string()).expect("valid revision");
    let changed = rows[2..3].to_vec();
    let rows = view(&rows);
    let after = cut(&rows, Some((&old, &before.segments)));
    assert!(!after.identical);
    assert_eq!(after.segments[0].hash, before.segments[0].hash);
    assert_ne!(after.segments[1].hash, before.segments[1].hash);
    assert_eq!(after.segments[1].hash, content_hash(&changed));
    assert_eq!(after.segments[2].hash, before.segments[2].hash);
    assert_ne!(index(&after.segments), index(&before.segments));
}

#[test]
fn check_in_times_move_nothing_but_identity() {
    let old = view(&catalog());
    let before = cut(&old, None);
    let same = cut(&old, Some((&old, &before.segments)));
    assert!(same.identical);
    assert_eq!(same.segments, before.segments);
    let copied = cut(&view(&catalog()), Some((&old, &before.segments)));
    assert!(
        copied.identical,
        "equal rows in new lists are still the same view"
    );

    let mut renewed = catalog();
    renewed[4].last_check_in_ms += 60_000;
    let after = cut(&view(&renewed), Some((&old, &before.segments)));
    assert!(
        !after.identical,
        "a renewed check-in time is part of the view"
    );
    assert_eq!(after.segments, before.segments);
    assert_eq!(index(&after.segments), index(&before.segments));

    let mut overridden = catalog();
    overridden[0].weight_override = Some(Weight::new(100).expect("valid weight"));
    let after = cut(&view(&overridden), Some((&old, &before.segments)));
    assert!(!after.identical, "an override is part of the view");
}

#[test]
fn removed_and_added_services_are_not_identical() {
    let old = view(&catalog());
    let before = cut(&old, None);
    let fewer: Vec<StoredEndpoint> = catalog()
        .into_iter()
        .filter(|r| r.endpoint.service.as_str() != "db")
        .collect();
    let fewer = view(&fewer);
    let after = cut(&fewer, Some((&old, &before.segments)));
    assert!(!after.identical);
    assert_eq!(after.segments.len(), 2);
    assert_eq!(after.segments[1].hash, before.segments[2].hash);
    let back = cut(&old, Some((&fewer, &after.segments)));
    assert!(!back.identical);
    assert_eq!(back.segments, before.segments);
}

#[test]
fn index_is_a_nonzero_53_bit_value_even_when_empty() {
    let empty = cut(&Rows::default(), None);
    assert!(empty.segments.is_empty());
    let i = index(&empty.segments);
    assert!((1..1 << 53).contains(&i));
    assert_ne!(i, index(&cut(&view(&catalog()), None).segments));
}

#[test]
fn shared_lists_are_taken_as_they_are_and_the_rest_compared() {
    let old = view(&catalog());
    let before = cut(&old, None);
    // A store's next answer: "api" and "web" the same allocations, "db" a new one.
    let mut db = old.services()[1].to_vec();
    db[0].endpoint.port = NonZeroU16::new(5433).expect("non-zero port");
    let next = Rows::from_services(vec![
        old.services()[0].clone(),
        db.clone().into(),
        old.services()[2].clone(),
    ]);
    let after = cut(&next, Some((&old, &before.segments)));
    assert!(!after.identical);
    assert_eq!(after.segments[0], before.segments[0]);
    assert_eq!(after.segments[1].hash, content_hash(&db));
    assert_eq!(after.segments[2], before.segments[2]);
    let all_shared = Rows::from_services(old.services().to_vec());
    assert!(cut(&all_shared, Some((&old, &before.segments))).identical);
}

#[test]
fn rows_find_keys_and_iterate_in_order() {
    let rows = view(&catalog());
    assert_eq!(rows.len(), 5);
    let keys: Vec<_> = rows.iter().map(|r| r.endpoint.key()).collect();
    let mut sorted_keys = keys.clone();
    sorted_keys.sort();
    assert_eq!(keys, sorted_keys);
    for r in &catalog() {
        assert!(rows.contains(&r.endpoint));
    }
    let absent = row("db", 9, 5432, "b", 100, 0);
    assert!(!rows.contains(&absent.endpoint));
    assert!(!rows.contains(&row("zzz", 1, 80, "a", 100, 0).endpoint));
    assert!(!Rows::default().contains(&absent.endpoint));
}

fn arb_rows() -> impl Strategy<Value = Vec<StoredEndpoint>> {
    let one = (
        0..SERVICES.len(),
        1u8..6,
        1u16..3,
        0..3usize,
        1u64..3,
        0u64..4,
    );
    proptest::collection::vec(one, 0..20).prop_map(|v| {
        sorted(
            v.into_iter()
                .map(|(s, h, p, rev, w, at)| {
                    row(SERVICES[s], h, p, ["r0", "r1", "r2"][rev], w * 40, at)
                })
                .collect(),
        )
    })
}

proptest! {
    /// Reusing hashes from any previous view gives exactly what hashing from scratch gives,
    /// and `identical` is exactly row equality.
    #[test]
    fn reuse_matches_a_fresh_cut(old in arb_rows(), new in arb_rows()) {
        let (old, new) = (view(&old), view(&new));
        let before = cut(&old, None);
        let reused = cut(&new, Some((&old, &before.segments)));
        let fresh = cut(&new, None);
        prop_assert_eq!(&reused.segments, &fresh.segments);
        prop_assert_eq!(reused.identical, old == new);
        // Equal content (check-in times aside) is an equal index, and only then.
        let strip = |rows: &Rows| rows.iter().map(|r| r.endpoint.clone()).collect::<Vec<_>>();
        prop_assert_eq!(index(&before.segments) == index(&fresh.segments), strip(&old) == strip(&new));
    }
}
