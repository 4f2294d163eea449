//! Cached bodies against a fresh encoding of the whole answer struct, over random row sets,
//! flags and request times: the bytes, the index contract and the headers must not differ,
//! whether a body is encoded by this request or copied from an earlier one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;

use axum::Json;
use axum::response::IntoResponse;
use proptest::prelude::*;
use schema::api::{Catalog, ServiceSummary, ServicesResponse, V1Host, V1Listing};
use schema::{Endpoint, RepoName, Revision, ServiceName, TagKey, TagValue, Weight, eds};
use serde::Serialize;

use super::*;
use crate::http::router::with_view_headers;
use crate::registry::ViewData;
use crate::store::StoredEndpoint;
use crate::{ManualClock, MemoryStore, RegistryConfig};

fn arb_row() -> impl Strategy<Value = StoredEndpoint> {
    (
        prop_oneof!["svc-a", "svc-b", "[a-z][a-z0-9._-]{0,12}"],
        any::<IpAddr>(),
        1u16..,
        "[ -~]{0,20}",
        proptest::option::of("[a-z]{1,8}"),
        (any::<bool>(), 1u64..=100, proptest::option::of(1u64..=100)),
        proptest::collection::btree_map("[a-z][a-z0-9_]{0,8}", "[ -~]{0,12}", 0..4),
        0u64..4_000_000_000_000,
    )
        .prop_map(|(name, ip, port, rev, az, flags, extra, at)| {
            let (canary, w, over) = flags;
            let service = ServiceName::new(name).expect("valid by the pattern");
            let port = NonZeroU16::new(port).expect("nonzero by the range");
            let mut ep = Endpoint::new(service, ip, port);
            ep.revision = Revision::new(rev).expect("bounded");
            ep.service_repo_name = az
                .as_ref()
                .map(|a| RepoName::new(a.clone()).expect("short"));
            ep.tags.az = az.map(|a| TagValue::new(a).expect("bounded"));
            ep.tags.canary = canary;
            ep.tags.load_balancing_weight = Weight::new(w).expect("in range");
            for (k, v) in extra {
                if let (Ok(k), Ok(v)) = (TagKey::new(k), TagValue::new(v)) {
                    ep.tags.extra.insert(k, v);
                }
            }
            StoredEndpoint {
                endpoint: ep,
                last_check_in_ms: at,
                weight_override: over.map(|w| Weight::new(w).expect("in range")),
            }
        })
}

/// Rows as a view holds them: one per key, in key order.
fn arb_rows() -> impl Strategy<Value = Vec<StoredEndpoint>> {
    proptest::collection::vec(arb_row(), 0..24).prop_map(|rows| {
        let mut by_key = BTreeMap::new();
        for r in rows {
            let e = &r.endpoint;
            by_key.insert((e.service.clone(), e.ip, e.port), r);
        }
        by_key.into_values().collect()
    })
}

fn fresh<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("encodes")
}

fn fresh_catalog(
    view: &View,
    generated_at_ms: u64,
    warming: bool,
    signatures: &BTreeMap<String, String>,
) -> Catalog {
    let mut services: BTreeMap<String, Vec<V1Host>> = BTreeMap::new();
    for r in &view.data.rows {
        services
            .entry(r.endpoint.service.to_string())
            .or_default()
            .push(V1Host::from_endpoint(&r.endpoint, r.last_check_in_ms));
    }
    Catalog {
        index: view.data.index,
        generated_at_ms,
        warming,
        stale: view.stale(),
        services,
        signatures: signatures.clone(),
    }
}

fn fresh_services(view: &View) -> ServicesResponse {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &view.data.rows {
        *counts.entry(r.endpoint.service.to_string()).or_default() += 1;
    }
    ServicesResponse {
        index: view.data.index,
        services: counts
            .into_iter()
            .map(|(service, hosts)| ServiceSummary { service, hosts })
            .collect(),
    }
}

fn registry() -> Registry {
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    Registry::new(
        Arc::new(MemoryStore::new()),
        RegistryConfig::default(),
        clock,
    )
}

/// The answer of `body` must carry what `Json(fresh)` with the view's headers carries.
fn same_answer<T: Serialize>(
    registry: &Registry,
    body: impl Into<Parts>,
    fresh_value: &T,
    view: &View,
) {
    let body: Parts = body.into();
    let fresh = fresh(fresh_value);
    assert_eq!(&body.concat()[..], &fresh[..]);
    let ours = respond(registry, Ok(body), view).expect("encoded");
    // Sent in parts, the answer still tells its exact length (hyper's Content-Length).
    assert_eq!(
        http_body::Body::size_hint(ours.body()).exact(),
        Some(fresh.len() as u64)
    );
    let theirs = with_view_headers(Json(fresh_value).into_response(), view);
    assert_eq!(ours.status(), theirs.status());
    assert_eq!(ours.headers(), theirs.headers());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Each request of `requests` reads the same view (the first encodes, the rest copy),
    /// as served fresh or as the fail-static fallback, with its own time and warm-up flag.
    #[test]
    fn cached_bodies_equal_fresh_encodings(
        rows in arb_rows(),
        preserving in any::<bool>(),
        requests in proptest::collection::vec((any::<bool>(), any::<u64>(), any::<bool>()), 1..5),
        signed in any::<bool>(),
    ) {
        let registry = registry();
        let data = Arc::new(ViewData::new(rows, preserving));
        let service = ServiceName::new("svc-a").expect("valid");
        let env = "production";
        for (from_fallback, generated_at_ms, warming) in requests {
            let view = View { data: data.clone(), from_fallback };

            let body = v1_listing(&view, &service, env).expect("encodes");
            let listing = V1Listing {
                service: service.to_string(),
                env: env.to_string(),
                hosts: hosts(&view),
            };
            same_answer(&registry, body, &listing, &view);

            let body = services(&view).expect("encodes");
            same_answer(&registry, body, &fresh_services(&view), &view);

            let signatures: BTreeMap<String, String> = if signed {
                [("svc-a".to_string(), "c2ln".to_string())].into()
            } else {
                BTreeMap::new()
            };
            let body = catalog(&view, generated_at_ms, warming, &signatures).expect("encodes");
            let whole = fresh_catalog(&view, generated_at_ms, warming, &signatures);
            let parsed: Catalog = serde_json::from_slice(&body.concat()).expect("parses");
            same_answer(&registry, body, &whole, &view);
            // The index contract: the body's index is the view's, which the header carries.
            prop_assert_eq!(parsed.index, data.index);
            prop_assert_eq!(parsed.warming, warming);
            prop_assert_eq!(parsed.stale, from_fallback || preserving);

            let body = eds(&view, &service).expect("encodes");
            let endpoints: Vec<Endpoint> = data.rows.iter().map(|r| r.endpoint.clone()).collect();
            let version = data.index.to_string();
            same_answer(&registry, body, &eds::response("svc-a", &version, &endpoints, None), &view);
        }
    }
}
