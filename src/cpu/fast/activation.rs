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
    // Rayon's iterators only when its pool has threads to give: this pass computes an
    // exponential and a division per value (about 8 ns each here), so even small tensors
    // gain from a second thread, while a one-thread pool only adds its hand-offs. Measured
    // (`groupnorm bench --device cpu --silu --pass bwd`, 3 alternating rounds): one thread, on
    // the calling thread, 0.72-0.98 of the time (4x64x16x16, 2x128x32x32, 2x320x64x64; f32,
    // f16; both layouts); two threads, small tensors on the calling thread measured 1.4-1.9x
    // slower than the pool, so they keep it.
    let nchw = nchw_order(geo);
    let par = may_split();
    // Per-row corrected means, mean + delta, kept as (mean, delta) to stay exact.
    let mut delta = vec![0f32; geo.rows()];
    if nchw {
        let row_delta = |scr: &mut Scratch, (row, (dl, xr)): (usize, (&mut f32, &[T]))| {
            *dl = sum_centered(xr, mean[row], &mut scr.a) / l as f32;
        };
        if par {
            delta
                .par_iter_mut()
                .zip(x.par_chunks(l))
                .enumerate()
                .with_min_len(min_rows_per_task(l))
                .for_each_init(Scratch::new, row_delta);
        } else {
            let mut scr = Scratch::new();
            delta
                .iter_mut()
                .zip(x.chunks(l))
                .enumerate()
                .for_each(|item| row_delta(&mut scr, item));
        }
    } else {
        let sample_delta = |(n, (dn, xs)): (usize, (&mut [f32], &[T]))| {
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
        };
        if par {
            delta
                .par_chunks_mut(groups)
                .zip(x.par_chunks(s * c))
                .enumerate()
                .for_each(sample_delta);
        } else {
            delta
                .chunks_mut(groups)
                .zip(x.chunks(s * c))
                .enumerate()
                .for_each(sample_delta);
        }
    }
    let z_grad = |row: usize, ch: usize, xv: f32, dv: f32| -> f32 {
        let xhat = ((xv - mean[row]) - delta[row]) * rstd[row];
        let z = xhat * param(weight, ch, 1.0) + param(bias, ch, 0.0);
        dv * act.derivative_f32(z)
    };
    if nchw {
        let row_grad = |(row, (zr, (xr, dyr))): GradItem<'_, T>| {
            let g = row % groups;
            for (j, ((o, xv), dv)) in zr.iter_mut().zip(xr).zip(dyr).enumerate() {
                *o = z_grad(row, g * d + j / s, xv.to_f32(), dv.to_f32());
            }
        };
        if par {
            dz.par_chunks_mut(l)
                .zip(x.par_chunks(l).zip(dy.par_chunks(l)))
                .enumerate()
                .with_min_len(min_rows_per_task(l))
                .for_each(row_grad);
        } else {
            dz.chunks_mut(l)
                .zip(x.chunks(l).zip(dy.chunks(l)))
                .enumerate()
                .for_each(row_grad);
        }
    } else {
        let piece = nhwc_piece(c);
        let piece_grad = |(pi, (zp, (xp, dyp))): GradItem<'_, T>| {
            let start = pi * piece; // a whole number of positions
            for (j, ((o, xv), dv)) in zp.iter_mut().zip(xp).zip(dyp).enumerate() {
                let i = start + j;
                let (n, ch) = (i / (s * c), i % c);
                *o = z_grad(n * groups + ch / d, ch, xv.to_f32(), dv.to_f32());
            }
        };
        if par {
            dz.par_chunks_mut(piece)
                .zip(x.par_chunks(piece).zip(dy.par_chunks(piece)))
                .enumerate()
                .for_each(piece_grad);
        } else {
            dz.chunks_mut(piece)
                .zip(x.chunks(piece).zip(dy.chunks(piece)))
                .enumerate()
                .for_each(piece_grad);
        }
    }
    dz
}

/// A row or piece of `dz` (by index) with its `x` and `dy`.
type GradItem<'a, T> = (usize, (&'a mut [f32], (&'a [T], &'a [T])));

/// `sum (x - mean)` of a contiguous run, in blocks of [`CHUNK`] with eight lanes each.
pub(super) fn sum_centered<T: Element>(x: &[T], mean: f32, buf: &mut Buf) -> f32 {
    let mut total = 0f32;
    for blk in x.chunks(CHUNK) {
        total += read_f32(blk, buf, |v| lane_sum(v, |e| e - mean));
    }
    total
}
