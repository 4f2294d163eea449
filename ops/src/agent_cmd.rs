//! `tidings agent`, `tidings lookup`, `tidings members`: config (TOML, then flags) → bind
//! the local API → `agent::run` until SIGTERM; and two small readers of an agent's API.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agent::AgentConfig;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use http_body_util::BodyExt;
use schema::agent_api::Members;
use schema::api::V1Listing;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::EXIT_USAGE;
use crate::cli::parse_duration;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML config file (see ops/deploy/agent.toml); flags override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Registry base URL, e.g. http://registry.internal:7700 or https://...
    #[arg(long, env = "TIDINGS_REGISTRY")]
    pub registry: Option<String>,
    /// CA certificates (PEM) that verify an https:// registry [default: the system's].
    #[arg(long, value_name = "PEM", env = "TIDINGS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Serve the local API over HTTPS with this certificate chain (PEM), re-read when it
    /// changes; overrides the file's `[tls]`; needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Bearer token file for check-ins (a host token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Local API address, loopback only [default: 127.0.0.1:7701].
    #[arg(long)]
    pub api: Option<SocketAddr>,
    /// Gossip address, UDP and TCP [default: 0.0.0.0:7702].
    #[arg(long)]
    pub gossip: Option<SocketAddr>,
    /// The gossip address peers should use, when `--gossip` is a wildcard.
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Gossip seeds, comma-separated [default: from the disk cache or the registry's
    /// listing of `tidings-agent`].
    #[arg(long, value_delimiter = ',')]
    pub join: Vec<SocketAddr>,
    /// Where the disk cache lives [default: /var/lib/tidings/agent].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// An endpoint of this host, SERVICE:PORT[@IP]; repeatable.
    #[arg(long = "endpoint", value_parser = agent::parse_endpoint_flag)]
    pub endpoints: Vec<schema::api::EndpointSpec>,
    /// This host's ip for endpoints that name none [default: the gossip address's].
    #[arg(long)]
    pub host_ip: Option<IpAddr>,
    /// Zone (`az` tag) of this host's endpoints.
    #[arg(long)]
    pub zone: Option<String>,
    /// How often this host checks in [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    pub check_in_interval: Option<Duration>,
    /// File with the gossip key(s), base64, one per line, primary first (`tidings gossip keygen`).
    #[arg(long, conflicts_with = "gossip_insecure")]
    pub gossip_key_file: Option<PathBuf>,
    /// Gossip without encryption (tests, demos).
    #[arg(long)]
    pub gossip_insecure: bool,
    /// Owner signatures on gossip rows: off, accept (sign, check what is signed, take
    /// unsigned from older agents) or require [default: off]. Needs --registry-key-file
    /// unless off.
    #[arg(long, value_name = "MODE")]
    pub gossip_signing: Option<gossip::sign::SigningMode>,
    /// File holding the registry's public key (printed by `tidings registry keygen`).
    #[arg(long, value_name = "FILE")]
    pub registry_key_file: Option<PathBuf>,
    /// Leave this host's endpoints registered on SIGTERM (default: deregister them).
    #[arg(long)]
    pub keep_registered: bool,
    /// DNS for the `tidings.` zone, UDP and TCP: a loopback IP:PORT, or `off`
    /// [default: 127.0.0.1:7753].
    #[arg(long, value_name = "ADDR|off", env = "TIDINGS_DNS", value_parser = agent::dns::parse_flag)]
    pub dns: Option<agent::dns::DnsFlag>,
    /// TTL of DNS answers, 0 to 5 s [default: 2s].
    #[arg(long, value_parser = parse_duration)]
    pub dns_ttl: Option<Duration>,
    /// xDS (ADS over gRPC) address, loopback only [default: the --api address's ip, port 7703].
    #[arg(long, value_name = "ADDR", conflicts_with = "no_xds")]
    pub xds: Option<SocketAddr>,
    /// Do not serve xDS.
    #[arg(long)]
    pub no_xds: bool,
}

#[derive(Debug, Args)]
pub struct LookupArgs {
    /// The service to look up.
    pub service: String,
    /// Agent base URL [default: http://127.0.0.1:7701].
    #[arg(long, conflicts_with = "registry")]
    pub agent: Option<String>,
    /// Read a registry instead of an agent.
    #[arg(long)]
    pub registry: Option<String>,
    /// CA certificates (PEM) that verify an https:// agent or registry [default: the system's].
    #[arg(long, value_name = "PEM", env = "TIDINGS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MembersArgs {
    /// Agent base URL [default: http://127.0.0.1:7701].
    #[arg(long, default_value = "http://127.0.0.1:7701")]
    pub agent: String,
    /// CA certificates (PEM) that verify an https:// agent [default: the system's].
    #[arg(long, value_name = "PEM", env = "TIDINGS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Reads the file (if any), applies the flags, reads the key file and validates.
pub fn settings(args: &AgentArgs) -> Result<AgentConfig> {
    let mut cfg: AgentConfig = match &args.config {
        Some(path) => crate::registry::load_file(path)?,
        None => AgentConfig::default(),
    };
    macro_rules! flag {
        ($field:ident, $value:expr) => {
            if let Some(v) = $value.clone() {
                cfg.$field = v;
            }
        };
    }
    if args.registry.is_some() {
        cfg.registry.clone_from(&args.registry);
    }
    if args.token_file.is_some() {
        cfg.registry_token_file.clone_from(&args.token_file);
    }
    if args.ca_file.is_some() {
        cfg.ca_file.clone_from(&args.ca_file);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        cfg.tls = Some(serve::TlsFiles {
            cert_file: cert.clone(),
            key_file: key.clone(),
        });
    }
    flag!(api, args.api);
    flag!(data_dir, args.data_dir);
    flag!(check_in_interval, args.check_in_interval);
    if let Some(b) = args.gossip {
        cfg.gossip.bind = b;
    }
    if args.advertise.is_some() {
        cfg.gossip.advertise = args.advertise;
    }
    if !args.join.is_empty() {
        cfg.gossip.seeds.clone_from(&args.join);
    }
    if !args.endpoints.is_empty() {
        cfg.endpoints.clone_from(&args.endpoints);
    }
    if args.host_ip.is_some() {
        cfg.host_ip = args.host_ip;
    }
    if args.zone.is_some() {
        cfg.zone.clone_from(&args.zone);
    }
    match args.dns {
        Some(agent::dns::DnsFlag(Some(addr))) => {
            cfg.dns.enabled = true;
            cfg.dns.listen = addr;
        }
        Some(agent::dns::DnsFlag(None)) => cfg.dns.enabled = false,
        None => {}
    }
    if let Some(ttl) = args.dns_ttl {
        cfg.dns.ttl = ttl;
    }
    if args.keep_registered {
        cfg.deregister_on_shutdown = false;
    }
    if let Some(addr) = args.xds {
        cfg.xds.enabled = true;
        cfg.xds.listen = Some(addr);
    }
    if args.no_xds {
        cfg.xds.enabled = false;
    }
    if args.gossip_insecure {
        cfg.gossip.insecure = true;
        cfg.gossip.keys.clear();
        cfg.gossip_key_file = None;
    }
    if args.gossip_key_file.is_some() {
        cfg.gossip_key_file.clone_from(&args.gossip_key_file);
        cfg.gossip.insecure = false;
    }
    if let Some(path) = cfg.gossip_key_file.clone() {
        cfg.gossip.keys = read_keys(&path)?;
    }
    if let Some(mode) = args.gossip_signing {
        cfg.gossip.signing = mode;
    }
    if let Some(path) = &args.registry_key_file {
        let key = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read registry key file {}", path.display()))?;
        cfg.gossip.registry_key = Some(key.trim().to_string());
    }
    cfg.validate()?;
    Ok(cfg)
}

fn read_keys(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read gossip key file {}", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if keys.is_empty() {
        bail!("gossip key file {} holds no key", path.display());
    }
    Ok(keys)
}

pub async fn agent(args: AgentArgs) -> ExitCode {
    let mut cfg = match settings(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tidings agent: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run_agent(&mut cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidings agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run_agent(cfg: &mut AgentConfig) -> Result<()> {
    if let Some(path) = &cfg.registry_token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read token file {}", path.display()))?;
        cfg.registry_token = Some(token.trim().to_string());
    }
    let listener = serve::bind(cfg.api).with_context(|| format!("cannot listen on {}", cfg.api))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "agent api listening");
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        crate::telemetry::shutdown_signal().await;
        tracing::info!("shutdown signal");
        crate::systemd::stopping();
        trigger.cancel();
    });
    // The local API answers (from the disk cache if need be) from the moment it is bound.
    crate::systemd::ready(&format!("local API on {addr}"));
    crate::systemd::spawn_watchdog(shutdown.clone());
    agent::run(cfg.clone(), listener, shutdown).await?;
    Ok(())
}

/// One GET: status, headers and body, within 10 s. An `https://` URL is verified against
/// `ca_file`, or the system's CAs.
async fn get(url: &str, ca_file: Option<&Path>) -> Result<(u16, hyper::HeaderMap, Bytes)> {
    let scheme = proxy::config::Scheme::of_url(url)?;
    let client = proxy::membership::watch_client(scheme, ca_file)
        .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?}"))?;
    let fut = async {
        let resp = client
            .get(uri)
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        anyhow::Ok((parts.status.as_u16(), parts.headers, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("{url} did not answer within 10s"))?
}

fn header<'a>(h: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub async fn lookup(args: LookupArgs) -> ExitCode {
    if let Err(e) = schema::ServiceName::new(args.service.clone()) {
        eprintln!("tidings lookup: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    match do_lookup(&args).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tidings lookup: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn do_lookup(args: &LookupArgs) -> Result<String> {
    let (base, from_registry) = match (&args.registry, &args.agent) {
        (Some(r), _) => (r.clone(), true),
        (None, Some(a)) => (a.clone(), false),
        (None, None) => ("http://127.0.0.1:7701".to_string(), false),
    };
    let url = format!(
        "{}/v1/registration/{}",
        base.trim_end_matches('/'),
        args.service
    );
    let (status, headers, body) = get(&url, args.ca_file.as_deref()).await?;
    if status != 200 {
        bail!(
            "{url} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let listing: V1Listing =
        serde_json::from_slice(&body).with_context(|| format!("{url}: not a v1 listing"))?;
    let source = header(&headers, schema::wire::HEADER_SOURCE)
        .unwrap_or(if from_registry { "registry" } else { "unknown" })
        .to_string();
    let age_ms: Option<i64> =
        header(&headers, schema::wire::HEADER_REGISTRY_AGE).and_then(|v| v.parse().ok());
    let age_ms = if from_registry { Some(0) } else { age_ms };
    Ok(render_lookup(&listing, &source, age_ms, args.json))
}

fn render_lookup(listing: &V1Listing, source: &str, age_ms: Option<i64>, as_json: bool) -> String {
    let age = match age_ms {
        Some(ms) if ms >= 0 => schema::duration::format(Duration::from_millis(
            u64::try_from(ms).unwrap_or(0) / 100 * 100,
        )),
        _ => "never synced".to_string(),
    };
    if as_json {
        let v = json!({
            "service": listing.service,
            "source": source,
            "registry_age_ms": age_ms.filter(|ms| *ms >= 0),
            "hosts": listing.hosts,
        });
        return format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let tag = |h: &schema::api::V1Host, k: &str| match h.tags.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_string(),
        Some(v) => v.to_string(),
    };
    let mut rows = vec![[
        "ADDRESS".to_string(),
        "ZONE".to_string(),
        "WEIGHT".to_string(),
        "REVISION".to_string(),
        "LAST CHECK-IN".to_string(),
    ]];
    for h in &listing.hosts {
        let addr = SocketAddr::new(
            h.ip_address.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            h.port,
        );
        let rev = if h.revision.is_empty() {
            "-".to_string()
        } else {
            h.revision.clone()
        };
        rows.push([
            addr.to_string(),
            tag(h, schema::wire::tag::AZ),
            tag(h, schema::wire::tag::LOAD_BALANCING_WEIGHT),
            rev,
            h.last_check_in.clone(),
        ]);
    }
    let mut out = table(&rows);
    out.push_str(&format!(
        "{} host(s) of {}; source: {source}; registry age: {age}\n",
        listing.hosts.len(),
        listing.service
    ));
    out
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub async fn members(args: MembersArgs) -> ExitCode {
    let url = format!("{}/v1/agent/members", args.agent.trim_end_matches('/'));
    let res = async {
        let (status, _, body) = get(&url, args.ca_file.as_deref()).await?;
        if status != 200 {
            bail!("{url} answered {status}");
        }
        let answer: Members =
            serde_json::from_slice(&body).context("not a /v1/agent/members answer")?;
        if args.json {
            return Ok(format!("{}\n", serde_json::to_string_pretty(&answer)?));
        }
        let mut rows = vec![[
            "ADDRESS".to_string(),
            "STATE".to_string(),
            "EPOCH".to_string(),
        ]];
        for m in answer.members {
            let mut state = m.state.as_str().to_string();
            if m.is_self {
                state.push_str(" (self)");
            }
            rows.push([m.addr, state, m.epoch.to_string()]);
        }
        Ok(table(&rows))
    }
    .await;
    match res {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tidings members: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/agent.toml");
        let mut cfg: AgentConfig = crate::registry::load_file(&path).expect("example parses");
        assert!(cfg.gossip_key_file.is_some(), "the example uses a key file");
        // The key file lives on the host; stand in a generated key for it.
        cfg.gossip.keys = vec![gossip::generate_key()];
        cfg.validate().expect("example validates");
        let defaults = AgentConfig::default();
        assert_eq!(cfg.api, defaults.api);
        assert_eq!(cfg.check_in_interval, defaults.check_in_interval);
        assert_eq!(cfg.gossip.bind, defaults.gossip.bind);
        assert_eq!(cfg.gossip.probe_period_ms, defaults.gossip.probe_period_ms);
        assert_eq!(cfg.endpoints.len(), 2);
    }

    #[test]
    fn flags_override_and_the_key_is_required() {
        let args = |extra: &[&str]| {
            use clap::Parser;
            #[derive(Parser)]
            struct T {
                #[command(flatten)]
                a: AgentArgs,
            }
            let mut v = vec!["t", "--registry", "http://127.0.0.1:7700"];
            v.extend_from_slice(extra);
            T::try_parse_from(v).map(|t| t.a)
        };
        let a = args(&[]).expect("parses");
        assert!(settings(&a).is_err(), "no key, not insecure");
        let a = args(&[
            "--gossip-insecure",
            "--endpoint",
            "web:8080",
            "--join",
            "127.0.0.2:7702,127.0.0.3:7702",
            "--check-in-interval",
            "1s",
        ])
        .expect("parses");
        let cfg = settings(&a).expect("valid");
        assert_eq!(cfg.gossip.seeds.len(), 2);
        assert_eq!(cfg.check_in_interval, Duration::from_secs(1));
        assert_eq!(cfg.endpoints.len(), 1);
        assert!(args(&["--gossip-insecure", "--gossip-key-file", "k"]).is_err());
    }

    #[test]
    fn lookup_renders_a_table_with_freshness() {
        let listing: V1Listing = serde_json::from_value(json!({
            "service": "web", "env": "production",
            "hosts": [{"service": "web", "ip_address": "127.0.0.5", "port": 8080, "revision": "abc",
                       "last_check_in": "2026-11-24T06:00:00Z", "tags": {"az": "zone-a", "load_balancing_weight": 100}}]
        }))
        .expect("listing");
        let out = render_lookup(&listing, "gossip", Some(1_234), false);
        assert!(out.contains("127.0.0.5:8080  zone-a  100"), "{out}");
        assert!(
            out.contains("source: gossip; registry age: 1s 200ms"),
            "{out}"
        );
        let out = render_lookup(&listing, "cache", Some(-1), true);
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["source"], "cache");
        assert!(v["registry_age_ms"].is_null());
    }
}
