#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;

use proptest::prelude::*;
use schema::{Revision, Weight};

use super::*;
use crate::conformance::{T0, ep};

fn row(ip: &str, t: u64, revision: &str, weight: Option<u8>) -> StoredEndpoint {
    let mut endpoint = ep("web", ip, 80);
    endpoint.revision = Revision::new(revision).unwrap();
    let weight_override = weight.map(|w| Weight::new(u64::from(w)).unwrap());
    if let Some(w) = weight_override {
        endpoint.tags.load_balancing_weight = w;
    }
    StoredEndpoint {
        endpoint,
        last_check_in_ms: t,
        weight_override,
    }
}

fn upsert(r: &StoredEndpoint, version: u64) -> Change {
    Change::Upsert {
        row: r.clone(),
        version,
    }
}

fn remove(r: &StoredEndpoint, version: u64) -> Change {
    Change::Remove {
        key: r.endpoint.key(),
        stamp: Stamp {
            last_check_in_ms: r.last_check_in_ms,
            version,
        },
    }
}

#[test]
fn an_older_upsert_is_ignored_and_a_newer_one_replaces() {
    let mut m = Mirror::default();
    let new = row("10.0.0.1", T0 + 10, "b", None);
    assert!(m.apply(upsert(&new, 2), Origin::Echo, 0));
    assert!(!m.apply(
        upsert(&row("10.0.0.1", T0, "a", None), 1),
        Origin::Stream,
        0
    ));
    assert_eq!(m.list_all(), std::slice::from_ref(&new));
    // A renewal is no visible change, but it is held.
    let renewed = row("10.0.0.1", T0 + 20, "b", None);
    assert!(!m.apply(upsert(&renewed, 3), Origin::Stream, 0));
    assert_eq!(m.list_all(), [renewed]);
}

#[test]
fn a_weight_set_at_the_same_check_in_time_wins_by_version() {
    let mut m = Mirror::default();
    let plain = row("10.0.0.1", T0, "a", None);
    let weighted = row("10.0.0.1", T0, "a", Some(7));
    assert!(m.apply(upsert(&plain, 1), Origin::Stream, 0));
    assert!(m.apply(upsert(&weighted, 2), Origin::Echo, 0));
    // The stream re-delivers the check-in's record after the weight's echo.
    assert!(!m.apply(upsert(&plain, 1), Origin::Stream, 0));
    assert_eq!(m.list_all(), [weighted]);
}

#[test]
fn a_remove_of_an_older_image_keeps_the_row_written_after() {
    let mut m = Mirror::default();
    let old = row("10.0.0.1", T0, "a", None);
    let again = row("10.0.0.1", T0 + 5, "a", None);
    m.apply(upsert(&again, 1), Origin::Echo, 0);
    assert!(!m.apply(remove(&old, 3), Origin::Stream, 0));
    assert_eq!(m.list_all(), std::slice::from_ref(&again));
    assert!(m.apply(remove(&again, 1), Origin::Stream, 0));
    assert!(m.is_empty());
}

#[test]
fn a_remove_is_not_undone_by_a_late_record_of_the_row() {
    let mut m = Mirror::default();
    let r = row("10.0.0.1", T0, "a", None);
    m.apply(upsert(&r, 1), Origin::Echo, 0);
    assert!(m.apply(remove(&r, 1), Origin::Echo, 0));
    // The stream has not delivered the insert yet; it comes now, then the remove.
    assert!(!m.apply(upsert(&r, 1), Origin::Stream, 0));
    assert!(m.is_empty());
    m.apply(remove(&r, 1), Origin::Stream, 0);
    // A later re-creation is taken at once.
    let back = row("10.0.0.1", T0 + 1, "a", None);
    assert!(m.apply(upsert(&back, 1), Origin::Stream, 0));
    assert_eq!(m.list_service(&back.endpoint.service), [back]);
}

#[test]
fn echoes_made_during_a_scan_are_replayed_over_it() {
    let mut m = Mirror::default();
    m.begin_scan();
    let written = row("10.0.0.2", T0 + 5, "a", None);
    m.apply(upsert(&written, 1), Origin::Echo, 0);
    // The scan passed 10.0.0.2 before it was written.
    let scanned = row("10.0.0.1", T0, "a", None);
    assert!(m.finish_scan(vec![(scanned.clone(), 1)], 0));
    assert_eq!(m.list_all(), [scanned, written]);
}

#[test]
fn services_and_repos_are_listed_apart() {
    let mut m = Mirror::default();
    let mut api = ep("api", "10.0.0.1", 80);
    api.service_repo_name = Some(schema::RepoName::new("lyft/api").unwrap());
    let api = StoredEndpoint {
        endpoint: api,
        last_check_in_ms: T0,
        weight_override: None,
    };
    let web = row("10.0.0.1", T0, "a", None);
    m.apply(upsert(&web, 1), Origin::Stream, 0);
    m.apply(upsert(&api, 1), Origin::Stream, 0);
    assert_eq!(
        m.list_service(&web.endpoint.service),
        std::slice::from_ref(&web)
    );
    assert_eq!(
        m.list_service(&api.endpoint.service),
        std::slice::from_ref(&api)
    );
    assert_eq!(m.list_repo("lyft/api"), [api]);
    assert_eq!(m.len(), 2);
}

#[test]
fn shared_lists_are_replaced_only_for_the_services_changed() {
    let mut m = Mirror::default();
    let api = StoredEndpoint {
        endpoint: ep("api", "10.0.0.1", 80),
        last_check_in_ms: T0,
        weight_override: None,
    };
    let web = row("10.0.0.1", T0, "a", None);
    m.apply(upsert(&api, 1), Origin::Stream, 0);
    m.apply(upsert(&web, 1), Origin::Stream, 0);
    let first = m.list_all_shared();
    assert_eq!(first.len(), 2);
    assert_eq!(*first[0], *std::slice::from_ref(&api));
    assert_eq!(*first[1], *std::slice::from_ref(&web));

    let web2 = row("10.0.0.2", T0, "a", None);
    m.apply(upsert(&web2, 1), Origin::Echo, 0);
    let second = m.list_all_shared();
    assert!(
        std::sync::Arc::ptr_eq(&first[0], &second[0]),
        "api untouched: shared"
    );
    assert_eq!(*second[1], [web.clone(), web2.clone()]);

    // A removal empties "api": its list goes, "web" keeps its own.
    m.apply(remove(&api, 1), Origin::Stream, 0);
    let third = m.list_all_shared();
    assert_eq!(third.len(), 1);
    assert!(std::sync::Arc::ptr_eq(&second[1], &third[0]));

    // A rescan replaces everything.
    m.begin_scan();
    m.finish_scan(vec![(web.clone(), 2)], 1);
    let fourth = m.list_all_shared();
    assert_eq!(*fourth[0], [web]);
}

// ---- convergence ---------------------------------------------------------------------------

/// One write to the table, by this replica (`mine`: echoed) or another.
#[derive(Debug, Clone)]
enum Op {
    CheckIn { key: u8, revision: u8 },
    SetWeight { key: u8, weight: u8 },
    Delete { key: u8 },
}

fn op() -> impl Strategy<Value = (Op, bool)> {
    let key = 0u8..3;
    let op = prop_oneof![
        (key.clone(), 0u8..3).prop_map(|(key, revision)| Op::CheckIn { key, revision }),
        (key.clone(), 1u8..4).prop_map(|(key, weight)| Op::SetWeight { key, weight }),
        key.prop_map(|key| Op::Delete { key }),
    ];
    (op, any::<bool>())
}

/// Runs `ops` against a model table: the stream records per key, in order, and this
/// replica's echoes; then the table's final rows.
type Table = BTreeMap<u8, (StoredEndpoint, u64)>;

fn play(ops: &[(Op, bool)]) -> (BTreeMap<u8, Vec<Change>>, Vec<Change>, Table) {
    let mut table: Table = BTreeMap::new();
    let mut records: BTreeMap<u8, Vec<Change>> = BTreeMap::new();
    let mut echoes = Vec::new();
    for (i, (op, mine)) in ops.iter().enumerate() {
        // One clock for the whole table, moving on at every write.
        let now = T0 + i as u64;
        let ip = |key: u8| format!("10.0.0.{key}");
        let change = match op {
            Op::CheckIn { key, revision } => {
                let (weight, version) = match table.get(key) {
                    Some((r, v)) => (r.weight_override.map(|w| w.get()), v + 1),
                    None => (None, 1),
                };
                let new = row(&ip(*key), now, &format!("r{revision}"), weight);
                table.insert(*key, (new.clone(), version));
                Some((*key, upsert(&new, version)))
            }
            Op::SetWeight { key, weight } => table.get_mut(key).map(|(r, v)| {
                *r = row(
                    &ip(*key),
                    r.last_check_in_ms,
                    r.endpoint.revision.as_str(),
                    Some(*weight),
                );
                *v += 1;
                (*key, upsert(r, *v))
            }),
            Op::Delete { key } => table.remove(key).map(|(r, v)| (*key, remove(&r, v))),
        };
        if let Some((key, change)) = change {
            records.entry(key).or_default().push(change.clone());
            if *mine {
                echoes.push(change);
            }
        }
    }
    (records, echoes, table)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Records delivered in order per key (each key's queue at its own pace, some delivered
    /// twice), the replica's own echoes at any moment: the mirror ends as the table is.
    #[test]
    fn the_mirror_converges_to_the_table(
        ops in prop::collection::vec(op(), 0..40),
        picks in prop::collection::vec(any::<u16>(), 0..200),
        redeliver in prop::collection::vec((0u8..3, 0usize..3), 0..4),
    ) {
        let (records, mut echoes, table) = play(&ops);
        let mut queues: Vec<(u8, std::collections::VecDeque<Change>)> = records
            .into_iter()
            .map(|(k, q)| (k, q.into()))
            .collect();
        // Some keys' last few records come again (a batch fetched twice), in order.
        for (key, n) in redeliver {
            if let Some((_, q)) = queues.iter_mut().find(|(k, _)| *k == key) {
                let again: Vec<Change> = q.iter().rev().take(n).rev().cloned().collect();
                q.extend(again);
            }
        }
        let mut m = Mirror::default();
        let mut picks = picks.into_iter();
        loop {
            let mut sources: Vec<usize> = (0..queues.len()).filter(|&i| !queues[i].1.is_empty()).collect();
            if !echoes.is_empty() {
                sources.push(usize::MAX);
            }
            if sources.is_empty() {
                break;
            }
            let pick = picks.next().unwrap_or(0) as usize;
            if pick % 3 == 0 {
                // Hand out shared lists now and then: later changes must replace them.
                m.list_all_shared();
            }
            match sources[pick % sources.len()] {
                usize::MAX => {
                    let e = echoes.remove(pick % echoes.len());
                    m.apply(e, Origin::Echo, 0);
                }
                i => {
                    let c = queues[i].1.pop_front().unwrap();
                    m.apply(c, Origin::Stream, 0);
                }
            }
        }
        let want: Vec<StoredEndpoint> = table.into_values().map(|(r, _)| r).collect();
        prop_assert_eq!(m.list_all(), want.clone());
        let shared: Vec<StoredEndpoint> = m.list_all_shared().iter().flat_map(|l| l.iter().cloned()).collect();
        prop_assert_eq!(shared, want);
    }
}
