//! `tidings bench fleet` (hidden; `ops/bench/fleet.sh`): a fleet of agent-like sync clients in
//! one process against a filled registry, under a steady churn of endpoint changes. It
//! measures what the fleet costs the registry per change — bytes the clients received and
//! the registry's CPU — and how long a change takes to reach every client.
//!
//! Each change touches its own endpoint and carries its number (a revision `fleet-K`, or the
//! absence of a known host), so a client recognises it in its view whatever protocol brought
//! it. Loopback only, and every phase is bounded in time.

mod client;
mod report;
mod view;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::Full;
use hyper::{Method, Request};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::bench::{HttpClient, host_ip, http_client, is_loopback_url, send, url_encode};
use crate::cli::parse_duration;
use report::Report;
use view::{Answers, View};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// Blocking delta queries (`GET /v2/catalog?delta=true&index=I`), as agents sync now.
    Delta,
    /// Blocking whole-catalog queries (`GET /v2/catalog?index=I`), as agents synced before.
    Full,
}

#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// Registry base URL (loopback only); repeat it to spread the clients over several
    /// registries sharing one store. Fill and churn go through the first.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    #[arg(long, value_enum, default_value = "delta")]
    pub protocol: Protocol,
    /// Sync clients, one connection each.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// The fill: this many services of `hosts` endpoints each, every endpoint on its own ip.
    #[arg(long, default_value_t = 1000)]
    pub services: u32,
    #[arg(long, default_value_t = 100)]
    pub hosts: u32,
    /// The registry is filled already (same `services` and `hosts`).
    #[arg(long)]
    pub no_fill: bool,
    /// Check-ins of the fill in flight at once (fewer for a slow store: a v2 check-in of 100
    /// endpoints is 100 store writes, answered within the registry's store deadline).
    #[arg(long, default_value_t = 8)]
    pub fill_workers: u32,
    /// Endpoints per fill check-in (at most the registry's per-request limit).
    #[arg(long, default_value_t = schema::api::MAX_CHECKIN_ENDPOINTS)]
    pub fill_chunk: usize,
    #[arg(long, default_value_t = 10)]
    pub changes_per_sec: u32,
    /// How long the churn lasts.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub churn: Duration,
    /// The blocking queries' `wait`, as the agent's `sync_wait`.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub wait: Duration,
    /// Bound on the fleet's first sync (every client holding a view) before the churn.
    #[arg(long, value_parser = parse_duration, default_value = "180s")]
    pub sync_timeout: Duration,
    /// After the churn, at most this long for the last changes to reach every client.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub drain: Duration,
    /// Registry process ids whose CPU time (and bytes written) to read from /proc.
    #[arg(long)]
    pub registry_pid: Vec<u32>,
    /// `Accept-Encoding` the clients send (none by default, as agents; `gzip` to ask for it).
    #[arg(long)]
    pub accept_encoding: Option<String>,
    /// Large answers (whole catalogs) read at once across the fleet, bounding memory.
    #[arg(long, default_value_t = 16)]
    pub max_bodies: usize,
}

/// What the churn does to one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A stored endpoint checks in with a new revision.
    Revision,
    /// A new endpoint checks in.
    New,
    /// A stored endpoint deregisters.
    Deregister,
}

#[derive(Debug, Clone)]
pub struct Change {
    kind: Kind,
    service: String,
    ip: String,
    revision: String,
}

const PORT: u16 = 8080;
const TAGS: &str = r#"{"az":"zone-a","region":"local","instance_id":"i-1"}"#;
/// Micros value of a change not (successfully) sent.
const NOT_SENT: u64 = u64::MAX;

impl Change {
    /// Whether `view` shows this change done.
    fn shown_by(&self, view: &View) -> bool {
        let host = view.host(&self.service, &self.ip, PORT);
        match self.kind {
            Kind::Deregister => host.is_none(),
            Kind::Revision | Kind::New => host.is_some_and(|h| h.revision == self.revision),
        }
    }
}

fn service(i: u32) -> String {
    format!("svc-{i:04}")
}

/// The fill's endpoint `h` of service `svc`: every endpoint on its own ip (an ip may hold
/// only `max_endpoints_per_ip` endpoints).
fn fill_ip(args: &FleetArgs, svc: u32, h: u32) -> String {
    host_ip(svc * args.hosts + h)
}

/// The changes, in order: revisions, new endpoints and deregistrations in turn, each on an
/// endpoint no other change touches (revisions from each service's first hosts,
/// deregistrations from its last, new endpoints in 11.0.0.0/8).
fn plan(args: &FleetArgs, total: usize) -> Vec<Change> {
    let (services, hosts) = (args.services.max(1), args.hosts.max(2));
    (0..total)
        .map(|k| {
            let n = u32::try_from(k / 3).unwrap_or(u32::MAX);
            let (svc, nth) = (n % services, (n / services) % (hosts / 2));
            let revision = format!("fleet-{k}");
            let (kind, ip) = match k % 3 {
                0 => (Kind::Revision, fill_ip(args, svc, nth)),
                1 => (Kind::New, format!("11.{}", &host_ip(n)[3..])),
                _ => (Kind::Deregister, fill_ip(args, svc, hosts - 1 - nth)),
            };
            Change {
                kind,
                service: service(svc),
                ip,
                revision,
            }
        })
        .collect()
}

/// The state every client shares with the driver.
pub struct Fleet {
    stop: CancellationToken,
    full_protocol: bool,
    wait: Duration,
    accept_encoding: Option<String>,
    bodies: Semaphore,
    answers_seen: Answers,
    changes: Vec<Change>,
    /// Changes sent so far (a prefix of `changes`).
    published: AtomicUsize,
    start: Instant,
    sent_us: Vec<AtomicU64>,
    arrived_max_us: Vec<AtomicU64>,
    arrived_count: Vec<AtomicU32>,
    bytes_in: Arc<AtomicU64>,
    answers: AtomicU64,
    full_syncs: AtomicU64,
    deltas: AtomicU64,
    failed_deltas: AtomicU64,
    unverified: AtomicU64,
    errors: AtomicU64,
    synced: AtomicUsize,
}

impl Fleet {
    fn micros(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(NOT_SENT - 1)
    }

    fn arrived(&self, k: usize) {
        let now = self.micros();
        if let (Some(max), Some(count)) = (self.arrived_max_us.get(k), self.arrived_count.get(k)) {
            max.fetch_max(now, Ordering::Relaxed);
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn note_error(&self, id: usize, e: &str) {
        if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("tidings bench fleet: client {id}: {e}");
        }
    }

    /// The counters that move during the churn, read together.
    fn counters(&self) -> [u64; 6] {
        [
            self.bytes_in.load(Ordering::Relaxed),
            self.answers.load(Ordering::Relaxed),
            self.full_syncs.load(Ordering::Relaxed),
            self.deltas.load(Ordering::Relaxed),
            self.failed_deltas.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        ]
    }
}

pub async fn main(args: FleetArgs) -> ExitCode {
    if let Some(bad) = args.urls.iter().find(|u| !is_loopback_url(u)) {
        eprintln!(
            "tidings bench fleet: {bad} is not a loopback address; benchmarks only target this machine"
        );
        return ExitCode::from(crate::EXIT_USAGE);
    }
    let authorities: Vec<String> = args
        .urls
        .iter()
        .map(|u| {
            u.split("://")
                .nth(1)
                .unwrap_or(u)
                .trim_end_matches('/')
                .to_string()
        })
        .collect();
    let http = http_client();
    let base = args.urls[0].trim_end_matches('/').to_string();
    if !args.no_fill {
        let t = Instant::now();
        if let Err(e) = fill(&http, &base, &args).await {
            eprintln!("tidings bench fleet: fill failed: {e}");
            return ExitCode::from(1);
        }
        eprintln!(
            "filled {} endpoints in {:.1} s",
            u64::from(args.services) * u64::from(args.hosts),
            t.elapsed().as_secs_f64()
        );
    }
    if let Err(e) = until_not_warming(&http, &base).await {
        eprintln!("tidings bench fleet: {e}");
        return ExitCode::from(1);
    }
    let total = usize::try_from(
        (args.churn.as_millis() * u128::from(args.changes_per_sec) / 1000).min(100_000),
    )
    .unwrap_or(0);
    let fleet = Arc::new(Fleet {
        stop: CancellationToken::new(),
        full_protocol: args.protocol == Protocol::Full,
        wait: args.wait,
        accept_encoding: args.accept_encoding.clone(),
        bodies: Semaphore::new(args.max_bodies.max(1)),
        answers_seen: Answers::default(),
        changes: plan(&args, total),
        published: AtomicUsize::new(0),
        start: Instant::now(),
        sent_us: (0..total).map(|_| AtomicU64::new(NOT_SENT)).collect(),
        arrived_max_us: (0..total).map(|_| AtomicU64::new(0)).collect(),
        arrived_count: (0..total).map(|_| AtomicU32::new(0)).collect(),
        bytes_in: Arc::new(AtomicU64::new(0)),
        answers: AtomicU64::new(0),
        full_syncs: AtomicU64::new(0),
        deltas: AtomicU64::new(0),
        failed_deltas: AtomicU64::new(0),
        unverified: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        synced: AtomicUsize::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..args.clients {
        let authority = authorities[id % authorities.len()].clone();
        tasks.spawn(client::run(fleet.clone(), id, authority));
    }
    let t = Instant::now();
    let synced = wait_until(args.sync_timeout, || {
        fleet.synced.load(Ordering::Relaxed) >= args.clients
    })
    .await;
    let first_sync = t.elapsed();
    let clients = fleet.synced.load(Ordering::Relaxed);
    eprintln!(
        "{clients} of {} clients synced in {:.1} s{}",
        args.clients,
        first_sync.as_secs_f64(),
        if synced { "" } else { " (timed out)" }
    );
    let before = (fleet.counters(), registry_usage(&args.registry_pid));
    let window = Instant::now();
    let sent = churn(&fleet, &http, &base, &args).await;
    let churn_time = window.elapsed();
    let drained = wait_until(args.drain, || {
        (0..fleet.published.load(Ordering::Relaxed)).all(|k| {
            fleet.sent_us[k].load(Ordering::Relaxed) == NOT_SENT
                || fleet.arrived_count[k].load(Ordering::Relaxed) as usize >= clients
        })
    })
    .await;
    let after = (fleet.counters(), registry_usage(&args.registry_pid));
    let window = window.elapsed();
    fleet.stop.cancel();
    // Clients return at the stop; the bound only guards against a wedged task.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let report = Report {
        args: &args,
        fleet: &fleet,
        clients,
        first_sync,
        sent,
        churn_time,
        drained,
        window,
        before,
        after,
    };
    println!("{}", report.text());
    if sent == 0 || clients == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Polls `done` every 100 ms for at most `limit`; whether it came true.
async fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let end = Instant::now() + limit;
    while !done() {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Retries of one fill check-in refused with 503.
const FILL_RETRIES: usize = 7;

/// One v2 check-in per service, its hosts on their own ips, a few services at once.
async fn fill(http: &HttpClient, base: &str, args: &FleetArgs) -> Result<(), String> {
    let tags: serde_json::Value = serde_json::from_str(TAGS).map_err(|e| e.to_string())?;
    let mut tasks = tokio::task::JoinSet::new();
    let workers = args.fill_workers.max(1);
    for w in 0..workers {
        let (http, base, tags, args) = (http.clone(), base.to_string(), tags.clone(), args.clone());
        tasks.spawn(async move {
            let hosts: Vec<u32> = (0..args.hosts).collect();
            let chunk = args.fill_chunk.clamp(1, schema::api::MAX_CHECKIN_ENDPOINTS);
            for svc in (w..args.services).step_by(workers as usize) {
                for hosts in hosts.chunks(chunk) {
                    let endpoints: Vec<serde_json::Value> = hosts
                        .iter()
                        .map(|&h| {
                            serde_json::json!({"service": service(svc), "ip": fill_ip(&args, svc, h),
                                "port": PORT, "revision": "abc123", "tags": tags})
                        })
                        .collect();
                    let body = serde_json::json!({ "endpoints": endpoints }).to_string();
                    fill_check_in(&http, &base, Bytes::from(body)).await?;
                }
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// One fill check-in. A check-in is idempotent: one refused while the store is busy (503) is
/// sent again, a bounded number of times, as an agent's next check-in would.
async fn fill_check_in(http: &HttpClient, base: &str, body: Bytes) -> Result<(), String> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(FILL_RETRIES);
    let attempt = || async {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{base}/v2/checkin"))
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())?;
        send(http, req).await.map(|_| ())
    };
    attempt
        .retry(backoff)
        .when(|e: &String| e.contains("503"))
        .await
}

/// Waits (at most two minutes) for the registry's warm-up to end: agents take no delta base
/// from a warming registry.
async fn until_not_warming(http: &HttpClient, base: &str) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let req = Request::get(format!("{base}/v2/services"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = http.request(req).await.map_err(|e| e.to_string())?;
        if !resp.headers().contains_key(schema::wire::HEADER_WARMING) {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err("the registry is still warming up after 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sends the planned changes at their pace, one at a time. Returns how many succeeded.
async fn churn(fleet: &Fleet, http: &HttpClient, base: &str, args: &FleetArgs) -> usize {
    let period = Duration::from_secs(1) / args.changes_per_sec.max(1);
    let t0 = tokio::time::Instant::now();
    // Changes go one at a time, so a registry slower than the pace slows the churn: stop
    // sending at twice the planned time, and report the pace reached.
    let end = t0 + args.churn * 2;
    let mut ok = 0;
    for (k, change) in fleet.changes.iter().enumerate() {
        tokio::time::sleep_until(t0 + period * u32::try_from(k).unwrap_or(u32::MAX)).await;
        if tokio::time::Instant::now() >= end {
            eprintln!(
                "tidings bench fleet: churn stopped at twice its planned time, {k} changes sent"
            );
            break;
        }
        let req = match change.kind {
            Kind::Deregister => Request::delete(format!(
                "{base}/v1/registration/{}/{}?port={PORT}",
                change.service, change.ip
            ))
            .body(Full::new(Bytes::new())),
            Kind::Revision | Kind::New => {
                Request::post(format!("{base}/v1/registration/{}", change.service))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from(format!(
                        "ip={}&port={PORT}&revision={}&tags={}",
                        change.ip,
                        change.revision,
                        url_encode(TAGS)
                    ))))
            }
        };
        let Ok(req) = req else { continue };
        // Sent before the request goes, published before it can be seen.
        fleet.sent_us[k].store(fleet.micros(), Ordering::Relaxed);
        fleet.published.store(k + 1, Ordering::Release);
        match send(http, req).await {
            Ok(_) => ok += 1,
            Err(e) => {
                fleet.sent_us[k].store(NOT_SENT, Ordering::Relaxed);
                eprintln!("tidings bench fleet: change {k} failed: {e}");
            }
        }
    }
    ok
}

/// CPU seconds (utime + stime) and bytes written (`wchar`: sockets and logs) of `pids`,
/// summed; zero for a pid that cannot be read.
fn registry_usage(pids: &[u32]) -> (f64, u64) {
    let mut cpu = 0.0;
    let mut written = 0;
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the parenthesised name: state is the first, utime the 12th.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            // USER_HZ is 100 on every Linux this runs on.
            cpu += (ticks(11) + ticks(12)) as f64 / 100.0;
        }
        if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
            written += io
                .lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (cpu, written)
}
