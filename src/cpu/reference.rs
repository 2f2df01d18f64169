//! The f64 reference: the numeric ground truth every other path is tested against.
//!
//! Written to be obviously right rather than fast: plain loops over [`Geometry::offset`], a
//! two-pass mean and biased variance in f64, the backward formula of the design notes term by
//! term, one thread. Inputs of any [`Element`] type are widened exactly to f64, so a reference
//! result is the exact-arithmetic answer for the (already rounded) inputs, up to f64 rounding.
//!
//! Conventions shared with the fast path:
//!
//! - an empty row (`S = 0`, so `L = 0`) has mean 0 and `rstd = 1 / sqrt(eps)`, the statistics
//!   of an empty Welford state; its `y` and `dx` are empty;
//! - `N = 0` gives empty outputs and statistics;
//! - a NaN or Inf in a row makes that row's variance NaN, so its `y` (and `dx`) are NaN; other
//!   rows are untouched.
//!
//! ```
//! use groupnorm::{cpu::reference, GroupNorm};
//! let gn = GroupNorm::new(1, 2)?;
//! let r = reference::forward(&gn, &[1.0f32, 3.0], &[1, 2], None::<&[f32]>, None)?;
//! assert_eq!(r.mean, vec![2.0]);
//! assert!((r.y[0] + 1.0).abs() < 1e-4 && (r.y[1] - 1.0).abs() < 1e-4);
//! # Ok::<(), groupnorm::Error>(())
//! ```

use crate::config::{check_len, Geometry};
use crate::dtype::{check_param_dtype, Element};
use crate::{Activation, GroupNorm, Result};

/// Output of the reference forward pass, all in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct RefForward {
    /// Normalized output, same dims and layout as `x`.
    pub y: Vec<f64>,
    /// Mean of each group row, `(N, G)` row-major.
    pub mean: Vec<f64>,
    /// `1 / sqrt(var + eps)` of each group row (biased variance), `(N, G)` row-major.
    pub rstd: Vec<f64>,
}

/// Output of the reference backward pass, all in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct RefGrads {
    /// Gradient with respect to `x`, same dims and layout as `x`.
    pub dx: Vec<f64>,
    /// Gradient with respect to the weight, `C` values (computed whether or not a weight was
    /// given: it is the same sum either way).
    pub dweight: Vec<f64>,
    /// Gradient with respect to the bias, `C` values.
    pub dbias: Vec<f64>,
}

/// Mean and `rstd` of group row `(n, g)` from `x`, two-pass in f64.
fn row_stats(geo: &Geometry, eps: f64, x: &[f64], n: usize, g: usize) -> (f64, f64) {
    let count = geo.row_len();
    if count == 0 {
        return (0.0, 1.0 / eps.sqrt());
    }
    let channels = g * geo.d..(g + 1) * geo.d;
    let mut sum = 0.0;
    for c in channels.clone() {
        for s in 0..geo.s {
            sum += x[geo.offset(n, c, s)];
        }
    }
    let mean = sum / count as f64;
    let mut m2 = 0.0;
    for c in channels {
        for s in 0..geo.s {
            let v = x[geo.offset(n, c, s)] - mean;
            m2 += v * v;
        }
    }
    let var = m2 / count as f64;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Panics with a clear message unless `len == expected` (the f64 entry points take a
/// [`Geometry`] the caller vouches for; the generic entry points validate and return errors).
fn assert_len(name: &str, len: usize, expected: usize) {
    assert!(
        len == expected,
        "reference: `{name}` has {len} elements, the geometry implies {expected}"
    );
}

/// Reference forward pass on f64 data.
///
/// `y = (x - mean) * rstd * weight[c] + bias[c]`, with mean and biased variance over each group
/// row computed in two passes. Missing weight counts as 1, missing bias as 0.
///
/// # Panics
///
/// If a slice length disagrees with `geo` (`x`: `N * C * S`, `weight`/`bias`: `C`). Use
/// [`forward`] for validated input.
pub fn forward_f64(
    geo: &Geometry,
    eps: f64,
    x: &[f64],
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
) -> RefForward {
    forward_act_f64(geo, eps, Activation::None, x, weight, bias)
}

/// [`forward_f64`] followed by `act`: `y = act((x - mean) * rstd * weight[c] + bias[c])`.
///
/// # Panics
///
/// As [`forward_f64`].
pub fn forward_act_f64(
    geo: &Geometry,
    eps: f64,
    act: Activation,
    x: &[f64],
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
) -> RefForward {
    assert_len("x", x.len(), geo.numel());
    if let Some(w) = weight {
        assert_len("weight", w.len(), geo.c);
    }
    if let Some(b) = bias {
        assert_len("bias", b.len(), geo.c);
    }
    let mut y = vec![0.0; geo.numel()];
    let mut mean = vec![0.0; geo.rows()];
    let mut rstd = vec![0.0; geo.rows()];
    for n in 0..geo.n {
        for g in 0..geo.g {
            let (m, r) = row_stats(geo, eps, x, n, g);
            mean[n * geo.g + g] = m;
            rstd[n * geo.g + g] = r;
            for c in g * geo.d..(g + 1) * geo.d {
                let w = weight.map_or(1.0, |w| w[c]);
                let b = bias.map_or(0.0, |b| b[c]);
                for s in 0..geo.s {
                    let i = geo.offset(n, c, s);
                    y[i] = act.apply_f64((x[i] - m) * r * w + b);
                }
            }
        }
    }
    RefForward { y, mean, rstd }
}

/// Reference backward pass on f64 data, recomputing mean and `rstd` from `x` in f64.
///
/// With `xhat = (x - mean) * rstd`, `w = weight[c]` (1 when absent) and means over one group row
/// of `L` values:
///
/// ```text
/// dx         = rstd * (w*dy - mean_row(w*dy) - xhat * mean_row(w*dy*xhat))
/// dweight[c] = sum over n, s of dy * xhat
/// dbias[c]   = sum over n, s of dy
/// ```
///
/// # Panics
///
/// If a slice length disagrees with `geo` (`dy`, `x`: `N * C * S`, `weight`: `C`). Use
/// [`backward`] for validated input.
pub fn backward_f64(
    geo: &Geometry,
    eps: f64,
    dy: &[f64],
    x: &[f64],
    weight: Option<&[f64]>,
) -> RefGrads {
    backward_act_f64(geo, eps, Activation::None, dy, x, weight, None)
}

/// Reference backward of the activated operator `y = act(z)`, `z = xhat * w + b`: `dy` is the
/// gradient of `y`; the gradient of `z` is `dz = dy * act'(z)` (recomputed in f64 from `x`, the
/// weight and the bias), and the result is [`backward_f64`] of `dz`. `dbias` is the sum of `dz`,
/// `dweight` that of `dz * xhat`.
///
/// # Panics
///
/// As [`backward_f64`], and if `bias` is not of `C` values.
pub fn backward_act_f64(
    geo: &Geometry,
    eps: f64,
    act: Activation,
    dy: &[f64],
    x: &[f64],
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
) -> RefGrads {
    assert_len("dy", dy.len(), geo.numel());
    assert_len("x", x.len(), geo.numel());
    if let Some(w) = weight {
        assert_len("weight", w.len(), geo.c);
    }
    if let Some(b) = bias {
        assert_len("bias", b.len(), geo.c);
    }
    let dz: Vec<f64>;
    let dy = if act == Activation::None {
        dy
    } else {
        dz = pre_activation_grad_f64(geo, eps, act, dy, x, weight, bias);
        &dz
    };
    let mut dx = vec![0.0; geo.numel()];
    let mut dweight = vec![0.0; geo.c];
    let mut dbias = vec![0.0; geo.c];
    let count = geo.row_len() as f64;
    for n in 0..geo.n {
        for g in 0..geo.g {
            let (m, r) = row_stats(geo, eps, x, n, g);
            let channels = g * geo.d..(g + 1) * geo.d;
            // Row means of w*dy and w*dy*xhat.
            let mut sum_wdy = 0.0;
            let mut sum_wdy_xhat = 0.0;
            for c in channels.clone() {
                let w = weight.map_or(1.0, |w| w[c]);
                for s in 0..geo.s {
                    let i = geo.offset(n, c, s);
                    let xhat = (x[i] - m) * r;
                    sum_wdy += w * dy[i];
                    sum_wdy_xhat += w * dy[i] * xhat;
                    dweight[c] += dy[i] * xhat;
                    dbias[c] += dy[i];
                }
            }
            let mean_wdy = sum_wdy / count;
            let mean_wdy_xhat = sum_wdy_xhat / count;
            for c in channels {
                let w = weight.map_or(1.0, |w| w[c]);
                for s in 0..geo.s {
                    let i = geo.offset(n, c, s);
                    let xhat = (x[i] - m) * r;
                    dx[i] = r * (w * dy[i] - mean_wdy - xhat * mean_wdy_xhat);
                }
            }
        }
    }
    RefGrads { dx, dweight, dbias }
}

/// The gradient of the pre-activation `z = xhat * w + b` of `y = act(z)` given `dy`, the
/// gradient of `y`: `dz = dy * act'(z)`, with `z` recomputed in f64 from `x` (same layout as
/// `x`). This is also the `dy` against whose size the tolerances measure `dx` for an activated
/// operator (`‖rstd·w·dz‖`, see [`crate::accuracy::dx_scale`]).
///
/// # Panics
///
/// As [`backward_act_f64`].
pub fn pre_activation_grad_f64(
    geo: &Geometry,
    eps: f64,
    act: Activation,
    dy: &[f64],
    x: &[f64],
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
) -> Vec<f64> {
    let mut v = dy.to_vec();
    if act == Activation::None {
        return v;
    }
    for n in 0..geo.n {
        for g in 0..geo.g {
            let (m, r) = row_stats(geo, eps, x, n, g);
            for c in g * geo.d..(g + 1) * geo.d {
                let w = weight.map_or(1.0, |w| w[c]);
                let b = bias.map_or(0.0, |b| b[c]);
                for s in 0..geo.s {
                    let i = geo.offset(n, c, s);
                    v[i] *= act.derivative_f64((x[i] - m) * r * w + b);
                }
            }
        }
    }
    v
}

/// Exact widening of a slice to f64.
fn widen<E: Element>(v: &[E]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}

/// Reference forward pass on any element types: validates exactly as
/// [`GroupNorm::forward`] does, widens everything to f64 and calls [`forward_f64`].
pub fn forward<T: Element, P: Element>(
    gn: &GroupNorm,
    x: &[T],
    dims: &[usize],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
) -> Result<RefForward> {
    let geo = gn.geometry(dims)?;
    geo.check_activation("x", x.len())?;
    gn.check_params::<T, P>(weight, bias)?;
    let w = weight.map(widen);
    let b = bias.map(widen);
    Ok(forward_act_f64(
        &geo,
        gn.eps(),
        gn.activation(),
        &widen(x),
        w.as_deref(),
        b.as_deref(),
    ))
}

/// Reference backward pass on any element types: validates `dy`, `x` and `weight` as
/// [`GroupNorm::backward`] does, widens everything to f64 and calls [`backward_f64`] (which
/// recomputes the statistics from `x`, so none are taken).
///
/// Errors with [`Error::BiasNeeded`](crate::Error::BiasNeeded) when `gn` has an activation: use [`backward_activated`].
pub fn backward<T: Element, P: Element>(
    gn: &GroupNorm,
    dy: &[T],
    x: &[T],
    dims: &[usize],
    weight: Option<&[P]>,
) -> Result<RefGrads> {
    gn.check_plain_backward()?;
    backward_activated(gn, dy, x, dims, weight, None)
}

/// Reference backward of the whole operator including `gn`'s activation (see
/// [`backward_act_f64`]): validates as [`GroupNorm::backward`] does, widens to f64.
pub fn backward_activated<T: Element, P: Element>(
    gn: &GroupNorm,
    dy: &[T],
    x: &[T],
    dims: &[usize],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
) -> Result<RefGrads> {
    let geo = gn.geometry(dims)?;
    geo.check_activation("dy", dy.len())?;
    geo.check_activation("x", x.len())?;
    if let Some(w) = weight {
        check_param_dtype::<T, P>("weight")?;
        check_len("weight", w.len(), geo.c, "one value per channel")?;
    }
    if let Some(b) = bias {
        check_param_dtype::<T, P>("bias")?;
        check_len("bias", b.len(), geo.c, "one value per channel")?;
    }
    let w = weight.map(widen);
    let b = bias.map(widen);
    Ok(backward_act_f64(
        &geo,
        gn.eps(),
        gn.activation(),
        &widen(dy),
        &widen(x),
        w.as_deref(),
        b.as_deref(),
    ))
}
