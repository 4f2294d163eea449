//! `tidings registry`: load the config (TOML, then flags), build the store, serve, drain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use discovery::dynamo::{DynamoConfig, DynamoStore, init_table};
use discovery::{MemoryStore, Registry, RegistryConfig, Store, SystemClock};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::EXIT_USAGE;
use crate::cli::{RegistryAction, RegistryArgs, StoreArgs, StoreKind};

/// The registry's config file (`ops/deploy/registry.toml` is the commented example).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    pub listen: Option<SocketAddr>,
    /// File holding the HMAC write secret (kept out of the config file itself).
    pub secret_file: Option<PathBuf>,
    /// File holding the gossip signing key (`tidings registry keygen`).
    pub signing_key_file: Option<PathBuf>,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Serve HTTPS: `cert_file` and `key_file` (PEM), re-read when they change.
    pub tls: Option<serve::TlsFiles>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub kind: Option<StoreKind>,
    pub table: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// How often replicas read the table's stream (DynamoDB only).
    #[serde(default, with = "schema::duration::option")]
    pub stream_poll: Option<Duration>,
}

/// The slowest stream poll: past it a replica would serve its mirror for minutes behind
/// the others before falling back, and DynamoDB keeps a shard iterator only 15 minutes.
const MAX_STREAM_POLL: Duration = Duration::from_secs(60);

impl StoreSection {
    fn overlay(mut self, flags: &StoreArgs) -> Self {
        self.kind = flags.store.or(self.kind);
        self.table = flags.dynamodb_table.clone().or(self.table);
        self.endpoint = flags.dynamodb_endpoint.clone().or(self.endpoint);
        self.region = flags.region.clone().or(self.region);
        self.stream_poll = flags.stream_poll.or(self.stream_poll);
        self
    }

    fn validate(&self) -> Result<()> {
        if let Some(poll) = self.stream_poll {
            if poll.is_zero() || poll > MAX_STREAM_POLL {
                bail!(
                    "store.stream_poll must be more than 0 and at most {}, got {}",
                    schema::duration::format(MAX_STREAM_POLL),
                    schema::duration::format(poll)
                );
            }
        }
        Ok(())
    }

    fn dynamo(&self, ttl: Duration) -> Result<DynamoConfig> {
        let table = self
            .table
            .clone()
            .context("the DynamoDB store needs a table (--dynamodb-table)")?;
        Ok(DynamoConfig {
            table,
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            ttl,
            stream_poll: self
                .stream_poll
                .unwrap_or(DynamoConfig::DEFAULT_STREAM_POLL),
        })
    }
}

/// The validated result of file + flags.
pub struct Settings {
    pub listen: SocketAddr,
    pub store: StoreSection,
    pub registry: RegistryConfig,
}

/// Reads the file (if any), applies the flags, loads the secret and validates everything.
pub fn settings(args: &RegistryArgs) -> Result<Settings> {
    let file: RegistryFile = match &args.config {
        Some(path) => load_file(path)?,
        None => RegistryFile::default(),
    };
    let mut registry = file.registry;
    if let Some(ttl) = args.ttl {
        registry.ttl = ttl;
    }
    if let Some(i) = args.check_in_interval {
        registry.check_in_interval = i;
    }
    if let Some(n) = args.trusted_proxies {
        registry.trusted_proxies = n;
    }
    if let Some(n) = args.max_blocking_waiters {
        registry.max_blocking_waiters = n;
    }
    if let Some(n) = args.max_endpoints_per_ip {
        registry.max_endpoints_per_ip = n;
    }
    if let Some(n) = args.max_services {
        registry.max_services = n;
    }
    if let Some(n) = args.max_catalog_bytes {
        registry.max_catalog_bytes = n;
    }
    if let Some(path) = args.secret_file.as_ref().or(file.secret_file.as_ref()) {
        registry.secret = Some(read_secret(path)?);
    }
    if let Some(path) = args
        .signing_key_file
        .as_ref()
        .or(file.signing_key_file.as_ref())
    {
        registry.signing_key = Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read signing key file {}", path.display()))?
                .trim()
                .to_string(),
        );
    }
    registry.tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(serve::TlsFiles {
            cert_file: cert.clone(),
            key_file: key.clone(),
        }),
        _ => file.tls,
    };
    registry.validate()?;
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7700)));
    let store = file.store.overlay(&args.store);
    store.validate()?;
    Ok(Settings {
        listen,
        store,
        registry,
    })
}

pub fn load_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

fn read_secret(path: &Path) -> Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read secret file {}", path.display()))?;
    let s = s.trim().to_string();
    if s.len() < 16 {
        bail!("the secret in {} is shorter than 16 bytes", path.display());
    }
    Ok(s)
}

pub async fn main(args: RegistryArgs) -> ExitCode {
    match &args.action {
        Some(RegistryAction::InitTable { store, ttl }) => {
            return report(
                init(store, ttl.unwrap_or(Duration::from_secs(180))).await,
                "init-table",
            );
        }
        Some(RegistryAction::Keygen { out }) => {
            return report(keygen(out), "registry keygen");
        }
        Some(RegistryAction::Token {
            secret_file,
            ip,
            services,
            operator,
        }) => {
            return report(print_token(secret_file, *ip, services, *operator), "token");
        }
        None => {}
    }
    let settings = match settings(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tidings registry: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    report(serve(settings).await, "registry")
}

/// Creates the signing key in `out` unless one is there, and prints its public key.
fn keygen(out: &Path) -> Result<()> {
    let key: gossip::sign::SigningKey = match std::fs::read_to_string(out) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("{} holds no signing key", out.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = gossip::sign::SigningKey::generate();
            gossip::owner_key::write_private(out, &key.to_base64())
                .with_context(|| format!("cannot write {}", out.display()))?;
            key
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", out.display())),
    };
    println!("{}", key.public().to_base64());
    Ok(())
}

fn report(r: Result<()>, what: &str) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidings {what}: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn init(store: &StoreArgs, ttl: Duration) -> Result<()> {
    let cfg = StoreSection::default().overlay(store).dynamo(ttl)?;
    init_table(&cfg).await?;
    println!(
        "table {} is ready (stream of new and old images, TTL on expires_at)",
        cfg.table
    );
    Ok(())
}

fn print_token(
    secret_file: &Path,
    ip: Option<std::net::IpAddr>,
    services: &[String],
    operator: bool,
) -> Result<()> {
    let services = services
        .iter()
        .map(|s| schema::ServiceName::new(s.as_str()).with_context(|| format!("--service {s}")))
        .collect::<Result<Vec<_>>>()?;
    if services.len() > discovery::auth::MAX_TOKEN_SERVICES {
        bail!(
            "a token may name at most {} services",
            discovery::auth::MAX_TOKEN_SERVICES
        );
    }
    let secret = read_secret(secret_file)?;
    let token = match (ip, operator) {
        (Some(ip), false) => discovery::scoped_token(&secret, ip, &services),
        _ => discovery::operator_token(&secret),
    };
    println!("{token}");
    Ok(())
}

async fn build_store(settings: &Settings) -> Result<Arc<dyn Store>> {
    Ok(match settings.store.kind.unwrap_or(StoreKind::Memory) {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Dynamodb => {
            Arc::new(DynamoStore::connect(&settings.store.dynamo(settings.registry.ttl)?).await?)
        }
    })
}

async fn serve(settings: Settings) -> Result<()> {
    let store = build_store(&settings).await?;
    // A 4 096-entry accept queue: under a connect flood tokio's 128 would drop SYNs and cost
    // well-behaved clients a second each.
    let listener = serve::bind(settings.listen)
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let kind = settings.store.kind.unwrap_or(StoreKind::Memory);
    let scheme = if settings.registry.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%addr, scheme, store = ?kind, ttl = ?settings.registry.ttl, "registry listening");
    let registry = Registry::new(store, settings.registry, Arc::new(SystemClock));
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        crate::telemetry::shutdown_signal().await;
        tracing::info!("shutdown signal: draining");
        crate::systemd::stopping();
        trigger.cancel();
    });
    crate::systemd::ready(&format!("serving on {addr}"));
    crate::systemd::spawn_watchdog(shutdown.clone());
    discovery::serve(listener, registry, shutdown).await?;
    tracing::info!("registry stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/registry.toml");
        let file: RegistryFile = load_file(&path).expect("example parses");
        file.registry.validate().expect("example validates");
        assert_eq!(
            file.registry,
            RegistryConfig::default(),
            "the example documents the defaults"
        );
        assert_eq!(file.listen, Some(SocketAddr::from(([0, 0, 0, 0], 7700))));
    }

    #[test]
    fn stream_poll_comes_from_the_file_or_the_flag_and_is_bounded() {
        let file: RegistryFile =
            toml::from_str("[store]\nkind = \"dynamodb\"\nstream_poll = \"250ms\"\n")
                .expect("parses");
        assert_eq!(file.store.stream_poll, Some(Duration::from_millis(250)));
        let args = registry_args(&["--stream-poll", "2s"]).expect("parses");
        let store = settings(&args).expect("valid").store;
        assert_eq!(store.stream_poll, Some(Duration::from_secs(2)));
        let cfg = StoreSection {
            table: Some("t-1".into()),
            ..StoreSection::default()
        }
        .dynamo(Duration::from_secs(180))
        .expect("config");
        assert_eq!(cfg.stream_poll, DynamoConfig::DEFAULT_STREAM_POLL);
        for bad in ["0s", "61s"] {
            let args = registry_args(&["--stream-poll", bad]).expect("parses");
            assert!(settings(&args).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<RegistryFile>("[registry]\nttl_secs = 3").is_err());
        assert!(toml::from_str::<RegistryFile>("lsiten = \"0.0.0.0:1\"").is_err());
    }

    fn registry_args(flags: &[&str]) -> Result<RegistryArgs, clap::Error> {
        use clap::Parser;
        let argv = ["tidings", "registry"]
            .into_iter()
            .chain(flags.iter().copied());
        match crate::cli::Cli::try_parse_from(argv)?.command {
            crate::cli::Command::Registry(a) => Ok(a),
            other => panic!("not the registry command: {other:?}"),
        }
    }

    #[test]
    fn limit_flags_override_the_defaults() {
        let args = registry_args(&[
            "--max-blocking-waiters",
            "10",
            "--max-endpoints-per-ip",
            "11",
            "--max-services",
            "12",
            "--max-catalog-bytes",
            "13",
        ])
        .expect("parses");
        let r = settings(&args).expect("valid").registry;
        assert_eq!(
            (
                r.max_blocking_waiters,
                r.max_endpoints_per_ip,
                r.max_services,
                r.max_catalog_bytes
            ),
            (10, 11, 12, 13)
        );
        let zero = registry_args(&["--max-services", "0"]).expect("parses");
        assert!(settings(&zero).is_err());
    }

    #[test]
    fn tls_comes_from_the_file_or_both_flags() {
        let file: RegistryFile =
            toml::from_str("[tls]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n")
                .expect("parses");
        assert_eq!(
            file.tls,
            Some(serve::TlsFiles {
                cert_file: "/c.pem".into(),
                key_file: "/k.pem".into()
            })
        );
        assert!(toml::from_str::<RegistryFile>("[tls]\ncert = \"/c.pem\"").is_err());
        let args = registry_args(&["--tls-cert", "/a.pem", "--tls-key", "/b.pem"]).expect("parses");
        let tls = settings(&args).expect("valid").registry.tls;
        assert_eq!(tls.map(|t| t.cert_file), Some("/a.pem".into()));
        assert!(
            registry_args(&["--tls-cert", "/a.pem"]).is_err(),
            "the key is required too"
        );
        assert_eq!(
            settings(&registry_args(&[]).expect("parses"))
                .expect("valid")
                .registry
                .tls,
            None
        );
    }

    #[test]
    fn token_takes_services_only_with_an_ip() {
        let ok = registry_args(&[
            "token",
            "--secret-file",
            "f",
            "--ip",
            "10.0.0.7",
            "--service",
            "web",
            "--service",
            "api",
        ])
        .expect("parses");
        match ok.action {
            Some(RegistryAction::Token { services, ip, .. }) => {
                assert_eq!(services, ["web", "api"]);
                assert_eq!(ip, Some("10.0.0.7".parse().expect("ip")));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            registry_args(&[
                "token",
                "--secret-file",
                "f",
                "--operator",
                "--service",
                "web"
            ])
            .is_err()
        );
    }
}
