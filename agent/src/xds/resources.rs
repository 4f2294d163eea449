//! The xDS resources made from the merged view, one of each kind per service, and the
//! [`Catalog`] that holds them with their versions.
//!
//! - CDS: a cluster named after the service, of type EDS, its endpoints from ADS.
//! - EDS: the service's `ClusterLoadAssignment`, resource for resource what the REST answer
//!   (`/v3/discovery:endpoints`, [`schema::eds`]) holds, plus the hosts deregistered lately as
//!   `DRAINING` (the REST answer leaves them out).
//! - LDS: an API listener named after the service (`xds:///SERVICE` asks LDS for
//!   `SERVICE`), whose HTTP connection manager takes its routes from RDS, with the router
//!   filter gRPC requires.
//! - RDS: a route configuration named after the service: one virtual host for the service's
//!   name, every path to the cluster of that name.
//!
//! Versions: a cluster, listener and route are a function of the service's name alone, so
//! their version is [`FIXED_VERSION`]; an assignment's version is the service's content index
//! (the REST answer's `version_info`), with a digest of its draining hosts after a `-` while
//! there are any. A new catalog reuses every resource of the previous one whose version did
//! not change, so a change re-encodes only the services it touched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, Metadata,
    SocketAddress, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::{Any, ListValue, Struct, UInt32Value, Value, value};
use envoy_types::util::pack_any;
use schema::{Endpoint, ServiceName};

use crate::view::MergedView;

/// The metadata namespace of an endpoint's tags (`filter_metadata["tidings"]`).
pub use schema::eds::METADATA_NAMESPACE;
/// Envoy's own load-balancer namespace, where the REST answer also puts `canary`.
const ENVOY_LB: &str = "envoy.lb";
/// The version of a resource made from the service's name alone.
pub const FIXED_VERSION: &str = "1";
/// The router filter's name (gRPC requires the last HTTP filter to be the router).
const ROUTER_FILTER: &str = "envoy.filters.http.router";

/// The four kinds of resource served, in the order a client needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Listener,
    Route,
    Cluster,
    Endpoint,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Listener, Kind::Route, Kind::Cluster, Kind::Endpoint];

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Kind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Endpoint => schema::eds::CLA_TYPE_URL,
        }
    }

    /// The kind of a type URL; `None` for any other (the caller says which it refused).
    pub fn of_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// Short name for logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Listener => "lds",
            Kind::Route => "rds",
            Kind::Cluster => "cds",
            Kind::Endpoint => "eds",
        }
    }

    /// Whether an empty first subscription means "every resource" (legacy wildcard): for
    /// listeners and clusters only, as the xDS protocol says.
    pub fn wildcard_by_default(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One encoded resource and its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub version: String,
    /// [`digest`] of `version`: what a stream keeps of what its client holds.
    pub digest: u64,
    pub body: Any,
}

impl Resource {
    pub fn new(version: String, body: Any) -> Self {
        Resource {
            digest: digest(&version),
            version,
            body,
        }
    }
}

/// A 64-bit digest of a version string. Streams keep these instead of the strings: two
/// versions with one digest (odds 2^-64 per pair) would leave one change unsent until the
/// next. Never leaves the process, so the hasher need only be stable within it.
pub fn digest(version: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    version.hash(&mut h);
    h.finish()
}

/// A resource's name: one allocation per service, shared by every kind, every catalog
/// that has it, and every stream that subscribes to it or holds it.
pub type Name = Arc<str>;
/// One kind's resources, by name.
pub type KindMap = BTreeMap<Name, Arc<Resource>>;

/// Every resource of the view, by kind and name. Immutable once built; streams share it,
/// and a kind none of whose resources changed shares its map with the previous catalog.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    by_kind: [Arc<KindMap>; 4],
    /// Names whose resource differs from the previous catalog's (new, changed or gone): a
    /// stream that had caught up with the previous catalog looks at these alone.
    changed: [BTreeSet<Name>; 4],
    /// One more than the previous catalog's.
    seq: u64,
    /// The view's index: the `version_info` of every response made from this catalog.
    version: String,
}

impl Catalog {
    /// The catalog of `view`, reusing `prev`'s resources whose version did not change.
    pub fn build(prev: &Catalog, view: &MergedView) -> Catalog {
        let mut maps: [KindMap; 4] = Default::default();
        for (name, s) in view.services() {
            let key = name.as_str();
            let shared = prev.name(key).unwrap_or_else(|| Name::from(key));
            for kind in [Kind::Listener, Kind::Route, Kind::Cluster] {
                let r = match prev.get(kind, key) {
                    Some(r) => r.clone(),
                    None => Arc::new(Resource::new(FIXED_VERSION.to_string(), named(kind, key))),
                };
                maps[kind.index()].insert(shared.clone(), r);
            }
            let drains = view.draining(name);
            let version = eds_version(s.index, drains);
            let r = match prev.get(Kind::Endpoint, key) {
                Some(r) if r.version == version => r.clone(),
                _ => {
                    let live: Vec<&Endpoint> = s.hosts.iter().map(|h| &*h.endpoint).collect();
                    let drained: Vec<&Endpoint> = drains.iter().map(|d| &*d.endpoint).collect();
                    Arc::new(Resource::new(
                        version,
                        pack_any(assignment(name, &live, &drained)),
                    ))
                }
            };
            maps[Kind::Endpoint.index()].insert(shared, r);
        }
        Catalog::after(prev, maps, view.index().to_string())
    }

    /// The catalog after `prev` with `maps`: what changed, and the maps of unchanged kinds
    /// shared with `prev`.
    fn after(prev: &Catalog, maps: [KindMap; 4], version: String) -> Catalog {
        let mut next = Catalog {
            seq: prev.seq + 1,
            version,
            ..Catalog::default()
        };
        for (kind, map) in Kind::ALL.into_iter().zip(maps) {
            let k = kind.index();
            next.changed[k] = changed(prev.all(kind), &map);
            // Unchanged: the previous map itself, so streams settled on it stay settled.
            next.by_kind[k] = if next.changed[k].is_empty() {
                prev.by_kind[k].clone()
            } else {
                Arc::new(map)
            };
        }
        next
    }

    /// The catalog's own copy of a service's name, if it has the service.
    pub fn name(&self, name: &str) -> Option<Name> {
        self.by_kind[Kind::Cluster.index()]
            .get_key_value(name)
            .map(|(n, _)| n.clone())
    }

    /// Names of `kind` whose resource differs from the previous catalog's.
    pub fn changed(&self, kind: Kind) -> &BTreeSet<Name> {
        &self.changed[kind.index()]
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The `version_info` of responses made from it (the view's index).
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&Arc<Resource>> {
        self.by_kind[kind.index()].get(name)
    }

    /// Every resource of a kind, by name.
    pub fn all(&self, kind: Kind) -> &Arc<KindMap> {
        &self.by_kind[kind.index()]
    }

    /// How many services it describes.
    pub fn len(&self) -> usize {
        self.by_kind[Kind::Cluster.index()].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets one resource to a placeholder body at `version` (protocol tests).
    #[cfg(test)]
    pub(crate) fn put(&mut self, kind: Kind, name: &str, version: &str) {
        let r = placeholder(kind, name, version);
        let shared = self.name(name).unwrap_or_else(|| Name::from(name));
        Arc::make_mut(&mut self.by_kind[kind.index()]).insert(shared, Arc::new(r));
        self.version = format!("{}{name}@{version};", self.version);
    }

    /// The catalog after `prev` whose services are `services` (name to version), every kind
    /// a placeholder at that version, reusing `prev`'s resources as [`Catalog::build`] does
    /// (protocol tests).
    #[cfg(test)]
    pub(crate) fn derive(prev: &Catalog, services: &BTreeMap<String, String>) -> Catalog {
        let mut maps: [KindMap; 4] = Default::default();
        for (name, version) in services {
            let shared = prev.name(name).unwrap_or_else(|| Name::from(name.as_str()));
            for kind in Kind::ALL {
                let r = match prev.get(kind, name) {
                    Some(r) if r.version == *version => r.clone(),
                    _ => Arc::new(placeholder(kind, name, version)),
                };
                maps[kind.index()].insert(shared.clone(), r);
            }
        }
        Catalog::after(prev, maps, format!("seq{}", prev.seq + 1))
    }

    /// Drops one resource (protocol tests).
    #[cfg(test)]
    pub(crate) fn remove(&mut self, kind: Kind, name: &str) {
        Arc::make_mut(&mut self.by_kind[kind.index()]).remove(name);
    }
}

/// A resource whose body is `name@version` (protocol tests).
#[cfg(test)]
fn placeholder(kind: Kind, name: &str, version: &str) -> Resource {
    Resource::new(
        version.to_string(),
        Any {
            type_url: kind.type_url().to_string(),
            value: format!("{name}@{version}").into_bytes(),
        },
    )
}

/// Names new in `next`, gone from it, or whose resource is another (not the same `Arc`).
fn changed(prev: &KindMap, next: &KindMap) -> BTreeSet<Name> {
    let moved = next
        .iter()
        .filter(|(n, r)| !prev.get(*n).is_some_and(|p| Arc::ptr_eq(p, r)))
        .map(|(n, _)| n.clone());
    let gone = prev.keys().filter(|n| !next.contains_key(*n)).cloned();
    moved.chain(gone).collect()
}

/// The version of a service's assignment: its content index, as the REST answer's, plus a
/// digest of the draining hosts while there are any.
fn eds_version(index: u64, drains: &[crate::view::Drain]) -> String {
    if drains.is_empty() {
        return index.to_string();
    }
    // The same digest as a content index, over the draining hosts.
    let drained = crate::view::service_index(drains.iter().map(|d| &*d.endpoint));
    format!("{index}-{drained:x}")
}

/// A resource made from the name alone.
fn named(kind: Kind, name: &str) -> Any {
    match kind {
        Kind::Listener => pack_any(listener(name)),
        Kind::Route => pack_any(route_configuration(name)),
        _ => pack_any(cluster(name)),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// An EDS cluster named after the service, its endpoints from ADS.
pub fn cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    }
}

/// The API listener a proxyless gRPC client asks for by the service's name.
pub fn listener(name: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: ROUTER_FILTER.to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(hcm)),
        }),
        ..Default::default()
    }
}

/// One virtual host for the service's name (any port), every path to its cluster.
pub fn route_configuration(name: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_string(),
            domains: vec![name.to_string(), format!("{name}:*")],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        name.to_string(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The service's assignment: endpoints grouped by (region, zone) in that order, as the REST
/// answer groups them; draining hosts after the live ones of their locality.
pub fn assignment(
    service: &ServiceName,
    live: &[&Endpoint],
    draining: &[&Endpoint],
) -> ClusterLoadAssignment {
    let mut localities: BTreeMap<(String, String), Vec<LbEndpoint>> = BTreeMap::new();
    let all = live
        .iter()
        .map(|e| (e, HealthStatus::Healthy))
        .chain(draining.iter().map(|e| (e, HealthStatus::Draining)));
    for (ep, health) in all {
        localities
            .entry(schema::eds::locality(ep))
            .or_default()
            .push(lb_endpoint(ep, health));
    }
    ClusterLoadAssignment {
        cluster_name: service.to_string(),
        endpoints: localities
            .into_iter()
            .map(|((region, zone), lb_endpoints)| LocalityLbEndpoints {
                locality: Some(Locality {
                    region,
                    zone,
                    ..Default::default()
                }),
                load_balancing_weight: Some(UInt32Value {
                    value: schema::eds::locality_weight(lb_endpoints.iter().map(|e| {
                        u64::from(e.load_balancing_weight.as_ref().map_or(1, |w| w.value))
                    })),
                }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn lb_endpoint(ep: &Endpoint, health: HealthStatus) -> LbEndpoint {
    let address = Address {
        address: Some(
            envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                SocketAddress {
                    address: ep.ip.to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                        ep.port.get(),
                    ))),
                    ..Default::default()
                },
            ),
        ),
    };
    let mut filter_metadata = std::collections::HashMap::new();
    if ep.tags.canary {
        let canary = [(
            "canary".to_string(),
            json_value(&serde_json::Value::Bool(true)),
        )];
        filter_metadata.insert(
            ENVOY_LB.to_string(),
            Struct {
                fields: canary.into_iter().collect(),
            },
        );
    }
    filter_metadata.insert(
        METADATA_NAMESPACE.to_string(),
        json_struct(&ep.tags.to_json()),
    );
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
            envoy_types::pb::envoy::config::endpoint::v3::Endpoint {
                address: Some(address),
                ..Default::default()
            },
        )),
        health_status: health as i32,
        metadata: Some(Metadata {
            filter_metadata,
            ..Default::default()
        }),
        load_balancing_weight: Some(UInt32Value {
            value: u32::from(ep.tags.load_balancing_weight.get()),
        }),
    }
}

/// A JSON object as a protobuf `Struct` (how Envoy's JSON maps to it).
fn json_struct(map: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_value(v)))
            .collect(),
    }
}

fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => value::Kind::NullValue(0),
        J::Bool(b) => value::Kind::BoolValue(*b),
        J::Number(n) => value::Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => value::Kind::StringValue(s.clone()),
        J::Array(a) => value::Kind::ListValue(ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        J::Object(o) => value::Kind::StructValue(json_struct(o)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
#[path = "resources_tests.rs"]
mod tests;
