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
    // exponential and a division per value, so even small tensors gain from a second thread,
    // while a one-thread pool only adds its hand-offs. Measured (`groupnorm bench --device
    // cpu --silu --pass bwd`, 3 alternating rounds): one thread, on the calling thread,
    // 0.72-0.98 of the time (4x64x16x16, 2x128x32x32, 2x320x64x64; f32, f16; both layouts);
    // two threads, small tensors on the calling thread measured 1.4-1.9x slower than the
    // pool, so they keep it (with libm's scalar `expf`, 8 ns per value; the vectorized
    // `exp_f32` has made the pass cheaper since, and that split was not measured again).
    let nchw = nchw_order(geo);
    let par = may_split();
    // NHWC: each sample's per-channel copies of its groups' values (`N * C` of them)
    let per_channel = |rows: &[f32]| -> Vec<f32> {
        (0..geo.n * c)
            .map(|i| rows[(i / c) * groups + (i % c) / d])
            .collect()
    };
    let cm = if nchw { Vec::new() } else { per_channel(mean) };
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
                add_centered_positions(&mut part, blk, &cm[n * c..(n + 1) * c]);
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
    let (w, b) = (
        (0..c).map(|ch| param(weight, ch, 1.0)).collect::<Vec<_>>(),
        (0..c).map(|ch| param(bias, ch, 0.0)).collect::<Vec<_>>(),
    );
    if nchw {
        let row_grad = |(row, (zr, (xr, dyr))): GradItem<'_, T>| {
            let g = row % groups;
            let runs = zr.chunks_mut(s).zip(xr.chunks(s).zip(dyr.chunks(s)));
            for (j, (zc, (xc, dyc))) in runs.enumerate() {
                let ch = g * d + j;
                let k = GradCoefs {
                    mean: mean[row],
                    delta: delta[row],
                    rstd: rstd[row],
                    w: w[ch],
                    b: b[ch],
                };
                grad_run(act, xc, dyc, zc, k);
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
        // per sample, each channel's group statistics (mean, delta, rstd: 3 C values)
        let (cd, cr) = (per_channel(&delta), per_channel(rstd));
        let sample = s * c;
        let piece = nhwc_piece(c);
        let piece_grad = |(pi, (zp, (xp, dyp))): GradItem<'_, T>| {
            // a whole number of positions, possibly across samples: cut at their bounds
            let mut at = pi * piece;
            let (mut zp, mut xp, mut dyp) = (zp, xp, dyp);
            while !zp.is_empty() {
                let n = at / sample;
                let len = ((n + 1) * sample - at).min(zp.len());
                let (z0, z1) = zp.split_at_mut(len);
                let (x0, x1) = xp.split_at(len);
                let (d0, d1) = dyp.split_at(len);
                let cols = n * c..(n + 1) * c;
                let k = ChannelCoefs {
                    mean: &cm[cols.clone()],
                    delta: &cd[cols.clone()],
                    rstd: &cr[cols],
                    w: &w,
                    b: &b,
                };
                grad_positions(act, x0, d0, z0, &k);
                (zp, xp, dyp, at) = (z1, x1, d1, at + len);
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

/// `part[j] += x[j] - m[j]` for every position (`c = part.len()` values each) of an NHWC
/// block, per position in channel order (the arithmetic of a per-value loop, so its bits),
/// eight channels at a time with the values converted in registers. Compiled for AVX2 too and
/// picked at run time. (Per value with the group found by a division, this loop took most of
/// the NHWC SiLU backward.)
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn add_centered_positions<T: Element>(part: &mut [f32], blk: &[T], m: &[f32]) {
    let c = part.len();
    if use_simd() {
        for pos in blk.chunks(c) {
            accumulate_channels::<T, true>(part, pos, m, m, |e, p, _| e - p);
        }
    } else {
        for pos in blk.chunks(c) {
            accumulate_channels::<T, false>(part, pos, m, m, |e, p, _| e - p);
        }
    }
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

/// `e^x` in f32 with no call into libm, in operations the compiler vectorizes (so that the
/// activation's loops run eight values per instruction): `x = n ln2 + r` with `n` an integer
/// and `|r| <= ln2 / 2` (ln2 in two parts, the first exact in 9 bits, so `n * LN2_HI` is
/// exact), `e^r = 1 + r + r^2 P(r)` with the degree-5 minimax polynomial of Cephes' `expf`,
/// and `2^n` as two exponent fields (so that `n` from -150 to 128 needs no special case).
/// Within 2 ulp of the exact value over the normal range (`exp_matches_f64_within_two_ulp`),
/// `inf` above 88.73, 0 below -104, NaN for NaN. libm's `expf`, which the fast path called
/// per value before, is not vectorized: with it, SiLU's exponential was most of the fused
/// backward's time (about 8 ns per value here).
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355 / 512
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (|x log2 e| < 2^22)
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-104.0, 89.0); // NaN stays NaN
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = (r * r) * p + r + 1.0;
    // n in [-150, 128], read from t's bits (t = 1.5 * 2^23 + n, one ulp per unit) rather
    // than by `n as i32`, whose saturating conversion the compiler does not vectorize (NaN:
    // any bits, and e carries the NaN); 2^n = 2^h 2^(n - h), each exponent field in 52..=191
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let h = n >> 1;
    let two_to = |k: i32| f32::from_bits((k.wrapping_add(127) as u32) << 23);
    e * two_to(h) * two_to(n - h)
}

/// The activation as the fast path computes it: [`Activation::apply_f32`]'s formula with
/// [`exp_f32`] for the exponential.
#[inline(always)]
pub(super) fn act_f32(act: Activation, z: f32) -> f32 {
    match act {
        Activation::None => z,
        Activation::Silu => z / (1.0 + exp_f32(-z)),
    }
}

/// SiLU in place, eight values per instruction ([`exp_f32`]): a function of its own, compiled
/// for AVX2 too and picked at run time, because the forward applies it from closures, which
/// do not take the target features of the function around them.
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
pub(super) fn silu_in_place(v: &mut [f32]) {
    for o in v {
        *o = act_f32(Activation::Silu, *o);
    }
}

/// The activation's derivative as the fast path computes it: [`Activation::derivative_f32`]'s
/// formula (the sigmoid once) with [`exp_f32`].
#[inline(always)]
pub(super) fn act_derivative_f32(act: Activation, z: f32) -> f32 {
    match act {
        Activation::None => 1.0,
        Activation::Silu => {
            let sig = 1.0 / (1.0 + exp_f32(-z));
            sig * (1.0 + z * (1.0 - sig))
        }
    }
}

/// Per-value coefficients of the gradient: `xhat = ((x - mean) - delta) * rstd`,
/// `z = xhat * w + b`.
#[derive(Clone, Copy)]
struct GradCoefs {
    mean: f32,
    delta: f32,
    rstd: f32,
    w: f32,
    b: f32,
}

/// `dz = dy * act'(z)` of one value (the formula of every gradient loop here).
#[inline(always)]
fn grad1(act: Activation, x: f32, dy: f32, k: GradCoefs) -> f32 {
    let xhat = ((x - k.mean) - k.delta) * k.rstd;
    dy * act_derivative_f32(act, xhat * k.w + k.b)
}

/// [`grad1`] over a run of values that share their coefficients (an NCHW channel run), eight
/// at a time with the values converted in registers ([`load8`]), then one at a time. Compiled
/// for AVX2 too and picked at run time (the same operations in the same order, so the same
/// bits).
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn grad_run<T: Element>(act: Activation, x: &[T], dy: &[T], dz: &mut [f32], k: GradCoefs) {
    if use_simd() {
        grad_run_of::<T, true>(act, x, dy, dz, k)
    } else {
        grad_run_of::<T, false>(act, x, dy, dz, k)
    }
}

#[inline(always)]
fn grad_run_of<T: Element, const SIMD: bool>(
    act: Activation,
    x: &[T],
    dy: &[T],
    dz: &mut [f32],
    k: GradCoefs,
) {
    let n = dz.len();
    let (x, dy) = (&x[..n], &dy[..n]);
    let mut j = 0;
    while j + 8 <= n {
        let (xv, dv) = (load8::<T, SIMD>(&x[j..]), load8::<T, SIMD>(&dy[j..]));
        let mut o = [0f32; 8];
        for l in 0..8 {
            o[l] = grad1(act, xv[l], dv[l], k);
        }
        store8::<f32, SIMD>(o, &mut dz[j..]);
        j += 8;
    }
    for j in j..n {
        dz[j] = grad1(act, load1(&x[j]), load1(&dy[j]), k);
    }
}

/// [`grad1`] over whole NHWC positions `x`, `dy` (`c` channels each) of one sample, with
/// per-channel coefficients (`mean`, `delta`, `rstd` of each channel's group, `w`, `b`),
/// eight channels at a time as [`grad_run`].
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn grad_positions<T: Element>(
    act: Activation,
    x: &[T],
    dy: &[T],
    dz: &mut [f32],
    k: &ChannelCoefs<'_>,
) {
    if use_simd() {
        grad_positions_of::<T, true>(act, x, dy, dz, k)
    } else {
        grad_positions_of::<T, false>(act, x, dy, dz, k)
    }
}

/// Per-channel [`GradCoefs`] of one NHWC sample, as arrays of `c`.
struct ChannelCoefs<'a> {
    mean: &'a [f32],
    delta: &'a [f32],
    rstd: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
}

impl ChannelCoefs<'_> {
    #[inline(always)]
    fn at(&self, j: usize) -> GradCoefs {
        GradCoefs {
            mean: self.mean[j],
            delta: self.delta[j],
            rstd: self.rstd[j],
            w: self.w[j],
            b: self.b[j],
        }
    }
}

#[inline(always)]
fn grad_positions_of<T: Element, const SIMD: bool>(
    act: Activation,
    x: &[T],
    dy: &[T],
    dz: &mut [f32],
    k: &ChannelCoefs<'_>,
) {
    let c = k.mean.len();
    let (kw, kb) = (&k.w[..c], &k.b[..c]);
    let (km, kd, kr) = (&k.mean[..c], &k.delta[..c], &k.rstd[..c]);
    for ((xp, dyp), zp) in x
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dz.chunks_exact_mut(c))
    {
        let mut j = 0;
        while j + 8 <= c {
            let (xv, dv) = (load8::<T, SIMD>(&xp[j..]), load8::<T, SIMD>(&dyp[j..]));
            let (m, dl, r) = (&km[j..j + 8], &kd[j..j + 8], &kr[j..j + 8]);
            let (w, b) = (&kw[j..j + 8], &kb[j..j + 8]);
            let mut o = [0f32; 8];
            for l in 0..8 {
                let kl = GradCoefs {
                    mean: m[l],
                    delta: dl[l],
                    rstd: r[l],
                    w: w[l],
                    b: b[l],
                };
                o[l] = grad1(act, xv[l], dv[l], kl);
            }
            store8::<f32, SIMD>(o, &mut zp[j..]);
            j += 8;
        }
        for j in j..c {
            zp[j] = grad1(act, load1(&xp[j]), load1(&dyp[j]), k.at(j));
        }
    }
}
