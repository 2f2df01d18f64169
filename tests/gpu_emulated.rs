//! The real CUDA kernels (kernels/*.cu), run on the CPU by the host emulator
//! (`--features emulate`: kernels/host_emu.h, tests/emu/, src/gpu/emulate.rs), held to the f64
//! reference with the same tolerances as every other path (tests/common, docs/design.md "Accuracy
//! targets").
//!
//! Each call goes through the crate's own planner and launch sequence, with small device limits
//! (few SMs, little shared memory) so that small shapes take every path: fused, split into
//! chunks of several channels, channels split into pieces, scalar tails, the 16-byte vector
//! kernels (aligned buffers) and the scalar ones (buffers one element off). Outputs and the
//! workspace start as NaN, and every buffer sits between guard zones, so a value a kernel
//! forgets to write or a write out of bounds fails the test.
//!
//! Run: `cargo test --release --features emulate --test gpu_emulated`.
#![cfg(feature = "emulate")]

mod common;

use common::*;
use groupnorm::cpu::reference::{self, pre_activation_grad_f64};
use groupnorm::gpu::emulate::{self, HostBuffer, Schedule, Trace};
use groupnorm::gpu::{DeviceLimits, Path};
use groupnorm::{bf16, f16, Activation, DType, Element, Error, GroupNorm, Layout, Stats};

/// A small device: 4 SMs and 8 KiB of shared memory per block, so that rows of a few thousand
/// values are split into chunks and pieces.
/// No thread-block clusters (as before sm_90).
const SMALL: DeviceLimits = DeviceLimits::new(4, 8 * 1024, 0);
/// The small device with clusters of up to 8 blocks (as sm_90+): rows of a few thousand values
/// take the cluster path.
const SMALL_CLUSTERS: DeviceLimits = DeviceLimits::new(SMALL.sms, SMALL.smem_per_block, 8);
/// A larger one: rows of up to 12K f32 values fit the fused path.
const MEDIUM: DeviceLimits = DeviceLimits::new(8, 48 * 1024, 0);
/// H100-like limits: the planner's real thresholds.
const H100: DeviceLimits = DeviceLimits::new(132, 227 * 1024, 16);

/// Every path; each case runs those its device and shape allow (forced fused and cluster paths
/// refuse with `PathUnavailable` where a row does not fit them).
const PATHS: [Path; 4] = [Path::Auto, Path::Split, Path::Fused, Path::Cluster];
/// The paths every device runs.
const PLAIN_PATHS: [Path; 3] = [Path::Auto, Path::Split, Path::Fused];

/// How one parity case is built.
#[derive(Clone, Copy)]
struct Opts {
    /// Which of weight and bias are present (dbias is asked for always, dweight with a weight).
    affine: Affine,
    /// Start x, dy, y and dx one element past a 16-byte boundary (the scalar kernels).
    misalign: bool,
    /// Mean of x (a large offset tests the per-row pivot and the mean correction).
    x_mean: f64,
    /// Forward tolerance for f32 outputs.
    f32_abs: f64,
    /// The device the planner plans for.
    limits: DeviceLimits,
    /// Memory layout of x, y, dy, dx.
    layout: Layout,
    /// GroupNorm fused with SiLU (forward writes silu(z); backward takes its gradient).
    silu: bool,
}

/// The affine parameters a case passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Affine {
    None,
    Weight,
    Bias,
    Both,
}

impl Affine {
    const ALL: [Affine; 4] = [Affine::None, Affine::Weight, Affine::Bias, Affine::Both];
    fn weight(self) -> bool {
        matches!(self, Affine::Weight | Affine::Both)
    }
    fn bias(self) -> bool {
        matches!(self, Affine::Bias | Affine::Both)
    }
}

const PLAIN: Opts = Opts {
    affine: Affine::Both,
    misalign: false,
    x_mean: 0.0,
    f32_abs: F32_FORWARD_ABS,
    limits: SMALL,
    layout: Layout::Nchw,
    silu: false,
};

/// What one path of a parity case ran.
#[derive(Debug)]
struct Ran {
    path: Path,
    fwd: Trace,
    bwd: Option<Trace>,
}

fn nan<E: Element>() -> E {
    E::from_f64(f64::NAN)
}

fn nan_stats(rows: usize) -> Stats {
    Stats {
        mean: vec![f32::NAN; rows],
        rstd: vec![f32::NAN; rows],
    }
}

fn assert_guards<E: Element>(b: &HostBuffer<E>, what: &str, ctx: &str) {
    assert!(b.guards_intact(), "{ctx}: a kernel wrote outside `{what}`");
}

/// Forward and backward of one shape through the emulated kernels against the f64 reference,
/// on every path (the planner's choice, split, and fused where the row fits). Returns what ran.
fn parity<T: Element, P: Element>(dims: &[usize], groups: usize, seed: u64, o: Opts) -> Vec<Ran> {
    let case = format!(
        "{dims:?} G={groups} {}/{} {} silu={} affine={:?} misaligned={} mean={} limits={:?}",
        T::DTYPE,
        P::DTYPE,
        o.layout.name(),
        o.silu,
        o.affine,
        o.misalign,
        o.x_mean,
        o.limits
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
    let rows = dims[0] * groups;
    let mut r = rng(seed);
    let x: Vec<T> = normal_vec(&mut r, numel, o.x_mean, 1.0);
    let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<P> = normal_vec(&mut r, c, 0.0, 0.5);
    let dy: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let wh = o.affine.weight().then_some(&w[..]);
    let bh = o.affine.bias().then_some(&b[..]);
    let off = usize::from(o.misalign);
    let reference = reference::forward(&gn, &x, dims, wh, bh).unwrap();
    let grads = reference::backward_activated(&gn, &dy, &x, dims, wh, bh).unwrap();
    let w64 = o.affine.weight().then(|| to_f64(&w));
    let b64 = o.affine.bias().then(|| to_f64(&b));
    // dx errors are measured against ||rstd w dz||, dz the gradient reaching the normalization
    // (dy itself without an activation): see tests/cpu_activation.rs
    let geo = gn.geometry(dims).unwrap();
    let (dy64, x64) = (to_f64(&dy), to_f64(&x));
    let dz = pre_activation_grad_f64(
        &geo,
        gn.eps(),
        act,
        &dy64,
        &x64,
        w64.as_deref(),
        b64.as_deref(),
    );
    let scale = dx_scale(&dz, dims, groups, o.layout, w64.as_deref(), &reference.rstd);
    let xb = HostBuffer::new(&x, off);
    let dyb = HostBuffer::new(&dy, off);

    let mut ran = Vec::new();
    for path in PATHS {
        let ctx = format!("{case} path={path:?}");
        // forward, into outputs poisoned with NaN
        let mut y = HostBuffer::filled(numel, nan::<T>(), off);
        let mut stats = nan_stats(rows);
        let fwd = match emulate::forward_into(
            &gn,
            path,
            o.limits,
            xb.as_slice(),
            dims,
            wh,
            bh,
            y.as_mut_slice(),
            &mut stats,
        ) {
            Ok(t) => t,
            // the fused and cluster paths refuse rows that do not fit on chip (and the cluster
            // path devices without clusters): that is their contract
            Err(Error::PathUnavailable { .. }) if matches!(path, Path::Fused | Path::Cluster) => {
                continue
            }
            Err(e) => panic!("{ctx}: forward: {e}"),
        };
        let ctx = format!("{ctx} fwd={}", describe(&fwd));
        assert_guards(&y, "y", &ctx);
        if o.misalign {
            assert!(!fwd.vec, "{ctx}: misaligned buffers ran the vector kernels");
        }
        assert_forward_close(y.as_slice(), &reference.y, o.f32_abs, &format!("{ctx}: y"));
        assert_stats_close(&stats, &reference, o.f32_abs, &format!("{ctx}: stats"));

        // backward, from the statistics the emulated forward saved (as a training step would)
        let mut dx = HostBuffer::filled(numel, nan::<T>(), off);
        let mut dw = HostBuffer::filled(c, nan::<P>(), 0);
        let mut db = HostBuffer::filled(c, nan::<P>(), 0);
        let bwd = match emulate::backward_into(
            &gn,
            path,
            o.limits,
            dyb.as_slice(),
            xb.as_slice(),
            dims,
            &stats,
            wh,
            bh,
            dx.as_mut_slice(),
            if o.affine.weight() {
                Some(dw.as_mut_slice())
            } else {
                None
            },
            Some(db.as_mut_slice()),
        ) {
            Ok(t) => Some(t),
            // backward keeps x and dy on chip: a row can fit forward and not backward
            Err(Error::PathUnavailable { .. }) if matches!(path, Path::Fused | Path::Cluster) => {
                None
            }
            Err(e) => panic!("{ctx}: backward: {e}"),
        };
        if let Some(bwd) = &bwd {
            let ctx = format!("{ctx} bwd={}", describe(bwd));
            assert_guards(&dx, "dx", &ctx);
            assert_guards(&dw, "dweight", &ctx);
            assert_guards(&db, "dbias", &ctx);
            if o.misalign {
                assert!(!bwd.vec, "{ctx}: misaligned buffers ran the vector kernels");
            }
            assert_dx_close(dx.as_slice(), &grads.dx, scale, &format!("{ctx}: dx"));
            if o.affine.weight() {
                assert_param_grad_close(dw.as_slice(), &grads.dweight, "dweight", &ctx);
            } else {
                assert!(
                    dw.as_slice().iter().all(|v| v.to_f64().is_nan()),
                    "{ctx}: dweight written without a weight"
                );
            }
            assert_param_grad_close(db.as_slice(), &grads.dbias, "dbias", &ctx);
        }
        ran.push(Ran { path, fwd, bwd });
    }
    ran
}

/// `fused vec`, `split x3 (2 ch/chunk) scalar`, `cluster x6 (3 pieces/ch) vec`,
/// `nhwc split x4 (2 groups/tile) vec`.
fn describe(t: &Trace) -> String {
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

/// Runs `parity` for every dtype pair the API accepts; returns what each ran.
fn all_dtypes(dims: &[usize], groups: usize, seed: u64, o: Opts) -> Vec<(DType, Vec<Ran>)> {
    vec![
        (DType::F32, parity::<f32, f32>(dims, groups, seed, o)),
        (DType::F16, parity::<f16, f16>(dims, groups, seed, o)),
        (DType::F16, parity::<f16, f32>(dims, groups, seed, o)),
        (DType::BF16, parity::<bf16, bf16>(dims, groups, seed, o)),
        (DType::BF16, parity::<bf16, f32>(dims, groups, seed, o)),
    ]
}

/// The forward trace of `path` in `ran`.
fn fwd_of(ran: &[Ran], path: Path) -> &Trace {
    &ran.iter()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("{path:?} did not run"))
        .fwd
}

// ---------------------------------------------------------------------------------------------
// The emulator itself
// ---------------------------------------------------------------------------------------------

/// The launch table holds every kernel the launch sequences can ask for, and (when nvcc built
/// the fatbins) exactly the entry points nvcc compiled.
#[test]
fn emulator_runs_every_kernel_entry_point() {
    let emulated = emulate::kernel_names();
    for name in emulate::launchable_kernels() {
        assert!(
            emulated.contains(&name),
            "the launch sequence can ask for `{name}`, which the emulator lacks"
        );
    }
    let compiled = groupnorm::gpu::entry_points();
    if compiled.is_empty() {
        eprintln!("built without nvcc: no fatbin entry points to compare the emulator's with");
    } else {
        let mut compiled: Vec<String> = compiled.iter().map(|s| s.to_string()).collect();
        compiled.sort();
        assert_eq!(
            emulated, compiled,
            "emulated kernels differ from nvcc's entry points"
        );
    }
}

/// common.cuh's warp and block sums are exact on integers, under every schedule.
#[test]
fn emulator_warp_and_block_sums() {
    let (blocks, threads) = (3u32, 512u32);
    let n = (blocks * threads) as usize;
    let x: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32).collect();
    for schedule in [
        Schedule::Forward,
        Schedule::Reverse,
        Schedule::Shuffled(7),
        Schedule::RoundRobin,
    ] {
        emulate::set_schedule(schedule);
        let mut y = vec![f32::NAN; n];
        let mut sums = vec![f32::NAN; blocks as usize];
        emulate::run_selftest(
            "gn_emu_selftest_sums",
            blocks,
            threads,
            0,
            0,
            &x,
            &mut y,
            &mut sums,
        )
        .unwrap();
        for (i, &got) in y.iter().enumerate() {
            let warp = i / 32 * 32;
            let want: f32 = x[warp..warp + 32].iter().sum();
            assert_eq!(got, want, "{schedule:?}: warp sum at thread {i}");
        }
        for b in 0..blocks as usize {
            let t = threads as usize;
            let want: f32 = x[b * t..(b + 1) * t].iter().sum();
            assert_eq!(sums[b], want, "{schedule:?}: block sum of block {b}");
        }
    }
    emulate::set_schedule(Schedule::Forward);
}

/// Broken synchronization is an error, not a hang; exited threads do not hold up a barrier.
#[test]
fn emulator_reports_broken_synchronization() {
    let x = vec![0.0f32; 256];
    let mut y = vec![0.0f32; 256];
    let mut m = vec![0.0f32; 1];
    let e = emulate::run_selftest(
        "gn_emu_selftest_divergent",
        1,
        256,
        0,
        0,
        &x,
        &mut y,
        &mut m,
    )
    .unwrap_err();
    assert!(e.contains("deadlock"), "{e}");
    let e = emulate::run_selftest(
        "gn_emu_selftest_smem_overflow",
        1,
        64,
        100,
        100,
        &x,
        &mut y,
        &mut m,
    )
    .unwrap_err();
    assert!(e.contains("past the 100 bytes"), "{e}");
    // a 16-byte vector access off a 16-byte boundary faults, as on the GPU
    let aligned = HostBuffer::new(&x, 0);
    let e = emulate::run_selftest(
        "gn_emu_selftest_vector_load",
        1,
        32,
        0,
        1,
        aligned.as_slice(),
        &mut y,
        &mut m,
    )
    .unwrap_err();
    assert!(e.contains("misaligned 16-byte vector access"), "{e}");
    emulate::run_selftest(
        "gn_emu_selftest_vector_load",
        1,
        32,
        0,
        4,
        aligned.as_slice(),
        &mut y,
        &mut m,
    )
    .unwrap();
    emulate::run_selftest(
        "gn_emu_selftest_early_exit",
        1,
        256,
        0,
        100,
        &x,
        &mut y,
        &mut m,
    )
    .unwrap();
    assert!(y[..100].iter().all(|&v| v == 100.0), "{:?}", &y[..100]);
}

/// `__half2float`, `__float2half_rn`, `__bfloat162float` and `__float2bfloat16_rn` of the shim
/// agree with the `half` crate bit for bit: every 16-bit pattern, and every rounding boundary
/// (the midpoint between neighbours, and the f32 values either side of it).
#[test]
fn emulator_16_bit_conversions_are_exact() {
    for bits in 0..=u16::MAX {
        let h = f16::from_bits(bits);
        let got = emulate::f16_bits_to_f32(bits);
        if h.is_nan() {
            assert!(got.is_nan(), "f16 {bits:#06x}");
        } else {
            assert_eq!(
                got.to_bits(),
                h.to_f32().to_bits(),
                "f16 {bits:#06x} to f32"
            );
        }
        let b = bf16::from_bits(bits);
        let got = emulate::bf16_bits_to_f32(bits);
        if b.is_nan() {
            assert!(got.is_nan(), "bf16 {bits:#06x}");
        } else {
            assert_eq!(
                got.to_bits(),
                b.to_f32().to_bits(),
                "bf16 {bits:#06x} to f32"
            );
        }
    }
    let check = |v: f32| {
        let (h, b) = (f16::from_f32(v), bf16::from_f32(v));
        let (gh, gb) = (emulate::f32_to_f16_bits(v), emulate::f32_to_bf16_bits(v));
        if v.is_nan() {
            assert!(
                f16::from_bits(gh).is_nan() && bf16::from_bits(gb).is_nan(),
                "{v}"
            );
        } else {
            assert_eq!(gh, h.to_bits(), "f32 {v:e} ({:#010x}) to f16", v.to_bits());
            assert_eq!(gb, b.to_bits(), "f32 {v:e} ({:#010x}) to bf16", v.to_bits());
        }
    };
    let up = |v: f32| f32::from_bits(v.to_bits() + 1);
    let down = |v: f32| f32::from_bits(v.to_bits() - 1);
    for bits in 0..0x7c00u16 {
        // positive finite f16 and its successor; their midpoint is exact in f32
        let (a, b) = (
            f16::from_bits(bits).to_f32(),
            f16::from_bits(bits + 1).to_f32(),
        );
        let mid = (a + b) / 2.0;
        for v in [a, mid, up(mid), b] {
            check(v);
            check(-v);
        }
        if mid > 0.0 {
            check(down(mid));
            check(-down(mid));
        }
    }
    for bits in 0..0x7f80u16 {
        let a = bf16::from_bits(bits).to_f32();
        let b = bf16::from_bits(bits + 1).to_f32();
        let mid = f32::from_bits((a.to_bits() + b.to_bits()) / 2);
        for v in [a, mid, up(mid)] {
            check(v);
            check(-v);
        }
        if mid > 0.0 {
            check(down(mid));
            check(-down(mid));
        }
    }
    for v in [
        0.0,
        f32::MIN_POSITIVE,
        1e-45,
        65504.0,
        65519.99,
        65520.0,
        1e5,
        f32::MAX,
        f32::INFINITY,
        f32::NAN,
    ] {
        check(v);
        check(-v);
    }
    let mut r = rng(11);
    for v in uniform_f64(&mut r, 200_000, -1.0, 1.0) {
        let v = (v * 40.0).exp2() as f32 * if v < 0.0 { -1.0 } else { 1.0 };
        check(v);
    }
}

// ---------------------------------------------------------------------------------------------
// Parity with the f64 reference
// ---------------------------------------------------------------------------------------------

/// "To 4 decimals" in docs/design.md's worked examples.
const FOUR_DECIMALS: f64 = 5e-5;

/// docs/design.md's worked examples. (Each pair normalizes to ±1 within 2e-5 exactly; the f32 nearest
/// the pair 5, 4's 0.9999800006 is 2.0003e-5 from 1, so f32 results are held to the exact values
/// at the f32 tolerance, and to ±1 to 4 decimals, as in tests/cpu_forward.rs.)
#[test]
fn worked_examples() {
    let x = [5.0f32, 4., 7., 2., 1., 6., 2., 3., 4., 8., 1., 9.];
    let gn = GroupNorm::new(2, 4).unwrap();
    let (w, b) = ([1.0f32, 1., 2., 0.5], [0.0f32, 0., 1., -1.]);
    let plain = reference::forward(&gn, &x, &[3, 4], None::<&[f32]>, None).unwrap();
    let affine = reference::forward(&gn, &x, &[3, 4], Some(&w[..]), Some(&b[..])).unwrap();
    for path in [Path::Auto, Path::Split, Path::Fused] {
        let (y, _) =
            emulate::forward::<f32, f32>(&gn, path, &x, &[3, 4], None, None, 4, 8192).unwrap();
        assert_forward_close(
            &y,
            &plain.y,
            F32_FORWARD_ABS,
            &format!("{path:?} no affine"),
        );
        let expected = [1., -1., 1., -1., -1., 1., -1., 1., -1., 1., -1., 1.];
        for (g, e) in y.iter().zip(expected) {
            assert!(
                (*g as f64 - e).abs() < FOUR_DECIMALS,
                "{path:?} no affine: got {g}, expected {e}"
            );
        }
        let (y, _) =
            emulate::forward(&gn, path, &x, &[3, 4], Some(&w[..]), Some(&b[..]), 4, 8192).unwrap();
        assert_forward_close(&y, &affine.y, F32_FORWARD_ABS, &format!("{path:?} affine"));
        let expected = [1., -1., 3., -1.5, -1., 1., -1., -0.5, -1., 1., -1., -0.5];
        for (g, e) in y.iter().zip(expected) {
            assert!(
                (*g as f64 - e).abs() < FOUR_DECIMALS,
                "{path:?} affine: got {g}, expected {e}"
            );
        }
        let x: Vec<f32> = (1..=32).map(|v| v as f32).collect();
        let gn = GroupNorm::new(2, 2).unwrap();
        let (y, stats) =
            emulate::forward::<f32, f32>(&gn, path, &x, &[1, 2, 4, 4], None, None, 4, 8192)
                .unwrap();
        assert!(
            (y[0] - -1.62698).abs() < 1e-5,
            "{path:?}: y[0,0,0,0] = {}",
            y[0]
        );
        assert_eq!(stats.mean, vec![8.5, 24.5], "{path:?}");
    }
}

/// The shared random shapes (odd sizes, D = 1, G = 1, S = 1, 2-D, 5-D, prime spatial sizes,
/// wide groups, pieces with tails), every dtype pair, with and without affine parameters.
#[test]
fn small_and_odd_shapes() {
    for (i, case) in random_cases().iter().enumerate() {
        all_dtypes(&case.dims, case.groups, 100 + i as u64, PLAIN);
        all_dtypes(
            &case.dims,
            case.groups,
            200 + i as u64,
            Opts {
                affine: Affine::None,
                ..PLAIN
            },
        );
    }
}

/// The same shapes with buffers one element off (scalar kernels), and on a device with room
/// for longer fused rows.
#[test]
fn small_and_odd_shapes_misaligned_and_medium_device() {
    for (i, case) in random_cases().iter().enumerate() {
        let misaligned = Opts {
            misalign: true,
            ..PLAIN
        };
        all_dtypes(&case.dims, case.groups, 300 + i as u64, misaligned);
        let medium = Opts {
            limits: MEDIUM,
            ..PLAIN
        };
        all_dtypes(&case.dims, case.groups, 400 + i as u64, medium);
    }
}

/// Shapes chosen to take each split layout on the small device, with vector kernels (S a
/// multiple of 8, aligned buffers) and scalar ones (odd S); the traces prove each layout ran.
#[test]
fn split_layouts_chunks_pieces_and_tails() {
    // one channel in pieces, the last a tail: f32 pieces of 2048 (3 per channel), f16 of 4096
    for (dims, vec) in [(&[1usize, 4, 5000][..], true), (&[1, 4, 5001], false)] {
        for (t, ran) in all_dtypes(dims, 2, 10, PLAIN) {
            let split = fwd_of(&ran, Path::Split);
            assert!(split.pieces > 1 && !split.fused, "{dims:?} {t}: {split:?}");
            assert_eq!(split.vec, vec, "{dims:?} {t}: {split:?}");
            let auto = fwd_of(&ran, Path::Auto);
            assert!(!auto.fused && auto.pieces > 1, "{dims:?} {t}: {auto:?}");
        }
    }
    // several channels per chunk, the last chunk shorter (f32: 6 of 16 channels per chunk, f16:
    // 13), with S a multiple of 8 and odd
    for (dims, vec) in [(&[2usize, 32, 296][..], true), (&[2, 32, 301], false)] {
        for (t, ran) in all_dtypes(dims, 2, 11, PLAIN) {
            let split = fwd_of(&ran, Path::Split);
            assert!(
                split.pieces == 1 && split.cpb > 1 && split.chunks > 1,
                "{dims:?} {t}: {split:?}"
            );
            assert!(
                16 % split.cpb != 0,
                "{dims:?} {t}: no tail chunk: {split:?}"
            );
            assert_eq!(split.vec, vec, "{dims:?} {t}: {split:?}");
        }
    }
    // one channel per chunk (S just under the chunk size: 2048 f32 values, 4096 f16/bf16)
    let split = fwd_of(
        &parity::<f32, f32>(&[1, 8, 2000], 2, 12, PLAIN),
        Path::Split,
    )
    .clone();
    assert!(
        split.pieces == 1 && split.cpb == 1 && split.chunks == 4,
        "{split:?}"
    );
    let split = fwd_of(
        &parity::<bf16, f32>(&[1, 8, 4000], 2, 13, PLAIN),
        Path::Split,
    )
    .clone();
    assert!(
        split.pieces == 1 && split.cpb == 1 && split.chunks == 4,
        "{split:?}"
    );
}

/// Fused rows of every kind, vector and scalar, on a device whose shared memory holds them.
#[test]
fn fused_rows_vector_and_scalar() {
    let o = Opts {
        limits: MEDIUM,
        ..PLAIN
    };
    for (dims, groups, vec) in [
        (&[3usize, 16, 24, 24][..], 4, true), // rows of 2304
        (&[3, 16, 23, 23], 4, false),         // rows of 2116, odd S
        (&[16, 8, 8], 2, true),               // many short rows: Auto takes fused
    ] {
        for (t, ran) in all_dtypes(dims, groups, 20, o) {
            let fused = fwd_of(&ran, Path::Fused);
            assert!(fused.fused && fused.vec == vec, "{dims:?} {t}: {fused:?}");
            let fused_bwd = ran.iter().find(|r| r.path == Path::Fused).unwrap();
            let bwd = fused_bwd.bwd.as_ref().expect("backward fits fused too");
            assert!(bwd.fused && bwd.vec == vec, "{dims:?} {t}: {bwd:?}");
        }
    }
    let ran = parity::<f32, f32>(&[16, 8, 8], 2, 21, o);
    assert!(
        fwd_of(&ran, Path::Auto).fused,
        "many short rows should fuse"
    );
}

/// Buffers one element past a 16-byte boundary take the scalar kernels on every path.
#[test]
fn misaligned_buffers_take_the_scalar_kernels() {
    let o = Opts {
        misalign: true,
        ..PLAIN
    };
    all_dtypes(&[2, 32, 296], 2, 30, o); // split, several channels per chunk
    all_dtypes(&[1, 4, 5000], 2, 31, o); // pieces
    all_dtypes(&[4, 8, 8, 8], 4, 32, o); // fused
}

/// The planner's real thresholds (H100 limits) on a few shapes.
#[test]
fn h100_limits() {
    let o = Opts {
        limits: H100,
        ..PLAIN
    };
    // few long rows: a cluster per row (the device has clusters), else split
    let ran = parity::<f16, f32>(&[1, 32, 64, 64], 4, 40, o);
    let auto = fwd_of(&ran, Path::Auto);
    assert!(!auto.fused && auto.cluster > 1, "{}", describe(auto));
    let ran = parity::<f32, f32>(
        &[1, 32, 64, 64],
        4,
        41,
        Opts {
            limits: MEDIUM,
            ..o
        },
    );
    let auto = fwd_of(&ran, Path::Auto);
    assert!(!auto.fused && auto.cluster == 1, "{}", describe(auto));
    // many rows: fused
    let ran = parity::<bf16, bf16>(&[140, 8, 4, 4], 2, 42, o);
    assert!(fwd_of(&ran, Path::Auto).fused);
}

/// D = 1, G = 1, S = 1, 2-D input, and the empty cases: S = 0 and N = 0 run (or refuse with an
/// error) without crashing, writing the statistics of an empty row.
#[test]
fn degenerate_shapes() {
    all_dtypes(&[2, 8, 300], 8, 50, PLAIN); // D = 1
    all_dtypes(&[2, 6, 700], 1, 51, PLAIN); // G = 1, rows of 4200: split
    all_dtypes(&[3, 12], 4, 52, PLAIN); // 2-D (S = 1)
    all_dtypes(&[5, 4, 1], 2, 53, PLAIN); // trailing 1
    for path in PLAIN_PATHS {
        // N = 0: nothing to do, nothing written
        let gn = GroupNorm::new(2, 4).unwrap();
        let (y, stats) =
            emulate::forward::<f32, f32>(&gn, path, &[], &[0, 4, 3], None, None, 4, 8192)
                .unwrap_or_else(|e| panic!("N = 0 {path:?}: {e}"));
        assert!(y.is_empty() && stats.mean.is_empty(), "{path:?}");
        let w = [1.0f32; 4];
        let g = emulate::backward::<f32, f32>(
            &gn,
            path,
            &[],
            &[],
            &[0, 4, 3],
            &stats,
            Some(&w[..]),
            None,
            true,
            4,
            8192,
        )
        .unwrap_or_else(|e| panic!("N = 0 {path:?}: {e}"));
        assert!(g.dx.is_empty());
        assert_eq!(g.dweight.unwrap(), vec![0.0; 4], "N = 0 {path:?}: dweight");
        assert_eq!(g.dbias.unwrap(), vec![0.0; 4], "N = 0 {path:?}: dbias");
    }
}

/// S = 0: every row is empty; its statistics are mean 0 and rstd = 1 / sqrt(eps), and the
/// parameter gradients are 0. (Split is forced separately: see `empty_rows_forced_split`.)
#[test]
fn empty_rows() {
    let gn = GroupNorm::new(2, 4).unwrap();
    let dims = [3, 4, 0];
    for path in [Path::Auto, Path::Fused] {
        let (y, stats) = emulate::forward::<f16, f32>(&gn, path, &[], &dims, None, None, 4, 8192)
            .unwrap_or_else(|e| panic!("S = 0 {path:?}: {e}"));
        assert!(y.is_empty());
        let rstd = (1.0 / 1e-5f64.sqrt()) as f32;
        assert_eq!(stats.mean, vec![0.0; 6], "{path:?}");
        for &r in &stats.rstd {
            assert!((r / rstd - 1.0).abs() < 1e-6, "{path:?}: rstd {r}");
        }
        let w = [1.0f32; 4];
        let g = emulate::backward::<f16, f32>(
            &gn,
            path,
            &[],
            &[],
            &dims,
            &stats,
            Some(&w[..]),
            None,
            true,
            4,
            8192,
        )
        .unwrap_or_else(|e| panic!("S = 0 {path:?}: {e}"));
        assert_eq!(g.dweight.unwrap(), vec![0.0; 4], "S = 0 {path:?}: dweight");
        assert_eq!(g.dbias.unwrap(), vec![0.0; 4], "S = 0 {path:?}: dbias");
    }
}

/// S = 0 with the split path forced: the statistics of empty rows, or a typed error; never a
/// panic.
#[test]
fn empty_rows_forced_split() {
    let gn = GroupNorm::new(2, 4).unwrap();
    let dims = [3, 4, 0];
    let w = [1.0f32; 4];
    let r = std::panic::catch_unwind(|| {
        let (y, stats) =
            emulate::forward::<f32, f32>(&gn, Path::Split, &[], &dims, None, None, 4, 8192)?;
        let g = emulate::backward::<f32, f32>(
            &gn,
            Path::Split,
            &[],
            &[],
            &dims,
            &stats,
            Some(&w[..]),
            None,
            true,
            4,
            8192,
        )?;
        Ok::<_, Error>((y, stats, g))
    });
    match r {
        Ok(Ok((y, stats, g))) => {
            assert!(y.is_empty() && g.dx.is_empty());
            assert_eq!(stats.mean, vec![0.0; 6]);
            assert_eq!(g.dweight.unwrap(), vec![0.0; 4], "dweight");
            assert_eq!(g.dbias.unwrap(), vec![0.0; 4], "dbias");
        }
        Ok(Err(e)) => eprintln!("S = 0 split: refused with {e}"),
        Err(_) => panic!("S = 0 with Path::Split panics instead of returning"),
    }
}

/// A row offset by 1e3 or 1e4 keeps the unit-scale accuracy: forward within 3e-5, and the
/// backward mean correction keeps dx within 1e-5 and dweight within 1e-4 (f32), on every path.
#[test]
fn large_offset_rows_f32() {
    for (i, mean) in [1e3, 1e4].into_iter().enumerate() {
        let o = Opts {
            x_mean: mean,
            f32_abs: F32_FORWARD_OFFSET_ABS,
            ..PLAIN
        };
        let i = i as u64;
        parity::<f32, f32>(&[2, 16, 20, 20], 8, 700 + i, o); // rows of 800
        parity::<f32, f32>(&[1, 4, 5000], 2, 710 + i, o); // pieces
        parity::<f32, f32>(&[2, 32, 296], 2, 720 + i, o); // chunks of channels
        parity::<f32, f32>(
            &[2, 32, 301],
            2,
            730 + i,
            Opts {
                misalign: true,
                ..o
            },
        );
        parity::<f16, f32>(&[2, 32, 64], 4, 740 + i, o);
        parity::<f32, f32>(
            &[2, 16, 20, 20],
            8,
            750 + i,
            Opts {
                limits: MEDIUM,
                ..o
            },
        );
    }
}

/// A NaN or Inf in one group row makes that row's outputs NaN and leaves the others as they were.
#[test]
fn non_finite_values_stay_in_their_group() {
    for (dims, groups) in [(&[2usize, 16, 20, 20][..], 8), (&[1, 8, 5000], 4)] {
        for (bad, path) in [f32::NAN, f32::INFINITY]
            .into_iter()
            .flat_map(|b| [(b, Path::Auto), (b, Path::Split)])
        {
            let gn = GroupNorm::new(groups, dims[1]).unwrap();
            let (c, s) = (dims[1], dims[2..].iter().product::<usize>());
            let d = c / groups;
            let row = d * s;
            let mut x: Vec<f32> = normal_vec(&mut rng(800), dims.iter().product(), 0.0, 1.0);
            // poison row (n = 0, g = 1), somewhere in its middle
            x[row + row / 2] = bad;
            let (y, stats) =
                emulate::forward::<f32, f32>(&gn, path, &x, dims, None, None, 4, 8192).unwrap();
            let reference = reference::forward(&gn, &x, dims, None::<&[f32]>, None).unwrap();
            for (i, (&g, &r)) in y.iter().zip(&reference.y).enumerate() {
                if i / row == 1 {
                    assert!(
                        g.is_nan(),
                        "{dims:?} {bad} {path:?}: y[{i}] = {g} in the row"
                    );
                } else {
                    assert!(
                        (g as f64 - r).abs() <= F32_FORWARD_ABS,
                        "{dims:?} {bad} {path:?}: y[{i}] = {g}, expected {r}"
                    );
                }
            }
            assert!(
                stats.rstd[1].is_nan() || stats.mean[1].is_nan(),
                "{dims:?} {path:?}: row 1 stats"
            );
            for r in (0..stats.mean.len()).filter(|&r| r != 1) {
                assert!(
                    stats.mean[r].is_finite() && stats.rstd[r].is_finite(),
                    "{dims:?} {path:?}: stats of row {r}"
                );
            }
            // backward: dx of the poisoned row is NaN, the others finite
            let dy: Vec<f32> = normal_vec(&mut rng(801), x.len(), 0.0, 1.0);
            let g = emulate::backward::<f32, f32>(
                &gn, path, &dy, &x, dims, &stats, None, None, false, 4, 8192,
            )
            .unwrap();
            for (i, &v) in g.dx.iter().enumerate() {
                assert_eq!(
                    v.is_nan(),
                    i / row == 1,
                    "{dims:?} {bad} {path:?}: dx[{i}] = {v}"
                );
            }
        }
    }
}

/// The same inputs give the same bits, run after run and whatever order the blocks and the
/// threads between barriers run in (a race would show as a difference).
#[test]
fn deterministic_under_every_schedule() {
    for (dims, groups) in [
        (&[2usize, 16, 20, 20][..], 8),
        (&[1, 4, 5000], 2),
        (&[2, 32, 296], 2),
        (&[2, 32, 301], 2),
    ] {
        schedule_determinism(dims, groups, Layout::Nchw, Activation::None);
    }
}

/// The same for channels-last tiles (fused and split into pieces, a wide tile) and for the fused
/// SiLU in both layouts: their reductions must not depend on the block order either.
#[test]
fn deterministic_under_every_schedule_nhwc_and_silu() {
    for (dims, groups, layout, act) in [
        (&[2usize, 24, 3, 11][..], 6, Layout::Nhwc, Activation::None),
        (&[1, 64, 24, 24], 8, Layout::Nhwc, Activation::None),
        (&[1, 1040, 2, 3], 2, Layout::Nhwc, Activation::None),
        (&[2, 16, 20, 20], 8, Layout::Nchw, Activation::Silu),
        (&[1, 4, 5000], 2, Layout::Nchw, Activation::Silu),
    ] {
        schedule_determinism(dims, groups, layout, act);
    }
}

/// NHWC + SiLU on the split path, under every schedule. This test found a race in the NHWC SiLU
/// split backward (the delta slots zeroed and filled by different threads with no barrier
/// between: dweight and dbias moved by 1e-6 to 4e-6 between block schedules), fixed in
/// kernels/nhwc.cu.
#[test]
fn deterministic_under_every_schedule_nhwc_silu() {
    for (dims, groups) in [(&[2usize, 24, 3, 11][..], 6), (&[1, 64, 24, 24], 8)] {
        schedule_determinism(dims, groups, Layout::Nhwc, Activation::Silu);
    }
}

/// Runs forward and backward on every plain path under several block schedules and asserts
/// bit-identical outputs.
fn schedule_determinism(dims: &[usize], groups: usize, layout: Layout, act: Activation) {
    let mut failures = Vec::new();
    let c = dims[1];
    let gn = GroupNorm::new(groups, c)
        .unwrap()
        .with_layout(layout)
        .with_activation(act);
    let mut r = rng(900);
    let n: usize = dims.iter().product();
    let x: Vec<f16> = normal_vec(&mut r, n, 0.0, 1.0);
    let dy: Vec<f16> = normal_vec(&mut r, n, 0.0, 1.0);
    let w: Vec<f32> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<f32> = normal_vec(&mut r, c, 0.0, 0.5);
    let smem = if c > 512 { 48 * 1024 } else { 8192 };
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let bits16 = |v: &[f16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for path in PLAIN_PATHS {
        let mut first = None;
        for schedule in [
            Schedule::Forward,
            Schedule::Forward,
            Schedule::Reverse,
            Schedule::Shuffled(1),
            Schedule::Shuffled(2),
            Schedule::RoundRobin,
        ] {
            emulate::set_schedule(schedule);
            let Ok((y, stats)) =
                emulate::forward(&gn, path, &x, dims, Some(&w[..]), Some(&b[..]), 4, smem)
            else {
                assert_eq!(path, Path::Fused, "{dims:?}: only fused may refuse");
                break;
            };
            let Ok(g) = emulate::backward(
                &gn,
                path,
                &dy,
                &x,
                dims,
                &stats,
                Some(&w[..]),
                Some(&b[..]),
                true,
                4,
                smem,
            ) else {
                assert_eq!(path, Path::Fused, "{dims:?}: only fused may refuse");
                break;
            };
            let got = (
                bits16(&y),
                bits(&stats.mean),
                bits(&stats.rstd),
                bits16(&g.dx),
                bits(&g.dweight.unwrap()),
                bits(&g.dbias.unwrap()),
            );
            match &first {
                None => first = Some(got),
                Some(f) if f != &got => {
                    let max_diff = |a: &[u32], b: &[u32]| {
                        a.iter()
                            .zip(b)
                            .map(|(x, y)| (f32::from_bits(*x) - f32::from_bits(*y)).abs())
                            .fold(0.0f32, f32::max)
                    };
                    let differ: Vec<&str> = [
                        ("y", f.0 == got.0),
                        ("mean", f.1 == got.1),
                        ("rstd", f.2 == got.2),
                        ("dx", f.3 == got.3),
                        ("dweight", f.4 == got.4),
                        ("dbias", f.5 == got.5),
                    ]
                    .into_iter()
                    .filter_map(|(name, same)| (!same).then_some(name))
                    .collect();
                    failures.push(format!(
                        "{dims:?} {} {act:?} {path:?}: {schedule:?} differs from the first run in \
                         {differ:?} (dweight by up to {}, dbias by up to {})",
                        layout.name(),
                        max_diff(&f.4, &got.4),
                        max_diff(&f.5, &got.5),
                    ));
                    break;
                }
                Some(_) => {}
            }
        }
    }
    emulate::set_schedule(Schedule::Forward);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Channels-last and fused SiLU
// ---------------------------------------------------------------------------------------------

/// NHWC through the tile kernels, every dtype pair and path: D = 1, 2, 4 (several groups per
/// tile, a partial last tile), D = 10 and 40 (SD-like), G = 1, odd positions, misaligned.
#[test]
fn nhwc_parity() {
    let nhwc = Opts {
        layout: Layout::Nhwc,
        ..PLAIN
    };
    let cases: [(&[usize], usize); 7] = [
        (&[2, 32, 5, 7], 32),   // D = 1
        (&[1, 12, 9, 9], 6),    // D = 2, tiles of whole groups and a partial last tile
        (&[2, 24, 3, 11], 6),   // D = 4
        (&[2, 80, 6, 6], 8),    // D = 10
        (&[1, 80, 7, 5], 2),    // D = 40
        (&[2, 6, 13], 1),       // G = 1, W = C = 6: scalar only
        (&[1, 64, 2, 3, 5], 4), // 5-D
    ];
    for (i, (dims, groups)) in cases.into_iter().enumerate() {
        for (dt, ran) in all_dtypes(dims, groups, 900 + i as u64, nhwc) {
            for r in &ran {
                assert!(r.fwd.nhwc, "{dims:?} {dt}: NHWC ran the NCHW kernels");
            }
            let split = fwd_of(&ran, Path::Split);
            assert!(!split.fused, "{dims:?} {dt}: forced split fused");
        }
    }
    // misaligned buffers and a medium device
    for (dims, groups) in [(&[2usize, 40, 6, 5][..], 4), (&[1, 16, 33][..], 16)] {
        let o = Opts {
            misalign: true,
            limits: MEDIUM,
            ..nhwc
        };
        parity::<f16, f32>(dims, groups, 950, o);
        parity::<f32, f32>(dims, groups, 951, o);
    }
}

/// NHWC rows long enough to split into many pieces, and the 16-byte vector kernels (W and C
/// multiples of the vector width).
#[test]
fn nhwc_split_pieces_and_vectors() {
    let o = Opts {
        layout: Layout::Nhwc,
        ..PLAIN
    };
    for (dims, groups) in [(&[1usize, 64, 48, 48][..], 8), (&[2, 32, 40, 40][..], 32)] {
        let ran = parity::<f16, f32>(dims, groups, 960, o);
        let split = fwd_of(&ran, Path::Split);
        assert!(
            split.chunks > 1 && split.vec,
            "{dims:?}: {}",
            describe(split)
        );
        let ran = parity::<f32, f32>(dims, groups, 961, o);
        assert!(fwd_of(&ran, Path::Split).vec, "{dims:?}");
    }
}

/// GN + SiLU in both layouts, every dtype pair and path.
#[test]
fn silu_parity() {
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let o = Opts {
            layout,
            silu: true,
            ..PLAIN
        };
        for (i, (dims, groups)) in [
            (&[2usize, 8, 5, 7][..], 4),
            (&[1, 32, 9, 9][..], 32),
            (&[2, 80, 6, 6][..], 8),
            (&[1, 2, 3000][..], 1),
        ]
        .into_iter()
        .enumerate()
        {
            all_dtypes(dims, groups, 970 + i as u64, o);
        }
        // no affine parameters: z = xhat
        parity::<f32, f32>(
            &[2, 12, 7],
            3,
            979,
            Opts {
                affine: Affine::None,
                ..o
            },
        );
    }
}

/// SiLU on rows offset by 1e4: the backward must refine the saved mean before recomputing z,
/// on the fused path (one more pass on chip) and the split path (the `center` kernels).
#[test]
fn silu_large_offset_rows_f32() {
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let o = Opts {
            layout,
            silu: true,
            x_mean: 1e4,
            f32_abs: F32_FORWARD_OFFSET_ABS,
            ..PLAIN
        };
        let ran = parity::<f32, f32>(&[2, 16, 20, 20], 4, 980, o);
        let split = ran.iter().find(|r| r.path == Path::Split).unwrap();
        let names: Vec<_> = split
            .bwd
            .as_ref()
            .unwrap()
            .launches
            .iter()
            .map(|l| l.kernel.clone())
            .collect();
        assert!(
            names.iter().any(|n| n.contains("bwd_center")),
            "{}: the split SiLU backward ran no center pass: {names:?}",
            layout.name()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90+)
// ---------------------------------------------------------------------------------------------

/// The emulator runs the blocks of a cluster side by side: cluster barriers and shared-memory
/// reads across blocks work under every schedule, and a missing final barrier, blocks that
/// disagree on the barriers, a grid that is not a multiple of the cluster and a cluster barrier
/// in a plain launch are reported.
#[test]
fn emulator_clusters() {
    let (clusters, size, threads) = (3u32, 4u32, 64u32);
    let blocks = clusters * size;
    let n = (blocks * threads) as usize;
    let x = vec![0.0f32; n];
    for schedule in [
        Schedule::Forward,
        Schedule::Reverse,
        Schedule::Shuffled(3),
        Schedule::RoundRobin,
    ] {
        emulate::set_schedule(schedule);
        let mut y = vec![f32::NAN; n];
        let mut ranks = vec![f32::NAN; blocks as usize];
        emulate::run_selftest_in_clusters(
            "gn_emu_selftest_cluster",
            blocks,
            threads,
            16,
            size,
            0,
            &x,
            &mut y,
            &mut ranks,
        )
        .unwrap();
        for b in 0..blocks {
            let first = b / size * size;
            let want: u32 = (first..first + size).map(|i| i + 1).sum();
            let got = &y[(b * threads) as usize..((b + 1) * threads) as usize];
            assert!(
                got.iter().all(|&v| v == want as f32),
                "{schedule:?}: block {b} read {got:?}, want {want}"
            );
            assert_eq!(ranks[b as usize], (b % size) as f32, "{schedule:?}: rank");
        }
    }
    emulate::set_schedule(Schedule::Forward);
    let mut y = vec![0.0f32; n];
    let mut m = vec![0.0f32; blocks as usize];
    let mut run = |cluster: u32, grid: u32, mistake: u32| {
        emulate::run_selftest_in_clusters(
            "gn_emu_selftest_cluster",
            grid,
            threads,
            16,
            cluster,
            mistake,
            &x,
            &mut y,
            &mut m,
        )
    };
    let e = run(size, blocks, 1).unwrap_err();
    assert!(e.contains("a final cluster_sync is missing"), "{e}");
    let e = run(size, blocks, 2).unwrap_err();
    assert!(
        e.contains("every block must reach every cluster_sync"),
        "{e}"
    );
    let e = run(size, 6, 0).unwrap_err();
    assert!(e.contains("multiple of the cluster size"), "{e}");
    let e = run(1, blocks, 0).unwrap_err();
    assert!(e.contains("without clusters"), "{e}");
}

/// The cluster path, every dtype pair: chunks of whole channels with a shorter last chunk,
/// pieces of channels with a tail, vector and scalar kernels, no affine parameters, misaligned
/// buffers, SiLU, a few long rows where the planner itself picks clusters, and rows offset by
/// 1e4. The traces prove the cluster kernels ran.
#[test]
fn cluster_parity() {
    let o = Opts {
        limits: SMALL_CLUSTERS,
        ..PLAIN
    };
    // forward and backward both fit a cluster in every dtype here
    for (i, (dims, groups)) in [
        (&[2usize, 8, 300][..], 2), // D = 4: 2 chunks of 2 channels (f32 S % 4 == 0: vector)
        (&[2, 32, 301][..], 2),     // D = 16, odd S: 3 chunks forward (the last shorter)
        (&[1, 6, 331][..], 1),      // G = 1, prime S
    ]
    .into_iter()
    .enumerate()
    {
        for opts in [
            o,
            Opts {
                affine: Affine::None,
                ..o
            },
            Opts {
                misalign: true,
                ..o
            },
            Opts { silu: true, ..o },
        ] {
            for (t, ran) in all_dtypes(dims, groups, 1100 + i as u64, opts) {
                let cl = ran.iter().find(|r| r.path == Path::Cluster);
                let cl = cl.unwrap_or_else(|| panic!("{dims:?} {t}: the cluster path refused"));
                let bwd = cl.bwd.as_ref().expect("backward fits a cluster too");
                for (pass, tr) in [("forward", &cl.fwd), ("backward", bwd)] {
                    assert!(
                        tr.cluster > 1 && tr.cluster == tr.chunks && !tr.fused,
                        "{dims:?} {t} {pass}: {}",
                        describe(tr)
                    );
                    let row_kernels: Vec<_> = tr
                        .launches
                        .iter()
                        .filter(|l| !l.kernel.contains("bwd_params"))
                        .collect();
                    assert!(
                        row_kernels.len() == 1 && row_kernels[0].kernel.contains("_cluster_"),
                        "{dims:?} {t} {pass}: one cluster launch, got {:?}",
                        tr.launches
                    );
                    assert!(tr
                        .launches
                        .iter()
                        .all(|l| l.cluster == 1
                            || (l.cluster == tr.chunks && l.blocks % l.cluster == 0)));
                }
                if opts.misalign {
                    assert!(
                        !cl.fwd.vec && !bwd.vec,
                        "{dims:?} {t}: misaligned ran vectors"
                    );
                }
            }
        }
    }
    // pieces of one channel with a tail, where the planner picks clusters on its own: 2 rows
    // of 10000 values on 4 SMs (f32 backward does not fit 8 blocks: it refuses and Auto splits)
    for (t, ran) in all_dtypes(&[1, 4, 5000], 2, 1110, o) {
        let auto = fwd_of(&ran, Path::Auto);
        assert!(
            auto.cluster > 1 && auto.pieces > 1,
            "{t}: Auto took {}",
            describe(auto)
        );
        let cl = ran.iter().find(|r| r.path == Path::Cluster).unwrap();
        if t != DType::F32 {
            let bwd = cl.bwd.as_ref().expect("16-bit backward fits a cluster");
            assert!(bwd.cluster > 1 && bwd.pieces > 1, "{t}: {}", describe(bwd));
        }
    }
    // offset rows: the pivot (forward) and the mean residual (backward, with SiLU too)
    for silu in [false, true] {
        let offset = Opts {
            x_mean: 1e4,
            f32_abs: F32_FORWARD_OFFSET_ABS,
            silu,
            ..o
        };
        let ran = parity::<f32, f32>(&[2, 8, 300], 2, 1120, offset);
        assert!(ran.iter().any(|r| r.fwd.cluster > 1));
    }
}

/// Shapes the cluster path cannot take refuse with a typed error when it is forced, and the
/// planner then takes another path: a device without clusters, rows too long for the largest
/// cluster, channels-last tensors.
#[test]
fn cluster_path_refusals() {
    let gn = GroupNorm::new(2, 4).unwrap();
    let x = vec![0.5f32; 4 * 5000];
    let mut y = vec![0.0f32; x.len()];
    let mut stats = nan_stats(2);
    let mut fwd = |gn: &GroupNorm, limits: DeviceLimits, dims: &[usize]| {
        emulate::forward_into::<f32, f32>(
            gn,
            Path::Cluster,
            limits,
            &x,
            dims,
            None,
            None,
            &mut y,
            &mut stats,
        )
    };
    for (limits, dims, why) in [
        (SMALL, &[1usize, 4, 5000][..], "compute capability 9.0"),
        (
            DeviceLimits::new(SMALL.sms, SMALL.smem_per_block, 2),
            &[1, 4, 5000],
            "do not fit",
        ),
    ] {
        match fwd(&gn, limits, dims) {
            Err(Error::PathUnavailable { why: what, .. }) => assert!(what.contains(why), "{what}"),
            other => panic!("{dims:?} on {limits:?}: {other:?}"),
        }
    }
    let nhwc = GroupNorm::new(2, 4).unwrap().with_layout(Layout::Nhwc);
    match fwd(&nhwc, SMALL_CLUSTERS, &[1, 4, 50, 100]) {
        Err(Error::PathUnavailable { why: what, .. }) => assert!(what.contains("NHWC"), "{what}"),
        other => panic!("NHWC forced onto clusters: {other:?}"),
    }
    // Auto on a channels-last tensor takes the NHWC kernels, never clusters
    let ran = parity::<f16, f32>(
        &[1, 8, 40, 40],
        2,
        1130,
        Opts {
            layout: Layout::Nhwc,
            ..Opts {
                limits: SMALL_CLUSTERS,
                ..PLAIN
            }
        },
    );
    let auto = fwd_of(&ran, Path::Auto);
    assert!(auto.nhwc && auto.cluster == 1, "{}", describe(auto));
}

/// The cluster kernels give the same bits whatever order the clusters, the blocks' threads and
/// the OS threads running the blocks of a cluster go in.
#[test]
fn cluster_deterministic_under_every_schedule() {
    for (dims, groups, silu) in [(&[2usize, 32, 301][..], 2, false), (&[1, 4, 5000], 2, true)] {
        let c = dims[1];
        let act = if silu {
            Activation::Silu
        } else {
            Activation::None
        };
        let gn = GroupNorm::new(groups, c).unwrap().with_activation(act);
        let mut r = rng(1140);
        let n: usize = dims.iter().product();
        let rows = dims[0] * groups;
        let x: Vec<f16> = normal_vec(&mut r, n, 0.0, 1.0);
        let dy: Vec<f16> = normal_vec(&mut r, n, 0.0, 1.0);
        let w: Vec<f32> = uniform_vec(&mut r, c, 0.5, 1.5);
        let b: Vec<f32> = normal_vec(&mut r, c, 0.0, 0.5);
        let mut first = None;
        for schedule in [
            Schedule::Forward,
            Schedule::Forward,
            Schedule::Reverse,
            Schedule::Shuffled(1),
            Schedule::Shuffled(2),
            Schedule::RoundRobin,
        ] {
            emulate::set_schedule(schedule);
            let mut y = vec![f16::ZERO; n];
            let mut stats = nan_stats(rows);
            let fwd = emulate::forward_into(
                &gn,
                Path::Cluster,
                SMALL_CLUSTERS,
                &x,
                dims,
                Some(&w[..]),
                Some(&b[..]),
                &mut y,
                &mut stats,
            )
            .unwrap();
            let mut dx = vec![f16::ZERO; n];
            let mut dw = vec![f32::NAN; c];
            let mut db = vec![f32::NAN; c];
            let bwd = emulate::backward_into(
                &gn,
                Path::Cluster,
                SMALL_CLUSTERS,
                &dy,
                &x,
                dims,
                &stats,
                Some(&w[..]),
                Some(&b[..]),
                &mut dx,
                Some(&mut dw[..]),
                Some(&mut db[..]),
            )
            .unwrap();
            assert!(
                fwd.cluster > 1 && bwd.cluster > 1,
                "{dims:?}: no clusters ran"
            );
            let bits = (
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                stats.mean.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                stats.rstd.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                dw.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                db.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            );
            match &first {
                None => first = Some(bits),
                Some(f) => assert!(
                    f == &bits,
                    "{dims:?}: {schedule:?} differs from the first run"
                ),
            }
        }
    }
    emulate::set_schedule(Schedule::Forward);
}

// ---------------------------------------------------------------------------------------------
// Coverage the planted-bug sweep of issue 15 found missing
// ---------------------------------------------------------------------------------------------

/// Weight without bias and bias without weight (the README's GPU example passes a weight only)
/// on every path and layout, with and without SiLU: a kernel that tests one pointer for the
/// other's presence fails here.
#[test]
fn weight_without_bias_and_bias_without_weight_on_every_path() {
    let nchw = PLAIN;
    let nhwc = Opts {
        layout: Layout::Nhwc,
        ..PLAIN
    };
    let clusters = Opts {
        limits: SMALL_CLUSTERS,
        ..PLAIN
    };
    let cases: [(&[usize], usize, Opts); 9] = [
        (&[2, 12, 7], 3, nchw),       // fused
        (&[1, 8, 600], 2, nchw),      // split into chunks
        (&[1, 4, 5000], 2, nchw),     // split into pieces of a channel
        (&[1, 4, 3000], 2, clusters), // cluster
        (&[2, 24, 3, 11], 6, nhwc),   // NHWC, several groups per tile
        (&[1, 32, 24, 24], 8, nhwc),  // NHWC split into pieces
        (&[2, 12, 7], 3, Opts { silu: true, ..nchw }),
        (&[1, 4, 5000], 2, Opts { silu: true, ..nchw }),
        (&[1, 32, 24, 24], 8, Opts { silu: true, ..nhwc }),
    ];
    for (i, (dims, groups, o)) in cases.into_iter().enumerate() {
        for affine in [Affine::Weight, Affine::Bias] {
            let o = Opts { affine, ..o };
            let seed = 1500 + i as u64;
            let ran = parity::<f32, f32>(dims, groups, seed, o);
            parity::<f16, f32>(dims, groups, seed, o);
            parity::<bf16, bf16>(dims, groups, seed, o);
            if o.limits.max_cluster > 0 {
                assert!(
                    ran.iter().any(|r| r.fwd.cluster > 1),
                    "{dims:?}: no cluster ran"
                );
            }
        }
    }
}

/// NHWC tiles wider than the 512-thread block: `column_sums` in nhwc.cu then takes its wide
/// branch (a thread per column, several columns per thread past 1,024), forward and backward,
/// fused (H100 limits) and split, every affine combination.
#[test]
fn nhwc_tiles_wider_than_the_block() {
    let wide = Opts {
        layout: Layout::Nhwc,
        limits: MEDIUM,
        ..PLAIN
    };
    let cases: [(&[usize], usize); 3] = [
        (&[2, 1040, 2, 3], 2), // W = 520
        (&[1, 1100, 3, 2], 1), // W = 1,100: more than two columns per thread
        (&[1, 1024, 4, 4], 1), // W = 1,024 exactly
    ];
    for (i, (dims, groups)) in cases.into_iter().enumerate() {
        let d = dims[1] / groups;
        for affine in Affine::ALL {
            for limits in [MEDIUM, H100] {
                let o = Opts {
                    affine,
                    limits,
                    ..wide
                };
                for ran in [
                    parity::<f32, f32>(dims, groups, 1600 + i as u64, o),
                    parity::<f16, f32>(dims, groups, 1600 + i as u64, o),
                ] {
                    for r in &ran {
                        assert!(r.fwd.nhwc, "{dims:?}: NHWC ran the NCHW kernels");
                        assert!(
                            r.fwd.cpb as usize * d > 512,
                            "{dims:?}: a tile of {} channels",
                            r.fwd.cpb as usize * d
                        );
                    }
                }
            }
        }
        let o = Opts { silu: true, ..wide };
        parity::<bf16, bf16>(dims, groups, 1650 + i as u64, o);
    }
}
