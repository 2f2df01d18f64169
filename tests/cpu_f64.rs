//! f64 on the CPU path (issue 15): forward and backward accept f64 activations (with f64 or f32
//! parameters), computed in f64 and held to 1e-12 against the f64 reference (docs/design.md,
//! `accuracy::F64_TOLERANCE`), in both layouts, with and without SiLU; checked independently by
//! the worked examples and by central differences. The GPU path refuses f64 with a typed error.
//!
//! Run: `cargo test --release --test cpu_f64`.

mod common;

use common::*;
use groupnorm::accuracy::{dx_scale, F64_TOLERANCE};
use groupnorm::cpu::reference;
use groupnorm::Affine;
use groupnorm::{Activation, Element, GroupNorm, Layout, Stats};

const SHAPES: [(&[usize], usize); 5] = [
    (&[2, 8, 3, 3], 4),
    (&[1, 12, 5, 3, 2], 4),
    (&[3, 6], 2),
    (&[2, 4, 1000], 1),
    (&[1, 64, 7, 7], 32),
];

fn check_f64<P: Element>(seed: u64, offset: f64) {
    let mut r = rng(seed);
    for (dims, groups) in SHAPES {
        let (n, c, s) = ncs(dims);
        for layout in LAYOUTS {
            for act in [Activation::None, Activation::Silu] {
                let gn = GroupNorm::new(groups, c)
                    .unwrap()
                    .with_layout(layout)
                    .with_activation(act);
                let x: Vec<f64> = normal_f64(&mut r, n * c * s, offset, 1.0);
                let dy: Vec<f64> = normal_f64(&mut r, n * c * s, 0.0, 1.0);
                let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
                let b: Vec<P> = uniform_vec(&mut r, c, -0.5, 0.5);
                let ctx = format!(
                    "{dims:?} G={groups} {} {} {act:?} +{offset}",
                    layout.name(),
                    P::DTYPE
                );
                let (y, stats) = gn
                    .forward(&x, dims, Affine::new().weight(&w[..]).bias(&b[..]))
                    .unwrap();
                let rf = reference::forward(&gn, &x, dims, Some(&w[..]), Some(&b[..])).unwrap();
                for (i, (g, e)) in y.iter().zip(&rf.y).enumerate() {
                    assert!((g - e).abs() <= F64_TOLERANCE, "{ctx}: y[{i}] {g} vs {e}");
                }
                for (i, (g, e)) in stats.mean.iter().zip(&rf.mean).enumerate() {
                    assert_eq!(*g, *e as f32, "{ctx}: mean[{i}]");
                }
                // forward_into writes the same
                let mut y2 = vec![0.0f64; y.len()];
                let mut st2 = Stats {
                    mean: vec![0.0; stats.mean.len()],
                    rstd: vec![0.0; stats.rstd.len()],
                };
                gn.forward_into(
                    &x,
                    dims,
                    Affine::new().weight(&w[..]).bias(&b[..]),
                    &mut y2,
                    &mut st2,
                )
                .unwrap();
                assert_eq!((&y2, &st2), (&y, &stats), "{ctx}: forward_into");

                let g = gn
                    .backward(
                        &dy,
                        &x,
                        dims,
                        &stats,
                        Affine::new().weight(&w[..]).bias(&b[..]),
                        true,
                    )
                    .unwrap();
                let rb =
                    reference::backward_activated(&gn, &dy, &x, dims, Some(&w[..]), Some(&b[..]))
                        .unwrap();
                let wf = to_f64(&w);
                // ‖rstd·w·dy‖; with SiLU the backward's own input is dz = dy·silu'(z), with
                // |silu'| <= 1.1, so the same order of magnitude
                let scale = dx_scale(&dy, dims, groups, layout, Some(&wf), &rf.rstd);
                assert_dx_close(&g.dx, &rb.dx, scale, &ctx);
                assert_param_grad_close(&g.dweight.unwrap(), &rb.dweight, "dweight", &ctx);
                assert_param_grad_close(&g.dbias.unwrap(), &rb.dbias, "dbias", &ctx);
            }
        }
    }
}

#[test]
fn f64_matches_the_reference_to_1e_12() {
    check_f64::<f64>(64, 0.5);
    check_f64::<f32>(65, 0.5);
}

/// An offset of 1e4 costs f32 ~1e-3 in `x̂`; f64 keeps 1e-12.
#[test]
fn f64_with_a_large_offset() {
    check_f64::<f64>(66, 1e4);
}

/// docs/design.md's worked example, to f64 precision, from the formula (not the reference).
#[test]
fn f64_worked_example() {
    let x: Vec<f64> = (1..=32).map(f64::from).collect();
    let gn = GroupNorm::new(2, 2).unwrap();
    let (y, stats) = gn
        .forward::<f64, f64>(&x, &[1, 2, 4, 4], Affine::new())
        .unwrap();
    let want = (1.0 - 8.5) / (21.25f64 + 1e-5).sqrt();
    assert!((y[0] - want).abs() <= 1e-14, "{} vs {want}", y[0]);
    let want = (32.0 - 24.5) / (21.25f64 + 1e-5).sqrt();
    assert!((y[31] - want).abs() <= 1e-14, "{} vs {want}", y[31]);
    assert_eq!(stats.mean, vec![8.5, 24.5]);
    // and f32 cannot do this well: the f32 path's result differs by more than 1e-12
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let (y32, _) = gn
        .forward::<f32, f32>(&x32, &[1, 2, 4, 4], Affine::new())
        .unwrap();
    let worst = y32
        .iter()
        .zip(&y)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst > 1e-12,
        "f32 matched f64 to {worst}: the test would not see an f32 route"
    );
}

/// Central differences of `L = sum(y * dy)` in f64 agree with the backward (to 1e-6, the
/// differences' own error), independently of the reference.
#[test]
fn f64_gradients_match_central_differences() {
    let mut r = rng(67);
    let dims = [2usize, 4, 3];
    let gn = GroupNorm::new(2, 4)
        .unwrap()
        .with_activation(Activation::Silu);
    let x = normal_f64(&mut r, 24, 0.3, 1.0);
    let dy = normal_f64(&mut r, 24, 0.0, 1.0);
    let w = uniform_f64(&mut r, 4, 0.5, 1.5);
    let b = uniform_f64(&mut r, 4, -0.5, 0.5);
    let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
        let (y, _) = gn
            .forward(x, &dims, Affine::new().weight(w).bias(b))
            .unwrap();
        y.iter().zip(&dy).map(|(a, b)| a * b).sum()
    };
    let (_, stats) = gn
        .forward(&x, &dims, Affine::new().weight(&w[..]).bias(&b[..]))
        .unwrap();
    let g = gn
        .backward(
            &dy,
            &x,
            &dims,
            &stats,
            Affine::new().weight(&w[..]).bias(&b[..]),
            true,
        )
        .unwrap();
    let h = 1e-6;
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss(&xp, &w, &b) - loss(&xm, &w, &b)) / (2.0 * h);
        assert!((fd - g.dx[i]).abs() < 1e-6, "dx[{i}]: {fd} vs {}", g.dx[i]);
    }
    let (dw, db) = (g.dweight.unwrap(), g.dbias.unwrap());
    for c in 0..4 {
        let (mut wp, mut wm) = (w.clone(), w.clone());
        wp[c] += h;
        wm[c] -= h;
        let fd = (loss(&x, &wp, &b) - loss(&x, &wm, &b)) / (2.0 * h);
        assert!((fd - dw[c]).abs() < 1e-6, "dweight[{c}]: {fd} vs {}", dw[c]);
        let (mut bp, mut bm) = (b.clone(), b.clone());
        bp[c] += h;
        bm[c] -= h;
        let fd = (loss(&x, &w, &bp) - loss(&x, &w, &bm)) / (2.0 * h);
        assert!((fd - db[c]).abs() < 1e-6, "dbias[{c}]: {fd} vs {}", db[c]);
    }
}

/// A NaN in a row poisons that row only, in f64 as in the other dtypes.
#[test]
fn f64_nan_rows_stay_in_their_row() {
    let gn = GroupNorm::new(2, 4).unwrap().with_layout(Layout::Nchw);
    let mut x: Vec<f64> = (0..24).map(|i| (i as f64 * 0.37).sin()).collect();
    x[14] = f64::NAN; // n = 1, channel 0: row 2
    let (y, stats) = gn
        .forward::<f64, f64>(&x, &[2, 4, 3], Affine::new())
        .unwrap();
    assert!(y[12..18].iter().all(|v| v.is_nan()));
    assert!(y[..12].iter().chain(&y[18..]).all(|v| v.is_finite()));
    assert!(stats.mean[2].is_nan() && stats.rstd[2].is_nan());
}

/// Parameters of another low dtype beside f64 activations are refused, as for the others.
#[test]
fn f64_parameters_follow_the_mixed_precision_rule() {
    let gn = GroupNorm::new(1, 2).unwrap();
    let w = [groupnorm::f16::from_f32(1.0); 2];
    let e = gn.forward::<f64, groupnorm::f16>(&[1.0, 2.0], &[1, 2], Affine::new().weight(&w[..]));
    assert!(
        matches!(e, Err(groupnorm::Error::DtypeMismatch { .. })),
        "{e:?}"
    );
}
