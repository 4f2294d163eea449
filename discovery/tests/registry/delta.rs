//! Catalog deltas (`GET /v2/catalog?delta=true`): what changed since the client's index, the
//! whole catalog when the registry no longer holds that view, the digest with both, and the
//! plain answer unchanged for clients that do not ask.

use std::time::Duration;

use axum::http::StatusCode;
use discovery::RegistryConfig;
use discovery::delta::{self, Replica};
use schema::api::{Catalog, CatalogChanges, HostKey};
use tokio::time::Instant;

use crate::blocking::blocked;
use crate::common::{Harness, Resp, get_req, send};

fn changes(r: &Resp) -> CatalogChanges {
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let c: CatalogChanges = serde_json::from_slice(&r.body).expect("a delta-mode answer");
    // The head written per request and the cached tail make exactly what serde would.
    assert_eq!(
        serde_json::to_vec(&c).expect("encodes"),
        r.body.to_vec(),
        "spliced answer differs from its encoding"
    );
    assert_eq!(c.index, r.index(), "body and header agree");
    c
}

async fn full(h: &Harness) -> CatalogChanges {
    let c = changes(&h.get("/v2/catalog?delta=true").await);
    assert!(c.full && c.from.is_none(), "{c:?}");
    c
}

async fn since(h: &Harness, index: u64) -> CatalogChanges {
    changes(
        &h.get(&format!("/v2/catalog?delta=true&index={index}"))
            .await,
    )
}

/// Applies `d` to `base` and checks the result is the registry's catalog now.
async fn applies(h: &Harness, base: Replica, d: CatalogChanges) -> Replica {
    let rebuilt = base
        .apply(d)
        .expect("the delta applies and matches its digest");
    let now = full(h).await;
    assert_eq!(rebuilt.digest_hex(), now.digest);
    let whole = Replica::new(delta::full_catalog(now));
    assert_eq!(
        rebuilt.catalog().services.keys().collect::<Vec<_>>(),
        whole.catalog().services.keys().collect::<Vec<_>>()
    );
    rebuilt
}

/// A registry holding `web` on 10.0.0.1 and .2 and `db` on 10.0.0.3.
async fn two_web_one_db() -> Harness {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    h.register("web", "10.0.0.2", 80).await;
    h.register("db", "10.0.0.3", 5432).await;
    h
}

#[tokio::test]
async fn a_check_in_after_an_index_is_a_delta_with_just_that_row() {
    let h = two_web_one_db().await;
    let base = full(&h).await;
    let i = base.index;
    h.register("web", "10.0.0.9", 80).await;
    let d = since(&h, i).await;
    assert!(!d.full);
    assert_eq!(d.from, Some(i));
    assert_ne!(d.index, i);
    assert_eq!(d.services.len(), 1, "{d:?}");
    let web = &d.services["web"];
    assert_eq!(web.len(), 1);
    assert_eq!((web[0].ip_address.as_str(), web[0].port), ("10.0.0.9", 80));
    assert!(d.removed.is_empty() && d.removed_services.is_empty());
    applies(&h, Replica::new(delta::full_catalog(base)), d).await;

    // A plain re-check-in moves no index: a delta from the current one is empty.
    h.clock.advance(Duration::from_secs(5));
    h.register("web", "10.0.0.1", 80).await;
    let now = full(&h).await;
    let uri = format!("/v2/catalog?delta=true&index={}&wait=0s", now.index);
    let d = changes(&h.get(&uri).await);
    assert!(
        !d.full && d.services.is_empty() && d.removed.is_empty(),
        "{d:?}"
    );
    assert_eq!(d.digest, now.digest);
}

#[tokio::test]
async fn a_deregistration_is_a_removal_and_an_emptied_service_goes_whole() {
    let h = two_web_one_db().await;
    let base = full(&h).await;
    let held = Replica::new(delta::full_catalog(base.clone()));
    let r = h
        .call("DELETE", "/v1/registration/web/10.0.0.2?port=80", &[], "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = h
        .call("DELETE", "/v1/registration/db/10.0.0.3", &[], "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let d = since(&h, base.index).await;
    assert!(d.services.is_empty(), "{d:?}");
    assert_eq!(
        d.removed["web"],
        vec![HostKey {
            ip_address: "10.0.0.2".into(),
            port: 80
        }]
    );
    assert_eq!(d.removed_services, vec!["db".to_string()]);
    assert!(!d.removed.contains_key("db"));
    let rebuilt = applies(&h, held, d).await;
    assert_eq!(rebuilt.catalog().services.len(), 1);
}

#[tokio::test]
async fn an_unknown_or_trimmed_index_gets_the_whole_catalog() {
    let h = Harness::with_config(RegistryConfig {
        delta_views: 2,
        ..Default::default()
    });
    h.register("web", "10.0.0.1", 80).await;
    let first = full(&h).await;
    let d = since(&h, first.index + 1).await;
    assert!(d.full && d.from.is_none(), "an index never served: {d:?}");
    assert_eq!(d.digest, first.digest);
    assert_eq!(d.services, first.services);

    // Two more views served: the ring of two has trimmed the first.
    h.register("web", "10.0.0.2", 80).await;
    let second = full(&h).await;
    h.register("web", "10.0.0.3", 80).await;
    let d = since(&h, second.index).await;
    assert!(!d.full, "the previous view is still held");
    let d = since(&h, first.index).await;
    assert!(d.full, "trimmed: {d:?}");
    assert_eq!(d.services["web"].len(), 3);

    // Deltas off.
    let off = Harness::with_config(RegistryConfig {
        delta_views: 0,
        ..Default::default()
    });
    off.register("web", "10.0.0.1", 80).await;
    let i = full(&off).await.index;
    off.register("web", "10.0.0.2", 80).await;
    assert!(since(&off, i).await.full);
}

#[tokio::test]
async fn trimmed_by_age_too() {
    let h = Harness::with_config(RegistryConfig {
        delta_max_age: Duration::from_secs(60),
        ..Default::default()
    });
    h.register("web", "10.0.0.1", 80).await;
    let first = full(&h).await;
    h.clock.advance(Duration::from_secs(61));
    h.register("web", "10.0.0.2", 80).await;
    full(&h).await;
    assert!(since(&h, first.index).await.full);
}

#[tokio::test]
async fn without_the_opt_in_the_answer_is_the_plain_catalog() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    h.register("api", "10.0.0.2", 90).await;
    let i = full(&h).await.index;
    h.register("web", "10.0.0.3", 80).await;
    for uri in [
        format!("/v2/catalog?index={i}"),
        format!("/v2/catalog?index={i}&delta=false"),
        "/v2/catalog".to_string(),
    ] {
        let r = h.get(&uri).await;
        assert_eq!(r.status, StatusCode::OK);
        let c: Catalog = serde_json::from_slice(&r.body).expect("the plain catalog");
        assert_eq!(serde_json::to_vec(&c).expect("encodes"), r.body.to_vec());
        let keys: Vec<String> = r
            .json()
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            keys,
            ["generated_at_ms", "index", "services", "stale", "warming"],
            "{uri}"
        );
        assert_eq!(c.services["web"].len(), 2);
    }
    h.get("/v2/catalog?delta=maybe")
        .await
        .assert_error(400, "bad_request");
}

#[tokio::test(start_paused = true)]
async fn a_blocking_delta_waits_and_wakes_with_the_change() {
    let h = Harness::new();
    h.register("web", "10.0.0.1", 80).await;
    let i = full(&h).await.index;
    let start = Instant::now();
    let uri = format!("/v2/catalog?delta=true&index={i}&wait=5m");
    let waiters: Vec<_> = (0..3)
        .map(|_| tokio::spawn(send(h.app.clone(), get_req(&uri))))
        .collect();
    blocked(&h, 3).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    h.register("api", "10.0.0.2", 80).await;
    let mut bodies = Vec::new();
    for w in waiters {
        let r = w.await.expect("join");
        let d = changes(&r);
        assert_eq!(d.from, Some(i));
        assert_eq!(d.services.keys().collect::<Vec<_>>(), ["api"]);
        bodies.push(r.body);
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "one delta for all");

    // Nothing changes: it answers at its wait with an empty delta.
    let i = full(&h).await.index;
    let start = Instant::now();
    let d = changes(
        &h.get(&format!("/v2/catalog?delta=true&index={i}&wait=10s"))
            .await,
    );
    assert!(start.elapsed() >= Duration::from_millis(9375));
    assert!(!d.full && d.services.is_empty() && d.from == Some(i));
}
