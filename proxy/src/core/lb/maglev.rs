//! Maglev (docs/ARCHITECTURE.md#load-balancing): a prime-sized lookup table that every host fills from its own
//! permutation, in turns weighted by its normalised weight. Lookup is `table[hash mod M]`.

use xxhash_rust::xxh64::xxh64;

/// Envoy's default table size (prime).
pub const TABLE_SIZE: usize = 65_537;

#[derive(Debug, Clone)]
pub struct Maglev {
    table: Vec<usize>,
}

struct Builder {
    idx: usize,
    offset: u64,
    skip: u64,
    weight: f64,
    target: f64,
    next: u64,
}

impl Maglev {
    /// `hosts` as (hash key, weight); `size` must be prime (the caller's config validates it).
    pub fn build(hosts: &[(String, u32)], size: usize) -> Self {
        if hosts.is_empty() || size < 2 {
            return Maglev { table: Vec::new() };
        }
        let m = size as u64;
        let max_w = hosts.iter().map(|(_, w)| (*w).max(1)).max().unwrap_or(1);
        let mut order: Vec<usize> = (0..hosts.len()).collect();
        // Sorting by key makes the table independent of the order discovery listed hosts in.
        order.sort_by(|&a, &b| hosts[a].0.cmp(&hosts[b].0));
        let mut builders: Vec<Builder> = order
            .into_iter()
            .map(|idx| {
                let key = hosts[idx].0.as_bytes();
                Builder {
                    idx,
                    offset: xxh64(key, 0) % m,
                    skip: xxh64(key, 1) % (m - 1) + 1,
                    weight: f64::from(hosts[idx].1.max(1)) / f64::from(max_w),
                    target: 0.0,
                    next: 0,
                }
            })
            .collect();
        let mut table = vec![usize::MAX; size];
        let mut filled = 0;
        let mut iteration = 1u64;
        while filled < size {
            for b in builders.iter_mut() {
                if filled == size {
                    break;
                }
                // A host of the largest weight claims a slot every round, one of a third of
                // it every third round.
                if (iteration as f64) * b.weight < b.target {
                    continue;
                }
                b.target += 1.0;
                let mut c = ((b.offset + b.skip * b.next) % m) as usize;
                while table[c] != usize::MAX {
                    b.next += 1;
                    c = ((b.offset + b.skip * b.next) % m) as usize;
                }
                table[c] = b.idx;
                b.next += 1;
                filled += 1;
            }
            iteration += 1;
        }
        Maglev { table }
    }

    pub fn pick(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        self.table
            .get((hash % self.table.len() as u64) as usize)
            .copied()
    }

    /// How many table slots each host index owns.
    pub fn counts(&self, hosts: usize) -> Vec<usize> {
        let mut c = vec![0; hosts];
        for &i in &self.table {
            if let Some(n) = c.get_mut(i) {
                *n += 1;
            }
        }
        c
    }
}
