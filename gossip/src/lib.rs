//! Tidings gossip: how agents learn about each other and about every endpoint without the
//! registry (DESIGN.md §5.2, §5.3).
//!
//! - **Membership** is foca (SWIM) over UDP. A node's [`NodeId`] is its gossip address plus
//!   an epoch (fixed per process, growing across restarts) and a bump counter that foca
//!   renews when the node was declared down, so a restarted agent is never ignored as
//!   known-dead. foca's config is `Config::new_lan(n)`, resized as the cluster grows.
//! - **Endpoint rows** ([`rows`]) are owner-written LWW registers keyed
//!   `(owner, service, ip, port)` and ordered by `(owner epoch, seq)`. Merge is the per-key
//!   maximum, so any subset of rows is a valid delta. A row is visible only while its owner is
//!   alive in SWIM; rows of an older epoch of an owner are dropped.
//! - **Registry snapshots** ([`snapshot`]) travel too; per service the newest wins.
//! - **Dissemination**: new rows ride foca custom broadcasts ([`broadcast`]). **Repair**
//!   ([`repair`]): a constant-size digest with a random peer every few seconds, and on
//!   mismatch a TCP exchange of only the owners and snapshots that differ.
//! - **Security** ([`crypto`]): every datagram and frame is sealed with XChaCha20-Poly1305
//!   under a [`KeyRing`], cluster name as associated data; failures are dropped and counted.
//!
//! The core, [`Node`], is sans-IO: no sockets, no clock, no global RNG. Callers pass the time
//! and a seed and carry out its [`Effect`]s. [`runtime`] drives it over tokio sockets;
//! [`sim`] drives many of them in virtual time.
//!
//! Invariants: versions are never reused (an epoch grows across restarts and `seq` grows by
//! one per change); nothing received from the network can panic the node or make it
//! allocate beyond [`node::MAX_DATAGRAM`] / [`node::MAX_FRAME`].

pub mod broadcast;
mod codec;
pub mod config;
pub mod crypto;
mod identity;
pub mod metrics;
pub mod node;
pub mod repair;
pub mod rows;
pub mod runtime;
pub mod sim;
pub mod snapshot;
pub mod view;

pub use codec::{FocaCodec, FocaCodecError};
pub use config::{ConfigError, GossipConfig};
pub use crypto::{KeyError, KeyRing, SecretKey, generate_key};
pub use identity::NodeId;
pub use metrics::{Metrics, MetricsSnapshot};
pub use node::{Effect, Node, Timer};
pub use rows::{Row, RowStatus, Version};
pub use runtime::{GossipHandle, RuntimeError, run};
pub use sim::{SimConfig, SimReport, simulate};
pub use snapshot::{Snapshot, SnapshotEntry};
pub use view::{GossipView, MemberInfo, Source, ViewEntry};
