//! The channels-last forward pass.

use super::forward::on_caller_or_halves;
use super::*;

/// Channels per NHWC statistics batch at most: per-channel accumulators for all of them sit on
/// the stack (three arrays of 4 KiB), so that up to 1024 channels (every SD/VAE layer but the
/// 1280-channel ones) are summed in one contiguous walk over each position. (Batches of at most
/// [`CHUNK`] channels walked the sample once per batch, strided: 3 walks at C = 640.)
pub(super) const BATCH_CHANNELS: usize = 1024;

/// Per-channel (or per-group) values of one NHWC statistics batch, on the stack.
pub(super) type Wide = [f32; BATCH_CHANNELS];

/// NHWC group batch: `gb` consecutive groups whose `gb * D <= BATCH_CHANNELS` channels are
/// read as one contiguous segment of each position (one group when `D > BATCH_CHANNELS`).
#[derive(Clone, Copy, Debug)]
pub(super) struct NhwcBatch {
    /// Channels per position row.
    pub(super) c: usize,
    /// Channels per group.
    pub(super) d: usize,
    /// First group of the batch.
    pub(super) g0: usize,
    /// Groups in the batch.
    pub(super) gb: usize,
    /// Positions per leaf of the statistics tree.
    pub(super) pb: usize,
}

impl NhwcBatch {
    /// Groups per batch for `d` channels per group and `groups` groups.
    pub(super) fn groups_per_batch(d: usize, groups: usize) -> usize {
        if d > BATCH_CHANNELS {
            1
        } else {
            (BATCH_CHANNELS / d).min(groups)
        }
    }

    /// The batch of `gb` groups from `g0`, with leaves sized for elements of `elem` bytes.
    pub(super) fn new(c: usize, d: usize, g0: usize, gb: usize, elem: usize) -> NhwcBatch {
        // A leaf reads about NHWC_STATS_BYTES of `x` (f32: twice, the second time from
        // cache), at most CHUNK positions (each channel accumulator sums at most CHUNK values
        // in sequence).
        let pb = (NHWC_STATS_BYTES / elem / (gb * d)).clamp(1, CHUNK);
        NhwcBatch { c, d, g0, gb, pb }
    }
}

/// Moments of the groups of an [`NhwcBatch`] over some positions: one count for all (every
/// group has the same number of values), shifted means and `m2` per group.
#[derive(Clone, Copy, Debug)]
pub(super) struct BatchMoments {
    pub(super) count: usize,
    /// f64, as [`Moments::mean`].
    pub(super) mean: [f64; BATCH_CHANNELS],
    pub(super) m2: Wide,
}

impl BatchMoments {
    pub(super) fn get(&self, i: usize) -> Moments {
        Moments {
            count: self.count,
            mean: self.mean[i],
            m2: self.m2[i],
        }
    }

    pub(super) fn merge(mut self, other: &BatchMoments, gb: usize) -> BatchMoments {
        for i in 0..gb {
            let m = self.get(i).merge(other.get(i));
            (self.mean[i], self.m2[i]) = (m.mean, m.m2);
        }
        self.count += other.count;
        self
    }
}

/// Moments of the groups of batch `b` of NHWC sample `xs` over positions `pos`, shifted by
/// each group's pivot (`pivots[i]` for group `b.g0 + i`): leaves of `b.pb` positions over
/// values walked contiguously ([`nhwc_leaf`]), merged in a fixed pairwise tree whose long halves
/// run in parallel when `par`. Nothing is allocated: all state is on the stack.
pub(super) fn nhwc_batch_moments<T: Element>(
    xs: &[T],
    b: NhwcBatch,
    pos: Range<usize>,
    pivots: &Wide,
    par: bool,
) -> BatchMoments {
    if pos.len() > b.pb {
        let mid = pos.start + (pos.len().div_ceil(b.pb) / 2) * b.pb;
        let (lo, hi) = (pos.start..mid, mid..pos.end);
        let (ma, mb) = if par && pos.len() * b.gb * b.d >= PAR_MIN {
            rayon::join(
                || nhwc_batch_moments(xs, b, lo, pivots, par),
                || nhwc_batch_moments(xs, b, hi, pivots, par),
            )
        } else {
            (
                nhwc_batch_moments(xs, b, lo, pivots, par),
                nhwc_batch_moments(xs, b, hi, pivots, par),
            )
        };
        return ma.merge(&mb, b.gb);
    }
    nhwc_leaf_moments(xs, b, pos, pivots)
}

/// One leaf of [`nhwc_batch_moments`]: at most `b.pb` positions ([`nhwc_leaf`]). Compiled for
/// AVX2 too and picked at run time (same operations in the same order, so the same bits).
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn nhwc_leaf_moments<T: Element>(
    xs: &[T],
    b: NhwcBatch,
    pos: Range<usize>,
    pivots: &Wide,
) -> BatchMoments {
    if use_simd() {
        nhwc_leaf::<T, true>(xs, b, pos, pivots)
    } else {
        nhwc_leaf::<T, false>(xs, b, pos, pivots)
    }
}

/// `acc[j] += f(x[j], p[j], m[j])` over a segment of channels, eight at a time with the values
/// converted in registers ([`load8`]), the tail one at a time.
#[inline(always)]
pub(super) fn accumulate_channels<T: Element, const SIMD: bool>(
    acc: &mut [f32],
    x: &[T],
    p: &[f32],
    m: &[f32],
    f: impl Fn(f32, f32, f32) -> f32,
) {
    let n = x.len();
    let (acc, p, m) = (&mut acc[..n], &p[..n], &m[..n]);
    let mut a8 = acc.chunks_exact_mut(8);
    let mut x8 = x.chunks_exact(8);
    let (mut p8, mut m8) = (p.chunks_exact(8), m.chunks_exact(8));
    for (((a, x), p), m) in (&mut a8).zip(&mut x8).zip(&mut p8).zip(&mut m8) {
        let (e, pv, mv) = (
            load8::<T, SIMD>(x),
            load8::<f32, SIMD>(p),
            load8::<f32, SIMD>(m),
        );
        let mut s = load8::<f32, SIMD>(a);
        for (l, s) in s.iter_mut().enumerate() {
            *s += f(e[l], pv[l], mv[l]);
        }
        store8::<f32, SIMD>(s, a);
    }
    let tail = a8.into_remainder().iter_mut().zip(x8.remainder());
    for ((a, x), (p, m)) in tail.zip(p8.remainder().iter().zip(m8.remainder())) {
        *a += f(load1(x), *p, *m);
    }
}

/// [`accumulate_channels`] over four positions' segments at once:
/// `acc[j] += (f(x0[j]) + f(x1[j])) + (f(x2[j]) + f(x3[j]))`, so that each accumulator is
/// loaded and stored once per four values instead of once per value.
#[inline(always)]
pub(super) fn accumulate_channels4<T: Element, const SIMD: bool>(
    acc: &mut [f32],
    x: [&[T]; 4],
    p: &[f32],
    m: &[f32],
    f: impl Fn(f32, f32, f32) -> f32,
) {
    let n = x[0].len();
    let (acc, p, m) = (&mut acc[..n], &p[..n], &m[..n]);
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    let mut a8 = acc.chunks_exact_mut(8);
    let (mut p8, mut m8) = (p.chunks_exact(8), m.chunks_exact(8));
    let (mut c0, mut c1) = (x0.chunks_exact(8), x1.chunks_exact(8));
    let (mut c2, mut c3) = (x2.chunks_exact(8), x3.chunks_exact(8));
    let xs = (&mut c0).zip(&mut c1).zip((&mut c2).zip(&mut c3));
    for ((a, (p, m)), ((u0, u1), (u2, u3))) in (&mut a8).zip((&mut p8).zip(&mut m8)).zip(xs) {
        let (pv, mv) = (load8::<f32, SIMD>(p), load8::<f32, SIMD>(m));
        let (e0, e1) = (load8::<T, SIMD>(u0), load8::<T, SIMD>(u1));
        let (e2, e3) = (load8::<T, SIMD>(u2), load8::<T, SIMD>(u3));
        let mut s = load8::<f32, SIMD>(a);
        for (l, s) in s.iter_mut().enumerate() {
            let (v0, v1) = (f(e0[l], pv[l], mv[l]), f(e1[l], pv[l], mv[l]));
            let (v2, v3) = (f(e2[l], pv[l], mv[l]), f(e3[l], pv[l], mv[l]));
            *s += (v0 + v1) + (v2 + v3);
        }
        store8::<f32, SIMD>(s, a);
    }
    let tail = a8.into_remainder().iter_mut().enumerate();
    let (base, pt, mt) = (n - n % 8, p8.remainder(), m8.remainder());
    for (k, a) in tail {
        let (j, pv, mv) = (base + k, pt[k], mt[k]);
        let (v0, v1) = (f(load1(&x0[j]), pv, mv), f(load1(&x1[j]), pv, mv));
        let (v2, v3) = (f(load1(&x2[j]), pv, mv), f(load1(&x3[j]), pv, mv));
        *a += (v0 + v1) + (v2 + v3);
    }
}

/// `s1[j] += x[j] - p[j]` and `s2[j] += (x[j] - p[j])^2` over a segment of channels, eight at a
/// time with the values converted in registers ([`load8`]), the tail one at a time.
#[inline(always)]
pub(super) fn accumulate_channels_and_squares<T: Element, const SIMD: bool>(
    s1: &mut [f32],
    s2: &mut [f32],
    x: &[T],
    p: &[f32],
) {
    let n = x.len();
    let (s1, s2, p) = (&mut s1[..n], &mut s2[..n], &p[..n]);
    let (mut a8, mut b8) = (s1.chunks_exact_mut(8), s2.chunks_exact_mut(8));
    let (mut x8, mut p8) = (x.chunks_exact(8), p.chunks_exact(8));
    for (((a, b), x), p) in (&mut a8).zip(&mut b8).zip(&mut x8).zip(&mut p8) {
        let (e, pv) = (load8::<T, SIMD>(x), load8::<f32, SIMD>(p));
        let (mut u, mut v) = (load8::<f32, SIMD>(a), load8::<f32, SIMD>(b));
        for l in 0..8 {
            let d = e[l] - pv[l];
            u[l] += d;
            v[l] += d * d;
        }
        store8::<f32, SIMD>(u, a);
        store8::<f32, SIMD>(v, b);
    }
    let tail = a8.into_remainder().iter_mut().zip(b8.into_remainder());
    for ((a, b), (x, p)) in tail.zip(x8.remainder().iter().zip(p8.remainder())) {
        let d = load1(x) - *p;
        *a += d;
        *b += d * d;
    }
}

/// [`accumulate_channels_and_squares`] over four positions' segments at once, with the sums
/// of [`accumulate_channels4`]'s form: `s1[j] += (d0 + d1) + (d2 + d3)`, `s2[j]` likewise over
/// the squares, `dk = xk[j] - p[j]`.
#[inline(always)]
pub(super) fn accumulate_channels_and_squares4<T: Element, const SIMD: bool>(
    s1: &mut [f32],
    s2: &mut [f32],
    x: [&[T]; 4],
    p: &[f32],
) {
    let n = x[0].len();
    let (s1, s2, p) = (&mut s1[..n], &mut s2[..n], &p[..n]);
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    let (mut a8, mut b8, mut p8) = (
        s1.chunks_exact_mut(8),
        s2.chunks_exact_mut(8),
        p.chunks_exact(8),
    );
    let (mut c0, mut c1) = (x0.chunks_exact(8), x1.chunks_exact(8));
    let (mut c2, mut c3) = (x2.chunks_exact(8), x3.chunks_exact(8));
    let xs = (&mut c0).zip(&mut c1).zip((&mut c2).zip(&mut c3));
    for (((a, b), p), ((u0, u1), (u2, u3))) in (&mut a8).zip(&mut b8).zip(&mut p8).zip(xs) {
        let pv = load8::<f32, SIMD>(p);
        let (e0, e1) = (load8::<T, SIMD>(u0), load8::<T, SIMD>(u1));
        let (e2, e3) = (load8::<T, SIMD>(u2), load8::<T, SIMD>(u3));
        let (mut u, mut v) = (load8::<f32, SIMD>(a), load8::<f32, SIMD>(b));
        for l in 0..8 {
            let (d0, d1) = (e0[l] - pv[l], e1[l] - pv[l]);
            let (d2, d3) = (e2[l] - pv[l], e3[l] - pv[l]);
            u[l] += (d0 + d1) + (d2 + d3);
            v[l] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
        store8::<f32, SIMD>(u, a);
        store8::<f32, SIMD>(v, b);
    }
    let base = n - n % 8;
    let tail = a8.into_remainder().iter_mut().zip(b8.into_remainder());
    for (k, ((a, b), pv)) in tail.zip(p8.remainder()).enumerate() {
        let j = base + k;
        let (d0, d1) = (load1(&x0[j]) - pv, load1(&x1[j]) - pv);
        let (d2, d3) = (load1(&x2[j]) - pv, load1(&x3[j]) - pv);
        *a += (d0 + d1) + (d2 + d3);
        *b += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
}

/// One leaf's moments: exact two-pass for f32; for f16/bf16 one pass of shifted sums and
/// squares, kept per group where [`one_pass_m2`] accepts them and summed again in a second
/// pass where it does not.
#[inline(always)]
fn nhwc_leaf<T: Element, const SIMD: bool>(
    xs: &[T],
    b: NhwcBatch,
    pos: Range<usize>,
    pivots: &Wide,
) -> BatchMoments {
    let mut out = BatchMoments {
        count: pos.len() * b.d,
        mean: [0.0; BATCH_CHANNELS],
        m2: [0.0; BATCH_CHANNELS],
    };
    let col0 = b.g0 * b.d;
    if b.d > BATCH_CHANNELS {
        // One group, long contiguous runs: a pairwise tree per run, merged over the leaf's
        // (at most NHWC_STATS_BYTES / (2 D) < 128) positions.
        let mut m = Moments::default();
        for s in pos {
            let at = s * b.c + col0;
            m = m.merge(run_moments(&xs[at..at + b.d], pivots[0]));
        }
        (out.mean[0], out.m2[0]) = (m.mean, m.m2);
        return out;
    }
    let cb = b.gb * b.d;
    let zero = [0f32; BATCH_CHANNELS];
    let (mut pc, mut mc, mut acc) = (zero, zero, zero);
    // per-channel copies of per-group values (no division per channel: it cost more than
    // the sums at 25 positions per leaf)
    for (pg, p) in pc[..cb].chunks_mut(b.d).zip(pivots) {
        pg.fill(*p);
    }
    let seg = |s: usize| &xs[s * b.c + col0..s * b.c + col0 + cb];
    let quads = pos.start..pos.start + pos.len() / 4 * 4;
    if T::DTYPE != crate::DType::F32 {
        // f16/bf16: sums of `x - p` and of its square in one walk, accepted per group where
        // the check says they cannot have cancelled (`one_pass_m2`); a group that fails it
        // takes the exact second pass over its own channels (the same per-channel arithmetic
        // as the two-pass below).
        let mut sq = zero;
        for s in quads.clone().step_by(4) {
            let x4 = [seg(s), seg(s + 1), seg(s + 2), seg(s + 3)];
            accumulate_channels_and_squares4::<T, SIMD>(&mut acc, &mut sq, x4, &pc);
        }
        for s in quads.end..pos.end {
            accumulate_channels_and_squares::<T, SIMD>(&mut acc, &mut sq, seg(s), &pc);
        }
        for i in 0..b.gb {
            let g = i * b.d..(i + 1) * b.d;
            let (s1, s2) = (pairwise_sum(&acc[g.clone()]), pairwise_sum(&sq[g.clone()]));
            out.mean[i] = f64::from(s1) / out.count as f64;
            out.m2[i] = match one_pass_m2(s1, s2, out.count) {
                Some(m2) => m2,
                None => {
                    // the corrected two-pass (Chan, Golub and LeVeque) over the group's own
                    // channels: deviations from the f32 mean, their squares and their sum,
                    // which corrects the mean for what the long sums of `x - p` rounded away
                    // (they add values as far out as the pivot is)
                    mc[g.clone()].fill(s1 / out.count as f32);
                    let (sq, cr) = (&mut sq[g.clone()], &mut acc[g.clone()]);
                    sq.fill(0.0);
                    cr.fill(0.0);
                    for s in pos.clone() {
                        let at = s * b.c + col0;
                        let seg = &xs[at + g.start..at + g.end];
                        let (p, m) = (&pc[g.clone()], &mc[g.clone()]);
                        accumulate_channels::<T, SIMD>(cr, seg, p, m, |e, p, m| (e - p) - m);
                        accumulate_channels::<T, SIMD>(sq, seg, p, m, |e, p, m| {
                            let dv = (e - p) - m;
                            dv * dv
                        });
                    }
                    let (corr, m2) = corrected(pairwise_sum(cr), pairwise_sum(sq), out.count);
                    out.mean[i] += corr;
                    m2
                }
            };
        }
        return out;
    }
    // Positions' segments, walked in memory order four at a time (each accumulator read and
    // written once per four values), values converted in registers.
    for s in quads.clone().step_by(4) {
        let x4 = [seg(s), seg(s + 1), seg(s + 2), seg(s + 3)];
        accumulate_channels4::<T, SIMD>(&mut acc, x4, &pc, &pc, |e, p, _| e - p);
    }
    for s in quads.end..pos.end {
        accumulate_channels::<T, SIMD>(&mut acc, seg(s), &pc, &pc, |e, p, _| e - p);
    }
    for (i, mg) in mc[..cb].chunks_mut(b.d).enumerate() {
        let s1 = pairwise_sum(&acc[i * b.d..(i + 1) * b.d]);
        out.mean[i] = f64::from(s1) / out.count as f64;
        mg.fill(s1 / out.count as f32);
    }
    acc = zero;
    let sq = |e: f32, p: f32, m: f32| {
        let dv = (e - p) - m;
        dv * dv
    };
    for s in quads.clone().step_by(4) {
        let x4 = [seg(s), seg(s + 1), seg(s + 2), seg(s + 3)];
        accumulate_channels4::<T, SIMD>(&mut acc, x4, &pc, &mc, sq);
    }
    for s in quads.end..pos.end {
        accumulate_channels::<T, SIMD>(&mut acc, seg(s), &pc, &mc, sq);
    }
    for i in 0..b.gb {
        out.m2[i] = pairwise_sum(&acc[i * b.d..(i + 1) * b.d]);
    }
    out
}

/// Per-channel normalization coefficients of a span of up to [`BATCH_CHANNELS`] channels, on
/// the stack (12 KiB): `y = (x - centre) * scale + shift` ([`centre`], [`shift_of`]). (Pads
/// between the arrays, to keep them off 4 KiB multiples of each other, were once credited
/// with 1.5-5 %; the compiler had moved them to the end of the struct, and with `repr(C)`
/// putting them between the arrays they measured neutral, so they are gone.)
pub(super) struct SpanCoefs {
    pub(super) centre: Wide,
    pub(super) scale: Wide,
    pub(super) shift: Wide,
}

impl SpanCoefs {
    /// Coefficients of channels `first..first + len` (`len <= BATCH_CHANNELS`), from `row(g)`:
    /// group `g`'s centre `(hi, lo)` ([`centre`]) and rstd.
    pub(super) fn new<P: Element>(
        first: usize,
        len: usize,
        d: usize,
        row: impl Fn(usize) -> (f32, f32, f32),
        weight: Option<&[P]>,
        bias: Option<&[P]>,
    ) -> SpanCoefs {
        let zero = [0.0; BATCH_CHANNELS];
        let mut k = SpanCoefs {
            centre: zero,
            scale: zero,
            shift: zero,
        };
        // channel `ch` (coefficient `i`) in group `g`, stepped without a division per channel
        let (mut g, mut next) = (first / d, (first / d + 1) * d);
        let (mut hi, mut lo, mut rstd) = row(g);
        for (i, ch) in (first..first + len).enumerate() {
            if ch == next {
                (g, next) = (g + 1, next + d);
                (hi, lo, rstd) = row(g);
            }
            let scale = rstd * param(weight, ch, 1.0);
            k.centre[i] = hi;
            k.scale[i] = scale;
            k.shift[i] = shift_of(param(bias, ch, 0.0), lo, scale);
        }
        k
    }

    /// `y = (x - centre) * scale + shift` over a segment starting at coefficient `at`.
    #[inline(always)]
    pub(super) fn apply(&self, at: usize, x: &[f32], y: &mut [f32]) {
        let k = at..at + x.len();
        for ((((o, v), c), a), b) in y
            .iter_mut()
            .zip(x)
            .zip(&self.centre[k.clone()])
            .zip(&self.scale[k.clone()])
            .zip(&self.shift[k])
        {
            *o = (v - c) * a + b;
        }
    }
}

/// One NHWC sample's output and input, and its rows' mean and rstd.
type SampleItem<'a, T> = ((&'a mut [T], &'a [T]), (&'a mut [f32], &'a mut [f32]));

/// NHWC forward, allocating nothing, one sample after the other (samples in parallel), and
/// within a sample one batch of groups after the other: the batch's statistics (walking its
/// columns of every position; long position ranges split in parallel), then the normalization
/// of those columns over contiguous pieces of whole positions while they are still in cache,
/// with the coefficients made from the statistics in hand (the f64 shifted means, see
/// [`Moments`], never parked in f32). (Statistics of every sample before any normalization
/// read `x` twice from memory once the tensor outgrows the last-level cache.)
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_nhwc<T: Element, P: Element>(
    geo: &Geometry,
    eps: f32,
    act: Activation,
    x: &[T],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    y: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let (c, s, d, groups) = (geo.c, geo.s, geo.d, geo.g);
    let sample = s * c;
    let gb = NhwcBatch::groups_per_batch(d, groups);
    let piece = nhwc_piece(c);
    // Small tensors run on the calling thread, or in two halves of the samples.
    let sch = sched(geo, geo.n);
    let par = sch == Sched::Pool;

    let one_sample = |((ys, xs), (mean_n, rstd_n)): SampleItem<'_, T>| {
        for (bi, (mean_b, rstd_b)) in mean_n.chunks_mut(gb).zip(rstd_n.chunks_mut(gb)).enumerate() {
            let b = NhwcBatch::new(c, d, bi * gb, mean_b.len(), T::DTYPE.size());
            let mut pivots = [0f32; BATCH_CHANNELS];
            for (i, p) in pivots[..b.gb].iter_mut().enumerate() {
                *p = xs[(b.g0 + i) * d].to_f32();
            }
            let bm = nhwc_batch_moments(xs, b, 0..s, &pivots, par);
            let mut lo = [0f32; BATCH_CHANNELS];
            for (i, (m, r)) in mean_b.iter_mut().zip(rstd_b.iter_mut()).enumerate() {
                let st = RowStats::from_moments(bm.get(i), pivots[i], eps);
                (*m, *r, lo[i]) = (st.mean, st.rstd, st.residual);
            }
            let (his, rs) = (&*mean_b, &*rstd_b);
            let row = |g: usize| {
                let i = g - b.g0;
                (his[i], lo[i], rs[i])
            };
            // the batch's columns, in spans of at most BATCH_CHANNELS (more only when one
            // group has more channels than that)
            let cols = b.g0 * d..(b.g0 + b.gb) * d;
            for ch0 in cols.clone().step_by(BATCH_CHANNELS) {
                let len = BATCH_CHANNELS.min(cols.end - ch0);
                let k = SpanCoefs::new(ch0, len, d, row, weight, bias);
                let norm = |(yp, xp): (&mut [T], &[T])| {
                    normalize_nhwc_piece(xp, yp, c, ch0..ch0 + len, &k, act)
                };
                if par {
                    ys.par_chunks_mut(piece)
                        .zip(xs.par_chunks(piece))
                        .for_each(norm);
                } else {
                    ys.chunks_mut(piece).zip(xs.chunks(piece)).for_each(norm);
                }
            }
        }
    };
    if par {
        y.par_chunks_mut(sample)
            .zip(x.par_chunks(sample))
            .zip(mean.par_chunks_mut(groups).zip(rstd.par_chunks_mut(groups)))
            .for_each(one_sample);
    } else {
        on_caller_or_halves(sch, geo.n, x, y, mean, rstd, |_, x, y, mean, rstd| {
            y.chunks_mut(sample)
                .zip(x.chunks(sample))
                .zip(mean.chunks_mut(groups).zip(rstd.chunks_mut(groups)))
                .for_each(one_sample)
        });
    }
}

/// Normalizes channels `cols` (at most [`BATCH_CHANNELS`], coefficients `k`) of a piece of
/// whole positions `xp` of an NHWC tensor with `c` channels into `yp`, then the activation.
/// Compiled for AVX2 too and picked at run time (same operations in the same order, so the
/// same bits).
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn normalize_nhwc_piece<T: Element>(
    xp: &[T],
    yp: &mut [T],
    c: usize,
    cols: Range<usize>,
    k: &SpanCoefs,
    act: Activation,
) {
    if act == Activation::None {
        // Each position's columns, values converted in registers.
        let n = cols.len();
        let (m, a, b) = (&k.centre[..n], &k.scale[..n], &k.shift[..n]);
        let simd = use_simd();
        for (xr, yr) in xp.chunks_exact(c).zip(yp.chunks_exact_mut(c)) {
            let (xr, yr) = (&xr[cols.clone()], &mut yr[cols.clone()]);
            if simd {
                affine_per_channel::<T, true>(xr, yr, m, a, b);
            } else {
                affine_per_channel::<T, false>(xr, yr, m, a, b);
            }
        }
        return;
    }
    let (mut bx, mut by) = ([0f32; CHUNK], [0f32; CHUNK]);
    // `span` of the piece, whose first channel is coefficient `at` of `k`
    let mut normalize = |span: Range<usize>, at: usize| {
        read_f32(&xp[span.clone()], &mut bx, |xv| {
            write_f32(&mut yp[span], &mut by, |yv| {
                for (yseg, xseg) in yv.chunks_mut(c).zip(xv.chunks(c)) {
                    k.apply(at, xseg, yseg);
                    activate(act, yseg);
                }
            })
        })
    };
    if c <= CHUNK {
        // Spans of whole rows (`cols` is all of them).
        for_each_span(xp.len(), c, |span, _| normalize(span, 0));
        return;
    }
    // Wide rows, walked in memory order when `cols` is all of them, in spans of CHUNK
    // channels.
    for row in (0..xp.len()).step_by(c) {
        for at in (0..cols.len()).step_by(CHUNK) {
            let start = row + cols.start + at;
            normalize(start..start + CHUNK.min(cols.len() - at), at);
        }
    }
}

/// `y[j] = (x[j] - m[j]) * a[j] + b[j]` over one position's columns (the same arithmetic as
/// [`SpanCoefs::apply`]), eight at a time with the values converted in registers ([`load8`],
/// [`store8`]), the tail one at a time.
#[inline(always)]
pub(super) fn affine_per_channel<T: Element, const SIMD: bool>(
    x: &[T],
    y: &mut [T],
    m: &[f32],
    a: &[f32],
    b: &[f32],
) {
    let n = x.len();
    let (y, m, a, b) = (&mut y[..n], &m[..n], &a[..n], &b[..n]);
    // sixteen values per step (one 32-byte store for bf16), then eight, then one by one;
    // every slice is cut to `n` first so that the steps carry no bounds checks
    let mut j = 0;
    while j + 16 <= n {
        let lo = affine8::<T, SIMD>(&x[j..], &m[j..], &a[j..], &b[j..]);
        let hi = affine8::<T, SIMD>(&x[j + 8..], &m[j + 8..], &a[j + 8..], &b[j + 8..]);
        store16::<T, SIMD>(lo, hi, &mut y[j..]);
        j += 16;
    }
    if j + 8 <= n {
        let o = affine8::<T, SIMD>(&x[j..], &m[j..], &a[j..], &b[j..]);
        store8::<T, SIMD>(o, &mut y[j..]);
        j += 8;
    }
    for j in j..n {
        store1((load1(&x[j]) - m[j]) * a[j] + b[j], &mut y[j]);
    }
}

/// `(x - m) * a + b` of the first eight values of each (a function, not a closure: a closure
/// does not take the target features of the multiversioned function around it, so the
/// conversions inside one would not inline; written as a closure, this loop ran 4x slower).
#[inline(always)]
fn affine8<T: Element, const SIMD: bool>(x: &[T], m: &[f32], a: &[f32], b: &[f32]) -> F8 {
    let v = load8::<T, SIMD>(x);
    let (m, a, b) = (
        load8::<f32, SIMD>(m),
        load8::<f32, SIMD>(a),
        load8::<f32, SIMD>(b),
    );
    let mut o = [0f32; 8];
    for l in 0..8 {
        o[l] = (v[l] - m[l]) * a[l] + b[l];
    }
    o
}
