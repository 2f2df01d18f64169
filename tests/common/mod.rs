//! Shared test helpers: seeded data, layout transposes, and assertions against the f64
//! reference.
//!
//! The tolerances are docs/design.md's "Accuracy targets", stated once in [`groupnorm::accuracy`]
//! (with their justification) and re-exported here; the assertions below judge with its error
//! measures and add messages naming the worst element. They are generic over [`Element`], so
//! the CPU fast path and the GPU kernels are held to the same checks.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

// Re-exported for the test binaries; each uses some of them.
#[allow(unused_imports)]
pub use groupnorm::accuracy::{
    dx_low_precision_bound, dx_rel_l2, dx_scale, dx_scale_of, l2, param_grad_rel_l2, DX_REL_L2_F32,
    DX_REL_L2_LOW_PRECISION, F32_FORWARD_ABS, F32_FORWARD_OFFSET_ABS, LOW_PRECISION_FORWARD_SLACK,
    PARAM_GRAD_REL_L2_F32,
};

use groupnorm::accuracy;
use groupnorm::cpu::reference::RefForward;
use groupnorm::{DType, Element, Layout, Stats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Per-element forward tolerance for an output of type `T` whose f64 reference is `reference`
/// ([`accuracy::forward_tolerance`]).
pub fn forward_tolerance<T: Element>(reference: f64, f32_abs: f64) -> f64 {
    accuracy::forward_tolerance(T::DTYPE, reference, f32_abs)
}

// ---------------------------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------------------------

/// Asserts `|got[i] - reference[i]| <= forward_tolerance::<T>(reference[i], f32_abs)` for every
/// `i` (a NaN reference must be matched by NaN); on failure names the worst index (largest
/// error over tolerance), the values, the tolerance, and how many elements failed.
pub fn assert_forward_close<T: Element>(got: &[T], reference: &[f64], f32_abs: f64, ctx: &str) {
    assert_eq!(got.len(), reference.len(), "{ctx}: output length");
    let e = accuracy::forward_error(got, reference, f32_abs);
    if !e.passed() {
        let i = e.worst_index;
        let (g, r) = (got[i].to_f64(), reference[i]);
        panic!(
            "{ctx}: {} of {} {} outputs out of tolerance; worst at index {i}: got {g}, \
             expected {r}, |error| {:e}, tolerance {:e} (max |error| {:e}, {:.2} ulp)",
            e.failures,
            got.len(),
            T::DTYPE,
            (g - r).abs(),
            forward_tolerance::<T>(r, f32_abs),
            e.max_abs,
            e.max_ulps,
        );
    }
}

/// Asserts the saved statistics match the reference's, in the units in which they move `y`,
/// at the forward tolerance `tol` ([`F32_FORWARD_ABS`] or [`F32_FORWARD_OFFSET_ABS`]):
///
/// - `|mean - mean_ref| * rstd_ref <= tol + ulp_f32(mean_ref) / 2 * rstd_ref`: a mean error
///   shifts each `y` of the row by that much per unit weight. The half ulp is the rounding of
///   the saved f32 mean itself, which no path can avoid (docs/design.md: "a plain f32 mean costs half
///   an ulp of the offset", 3e-5 at 1e3); `y` does not pay it, as it normalizes around the
///   pivot.
/// - `|rstd / rstd_ref - 1| <= tol`: scales `y` by that relative amount, and `|x̂|` is O(1).
///
/// Statistics are f32 for every activation dtype, so `tol` does not depend on it.
pub fn assert_stats_close(got: &Stats, reference: &RefForward, tol: f64, ctx: &str) {
    assert_eq!(got.mean.len(), reference.mean.len(), "{ctx}: mean length");
    assert_eq!(got.rstd.len(), reference.rstd.len(), "{ctx}: rstd length");
    let close = |g: f64, e: f64, t: f64| {
        if e.is_nan() {
            g.is_nan()
        } else {
            (g - e).abs() <= t
        }
    };
    for i in 0..got.mean.len() {
        let (m, r) = (got.mean[i] as f64, got.rstd[i] as f64);
        let (mr, rr) = (reference.mean[i], reference.rstd[i]);
        let mean_tol = tol + DType::F32.ulp(mr) / 2.0 * rr;
        assert!(
            close(m * rr, mr * rr, mean_tol),
            "{ctx}: mean of row {i}: got {m}, expected {mr} (error {:e} row std units, \
             tolerance {mean_tol:e})",
            (m - mr).abs() * rr
        );
        assert!(
            close(r / rr, 1.0, tol),
            "{ctx}: rstd of row {i}: got {r}, expected {rr} (relative error {:e}, tolerance \
             {tol:e})",
            (r / rr - 1.0).abs()
        );
    }
}

/// Index of the largest `|got - reference|` (NaN counts as largest).
fn worst_index<E: Element>(got: &[E], reference: &[f64]) -> usize {
    let mut worst = (0usize, -1.0f64);
    for (i, (g, &r)) in got.iter().zip(reference).enumerate() {
        let d = (g.to_f64() - r).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        if d > worst.1 {
            worst = (i, d);
        }
    }
    worst.0
}

/// Asserts `dx` meets its target: `‖dx - dx_ref‖₂ <= dx_rel_l2(T) · scale`, `scale` from
/// [`dx_scale`]; for f16/bf16 the bound is [`dx_low_precision_bound`], which is docs/design.md's 2e-3
/// wherever that is attainable ([`accuracy::dx_error`]).
pub fn assert_dx_close<T: Element>(got: &[T], reference: &[f64], scale: f64, ctx: &str) {
    assert_eq!(got.len(), reference.len(), "{ctx}: dx length");
    let (err, bound) = accuracy::dx_error(got, reference, scale);
    let within = err <= bound; // false for a NaN error, which must fail
    if !within {
        let i = worst_index(got, reference);
        panic!(
            "{ctx}: dx ({}) relative L2 error {err:e} against ‖rstd·w·dy‖ = {scale:e} exceeds \
             {bound:e} (docs/design.md: {:e}); worst index {i}: got {}, expected {}",
            T::DTYPE,
            dx_rel_l2(T::DTYPE),
            got[i].to_f64(),
            reference[i]
        );
    }
}

/// Asserts a parameter gradient (`dweight` or `dbias`, type `P`) has relative L2 error
/// `<= param_grad_rel_l2(P)` against the reference ([`accuracy::param_grad_error`]).
pub fn assert_param_grad_close<P: Element>(got: &[P], reference: &[f64], name: &str, ctx: &str) {
    assert_eq!(got.len(), reference.len(), "{ctx}: {name} length");
    let (err, bound) = accuracy::param_grad_error(got, reference);
    let within = err <= bound; // false for a NaN error, which must fail
    if !within {
        let i = worst_index(got, reference);
        panic!(
            "{ctx}: {name} ({}) relative L2 error {err:e} exceeds {bound:e}; worst index {i}: \
             got {}, expected {}",
            P::DTYPE,
            got[i].to_f64(),
            reference[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// A seeded generator: every test's data is reproducible.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `len` values of `mean + std * N(0, 1)` in f64.
pub fn normal_f64(rng: &mut StdRng, len: usize, mean: f64, std: f64) -> Vec<f64> {
    let dist = Normal::new(mean, std).expect("valid normal parameters");
    (0..len).map(|_| dist.sample(rng)).collect()
}

/// `len` values uniform in `[lo, hi)` in f64.
pub fn uniform_f64(rng: &mut StdRng, len: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

/// `len` values of `mean + std * N(0, 1)`, rounded once to `E`.
pub fn normal_vec<E: Element>(rng: &mut StdRng, len: usize, mean: f64, std: f64) -> Vec<E> {
    from_f64(&normal_f64(rng, len, mean, std))
}

/// `len` values uniform in `[lo, hi)`, rounded once to `E`.
pub fn uniform_vec<E: Element>(rng: &mut StdRng, len: usize, lo: f64, hi: f64) -> Vec<E> {
    from_f64(&uniform_f64(rng, len, lo, hi))
}

/// Exact widening to f64.
pub fn to_f64<E: Element>(v: &[E]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}

/// Rounds each value once to `E`.
pub fn from_f64<E: Element>(v: &[f64]) -> Vec<E> {
    v.iter().map(|&e| E::from_f64(e)).collect()
}

/// Memory offset of logical element `(ni, ci, si)` of an `(N, c, s)` tensor in `layout`.
pub fn offset(layout: Layout, c: usize, s: usize, ni: usize, ci: usize, si: usize) -> usize {
    match layout {
        Layout::Nchw => (ni * c + ci) * s + si,
        Layout::Nhwc => (ni * s + si) * c + ci,
        other => panic!("test helper: layout {other:?} not known here"),
    }
}

/// `(N, C, S)` of logical dims.
pub fn ncs(dims: &[usize]) -> (usize, usize, usize) {
    (dims[0], dims[1], dims[2..].iter().product())
}

/// Reorders a tensor of logical dims `dims` from layout `from` to layout `to`.
pub fn relayout<E: Copy + Default>(v: &[E], dims: &[usize], from: Layout, to: Layout) -> Vec<E> {
    let (n, c, s) = ncs(dims);
    let mut out = vec![E::default(); v.len()];
    for ni in 0..n {
        for ci in 0..c {
            for si in 0..s {
                out[offset(to, c, s, ni, ci, si)] = v[offset(from, c, s, ni, ci, si)];
            }
        }
    }
    out
}

/// A shape to test: logical dims and group count.
#[derive(Clone, Debug)]
pub struct Case {
    /// What the shape exercises.
    pub name: &'static str,
    /// Logical dims `(N, C, *spatial)`.
    pub dims: Vec<usize>,
    /// Number of groups.
    pub groups: usize,
}

impl Case {
    fn new(name: &'static str, dims: &[usize], groups: usize) -> Case {
        Case {
            name,
            dims: dims.to_vec(),
            groups,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.dims[1]
    }
}

/// The random shapes every path is checked on (small: each runs in milliseconds).
pub fn random_cases() -> Vec<Case> {
    vec![
        Case::new("odd sizes", &[3, 6, 7, 5], 3),
        Case::new("D = 1 (G = C)", &[2, 8, 5, 3], 8),
        Case::new("G = 1", &[2, 6, 4, 5], 1),
        Case::new("S = 1 (trailing 1)", &[4, 12, 1], 4),
        Case::new("2-D (N, C)", &[5, 12], 3),
        Case::new("5-D", &[2, 8, 3, 4, 5], 4),
        Case::new("N = 1, prime spatial", &[1, 9, 13], 3),
        Case::new("wide group D = 600 > chunk", &[2, 600, 3], 1),
        Case::new(
            "many NHWC blocks, L not a chunk multiple",
            &[1, 4, 100, 101],
            2,
        ),
        Case::new("SD-like (2, 64, 8x8) G = 32", &[2, 64, 8, 8], 32),
        Case::new("row of 3 chunks + tail", &[2, 2, 777], 2),
        Case::new("C = 6 does not divide 256, S = 900", &[2, 6, 30, 30], 3),
        Case::new("C = 320, G = 32: one NHWC batch", &[2, 320, 5, 3], 32),
        Case::new(
            "C = 1280, G = 32: NHWC batches of 25 + 7 groups, 2 coefficient spans",
            &[2, 1280, 3, 2],
            32,
        ),
        Case::new(
            "D = 550: NHWC group of 3 conversion spans",
            &[1, 1100, 2, 3],
            2,
        ),
        Case::new(
            "D = 1030 > NHWC batch: contiguous runs",
            &[1, 1030, 3, 2],
            1,
        ),
    ]
}

/// The two layouts.
pub const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];
