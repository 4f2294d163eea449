//! `GossipConfig`: the one typed config of the gossip subsystem (serde, defaults, validate).

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use foca::PeriodicParams;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::crypto::{KeyError, KeyRing, SEAL_OVERHEAD};
use crate::node::MAX_DATAGRAM;
use crate::sign::{PublicKey, SignKeyError, SigningMode, Trust};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("gossip needs a key (`keys`), or `insecure = true` to run unencrypted")]
    KeyRequired,
    #[error("`insecure = true` and `keys` are mutually exclusive")]
    KeyAndInsecure,
    #[error("cluster name must be 1-64 bytes")]
    ClusterName,
    #[error("{0}")]
    Interval(&'static str),
    #[error(
        "gossip signing `{0:?}` needs the registry's public key (`registry_key`, --registry-key-file)"
    )]
    RegistryKeyRequired(SigningMode),
    #[error("registry key: {0}")]
    RegistryKey(#[from] SignKeyError),
}

/// How far ahead of a node's clock a registry snapshot may be dated before it is refused.
///
/// Why 30 s: clocks kept by NTP agree to well under a second, and even a host whose time
/// sync quietly failed drifts only seconds a day, so honest snapshots never come near it;
/// a tighter bound would buy nothing and risk refusing a live registry's data over a sloppy
/// clock. A looser one costs more: it is how far ahead of real time snapshot timestamps can
/// run after a replica ahead of time answered (fresher direct answers are stamped just
/// after what is held, so they still win, but every stamp carries the lead until real time
/// catches up). 30 s is half the default check-in interval: a lead the system absorbs
/// within one check-in round.
pub const DEFAULT_MAX_SNAPSHOT_SKEW_MS: u64 = 30_000;
/// Upper bound of `max_snapshot_skew_ms`: a day is already far beyond any sane clock error.
const MAX_SNAPSHOT_SKEW_LIMIT_MS: u64 = 24 * 3600 * 1000;

/// Gossip settings. Durations are in milliseconds in files (`*_ms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipConfig {
    /// UDP (SWIM) and TCP (repair) address; both use the same port. Default `0.0.0.0:7702`.
    pub bind: SocketAddr,
    /// The address peers reach this node at, if different from `bind` (e.g. bind 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// Authenticated as associated data: nodes of another cluster cannot talk to us.
    pub cluster: String,
    /// Base64 keys (`tidings gossip keygen`): the first seals, all open.
    pub keys: Vec<String>,
    /// Run without encryption. Must be explicit.
    pub insecure: bool,
    pub seeds: Vec<SocketAddr>,
    /// SWIM probe period (foca `probe_period`; `new_lan` uses 1 s).
    pub probe_period_ms: u64,
    /// SWIM probe timeout (must be below the period).
    pub probe_rtt_ms: u64,
    /// Periodic gossip interval: one dissemination round.
    pub gossip_interval_ms: u64,
    /// Anti-entropy digest exchange interval.
    pub repair_interval_ms: u64,
    /// How long a tombstone is kept at most.
    pub tombstone_retention_ms: u64,
    /// How long foca remembers a down member (and we its rows' epoch).
    pub remove_down_after_ms: u64,
    /// Registry snapshots dated more than this ahead of this node's clock are refused
    /// (see [`DEFAULT_MAX_SNAPSHOT_SKEW_MS`]).
    pub max_snapshot_skew_ms: u64,
    /// A repair frame must arrive whole within this from its first byte; a peer that sends
    /// part of one and stalls is disconnected. 5 s: a 16 MiB frame needs ~30 Mbit/s.
    pub repair_frame_timeout_ms: u64,
    /// A repair connection with no frame in progress is closed after this. An honest peer
    /// sends its next frame within milliseconds of the previous reply.
    pub repair_idle_timeout_ms: u64,
    /// Inbound repair TCP connections open at once. At the cap the oldest connection that
    /// has not authenticated yet is closed for the new one; if all have, the new one is
    /// refused. Each costs at most one sealed chunk (~32 KiB) until it authenticates.
    pub repair_max_connections: usize,
    /// Repair sessions (inbound, once authenticated, and outbound) running at once; each
    /// may buffer a frame of up to 16 MiB. Others are refused or skipped; the next repair
    /// interval retries.
    pub max_repair_sessions: usize,
    /// Owner signatures on rows and registry signatures on snapshots: `off` (neither made
    /// nor checked), `accept` (made, and checked when present) or `require` (unsigned items
    /// dropped). See docs/ARCHITECTURE.md#signed-gossip for the roll from off to require.
    pub signing: SigningMode,
    /// The registry's public key (base64, printed by `tidings registry keygen`); needed
    /// unless `signing` is off.
    pub registry_key: Option<String>,
    /// How long past its end a certificate is still honoured, so a registry outage does not
    /// unsign the fleet (fail-static). Default one day.
    pub certificate_grace_ms: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            bind: SocketAddr::from(([0, 0, 0, 0], 7702)),
            advertise: None,
            cluster: "tidings".to_string(),
            keys: Vec::new(),
            insecure: false,
            seeds: Vec::new(),
            probe_period_ms: 1_000,
            probe_rtt_ms: 500,
            gossip_interval_ms: 200,
            repair_interval_ms: 5_000,
            tombstone_retention_ms: 24 * 3600 * 1000,
            remove_down_after_ms: 24 * 3600 * 1000,
            max_snapshot_skew_ms: DEFAULT_MAX_SNAPSHOT_SKEW_MS,
            repair_frame_timeout_ms: 5_000,
            repair_idle_timeout_ms: 5_000,
            repair_max_connections: 64,
            max_repair_sessions: 8,
            signing: SigningMode::Off,
            registry_key: None,
            certificate_grace_ms: 24 * 3600 * 1000,
        }
    }
}

impl GossipConfig {
    /// Checks the config and returns the parsed key ring (`None` in insecure mode).
    pub fn validate(&self) -> Result<Option<KeyRing>, ConfigError> {
        if self.cluster.is_empty() || self.cluster.len() > 64 {
            return Err(ConfigError::ClusterName);
        }
        if self.probe_rtt_ms == 0 || self.probe_rtt_ms >= self.probe_period_ms {
            return Err(ConfigError::Interval(
                "probe_rtt_ms must be > 0 and below probe_period_ms",
            ));
        }
        // Upper bounds keep every derived duration far from overflow (foca scales them).
        if !(10..=60_000).contains(&self.probe_period_ms) {
            return Err(ConfigError::Interval("probe_period_ms must be 10..=60000"));
        }
        if !(1..=60_000).contains(&self.gossip_interval_ms)
            || !(1..=3_600_000).contains(&self.repair_interval_ms)
        {
            return Err(ConfigError::Interval(
                "gossip_interval_ms must be 1..=60000 and repair_interval_ms 1..=3600000",
            ));
        }
        const MONTH_MS: u64 = 31 * 24 * 3600 * 1000;
        if self.tombstone_retention_ms > MONTH_MS || self.remove_down_after_ms > MONTH_MS {
            return Err(ConfigError::Interval(
                "tombstone_retention_ms and remove_down_after_ms must be at most 31 days",
            ));
        }
        if self.max_snapshot_skew_ms > MAX_SNAPSHOT_SKEW_LIMIT_MS {
            return Err(ConfigError::Interval(
                "max_snapshot_skew_ms must be at most 86400000 (one day)",
            ));
        }
        if !(1..=600_000).contains(&self.repair_frame_timeout_ms)
            || !(1..=600_000).contains(&self.repair_idle_timeout_ms)
        {
            return Err(ConfigError::Interval(
                "repair_frame_timeout_ms and repair_idle_timeout_ms must be 1..=600000",
            ));
        }
        if !(1..=65_536).contains(&self.repair_max_connections)
            || !(1..=1_024).contains(&self.max_repair_sessions)
        {
            return Err(ConfigError::Interval(
                "repair_max_connections must be 1..=65536 and max_repair_sessions 1..=1024",
            ));
        }

        self.trust()?;
        match (self.insecure, self.keys.is_empty()) {
            (true, true) => Ok(None),
            (true, false) => Err(ConfigError::KeyAndInsecure),
            (false, true) => Err(ConfigError::KeyRequired),
            (false, false) => Ok(Some(KeyRing::parse(&self.keys)?)),
        }
    }

    /// What this node trusts: the registry key, the signing mode and the grace.
    pub fn trust(&self) -> Result<Trust, ConfigError> {
        let registry = self
            .registry_key
            .as_deref()
            .map(str::parse::<PublicKey>)
            .transpose()?;
        if registry.is_none() && self.signing != SigningMode::Off {
            return Err(ConfigError::RegistryKeyRequired(self.signing));
        }
        Ok(Trust {
            registry,
            mode: self.signing,
            grace_ms: self.certificate_grace_ms,
        })
    }

    pub(crate) fn probe_period(&self) -> Duration {
        Duration::from_millis(self.probe_period_ms)
    }

    /// Fast settings for tests and the simulator's small clusters.
    pub fn for_tests(bind: SocketAddr) -> Self {
        GossipConfig {
            bind,
            insecure: true,
            probe_period_ms: 200,
            probe_rtt_ms: 80,
            gossip_interval_ms: 50,
            repair_interval_ms: 300,
            ..Default::default()
        }
    }
}

/// foca's config for a cluster of `cluster_size`, from `Config::new_lan` with our periods
/// and `indirect_probes` (see [`crate::probing`]).
pub(crate) fn foca_config(
    cfg: &GossipConfig,
    cluster_size: u32,
    indirect_probes: usize,
) -> foca::Config {
    let n = NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN);
    let mut c = foca::Config::new_lan(n);
    // The same budget as rows (`spread::retransmits`): memberlist's 4·⌈log10(N+1)⌉, not
    // foca's 4·⌊log10(N+1)⌋.
    let tx = u8::try_from(crate::spread::retransmits(n.get())).unwrap_or(u8::MAX);
    c.max_transmissions = std::num::NonZeroU8::new(tx).unwrap_or(c.max_transmissions);
    c.num_indirect_probes = NonZeroUsize::new(indirect_probes).unwrap_or(c.num_indirect_probes);
    // new_lan assumes a 1 s probe period; keep its ratios when the period is changed.
    let scale = cfg.probe_period_ms as f64 / 1000.0;
    c.probe_period = cfg.probe_period();
    c.probe_rtt = Duration::from_millis(cfg.probe_rtt_ms);
    c.suspect_to_down_after = c.suspect_to_down_after.mul_f64(scale);
    // SWIM updates only: rows and snapshots have their own rounds (`spread`).
    let fanout = NonZeroUsize::new(crate::spread::FANOUT).unwrap_or(NonZeroUsize::MIN);
    c.periodic_gossip = Some(PeriodicParams {
        frequency: Duration::from_millis(cfg.gossip_interval_ms),
        num_members: fanout,
    });
    if let Some(p) = c.periodic_announce.as_mut() {
        p.frequency = p.frequency.mul_f64(scale);
    }
    if let Some(p) = c.periodic_announce_to_down_members.as_mut() {
        p.frequency = p.frequency.mul_f64(scale);
    }
    c.remove_down_after = Some(Duration::from_millis(cfg.remove_down_after_ms));
    let payload = MAX_DATAGRAM - SEAL_OVERHEAD - 1;
    c.max_packet_size = NonZeroUsize::new(payload).unwrap_or(NonZeroUsize::MIN);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let mut c = GossipConfig::default();
        assert!(matches!(c.validate(), Err(ConfigError::KeyRequired)));
        c.insecure = true;
        assert!(c.validate().unwrap().is_none());
        c.keys = vec![crate::generate_key()];
        assert!(matches!(c.validate(), Err(ConfigError::KeyAndInsecure)));
        c.insecure = false;
        assert!(c.validate().unwrap().is_some());
        c.keys = vec!["nope".into()];
        assert!(matches!(c.validate(), Err(ConfigError::Key(_))));
        c.keys = vec![crate::generate_key()];
        c.probe_period_ms = u64::MAX;
        assert!(matches!(c.validate(), Err(ConfigError::Interval(_))));
        c.probe_period_ms = 1_000;
        c.max_snapshot_skew_ms = u64::MAX;
        assert!(matches!(c.validate(), Err(ConfigError::Interval(_))));
        let parsed: GossipConfig =
            serde_json::from_str(r#"{"cluster":"x","insecure":true}"#).unwrap();
        assert_eq!(parsed.cluster, "x");
        assert_eq!(parsed.max_snapshot_skew_ms, DEFAULT_MAX_SNAPSHOT_SKEW_MS);
    }
}
