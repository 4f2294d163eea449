//! Counters the node keeps (shared with the runtime and the agent's `/metrics`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::crypto::OpenError;
use crate::sign::Reject;

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
                let mut out = Ok(());
                self.each_labeled(|name, label, _, value| {
                    let label = label.map_or(String::new(), |(k, v)| format!("{{{k}=\"{v}\"}}"));
                    out = out.and_then(|()| writeln!(f, "tidings_gossip_{name}_total{label} {value}"));
                });
                out
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
    dropped_oversize: "UDP packets over the size limit, repair TCP chunks or frames over theirs.",
    dropped_bad_stream: "Repair TCP streams closed for a wrong preamble (an older or foreign peer) or a chunk out of order or malformed.",
    tcp_timeouts: "Repair TCP connections closed for a stalled frame or idleness.",
    tcp_evicted: "Repair TCP connections not yet authenticated, closed to make room at the connection cap.",
    tcp_refused: "Repair TCP connections refused at the cap because every open one was authenticated.",
    tcp_accept_errors: "Failed accepts on the repair TCP listener (for instance out of file descriptors).",
    repair_sessions_busy: "Repair sessions not started, or refused, because max_repair_sessions were in progress.",
    repair_sessions_served: "Repair requests from peers answered over TCP.",
    swim_errors: "Other foca errors (stale or unexpected messages).",
    repair_exchanges: "Repair requests sent after a digest mismatch.",
    repair_rows_applied: "Rows and snapshots learned through repair.",
    repair_failures: "Repair connections that failed or timed out.",
    members_declared_down: "Times SWIM told this node a member went down.",
    rejoins: "Times this node renewed its identity after learning it was declared down.",
    spurious_turn_undead: "foca 'you are down' messages to members still alive, not sent.",
    snapshots_refused_future: "Registry snapshots refused: dated more than max_snapshot_skew_ms ahead of this node's clock.",
    snapshots_refused_inconsistent: "Registry snapshots refused: an entry of another service.",
    views_published: "Times the merged view (rows, snapshots, members) changed and was handed to the agent.",
    rejected_unsigned: "Rows or snapshots dropped: unsigned while signatures are required.",
    rejected_no_certificate: "Signed rows dropped: no certificate known for their owner.",
    rejected_bad_certificate: "Rows or certificates dropped: a certificate not signed by the registry key.",
    rejected_expired_certificate: "Rows or certificates dropped: a certificate past its validity and grace.",
    rejected_bad_signature: "Rows or snapshots dropped: a signature that does not verify.",
    rejected_out_of_scope: "Rows or certificates dropped: owner, endpoint ip or service outside the certificate.",
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

    /// Copies the store's signature refusals (indexed by [`Reject::index`]).
    pub(crate) fn set_rejected(&self, counts: &[u64; Reject::ALL.len()]) {
        for (why, n) in Reject::ALL.iter().zip(counts) {
            let c = match why {
                Reject::Unsigned => &self.rejected_unsigned,
                Reject::NoCertificate => &self.rejected_no_certificate,
                Reject::BadCertificate => &self.rejected_bad_certificate,
                Reject::ExpiredCertificate => &self.rejected_expired_certificate,
                Reject::BadSignature => &self.rejected_bad_signature,
                Reject::OutOfScope => &self.rejected_out_of_scope,
            };
            c.store(*n, Ordering::Relaxed);
        }
    }
}

const REJECTED_HELP: &str = "Rows, snapshots and certificates dropped by signed gossip, by reason (docs/ARCHITECTURE.md#signed-gossip).";

/// Counters that are one series of a labeled family: (field, family, label, value, family
/// help). The flat field names stay for [`MetricsSnapshot::each`].
const FAMILIES: &[(&str, &str, &str, &str, &str)] = &[
    (
        "rejected_unsigned",
        "rejected",
        "reason",
        "unsigned",
        REJECTED_HELP,
    ),
    (
        "rejected_no_certificate",
        "rejected",
        "reason",
        "no_certificate",
        REJECTED_HELP,
    ),
    (
        "rejected_bad_certificate",
        "rejected",
        "reason",
        "bad_certificate",
        REJECTED_HELP,
    ),
    (
        "rejected_expired_certificate",
        "rejected",
        "reason",
        "expired_certificate",
        REJECTED_HELP,
    ),
    (
        "rejected_bad_signature",
        "rejected",
        "reason",
        "bad_signature",
        REJECTED_HELP,
    ),
    (
        "rejected_out_of_scope",
        "rejected",
        "reason",
        "out_of_scope",
        REJECTED_HELP,
    ),
    (
        "snapshots_refused_future",
        "snapshots_refused",
        "reason",
        "future",
        "Registry snapshots refused, by reason (future: dated beyond max_snapshot_skew_ms ahead of this node's clock; inconsistent: an entry of another service).",
    ),
    (
        "snapshots_refused_inconsistent",
        "snapshots_refused",
        "reason",
        "inconsistent",
        "Registry snapshots refused, by reason (future: dated beyond max_snapshot_skew_ms ahead of this node's clock; inconsistent: an entry of another service).",
    ),
];

impl MetricsSnapshot {
    /// Every counter as (name without prefix, label, help, value), where counters of a
    /// family share a name and differ by label: `snapshots_refused{reason="future"}` rather
    /// than [`each`](Self::each)'s flat `snapshots_refused_future`.
    pub fn each_labeled(
        &self,
        mut f: impl FnMut(&'static str, Option<(&'static str, &'static str)>, &'static str, u64),
    ) {
        self.each(
            |field, help, value| match FAMILIES.iter().find(|fam| fam.0 == field) {
                Some(&(_, family, label, label_value, family_help)) => {
                    f(family, Some((label, label_value)), family_help, value);
                }
                None => f(field, None, help, value),
            },
        );
    }

    /// Every packet or frame dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_unknown_key
            + self.dropped_truncated
            + self.dropped_mode
            + self.dropped_malformed
            + self.dropped_oversize
            + self.dropped_bad_stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_snapshots_are_one_family_with_a_reason_label() {
        let m = MetricsSnapshot {
            snapshots_refused_future: 3,
            snapshots_refused_inconsistent: 1,
            ..Default::default()
        };
        let text = m.to_string();
        assert!(
            text.contains("tidings_gossip_snapshots_refused_total{reason=\"future\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tidings_gossip_snapshots_refused_total{reason=\"inconsistent\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("tidings_gossip_rejoins_total 0\n"), "{text}");
        for (field, ..) in FAMILIES {
            let mut known = false;
            m.each(|name, _, _| known |= name == *field);
            assert!(known, "{field} is not a counter");
        }
    }
}
