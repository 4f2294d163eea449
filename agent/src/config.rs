//! `AgentConfig`: every knob of the agent, with defaults and [`AgentConfig::validate`].
//! Loaded from TOML by the binary (`ops/deploy/agent.toml` is the commented example), then
//! overridden by flags. Durations are humane strings (`"60s"`, `"5m"`) or seconds.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use discovery::RegistryClient;
use discovery::config::duration;
use gossip::GossipConfig;
use schema::api::EndpointSpec;
use schema::{Endpoint, ServiceName, TagValue, ValidationError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The service every agent checks in (on its gossip address) so that peers can find seeds
/// in the registry's listing.
pub const AGENT_SERVICE: &str = "tidings-agent";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("invalid connections: {0}")]
    Connections(#[from] serve::LimitsError),
    #[error("`registry` is required (the registry's base URL, e.g. http://registry:7700)")]
    NoRegistry,
    #[error("invalid registry: {0}")]
    Registry(String),
    #[error("invalid gossip settings: {0}")]
    Gossip(#[from] gossip::ConfigError),
    #[error("invalid endpoint #{index}: {source}")]
    Endpoint {
        index: usize,
        source: ValidationError,
    },
    #[error("invalid zone: {0}")]
    Zone(ValidationError),
    #[error("{0}")]
    Invalid(&'static str),
    #[error(
        "the gossip address {0} is unspecified and no `host_ip` is set: set `gossip.advertise` or `host_ip`"
    )]
    NoHostIp(SocketAddr),
}

/// Smallest `cache_max_bytes`: below it even a small view could not be cached.
const MIN_CACHE_BYTES: u64 = 4096;

/// The agent's configuration. Unknown keys are refused so a typo is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Registry base URL (`http://host:port` or `https://host:port`).
    pub registry: Option<String>,
    /// CA certificates (PEM) that verify an `https://` registry; default: the system's.
    pub ca_file: Option<PathBuf>,
    /// File holding a bearer token for check-ins (a host token); read by the binary.
    pub registry_token_file: Option<PathBuf>,
    /// The token itself, as read from `registry_token_file` (never in the file).
    #[serde(skip)]
    pub registry_token: Option<String>,
    /// File holding the registry's operator token; read at start. With it, a request to the
    /// local API bearing that token may register endpoints on any address (without it, only
    /// on this host's own addresses).
    pub operator_token_file: Option<PathBuf>,
    /// The token itself, as read from `operator_token_file` (never in the file).
    #[serde(skip)]
    pub operator_token: Option<String>,
    /// Loopback address of the local API.
    pub api: SocketAddr,
    /// Further names the local API answers to in the `Host` header, besides `localhost`
    /// and address literals (e.g. a name `/etc/hosts` maps to loopback). Any other name is
    /// refused (403) as a possible DNS-rebinding attack.
    pub api_host_names: Vec<String>,
    /// At most this many blocking queries wait on the local API at once; one more is
    /// answered 429 with a short `Retry-After` at once. Its clients are this host's proxy,
    /// Envoy and scripts: a few watchers per service, far below this.
    pub max_blocking_waiters: usize,
    /// Shown as `env` in v1 listings, as the registry does.
    pub env: String,
    /// Where the disk cache lives.
    pub data_dir: PathBuf,
    /// Largest disk cache file read or written, in bytes (default and most: the file
    /// codec's limit, 64 MiB plus the magic). A larger file is set aside unread.
    pub cache_max_bytes: u64,
    /// The local API listener's connection limits (`[connections]`: `max_connections`,
    /// `header_read_timeout`, `idle_timeout`, `write_timeout`, `max_header_bytes`); unset
    /// keys take [`AgentConfig::DEFAULT_CONNECTIONS`] and the `serve` crate's defaults.
    pub connections: serve::LimitsTable,
    /// Serve the local API over HTTPS with this certificate and key (`[tls]`: `cert_file`,
    /// `key_file`, PEM), re-read when the files change. Default: plain HTTP.
    pub tls: Option<serve::TlsFiles>,
    /// This host's address for endpoints that name none; default: the gossip address.
    pub host_ip: Option<IpAddr>,
    /// Further addresses of this host on which local processes may register endpoints
    /// through the local API (besides `host_ip`, the gossip address and the addresses of
    /// the configured endpoints).
    pub host_ips: Vec<IpAddr>,
    /// Zone (`az` tag) given to this host's endpoints that carry none.
    pub zone: Option<String>,
    /// How often the host's endpoints are checked in (at a stable per-host offset).
    #[serde(with = "duration")]
    pub check_in_interval: Duration,
    /// Per-request timeout towards the registry (blocking reads get their wait on top).
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// `wait` of the blocking catalog query.
    #[serde(with = "duration")]
    pub sync_wait: Duration,
    /// Poll period (± 10 %) when the registry answers without blocking.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// Longest pause between sync attempts while the registry is unreachable.
    #[serde(with = "duration")]
    pub sync_retry_max: Duration,
    /// How long a gossip owner must be alive before rows loaded from the disk cache for it
    /// give way (by then repair has brought its current rows).
    #[serde(with = "duration")]
    pub cache_settle: Duration,
    /// On SIGTERM, publish tombstones and delete this host's endpoints from the registry.
    /// (Never on a crash: then peers hide the rows when SWIM declares the agent down.)
    pub deregister_on_shutdown: bool,
    /// File with the gossip key(s), base64, one per line, primary first; read by the binary.
    pub gossip_key_file: Option<PathBuf>,
    /// This host's endpoints; `ip` defaults to `host_ip`.
    pub endpoints: Vec<EndpointSpec>,
    pub gossip: GossipConfig,
    /// DNS on loopback (`[dns]`).
    pub dns: crate::dns::DnsConfig,
    /// The xDS (ADS over gRPC) server (`[xds]`).
    pub xds: crate::xds::XdsConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            registry: None,
            ca_file: None,
            registry_token_file: None,
            registry_token: None,
            operator_token_file: None,
            operator_token: None,
            api: SocketAddr::from(([127, 0, 0, 1], 7701)),
            api_host_names: Vec::new(),
            max_blocking_waiters: 256,
            env: "production".to_string(),
            data_dir: PathBuf::from("/var/lib/tidings/agent"),
            cache_max_bytes: crate::cache::MAX_BYTES,
            connections: serve::LimitsTable::default(),
            tls: None,
            host_ip: None,
            host_ips: Vec::new(),
            zone: None,
            check_in_interval: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
            sync_wait: Duration::from_secs(30),
            poll_interval: Duration::from_secs(30),
            sync_retry_max: Duration::from_secs(30),
            cache_settle: Duration::from_secs(15),
            deregister_on_shutdown: true,
            gossip_key_file: None,
            endpoints: Vec::new(),
            gossip: GossipConfig::default(),
            dns: crate::dns::DnsConfig::default(),
            xds: crate::xds::XdsConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Checks everything that can be checked without IO.
    /// Open local-API connections by default: its clients are this host's processes (a
    /// proxy, Envoy, scripts), and an agent started by hand under a 1 024 file limit must
    /// keep room for gossip sockets and its cache files.
    pub const DEFAULT_CONNECTIONS: usize = 512;

    /// The local API listener's limits in force: `[connections]` over the defaults.
    pub fn api_limits(&self) -> Result<serve::Limits, serve::LimitsError> {
        self.connections.over(serve::Limits::with_max_connections(
            Self::DEFAULT_CONNECTIONS,
        ))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client()?;
        self.gossip.validate()?;
        let positive = [
            (self.check_in_interval, "check_in_interval must be > 0"),
            (self.request_timeout, "request_timeout must be > 0"),
            (self.sync_wait, "sync_wait must be > 0"),
            (self.poll_interval, "poll_interval must be > 0"),
            (self.sync_retry_max, "sync_retry_max must be > 0"),
        ];
        if let Some((_, msg)) = positive.iter().find(|(d, _)| d.is_zero()) {
            return Err(ConfigError::Invalid(msg));
        }
        if !self.api.ip().is_loopback() {
            return Err(ConfigError::Invalid(
                "the local API must listen on a loopback address",
            ));
        }
        if !(MIN_CACHE_BYTES..=crate::cache::MAX_BYTES).contains(&self.cache_max_bytes) {
            return Err(ConfigError::Invalid(
                "cache_max_bytes must be from 4096 to 67108872 (the file codec's limit)",
            ));
        }
        self.api_limits()?;
        if self.max_blocking_waiters == 0 {
            return Err(ConfigError::Invalid("max_blocking_waiters must be > 0"));
        }
        self.zone_tag()?;
        self.dns.validate().map_err(ConfigError::Invalid)?;
        self.xds.validate(self.api).map_err(ConfigError::Invalid)?;
        // Endpoint validity with a placeholder ip: the real one is known once gossip binds.
        self.endpoints(self.host_ip.unwrap_or(IpAddr::from([127, 0, 0, 1])))?;
        Ok(())
    }

    /// A registry client for `registry`.
    pub fn client(&self) -> Result<RegistryClient, ConfigError> {
        let url = self.registry.as_deref().ok_or(ConfigError::NoRegistry)?;
        RegistryClient::with_ca(
            url,
            self.registry_token.clone(),
            self.request_timeout,
            self.ca_file.as_deref(),
        )
        .map_err(|e| ConfigError::Registry(e.to_string()))
    }

    fn zone_tag(&self) -> Result<Option<TagValue>, ConfigError> {
        self.zone
            .clone()
            .map(TagValue::new)
            .transpose()
            .map_err(ConfigError::Zone)
    }

    /// The configured endpoints, with `host_ip` and the zone filled in where absent.
    pub fn endpoints(&self, host_ip: IpAddr) -> Result<Vec<Endpoint>, ConfigError> {
        let zone = self.zone_tag()?;
        self.endpoints
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let mut ep = spec
                    .clone()
                    .into_endpoint(None, Some(host_ip))
                    .map_err(|source| ConfigError::Endpoint { index, source })?;
                if ep.tags.az.is_none() {
                    ep.tags.az.clone_from(&zone);
                }
                Ok(ep)
            })
            .collect()
    }

    /// The endpoint every agent checks in for itself: `tidings-agent` on its gossip address.
    pub fn agent_endpoint(&self, gossip_addr: SocketAddr) -> Option<Endpoint> {
        let service = ServiceName::new(AGENT_SERVICE).ok()?;
        let port = std::num::NonZeroU16::new(gossip_addr.port())?;
        let mut ep = Endpoint::new(service, gossip_addr.ip(), port);
        ep.tags.az = self.zone_tag().ok().flatten();
        Some(ep)
    }
}

/// Parses `SERVICE:PORT[@IP]` (the `--endpoint` flag) into an endpoint spec.
pub fn parse_endpoint_flag(s: &str) -> Result<EndpointSpec, String> {
    let (main, ip) = match s.split_once('@') {
        Some((m, ip)) => (m, Some(ip.to_string())),
        None => (s, None),
    };
    let (service, port) = main
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected SERVICE:PORT[@IP]"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: the port must be a number from 1 to 65535"))?;
    ServiceName::new(service).map_err(|e| e.to_string())?;
    Ok(EndpointSpec {
        service: Some(service.to_string()),
        ip,
        port: serde_json::Value::from(port),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AgentConfig {
        let mut c = AgentConfig {
            registry: Some("http://127.0.0.1:7700".into()),
            ..Default::default()
        };
        c.gossip.insecure = true;
        c
    }

    #[test]
    fn defaults_need_a_registry_and_a_key() {
        assert!(matches!(
            AgentConfig::default().validate(),
            Err(ConfigError::NoRegistry)
        ));
        let mut c = base();
        c.gossip.insecure = false;
        assert!(matches!(c.validate(), Err(ConfigError::Gossip(_))));
        base().validate().expect("valid");
    }

    #[test]
    fn refuses_nonsense() {
        let mut c = base();
        c.api = "0.0.0.0:7701".parse().expect("addr");
        assert!(c.validate().is_err());
        let mut c = base();
        c.check_in_interval = Duration::ZERO;
        assert!(c.validate().is_err());
        for bytes in [0, 4095, crate::cache::MAX_BYTES + 1] {
            let mut c = base();
            c.cache_max_bytes = bytes;
            assert!(c.validate().is_err(), "{bytes}");
        }
        let mut c = base();
        c.registry = Some("ftp://x".into());
        assert!(c.validate().is_err());
        let mut c = base();
        c.endpoints = vec![parse_endpoint_flag("web:80").expect("flag")];
        c.endpoints[0].port = serde_json::Value::from(0);
        assert!(c.validate().is_err());
        assert!(toml_like(r#"{"registr": "http://x"}"#).is_err());
    }

    fn toml_like(json: &str) -> Result<AgentConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn endpoint_flags_fill_ip_and_zone() {
        let mut c = base();
        c.zone = Some("zone-a".into());
        c.endpoints = vec![
            parse_endpoint_flag("web:8080").expect("flag"),
            parse_endpoint_flag("db:5432@10.0.0.9").expect("flag"),
        ];
        let eps = c.endpoints("10.0.0.1".parse().expect("ip")).expect("valid");
        assert_eq!(eps[0].socket_addr().to_string(), "10.0.0.1:8080");
        assert_eq!(eps[1].socket_addr().to_string(), "10.0.0.9:5432");
        assert_eq!(eps[0].tags.zone(), Some("zone-a"));
        assert!(parse_endpoint_flag("web").is_err());
        assert!(parse_endpoint_flag("Web:80").is_err());
        assert!(parse_endpoint_flag("web:x").is_err());
        let agent = c
            .agent_endpoint("10.0.0.1:7702".parse().expect("addr"))
            .expect("endpoint");
        assert_eq!(agent.service.as_str(), AGENT_SERVICE);
    }
}
