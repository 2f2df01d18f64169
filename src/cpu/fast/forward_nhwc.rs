//! The channels-last forward pass.

use super::*;

/// NHWC group batch: `gb` consecutive groups whose `gb * D <= CHUNK` channels are read as one
/// contiguous segment of each position (one group when `D > CHUNK`).
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
        if d > CHUNK {
            1
        } else {
            (CHUNK / d).min(groups)
        }
    }

    pub(super) fn new(c: usize, d: usize, g0: usize, gb: usize) -> NhwcBatch {
        // A leaf reads about NHWC_BLOCK values (twice, from cache), at most CHUNK positions
        // (each channel accumulator sums at most CHUNK values in sequence).
        let pb = (NHWC_BLOCK / (gb * d)).clamp(1, CHUNK);
        NhwcBatch { c, d, g0, gb, pb }
    }
}

/// Moments of the groups of an [`NhwcBatch`] over some positions: one count for all (every
/// group has the same number of values), shifted means and `m2` per group.
#[derive(Clone, Copy, Debug)]
pub(super) struct BatchMoments {
    pub(super) count: usize,
    pub(super) mean: Buf,
    pub(super) m2: Buf,
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
/// each group's pivot (`pivots[i]` for group `b.g0 + i`): leaves of `b.pb` positions, exact
/// two-pass over values walked contiguously, merged in a fixed pairwise tree whose long halves
/// run in parallel when `par`. Nothing is allocated: all state is on the stack.
pub(super) fn nhwc_batch_moments<T: Element>(
    xs: &[T],
    b: NhwcBatch,
    pos: Range<usize>,
    pivots: &Buf,
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

/// One leaf of [`nhwc_batch_moments`]: at most `b.pb` positions, exact two-pass. Compiled for
/// AVX2 too and picked at run time (same operations in the same order, so the same bits).
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn nhwc_leaf_moments<T: Element>(
    xs: &[T],
    b: NhwcBatch,
    pos: Range<usize>,
    pivots: &Buf,
) -> BatchMoments {
    let mut out = BatchMoments {
        count: pos.len() * b.d,
        mean: [0.0; CHUNK],
        m2: [0.0; CHUNK],
    };
    let col0 = b.g0 * b.d;
    let mut buf = [0f32; CHUNK];
    if b.d > CHUNK {
        // One group, long contiguous runs: a pairwise tree per run, merged over the leaf's
        // (at most NHWC_BLOCK / D < 64) positions.
        let mut m = Moments::default();
        for s in pos {
            let at = s * b.c + col0;
            m = m.merge(run_moments(&xs[at..at + b.d], pivots[0], &mut buf));
        }
        (out.mean[0], out.m2[0]) = (m.mean, m.m2);
        return out;
    }
    let cb = b.gb * b.d;
    let (mut pc, mut mc, mut acc) = ([0f32; CHUNK], [0f32; CHUNK], [0f32; CHUNK]);
    for (ch, p) in pc[..cb].iter_mut().enumerate() {
        *p = pivots[ch / b.d];
    }
    for s in pos.clone() {
        let at = s * b.c + col0;
        read_f32(&xs[at..at + cb], &mut buf, |v| {
            for ((a, e), p) in acc.iter_mut().zip(v).zip(&pc) {
                *a += e - p;
            }
        });
    }
    for i in 0..b.gb {
        out.mean[i] = pairwise_sum(&acc[i * b.d..(i + 1) * b.d]) / out.count as f32;
    }
    for (ch, m) in mc[..cb].iter_mut().enumerate() {
        *m = out.mean[ch / b.d];
    }
    acc = [0f32; CHUNK];
    for s in pos {
        let at = s * b.c + col0;
        read_f32(&xs[at..at + cb], &mut buf, |v| {
            for (((a, e), p), m) in acc.iter_mut().zip(v).zip(&pc).zip(&mc) {
                let dv = (e - p) - m;
                *a += dv * dv;
            }
        });
    }
    for i in 0..b.gb {
        out.m2[i] = pairwise_sum(&acc[i * b.d..(i + 1) * b.d]);
    }
    out
}

/// Per-channel normalization coefficients of a span of channels, on the stack.
pub(super) struct SpanCoefs {
    pub(super) pivot: Buf,
    pub(super) shifted_mean: Buf,
    pub(super) scale: Buf,
    pub(super) shift: Buf,
}

impl SpanCoefs {
    /// Coefficients of channels `first..first + len` (`len <= CHUNK`) of one NHWC sample `xs`
    /// (the pivot of group `g` is `xs[g * d]`), from its rows' shifted means and rstd.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new<T: Element, P: Element>(
        first: usize,
        len: usize,
        d: usize,
        xs: &[T],
        shifted_mean: &[f32],
        rstd: &[f32],
        weight: Option<&[P]>,
        bias: Option<&[P]>,
    ) -> SpanCoefs {
        let mut k = SpanCoefs {
            pivot: [0.0; CHUNK],
            shifted_mean: [0.0; CHUNK],
            scale: [0.0; CHUNK],
            shift: [0.0; CHUNK],
        };
        for (i, ch) in (first..first + len).enumerate() {
            let g = ch / d;
            k.pivot[i] = xs[g * d].to_f32();
            k.shifted_mean[i] = shifted_mean[g];
            k.scale[i] = rstd[g] * param(weight, ch, 1.0);
            k.shift[i] = param(bias, ch, 0.0);
        }
        k
    }

    /// `y = ((x - p) - m) * scale + shift` over a segment starting at coefficient `at`.
    #[inline(always)]
    pub(super) fn apply(&self, at: usize, x: &[f32], y: &mut [f32]) {
        let k = at..at + x.len();
        for (((((o, v), p), m), a), b) in y
            .iter_mut()
            .zip(x)
            .zip(&self.pivot[k.clone()])
            .zip(&self.shifted_mean[k.clone()])
            .zip(&self.scale[k.clone()])
            .zip(&self.shift[k])
        {
            *o = ((v - p) - m) * a + b;
        }
    }
}

/// NHWC forward, allocating nothing: statistics per batch of groups (walking each sample
/// contiguously; the shifted mean is parked in `mean`), then normalization over contiguous
/// pieces of whole positions, then `mean = pivot + shifted mean`.
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

    // Phase 1: statistics, per (sample, batch of groups); `mean` holds the shifted mean until
    // phase 3. Phase 2: normalize, contiguous pieces of whole positions. Small tensors run both
    // on the calling thread.
    let par = !on_caller(geo);
    let stats = |xs: &[T], bi: usize, mean_b: &mut [f32], rstd_b: &mut [f32]| {
        let b = NhwcBatch::new(c, d, bi * gb, mean_b.len());
        let mut pivots = [0f32; CHUNK];
        for (i, p) in pivots[..b.gb].iter_mut().enumerate() {
            *p = xs[(b.g0 + i) * d].to_f32();
        }
        let bm = nhwc_batch_moments(xs, b, 0..s, &pivots, par);
        for (i, (m, r)) in mean_b.iter_mut().zip(rstd_b.iter_mut()).enumerate() {
            let st = RowStats::from_moments(bm.get(i), pivots[i], eps);
            (*m, *r) = (st.shifted_mean, st.rstd);
        }
    };
    let piece = nhwc_piece(c);
    if !par {
        for ((mean_n, rstd_n), xs) in mean
            .chunks_mut(groups)
            .zip(rstd.chunks_mut(groups))
            .zip(x.chunks(sample))
        {
            for (bi, (mean_b, rstd_b)) in
                mean_n.chunks_mut(gb).zip(rstd_n.chunks_mut(gb)).enumerate()
            {
                stats(xs, bi, mean_b, rstd_b);
            }
        }
        for (n, (ys, xs)) in y.chunks_mut(sample).zip(x.chunks(sample)).enumerate() {
            let rows = n * groups..(n + 1) * groups;
            let (sm, rs) = (&mean[rows.clone()], &rstd[rows]);
            for (yp, xp) in ys.chunks_mut(piece).zip(xs.chunks(piece)) {
                normalize_nhwc_piece(xp, yp, xs, c, d, sm, rs, weight, bias, act);
            }
        }
        for (row, m) in mean.iter_mut().enumerate() {
            *m += x[(row / groups) * sample + (row % groups) * d].to_f32();
        }
        return;
    }
    mean.par_chunks_mut(groups)
        .zip(rstd.par_chunks_mut(groups))
        .zip(x.par_chunks(sample))
        .for_each(|((mean_n, rstd_n), xs)| {
            mean_n
                .par_chunks_mut(gb)
                .zip(rstd_n.par_chunks_mut(gb))
                .enumerate()
                .for_each(|(bi, (mean_b, rstd_b))| stats(xs, bi, mean_b, rstd_b));
        });

    let (shifted_mean, rstd) = (&*mean, &*rstd);
    y.par_chunks_mut(sample)
        .zip(x.par_chunks(sample))
        .enumerate()
        .for_each(|(n, (ys, xs))| {
            let rows = n * groups..(n + 1) * groups;
            let (sm, rs) = (&shifted_mean[rows.clone()], &rstd[rows]);
            ys.par_chunks_mut(piece)
                .zip(xs.par_chunks(piece))
                .for_each(|(yp, xp)| {
                    normalize_nhwc_piece(xp, yp, xs, c, d, sm, rs, weight, bias, act)
                });
        });

    // Phase 3: saved mean = pivot + shifted mean.
    mean.par_iter_mut()
        .enumerate()
        .with_min_len(4096)
        .for_each(|(row, m)| *m += x[(row / groups) * sample + (row % groups) * d].to_f32());
}

/// Normalizes a piece of whole positions `xp` of NHWC sample `xs` (`c` channels, `d` per group,
/// the sample's shifted means `sm` and rstds `rs`) into `yp`, then the activation. Compiled for
/// AVX2 too and picked at run time (same operations in the same order, so the same bits).
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn normalize_nhwc_piece<T: Element, P: Element>(
    xp: &[T],
    yp: &mut [T],
    xs: &[T],
    c: usize,
    d: usize,
    sm: &[f32],
    rs: &[f32],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    act: Activation,
) {
    let coefs = |first: usize, len: usize| SpanCoefs::new(first, len, d, xs, sm, rs, weight, bias);
    let (mut bx, mut by) = ([0f32; CHUNK], [0f32; CHUNK]);
    let mut normalize = |span: Range<usize>, k: &SpanCoefs| {
        read_f32(&xp[span.clone()], &mut bx, |xv| {
            write_f32(&mut yp[span], &mut by, |yv| {
                for (yseg, xseg) in yv.chunks_mut(c).zip(xv.chunks(c)) {
                    k.apply(0, xseg, yseg);
                    activate(act, yseg);
                }
            })
        })
    };
    if c <= CHUNK {
        // Spans of whole rows share one set of coefficients.
        let k = coefs(0, c);
        for_each_span(xp.len(), c, |span, _| normalize(span, &k));
    } else {
        // Wide rows: one set per CHUNK channels, applied to every row of the piece (which is
        // in cache).
        for ch0 in (0..c).step_by(CHUNK) {
            let len = CHUNK.min(c - ch0);
            let k = coefs(ch0, len);
            for row in (0..xp.len()).step_by(c) {
                normalize(row + ch0..row + ch0 + len, &k);
            }
        }
    }
}
