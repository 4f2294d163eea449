//! The Tidings agent (docs/ARCHITECTURE.md#agent): one per host. It checks in the host's endpoints, syncs
//! the registry's catalog, gossips with the other agents, and serves the merged view on
//! loopback with the registry's own API — so a proxy, an Envoy (EDS) or a script can read
//! the agent instead of the registry. **Its answers never depend on the registry being up.**
//!
//! - [`run`] (in `run`): the whole agent on a caller-bound API listener until a shutdown
//!   token fires (mini-redis shape). [`AgentConfig`] (in [`config`]): every knob, `validate()`.
//! - Loops: [`checkin`] (splayed `POST /v2/checkin`, backoff, re-check-in when the registry
//!   restarted), [`sync`] (blocking `/v2/catalog` → registry snapshots into gossip; what an
//!   answer may add or remove), the view task, and the [`cache`] writer (atomic, ≤ 1/s, only
//!   on change).
//! - [`view`]: the sans-IO [`Merger`] — gossip's merged view (docs/ARCHITECTURE.md#what-the-agent-answers) plus disk-cache entries
//!   until live data covers them, with per-host provenance and content-hash indexes.
//! - [`dns`]: the `tidings.` zone over UDP and TCP on loopback, from the same view.
//! - [`api`]: the local API router (v1, v2 blocking, EDS, `/v1/agent/*`, probes, metrics);
//!   [`ui`]: the web dashboard it serves at `/ui`; [`guard`]: the API's `Host` check
//!   (against DNS rebinding) and its rule that runtime registrations name this host's own
//!   addresses unless they bear the operator token.
//! - [`xds`]: the ADS server (gRPC, both variants) for Envoy and proxyless gRPC clients, on
//!   its own loopback listener.
//!
//! Invariants: a failed registry answer changes nothing, and an answer from a registry
//! still warming up only adds and updates entries; registry entries stay until a newer
//! authoritative snapshot (fail static), and an authoritative answer covers every
//! registry-derived entry, disk-cache ones included; an owned row overrides the registry
//! entry while its owner is alive and a tombstone removes it; cached entries are served from
//! the first request and never make a restart shrink the view while the registry is down; a
//! cache file that is oversized (refused unread), foreign, of another version or corrupt is
//! logged, set aside and ignored; one endpoint the registry refuses does not stop the others
//! checking in; the blocking-query index moves only when endpoints change; every answer
//! carries `X-Tidings-Registry-Age-Ms` and `X-Tidings-Source`.

pub mod answers;
pub mod api;
pub mod cache;
pub mod checkin;
pub mod config;
pub mod dns;
pub mod guard;
pub mod metrics;
pub mod replica;
mod run;
pub mod signing;
mod state;
pub mod sync;
pub mod ui;
pub mod view;
pub mod xds;

pub use config::{AGENT_SERVICE, AgentConfig, ConfigError, parse_endpoint_flag};
pub use metrics::Metrics;
pub use run::{AgentError, run};
pub use state::{LocalEndpoints, Shared};
pub use view::{MergedView, Merger, Provenance};
