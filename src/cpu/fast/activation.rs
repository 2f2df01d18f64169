//! Backward of a fused activation: the gradient of the pre-activation.

use super::*;

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
pub(super) fn sum_centered<T: Element>(x: &[T], mean: f32, buf: &mut Buf) -> f32 {
    let mut total = 0f32;
    for blk in x.chunks(CHUNK) {
        total += read_f32(blk, buf, |v| lane_sum(v, |e| e - mean));
    }
    total
}
