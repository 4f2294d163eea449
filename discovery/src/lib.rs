//! The Tidings registry (DESIGN.md §4).
//!
//! - [`store`]: the [`Store`] trait every backend implements, and its error type.
//!
//! Invariants: reads never write; nothing is expired while self-preservation holds; no
//! request can make a handler panic or answer 500.

pub mod store;

pub use store::{CheckInOutcome, Store, StoreError, StoredEndpoint};
