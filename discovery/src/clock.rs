//! The registry's wall clock, injected so expiry, self-preservation and warm-up can be tested
//! by moving time by hand instead of sleeping.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Milliseconds since the Unix epoch. Stored check-in times come from this clock, so every
/// registry replica sharing a DynamoDB table should run NTP-synchronised clocks.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;

    /// Milliseconds since a fixed point of this process, moving only forward: for spans the
    /// process measures on itself (how long it has been warming up), which must not end early
    /// or late because the wall clock was stepped. Defaults to the wall reading.
    fn elapsed_ms(&self) -> u64 {
        self.now_ms()
    }
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        schema::timefmt::unix_ms_now()
    }

    fn elapsed_ms(&self) -> u64 {
        static BASE: OnceLock<Instant> = OnceLock::new();
        let base = BASE.get_or_init(Instant::now);
        u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to: tests set or advance it ([`ManualClock::advance`]
/// moves time; [`ManualClock::step_wall`] steps only the wall reading, as NTP would).
#[derive(Debug, Default)]
pub struct ManualClock {
    elapsed: AtomicU64,
    wall_step: AtomicI64,
}

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        ManualClock {
            elapsed: AtomicU64::new(start_ms),
            wall_step: AtomicI64::new(0),
        }
    }

    pub fn set_ms(&self, ms: u64) {
        self.elapsed.store(ms, Ordering::SeqCst);
        self.wall_step.store(0, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.elapsed.fetch_add(ms, Ordering::SeqCst);
    }

    /// Steps the wall reading by `ms` (either way) without time passing.
    pub fn step_wall(&self, ms: i64) {
        self.wall_step.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        let t = self.elapsed.load(Ordering::SeqCst);
        t.saturating_add_signed(self.wall_step.load(Ordering::SeqCst))
    }

    fn elapsed_ms(&self) -> u64 {
        self.elapsed.load(Ordering::SeqCst)
    }
}
