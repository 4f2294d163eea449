//! Earliest-deadline-first scheduling, Envoy's engine for weighted round robin and weighted
//! least request: each entry's next deadline is `now + 1/weight`, the earliest is picked and
//! re-queued with a weight read at that moment (so dynamic weights take effect at once).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

#[derive(Debug, Clone)]
struct Entry {
    deadline: f64,
    /// Insertion order breaks ties, so equal deadlines are served first-come.
    seq: u64,
    idx: usize,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.deadline
            .total_cmp(&other.deadline)
            .then(self.seq.cmp(&other.seq))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Edf {
    heap: BinaryHeap<Reverse<Entry>>,
    now: f64,
    seq: u64,
}

impl Edf {
    /// A schedule over `weights.len()` entries; non-positive weights are treated as tiny,
    /// never as "never", so every host keeps a chance.
    pub fn new(weights: &[f64]) -> Self {
        let mut edf = Edf::default();
        for (idx, &w) in weights.iter().enumerate() {
            edf.push(idx, w);
        }
        edf
    }

    fn push(&mut self, idx: usize, weight: f64) {
        let w = if weight.is_finite() && weight > 0.0 {
            weight
        } else {
            1e-6
        };
        self.seq += 1;
        self.heap.push(Reverse(Entry {
            deadline: self.now + 1.0 / w,
            seq: self.seq,
            idx,
        }));
    }

    /// Picks the entry with the earliest deadline and re-queues it with `weight_of(idx)`.
    pub fn pick(&mut self, weight_of: impl Fn(usize) -> f64) -> Option<usize> {
        let Reverse(e) = self.heap.pop()?;
        self.now = e.deadline;
        self.push(e.idx, weight_of(e.idx));
        Some(e.idx)
    }
}
