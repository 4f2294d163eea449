//! The proxy's sans-IO decision cores: pure functions and state machines, driven by the
//! shells in `crate::io` (through `crate::cluster`) with an injected clock and random source,
//! and tested without sockets.
//!
//! - [`health`]: the active health-check state machine.
//! - [`merge`]: discovery × health → route/hold/drain/remove, and the panic threshold.
//! - [`outlier`]: passive ejection.
//! - [`lb`]: round robin, least request, random, ring hash, Maglev, zone-aware routing.
//! - [`retry`]: retry policy, back-off and budget.
//! - [`breaker`]: circuit breakers.
//! - [`policy`]: the request policy both request paths share: local answers, attempt
//!   classification, the retry decision.

pub mod breaker;
pub mod health;
pub mod lb;
pub mod merge;
pub mod outlier;
pub mod policy;
pub mod retry;
