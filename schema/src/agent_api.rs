//! The JSON answers of the agent's own routes (`/v1/agent/*`, `/live`, `/ready`;
//! docs/API.md#agent-api). The agent builds them and the CLI, the demo and the end-to-end tests
//! read them, so both sides share one definition.
//!
//! Fields are declared in alphabetical order: the answers were first built as JSON maps,
//! which serialise their keys sorted, and the wire bytes stay as they were.

use serde::{Deserialize, Serialize, Serializer};

use crate::api::V1Host;

/// `GET /v1/agent/members`: the gossip members the agent knows, itself first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub members: Vec<Member>,
}

/// One gossip member: its address and incarnation, and whether SWIM holds it alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub addr: String,
    pub bump: u32,
    pub epoch: u64,
    /// True for the agent that answered.
    #[serde(rename = "self")]
    pub is_self: bool,
    pub state: MemberState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Down,
}

impl MemberState {
    /// As it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Down => "down",
        }
    }
}

/// `GET /v1/agent/self`: who the agent is and how fresh its view is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSelf {
    pub cache: CacheState,
    pub endpoints: Vec<LocalEndpoint>,
    pub epoch: u64,
    pub gossip_addr: String,
    pub host_ip: String,
    /// The registry URL(s) as configured; `None` for an agent without a registry.
    pub registry: Option<String>,
    /// As the `x-tidings-registry-age-ms` header; `None` when never current.
    pub registry_age_ms: Option<u64>,
    /// The digest (docs/API.md#the-digest) of the registry catalog the agent last took,
    /// whole or rebuilt from deltas; `None` before the first.
    #[serde(default)]
    pub registry_digest: Option<String>,
    pub registry_ok: bool,
    pub view: ViewSummary,
    pub zone: Option<String>,
}

/// The disk cache as `/v1/agent/self` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheState {
    /// Hosts served from the cache that live data has not confirmed yet.
    pub entries_pending: usize,
    /// The view index last written to disk: equal to `view.index` once the cache is current.
    pub stored_index: u64,
}

/// One endpoint this host serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEndpoint {
    pub addr: String,
    pub service: String,
}

/// The merged view in numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewSummary {
    pub hosts: usize,
    pub index: u64,
    pub services: usize,
    /// `registry`, `gossip` or `cache`, as the `x-tidings-source` header.
    pub source: String,
}

/// `GET /v1/agent/endpoints` (and the answer of `DELETE`): this host's endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEndpoints {
    #[serde(serialize_with = "hosts_sorted")]
    pub endpoints: Vec<V1Host>,
}

/// Each host with its keys sorted, as this answer has always had them (unlike the v1
/// listing, which keeps [`V1Host`]'s declared order).
fn hosts_sorted<S: Serializer>(hosts: &[V1Host], s: S) -> Result<S::Ok, S::Error> {
    let values = hosts
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(serde::ser::Error::custom)?;
    values.serialize(s)
}

/// `GET /live`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    pub status: String,
}

impl Live {
    pub fn new() -> Self {
        Live {
            status: "live".to_string(),
        }
    }
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

/// `GET /ready` while the agent is not draining: always ready, with the view's size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub hosts: usize,
    pub status: String,
}

impl Ready {
    pub fn new(hosts: usize) -> Self {
        Ready {
            hosts,
            status: "ready".to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
