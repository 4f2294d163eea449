//! The registry's decisions, as pure functions of their inputs and an injected clock: expiry,
//! self-preservation and warm-up ([`policy`]), storage quotas ([`quota`]), the tag merge of a
//! partial check-in ([`tag_merge`]) and the operator's status report ([`status`]). Nothing here
//! does IO; `Registry` and the HTTP shell call in.

pub mod policy;
pub mod quota;
pub mod status;
pub mod tag_merge;
