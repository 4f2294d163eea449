//! The xDS test's ADS client: state-of-the-world and incremental streams to the agent, and
//! answers decoded with Envoy's published types (envoy-types' prost messages) into the JSON
//! shape of the REST EDS answer, so the two can be compared field for field.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail, ensure};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, Struct, value};
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::{ANSWER, CDS, CLA, LDS, RDS};

pub(super) fn rt() -> Result<tokio::runtime::Runtime> {
    // A worker of its own keeps the streams' connections served between `block_on`s.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// One open state-of-the-world stream.
pub(super) struct Sotw {
    pub(super) tx: mpsc::Sender<DiscoveryRequest>,
    pub(super) rx: Streaming<DiscoveryResponse>,
}

pub(super) async fn connect(
    addr: &str,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>> {
    let c = tokio::time::timeout(
        ANSWER,
        AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")),
    )
    .await
    .context("connect timed out")??;
    Ok(c)
}

impl Sotw {
    pub(super) async fn open(addr: &str) -> Result<Sotw> {
        let mut c = connect(addr).await?;
        let (tx, rx) = mpsc::channel(16);
        let rx = c
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Sotw { tx, rx })
    }

    pub(super) async fn send(
        &self,
        type_url: &str,
        names: &[&str],
        last: Option<&DiscoveryResponse>,
    ) -> Result<()> {
        let req = DiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: last.map(|r| r.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        };
        self.tx.send(req).await.context("stream closed")
    }

    /// The next answer of `type_url`, acknowledging the others (LDS and RDS for `web`,
    /// CDS for everything) on the way.
    pub(super) async fn next_of(&mut self, type_url: &str) -> Result<DiscoveryResponse> {
        loop {
            let r = self.next().await?;
            if r.type_url == type_url {
                return Ok(r);
            }
            let names: &[&str] = if r.type_url == CDS { &[] } else { &["web"] };
            self.send(&r.type_url, names, Some(&r)).await?;
        }
    }

    pub(super) async fn next(&mut self) -> Result<DiscoveryResponse> {
        match tokio::time::timeout(ANSWER, self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Err(status)) => bail!("stream failed: {status}"),
            Err(_) => bail!("no answer within {ANSWER:?}"),
        }
    }
}

pub(super) fn decode<M: Message + Default>(any: &Any) -> Result<M> {
    Ok(M::decode(any.value.as_slice())?)
}

/// A protobuf `Struct` as JSON (how Envoy maps one).
pub(super) fn struct_json(s: &Struct) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in &s.fields {
        let j = match &v.kind {
            Some(value::Kind::BoolValue(b)) => json!(b),
            Some(value::Kind::NumberValue(n)) => json!(*n as u64),
            Some(value::Kind::StringValue(s)) => json!(s),
            Some(value::Kind::StructValue(s)) => struct_json(s),
            other => json!(format!("{other:?}")),
        };
        m.insert(k.clone(), j);
    }
    Value::Object(m)
}

/// A decoded assignment in the REST answer's JSON shape (the fields that answer uses).
pub(super) fn cla_json(cla: &ClusterLoadAssignment) -> Value {
    let endpoints: Vec<Value> = cla
        .endpoints
        .iter()
        .map(|l| {
            let loc = l.locality.clone().unwrap_or_default();
            let lbs: Vec<Value> = l
                .lb_endpoints
                .iter()
                .map(|e| {
                    let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                        return Value::Null;
                    };
                    let Some(address::Address::SocketAddress(sa)) =
                        ep.address.as_ref().and_then(|a| a.address.as_ref())
                    else {
                        return Value::Null;
                    };
                    let port = match sa.port_specifier {
                        Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => p,
                        _ => 0,
                    };
                    let meta: serde_json::Map<String, Value> = e
                        .metadata
                        .as_ref()
                        .map(|m| {
                            m.filter_metadata
                                .iter()
                                .map(|(k, v)| (k.clone(), struct_json(v)))
                                .collect()
                        })
                        .unwrap_or_default();
                    let health = match e.health_status {
                        1 => "HEALTHY",
                        3 => "DRAINING",
                        _ => "OTHER",
                    };
                    json!({
                        "endpoint": {"address": {"socket_address": {"address": sa.address, "port_value": port}}},
                        "health_status": health,
                        "load_balancing_weight": e.load_balancing_weight.as_ref().map(|w| w.value),
                        "metadata": {"filter_metadata": meta},
                    })
                })
                .collect();
            json!({
                "locality": {"region": loc.region, "zone": loc.zone},
                "lb_endpoints": lbs,
                "load_balancing_weight": l.load_balancing_weight.as_ref().map(|w| w.value),
            })
        })
        .collect();
    json!({"@type": CLA, "cluster_name": cla.cluster_name, "endpoints": endpoints})
}

/// The hosts (`ip:port` and health) of an assignment.
pub(super) fn hosts_of(cla: &ClusterLoadAssignment) -> BTreeSet<(String, i32)> {
    let j = cla_json(cla);
    let mut out = BTreeSet::new();
    for l in j["endpoints"].as_array().into_iter().flatten() {
        for e in l["lb_endpoints"].as_array().into_iter().flatten() {
            let sa = &e["endpoint"]["address"]["socket_address"];
            let health = if e["health_status"] == "DRAINING" {
                3
            } else {
                1
            };
            out.insert((
                format!(
                    "{}:{}",
                    sa["address"].as_str().unwrap_or(""),
                    sa["port_value"]
                ),
                health,
            ));
        }
    }
    out
}

/// LDS, RDS, wildcard CDS, then EDS for `web` and `later` (not there yet), each decoded
/// and acknowledged; returns the EDS answer (unacknowledged).
pub(super) async fn walk(s: &mut Sotw) -> Result<DiscoveryResponse> {
    s.send(LDS, &["web"], None).await?;
    let lds = s.next().await?;
    ensure!(lds.type_url == LDS && lds.resources.len() == 1, "{lds:?}");
    let l: Listener = decode(&lds.resources[0])?;
    ensure!(l.name == "web");
    let api = l.api_listener.and_then(|a| a.api_listener);
    let hcm: HttpConnectionManager = decode(api.as_ref().context("api listener")?)?;
    let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
        bail!("no RDS in the listener");
    };
    ensure!(rds.route_config_name == "web");
    let router = hcm.http_filters.last().map(|f| f.name.as_str());
    ensure!(router == Some("envoy.filters.http.router"), "{router:?}");
    s.send(LDS, &["web"], Some(&lds)).await?;
    s.send(RDS, &["web"], None).await?;
    let r = s.next().await?;
    let rc: RouteConfiguration = decode(&r.resources[0])?;
    let Some(route::Action::Route(action)) = &rc.virtual_hosts[0].routes[0].action else {
        bail!("no route action");
    };
    let to_web = Some(route_action::ClusterSpecifier::Cluster("web".into()));
    ensure!(action.cluster_specifier == to_web);
    s.send(RDS, &["web"], Some(&r)).await?;
    // Wildcard CDS: every service, the agent's own included.
    s.send(CDS, &[], None).await?;
    let c = s.next().await?;
    let clusters: BTreeSet<String> = c
        .resources
        .iter()
        .map(|a| decode::<Cluster>(a).map(|c| c.name))
        .collect::<Result<_>>()?;
    ensure!(
        clusters.contains("web") && clusters.contains("tidings-agent"),
        "{clusters:?}"
    );
    s.send(CDS, &[], Some(&c)).await?;
    s.send(CLA, &["web", "later"], None).await?;
    let e = s.next().await?;
    ensure!(e.resources.len() == 1, "only web exists: {e:?}");
    Ok(e)
}

/// An incremental stream subscribed to `web`'s endpoints, its first answer acknowledged.
pub(super) async fn delta(
    xds: &str,
) -> Result<(
    mpsc::Sender<DeltaDiscoveryRequest>,
    Streaming<DeltaDiscoveryResponse>,
)> {
    let mut c = connect(xds).await?;
    let (tx, rx) = mpsc::channel(16);
    let mut stream = c
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        type_url: CLA.into(),
        resource_names_subscribe: vec!["web".into()],
        ..Default::default()
    })
    .await?;
    let first = tokio::time::timeout(ANSWER, stream.message())
        .await
        .context("first delta answer")??
        .context("ended")?;
    ensure!(first.resources.len() == 1 && first.resources[0].name == "web");
    tx.send(DeltaDiscoveryRequest {
        type_url: CLA.into(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await?;
    Ok((tx, stream))
}
