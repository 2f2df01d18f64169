//! The forward pass, NCHW (and NHWC with one position).

use super::*;

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
    if nchw_order(geo) {
        forward_nchw(geo, eps, act, x, weight, bias, y, mean, rstd)
    } else {
        forward_nhwc(geo, eps, act, x, weight, bias, y, mean, rstd)
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward_nchw<T: Element, P: Element>(
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
    if l <= LEAF {
        // short rows (one statistics leaf each), whole on one thread each: in batches, one
        // dispatch per batch (longer rows measured mixed, see `forward_rows`)
        let rows = RowsOf {
            l,
            s,
            d,
            groups,
            eps,
            act,
            weight,
            bias,
        };
        let sch = sched(geo, geo.rows());
        if sch == Sched::Pool {
            let k = min_rows_per_task(l);
            y.par_chunks_mut(k * l)
                .zip(x.par_chunks(k * l))
                .zip(mean.par_chunks_mut(k).zip(rstd.par_chunks_mut(k)))
                .enumerate()
                .for_each_with(Scratch::new(), |scr, (i, ((yc, xc), (mc, rc)))| {
                    forward_rows(rows, i * k, xc, yc, mc, rc, scr)
                });
        } else {
            on_caller_or_halves(
                sch,
                geo.rows(),
                x,
                y,
                mean,
                rstd,
                |first, x, y, mean, rstd| {
                    forward_rows(rows, first, x, y, mean, rstd, &mut Scratch::new())
                },
            );
        }
        return;
    }
    type Item<'a, T> = (usize, ((&'a mut [T], &'a [T]), (&'a mut f32, &'a mut f32)));
    let body = |scr: &mut Scratch, (row, ((yr, xr), (mean_out, rstd_out))): Item<'_, T>| {
        let g = row % groups;
        let pivot = xr[0].to_f32();
        let st = RowStats::from_moments(run_moments(xr, pivot), pivot, eps);
        *mean_out = st.mean;
        *rstd_out = st.rstd;
        for_each_row_piece(yr, scr, |off, yp, scr| {
            let xp = &xr[off..off + yp.len()];
            normalize_piece(xp, yp, scr, off, s, g * d, st, weight, bias, act);
        });
    };
    // rows `first..` of the tensor, one after the other
    let rows_from = |first: usize, x: &[T], y: &mut [T], mean: &mut [f32], rstd: &mut [f32]| {
        let mut scr = Scratch::new();
        y.chunks_mut(l)
            .zip(x.chunks(l))
            .zip(mean.iter_mut().zip(rstd.iter_mut()))
            .enumerate()
            .for_each(|(i, item)| body(&mut scr, (first + i, item)));
    };
    let sch = sched(geo, geo.rows());
    if sch == Sched::Pool {
        y.par_chunks_mut(l)
            .zip(x.par_chunks(l))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .enumerate()
            .with_min_len(min_rows_per_task(l))
            .for_each_with(Scratch::new(), |scr, item| body(scr, item));
    } else {
        on_caller_or_halves(sch, geo.rows(), x, y, mean, rstd, rows_from);
    }
}

/// A forward over `units` equal units (NCHW rows, NHWC samples) of `x`, `y` and the
/// statistics: `run(first unit, x, y, mean, rstd)` over all of them on the calling thread
/// ([`Sched::Caller`]), or over their two halves at once ([`Sched::Halves`]).
pub(super) fn on_caller_or_halves<T: Element>(
    sch: Sched,
    units: usize,
    x: &[T],
    y: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
    run: impl Fn(usize, &[T], &mut [T], &mut [f32], &mut [f32]) + Sync,
) {
    if sch == Sched::Caller {
        return run(0, x, y, mean, rstd);
    }
    let h = units / 2;
    let (values, stats) = (h * (x.len() / units), h * (mean.len() / units));
    let (x0, x1) = x.split_at(values);
    let (y0, y1) = y.split_at_mut(values);
    let (m0, m1) = mean.split_at_mut(stats);
    let (r0, r1) = rstd.split_at_mut(stats);
    in_halves(|| run(0, x0, y0, m0, r0), || run(h, x1, y1, m1, r1));
}

/// What [`forward_rows`] needs of the call: row length and layout, eps, activation, affine.
#[derive(Clone, Copy)]
struct RowsOf<'a, P> {
    l: usize,
    s: usize,
    d: usize,
    groups: usize,
    eps: f32,
    act: Activation,
    weight: Option<&'a [P]>,
    bias: Option<&'a [P]>,
}

/// The forward of whole rows on this thread, rows `first..` of the tensor (`x`, `y`: theirs,
/// `mean`, `rstd`: one per row): statistics ([`serial_tree_of`]) and normalization
/// ([`normalize_of`]) of one row after the other, compiled for AVX2 too and dispatched once
/// for all of them (the same operations in the same order as [`run_moments`] and
/// [`normalize_piece`], so the same bits).
///
/// One call per batch of rows instead of two dispatched calls and their closures per row.
/// Taken for rows of at most [`LEAF`] values, where that per-row cost counts: 4x64x16x16
/// (rows of 512) ran in 0.86 (f32), 0.85 (f16) and 0.92 (bf16) of the time. For longer rows
/// it measured mixed (32x1280x8x8, rows of 2560: f32 1.06-1.09, f16 0.95, bf16 0.97;
/// 2x128x32x32: 0.95-1.01), so they keep the two calls (one thread, interleaved A/B runs,
/// min of 7-15 rounds).
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn forward_rows<T: Element, P: Element>(
    r: RowsOf<'_, P>,
    first: usize,
    x: &[T],
    y: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
    scr: &mut Scratch,
) {
    if use_simd() {
        rows_of::<T, P, true>(r, first, x, y, mean, rstd, scr)
    } else {
        rows_of::<T, P, false>(r, first, x, y, mean, rstd, scr)
    }
}

/// [`forward_rows`] with the vector forms chosen.
#[inline(always)]
fn rows_of<T: Element, P: Element, const SIMD: bool>(
    r: RowsOf<'_, P>,
    first: usize,
    x: &[T],
    y: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
    scr: &mut Scratch,
) {
    let RowsOf {
        l,
        s,
        d,
        groups,
        eps,
        act,
        weight,
        bias,
    } = r;
    let rows = y.chunks_mut(l).zip(x.chunks(l));
    for (i, ((yr, xr), (m, sd))) in rows.zip(mean.iter_mut().zip(rstd)).enumerate() {
        let g = (first + i) % groups;
        let pivot = xr[0].to_f32();
        let st = RowStats::from_moments(serial_tree_of::<T, SIMD>(xr, pivot), pivot, eps);
        (*m, *sd) = (st.mean, st.rstd);
        normalize_of::<T, P, SIMD>(xr, yr, scr, 0, s, g * d, st, weight, bias, act);
    }
}

/// Normalizes a piece of an NCHW row that starts at row offset `off` (channel runs of `s`
/// values, the row's first channel `c0`): `y = (x - hi) * a + (b - lo * a)` with
/// `a = rstd * w` and the row's centre `hi + lo` ([`centre`]), then the activation. Compiled
/// for AVX2 too and picked at run time (the same operations in the same order, so the same
/// bits: Rust never contracts to FMA on its own). Without an
/// activation, values are converted in registers ([`map_values`]); with one, through the
/// scratch buffers, so that the affine loop stays vectorized apart from the activation's.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
pub(super) fn normalize_piece<T: Element, P: Element>(
    xp: &[T],
    yp: &mut [T],
    scr: &mut Scratch,
    off: usize,
    s: usize,
    c0: usize,
    st: RowStats,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    act: Activation,
) {
    if use_simd() {
        normalize_of::<T, P, true>(xp, yp, scr, off, s, c0, st, weight, bias, act)
    } else {
        normalize_of::<T, P, false>(xp, yp, scr, off, s, c0, st, weight, bias, act)
    }
}

/// [`normalize_piece`] with the vector forms chosen (`SIMD`, [`use_simd`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn normalize_of<T: Element, P: Element, const SIMD: bool>(
    xp: &[T],
    yp: &mut [T],
    scr: &mut Scratch,
    off: usize,
    s: usize,
    c0: usize,
    st: RowStats,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    act: Activation,
) {
    let hi = st.mean;
    let coefs = |dc: usize| {
        let c = c0 + dc;
        let scale = st.rstd * param(weight, c, 1.0);
        (scale, shift_of(param(bias, c, 0.0), st.residual, scale))
    };
    if act == Activation::None {
        // (inlined by force: a closure does not take the target features of the function
        // around it, and outlined into `forward_rows`, it called the conversions instead of
        // inlining them, 3-4x slower in f16/bf16)
        for_each_channel_run(
            off,
            xp.len(),
            s,
            #[inline(always)]
            |dc, k| {
                let (scale, shift) = coefs(dc);
                affine_values::<T, SIMD>(&xp[k.clone()], &mut yp[k], hi, scale, shift);
            },
        );
        return;
    }
    for (bi, (xb, yb)) in xp.chunks(CHUNK).zip(yp.chunks_mut(CHUNK)).enumerate() {
        read_f32(xb, &mut scr.a, |xv| {
            write_f32(yb, &mut scr.b, |yv| {
                for_each_channel_run(off + bi * CHUNK, xv.len(), s, |dc, k| {
                    let (scale, shift) = coefs(dc);
                    for (o, v) in yv[k.clone()].iter_mut().zip(&xv[k.clone()]) {
                        *o = (v - hi) * scale + shift;
                    }
                    activate(act, &mut yv[k]);
                })
            })
        });
    }
}
