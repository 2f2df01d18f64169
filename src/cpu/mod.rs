//! The CPU path: the methods [`GroupNorm::forward`], [`GroupNorm::forward_into`] and
//! [`GroupNorm::backward`] on host slices, and the f64 [`reference`](mod@reference) they are
//! tested against.
//!
//! The fast path accumulates in f32 (the precision the GPU kernels use), runs in parallel over
//! group rows with rayon (and inside rows when rows are few and long), and is deterministic: the
//! same inputs give the same bits, whatever the number of threads, because every reduction has a
//! fixed shape (pairwise trees over fixed chunks; `dweight`/`dbias` summed over `n` in order).
//! Small tensors (up to 2^18 elements) stay off rayon's pool, whose hand-off costs more than
//! they take: with more than one thread in it, they run in two halves, the second on one helper
//! thread of this crate (`groupnorm-helper`) when it is awake, which stays awake for about a
//! millisecond after a run of such calls, yielding its core to any other thread. With exactly
//! two threads in the pool, larger tensors run in such halves too.
//!
//! Numerics, in short: each group row subtracts a pivot (its first value) before accumulating
//! and before normalizing, so the error follows the spread of the row rather than its offset;
//! chunks of 256 values get exact two-pass statistics and merge with Chan's formula. A NaN or
//! Inf in a row makes that row's outputs NaN and leaves the others alone. `S = 0` gives empty
//! outputs with statistics mean 0 and `rstd = 1 / sqrt(eps)` per row; `N = 0` gives empty
//! everything.
//!
//! Every method validates all of its arguments before computing anything and reports a bad
//! argument as an [`Error`], never a panic.
//!
//! f64 activations (parameters f64 or f32) take the f64 reference computation instead of the
//! fast f32 one: statistics, normalization and gradients in f64, eps in f64, held to 1e-12
//! against the reference (docs/design.md). The saved statistics stay f32 `(N, G)` like every path's;
//! the f64 backward checks them as the others do but recomputes its own from `x` in f64, so it
//! does not lose precision to them. It is single-threaded and not tuned for speed.

pub mod reference;

mod fast;

use crate::config::check_len;
use crate::dtype::{check_param_dtype, Element};
use crate::{Activation, Affine, DType, Error, Geometry, Grads, GroupNorm, Result, Stats};

/// Widens a slice to f64 (the f64 path computes in f64 throughout).
fn widen<E: Element>(v: &[E]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}

/// A vector of `len` copies of `value`, or [`Error::TooLarge`] when the host cannot allocate
/// it (a huge-but-empty tensor still has `N * G` statistics and `C` parameter gradients): the
/// allocation is tried, never assumed, so the process does not abort.
pub(crate) fn try_filled<V: Clone>(
    len: usize,
    value: V,
    geo: &Geometry,
    what: &str,
) -> Result<Vec<V>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::TooLarge {
        dims: geo.dims.clone(),
        why: format!(
            "the host could not allocate {what} ({len} values of {} bytes)",
            std::mem::size_of::<V>()
        ),
    })?;
    v.resize(len, value);
    Ok(v)
}

/// Checks the values of saved statistics where that is cheap (one pass over `N * G` pairs):
/// each row is either a poisoned row as the forward pass writes it (mean and rstd both NaN,
/// which the backward pass turns into NaN gradients for that row), or a finite mean with a
/// finite positive rstd. Anything else (a negative, zero or infinite rstd, NaN in one of the
/// two only) cannot come from a forward pass and would give silently wrong gradients.
pub(crate) fn check_stats_values(stats: &Stats) -> Result<()> {
    for (row, (&m, &r)) in stats.mean.iter().zip(&stats.rstd).enumerate() {
        let ok = (m.is_nan() && r.is_nan()) || (m.is_finite() && r.is_finite() && r > 0.0);
        if !ok {
            return Err(Error::InvalidStats {
                row,
                mean: m,
                rstd: r,
            });
        }
    }
    Ok(())
}

impl GroupNorm {
    /// The f64 forward pass: the f64 reference computation (two-pass statistics in f64, eps in
    /// f64), so f64 results meet the 1e-12 target of docs/design.md; the statistics are saved as f32
    /// like every path's (the f64 backward recomputes its own from `x`).
    fn forward_f64<T: Element, P: Element>(
        &self,
        geo: &Geometry,
        x: &[T],
        weight: Option<&[P]>,
        bias: Option<&[P]>,
        y: &mut [T],
        stats: &mut Stats,
    ) {
        let r = reference::forward_act_f64(
            geo,
            self.eps(),
            self.activation(),
            &widen(x),
            weight.map(widen).as_deref(),
            bias.map(widen).as_deref(),
        );
        for (o, v) in y.iter_mut().zip(r.y) {
            *o = T::from_f64(v);
        }
        for (o, v) in stats.mean.iter_mut().zip(r.mean) {
            *o = v as f32;
        }
        for (o, v) in stats.rstd.iter_mut().zip(r.rstd) {
            *o = v as f32;
        }
    }

    /// Validates the arguments of a forward pass and returns the geometry.
    fn check_forward<T: Element, P: Element>(
        &self,
        x: &[T],
        dims: &[usize],
        weight: Option<&[P]>,
        bias: Option<&[P]>,
    ) -> Result<Geometry> {
        let geo = self.geometry(dims)?;
        geo.check_activation("x", x.len())?;
        self.check_params::<T, P>(weight, bias)?;
        Ok(geo)
    }

    /// Forward pass on the CPU: returns `y` (same dims and layout as `x`) and the per-group
    /// statistics for [`GroupNorm::backward`].
    ///
    /// `x` has logical dims `dims = (N, C, *spatial)` and lies in memory in this configuration's
    /// [`Layout`](crate::Layout). `affine` names the weight and bias, each optional, of one
    /// value per channel in f32 or `T` (see [`Affine`]).
    ///
    /// Errors: bad dims (fewer than two, wrong channel count, too large), `x` not of
    /// `N * C * S` elements, a parameter not of `C` elements or of a dtype other than f32 or `T`.
    ///
    /// ```
    /// use groupnorm::{Affine, GroupNorm};
    /// let gn = GroupNorm::new(1, 1)?;
    /// let (y, stats) = gn.forward(&[1.0f32, 2.0, 3.0], &[1, 1, 3], Affine::new().weight(&[2.0f32]))?;
    /// assert_eq!(stats.mean, vec![2.0]);
    /// assert!((y[2] - 2.0 * 1.22474).abs() < 1e-4);
    /// # Ok::<(), groupnorm::Error>(())
    /// ```
    pub fn forward<T: Element, P: Element>(
        &self,
        x: &[T],
        dims: &[usize],
        affine: Affine<'_, P>,
    ) -> Result<(Vec<T>, Stats)> {
        let Affine { weight, bias } = affine;
        let geo = self.check_forward(x, dims, weight, bias)?;
        let mut y = try_filled(geo.numel(), T::default(), &geo, "y")?;
        let mut stats = Stats {
            mean: try_filled(geo.rows(), 0.0, &geo, "the N * G means")?,
            rstd: try_filled(geo.rows(), 0.0, &geo, "the N * G rstds")?,
        };
        if T::DTYPE == DType::F64 {
            self.forward_f64(&geo, x, weight, bias, &mut y, &mut stats);
            return Ok((y, stats));
        }
        fast::forward(
            &geo,
            self.eps() as f32,
            self.activation(),
            x,
            weight,
            bias,
            &mut y,
            &mut stats.mean,
            &mut stats.rstd,
        );
        Ok((y, stats))
    }

    /// Forward pass on the CPU into caller-owned buffers. The computation allocates nothing,
    /// in either layout (its working state lives on the stack).
    ///
    /// `y` must have `N * C * S` elements and `stats.mean`, `stats.rstd` `N * G` elements each;
    /// they are overwritten. Errors as [`GroupNorm::forward`], plus those lengths. Nothing is
    /// written when an error is returned.
    pub fn forward_into<T: Element, P: Element>(
        &self,
        x: &[T],
        dims: &[usize],
        affine: Affine<'_, P>,
        y: &mut [T],
        stats: &mut Stats,
    ) -> Result<()> {
        let Affine { weight, bias } = affine;
        let geo = self.check_forward(x, dims, weight, bias)?;
        geo.check_activation("y", y.len())?;
        geo.check_stats(stats)?;
        if T::DTYPE == DType::F64 {
            self.forward_f64(&geo, x, weight, bias, y, stats);
            return Ok(());
        }
        fast::forward(
            &geo,
            self.eps() as f32,
            self.activation(),
            x,
            weight,
            bias,
            y,
            &mut stats.mean,
            &mut stats.rstd,
        );
        Ok(())
    }

    /// Backward pass on the CPU, activation included: gradients with respect to `x`, the
    /// weight and the bias, given `dy`, the gradient of `y = act(xhat * w + b)`.
    ///
    /// `dy` and `x` have dims `dims` in this configuration's layout; `stats` are the statistics
    /// the forward pass saved for this `x`; `affine` is the forward pass's. `dweight` is `Some`
    /// exactly when `affine` has a weight, and `dbias` exactly when `want_dbias` is true; both
    /// have `C` values of type `P`. With an activation the pre-activation is recomputed from
    /// `x`, the statistics, the weight and the bias; without one the bias is not read.
    ///
    /// Errors: as [`GroupNorm::forward`] for `dims`, `x` and the parameters, plus `dy` not of
    /// `N * C * S` elements, `stats.mean`/`stats.rstd` not of `N * G` elements or holding
    /// values no forward pass writes ([`Error::InvalidStats`]), and
    /// `P` other than f32 or `T` when `dbias` is wanted.
    ///
    /// The result is deterministic: the same inputs give the same bits on every run.
    ///
    /// ```
    /// use groupnorm::{Activation, Affine, GroupNorm};
    /// let gn = GroupNorm::new(1, 2)?.with_activation(Activation::Silu);
    /// let (x, w, b) = ([1.0f32, 3.0], [1.0f32, 2.0], [0.5f32, -0.5]);
    /// let affine = Affine::new().weight(&w).bias(&b);
    /// let (_y, stats) = gn.forward(&x, &[1, 2], affine)?;
    /// let g = gn.backward(&[1.0f32, 1.0], &x, &[1, 2], &stats, affine, true)?;
    /// assert_eq!(g.dx.len(), 2);
    /// assert!(g.dweight.is_some() && g.dbias.is_some());
    /// # Ok::<(), groupnorm::Error>(())
    /// ```
    pub fn backward<T: Element, P: Element>(
        &self,
        dy: &[T],
        x: &[T],
        dims: &[usize],
        stats: &Stats,
        affine: Affine<'_, P>,
        want_dbias: bool,
    ) -> Result<Grads<T, P>> {
        let geo = self.check_backward(dy, x, dims, stats, affine, want_dbias)?;
        let mut dx = try_filled(geo.numel(), T::default(), &geo, "dx")?;
        let (dweight, dbias) = self.gradients(&geo, dy, x, stats, affine, &mut dx)?;
        Ok(Grads {
            dx,
            dweight: affine.weight.map(|_| dweight),
            dbias: want_dbias.then_some(dbias),
        })
    }

    /// Backward pass on the CPU into caller-owned buffers: [`GroupNorm::backward`]'s gradients
    /// written into `dx` (`N * C * S` elements) and, each when given, `dweight` and `dbias` (`C`
    /// values of type `P`, f32 or `T`; `dweight` may be asked for without a weight: it is the
    /// gradient a unit weight would get). For training loops that reuse their gradient buffers:
    /// without an activation no buffer of the tensor's size is allocated (NCHW: the per-(n, c)
    /// sums, `2 * N * C` f32 values; channels-last also per-block partial sums, at most an
    /// eighth of the tensor's elements in f32); with one, the pre-activation gradient takes one
    /// f32 buffer of the tensor's size.
    ///
    /// Errors: as [`GroupNorm::backward`] (with `want_dbias` = `dbias.is_some()`), plus `dx`,
    /// `dweight` or `dbias` of the wrong length. Nothing is written when an error is returned.
    ///
    /// ```
    /// use groupnorm::{Affine, GroupNorm};
    /// let gn = GroupNorm::new(1, 2)?;
    /// let (x, w) = ([1.0f32, 3.0], [1.0f32, 2.0]);
    /// let (_y, stats) = gn.forward(&x, &[1, 2], Affine::new().weight(&w))?;
    /// let (mut dx, mut dw, mut db) = ([0f32; 2], [0f32; 2], [0f32; 2]);
    /// gn.backward_into(
    ///     &[1.0f32, -1.0], &x, &[1, 2], &stats, Affine::new().weight(&w),
    ///     &mut dx, Some(&mut dw), Some(&mut db),
    /// )?;
    /// assert_eq!(db, [1.0, -1.0]);
    /// # Ok::<(), groupnorm::Error>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<T: Element, P: Element>(
        &self,
        dy: &[T],
        x: &[T],
        dims: &[usize],
        stats: &Stats,
        affine: Affine<'_, P>,
        dx: &mut [T],
        dweight: Option<&mut [P]>,
        dbias: Option<&mut [P]>,
    ) -> Result<()> {
        let geo = self.check_backward(dy, x, dims, stats, affine, dbias.is_some())?;
        geo.check_activation("dx", dx.len())?;
        if let Some(dw) = &dweight {
            check_param_dtype::<T, P>("dweight")?;
            check_len("dweight", dw.len(), geo.c, "one value per channel")?;
        }
        if let Some(db) = &dbias {
            check_len("dbias", db.len(), geo.c, "one value per channel")?;
        }
        let (dw, db) = self.gradients(&geo, dy, x, stats, affine, dx)?;
        if let Some(out) = dweight {
            out.copy_from_slice(&dw);
        }
        if let Some(out) = dbias {
            out.copy_from_slice(&db);
        }
        Ok(())
    }

    /// The checks of [`GroupNorm::backward`], before anything is computed or written.
    fn check_backward<T: Element, P: Element>(
        &self,
        dy: &[T],
        x: &[T],
        dims: &[usize],
        stats: &Stats,
        affine: Affine<'_, P>,
        want_dbias: bool,
    ) -> Result<Geometry> {
        let Affine { weight, bias } = affine;
        let geo = self.geometry(dims)?;
        geo.check_activation("dy", dy.len())?;
        geo.check_activation("x", x.len())?;
        geo.check_stats(stats)?;
        if let Some(w) = weight {
            check_param_dtype::<T, P>("weight")?;
            check_len("weight", w.len(), geo.c, "one value per channel")?;
        }
        let act = self.activation();
        if let (Some(b), true) = (bias, act != Activation::None) {
            check_param_dtype::<T, P>("bias")?;
            check_len("bias", b.len(), geo.c, "one value per channel")?;
        }
        if want_dbias {
            check_param_dtype::<T, P>("dbias")?;
        }
        check_stats_values(stats)?;
        Ok(geo)
    }

    /// `dx` (of `geo.numel()` elements, overwritten) and the weight and bias gradients, `C`
    /// values each, of validated arguments.
    fn gradients<T: Element, P: Element>(
        &self,
        geo: &Geometry,
        dy: &[T],
        x: &[T],
        stats: &Stats,
        affine: Affine<'_, P>,
        dx: &mut [T],
    ) -> Result<(Vec<P>, Vec<P>)> {
        let Affine { weight, bias } = affine;
        let act = self.activation();
        if geo.numel() == 0 {
            // Nothing to differentiate: zero gradients, allocated with a check (C may be huge).
            let zeros = || try_filled(geo.c, P::from_f32(0.0), geo, "a parameter gradient");
            return Ok((zeros()?, zeros()?));
        }
        if T::DTYPE == DType::F64 {
            let r = reference::backward_act_f64(
                geo,
                self.eps(),
                act,
                &widen(dy),
                &widen(x),
                weight.map(widen).as_deref(),
                bias.filter(|_| act != Activation::None)
                    .map(widen)
                    .as_deref(),
            );
            for (o, v) in dx.iter_mut().zip(r.dx) {
                *o = T::from_f64(v);
            }
            let narrow = |v: Vec<f64>| v.into_iter().map(P::from_f64).collect::<Vec<P>>();
            return Ok((narrow(r.dweight), narrow(r.dbias)));
        }
        let (dweight, dbias) = if act == Activation::None {
            fast::backward(geo, dy, x, &stats.mean, &stats.rstd, weight, dx)
        } else {
            let dz = fast::activation_grad(geo, act, dy, x, &stats.mean, &stats.rstd, weight, bias);
            fast::backward(geo, &dz, x, &stats.mean, &stats.rstd, weight, dx)
        };
        let narrow = |v: Vec<f32>| v.into_iter().map(P::from_f32).collect::<Vec<P>>();
        Ok((narrow(dweight), narrow(dbias)))
    }
}
