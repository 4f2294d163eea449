//! Weighted random (envoy-semantics §3.3): each host with probability weight / total.

use rand::{Rng, RngExt};

pub fn pick(weights: &[u32], rng: &mut impl Rng) -> Option<usize> {
    let total: u64 = weights.iter().map(|&w| u64::from(w.max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    for (i, &w) in weights.iter().enumerate() {
        let w = u64::from(w.max(1));
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    None
}
