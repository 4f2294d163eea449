//! Tidings gossip: how agents learn about each other and about every endpoint without the
//! registry (docs/ARCHITECTURE.md#gossip).
//!
//! - **Membership** is foca (SWIM) over UDP. A node's [`NodeId`] is its gossip address plus
//!   an epoch (fixed per process, growing across restarts) and a bump counter that foca
//!   renews when the node was declared down, so a restarted agent is never ignored as
//!   known-dead. foca's config is `Config::new_lan(n)` (periods scaled to the configured
//!   probe period), resized with `set_config` as the cluster grows; periodic gossip is on.
//!   The number of indirect probes follows the loss this node observes ([`probing`]), so
//!   false suspicions, each gossiped cluster-wide, stay rare under loss. foca 2.0.0 tells a
//!   member "you are down" when a suspicion of it ends even if it refuted it; the node drops
//!   that message (see `Node::drop_spurious_turn_undead`).
//! - **Endpoint rows** ([`rows`]) are owner-written `crdts::LWWReg`s keyed
//!   `(owner, service, ip, port)` and ordered by `(owner epoch, seq)`. Merge is the per-key
//!   maximum, so any subset of rows is a valid delta. A row is visible only while its owner is
//!   alive in SWIM; rows of an older epoch of an owner are dropped.
//! - **Registry snapshots** ([`snapshot`]) travel too; per service the newest wins, and one
//!   dated further ahead of the receiver's clock than `max_snapshot_skew_ms` is refused (an
//!   agent's own registry answer: further ahead of what it holds).
//! - **Dissemination** ([`spread`]): new rows and small snapshots travel in packets of
//!   their own, beside SWIM rather than inside foca's: each node that learns one sends it
//!   to 3 random members at once and on every gossip round, λ·⌈log10(N+1)⌉ times in all.
//!   **Repair** ([`repair`]): every repair interval a constant-size digest
//!   exchange with a random peer (down members included, to cross healed partitions); on
//!   mismatch a TCP exchange of only the owners and snapshots that differ. Digests also carry
//!   a few recent down verdicts, so a node that missed one does not show a dead owner's rows.
//! - **Views** ([`view`]): live owned rows ∪ registry snapshot entries (docs/ARCHITECTURE.md#what-the-agent-answers), published by
//!   the runtime on a `tokio::sync::watch` ([`GossipView`]).
//! - **Security** ([`crypto`]): every datagram and frame is sealed with XChaCha20-Poly1305
//!   under a [`KeyRing`], cluster name as associated data; failures are dropped and counted
//!   in [`Metrics`]. On TCP a frame travels as sealed chunks of at most 32 KiB, each
//!   authenticated before the next is read ([`stream`]); the listener bounds connections,
//!   sessions and the time a frame may take (see [`GossipConfig`]).
//!
//! The core, [`Node`], is sans-IO: no sockets, no clock, no global RNG. Callers pass the time
//! and a seed and carry out its [`Effect`]s. [`runtime`] drives it over tokio sockets
//! ([`run`] → [`GossipHandle`]); [`sim`] drives many of them in virtual time ([`simulate`]).
//!
//! Invariants: versions are never reused (the epoch grows across restarts: wall-clock ms at
//! start, or the epoch persisted by the last start + 1 when the clock is behind it, see
//! [`epoch::next_epoch`]; `seq` grows by one per change); nothing
//! received from the network can panic the node or make it allocate beyond
//! [`node::MAX_DATAGRAM`] / [`stream::MAX_SEALED_CHUNK`] before it is authenticated (nor
//! beyond [`node::MAX_FRAME`] after).

pub mod broadcast;
mod codec;
pub mod config;
pub mod crypto;
pub mod epoch;
mod identity;
mod membership;
pub mod metrics;
pub mod node;
mod node_signing;
pub mod owner_key;
pub mod probing;
pub mod repair;
mod repair_tcp;
mod returning;
pub mod rows;
pub mod runtime;
pub mod sign;
pub mod sim;
pub mod snapshot;
pub mod spread;
pub mod stream;
pub mod view;
pub mod view_entries;

pub use codec::{FocaCodec, FocaCodecError};
pub use config::{ConfigError, GossipConfig};
pub use crypto::{KeyError, KeyRing, SecretKey, generate_key};
pub use identity::NodeId;
pub use metrics::{Metrics, MetricsSnapshot};
pub use node::{Effect, Node, Timer};
pub use rows::{Row, RowStatus, Version};
pub use runtime::{GossipHandle, RuntimeError, epoch_now, run, run_with_epoch};
pub use sim::{RegistryLoad, RegistryReport, SimConfig, SimReport, simulate, simulate_registry};
pub use snapshot::{
    LOWER_BOUND_MS, LOWER_BOUNDS_BEFORE_MS, Snapshot, SnapshotEntry, is_lower_bound_date,
};
pub use view::{GossipView, MemberInfo, Source, ViewEntry};
pub use view_entries::{ViewCache, ViewEntries};
