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
//! (cached) chunk (f32: the second about the chunk's centre rounded to f32, less the known
//! square of that rounding, `stats::leaf_f32`; f16/bf16: one pass of sums and squares where
//! a check shows they cannot have cancelled, `stats::one_pass_m2`), and chunk states merge
//! with Chan's formula in a
//! fixed pairwise tree (error grows with the tree's depth, not with the number of chunks).
//!
//! - NCHW: a row is one contiguous run, chunks (leaves) are [`LEAF`] values; rows run in parallel,
//!   and so do the halves of long rows.
//! - NHWC: a row is `S` runs of `D` values, `C` apart. Groups are taken in batches whose
//!   `gb * D <= 1024` channels (`forward_nhwc::BATCH_CHANNELS`: all of them up to C = 1024)
//!   are a contiguous segment of every position; a chunk is a block of positions times one
//!   group's channels, summed with one accumulator per channel while walking the segments in
//!   memory order, four positions at a time (`(v0 + v1) + (v2 + v3)` into the accumulator, so
//!   that it is loaded and stored once per four values). Within a sample, batch after batch: its statistics, then the normalization
//!   of its columns while they are in cache; samples, halves of long position ranges and
//!   pieces of the normalization run in parallel. With `S = 1` the two layouts are the same
//!   memory order and the NCHW code runs.
//!
//! The saved mean is `hi = p + (mean - p)` in f32; `lo` is what that rounding dropped
//! (`stats::centre`, computed in f64). `y = (x - hi) * a + (b - lo * a)` with `a = rstd * w`,
//! in f32, rounded once to `T`: one subtraction, one product and one sum per value, and the
//! row's offset still cancels exactly (`x - hi` is exact for values within a factor two of
//! `hi`).
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
//! The inner loops of both passes (statistics leaves, normalization without an activation,
//! backward sums and `dx`; not the NHWC backward's f32 loops) convert eight values at a time in
//! registers (`convert::load8`, `store8`, `store16`): F16C for f16, a shift and a rounding
//! sequence for bf16, explicit 256-bit loads and stores for f32 where the CPU has AVX2 and F16C
//! (`use_simd`, checked once per pass), plain loops otherwise. The rest (activations, NCHW
//! backward runs of fewer than [`LANES`] values, the NHWC backward in f32) reads and writes
//! in spans of at most [`CHUNK`] elements through f32 buffers on the stack: f32 data is used
//! in place, f16 and bf16 go through branch-free loops that LLVM vectorizes and inlines into
//! the AVX2 copies below. Both forms give the same bits, equal to `half`'s and to F16C's
//! `vcvtph2ps`/`vcvtps2ph` with round-to-nearest-even (`tests.rs`).
//!
//! # Dispatch and scheduling
//!
//! The inner loops (leaf statistics, normalization and `dx` pieces, NHWC block sums) are
//! compiled twice with `multiversion`, for baseline x86-64 and for AVX2 (+FMA, F16C), and the
//! AVX2 copy is picked at run time where the CPU has it. Both run the same operations in the
//! same order (Rust never contracts `a * b + c` into an FMA on its own), so results are the
//! same bits on every machine. Tensors of at most `ON_CALLER_MAX` elements, and everything
//! when rayon's pool has one thread, stay off rayon's parallel iterators (`schedule.rs`): they
//! run on the calling thread, or in two halves: the first on the calling thread, the second on
//! a helper thread if it is awake to take it (a run of calls keeps it so), else after the first
//! (`handoff.rs`); waking a sleeping thread costs more than such a pass. With two threads in
//! the pool, larger tensors run in halves too. The lane sums of the inner loops are written in
//! the shape LLVM keeps in vector registers (`stats::add_lanes` says which shapes it did not).

use crate::config::{Activation, Geometry, Layout};
use crate::dtype::Element;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use multiversion::multiversion;
use rayon::prelude::*;
use std::any::TypeId;
use std::ops::Range;

/// Values per conversion span and per leaf of the backward's and the NHWC passes' sums:
/// small enough that each lane of their sums adds few values in sequence (8 to 16: 32 lanes,
/// `stats::LANES`, or the backward leaf's 16) and that two passes over it hit L1.
pub(crate) const CHUNK: usize = 256;
/// Values per leaf of the NCHW statistics tree (the forward's mean and variance): the f32
/// leaves sum in 64 lanes (`stats::wide_sum_of`), 32 values each; the f16/bf16 leaves in
/// the 32 lanes of `stats::LANES`, 64 each; two passes over a leaf (8 KiB of f32) hit L1.
/// Each leaf pays its folds, a division and a merge into the tree: at 256 values they were
/// about 40 % of the statistics' instructions (cachegrind, 2x320x64x64 f32), and 2048-value
/// leaves ran the NCHW forward in 0.80-0.89x the time of 256-value ones (f32, f16, bf16;
/// 2x320x64x64, 32x1280x8x8, 2x128x32x32; one thread; see the commit message).
pub(crate) const LEAF: usize = 2048;
/// Slices at least this long are split across threads (rows that are few and long).
const PAR_MIN: usize = 1 << 15;
/// Elements per parallel piece when normalizing or writing `dx`.
const PIECE: usize = 1 << 14;
/// Target elements per NHWC spatial block (positions times channels).
const NHWC_BLOCK: usize = 1 << 14;
/// Target bytes of `x` per leaf of the NHWC forward statistics (positions times channels
/// times the element size): half of a 512 KiB L2, so that the f32 leaf's second pass reads
/// from it. Each leaf zeroes and fills its per-channel arrays (12 KiB) and returns its
/// moments by value (12 KiB): at 2^14 f16 values that was a tenth of the f16 forward (perf,
/// `memset`/`memmove`); 2^16 ran the 2x320x64x64 f16 forward in 1.15 ms against 1.33 (A/B,
/// one thread); 2^17 f16 values (this size) ran 6 % fewer instructions than 2^16 in the
/// 1x640x32x32 f16 forward.
const NHWC_STATS_BYTES: usize = 1 << 18;
/// Bounds on the positions per NHWC block: at most `CHUNK` values per channel are summed
/// sequentially; at least 16 keeps the workspace under `numel / 8` for very wide tensors.
const NHWC_MIN_POSITIONS: usize = 16;

mod activation;
mod backward;
mod backward_nhwc;
mod convert;
mod forward;
mod forward_nhwc;
mod handoff;
mod schedule;
mod stats;
#[cfg(test)]
mod tests;

pub(crate) use activation::activation_grad;
use activation::silu_in_place;
pub(crate) use backward::backward;
pub(crate) use forward::forward;

use backward::*;
use backward_nhwc::*;
use convert::*;
use forward_nhwc::*;
use handoff::in_halves;
use schedule::*;
use stats::*;

/// Applies `act` in place (a second loop over a block in cache, so that the plain affine loop
/// stays vectorized when there is no activation).
#[inline(always)]
pub(super) fn activate(act: Activation, v: &mut [f32]) {
    match act {
        Activation::None => {}
        Activation::Silu => silu_in_place(v),
    }
}

/// Whether `geo`'s values are in NCHW memory order: NCHW, or NHWC with one spatial position
/// (the two layouts are then the same order). Such tensors take the NCHW passes.
pub(super) fn nchw_order(geo: &Geometry) -> bool {
    geo.layout == Layout::Nchw || geo.s == 1
}

#[inline(always)]
pub(super) fn param<P: Element>(p: Option<&[P]>, c: usize, default: f32) -> f32 {
    p.map_or(default, |p| p[c].to_f32())
}
