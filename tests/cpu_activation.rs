//! GroupNorm fused with SiLU on the CPU: the f64 reference against finite differences of its
//! own forward pass and a hand-worked value; the fast path against the reference, forward and
//! backward, in both layouts, for every dtype pair, at the plain op's tolerances (docs/design.md
//! "Accuracy targets"), including rows offset by 1e4 where the saved f32 mean is off by half an
//! ulp of the offset.

mod common;

use common::*;
use groupnorm::cpu::reference::{self, backward_act_f64, forward_act_f64};
use groupnorm::Affine;
use groupnorm::{bf16, f16, Activation, Element, Error, GroupNorm, Layout};

/// As in tests/cpu_backward.rs: central differences in f64 agree with a right analytic
/// gradient to 1e-6 relative and with a wrong one only at O(1).
const FD_REL: f64 = 1e-6;

fn central_diff(v: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut p = v.to_vec();
    (0..v.len())
        .map(|i| {
            let h = 1e-6 * v[i].abs().max(1.0);
            p[i] = v[i] + h;
            let up = f(&p);
            p[i] = v[i] - h;
            let down = f(&p);
            p[i] = v[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    l2(got.iter().zip(want).map(|(a, b)| a - b)) / l2(want.iter().copied())
}

#[test]
fn silu_worked_example() {
    // x = [1, 3], one group: xhat = [-1, 1] * 1/sqrt(1 + 1e-5); z = xhat * [1, 2] + [0.5, -0.5]
    let gn = GroupNorm::new(1, 2)
        .unwrap()
        .with_activation(Activation::Silu);
    let (y, _) = gn
        .forward(
            &[1.0f32, 3.0],
            &[1, 2],
            Affine::new()
                .weight(&[1.0f32, 2.0][..])
                .bias(&[0.5f32, -0.5][..]),
        )
        .unwrap();
    let k = 1.0 / (1.0f64 + 1e-5).sqrt();
    let silu = |z: f64| z / (1.0 + (-z).exp());
    let want = [silu(-k + 0.5), silu(2.0 * k - 0.5)];
    // silu(-0.5) = -0.18877, silu(1.5) = 1.22636
    assert!((want[0] + 0.18877).abs() < 1e-4 && (want[1] - 1.22636).abs() < 1e-4);
    for (g, w) in y.iter().zip(want) {
        assert!(
            (*g as f64 - w).abs() <= F32_FORWARD_ABS,
            "got {y:?}, want {want:?}"
        );
    }
}

#[test]
fn reference_silu_backward_matches_finite_differences() {
    let mut rng = rng(601);
    let shapes: [(&[usize], usize); 4] = [
        (&[2, 4, 3], 2),
        (&[1, 6, 2, 2], 3),
        (&[3, 4], 2),
        (&[2, 3, 2, 1, 2], 3), // D = 1
    ];
    for (dims, groups) in shapes {
        for layout in LAYOUTS {
            let c = dims[1];
            let numel: usize = dims.iter().product();
            let gn = GroupNorm::new(groups, c).unwrap().with_layout(layout);
            let geo = gn.geometry(dims).unwrap();
            let eps = gn.eps();
            let x = normal_f64(&mut rng, numel, 0.3, 1.5);
            let dy = normal_f64(&mut rng, numel, 0.0, 1.0);
            let w = uniform_f64(&mut rng, c, 0.5, 1.5);
            let b = uniform_f64(&mut rng, c, -1.0, 1.0);
            let act = Activation::Silu;
            let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
                let y = forward_act_f64(&geo, eps, act, x, Some(w), Some(b)).y;
                y.iter().zip(&dy).map(|(a, d)| a * d).sum()
            };
            let r = backward_act_f64(&geo, eps, act, &dy, &x, Some(&w), Some(&b));
            let ctx = format!("{dims:?} G={groups} {}", layout.name());
            let e = rel_l2(&r.dx, &central_diff(&x, |xp| loss(xp, &w, &b)));
            assert!(e <= FD_REL, "{ctx}: dx vs finite differences: {e:e}");
            let e = rel_l2(&r.dweight, &central_diff(&w, |wp| loss(&x, wp, &b)));
            assert!(e <= FD_REL, "{ctx}: dweight vs finite differences: {e:e}");
            let e = rel_l2(&r.dbias, &central_diff(&b, |bp| loss(&x, &w, bp)));
            assert!(e <= FD_REL, "{ctx}: dbias vs finite differences: {e:e}");
        }
    }
}

/// Fast forward and backward of GN + SiLU against the reference on one input.
#[allow(clippy::too_many_arguments)]
fn check_one<T: Element, P: Element>(
    gn: &GroupNorm,
    dims: &[usize],
    x: &[T],
    dy: &[T],
    w: &[P],
    b: &[P],
    f32_abs: f64,
    ctx: &str,
) {
    let (y, stats) = gn
        .forward(x, dims, Affine::new().weight(w).bias(b))
        .unwrap();
    let rf = reference::forward(gn, x, dims, Some(w), Some(b)).unwrap();
    assert_forward_close(&y, &rf.y, f32_abs, &format!("{ctx}: forward"));
    assert_stats_close(&stats, &rf, f32_abs, &format!("{ctx}: stats"));

    let g = gn
        .backward(dy, x, dims, &stats, Affine::new().weight(w).bias(b), true)
        .unwrap();
    let r = reference::backward_activated(gn, dy, x, dims, Some(w), Some(b)).unwrap();
    let (wf, bf) = (to_f64(w), to_f64(b));
    // dx is measured against ||rstd w dz||, dz the gradient reaching the normalization (the
    // size of dx's terms, docs/design.md), as for the plain op with dz in place of dy
    let scale = dx_scale_of(
        gn,
        dims,
        &to_f64(dy),
        &to_f64(x),
        Some(&wf),
        Some(&bf),
        &rf.rstd,
    )
    .unwrap();
    assert_dx_close(&g.dx, &r.dx, scale, ctx);
    assert_param_grad_close(g.dweight.as_ref().unwrap(), &r.dweight, "dweight", ctx);
    assert_param_grad_close(g.dbias.as_ref().unwrap(), &r.dbias, "dbias", ctx);
}

fn check_random_shapes<T: Element, P: Element>(seed: u64) {
    let mut rng = rng(seed);
    for case in random_cases() {
        for layout in LAYOUTS {
            let c = case.channels();
            let gn = GroupNorm::new(case.groups, c)
                .unwrap()
                .with_layout(layout)
                .with_activation(Activation::Silu);
            let x: Vec<T> = normal_vec(&mut rng, case.numel(), 0.0, 1.0);
            let dy: Vec<T> = normal_vec(&mut rng, case.numel(), 0.0, 1.0);
            let w: Vec<P> = uniform_vec(&mut rng, c, 0.5, 1.5);
            let b: Vec<P> = uniform_vec(&mut rng, c, -1.0, 1.0);
            let ctx = format!(
                "{} {:?} G={} {} silu T={} P={}",
                case.name,
                case.dims,
                case.groups,
                layout.name(),
                T::DTYPE,
                P::DTYPE
            );
            check_one(&gn, &case.dims, &x, &dy, &w, &b, F32_FORWARD_ABS, &ctx);
        }
    }
}

#[test]
fn random_shapes_f32() {
    check_random_shapes::<f32, f32>(611);
}

#[test]
fn random_shapes_f16() {
    check_random_shapes::<f16, f16>(612);
    check_random_shapes::<f16, f32>(613);
}

#[test]
fn random_shapes_bf16() {
    check_random_shapes::<bf16, bf16>(614);
    check_random_shapes::<bf16, f32>(615);
}

/// Rows offset by 1e4: the saved f32 mean is off by up to 5e-4, which would move `z` (and
/// `silu'(z)`) by that much unless the backward refines the mean before recomputing `z`.
#[test]
fn offset_rows_f32() {
    let mut rng = rng(621);
    for layout in LAYOUTS {
        for (dims, groups) in [(&[2usize, 8, 33, 7][..], 4), (&[1, 64, 4, 4][..], 32)] {
            let c = dims[1];
            let numel: usize = dims.iter().product();
            let gn = GroupNorm::new(groups, c)
                .unwrap()
                .with_layout(layout)
                .with_activation(Activation::Silu);
            let x: Vec<f32> = normal_vec(&mut rng, numel, 1e4, 1.0);
            let dy: Vec<f32> = normal_vec(&mut rng, numel, 0.0, 1.0);
            let w: Vec<f32> = uniform_vec(&mut rng, c, 0.5, 1.5);
            let b: Vec<f32> = uniform_vec(&mut rng, c, -1.0, 1.0);
            let ctx = format!("offset 1e4 {dims:?} G={groups} {}", layout.name());
            check_one(&gn, dims, &x, &dy, &w, &b, F32_FORWARD_OFFSET_ABS, &ctx);
        }
    }
}

#[test]
fn no_affine_and_nan_rows() {
    // Without weight and bias z = xhat; a NaN in row 0 makes row 0 NaN and leaves row 1 alone.
    let gn = GroupNorm::new(2, 4)
        .unwrap()
        .with_activation(Activation::Silu);
    let mut x = vec![0.5f32, -1.0, 2.0, 0.25, 3.0, 1.0, -2.0, 0.0];
    x[1] = f32::NAN;
    let dims = [1, 4, 2];
    let (y, stats) = gn.forward(&x, &dims, Affine::none()).unwrap();
    let r = reference::forward(&gn, &x, &dims, None::<&[f32]>, None).unwrap();
    assert!(y[..4].iter().all(|v| v.is_nan()), "{y:?}");
    assert_forward_close(&y[4..], &r.y[4..], F32_FORWARD_ABS, "finite row");
    let dy = [1.0f32; 8];
    let g = gn
        .backward(&dy, &x, &dims, &stats, Affine::none(), true)
        .unwrap();
    assert!(g.dx[..4].iter().all(|v| v.is_nan()), "{:?}", g.dx);
    let rb = reference::backward_activated(&gn, &dy, &x, &dims, None::<&[f32]>, None).unwrap();
    let scale = l2(rb.dx[4..].iter().copied()).max(1.0);
    assert_dx_close(&g.dx[4..], &rb.dx[4..], scale, "finite row dx");
}

#[test]
fn the_backward_of_an_activated_operator_reads_the_bias() {
    let gn = GroupNorm::new(1, 2)
        .unwrap()
        .with_activation(Activation::Silu);
    let x = [1.0f32, 2.0];
    let (_, stats) = gn.forward(&x, &[1, 2], Affine::none()).unwrap();
    // silu'(z) depends on z = xhat * w + b: the same dy gives another dx with a bias
    let plain = gn
        .backward(&x, &x, &[1, 2], &stats, Affine::none(), true)
        .unwrap();
    let shifted = gn
        .backward(
            &x,
            &x,
            &[1, 2],
            &stats,
            Affine::new().bias(&[1.0f32, 1.0]),
            true,
        )
        .unwrap();
    assert_ne!(plain.dx, shifted.dx);
    // the reference's two-argument backward, which has no bias, still refuses
    let e = reference::backward(&gn, &x, &x, &[1, 2], None::<&[f32]>).unwrap_err();
    assert!(matches!(e, Error::BiasNeeded { .. }), "{e}");
    // a bias of the wrong length is a typed error
    let e = gn
        .backward(
            &x,
            &x,
            &[1, 2],
            &stats,
            Affine::new().bias(&[0.0f32][..]),
            true,
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::LengthMismatch { name: "bias", .. }),
        "{e}"
    );
}

#[test]
fn without_activation_the_bias_does_not_enter_the_backward() {
    let mut rng = rng(631);
    let gn = GroupNorm::new(3, 6).unwrap().with_layout(Layout::Nhwc);
    let dims = [2, 6, 5, 3];
    let x: Vec<f32> = normal_vec(&mut rng, 180, 0.0, 1.0);
    let dy: Vec<f32> = normal_vec(&mut rng, 180, 0.0, 1.0);
    let w: Vec<f32> = uniform_vec(&mut rng, 6, 0.5, 1.5);
    let b: Vec<f32> = uniform_vec(&mut rng, 6, -1.0, 1.0);
    let (_, stats) = gn
        .forward(&x, &dims, Affine::new().weight(&w[..]).bias(&b[..]))
        .unwrap();
    let a = gn
        .backward(&dy, &x, &dims, &stats, Affine::new().weight(&w[..]), true)
        .unwrap();
    let c = gn
        .backward(
            &dy,
            &x,
            &dims,
            &stats,
            Affine::new().weight(&w[..]).bias(&b[..]),
            true,
        )
        .unwrap();
    assert_eq!(a.dx, c.dx);
    assert_eq!(a.dweight, c.dweight);
    assert_eq!(a.dbias, c.dbias);
}
