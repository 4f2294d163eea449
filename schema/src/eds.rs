//! Envoy EDS over REST-JSON (`POST /v3/discovery:endpoints`), served by the registry and by
//! every agent so a stock Envoy can use Tidings directly.
//!
//! Rules from Envoy's `EdsClusterImpl` (docs/API.md#envoy-eds): exactly one
//! `ClusterLoadAssignment` whose `cluster_name` equals the requested name; 304 with an empty
//! body when `version_info` is current; never an *accidental* empty endpoint list, because
//! Envoy applies `endpoints: []` and drops every host — so a service with no endpoints is
//! answered with zero resources, which Envoy treats as "keep what you have".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Endpoint, ValidationError};

pub const CLA_TYPE_URL: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// The metadata namespace (`filter_metadata`) holding an endpoint's tags.
pub const METADATA_NAMESPACE: &str = "tidings";

/// The parts of Envoy's `DiscoveryRequest` we use; everything else (node, nonce) is ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DiscoveryRequest {
    #[serde(default)]
    pub version_info: String,
    #[serde(default)]
    pub resource_names: Vec<String>,
    #[serde(default)]
    pub type_url: String,
    #[serde(default)]
    pub error_detail: Option<Value>,
}

impl DiscoveryRequest {
    /// Parses the body and returns it with the one cluster it asks for. REST EDS has one
    /// subscription per cluster, so exactly one resource name is required.
    pub fn parse(body: &[u8]) -> Result<(DiscoveryRequest, String), ValidationError> {
        let req: DiscoveryRequest =
            serde_json::from_slice(body).map_err(|e| ValidationError::Malformed(e.to_string()))?;
        if !req.type_url.is_empty() && req.type_url != CLA_TYPE_URL {
            return Err(ValidationError::Malformed(format!(
                "unsupported type_url {:?}",
                req.type_url
            )));
        }
        match req.resource_names.as_slice() {
            [one] => {
                let name = one.clone();
                Ok((req, name))
            }
            [] => Err(ValidationError::Missing("resource_names")),
            _ => Err(ValidationError::Malformed(
                "REST EDS serves exactly one resource name per request".into(),
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiscoveryResponse {
    pub version_info: String,
    pub resources: Vec<Value>,
    pub type_url: &'static str,
}

/// The answer for `cluster_name` at `version`: one assignment grouping endpoints by locality
/// (region, zone), weights and canary metadata mapped as Envoy v1 SDS did; zero resources when
/// there are no endpoints. `stale_after_secs` becomes `policy.endpoint_stale_after`.
pub fn response(
    cluster_name: &str,
    version: &str,
    endpoints: &[Endpoint],
    stale_after_secs: Option<u64>,
) -> DiscoveryResponse {
    let resources = if endpoints.is_empty() {
        Vec::new()
    } else {
        vec![cluster_load_assignment(
            cluster_name,
            endpoints,
            stale_after_secs,
        )]
    };
    DiscoveryResponse {
        version_info: version.to_string(),
        resources,
        type_url: CLA_TYPE_URL,
    }
}

fn cluster_load_assignment(
    cluster_name: &str,
    endpoints: &[Endpoint],
    stale_after_secs: Option<u64>,
) -> Value {
    let mut localities: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for ep in endpoints {
        let mut lb = json!({
            "endpoint": {"address": {"socket_address": {"address": ep.ip.to_string(), "port_value": ep.port.get()}}},
            "health_status": "HEALTHY",
            "load_balancing_weight": ep.tags.load_balancing_weight.get(),
        });
        // Every tag under `tidings` (the flat v1 object), for clients that pick hosts by
        // tag; `canary` also where Envoy's subset load balancer looks for it.
        lb["metadata"] = json!({"filter_metadata": {METADATA_NAMESPACE: ep.tags.to_json()}});
        if ep.tags.canary {
            lb["metadata"]["filter_metadata"]["envoy.lb"] = json!({"canary": true});
        }
        localities.entry(locality(ep)).or_default().push(lb);
    }
    let endpoints: Vec<Value> = localities
        .into_iter()
        .map(|((region, zone), lb_endpoints)| {
            let weight = locality_weight(lb_endpoints.iter().map(|e| {
                e["load_balancing_weight"].as_u64().unwrap_or(1)
            }));
            json!({"locality": {"region": region, "zone": zone}, "lb_endpoints": lb_endpoints, "load_balancing_weight": weight})
        })
        .collect();
    let mut cla =
        json!({"@type": CLA_TYPE_URL, "cluster_name": cluster_name, "endpoints": endpoints});
    if let Some(secs) = stale_after_secs {
        cla["policy"] = json!({"endpoint_stale_after": format!("{secs}s")});
    }
    cla
}

/// An endpoint's locality, (region, zone): how assignments group endpoints, in this order.
pub fn locality(ep: &Endpoint) -> (String, String) {
    let region = ep
        .tags
        .region
        .as_ref()
        .map(|r| r.to_string())
        .unwrap_or_default();
    (region, ep.tags.zone().unwrap_or_default().to_string())
}

/// A locality's weight: the sum of its endpoints' weights. Envoy reads it only with
/// locality-weighted load balancing; gRPC's xDS client ignores a locality without one.
pub fn locality_weight(weights: impl Iterator<Item = u64>) -> u32 {
    u32::try_from(weights.fold(0u64, u64::saturating_add)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use super::*;
    use crate::{ServiceName, TagValue, Weight};

    fn ep(ip: &str, zone: &str, w: u64, canary: bool) -> Endpoint {
        let mut e = Endpoint::new(
            ServiceName::new("web").expect("name"),
            ip.parse().expect("ip"),
            NonZeroU16::new(80).expect("port"),
        );
        e.tags.az = Some(TagValue::new(zone).expect("zone"));
        e.tags.load_balancing_weight = Weight::new(w).expect("weight");
        e.tags.canary = canary;
        e
    }

    #[test]
    fn one_assignment_named_after_the_request_grouped_by_zone() {
        let eps = [
            ep("10.0.0.1", "a", 10, false),
            ep("10.0.0.2", "b", 100, true),
            ep("::1", "a", 1, false),
        ];
        let r = response("web", "42", &eps, Some(300));
        assert_eq!(r.version_info, "42");
        assert_eq!(r.resources.len(), 1);
        let cla = &r.resources[0];
        assert_eq!(cla["cluster_name"], "web");
        assert_eq!(cla["@type"], CLA_TYPE_URL);
        assert_eq!(cla["policy"]["endpoint_stale_after"], "300s");
        let zones: Vec<_> = cla["endpoints"]
            .as_array()
            .expect("array")
            .iter()
            .map(|l| l["locality"]["zone"].clone())
            .collect();
        assert_eq!(zones, [json!("a"), json!("b")]);
        let a = &cla["endpoints"][0]["lb_endpoints"];
        assert_eq!(
            a[0]["endpoint"]["address"]["socket_address"]["address"],
            "10.0.0.1"
        );
        assert_eq!(a[0]["load_balancing_weight"], 10);
        assert_eq!(
            a[1]["endpoint"]["address"]["socket_address"]["address"],
            "::1"
        );
        let b = &cla["endpoints"][1]["lb_endpoints"][0];
        assert_eq!(b["metadata"]["filter_metadata"]["envoy.lb"]["canary"], true);
    }

    #[test]
    fn no_endpoints_means_no_resources_never_an_empty_list() {
        assert!(response("web", "1", &[], None).resources.is_empty());
    }

    #[test]
    fn requests_need_exactly_one_name_of_the_right_type() {
        let ok = br#"{"version_info":"","node":{"id":"n"},"resource_names":["web"],"type_url":"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"}"#;
        assert_eq!(DiscoveryRequest::parse(ok).expect("parses").1, "web");
        assert!(DiscoveryRequest::parse(br#"{"resource_names":[]}"#).is_err());
        assert!(DiscoveryRequest::parse(br#"{"resource_names":["a","b"]}"#).is_err());
        assert!(DiscoveryRequest::parse(br#"{"resource_names":["a"],"type_url":"x"}"#).is_err());
        assert!(DiscoveryRequest::parse(b"{").is_err());
    }
}
