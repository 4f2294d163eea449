//! `tidings bench xds` (ops/bench/xds.sh): many ADS streams on one agent, and how long a
//! change of the agent's view takes to reach all of them.
//!
//! Each stream is an Envoy-like client on its own connection: state of the world, every
//! cluster (wildcard CDS) and the endpoints of every `svc-NNN` service, each response
//! acknowledged. Once every stream holds every assignment, each change registers one new
//! endpoint of one service through the agent's local API (`PUT /v1/agent/endpoints`, so
//! the view changes at once, without a registry round trip) and times its arrival on every
//! stream, from just before the request.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::bench::{is_loopback_url, service};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// The first port of the endpoints the changes add.
const BASE_PORT: u32 = 20_000;

#[derive(Debug, Clone, Args)]
pub struct XdsArgs {
    /// The agent's xDS address (loopback only).
    #[arg(long)]
    pub xds: String,
    /// The agent's local API base URL (loopback only), where the changes are made.
    #[arg(long)]
    pub api: String,
    /// Services `svc-000`.. the streams subscribe to (the registry was filled with them).
    #[arg(long, default_value_t = 1000)]
    pub services: u32,
    #[arg(long, default_value_t = 200)]
    pub streams: u32,
    /// Changes timed, one after another.
    #[arg(long, default_value_t = 50)]
    pub changes: u32,
    /// The ip the new endpoints are registered on (one of the agent's own).
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,
    /// Longest wait for every stream to hold the whole catalog, and for one change.
    #[arg(long, value_parser = crate::cli::parse_duration, default_value = "120s")]
    pub deadline: Duration,
}

/// What one stream reports to the driver.
enum Event {
    /// It holds an assignment for every service.
    Ready,
    /// It saw change `n`.
    Saw(u32, Instant),
    Failed(String),
}

pub async fn main(args: XdsArgs) -> ExitCode {
    let xds_url = format!("http://{}", args.xds);
    if !is_loopback_url(&xds_url) || !is_loopback_url(&args.api) {
        eprintln!("tidings bench xds: loopback targets only");
        return ExitCode::from(crate::EXIT_USAGE);
    }
    match run(args, xds_url).await {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tidings bench xds: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: XdsArgs, xds_url: String) -> Result<String, String> {
    let names: Arc<Vec<String>> = Arc::new((0..args.services).map(service).collect());
    // The change being timed: (number, service, port of the new endpoint).
    let (probe_tx, probe_rx) = watch::channel((u32::MAX, String::new(), 0u32));
    let (events_tx, mut events) = mpsc::channel(4 * args.streams as usize + 16);
    for _ in 0..args.streams {
        tokio::spawn(stream(
            xds_url.clone(),
            names.clone(),
            probe_rx.clone(),
            events_tx.clone(),
        ));
    }
    let t0 = Instant::now();
    let mut ready = 0;
    while ready < args.streams {
        match tokio::time::timeout(args.deadline, events.recv()).await {
            Ok(Some(Event::Ready)) => ready += 1,
            Ok(Some(Event::Failed(e))) => return Err(e),
            Ok(Some(Event::Saw(..))) => {}
            Ok(None) | Err(_) => return Err(format!("{ready} streams ready in time")),
        }
    }
    let sync = t0.elapsed();
    let client = api::Client::new();
    let mut all_streams = Vec::new();
    let mut each = Vec::new();
    for n in 0..args.changes {
        let svc = service(n % args.services);
        let port = BASE_PORT + n;
        probe_tx.send_replace((n, svc.clone(), port));
        let start = Instant::now();
        client
            .register(&args.api, &svc, &args.ip, port)
            .await
            .map_err(|e| format!("change {n}: {e}"))?;
        let mut seen = 0;
        let mut last = start;
        while seen < args.streams {
            match tokio::time::timeout(args.deadline, events.recv()).await {
                Ok(Some(Event::Saw(m, at))) if m == n => {
                    seen += 1;
                    last = last.max(at);
                    each.push(at.saturating_duration_since(start));
                }
                Ok(Some(Event::Failed(e))) => return Err(e),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    return Err(format!("change {n}: {seen} streams saw it in time"));
                }
            }
        }
        all_streams.push(last.saturating_duration_since(start));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort_unstable();
        let i = ((v.len().max(1) - 1) as f64 * p).round() as usize;
        v.get(i).copied().map_or(0.0, ms)
    };
    Ok(format!(
        r#"{{"streams":{},"services":{},"changes":{},"initial_sync_ms":{:.0},"all_streams_p50_ms":{:.1},"all_streams_p99_ms":{:.1},"all_streams_max_ms":{:.1},"per_stream_p50_ms":{:.1},"per_stream_p99_ms":{:.1}}}"#,
        args.streams,
        args.services,
        args.changes,
        ms(sync),
        pct(&mut all_streams, 0.5),
        pct(&mut all_streams, 0.99),
        pct(&mut all_streams, 1.0),
        pct(&mut each, 0.5),
        pct(&mut each, 0.99),
    ))
}

/// One Envoy-like stream: reports `Ready` once it holds every assignment, then `Saw` for
/// each probe it sees arrive.
async fn stream(
    url: String,
    names: Arc<Vec<String>>,
    probe: watch::Receiver<(u32, String, u32)>,
    events: mpsc::Sender<Event>,
) {
    if let Err(e) = follow(url, &names, probe, &events).await {
        let _ = events.send(Event::Failed(e)).await;
    }
}

async fn follow(
    url: String,
    names: &[String],
    probe: watch::Receiver<(u32, String, u32)>,
    events: &mpsc::Sender<Event>,
) -> Result<(), String> {
    let mut client = AggregatedDiscoveryServiceClient::connect(url)
        .await
        .map_err(|e| e.to_string())?
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(8);
    let request =
        |type_url: &str, names: Vec<String>, last: Option<&DiscoveryResponse>| DiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names: names,
            version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: last.map(|r| r.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        };
    let send = |r| {
        let tx = tx.clone();
        async move { tx.send(r).await.map_err(|_| "stream closed".to_string()) }
    };
    send(request(CDS, Vec::new(), None)).await?;
    send(request(CLA, names.to_vec(), None)).await?;
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut held = std::collections::HashSet::new();
    let mut ready = false;
    let mut last_seen = u32::MAX;
    while let Some(r) = inbound.message().await.map_err(|e| e.to_string())? {
        let at = Instant::now();
        if r.type_url == CLA {
            let (n, svc, port) = probe.borrow().clone();
            for any in &r.resources {
                let cla = ClusterLoadAssignment::decode(any.value.as_slice())
                    .map_err(|e| e.to_string())?;
                if n != last_seen && cla.cluster_name == svc && has_port(&cla, port) {
                    last_seen = n;
                    let _ = events.send(Event::Saw(n, at)).await;
                }
                if !ready {
                    held.insert(cla.cluster_name);
                }
            }
            if !ready && held.len() >= names.len() {
                ready = true;
                held = Default::default();
                let _ = events.send(Event::Ready).await;
            }
        }
        // Envoy acknowledges with the whole subscription.
        let names = if r.type_url == CLA {
            names.to_vec()
        } else {
            Vec::new()
        };
        send(request(&r.type_url.clone(), names, Some(&r))).await?;
    }
    Err("stream ended".into())
}

fn has_port(cla: &ClusterLoadAssignment, port: u32) -> bool {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
            _ => None,
        })
        .any(|a| match &a.address {
            Some(address::Address::SocketAddress(sa)) => {
                sa.port_specifier == Some(socket_address::PortSpecifier::PortValue(port))
            }
            _ => false,
        })
}

/// The one HTTP call the driver makes.
mod api {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client as Hyper;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    pub struct Client(Hyper<HttpConnector, Full<Bytes>>);

    impl Client {
        pub fn new() -> Self {
            Client(Hyper::builder(TokioExecutor::new()).build_http())
        }

        /// `PUT /v1/agent/endpoints`: one endpoint of `service` on `ip:port`.
        pub async fn register(
            &self,
            api: &str,
            service: &str,
            ip: &str,
            port: u32,
        ) -> Result<(), String> {
            let body = format!(r#"{{"service":"{service}","ip":"{ip}","port":{port}}}"#);
            let req = hyper::Request::put(format!("{api}/v1/agent/endpoints"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let resp = self.0.request(req).await.map_err(|e| e.to_string())?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {}", resp.status()))
            }
        }
    }
}
