//! The GPU's own checks: what only the hardware shows (run-to-run determinism, two streams
//! from two threads, a tensor past 2^31 elements, the typed errors of the device-tensor API,
//! the cluster path on compute capability 9.0+, in-place forward passes through the raw layer).
//!
//! The checks every backend shares (parity with the f64 reference, on every path, layout,
//! activation and affine combination, GPU-sized shapes included) are written once in
//! tests/common/parity.rs and run on the CPU, the emulator and the GPU by tests/kernels.rs.
//! Without a usable GPU each test prints why and passes, unless GROUPNORM_REQUIRE_GPU=1.

#[path = "common/backend.rs"]
mod backend;
mod common;
mod gpu_support;
#[path = "common/parity.rs"]
mod parity;

use backend::Backend;
use common::*;
use gpu_support::*;
use groupnorm::cpu::reference;
use groupnorm::gpu::DeviceAffine;
use groupnorm::gpu::{DeviceStats, DeviceTensor, Gpu, Path};
use groupnorm::{bf16, f16, Error, GroupNorm, Layout};
use parity::{all_dtypes, parity, Opts, PLAIN};

/// The same inputs give the same bits, run after run (no atomics, fixed reduction orders).
#[test]
fn deterministic_over_20_runs() {
    let Some(gpu) = gpu_or_skip("deterministic_over_20_runs") else {
        return;
    };
    for dims in [
        &[1usize, 320, 64, 64][..],
        &[300, 32, 8, 8],
        &[1, 4, 1 << 20],
    ] {
        let c = dims[1];
        let gn = GroupNorm::new(if c == 4 { 2 } else { 32 }, c).unwrap();
        let mut r = rng(900);
        let n: usize = dims.iter().product();
        let x: Vec<f16> = normal_vec(&mut r, n, 0.0, 1.0);
        let dy: Vec<f16> = normal_vec(&mut r, n, 0.0, 1.0);
        let w = up(&gpu, &uniform_vec::<f32>(&mut r, c, 0.5, 1.5));
        let b = up(&gpu, &normal_vec::<f32>(&mut r, c, 0.0, 0.5));
        let xd = DeviceTensor::from_host(&gpu, &x, dims, Layout::Nchw).unwrap();
        let dyd = DeviceTensor::from_host(&gpu, &dy, dims, Layout::Nchw).unwrap();
        for path in [Path::Auto, Path::Split] {
            let mut op = gn.on_gpu(&gpu).with_path(path);
            let mut first = None;
            for run in 0..20 {
                let (y, stats) = op
                    .forward(&xd, DeviceAffine::new().weight(&w).bias(&b))
                    .unwrap();
                let g = op
                    .backward(&dyd, &xd, &stats, DeviceAffine::new().weight(&w), true)
                    .unwrap();
                let bits = (
                    y.to_host(&gpu)
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    g.dx.to_host(&gpu)
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    down(&gpu, g.dweight.as_ref().unwrap())
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    down(&gpu, g.dbias.as_ref().unwrap())
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                );
                match &first {
                    None => first = Some(bits),
                    Some(f) => assert!(
                        f == &bits,
                        "{dims:?} {path:?}: run {run} differs from run 0"
                    ),
                }
            }
        }
    }
}

/// Two threads, each with its own stream and op, interleave launches; each gets exactly the
/// result a lone run gives.
#[test]
fn two_streams_from_two_threads() {
    let Some(gpu) = gpu_or_skip("two_streams_from_two_threads") else {
        return;
    };
    let work = |gpu: Gpu, dims: Vec<usize>, seed: u64| {
        let gn = GroupNorm::new(32, dims[1]).unwrap();
        let n: usize = dims.iter().product();
        let x: Vec<bf16> = normal_vec(&mut rng(seed), n, 0.0, 1.0);
        let xd = DeviceTensor::from_host(&gpu, &x, &dims, Layout::Nchw).unwrap();
        let mut op = gn.on_gpu(&gpu);
        let mut outs = Vec::new();
        for _ in 0..10 {
            let (y, _) = op.forward(&xd, DeviceAffine::none()).unwrap();
            outs.push(y.to_host(&gpu).unwrap());
        }
        let reference = reference::forward(&gn, &x, &dims, None::<&[f32]>, None).unwrap();
        for y in &outs {
            assert_forward_close(y, &reference.y, F32_FORWARD_ABS, "two streams");
            assert_eq!(
                y, &outs[0],
                "a run differs from the first on the same stream"
            );
        }
    };
    let a = gpu.with_stream(gpu.new_stream().unwrap()).unwrap();
    let b = gpu.with_stream(gpu.new_stream().unwrap()).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| work(a, vec![2, 320, 32, 32], 1000));
        s.spawn(|| work(b, vec![4, 64, 16, 16], 1001));
    });
}

/// One tensor over 2^31 elements: offsets past 2^31 must be computed in 64 bits. Checked on the
/// first and last samples against the reference (rows are independent).
#[test]
fn tensor_over_2_pow_31_elements() {
    let Some(gpu) = gpu_or_skip("tensor_over_2_pow_31_elements") else {
        return;
    };
    let dims = [33usize, 32, 1 << 21]; // 2_214_592_512 elements
    let numel: usize = dims.iter().product();
    let bytes = numel * 2;
    let (free, _) = gpu.context().mem_get_info().unwrap();
    if free < 4 * bytes + (1 << 30) {
        eprintln!(
            "skipping tensor_over_2_pow_31_elements: needs {} GiB of device memory, {} GiB free",
            (4 * bytes) >> 30,
            free >> 30
        );
        return;
    }
    let sample = dims[1] * dims[2];
    // a cheap pattern with a different mean and spread in every row
    let x: Vec<f16> = (0..numel)
        .map(|i| {
            let row = (i / (1 << 21)) as f32;
            f16::from_f32(((i * 7919) % 1013) as f32 / 101.0 * (1.0 + row % 7.0) + row % 5.0)
        })
        .collect();
    let dy: Vec<f16> = (0..numel)
        .map(|i| f16::from_f32(((i * 104_729) % 997) as f32 / 498.5 - 1.0))
        .collect();
    let gn = GroupNorm::new(32, 32).unwrap();
    let mut op = gn.on_gpu(&gpu);
    let xd = DeviceTensor::from_host(&gpu, &x, &dims, Layout::Nchw).unwrap();
    let dyd = DeviceTensor::from_host(&gpu, &dy, &dims, Layout::Nchw).unwrap();
    let (y, stats) = op.forward(&xd, DeviceAffine::none()).unwrap();
    let grads = op
        .backward(&dyd, &xd, &stats, DeviceAffine::none(), true)
        .unwrap();
    let y = y.to_host(&gpu).unwrap();
    let dx = grads.dx.to_host(&gpu).unwrap();
    let sub = [1, dims[1], dims[2]];
    for n in [0, dims[0] - 1] {
        let r = n * sample..(n + 1) * sample;
        let reference = reference::forward(&gn, &x[r.clone()], &sub, None::<&[f16]>, None).unwrap();
        let ctx = format!("sample {n} (offset {})", r.start);
        assert_forward_close(&y[r.clone()], &reference.y, F32_FORWARD_ABS, &ctx);
        let g =
            reference::backward(&gn, &dy[r.clone()], &x[r.clone()], &sub, None::<&[f16]>).unwrap();
        let scale = dx_scale(
            &to_f64(&dy[r.clone()]),
            &sub,
            32,
            Layout::Nchw,
            None,
            &reference.rstd,
        );
        assert_dx_close(&dx[r], &g.dx, scale, &ctx);
    }
}

/// Bad input is refused with a typed error before anything is launched.
#[test]
fn bad_input_is_a_typed_error() {
    let Some(gpu) = gpu_or_skip("bad_input_is_a_typed_error") else {
        return;
    };
    let gn = GroupNorm::new(2, 4).unwrap();
    let mut op = gn.on_gpu(&gpu);
    let x =
        DeviceTensor::from_host(&gpu, &[f16::from_f32(0.5); 24], &[2, 4, 3], Layout::Nchw).unwrap();
    let w16 = up(&gpu, &[bf16::ONE; 4]);
    let e = op
        .forward(&x, DeviceAffine::new().weight(&w16))
        .unwrap_err();
    assert!(matches!(e, Error::DtypeMismatch { .. }), "{e}");
    let w3 = up(&gpu, &[f16::ONE; 3]);
    let e = op.forward(&x, DeviceAffine::new().weight(&w3)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{e}"
    );
    let nhwc = DeviceTensor::from_host(&gpu, &[f16::ONE; 24], &[2, 4, 3], Layout::Nhwc).unwrap();
    let e = op.forward(&nhwc, DeviceAffine::none()).unwrap_err();
    assert!(matches!(e, Error::LayoutMismatch { .. }), "{e}");
    // a configuration for NHWC takes it (the channels-last kernels)
    gn.with_layout(Layout::Nhwc)
        .on_gpu(&gpu)
        .forward(&nhwc, DeviceAffine::none())
        .expect("NHWC forward");
    let other = DeviceTensor::from_host(&gpu, &[f16::ONE; 40], &[2, 4, 5], Layout::Nchw).unwrap();
    let mut y = DeviceTensor::zeros(&gpu, &[2, 4, 5], Layout::Nchw).unwrap();
    let mut stats = DeviceStats::zeros(&gpu, 4).unwrap();
    let e = op
        .forward_into(&x, DeviceAffine::none(), &mut y, &mut stats)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { name: "y", .. }), "{e}");
    let stats3 = DeviceStats::zeros(&gpu, 3).unwrap();
    let e = op
        .backward(&x, &x, &stats3, DeviceAffine::none(), true)
        .unwrap_err();
    assert!(
        matches!(e, Error::LengthMismatch { name: "stats", .. }),
        "{e}"
    );
    let e = op
        .backward(&other, &x, &stats, DeviceAffine::none(), true)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { name: "dy", .. }), "{e}");
    // parameter dtype is checked even when no parameter is passed: bf16 parameters cannot
    // accompany f16 activations (`DeviceAffine::none()` is typed f32, which every dtype accepts)
    let e = op.forward(&x, DeviceAffine::<bf16>::new()).unwrap_err();
    assert!(matches!(e, Error::DtypeMismatch { .. }), "{e}");
    // an output whose buffer was swapped for a shorter one after construction
    let mut y = DeviceTensor::<f16>::zeros(&gpu, &[2, 4, 3], Layout::Nchw).unwrap();
    *y.buffer_mut() = up(&gpu, &[f16::ZERO; 5]);
    let mut stats = DeviceStats::zeros(&gpu, 4).unwrap();
    let e = op
        .forward_into(&x, DeviceAffine::none(), &mut y, &mut stats)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "y",
                got: 5,
                ..
            }
        ),
        "{e}"
    );
    // forcing the fused path on a row that cannot fit is refused, not launched
    let long = DeviceTensor::<f32>::zeros(&gpu, &[1, 1, 1 << 22], Layout::Nchw).unwrap();
    let e = GroupNorm::new(1, 1)
        .unwrap()
        .on_gpu(&gpu)
        .with_path(Path::Fused)
        .forward(&long, DeviceAffine::none())
        .unwrap_err();
    assert!(matches!(e, Error::PathUnavailable { .. }), "{e}");
}

/// The cluster path on the hardware: on compute capability 9.0+ it must run (forced, and chosen
/// by the planner for few long rows) and meet the plain tolerances on SD-like and long rows,
/// with SiLU and offsets; elsewhere forcing it is a typed error.
#[test]
fn cluster_path() {
    let Some(gpu) = gpu_or_skip("cluster_path") else {
        return;
    };
    let sd = [1usize, 320, 64, 64];
    let gn = GroupNorm::new(32, 320).unwrap();
    let op = gn.on_gpu(&gpu).with_path(Path::Cluster);
    if gpu.capability().0 < 9 {
        let e = op.describe_path::<f16>(&sd, false).unwrap_err();
        assert!(matches!(e, Error::PathUnavailable { .. }), "{e}");
        eprintln!("cluster_path: compute capability below 9.0, forcing clusters is refused: ok");
        return;
    }
    for backward in [false, true] {
        let auto = gn.on_gpu(&gpu).describe_path::<f16>(&sd, backward).unwrap();
        assert!(
            auto.starts_with("cluster"),
            "SD shape, backward={backward}: {auto}"
        );
    }
    let be = Backend::Gpu(gpu.clone());
    for (dims, groups) in [
        (&[1usize, 320, 64, 64][..], 32),
        (&[1, 128, 128, 128][..], 32),
        (&[2, 64, 37, 41][..], 8),
    ] {
        for (t, ran) in all_dtypes(&be, dims, groups, 1300, PLAIN) {
            if dims == sd {
                assert!(
                    ran.iter().any(|r| r.path == Path::Cluster),
                    "{dims:?} {t}: the forced cluster path refused the SD shape"
                );
            }
        }
        for silu in [false, true] {
            parity::<f16, f32>(&be, dims, groups, 1301, Opts { silu, ..PLAIN });
        }
    }
    let offset = Opts {
        silu: true,
        x_mean: 1e4,
        f32_abs: F32_FORWARD_OFFSET_ABS,
        ..PLAIN
    };
    parity::<f32, f32>(&be, &[1, 64, 64, 64], 8, 1302, offset);
    // the largest VAE rows: 2 MiB of f16 per row, forward on a cluster of pieces
    let vae = [1usize, 128, 512, 512];
    let path = GroupNorm::new(32, 128)
        .unwrap()
        .on_gpu(&gpu)
        .describe_path::<f16>(&vae, false)
        .unwrap();
    eprintln!("cluster_path: 1x128x512x512 f16 forward takes `{path}`");
    parity::<f16, f32>(&be, &vae, 32, 1303, PLAIN);
}

/// In place through the raw layer (`y == x`, the one aliasing it accepts): where the plan is
/// the fused path (one block per row, the row on chip before anything is written) the result
/// equals the out-of-place one bit for bit; the split and cluster paths, which read `x` after
/// other blocks have written `y`, refuse it with `Error::Aliased` before launching. NCHW and
/// NHWC, forced and planned paths.
#[test]
fn in_place_forward_through_the_raw_layer() {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use groupnorm::gpu::raw::{self, ForwardPtrs, Problem};
    use groupnorm::DType;
    let Some(gpu) = gpu_or_skip("in_place_forward_through_the_raw_layer") else {
        return;
    };
    let cases: [(&[usize], usize, Layout); 4] = [
        (&[4, 32, 8, 8], 8, Layout::Nchw),     // short rows: fused
        (&[2, 24, 3, 11], 6, Layout::Nhwc),    // NHWC tiles
        (&[1, 320, 64, 64], 32, Layout::Nchw), // SD shape: split or cluster when planned
        (&[1, 64, 48, 48], 8, Layout::Nhwc),   // NHWC rows of 18K values
    ];
    for (i, (dims, groups, layout)) in cases.into_iter().enumerate() {
        let c = dims[1];
        let numel: usize = dims.iter().product();
        let mut r = rng(1400 + i as u64);
        let x: Vec<f16> = normal_vec(&mut r, numel, 0.0, 1.0);
        let w = up(&gpu, &uniform_vec::<f32>(&mut r, c, 0.5, 1.5));
        let b = up(&gpu, &normal_vec::<f32>(&mut r, c, 0.0, 0.5));
        let gn = GroupNorm::new(groups, c).unwrap().with_layout(layout);
        for path in [Path::Auto, Path::Fused, Path::Split, Path::Cluster] {
            let ctx = format!("{dims:?} {} {path:?}", layout.name());
            let mut op = gn.on_gpu(&gpu).with_path(path);
            let plan = match op.describe_path::<f16>(dims, false) {
                Ok(p) => p,
                Err(Error::PathUnavailable { .. }) if path != Path::Auto => continue,
                Err(e) => panic!("{ctx}: {e}"),
            };
            let xd = DeviceTensor::from_host(&gpu, &x, dims, layout).unwrap();
            let (y, st) = op
                .forward(&xd, DeviceAffine::new().weight(&w).bias(&b))
                .unwrap();
            let (y, st) = (y.to_host(&gpu).unwrap(), st.to_host(&gpu).unwrap());

            let problem = Problem::new(dims, groups, DType::F16, DType::F32)
                .with_layout(layout)
                .with_path(path);
            let ws_bytes = raw::forward_workspace_bytes(&gpu, &problem).unwrap();
            let ws = up(&gpu, &vec![0.0f32; ws_bytes.div_ceil(4).max(1)]);
            let mut xy = up(&gpu, &x);
            let mut stats = DeviceStats::zeros(&gpu, dims[0] * groups).unwrap();
            let stream = gpu.stream().clone();
            let r = {
                let (p, _g) = xy.device_ptr_mut(&stream);
                let (wp, _gw) = w.device_ptr(&stream);
                let (bp, _gb) = b.device_ptr(&stream);
                let (mp, _gm) = stats.mean.device_ptr_mut(&stream);
                let (rp, _gr) = stats.rstd.device_ptr_mut(&stream);
                let (wsp, _gws) = ws.device_ptr(&stream);
                let ptrs = ForwardPtrs::new(p, p, mp, rp).with_affine(wp, bp);
                // SAFETY: every pointer is a live cudarc buffer of this context, of the length
                // the problem implies (x and y: N*C*S f16; weight, bias: C f32; mean, rstd: N*G
                // f32; the workspace: the bytes forward_workspace_bytes asked for), borrowed
                // with cudarc's guards until the enqueued work is ordered; y == x is the one
                // overlap, which the raw layer checks against the plan (the contract under test).
                unsafe { raw::forward(&gpu, stream.cu_stream(), &problem, &ptrs, wsp, ws_bytes) }
            };
            let fused = plan.contains("fused");
            match (fused, r) {
                (true, Ok(())) => {
                    let got = down(&gpu, &xy);
                    let bits = |v: &[f16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&y), "{ctx} ({plan}): in place differs");
                    let got_stats = stats.to_host(&gpu).unwrap();
                    assert_eq!(got_stats, st, "{ctx} ({plan}): statistics differ");
                }
                (false, Err(Error::Aliased { output, input, .. })) => {
                    assert_eq!((output, input), ("y", "x"), "{ctx} ({plan})");
                    assert_eq!(
                        down(&gpu, &xy),
                        x,
                        "{ctx} ({plan}): x written though refused"
                    );
                }
                (_, r) => panic!("{ctx} ({plan}): in place gave {r:?}"),
            }
        }
    }
}
