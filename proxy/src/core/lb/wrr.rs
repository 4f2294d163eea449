//! Weighted round robin (docs/ARCHITECTURE.md#load-balancing): plain rotation from a random start when all
//! weights are equal, an EDF schedule otherwise.

use rand::{Rng, RngExt};

use super::edf::Edf;

#[derive(Debug, Clone)]
pub enum RoundRobin {
    Equal { next: usize, len: usize },
    Weighted { edf: Edf, weights: Vec<f64> },
}

impl RoundRobin {
    /// `weights` of the routable hosts; the rotation starts at a random host so proxies do
    /// not move in lockstep.
    pub fn new(weights: &[u32], rng: &mut impl Rng) -> Self {
        let len = weights.len();
        if weights.windows(2).all(|w| w[0] == w[1]) {
            let next = if len == 0 {
                0
            } else {
                rng.random_range(0..len)
            };
            return RoundRobin::Equal { next, len };
        }
        let weights: Vec<f64> = weights.iter().map(|&w| f64::from(w.max(1))).collect();
        RoundRobin::Weighted {
            edf: Edf::new(&weights),
            weights,
        }
    }

    pub fn pick(&mut self) -> Option<usize> {
        match self {
            RoundRobin::Equal { len: 0, .. } => None,
            RoundRobin::Equal { next, len } => {
                let i = *next % *len;
                *next = (i + 1) % *len;
                Some(i)
            }
            RoundRobin::Weighted { edf, weights } => edf.pick(|i| weights[i]),
        }
    }
}
