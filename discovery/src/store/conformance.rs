//! The store conformance suite: **test support**, public so that every [`Store`] (the
//! in-memory one, the DynamoDB one, any future one) is held to the same behaviour by the same
//! code (docs/ARCHITECTURE.md#stores). It panics on the first broken expectation, naming the case.
//!
//! ```
//! # tokio::runtime::Runtime::new().expect("runtime").block_on(async {
//! discovery::conformance::run_all(|| async { discovery::MemoryStore::new() }).await;
//! # });
//! ```
//!
//! Each case gets a fresh, empty store from the factory, so cases can use `list_all` and
//! `delete_expired` without seeing each other's rows.

use std::future::Future;
use std::net::IpAddr;
use std::num::NonZeroU16;

use schema::{Endpoint, RepoName, Revision, ServiceName, TagKey, TagValue, Weight};

use crate::store::{Store, StoredEndpoint};

/// A plausible registry clock (epoch ms), so `expires_at` arithmetic sees real magnitudes.
pub const T0: u64 = 1_767_225_600_000;

/// Runs every case, each on a store fresh from `new_store`.
pub async fn run_all<S, F, Fut>(mut new_store: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            eprintln!("conformance: {}", stringify!($case));
            $case(&new_store().await).await;
        )*};
    }
    cases!(
        check_in_and_read_back,
        re_check_in_changes_nothing,
        changes_are_reported_and_tags_can_be_removed,
        backwards_check_in_is_ignored,
        duplicate_keys_in_one_check_in,
        weight_override_survives_check_ins,
        ipv6_and_ports_are_part_of_the_key,
        deregister_with_and_without_port,
        delete_expired_is_bounded_and_spares_fresh_rows,
        list_repo_finds_rows_by_repo,
        reads_span_many_pages,
        merging_check_in_keeps_tags_it_does_not_name,
    );
}

// ---- helpers ------------------------------------------------------------------------------

pub fn svc(name: &str) -> ServiceName {
    ServiceName::new(name).expect("test service name")
}

pub fn ip(text: &str) -> IpAddr {
    text.parse().expect("test ip")
}

fn port(p: u16) -> NonZeroU16 {
    NonZeroU16::new(p).expect("test port")
}

/// An endpoint with revision `r1`, zone `us-east-1a` and one free-form tag.
pub fn ep(service: &str, addr: &str, p: u16) -> Endpoint {
    let mut e = Endpoint::new(svc(service), ip(addr), port(p));
    e.revision = Revision::new("r1").expect("revision");
    e.tags.az = Some(TagValue::new("us-east-1a").expect("az"));
    e.tags
        .extra
        .insert(tag_key("team"), TagValue::new("edge").expect("tag"));
    e
}

fn tag_key(k: &str) -> TagKey {
    TagKey::new(k).expect("tag key")
}

fn weight(w: u64) -> Weight {
    Weight::new(w).expect("weight")
}

/// Rows sorted by key, so stores may return them in any order.
fn sorted(mut rows: Vec<StoredEndpoint>) -> Vec<StoredEndpoint> {
    rows.sort_by_key(|r| r.endpoint.key());
    rows
}

/// The rows of `service`, checked against what [`Store::list_all_shared`] holds for it (a
/// store that shares unchanged services must notice every write: each case reads after its
/// writes, so each write is checked).
async fn list<S: Store>(store: &S, service: &str) -> Vec<StoredEndpoint> {
    let rows = sorted(
        store
            .list_service(&svc(service))
            .await
            .expect("list_service"),
    );
    let shared: Vec<StoredEndpoint> = shared(store)
        .await
        .into_iter()
        .filter(|r| r.endpoint.service.as_str() == service)
        .collect();
    assert_eq!(shared, rows, "list_all_shared disagrees with list_service");
    rows
}

/// Every row, checked against [`Store::list_all_shared`].
async fn all<S: Store>(store: &S) -> Vec<StoredEndpoint> {
    let rows = sorted(store.list_all().await.expect("list_all"));
    assert_eq!(
        shared(store).await,
        rows,
        "list_all_shared disagrees with list_all"
    );
    rows
}

/// [`Store::list_all_shared`] flattened, after checking its shape: services in name order,
/// none empty, each in key order.
async fn shared<S: Store>(store: &S) -> Vec<StoredEndpoint> {
    let lists = store.list_all_shared().await.expect("list_all_shared");
    let names: Vec<&ServiceName> = lists
        .iter()
        .map(|l| &l.first().expect("no empty service list").endpoint.service)
        .collect();
    assert!(names.is_sorted_by(|a, b| a < b), "services in name order");
    let rows: Vec<StoredEndpoint> = lists.iter().flat_map(|l| l.iter().cloned()).collect();
    assert!(
        rows.is_sorted_by(|a, b| a.endpoint.key() < b.endpoint.key()),
        "rows in key order"
    );
    rows
}

async fn check_in<S: Store>(store: &S, eps: &[Endpoint], now: u64) -> (usize, Vec<ServiceName>) {
    let out = store.check_in(eps, now).await.expect("check_in");
    let mut changed = out.changed_services;
    changed.sort();
    (out.accepted, changed)
}

fn endpoints(rows: &[StoredEndpoint]) -> Vec<Endpoint> {
    rows.iter().map(|r| r.endpoint.clone()).collect()
}

// ---- cases --------------------------------------------------------------------------------

pub async fn check_in_and_read_back<S: Store>(store: &S) {
    let mut a = ep("web", "10.0.0.1", 80);
    a.service_repo_name = Some(RepoName::new("lyft/web").expect("repo"));
    a.tags.canary = true;
    a.tags.region = Some(TagValue::new("us-east-1").expect("region"));
    a.tags.instance_id = Some(TagValue::new("i-0abc").expect("id"));
    a.tags.load_balancing_weight = weight(40);
    let b = ep("web", "10.0.0.2", 80);
    let c = ep("api", "10.0.0.1", 9000);
    let (accepted, changed) = check_in(store, &[a.clone(), b.clone(), c.clone()], T0).await;
    assert_eq!(accepted, 3);
    assert_eq!(changed, vec![svc("api"), svc("web")]);

    let web = list(store, "web").await;
    assert_eq!(endpoints(&web), vec![a, b]);
    assert!(
        web.iter()
            .all(|r| r.last_check_in_ms == T0 && r.weight_override.is_none())
    );
    assert_eq!(endpoints(&list(store, "api").await), vec![c]);
    assert!(list(store, "nobody").await.is_empty());
    assert_eq!(all(store).await.len(), 3);

    let (accepted, changed) = check_in(store, &[], T0).await;
    assert_eq!((accepted, changed), (0, vec![]));
}

pub async fn re_check_in_changes_nothing<S: Store>(store: &S) {
    let a = ep("web", "10.0.0.1", 80);
    check_in(store, std::slice::from_ref(&a), T0).await;
    let (accepted, changed) = check_in(store, std::slice::from_ref(&a), T0 + 60_000).await;
    assert_eq!(accepted, 1);
    assert!(
        changed.is_empty(),
        "a plain re-check-in reported {changed:?}"
    );
    let rows = list(store, "web").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].last_check_in_ms, T0 + 60_000);
    // The same clock reading again (a retried request) is still accepted.
    assert_eq!(check_in(store, &[a], T0 + 60_000).await, (1, vec![]));
}

pub async fn changes_are_reported_and_tags_can_be_removed<S: Store>(store: &S) {
    let mut a = ep("web", "10.0.0.1", 80);
    a.tags
        .extra
        .insert(tag_key("shard"), TagValue::new("7").expect("tag"));
    check_in(store, std::slice::from_ref(&a), T0).await;

    a.revision = Revision::new("r2").expect("revision");
    assert_eq!(
        check_in(store, std::slice::from_ref(&a), T0 + 1).await.1,
        vec![svc("web")],
        "revision change"
    );

    a.tags.az = None;
    a.tags.extra.remove(&tag_key("shard"));
    assert_eq!(
        check_in(store, std::slice::from_ref(&a), T0 + 2).await.1,
        vec![svc("web")],
        "tag removal"
    );
    let rows = list(store, "web").await;
    assert_eq!(rows[0].endpoint, a, "removed tags must be gone");
    assert_eq!(rows[0].endpoint.tags.extra.len(), 1);

    a.service_repo_name = Some(RepoName::new("lyft/web").expect("repo"));
    assert_eq!(
        check_in(store, std::slice::from_ref(&a), T0 + 3).await.1,
        vec![svc("web")],
        "repo change"
    );

    // A change in one service reports only that one.
    let other = ep("api", "10.0.0.9", 1);
    check_in(store, std::slice::from_ref(&other), T0 + 3).await;
    a.tags.canary = true;
    let (accepted, changed) = check_in(store, &[a.clone(), other], T0 + 4).await;
    assert_eq!((accepted, changed), (2, vec![svc("web")]));
    assert_eq!(endpoints(&list(store, "web").await), vec![a]);
}

pub async fn backwards_check_in_is_ignored<S: Store>(store: &S) {
    let a = ep("web", "10.0.0.1", 80);
    check_in(store, std::slice::from_ref(&a), T0 + 2_000).await;
    let mut stale = a.clone();
    stale.revision = Revision::new("old").expect("revision");
    let (accepted, changed) =
        check_in(store, &[stale, ep("web", "10.0.0.2", 80)], T0 + 1_000).await;
    assert_eq!(accepted, 1, "only the new endpoint is stored");
    assert_eq!(changed, vec![svc("web")]);
    let rows = list(store, "web").await;
    assert_eq!(
        rows[0].endpoint, a,
        "an older check-in must not overwrite a newer one"
    );
    assert_eq!(
        rows[0].last_check_in_ms,
        T0 + 2_000,
        "last_check_in never moves backwards"
    );
    assert_eq!(rows[1].last_check_in_ms, T0 + 1_000);
}

pub async fn duplicate_keys_in_one_check_in<S: Store>(store: &S) {
    let first = ep("web", "10.0.0.1", 80);
    let mut second = first.clone();
    second.revision = Revision::new("r2").expect("revision");
    let (accepted, changed) = check_in(store, &[first, second.clone()], T0).await;
    assert_eq!((accepted, changed), (2, vec![svc("web")]));
    assert_eq!(
        endpoints(&list(store, "web").await),
        vec![second],
        "the last occurrence wins"
    );
}

pub async fn weight_override_survives_check_ins<S: Store>(store: &S) {
    let a1 = ep("web", "10.0.0.1", 80);
    let a2 = ep("web", "10.0.0.1", 81);
    let b = ep("web", "10.0.0.2", 80);
    check_in(store, &[a1.clone(), a2.clone(), b.clone()], T0).await;

    let set = store
        .set_weight(&svc("web"), Some(ip("10.0.0.1")), weight(7))
        .await
        .expect("set_weight");
    assert_eq!(set, 2, "both ports on the ip");
    let rows = list(store, "web").await;
    let weights: Vec<(u8, Option<Weight>)> = rows
        .iter()
        .map(|r| {
            (
                r.endpoint.tags.load_balancing_weight.get(),
                r.weight_override,
            )
        })
        .collect();
    assert_eq!(
        weights,
        vec![(7, Some(weight(7))), (7, Some(weight(7))), (100, None)]
    );

    // The host re-checks in, even with its own weight: the operator's override stays.
    let mut a1_host = a1.clone();
    a1_host.tags.load_balancing_weight = weight(50);
    let (accepted, changed) = check_in(store, &[a1_host, a2.clone()], T0 + 60_000).await;
    assert_eq!(accepted, 2);
    assert!(
        changed.is_empty(),
        "a re-check-in under an override changed {changed:?}"
    );
    let rows = list(store, "web").await;
    assert_eq!(rows[0].endpoint.tags.load_balancing_weight, weight(7));
    assert_eq!(rows[0].weight_override, Some(weight(7)));
    assert_eq!(rows[0].last_check_in_ms, T0 + 60_000);
    // A real change under an override still shows the override.
    let mut a2_new = a2.clone();
    a2_new.revision = Revision::new("r2").expect("revision");
    assert_eq!(
        check_in(store, &[a2_new], T0 + 60_001).await.1,
        vec![svc("web")]
    );
    assert_eq!(
        list(store, "web").await[1]
            .endpoint
            .tags
            .load_balancing_weight,
        weight(7)
    );

    let all_rows = store
        .set_weight(&svc("web"), None, weight(3))
        .await
        .expect("set_weight");
    assert_eq!(all_rows, 3);
    assert!(
        list(store, "web")
            .await
            .iter()
            .all(|r| r.weight_override == Some(weight(3)))
    );
    assert!(
        all(store)
            .await
            .iter()
            .all(|r| r.endpoint.tags.load_balancing_weight == weight(3))
    );

    let unknown = store
        .set_weight(&svc("nobody"), None, weight(5))
        .await
        .expect("set_weight");
    assert_eq!(unknown, 0);
    let unknown_ip = store
        .set_weight(&svc("web"), Some(ip("10.0.0.3")), weight(5))
        .await
        .expect("set_weight");
    assert_eq!(unknown_ip, 0);
    assert!(
        list(store, "nobody").await.is_empty(),
        "set_weight must not create rows"
    );
}

pub async fn ipv6_and_ports_are_part_of_the_key<S: Store>(store: &S) {
    let rows = [
        ep("web", "2001:db8::1", 80),
        ep("web", "2001:db8::1", 81),
        ep("web", "::1", 80),
        ep("web", "10.0.0.1", 80),
        ep("web", "10.0.0.1", 8080),
        ep("web", "::ffff:10.0.0.1", 80),
    ];
    let (accepted, _) = check_in(store, &rows, T0).await;
    assert_eq!(accepted, rows.len());
    let mut want = rows.to_vec();
    want.sort_by_key(Endpoint::key);
    assert_eq!(
        endpoints(&list(store, "web").await),
        want,
        "every (ip, port) is its own row"
    );
}

pub async fn deregister_with_and_without_port<S: Store>(store: &S) {
    let web = svc("web");
    let rows = [
        ep("web", "10.0.0.1", 80),
        ep("web", "10.0.0.1", 81),
        // Shares a textual prefix with 10.0.0.1 but is another host.
        ep("web", "10.0.0.11", 80),
        ep("web", "2001:db8::1", 80),
        ep("web", "2001:db8::1", 81),
        ep("api", "10.0.0.1", 80),
    ];
    check_in(store, &rows, T0).await;

    let n = store
        .deregister(&web, ip("10.0.0.1"), Some(port(81)))
        .await
        .expect("deregister");
    assert_eq!(n, 1);
    let n = store
        .deregister(&web, ip("10.0.0.1"), Some(port(81)))
        .await
        .expect("deregister");
    assert_eq!(n, 0, "already gone");
    let n = store
        .deregister(&web, ip("10.0.0.1"), None)
        .await
        .expect("deregister");
    assert_eq!(n, 1, "only 10.0.0.1:80 is left on that ip");
    let n = store
        .deregister(&web, ip("2001:db8::1"), None)
        .await
        .expect("deregister");
    assert_eq!(n, 2, "every port on the IPv6 address");
    let n = store
        .deregister(&web, ip("10.0.0.99"), None)
        .await
        .expect("deregister");
    assert_eq!(n, 0);
    let n = store
        .deregister(&svc("nobody"), ip("10.0.0.1"), None)
        .await
        .expect("deregister");
    assert_eq!(n, 0);

    assert_eq!(endpoints(&list(store, "web").await), vec![rows[2].clone()]);
    assert_eq!(
        endpoints(&list(store, "api").await),
        vec![rows[5].clone()],
        "other services untouched"
    );
}

pub async fn delete_expired_is_bounded_and_spares_fresh_rows<S: Store>(store: &S) {
    let old: Vec<Endpoint> = (1..=5)
        .map(|i| ep(if i % 2 == 0 { "a" } else { "b" }, "10.0.1.1", i))
        .collect();
    check_in(store, &old, T0).await;
    let fresh = [ep("a", "10.0.2.1", 1), ep("c", "10.0.2.1", 1)];
    check_in(store, &fresh, T0 + 10_000).await;
    // Exactly at the cutoff is not older than it.
    let edge = ep("d", "10.0.3.1", 1);
    check_in(store, std::slice::from_ref(&edge), T0 + 5_000).await;

    assert_eq!(
        store
            .delete_expired(T0 + 5_000, 0)
            .await
            .expect("delete_expired"),
        0
    );
    assert_eq!(
        store
            .delete_expired(T0 + 5_000, 3)
            .await
            .expect("delete_expired"),
        3,
        "bounded by max"
    );
    assert_eq!(all(store).await.len(), 5);
    assert_eq!(
        store
            .delete_expired(T0 + 5_000, 100)
            .await
            .expect("delete_expired"),
        2
    );
    assert_eq!(
        store
            .delete_expired(T0 + 5_000, 100)
            .await
            .expect("delete_expired"),
        0
    );

    let mut want = fresh.to_vec();
    want.push(edge);
    want.sort_by_key(Endpoint::key);
    assert_eq!(endpoints(&all(store).await), want);
}

pub async fn list_repo_finds_rows_by_repo<S: Store>(store: &S) {
    let repo = |e: Endpoint, r: &str| Endpoint {
        service_repo_name: Some(RepoName::new(r).expect("repo")),
        ..e
    };
    let a = repo(ep("web", "10.0.0.1", 80), "lyft/web");
    let b = repo(ep("web-canary", "10.0.0.2", 80), "lyft/web");
    let c = repo(ep("api", "10.0.0.3", 80), "lyft/api");
    let d = ep("db", "10.0.0.4", 5432);
    check_in(store, &[a.clone(), b.clone(), c.clone(), d], T0).await;

    let mut found = sorted(store.list_repo("lyft/web").await.expect("list_repo"));
    assert_eq!(endpoints(&found), vec![a.clone(), b]);
    assert!(
        store
            .list_repo("lyft/none")
            .await
            .expect("list_repo")
            .is_empty()
    );
    assert!(store.list_repo("").await.expect("list_repo").is_empty());

    // A host that stops sending its repo name leaves the listing.
    let mut a_plain = a;
    a_plain.service_repo_name = None;
    check_in(store, &[a_plain], T0 + 1).await;
    found = sorted(store.list_repo("lyft/web").await.expect("list_repo"));
    assert_eq!(found.len(), 1);
    assert_eq!(
        endpoints(&sorted(
            store.list_repo("lyft/api").await.expect("list_repo")
        )),
        vec![c]
    );
}

/// Enough data to need more than one page of a DynamoDB Query and Scan (1 MB each): 150 rows
/// of ~8 KB (32 free-form tags of 250 bytes), which is also within every store's row limits.
pub async fn reads_span_many_pages<S: Store>(store: &S) {
    const ROWS: u16 = 150;
    let big: Vec<Endpoint> = (1..=ROWS)
        .map(|i| {
            let mut e = ep("big", "10.9.0.1", i);
            e.tags.extra = (0..32)
                .map(|t| {
                    (
                        tag_key(&format!("tag-{t:02}")),
                        TagValue::new(format!("{i:05}{}", "x".repeat(245))).expect("tag"),
                    )
                })
                .collect();
            e
        })
        .collect();
    let (accepted, _) = check_in(store, &big, T0).await;
    assert_eq!(accepted, usize::from(ROWS));
    check_in(store, &[ep("small", "10.9.0.2", 1)], T0).await;

    let rows = list(store, "big").await;
    assert_eq!(
        rows.len(),
        usize::from(ROWS),
        "list_service must follow every page"
    );
    assert_eq!(endpoints(&rows), big, "rows read back intact");
    assert_eq!(
        all(store).await.len(),
        usize::from(ROWS) + 1,
        "list_all must follow every page"
    );
    let n = store
        .set_weight(&svc("big"), None, weight(9))
        .await
        .expect("set_weight");
    assert_eq!(n, usize::from(ROWS));
    let n = store
        .delete_expired(T0 + 1, 1_000)
        .await
        .expect("delete_expired");
    assert_eq!(n, usize::from(ROWS) + 1);
    assert!(all(store).await.is_empty());
}

fn sent(keys: &[&str]) -> std::collections::BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

pub async fn merging_check_in_keeps_tags_it_does_not_name<S: Store>(store: &S) {
    let mut a = ep("web", "10.0.0.1", 80);
    a.tags.instance_id = Some(TagValue::new("i-1").expect("id"));
    a.tags.load_balancing_weight = weight(40);
    // The first merge stores the endpoint as sent.
    let out = store
        .check_in_merging_tags(&a, &sent(&["az", "team", "instance_id"]), T0)
        .await
        .expect("merge");
    assert_eq!((out.accepted, out.changed_services), (1, vec![svc("web")]));
    assert_eq!(endpoints(&list(store, "web").await), vec![a.clone()]);

    // Only `az` named: it changes, everything else stays (the host's own weight too).
    let mut b = Endpoint::new(svc("web"), ip("10.0.0.1"), port(80));
    b.revision = Revision::new("r2").expect("revision");
    b.tags.az = Some(TagValue::new("us-east-1b").expect("az"));
    let out = store
        .check_in_merging_tags(&b, &sent(&["az"]), T0 + 1)
        .await
        .expect("merge");
    assert_eq!((out.accepted, out.changed_services), (1, vec![svc("web")]));
    let mut want = a.clone();
    want.revision = b.revision.clone();
    want.tags.az = b.tags.az.clone();
    let rows = list(store, "web").await;
    assert_eq!(endpoints(&rows), vec![want.clone()]);
    assert_eq!(rows[0].last_check_in_ms, T0 + 1);

    // A repeat changes nothing visible; an older one is not accepted.
    let out = store
        .check_in_merging_tags(&b, &sent(&["az"]), T0 + 2)
        .await
        .expect("merge");
    assert_eq!((out.accepted, out.changed_services), (1, vec![]));
    let out = store
        .check_in_merging_tags(&a, &sent(&["az"]), T0)
        .await
        .expect("merge");
    assert_eq!(out.accepted, 0);

    // An operator's override survives, and a merge past the tag limit changes nothing.
    store
        .set_weight(&svc("web"), Some(ip("10.0.0.1")), weight(7))
        .await
        .expect("weight");
    let mut many = b.clone();
    for i in 0..schema::MAX_EXTRA_TAGS {
        many.tags
            .extra
            .insert(tag_key(&format!("k{i}")), TagValue::new("v").expect("tag"));
    }
    let keys: Vec<String> = many
        .tags
        .extra
        .keys()
        .map(|k| k.as_str().to_string())
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let err = store
        .check_in_merging_tags(&many, &sent(&keys), T0 + 3)
        .await;
    assert!(matches!(err, Err(crate::StoreError::Invalid(_))), "{err:?}");
    let rows = list(store, "web").await;
    want.tags.load_balancing_weight = weight(7);
    assert_eq!(endpoints(&rows), vec![want]);
    assert_eq!(rows[0].last_check_in_ms, T0 + 2);
}

/// Merges of different tags into one row, all at once (as from two registry replicas): every
/// one of them is in the result, none overwrote another. Not in [`run_all`]: moto, the
/// DynamoDB stand-in of the tests, does not apply a conditional write atomically, so this
/// can only pass against a store that does (the DynamoDB store tests its compare-and-set
/// with the race played in order instead).
pub async fn concurrent_merges_all_land<S: Store>(store: &S) {
    let base = Endpoint::new(svc("web"), ip("10.0.0.1"), port(80));
    store
        .check_in_merging_tags(&base, &sent(&[]), T0)
        .await
        .expect("merge");
    let writes = (0..8).map(|i| {
        let mut e = base.clone();
        let key = format!("t{i}");
        e.tags
            .extra
            .insert(tag_key(&key), TagValue::new("v").expect("tag"));
        async move {
            store
                .check_in_merging_tags(&e, &sent(&[key.as_str()]), T0 + 1)
                .await
        }
    });
    for out in futures_util::future::join_all(writes).await {
        assert_eq!(out.expect("merge").accepted, 1);
    }
    let rows = list(store, "web").await;
    assert_eq!(
        rows[0].endpoint.tags.extra.len(),
        8,
        "{:?}",
        rows[0].endpoint.tags
    );
}
