//! The emulator's own checks: the real CUDA kernels (kernels/*.cu) run on the CPU by the host
//! emulator (`--features emulate`: kernels/host_emu.h, tests/emu/, src/gpu/emulate.rs), where
//! what only the emulator can show is checked: its own primitives (barriers, warp sums,
//! clusters, 16-bit conversions), the path each shape takes on small device limits (from the
//! trace of launches), forced paths and their refusals, bit-identical results under every block
//! schedule. (In-place forward passes wait for an emulator entry point: tests/common/in_place.rs.)
//!
//! The checks every backend shares (parity with the f64 reference on every path, layout,
//! activation and affine combination) are written once in tests/common/parity.rs and run on the
//! CPU, the emulator and the GPU by tests/kernels.rs; this file calls the same body on the
//! emulator with the device limits each check needs. Outputs and the workspace start as NaN,
//! and every buffer sits between guard zones, so a value a kernel forgets to write or a write
//! out of bounds fails the test.
//!
//! Run: `cargo test --release --features emulate --test gpu_emulated`.
#![cfg(feature = "emulate")]

#[path = "common/backend.rs"]
mod backend;
mod common;
mod gpu_support;
#[path = "common/in_place.rs"]
mod in_place;
#[path = "common/parity.rs"]
mod parity;

use backend::{Backend, Trace};
use common::*;
use groupnorm::gpu::emulate::{self, HostBuffer, Schedule};
use groupnorm::gpu::{DeviceLimits, Path};
use groupnorm::{bf16, f16, Activation, DType, Element, Error, GroupNorm, Layout, Stats};
use parity::{describe, fwd_of, Opts, Params, Ran, PLAIN_PATHS};

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

/// How one emulated parity case is built: the shared options and the device the planner plans
/// for.
#[derive(Clone, Copy)]
struct EOpts {
    o: Opts,
    limits: DeviceLimits,
}

const PLAIN: EOpts = EOpts {
    o: parity::PLAIN,
    limits: SMALL,
};

/// The shared parity check (tests/common/parity.rs) on the emulator with `e.limits`.
fn parity<T: Element, P: Element>(dims: &[usize], groups: usize, seed: u64, e: EOpts) -> Vec<Ran> {
    parity::parity::<T, P>(&Backend::Emulated(e.limits), dims, groups, seed, e.o)
}

/// The same for every dtype pair.
fn all_dtypes(dims: &[usize], groups: usize, seed: u64, e: EOpts) -> Vec<(DType, Vec<Ran>)> {
    parity::all_dtypes(&Backend::Emulated(e.limits), dims, groups, seed, e.o)
}

/// The forward trace of a run.
fn f(r: &Ran) -> &Trace {
    r.fwd.as_ref().expect("an emulated run has a trace")
}

fn nan_stats(rows: usize) -> Stats {
    Stats {
        mean: vec![f32::NAN; rows],
        rstd: vec![f32::NAN; rows],
    }
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
            // two samples: the parity above checked dweight and dbias from the dx kernel
            assert_split_backward_has_no_params_launch(&ran, &format!("{dims:?} {t}"));
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

/// The split path's backward ends with its `dx` kernel, which writes dweight and dbias itself
/// (split_param_grads in kernels/common.cuh): no `bwd_params` launch after it, for any N.
fn assert_split_backward_has_no_params_launch(ran: &[Ran], what: &str) {
    let bwd = ran
        .iter()
        .find(|r| r.path == Path::Split)
        .and_then(|r| r.bwd.as_ref())
        .unwrap_or_else(|| panic!("{what}: no split backward trace"));
    let last = bwd.launches.last().map(|l| l.kernel.as_str()).unwrap_or("");
    assert!(
        last.contains("bwd_dx") && !bwd.launches.iter().any(|l| l.kernel.contains("bwd_params")),
        "{what}: {:?}",
        bwd.launches
    );
}

/// Fused rows of every kind, vector and scalar, on a device whose shared memory holds them.
#[test]
fn fused_rows_vector_and_scalar() {
    let o = EOpts {
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
    let o = EOpts {
        o: Opts {
            misalign: true,
            ..PLAIN.o
        },
        ..PLAIN
    };
    all_dtypes(&[2, 32, 296], 2, 30, o); // split, several channels per chunk
    all_dtypes(&[1, 4, 5000], 2, 31, o); // pieces
    all_dtypes(&[4, 8, 8, 8], 4, 32, o); // fused
}

/// The planner's real thresholds (H100 limits) on a few shapes.
#[test]
fn h100_limits() {
    let o = EOpts {
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
        EOpts {
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

/// The backward's tickets (`BackwardPtrs::with_tickets`): with N > 1 samples the fused and
/// cluster kernels (NCHW and NHWC, with and without SiLU, channels in pieces or whole) reduce
/// dweight and dbias in the last block of each channel's N instead of a `bwd_params` launch.
/// The bits must be those of `bwd_params` (same order of sums), whichever block comes last
/// (every schedule), and the words must be zero again after each call (the emulator checks
/// that on every call).
#[test]
fn tickets_give_the_bits_of_the_params_launch() {
    let (nchw, nhwc, clusters) = (Layout::Nchw, Layout::Nhwc, SMALL_CLUSTERS);
    let mut pieces_seen = false;
    for (dims, groups, layout, path, limits) in [
        (&[3usize, 16, 10, 10][..], 4, nchw, Path::Fused, MEDIUM),
        (&[2, 8, 300][..], 2, nchw, Path::Cluster, clusters),
        (&[3, 4, 1500][..], 2, nchw, Path::Cluster, clusters),
        (&[3, 24, 3, 11][..], 6, nhwc, Path::Fused, MEDIUM),
        (&[2, 8, 7, 9][..], 2, nhwc, Path::Cluster, clusters),
        (&[3, 8, 11, 9][..], 2, nhwc, Path::Cluster, clusters),
    ] {
        for act in [Activation::None, Activation::Silu] {
            let both = (true, true);
            let pieces = tickets_case::<f32, f32>(dims, groups, layout, act, path, limits, both);
            pieces_seen |= pieces && layout == nchw;
            tickets_case::<f16, f32>(dims, groups, layout, act, path, limits, both);
            tickets_case::<bf16, bf16>(dims, groups, layout, act, path, limits, both);
        }
    }
    assert!(pieces_seen, "no NCHW case cut its channels into pieces");
    // more samples, and one parameter gradient without the other
    for (dims, layout, path, limits) in [
        (&[9usize, 8, 6, 6][..], nchw, Path::Fused, MEDIUM),
        (&[9, 8, 3, 5][..], nhwc, Path::Fused, MEDIUM),
        (&[5, 8, 300][..], nchw, Path::Cluster, clusters),
        (&[5, 8, 7, 9][..], nhwc, Path::Cluster, clusters),
    ] {
        for grads in [(true, false), (false, true)] {
            tickets_case::<f32, f32>(dims, 2, layout, Activation::None, path, limits, grads);
        }
    }
}

/// One case of [`tickets_give_the_bits_of_the_params_launch`], asking for (dweight, dbias) as
/// `grads` says: whether the plan cut channels into pieces (on NCHW only the blocks of piece 0
/// take a ticket then).
fn tickets_case<T: Element, P: Element>(
    dims: &[usize],
    groups: usize,
    layout: Layout,
    act: Activation,
    path: Path,
    limits: DeviceLimits,
    grads: (bool, bool),
) -> bool {
    let c = dims[1];
    let gn = GroupNorm::new(groups, c)
        .unwrap()
        .with_layout(layout)
        .with_activation(act);
    let mut r = rng(950 + dims.iter().sum::<usize>() as u64);
    let numel: usize = dims.iter().product();
    let x: Vec<T> = normal_vec(&mut r, numel, 0.5, 1.0);
    let dy: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<P> = normal_vec(&mut r, c, 0.0, 0.5);
    let (_, stats) = emulate::forward(
        &gn,
        Path::Auto,
        &x,
        dims,
        Some(&w[..]),
        Some(&b[..]),
        4,
        48 * 1024,
    )
    .expect("forward");
    let what = format!(
        "{dims:?} {} {act:?} {path:?} {}/{} (dweight, dbias) {grads:?}",
        layout.name(),
        T::DTYPE,
        P::DTYPE
    );
    let run = |tickets: bool, schedule: Schedule| {
        emulate::set_tickets(tickets);
        emulate::set_schedule(schedule);
        let mut dx = vec![T::from_f32(f32::NAN); numel];
        let mut dweight = vec![P::from_f32(f32::NAN); c];
        let mut dbias = vec![P::from_f32(f32::NAN); c];
        let trace = emulate::backward_into(
            &gn,
            path,
            limits,
            &dy,
            &x,
            dims,
            &stats,
            Some(&w[..]),
            Some(&b[..]),
            &mut dx,
            grads.0.then_some(&mut dweight[..]),
            grads.1.then_some(&mut dbias[..]),
        );
        emulate::set_tickets(true);
        emulate::set_schedule(Schedule::Forward);
        let trace = trace.unwrap_or_else(|e| panic!("{what}: {e}"));
        let bits = |v: &[T]| v.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
        let pbits = |v: &[P]| v.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
        (trace, (bits(&dx), pbits(&dweight), pbits(&dbias)))
    };
    let (plain, want) = run(false, Schedule::Forward);
    let params = |t: &emulate::Trace| {
        t.launches
            .iter()
            .filter(|l| l.kernel.contains("bwd_params"))
            .count()
    };
    assert_eq!(
        params(&plain),
        1,
        "{what}: without tickets: {:?}",
        plain.launches
    );
    let written =
        |v: &[u32], asked: bool| v.iter().all(|&v| f32::from_bits(v).is_finite() == asked);
    assert!(
        written(&want.1, grads.0) && written(&want.2, grads.1),
        "{what}: the parameter gradients asked for, and only they, are written"
    );
    for schedule in [
        Schedule::Forward,
        Schedule::Reverse,
        Schedule::Shuffled(5),
        Schedule::RoundRobin,
    ] {
        let (trace, got) = run(true, schedule);
        assert_eq!(
            (
                trace.fused,
                trace.cluster > 1,
                trace.launches.len(),
                params(&trace)
            ),
            (path == Path::Fused, path == Path::Cluster, 1, 0),
            "{what} {schedule:?}: one launch with tickets: {:?}",
            trace.launches
        );
        assert!(
            got.0 == want.0,
            "{what} {schedule:?}: dx differs with tickets"
        );
        assert!(
            got.1 == want.1,
            "{what} {schedule:?}: dweight differs with tickets"
        );
        assert!(
            got.2 == want.2,
            "{what} {schedule:?}: dbias differs with tickets"
        );
    }
    plain.pieces > 1
}

// ---------------------------------------------------------------------------------------------
// Channels-last
// ---------------------------------------------------------------------------------------------

/// NHWC rows long enough to split into many pieces, and the 16-byte vector kernels (W and C
/// multiples of the vector width).
#[test]
fn nhwc_split_pieces_and_vectors() {
    let o = EOpts {
        o: Opts {
            layout: Layout::Nhwc,
            ..PLAIN.o
        },
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
        assert_split_backward_has_no_params_launch(&ran, &format!("{dims:?} f16"));
        let ran = parity::<f32, f32>(dims, groups, 961, o);
        assert!(fwd_of(&ran, Path::Split).vec, "{dims:?}");
        assert_split_backward_has_no_params_launch(&ran, &format!("{dims:?} f32"));
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

/// `o` and its variants a path's parity test runs: no affine parameters, misaligned buffers
/// (the scalar kernels), SiLU.
fn path_variants(o: Opts) -> [Opts; 4] {
    [
        o,
        Opts {
            affine: Params::None,
            ..o
        },
        Opts {
            misalign: true,
            ..o
        },
        Opts { silu: true, ..o },
    ]
}

/// The cluster path, every dtype pair: chunks of whole channels with a shorter last chunk,
/// pieces of channels with a tail, vector and scalar kernels, no affine parameters, misaligned
/// buffers, SiLU, a few long rows where the planner itself picks clusters, and rows offset by
/// 1e4. The traces prove the cluster kernels ran.
#[test]
fn cluster_parity() {
    let o = EOpts {
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
        for opts in path_variants(o.o) {
            let opts = EOpts { o: opts, ..o };
            for (t, ran) in all_dtypes(dims, groups, 1100 + i as u64, opts) {
                let cl = ran.iter().find(|r| r.path == Path::Cluster);
                let cl = cl.unwrap_or_else(|| panic!("{dims:?} {t}: the cluster path refused"));
                let bwd = cl.bwd.as_ref().expect("backward fits a cluster too");
                for (pass, tr) in [("forward", f(cl)), ("backward", bwd)] {
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
                    // one sample: the cluster kernel writes dweight and dbias itself (the
                    // parity above checks them), no serial tail
                    if dims[0] == 1 {
                        assert_eq!(
                            tr.launches.len(),
                            1,
                            "{dims:?} {t} {pass}: {:?}",
                            tr.launches
                        );
                    }
                    assert!(tr
                        .launches
                        .iter()
                        .all(|l| l.cluster == 1
                            || (l.cluster == tr.chunks && l.blocks % l.cluster == 0)));
                }
                if opts.o.misalign {
                    assert!(
                        !f(cl).vec && !bwd.vec,
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
            // one sample: the blocks holding piece 0 write dweight and dbias over all pieces
            assert_eq!(bwd.launches.len(), 1, "{t}: {:?}", bwd.launches);
        }
    }
    // offset rows: the pivot (forward) and the mean residual (backward, with SiLU too)
    for silu in [false, true] {
        let offset = EOpts {
            o: Opts {
                x_mean: 1e4,
                f32_abs: F32_FORWARD_OFFSET_ABS,
                silu,
                ..o.o
            },
            ..o
        };
        let ran = parity::<f32, f32>(&[2, 8, 300], 2, 1120, offset);
        assert!(ran.iter().any(|r| f(r).cluster > 1));
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
    // channels-last: rows of 5000 positions need 14 blocks of 8 KiB, over the 8 of a cluster
    // here (shorter rows run: nhwc_cluster_parity)
    let nhwc = GroupNorm::new(2, 4).unwrap().with_layout(Layout::Nhwc);
    match fwd(&nhwc, SMALL_CLUSTERS, &[1, 4, 50, 100]) {
        Err(Error::PathUnavailable { why: what, .. }) => {
            assert!(
                what.contains("NHWC") && what.contains("do not fit"),
                "{what}"
            )
        }
        other => panic!("NHWC rows too long for a cluster: {other:?}"),
    }
}

/// The NHWC cluster kernels (pieces of positions on chip, statistics and sums merged through
/// distributed shared memory), forward and backward, every dtype pair: pieces with a shorter
/// last one, tiles of several groups, vector and scalar kernels, no affine parameters,
/// misaligned buffers, SiLU, rows offset by 1e4, and the planner taking them on its own. The
/// traces prove one cluster launch ran (and no bwd_params: with tickets for N > 1).
#[test]
fn nhwc_cluster_parity() {
    // 32 KiB per block: the backward's two tiles and three column-partial arrays fit clusters
    // of at most 8 blocks in every dtype (8 KiB blocks hold the forward only)
    let o = EOpts {
        limits: DeviceLimits::new(SMALL.sms, 32 * 1024, 8),
        o: Opts {
            layout: Layout::Nhwc,
            ..PLAIN.o
        },
    };
    let check = |tr: &Trace, kernel: &str, what: &str| {
        assert!(
            tr.nhwc && tr.cluster > 1 && tr.cluster == tr.chunks && tr.chunks == tr.pieces,
            "{what}: {}",
            describe(tr)
        );
        assert!(
            tr.launches[0].kernel.contains(kernel),
            "{what}: {:?}",
            tr.launches
        );
        let params = tr
            .launches
            .iter()
            .filter(|l| l.kernel.contains("bwd_params"));
        assert_eq!(
            tr.launches.len(),
            1 + params.count(),
            "{what}: {:?}",
            tr.launches
        );
    };
    let nhwc_cluster = |ran: &[Ran], n: usize, what: &str| {
        let cl = ran.iter().find(|r| r.path == Path::Cluster);
        let cl = cl.unwrap_or_else(|| panic!("{what}: the cluster path refused"));
        let tr = f(cl);
        check(tr, "nhwc_fwd_cluster", what);
        assert_eq!(tr.workspace_floats, 0, "{what}: {}", describe(tr));
        let bwd = cl
            .bwd
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: backward refused"));
        check(bwd, "nhwc_bwd_cluster", what);
        // the blocks of piece 0 write dweight and dbias: at once with one sample, through the
        // tickets (the emulator's default, as GpuGroupNorm's) with more; no serial tail
        assert_eq!(
            bwd.launches.len(),
            1,
            "{what} (N = {n}): {:?}",
            bwd.launches
        );
        tr.vec && bwd.vec
    };
    // (N, C, H, W), G: 2 groups of 4 channels, 1001 positions (a short last piece); 4 groups of
    // 2 channels (tiles of several groups), 7 x 9 positions
    for (i, (dims, groups)) in [(&[1usize, 8, 7, 143][..], 2), (&[2, 8, 7, 9][..], 4)]
        .into_iter()
        .enumerate()
    {
        for opts in path_variants(o.o) {
            let e = EOpts { o: opts, ..o };
            for (t, ran) in all_dtypes(dims, groups, 1150 + i as u64, e) {
                let vec = nhwc_cluster(&ran, dims[0], &format!("{dims:?} {t} {opts:?}"));
                assert!(
                    !(opts.misalign && vec),
                    "{dims:?} {t}: misaligned ran vectors"
                );
            }
        }
    }
    // rows offset by 1e4: the pivot (forward) and the mean residual (backward, SiLU too)
    for silu in [false, true] {
        let offset = EOpts {
            o: Opts {
                x_mean: 1e4,
                f32_abs: F32_FORWARD_OFFSET_ABS,
                silu,
                ..o.o
            },
            ..o
        };
        let ran = parity::<f32, f32>(&[1, 8, 7, 143], 2, 1160, offset);
        nhwc_cluster(&ran, 1, &format!("offset 1e4, silu {silu}"));
    }
    // Auto takes clusters on its own for the backward where a tile of whole rows does not fit
    // one block, and the split path for the forward (measured faster on an H200: plan.rs)
    let ran = parity::<f16, f32>(&[1, 8, 7, 143], 2, 1130, o);
    let auto = ran.iter().find(|r| r.path == Path::Auto).unwrap();
    assert!(
        f(auto).nhwc && f(auto).cluster == 1,
        "{}",
        describe(f(auto))
    );
    let bwd = auto.bwd.as_ref().unwrap();
    assert!(bwd.nhwc && bwd.cluster > 1, "{}", describe(bwd));
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

/// NHWC tiles wider than the 512-thread block: `column_sums` in nhwc.cu then takes its wide
/// branch (a thread per column, several columns per thread past 1,024), forward and backward,
/// fused (H100 limits) and split, every affine combination.
#[test]
fn nhwc_tiles_wider_than_the_block() {
    let wide = EOpts {
        o: Opts {
            layout: Layout::Nhwc,
            ..PLAIN.o
        },
        limits: MEDIUM,
    };
    let cases: [(&[usize], usize); 3] = [
        (&[2, 1040, 2, 3], 2), // W = 520
        (&[1, 1100, 3, 2], 1), // W = 1,100: more than two columns per thread
        (&[1, 1024, 4, 4], 1), // W = 1,024 exactly
    ];
    for (i, (dims, groups)) in cases.into_iter().enumerate() {
        let d = dims[1] / groups;
        for affine in Params::ALL {
            for limits in [MEDIUM, H100] {
                let o = EOpts {
                    o: Opts { affine, ..wide.o },
                    limits,
                };
                for ran in [
                    parity::<f32, f32>(dims, groups, 1600 + i as u64, o),
                    parity::<f16, f32>(dims, groups, 1600 + i as u64, o),
                ] {
                    for r in &ran {
                        assert!(f(r).nhwc, "{dims:?}: NHWC ran the NCHW kernels");
                        assert!(
                            f(r).cpb as usize * d > 512,
                            "{dims:?}: a tile of {} channels",
                            f(r).cpb as usize * d
                        );
                    }
                }
            }
        }
        let o = EOpts {
            o: Opts {
                silu: true,
                ..wide.o
            },
            ..wide
        };
        parity::<bf16, bf16>(dims, groups, 1650 + i as u64, o);
    }
}
