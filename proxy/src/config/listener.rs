//! Traffic listeners: HTTP (routes pick the cluster per request) or TCP (every connection goes
//! to one cluster, bytes copied both ways). Each kind refuses the other's keys, so a TCP
//! listener given `max_header_bytes` says so instead of ignoring it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ClusterConfig, duration};
use crate::ProxyError;

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    /// HTTP/1.1 and HTTP/2 (TLS optional), routed per request.
    #[default]
    Http,
    /// Plain TCP to `cluster`: databases, caches, anything not HTTP.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub protocol: ListenerProtocol,
    pub tls: Option<ServerTlsConfig>,
    /// A client must finish sending request headers (and a TLS handshake) within this.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// Request headers larger than this are refused with 431.
    pub max_header_bytes: usize,
    /// TCP only: the cluster every connection goes to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// TCP only: a connection with no byte either way for this long is closed
    /// [default: 1h, Envoy's].
    #[serde(with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

/// A TCP connection's idle timeout when the listener gives none (Envoy's `tcp_proxy` default).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 7710)),
            protocol: ListenerProtocol::Http,
            tls: None,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            cluster: None,
            idle_timeout: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl ListenerConfig {
    pub fn is_tcp(&self) -> bool {
        self.protocol == ListenerProtocol::Tcp
    }

    /// A TCP listener's idle timeout.
    pub fn tcp_idle_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or(DEFAULT_TCP_IDLE_TIMEOUT)
    }

    /// Checks the listener's keys against its protocol; a TCP listener's cluster must exist
    /// and speak plain TCP.
    pub(super) fn validate(&self, clusters: &[ClusterConfig]) -> Result<(), ProxyError> {
        let bad = |m: &str| {
            Err(ProxyError::Config(format!(
                "listener {}: {m}",
                self.address
            )))
        };
        match self.protocol {
            ListenerProtocol::Http => {
                if self.cluster.is_some() || self.idle_timeout.is_some() {
                    return bad(
                        "cluster and idle_timeout apply to protocol = \"tcp\" listeners only \
                         (HTTP listeners take their clusters from [[routes]])",
                    );
                }
                if self.max_header_bytes < 8192 {
                    return bad("max_header_bytes must be at least 8192");
                }
                if self.header_read_timeout.is_zero() {
                    return bad("header_read_timeout must be positive");
                }
            }
            ListenerProtocol::Tcp => self.validate_tcp(clusters).or_else(|m| bad(&m))?,
        }
        Ok(())
    }

    fn validate_tcp(&self, clusters: &[ClusterConfig]) -> Result<(), String> {
        let http = ListenerConfig::default();
        if self.tls.is_some() {
            return Err(
                "tls applies to HTTP listeners only: a TCP listener forwards the \
                        bytes as they come (TLS passes through)"
                    .into(),
            );
        }
        if self.header_read_timeout != http.header_read_timeout
            || self.max_header_bytes != http.max_header_bytes
        {
            return Err(
                "header_read_timeout and max_header_bytes apply to HTTP listeners only".into(),
            );
        }
        if self.idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err("idle_timeout must be positive".into());
        }
        let Some(name) = &self.cluster else {
            return Err("a protocol = \"tcp\" listener needs a cluster".into());
        };
        let Some(c) = clusters.iter().find(|c| &c.name == name) else {
            return Err(format!("unknown cluster {name:?}"));
        };
        if c.http2 || c.tls.is_some() {
            return Err(format!(
                "cluster {name:?} has http2 or tls, which a TCP listener cannot speak"
            ));
        }
        Ok(())
    }
}
