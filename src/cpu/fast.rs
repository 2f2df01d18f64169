//! The fast CPU path: f32 accumulation, parallel with rayon, deterministic.
//!
//! Everything here takes validated lengths (the public methods in [`super`] check them first)
//! and writes into buffers the caller allocated once. The forward pass allocates nothing; the
//! backward pass allocates its per-`(n, c)` partials (and, for NHWC, per-block partials).
//!
//! # Statistics
//!
//! Each group row `(n, g)` has a pivot `p`, its first value in logical order
//! (`x[n, g*D, 0]`), subtracted from every value before accumulating and before normalizing,
//! so rounding errors scale with the spread of the row and not with its offset. The row is cut
//! into chunks; a chunk's shifted mean and `m2` are computed exactly in two passes over the
//! (cached) chunk, and chunk states merge with Chan's formula in a fixed pairwise tree (error
//! grows with the tree's depth, not with the number of chunks).
//!
//! - NCHW: a row is one contiguous run, chunks are [`CHUNK`] values; rows run in parallel,
//!   and so do the halves of long rows.
//! - NHWC: a row is `S` runs of `D` values, `C` apart. Groups are taken in batches whose
//!   `gb * D <= CHUNK` channels are a contiguous segment of every position; a chunk is a block
//!   of positions times one group's channels, summed with one accumulator per channel while
//!   walking the segments in memory order. Samples, batches and halves of long position ranges
//!   run in parallel. With `S = 1` the two layouts are the same memory order and the NCHW code
//!   runs.
//!
//! `y = ((x - p) - (mean - p)) * (rstd * w) + b` in f32, rounded once to `T`; the saved mean is
//! `p + (mean - p)` in f32.
//!
//! # Backward
//!
//! Per `(n, c)`: `sum dy` and `sum dy * (x - mean)` (chunked, pairwise), and per row
//! `sum (x - mean)`, whose mean `delta` is the error of the saved f32 mean (up to half an ulp
//! of the row's offset): the backward uses `mean + delta`, so it too scales with the spread of
//! the row rather than its offset. Per row, with `A = mean_row(w*dy)` and
//! `B = mean_row(w*dy*xhat)`: `dx = (rstd*w)*dy - (rstd*rstd*B)*(x - mean - delta) - rstd*A`.
//! `dweight[c]` and `dbias[c]` sum the per-`(n, c)` partials over `n` in order, so the result
//! never depends on scheduling.
//!
//! # Non-finite values
//!
//! A NaN or Inf in a row gives that row a NaN variance (a chunk holding an Inf computes
//! `inf - inf` in its second pass); a row whose statistics or backward coefficients are not
//! finite gets NaN mean, rstd, `y` and `dx`. Other rows are untouched.
//!
//! # Conversions
//!
//! Values are read and written in spans of at most [`CHUNK`] elements through f32 buffers on
//! the stack: f32 data is used in place, f16 goes through `half`'s vectorized slice
//! conversions (one element at a time it would not vectorize), bf16 through its (cheap)
//! per-element conversion.

use crate::config::{Activation, Geometry, Layout};
use crate::dtype::Element;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::any::TypeId;
use std::ops::Range;

/// Values per leaf of the statistics tree, and per conversion span: small enough that a
/// sequential f32 sum over an eighth of it is accurate and that two passes over it hit L1.
pub(crate) const CHUNK: usize = 256;
/// Slices at least this long are split across threads (rows that are few and long).
const PAR_MIN: usize = 1 << 15;
/// Elements per parallel piece when normalizing or writing `dx`.
const PIECE: usize = 1 << 14;
/// Target elements per NHWC spatial block (positions times channels).
const NHWC_BLOCK: usize = 1 << 14;
/// Bounds on the positions per NHWC block: at most `CHUNK` values per channel are summed
/// sequentially; at least 16 keeps the workspace under `numel / 8` for very wide tensors.
const NHWC_MIN_POSITIONS: usize = 16;

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

/// `s` as a slice of `U` when `T` is `U`.
#[inline(always)]
fn cast_slice<T: 'static, U: 'static>(s: &[T]) -> Option<&[U]> {
    if TypeId::of::<T>() == TypeId::of::<U>() {
        // SAFETY: `T` and `U` are the same type (equal `TypeId`s), so this is the same slice
        // with the same length, alignment and lifetime.
        Some(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<U>(), s.len()) })
    } else {
        None
    }
}

/// `s` as a mutable slice of `U` when `T` is `U`.
#[inline(always)]
fn cast_slice_mut<T: 'static, U: 'static>(s: &mut [T]) -> Option<&mut [U]> {
    if TypeId::of::<T>() == TypeId::of::<U>() {
        // SAFETY: as in `cast_slice`; the unique borrow of `s` moves into the result.
        Some(unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<U>(), s.len()) })
    } else {
        None
    }
}

/// A stack buffer for one span.
type Buf = [f32; CHUNK];

/// Stack buffers for the element-wise passes, created once per rayon task (cloning a stack
/// value allocates nothing) and lent down, so that short runs do not pay for initializing
/// buffers of their own.
#[derive(Clone, Copy)]
struct Scratch {
    a: Buf,
    b: Buf,
    c: Buf,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            a: [0.0; CHUNK],
            b: [0.0; CHUNK],
            c: [0.0; CHUNK],
        }
    }
}

/// Calls `f` with `src` (at most [`CHUNK`] values) as f32: `src` itself when `T` is f32,
/// otherwise widened into `buf`.
#[inline(always)]
fn read_f32<T: Element, R>(src: &[T], buf: &mut Buf, f: impl FnOnce(&[f32]) -> R) -> R {
    if let Some(s) = cast_slice::<T, f32>(src) {
        return f(s);
    }
    let b = &mut buf[..src.len()];
    if let Some(h) = cast_slice::<T, f16>(src) {
        h.convert_to_f32_slice(b);
    } else {
        for (d, s) in b.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    f(b)
}

/// Calls `f` to fill `dst.len()` (at most [`CHUNK`]) f32 values and stores them rounded once
/// into `dst`; `f` writes into `dst` directly when `T` is f32.
#[inline(always)]
fn write_f32<T: Element>(dst: &mut [T], buf: &mut Buf, f: impl FnOnce(&mut [f32])) {
    if let Some(d) = cast_slice_mut::<T, f32>(dst) {
        return f(d);
    }
    let b = &mut buf[..dst.len()];
    f(b);
    if let Some(h) = cast_slice_mut::<T, f16>(dst) {
        h.convert_from_f32_slice(b);
    } else {
        for (d, s) in dst.iter_mut().zip(b.iter()) {
            *d = T::from_f32(*s);
        }
    }
}

/// Cuts `len` values (whole rows of `c` values, NHWC positions) into spans of at most
/// [`CHUNK`]: whole rows when `c <= CHUNK`, otherwise pieces of one row. Calls
/// `f(range, first channel)`; inside a span, `span.chunks(c)` yields segments whose channels
/// are `first..first + segment.len()`.
#[inline(always)]
fn for_each_span(len: usize, c: usize, mut f: impl FnMut(Range<usize>, usize)) {
    if c <= CHUNK {
        let step = (CHUNK / c) * c;
        let mut s = 0;
        while s < len {
            let e = (s + step).min(len);
            f(s..e, 0);
            s = e;
        }
    } else {
        let mut row = 0;
        while row < len {
            let mut s = row;
            while s < row + c {
                let e = (s + CHUNK).min(row + c);
                f(s..e, s - row);
                s = e;
            }
            row += c;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Count, mean and sum of squared deviations of a set of values (a Welford/Chan state).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Moments {
    count: usize,
    mean: f32,
    m2: f32,
}

impl Moments {
    /// Chan's parallel merge; an empty partner leaves the other unchanged.
    #[inline]
    fn merge(self, other: Moments) -> Moments {
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
struct RowStats {
    shifted_mean: f32,
    mean: f32,
    rstd: f32,
}

impl RowStats {
    /// The statistics of an empty row: mean 0, `rstd = 1 / sqrt(eps)` (the f32 nearest to it:
    /// computed in f64 and rounded once, as it involves no data).
    fn empty(eps: f32) -> RowStats {
        RowStats {
            shifted_mean: 0.0,
            mean: 0.0,
            rstd: (1.0 / f64::from(eps).sqrt()) as f32,
        }
    }

    fn from_moments(m: Moments, pivot: f32, eps: f32) -> RowStats {
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

/// Folds eight lane accumulators in a fixed order.
#[inline(always)]
fn fold8(v: [f32; 8]) -> f32 {
    ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
}

/// Sum of `f(v)` over `v` with eight independent accumulators (vectorizable, and each one sums
/// an eighth of the values).
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, &e) in acc.iter_mut().zip(c) {
            *a += f(e);
        }
    }
    for (a, &e) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(e);
    }
    fold8(acc)
}

/// Pairwise sum of a short slice (per-group sums of per-channel partials).
fn pairwise_sum(v: &[f32]) -> f32 {
    if v.len() <= 8 {
        v.iter().fold(0.0, |a, &e| a + e)
    } else {
        let (a, b) = v.split_at(v.len() / 2);
        pairwise_sum(a) + pairwise_sum(b)
    }
}

/// Exact two-pass moments of 1 to [`CHUNK`] values, shifted by `pivot`.
fn leaf_moments<T: Element>(x: &[T], pivot: f32, buf: &mut Buf) -> Moments {
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
fn split_point(len: usize) -> usize {
    (len.div_ceil(CHUNK) / 2) * CHUNK
}

/// Moments of a contiguous run, shifted by `pivot`: a fixed pairwise tree of chunk states,
/// with long halves computed in parallel (the tree, hence the result, does not change).
fn run_moments<T: Element>(x: &[T], pivot: f32, buf: &mut Buf) -> Moments {
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

/// Sums over a backward run: `sum dy`, `sum dy * (x - mean)` and `sum (x - mean)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct BwdSums {
    dy: f32,
    dy_xm: f32,
    xm: f32,
}

impl BwdSums {
    #[inline]
    fn add(self, o: BwdSums) -> BwdSums {
        BwdSums {
            dy: self.dy + o.dy,
            dy_xm: self.dy_xm + o.dy_xm,
            xm: self.xm + o.xm,
        }
    }
}

/// [`BwdSums`] of 1 to [`CHUNK`] values, eight lanes each.
fn leaf_sums<T: Element, U: Element>(dy: &[U], x: &[T], mean: f32, scr: &mut Scratch) -> BwdSums {
    read_f32(dy, &mut scr.a, |dy| {
        read_f32(x, &mut scr.b, |x| {
            let (mut a, mut b, mut c) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            let mut dyc = dy.chunks_exact(8);
            let mut xc = x.chunks_exact(8);
            for (d8, x8) in (&mut dyc).zip(&mut xc) {
                for k in 0..8 {
                    let xm = x8[k] - mean;
                    a[k] += d8[k];
                    b[k] += d8[k] * xm;
                    c[k] += xm;
                }
            }
            for (k, (d, xv)) in dyc.remainder().iter().zip(xc.remainder()).enumerate() {
                let xm = xv - mean;
                a[k] += d;
                b[k] += d * xm;
                c[k] += xm;
            }
            BwdSums {
                dy: fold8(a),
                dy_xm: fold8(b),
                xm: fold8(c),
            }
        })
    })
}

/// [`BwdSums`] of a contiguous run, pairwise over chunks.
fn run_sums<T: Element, U: Element>(dy: &[U], x: &[T], mean: f32, scr: &mut Scratch) -> BwdSums {
    if dy.len() <= CHUNK {
        return if dy.is_empty() {
            BwdSums::default()
        } else {
            leaf_sums(dy, x, mean, scr)
        };
    }
    let mid = split_point(dy.len());
    let (dya, dyb) = dy.split_at(mid);
    let (xa, xb) = x.split_at(mid);
    let (sa, sb) = if dy.len() >= PAR_MIN {
        rayon::join(
            || run_sums(dya, xa, mean, scr),
            || run_sums(dyb, xb, mean, &mut Scratch::new()),
        )
    } else {
        let sa = run_sums(dya, xa, mean, scr);
        (sa, run_sums(dyb, xb, mean, scr))
    };
    sa.add(sb)
}

/// Calls `f(channel in group, sub-range)` for the channel runs that cross a block of an NCHW
/// row: the block covers row offsets `start..start + len`, runs are `s` long, and the
/// sub-range is relative to the block.
#[inline(always)]
fn for_each_channel_run(
    start: usize,
    len: usize,
    s: usize,
    mut f: impl FnMut(usize, Range<usize>),
) {
    let (mut i, mut dc) = (0, start / s);
    while i < len {
        let end = ((dc + 1) * s - start).min(len);
        f(dc, i..end);
        (i, dc) = (end, dc + 1);
    }
}

/// Calls `f(offset in row, piece, scratch)` over a row cut into pieces: the whole row at once
/// when it is short, parallel pieces of [`PIECE`] elements (each with its own scratch) when
/// it is long.
fn for_each_row_piece<E: Send>(
    out: &mut [E],
    scr: &mut Scratch,
    f: impl Fn(usize, &mut [E], &mut Scratch) + Sync,
) {
    if out.len() < PAR_MIN {
        f(0, out, scr);
    } else {
        out.par_chunks_mut(PIECE)
            .enumerate()
            .for_each_with(Scratch::new(), |scr, (p, piece)| f(p * PIECE, piece, scr));
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Applies `act` in place (a second loop over a block in cache, so that the plain affine loop
/// stays vectorized when there is no activation).
#[inline(always)]
fn activate(act: Activation, v: &mut [f32]) {
    if act != Activation::None {
        for o in v {
            *o = act.apply_f32(*o);
        }
    }
}

#[inline(always)]
fn param<P: Element>(p: Option<&[P]>, c: usize, default: f32) -> f32 {
    p.map_or(default, |p| p[c].to_f32())
}

/// Rows per rayon task at minimum, so that tiny rows do not become tiny tasks.
fn min_rows_per_task(row_len: usize) -> usize {
    (4096 / row_len.max(1)).max(1)
}

/// Positions per NHWC spatial block for `c` channels.
fn nhwc_block_positions(c: usize) -> usize {
    (NHWC_BLOCK / c.max(1)).clamp(NHWC_MIN_POSITIONS, CHUNK)
}

/// Pieces of whole NHWC positions for the parallel element-wise passes.
fn nhwc_piece(c: usize) -> usize {
    (PIECE / c).max(1) * c
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

/// Forward pass into `y`, `mean`, `rstd` (lengths already validated).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Element, P: Element>(
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
    if geo.rows() == 0 {
        return;
    }
    if geo.row_len() == 0 {
        let e = RowStats::empty(eps);
        mean.fill(e.mean);
        rstd.fill(e.rstd);
        return;
    }
    // With one spatial position the two layouts are the same memory order.
    if geo.layout == Layout::Nchw || geo.s == 1 {
        forward_nchw(geo, eps, act, x, weight, bias, y, mean, rstd)
    } else {
        forward_nhwc(geo, eps, act, x, weight, bias, y, mean, rstd)
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_nchw<T: Element, P: Element>(
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
    let (l, s, d, groups) = (geo.row_len(), geo.s, geo.d, geo.g);
    y.par_chunks_mut(l)
        .zip(x.par_chunks(l))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .with_min_len(min_rows_per_task(l))
        .for_each_with(
            Scratch::new(),
            |scr, (row, ((yr, xr), (mean_out, rstd_out)))| {
                let g = row % groups;
                let pivot = xr[0].to_f32();
                let st = RowStats::from_moments(run_moments(xr, pivot, &mut scr.a), pivot, eps);
                *mean_out = st.mean;
                *rstd_out = st.rstd;
                let sm = st.shifted_mean;
                for_each_row_piece(yr, scr, |off, yp, scr| {
                    let xp = &xr[off..off + yp.len()];
                    for (bi, (xb, yb)) in xp.chunks(CHUNK).zip(yp.chunks_mut(CHUNK)).enumerate() {
                        read_f32(xb, &mut scr.a, |xv| {
                            write_f32(yb, &mut scr.b, |yv| {
                                for_each_channel_run(off + bi * CHUNK, xv.len(), s, |dc, k| {
                                    let c = g * d + dc;
                                    let scale = st.rstd * param(weight, c, 1.0);
                                    let shift = param(bias, c, 0.0);
                                    for (o, v) in yv[k.clone()].iter_mut().zip(&xv[k.clone()]) {
                                        *o = ((v - pivot) - sm) * scale + shift;
                                    }
                                    activate(act, &mut yv[k]);
                                })
                            })
                        });
                    }
                });
            },
        );
}

/// NHWC group batch: `gb` consecutive groups whose `gb * D <= CHUNK` channels are read as one
/// contiguous segment of each position (one group when `D > CHUNK`).
#[derive(Clone, Copy, Debug)]
struct NhwcBatch {
    /// Channels per position row.
    c: usize,
    /// Channels per group.
    d: usize,
    /// First group of the batch.
    g0: usize,
    /// Groups in the batch.
    gb: usize,
    /// Positions per leaf of the statistics tree.
    pb: usize,
}

impl NhwcBatch {
    /// Groups per batch for `d` channels per group and `groups` groups.
    fn groups_per_batch(d: usize, groups: usize) -> usize {
        if d > CHUNK {
            1
        } else {
            (CHUNK / d).min(groups)
        }
    }

    fn new(c: usize, d: usize, g0: usize, gb: usize) -> NhwcBatch {
        // A leaf reads about NHWC_BLOCK values (twice, from cache), at most CHUNK positions
        // (each channel accumulator sums at most CHUNK values in sequence).
        let pb = (NHWC_BLOCK / (gb * d)).clamp(1, CHUNK);
        NhwcBatch { c, d, g0, gb, pb }
    }
}

/// Moments of the groups of an [`NhwcBatch`] over some positions: one count for all (every
/// group has the same number of values), shifted means and `m2` per group.
#[derive(Clone, Copy, Debug)]
struct BatchMoments {
    count: usize,
    mean: Buf,
    m2: Buf,
}

impl BatchMoments {
    fn get(&self, i: usize) -> Moments {
        Moments {
            count: self.count,
            mean: self.mean[i],
            m2: self.m2[i],
        }
    }

    fn merge(mut self, other: &BatchMoments, gb: usize) -> BatchMoments {
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
/// run in parallel. Nothing is allocated: all state is on the stack.
fn nhwc_batch_moments<T: Element>(
    xs: &[T],
    b: NhwcBatch,
    pos: Range<usize>,
    pivots: &Buf,
) -> BatchMoments {
    if pos.len() > b.pb {
        let mid = pos.start + (pos.len().div_ceil(b.pb) / 2) * b.pb;
        let (lo, hi) = (pos.start..mid, mid..pos.end);
        let (ma, mb) = if pos.len() * b.gb * b.d >= PAR_MIN {
            rayon::join(
                || nhwc_batch_moments(xs, b, lo, pivots),
                || nhwc_batch_moments(xs, b, hi, pivots),
            )
        } else {
            (
                nhwc_batch_moments(xs, b, lo, pivots),
                nhwc_batch_moments(xs, b, hi, pivots),
            )
        };
        return ma.merge(&mb, b.gb);
    }
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
struct SpanCoefs {
    pivot: Buf,
    shifted_mean: Buf,
    scale: Buf,
    shift: Buf,
}

impl SpanCoefs {
    /// Coefficients of channels `first..first + len` (`len <= CHUNK`) of one NHWC sample `xs`
    /// (the pivot of group `g` is `xs[g * d]`), from its rows' shifted means and rstd.
    #[allow(clippy::too_many_arguments)]
    fn new<T: Element, P: Element>(
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
    fn apply(&self, at: usize, x: &[f32], y: &mut [f32]) {
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
fn forward_nhwc<T: Element, P: Element>(
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
    // phase 3.
    mean.par_chunks_mut(groups)
        .zip(rstd.par_chunks_mut(groups))
        .zip(x.par_chunks(sample))
        .for_each(|((mean_n, rstd_n), xs)| {
            mean_n
                .par_chunks_mut(gb)
                .zip(rstd_n.par_chunks_mut(gb))
                .enumerate()
                .for_each(|(bi, (mean_b, rstd_b))| {
                    let b = NhwcBatch::new(c, d, bi * gb, mean_b.len());
                    let mut pivots = [0f32; CHUNK];
                    for (i, p) in pivots[..b.gb].iter_mut().enumerate() {
                        *p = xs[(b.g0 + i) * d].to_f32();
                    }
                    let bm = nhwc_batch_moments(xs, b, 0..s, &pivots);
                    for (i, (m, r)) in mean_b.iter_mut().zip(rstd_b.iter_mut()).enumerate() {
                        let st = RowStats::from_moments(bm.get(i), pivots[i], eps);
                        (*m, *r) = (st.shifted_mean, st.rstd);
                    }
                });
        });

    // Phase 2: normalize, contiguous pieces of whole positions.
    let piece = nhwc_piece(c);
    let (shifted_mean, rstd) = (&*mean, &*rstd);
    y.par_chunks_mut(sample)
        .zip(x.par_chunks(sample))
        .enumerate()
        .for_each(|(n, (ys, xs))| {
            let rows = n * groups..(n + 1) * groups;
            let (sm, rs) = (&shifted_mean[rows.clone()], &rstd[rows]);
            let coefs =
                |first: usize, len: usize| SpanCoefs::new(first, len, d, xs, sm, rs, weight, bias);
            ys.par_chunks_mut(piece)
                .zip(xs.par_chunks(piece))
                .for_each(|(yp, xp)| {
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
                        // Wide rows: one set per CHUNK channels, applied to every row of the
                        // piece (which is in cache).
                        for ch0 in (0..c).step_by(CHUNK) {
                            let len = CHUNK.min(c - ch0);
                            let k = coefs(ch0, len);
                            for row in (0..xp.len()).step_by(c) {
                                normalize(row + ch0..row + ch0 + len, &k);
                            }
                        }
                    }
                });
        });

    // Phase 3: saved mean = pivot + shifted mean.
    mean.par_iter_mut()
        .enumerate()
        .with_min_len(4096)
        .for_each(|(row, m)| *m += x[(row / groups) * sample + (row % groups) * d].to_f32());
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Backward coefficients of one row: `dx = k1[c]*dy - k2*(x - mean) - k3` with
/// `k1[c] = rstd*w[c]`; returns `(k2, k3)`, both NaN when anything is not finite.
///
/// `sdy`, `sdyx` are the row's per-channel `sum dy` and `sum dy*(x - mean)` with the saved
/// mean, `sum_xm` the row's `sum (x - mean)`. The saved mean is f32 and can be off by half an
/// ulp of the row's offset; `delta = sum_xm / L` is that residual, computed from differences
/// that are exact when values sit close to the mean, so `mean + delta` is the row's mean to the
/// precision of its spread. `sdyx` is corrected in place to `sum dy*(x - (mean + delta))` (it
/// also feeds `dweight`), and `k3` absorbs `-k2*delta`.
#[allow(clippy::too_many_arguments)]
fn row_coefs<P: Element>(
    weight: Option<&[P]>,
    g: usize,
    sdy: &[f32],
    sdyx: &mut [f32],
    sum_xm: f32,
    row_len: usize,
    mean: f32,
    rstd: f32,
) -> (f32, f32) {
    let d = sdy.len();
    let inv_l = 1.0 / row_len as f32;
    let delta = sum_xm * inv_l;
    for (b, a) in sdyx.iter_mut().zip(sdy) {
        *b -= delta * a;
    }
    let (sum_wdy, sum_wdyx) = match weight {
        None => (pairwise_sum(sdy), pairwise_sum(sdyx)),
        Some(w) => {
            let w = &w[g * d..(g + 1) * d];
            let (mut a, mut b) = (0f32, 0f32);
            for ((wc, sa), sb) in w.iter().zip(sdy).zip(sdyx.iter()) {
                let wc = wc.to_f32();
                a += wc * sa;
                b += wc * sb;
            }
            (a, b)
        }
    };
    // A = mean_row(w*dy), B = mean_row(w*dy*xhat) = rstd * sum(w*dy*(x - mean)) / L.
    let a = sum_wdy * inv_l;
    let b = rstd * sum_wdyx * inv_l;
    let k2 = rstd * rstd * b;
    let k3 = rstd * a - k2 * delta;
    if k2.is_finite() && k3.is_finite() && rstd.is_finite() && mean.is_finite() {
        (k2, k3)
    } else {
        (f32::NAN, f32::NAN)
    }
}

/// Backward pass into `dx`; returns `(dweight, dbias)` in f32, `C` values each (lengths
/// already validated, `mean`/`rstd` the saved statistics).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Element, U: Element, P: Element>(
    geo: &Geometry,
    dy: &[U],
    x: &[T],
    mean: &[f32],
    rstd: &[f32],
    weight: Option<&[P]>,
    dx: &mut [T],
) -> (Vec<f32>, Vec<f32>) {
    let (c, d, groups, n_count) = (geo.c, geo.d, geo.g, geo.n);
    let mut dweight = vec![0f32; c];
    let mut dbias = vec![0f32; c];
    if geo.rows() == 0 || geo.row_len() == 0 {
        return (dweight, dbias);
    }
    // Per-(n, c) partials: sum dy and sum dy*(x - mean).
    let mut sdy = vec![0f32; n_count * c];
    let mut sdyx = vec![0f32; n_count * c];
    // With one spatial position the two layouts are the same memory order.
    if geo.layout == Layout::Nchw || geo.s == 1 {
        backward_nchw(geo, dy, x, mean, rstd, weight, dx, &mut sdy, &mut sdyx);
    } else {
        backward_nhwc(geo, dy, x, mean, rstd, weight, dx, &mut sdy, &mut sdyx);
    }
    // Reduce over n in order, per channel: deterministic whatever the scheduling.
    for (n, (sdy_n, sdyx_n)) in sdy.chunks(c).zip(sdyx.chunks(c)).enumerate() {
        for g in 0..groups {
            let r = rstd[n * groups + g];
            let ch = g * d..(g + 1) * d;
            for (((dw, db), a), b) in dweight[ch.clone()]
                .iter_mut()
                .zip(&mut dbias[ch.clone()])
                .zip(&sdy_n[ch.clone()])
                .zip(&sdyx_n[ch])
            {
                *dw += r * b;
                *db += a;
            }
        }
    }
    (dweight, dbias)
}

#[allow(clippy::too_many_arguments)]
fn backward_nchw<T: Element, U: Element, P: Element>(
    geo: &Geometry,
    dy: &[U],
    x: &[T],
    mean: &[f32],
    rstd: &[f32],
    weight: Option<&[P]>,
    dx: &mut [T],
    sdy: &mut [f32],
    sdyx: &mut [f32],
) {
    let (l, s, d, groups) = (geo.row_len(), geo.s, geo.d, geo.g);
    dx.par_chunks_mut(l)
        .zip(x.par_chunks(l).zip(dy.par_chunks(l)))
        .zip(sdy.par_chunks_mut(d).zip(sdyx.par_chunks_mut(d)))
        .enumerate()
        .with_min_len(min_rows_per_task(l))
        .for_each_with(
            Scratch::new(),
            |scr, (row, ((dxr, (xr, dyr)), (sdy_r, sdyx_r)))| {
                let g = row % groups;
                let (m, r) = (mean[row], rstd[row]);
                let sum_xm = nchw_row_sums(xr, dyr, s, m, sdy_r, sdyx_r, scr);
                let (k2, k3) = row_coefs(weight, g, sdy_r, sdyx_r, sum_xm, l, m, r);
                for_each_row_piece(dxr, scr, |off, dp, scr| {
                    let (xp, dyp) = (&xr[off..off + dp.len()], &dyr[off..off + dp.len()]);
                    for (bi, ((xb, db), ob)) in xp
                        .chunks(CHUNK)
                        .zip(dyp.chunks(CHUNK))
                        .zip(dp.chunks_mut(CHUNK))
                        .enumerate()
                    {
                        read_f32(xb, &mut scr.a, |xv| {
                            read_f32(db, &mut scr.b, |dv| {
                                write_f32(ob, &mut scr.c, |ov| {
                                    for_each_channel_run(off + bi * CHUNK, xv.len(), s, |dc, k| {
                                        let k1 = r * param(weight, g * d + dc, 1.0);
                                        for ((o, xi), di) in
                                            ov[k.clone()].iter_mut().zip(&xv[k.clone()]).zip(&dv[k])
                                        {
                                            *o = k1 * di - k2 * (xi - m) - k3;
                                        }
                                    })
                                })
                            })
                        });
                    }
                });
            },
        );
}

/// Per-channel `sum dy` and `sum dy*(x - mean)` of one NCHW row (into `sdy`, `sdyx`), and
/// the row's `sum (x - mean)`. Runs of at least [`CHUNK`] values get a pairwise tree each;
/// shorter runs are summed in sequence, block by block, so that their conversions and loops
/// are amortized over whole blocks.
#[allow(clippy::too_many_arguments)]
fn nchw_row_sums<T: Element, U: Element>(
    xr: &[T],
    dyr: &[U],
    s: usize,
    mean: f32,
    sdy: &mut [f32],
    sdyx: &mut [f32],
    scr: &mut Scratch,
) -> f32 {
    let mut sum_xm = 0f32;
    if s >= CHUNK {
        for (dc, (a, b)) in sdy.iter_mut().zip(sdyx.iter_mut()).enumerate() {
            let run = dc * s..(dc + 1) * s;
            let sums = run_sums(&dyr[run.clone()], &xr[run], mean, scr);
            (*a, *b) = (sums.dy, sums.dy_xm);
            sum_xm += sums.xm;
        }
        return sum_xm;
    }
    sdy.fill(0.0);
    sdyx.fill(0.0);
    for (bi, (xb, db)) in xr.chunks(CHUNK).zip(dyr.chunks(CHUNK)).enumerate() {
        read_f32(xb, &mut scr.a, |xv| {
            read_f32(db, &mut scr.b, |dv| {
                for_each_channel_run(bi * CHUNK, xv.len(), s, |dc, k| {
                    let (mut a, mut b, mut e) = (0f32, 0f32, 0f32);
                    for (xi, di) in xv[k.clone()].iter().zip(&dv[k]) {
                        let xm = xi - mean;
                        a += di;
                        b += di * xm;
                        e += xm;
                    }
                    sdy[dc] += a;
                    sdyx[dc] += b;
                    sum_xm += e;
                })
            })
        });
    }
    sum_xm
}

#[allow(clippy::too_many_arguments)]
fn backward_nhwc<T: Element, U: Element, P: Element>(
    geo: &Geometry,
    dy: &[U],
    x: &[T],
    mean: &[f32],
    rstd: &[f32],
    weight: Option<&[P]>,
    dx: &mut [T],
    sdy: &mut [f32],
    sdyx: &mut [f32],
) {
    let (n_count, c, s, d, groups, l) = (geo.n, geo.c, geo.s, geo.d, geo.g, geo.row_len());
    let pb = nhwc_block_positions(c);
    let nb = s.div_ceil(pb);

    // Phase 1: per (n, block): per-channel sums over the block's positions, walking memory
    // contiguously. Layout of `ws`:
    // [n][block][sum dy (C) | sum dy*(x - mean) (C) | sum (x - mean) (C)].
    let mut ws = vec![0f32; n_count * nb * 3 * c];
    ws.par_chunks_mut(3 * c).enumerate().for_each_init(
        || vec![0f32; c],
        |mc, (i, out)| {
            let (n, blk) = (i / nb, i % nb);
            let (s0, s1) = (blk * pb, ((blk + 1) * pb).min(s));
            let range = (n * s + s0) * c..(n * s + s1) * c;
            let (xs, dys) = (&x[range.clone()], &dy[range]);
            for (ch, m) in mc.iter_mut().enumerate() {
                *m = mean[n * groups + ch / d];
            }
            let (a, rest) = out.split_at_mut(c);
            let (b, e) = rest.split_at_mut(c);
            let (mut bx, mut bd) = ([0f32; CHUNK], [0f32; CHUNK]);
            for_each_span(xs.len(), c, |span, ch0| {
                read_f32(&xs[span.clone()], &mut bx, |xv| {
                    read_f32(&dys[span], &mut bd, |dv| {
                        for (xseg, dseg) in xv.chunks(c).zip(dv.chunks(c)) {
                            let k = ch0..ch0 + xseg.len();
                            for (((((a, b), e), xi), di), m) in a[k.clone()]
                                .iter_mut()
                                .zip(&mut b[k.clone()])
                                .zip(&mut e[k.clone()])
                                .zip(xseg)
                                .zip(dseg)
                                .zip(&mc[k])
                            {
                                let xm = xi - m;
                                *a += di;
                                *b += di * xm;
                                *e += xm;
                            }
                        }
                    })
                })
            });
        },
    );

    // Phase 2: pairwise tree over the blocks of each sample, then the row coefficients.
    let mut k2 = vec![0f32; n_count * groups];
    let mut k3 = vec![0f32; n_count * groups];
    ws.par_chunks_mut(nb * 3 * c)
        .zip(sdy.par_chunks_mut(c).zip(sdyx.par_chunks_mut(c)))
        .zip(k2.par_chunks_mut(groups).zip(k3.par_chunks_mut(groups)))
        .enumerate()
        .for_each(|(n, ((p, (sdy_n, sdyx_n)), (k2_n, k3_n)))| {
            let w = 3 * c;
            let mut step = 1;
            while step < nb {
                let mut b = 0;
                while b + step < nb {
                    let (lo, hi) = p.split_at_mut((b + step) * w);
                    for (u, v) in lo[b * w..(b + 1) * w].iter_mut().zip(&hi[..w]) {
                        *u += v;
                    }
                    b += 2 * step;
                }
                step *= 2;
            }
            sdy_n.copy_from_slice(&p[..c]);
            sdyx_n.copy_from_slice(&p[c..2 * c]);
            let sxm = &p[2 * c..w];
            for g in 0..groups {
                let row = n * groups + g;
                let ch = g * d..(g + 1) * d;
                (k2_n[g], k3_n[g]) = row_coefs(
                    weight,
                    g,
                    &sdy_n[ch.clone()],
                    &mut sdyx_n[ch.clone()],
                    pairwise_sum(&sxm[ch]),
                    l,
                    mean[row],
                    rstd[row],
                );
            }
        });

    // Phase 3: dx, per-channel coefficients (structure of arrays), contiguous pieces.
    let mut k1c = vec![0f32; n_count * c];
    let mut k2c = vec![0f32; n_count * c];
    let mut k3c = vec![0f32; n_count * c];
    let mut mcs = vec![0f32; n_count * c];
    for n in 0..n_count {
        for g in 0..groups {
            let row = n * groups + g;
            for ch in g * d..(g + 1) * d {
                let i = n * c + ch;
                k1c[i] = rstd[row] * param(weight, ch, 1.0);
                k2c[i] = k2[row];
                k3c[i] = k3[row];
                mcs[i] = mean[row];
            }
        }
    }
    let piece = nhwc_piece(c);
    dx.par_chunks_mut(s * c)
        .zip(x.par_chunks(s * c).zip(dy.par_chunks(s * c)))
        .enumerate()
        .for_each(|(n, (dxs, (xs, dys)))| {
            let k = n * c..(n + 1) * c;
            let (k1, k2, k3, mn) = (&k1c[k.clone()], &k2c[k.clone()], &k3c[k.clone()], &mcs[k]);
            dxs.par_chunks_mut(piece)
                .zip(xs.par_chunks(piece).zip(dys.par_chunks(piece)))
                .for_each(|(op, (xp, dp))| {
                    let (mut bx, mut bd, mut bo) = ([0f32; CHUNK], [0f32; CHUNK], [0f32; CHUNK]);
                    for_each_span(xp.len(), c, |span, ch0| {
                        read_f32(&xp[span.clone()], &mut bx, |xv| {
                            read_f32(&dp[span.clone()], &mut bd, |dv| {
                                write_f32(&mut op[span], &mut bo, |ov| {
                                    for ((oseg, xseg), dseg) in
                                        ov.chunks_mut(c).zip(xv.chunks(c)).zip(dv.chunks(c))
                                    {
                                        let k = ch0..ch0 + xseg.len();
                                        for ((((((o, xi), di), a), b), cc), m) in oseg
                                            .iter_mut()
                                            .zip(xseg)
                                            .zip(dseg)
                                            .zip(&k1[k.clone()])
                                            .zip(&k2[k.clone()])
                                            .zip(&k3[k.clone()])
                                            .zip(&mn[k])
                                        {
                                            *o = a * di - b * (xi - m) - cc;
                                        }
                                    }
                                })
                            })
                        })
                    });
                });
        });
}

// ---------------------------------------------------------------------------------------------
// Backward of an activation
// ---------------------------------------------------------------------------------------------

/// The gradient of the pre-activation `z = xhat * w + b` of `y = act(z)`: `dz = dy * act'(z)`,
/// in f32, same layout as `x`. The backward of the whole operator is then the plain backward
/// of `dz`.
///
/// `xhat` must be the forward pass's to the precision of the row's spread, but the saved f32
/// mean can be off by half an ulp of the row's offset; so each row's residual
/// `delta = sum(x - mean) / L` is computed first (as the plain backward does) and
/// `xhat = (x - mean - delta) * rstd`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn activation_grad<T: Element, P: Element>(
    geo: &Geometry,
    act: Activation,
    dy: &[T],
    x: &[T],
    mean: &[f32],
    rstd: &[f32],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
) -> Vec<f32> {
    let (c, d, s, groups, l) = (geo.c, geo.d, geo.s, geo.g, geo.row_len());
    let mut dz = vec![0f32; geo.numel()];
    if geo.numel() == 0 {
        return dz;
    }
    // Per-row corrected means, mean + delta, kept as (mean, delta) to stay exact.
    let mut delta = vec![0f32; geo.rows()];
    if geo.layout == Layout::Nchw || s == 1 {
        delta
            .par_iter_mut()
            .zip(x.par_chunks(l))
            .enumerate()
            .with_min_len(min_rows_per_task(l))
            .for_each_init(Scratch::new, |scr, (row, (dl, xr))| {
                *dl = sum_centered(xr, mean[row], &mut scr.a) / l as f32;
            });
    } else {
        delta
            .par_chunks_mut(groups)
            .zip(x.par_chunks(s * c))
            .enumerate()
            .for_each(|(n, (dn, xs))| {
                // per channel: blocks of CHUNK positions summed in order, then the channels of
                // each group in order
                let mut total = vec![0f32; c];
                let mut part = vec![0f32; c];
                for blk in xs.chunks(CHUNK * c) {
                    part.fill(0.0);
                    for pos in blk.chunks(c) {
                        for (ch, (p, v)) in part.iter_mut().zip(pos).enumerate() {
                            *p += v.to_f32() - mean[n * groups + ch / d];
                        }
                    }
                    for (t, p) in total.iter_mut().zip(&part) {
                        *t += p;
                    }
                }
                for (g, dg) in dn.iter_mut().enumerate() {
                    *dg = pairwise_sum(&total[g * d..(g + 1) * d]) / l as f32;
                }
            });
    }
    let z_grad = |row: usize, ch: usize, xv: f32, dv: f32| -> f32 {
        let xhat = ((xv - mean[row]) - delta[row]) * rstd[row];
        let z = xhat * param(weight, ch, 1.0) + param(bias, ch, 0.0);
        dv * act.derivative_f32(z)
    };
    if geo.layout == Layout::Nchw || s == 1 {
        dz.par_chunks_mut(l)
            .zip(x.par_chunks(l).zip(dy.par_chunks(l)))
            .enumerate()
            .with_min_len(min_rows_per_task(l))
            .for_each(|(row, (zr, (xr, dyr)))| {
                let g = row % groups;
                for (j, ((o, xv), dv)) in zr.iter_mut().zip(xr).zip(dyr).enumerate() {
                    *o = z_grad(row, g * d + j / s, xv.to_f32(), dv.to_f32());
                }
            });
    } else {
        let piece = nhwc_piece(c);
        dz.par_chunks_mut(piece)
            .zip(x.par_chunks(piece).zip(dy.par_chunks(piece)))
            .enumerate()
            .for_each(|(pi, (zp, (xp, dyp)))| {
                let start = pi * piece; // a whole number of positions
                for (j, ((o, xv), dv)) in zp.iter_mut().zip(xp).zip(dyp).enumerate() {
                    let i = start + j;
                    let (n, ch) = (i / (s * c), i % c);
                    *o = z_grad(n * groups + ch / d, ch, xv.to_f32(), dv.to_f32());
                }
            });
    }
    dz
}

/// `sum (x - mean)` of a contiguous run, in blocks of [`CHUNK`] with eight lanes each.
fn sum_centered<T: Element>(x: &[T], mean: f32, buf: &mut Buf) -> f32 {
    let mut total = 0f32;
    for blk in x.chunks(CHUNK) {
        total += read_f32(blk, buf, |v| lane_sum(v, |e| e - mean));
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn merge_short_circuits_empty_partners() {
        let a = Moments {
            count: 3,
            mean: 2.0,
            m2: 5.0,
        };
        assert_eq!(a.merge(Moments::default()), a);
        assert_eq!(Moments::default().merge(a), a);
    }

    #[test]
    fn merge_matches_direct_moments() {
        let v: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.25).collect();
        let direct_mean = v.iter().map(|&e| e as f64).sum::<f64>() / 1000.0;
        let direct_m2: f64 = v.iter().map(|&e| (e as f64 - direct_mean).powi(2)).sum();
        let m = run_moments(&v, 0.0, &mut [0.0; CHUNK]);
        assert_eq!(m.count, 1000);
        assert!((m.mean as f64 - direct_mean).abs() < 1e-5 * direct_mean);
        assert!((m.m2 as f64 - direct_m2).abs() < 1e-5 * direct_m2);
    }

    #[test]
    fn split_point_keeps_whole_chunks_on_the_left() {
        assert_eq!(split_point(257), 256);
        assert_eq!(split_point(512), 256);
        assert_eq!(split_point(1000), 512);
        assert!(split_point(CHUNK + 1) < CHUNK + 1);
    }

    #[test]
    fn chunk_with_inf_gives_nan_variance() {
        let mut v = vec![1.0f32; 10];
        v[3] = f32::INFINITY;
        let st = RowStats::from_moments(leaf_moments(&v, 1.0, &mut [0.0; CHUNK]), 1.0, 1e-5);
        assert!(st.rstd.is_nan() && st.mean.is_nan());
    }

    #[test]
    fn spans_cover_everything_once_with_the_right_channels() {
        for (len, c) in [
            (12, 4),
            (1000, 4),
            (600, 600),
            (1800, 600),
            (0, 3),
            (257 * 3, 257),
        ] {
            let mut seen = vec![usize::MAX; len];
            for_each_span(len, c, |span, ch0| {
                assert!(span.len() <= CHUNK && !span.is_empty());
                for (i, pos) in span.clone().enumerate() {
                    assert_eq!(seen[pos], usize::MAX, "covered twice");
                    // channel of element `pos` from the span's own view
                    seen[pos] = (ch0 + i % c.max(1)) % c;
                }
            });
            for (pos, ch) in seen.iter().enumerate() {
                assert_eq!(*ch, pos % c, "len {len} c {c} pos {pos}");
            }
        }
    }

    #[test]
    fn conversions_round_once_and_keep_f32_in_place() {
        let v = [1.0f32, 1.0 + 2f32.powi(-11) + 2f32.powi(-20), -3.5, 65519.0];
        let mut buf = [0f32; CHUNK];
        let h: Vec<f16> = v.iter().map(|&e| f16::from_f32(e)).collect();
        read_f32(&h, &mut buf, |w| {
            assert_eq!(
                w,
                h.iter().map(|e| e.to_f32()).collect::<Vec<_>>().as_slice()
            )
        });
        let mut out = [f16::ZERO; 4];
        write_f32(&mut out, &mut buf, |w| w.copy_from_slice(&v));
        assert_eq!(out.to_vec(), h);
        let mut outb = [bf16::ZERO; 4];
        write_f32(&mut outb, &mut buf, |w| w.copy_from_slice(&v));
        assert_eq!(
            outb.to_vec(),
            v.iter().map(|&e| bf16::from_f32(e)).collect::<Vec<_>>()
        );
        let mut out32 = [0f32; 4];
        write_f32(&mut out32, &mut buf, |w| w.copy_from_slice(&v));
        assert_eq!(out32, v);
    }
}
