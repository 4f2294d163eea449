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
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use serde_json::{Value, json};
use tests::fleet::{self, Agent, lookup};
use tests::python::Py;
use tests::{Proc, http, poll};

// The test's ADS client and decoding, in a file of its own (a test target's modules live
// beside it only by path).
#[path = "xds/client.rs"]
mod client;

use client::{Sotw, cla_json, decode, delta, hosts_of, rt, walk};

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
