//! The registry through its HTTP API, driven with `tower::ServiceExt::oneshot` (no sockets)
//! except for `socket`, which runs `serve` on 127.0.0.1:0 with the real client. Time is a
//! `ManualClock` for expiry, warm-up and self-preservation, and paused tokio time for blocking
//! queries: nothing sleeps to wait.

mod auth_limits;
mod auth_scope;
mod blocking;
mod certificates;
mod common;
mod delta;
mod eds;
mod expiry;
mod fuzz;
mod limits;
mod lyft;
mod preservation;
mod signed_catalog;
mod socket;
mod tls;
mod ui;
mod v1;
mod v2;
