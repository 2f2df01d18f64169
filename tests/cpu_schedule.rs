//! The CPU path's scheduling does not change results: a small tensor runs on the calling thread,
//! a large one on rayon's pool (with AVX2 copies of the inner loops where the CPU has them), and
//! a sample gives the same bits either way. Each case runs one sample alone (small: on the
//! calling thread) and the same sample repeated in a batch large enough to be split across
//! threads, and compares `y`, the statistics and `dx` bit for bit, in both layouts and all three
//! 16/32-bit dtypes. (`dweight`/`dbias` sum over the batch, so they are not compared.)

use groupnorm::Affine;
use groupnorm::{bf16, f16, Element, GroupNorm, Layout};

/// Deterministic values with an offset and a spread (so the pivot and the tree matter).
fn values<T: Element>(len: usize, seed: u32, offset: f32) -> Vec<T> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            T::from_f32(offset + (s % 20_000) as f32 / 10_000.0 - 1.0)
        })
        .collect()
}

fn bits<T: Element>(v: &[T]) -> Vec<u64> {
    v.iter().map(|e| e.to_f64().to_bits()).collect()
}

fn check<T: Element>(layout: Layout, c: usize, groups: usize, spatial: usize) {
    // 2^18 elements or fewer run on the calling thread; 128 copies are above it for every
    // sample below (the smallest, 60 x 63, gives 483 840 elements)
    let copies = 128;
    let sample = c * spatial;
    let gn = GroupNorm::new(groups, c).unwrap().with_layout(layout);
    let x1: Vec<T> = values(sample, 1, 3.0);
    let dy1: Vec<T> = values(sample, 2, 0.0);
    let w: Vec<f32> = values(c, 3, 1.0);
    let b: Vec<f32> = values(c, 4, 0.0);
    let xn: Vec<T> = x1.iter().copied().cycle().take(sample * copies).collect();
    let dyn_: Vec<T> = dy1.iter().copied().cycle().take(sample * copies).collect();
    let (d1, dn) = ([1, c, spatial], [copies, c, spatial]);

    let (y1, s1) = gn
        .forward(&x1, &d1, Affine::new().weight(&w).bias(&b))
        .unwrap();
    let (yn, sn) = gn
        .forward(&xn, &dn, Affine::new().weight(&w).bias(&b))
        .unwrap();
    let g1 = gn
        .backward(&dy1, &x1, &d1, &s1, Affine::new().weight(&w), true)
        .unwrap();
    let gn_ = gn
        .backward(&dyn_, &xn, &dn, &sn, Affine::new().weight(&w), true)
        .unwrap();
    let what = format!("{layout:?} {} C={c} G={groups} S={spatial}", T::DTYPE);
    for k in 0..copies {
        let r = k * sample..(k + 1) * sample;
        assert_eq!(bits(&y1), bits(&yn[r.clone()]), "y, copy {k}, {what}");
        assert_eq!(bits(&g1.dx), bits(&gn_.dx[r]), "dx, copy {k}, {what}");
        let rows = k * groups..(k + 1) * groups;
        assert_eq!(bits(&s1.mean), bits(&sn.mean[rows.clone()]), "mean, {what}");
        assert_eq!(bits(&s1.rstd), bits(&sn.rstd[rows]), "rstd, {what}");
    }
}

fn all_dtypes(layout: Layout, c: usize, groups: usize, spatial: usize) {
    check::<f32>(layout, c, groups, spatial);
    check::<f16>(layout, c, groups, spatial);
    check::<bf16>(layout, c, groups, spatial);
}

#[test]
fn nchw_small_and_batched_agree_bit_for_bit() {
    all_dtypes(Layout::Nchw, 64, 32, 16 * 16);
    all_dtypes(Layout::Nchw, 60, 6, 7 * 9);
}

#[test]
fn nhwc_small_and_batched_agree_bit_for_bit() {
    all_dtypes(Layout::Nhwc, 64, 32, 16 * 16);
    all_dtypes(Layout::Nhwc, 320, 32, 8 * 8);
    all_dtypes(Layout::Nhwc, 60, 6, 7 * 9);
}
