//! Scheduling: how rows, channel runs and pieces are cut, and what runs in parallel.

use super::*;

/// Calls `f(channel in group, sub-range)` for the channel runs that cross a block of an NCHW
/// row: the block covers row offsets `start..start + len`, runs are `s` long, and the
/// sub-range is relative to the block.
#[inline(always)]
pub(super) fn for_each_channel_run(
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
pub(super) fn for_each_row_piece<E: Send>(
    out: &mut [E],
    scr: &mut Scratch,
    f: impl Fn(usize, &mut [E], &mut Scratch) + Sync,
) {
    if out.len() < PAR_MIN || !may_split() {
        f(0, out, scr);
    } else {
        out.par_chunks_mut(PIECE)
            .enumerate()
            .for_each_with(Scratch::new(), |scr, (p, piece)| f(p * PIECE, piece, scr));
    }
}

/// Rows per rayon task at minimum, so that tiny rows do not become tiny tasks.
pub(super) fn min_rows_per_task(row_len: usize) -> usize {
    (4096 / row_len.max(1)).max(1)
}

/// Positions per NHWC spatial block for `c` channels.
pub(super) fn nhwc_block_positions(c: usize) -> usize {
    (NHWC_BLOCK / c.max(1)).clamp(NHWC_MIN_POSITIONS, CHUNK)
}

/// Pieces of whole NHWC positions for the parallel element-wise passes.
pub(super) fn nhwc_piece(c: usize) -> usize {
    (PIECE / c).max(1) * c
}

/// Tensors of at most this many elements stay off rayon's pool: a caller outside the pool hands
/// it the whole pass and sleeps until the pool wakes it, and those hand-offs cost more than the
/// second thread gives back. Measured with `groupnorm bench --device cpu`, f32 and f16 NCHW,
/// `RAYON_NUM_THREADS=2`, this project's 2-core machine, on the calling thread against split,
/// two alternating runs each: at 2^18 elements (2x128x32x32) 0.11-0.13 against 0.18-0.27 ms
/// forward, 2^19 and 2^20 mixed, 2^21 (8x256x32x32) 1.3-1.9 against 0.6 ms. From
/// [`HALVES_MIN`] elements they run in two halves instead ([`Sched::Halves`]).
pub(super) const ON_CALLER_MAX: usize = 1 << 18;

/// Tensors of at least this many elements (and at most [`ON_CALLER_MAX`]) run in two halves,
/// one on the calling thread and one on a helper thread when it is awake ([`Sched::Halves`]).
/// Below it the hand-off measured mixed: 2^14 and 2^15 elements (1x64x16x16, 2x64x16x16 NCHW,
/// 2x32x16x16 NHWC) 0.55-1.0 of the time, but their NHWC backwards 1.1-1.5; 2^12 and 2^13
/// 1.1-1.6 (`RAYON_NUM_THREADS=2`, 3 alternating rounds).
pub(super) const HALVES_MIN: usize = 1 << 16;

/// How a pass over a tensor is spread over threads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Sched {
    /// All of it on the calling thread: one thread in the pool, or a tensor too small to share.
    Caller,
    /// Two halves of its rows (NCHW) or samples (NHWC), the first on the calling thread and
    /// the second on the helper thread if it takes it in time (`handoff::in_halves`).
    Halves,
    /// Rayon's parallel iterators over the whole pass.
    Pool,
}

#[cfg(test)]
thread_local! {
    /// Tests force a schedule on their thread, to compare the results of all three.
    pub(super) static FORCED: std::cell::Cell<Option<Sched>> = const { std::cell::Cell::new(None) };
}

/// How a pass over `geo`, cut into `units` independent rows or samples, runs:
/// - small tensors (at most [`ON_CALLER_MAX`] elements) on the calling thread, or in two
///   halves from [`HALVES_MIN`] elements;
/// - with two threads in rayon's pool, larger tensors in two halves too, when the halves are
///   even or many units each: the calling thread and the helper are as many threads as the
///   pool, without the caller's sleep through each hand-off. Measured against the pool
///   (`groupnorm bench --device cpu`, `RAYON_NUM_THREADS=2`, 3 alternating rounds, medians):
///   0.45-0.96 of the time from 2^19 to 2^21 elements (4x128x32x32, 8x128x32x32, 8x256x32x32;
///   f32 and f16, both layouts) but 8x128x32x32 f32 NCHW backward at 1.06 (its minimum 0.85),
///   0.48-0.95 on 8x640x32x32 and 32x1280x8x8 NCHW, 0.88-1.01 on them and on 2x320x64x64
///   NHWC;
/// - the rest on the pool: more threads than two, units too few to halve evenly, and NCHW rows
///   of at least [`PAR_MIN`] values, which the pool splits inside (a half runs its rows on one
///   thread, so it only takes rows that never reach for the pool themselves).
///
/// Halves (`handoff::in_halves`): the first on the calling thread, the second on a helper
/// thread if it is awake to take it, else after the first.
pub(super) fn sched(geo: &Geometry, units: usize) -> Sched {
    #[cfg(test)]
    if let Some(s) = FORCED.with(|f| f.get()) {
        return if s == Sched::Halves && units < 2 {
            Sched::Caller
        } else {
            s
        };
    }
    // rows or samples whose pass goes nowhere near the pool on its own (NHWC samples; NCHW
    // rows below PAR_MIN, which NHWC tensors with one position take too)
    let short = !nchw_order(geo) || geo.row_len() < PAR_MIN;
    let balanced = units % 2 == 0 || units >= 16;
    if !may_split() {
        Sched::Caller
    } else if short && geo.numel() <= ON_CALLER_MAX {
        if geo.numel() >= HALVES_MIN && units >= 2 {
            Sched::Halves
        } else {
            Sched::Caller
        }
    } else if short && balanced && rayon::current_num_threads() == 2 {
        Sched::Halves
    } else {
        Sched::Pool
    }
}

/// Whether work may be split across rayon's pool: not when it has one thread. Handing work to
/// a one-thread pool only adds a wake-up and a switch back per call (each `join` or parallel
/// iterator entered from outside the pool); with `RAYON_NUM_THREADS=1` the scheduler's
/// functions took about a sixth of a 0.25 ms forward pass (perf, 2x128x32x32 f32).
#[inline]
pub(super) fn may_split() -> bool {
    rayon::current_num_threads() > 1
}
