//! Forward statistics: Chan/Welford moments, lane sums and the pairwise chunk tree.

use super::*;

/// Count, mean and sum of squared deviations of a set of values (a Welford/Chan state).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Moments {
    pub(super) count: usize,
    pub(super) mean: f32,
    pub(super) m2: f32,
}

impl Moments {
    /// Chan's parallel merge; an empty partner leaves the other unchanged.
    #[inline]
    pub(super) fn merge(self, other: Moments) -> Moments {
        if other.count == 0 {
            return self;
        }
        if self.count == 0 {
            return other;
        }
        let count = self.count + other.count;
        let wb = other.count as f32 / count as f32;
        let delta = other.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * wb,
            m2: self.m2 + other.m2 + delta * delta * (self.count as f32 * wb),
        }
    }
}

/// Final statistics of one row: shifted mean `mean - pivot`, mean, rstd.
#[derive(Clone, Copy, Debug)]
pub(super) struct RowStats {
    pub(super) shifted_mean: f32,
    pub(super) mean: f32,
    pub(super) rstd: f32,
}

impl RowStats {
    /// The statistics of an empty row: mean 0, `rstd = 1 / sqrt(eps)` (the f32 nearest to it:
    /// computed in f64 and rounded once, as it involves no data).
    pub(super) fn empty(eps: f32) -> RowStats {
        RowStats {
            shifted_mean: 0.0,
            mean: 0.0,
            rstd: (1.0 / f64::from(eps).sqrt()) as f32,
        }
    }

    pub(super) fn from_moments(m: Moments, pivot: f32, eps: f32) -> RowStats {
        if m.count == 0 {
            return RowStats::empty(eps);
        }
        let var = m.m2 / m.count as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        if rstd.is_nan() || !m.mean.is_finite() || !pivot.is_finite() {
            return RowStats {
                shifted_mean: f32::NAN,
                mean: f32::NAN,
                rstd: f32::NAN,
            };
        }
        RowStats {
            shifted_mean: m.mean,
            mean: pivot + m.mean,
            rstd,
        }
    }
}

/// Lanes of the sums in the inner loops: four independent 8-wide vector accumulators, so that
/// a vector add's latency (3-4 cycles) does not serialize the loop (one accumulator held the
/// f32 forward statistics to one element per cycle, measured with `perf annotate`).
pub(super) const LANES: usize = 32;

/// Folds lane accumulators pairwise in a fixed order: lane `i` with lane `i + n/2`, halving.
#[inline(always)]
pub(super) fn fold_lanes<const N: usize>(mut v: [f32; N]) -> f32 {
    let mut n = N;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// Sum of `f(v)` over `v` with [`LANES`] independent accumulators (vectorizable, and each one
/// sums a 32nd of the values).
#[inline(always)]
pub(super) fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &e) in acc.iter_mut().zip(c) {
            *a += f(e);
        }
    }
    for (a, &e) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(e);
    }
    fold_lanes(acc)
}

/// Pairwise sum of a short slice (per-group sums of per-channel partials).
pub(super) fn pairwise_sum(v: &[f32]) -> f32 {
    if v.len() <= 8 {
        v.iter().fold(0.0, |a, &e| a + e)
    } else {
        let (a, b) = v.split_at(v.len() / 2);
        pairwise_sum(a) + pairwise_sum(b)
    }
}

/// Exact two-pass moments of 1 to [`CHUNK`] values, shifted by `pivot` (compiled for AVX2 too,
/// picked at run time; same operations in the same order, so the same bits).
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
pub(super) fn leaf_moments<T: Element>(x: &[T], pivot: f32, buf: &mut Buf) -> Moments {
    debug_assert!(!x.is_empty() && x.len() <= CHUNK);
    read_f32(x, buf, |v| {
        let mean = lane_sum(v, |e| e - pivot) / v.len() as f32;
        let m2 = lane_sum(v, |e| {
            let d = (e - pivot) - mean;
            d * d
        });
        Moments {
            count: v.len(),
            mean,
            m2,
        }
    })
}

/// Where to cut a slice longer than [`CHUNK`]: half its chunks (rounded down) on the left.
#[inline]
pub(super) fn split_point(len: usize) -> usize {
    (len.div_ceil(CHUNK) / 2) * CHUNK
}

/// Moments of a contiguous run, shifted by `pivot`: a fixed pairwise tree of chunk states,
/// with long halves computed in parallel (the tree, hence the result, does not change).
pub(super) fn run_moments<T: Element>(x: &[T], pivot: f32, buf: &mut Buf) -> Moments {
    if x.len() <= CHUNK {
        return if x.is_empty() {
            Moments::default()
        } else {
            leaf_moments(x, pivot, buf)
        };
    }
    let (a, b) = x.split_at(split_point(x.len()));
    let (ma, mb) = if x.len() >= PAR_MIN {
        rayon::join(
            || run_moments(a, pivot, buf),
            || run_moments(b, pivot, &mut [0.0; CHUNK]),
        )
    } else {
        let ma = run_moments(a, pivot, buf);
        (ma, run_moments(b, pivot, buf))
    };
    ma.merge(mb)
}
