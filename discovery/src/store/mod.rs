//! The storage contract. A store only keeps rows; *policy* (TTL filtering, self-preservation,
//! warm-up, the index) lives in the registry above it, so both stores behave the same and the
//! one conformance suite checks them both. The stores live beside it: [`memory`] (one
//! process), [`dynamo`] (replicas sharing a DynamoDB table), and `conformance` (the suite).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::num::NonZeroU16;

use async_trait::async_trait;
use schema::{Endpoint, ServiceName, ValidationError, Weight};
use thiserror::Error;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod dynamo;
pub mod memory;
pub mod mirror;

pub use crate::decide::tag_merge::{merge_keeps, merge_tags};

/// One stored row: the endpoint as last checked in, when, and the operator's weight override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEndpoint {
    /// As the host last checked it in, with `tags.load_balancing_weight` already replaced by
    /// `weight_override` when one is set.
    pub endpoint: Endpoint,
    /// Registry clock at the last check-in, epoch ms. Never moves backwards.
    pub last_check_in_ms: u64,
    /// Set through `POST /v1/loadbalancing/...`; survives later check-ins.
    pub weight_override: Option<Weight>,
}

/// What a check-in did, so the registry can move its index only on real changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckInOutcome {
    /// Endpoints stored (all of them unless a newer check-in was already there).
    pub accepted: usize,
    /// Services whose membership or tags changed (new endpoint, changed revision or tags).
    /// A plain re-check-in changes nothing and leaves this empty.
    pub changed_services: Vec<ServiceName>,
}

/// Why a store that follows a change stream read its whole table again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RescanReason {
    /// The first sync, or the stream came back after the table had none.
    Start,
    /// The stream no longer held the records the follower needed (trimmed after 24 h, or an
    /// iterator that expired while the store was unreachable).
    Trimmed,
    /// The stream or a shard was gone (`ResourceNotFoundException`), or the table's stream
    /// is another one now (disabled and enabled again: a new ARN).
    StreamChanged,
    /// Stream reads kept failing while the rest answered: a doubt, so read everything again.
    Doubt,
}

impl RescanReason {
    pub const ALL: [RescanReason; 4] = [
        RescanReason::Start,
        RescanReason::Trimmed,
        RescanReason::StreamChanged,
        RescanReason::Doubt,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RescanReason::Start => "start",
            RescanReason::Trimmed => "trimmed",
            RescanReason::StreamChanged => "stream_changed",
            RescanReason::Doubt => "doubt",
        }
    }
}

/// How a store that mirrors a shared table follows its change stream, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowStats {
    /// Reads are answered from the mirror now.
    pub followed: bool,
    pub mirror_rows: u64,
    /// Stream records applied to the mirror.
    pub records_applied: u64,
    pub rescans: Vec<(RescanReason, u64)>,
    /// Age of the newest record applied when it was applied, ms.
    pub lag_ms: u64,
    /// Reads that queried the table, and reads the mirror answered.
    pub table_reads: u64,
    pub mirror_reads: u64,
}

#[derive(Debug, Error)]
pub enum StoreError {
    /// The backend could not be reached or refused the operation (DynamoDB down, throttled
    /// past the retry budget, timed out). Writes answer 503 with `Retry-After`; reads fall
    /// back to the registry's last good cache.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend returned something we cannot interpret (a row written by a foreign tool).
    #[error("corrupt row in store: {0}")]
    Corrupt(String),
    /// The write would store something invalid, which only the stored row could show (a v1
    /// tag merge past the tag limit). The client's fault: the API answers 400.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
}

/// One service's rows, in key order, shared between the store's answers and the registry's
/// views ([`Store::list_all_shared`]).
pub type ServiceRows = std::sync::Arc<[StoredEndpoint]>;

/// `rows` sorted by key and cut into one list per service.
pub fn group_by_service(mut rows: Vec<StoredEndpoint>) -> Vec<ServiceRows> {
    rows.sort_by(|a, b| {
        let (a, b) = (&a.endpoint, &b.endpoint);
        (&a.service, a.ip, a.port).cmp(&(&b.service, b.ip, b.port))
    });
    let mut out = Vec::new();
    let mut rest = rows.as_slice();
    while let Some(first) = rest.first() {
        let len = rest
            .iter()
            .take_while(|r| r.endpoint.service == first.endpoint.service)
            .count();
        let (group, tail) = rest.split_at(len);
        out.push(ServiceRows::from(group));
        rest = tail;
    }
    out
}

/// A registry backend. Implementations must be safe to share between tasks and between
/// registry processes (DynamoDB): every method is a self-contained, idempotent operation.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// What backs this store, for operators (`GET /v1/ops/status`, the dashboard).
    fn kind(&self) -> &'static str {
        "custom"
    }

    /// True when every call finishes the first time it is polled (no IO, nothing awaited):
    /// the registry then runs calls without the store timeout, a timer that could never fire.
    fn answers_at_once(&self) -> bool {
        false
    }

    /// Upserts each endpoint with `last_check_in = now_ms`, never moving an existing
    /// `last_check_in` backwards, keeping any weight override, and merging tags the way
    /// lyft/discovery does not: the new tag set replaces the old one (so tags can be removed),
    /// except the operator's weight override, which is kept separately.
    async fn check_in(
        &self,
        endpoints: &[Endpoint],
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError>;

    /// One v1 check-in, lyft's way: as [`Store::check_in`], except that the stored tags are
    /// *merged* with the new ones — each key in `sent` takes its value from `endpoint.tags`,
    /// every other tag the row has is kept ([`merge_tags`]). The read and the write of the
    /// merge are one atomic step per row: two merges racing (on two registry replicas) both
    /// land. A merge past the tag limit is [`StoreError::Invalid`] and changes nothing.
    async fn check_in_merging_tags(
        &self,
        endpoint: &Endpoint,
        sent: &BTreeSet<String>,
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError>;

    /// Every row of one service, expired or not (the registry filters).
    async fn list_service(&self, service: &ServiceName) -> Result<Vec<StoredEndpoint>, StoreError>;

    /// Every row of every service (the catalog, the sweeper, self-preservation accounting).
    async fn list_all(&self) -> Result<Vec<StoredEndpoint>, StoreError>;

    /// Every row of every service as one shared list per non-empty service: services in name
    /// order, each list in key order. A store that keeps its rows per service answers a
    /// service unchanged since its last call with the same allocation, so the registry can
    /// skip it without comparing rows. The default groups [`Store::list_all`].
    async fn list_all_shared(&self) -> Result<Vec<ServiceRows>, StoreError> {
        Ok(group_by_service(self.list_all().await?))
    }

    /// Every row whose `service_repo_name` is `repo`.
    async fn list_repo(&self, repo: &str) -> Result<Vec<StoredEndpoint>, StoreError>;

    /// Removes the service's rows on `ip` (only the one on `port` when given). Returns how many
    /// were removed; 0 means unknown (the API answers 404).
    async fn deregister(
        &self,
        service: &ServiceName,
        ip: IpAddr,
        port: Option<NonZeroU16>,
    ) -> Result<usize, StoreError>;

    /// Sets the weight override on the service's rows on `ip`, or on every row of the service
    /// when `ip` is `None`. Returns how many rows were updated; 0 means unknown (404).
    async fn set_weight(
        &self,
        service: &ServiceName,
        ip: Option<IpAddr>,
        weight: Weight,
    ) -> Result<usize, StoreError>;

    /// Deletes at most `max` rows whose `last_check_in` is older than `cutoff_ms`, re-checking
    /// the time at delete (conditionally, in DynamoDB) so a row that checked in meanwhile is
    /// kept. Returns how many were deleted.
    async fn delete_expired(&self, cutoff_ms: u64, max: usize) -> Result<usize, StoreError>;

    /// A signal that moves when *other* writers changed what reads return (a store shared
    /// between processes that learns of their writes, as DynamoDB through its stream). The
    /// registry subscribes once and invalidates its read cache and wakes blocking queries on
    /// each move. `None` (the default): the store learns of nothing by itself.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// How the store follows its change stream, when it does (metrics).
    fn follow_stats(&self) -> Option<FollowStats> {
        None
    }
}
