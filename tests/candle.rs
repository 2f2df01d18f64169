//! The candle integration (`--features candle`), on the CPU: the op against the f64 reference
//! (docs/design.md's accuracy targets) and against `candle_nn::GroupNorm` (forward and gradients,
//! through candle's autograd), the drop-in module, views, and every bad input as an error.
//!
//! Bounds against `candle_nn`: both sides are f32 implementations of the same formulas, so they
//! may differ by at most the sum of their distances to the exact answer. Ours is held to
//! docs/design.md's target against the f64 reference in the same test; `candle_nn` (f32 two-pass
//! statistics over sequential sums, and autograd through its primitive ops for the gradients)
//! is allowed the same target, so the pair is held to twice it: 2e-5 absolute on forward outputs
//! of unit-scale data, 2e-5 relative L2 on `dx` (against `‖rstd·w·dy‖`), 2e-4 relative L2 on
//! `dweight`/`dbias`. For f16/bf16 outputs see [`nn_low_precision_tolerance`].
#![cfg(feature = "candle")]

mod common;

use candle_core::{DType as CDType, Device, Module, Tensor, Var, WithDType};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use groupnorm::accuracy;
use groupnorm::candle::{group_norm, nn as gnn};
use groupnorm::cpu::reference::{self, RefForward};
use groupnorm::{bf16, f16, DType, Element, GroupNorm, Layout};
use std::collections::HashMap;

const EPS: f64 = 1e-5;

/// Forward outputs, ours against `candle_nn`, absolute: twice docs/design.md's f32 target.
const NN_FORWARD_ABS: f64 = 2.0 * F32_FORWARD_ABS;
/// `dx`, ours against `candle_nn`, relative L2 against `‖rstd·w·dy‖`: twice docs/design.md's target.
const NN_DX_REL: f64 = 2.0 * DX_REL_L2_F32;
/// `dweight`/`dbias`, ours against `candle_nn`, relative L2: twice docs/design.md's target.
const NN_PARAM_REL: f64 = 2.0 * PARAM_GRAD_REL_L2_F32;

type R<T = ()> = candle_core::Result<T>;

/// `(dims, groups)`: odd sizes, G = 1, G = C, a row of one value, several spatial dims, 2-D.
const CASES: &[(&[usize], usize)] = &[
    (&[2, 6, 5, 7], 3),
    (&[3, 4, 9], 1),
    (&[2, 8, 3, 3], 8),
    (&[1, 12, 5, 3, 2], 4),
    (&[3, 5, 1], 5),
    (&[5, 6], 2),
    (&[2, 64, 16, 16], 32),
    (&[1, 3, 1000], 1),
];

fn cpu() -> Device {
    Device::Cpu
}

fn tensor<E: WithDType>(v: &[E], dims: &[usize]) -> R<Tensor> {
    Tensor::from_slice(v, dims, &cpu())
}

fn values<E: WithDType>(t: &Tensor) -> R<Vec<E>> {
    t.flatten_all()?.to_vec1::<E>()
}

/// `candle_nn` refuses rank 2: give it `(N, C, 1)`, which is the same problem.
fn nn_view(x: &Tensor) -> R<Tensor> {
    if x.rank() == 2 {
        x.unsqueeze(2)
    } else {
        Ok(x.clone())
    }
}

/// Seeded problem data: x ~ N(0.5, 1), weight ~ N(1, 0.5), bias ~ N(0, 0.5), dy ~ N(0, 1).
struct Data {
    x: Vec<f64>,
    w: Vec<f64>,
    b: Vec<f64>,
    dy: Vec<f64>,
}

fn data(dims: &[usize], seed: u64) -> Data {
    let mut r = rng(seed);
    let numel = dims.iter().product();
    let c = dims[1];
    Data {
        x: normal_f64(&mut r, numel, 0.5, 1.0),
        w: normal_f64(&mut r, c, 1.0, 0.5),
        b: normal_f64(&mut r, c, 0.0, 0.5),
        dy: normal_f64(&mut r, numel, 0.0, 1.0),
    }
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// `‖got - want‖ / scale`, or the plain norm when the scale is zero (a gradient that is exactly
/// zero, e.g. `dweight` when every group holds one value and `x̂ = 0`).
fn rel_l2(got: &[f64], want: &[f64], scale: f64) -> f64 {
    let err = accuracy::l2(got.iter().zip(want).map(|(g, w)| g - w));
    if scale > 0.0 {
        err / scale
    } else {
        err
    }
}

/// The crate's dtype of `E` (both traits name one, so say which).
fn dt<E: Element>() -> DType {
    E::DTYPE
}

/// Exact widening (through the crate's trait).
fn wide<E: Element>(v: E) -> f64 {
    v.to_f64()
}

fn as_f64<E: WithDType + Element>(t: &Tensor) -> R<Vec<f64>> {
    Ok(to_f64(&values::<E>(t)?))
}

// ---------------------------------------------------------------------------------------------
// f32: forward and gradients against the reference and candle_nn
// ---------------------------------------------------------------------------------------------

#[test]
fn f32_forward_matches_reference_and_candle_nn() -> R {
    for (k, &(dims, groups)) in CASES.iter().enumerate() {
        let ctx = format!("dims {dims:?}, G = {groups}");
        let d = data(dims, 100 + k as u64);
        let (x, w, b) = (
            from_f64::<f32>(&d.x),
            from_f64::<f32>(&d.w),
            from_f64::<f32>(&d.b),
        );
        let xt = tensor(&x, dims)?;
        let (wt, bt) = (tensor(&w, &[dims[1]])?, tensor(&b, &[dims[1]])?);
        let y = group_norm(&xt, Some(&wt), Some(&bt), groups, EPS)?;
        assert_eq!(y.dims(), dims, "{ctx}");
        assert_eq!(y.dtype(), CDType::F32, "{ctx}");
        let gn = GroupNorm::new(groups, dims[1]).unwrap();
        let r = reference::forward(&gn, &x, dims, Some(&w[..]), Some(&b[..])).unwrap();
        let ours = values::<f32>(&y)?;
        assert_forward_close(&ours, &r.y, F32_FORWARD_ABS, &ctx);

        let theirs = candle_nn::GroupNorm::new(wt.clone(), bt.clone(), dims[1], groups, EPS)?
            .forward(&nn_view(&xt)?)?;
        let theirs = as_f64::<f32>(&theirs)?;
        let diff = max_abs_diff(&to_f64(&ours), &theirs);
        println!(
            "{ctx}: |ours - ref| {:.2e}, |candle_nn - ref| {:.2e}, |ours - candle_nn| {diff:.2e}",
            max_abs_diff(&to_f64(&ours), &r.y),
            max_abs_diff(&theirs, &r.y)
        );
        assert!(
            diff <= NN_FORWARD_ABS,
            "{ctx}: |ours - candle_nn| = {diff:e}"
        );
    }
    Ok(())
}

/// The worked examples of docs/design.md, through candle.
#[test]
fn design_worked_examples() -> R {
    let x = Tensor::new(
        &[[5f32, 4., 7., 2.], [1., 6., 2., 3.], [4., 8., 1., 9.]],
        &cpu(),
    )?;
    let y = group_norm(&x, None, None, 2, EPS)?.to_vec2::<f32>()?;
    let want = [[1., -1., 1., -1.], [-1., 1., -1., 1.], [-1., 1., -1., 1.]];
    for (row, want) in y.iter().zip(want) {
        for (g, w) in row.iter().zip(want) {
            assert!((g - w).abs() < 5e-5, "{y:?}");
        }
    }
    let w = Tensor::new(&[1f32, 1., 2., 0.5], &cpu())?;
    let b = Tensor::new(&[0f32, 0., 1., -1.], &cpu())?;
    let y = group_norm(&x, Some(&w), Some(&b), 2, EPS)?.to_vec2::<f32>()?;
    let want = [
        [1., -1., 3., -1.5],
        [-1., 1., -1., -0.5],
        [-1., 1., -1., -0.5],
    ];
    for (row, want) in y.iter().zip(want) {
        for (g, w) in row.iter().zip(want) {
            assert!((g - w).abs() < 5e-5, "{y:?}");
        }
    }
    let x = Tensor::arange(1f32, 33., &cpu())?.reshape((1, 2, 4, 4))?;
    let y = values::<f32>(&group_norm(&x, None, None, 2, EPS)?)?;
    assert!((y[0] as f64 + 1.62698).abs() < 1e-5, "{}", y[0]);
    Ok(())
}

/// Gradients of `sum(y * dy)` with respect to x, weight and bias: `dy` is the output gradient.
struct AutogradGrads {
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

fn autograd<F>(d: &Data, dims: &[usize], forward: F) -> R<AutogradGrads>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> R<Tensor>,
{
    let c = dims[1];
    let x = Var::from_tensor(&tensor(&from_f64::<f32>(&d.x), dims)?)?;
    let w = Var::from_tensor(&tensor(&from_f64::<f32>(&d.w), &[c])?)?;
    let b = Var::from_tensor(&tensor(&from_f64::<f32>(&d.b), &[c])?)?;
    let dy = tensor(&from_f64::<f32>(&d.dy), dims)?;
    let y = forward(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
    let loss = (y.reshape(dims)? * dy)?.sum_all()?;
    let grads = loss.backward()?;
    let get = |v: &Var, name: &str| -> R<Vec<f64>> {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), v.dims(), "{name} gradient shape");
        as_f64::<f32>(g)
    };
    Ok(AutogradGrads {
        dx: get(&x, "x")?,
        dw: get(&w, "weight")?,
        db: get(&b, "bias")?,
    })
}

#[test]
fn f32_gradients_match_reference_and_candle_nn() -> R {
    for (k, &(dims, groups)) in CASES.iter().enumerate() {
        let ctx = format!("dims {dims:?}, G = {groups}");
        let d = data(dims, 200 + k as u64);
        let c = dims[1];
        let ours = autograd(&d, dims, |x, w, b| {
            group_norm(x, Some(w), Some(b), groups, EPS)
        })?;
        let theirs = autograd(&d, dims, |x, w, b| {
            candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, EPS)?.forward(&nn_view(x)?)
        })?;

        // the reference on the same (f32-rounded) inputs
        let (x, w) = (from_f64::<f32>(&d.x), from_f64::<f32>(&d.w));
        let dy = from_f64::<f32>(&d.dy);
        let gn = GroupNorm::new(groups, c).unwrap();
        let rf: RefForward = reference::forward(&gn, &x, dims, Some(&w[..]), None).unwrap();
        let rg = reference::backward(&gn, &dy, &x, dims, Some(&w[..])).unwrap();
        let scale = dx_scale(
            &to_f64(&dy),
            dims,
            groups,
            Layout::Nchw,
            Some(&to_f64(&w)),
            &rf.rstd,
        );
        assert_dx_close(&from_f64::<f32>(&ours.dx), &rg.dx, scale, &ctx);
        assert_param_grad_close(&from_f64::<f32>(&ours.dw), &rg.dweight, "dweight", &ctx);
        assert_param_grad_close(&from_f64::<f32>(&ours.db), &rg.dbias, "dbias", &ctx);

        let dx = rel_l2(&ours.dx, &theirs.dx, scale);
        let dw = rel_l2(
            &ours.dw,
            &theirs.dw,
            accuracy::l2(rg.dweight.iter().copied()),
        );
        let db = rel_l2(&ours.db, &theirs.db, accuracy::l2(rg.dbias.iter().copied()));
        println!(
            "{ctx}: ours - candle_nn: dx {dx:.2e}, dweight {dw:.2e}, dbias {db:.2e} \
             (candle_nn - ref: dx {:.2e})",
            rel_l2(&theirs.dx, &rg.dx, scale)
        );
        assert!(dx <= NN_DX_REL, "{ctx}: dx ours vs candle_nn {dx:e}");
        assert!(
            dw <= NN_PARAM_REL,
            "{ctx}: dweight ours vs candle_nn {dw:e}"
        );
        assert!(db <= NN_PARAM_REL, "{ctx}: dbias ours vs candle_nn {db:e}");
    }
    Ok(())
}

/// Without a weight, with a weight only, with a bias only: the gradients that exist are right,
/// and the op's arity follows what was given.
#[test]
fn optional_parameters_have_the_right_gradients() -> R {
    let dims = [2, 6, 4, 5];
    let (groups, c) = (3, 6);
    let d = data(&dims, 300);
    let (x, w, b) = (
        from_f64::<f32>(&d.x),
        from_f64::<f32>(&d.w),
        from_f64::<f32>(&d.b),
    );
    let dy = from_f64::<f32>(&d.dy);
    let gn = GroupNorm::new(groups, c).unwrap();
    for (use_w, use_b) in [(false, false), (true, false), (false, true)] {
        let ctx = format!("weight {use_w}, bias {use_b}");
        let xv = Var::from_tensor(&tensor(&x, &dims)?)?;
        let wv = Var::from_tensor(&tensor(&w, &[c])?)?;
        let bv = Var::from_tensor(&tensor(&b, &[c])?)?;
        let y = group_norm(
            xv.as_tensor(),
            use_w.then_some(wv.as_tensor()),
            use_b.then_some(bv.as_tensor()),
            groups,
            EPS,
        )?;
        let wref = use_w.then_some(&w[..]);
        let bref = use_b.then_some(&b[..]);
        let rf = reference::forward(&gn, &x, &dims, wref, bref).unwrap();
        assert_forward_close(&values::<f32>(&y)?, &rf.y, F32_FORWARD_ABS, &ctx);
        let grads = (y * tensor(&dy, &dims)?)?.sum_all()?.backward()?;
        let rg = reference::backward(&gn, &dy, &x, &dims, wref).unwrap();
        let scale = dx_scale(
            &to_f64(&dy),
            &dims,
            groups,
            Layout::Nchw,
            use_w.then(|| to_f64(&w)).as_deref(),
            &rf.rstd,
        );
        let dx = values::<f32>(grads.get(xv.as_tensor()).expect("dx"))?;
        assert_dx_close(&dx, &rg.dx, scale, &ctx);
        match grads.get(wv.as_tensor()) {
            Some(g) => {
                assert!(use_w, "{ctx}: a gradient for an unused weight");
                assert_param_grad_close(&values::<f32>(g)?, &rg.dweight, "dweight", &ctx);
            }
            None => assert!(!use_w, "{ctx}: no dweight"),
        }
        match grads.get(bv.as_tensor()) {
            Some(g) => {
                assert!(use_b, "{ctx}: a gradient for an unused bias");
                assert_param_grad_close(&values::<f32>(g)?, &rg.dbias, "dbias", &ctx);
            }
            None => assert!(!use_b, "{ctx}: no dbias"),
        }
    }
    Ok(())
}

/// The statistics recorded by the forward pass are not used up: a second backward pass over the
/// same graph gives the same bits, and a tensor used twice accumulates both gradients.
#[test]
fn backward_twice_and_shared_inputs() -> R {
    let dims = [2, 4, 3, 3];
    let d = data(&dims, 400);
    let x = Var::from_tensor(&tensor(&from_f64::<f32>(&d.x), &dims)?)?;
    let w = Var::from_tensor(&tensor(&from_f64::<f32>(&d.w), &[4])?)?;
    let y = group_norm(x.as_tensor(), Some(w.as_tensor()), None, 2, EPS)?;
    let loss = (&y * tensor(&from_f64::<f32>(&d.dy), &dims)?)?.sum_all()?;
    let g1 = loss.backward()?;
    let g2 = loss.backward()?;
    for v in [&x, &w] {
        let a = values::<f32>(g1.get(v.as_tensor()).unwrap())?;
        let b = values::<f32>(g2.get(v.as_tensor()).unwrap())?;
        assert_eq!(a, b);
    }
    // y + x: the gradient of x is ours plus dy
    let loss2 = ((&y + x.as_tensor())? * tensor(&from_f64::<f32>(&d.dy), &dims)?)?.sum_all()?;
    let g3 = loss2.backward()?;
    let dx1 = values::<f32>(g1.get(x.as_tensor()).unwrap())?;
    let dx3 = values::<f32>(g3.get(x.as_tensor()).unwrap())?;
    for ((a, b), dy) in dx1.iter().zip(&dx3).zip(from_f64::<f32>(&d.dy)) {
        assert!(
            (a + dy - b).abs() <= 1e-6 * (1.0 + b.abs()),
            "{a} + {dy} != {b}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// f16 and bf16
// ---------------------------------------------------------------------------------------------

/// `|ours - candle_nn|` allowed per element for a low-precision output. Ours is within
/// `ulp(y) + 1e-6` of the reference (asserted separately). `candle_nn` computes `x̂` in f32
/// (within 1e-5), rounds it to `T`, multiplies by `w` in `T` (a rounding) and adds `b` in `T` (a
/// rounding): each rounding is at most half an ulp of a value that may sit one binade above the
/// reference's, so at most a full ulp of the reference value: `|w|·ulp(x̂) + ulp(x̂·w) + ulp(y)`,
/// plus the f32 error `2e-5·|w|` before the first rounding.
fn nn_low_precision_tolerance(t: DType, y: f64, xhat: f64, w: f64) -> f64 {
    let ours = t.ulp(y) + LOW_PRECISION_FORWARD_SLACK;
    let nn = w.abs() * t.ulp(xhat) + t.ulp(xhat * w) + t.ulp(y) + NN_FORWARD_ABS * w.abs();
    ours + nn
}

fn low_precision_forward<T: Element + WithDType>() -> R {
    for (k, &(dims, groups)) in CASES.iter().enumerate() {
        let ctx = format!("{} dims {dims:?}, G = {groups}", dt::<T>());
        let d = data(dims, 500 + k as u64);
        let c = dims[1];
        let (x, w, b) = (
            from_f64::<T>(&d.x),
            from_f64::<T>(&d.w),
            from_f64::<T>(&d.b),
        );
        let xt = tensor(&x, dims)?;
        let (wt, bt) = (tensor(&w, &[c])?, tensor(&b, &[c])?);
        let y = group_norm(&xt, Some(&wt), Some(&bt), groups, EPS)?;
        assert_eq!(y.dtype(), xt.dtype(), "{ctx}");
        let gn = GroupNorm::new(groups, c).unwrap();
        let r = reference::forward(&gn, &x, dims, Some(&w[..]), Some(&b[..])).unwrap();
        let ours = values::<T>(&y)?;
        assert_forward_close(&ours, &r.y, F32_FORWARD_ABS, &ctx);

        let theirs = candle_nn::GroupNorm::new(wt, bt, c, groups, EPS)?.forward(&nn_view(&xt)?)?;
        let theirs = values::<T>(&theirs)?;
        let (n, s) = (dims[0], dims[2..].iter().product::<usize>());
        let mut worst: f64 = 0.0;
        for ni in 0..n {
            for (ci, &wc) in w.iter().enumerate() {
                let row = ni * groups + ci / (c / groups);
                let wc = wide(wc);
                for si in 0..s {
                    let i = (ni * c + ci) * s + si;
                    let xhat = (wide(x[i]) - r.mean[row]) * r.rstd[row];
                    let tol = nn_low_precision_tolerance(dt::<T>(), r.y[i], xhat, wc);
                    let diff = (wide(ours[i]) - wide(theirs[i])).abs();
                    worst = worst.max(diff / tol);
                    assert!(
                        diff <= tol,
                        "{ctx}: index {i}: ours {}, candle_nn {}, reference {}, tolerance {tol:e}",
                        wide(ours[i]),
                        wide(theirs[i]),
                        r.y[i]
                    );
                }
            }
        }
        println!("{ctx}: worst |ours - candle_nn| / tolerance {worst:.2}");
    }
    Ok(())
}

#[test]
fn f16_forward_matches_reference_and_candle_nn() -> R {
    low_precision_forward::<f16>()
}

#[test]
fn bf16_forward_matches_reference_and_candle_nn() -> R {
    low_precision_forward::<bf16>()
}

/// Forward and gradients for activations `T` with parameters `P` (the activation dtype, or f32
/// for mixed precision, which `candle_nn` does not do), against the reference.
fn low_precision_gradients<T: Element + WithDType, P: Element + WithDType>() -> R {
    for (k, &(dims, groups)) in CASES.iter().enumerate() {
        let ctx = format!(
            "{} with {} parameters, dims {dims:?}, G = {groups}",
            dt::<T>(),
            dt::<P>()
        );
        let d = data(dims, 600 + k as u64);
        let c = dims[1];
        let (x, w, b) = (
            from_f64::<T>(&d.x),
            from_f64::<P>(&d.w),
            from_f64::<P>(&d.b),
        );
        let dy = from_f64::<T>(&d.dy);
        let xv = Var::from_tensor(&tensor(&x, dims)?)?;
        let wv = Var::from_tensor(&tensor(&w, &[c])?)?;
        let bv = Var::from_tensor(&tensor(&b, &[c])?)?;
        let y = group_norm(
            xv.as_tensor(),
            Some(wv.as_tensor()),
            Some(bv.as_tensor()),
            groups,
            EPS,
        )?;
        let gn = GroupNorm::new(groups, c).unwrap();
        let rf = reference::forward(&gn, &x, dims, Some(&w[..]), Some(&b[..])).unwrap();
        assert_forward_close(&values::<T>(&y)?, &rf.y, F32_FORWARD_ABS, &ctx);

        let grads = (y * tensor(&dy, dims)?)?.sum_all()?.backward()?;
        let rg = reference::backward(&gn, &dy, &x, dims, Some(&w[..])).unwrap();
        let scale = dx_scale(
            &to_f64(&dy),
            dims,
            groups,
            Layout::Nchw,
            Some(&to_f64(&w)),
            &rf.rstd,
        );
        let g = |v: &Var| grads.get(v.as_tensor()).expect("gradient").clone();
        assert_eq!(g(&xv).dtype(), xv.dtype());
        assert_eq!(g(&wv).dtype(), wv.dtype());
        assert_dx_close(&values::<T>(&g(&xv))?, &rg.dx, scale, &ctx);
        assert_param_grad_close(&values::<P>(&g(&wv))?, &rg.dweight, "dweight", &ctx);
        assert_param_grad_close(&values::<P>(&g(&bv))?, &rg.dbias, "dbias", &ctx);
    }
    Ok(())
}

#[test]
fn f16_gradients_match_reference() -> R {
    low_precision_gradients::<f16, f16>()
}

#[test]
fn bf16_gradients_match_reference() -> R {
    low_precision_gradients::<bf16, bf16>()
}

#[test]
fn mixed_precision_f32_parameters() -> R {
    low_precision_gradients::<f16, f32>()?;
    low_precision_gradients::<bf16, f32>()
}

// ---------------------------------------------------------------------------------------------
// Views: offsets and non-contiguous inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn offset_views_are_read_in_place_and_get_gradients() -> R {
    let (c, s) = (6, 10);
    let d = data(&[5, c, s], 700);
    let big = Var::from_tensor(&tensor(&from_f64::<f32>(&d.x), &[5, c, s])?)?;
    let w = tensor(&from_f64::<f32>(&d.w), &[c])?;
    let view = big.narrow(0, 2, 2)?;
    assert!(view.is_contiguous());
    let copy = Var::from_tensor(&view.copy()?)?;
    let y_view = group_norm(&view, Some(&w), None, 3, EPS)?;
    let y_copy = group_norm(copy.as_tensor(), Some(&w), None, 3, EPS)?;
    assert_eq!(values::<f32>(&y_view)?, values::<f32>(&y_copy)?);

    let dy = tensor(&from_f64::<f32>(&d.dy[..2 * c * s]), &[2, c, s])?;
    let g_view = (y_view * &dy)?.sum_all()?.backward()?;
    let g_copy = (y_copy * &dy)?.sum_all()?.backward()?;
    let g_big = g_view.get(big.as_tensor()).unwrap();
    assert_eq!(
        values::<f32>(&g_big.narrow(0, 2, 2)?)?,
        values::<f32>(g_copy.get(copy.as_tensor()).unwrap())?
    );
    let rest = Tensor::cat(&[g_big.narrow(0, 0, 2)?, g_big.narrow(0, 4, 1)?], 0)?;
    assert!(values::<f32>(&rest)?.iter().all(|&v| v == 0.0));
    Ok(())
}

#[test]
fn non_contiguous_inputs_are_made_contiguous_and_get_gradients() -> R {
    // channels-last data seen as (N, C, H, W) through a permute
    let (n, c, h, w) = (2, 6, 3, 5);
    let d = data(&[n, c, h, w], 800);
    let nhwc = Var::from_tensor(&tensor(&from_f64::<f32>(&d.x), &[n, h, w, c])?)?;
    let x = nhwc.permute((0, 3, 1, 2))?;
    assert!(!x.is_contiguous());
    let xc = Var::from_tensor(&x.contiguous()?)?;
    let bias = tensor(&from_f64::<f32>(&d.b), &[c])?;
    let y = group_norm(&x, None, Some(&bias), 2, EPS)?;
    let yc = group_norm(xc.as_tensor(), None, Some(&bias), 2, EPS)?;
    assert_eq!(values::<f32>(&y)?, values::<f32>(&yc)?);

    let dy = tensor(&from_f64::<f32>(&d.dy), &[n, c, h, w])?;
    let g = (y * &dy)?.sum_all()?.backward()?;
    let gc = (yc * &dy)?.sum_all()?.backward()?;
    let back = g.get(nhwc.as_tensor()).unwrap().permute((0, 3, 1, 2))?;
    assert_eq!(
        values::<f32>(&back)?,
        values::<f32>(gc.get(xc.as_tensor()).unwrap())?
    );
    // a strided weight (every other element) works too
    let wide = tensor(&from_f64::<f32>(&d.dy[..2 * c]), &[c, 2])?;
    let strided = wide.narrow(1, 0, 1)?.squeeze(1)?;
    assert!(!strided.is_contiguous());
    let a = group_norm(xc.as_tensor(), Some(&strided), None, 3, EPS)?;
    let b = group_norm(xc.as_tensor(), Some(&strided.contiguous()?), None, 3, EPS)?;
    assert_eq!(values::<f32>(&a)?, values::<f32>(&b)?);
    Ok(())
}

#[test]
fn empty_batch() -> R {
    let x = Var::from_tensor(&Tensor::zeros((0, 4, 3), CDType::F32, &cpu())?)?;
    let w = Var::from_tensor(&Tensor::ones(4, CDType::F32, &cpu())?)?;
    let y = group_norm(x.as_tensor(), Some(w.as_tensor()), None, 2, EPS)?;
    assert_eq!(y.dims(), &[0, 4, 3]);
    let grads = y.sum_all()?.backward()?;
    assert_eq!(values::<f32>(grads.get(w.as_tensor()).unwrap())?, [0.0; 4]);
    assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[0, 4, 3]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The drop-in module
// ---------------------------------------------------------------------------------------------

#[test]
fn module_shares_the_var_map_with_candle_nn() -> R {
    let (groups, c) = (4, 12);
    let dims = [2, c, 7, 3];
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, CDType::F32, &cpu());
    let theirs = candle_nn::group_norm(groups, c, EPS, vb.pp("block.norm"))?;
    // same names as candle_nn's: nothing new is created
    let ours = gnn::group_norm(groups, c, EPS, vb.pp("block.norm"))?;
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["block.norm.bias", "block.norm.weight"]);
    // initial values: weight 1, bias 0
    assert_eq!(values::<f32>(ours.weight())?, vec![1.0; c]);
    assert_eq!(values::<f32>(ours.bias())?, vec![0.0; c]);
    // randomize the shared parameters: both modules see the change
    let d = data(&dims, 900);
    varmap.set_one("block.norm.weight", tensor(&from_f64::<f32>(&d.w), &[c])?)?;
    varmap.set_one("block.norm.bias", tensor(&from_f64::<f32>(&d.b), &[c])?)?;
    let x = tensor(&from_f64::<f32>(&d.x), &dims)?;
    let y_ours = as_f64::<f32>(&x.apply(&ours)?)?;
    let y_theirs = as_f64::<f32>(&theirs.forward(&x)?)?;
    let diff = max_abs_diff(&y_ours, &y_theirs);
    assert!(diff <= NN_FORWARD_ABS, "|ours - candle_nn| = {diff:e}");
    assert!(diff > 0.0 || y_ours.iter().any(|v| *v != 0.0));
    // training: the gradients reach the VarMap's variables
    let grads = x.apply(&ours)?.sqr()?.sum_all()?.backward()?;
    for var in varmap.all_vars() {
        assert!(grads.get(var.as_tensor()).is_some());
    }
    assert_eq!(
        (ours.num_groups(), ours.num_channels(), ours.eps()),
        (groups, c, EPS)
    );
    Ok(())
}

#[test]
fn module_loads_the_same_checkpoint_as_candle_nn() -> R {
    let (groups, c) = (2, 6);
    let dims = [3, c, 11];
    let d = data(&dims, 1000);
    let tensors: HashMap<String, Tensor> = [
        (
            "gn.weight".to_string(),
            tensor(&from_f64::<f32>(&d.w), &[c])?,
        ),
        ("gn.bias".to_string(), tensor(&from_f64::<f32>(&d.b), &[c])?),
    ]
    .into_iter()
    .collect();
    let vb = VarBuilder::from_tensors(tensors, CDType::F32, &cpu());
    let ours = gnn::group_norm(groups, c, EPS, vb.pp("gn"))?;
    let theirs = candle_nn::group_norm(groups, c, EPS, vb.pp("gn"))?;
    let x = tensor(&from_f64::<f32>(&d.x), &dims)?;
    let diff = max_abs_diff(
        &as_f64::<f32>(&ours.forward(&x)?)?,
        &as_f64::<f32>(&theirs.forward(&x)?)?,
    );
    assert!(diff <= NN_FORWARD_ABS, "|ours - candle_nn| = {diff:e}");
    // and a checkpoint with the wrong shape is refused by both
    assert!(gnn::group_norm(groups, 2 * c, EPS, vb.pp("gn")).is_err());
    assert!(candle_nn::group_norm(groups, 2 * c, EPS, vb.pp("gn")).is_err());
    // mixed precision: f16 activations with the f32 parameters (candle_nn cannot)
    let y = ours.forward(&x.to_dtype(CDType::F16)?)?;
    assert_eq!(y.dtype(), CDType::F16);
    // rank 2 (candle_nn asks for rank 3)
    let x2 = tensor(&from_f64::<f32>(&d.x[..4 * c]), &[4, c])?;
    assert_eq!(ours.forward(&x2)?.dims(), &[4, c]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bad input: candle errors, never panics
// ---------------------------------------------------------------------------------------------

fn err_text(r: R<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_is_an_error() -> R {
    let x = Tensor::ones((2, 4, 3), CDType::F32, &cpu())?;
    let w = Tensor::ones(4, CDType::F32, &cpu())?;
    // unsupported dtypes, named
    for dt in [CDType::U8, CDType::I64, CDType::U32] {
        let e = err_text(group_norm(&x.to_dtype(dt)?, None, None, 2, EPS));
        assert!(e.contains(&format!("{dt:?}")), "{dt:?}: {e}");
    }
    // parameters: another low-precision dtype than the activations, or not f32
    let xh = x.to_dtype(CDType::F16)?;
    for (xt, wt) in [
        (&x, CDType::F16),
        (&x, CDType::BF16),
        (&xh, CDType::BF16),
        (&xh, CDType::F64),
    ] {
        let e = err_text(group_norm(xt, Some(&w.to_dtype(wt)?), None, 2, EPS));
        assert!(e.contains(&format!("{wt:?}")), "{e}");
    }
    // weight and bias of different dtypes
    let e = err_text(group_norm(
        &xh,
        Some(&w),
        Some(&w.to_dtype(CDType::F16)?),
        2,
        EPS,
    ));
    assert!(e.contains("bias"), "{e}");
    // groups not dividing the channels, zero groups
    let e = err_text(group_norm(&x, None, None, 3, EPS));
    assert!(e.contains("divisible"), "{e}");
    assert!(group_norm(&x, None, None, 0, EPS).is_err());
    // rank below 2, zero channels
    assert!(group_norm(&Tensor::ones(4, CDType::F32, &cpu())?, None, None, 1, EPS).is_err());
    assert!(group_norm(
        &Tensor::ones((2, 0), CDType::F32, &cpu())?,
        None,
        None,
        1,
        EPS
    )
    .is_err());
    // parameter shapes
    let e = err_text(group_norm(
        &x,
        Some(&Tensor::ones(5, CDType::F32, &cpu())?),
        None,
        2,
        EPS,
    ));
    assert!(e.contains("weight"), "{e}");
    let e = err_text(group_norm(&x, None, Some(&w.reshape((1, 4))?), 2, EPS));
    assert!(e.contains("bias"), "{e}");
    // eps
    for eps in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(group_norm(&x, None, None, 2, eps).is_err(), "eps {eps}");
    }
    // the module: construction and a channel mismatch
    assert!(gnn::GroupNorm::new(w.clone(), w.clone(), 4, 3, EPS).is_err());
    assert!(gnn::GroupNorm::new(w.clone(), w.clone(), 4, 0, EPS).is_err());
    let m = gnn::GroupNorm::new(w.clone(), w.clone(), 4, 2, EPS)?;
    let e = err_text(m.forward(&Tensor::ones((2, 8, 3), CDType::F32, &cpu())?));
    assert!(e.contains("channels"), "{e}");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, CDType::F32, &cpu());
    assert!(gnn::group_norm(3, 4, EPS, vb).is_err());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Issue 15: f64 like candle_nn, parameters checked at construction, huge-but-empty shapes
// ---------------------------------------------------------------------------------------------

/// f64 tensors: forward and gradients through candle's autograd, held to 1e-12 against the f64
/// reference, and to 1e-12 against candle_nn's own f64 computation.
#[test]
fn f64_matches_reference_and_candle_nn() -> R {
    for (i, &(dims, groups)) in CASES.iter().enumerate() {
        let c = dims[1];
        let d = data(dims, 1500 + i as u64);
        let x = Var::from_tensor(&tensor(&d.x, dims)?)?;
        let w = Var::from_tensor(&tensor(&d.w, &[c])?)?;
        let b = Var::from_tensor(&tensor(&d.b, &[c])?)?;
        let dy = tensor(&d.dy, dims)?;
        let y = group_norm(&x, Some(&w), Some(&b), groups, EPS)?;
        let gn = GroupNorm::new(groups, c).unwrap();
        let rf = reference::forward(&gn, &d.x, dims, Some(&d.w[..]), Some(&d.b[..])).unwrap();
        let got = values::<f64>(&y)?;
        let diff = max_abs_diff(&got, &rf.y);
        assert!(
            diff <= accuracy::F64_TOLERANCE,
            "{dims:?}: y off by {diff:e}"
        );
        let grads = (&y * &dy)?.sum_all()?.backward()?;
        let rb = reference::backward(&gn, &d.dy, &d.x, dims, Some(&d.w[..])).unwrap();
        let scale = accuracy::dx_scale(&d.dy, dims, groups, Layout::Nchw, Some(&d.w), &rf.rstd);
        let dx = values::<f64>(grads.get(x.as_tensor()).unwrap())?;
        assert!(
            rel_l2(&dx, &rb.dx, scale) <= accuracy::F64_TOLERANCE,
            "{dims:?}: dx"
        );
        let dw = values::<f64>(grads.get(w.as_tensor()).unwrap())?;
        let db = values::<f64>(grads.get(b.as_tensor()).unwrap())?;
        let (nw, nb) = (
            accuracy::l2(rb.dweight.clone()),
            accuracy::l2(rb.dbias.clone()),
        );
        assert!(
            rel_l2(&dw, &rb.dweight, nw) <= accuracy::F64_TOLERANCE,
            "{dims:?}: dweight"
        );
        assert!(
            rel_l2(&db, &rb.dbias, nb) <= accuracy::F64_TOLERANCE,
            "{dims:?}: dbias"
        );
        // candle_nn computes f64 in f64 too
        if dims.len() >= 3 {
            let theirs = candle_nn::GroupNorm::new(
                w.as_tensor().clone(),
                b.as_tensor().clone(),
                c,
                groups,
                EPS,
            )?;
            let yt = values::<f64>(&theirs.forward(&nn_view(x.as_tensor())?)?)?;
            let diff = max_abs_diff(&got, &yt);
            assert!(
                diff <= accuracy::F64_TOLERANCE,
                "{dims:?}: |ours - candle_nn| = {diff:e}"
            );
        }
    }
    Ok(())
}

/// An f64 VarBuilder, where candle_nn works, works here too (this failed on the dtype).
#[test]
fn module_from_an_f64_var_builder() -> R {
    let (groups, c) = (4, 12);
    let dims = [2, c, 5, 3];
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, CDType::F64, &cpu());
    let theirs = candle_nn::group_norm(groups, c, EPS, vb.pp("norm"))?;
    let ours = gnn::group_norm(groups, c, EPS, vb.pp("norm"))?;
    assert_eq!(ours.weight().dtype(), CDType::F64);
    let d = data(&dims, 1600);
    let x = tensor(&d.x, &dims)?;
    let yo = values::<f64>(&x.apply(&ours)?)?;
    let yt = values::<f64>(&theirs.forward(&x)?)?;
    let diff = max_abs_diff(&yo, &yt);
    assert!(
        diff <= accuracy::F64_TOLERANCE,
        "|ours - candle_nn| = {diff:e}"
    );
    let grads = x.apply(&ours)?.sqr()?.sum_all()?.backward()?;
    for var in varmap.all_vars() {
        assert!(grads.get(var.as_tensor()).is_some());
    }
    Ok(())
}

/// A weight or bias of the wrong shape, dtype or device is refused by `new`, not by the first
/// `forward` (candle_nn's behaviour, which this used to copy).
#[test]
fn module_checks_its_parameters_at_construction() -> R {
    let c = 8;
    let ok = Tensor::ones(c, CDType::F32, &cpu())?;
    gnn::GroupNorm::new(ok.clone(), ok.zeros_like()?, c, 4, EPS)?;
    let short = Tensor::ones(c - 1, CDType::F32, &cpu())?;
    let square = Tensor::ones((c, 1), CDType::F32, &cpu())?;
    for (w, b, needle) in [
        (&short, &ok, "weight has shape [7]"),
        (&ok, &short, "bias has shape [7]"),
        (&square, &ok, "weight has shape [8, 1]"),
    ] {
        let e = gnn::GroupNorm::new(w.clone(), b.clone(), c, 4, EPS).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    let e = gnn::GroupNorm::new(ok.clone(), ok.to_dtype(CDType::F64)?, c, 4, EPS).unwrap_err();
    assert!(e.to_string().contains("must be the same"), "{e}");
    Ok(())
}

/// Zero elements with huge other dims: errors, not a "capacity overflow" panic or an abort
/// on a 1 TiB allocation.
#[test]
fn huge_but_empty_tensors_are_errors() -> R {
    for dims in [[1usize << 62, 1, 0], [1 << 40, 1, 0]] {
        let x = Tensor::zeros(&dims[..], CDType::F32, &cpu())?;
        let e = err_text(group_norm(&x, None, None, 1, EPS));
        assert!(e.contains("too large"), "{dims:?}: {e}");
    }
    // eps that vanishes in f32
    let x = Tensor::ones((2, 4, 3), CDType::F32, &cpu())?;
    let e = err_text(group_norm(&x, None, None, 2, 1e-50));
    assert!(e.contains("eps"), "{e}");
    Ok(())
}
