//! `tidings bench ...` (hidden): the load generator behind `ops/bench/*.sh`. One client
//! implementation drives both Tidings and its peers (etcd's JSON gateway), so a ratio compares
//! servers, not load tools. Targets must be loopback: a benchmark never leaves the machine.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::{RngExt, SeedableRng};

use crate::cli::parse_duration;

#[derive(Debug, Subcommand)]
pub enum BenchTarget {
    /// v1 form check-ins (`POST /v1/registration/{service}`), lyft's cron shape.
    RegistryCheckin(LoadArgs),
    /// v1 lookups (`GET /v1/registration/{service}`).
    RegistryLookup(LoadArgs),
    /// etcd v3 puts through its JSON gateway, one key per endpoint.
    EtcdPut(LoadArgs),
    /// etcd v3 prefix reads of one service's keys, the lookup equivalent.
    EtcdGet(LoadArgs),
    /// A fleet of agent-like sync clients under a churn of changes (ops/bench/fleet.sh).
    Fleet(crate::bench_fleet::FleetArgs),
    /// Many ADS streams on one agent: change-to-all-streams latency (ops/bench/xds.sh).
    Xds(crate::bench_xds::XdsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Base URL of the target (loopback only).
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value_t = 100)]
    pub services: u32,
    #[arg(long, default_value_t = 100)]
    pub hosts: u32,
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Upper bound on requests, whatever the duration.
    #[arg(long, default_value_t = 5_000_000)]
    pub max_requests: u64,
    /// Only fill the target with every endpoint once, then stop (setup for lookups).
    #[arg(long)]
    pub fill: bool,
}

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The load generators' client: pooled keep-alive connections, Nagle off.
pub(crate) fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

pub async fn main(args: crate::cli::BenchArgs) -> ExitCode {
    let (kind, load) = match args.target {
        BenchTarget::RegistryCheckin(a) => (Kind::RegistryCheckin, a),
        BenchTarget::RegistryLookup(a) => (Kind::RegistryLookup, a),
        BenchTarget::EtcdPut(a) => (Kind::EtcdPut, a),
        BenchTarget::EtcdGet(a) => (Kind::EtcdGet, a),
        BenchTarget::Fleet(a) => return crate::bench_fleet::main(a).await,
        BenchTarget::Xds(a) => return crate::bench_xds::main(a).await,
    };
    if !is_loopback_url(&load.url) {
        eprintln!(
            "tidings bench: {} is not a loopback address; benchmarks only target this machine",
            load.url
        );
        return ExitCode::from(crate::EXIT_USAGE);
    }
    let client = http_client();
    if load.fill {
        return match fill(&client, kind, &load).await {
            Ok(n) => {
                println!("{{\"filled\":{n}}}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tidings bench: fill failed: {e}");
                ExitCode::from(1)
            }
        };
    }
    let report = run_load(client, kind, load).await;
    println!("{}", report.json());
    if report.ok == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    RegistryCheckin,
    RegistryLookup,
    EtcdPut,
    EtcdGet,
}

pub(crate) fn is_loopback_url(url: &str) -> bool {
    let host = url.split("://").nth(1).unwrap_or(url);
    host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")
}

pub(crate) fn service(i: u32) -> String {
    format!("svc-{i:03}")
}

pub(crate) fn host_ip(h: u32) -> String {
    format!("10.{}.{}.{}", (h >> 16) & 0xff, (h >> 8) & 0xff, h & 0xff)
}

fn request(kind: Kind, base: &str, svc: u32, host: u32) -> Request<Full<Bytes>> {
    let (method, uri, body, ctype) = match kind {
        Kind::RegistryCheckin => {
            let tags = r#"{"az":"zone-a","region":"local","instance_id":"i-1"}"#;
            let body = format!(
                "ip={}&port=8080&revision=abc123&tags={}",
                host_ip(host),
                url_encode(tags)
            );
            (
                Method::POST,
                format!("{base}/v1/registration/{}", service(svc)),
                body,
                "application/x-www-form-urlencoded",
            )
        }
        Kind::RegistryLookup => (
            Method::GET,
            format!("{base}/v1/registration/{}", service(svc)),
            String::new(),
            "",
        ),
        Kind::EtcdPut => {
            let key = B64.encode(format!("/services/{}/{}:8080", service(svc), host_ip(host)));
            let value = B64.encode(format!(
                r#"{{"ip":"{}","port":8080,"revision":"abc123","tags":{{"az":"zone-a","region":"local","instance_id":"i-1"}}}}"#,
                host_ip(host)
            ));
            (
                Method::POST,
                format!("{base}/v3/kv/put"),
                format!(r#"{{"key":"{key}","value":"{value}"}}"#),
                "application/json",
            )
        }
        Kind::EtcdGet => {
            let prefix = format!("/services/{}/", service(svc));
            let mut end = prefix.clone().into_bytes();
            if let Some(last) = end.last_mut() {
                *last += 1; // the range end of a prefix: the prefix with its last byte + 1
            }
            let body = format!(
                r#"{{"key":"{}","range_end":"{}"}}"#,
                B64.encode(&prefix),
                B64.encode(&end)
            );
            (
                Method::POST,
                format!("{base}/v3/kv/range"),
                body,
                "application/json",
            )
        }
    };
    let mut builder = Request::builder().method(method).uri(uri);
    if !ctype.is_empty() {
        builder = builder.header("content-type", ctype);
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

pub(crate) fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Result<usize, String> {
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status.is_success() {
        Ok(body.len())
    } else {
        Err(format!("HTTP {status}"))
    }
}

async fn fill(client: &HttpClient, kind: Kind, load: &LoadArgs) -> Result<u64, String> {
    let put = match kind {
        Kind::RegistryCheckin | Kind::RegistryLookup => Kind::RegistryCheckin,
        Kind::EtcdPut | Kind::EtcdGet => Kind::EtcdPut,
    };
    let mut n = 0;
    for svc in 0..load.services {
        for h in 0..load.hosts {
            send(client, request(put, &load.url, svc, h)).await?;
            n += 1;
        }
    }
    Ok(n)
}

struct Report {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    bytes: u64,
    latencies_us: Vec<u32>,
}

impl Report {
    fn json(&self) -> String {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        let pct = |p: f64| -> u32 {
            if l.is_empty() {
                return 0;
            }
            let idx = ((l.len() as f64 - 1.0) * p).round() as usize;
            l[idx.min(l.len() - 1)]
        };
        let rate = self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9);
        format!(
            r#"{{"ok":{},"errors":{},"seconds":{:.2},"per_sec":{:.0},"p50_us":{},"p99_us":{},"bytes":{}}}"#,
            self.ok,
            self.errors,
            self.elapsed.as_secs_f64(),
            rate,
            pct(0.50),
            pct(0.99),
            self.bytes
        )
    }
}

async fn run_load(client: HttpClient, kind: Kind, load: LoadArgs) -> Report {
    let base: Arc<str> = Arc::from(load.url.as_str());
    let per_worker = load.max_requests / u64::from(load.concurrency.max(1));
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..load.concurrency.max(1) {
        let client = client.clone();
        let base = base.clone();
        let (services, hosts) = (load.services.max(1), load.hosts.max(1));
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(worker));
            let (mut ok, mut errors, mut bytes, mut lat) = (0u64, 0u64, 0u64, Vec::new());
            for _ in 0..per_worker {
                if Instant::now() >= deadline {
                    break;
                }
                let req = request(
                    kind,
                    &base,
                    rng.random_range(0..services),
                    rng.random_range(0..hosts),
                );
                let t = Instant::now();
                match send(&client, req).await {
                    Ok(n) => {
                        ok += 1;
                        bytes += n as u64;
                        lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Err(_) => errors += 1,
                }
            }
            (ok, errors, bytes, lat)
        });
    }
    let mut report = Report {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        bytes: 0,
        latencies_us: Vec::new(),
    };
    while let Some(res) = tasks.join_next().await {
        if let Ok((ok, errors, bytes, lat)) = res {
            report.ok += ok;
            report.errors += errors;
            report.bytes += bytes;
            report.latencies_us.extend(lat);
        }
    }
    report.elapsed = start.elapsed();
    report
}
