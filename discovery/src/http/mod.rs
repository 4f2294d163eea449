//! The registry's IO shell: what speaks HTTP.

pub mod blocking;
