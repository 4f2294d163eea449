//! The Tidings registry (docs/ARCHITECTURE.md#registry): a small, stateless REST service in front of a
//! [`Store`], wire-compatible with lyft/discovery and Envoy v1 SDS, plus v2 batch check-ins and
//! Consul-style blocking queries.
//!
//! The folders show the shape: pure decisions in [`decide`], IO in [`http`], rows in
//! [`store`]; `Registry` (in `registry.rs`) joins them.
//!
//! - [`store`]: the [`Store`] trait every backend implements; [`memory`]: [`MemoryStore`], the
//!   embedded single-process store; [`DynamoStore`] (in [`dynamo`]) for replicas sharing a
//!   table, each answering reads from its mirror of the table ([`store::mirror`]) that the
//!   table's stream keeps current; `conformance`: the suite both pass (feature
//!   `conformance`, tests only).
//! - [`Registry`] (in `registry`): the policy layer over a store — TTL filtering on read,
//!   self-preservation, warm-up, the content-hash index, the single-flight last-good read
//!   cache (`cache`), metrics. Its decisions are pure functions in [`decide`] ([`policy`]:
//!   expiry, self-preservation, the index; [`quota`]; the tag merge; the status report),
//!   driven by an injected [`Clock`].
//! - [`http`]: [`router`] builds the axum router (routes in `http/routes_*.rs`; errors in
//!   [`errors`]; write tokens in [`auth`]); [`serve()`] runs it on a listener with the sweeper
//!   ([`run_sweeper`]) until a shutdown token fires. `GET /v1/ops/status` ([`Status`])
//!   reports warm-up, self-preservation and the last sweep; [`ui`] is the web dashboard at
//!   `/ui`; [`http::blocking`] is the blocking-query loop the agent reuses.
//! - [`delta`]: catalog deltas, sans IO — the digest, the difference of two catalogs, and
//!   [`delta::Replica`], the client's copy that applies them; the registry keeps its recent
//!   catalog views to answer them from (`registry/history.rs`).
//! - [`RegistryClient`] (in [`client`]): the HTTP client the agent and `tidings checkin` use.
//! - [`RegistryConfig`]: every knob, with defaults and `validate()`.
//!
//! Invariants: reads never write (expired rows are filtered on read and deleted only by the
//! sweeper, at a bounded rate); nothing is expired while self-preservation holds; the index
//! moves only when membership, tags or weights change, never on a plain re-check-in; no
//! request can make a handler panic or answer 500 — every error is a JSON
//! `{"error": {"code", "message"}}` with a 4xx or a 503.

// The moto test harness shared with the integration tests names the crate `discovery`.
#[cfg(test)]
extern crate self as discovery;

pub mod auth;
mod cache;
pub mod client;
pub mod clock;
pub mod config;
pub mod decide;
pub mod delta;
pub mod http;
mod metrics;
mod registry;
pub mod store;
mod sweep;

// The paths other crates and the tests have always used.
pub use decide::{policy, quota};
pub use http::{errors, ui};
#[cfg(any(test, feature = "conformance"))]
pub use store::conformance;
pub use store::{dynamo, memory};

pub use auth::{host_token, operator_token, scoped_token};
pub use client::{ClientError, ReadMeta, RegistryClient};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{ConfigError, RegistryConfig};
pub use decide::status::{PreservationStatus, Status, SweepError, SweepStatus};
pub use dynamo::{DynamoConfig, DynamoStore};
pub use errors::ApiError;
pub use http::blocking::BlockingParams;
pub use http::router::router;
pub use http::serve;
pub use memory::MemoryStore;
pub use registry::{Registry, Rows, View, ViewData};
pub use store::{CheckInOutcome, Store, StoreError, StoredEndpoint};
pub use sweep::{SweepReport, run_sweeper};

/// The OpenAPI document served at `/openapi.json`.
pub fn openapi_document() -> serde_json::Value {
    http::openapi::document()
}
