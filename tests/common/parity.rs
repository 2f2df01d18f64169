//! The parity check, written once: forward and backward of one shape on one backend
//! (tests/common/backend.rs) against the f64 reference, on every kernel path the backend has,
//! into outputs poisoned with NaN, with docs/design.md's tolerances (tests/common/mod.rs).
//!
//! Used by the backend-independent suite (tests/kernels.rs), the emulator's own checks
//! (tests/gpu_emulated.rs: small-device limits, traces) and the GPU's (tests/gpu_parity.rs).
//!
//! Include with `#[path = "common/parity.rs"] mod parity;` beside `mod common;`,
//! `#[path = "common/backend.rs"] mod backend;` and `mod gpu_support;`.
#![allow(dead_code)]

use crate::backend::{Backend, Trace};
use crate::common::*;
use groupnorm::cpu::reference;
use groupnorm::gpu::Path;
use groupnorm::{bf16, f16, Activation, DType, Element, Error, GroupNorm, Layout};

/// Every path; each case runs those its backend and shape allow (forced fused and cluster
/// paths refuse with `PathUnavailable` where a row does not fit them; the CPU has one path).
pub const PATHS: [Path; 4] = [Path::Auto, Path::Split, Path::Fused, Path::Cluster];
/// The paths every device runs.
pub const PLAIN_PATHS: [Path; 3] = [Path::Auto, Path::Split, Path::Fused];

/// The paths of `paths` that mean something on `be` (only `Auto` on the CPU).
pub fn paths_of(be: &Backend, paths: &[Path]) -> Vec<Path> {
    if be.has_paths() {
        paths.to_vec()
    } else {
        vec![Path::Auto]
    }
}

/// The affine parameters a case passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Params {
    None,
    Weight,
    Bias,
    Both,
}

impl Params {
    pub const ALL: [Params; 4] = [Params::None, Params::Weight, Params::Bias, Params::Both];
    pub fn weight(self) -> bool {
        matches!(self, Params::Weight | Params::Both)
    }
    pub fn bias(self) -> bool {
        matches!(self, Params::Bias | Params::Both)
    }
}

/// How one parity case is built.
#[derive(Clone, Copy, Debug)]
pub struct Opts {
    /// Which of weight and bias are present (dbias is asked for always, dweight with a weight).
    pub affine: Params,
    /// Start x, dy, y and dx one element past a 16-byte boundary (the scalar kernels).
    pub misalign: bool,
    /// Mean of x (a large offset tests the per-row pivot and the mean correction).
    pub x_mean: f64,
    /// Forward tolerance for f32 outputs.
    pub f32_abs: f64,
    /// Memory layout of x, y, dy, dx.
    pub layout: Layout,
    /// GroupNorm fused with SiLU (forward writes silu(z); backward takes its gradient).
    pub silu: bool,
}

/// Weight and bias, aligned, centred data, NCHW, no activation.
pub const PLAIN: Opts = Opts {
    affine: Params::Both,
    misalign: false,
    x_mean: 0.0,
    f32_abs: F32_FORWARD_ABS,
    layout: Layout::Nchw,
    silu: false,
};

/// What one path of a parity case ran (traces from the emulator only).
#[derive(Debug)]
pub struct Ran {
    pub path: Path,
    pub fwd: Option<Trace>,
    /// Whether the backward pass ran (a forced path may fit forward and not backward).
    pub backward_ran: bool,
    pub bwd: Option<Trace>,
}

/// Forward and backward of one shape on `be` against the f64 reference, on every path of
/// [`PATHS`] the backend has; the backward from the statistics the backend saved (as a
/// training step would). Returns what ran.
pub fn parity<T: Element, P: Element>(
    be: &Backend,
    dims: &[usize],
    groups: usize,
    seed: u64,
    o: Opts,
) -> Vec<Ran> {
    let case = format!(
        "{} {dims:?} G={groups} {}/{} {} silu={} affine={:?} misaligned={} mean={}",
        be.name(),
        T::DTYPE,
        P::DTYPE,
        o.layout.name(),
        o.silu,
        o.affine,
        o.misalign,
        o.x_mean,
    );
    let act = if o.silu {
        Activation::Silu
    } else {
        Activation::None
    };
    let gn = GroupNorm::new(groups, dims[1])
        .unwrap()
        .with_layout(o.layout)
        .with_activation(act);
    let c = dims[1];
    let numel: usize = dims.iter().product();
    let mut r = rng(seed);
    let x: Vec<T> = normal_vec(&mut r, numel, o.x_mean, 1.0);
    let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<P> = normal_vec(&mut r, c, 0.0, 0.5);
    let dy: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let wh = o.affine.weight().then_some(&w[..]);
    let bh = o.affine.bias().then_some(&b[..]);
    let reference = reference::forward(&gn, &x, dims, wh, bh).unwrap();
    let grads = reference::backward_activated(&gn, &dy, &x, dims, wh, bh).unwrap();
    let w64 = o.affine.weight().then(|| to_f64(&w));
    let b64 = o.affine.bias().then(|| to_f64(&b));
    // dx errors are measured against ||rstd w dz||, dz the gradient reaching the normalization
    // (dy itself without an activation): see tests/cpu_activation.rs
    let (dy64, x64) = (to_f64(&dy), to_f64(&x));
    let scale = dx_scale_of(
        &gn,
        dims,
        &dy64,
        &x64,
        w64.as_deref(),
        b64.as_deref(),
        &reference.rstd,
    )
    .unwrap();

    let mut ran = Vec::new();
    for path in paths_of(be, &PATHS) {
        let ctx = format!("{case} path={path:?}");
        let refusable = matches!(path, Path::Fused | Path::Cluster);
        let (y, stats, fwd) = match be.forward_with(&gn, path, &x, dims, wh, bh, o.misalign) {
            Ok(v) => v,
            // the fused and cluster paths refuse rows that do not fit on chip (and the cluster
            // path devices without clusters): that is their contract
            Err(Error::PathUnavailable { .. }) if refusable => continue,
            Err(e) => panic!("{ctx}: forward: {e}"),
        };
        let ctx = match &fwd {
            Some(t) => format!("{ctx} fwd={}", describe(t)),
            None => ctx,
        };
        #[cfg(feature = "emulate")]
        if let (true, Some(t)) = (o.misalign, &fwd) {
            assert!(!t.vec, "{ctx}: misaligned buffers ran the vector kernels");
        }
        assert_forward_close(&y, &reference.y, o.f32_abs, &format!("{ctx}: y"));
        assert_stats_close(&stats, &reference, o.f32_abs, &format!("{ctx}: stats"));

        let (g, bwd) =
            match be.backward_with(&gn, path, &dy, &x, dims, &stats, wh, bh, true, o.misalign) {
                Ok(v) => v,
                // backward keeps x and dy on chip: a row can fit forward and not backward
                Err(Error::PathUnavailable { .. }) if refusable => {
                    ran.push(Ran {
                        path,
                        fwd,
                        backward_ran: false,
                        bwd: None,
                    });
                    continue;
                }
                Err(e) => panic!("{ctx}: backward: {e}"),
            };
        let ctx = match &bwd {
            Some(t) => format!("{ctx} bwd={}", describe(t)),
            None => ctx,
        };
        #[cfg(feature = "emulate")]
        if let (true, Some(t)) = (o.misalign, &bwd) {
            assert!(!t.vec, "{ctx}: misaligned buffers ran the vector kernels");
        }
        assert_dx_close(&g.dx, &grads.dx, scale, &format!("{ctx}: dx"));
        match (&g.dweight, o.affine.weight()) {
            (Some(dw), true) => assert_param_grad_close(dw, &grads.dweight, "dweight", &ctx),
            (None, false) => {}
            (got, _) => panic!("{ctx}: dweight {got:?} with affine {:?}", o.affine),
        }
        let db = g
            .dbias
            .unwrap_or_else(|| panic!("{ctx}: dbias asked for, not returned"));
        assert_param_grad_close(&db, &grads.dbias, "dbias", &ctx);
        ran.push(Ran {
            path,
            fwd,
            backward_ran: true,
            bwd,
        });
    }
    ran
}

/// Runs [`parity`] for every dtype pair the API accepts; returns what each ran.
pub fn all_dtypes(
    be: &Backend,
    dims: &[usize],
    groups: usize,
    seed: u64,
    o: Opts,
) -> Vec<(DType, Vec<Ran>)> {
    vec![
        (DType::F32, parity::<f32, f32>(be, dims, groups, seed, o)),
        (DType::F16, parity::<f16, f16>(be, dims, groups, seed, o)),
        (DType::F16, parity::<f16, f32>(be, dims, groups, seed, o)),
        (DType::BF16, parity::<bf16, bf16>(be, dims, groups, seed, o)),
        (DType::BF16, parity::<bf16, f32>(be, dims, groups, seed, o)),
    ]
}

/// `fused vec`, `split x3 (2 ch/chunk) scalar`, `cluster x6 (3 pieces/ch) vec`,
/// `nhwc split x4 (2 groups/tile) vec`.
#[cfg(feature = "emulate")]
pub fn describe(t: &Trace) -> String {
    let kind = if t.vec { "vec" } else { "scalar" };
    if t.nhwc {
        let path = if t.fused { "fused" } else { "split" };
        return format!("nhwc {path} x{} ({} groups/tile) {kind}", t.chunks, t.cpb);
    }
    let path = if t.cluster > 1 { "cluster" } else { "split" };
    match (t.fused, t.pieces) {
        (true, _) => format!("fused {kind}"),
        (false, 1) => format!("{path} x{} ({} ch/chunk) {kind}", t.chunks, t.cpb),
        (false, p) => format!("{path} x{} ({p} pieces/ch) {kind}", t.chunks),
    }
}

/// Without the emulator there is no trace to describe.
#[cfg(not(feature = "emulate"))]
pub fn describe(_: &Trace) -> String {
    String::new()
}

/// The forward trace of `path` in `ran` (emulated runs only).
pub fn fwd_of(ran: &[Ran], path: Path) -> &Trace {
    ran.iter()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("{path:?} did not run"))
        .fwd
        .as_ref()
        .unwrap_or_else(|| panic!("{path:?}: no trace (not an emulated run)"))
}
