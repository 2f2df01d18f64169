//! Forward statistics: Chan/Welford moments, lane sums and the pairwise chunk tree.

use super::*;

/// Count, mean and sum of squared deviations of a set of values (a Welford/Chan state).
///
/// The (shifted) mean is an f64: a leaf's is its f32 sum divided in f64, and merges keep it
/// there, so that it is not rounded to f32 before [`centre`] splits `pivot + mean` into the
/// two floats the normalization subtracts. Rounded to f32, it carried half an ulp of itself
/// into every output: an error that grows with how far the pivot (the row's first value) lies
/// from the mean, 2.5e-6 at 60 standard deviations, over the f16/bf16 outputs' `1e-6` near
/// zero (`half_statistics_with_far_pivots`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Moments {
    pub(super) count: usize,
    pub(super) mean: f64,
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
        // counts are slice lengths (at most isize::MAX): through i64, each conversion is one
        // instruction instead of the unsigned sequence, with the same value
        let f = |n: usize| n as i64 as f64;
        let wb = f(other.count) / f(count);
        let delta = other.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * wb,
            m2: self.m2 + other.m2 + (delta * delta * (f(self.count) * wb)) as f32,
        }
    }
}

/// Final statistics of one row: mean, rstd, and the residual `(pivot + shifted mean) - mean`
/// the f32 mean rounded away ([`centre`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct RowStats {
    pub(super) mean: f32,
    pub(super) rstd: f32,
    pub(super) residual: f32,
}

/// The centre the normalization subtracts, as two floats: `pivot + shifted_mean` rounded to f32
/// (the saved mean) and what that rounding dropped, so that `hi + lo` is the centre to about
/// 2^-48 of it. `y = (x - hi) * a + (b - lo * a)` ([`shift_of`]) then subtracts the whole
/// centre: `x - hi` is exact where `x` is within a factor two of `hi` (offset rows) and
/// otherwise rounds relative to `x - hi`, and `lo` folds into the per-channel shift, so a
/// row's offset costs nothing (docs/design.md, "Accuracy targets") and each value takes one subtraction, one product and one sum.
#[inline]
pub(super) fn centre(pivot: f32, shifted_mean: f64) -> (f32, f32) {
    let c = f64::from(pivot) + shifted_mean;
    let hi = c as f32;
    (hi, (c - f64::from(hi)) as f32)
}

/// The per-channel shift `b - lo * a` of [`centre`]'s form, in f32: `lo` is at most half an
/// ulp of the centre, so `lo * a` is at most half an ulp of `centre * a` and its rounding is
/// far below the final `+ shift`'s (and `lo = 0`, every row without an offset to speak of,
/// gives `b` exactly).
#[inline]
pub(super) fn shift_of(bias: f32, lo: f32, scale: f32) -> f32 {
    bias - lo * scale
}

impl RowStats {
    /// The statistics of an empty row: mean 0, `rstd = 1 / sqrt(eps)` (the f32 nearest to it:
    /// computed in f64 and rounded once, as it involves no data).
    pub(super) fn empty(eps: f32) -> RowStats {
        RowStats {
            mean: 0.0,
            rstd: (1.0 / f64::from(eps).sqrt()) as f32,
            residual: 0.0,
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
                mean: f32::NAN,
                rstd: f32::NAN,
                residual: f32::NAN,
            };
        }
        let (mean, residual) = centre(pivot, m.mean);
        RowStats {
            mean,
            rstd,
            residual,
        }
    }
}

/// Lanes of the sums in the inner loops: four independent 8-wide vector accumulators, so that
/// a vector add's latency (3-4 cycles) does not serialize the loop (one accumulator held the
/// f32 forward statistics to one element per cycle, measured with `perf annotate`).
pub(super) const LANES: usize = 32;

/// Sum of `f(v)` over `v` with [`LANES`] independent accumulators (vectorizable, and each one
/// sums a 32nd of the values): lane `i` takes values `i, i + 32, ...`; the lanes are then folded
/// pairwise ([`fold_lanes`]), and the last `len % 32` values, summed in order, added last.
#[inline(always)]
pub(super) fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [[0f32; 8]; LANES / 8];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        add_lanes(&mut acc, c, &f);
    }
    let rest = chunks.remainder().iter().fold(0f32, |a, &e| a + f(e));
    fold_lanes(&acc) + rest
}

/// Adds `f` of `8 * R` values into accumulators held as rows of eight lanes.
///
/// How these loops are written decides whether LLVM keeps each row in one vector register
/// (checked in the assembly of the AVX2 copies): a flat 16- or 32-lane array, a computed lane
/// index in a remainder loop, three sums fused in one loop, or a fold of the lanes inlined
/// after the loop each made it pair the lanes two by two (vmovsd/vinsertps), or keep them in
/// memory. Rows of eight, the remainder summed apart and the fold out of line
/// ([`fold_lanes`]) keep them in ymm registers.
#[inline(always)]
pub(super) fn add_lanes<const R: usize>(
    acc: &mut [[f32; 8]; R],
    v: &[f32],
    f: impl Fn(f32) -> f32,
) {
    for (a, v8) in acc.iter_mut().zip(v.chunks_exact(8)) {
        for (x, &e) in a.iter_mut().zip(v8) {
            *x += f(e);
        }
    }
}

/// Folds rows of eight lane accumulators pairwise in a fixed order: rows `r` and `r + R/2`
/// lane by lane, halving to one row, then lanes `k` and `k + 4`, `k + 2`, `k + 1`. Never
/// inlined: inlined, LLVM vectorized this fold and bent the loop before it to match (see
/// [`add_lanes`]); in order instead of pairwise, its 31 dependent additions cost a cycle per
/// value of a 256-value chunk (perf annotate).
#[inline(never)]
pub(super) fn fold_lanes<const R: usize>(acc: &[[f32; 8]; R]) -> f32 {
    let mut rows = *acc;
    let mut n = R;
    while n > 1 {
        n /= 2;
        for r in 0..n {
            let hi = rows[r + n];
            for (a, b) in rows[r].iter_mut().zip(hi) {
                *a += b;
            }
        }
    }
    let mut v = rows[0];
    let mut m = 8;
    while m > 1 {
        m /= 2;
        for k in 0..m {
            v[k] += v[k + m];
        }
    }
    v[0]
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

/// A leaf's moments (1 to [`LEAF`] values, shifted by `pivot`; both passes read `x` itself,
/// from L1 the second time, eight values at a time converted in registers): exact two-pass
/// for f32; for f16/bf16 one pass of shifted sums and squares where [`one_pass_m2`] accepts
/// them, the second pass where it does not (the same mean either way:
/// [`lane_sums_and_squares_of`]'s first sum has [`lane_sum_of`]'s bits).
#[inline(always)]
fn leaf_two_pass<T: Element, const SIMD: bool>(x: &[T], pivot: f32) -> Moments {
    debug_assert!(!x.is_empty() && x.len() <= LEAF);
    let n = x.len();
    if T::DTYPE == crate::DType::F32 {
        return leaf_f32::<T, SIMD>(x, pivot);
    }
    // f16/bf16: one walk of sums and squares, kept where `one_pass_m2` accepts it; otherwise
    // the corrected two-pass
    let (s1, s2) = lane_sums_and_squares_of::<T, SIMD>(x, pivot);
    if let Some(m2) = one_pass_m2(s1, s2, n) {
        return Moments {
            count: n,
            mean: f64::from(s1) / n as f64,
            m2,
        };
    }
    let mean = s1 / n as f32;
    let m2 = lane_sum_of::<T, SIMD>(x, |e| {
        let d = (e - pivot) - mean;
        d * d
    });
    // a far pivot: the corrected two-pass, as in the NHWC leaves (`forward_nhwc::nhwc_leaf`)
    let cr = lane_sum_of::<T, SIMD>(x, |e| (e - pivot) - mean);
    let (corr, m2) = corrected(cr, m2, n);
    Moments {
        count: n,
        mean: f64::from(s1) / n as f64 + corr,
        m2,
    }
}

/// An f32 leaf: the exact two-pass, in the form that takes the fewest instructions.
///
/// The first pass sums `p - x` (its bits are those of `-sum(x - p)`: negation is exact and
/// rounding to nearest is symmetric), so that each value is one subtraction with its load
/// folded in and one addition. The second sums `(c - x)^2` about the leaf's centre
/// `c = p + s1 / n` rounded to f32, one subtraction (load folded in), one product and one
/// sum per value instead of two subtractions. `c` misses the exact centre `p + s1 / n` by
/// `delta`, at most half an ulp of `c`, and `sum (x - c)^2 = m2 + n * delta^2` exactly, so
/// the leaf's `m2` is that sum less `n * delta^2` (in f64). `x - c` is exact where `x` is
/// within a factor two of `c` (rows with an offset) and otherwise rounds relative to
/// `x - c` itself, as `(x - p) - s1 / n` did in two steps.
#[inline(always)]
fn leaf_f32<T: Element, const SIMD: bool>(x: &[T], pivot: f32) -> Moments {
    let n = x.len();
    let s1 = -wide_sum_of::<T, SIMD>(x, |e| pivot - e);
    let mean = f64::from(s1) / n as f64;
    let exact = f64::from(pivot) + mean;
    let c = exact as f32;
    let sq = wide_sum_of::<T, SIMD>(x, |e| {
        let d = c - e;
        d * d
    });
    let delta = exact - f64::from(c);
    // (rounding may take it below 0; a NaN stays NaN, where `max` would drop it)
    let m2 = f64::from(sq) - n as f64 * delta * delta;
    Moments {
        count: n,
        mean,
        m2: if m2 < 0.0 { 0.0 } else { m2 as f32 },
    }
}

/// Lanes of [`wide_sum_of`]: eight rows of eight.
const WIDE_LANES: usize = 64;

/// [`lane_sum_of`] with [`WIDE_LANES`] lanes, for the f32 statistics leaves: each lane sums a
/// 64th of the values (32 of a [`LEAF`]), and eight independent vector sums keep the loop
/// from waiting on an addition's latency. Folded as [`fold_lanes`] folds eight rows.
#[inline(always)]
pub(super) fn wide_sum_of<T: Element, const SIMD: bool>(v: &[T], f: impl Fn(f32) -> f32) -> f32 {
    let (acc, rest) = row_sums_of::<T, SIMD, { WIDE_LANES / 8 }>(v, f);
    // rows r and r + 4 first, as `fold_lanes` begins with eight rows; then its four-row fold
    let mut four = [[0f32; 8]; 4];
    for (r, row) in four.iter_mut().enumerate() {
        for (l, o) in row.iter_mut().enumerate() {
            *o = acc[r][l] + acc[r + 4][l];
        }
    }
    fold_lanes4::<SIMD>(&four) + rest
}

/// The sums of `f(v)` in `8 * R` lanes (lane `i` takes values `i, i + 8R, ...`, row `i % 8R / 8`
/// of the result), values converted eight at a time in registers ([`load8`]), and the sum of the
/// last `len % 8R` values in order: what [`lane_sum_of`] and [`wide_sum_of`] fold.
#[inline(always)]
fn row_sums_of<T: Element, const SIMD: bool, const R: usize>(
    v: &[T],
    f: impl Fn(f32) -> f32,
) -> ([[f32; 8]; R], f32) {
    let mut acc = [[0f32; 8]; R];
    let mut chunks = v.chunks_exact(8 * R);
    for c in &mut chunks {
        for (a, c8) in acc.iter_mut().zip(c.chunks_exact(8)) {
            let e = load8::<T, SIMD>(c8);
            for (x, &e) in a.iter_mut().zip(&e) {
                *x += f(e);
            }
        }
    }
    let rest = chunks.remainder().iter().fold(0f32, |a, e| a + f(load1(e)));
    (acc, rest)
}

/// [`lane_sum`] over values of `T`, converted eight at a time in registers ([`load8`]): the same
/// lanes, order and fold, so the same bits as [`lane_sum`] over the converted values.
#[inline(always)]
pub(super) fn lane_sum_of<T: Element, const SIMD: bool>(v: &[T], f: impl Fn(f32) -> f32) -> f32 {
    let (acc, rest) = row_sums_of::<T, SIMD, { LANES / 8 }>(v, f);
    fold_lanes4::<SIMD>(&acc) + rest
}

/// The corrected two-pass's last step, from the sums over `n` values of their deviations `d`
/// from a provisional mean, `sum d` and `sum d^2`: the correction to that mean,
/// `sum d / n`, and `m2 = sum d^2 - (sum d)^2 / n` (at least 0), in f64. For the f16/bf16
/// leaves whose one-pass sums [`one_pass_m2`] refused: their pivot is far from the mean, so
/// the f32 sums of `x - p` that gave the provisional mean added large values and rounded.
pub(super) fn corrected(sum_d: f32, sum_d2: f32, n: usize) -> (f64, f32) {
    let (d, n) = (f64::from(sum_d), n as f64);
    (d / n, (f64::from(sum_d2) - d * d / n).max(0.0) as f32)
}

/// [`lane_sum_of`] of `x - pivot` and of `(x - pivot)^2` in one walk: each sum in its own
/// lanes, with [`lane_sum_of`]'s order and fold, so each has the bits [`lane_sum_of`] gives it.
#[inline(always)]
pub(super) fn lane_sums_and_squares_of<T: Element, const SIMD: bool>(
    v: &[T],
    pivot: f32,
) -> (f32, f32) {
    let (mut s1, mut s2) = ([[0f32; 8]; LANES / 8], [[0f32; 8]; LANES / 8]);
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for ((a, b), c8) in s1.iter_mut().zip(s2.iter_mut()).zip(c.chunks_exact(8)) {
            let e = load8::<T, SIMD>(c8);
            for l in 0..8 {
                let d = e[l] - pivot;
                a[l] += d;
                b[l] += d * d;
            }
        }
    }
    let (mut r1, mut r2) = (0f32, 0f32);
    for e in chunks.remainder() {
        let d = load1(e) - pivot;
        r1 += d;
        r2 += d * d;
    }
    (fold_lanes4::<SIMD>(&s1) + r1, fold_lanes4::<SIMD>(&s2) + r2)
}

/// How far a one-pass leaf's shifted mean may sit from zero, in its own variances
/// (`count * mean^2 <= ONE_PASS_SPREAD * m2`: a pivot within three standard deviations of the
/// leaf's mean), for its `m2` to be accepted.
const ONE_PASS_SPREAD: f64 = 9.0;

/// The leaf's `m2 = s2 - s1^2 / n` from its shifted sums `s1 = sum(x - p)` and
/// `s2 = sum((x - p)^2)`, or `None` where that difference may have cancelled.
///
/// Why this is accurate where it is accepted: the f32 sums carry a relative error of about
/// `k u` at worst and `sqrt(k) u` typically (`u = 2^-24`, `k` the additions in sequence: at
/// most [`CHUNK`] positions per channel in an NHWC block, or 64 per lane in an NCHW leaf
/// ([`LEAF`] over [`LANES`]), plus the pairwise depth over channels or lanes), on
/// `s2 = m2 + s1^2 / n`. The two-pass pays the same on `m2` alone. Accepting only
/// `s1^2 / n <= 9 m2` bounds `s2` by `10 m2`, so the one-pass error is at most ten times the
/// two-pass's: about 3e-6 relative in rstd for errors that do not align (the tests hold every
/// dtype's statistics to 1e-5), 8e-5 if every rounding aligned, against the f16/bf16 outputs'
/// ulp of 1e-3 and 8e-3 relative (DESIGN.md, "Dtypes"). The shifted mean is the same `s1 / n`
/// the two-pass takes. A pivot far out in its row (an outlier as the row's first value), NaN
/// and infinity fail the check (a NaN compares false), and the group is summed again exactly.
/// For a row of normal values, a pivot beyond three standard deviations happens to one group
/// in 370. The f32 forward, held to 1e-5 on `y` itself, always takes the two passes.
pub(super) fn one_pass_m2(s1: f32, s2: f32, n: usize) -> Option<f32> {
    let (s1, s2, n) = (s1 as f64, s2 as f64, n as f64);
    let spread = s1 * s1 / n;
    let m2 = s2 - spread;
    (spread <= ONE_PASS_SPREAD * m2).then_some(m2 as f32)
}

/// Where to cut a slice longer than `leaf` in a tree of `leaf`-value leaves: half its leaves
/// (rounded down) on the left.
#[inline]
pub(super) fn split_point(len: usize, leaf: usize) -> usize {
    (len.div_ceil(leaf) / 2) * leaf
}

/// Moments of a contiguous run, shifted by `pivot`: a fixed pairwise tree of chunk states
/// (a node of `k` chunks has `k / 2` on its left, [`split_point`]), with long halves computed
/// in parallel; below [`PAR_MIN`] values, or with one thread, [`serial_tree`] walks the same
/// tree in one call (the tree, hence the result, does not change).
pub(super) fn run_moments<T: Element>(x: &[T], pivot: f32) -> Moments {
    if x.is_empty() {
        return Moments::default();
    }
    if x.len() < PAR_MIN || !may_split() {
        return serial_tree(x, pivot);
    }
    let (a, b) = x.split_at(split_point(x.len(), LEAF));
    let (ma, mb) = rayon::join(|| run_moments(a, pivot), || run_moments(b, pivot));
    ma.merge(mb)
}

/// [`run_moments`]' tree over a non-empty run on this thread, compiled for AVX2 too and picked
/// at run time (the same operations in the same order, so the same bits).
///
/// One call for the whole run, the leaves inlined: as a recursion of one call per node, with
/// the run-time dispatch at every leaf, the tree's calls and merges took about 0.5
/// instructions per value, a sixth of the f32 NCHW forward (cachegrind, 2x320x64x64).
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn serial_tree<T: Element>(x: &[T], pivot: f32) -> Moments {
    let k = x.len().div_ceil(LEAF);
    if k > WALK_MAX_LEAVES {
        // (rows of over 2^33 values) the top of the tree as a recursion, as `run_moments`
        let (a, b) = x.split_at(split_point(x.len(), LEAF));
        return serial_tree(a, pivot).merge(serial_tree(b, pivot));
    }
    if use_simd() {
        serial_tree_of::<T, true>(x, pivot)
    } else {
        serial_tree_of::<T, false>(x, pivot)
    }
}

/// [`serial_tree`]'s walk with the vector forms already chosen (`SIMD`, [`use_simd`]), for
/// callers compiled and dispatched as it is: a run of 1 to `WALK_MAX_LEAVES * LEAF` values.
#[inline(always)]
pub(super) fn serial_tree_of<T: Element, const SIMD: bool>(x: &[T], pivot: f32) -> Moments {
    walk_tree(
        x.len().div_ceil(LEAF),
        #[inline(always)]
        |i| leaf_two_pass::<T, SIMD>(&x[chunk_range(i, x.len())], pivot),
    )
}

/// Leaves [`walk_tree`] takes at most (2^22 leaves: 2^33 values).
const WALK_MAX_LEAVES: usize = 1 << 22;

/// The values of leaf `i` of a run of `len`: [`LEAF`] of them, fewer in the last.
#[inline(always)]
fn chunk_range(i: usize, len: usize) -> Range<usize> {
    i * LEAF..((i + 1) * LEAF).min(len)
}

/// Evaluates the pairwise tree over leaves `0..k` (`k >= 1`; a node `(lo, n)` of `n >= 2`
/// leaves is `node(lo, n / 2).merge(node(lo + n / 2, n - n / 2))`) in post-order, leaves left
/// to right, with an explicit stack instead of recursion so that it inlines with `leaf`.
/// At most [`WALK_MAX_LEAVES`] leaves: a path from the root then passes at most 22 inner
/// nodes, one frame each.
#[inline(always)]
pub(super) fn walk_tree(k: usize, mut leaf: impl FnMut(usize) -> Moments) -> Moments {
    assert!((1..=WALK_MAX_LEAVES).contains(&k), "walk_tree: {k} leaves");
    // up to three leaves directly: no frames to set up (they cost a tenth of a 4x64x16x16 f32
    // forward, whose rows are two leaves)
    match k {
        1 => return leaf(0),
        2 => {
            let a = leaf(0);
            return a.merge(leaf(1));
        }
        3 => {
            let a = leaf(0);
            let b = leaf(1);
            return a.merge(b.merge(leaf(2)));
        }
        _ => {}
    }
    // (first leaf, leaves, the left child's result once known): one per level of the path
    // from the root, ceil(log2 k) <= 22 of them
    let mut frames = [(0usize, 0usize, None::<Moments>); 22];
    let mut depth = 0;
    let (mut lo, mut n) = (0, k);
    loop {
        // down to the leftmost leaf of node (lo, n)
        while n > 1 {
            frames[depth] = (lo, n, None);
            depth += 1;
            n /= 2;
        }
        let mut m = leaf(lo);
        // up: a left child's result waits in its parent for the right child's
        loop {
            if depth == 0 {
                return m;
            }
            let (plo, pn, left) = &mut frames[depth - 1];
            match left.take() {
                None => {
                    *left = Some(m);
                    (lo, n) = (*plo + *pn / 2, *pn - *pn / 2);
                    break;
                }
                Some(l) => {
                    m = l.merge(m);
                    depth -= 1;
                }
            }
        }
    }
}
