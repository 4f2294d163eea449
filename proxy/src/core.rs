//! The proxy's sans-IO decision cores: pure functions and state machines, driven by the
//! shells in `crate::io` with an injected clock and random source, tested without sockets.

pub mod policy;
