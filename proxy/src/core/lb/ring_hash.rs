//! Ring hash / Ketama (docs/ARCHITECTURE.md#load-balancing): every host owns points `xxh64("<key>_<i>")` in
//! proportion to its weight; a request goes to the first point at or after its hash.

use xxhash_rust::xxh64::xxh64;

pub const MIN_RING_SIZE: u64 = 1024;
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Ring {
    /// Sorted by hash: (point, host index).
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// `hosts` as (hash key, weight). Sizing follows Envoy: scale so that the lightest host
    /// gets at least its share of `min_size` points, capped at `max_size`.
    pub fn build(hosts: &[(String, u32)], min_size: u64, max_size: u64) -> Self {
        let total: f64 = hosts.iter().map(|(_, w)| f64::from((*w).max(1))).sum();
        if hosts.is_empty() || total <= 0.0 {
            return Ring { points: Vec::new() };
        }
        let norm: Vec<f64> = hosts
            .iter()
            .map(|(_, w)| f64::from((*w).max(1)) / total)
            .collect();
        let min_norm = norm.iter().copied().fold(f64::INFINITY, f64::min);
        let scale = ((min_norm * min_size as f64).ceil() / min_norm).min(max_size as f64);
        let mut points = Vec::with_capacity(scale as usize + hosts.len());
        let (mut current, mut target) = (0.0f64, 0.0f64);
        for (idx, ((key, _), w)) in hosts.iter().zip(&norm).enumerate() {
            target += scale * w;
            let mut i = 0u64;
            while current < target {
                points.push((xxh64(format!("{key}_{i}").as_bytes(), 0), idx));
                i += 1;
                current += 1.0;
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    pub fn pick(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let at = self.points.partition_point(|&(h, _)| h < hash);
        let (_, idx) = self.points[if at == self.points.len() { 0 } else { at }];
        Some(idx)
    }
}
