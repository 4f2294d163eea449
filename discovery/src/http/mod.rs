//! The registry's IO shell, everything that speaks HTTP: the router and its routes (v1, v2,
//! EDS, ops), the listener ([`serve()`]), the JSON error type ([`errors`]), the caller's address
//! (`caller`), the blocking-query loop ([`blocking`], which the agent reuses), the OpenAPI
//! document and the dashboard ([`ui`]).

pub(crate) mod answers;
pub mod blocking;
pub(crate) mod caller;
pub mod errors;
mod layers;
mod listing_sigs;
pub(crate) mod openapi;
pub mod parts;
pub(crate) mod router;
mod routes_eds;
mod routes_ops;
mod routes_v1;
mod routes_v2;
pub(crate) mod server;
pub mod ui;

pub use server::serve;
