//! The names Tidings puts on the wire outside JSON bodies: its `x-tidings-*` response
//! headers and the tag names more than one component reads (docs/API.md lists both). Every
//! crate uses these constants, so a rename is one edit and a typo is a compile error.

/// Registry and agent: the content index of the answer, to pass back as `?index=`.
pub const HEADER_INDEX: &str = "x-tidings-index";
/// Registry: `true` when the answer comes from the last good read because the store failed.
pub const HEADER_STALE: &str = "x-tidings-stale";
/// Registry: `true` while it is warming up after an empty start (the answer may miss hosts).
pub const HEADER_WARMING: &str = "x-tidings-warming";
/// Agent: ms since its registry data was last known current, `-1` if never.
pub const HEADER_REGISTRY_AGE: &str = "x-tidings-registry-age-ms";
/// Agent: `registry`, `gossip` or `cache`, the weakest provenance among the answer's hosts.
pub const HEADER_SOURCE: &str = "x-tidings-source";
/// Proxy: on a 503 from a circuit breaker, which limit overflowed.
pub const HEADER_OVERFLOW: &str = "x-tidings-overflow";

/// The value of a boolean header or string tag that is set.
pub const TRUE: &str = "true";

/// Tag names with a meaning to Tidings, Envoy or the proxy; any other tag is free-form.
pub mod tag {
    /// The zone, for zone-aware load balancing.
    pub const AZ: &str = "az";
    pub const REGION: &str = "region";
    pub const INSTANCE_ID: &str = "instance_id";
    /// `true` marks a canary host (Envoy's `envoy.lb` canary metadata).
    pub const CANARY: &str = "canary";
    /// 1..=100, as Envoy v1 SDS reads it.
    pub const LOAD_BALANCING_WEIGHT: &str = "load_balancing_weight";
    /// `"true"` on a host the agent lists after its deregistration (`?draining=true`), so a
    /// proxy stops sending it new requests but lets open ones finish.
    pub const DRAINING: &str = "draining";
}
