//! Unit tests of the fast path's building blocks.

use super::*;
use half::bf16;
use half::slice::HalfFloatSliceExt;

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
    let m = run_moments(&v, 0.0, &mut [0.0; CHUNK]);
    assert_eq!(m.count, 1000);
    assert!((m.mean as f64 - direct_mean).abs() < 1e-5 * direct_mean);
    assert!((m.m2 as f64 - direct_m2).abs() < 1e-5 * direct_m2);
}

#[test]
fn split_point_keeps_whole_chunks_on_the_left() {
    assert_eq!(split_point(257), 256);
    assert_eq!(split_point(512), 256);
    assert_eq!(split_point(1000), 512);
    assert!(split_point(CHUNK + 1) < CHUNK + 1);
}

#[test]
fn chunk_with_inf_gives_nan_variance() {
    let mut v = vec![1.0f32; 10];
    v[3] = f32::INFINITY;
    let st = RowStats::from_moments(leaf_moments(&v, 1.0, &mut [0.0; CHUNK]), 1.0, 1e-5);
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
