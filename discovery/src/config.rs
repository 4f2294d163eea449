//! `RegistryConfig`: every knob of the registry, with defaults, loaded from TOML by the
//! binary and checked by [`RegistryConfig::validate`]. Durations are humane strings
//! (`"180s"`, `"5m"`, `"1h 30m"`) or a bare number of seconds.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The registry's configuration. Embed it as its own TOML table (`[registry]`); unknown keys
/// are refused so a typo is an error, not a silently ignored setting.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// An endpoint is live while `now - last_check_in < ttl` (three missed check-ins).
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// How often hosts check in. Sets the warm-up period and the self-preservation window.
    #[serde(with = "duration")]
    pub check_in_interval: Duration,
    /// Self-preservation turns on when renewals fall below this share of the baseline.
    pub renewal_threshold: f64,
    /// Whether self-preservation is enabled at all (Eureka's `enableSelfPreservation`).
    pub self_preservation: bool,
    /// How often the expected-renewals baseline is recomputed from the live count
    /// (Eureka's `renewalThresholdUpdateIntervalMs`, 15 min).
    #[serde(with = "duration")]
    pub baseline_refresh: Duration,
    /// How often the sweeper runs (expiry deletes, self-preservation accounting).
    #[serde(with = "duration")]
    pub sweep_interval: Duration,
    /// At most this many expired rows are deleted per sweep: a bounded delete rate.
    pub sweep_max_per_pass: usize,
    /// HMAC secret for write tokens (docs/ARCHITECTURE.md#trust-model). `None`: writes are open. Never
    /// serialised or printed by `Debug`, so dumping the config cannot leak it.
    #[serde(skip_serializing)]
    pub secret: Option<String>,
    /// The registry's gossip signing key (base64 Ed25519 seed, `tidings registry keygen`).
    /// With it, a check-in carrying an agent's owner key is answered with a certificate
    /// (docs/ARCHITECTURE.md#signed-gossip). Set by the binary from `signing_key_file`;
    /// never serialised or printed. Registries sharing a table share this key.
    #[serde(skip)]
    pub signing_key: Option<String>,
    /// How long a gossip certificate is valid from issue. Every check-in gets a fresh one;
    /// agents adopt it once theirs is half spent, and receivers honour a certificate a
    /// grace period past its end (their own setting).
    #[serde(with = "duration")]
    pub certificate_validity: Duration,
    /// Shown as `env` in v1 listings (lyft's `APPLICATION_ENV`).
    pub env: String,
    /// Largest accepted request body, bytes.
    pub body_limit: usize,
    /// How many proxies (load balancers) in front of the registry append to
    /// `X-Forwarded-For`. A v1 check-in with `auto_ip` is stored under the hop the outermost
    /// of them appended (1: the last hop); 0 takes the connection's peer address and ignores
    /// the header, which any client can forge.
    pub trusted_proxies: usize,
    /// At most this many API requests (blocking queries and probes aside) are handled at
    /// once; more are answered 429 with `Retry-After` instead of queueing into timeouts.
    pub max_in_flight: usize,
    /// At most this many blocking queries wait at once; one more is answered 429 with a
    /// short jittered `Retry-After` at once instead of holding a task and a socket. Every
    /// agent holds one catalog waiter (and proxies one per watched service), so this is
    /// roughly the fleet one registry replica can serve: run more replicas or raise it.
    pub max_blocking_waiters: usize,
    /// The HTTP listener's connection limits (`[connections]`: `max_connections`,
    /// `header_read_timeout`, `idle_timeout`, `write_timeout`, `max_header_bytes`); unset
    /// keys take [`RegistryConfig::DEFAULT_CONNECTIONS`] and the `serve` crate's defaults.
    pub connections: serve::LimitsTable,
    /// Quota: endpoints one host ip may hold, across services. A new endpoint past it is
    /// refused (403 `quota_exceeded`); renewals of stored ones never are. The default equals
    /// the most endpoints one v2 check-in may carry.
    pub max_endpoints_per_ip: usize,
    /// Quota: services the catalog may name.
    pub max_services: usize,
    /// Quota: approximate bytes of all stored endpoints (what a full catalog read carries).
    pub max_catalog_bytes: u64,
    /// Every handler answers within this (blocking queries: within their wait plus this).
    #[serde(with = "duration")]
    pub handler_timeout: Duration,
    /// One store call may take this long before it counts as a failure (reads then fall back
    /// to the last good cache).
    #[serde(with = "duration")]
    pub store_timeout: Duration,
    /// Longest `wait` a blocking query may ask for.
    #[serde(with = "duration")]
    pub max_wait: Duration,
    /// A blocking query that sees a change sooner than this after it arrived answers when
    /// this much has passed since it arrived, with every change of that window: while the
    /// catalog churns, each waiter is answered at most once per interval instead of once per
    /// change (what a fleet of waiters costs the registry is its answers), and a change to a
    /// quiet catalog still answers at once. 0 answers every change at once.
    #[serde(with = "duration")]
    pub blocking_coalesce: Duration,
    /// Blocking queries re-read the store this often even without a change signal, to notice
    /// expiries (and writes by other registries sharing the table when its stream is not
    /// followed; while it is, the re-read is answered from the mirror).
    #[serde(with = "duration")]
    pub recheck_interval: Duration,
    /// A read answer is reused for this long unless a local write changed something.
    #[serde(with = "duration")]
    pub read_cache_ttl: Duration,
    /// `Retry-After` sent with 503s when the store is unavailable.
    #[serde(with = "duration")]
    pub retry_after: Duration,
    /// Catalog views kept to answer deltas from (`GET /v2/catalog?delta=true`); a client
    /// whose index is older than these gets the whole catalog. 0 turns deltas off.
    pub delta_views: usize,
    /// ...and for at most this long (the newest view is always kept).
    #[serde(with = "duration")]
    pub delta_max_age: Duration,
    /// On shutdown, `/ready` fails for this long before the listener closes, so load
    /// balancers stop sending new requests first.
    #[serde(with = "duration")]
    pub shutdown_delay: Duration,
    /// In-flight requests get this long to finish after the listener closes.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// Serve HTTPS with this certificate and key (re-read when the files change); `None`:
    /// plain HTTP. Set by the binary from its own `[tls]` table or flags, not from
    /// `[registry]`.
    #[serde(skip)]
    pub tls: Option<serve::TlsFiles>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            ttl: Duration::from_secs(180),
            check_in_interval: Duration::from_secs(60),
            renewal_threshold: 0.85,
            self_preservation: true,
            baseline_refresh: Duration::from_secs(15 * 60),
            sweep_interval: Duration::from_secs(5),
            sweep_max_per_pass: 1000,
            secret: None,
            signing_key: None,
            certificate_validity: Duration::from_secs(24 * 3600),
            env: "production".to_string(),
            body_limit: 64 * 1024,
            trusted_proxies: 0,
            max_in_flight: 4096,
            max_blocking_waiters: 8192,
            connections: serve::LimitsTable::default(),
            max_endpoints_per_ip: schema::api::MAX_CHECKIN_ENDPOINTS,
            max_services: 10_000,
            max_catalog_bytes: 64 * 1024 * 1024,
            handler_timeout: Duration::from_secs(10),
            store_timeout: Duration::from_secs(3),
            max_wait: Duration::from_secs(5 * 60),
            blocking_coalesce: Duration::from_millis(200),
            recheck_interval: Duration::from_secs(1),
            read_cache_ttl: Duration::from_secs(1),
            retry_after: Duration::from_secs(5),
            delta_views: 64,
            delta_max_age: Duration::from_secs(10 * 60),
            shutdown_delay: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("registry.connections: {0}")]
    Connections(#[from] serve::LimitsError),
    #[error("registry.{field} must be greater than zero")]
    Zero { field: &'static str },
    #[error("registry.ttl ({ttl:?}) must be longer than registry.check_in_interval ({interval:?})")]
    TtlShorterThanInterval { ttl: Duration, interval: Duration },
    #[error(
        "registry.store_timeout ({store:?}) must be shorter than registry.handler_timeout ({handler:?}), \
         or a slow store could never fall back to the cache"
    )]
    StoreTimeout { store: Duration, handler: Duration },
    #[error(
        "registry.blocking_coalesce ({0:?}) must be at most {max:?}: a longer hold makes every \
         change look late",
        max = RegistryConfig::MAX_BLOCKING_COALESCE
    )]
    Coalesce(Duration),
    #[error("registry.renewal_threshold must be within (0, 1], got {0}")]
    Threshold(String),
    #[error("registry.secret must not be empty (leave it out to disable auth)")]
    EmptySecret,
    #[error("registry.env must be 1-64 characters")]
    Env,
    #[error("registry signing key: {0}")]
    SigningKey(schema::cert::SignKeyError),
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field but the secret, via the serialised form (which skips it).
        let fields = serde_json::to_string(self).unwrap_or_default();
        let secret = if self.secret.is_some() {
            "<redacted>"
        } else {
            "none"
        };
        write!(f, "RegistryConfig {{ secret: {secret}, {fields} }}")
    }
}

impl RegistryConfig {
    /// Open connections the registry holds by default: it is the one shared server of the
    /// fleet, and an agent keeps one or two keep-alive connections to it; the systemd unit
    /// raises the file limit to 65 536, far above this.
    pub const DEFAULT_CONNECTIONS: usize = 4096;

    /// The longest `blocking_coalesce` accepted.
    pub const MAX_BLOCKING_COALESCE: Duration = Duration::from_secs(10);

    /// The listener limits in force: `[connections]` over the defaults.
    pub fn listener_limits(&self) -> Result<serve::Limits, serve::LimitsError> {
        self.connections.over(serve::Limits::with_max_connections(
            Self::DEFAULT_CONNECTIONS,
        ))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listener_limits()?;
        let non_zero = [
            ("ttl", self.ttl),
            ("check_in_interval", self.check_in_interval),
            ("baseline_refresh", self.baseline_refresh),
            ("sweep_interval", self.sweep_interval),
            ("handler_timeout", self.handler_timeout),
            ("store_timeout", self.store_timeout),
            ("max_wait", self.max_wait),
            ("recheck_interval", self.recheck_interval),
            ("certificate_validity", self.certificate_validity),
        ];
        for (field, d) in non_zero {
            if d.is_zero() {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.sweep_max_per_pass == 0 {
            return Err(ConfigError::Zero {
                field: "sweep_max_per_pass",
            });
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::Zero {
                field: "max_in_flight",
            });
        }
        let counts = [
            ("max_blocking_waiters", self.max_blocking_waiters as u64),
            ("max_endpoints_per_ip", self.max_endpoints_per_ip as u64),
            ("max_services", self.max_services as u64),
            ("max_catalog_bytes", self.max_catalog_bytes),
        ];
        for (field, n) in counts {
            if n == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.body_limit == 0 {
            return Err(ConfigError::Zero {
                field: "body_limit",
            });
        }
        if self.ttl <= self.check_in_interval {
            return Err(ConfigError::TtlShorterThanInterval {
                ttl: self.ttl,
                interval: self.check_in_interval,
            });
        }
        if self.store_timeout >= self.handler_timeout {
            return Err(ConfigError::StoreTimeout {
                store: self.store_timeout,
                handler: self.handler_timeout,
            });
        }
        if self.blocking_coalesce > Self::MAX_BLOCKING_COALESCE {
            return Err(ConfigError::Coalesce(self.blocking_coalesce));
        }
        if !(self.renewal_threshold > 0.0 && self.renewal_threshold <= 1.0) {
            return Err(ConfigError::Threshold(self.renewal_threshold.to_string()));
        }
        if self.secret.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::EmptySecret);
        }
        if self.env.is_empty() || self.env.len() > 64 {
            return Err(ConfigError::Env);
        }
        if let Some(key) = &self.signing_key {
            key.parse::<schema::cert::SigningKey>()
                .map_err(ConfigError::SigningKey)?;
        }
        Ok(())
    }
}

/// Durations in config files: the workspace's one grammar.
pub use schema::duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_durations_parse_from_toml_like_json() {
        RegistryConfig::default()
            .validate()
            .expect("defaults are valid");
        let cfg: RegistryConfig =
            serde_json::from_str(r#"{"ttl": "3m", "check_in_interval": 30, "max_wait": "1m 30s"}"#)
                .expect("parses");
        assert_eq!(cfg.ttl, Duration::from_secs(180));
        assert_eq!(cfg.check_in_interval, Duration::from_secs(30));
        assert_eq!(cfg.max_wait, Duration::from_secs(90));
        assert_eq!(cfg.env, "production");
        assert!(serde_json::from_str::<RegistryConfig>(r#"{"ttl": "soon"}"#).is_err());
        assert!(serde_json::from_str::<RegistryConfig>(r#"{"tll": "3m"}"#).is_err());
    }

    #[test]
    fn the_secret_never_shows() {
        let cfg = RegistryConfig {
            secret: Some("hunter2-hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(
            !serde_json::to_string(&cfg)
                .expect("json")
                .contains("hunter2")
        );
        assert!(format!("{cfg:?}").contains("\"ttl\":\"3m\""), "{cfg:?}");
    }

    #[test]
    fn validate_refuses_nonsense() {
        let bad = [
            RegistryConfig {
                ttl: Duration::from_secs(30),
                ..Default::default()
            },
            RegistryConfig {
                renewal_threshold: 0.0,
                ..Default::default()
            },
            RegistryConfig {
                blocking_coalesce: Duration::from_secs(11),
                ..Default::default()
            },
            RegistryConfig {
                renewal_threshold: f64::NAN,
                ..Default::default()
            },
            RegistryConfig {
                sweep_max_per_pass: 0,
                ..Default::default()
            },
            RegistryConfig {
                secret: Some(String::new()),
                ..Default::default()
            },
            RegistryConfig {
                max_wait: Duration::ZERO,
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }
}
