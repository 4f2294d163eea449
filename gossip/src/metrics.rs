//! Counters the node keeps (shared with the runtime and the agent's `/metrics`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::crypto::OpenError;

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Live counters; cheap to bump from the node task, read from anywhere.
        #[derive(Debug, Default)]
        pub struct Metrics { $(#[doc = $doc] pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct MetricsSnapshot { $(#[doc = $doc] pub $name: u64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl MetricsSnapshot {
            /// Every counter as (name without prefix, help, value), for exporters.
            pub fn each(&self, mut f: impl FnMut(&'static str, &'static str, u64)) {
                $(f(stringify!($name), $doc, self.$name);)*
            }
        }

        impl fmt::Display for MetricsSnapshot {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                $(writeln!(f, "tidings_gossip_{}_total {}", stringify!($name), self.$name)?;)*
                Ok(())
            }
        }
    };
}

counters! {
    packets_in: "UDP packets received.",
    packets_out: "UDP packets sent.",
    bytes_in: "UDP bytes received.",
    bytes_out: "UDP bytes sent.",
    dropped_unknown_key: "Packets or frames no key of the ring could open (or wrong cluster).",
    dropped_truncated: "Packets or frames too short to be sealed messages.",
    dropped_mode: "Sealed traffic in insecure mode, or plaintext traffic with a key.",
    dropped_malformed: "Packets or frames that opened but did not decode.",
    dropped_oversize: "TCP frames whose length prefix exceeded the limit.",
    swim_errors: "Other foca errors (stale or unexpected messages).",
    repair_exchanges: "Repair requests sent after a digest mismatch.",
    repair_rows_applied: "Rows and snapshots learned through repair.",
    repair_failures: "Repair connections that failed or timed out.",
    members_declared_down: "Times SWIM told this node a member went down.",
    rejoins: "Times this node renewed its identity after learning it was declared down.",
    spurious_turn_undead: "foca 'you are down' messages to members still alive, not sent.",
}

impl Metrics {
    pub(crate) fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self, e: OpenError) {
        let c = match e {
            OpenError::Truncated => &self.dropped_truncated,
            OpenError::UnknownKey => &self.dropped_unknown_key,
            OpenError::Unsealed | OpenError::Sealed => &self.dropped_mode,
        };
        Self::bump(c, 1);
    }
}

impl MetricsSnapshot {
    /// Every packet or frame dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_unknown_key
            + self.dropped_truncated
            + self.dropped_mode
            + self.dropped_malformed
            + self.dropped_oversize
    }
}
