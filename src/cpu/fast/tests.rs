//! Unit tests of the fast path's building blocks.

use super::*;
use half::bf16;
use half::slice::HalfFloatSliceExt;

/// A xorshift stream of values in [-3, 5), offset by 1e4 where the state is a multiple of
/// `outlier` (far values among near ones).
fn xorshift_values(seed: u64, outlier: u64) -> impl FnMut() -> f32 {
    let mut rng = seed;
    move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 3.0 + 1e4 * f32::from(rng % outlier == 0)
    }
}

/// Runs the generic check `$f::<T, SIMD>` for every dtype, in the plain form and, where the
/// CPU has AVX2 and F16C, the vector form.
macro_rules! every_dtype_and_form {
    ($f:ident) => {{
        $f::<f32, false>();
        $f::<f16, false>();
        $f::<bf16, false>();
        if use_simd() {
            $f::<f32, true>();
            $f::<f16, true>();
            $f::<bf16, true>();
        }
    }};
}

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
    let m = run_moments(&v, 0.0);
    assert_eq!(m.count, 1000);
    assert!((m.mean - direct_mean).abs() < 1e-5 * direct_mean);
    assert!((m.m2 as f64 - direct_m2).abs() < 1e-5 * direct_m2);
}

/// Rows whose spread is one ulp of their offset: the f32 leaf's second pass sums about the
/// centre rounded to f32, half the spread away from the true centre here, and must take the
/// square of that rounding back out (`stats::leaf_f32`), or its `m2` comes out twice too big.
#[test]
fn f32_leaves_with_a_spread_of_one_ulp() {
    let ulp = 1e4f32.to_bits() + 1;
    for (len, pivot_at) in [(LEAF, 0), (1000, 1), (37, 0), (3 * LEAF + 5, 1)] {
        let x: Vec<f32> = (0..len)
            .map(|i| if i % 2 == 0 { 1e4 } else { f32::from_bits(ulp) })
            .collect();
        let mean = x.iter().map(|&e| f64::from(e)).sum::<f64>() / len as f64;
        let m2: f64 = x.iter().map(|&e| (f64::from(e) - mean).powi(2)).sum();
        let pivot = x[pivot_at];
        let m = run_moments(&x, pivot);
        let got_mean = f64::from(pivot) + m.mean;
        assert!(
            (got_mean - mean).abs() <= 1e-7 * (mean - 1e4),
            "{len}: mean {got_mean} vs {mean}"
        );
        assert!(
            (f64::from(m.m2) - m2).abs() <= 1e-6 * m2,
            "{len}: m2 {} vs {m2}",
            m.m2
        );
    }
}

/// The NCHW forward of rows of at most one leaf, which runs them in batches
/// (`forward::forward_rows`), against one `run_moments` and one `normalize_piece` call per
/// row: the same bits, with and without the activation, in every dtype.
fn batched_rows_match_per_row_calls<T: Element>() {
    use crate::config::GroupNorm;
    let mut rng = 0x853c_49e6_748f_ea9bu64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 1.5
    };
    let cases: [(&[usize], usize); 4] = [
        (&[4, 64, 16, 16], 32),
        (&[3, 6, 35], 3),
        (&[2, 8], 4),
        (&[1, 4, 512], 1),
    ];
    for (dims, g) in cases {
        let geo = GroupNorm::new(g, dims[1]).unwrap().geometry(dims).unwrap();
        let (l, numel, eps) = (geo.row_len(), geo.numel(), 1e-5);
        assert!(l <= LEAF);
        let x: Vec<T> = (0..numel)
            .map(|i| T::from_f32(next() + (i % 3) as f32))
            .collect();
        let w: Vec<f32> = (0..geo.c).map(|_| next()).collect();
        let b: Vec<f32> = (0..geo.c).map(|_| next()).collect();
        for act in [Activation::None, Activation::Silu] {
            let mut y = vec![T::from_f32(0.0); numel];
            let (mut mean, mut rstd) = (vec![0f32; geo.rows()], vec![0f32; geo.rows()]);
            let (wo, bo) = (Some(&w[..]), Some(&b[..]));
            forward::forward(&geo, eps, act, &x, wo, bo, &mut y, &mut mean, &mut rstd);
            let mut want = vec![T::from_f32(0.0); numel];
            let mut scr = Scratch::new();
            for row in 0..geo.rows() {
                let (xr, yr) = (&x[row * l..][..l], &mut want[row * l..][..l]);
                let pivot = xr[0].to_f32();
                let st = RowStats::from_moments(run_moments(xr, pivot), pivot, eps);
                let c0 = (row % g) * geo.d;
                forward::normalize_piece(xr, yr, &mut scr, 0, geo.s, c0, st, wo, bo, act);
                let ctx = format!("{dims:?} row {row} {act:?}");
                assert_eq!(mean[row].to_bits(), st.mean.to_bits(), "mean, {ctx}");
                assert_eq!(rstd[row].to_bits(), st.rstd.to_bits(), "rstd, {ctx}");
            }
            let bits = |y: &[T]| y.iter().map(|e| e.to_f32().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&want), "y, {dims:?} {act:?}");
        }
    }
}

#[test]
fn short_rows_in_batches_give_the_bits_of_per_row_calls() {
    batched_rows_match_per_row_calls::<f32>();
    batched_rows_match_per_row_calls::<f16>();
    batched_rows_match_per_row_calls::<bf16>();
}

#[test]
fn split_point_keeps_whole_chunks_on_the_left() {
    for l in [CHUNK, LEAF] {
        assert_eq!(split_point(l + 1, l), l);
        assert_eq!(split_point(2 * l, l), l);
        assert_eq!(split_point(4 * l - 24, l), 2 * l);
    }
}

/// The tree as a plain recursion (what `run_moments` computed before its serial part became
/// one call, `walk_tree`): every length must give the same bits, for every dtype.
fn recursive_tree<T: Element>(x: &[T], pivot: f32) -> Moments {
    if x.len() <= LEAF {
        return run_moments(x, pivot); // one leaf
    }
    let (a, b) = x.split_at(split_point(x.len(), LEAF));
    recursive_tree(a, pivot).merge(recursive_tree(b, pivot))
}

#[test]
fn the_serial_tree_is_the_recursive_tree() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 1.0
    };
    let c = LEAF;
    let v: Vec<f32> = (0..PAR_MIN + 64 * c).map(|_| next()).collect();
    let h: Vec<f16> = v.iter().map(|&e| f16::from_f32(e)).collect();
    let b: Vec<bf16> = v.iter().map(|&e| bf16::from_f32(e)).collect();
    let lens = [
        1,
        7,
        c - 1,
        c,
        c + 1,
        2 * c,
        2 * c + 1,
        3 * c,
        3 * c - 5,
        5 * c + 3,
        7 * c,
        8 * c,
        13 * c + 100,
        33 * c + 1,
        64 * c,
        PAR_MIN - 1,
        PAR_MIN,
        PAR_MIN + 3 * c + 7,
    ];
    for &n in &lens {
        for pivot in [0.0, v[0], 40.0] {
            assert_eq!(
                run_moments(&v[..n], pivot),
                recursive_tree(&v[..n], pivot),
                "f32 {n}"
            );
            assert_eq!(
                run_moments(&h[..n], pivot),
                recursive_tree(&h[..n], pivot),
                "f16 {n}"
            );
            assert_eq!(
                run_moments(&b[..n], pivot),
                recursive_tree(&b[..n], pivot),
                "bf16 {n}"
            );
        }
    }
    // the walk visits leaves left to right, once each, and merges them all
    for k in 1..=70 {
        let mut order = Vec::new();
        let m = walk_tree(k, |i| {
            order.push(i);
            Moments {
                count: 1,
                mean: i as f64,
                m2: 0.0,
            }
        });
        assert_eq!(order, (0..k).collect::<Vec<_>>(), "k = {k}");
        assert_eq!(m.count, k, "k = {k}");
    }
}

#[test]
fn chunk_with_inf_gives_nan_variance() {
    let mut v = vec![1.0f32; 10];
    v[3] = f32::INFINITY;
    let st = RowStats::from_moments(run_moments(&v, 1.0), 1.0, 1e-5);
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

/// f32 inputs covering every rounding case class of a conversion to bf16: every sign,
/// exponent and top mantissa bits, with low bits exactly at, below and above the halfway point
/// (16 dropped bits), plus scrambled patterns.
fn rounding_cases() -> impl Iterator<Item = f32> {
    const LOW: [u32; 12] = [
        0, 1, 0xfff, 0x1000, 0x1001, 0x1fff, 0x7fff, 0x8000, 0x8001, 0xffff, 0x2345, 0xbeef,
    ];
    (0u32..1 << 16).flat_map(|hi| LOW.iter().map(move |&lo| f32::from_bits((hi << 16) | lo)))
}

#[test]
fn bf16_rounding_matches_half() {
    for v in rounding_cases() {
        let want = bf16::from_f32(v).to_bits();
        assert_eq!(
            f32_to_bf16_bits(v),
            want,
            "f32 {:#010x} ({v:e})",
            v.to_bits()
        );
    }
}

/// Widens every 16-bit pattern with `widen`, narrows it back with `narrow`: everything comes
/// back exactly, NaNs (magnitude above `inf`) quieted by `quiet`.
fn round_trips_every_value(
    widen: fn(&[u16], &mut [f32]),
    narrow: fn(&[f32], &mut [u16]),
    inf: u16,
    quiet: u16,
) {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let mut wide = vec![0f32; all.len()];
    let mut back = vec![0u16; all.len()];
    widen(&all, &mut wide);
    narrow(&wide, &mut back);
    for (&a, &b) in all.iter().zip(&back) {
        let quieted = if (a & 0x7fff) > inf { a | quiet } else { a };
        assert_eq!(b, quieted, "bits {a:#06x}");
    }
}

#[test]
fn bf16_slices_round_trip_every_value() {
    // widened by `half` (NaNs quieted), narrowed by ours
    let widen = |src: &[u16], dst: &mut [f32]| {
        for (d, &b) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(b).to_f32();
        }
    };
    round_trips_every_value(widen, f32_to_bf16_slice, 0x7f80, 0x0040);
}

#[test]
fn f16_widening_matches_half_for_every_input() {
    for bits in 0..=u16::MAX {
        let want = f16::from_bits(bits).to_f32();
        let got = f16_bits_to_f32(bits);
        assert_eq!(got.to_bits(), want.to_bits(), "f16 bits {bits:#06x}");
    }
}

/// f32 inputs covering every rounding case class of a conversion to f16: every sign, exponent
/// and top ten mantissa bits, with the 13 dropped bits exactly at, below and above the halfway
/// point (subnormal results drop more bits; their halfway points are among the top bits).
fn f16_rounding_cases() -> impl Iterator<Item = f32> {
    const LOW: [u32; 10] = [
        0, 1, 0x07ff, 0x0800, 0x0fff, 0x1000, 0x1001, 0x17ff, 0x1fff, 0x0a5b,
    ];
    (0u32..1 << 19).flat_map(|hi| LOW.iter().map(move |&lo| f32::from_bits((hi << 13) | lo)))
}

#[test]
fn f16_rounding_matches_half_and_its_slice_conversion() {
    let cases: Vec<f32> = f16_rounding_cases().collect();
    // `half`'s slice conversion uses F16C where the CPU has it: the hardware's own answer
    let mut hw = vec![f16::ZERO; cases.len()];
    hw.convert_from_f32_slice(&cases);
    for (&v, h) in cases.iter().zip(&hw) {
        let got = f32_to_f16_bits(v);
        assert_eq!(
            got,
            f16::from_f32(v).to_bits(),
            "f32 {:#010x} ({v:e})",
            v.to_bits()
        );
        assert_eq!(got, h.to_bits(), "f32 {:#010x} ({v:e}), slice", v.to_bits());
    }
    // our own slice conversion (F16C where this CPU has it), with a remainder of 5
    let n = cases.len() - 3;
    let mut ours = vec![0u16; n];
    f32_to_f16_slice(&cases[..n], &mut ours);
    for ((&v, &o), h) in cases.iter().zip(&ours).zip(&hw) {
        assert_eq!(o, h.to_bits(), "f32 {:#010x} ({v:e}), ours", v.to_bits());
    }
}

#[test]
fn f16_slices_round_trip_every_value() {
    // F16C where this CPU has it, the branch-free loops otherwise
    round_trips_every_value(f16_to_f32_slice, f32_to_f16_slice, 0x7c00, 0x0200);
}

#[test]
fn lane_sums_fold_pairwise_in_a_fixed_order_and_add_the_remainder_last() {
    // rows 0 and 1 first (lane 0 + lane 8 cancels), then lanes 0 + 4, 0 + 2, 0 + 1
    let mut rows = [[0f32; 8]; 2];
    (rows[0][0], rows[1][0], rows[0][1], rows[0][4]) = (1e8, -1e8, 1.0, 1.0);
    assert_eq!(fold_lanes(&rows), 2.0);
    // lanes 0 and 1 in order would lose the 1: 1e8 + 1 == 1e8
    let mut one = [[0f32; 8]; 1];
    (one[0][0], one[0][1], one[0][4]) = (1e8, 1.0, -1e8);
    assert_eq!(fold_lanes(&one), 1.0);
    let v: Vec<f32> = (0..LANES * 3 + 5).map(|i| i as f32).collect();
    let n = v.len() as f32;
    assert_eq!(lane_sum(&v, |e| e), n * (n - 1.0) / 2.0);
    // lane 0 sums 1e8 and -1e8 exactly (values 0 and 32); the remainder (value 96) comes last
    let mut w = vec![0f32; LANES * 3 + 1];
    (w[0], w[LANES], w[1], w[3 * LANES]) = (1e8, -1e8, 1.0, 1.0);
    assert_eq!(lane_sum(&w, |e| e), 2.0);
}

#[test]
fn bf16_widening_for_arithmetic_computes_as_half_s_values() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let mut fast = vec![0f32; all.len()];
    bf16_to_f32_for_arithmetic(&all, &mut fast);
    let exact: Vec<f32> = all.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
    // a run-time operand, so that the additions below run on the CPU, not in constant folding
    let zero = std::hint::black_box(-0.0f32);
    for ((&bits, &f), &e) in all.iter().zip(&fast).zip(&exact) {
        if e.is_nan() {
            // the first operation quiets the signaling NaN: the same bits as half's quieted one
            let (a, b) = (
                std::hint::black_box(f) + zero,
                std::hint::black_box(e) + zero,
            );
            assert!(a.is_nan() && b.is_nan(), "{bits:#06x}");
            assert_eq!(a.to_bits(), b.to_bits(), "{bits:#06x}");
        } else {
            assert_eq!(f.to_bits(), e.to_bits(), "{bits:#06x}");
        }
    }
}

/// [`load8`], [`store8`], [`store16`] (and the tails' [`load1`], [`store1`]) over every
/// 16-bit pattern and every rounding case class, in both forms (the vector one where this
/// CPU has it): the same bits as the span conversions through buffers.
fn register_conversions_match_spans<const SIMD: bool>() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let (h, b): (Vec<f16>, Vec<bf16>) = all
        .iter()
        .map(|&u| (f16::from_bits(u), bf16::from_bits(u)))
        .unzip();
    let mut want = vec![0f32; all.len()];
    f16_to_f32_slice(&all, &mut want);
    for (i, e) in h.chunks_exact(8).enumerate() {
        let got = load8::<f16, SIMD>(e);
        for (l, g) in got.iter().enumerate() {
            let w = want[i * 8 + l];
            assert_eq!(g.to_bits(), w.to_bits(), "f16 {:#06x}", i * 8 + l);
            assert_eq!(
                load1(&e[l]).to_bits(),
                w.to_bits(),
                "f16 {:#06x}",
                i * 8 + l
            );
        }
    }
    bf16_to_f32_for_arithmetic(&all, &mut want);
    for (i, e) in b.chunks_exact(8).enumerate() {
        let got = load8::<bf16, SIMD>(e);
        for (l, g) in got.iter().enumerate() {
            let w = want[i * 8 + l];
            assert_eq!(g.to_bits(), w.to_bits(), "bf16 {:#06x}", i * 8 + l);
            assert_eq!(
                load1(&e[l]).to_bits(),
                w.to_bits(),
                "bf16 {:#06x}",
                i * 8 + l
            );
        }
    }
    let cases: Vec<f32> = f16_rounding_cases().chain(rounding_cases()).collect();
    let n = cases.len() / 16 * 16;
    let (mut h8, mut h16) = (vec![f16::ZERO; n], vec![f16::ZERO; n]);
    let (mut b8, mut b16) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
    let (mut f8, mut f16s) = (vec![0f32; n], vec![0f32; n]);
    let v8 = |s: &[f32]| -> F8 { s.try_into().expect("eight values") };
    for (i, c) in cases[..n].chunks_exact(16).enumerate() {
        let at = i * 16;
        for k in [0, 8] {
            store8::<f16, SIMD>(v8(&c[k..k + 8]), &mut h8[at + k..]);
            store8::<bf16, SIMD>(v8(&c[k..k + 8]), &mut b8[at + k..]);
            store8::<f32, SIMD>(v8(&c[k..k + 8]), &mut f8[at + k..]);
        }
        let (lo, hi) = (v8(&c[..8]), v8(&c[8..]));
        store16::<f16, SIMD>(lo, hi, &mut h16[at..]);
        store16::<bf16, SIMD>(lo, hi, &mut b16[at..]);
        store16::<f32, SIMD>(lo, hi, &mut f16s[at..]);
    }
    // one NaN (quiet or signalling, either sign) at each of sixteen places among values that
    // round up, to even and down: `store16`'s bf16 form takes its NaN-free shortcut unless a
    // lane of either half is NaN
    for nan in [0x7fc0_0001u32, 0x7f80_0001, 0xffff_ffff, 0xff80_4000] {
        for at in 0..16 {
            let mut v: Vec<f32> = (0..16)
                .map(|i| f32::from_bits(0x3f80_8000 + 0x1_0000 * (i % 3) + (i & 1)))
                .collect();
            v[at] = f32::from_bits(nan);
            let mut got = [bf16::ZERO; 16];
            store16::<bf16, SIMD>(v8(&v[..8]), v8(&v[8..]), &mut got);
            for (g, &e) in got.iter().zip(&v) {
                let what = format!("{:#010x} among 16, at {at}", e.to_bits());
                assert_eq!(g.to_bits(), f32_to_bf16_bits(e), "bf16 {what}");
            }
        }
    }
    for (i, &v) in cases[..n].iter().enumerate() {
        let (wh, wb) = (f32_to_f16_bits(v), f32_to_bf16_bits(v));
        let what = format!("f32 {:#010x}", v.to_bits());
        assert_eq!((h8[i].to_bits(), h16[i].to_bits()), (wh, wh), "f16 {what}");
        assert_eq!((b8[i].to_bits(), b16[i].to_bits()), (wb, wb), "bf16 {what}");
        assert_eq!(
            (f8[i].to_bits(), f16s[i].to_bits()),
            (v.to_bits(), v.to_bits())
        );
        let (mut oh, mut ob) = (f16::ZERO, bf16::ZERO);
        store1(v, &mut oh);
        store1(v, &mut ob);
        assert_eq!((oh.to_bits(), ob.to_bits()), (wh, wb), "{what}, one");
    }
}

#[test]
fn register_conversions_match_the_span_conversions() {
    register_conversions_match_spans::<false>();
    if use_simd() {
        register_conversions_match_spans::<true>();
    }
}

/// The fused forms give the bits of the buffered ones: `lane_sum_of` (and the vector lane
/// fold) against `lane_sum` over the converted values, `map_values` against the same
/// arithmetic through `read_f32`/`write_f32`, on lengths with every remainder.
fn fused_forms_match_buffered<T: Element, const SIMD: bool>() {
    let mut next = xorshift_values(0x2545_f491_4f6c_dd1d, 7);
    for len in (1..=70).chain([CHUNK - 1, CHUNK]) {
        let x: Vec<T> = (0..len).map(|_| T::from_f32(next())).collect();
        let (pivot, scale, shift) = (x[0].to_f32(), 0.37f32, -1.25f32);
        let f = |e: f32| ((e - pivot) - 0.5) * scale + shift;
        let mut buf = [0f32; CHUNK];
        let want = read_f32(&x, &mut buf, |v| lane_sum(v, |e| (e - pivot) * (e - pivot)));
        let got = lane_sum_of::<T, SIMD>(&x, |e| (e - pivot) * (e - pivot));
        assert_eq!(got.to_bits(), want.to_bits(), "lane sum, len {len}");
        let mut want_y = vec![T::from_f32(0.0); len];
        let mut by = [0f32; CHUNK];
        read_f32(&x, &mut buf, |v| {
            write_f32(&mut want_y, &mut by, |o| {
                for (o, &v) in o.iter_mut().zip(v) {
                    *o = f(v);
                }
            })
        });
        let mut got_y = vec![T::from_f32(0.0); len];
        map_values::<T, SIMD>(&x, &mut got_y, |_, v| f(v));
        let bits = |y: &[T]| y.iter().map(|e| e.to_f32().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got_y), bits(&want_y), "map, len {len}");
        // per-channel forms (NHWC): coefficients vary along the run
        let coef = |k: f32| (0..len).map(|i| k * (i as f32 + 1.0)).collect::<Vec<f32>>();
        let (p, m, a, b) = (coef(0.5), coef(-0.25), coef(0.01), coef(3.0));
        let mut want_y = vec![T::from_f32(0.0); len];
        read_f32(&x, &mut buf, |v| {
            write_f32(&mut want_y, &mut by, |o| {
                for (j, (o, &v)) in o.iter_mut().zip(v).enumerate() {
                    *o = (v - m[j]) * a[j] + b[j];
                }
            })
        });
        affine_per_channel::<T, SIMD>(&x, &mut got_y, &m, &a, &b);
        assert_eq!(bits(&got_y), bits(&want_y), "per-channel affine, len {len}");
        let (mut want_acc, mut got_acc) = (b.clone(), b.clone());
        let g = |e: f32, p: f32, m: f32| ((e - p) - m) * ((e - p) - m);
        read_f32(&x, &mut buf, |v| {
            for (j, (acc, &e)) in want_acc.iter_mut().zip(v).enumerate() {
                *acc += g(e, p[j], m[j]);
            }
        });
        accumulate_channels::<T, SIMD>(&mut got_acc, &x, &p, &m, g);
        let fbits = |v: &[f32]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
        assert_eq!(fbits(&got_acc), fbits(&want_acc), "channel sums, len {len}");
        // sums and squares in one walk (the f16/bf16 NHWC one-pass leaf)
        let (mut want_s1, mut want_s2) = (a.clone(), b.clone());
        read_f32(&x, &mut buf, |v| {
            for (j, &e) in v.iter().enumerate() {
                let dv = e - p[j];
                want_s1[j] += dv;
                want_s2[j] += dv * dv;
            }
        });
        let (mut got_s1, mut got_s2) = (a.clone(), b.clone());
        accumulate_channels_and_squares::<T, SIMD>(&mut got_s1, &mut got_s2, &x, &p);
        assert_eq!(
            fbits(&got_s1),
            fbits(&want_s1),
            "channel sums of one walk, len {len}"
        );
        assert_eq!(
            fbits(&got_s2),
            fbits(&want_s2),
            "channel squares, len {len}"
        );
        // two-input forms (the backward): the three sums of a leaf in 16 lanes each (lane
        // `i % 16`, in order), folded pairwise, the remainder in order added last
        let d: Vec<T> = (0..len).map(|_| T::from_f32(next())).collect();
        let (mut ra, mut rb, mut rc) = ([[0f32; 8]; 2], [[0f32; 8]; 2], [[0f32; 8]; 2]);
        let (mut ta, mut tb, mut tc) = (0f32, 0f32, 0f32);
        let whole = len - len % 16;
        for (i, (u, v)) in d.iter().zip(&x).enumerate() {
            let (dv, xm) = (load1(u), load1(v) - pivot);
            let (a, b, c) = if i < whole {
                let (r, l) = ((i % 16) / 8, i % 8);
                (&mut ra[r][l], &mut rb[r][l], &mut rc[r][l])
            } else {
                (&mut ta, &mut tb, &mut tc)
            };
            *a += dv;
            *b += dv * xm;
            *c += xm;
        }
        let got = leaf_sums_of::<T, T, SIMD>(&d, &x, pivot);
        let want = [
            fold_lanes(&ra) + ta,
            fold_lanes(&rb) + tb,
            fold_lanes(&rc) + tc,
        ];
        let got = [got.dy, got.dy_xm, got.xm];
        assert_eq!(fbits(&got), fbits(&want), "backward leaf sums, len {len}");
        let k = |xi: f32, di: f32| 0.75 * di - 0.125 * (xi - pivot) - 0.5;
        let mut want_y = vec![T::from_f32(0.0); len];
        for ((o, xi), di) in want_y.iter_mut().zip(&x).zip(&d) {
            store1(k(load1(xi), load1(di)), o);
        }
        map2_values::<T, T, SIMD>(&x, &d, &mut got_y, k);
        assert_eq!(bits(&got_y), bits(&want_y), "two-input map, len {len}");
    }
}

/// The f32 statistics leaf's 64-lane sum and the f32 forward's explicit affine loop against
/// plain loops: lane `i` sums values `i, i + 64, ...` in order, the lanes fold as
/// `fold_lanes` folds eight rows, the remainder adds last; the affine gives the bits of
/// `(v - hi) * scale + shift` per value.
fn wide_forms_match_plain_loops<T: Element, const SIMD: bool>() {
    let mut next = xorshift_values(0x9e37_79b9_7f4a_7c15, 5);
    for len in (1..=140).chain([CHUNK, LEAF - 1, LEAF]) {
        let x: Vec<T> = (0..len).map(|_| T::from_f32(next())).collect();
        let pivot = x[len / 2].to_f32();
        let f = |e: f32| (pivot - e) * (pivot - e);
        let mut rows = [[0f32; 8]; 8];
        let whole = len - len % 64;
        for (i, e) in x[..whole].iter().enumerate() {
            rows[(i % 64) / 8][i % 8] += f(load1(e));
        }
        let rest = x[whole..].iter().fold(0f32, |a, e| a + f(load1(e)));
        let want = fold_lanes(&rows) + rest;
        let got = wide_sum_of::<T, SIMD>(&x, f);
        assert_eq!(got.to_bits(), want.to_bits(), "wide sum, len {len}");
        let (hi, scale, shift) = (pivot + 0.5, 0.37f32, -1.25f32);
        let mut want_y = vec![T::from_f32(0.0); len];
        for (o, e) in want_y.iter_mut().zip(&x) {
            store1((load1(e) - hi) * scale + shift, o);
        }
        let mut got_y = vec![T::from_f32(0.0); len];
        affine_values::<T, SIMD>(&x, &mut got_y, hi, scale, shift);
        let bits = |y: &[T]| y.iter().map(|e| e.to_f32().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got_y), bits(&want_y), "affine, len {len}");
    }
}

/// The NHWC statistics' four-position walks against plain loops in their stated order.
fn four_position_sums_match_plain_loops<T: Element, const SIMD: bool>() {
    let mut next = xorshift_values(0x2545_f491_4f6c_dd1d, 7);
    for len in (1..=40).chain([CHUNK - 1, CHUNK]) {
        let xs: Vec<Vec<T>> = (0..4)
            .map(|_| (0..len).map(|_| T::from_f32(next())).collect())
            .collect();
        let x4 = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
        let p: Vec<f32> = (0..len).map(|_| next()).collect();
        let m: Vec<f32> = (0..len).map(|_| next() * 0.1).collect();
        let start: Vec<f32> = (0..len).map(|_| next()).collect();
        let f = |e: f32, p: f32, m: f32| ((e - p) - m) * ((e - p) - m);
        let v = |k: usize, j: usize| load1(&xs[k][j]);
        let mut want = start.clone();
        for (j, w) in want.iter_mut().enumerate() {
            let t = |k| f(v(k, j), p[j], m[j]);
            *w += (t(0) + t(1)) + (t(2) + t(3));
        }
        let mut got = start.clone();
        accumulate_channels4::<T, SIMD>(&mut got, x4, &p, &m, f);
        let fbits = |v: &[f32]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
        assert_eq!(fbits(&got), fbits(&want), "four positions, len {len}");
        let (mut w1, mut w2) = (start.clone(), m.clone());
        for j in 0..len {
            let d = |k| v(k, j) - p[j];
            w1[j] += (d(0) + d(1)) + (d(2) + d(3));
            w2[j] += (d(0) * d(0) + d(1) * d(1)) + (d(2) * d(2) + d(3) * d(3));
        }
        let (mut g1, mut g2) = (start.clone(), m.clone());
        accumulate_channels_and_squares4::<T, SIMD>(&mut g1, &mut g2, x4, &p);
        assert_eq!(fbits(&g1), fbits(&w1), "four positions' sums, len {len}");
        assert_eq!(fbits(&g2), fbits(&w2), "four positions' squares, len {len}");
    }
}

#[test]
fn four_position_walks_give_the_bits_of_plain_loops() {
    every_dtype_and_form!(four_position_sums_match_plain_loops);
}

#[test]
fn wide_sums_and_the_affine_loop_give_the_bits_of_plain_loops() {
    every_dtype_and_form!(wide_forms_match_plain_loops);
}

#[test]
fn fused_conversions_give_the_bits_of_the_buffered_ones() {
    every_dtype_and_form!(fused_forms_match_buffered);
}

/// Forward and backward of `dims` under schedule `s` (forced on this thread): every output's
/// bits.
fn outputs_under<T: Element>(s: Sched, layout: Layout, dims: &[usize], groups: usize) -> Vec<u64> {
    let c = dims[1];
    let mut next = xorshift_values(0x5eed + c as u64, 97);
    let numel: usize = dims.iter().product();
    let x: Vec<T> = (0..numel).map(|_| T::from_f32(next())).collect();
    let dy: Vec<T> = (0..numel).map(|_| T::from_f32(next() * 0.1)).collect();
    let w: Vec<f32> = (0..c).map(|_| next() * 0.25).collect();
    let b: Vec<f32> = (0..c).map(|_| next() * 0.25).collect();
    let gn = crate::GroupNorm::new(groups, c)
        .unwrap()
        .with_layout(layout)
        .with_activation(Activation::Silu);
    FORCED.with(|f| f.set(Some(s)));
    let affine = || crate::Affine::new().weight(&w).bias(&b);
    let (y, stats) = gn.forward(&x, dims, affine()).unwrap();
    let g = gn.backward(&dy, &x, dims, &stats, affine(), true).unwrap();
    FORCED.with(|f| f.set(None));
    let bits = |v: &[f32]| v.iter().map(|e| u64::from(e.to_bits())).collect::<Vec<_>>();
    let tbits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
    [
        tbits(&y),
        bits(&stats.mean),
        bits(&stats.rstd),
        tbits(&g.dx),
        bits(&g.dweight.unwrap()),
        bits(&g.dbias.unwrap()),
    ]
    .concat()
}

fn schedules_agree<T: Element>() {
    // numel from HALVES_MIN to ON_CALLER_MAX; odd batches, so that the halves are unequal and
    // the second does not start at a multiple of the groups
    let cases: [(Layout, &[usize], usize); 5] = [
        (Layout::Nchw, &[5, 64, 16, 16], 32), // rows of one leaf: in batches
        (Layout::Nchw, &[3, 32, 48, 48], 16), // longer rows, one after the other
        (Layout::Nchw, &[5, 24, 33, 29], 6),
        (Layout::Nhwc, &[3, 40, 24, 24], 8),
        (Layout::Nhwc, &[5, 96, 13, 11], 32),
    ];
    for (layout, dims, groups) in cases {
        let numel: usize = dims.iter().product();
        assert!((HALVES_MIN..=ON_CALLER_MAX).contains(&numel), "{dims:?}");
        let caller = outputs_under::<T>(Sched::Caller, layout, dims, groups);
        for s in [Sched::Halves, Sched::Pool] {
            let got = outputs_under::<T>(s, layout, dims, groups);
            assert!(
                got == caller,
                "{s:?} against Caller, {layout:?} {dims:?} {}",
                T::DTYPE
            );
        }
    }
}

#[test]
fn every_schedule_gives_the_bits_of_the_calling_thread() {
    let _turn = handoff::tests::MAILBOX_TESTS
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    schedules_agree::<f32>();
    schedules_agree::<f16>();
    schedules_agree::<bf16>();
}

/// Distance in representable f32 values between two finite non-negative floats.
fn ulps_apart(a: f32, b: f32) -> u32 {
    a.to_bits().abs_diff(b.to_bits())
}

#[test]
fn exp_matches_f64_within_two_ulp() {
    use activation::exp_f32;
    // every 97th float from -104 to 89 (about 6 million), subnormal and overflow edges
    // included
    let (lo, hi) = ((-104f32).to_bits(), 89f32.to_bits());
    let negatives = (0..=lo).step_by(97).map(f32::from_bits).map(|v| -v.abs());
    let positives = (0..=hi).step_by(97).map(f32::from_bits);
    let mut worst = (0, 0f32);
    for x in negatives.chain(positives) {
        let want = (x as f64).exp() as f32;
        let got = exp_f32(x);
        if want.is_infinite() {
            assert!(got == f32::INFINITY, "exp({x}) = {got}, want inf");
            continue;
        }
        let d = ulps_apart(got, want);
        if d > worst.0 {
            worst = (d, x);
        }
    }
    assert!(worst.0 <= 2, "exp({}) is {} ulp off", worst.1, worst.0);
    // the edges and non-finite inputs
    assert!(exp_f32(f32::NAN).is_nan());
    assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-105.0), 0.0);
    assert_eq!(exp_f32(88.8), f32::INFINITY);
    assert!(exp_f32(88.72).is_finite());
    assert_eq!(exp_f32(0.0), 1.0);
}

#[test]
fn fast_silu_and_its_derivative_match_the_libm_forms() {
    // the same formulas with libm's expf (Activation::apply_f32, derivative_f32): a few ulp
    // apart where the values are well away from zero, equal at the ends
    let act = Activation::Silu;
    let mut next = xorshift_values(7, u64::MAX);
    for i in 0..200_000 {
        let z = if i % 2 == 0 {
            next() * 4.0
        } else {
            next() * 30.0 - 60.0
        };
        let (got, want) = (activation::act_f32(act, z), act.apply_f32(z));
        assert!(
            (got - want).abs() <= 4.0 * f32::EPSILON * want.abs().max(f32::MIN_POSITIVE),
            "silu({z}): {got} against {want}"
        );
        // sig (1 + z (1 - sig)) cancels near its zero (z = -1.28): bound the difference by
        // the size of its terms, sig (1 + |z|), not by the result
        let (got, want) = (
            activation::act_derivative_f32(act, z),
            act.derivative_f32(z),
        );
        let sig = 1.0 / (1.0 + (-z).exp());
        assert!(
            (got - want).abs() <= 8.0 * f32::EPSILON * sig * (1.0 + z.abs()),
            "silu'({z}): {got} against {want}"
        );
    }
    for z in [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        100.0,
        -100.0,
        0.0,
    ] {
        let (got, want) = (activation::act_f32(act, z), act.apply_f32(z));
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "silu({z})"
        );
    }
}
