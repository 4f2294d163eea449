//! Zone-aware routing (docs/ARCHITECTURE.md#load-balancing): send each zone's share of traffic to the local
//! zone as far as its capacity allows, and the overflow to the zones with spare capacity.
//!
//! Percentages are in 1/10000 units, as in Envoy. Index 0 is always the local zone.

use rand::{Rng, RngExt};

/// Envoy's `min_cluster_size`: below this many healthy upstream hosts, zone routing is off.
pub const MIN_CLUSTER_SIZE: u64 = 6;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZonePlan {
    /// Routing is not zone-aware for this pick: any host of any zone.
    AllZones,
    /// The local zone can take all of its share: always local.
    Direct,
    /// Local with probability `local_percent`/10000, else a remote zone in proportion to its
    /// residual capacity (`residual_cum` is cumulative, index 0 = local = 0).
    Residual {
        local_percent: u64,
        residual_cum: Vec<u64>,
    },
}

/// Plans routing from the healthy host counts per zone of the local fleet (the proxies' own
/// service) and of the upstream, both indexed with the local zone first.
pub fn plan(local: &[u64], upstream: &[u64], min_cluster_size: u64) -> ZonePlan {
    let upstream_total: u64 = upstream.iter().sum();
    let local_total: u64 = local.iter().sum();
    if local.len() != upstream.len()
        || upstream.len() < 2
        || upstream_total < min_cluster_size
        || local_total == 0
        || local[0] == 0
        // "All zones on failure": a local zone with no healthy host cannot take anything.
        || upstream[0] == 0
    {
        return ZonePlan::AllZones;
    }
    let share = |n: u64, total: u64| n * 10_000 / total;
    let local_pct: Vec<u64> = local.iter().map(|&n| share(n, local_total)).collect();
    let up_pct: Vec<u64> = upstream.iter().map(|&n| share(n, upstream_total)).collect();
    if up_pct[0] >= local_pct[0] {
        return ZonePlan::Direct;
    }
    let local_percent = up_pct[0] * 10_000 / local_pct[0];
    let mut residual_cum = vec![0u64; up_pct.len()];
    let mut acc = 0;
    for i in 1..up_pct.len() {
        acc += up_pct[i].saturating_sub(local_pct[i]);
        residual_cum[i] = acc;
    }
    ZonePlan::Residual {
        local_percent,
        residual_cum,
    }
}

/// The zone index to pick from, or `None` for "any zone".
pub fn pick_zone(plan: &ZonePlan, rng: &mut impl Rng) -> Option<usize> {
    match plan {
        ZonePlan::AllZones => None,
        ZonePlan::Direct => Some(0),
        ZonePlan::Residual {
            local_percent,
            residual_cum,
        } => {
            if rng.random_range(0..10_000) < *local_percent {
                return Some(0);
            }
            let total = residual_cum.last().copied().unwrap_or(0);
            if total == 0 {
                // Rounding left no residual anywhere: Envoy picks a random zone.
                return Some(rng.random_range(0..residual_cum.len().max(1)));
            }
            let x = rng.random_range(0..total);
            residual_cum.iter().position(|&c| c > x)
        }
    }
}
