use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;

use super::*;

const LIMITS: Limits = Limits { max_names: 8 };

/// A catalog of `services`, each at `version` for every kind.
fn catalog(services: &[(&str, &str)]) -> Arc<Catalog> {
    let mut c = Catalog::default();
    for (name, version) in services {
        for kind in Kind::ALL {
            c.put(kind, name, version);
        }
    }
    Arc::new(c)
}

fn sotw(kind: Kind, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: kind.type_url().to_string(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.to_string(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    }
}

fn nack(kind: Kind, names: &[&str], version: &str, nonce: &str, error: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: error.to_string(),
            details: Vec::new(),
        }),
        ..sotw(kind, names, version, nonce)
    }
}

/// The names a response carries (the placeholder bodies are `name@version`).
fn names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| String::from_utf8_lossy(&a.value).into_owned())
        .collect()
}

#[test]
fn ack_then_change_then_nack_keeps_the_accepted_version_and_does_not_resend() {
    let mut s = StreamState::new(LIMITS, catalog(&[("a", "1"), ("b", "1")]));
    let got = s.on_sotw(&sotw(Kind::Cluster, &[], "", "")).expect("ok");
    assert_eq!(got, Received::Subscribe(Kind::Cluster));
    let r1 = s.next_sotw().expect("first answer");
    assert_eq!(names(&r1), ["a@1", "b@1"], "wildcard: every cluster");
    assert!(s.next_sotw().is_none(), "nothing more is due");
    let ack = sotw(Kind::Cluster, &[], &r1.version_info, &r1.nonce);
    assert_eq!(s.on_sotw(&ack).expect("ok"), Received::Ack(Kind::Cluster));
    assert!(s.next_sotw().is_none(), "an ACK asks for nothing");

    s.set_catalog(catalog(&[("a", "2"), ("b", "1")]));
    let r2 = s.next_sotw().expect("a change is pushed");
    assert_eq!(names(&r2), ["a@2", "b@1"], "clusters: the whole set");
    assert_ne!(r2.version_info, r1.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    let rejected = nack(
        Kind::Cluster,
        &[],
        &r1.version_info,
        &r2.nonce,
        "bad cluster",
    );
    assert_eq!(
        s.on_sotw(&rejected).expect("ok"),
        Received::Nack {
            kind: Kind::Cluster,
            kept: Some(r1.version_info.clone()),
            error: "bad cluster".into()
        }
    );
    assert!(
        s.next_sotw().is_none(),
        "the rejected set is not sent again"
    );
    s.set_catalog(catalog(&[("a", "3"), ("b", "1")]));
    assert_eq!(names(&s.next_sotw().expect("next change")), ["a@3", "b@1"]);
}

#[test]
fn a_stale_nonce_is_ignored() {
    let mut s = StreamState::new(LIMITS, catalog(&[("a", "1")]));
    s.on_sotw(&sotw(Kind::Cluster, &[], "", "")).expect("ok");
    let r1 = s.next_sotw().expect("answer");
    s.set_catalog(catalog(&[("a", "2")]));
    let r2 = s.next_sotw().expect("answer");
    // A late ACK of r1 changing the subscription: ignored whole.
    let late = sotw(Kind::Cluster, &["zzz"], &r1.version_info, &r1.nonce);
    assert_eq!(
        s.on_sotw(&late).expect("ok"),
        Received::Stale(Kind::Cluster)
    );
    assert!(s.next_sotw().is_none());
    let ack = sotw(Kind::Cluster, &[], &r2.version_info, &r2.nonce);
    assert_eq!(s.on_sotw(&ack).expect("ok"), Received::Ack(Kind::Cluster));
}

#[test]
fn wildcard_rules_per_type() {
    let mut s = StreamState::new(LIMITS, catalog(&[("a", "1"), ("b", "1")]));
    // Endpoints: an empty first request is no subscription, but is answered.
    s.on_sotw(&sotw(Kind::Endpoint, &[], "", "")).expect("ok");
    let r = s.next_sotw().expect("answered");
    assert!(r.resources.is_empty());
    // `*` subscribes any type to everything.
    let r = s.on_sotw(&sotw(Kind::Endpoint, &["*"], "", &r.nonce));
    assert_eq!(r.expect("ok"), Received::Subscribe(Kind::Endpoint));
    assert_eq!(names(&s.next_sotw().expect("all")), ["a@1", "b@1"]);
    // Listeners: an empty first request is the legacy wildcard.
    s.on_sotw(&sotw(Kind::Listener, &[], "", "")).expect("ok");
    assert_eq!(names(&s.next_sotw().expect("all")), ["a@1", "b@1"]);
}

#[test]
fn an_unknown_name_is_answered_when_the_service_appears() {
    let mut s = StreamState::new(LIMITS, catalog(&[("a", "1")]));
    s.on_sotw(&sotw(Kind::Endpoint, &["b"], "", ""))
        .expect("ok");
    let r = s.next_sotw().expect("answered at once, empty");
    assert!(r.resources.is_empty());
    s.set_catalog(catalog(&[("a", "2")]));
    assert!(s.next_sotw().is_none(), "a change elsewhere sends nothing");
    s.set_catalog(catalog(&[("a", "2"), ("b", "1")]));
    assert_eq!(names(&s.next_sotw().expect("b appeared")), ["b@1"]);
}

#[test]
fn state_of_the_world_endpoints_carry_only_what_changed() {
    let mut s = StreamState::new(LIMITS, catalog(&[("a", "1"), ("b", "1")]));
    s.on_sotw(&sotw(Kind::Endpoint, &["a", "b"], "", ""))
        .expect("ok");
    assert_eq!(names(&s.next_sotw().expect("first")), ["a@1", "b@1"]);
    s.set_catalog(catalog(&[("a", "1"), ("b", "2")]));
    assert_eq!(names(&s.next_sotw().expect("change")), ["b@2"]);
    // Adding a name to the subscription sends just that one.
    s.set_catalog(catalog(&[("a", "1"), ("b", "2"), ("c", "1")]));
    assert!(s.next_sotw().is_none(), "c is not subscribed");
    s.on_sotw(&sotw(Kind::Endpoint, &["a", "b", "c"], "", ""))
        .expect("ok");
    assert_eq!(names(&s.next_sotw().expect("c")), ["c@1"]);
}

#[test]
fn listeners_go_out_before_endpoints_and_removal_resends_the_whole_set() {
    let mut s = StreamState::new(LIMITS, catalog(&[("a", "1"), ("b", "1")]));
    s.on_sotw(&sotw(Kind::Endpoint, &["a"], "", ""))
        .expect("ok");
    s.on_sotw(&sotw(Kind::Listener, &["a", "b"], "", ""))
        .expect("ok");
    assert_eq!(
        s.next_sotw().expect("1").type_url,
        Kind::Listener.type_url()
    );
    assert_eq!(
        s.next_sotw().expect("2").type_url,
        Kind::Endpoint.type_url()
    );
    let mut c = (*catalog(&[("a", "1"), ("b", "1")])).clone();
    c.remove(Kind::Listener, "b");
    s.set_catalog(Arc::new(c));
    assert_eq!(names(&s.next_sotw().expect("b gone")), ["a@1"]);
}

fn delta(kind: Kind, sub: &[&str], unsub: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: kind.type_url().to_string(),
        resource_names_subscribe: sub.iter().map(|n| n.to_string()).collect(),
        resource_names_unsubscribe: unsub.iter().map(|n| n.to_string()).collect(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    }
}

#[test]
fn delta_subscribe_unsubscribe_and_removal() {
    let mut s = StreamState::new(LIMITS, catalog(&[("a", "1"), ("b", "1")]));
    s.on_delta(&delta(Kind::Endpoint, &["a", "x"], &[], ""))
        .expect("ok");
    let r = s.next_delta().expect("a");
    let got: Vec<_> = r
        .resources
        .iter()
        .map(|r| (&*r.name, &*r.version))
        .collect();
    assert_eq!(got, [("a", "1")], "x is unknown: nothing yet");
    assert!(s.next_delta().is_none());
    s.on_delta(&delta(Kind::Endpoint, &["b"], &[], &r.nonce))
        .expect("ok");
    let r = s.next_delta().expect("b");
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "b");
    // Only what changed goes out.
    s.set_catalog(catalog(&[("a", "2"), ("b", "1"), ("x", "1")]));
    let r = s.next_delta().expect("a and x");
    let got: Vec<_> = r.resources.iter().map(|r| &*r.name).collect();
    assert_eq!(got, ["a", "x"]);
    // Unsubscribed names are neither sent nor announced as removed.
    s.on_delta(&delta(Kind::Endpoint, &[], &["x"], &r.nonce))
        .expect("ok");
    assert!(s.next_delta().is_none());
    // A service that leaves is announced as removed.
    s.set_catalog(catalog(&[("b", "1"), ("x", "2")]));
    let r = s.next_delta().expect("a removed");
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["a"]);
    assert!(s.next_delta().is_none());
}

#[test]
fn delta_wildcard_and_initial_versions() {
    let mut s = StreamState::new(LIMITS, catalog(&[("a", "1"), ("b", "1")]));
    let mut first = delta(Kind::Cluster, &[], &[], "");
    first.initial_resource_versions = [("a".to_string(), "1".to_string())].into();
    s.on_delta(&first).expect("ok");
    let r = s.next_delta().expect("b only");
    let got: Vec<_> = r.resources.iter().map(|r| &*r.name).collect();
    assert_eq!(got, ["b"], "the client already holds a@1");
    let nack = DeltaDiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: "no".into(),
            details: Vec::new(),
        }),
        ..delta(Kind::Cluster, &[], &[], &r.nonce)
    };
    assert!(matches!(
        s.on_delta(&nack).expect("ok"),
        Received::Nack {
            kind: Kind::Cluster,
            ..
        }
    ));
    assert!(s.next_delta().is_none(), "not resent after a NACK");
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let mut s = StreamState::new(LIMITS, catalog(&[("a", "1")]));
    let garbage = DiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.nope".repeat(100),
        ..Default::default()
    };
    let e = s.on_sotw(&garbage).expect_err("refused");
    assert!(
        matches!(&e, ProtocolError::UnknownType(t) if t.len() == 200),
        "{e}"
    );
    let many: Vec<String> = (0..9).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(matches!(
        s.on_sotw(&sotw(Kind::Endpoint, &refs, "", "")),
        Err(ProtocolError::TooManyNames { got: 9, max: 8, .. })
    ));
    // Delta: many requests of a few names each cannot grow a subscription past the limit.
    for chunk in refs.chunks(4).take(2) {
        s.on_delta(&delta(Kind::Endpoint, chunk, &[], ""))
            .expect("ok");
    }
    assert!(
        s.on_delta(&delta(Kind::Endpoint, &refs[8..], &[], ""))
            .is_err()
    );
    assert!(
        s.on_delta(&delta(Kind::Endpoint, &[], &[], "no-such-nonce"))
            .is_ok()
    );
}
