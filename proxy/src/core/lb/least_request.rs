//! Least request (docs/ARCHITECTURE.md#load-balancing). Equal weights: power of two choices over distinct
//! random hosts. Unequal weights: EDF with `weight / (active + 1) ^ bias`, the weight read at
//! every re-queue so busy hosts fall back at once.

use rand::{Rng, RngExt};

use super::edf::Edf;

/// Envoy's default `active_request_bias`.
pub const DEFAULT_BIAS: f64 = 1.0;

/// Envoy's effective weight of a host for weighted least request.
pub fn effective_weight(weight: u32, active: u32, bias: f64) -> f64 {
    f64::from(weight.max(1)) / (f64::from(active) + 1.0).powf(bias)
}

/// Power of two choices: two distinct random hosts, the one with fewer active requests
/// (the first on a tie). `active[i]` is host i's in-flight count.
pub fn p2c(active: &[u32], rng: &mut impl Rng) -> Option<usize> {
    p2c_with(active.len(), |i| active[i], rng)
}

/// [`p2c`] over `n` hosts whose in-flight counts `active(i)` gives (no slice needed).
pub fn p2c_with(n: usize, active: impl Fn(usize) -> u32, rng: &mut impl Rng) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        n => {
            let a = rng.random_range(0..n);
            // Second draw over the other n-1 hosts, shifted past `a`, so the two are distinct.
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            Some(if active(b) < active(a) { b } else { a })
        }
    }
}

/// Weighted least request over a schedule built for the current host set.
#[derive(Debug, Clone)]
pub struct WeightedLeastRequest {
    edf: Edf,
}

impl WeightedLeastRequest {
    pub fn new(weights: &[u32], active: &[u32], bias: f64) -> Self {
        let w: Vec<f64> = weights
            .iter()
            .zip(active)
            .map(|(&w, &a)| effective_weight(w, a, bias))
            .collect();
        WeightedLeastRequest { edf: Edf::new(&w) }
    }

    pub fn pick(&mut self, weights: &[u32], active: &[u32], bias: f64) -> Option<usize> {
        self.pick_with(
            |i| {
                (
                    weights.get(i).copied().unwrap_or(1),
                    active.get(i).copied().unwrap_or(0),
                )
            },
            bias,
        )
    }

    /// [`Self::pick`] reading host i's (weight, active) through `host(i)`.
    pub fn pick_with(&mut self, host: impl Fn(usize) -> (u32, u32), bias: f64) -> Option<usize> {
        self.edf.pick(|i| {
            let (w, a) = host(i);
            effective_weight(w, a, bias)
        })
    }
}
