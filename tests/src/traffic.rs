//! Sustained client traffic through a proxy, on its own thread, bounded in count and time:
//! every answer is tallied by the backend that sent it, every failure is kept with the
//! moment it happened, and every latency is recorded for percentiles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{http, poll};

/// What a [`Load`] saw.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: u64,
    /// Answers per backend name (the backends answer with their name).
    pub by_backend: BTreeMap<String, u64>,
    /// (time since the load started, what went wrong).
    pub errors: Vec<(Duration, String)>,
    latencies_us: Vec<u64>,
}

impl Report {
    pub fn total(&self) -> u64 {
        self.ok + self.errors.len() as u64
    }

    /// The `p`-quantile (0..=1) of the latencies, in ms.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        let Some(last) = l.len().checked_sub(1) else {
            return 0.0;
        };
        let idx = ((last as f64) * p.clamp(0.0, 1.0)).round() as usize;
        l[idx.min(last)] as f64 / 1000.0
    }

    /// Fails unless every request succeeded, showing the first failures.
    pub fn ensure_no_errors(&self) -> Result<()> {
        anyhow::ensure!(
            self.errors.is_empty(),
            "clients saw {} errors, first: {:?}",
            self.errors.len(),
            &self.errors[..self.errors.len().min(5)]
        );
        Ok(())
    }

    /// One line: counts and latencies.
    pub fn line(&self) -> String {
        format!(
            "{} requests, {} ok, {} failed, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, per backend {:?}",
            self.total(),
            self.ok,
            self.errors.len(),
            self.percentile_ms(0.50),
            self.percentile_ms(0.99),
            self.percentile_ms(1.0),
            self.by_backend
        )
    }
}

/// GETs to `url` with a `Host` header, one at a time with a short pause between them.
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Report>>,
}

impl Load {
    /// Runs until [`Load::finish`], `max` requests or `within`, whichever comes first.
    pub fn start(url: String, host: String, max: u64, within: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut report = Report::default();
            for _ in 0..max {
                if s.load(Ordering::SeqCst) || t0.elapsed() >= within {
                    break;
                }
                let started = Instant::now();
                let res = http::request_with(
                    "GET",
                    &url,
                    &[("host", &host)],
                    b"",
                    Duration::from_secs(10),
                );
                let took = started.elapsed();
                match res {
                    Ok(r) if r.status == 200 => {
                        report.ok += 1;
                        report.latencies_us.push(took.as_micros() as u64);
                        let body = String::from_utf8_lossy(&r.body).into_owned();
                        *report.by_backend.entry(body).or_default() += 1;
                    }
                    Ok(r) => report.errors.push((
                        t0.elapsed(),
                        format!("{}: {}", r.status, String::from_utf8_lossy(&r.body)),
                    )),
                    Err(e) => report.errors.push((t0.elapsed(), format!("{e:#}"))),
                }
                n.fetch_add(1, Ordering::SeqCst);
                // Pacing, not waiting: a steady stream that leaves the 2 cores to the system
                // under test.
                std::thread::sleep(Duration::from_millis(3));
            }
            report
        });
        Load {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Returns once `n` more requests have been answered (or fails after 30 s).
    pub fn wait_for(&self, n: u64) -> Result<()> {
        let target = self.sent() + n;
        poll(
            &format!("{n} more requests"),
            Duration::from_secs(30),
            || (self.sent() >= target).then_some(()),
        )
    }

    pub fn finish(mut self) -> Result<Report> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .context("load already finished")?
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
