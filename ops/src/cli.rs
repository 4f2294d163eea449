//! The command line. Flags mirror config-file keys; a flag given overrides the file.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tidings",
    version,
    about = "Eventually consistent service discovery with gossiping proxies"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TIDINGS_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info,discovery=debug`); RUST_LOG also works.
    #[arg(long, global = true, env = "TIDINGS_LOG")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the registry (REST API in front of the in-memory store or DynamoDB).
    Registry(RegistryArgs),
    /// Check this host's endpoint in once, for cron. Exit codes: 0 stored; 1 refused by the
    /// registry (bad input or token) or its TLS certificate not trusted (wrong --ca-file, URL
    /// host not in the certificate): fix the command line; 2 registry unreachable or failing
    /// after retries (transient: the next cron run retries); 64 bad usage (including an
    /// unreadable --ca-file).
    Checkin(CheckinArgs),
    /// Run the per-host agent: check-in, registry sync, gossip, disk cache, local API.
    Agent(crate::agent_cmd::AgentArgs),
    /// Print a service's hosts, from an agent (default) or a registry, with their freshness.
    Lookup(crate::agent_cmd::LookupArgs),
    /// List the gossip members an agent knows and their state.
    Members(crate::agent_cmd::MembersArgs),
    /// Run the proxy: listeners, routes, health-checked and load-balanced clusters.
    Proxy(crate::proxy_cmd::ProxyArgs),
    /// Gossip tools: a deterministic cluster simulator and key generation.
    #[command(subcommand)]
    Gossip(crate::gossip_cmd::GossipCommand),
    /// Load generators for the benchmarks in ops/bench/ (loopback targets only).
    #[command(hide = true)]
    Bench(BenchArgs),
    /// The whole system on loopback in one command: registry, agents, backends, a proxy,
    /// traffic, then a registry SIGKILL, a backend kill and a registry restart.
    Demo(crate::demo::DemoArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RegistryArgs {
    #[command(subcommand)]
    pub action: Option<RegistryAction>,
    /// TOML config file (see ops/deploy/registry.toml); flags override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:7700].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// How long an endpoint stays live after its last check-in [default: 180s].
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// How often hosts check in [default: 60s]; drives warm-up and self-preservation.
    #[arg(long, value_parser = parse_duration)]
    pub check_in_interval: Option<Duration>,
    /// File holding the HMAC secret; when set, writes need a host or operator token.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// File holding the gossip signing key (`tidings registry keygen`); when set, agents'
    /// check-ins are answered with certificates for their gossip owner keys.
    #[arg(long, value_name = "FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// Proxies in front of the registry that append to X-Forwarded-For [default: 0]. A v1
    /// `auto_ip` check-in takes the hop the outermost one appended; 0 takes the peer address.
    #[arg(long, value_name = "N")]
    pub trusted_proxies: Option<usize>,
    /// Most blocking queries waiting at once; past it they get 429 [default: 8192]. Each
    /// agent holds one, so size it above the fleet one replica serves.
    #[arg(long, value_name = "N")]
    pub max_blocking_waiters: Option<usize>,
    /// Quota: endpoints one host ip may hold [default: 256].
    #[arg(long, value_name = "N")]
    pub max_endpoints_per_ip: Option<usize>,
    /// Quota: services the catalog may name [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_services: Option<usize>,
    /// Quota: approximate bytes of all stored endpoints [default: 67108864 (64 MiB)].
    #[arg(long, value_name = "BYTES")]
    pub max_catalog_bytes: Option<u64>,
    /// Serve HTTPS with this certificate chain (PEM); re-read when it changes. Overrides
    /// the file's `[tls]` table; needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Backing store [default: memory].
    #[arg(long, value_enum)]
    pub store: Option<StoreKind>,
    /// DynamoDB table name.
    #[arg(long)]
    pub dynamodb_table: Option<String>,
    /// DynamoDB endpoint URL (for a local emulator); default: the AWS regional endpoint.
    #[arg(long)]
    pub dynamodb_endpoint: Option<String>,
    /// AWS region; default: the standard AWS chain (AWS_REGION, profile).
    #[arg(long)]
    pub region: Option<String>,
    /// How often a registry reads the DynamoDB table's stream for other replicas' writes
    /// [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    pub stream_poll: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Memory,
    Dynamodb,
}

#[derive(Debug, Subcommand)]
pub enum RegistryAction {
    /// Create the DynamoDB table (idempotent) and enable TTL on `expires_at`.
    InitTable {
        #[command(flatten)]
        store: StoreArgs,
        /// TTL used to compute `expires_at` [default: 180s].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Create the registry's gossip signing key in `--out` (kept if it exists) and print its
    /// public key, for agents' `--registry-key-file`. Registries sharing a table share it.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print a write token: a host token for `--ip`, or the operator token.
    Token {
        #[arg(long)]
        secret_file: PathBuf,
        #[arg(
            long,
            conflicts_with = "operator",
            required_unless_present = "operator"
        )]
        ip: Option<IpAddr>,
        /// Scope the host token to this service (repeat for more): it may then write only
        /// those services' endpoints on `--ip`. Without it, any service on that ip.
        #[arg(long = "service", value_name = "SERVICE", conflicts_with = "operator")]
        services: Vec<String>,
        #[arg(long)]
        operator: bool,
    },
}

#[derive(Debug, Args)]
pub struct CheckinArgs {
    /// Registry base URL, e.g. http://registry.internal:7700 or https://...
    #[arg(long, env = "TIDINGS_REGISTRY")]
    pub registry: String,
    /// CA certificates (PEM) to verify an https:// registry with, instead of the system's.
    #[arg(long, value_name = "PEM", env = "TIDINGS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    #[arg(long)]
    pub service: String,
    #[arg(long)]
    pub port: u16,
    /// This host's address; default: the local address the kernel would use to reach the
    /// registry (found without sending a packet).
    #[arg(long)]
    pub ip: Option<IpAddr>,
    #[arg(long, default_value = "")]
    pub revision: String,
    /// Tag as key=value (az, region, instance_id, canary, load_balancing_weight, or free-form).
    #[arg(long = "tag", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Bearer token file (a host token from `tidings registry token --ip ...`).
    #[arg(long, env = "TIDINGS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Longest splay: the host waits a stable offset in [0, splay) so a fleet's cron runs
    /// spread over the minute instead of hitting the registry at :00.
    #[arg(long, value_parser = parse_duration, default_value = "45s")]
    pub splay: Duration,
    /// Check in at once.
    #[arg(long)]
    pub no_splay: bool,
    /// Per-attempt timeout.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub target: crate::bench::BenchTarget,
}

/// Flags take the same durations as config files (`30s`, `5m`, `250ms`, or bare seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    schema::duration::parse(s)
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("tag {s:?} must be key=value"))
}
