//! [`Hammer`]: reads every agent all the time, on its own thread, and records every answer
//! that lacks a host it must have — plus any per-round check (e.g. the proxy's routing).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Result, bail, ensure};

use crate::fleet::lookup;
use crate::{START, poll};

/// What every lookup must include: (service, hosts).
pub type Expect = Vec<(&'static str, BTreeSet<String>)>;

/// A check run once per round besides the lookups (e.g. the proxy's routing); `Err` is
/// recorded as a failure.
pub type Check = Box<dyn FnMut() -> Result<()> + Send>;

/// Lookups on every target, all the time: every one must answer 200 with at least the
/// expected hosts of each service.
pub struct Hammer {
    targets: Arc<Mutex<(Vec<String>, Expect)>>,
    stop: Arc<AtomicBool>,
    total: Arc<AtomicU64>,
    rounds: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Hammer {
    pub fn start(targets: Vec<String>, expect: Expect) -> Hammer {
        Hammer::with_check(
            targets,
            expect,
            Duration::from_millis(10),
            Box::new(|| Ok(())),
        )
    }

    /// [`Hammer::start`] that also runs `check` once per round, and pauses `pause` between
    /// rounds.
    pub fn with_check(
        targets: Vec<String>,
        expect: Expect,
        pause: Duration,
        mut check: Check,
    ) -> Hammer {
        let targets = Arc::new(Mutex::new((targets, expect)));
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let rounds = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (t, s, n, r, f) = (
            targets.clone(),
            stop.clone(),
            total.clone(),
            rounds.clone(),
            failures.clone(),
        );
        let t0 = std::time::Instant::now();
        let record = move |p: String| {
            if let Ok(mut f) = f.lock() {
                f.push(format!("{:.1?} in: {p}", t0.elapsed()));
            }
        };
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (list, expect) = t.lock().map(|l| l.clone()).unwrap_or_default();
                for base in list {
                    for (service, want) in &expect {
                        n.fetch_add(1, Ordering::Relaxed);
                        match lookup(&base, service) {
                            Ok(l) if l.hosts.is_superset(want) => {}
                            Ok(l) => record(format!(
                                "{base} {service}: {:?} lacks some of {want:?}",
                                l.hosts
                            )),
                            Err(e) => record(format!("{base} {service}: {e:#}")),
                        }
                    }
                }
                if let Err(e) = check() {
                    record(format!("check: {e:#}"));
                }
                r.fetch_add(1, Ordering::Relaxed);
                // Pacing, not waiting: keep a steady stream without starving the agents.
                std::thread::sleep(pause);
            }
        });
        Hammer {
            targets,
            stop,
            total,
            rounds,
            failures,
            thread: Some(thread),
        }
    }

    /// Replaces the targets; returns once no round on the old list is still running.
    pub fn set_targets(&self, targets: Vec<String>) -> Result<()> {
        if let Ok(mut t) = self.targets.lock() {
            t.0 = targets;
        }
        self.settle()
    }

    /// Raises what every lookup must include (views only ever grow in this test).
    pub fn set_expect(&self, expect: Expect) -> Result<()> {
        if let Ok(mut t) = self.targets.lock() {
            t.1 = expect;
        }
        self.settle()
    }

    /// Returns once two more rounds have completed.
    pub fn settle(&self) -> Result<()> {
        let r0 = self.rounds.load(Ordering::Relaxed);
        poll("the hammer to complete two rounds", START, || {
            (self.rounds.load(Ordering::Relaxed) >= r0 + 2).then_some(())
        })
    }

    /// Keeps watching for `d` (a fault's planned length), failing as soon as a lookup or
    /// check fails rather than at the end.
    pub fn hold(&self, d: Duration) -> Result<()> {
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end {
            if let Some(first) = self.failures.lock().ok().and_then(|f| f.first().cloned()) {
                bail!("while holding for {d:?}: {first}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Lookups so far, and failures so far.
    pub fn counts(&self) -> (u64, usize) {
        let failed = self.failures.lock().map(|f| f.len()).unwrap_or(0);
        (self.total.load(Ordering::Relaxed), failed)
    }

    /// Stops; fails if any lookup or check failed. Returns (lookups, rounds).
    pub fn finish(mut self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        let total = self.total.load(Ordering::Relaxed);
        ensure!(
            failures.is_empty(),
            "{} of {total} lookups/checks failed, first: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        Ok((total, self.rounds.load(Ordering::Relaxed)))
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
