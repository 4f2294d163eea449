//! What the store and its stream follower share: the [`Mirror`], whether it may answer
//! reads, the change signal and the follower's counters.
//!
//! The mirror answers reads only while it is *fresh*: a rescan filled it and a whole round
//! of stream reads (or the rescan itself) started less than [`Follow::bound`] ago. A
//! follower that cannot read the stream stops renewing that, and reads go back to querying
//! the table, so an old mirror is never served as if it were current. A table call that
//! fails ends freshness at once ([`Follow::suspect`]): DynamoDB is in doubt, and the stream
//! behind it with it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::retry::CALL_DEADLINE;
use crate::store::mirror::{Change, Mirror, Origin};
use crate::store::{FollowStats, RescanReason, StoredEndpoint};

/// How many poll intervals the mirror stays fresh after the start of the last good round
/// (plus one call deadline): a round or two may be slow without falling back to the table.
const FRESH_ROUNDS: u32 = 3;

/// Tombstones outlive this many follower rounds (see [`Mirror::forget_tombstones`]).
const TOMBSTONE_ROUNDS: u64 = 60;

#[derive(Debug, Default)]
struct State {
    mirror: Mirror,
    /// A rescan filled the mirror (and no gap emptied its meaning since).
    synced: bool,
    /// The mirror may answer reads until then.
    fresh_until: Option<Instant>,
    /// When a table call last failed: rounds that started before it do not renew freshness.
    suspected_at: Option<Instant>,
    /// The follower's round, for tombstones.
    round: u64,
}

/// Shared by a [`super::DynamoStore`] (and its clones) and its follower task, which holds it
/// weakly and stops once every store is gone.
#[derive(Debug)]
pub(crate) struct Follow {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    pub(crate) poll: Duration,
    pub(crate) started: AtomicBool,
    /// Test support: the follower replaces its iterators with ones the service refuses.
    spoil: AtomicBool,
    records: AtomicU64,
    rescans: [AtomicU64; RescanReason::ALL.len()],
    lag_ms: AtomicU64,
    table_reads: AtomicU64,
    mirror_reads: AtomicU64,
}

impl Follow {
    pub(crate) fn new(poll: Duration) -> Self {
        Follow {
            state: Mutex::default(),
            changes: watch::Sender::new(0),
            poll,
            started: AtomicBool::new(false),
            spoil: AtomicBool::new(false),
            records: AtomicU64::new(0),
            rescans: Default::default(),
            lag_ms: AtomicU64::new(0),
            table_reads: AtomicU64::new(0),
            mirror_reads: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long a good round keeps the mirror fresh.
    pub(crate) fn bound(&self) -> Duration {
        self.poll * FRESH_ROUNDS + CALL_DEADLINE
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn signal(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// `f` over the mirror when it may answer reads; `None` sends the read to the table.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Mirror) -> T) -> Option<T> {
        self.read_mut(|m| f(m))
    }

    /// [`Follow::read`] for reads that update the mirror's own bookkeeping (its shared lists).
    pub(crate) fn read_mut<T>(&self, f: impl FnOnce(&mut Mirror) -> T) -> Option<T> {
        let mut st = self.state();
        if st.synced && st.fresh_until.is_some_and(|t| Instant::now() < t) {
            self.mirror_reads.fetch_add(1, Ordering::Relaxed);
            Some(f(&mut st.mirror))
        } else {
            self.table_reads.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Whether reads are answered from the mirror now.
    pub(crate) fn fresh(&self) -> bool {
        let st = self.state();
        st.synced && st.fresh_until.is_some_and(|t| Instant::now() < t)
    }

    /// This replica's own write, as DynamoDB answered it (read-your-writes). The registry
    /// signals its own writes; this only keeps the mirror level with them.
    pub(crate) fn echo(&self, change: Change) {
        let mut st = self.state();
        let round = st.round;
        st.mirror.apply(change, Origin::Echo, round);
    }

    /// A table call failed: the mirror answers nothing until a round that starts after now
    /// succeeds.
    pub(crate) fn suspect(&self) {
        let mut st = self.state();
        st.suspected_at = Some(Instant::now());
        st.fresh_until = None;
    }

    /// The follower starts a round of stream reads; returns its number.
    pub(crate) fn next_round(&self) -> u64 {
        let mut st = self.state();
        st.round += 1;
        let round = st.round;
        st.mirror
            .forget_tombstones(round.saturating_sub(TOMBSTONE_ROUNDS));
        round
    }

    /// Records of one stream read, in stream order. `lag_ms`: age of the newest one.
    pub(crate) fn apply(&self, changes: Vec<Change>, lag_ms: Option<u64>) {
        if changes.is_empty() {
            return;
        }
        let n = changes.len() as u64;
        let visible = {
            let mut st = self.state();
            let round = st.round;
            // Every change applies: no short-circuit once one was visible.
            let mut visible = false;
            for c in changes {
                visible |= st.mirror.apply(c, Origin::Stream, round);
            }
            visible
        };
        self.records.fetch_add(n, Ordering::Relaxed);
        if let Some(lag) = lag_ms {
            self.lag_ms.store(lag, Ordering::Relaxed);
        }
        if visible {
            self.signal();
        }
    }

    /// Every stream read of a round that started at `started` succeeded: the mirror holds
    /// every write made before it (give or take the stream's own delay).
    pub(crate) fn round_ok(&self, started: Instant) {
        let mut st = self.state();
        if st.synced && st.suspected_at.is_none_or(|s| s < started) {
            st.fresh_until = Some(started + self.bound());
        }
    }

    /// A rescan is about to read the table (its stream iterators are already taken).
    pub(crate) fn begin_scan(&self) {
        self.state().mirror.begin_scan();
    }

    /// The rescan that started at `started` read `rows`: the mirror is those, and fresh.
    pub(crate) fn finish_scan(
        &self,
        rows: Vec<(StoredEndpoint, u64)>,
        started: Instant,
        reason: RescanReason,
    ) {
        let visible = {
            let mut st = self.state();
            let round = st.round;
            let visible = st.mirror.finish_scan(rows, round);
            st.synced = true;
            if st.suspected_at.is_none_or(|s| s < started) {
                st.fresh_until = Some(started + self.bound());
            }
            visible
        };
        self.rescans[reason as usize].fetch_add(1, Ordering::Relaxed);
        if visible {
            self.signal();
        }
    }

    /// The stream cannot be followed (none on the table, or lost until a rescan): reads go
    /// to the table.
    pub(crate) fn unfollowed(&self) {
        let mut st = self.state();
        st.synced = false;
        st.fresh_until = None;
    }

    /// Test support: makes the follower's next round read with spoilt iterators (a gap).
    #[cfg(any(test, feature = "conformance"))]
    pub(crate) fn spoil_iterators(&self) {
        self.spoil.store(true, Ordering::Relaxed);
    }

    /// Whether the iterators are to be spoilt now (once per [`Follow::spoil_iterators`]).
    pub(crate) fn take_spoil(&self) -> bool {
        self.spoil.swap(false, Ordering::Relaxed)
    }

    /// A table read that did not go through the mirror (the sweeper's scan).
    pub(crate) fn count_table_read(&self) {
        self.table_reads.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> FollowStats {
        let (followed, rows) = {
            let st = self.state();
            let fresh = st.synced && st.fresh_until.is_some_and(|t| Instant::now() < t);
            (fresh, st.mirror.len())
        };
        FollowStats {
            followed,
            mirror_rows: rows as u64,
            records_applied: self.records.load(Ordering::Relaxed),
            rescans: RescanReason::ALL
                .iter()
                .map(|r| (*r, self.rescans[*r as usize].load(Ordering::Relaxed)))
                .collect(),
            lag_ms: self.lag_ms.load(Ordering::Relaxed),
            table_reads: self.table_reads.load(Ordering::Relaxed),
            mirror_reads: self.mirror_reads.load(Ordering::Relaxed),
        }
    }
}
