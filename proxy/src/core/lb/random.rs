//! Weighted random (docs/ARCHITECTURE.md#load-balancing): each host with probability weight / total.

use rand::{Rng, RngExt};

pub fn pick(weights: &[u32], rng: &mut impl Rng) -> Option<usize> {
    pick_with(weights.len(), |i| weights[i], rng)
}

/// [`pick`] over `n` hosts whose weights `weight(i)` gives (no slice needed).
pub fn pick_with(n: usize, weight: impl Fn(usize) -> u32, rng: &mut impl Rng) -> Option<usize> {
    let total: u64 = (0..n).map(|i| u64::from(weight(i).max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    for i in 0..n {
        let w = u64::from(weight(i).max(1));
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    None
}
