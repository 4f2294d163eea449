use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use gossip::{GossipView, Snapshot, SnapshotEntry, Source, ViewEntry};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use schema::api::Catalog;
use schema::wire::{HEADER_INDEX, HEADER_SOURCE};
use schema::{Endpoint, Revision, TagValue};
use tower::ServiceExt;

use super::*;
use crate::api::tests::fixture;
use crate::view::Merger;

const SERVICES: [&str; 3] = ["web", "db", "a.b-c"];

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).expect("name")
}

/// One host: service (index into [`SERVICES`]), ip, port, revision (any printable ASCII,
/// so escaping is exercised), az, and whether the registry lists it (else a gossip row).
type Spec = (usize, IpAddr, u16, String, Option<String>, bool, u64);

fn arb_specs() -> impl Strategy<Value = Vec<Spec>> {
    proptest::collection::vec(
        (
            0..SERVICES.len(),
            any::<IpAddr>(),
            1u16..,
            "[ -~]{0,12}",
            proptest::option::of("[a-z]{1,6}"),
            any::<bool>(),
            0u64..2_000_000_000_000,
        ),
        0..30,
    )
}

fn gossip_view(specs: &[Spec]) -> GossipView {
    let mut endpoints: Vec<ViewEntry> = Vec::new();
    let mut snapshots: Vec<Snapshot> = SERVICES
        .iter()
        .map(|s| Snapshot {
            service: name(s),
            generated_at_ms: 1_000,
            entries: Vec::new(),
        })
        .collect();
    for (svc, ip, port, rev, az, registry, lci) in specs {
        let mut ep = Endpoint::new(
            name(SERVICES[*svc]),
            *ip,
            NonZeroU16::new(*port).expect("nonzero"),
        );
        if endpoints.iter().any(|e| e.endpoint.key() == ep.key()) {
            continue;
        }
        ep.revision = Revision::new(rev.clone()).expect("bounded");
        ep.tags.az = az.clone().map(|a| TagValue::new(a).expect("bounded"));
        let source = if *registry {
            snapshots[*svc].entries.push(SnapshotEntry {
                endpoint: ep.clone().into(),
                last_check_in_ms: *lci,
            });
            Source::Registry {
                generated_at_ms: 1_000,
                last_check_in_ms: *lci,
            }
        } else {
            Source::Gossip {
                owner: "127.0.0.1:7".parse().expect("addr"),
            }
        };
        endpoints.push(ViewEntry {
            endpoint: ep.into(),
            source,
        });
    }
    GossipView {
        endpoints: endpoints.into(),
        snapshots: snapshots.into_iter().map(Arc::new).collect(),
        members: Vec::new(),
        deregistered: Vec::new(),
    }
}

fn merged(specs: &[Spec]) -> MergedView {
    Merger::new("127.0.0.1:1".parse().expect("addr"), 0, Vec::new()).merge(&gossip_view(specs), 5)
}

fn fresh_eds(view: &MergedView, service: &ServiceName) -> Bytes {
    let endpoints: Vec<_> = view
        .hosts(service)
        .iter()
        .map(|h| Endpoint::clone(&h.endpoint))
        .collect();
    let version = view.service_index(service).to_string();
    encoded(&eds::response(service.as_str(), &version, &endpoints, None))
}

fn fresh_catalog(view: &MergedView, generated_at_ms: u64, stale: bool) -> Bytes {
    encoded(&Catalog {
        index: view.index(),
        generated_at_ms,
        warming: false,
        stale,
        services: view
            .services()
            .map(|(s, h)| (s.to_string(), v1_hosts(&h.hosts)))
            .collect(),
        signatures: Default::default(),
    })
}

proptest! {
    /// Every kept body, first encoded and then served again, is byte for byte what
    /// serializing the answer's value gives.
    #[test]
    fn kept_bodies_equal_a_fresh_encoding(
        specs in arb_specs(),
        env in "[ -~]{0,8}",
        at in any::<u64>(),
        stale in any::<bool>(),
    ) {
        let view = merged(&specs);
        for _ in 0..2 {
            for s in SERVICES.iter().chain(&["absent"]) {
                let s = name(s);
                let fresh = encoded(&fresh_listing(&s, &env, view.hosts(&s), &[]));
                prop_assert_eq!(&listing(&view, &s, &env, false), &fresh);
                prop_assert_eq!(&listing(&view, &s, &env, true), &fresh);
                prop_assert_eq!(eds(&view, &s, s.as_str()), fresh_eds(&view, &s));
            }
            prop_assert_eq!(catalog(&view, &env, at, stale), fresh_catalog(&view, at, stale));
        }
    }
}

/// A service whose hosts did not change keeps its entry, and the bodies encoded for it,
/// across views; a changed service is encoded afresh.
#[test]
fn an_unchanged_service_keeps_its_bodies_across_views() {
    let host = |svc, port: u16| {
        (
            svc,
            IpAddr::from([10, 0, 0, 1]),
            port,
            String::new(),
            None,
            true,
            7,
        )
    };
    let mut merger = Merger::new("127.0.0.1:1".parse().expect("addr"), 0, Vec::new());
    let first = merger.merge(&gossip_view(&[host(0, 1), host(1, 1)]), 5);
    let (web, db) = (name("web"), name("db"));
    let web_before = listing(&first, &web, "prod", false);
    let db_before = listing(&first, &db, "prod", false);
    let second = merger.merge(&gossip_view(&[host(0, 1), host(1, 1), host(1, 2)]), 6);
    let web_after = listing(&second, &web, "prod", false);
    assert_eq!(
        web_after.as_ptr(),
        web_before.as_ptr(),
        "the unchanged service's body is the same allocation"
    );
    let db_after = listing(&second, &db, "prod", false);
    assert_ne!(db_after, db_before);
    assert_eq!(
        db_after,
        encoded(&fresh_listing(&db, "prod", second.hosts(&db), &[]))
    );
}

/// Through the router, for random views: the bodies are the fresh encodings and the
/// headers those the answer's hosts give, on the first request and on a repeated one.
#[test]
fn kept_answers_carry_their_headers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let f = rt.block_on(fixture());
    let env = f.shared.config.env.clone();
    let get = |req: Request<Body>| {
        rt.block_on(async {
            let resp = f.app.clone().oneshot(req).await.expect("infallible");
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await.expect("body").to_bytes();
            (parts, bytes)
        })
    };
    let mut runner = TestRunner::new(Config::with_cases(24));
    runner
        .run(&arb_specs(), |specs| {
            let view = Arc::new(merged(&specs));
            f.tx.send_replace(view.clone());
            for s in SERVICES.iter().chain(&["absent"]) {
                let s = name(s);
                let hosts = view.hosts(&s);
                let index = view.service_index(&s).to_string();
                let source = view.source_of(hosts).as_str();
                let listing = encoded(&fresh_listing(&s, &env, hosts, &[]));
                let eds_req = format!(r#"{{"version_info":"","resource_names":["{s}"]}}"#);
                for _ in 0..2 {
                    for uri in [format!("/v1/registration/{s}"), format!("/v2/services/{s}")] {
                        let req = Request::get(uri).body(Body::empty()).expect("request");
                        let (parts, body) = get(req);
                        prop_assert_eq!(parts.status, StatusCode::OK);
                        prop_assert_eq!(&body, &listing);
                        prop_assert_eq!(&parts.headers[HEADER_INDEX], index.as_str());
                        prop_assert_eq!(&parts.headers[HEADER_SOURCE], source);
                        prop_assert_eq!(&parts.headers[header::CONTENT_TYPE], "application/json");
                    }
                    let req = Request::post("/v3/discovery:endpoints")
                        .body(Body::from(eds_req.clone()))
                        .expect("request");
                    let (parts, body) = get(req);
                    prop_assert_eq!(body, fresh_eds(&view, &s));
                    prop_assert_eq!(&parts.headers[HEADER_INDEX], index.as_str());
                    prop_assert_eq!(&parts.headers[HEADER_SOURCE], source);
                }
            }
            let req = Request::get("/v2/catalog")
                .body(Body::empty())
                .expect("request");
            let (parts, body) = get(req);
            let parsed: Catalog = serde_json::from_slice(&body).expect("a catalog");
            let stale = !f.shared.registry_ok();
            prop_assert_eq!(body, fresh_catalog(&view, parsed.generated_at_ms, stale));
            let index = view.index().to_string();
            prop_assert_eq!(&parts.headers[HEADER_INDEX], index.as_str());
            let source = view.source_of(view.all_hosts()).as_str();
            prop_assert_eq!(&parts.headers[HEADER_SOURCE], source);
            Ok(())
        })
        .expect("kept answers match fresh ones");
    f.stop.cancel();
}
