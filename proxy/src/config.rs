//! The proxy's configuration (docs/OPERATING.md#proxy-configuration): one serde struct, loaded from TOML with
//! defaults for everything but the routes and clusters, then checked by [`ProxyConfig::validate`].
//! `ops/deploy/proxy.toml` shows every key (its test is in `config/tests.rs`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ProxyError;
use crate::core::breaker::BreakerLimits;
use crate::core::health::HealthPolicy;
use crate::core::lb::LbPolicy;
use crate::core::outlier::OutlierPolicy;
use crate::core::retry::RetryPolicy;

mod listener;
mod scheme;

pub use self::listener::{ListenerConfig, ListenerProtocol, ServerTlsConfig};
pub use self::scheme::{Scheme, UnknownScheme};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// This proxy's zone; turns on zone-aware load balancing for clusters that allow it.
    pub zone: Option<String>,
    /// How long in-flight requests may take to finish after shutdown is asked for.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    pub admin: AdminConfig,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    pub clusters: Vec<ClusterConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            zone: None,
            drain_timeout: Duration::from_secs(10),
            admin: AdminConfig::default(),
            listeners: vec![ListenerConfig::default()],
            routes: Vec::new(),
            clusters: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// A client must send a whole request head within this of connecting, or of its first
    /// byte after a previous response.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request under way closes after this.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Open connections at most; at the cap, a new one closes the one that has waited longest
    /// for a request (or is refused when every connection is being answered).
    pub max_connections: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 7711)),
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Matches the request's host (Host header or :authority, port ignored, case-insensitive).
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub cluster: String,
    /// The whole request, retries included.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            host: None,
            path_prefix: None,
            cluster: String::new(),
            timeout: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    /// The service whose endpoints make up the cluster.
    pub service: String,
    /// Where to watch membership: the local agent by default; any registry serves the same
    /// API. `http://` or `https://`.
    pub membership_url: String,
    /// CA certificates (PEM) that verify an `https://` membership_url (the certificate must
    /// name the URL's host); default: the system's CAs.
    pub membership_ca_file: Option<std::path::PathBuf>,
    pub lb_policy: LbPolicy,
    /// Request header whose value is hashed for ring hash and Maglev (random when absent).
    pub hash_header: Option<String>,
    pub health_check: HealthCheckConfig,
    pub outlier_detection: OutlierConfig,
    pub circuit_breakers: BreakerLimits,
    pub retries: RetryConfig,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Speak HTTP/2 to upstreams by prior knowledge (or via ALPN with TLS).
    pub http2: bool,
    pub tls: Option<UpstreamTlsConfig>,
    pub panic_threshold_percent: u32,
    pub zone_aware: bool,
}

impl ClusterConfig {
    /// How the membership source is reached: `membership_url`'s scheme.
    pub fn membership_scheme(&self) -> Result<Scheme, UnknownScheme> {
        Scheme::of_url(&self.membership_url)
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: String::new(),
            service: String::new(),
            membership_url: "http://127.0.0.1:7701".into(),
            membership_ca_file: None,
            lb_policy: LbPolicy::default(),
            hash_header: None,
            health_check: HealthCheckConfig::default(),
            outlier_detection: OutlierConfig::default(),
            circuit_breakers: BreakerLimits::default(),
            retries: RetryConfig::default(),
            connect_timeout: Duration::from_secs(5),
            http2: false,
            tls: None,
            panic_threshold_percent: 50,
            zone_aware: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    #[default]
    Http,
    Tcp,
    /// No active checks: discovery alone decides (absent hosts are removed at once).
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    pub path: String,
    pub expected_statuses: Vec<u16>,
    #[serde(with = "duration")]
    pub interval: Duration,
    pub jitter_percent: u32,
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        let p = HealthPolicy::default();
        HealthCheckConfig {
            kind: HealthCheckKind::Http,
            path: "/healthcheck".into(),
            expected_statuses: vec![200],
            interval: p.interval,
            jitter_percent: p.jitter_percent,
            timeout: p.timeout,
            unhealthy_threshold: p.unhealthy_threshold,
            healthy_threshold: p.healthy_threshold,
        }
    }
}

impl HealthCheckConfig {
    pub fn policy(&self) -> HealthPolicy {
        HealthPolicy {
            interval: self.interval,
            jitter_percent: self.jitter_percent,
            timeout: self.timeout,
            unhealthy_threshold: self.unhealthy_threshold,
            healthy_threshold: self.healthy_threshold,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    pub enabled: bool,
    pub consecutive_failures: u32,
    #[serde(with = "duration")]
    pub base_ejection_time: Duration,
    #[serde(with = "duration")]
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    #[serde(with = "duration")]
    pub interval: Duration,
    /// A passing active health check ends an ejection (Envoy's
    /// `successful_active_health_check_uneject_host`, default on).
    pub uneject_on_health_check_success: bool,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        let p = OutlierPolicy::default();
        OutlierConfig {
            enabled: true,
            consecutive_failures: p.consecutive_failures,
            base_ejection_time: p.base_ejection,
            max_ejection_time: p.max_ejection,
            max_ejection_percent: p.max_ejection_percent,
            interval: p.interval,
            uneject_on_health_check_success: true,
        }
    }
}

impl OutlierConfig {
    pub fn policy(&self) -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: self.consecutive_failures,
            base_ejection: self.base_ejection_time,
            max_ejection: self.max_ejection_time,
            max_ejection_percent: self.max_ejection_percent,
            interval: self.interval,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    pub num_retries: u32,
    pub retry_on_statuses: Vec<u16>,
    #[serde(with = "duration")]
    pub base_backoff: Duration,
    #[serde(with = "duration")]
    pub max_backoff: Duration,
    pub budget_percent: u32,
    pub min_retry_concurrency: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let p = RetryPolicy::default();
        RetryConfig {
            num_retries: p.num_retries,
            retry_on_statuses: p.retry_statuses,
            base_backoff: p.base_backoff,
            max_backoff: p.max_backoff,
            budget_percent: p.budget_percent,
            min_retry_concurrency: p.min_retry_concurrency,
        }
    }
}

impl RetryConfig {
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            num_retries: self.num_retries,
            base_backoff: self.base_backoff,
            max_backoff: self.max_backoff,
            retry_statuses: self.retry_on_statuses.clone(),
            budget_percent: self.budget_percent,
            min_retry_concurrency: self.min_retry_concurrency,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM bundle of the CAs that upstream certificates must chain to.
    pub ca: PathBuf,
    /// Name to verify upstream certificates against (and send as SNI).
    pub server_name: String,
    /// Client certificate chain and key for mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ProxyConfig {
    /// Parses TOML; unknown keys are errors so that typos do not silently fall back to defaults.
    pub fn from_toml(text: &str) -> Result<Self, ProxyError> {
        toml::from_str(text).map_err(|e| ProxyError::Config(one_line(text, &e)))
    }

    /// Reads and parses a TOML file (not yet validated).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ProxyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProxyError::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| match e {
            ProxyError::Config(m) => ProxyError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Checks everything that can be checked without touching the network or files.
    pub fn validate(&self) -> Result<(), ProxyError> {
        let bad = |m: String| Err(ProxyError::Config(m));
        if self.listeners.is_empty() {
            return bad("at least one listener is required".into());
        }
        for l in &self.listeners {
            l.validate(&self.clusters)?;
        }
        if self.admin.header_read_timeout.is_zero() || self.admin.idle_timeout.is_zero() {
            return bad("admin: header_read_timeout and idle_timeout must be positive".into());
        }
        if self.admin.max_connections == 0 {
            return bad("admin: max_connections must be at least 1".into());
        }
        let mut names = HashSet::new();
        for c in &self.clusters {
            if !names.insert(c.name.as_str()) {
                return bad(format!("duplicate cluster name {:?}", c.name));
            }
            validate_cluster(c)
                .map_err(|m| ProxyError::Config(format!("cluster {:?}: {m}", c.name)))?;
        }
        // A proxy of TCP listeners only needs no routes.
        if self.routes.is_empty() && self.listeners.iter().any(|l| !l.is_tcp()) {
            return bad("at least one route is required".into());
        }
        for (i, r) in self.routes.iter().enumerate() {
            if !names.contains(r.cluster.as_str()) {
                return bad(format!("route {i}: unknown cluster {:?}", r.cluster));
            }
            if r.timeout.is_zero() {
                return bad(format!("route {i}: timeout must be positive"));
            }
            if r.path_prefix
                .as_deref()
                .is_some_and(|p| !p.starts_with('/'))
            {
                return bad(format!("route {i}: path_prefix must start with '/'"));
            }
        }
        Ok(())
    }
}

/// toml's own message spans several lines with a source excerpt; operators get one line.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

fn validate_cluster(c: &ClusterConfig) -> Result<(), String> {
    if c.name.is_empty() {
        return Err("name must not be empty".into());
    }
    schema::ServiceName::new(c.service.clone()).map_err(|e| e.to_string())?;
    let uri: http::Uri = c
        .membership_url
        .parse()
        .map_err(|e| format!("membership_url: {e}"))?;
    c.membership_scheme()
        .map_err(|e| format!("membership_url: {e}"))?;
    if uri.authority().is_none() {
        return Err("membership_url must be an http:// or https:// URL".into());
    }
    if c.connect_timeout.is_zero() {
        return Err("connect_timeout must be positive".into());
    }
    if c.panic_threshold_percent > 100 {
        return Err("panic_threshold_percent must be 0-100".into());
    }
    let hc = &c.health_check;
    if hc.kind != HealthCheckKind::None {
        if hc.interval.is_zero() || hc.timeout.is_zero() {
            return Err("health_check interval and timeout must be positive".into());
        }
        if hc.unhealthy_threshold == 0 || hc.healthy_threshold == 0 || hc.jitter_percent > 100 {
            return Err("health_check thresholds must be >= 1 and jitter_percent 0-100".into());
        }
        // The path goes into the request line as is: no spaces or control characters.
        if hc.kind == HealthCheckKind::Http
            && (!hc.path.starts_with('/') || !hc.path.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(
                "health_check path must start with '/' and be printable ASCII without spaces"
                    .into(),
            );
        }
        if hc.expected_statuses.is_empty()
            || hc.expected_statuses.iter().any(|s| !(100..600).contains(s))
        {
            return Err("health_check expected_statuses must be non-empty HTTP statuses".into());
        }
    }
    let od = &c.outlier_detection;
    if od.consecutive_failures == 0 || od.max_ejection_percent > 100 || od.interval.is_zero() {
        return Err("outlier_detection: consecutive_failures >= 1, max_ejection_percent 0-100, interval > 0".into());
    }
    if c.retries
        .retry_on_statuses
        .iter()
        .any(|s| !(100..600).contains(s))
    {
        return Err("retries: retry_on_statuses must be HTTP statuses".into());
    }
    if let Some(h) = &c.hash_header {
        http::HeaderName::try_from(h.as_str()).map_err(|e| format!("hash_header: {e}"))?;
    }
    if let Some(t) = &c.tls {
        if t.cert.is_some() != t.key.is_some() {
            return Err("tls: cert and key must be given together".into());
        }
        rustls_pki_types::ServerName::try_from(t.server_name.clone())
            .map_err(|e| format!("tls.server_name: {e}"))?;
    }
    Ok(())
}

/// Durations in config files: the workspace's one grammar.
pub use schema::duration;

#[cfg(test)]
mod tests;
