use std::num::NonZeroU16;

use envoy_types::pb::envoy::config::core::v3::address;
use gossip::{GossipView, Source, ViewEntry};
use prost::Message;
use schema::{TagKey, TagValue, Weight};

use super::*;
use crate::view::Merger;

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).expect("name")
}

fn ep(service: &str, ip: &str, zone: &str, weight: u64, canary: bool) -> Endpoint {
    let mut e = Endpoint::new(
        name(service),
        ip.parse().expect("ip"),
        NonZeroU16::new(8080).expect("port"),
    );
    e.tags.az = Some(TagValue::new(zone).expect("zone"));
    e.tags.load_balancing_weight = Weight::new(weight).expect("weight");
    e.tags.canary = canary;
    e
}

/// A view of gossip rows (one owner) holding `endpoints`.
fn view(endpoints: &[Endpoint]) -> MergedView {
    let g = GossipView {
        endpoints: endpoints
            .iter()
            .map(|e| ViewEntry {
                endpoint: e.clone().into(),
                source: Source::Gossip {
                    owner: "127.0.0.1:7".parse().expect("addr"),
                },
            })
            .collect::<Vec<_>>()
            .into(),
        snapshots: Vec::new(),
        members: Vec::new(),
        deregistered: Vec::new(),
    };
    Merger::new("127.0.0.1:1".parse().expect("addr"), 0, Vec::new()).merge(&g, 5)
}

fn decode<M: Message + Default>(any: &Any) -> M {
    M::decode(any.value.as_slice()).expect("decodes")
}

#[test]
fn the_assignment_holds_what_the_rest_answer_holds_plus_draining_hosts() {
    let mut canary = ep("web", "10.0.0.2", "b", 7, true);
    canary.tags.extra.insert(
        TagKey::new("team").expect("key"),
        TagValue::new("x").expect("value"),
    );
    let live = [ep("web", "10.0.0.1", "a", 100, false), canary];
    let gone = ep("web", "10.0.0.3", "a", 100, false);
    let cla = assignment(&name("web"), &live.iter().collect::<Vec<_>>(), &[&gone]);
    let rest = schema::eds::response("web", "1", &live, None);
    let rest = &rest.resources[0];
    assert_eq!(cla.cluster_name, "web");
    assert_eq!(cla.endpoints.len(), 2, "zones a and b");
    for (i, loc) in cla.endpoints.iter().enumerate() {
        let l = loc.locality.as_ref().expect("locality");
        assert_eq!(rest["endpoints"][i]["locality"]["zone"], l.zone.as_str());
    }
    let a = &cla.endpoints[0].lb_endpoints;
    assert_eq!(a.len(), 2, "a live host and a draining one");
    assert_eq!(a[0].health_status, HealthStatus::Healthy as i32);
    assert_eq!(a[1].health_status, HealthStatus::Draining as i32);
    let b = &cla.endpoints[1].lb_endpoints[0];
    assert_eq!(b.load_balancing_weight.as_ref().map(|w| w.value), Some(7));
    let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &b.host_identifier else {
        panic!("an endpoint");
    };
    let Some(address::Address::SocketAddress(sa)) =
        e.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        panic!("a socket address");
    };
    assert_eq!(sa.address, "10.0.0.2");
    let meta = &b.metadata.as_ref().expect("metadata").filter_metadata;
    let tidings = &meta[METADATA_NAMESPACE].fields;
    assert_eq!(
        tidings["team"].kind,
        Some(value::Kind::StringValue("x".into()))
    );
    assert_eq!(tidings["canary"].kind, Some(value::Kind::BoolValue(true)));
    assert_eq!(
        meta[ENVOY_LB].fields["canary"].kind,
        Some(value::Kind::BoolValue(true))
    );
    let rest_meta = &rest["endpoints"][1]["lb_endpoints"][0]["metadata"]["filter_metadata"];
    assert_eq!(rest_meta[METADATA_NAMESPACE]["team"], "x");
    assert_eq!(rest_meta[ENVOY_LB]["canary"], true);
}

#[test]
fn listener_route_and_cluster_lead_a_grpc_client_to_the_service() {
    let l: Listener = decode(&named(Kind::Listener, "web"));
    assert_eq!(l.name, "web");
    let hcm: HttpConnectionManager = decode(
        l.api_listener
            .and_then(|a| a.api_listener)
            .as_ref()
            .expect("api listener"),
    );
    let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
        panic!("routes from RDS");
    };
    assert_eq!(rds.route_config_name, "web");
    assert!(matches!(
        rds.config_source.and_then(|c| c.config_source_specifier),
        Some(config_source::ConfigSourceSpecifier::Ads(_))
    ));
    let last = hcm.http_filters.last().expect("a filter");
    assert_eq!(last.name, ROUTER_FILTER);
    let r: RouteConfiguration = decode(&named(Kind::Route, "web"));
    assert_eq!(r.virtual_hosts[0].domains[0], "web");
    let Some(route::Action::Route(action)) = &r.virtual_hosts[0].routes[0].action else {
        panic!("a route action");
    };
    assert_eq!(
        action.cluster_specifier,
        Some(route_action::ClusterSpecifier::Cluster("web".into()))
    );
    let c: Cluster = decode(&named(Kind::Cluster, "web"));
    assert_eq!(c.name, "web");
    assert_eq!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32
        ))
    );
}

#[test]
fn a_new_catalog_reuses_the_resources_of_unchanged_services() {
    let v1 = view(&[
        ep("web", "10.0.0.1", "a", 100, false),
        ep("db", "10.0.0.9", "a", 100, false),
    ]);
    let c1 = Catalog::build(&Catalog::default(), &v1);
    assert_eq!(c1.len(), 2);
    let web = c1.get(Kind::Endpoint, "web").expect("web");
    assert_eq!(
        web.version,
        v1.service_index(&name("web")).to_string(),
        "the REST version"
    );
    let v2 = view(&[
        ep("web", "10.0.0.1", "a", 50, false),
        ep("db", "10.0.0.9", "a", 100, false),
    ]);
    let c2 = Catalog::build(&c1, &v2);
    let same = |k, n| Arc::ptr_eq(c1.get(k, n).expect("old"), c2.get(k, n).expect("new"));
    assert!(same(Kind::Endpoint, "db"), "db did not change");
    assert!(!same(Kind::Endpoint, "web"), "web's weight did");
    assert!(same(Kind::Cluster, "web") && same(Kind::Listener, "web"));
    let v3 = view(&[ep("db", "10.0.0.9", "a", 100, false)]);
    let c3 = Catalog::build(&c2, &v3);
    assert!(
        c3.get(Kind::Cluster, "web").is_none(),
        "a service that leaves leaves"
    );
}

#[test]
fn a_stream_catches_up_in_pieces_then_gets_only_what_changed() {
    use super::super::protocol::{Limits, MAX_PER_RESPONSE, StreamState};
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

    let n = MAX_PER_RESPONSE + 50;
    let eps = |w: u64| -> Vec<Endpoint> {
        (0..n)
            .map(|i| {
                ep(
                    &format!("s{i:03}"),
                    "10.0.0.1",
                    "a",
                    if i == 7 { w } else { 1 },
                    false,
                )
            })
            .collect()
    };
    let c1 = Arc::new(Catalog::build(&Catalog::default(), &view(&eps(1))));
    let mut s = StreamState::new(Limits { max_names: 1000 }, c1.clone());
    let req = DiscoveryRequest {
        type_url: Kind::Endpoint.type_url().into(),
        resource_names: vec!["*".into()],
        ..Default::default()
    };
    s.on_sotw(&req).expect("ok");
    let first = s.next_sotw().expect("a first piece");
    let second = s.next_sotw().expect("the rest");
    assert_eq!(
        (first.resources.len(), second.resources.len()),
        (MAX_PER_RESPONSE, 50)
    );
    assert!(s.next_sotw().is_none());
    let c2 = Arc::new(Catalog::build(&c1, &view(&eps(9))));
    assert_eq!(c2.changed(Kind::Endpoint).len(), 1, "one service changed");
    s.set_catalog(c2);
    let r = s.next_sotw().expect("the change");
    assert_eq!(r.resources.len(), 1);
    let cla: ClusterLoadAssignment = decode(&r.resources[0]);
    assert_eq!(cla.cluster_name, "s007");
    assert!(s.next_sotw().is_none());
}
