//! Issue 15's library holes, each as a test that failed before its fix: sizes that overflow
//! (or cannot be allocated) on huge-but-empty tensors, eps that is valid in f64 but not in the
//! f32 every path computes with, and saved statistics no forward pass writes.
//!
//! Each was run against the code before its fix (a4f78a1's fix hunks reverted on 1e527af: the
//! checked geometry, the tried allocations, eps in f32, the statistics' values; 2026-11-30, on
//! the 2-core CI machine, `--no-default-features`, each test alone with `--exact`) and failed
//! there: a "capacity overflow" panic, an abort on a 4 TiB allocation, or the assertion.
//!
//! Run: `cargo test --release --test holes`.

use groupnorm::Affine;
use groupnorm::{Error, GroupNorm, Stats};

fn too_large<T: std::fmt::Debug>(r: Result<T, Error>, ctx: &str) {
    match r {
        Err(Error::TooLarge { .. }) => {}
        other => panic!("{ctx}: expected TooLarge, got {other:?}"),
    }
}

/// `[1 << 62, 1, 0]`: zero elements but 2^62 statistics; this panicked with "capacity
/// overflow" in `vec!`.
#[test]
fn forward_on_an_empty_tensor_with_a_huge_batch_is_refused() {
    let gn = GroupNorm::new(1, 1).unwrap();
    too_large(
        gn.forward::<f32, f32>(&[], &[1 << 62, 1, 0], Affine::new()),
        "[1 << 62, 1, 0]",
    );
    too_large(
        gn.forward::<half::f16, f32>(&[], &[1 << 62, 1, 0, 7], Affine::new()),
        "f16 [1 << 62, 1, 0, 7]",
    );
}

/// `[1 << 38, 1, 0]`: 2^38 statistics are 1 TiB each, an allocation the host refuses; this
/// aborted the process. Now the allocation is tried and its failure is a typed error.
#[test]
fn forward_whose_statistics_cannot_be_allocated_is_refused() {
    let gn = GroupNorm::new(1, 1).unwrap();
    too_large(
        gn.forward::<f32, f32>(&[], &[1 << 40, 1, 0], Affine::new()),
        "[1 << 40, 1, 0]",
    );
    // 2^38 rows (1 TiB of means): refused unless this machine really has the memory
    if let Err(e) = gn.forward::<f32, f32>(&[], &[1 << 38, 1, 0], Affine::new()) {
        assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    }
}

/// `backward` on `[0, 1 << 61]`: no elements, but a `C`-long `dweight`; this panicked.
#[test]
fn backward_on_an_empty_tensor_with_huge_channels_is_refused() {
    let gn = GroupNorm::new(1, 1 << 61).unwrap();
    let stats = Stats::default();
    too_large(
        gn.backward::<f32, f32>(&[], &[], &[0, 1 << 61], &stats, Affine::new(), true),
        "[0, 1 << 61]",
    );
    // 2^40 channels: dbias of 4 TiB, which the host cannot allocate
    let gn = GroupNorm::new(1, 1 << 40).unwrap();
    too_large(
        gn.backward::<f32, f32>(&[], &[], &[0, 1 << 40], &stats, Affine::new(), true),
        "[0, 1 << 40]",
    );
    // while small empty shapes still work, with zero gradients
    let gn = GroupNorm::new(2, 6).unwrap();
    let g = gn
        .backward::<f32, f32>(
            &[],
            &[],
            &[0, 6, 3],
            &stats,
            Affine::new().weight(&[1.0; 6]),
            true,
        )
        .unwrap();
    assert!(g.dx.is_empty());
    assert_eq!(g.dweight, Some(vec![0.0; 6]));
    assert_eq!(g.dbias, Some(vec![0.0; 6]));
    let stats = Stats {
        mean: vec![0.0; 4],
        rstd: vec![1.0; 4],
    };
    let g = gn
        .backward::<f32, f32>(&[], &[], &[2, 6, 0], &stats, Affine::new(), true)
        .unwrap();
    assert_eq!(
        (g.dx.len(), g.dweight, g.dbias),
        (0, None, Some(vec![0.0; 6]))
    );
}

/// `[2^30, 1431655765, 0]`, G = 1: `3 * N * C` per-channel partials wrap u64 (the GPU
/// workspace): refused by the geometry every path shares.
#[test]
fn geometry_bounds_every_derived_size_even_when_empty() {
    let gn = GroupNorm::new(1, 1_431_655_765).unwrap();
    too_large(gn.geometry(&[1 << 30, 1_431_655_765, 0]), "N * C partials");
    let gn = GroupNorm::new(1 << 20, 1 << 20).unwrap();
    too_large(gn.geometry(&[1 << 44, 1 << 20, 0]), "N * G");
    // the same shapes with a small batch are fine
    gn.geometry(&[3, 1 << 20, 0]).unwrap();
}

/// eps must survive `as f32`: `1e-50` became 0 (NaN rows), `1e300` became inf.
#[test]
fn eps_that_vanishes_or_overflows_in_f32_is_refused() {
    for eps in [1e-50, 1e300, 0.0] {
        let e = GroupNorm::new(1, 2).unwrap().with_eps(eps).unwrap_err();
        assert!(matches!(e, Error::InvalidEps { .. }), "{eps}: {e:?}");
        assert!(e.to_string().contains("f32"), "{e}");
    }
    // the smallest eps f32 keeps gives finite outputs on a constant row
    let gn = GroupNorm::new(1, 2).unwrap().with_eps(1e-45).unwrap();
    let (y, stats) = gn
        .forward::<f32, f32>(&[3.0, 3.0], &[1, 2], Affine::new())
        .unwrap();
    assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
    assert!(stats.rstd[0].is_finite() && stats.rstd[0] > 0.0);
}

/// Statistics whose values no forward pass writes: refused, with the row named.
#[test]
fn backward_refuses_statistics_no_forward_pass_writes() {
    let gn = GroupNorm::new(2, 4).unwrap();
    let dims = [2, 4, 3];
    let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.0).collect();
    let dy: Vec<f32> = (0..24).map(|i| ((i * 5) % 13) as f32 * 0.2 - 1.2).collect();
    let (_, good) = gn.forward::<f32, f32>(&x, &dims, Affine::new()).unwrap();
    gn.backward::<f32, f32>(&dy, &x, &dims, &good, Affine::new(), true)
        .unwrap();
    let cases: [(usize, f32, f32); 6] = [
        (1, 0.5, -1.0),
        (2, 0.5, 0.0),
        (3, 0.5, f32::NAN),
        (0, f32::NAN, 2.0),
        (1, 0.5, f32::INFINITY),
        (2, f32::NEG_INFINITY, 1.0),
    ];
    for (row, mean, rstd) in cases {
        let mut bad = good.clone();
        bad.mean[row] = mean;
        bad.rstd[row] = rstd;
        let e = gn
            .backward::<f32, f32>(&dy, &x, &dims, &bad, Affine::new(), true)
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidStats { row: r, .. } if r == row),
            "({row}, {mean}, {rstd}): {e:?}"
        );
    }
    // a poisoned row as the forward pass writes it (both NaN) is still accepted, and gives
    // NaN gradients for that row only
    let mut x2 = x.clone();
    x2[13] = f32::NAN; // n = 1, channel 0: row 2
    let (_, poisoned) = gn.forward::<f32, f32>(&x2, &dims, Affine::new()).unwrap();
    assert!(poisoned.mean[2].is_nan() && poisoned.rstd[2].is_nan());
    let g = gn
        .backward::<f32, f32>(&dy, &x2, &dims, &poisoned, Affine::new(), false)
        .unwrap();
    assert!(g.dx[12..18].iter().all(|v| v.is_nan()));
    assert!(g.dx[..12].iter().all(|v| v.is_finite()));
}
