//! The backward pass: per-row coefficients, NCHW rows, the dweight/dbias reduction.

use super::*;

/// Sums over a backward run: `sum dy`, `sum dy * (x - mean)` and `sum (x - mean)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct BwdSums {
    pub(super) dy: f32,
    pub(super) dy_xm: f32,
    pub(super) xm: f32,
}

impl BwdSums {
    #[inline]
    pub(super) fn add(self, o: BwdSums) -> BwdSums {
        BwdSums {
            dy: self.dy + o.dy,
            dy_xm: self.dy_xm + o.dy_xm,
            xm: self.xm + o.xm,
        }
    }
}

/// [`BwdSums`] of 1 to [`CHUNK`] values, [`LANES`] lanes each (AVX2 too, picked at run time).
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
pub(super) fn leaf_sums<T: Element, U: Element>(dy: &[U], x: &[T], mean: f32) -> BwdSums {
    if use_simd() {
        leaf_sums_of::<T, U, true>(dy, x, mean)
    } else {
        leaf_sums_of::<T, U, false>(dy, x, mean)
    }
}

/// [`leaf_sums`] with the values converted in registers, eight at a time ([`load8`]): the
/// three sums in one pass, 16 lanes each (lane `i % 16` takes values `i, i + 16, ...`), folded
/// as [`fold_lanes`] folds two rows, the last `len % 16` values summed in order and added last.
/// (Three passes of 32 lanes each, one per sum, converted every value twice; fused with 32
/// lanes each, LLVM bundled the sums' lanes in pairs instead of vectors. With 16, six vector
/// accumulators: 19 instructions per 16 f32 values, checked in the assembly.)
#[inline(always)]
pub(super) fn leaf_sums_of<T: Element, U: Element, const SIMD: bool>(
    dy: &[U],
    x: &[T],
    mean: f32,
) -> BwdSums {
    let x = &x[..dy.len()];
    // 16 lanes per sum (two rows of eight), six vector accumulators in all
    let (mut a, mut b, mut c) = ([[0f32; 8]; 2], [[0f32; 8]; 2], [[0f32; 8]; 2]);
    let (mut d16, mut x16) = (dy.chunks_exact(16), x.chunks_exact(16));
    for (d, xs) in (&mut d16).zip(&mut x16) {
        for r in 0..2 {
            let (dv, xv) = (
                load8::<U, SIMD>(&d[8 * r..]),
                load8::<T, SIMD>(&xs[8 * r..]),
            );
            for l in 0..8 {
                let xm = xv[l] - mean;
                a[r][l] += dv[l];
                b[r][l] += dv[l] * xm;
                c[r][l] += xm;
            }
        }
    }
    let (mut ra, mut rb, mut rc) = (0f32, 0f32, 0f32);
    for (d, xv) in d16.remainder().iter().zip(x16.remainder()) {
        let (dv, xm) = (load1(d), load1(xv) - mean);
        ra += dv;
        rb += dv * xm;
        rc += xm;
    }
    BwdSums {
        dy: fold_lanes2::<SIMD>(&a) + ra,
        dy_xm: fold_lanes2::<SIMD>(&b) + rb,
        xm: fold_lanes2::<SIMD>(&c) + rc,
    }
}

/// [`BwdSums`] of a contiguous run, pairwise over chunks.
pub(super) fn run_sums<T: Element, U: Element>(dy: &[U], x: &[T], mean: f32) -> BwdSums {
    if dy.len() <= CHUNK {
        return if dy.is_empty() {
            BwdSums::default()
        } else {
            leaf_sums(dy, x, mean)
        };
    }
    let mid = split_point(dy.len(), CHUNK);
    let (dya, dyb) = dy.split_at(mid);
    let (xa, xb) = x.split_at(mid);
    let (sa, sb) = if dy.len() >= PAR_MIN && may_split() {
        rayon::join(|| run_sums(dya, xa, mean), || run_sums(dyb, xb, mean))
    } else {
        (run_sums(dya, xa, mean), run_sums(dyb, xb, mean))
    };
    sa.add(sb)
}

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
pub(super) fn row_coefs<P: Element>(
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
    if nchw_order(geo) {
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
pub(super) fn backward_nchw<T: Element, U: Element, P: Element>(
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
    type Item<'a, T, U> = (
        usize,
        (
            (&'a mut [T], (&'a [T], &'a [U])),
            (&'a mut [f32], &'a mut [f32]),
        ),
    );
    let body = |scr: &mut Scratch, (row, ((dxr, (xr, dyr)), (sdy_r, sdyx_r))): Item<'_, T, U>| {
        let g = row % groups;
        let (m, r) = (mean[row], rstd[row]);
        let sum_xm = nchw_row_sums(xr, dyr, s, m, sdy_r, sdyx_r, scr);
        let (k2, k3) = row_coefs(weight, g, sdy_r, sdyx_r, sum_xm, l, m, r);
        for_each_row_piece(dxr, scr, |off, dp, _| {
            let (xp, dyp) = (&xr[off..off + dp.len()], &dyr[off..off + dp.len()]);
            dx_piece(xp, dyp, dp, off, s, g * d, r, m, k2, k3, weight);
        });
    };
    // rows `first..` of the tensor, one after the other
    let rows_from =
        |first: usize, dx: &mut [T], x: &[T], dy: &[U], sdy: &mut [f32], sdyx: &mut [f32]| {
            let mut scr = Scratch::new();
            dx.chunks_mut(l)
                .zip(x.chunks(l).zip(dy.chunks(l)))
                .zip(sdy.chunks_mut(d).zip(sdyx.chunks_mut(d)))
                .enumerate()
                .for_each(|(i, item)| body(&mut scr, (first + i, item)));
        };
    match sched(geo, geo.rows()) {
        Sched::Caller => rows_from(0, dx, x, dy, sdy, sdyx),
        Sched::Halves => {
            let h = geo.rows() / 2;
            let (dx0, dx1) = dx.split_at_mut(h * l);
            let (x0, x1) = x.split_at(h * l);
            let (dy0, dy1) = dy.split_at(h * l);
            let (sdy0, sdy1) = sdy.split_at_mut(h * d);
            let (sdyx0, sdyx1) = sdyx.split_at_mut(h * d);
            in_halves(
                || rows_from(0, dx0, x0, dy0, sdy0, sdyx0),
                || rows_from(h, dx1, x1, dy1, sdy1, sdyx1),
            );
        }
        Sched::Pool => dx
            .par_chunks_mut(l)
            .zip(x.par_chunks(l).zip(dy.par_chunks(l)))
            .zip(sdy.par_chunks_mut(d).zip(sdyx.par_chunks_mut(d)))
            .enumerate()
            .with_min_len(min_rows_per_task(l))
            .for_each_with(Scratch::new(), |scr, item| body(scr, item)),
    }
}

/// Per-channel `sum dy` and `sum dy*(x - mean)` of one NCHW row (into `sdy`, `sdyx`), and
/// the row's `sum (x - mean)`. Runs of at least [`CHUNK`] values get a pairwise tree each,
/// runs of [`LANES`] to [`CHUNK`] one leaf each; shorter runs are summed in sequence, block by
/// block, so that their conversions and loops are amortized over whole blocks.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
pub(super) fn nchw_row_sums<T: Element, U: Element>(
    xr: &[T],
    dyr: &[U],
    s: usize,
    mean: f32,
    sdy: &mut [f32],
    sdyx: &mut [f32],
    scr: &mut Scratch,
) -> f32 {
    if s >= CHUNK {
        return per_run_sums(xr, dyr, s, sdy, sdyx, |d, x| run_sums(d, x, mean));
    }
    if s >= LANES {
        // One leaf per channel run: lane sums rather than one sequential sum per run (three
        // dependent additions per value: 32x1280x8x8 bf16 ran at 0.46x PyTorch).
        return if use_simd() {
            per_run_sums(xr, dyr, s, sdy, sdyx, |d, x| {
                leaf_sums_of::<T, U, true>(d, x, mean)
            })
        } else {
            per_run_sums(xr, dyr, s, sdy, sdyx, |d, x| {
                leaf_sums_of::<T, U, false>(d, x, mean)
            })
        };
    }
    let mut sum_xm = 0f32;
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

/// [`nchw_row_sums`] for runs of at least [`LANES`] values: `sums` of each channel run of `s`
/// values into `sdy`, `sdyx`; returns the row's `sum (x - mean)`. (A generic closure, inlined
/// into the AVX2 copy of its caller: a leaf passed as a function pointer ran in baseline code,
/// 2x slower than the sequential sums.)
#[inline(always)]
fn per_run_sums<T: Element, U: Element>(
    xr: &[T],
    dyr: &[U],
    s: usize,
    sdy: &mut [f32],
    sdyx: &mut [f32],
    sums: impl Fn(&[U], &[T]) -> BwdSums,
) -> f32 {
    let mut sum_xm = 0f32;
    for (dc, (a, b)) in sdy.iter_mut().zip(sdyx.iter_mut()).enumerate() {
        let run = dc * s..(dc + 1) * s;
        let r = sums(&dyr[run.clone()], &xr[run]);
        (*a, *b) = (r.dy, r.dy_xm);
        sum_xm += r.xm;
    }
    sum_xm
}

/// `dx = k1[c]*dy - k2*(x - mean) - k3` over a piece of an NCHW row that starts at row offset
/// `off` (channel runs of `s` values, the row's first channel `c0`, `k1[c] = rstd * w[c]`).
/// Compiled for AVX2 too and picked at run time (same operations in the same order).
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx2+fma+f16c"))]
fn dx_piece<T: Element, U: Element, P: Element>(
    xp: &[T],
    dyp: &[U],
    dp: &mut [T],
    off: usize,
    s: usize,
    c0: usize,
    r: f32,
    m: f32,
    k2: f32,
    k3: f32,
    weight: Option<&[P]>,
) {
    let run = |x: &[T], dy: &[U], o: &mut [T], k1: f32| {
        let f = move |xi: f32, di: f32| k1 * di - k2 * (xi - m) - k3;
        if use_simd() {
            map2_values::<T, U, true>(x, dy, o, f)
        } else {
            map2_values::<T, U, false>(x, dy, o, f)
        }
    };
    for_each_channel_run(off, xp.len(), s, |dc, k| {
        let k1 = r * param(weight, c0 + dc, 1.0);
        run(&xp[k.clone()], &dyp[k.clone()], &mut dp[k], k1);
    });
}
