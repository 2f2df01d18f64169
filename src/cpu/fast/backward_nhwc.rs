//! The channels-last backward pass.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) fn backward_nhwc<T: Element, U: Element, P: Element>(
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
    let (c, s, groups) = (geo.c, geo.s, geo.g);
    let nb = s.div_ceil(nhwc_block_positions(c));
    // Per sample: the block partials [block][sum dy (C) | sum dy*(x - mean) (C) |
    // sum (x - mean) (C)], and the per-channel dx coefficients k1, k2, k3, mean (4 C).
    let mut ws = vec![0f32; geo.n * (nb * 3 + 4) * c];
    let sch = sched(geo, geo.n);
    let par = sch == Sched::Pool;
    let sample = s * c;
    type Item<'a, T, U> = (
        usize,
        (
            (&'a mut [T], (&'a [T], &'a [U])),
            (&'a mut [f32], (&'a mut [f32], &'a mut [f32])),
        ),
    );
    // One sample after the other (samples in parallel): its three phases while its x and dy
    // are in cache. (All samples' phase 1 before any dx read x and dy twice from memory once
    // the tensor outgrew the cache: 32x1280x8x8 f32 ran at 0.5x PyTorch.)
    let one = |(n, ((dxs, (xs, dys)), (ws_n, (sdy_n, sdyx_n)))): Item<'_, T, U>| {
        let rows = n * groups..(n + 1) * groups;
        let (mean_n, rstd_n) = (&mean[rows.clone()], &rstd[rows]);
        nhwc_sample_backward(
            geo, dys, xs, mean_n, rstd_n, weight, dxs, ws_n, sdy_n, sdyx_n, par,
        );
    };
    let w = (nb * 3 + 4) * c;
    // samples `first..`, one after the other
    let samples_from = |first: usize,
                        dx: &mut [T],
                        x: &[T],
                        dy: &[U],
                        ws: &mut [f32],
                        sdy: &mut [f32],
                        sdyx: &mut [f32]| {
        dx.chunks_mut(sample)
            .zip(x.chunks(sample).zip(dy.chunks(sample)))
            .zip(
                ws.chunks_mut(w)
                    .zip(sdy.chunks_mut(c).zip(sdyx.chunks_mut(c))),
            )
            .enumerate()
            .for_each(|(i, item)| one((first + i, item)))
    };
    match sch {
        Sched::Caller => samples_from(0, dx, x, dy, &mut ws, sdy, sdyx),
        Sched::Halves => {
            let h = geo.n / 2;
            let (dx0, dx1) = dx.split_at_mut(h * sample);
            let (x0, x1) = x.split_at(h * sample);
            let (dy0, dy1) = dy.split_at(h * sample);
            let (ws0, ws1) = ws.split_at_mut(h * w);
            let (sdy0, sdy1) = sdy.split_at_mut(h * c);
            let (sdyx0, sdyx1) = sdyx.split_at_mut(h * c);
            in_halves(
                || samples_from(0, dx0, x0, dy0, ws0, sdy0, sdyx0),
                || samples_from(h, dx1, x1, dy1, ws1, sdy1, sdyx1),
            );
        }
        Sched::Pool => dx
            .par_chunks_mut(sample)
            .zip(x.par_chunks(sample).zip(dy.par_chunks(sample)))
            .zip(
                ws.par_chunks_mut(w)
                    .zip(sdy.par_chunks_mut(c).zip(sdyx.par_chunks_mut(c))),
            )
            .enumerate()
            .for_each(one),
    }
}

/// The NHWC backward of one sample (`dys`, `xs`, `dxs`: its `S * C` values; `mean_n`,
/// `rstd_n`: its rows; `ws`: its workspace, see [`backward_nhwc`]): per-channel partials into
/// `sdy_n`, `sdyx_n`, and `dx`. Blocks and pieces run in parallel when `par`.
#[allow(clippy::too_many_arguments)]
fn nhwc_sample_backward<T: Element, U: Element, P: Element>(
    geo: &Geometry,
    dys: &[U],
    xs: &[T],
    mean_n: &[f32],
    rstd_n: &[f32],
    weight: Option<&[P]>,
    dxs: &mut [T],
    ws: &mut [f32],
    sdy_n: &mut [f32],
    sdyx_n: &mut [f32],
    par: bool,
) {
    let (c, s, d, groups, l) = (geo.c, geo.s, geo.d, geo.g, geo.row_len());
    let pb = nhwc_block_positions(c);
    let nb = s.div_ceil(pb);
    let (p, coefs) = ws.split_at_mut(nb * 3 * c);
    let (k1, rest) = coefs.split_at_mut(c);
    let (k2, rest) = rest.split_at_mut(c);
    let (k3, mn) = rest.split_at_mut(c);
    // Each channel's row mean, once per sample: phase 1 reads it, phase 3 too.
    for (g, m) in mn.chunks_mut(d).enumerate() {
        m.fill(mean_n[g]);
    }

    // Phase 1: per block: per-channel sums over the block's positions, walking memory
    // contiguously.
    let mc = &*mn;
    let block = |(blk, out): (usize, &mut [f32])| {
        let (s0, s1) = (blk * pb, ((blk + 1) * pb).min(s));
        let range = s0 * c..s1 * c;
        nhwc_block_sums(&xs[range.clone()], &dys[range], mc, out, c);
    };
    if par {
        p.par_chunks_mut(3 * c).enumerate().for_each(block);
    } else {
        p.chunks_mut(3 * c).enumerate().for_each(block);
    }

    // Phase 2: pairwise tree over the blocks, then the row coefficients.
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
        let ch = g * d..(g + 1) * d;
        let (k2g, k3g) = row_coefs(
            weight,
            g,
            &sdy_n[ch.clone()],
            &mut sdyx_n[ch.clone()],
            pairwise_sum(&sxm[ch.clone()]),
            l,
            mean_n[g],
            rstd_n[g],
        );
        // Phase 3's per-channel coefficients (structure of arrays).
        for ch in ch {
            k1[ch] = rstd_n[g] * param(weight, ch, 1.0);
            (k2[ch], k3[ch]) = (k2g, k3g);
        }
    }

    // Phase 3: dx over contiguous pieces of whole positions.
    let (k1, k2, k3, mn) = (&*k1, &*k2, &*k3, &*mn);
    let piece = nhwc_piece(c);
    if par {
        dxs.par_chunks_mut(piece)
            .zip(xs.par_chunks(piece).zip(dys.par_chunks(piece)))
            .for_each(|(op, (xp, dp))| nhwc_dx_piece(xp, dp, op, c, k1, k2, k3, mn));
    } else {
        for (op, (xp, dp)) in dxs
            .chunks_mut(piece)
            .zip(xs.chunks(piece).zip(dys.chunks(piece)))
        {
            nhwc_dx_piece(xp, dp, op, c, k1, k2, k3, mn);
        }
    }
}

/// Phase 1 of the NHWC backward for one block of positions (`xs`, `dys`: whole positions of
/// `c` channels, `mc` each channel's row mean): per-channel `sum dy`, `sum dy*(x - mean)` and
/// `sum (x - mean)` into `out` (three runs of `c`). Compiled for AVX2 too and picked at run
/// time (same operations in the same order, so the same bits).
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn nhwc_block_sums<T: Element, U: Element>(
    xs: &[T],
    dys: &[U],
    mc: &[f32],
    out: &mut [f32],
    c: usize,
) {
    let (a, rest) = out.split_at_mut(c);
    let (b, e) = rest.split_at_mut(c);
    if f32_only::<T, U>() {
        // f32 in place (no conversion): the span loops measured faster than the eight-channel
        // form here (4x64x16x16 0.042 against 0.052 ms, one thread).
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
    } else if use_simd() {
        channel_sums::<T, U, true>(xs, dys, mc, a, b, e, c);
    } else {
        channel_sums::<T, U, false>(xs, dys, mc, a, b, e, c);
    }
}

/// [`nhwc_block_sums`] position by position, eight channels at a time with the values
/// converted in registers ([`load8`]), the tail channels one at a time.
#[inline(always)]
fn channel_sums<T: Element, U: Element, const SIMD: bool>(
    xs: &[T],
    dys: &[U],
    mc: &[f32],
    a: &mut [f32],
    b: &mut [f32],
    e: &mut [f32],
    c: usize,
) {
    let f8 = |v: &[f32]| load8::<f32, SIMD>(v);
    let full = c / 8 * 8;
    for (xr, dr) in xs.chunks_exact(c).zip(dys.chunks_exact(c)) {
        let lanes = xr[..full]
            .chunks_exact(8)
            .zip(dr[..full].chunks_exact(8))
            .zip(mc[..full].chunks_exact(8))
            .zip(a[..full].chunks_exact_mut(8))
            .zip(
                b[..full]
                    .chunks_exact_mut(8)
                    .zip(e[..full].chunks_exact_mut(8)),
            );
        for ((((x8, d8), m8), a8), (b8, e8)) in lanes {
            let (xv, dv, mv) = (load8::<T, SIMD>(x8), load8::<U, SIMD>(d8), f8(m8));
            let (mut sa, mut sb, mut se) = (f8(a8), f8(b8), f8(e8));
            for l in 0..8 {
                let xm = xv[l] - mv[l];
                sa[l] += dv[l];
                sb[l] += dv[l] * xm;
                se[l] += xm;
            }
            store8::<f32, SIMD>(sa, a8);
            store8::<f32, SIMD>(sb, b8);
            store8::<f32, SIMD>(se, e8);
        }
        for j in full..c {
            let (xi, di) = (load1(&xr[j]), load1(&dr[j]));
            let xm = xi - mc[j];
            a[j] += di;
            b[j] += di * xm;
            e[j] += xm;
        }
    }
}

/// Phase 3 of the NHWC backward on a piece of whole positions: `dx = k1*dy - k2*(x - m) - k3`
/// with per-channel coefficients. Compiled for AVX2 too and picked at run time.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn nhwc_dx_piece<T: Element, U: Element>(
    xp: &[T],
    dp: &[U],
    op: &mut [T],
    c: usize,
    k1: &[f32],
    k2: &[f32],
    k3: &[f32],
    mn: &[f32],
) {
    if f32_only::<T, U>() {
        // f32 in place, as in `nhwc_block_sums`.
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
    } else if use_simd() {
        channel_dx::<T, U, true>(xp, dp, op, c, k1, k2, k3, mn);
    } else {
        channel_dx::<T, U, false>(xp, dp, op, c, k1, k2, k3, mn);
    }
}

/// [`nhwc_dx_piece`] position by position, eight channels at a time with the values
/// converted in registers ([`load8`], [`store8`]), the tail channels one at a time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn channel_dx<T: Element, U: Element, const SIMD: bool>(
    xp: &[T],
    dp: &[U],
    op: &mut [T],
    c: usize,
    k1: &[f32],
    k2: &[f32],
    k3: &[f32],
    mn: &[f32],
) {
    let f8 = |v: &[f32]| load8::<f32, SIMD>(v);
    let full = c / 8 * 8;
    let f = |x: f32, d: f32, a: f32, b: f32, cc: f32, m: f32| a * d - b * (x - m) - cc;
    for ((xr, dr), or) in xp
        .chunks_exact(c)
        .zip(dp.chunks_exact(c))
        .zip(op.chunks_exact_mut(c))
    {
        let lanes = xr[..full]
            .chunks_exact(8)
            .zip(dr[..full].chunks_exact(8))
            .zip(or[..full].chunks_exact_mut(8))
            .zip(k1[..full].chunks_exact(8).zip(k2[..full].chunks_exact(8)))
            .zip(k3[..full].chunks_exact(8).zip(mn[..full].chunks_exact(8)));
        for ((((x8, d8), o8), (a8, b8)), (c8, m8)) in lanes {
            let (xv, dv) = (load8::<T, SIMD>(x8), load8::<U, SIMD>(d8));
            let (av, bv, cv, mv) = (f8(a8), f8(b8), f8(c8), f8(m8));
            let mut o = [0f32; 8];
            for (l, o) in o.iter_mut().enumerate() {
                *o = f(xv[l], dv[l], av[l], bv[l], cv[l], mv[l]);
            }
            store8::<T, SIMD>(o, o8);
        }
        for j in full..c {
            let v = f(load1(&xr[j]), load1(&dr[j]), k1[j], k2[j], k3[j], mn[j]);
            store1(v, &mut or[j]);
        }
    }
}

/// Whether both tensors are f32 (read and written in place, no conversion).
#[inline(always)]
fn f32_only<T: 'static, U: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<f32>() && TypeId::of::<U>() == TypeId::of::<f32>()
}
