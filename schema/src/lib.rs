//! Tidings' shared vocabulary: the domain types every other crate speaks.
//!
//! - [`ServiceName`], [`Endpoint`], [`EndpointKey`] and [`Tags`] are the domain model of
//!   docs/ARCHITECTURE.md#schema. Every type validates itself on construction *and* on deserialisation, so
//!   a value of these types is always valid, whichever door (JSON, form, bincode) it came in.
//! - [`api`] holds the JSON shapes of the v1 (lyft/discovery, Envoy v1 SDS) and v2 APIs,
//!   and the parsers that turn request bodies into endpoints.
//! - [`agent_api`] holds the JSON answers of the agent's own routes (`/v1/agent/*`, probes).
//! - [`codec`] is the one place that knows the binary wire format (bincode 2 behind a
//!   version byte, with a size limit), used by gossip and the disk cache.
//! - [`cert`] holds the registry's certificates of agents' gossip keys and the Ed25519 keys
//!   behind them: the registry issues them, gossip checks against them.
//! - [`wire`] names the `x-tidings-*` headers and the tag names components share.
//! - [`ui`] holds what the components' web dashboards share: stylesheet, JS helpers, and
//!   the strict response headers (CSP) they are served with.
//!
//! Invariant: nothing in this crate panics on input from outside the process; every
//! failure is a [`ValidationError`] or a [`codec::CodecError`].

pub mod agent_api;
pub mod api;
pub mod cert;
pub mod codec;
pub mod duration;
pub mod eds;
mod endpoint;
mod error;
mod name;
mod tags;
pub mod timefmt;
pub mod ui;
pub mod wire;

pub use endpoint::{Endpoint, EndpointKey};
pub use error::ValidationError;
pub use name::{BoundedString, RepoName, Revision, ServiceName, TagKey, TagValue};
pub use tags::{MAX_EXTRA_TAGS, Tags, Weight};

#[cfg(test)]
mod tests;
