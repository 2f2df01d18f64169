//! The kernels' checks, each written once and run on every backend this build and machine
//! has (tests/common/backend.rs): the CPU fast path, the real CUDA kernels in the host emulator
//! (`--features emulate`, on small device limits so that small shapes take every path) and the
//! GPU when one is usable (else skipped with a printed reason; a failure under
//! `GROUPNORM_REQUIRE_GPU=1`). The body of each check is tests/common/parity.rs: forward and
//! backward against the f64 reference on every path, into NaN-poisoned outputs (between guard
//! zones on the emulator), with docs/design.md's tolerances.
//!
//! Shapes too large for the emulator (it runs the kernels thread by thread on 2 cores) run on
//! the GPU only, in the tests named `gpu_sized_*`. The emulator's own checks (schedules,
//! small-device limits, forced paths with traces) are in tests/gpu_emulated.rs; the GPU's own
//! (streams, memory, the raw layer, clusters on the hardware) in tests/gpu_parity.rs.
//!
//! Run: `cargo test --release --features emulate --test kernels` (CPU and GPU only without the
//! feature).

#[path = "common/backend.rs"]
mod backend;
mod common;
mod gpu_support;
#[path = "common/parity.rs"]
mod parity;

use backend::Backend;
use common::*;
use groupnorm::cpu::reference;
use groupnorm::gpu::{DeviceLimits, Path};
use groupnorm::{bf16, f16, Error, GroupNorm, Layout};
use parity::*;

/// A small device: 4 SMs and 8 KiB of shared memory per block, so that rows of a few thousand
/// values are split into chunks and pieces. No thread-block clusters (as before sm_90).
const SMALL: DeviceLimits = DeviceLimits::new(4, 8 * 1024, 0);
/// The small device with clusters of up to 8 blocks (as sm_90+): rows of a few thousand values
/// take the cluster path.
const SMALL_CLUSTERS: DeviceLimits = backend::SMALL_DEVICE;
/// A larger one: rows of up to 12K f32 values fit the fused path.
const MEDIUM: DeviceLimits = DeviceLimits::new(8, 48 * 1024, 0);

/// "To 4 decimals" in docs/design.md's worked examples.
const FOUR_DECIMALS: f64 = 5e-5;

fn gpu_only(test: &str) -> Vec<Backend> {
    Backend::all_on(test, &[])
        .into_iter()
        .filter(Backend::is_gpu)
        .collect()
}

/// docs/design.md's worked examples. (Each pair normalizes to ±1 within 2e-5 exactly; the f32
/// nearest the pair 5, 4's 0.9999800006 is 2.0003e-5 from 1, so f32 results are held to the
/// exact values at the f32 tolerance, and to ±1 to 4 decimals, as in tests/cpu_forward.rs.)
#[test]
fn worked_examples() {
    let x = [5.0f32, 4., 7., 2., 1., 6., 2., 3., 4., 8., 1., 9.];
    let gn = GroupNorm::new(2, 4).unwrap();
    let (w, b) = ([1.0f32, 1., 2., 0.5], [0.0f32, 0., 1., -1.]);
    let plain = reference::forward(&gn, &x, &[3, 4], None::<&[f32]>, None).unwrap();
    let affine = reference::forward(&gn, &x, &[3, 4], Some(&w[..]), Some(&b[..])).unwrap();
    for be in Backend::all_on("worked_examples", &[SMALL]) {
        for path in paths_of(&be, &PLAIN_PATHS) {
            let ctx = format!("{} {path:?}", be.name());
            let (y, _) = be
                .forward::<f32, f32>(&gn, path, &x, &[3, 4], None, None)
                .unwrap();
            assert_forward_close(&y, &plain.y, F32_FORWARD_ABS, &format!("{ctx} no affine"));
            let expected = [1., -1., 1., -1., -1., 1., -1., 1., -1., 1., -1., 1.];
            for (g, e) in y.iter().zip(expected) {
                assert!(
                    (*g as f64 - e).abs() < FOUR_DECIMALS,
                    "{ctx} no affine: got {g}, expected {e}"
                );
            }
            let (y, _) = be
                .forward(&gn, path, &x, &[3, 4], Some(&w[..]), Some(&b[..]))
                .unwrap();
            assert_forward_close(&y, &affine.y, F32_FORWARD_ABS, &format!("{ctx} affine"));
            let expected = [1., -1., 3., -1.5, -1., 1., -1., -0.5, -1., 1., -1., -0.5];
            for (g, e) in y.iter().zip(expected) {
                assert!(
                    (*g as f64 - e).abs() < FOUR_DECIMALS,
                    "{ctx} affine: got {g}, expected {e}"
                );
            }
            let x: Vec<f32> = (1..=32).map(|v| v as f32).collect();
            let gn = GroupNorm::new(2, 2).unwrap();
            let (y, stats) = be
                .forward::<f32, f32>(&gn, path, &x, &[1, 2, 4, 4], None, None)
                .unwrap();
            assert!(
                (y[0] - -1.62698).abs() < 1e-5,
                "{ctx}: y[0,0,0,0] = {}",
                y[0]
            );
            assert_eq!(stats.mean, vec![8.5, 24.5], "{ctx}");
        }
    }
}

/// The shared random shapes (odd sizes, D = 1, G = 1, S = 1, 2-D, 5-D, prime spatial sizes,
/// wide groups, pieces with tails), every dtype pair, with and without affine parameters.
#[test]
fn small_and_odd_shapes() {
    for be in Backend::all_on("small_and_odd_shapes", &[SMALL]) {
        for (i, case) in random_cases().iter().enumerate() {
            all_dtypes(&be, &case.dims, case.groups, 100 + i as u64, PLAIN);
            let none = Opts {
                affine: Params::None,
                ..PLAIN
            };
            all_dtypes(&be, &case.dims, case.groups, 200 + i as u64, none);
        }
    }
}

/// The same shapes with buffers one element off (scalar kernels), and on a device with room
/// for longer fused rows.
#[test]
fn small_and_odd_shapes_misaligned_and_medium_device() {
    let misaligned = Opts {
        misalign: true,
        ..PLAIN
    };
    for be in Backend::all_on("small_and_odd_shapes_misaligned", &[SMALL]) {
        for (i, case) in random_cases().iter().enumerate() {
            all_dtypes(&be, &case.dims, case.groups, 300 + i as u64, misaligned);
        }
    }
    for be in Backend::all_on("small_and_odd_shapes_medium_device", &[MEDIUM]) {
        for (i, case) in random_cases().iter().enumerate() {
            all_dtypes(&be, &case.dims, case.groups, 400 + i as u64, PLAIN);
        }
    }
}

/// D = 1, G = 1, S = 1, 2-D input.
#[test]
fn degenerate_shapes() {
    for be in Backend::all_on("degenerate_shapes", &[SMALL]) {
        all_dtypes(&be, &[2, 8, 300], 8, 50, PLAIN); // D = 1
        all_dtypes(&be, &[2, 6, 700], 1, 51, PLAIN); // G = 1, rows of 4200: split
        all_dtypes(&be, &[3, 12], 4, 52, PLAIN); // 2-D (S = 1)
        all_dtypes(&be, &[5, 4, 1], 2, 53, PLAIN); // trailing 1
    }
}

/// Empty tensors on every path, f32 and f16 activations: N = 0 writes nothing; S = 0 (every
/// row empty) writes the statistics of an empty row, mean 0 and rstd = 1 / sqrt(eps); the
/// parameter gradients are 0. Forced split on S = 0 may refuse with a typed error instead;
/// nothing panics.
#[test]
fn empty_tensors() {
    for be in Backend::all_on("empty_tensors", &[SMALL]) {
        empty_tensors_of::<f32>(&be);
        empty_tensors_of::<f16>(&be);
    }
}

fn empty_tensors_of<T: groupnorm::Element>(be: &Backend) {
    let gn = GroupNorm::new(2, 4).unwrap();
    let w = [1.0f32; 4];
    let rstd_empty = (1.0 / 1e-5f64.sqrt()) as f32;
    for dims in [[0usize, 4, 3], [2, 4, 0], [3, 4, 0]] {
        for path in paths_of(be, &PLAIN_PATHS) {
            let ctx = format!("{} {} {dims:?} {path:?}", be.name(), T::DTYPE);
            let run = || {
                let (y, stats) =
                    be.forward::<T, f32>(&gn, path, &[], &dims, Some(&w[..]), Some(&w[..]))?;
                let g = be.backward::<T, f32>(
                    &gn,
                    path,
                    &[],
                    &[],
                    &dims,
                    &stats,
                    Some(&w[..]),
                    None,
                    true,
                )?;
                Ok::<_, Error>((y, stats, g))
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .unwrap_or_else(|_| panic!("{ctx}: panics instead of returning"));
            let (y, stats, g) = match r {
                Ok(v) => v,
                Err(e) if path == Path::Split && dims[2] == 0 => {
                    eprintln!("{ctx}: S = 0 forced split refused with {e}");
                    continue;
                }
                Err(e) => panic!("{ctx}: {e}"),
            };
            assert!(y.is_empty() && g.dx.is_empty(), "{ctx}");
            assert_eq!(stats.mean, vec![0.0; dims[0] * 2], "{ctx}: mean");
            assert_eq!(stats.rstd.len(), dims[0] * 2, "{ctx}: rstd length");
            for &r in &stats.rstd {
                assert!((r / rstd_empty - 1.0).abs() < 1e-6, "{ctx}: rstd {r}");
            }
            assert_eq!(g.dweight, Some(vec![0.0; 4]), "{ctx}: dweight");
            assert_eq!(g.dbias, Some(vec![0.0; 4]), "{ctx}: dbias");
        }
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
        let misaligned = Opts {
            misalign: true,
            ..o
        };
        for be in Backend::all_on("large_offset_rows_f32", &[SMALL]) {
            parity::<f32, f32>(&be, &[2, 16, 20, 20], 8, 700 + i, o); // rows of 800
            parity::<f32, f32>(&be, &[1, 4, 5000], 2, 710 + i, o); // pieces
            parity::<f32, f32>(&be, &[2, 32, 296], 2, 720 + i, o); // chunks of channels
            parity::<f32, f32>(&be, &[2, 32, 301], 2, 730 + i, misaligned);
            parity::<f16, f32>(&be, &[2, 32, 64], 4, 740 + i, o);
        }
        for be in Backend::all_on("large_offset_rows_f32_medium", &[MEDIUM]) {
            parity::<f32, f32>(&be, &[2, 16, 20, 20], 8, 750 + i, o);
        }
    }
}

/// The same on the GPU, on GPU-sized shapes: the last splits channels into pieces.
#[test]
fn gpu_sized_large_offset_rows_f32() {
    for be in gpu_only("gpu_sized_large_offset_rows_f32") {
        for (i, mean) in [1e3, 1e4].into_iter().enumerate() {
            let o = Opts {
                x_mean: mean,
                f32_abs: F32_FORWARD_OFFSET_ABS,
                ..PLAIN
            };
            let i = i as u64;
            parity::<f32, f32>(&be, &[2, 64, 32, 32], 32, 700 + i, o);
            parity::<f32, f32>(&be, &[300, 32, 8, 8], 32, 710 + i, o);
            parity::<f32, f32>(&be, &[1, 4, 1 << 20], 2, 720 + i, o);
            parity::<f16, f32>(&be, &[2, 320, 32, 32], 32, 730 + i, o);
        }
    }
}

/// A NaN or Inf in one group row makes that row's outputs NaN and leaves the others as they
/// were, forward and backward.
#[test]
fn non_finite_values_stay_in_their_group() {
    let small: &[(&[usize], usize)] = &[(&[2, 16, 20, 20], 8), (&[1, 8, 5000], 4)];
    let large: &[(&[usize], usize)] = &[
        (&[2, 64, 32, 32], 32),
        (&[300, 32, 8, 8], 32),
        (&[1, 8, 1 << 16], 4),
    ];
    for be in Backend::all_on("non_finite_values_stay_in_their_group", &[SMALL]) {
        let shapes = if be.is_gpu() {
            [small, large].concat()
        } else {
            small.to_vec()
        };
        for (dims, groups) in shapes {
            for (bad, path) in [f32::NAN, f32::INFINITY]
                .into_iter()
                .flat_map(|b| [(b, Path::Auto), (b, Path::Split)])
            {
                if !be.has_paths() && path != Path::Auto {
                    continue;
                }
                let ctx = format!("{} {dims:?} {bad} {path:?}", be.name());
                let gn = GroupNorm::new(groups, dims[1]).unwrap();
                let (c, s) = (dims[1], dims[2..].iter().product::<usize>());
                let row = c / groups * s;
                let mut x: Vec<f32> = normal_vec(&mut rng(800), dims.iter().product(), 0.0, 1.0);
                // poison row (n = 0, g = 1), somewhere in its middle
                x[row + row / 2] = bad;
                let (y, stats) = be
                    .forward::<f32, f32>(&gn, path, &x, dims, None, None)
                    .unwrap();
                let reference = reference::forward(&gn, &x, dims, None::<&[f32]>, None).unwrap();
                for (i, (&g, &r)) in y.iter().zip(&reference.y).enumerate() {
                    if i / row == 1 {
                        assert!(g.is_nan(), "{ctx}: y[{i}] = {g} in the row");
                    } else {
                        assert!(
                            (g as f64 - r).abs() <= F32_FORWARD_ABS,
                            "{ctx}: y[{i}] = {g}, expected {r}"
                        );
                    }
                }
                assert!(
                    stats.rstd[1].is_nan() || stats.mean[1].is_nan(),
                    "{ctx}: row 1 stats"
                );
                for r in (0..stats.mean.len()).filter(|&r| r != 1) {
                    assert!(
                        stats.mean[r].is_finite() && stats.rstd[r].is_finite(),
                        "{ctx}: stats of row {r}"
                    );
                }
                // backward: dx of the poisoned row is NaN, the others finite
                let dy: Vec<f32> = normal_vec(&mut rng(801), x.len(), 0.0, 1.0);
                let g = be
                    .backward::<f32, f32>(&gn, path, &dy, &x, dims, &stats, None, None, false)
                    .unwrap();
                for (i, &v) in g.dx.iter().enumerate() {
                    assert_eq!(v.is_nan(), i / row == 1, "{ctx}: dx[{i}] = {v}");
                }
            }
        }
    }
}

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
    for be in Backend::all_on("nhwc_parity", &[SMALL]) {
        for (i, (dims, groups)) in cases.into_iter().enumerate() {
            for (dt, ran) in all_dtypes(&be, dims, groups, 900 + i as u64, nhwc) {
                #[cfg(feature = "emulate")]
                if be.is_emulated() {
                    for r in &ran {
                        let t = r.fwd.as_ref().unwrap();
                        assert!(t.nhwc, "{dims:?} {dt}: NHWC ran the NCHW kernels");
                    }
                    let split = fwd_of(&ran, Path::Split);
                    assert!(!split.fused, "{dims:?} {dt}: forced split fused");
                }
                let _ = (dt, ran);
            }
        }
    }
    // misaligned buffers and a medium device
    let o = Opts {
        misalign: true,
        ..nhwc
    };
    for be in Backend::all_on("nhwc_parity_medium_misaligned", &[MEDIUM]) {
        for (dims, groups) in [(&[2usize, 40, 6, 5][..], 4), (&[1, 16, 33][..], 16)] {
            parity::<f16, f32>(&be, dims, groups, 950, o);
            parity::<f32, f32>(&be, dims, groups, 951, o);
        }
    }
}

/// GN + SiLU in both layouts, every dtype pair and path.
#[test]
fn silu_parity() {
    for be in Backend::all_on("silu_parity", &[SMALL]) {
        for layout in LAYOUTS {
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
                all_dtypes(&be, dims, groups, 970 + i as u64, o);
            }
            // no affine parameters: z = xhat
            let none = Opts {
                affine: Params::None,
                ..o
            };
            parity::<f32, f32>(&be, &[2, 12, 7], 3, 979, none);
        }
    }
}

/// SiLU on rows offset by 1e4: the backward must refine the saved mean before recomputing z,
/// on the fused path (one more pass on chip) and the split path (the `center` kernels, which
/// the emulator's trace must show).
#[test]
fn silu_large_offset_rows_f32() {
    for be in Backend::all_on("silu_large_offset_rows_f32", &[SMALL]) {
        for layout in LAYOUTS {
            let o = Opts {
                layout,
                silu: true,
                x_mean: 1e4,
                f32_abs: F32_FORWARD_OFFSET_ABS,
                ..PLAIN
            };
            let ran = parity::<f32, f32>(&be, &[2, 16, 20, 20], 4, 980, o);
            #[cfg(feature = "emulate")]
            if be.is_emulated() {
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
            let _ = ran;
        }
    }
}

/// Weight without bias and bias without weight (the README's GPU example passes a weight only)
/// on every path and layout, with and without SiLU: a kernel that tests one pointer for the
/// other's presence fails here. (Found missing by issue 15's planted-bug sweep.)
#[test]
fn weight_without_bias_and_bias_without_weight_on_every_path() {
    let nchw = PLAIN;
    let nhwc = Opts {
        layout: Layout::Nhwc,
        ..PLAIN
    };
    let cases: [(&[usize], usize, Opts, DeviceLimits); 9] = [
        (&[2, 12, 7], 3, nchw, SMALL),            // fused
        (&[1, 8, 600], 2, nchw, SMALL),           // split into chunks
        (&[1, 4, 5000], 2, nchw, SMALL),          // split into pieces of a channel
        (&[1, 4, 3000], 2, nchw, SMALL_CLUSTERS), // cluster
        (&[2, 24, 3, 11], 6, nhwc, SMALL),        // NHWC, several groups per tile
        (&[1, 32, 24, 24], 8, nhwc, SMALL),       // NHWC split into pieces
        (&[2, 12, 7], 3, Opts { silu: true, ..nchw }, SMALL),
        (&[1, 4, 5000], 2, Opts { silu: true, ..nchw }, SMALL),
        (&[1, 32, 24, 24], 8, Opts { silu: true, ..nhwc }, SMALL),
    ];
    for (i, (dims, groups, o, limits)) in cases.into_iter().enumerate() {
        for be in Backend::all_on("weight_without_bias_and_bias_without_weight", &[limits]) {
            for affine in [Params::Weight, Params::Bias] {
                let o = Opts { affine, ..o };
                let seed = 1500 + i as u64;
                let ran = parity::<f32, f32>(&be, dims, groups, seed, o);
                parity::<f16, f32>(&be, dims, groups, seed, o);
                parity::<bf16, bf16>(&be, dims, groups, seed, o);
                #[cfg(feature = "emulate")]
                if be.is_emulated() && limits.max_cluster > 0 {
                    assert!(
                        ran.iter().any(|r| r.fwd.as_ref().unwrap().cluster > 1),
                        "{dims:?}: no cluster ran"
                    );
                }
                let _ = ran;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GPU-sized shapes: the same checks, on shapes only the GPU runs in reasonable time
// ---------------------------------------------------------------------------------------------

/// Batch and group extremes: G = 1, G = C, S = 1, odd S, 2-D and 5-D, many rows (the planner's
/// fused case).
#[test]
fn gpu_sized_batch_and_group_extremes() {
    let shapes: &[(&[usize], usize)] = &[
        (&[1, 64, 16, 16], 32),
        (&[2, 64, 16, 16], 32),
        (&[8, 64, 16, 16], 32),
        (&[2, 64, 16, 16], 1),  // G = 1
        (&[2, 64, 16, 16], 64), // G = C, D = 1
        (&[4, 96, 1], 8),       // S = 1
        (&[3, 96, 37], 8),      // odd S: scalar kernels
        (&[64, 96], 12),        // 2-D input
        (&[2, 16, 3, 5, 7], 4), // 5-D input
        (&[300, 32, 8, 8], 32), // many rows: the planner's fused case
    ];
    for be in gpu_only("gpu_sized_batch_and_group_extremes") {
        for (i, &(dims, g)) in shapes.iter().enumerate() {
            all_dtypes(&be, dims, g, 300 + i as u64, PLAIN);
        }
    }
}

/// Stable Diffusion's GroupNorm shapes (G = 32).
#[test]
fn gpu_sized_stable_diffusion_shapes() {
    let shapes: &[&[usize]] = &[
        &[1, 320, 64, 64],
        &[2, 320, 64, 64],
        &[2, 640, 32, 32],
        &[8, 640, 16, 16],
        &[1, 1280, 16, 16],
        &[2, 2560, 8, 8],
        &[1, 960, 64, 64],
        &[1, 128, 128, 128],
    ];
    for be in gpu_only("gpu_sized_stable_diffusion_shapes") {
        for (i, dims) in shapes.iter().enumerate() {
            all_dtypes(&be, dims, 32, 400 + i as u64, PLAIN);
        }
    }
}

/// One row of 2^22 values (pieces of one channel), and rows of 2^20 over 4 channels.
#[test]
fn gpu_sized_long_rows_up_to_2_pow_22() {
    for be in gpu_only("gpu_sized_long_rows_up_to_2_pow_22") {
        parity::<f32, f32>(&be, &[1, 1, 1 << 22], 1, 500, PLAIN);
        parity::<f16, f32>(&be, &[1, 1, 1 << 22], 1, 501, PLAIN);
        parity::<bf16, bf16>(&be, &[2, 4, 1 << 18], 1, 502, PLAIN);
        parity::<f32, f32>(&be, &[1, 64, 1 << 16], 1, 503, PLAIN);
    }
}

/// Tensors starting one element into their buffers (not 16-byte aligned).
#[test]
fn gpu_sized_misaligned_sub_slices() {
    let o = Opts {
        misalign: true,
        ..PLAIN
    };
    for be in gpu_only("gpu_sized_misaligned_sub_slices") {
        all_dtypes(&be, &[2, 320, 8, 8], 32, 600, o);
        all_dtypes(&be, &[200, 64, 8, 8], 32, 601, o);
        all_dtypes(&be, &[1, 320, 64, 64], 32, 602, o);
        all_dtypes(&be, &[1, 8, 1 << 16], 2, 603, o); // one channel split into pieces
    }
}

/// Channels-last and GN + SiLU on GPU-sized shapes, every dtype pair, every path.
#[test]
fn gpu_sized_nhwc_and_silu() {
    let shapes: [(&[usize], usize); 6] = [
        (&[2, 32, 5, 7], 32),
        (&[2, 24, 3, 11], 6),
        (&[2, 320, 16, 16], 32),
        (&[1, 128, 64, 64], 32),
        (&[2, 6, 13], 1),
        (&[1, 64, 2, 3, 5], 4),
    ];
    for be in gpu_only("gpu_sized_nhwc_and_silu") {
        for (i, (dims, groups)) in shapes.into_iter().enumerate() {
            for (layout, silu) in [
                (Layout::Nhwc, false),
                (Layout::Nchw, true),
                (Layout::Nhwc, true),
            ] {
                let o = Opts {
                    layout,
                    silu,
                    ..PLAIN
                };
                all_dtypes(&be, dims, groups, 1200 + i as u64, o);
            }
        }
        for layout in LAYOUTS {
            let o = Opts {
                layout,
                silu: true,
                x_mean: 1e4,
                f32_abs: F32_FORWARD_OFFSET_ABS,
                ..PLAIN
            };
            parity::<f32, f32>(&be, &[2, 64, 32, 32], 32, 1210, o);
        }
    }
}
