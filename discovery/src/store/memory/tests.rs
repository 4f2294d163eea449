use std::net::IpAddr;
use std::num::NonZeroU16;

use schema::{Endpoint, Revision, ServiceName, Weight};

use super::MemoryStore;
use crate::store::Store;

fn ep(service: &str, ip: &str, port: u16) -> Endpoint {
    Endpoint::new(
        ServiceName::new(service).expect("name"),
        ip.parse::<IpAddr>().expect("ip"),
        NonZeroU16::new(port).expect("port"),
    )
}

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).expect("name")
}

#[tokio::test]
async fn check_in_reports_changes_only_on_real_changes() {
    let store = MemoryStore::new();
    let a = ep("web", "10.0.0.1", 80);
    let out = store
        .check_in(std::slice::from_ref(&a), 1_000)
        .await
        .expect("ok");
    assert_eq!(out.accepted, 1);
    assert_eq!(out.changed_services, vec![svc("web")]);

    let out = store
        .check_in(std::slice::from_ref(&a), 2_000)
        .await
        .expect("ok");
    assert_eq!(out.accepted, 1);
    assert!(
        out.changed_services.is_empty(),
        "plain re-check-in changes nothing"
    );

    let mut b = a.clone();
    b.revision = Revision::new("v2").expect("rev");
    let out = store.check_in(&[b], 3_000).await.expect("ok");
    assert_eq!(out.changed_services, vec![svc("web")]);
}

#[tokio::test]
async fn last_check_in_never_moves_backwards() {
    let store = MemoryStore::new();
    let a = ep("web", "10.0.0.1", 80);
    store
        .check_in(std::slice::from_ref(&a), 5_000)
        .await
        .expect("ok");
    let out = store
        .check_in(std::slice::from_ref(&a), 4_000)
        .await
        .expect("ok");
    assert_eq!(out.accepted, 0);
    let rows = store.list_service(&svc("web")).await.expect("ok");
    assert_eq!(rows[0].last_check_in_ms, 5_000);
}

#[tokio::test]
async fn weight_override_survives_check_in_and_is_applied() {
    let store = MemoryStore::new();
    let a = ep("web", "10.0.0.1", 80);
    store
        .check_in(std::slice::from_ref(&a), 1_000)
        .await
        .expect("ok");
    let w = Weight::new(7).expect("w");
    assert_eq!(store.set_weight(&svc("web"), None, w).await.expect("ok"), 1);
    let out = store
        .check_in(std::slice::from_ref(&a), 2_000)
        .await
        .expect("ok");
    assert!(out.changed_services.is_empty());
    let rows = store.list_service(&svc("web")).await.expect("ok");
    assert_eq!(rows[0].endpoint.tags.load_balancing_weight, w);
    assert_eq!(rows[0].weight_override, Some(w));
    assert_eq!(
        store.set_weight(&svc("nope"), None, w).await.expect("ok"),
        0
    );
}

#[tokio::test]
async fn two_ports_on_one_ip_are_two_rows_and_deregister_by_port() {
    let store = MemoryStore::new();
    store
        .check_in(&[ep("web", "::1", 80), ep("web", "::1", 81)], 1_000)
        .await
        .expect("ok");
    assert_eq!(store.list_service(&svc("web")).await.expect("ok").len(), 2);
    let ip: IpAddr = "::1".parse().expect("ip");
    assert_eq!(
        store
            .deregister(&svc("web"), ip, NonZeroU16::new(81))
            .await
            .expect("ok"),
        1
    );
    assert_eq!(
        store
            .deregister(&svc("web"), ip, NonZeroU16::new(81))
            .await
            .expect("ok"),
        0
    );
    assert_eq!(
        store.deregister(&svc("web"), ip, None).await.expect("ok"),
        1
    );
    assert!(store.is_empty());
    // The unlinked service comes back on the next check-in.
    store
        .check_in(&[ep("web", "::1", 80)], 2_000)
        .await
        .expect("ok");
    assert_eq!(store.list_all().await.expect("ok").len(), 1);
}

#[tokio::test]
async fn delete_expired_is_bounded_and_keeps_fresh_rows() {
    let store = MemoryStore::new();
    let old: Vec<Endpoint> = (1..=10).map(|p| ep("web", "10.0.0.1", p)).collect();
    store.check_in(&old, 1_000).await.expect("ok");
    store
        .check_in(&[ep("api", "10.0.0.2", 1)], 9_000)
        .await
        .expect("ok");
    assert_eq!(store.delete_expired(5_000, 4).await.expect("ok"), 4);
    assert_eq!(store.delete_expired(5_000, 100).await.expect("ok"), 6);
    assert_eq!(store.delete_expired(5_000, 100).await.expect("ok"), 0);
    assert_eq!(store.list_all().await.expect("ok").len(), 1);
}

#[tokio::test]
async fn list_repo_filters_by_repo_name() {
    let store = MemoryStore::new();
    let mut a = ep("web", "10.0.0.1", 80);
    a.service_repo_name = Some(schema::RepoName::new("web-repo").expect("repo"));
    store
        .check_in(&[a, ep("api", "10.0.0.2", 80)], 1_000)
        .await
        .expect("ok");
    assert_eq!(store.list_repo("web-repo").await.expect("ok").len(), 1);
    assert!(store.list_repo("other").await.expect("ok").is_empty());
}

#[tokio::test]
async fn concurrent_tag_merges_all_land() {
    crate::conformance::concurrent_merges_all_land(&MemoryStore::new()).await;
}

#[tokio::test]
async fn shared_lists_change_only_for_the_services_written() {
    let store = MemoryStore::new();
    let (a, b) = (ep("api", "10.0.0.1", 80), ep("web", "10.0.0.2", 80));
    store
        .check_in(&[a.clone(), b.clone()], 1_000)
        .await
        .expect("ok");
    let first = store.list_all_shared().await.expect("ok");
    let again = store.list_all_shared().await.expect("ok");
    assert_eq!(first.len(), 2);
    for (x, y) in first.iter().zip(&again) {
        assert!(
            std::sync::Arc::ptr_eq(x, y),
            "nothing written: the same lists"
        );
    }

    // A plain renewal moves the check-in time, which readers see: a new list for "web" only.
    store
        .check_in(std::slice::from_ref(&b), 2_000)
        .await
        .expect("ok");
    let renewed = store.list_all_shared().await.expect("ok");
    assert!(std::sync::Arc::ptr_eq(&first[0], &renewed[0]));
    assert!(!std::sync::Arc::ptr_eq(&first[1], &renewed[1]));
    assert_eq!(renewed[1][0].last_check_in_ms, 2_000);

    // Every other write: a new list, holding the write.
    store
        .set_weight(&svc("api"), None, Weight::new(7).expect("weight"))
        .await
        .expect("ok");
    let weighted = store.list_all_shared().await.expect("ok");
    assert_eq!(
        weighted[0][0].weight_override,
        Some(Weight::new(7).expect("weight"))
    );
    store
        .deregister(&svc("api"), "10.0.0.1".parse().expect("ip"), None)
        .await
        .expect("ok");
    let left = store.list_all_shared().await.expect("ok");
    assert_eq!(left.len(), 1, "a service with no rows has no list");
    assert_eq!(left[0][0].endpoint, b);
    assert_eq!(store.delete_expired(3_000, 10).await.expect("ok"), 1);
    assert!(store.list_all_shared().await.expect("ok").is_empty());
}
