//! An L2 model: least-recently-used over 32-byte sectors, by reuse (stack) distance.

use std::collections::HashMap;

/// A Fenwick tree over access times: 1 where an access is the latest of its sector.
struct Fenwick(Vec<i64>);

impl Fenwick {
    fn add(&mut self, mut i: usize, v: i64) {
        i += 1;
        while i < self.0.len() {
            self.0[i] += v;
            i += i & i.wrapping_neg();
        }
    }
    fn prefix(&self, mut i: usize) -> i64 {
        // sum over [0, i)
        let mut s = 0;
        while i > 0 {
            s += self.0[i];
            i &= i - 1;
        }
        s
    }
}

/// Replays `accesses` (sector ids, in order) through a fully associative LRU cache of
/// `capacity` sectors; returns, per access, whether it hits. An access hits when fewer than
/// `capacity` distinct other sectors were touched since the same sector's last access (the
/// exact LRU condition).
pub fn lru_hits(accesses: &[u64], capacity: u64) -> Vec<bool> {
    let mut last: HashMap<u64, usize> = HashMap::new();
    let mut tree = Fenwick(vec![0; accesses.len() + 1]);
    let mut hits = Vec::with_capacity(accesses.len());
    for (t, &s) in accesses.iter().enumerate() {
        match last.insert(s, t) {
            Some(p) => {
                let distinct_since = tree.prefix(t) - tree.prefix(p + 1);
                hits.push((distinct_since as u64) < capacity);
                tree.add(p, -1);
            }
            None => hits.push(false),
        }
        tree.add(t, 1);
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::lru_hits;

    /// A naive LRU list, to hold the stack-distance version to.
    fn naive(accesses: &[u64], capacity: usize) -> Vec<bool> {
        let mut list: Vec<u64> = Vec::new();
        accesses
            .iter()
            .map(|&s| {
                let hit = if let Some(i) = list.iter().position(|&x| x == s) {
                    list.remove(i);
                    true
                } else {
                    false
                };
                list.insert(0, s);
                list.truncate(capacity);
                hit
            })
            .collect()
    }

    #[test]
    fn matches_a_naive_lru_list() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for capacity in [1usize, 2, 3, 7, 16] {
            let accesses: Vec<u64> = (0..2000)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state % 24
                })
                .collect();
            assert_eq!(
                lru_hits(&accesses, capacity as u64),
                naive(&accesses, capacity)
            );
        }
        // a stream twice over a cache one sector too small misses everything (LRU's worst case)
        let stream: Vec<u64> = (0..10).chain(0..10).collect();
        assert!(lru_hits(&stream, 9).iter().all(|h| !h));
        assert!(lru_hits(&stream, 10)[10..].iter().all(|&h| h));
    }
}
