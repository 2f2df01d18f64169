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
    // With one spatial position the two layouts are the same memory order.
    if geo.layout == Layout::Nchw || geo.s == 1 {
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
    if on_caller(geo) {
        let mut scr = Scratch::new();
        y.chunks_mut(l)
            .zip(x.chunks(l))
            .zip(mean.iter_mut().zip(rstd.iter_mut()))
            .enumerate()
            .for_each(|item| body(&mut scr, item));
    } else {
        y.par_chunks_mut(l)
            .zip(x.par_chunks(l))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .enumerate()
            .with_min_len(min_rows_per_task(l))
            .for_each_with(Scratch::new(), |scr, item| body(scr, item));
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
fn normalize_piece<T: Element, P: Element>(
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
        let affine = |x: &[T], y: &mut [T], scale: f32, shift: f32| {
            if use_simd() {
                affine_values::<T, true>(x, y, hi, scale, shift)
            } else {
                affine_values::<T, false>(x, y, hi, scale, shift)
            }
        };
        for_each_channel_run(off, xp.len(), s, |dc, k| {
            let (scale, shift) = coefs(dc);
            affine(&xp[k.clone()], &mut yp[k], scale, shift);
        });
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
