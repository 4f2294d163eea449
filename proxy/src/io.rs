//! The proxy's IO shells: they own sockets, tasks and timers, and apply what `crate::core`
//! decides.
//!
//! - `server`: the traffic listeners (TLS, HTTP/1.1 and HTTP/2, drain).
//! - Two request paths under one policy (`attempts`): `forward` (hyper, any request) and
//!   `h1` (the HTTP/1.1 fast path, its codec and raw upstream exchange).
//! - `tcp`: TCP listeners, connected by the same attempt loop, bytes copied both ways.
//! - `upstream`: dialling and the keep-alive pool.
//! - `checker`: one active health-check task per host.
//! - [`membership`]: the blocking-query watch of each cluster's source.
//! - `admin` (with its dashboard, `admin_ui`): `/live`, `/ready`, `/metrics`, `/clusters`.
//! - [`tls`]: server and upstream TLS configuration.

pub(crate) mod admin;
mod admin_ui;
pub(crate) mod attempts;
pub(crate) mod checker;
pub mod forward;
pub(crate) mod h1;
pub mod membership;
pub(crate) mod server;
pub(crate) mod tcp;
pub mod tls;
pub(crate) mod upstream;
