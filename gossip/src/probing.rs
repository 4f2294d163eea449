//! How many indirect probes SWIM sends, from the loss this node observes (a Lifeguard-style
//! local health measure, for a knob foca lets us change at run time).
//!
//! A healthy member is suspected when its direct probe fails (ping or ack lost: p_d) and all
//! `k` indirect probes fail too (4 datagrams each, so each fails with p_i = 1 − (1 − p_d)²
//! when every link drops the same share). Every suspicion is gossiped cluster-wide and then
//! refuted cluster-wide, so the cost a node pays is proportional to the suspicions raised in
//! the whole cluster: to keep per-node bandwidth flat in N, the cluster-wide rate must be
//! bounded, i.e. the per-probe probability p_d·p_iᵏ must stay below
//! [`FALSE_SUSPICIONS_PER_PERIOD`] / N. That gives k = ⌈ln(ε / p_d) / ln p_i⌉: 3 (SWIM's
//! and memberlist's default) on a clean network, about 8 at 10 % loss and 24 at 25 % loss
//! for N = 1 000, growing with log N like everything else in SWIM. Indirect probes are only
//! sent after a direct probe failed, so the extra cost is paid only where there is loss.

/// Target for false suspicions raised per probe period across the whole cluster.
pub const FALSE_SUSPICIONS_PER_PERIOD: f64 = 0.05;
/// SWIM's and memberlist's default number of indirect probes: the floor.
pub const MIN_INDIRECT_PROBES: usize = 3;
/// Bounds the burst a node with a broken link of its own can send per probe.
pub const MAX_INDIRECT_PROBES: usize = 32;

/// Weights of one probe outcome in the two moving averages: about the last 16 probes (quick
/// to notice loss) and the last 256 (steady: k is exponential in the estimate's error, and
/// with only ~32 probes behind it one node in a hundred read 10 % loss as 5 % and raised
/// most of the cluster's false suspicions).
const FAST: f64 = 1.0 / 16.0;
const SLOW: f64 = 1.0 / 256.0;

/// The slow average starts as if 5 of 10 probes had failed: a new node assumes a lossy
/// network until its own probes say otherwise. That costs nothing on a clean network
/// (indirect probes are only sent after a direct probe failed) and keeps a node that has
/// seen 20 lucky probes on a lossy one from dropping to k = 3.
const PRIOR_FAILURES: f64 = 5.0;
const PRIOR_PROBES: f64 = 10.0;

/// A decaying average of probe outcomes.
#[derive(Debug, Clone, Copy, Default)]
struct Average {
    failures: f64,
    probes: f64,
}

impl Average {
    fn record(&mut self, failed: bool, alpha: f64) {
        self.failures = self.failures * (1.0 - alpha) + f64::from(u8::from(failed));
        self.probes = self.probes * (1.0 - alpha) + 1.0;
    }

    fn rate(&self) -> f64 {
        self.failures / self.probes.max(1.0)
    }
}

/// This node's record of its direct probes (ping → ack within `probe_rtt`).
#[derive(Debug, Clone)]
pub struct ProbeHealth {
    fast: Average,
    slow: Average,
}

impl Default for ProbeHealth {
    fn default() -> Self {
        ProbeHealth {
            fast: Average::default(),
            slow: Average {
                failures: PRIOR_FAILURES,
                probes: PRIOR_PROBES,
            },
        }
    }
}

impl ProbeHealth {
    pub fn record(&mut self, failed: bool) {
        self.fast.record(failed, FAST);
        self.slow.record(failed, SLOW);
    }

    /// The estimated probability that a direct probe fails: the higher of the two averages,
    /// so loss is noticed within seconds and forgotten over minutes.
    pub fn direct_failure(&self) -> f64 {
        self.fast.rate().max(self.slow.rate())
    }

    /// How many indirect probes keep false suspicions in a cluster of `cluster_size` within
    /// target (see the module docs).
    pub fn indirect_probes(&self, cluster_size: u32) -> usize {
        indirect_probes_for(self.direct_failure(), cluster_size)
    }
}

/// k = ⌈ln(ε / p_d) / ln p_i⌉ with ε = target / N and p_i = 1 − (1 − p_d)², clamped.
pub fn indirect_probes_for(direct_failure: f64, cluster_size: u32) -> usize {
    if direct_failure.is_nan() {
        return MIN_INDIRECT_PROBES;
    }
    let p_d = direct_failure.clamp(0.0, 1.0);
    let eps = FALSE_SUSPICIONS_PER_PERIOD / f64::from(cluster_size.max(1));
    let p_i = 1.0 - (1.0 - p_d).powi(2);
    if p_d <= eps || p_i <= 0.0 {
        return MIN_INDIRECT_PROBES;
    }
    if p_i >= 1.0 {
        return MAX_INDIRECT_PROBES;
    }
    let k = ((eps / p_d).ln() / p_i.ln()).ceil();
    // `k` is finite and positive here; the cast saturates anyway.
    (k as usize).clamp(MIN_INDIRECT_PROBES, MAX_INDIRECT_PROBES)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// p_d for a per-datagram loss rate: ping and ack must both arrive.
    fn p_d(loss: f64) -> f64 {
        1.0 - (1.0 - loss).powi(2)
    }

    #[test]
    fn clean_networks_keep_swims_default() {
        assert_eq!(indirect_probes_for(0.0, 1000), 3);
        assert_eq!(indirect_probes_for(p_d(0.001), 1000), 3);
        // A new node assumes loss until its probes say otherwise, then settles on 3.
        let mut h = ProbeHealth::default();
        assert!(h.indirect_probes(1000) > 20);
        for _ in 0..1500 {
            h.record(false);
        }
        assert_eq!(h.indirect_probes(1000), 3);
    }

    #[test]
    fn loss_and_cluster_size_raise_the_count() {
        assert_eq!(indirect_probes_for(p_d(0.10), 1000), 8);
        assert_eq!(indirect_probes_for(p_d(0.25), 1000), 24);
        assert!(indirect_probes_for(p_d(0.10), 100) < indirect_probes_for(p_d(0.10), 10_000));
        assert_eq!(indirect_probes_for(1.0, 1000), MAX_INDIRECT_PROBES);
        assert_eq!(indirect_probes_for(f64::NAN, 1000), MIN_INDIRECT_PROBES);
    }

    #[test]
    fn the_count_keeps_false_suspicions_within_target() {
        for loss in [0.02, 0.05, 0.1, 0.2, 0.25] {
            for n in [100u32, 1000, 10_000] {
                let k = indirect_probes_for(p_d(loss), n);
                let p_i = 1.0 - (1.0 - loss).powi(4);
                let cluster_rate = f64::from(n) * p_d(loss) * p_i.powi(k as i32);
                if k < MAX_INDIRECT_PROBES {
                    assert!(
                        cluster_rate <= FALSE_SUSPICIONS_PER_PERIOD * 1.0001,
                        "loss {loss} n {n} k {k}: {cluster_rate}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_estimate_follows_observed_outcomes() {
        let mut h = ProbeHealth::default();
        for i in 0..2000 {
            h.record(i % 5 == 0);
        }
        assert!(
            (h.direct_failure() - 0.2).abs() < 0.03,
            "{}",
            h.direct_failure()
        );
        // Loss is noticed within a few probes...
        let mut sick = ProbeHealth::default();
        for _ in 0..1500 {
            sick.record(false);
        }
        for _ in 0..8 {
            sick.record(true);
        }
        assert!(sick.direct_failure() > 0.3, "{}", sick.direct_failure());
        // ...and forgotten over minutes.
        for _ in 0..60 {
            h.record(false);
        }
        assert!(h.direct_failure() > 0.1, "{}", h.direct_failure());
        for _ in 0..2000 {
            h.record(false);
        }
        assert!(h.direct_failure() < 0.01, "{}", h.direct_failure());
    }
}
