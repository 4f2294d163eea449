//! The agent's xDS server (docs/API.md#xds) as clients see it, with the real binary: a
//! registry and an agent as processes, hosts checked in to the registry.
//!
//! - grpcio's own xDS resolver (a client nobody here wrote) calls `xds:///web` on Python
//!   gRPC servers: it balances over the instances, follows a deregistration and a new
//!   instance, and goes on working with the registry SIGKILLed.
//! - An ADS client decodes every answer with Envoy's published types (envoy-types' prost
//!   messages): listener → route → cluster → assignment; the assignment equals the REST EDS
//!   answer's; changes are pushed; a NACK is counted with its error; bad requests get an
//!   error; a restarted agent serves its cached view at once.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

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
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use serde_json::{Value, json};
use tests::fleet::{self, Agent, lookup};
use tests::python::Py;
use tests::{Proc, http, poll};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const START: Duration = Duration::from_secs(20);
const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// How long one ADS answer may take here (pushes take milliseconds; CI is slow).
const ANSWER: Duration = Duration::from_secs(5);

/// A per-run /24 of loopback for test `t`, so parallel runs and other suites don't collide.
fn ip(t: u8, host: u8) -> String {
    let net = 100 + std::process::id() % 100;
    format!("127.{t}.{net}.{host}")
}

/// A registry on host 9 of the test's net, and its URL. Its check-in interval is its
/// warm-up after start (while warming, its answers do not remove hosts): a short one.
fn registry(t: u8) -> Result<(Proc, String)> {
    let addr = format!("{}:7700", ip(t, 9));
    Ok((
        fleet::registry(&addr, "60s", "1s")?,
        format!("http://{addr}"),
    ))
}

/// The agent's xDS address: its API's ip, port 7703 (the default).
fn xds_addr(t: u8) -> String {
    format!("{}:7703", ip(t, 1))
}

fn agent(t: u8, dir: &Path, registry: &str) -> Result<Agent> {
    fleet::local_agent("agent", &ip(t, 1), &dir.join("agent"), registry, &[])
}

fn check_in(registry: &str, service: &str, ip: &str, port: u16, tags: Value) -> Result<()> {
    let body = json!({"ip": ip, "endpoints": [{"service": service, "port": port, "tags": tags}]});
    fleet::post_check_in(registry, &body.to_string())
}

fn deregister(registry: &str, service: &str, ip: &str, port: u16) -> Result<()> {
    let url = format!("{registry}/v1/registration/{service}/{ip}?port={port}");
    let r = http::request("DELETE", &url, None, b"", Duration::from_secs(5))?;
    ensure!(
        r.status == 200,
        "deregister: {}",
        String::from_utf8_lossy(&r.body)
    );
    Ok(())
}

fn wait_listed(agent: &Agent, service: &str, want: &BTreeSet<String>) -> Result<()> {
    poll(&format!("the agent to list {want:?}"), START, || {
        lookup(&agent.url(), service)
            .ok()
            .filter(|l| &l.hosts == want)
    })
    .map(|_| ())
}

// ---------------------------------------------------------------------------------------
// grpcio
// ---------------------------------------------------------------------------------------

/// Backends the client reached in its output lines from `from` on, and how many calls
/// failed.
fn reached(client: &Py, from: usize) -> (Vec<String>, usize) {
    let mut ok = Vec::new();
    let mut failed = 0;
    for line in client.lines().iter().skip(from) {
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        match v["ok"].as_str() {
            Some(b) => ok.push(b.to_string()),
            None => failed += 1,
        }
    }
    (ok, failed)
}

/// Waits until, of the calls made from `from` on, the last 30 reached exactly `want`.
fn wait_balanced(client: &Py, want: &BTreeSet<String>, what: &str) -> Result<usize> {
    poll(what, START, || {
        let (ok, _) = reached(client, 0);
        let total = client.count();
        let recent: Vec<&String> = ok.iter().rev().take(30).collect();
        let seen: BTreeSet<String> = recent.iter().map(|s| s.to_string()).collect();
        (recent.len() == 30 && &seen == want).then_some(total)
    })
}

#[test]
fn grpcio_follows_the_agent_through_changes_and_a_dead_registry() -> Result<()> {
    let t = 41;
    let dir = tempfile::tempdir()?;
    let (mut reg, reg_url) = registry(t)?;
    let agent = agent(t, dir.path(), &reg_url)?;
    let xds = xds_addr(t);
    let port = 50_051;
    let backends: Vec<String> = (2..=4).map(|h| format!("{}:{port}", ip(t, h))).collect();
    let refs: Vec<&str> = backends.iter().map(String::as_str).collect();
    let mut serve_args = vec!["serve"];
    serve_args.extend(&refs);
    let servers = Py::start("xds_grpc.py", &serve_args, &[])?;
    servers.wait_lines(3, START)?;
    ensure!(
        servers.lines().iter().all(|l| l.starts_with("serving")),
        "{:?}",
        servers.lines()
    );
    for h in [2, 3] {
        check_in(&reg_url, "web", &ip(t, h), port, json!({}))?;
    }
    let two: BTreeSet<String> = backends[..2].iter().cloned().collect();
    wait_listed(&agent, "web", &two)?;

    let bootstrap = dir.path().join("bootstrap.json");
    std::fs::write(
        &bootstrap,
        json!({
            "xds_servers": [{"server_uri": xds, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
            "node": {"id": "xds-test", "locality": {"zone": "a"}}
        })
        .to_string(),
    )?;
    let boot = bootstrap.display().to_string();
    let client = Py::start(
        "xds_grpc.py",
        &["call", "xds:///web", "50"],
        &[("GRPC_XDS_BOOTSTRAP", &boot)],
    )?;
    wait_balanced(&client, &two, "grpcio to balance over both instances")?;

    // A deregistration: the host goes (draining), the other keeps every call.
    deregister(&reg_url, "web", &ip(t, 2), port)?;
    let one: BTreeSet<String> = backends[1..2].iter().cloned().collect();
    wait_balanced(&client, &one, "grpcio to leave the deregistered host")?;
    // A new instance joins the balancing.
    check_in(&reg_url, "web", &ip(t, 4), port, json!({}))?;
    let new: BTreeSet<String> = backends[1..].iter().cloned().collect();
    wait_balanced(&client, &new, "grpcio to use the new instance")?;

    // The registry dies: every call still succeeds, over both instances.
    reg.signal("KILL")?;
    reg.wait_exit(Duration::from_secs(5))?;
    let from = client.count();
    poll("60 more calls with the registry dead", START, || {
        (client.count() >= from + 60).then_some(())
    })?;
    let (ok, failed) = reached(&client, from);
    ensure!(failed == 0, "{failed} calls failed with the registry dead");
    let seen: BTreeSet<String> = ok.into_iter().collect();
    ensure!(seen == new, "with the registry dead: {seen:?}");
    let (_, failed_all) = reached(&client, 0);
    ensure!(
        failed_all == 0,
        "{failed_all} calls failed: {:?}",
        client.lines()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Envoy's types
// ---------------------------------------------------------------------------------------

fn rt() -> Result<tokio::runtime::Runtime> {
    // A worker of its own keeps the streams' connections served between `block_on`s.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// One open state-of-the-world stream.
struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

async fn connect(
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
    async fn open(addr: &str) -> Result<Sotw> {
        let mut c = connect(addr).await?;
        let (tx, rx) = mpsc::channel(16);
        let rx = c
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Sotw { tx, rx })
    }

    async fn send(
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
    async fn next_of(&mut self, type_url: &str) -> Result<DiscoveryResponse> {
        loop {
            let r = self.next().await?;
            if r.type_url == type_url {
                return Ok(r);
            }
            let names: &[&str] = if r.type_url == CDS { &[] } else { &["web"] };
            self.send(&r.type_url, names, Some(&r)).await?;
        }
    }

    async fn next(&mut self) -> Result<DiscoveryResponse> {
        match tokio::time::timeout(ANSWER, self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Err(status)) => bail!("stream failed: {status}"),
            Err(_) => bail!("no answer within {ANSWER:?}"),
        }
    }
}

fn decode<M: Message + Default>(any: &Any) -> Result<M> {
    Ok(M::decode(any.value.as_slice())?)
}

/// A protobuf `Struct` as JSON (how Envoy maps one).
fn struct_json(s: &Struct) -> Value {
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
fn cla_json(cla: &ClusterLoadAssignment) -> Value {
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

fn rest_eds(agent: &Agent, service: &str) -> Result<Value> {
    let body = json!({"resource_names": [service], "type_url": CLA}).to_string();
    let r = http::request(
        "POST",
        &format!("{}/v3/discovery:endpoints", agent.url()),
        Some("application/json"),
        body.as_bytes(),
        Duration::from_secs(5),
    )?;
    ensure!(r.status == 200, "REST EDS: {}", r.status);
    r.json()
}

/// The hosts (`ip:port` and health) of an assignment.
fn hosts_of(cla: &ClusterLoadAssignment) -> BTreeSet<(String, i32)> {
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

#[test]
fn answers_decode_with_envoys_types_and_follow_the_view() -> Result<()> {
    let t = 42;
    let dir = tempfile::tempdir()?;
    let (reg, reg_url) = registry(t)?;
    let mut agent = agent(t, dir.path(), &reg_url)?;
    let xds = xds_addr(t);
    check_in(
        &reg_url,
        "web",
        &ip(t, 2),
        8080,
        json!({"az": "a", "team": "blue"}),
    )?;
    let tags = json!({"az": "b", "canary": true, "load_balancing_weight": 5});
    check_in(&reg_url, "web", &ip(t, 3), 8080, tags)?;
    let web: BTreeSet<String> = [2, 3]
        .iter()
        .map(|h| format!("{}:8080", ip(t, *h)))
        .collect();
    wait_listed(&agent, "web", &web)?;
    // The test's HTTP helpers block on a runtime of their own: they run between these.
    let rt = rt()?;

    // Listener → route → cluster → assignment, as a proxyless gRPC client walks them.
    let mut s = rt.block_on(Sotw::open(&xds))?;
    let e = rt.block_on(walk(&mut s))?;
    let cla: ClusterLoadAssignment = decode(&e.resources[0])?;
    let rest = rest_eds(&agent, "web")?;
    ensure!(
        cla_json(&cla) == rest["resources"][0],
        "gRPC and REST EDS differ:\n{}\n{}",
        cla_json(&cla),
        rest["resources"][0]
    );
    ensure!(!e.version_info.is_empty() && rest["version_info"].is_string());
    rt.block_on(s.send(CLA, &["web", "later"], Some(&e)))?;

    // A service appearing is pushed to the subscription waiting for it.
    let t0 = Instant::now();
    check_in(&reg_url, "later", &ip(t, 4), 9000, json!({}))?;
    let later = rt.block_on(s.next_of(CLA))?;
    ensure!(
        later.type_url == CLA && later.resources.len() == 1,
        "{later:?}"
    );
    let cla: ClusterLoadAssignment = decode(&later.resources[0])?;
    ensure!(
        cla.cluster_name == "later",
        "only what changed: {}",
        cla.cluster_name
    );
    eprintln!("check-in to push: {:?}", t0.elapsed());

    // A NACK: counted, with its error, in /metrics; nothing is sent again.
    let nack = DiscoveryRequest {
        type_url: CLA.into(),
        resource_names: vec!["web".into(), "later".into()],
        version_info: e.version_info.clone(),
        response_nonce: later.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "test nack: \"bad\"".into(),
            details: Vec::new(),
        }),
        ..Default::default()
    };
    rt.block_on(s.tx.send(nack))?;
    poll("the NACK in /metrics", START, || {
        http::metric(&agent.url(), "tidings_agent_xds_nacks_total", "eds")
            .ok()
            .filter(|n| *n >= 1.0)
    })?;
    let metrics = http::get(&format!("{}/metrics", agent.url()))?;
    let text = String::from_utf8_lossy(&metrics.body);
    let line = r#"tidings_agent_xds_last_nack_info{type="eds",error="test nack: \"bad\""} 1"#;
    ensure!(text.contains(line), "{text}");

    // A client that subscribes to every assignment and never reads: the pushes below still
    // reach the other streams (it holds one pending response, not a queue).
    let _stuck = rt.block_on(async {
        let s = Sotw::open(&xds).await?;
        s.send(CLA, &["*"], None).await?;
        Ok::<_, anyhow::Error>(s)
    })?;

    // Incremental: subscribe, then a deregistration is pushed.
    let (tx, mut stream) = rt.block_on(delta(&xds))?;
    let gone = format!("{}:8080", ip(t, 2));
    deregister(&reg_url, "web", &ip(t, 2), 8080)?;
    rt.block_on(async {
        let next = tokio::time::timeout(ANSWER, stream.message())
            .await
            .context("delta push after the deregistration")??
            .context("ended")?;
        ensure!(next.resources.len() == 1, "{next:?}");
        let cla: ClusterLoadAssignment =
            decode(next.resources[0].resource.as_ref().context("resource")?)?;
        let hosts = hosts_of(&cla);
        ensure!(
            !hosts.contains(&(gone, 1)),
            "the deregistered host is not live: {hosts:?}"
        );
        drop(tx);
        Ok::<_, anyhow::Error>(())
    })?;

    // Bad input: an unknown type URL, or more names than a subscription may hold, ends the
    // stream with INVALID_ARGUMENT.
    let many: Vec<String> = (0..20_000).map(|i| format!("s{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    for (type_url, names) in [
        ("type.googleapis.com/no.such.Type", &[][..]),
        (CLA, &many[..]),
    ] {
        rt.block_on(async {
            let mut s = Sotw::open(&xds).await?;
            s.send(type_url, names, None).await?;
            let err = match tokio::time::timeout(ANSWER, s.rx.message()).await? {
                Err(status) => status,
                Ok(other) => bail!("not refused: {other:?}"),
            };
            ensure!(err.code() == tonic::Code::InvalidArgument, "{err}");
            Ok::<_, anyhow::Error>(())
        })?;
    }
    let refused = http::metric(
        &agent.url(),
        "tidings_agent_xds_refused_total",
        "bad_request",
    )?;
    ensure!(refused >= 2.0, "{refused} bad requests counted");

    // Registry dead, agent killed and restarted: the cached view is served at once.
    reg.signal("KILL")?;
    agent.proc.signal("KILL")?;
    agent.proc.wait_exit(Duration::from_secs(5))?;
    agent.restart()?;
    let e = rt.block_on(async {
        let mut s = Sotw::open(&xds).await?;
        s.send(CLA, &["web"], None).await?;
        s.next().await
    })?;
    ensure!(e.resources.len() == 1, "the cached view: {e:?}");
    let cla: ClusterLoadAssignment = decode(&e.resources[0])?;
    let live: BTreeSet<String> = hosts_of(&cla)
        .into_iter()
        .filter(|(_, h)| *h == 1)
        .map(|(a, _)| a)
        .collect();
    ensure!(live.contains(&format!("{}:8080", ip(t, 3))), "{live:?}");
    Ok(())
}

/// LDS, RDS, wildcard CDS, then EDS for `web` and `later` (not there yet), each decoded
/// and acknowledged; returns the EDS answer (unacknowledged).
async fn walk(s: &mut Sotw) -> Result<DiscoveryResponse> {
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
async fn delta(
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
