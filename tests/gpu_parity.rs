//! GPU parity with the f64 CPU reference, held to the same tolerances as the CPU path
//! (tests/common, docs/design.md "Accuracy targets").
//!
//! Every output buffer is filled with NaN before the launch, so an element a kernel forgets to
//! write fails the comparison. Without a usable GPU each test prints why and passes, unless
//! GROUPNORM_REQUIRE_GPU=1.

mod common;
mod gpu_support;

use common::*;
use gpu_support::*;
use groupnorm::cpu::reference;
use groupnorm::gpu::DeviceAffine;
use groupnorm::gpu::{DeviceStats, DeviceTensor, Gpu, Path};
use groupnorm::{bf16, f16, Element, Error, GroupNorm, Layout, Stats};

/// How one parity case is built.
#[derive(Clone, Copy)]
struct Opts {
    /// Weight and bias present (else both absent; dbias still asked for).
    affine: bool,
    /// Start every device tensor one element into its buffer (not 16-byte aligned).
    misalign: bool,
    /// Mean of x (a large offset tests the per-row pivot).
    x_mean: f64,
    /// Forward tolerance for f32 outputs.
    f32_abs: f64,
}

const PLAIN: Opts = Opts {
    affine: true,
    misalign: false,
    x_mean: 0.0,
    f32_abs: F32_FORWARD_ABS,
};

/// Every kernel path. The planner's choice (`Auto`) takes the cluster path for few long rows on
/// compute capability 9.0+.
const PATHS: [Path; 4] = [Path::Auto, Path::Split, Path::Fused, Path::Cluster];

/// Forced paths that may refuse a shape with `PathUnavailable` (rows that do not fit on chip; the
/// cluster path also on devices without clusters, and for NHWC).
fn refusable(path: Path) -> bool {
    matches!(path, Path::Fused | Path::Cluster)
}

/// A device tensor holding `host`, starting `offset` elements into its buffer.
fn tensor<T: Element>(gpu: &Gpu, host: &[T], dims: &[usize], offset: usize) -> DeviceTensor<T> {
    let mut padded = nans::<T>(offset);
    padded.extend_from_slice(host);
    if padded.is_empty() {
        padded.push(T::default()); // the driver refuses empty allocations
    }
    DeviceTensor::with_offset(up(gpu, &padded), offset, dims, Layout::Nchw).expect("tensor")
}

fn poisoned_stats(gpu: &Gpu, rows: usize) -> DeviceStats {
    let nan = vec![f32::NAN; rows];
    DeviceStats::from_host(
        gpu,
        &Stats {
            mean: nan.clone(),
            rstd: nan,
        },
    )
    .expect("stats")
}

/// Forward and backward of one shape on the GPU against the f64 reference, through every kernel
/// path: the planner's choice, the split path, and the fused path where the row fits on chip.
fn parity<T: Element, P: Element>(gpu: &Gpu, dims: &[usize], groups: usize, seed: u64, o: Opts) {
    let case = format!(
        "{dims:?} G={groups} {}/{} affine={} misaligned={} mean={}",
        T::DTYPE,
        P::DTYPE,
        o.affine,
        o.misalign,
        o.x_mean
    );
    let gn = GroupNorm::new(groups, dims[1]).unwrap();
    let c = dims[1];
    let numel: usize = dims.iter().product();
    let rows = dims[0] * groups;
    let mut r = rng(seed);
    let x: Vec<T> = normal_vec(&mut r, numel, o.x_mean, 1.0);
    let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<P> = normal_vec(&mut r, c, 0.0, 0.5);
    let dy: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let (wh, bh) = if o.affine {
        (Some(&w[..]), Some(&b[..]))
    } else {
        (None, None)
    };
    let off = usize::from(o.misalign);
    let reference = reference::forward(&gn, &x, dims, wh, bh).unwrap();
    let grads = reference::backward(&gn, &dy, &x, dims, wh).unwrap();
    let w64 = o.affine.then(|| to_f64(&w));
    let scale = dx_scale(
        &to_f64(&dy),
        dims,
        groups,
        Layout::Nchw,
        w64.as_deref(),
        &reference.rstd,
    );
    let xd = tensor(gpu, &x, dims, off);
    let dyd = tensor(gpu, &dy, dims, off);
    let (wd, bd) = (up(gpu, &w), up(gpu, &b));
    let (wd, bd) = if o.affine {
        (Some(&wd), Some(&bd))
    } else {
        (None, None)
    };

    for path in PATHS {
        let ctx = format!("{case} path={path:?}");
        let mut op = gn.on_gpu(gpu).with_path(path);
        // forward, into outputs poisoned with NaN
        let mut yd = tensor(gpu, &nans::<T>(numel), dims, off);
        let mut stats = poisoned_stats(gpu, rows);
        match op.forward_into(
            &xd,
            DeviceAffine {
                weight: wd,
                bias: bd,
            },
            &mut yd,
            &mut stats,
        ) {
            Ok(()) => {}
            // the fused and cluster paths refuse rows that do not fit on chip (and the cluster
            // path devices without clusters): that is their contract
            Err(Error::PathUnavailable { .. }) if refusable(path) => continue,
            Err(e) => panic!("{ctx}: forward: {e}"),
        }
        let y = yd.to_host(gpu).unwrap();
        let host_stats = stats.to_host(gpu).unwrap();
        assert_forward_close(&y, &reference.y, o.f32_abs, &format!("{ctx}: y"));
        assert_stats_close(&host_stats, &reference, o.f32_abs, &format!("{ctx}: stats"));

        // backward, from the statistics the GPU saved (as a training step would)
        let mut dxd = tensor(gpu, &nans::<T>(numel), dims, off);
        let mut dw = up(gpu, &nans::<P>(c));
        let mut db = up(gpu, &nans::<P>(c));
        match op.backward_into(
            &dyd,
            &xd,
            &stats,
            DeviceAffine {
                weight: wd,
                bias: None,
            },
            &mut dxd,
            if o.affine { Some(&mut dw) } else { None },
            Some(&mut db),
        ) {
            Ok(()) => {}
            // backward keeps x and dy on chip: a row can fit forward and not backward
            Err(Error::PathUnavailable { .. }) if refusable(path) => continue,
            Err(e) => panic!("{ctx}: backward: {e}"),
        }
        let dx = dxd.to_host(gpu).unwrap();
        assert_dx_close(&dx, &grads.dx, scale, &format!("{ctx}: dx"));
        if o.affine {
            assert_param_grad_close(&down(gpu, &dw), &grads.dweight, "dweight", &ctx);
        }
        assert_param_grad_close(&down(gpu, &db), &grads.dbias, "dbias", &ctx);
    }
}

/// Runs `parity` for every dtype pair the API accepts.
fn all_dtypes(gpu: &Gpu, dims: &[usize], groups: usize, seed: u64, o: Opts) {
    parity::<f32, f32>(gpu, dims, groups, seed, o);
    parity::<f16, f16>(gpu, dims, groups, seed, o);
    parity::<f16, f32>(gpu, dims, groups, seed, o);
    parity::<bf16, bf16>(gpu, dims, groups, seed, o);
    parity::<bf16, f32>(gpu, dims, groups, seed, o);
}

#[test]
fn worked_examples() {
    let Some(gpu) = gpu_or_skip("worked_examples") else {
        return;
    };
    let x = [5.0f32, 4., 7., 2., 1., 6., 2., 3., 4., 8., 1., 9.];
    let gn = GroupNorm::new(2, 4).unwrap();
    let mut op = gn.on_gpu(&gpu);
    let xd = DeviceTensor::from_host(&gpu, &x, &[3, 4], Layout::Nchw).unwrap();
    let (y, _) = op.forward(&xd, DeviceAffine::none()).unwrap();
    // docs/design.md: each pair normalizes to +-0.5 / sqrt(0.25 + 1e-5) = +-0.99998, "+-1 to 4 decimals";
    // the exact value is held to the f32 target, the rounded one to 4 decimals
    let exact = 0.5 / (0.25f64 + 1e-5).sqrt();
    let expected = [1., -1., 1., -1., -1., 1., -1., 1., -1., 1., -1., 1.];
    for (g, e) in y.to_host(&gpu).unwrap().iter().zip(expected) {
        assert!(
            (*g as f64 - e * exact).abs() <= F32_FORWARD_ABS,
            "no affine: got {g}"
        );
        assert!(
            (g - e as f32).abs() < 5e-5,
            "no affine: got {g}, expected {e} to 4 decimals"
        );
    }
    let w = up(&gpu, &[1.0f32, 1., 2., 0.5]);
    let b = up(&gpu, &[0.0f32, 0., 1., -1.]);
    let (y, _) = op
        .forward(&xd, DeviceAffine::new().weight(&w).bias(&b))
        .unwrap();
    let expected = [1., -1., 3., -1.5, -1., 1., -1., -0.5, -1., 1., -1., -0.5];
    for (g, e) in y.to_host(&gpu).unwrap().iter().zip(expected) {
        assert!((g - e).abs() < 1e-4, "affine: got {g}, expected {e}");
    }
    let x: Vec<f32> = (1..=32).map(|v| v as f32).collect();
    let gn = GroupNorm::new(2, 2).unwrap();
    let xd = DeviceTensor::from_host(&gpu, &x, &[1, 2, 4, 4], Layout::Nchw).unwrap();
    let (y, stats) = gn.on_gpu(&gpu).forward(&xd, DeviceAffine::none()).unwrap();
    let y = y.to_host(&gpu).unwrap();
    assert!((y[0] - -1.62698).abs() < 1e-5, "y[0,0,0,0] = {}", y[0]);
    let stats = stats.to_host(&gpu).unwrap();
    assert_eq!(stats.mean, vec![8.5, 24.5]);
}

#[test]
fn small_and_odd_shapes() {
    let Some(gpu) = gpu_or_skip("small_and_odd_shapes") else {
        return;
    };
    for (i, case) in random_cases().iter().enumerate() {
        all_dtypes(&gpu, &case.dims, case.groups, 100 + i as u64, PLAIN);
        all_dtypes(
            &gpu,
            &case.dims,
            case.groups,
            200 + i as u64,
            Opts {
                affine: false,
                ..PLAIN
            },
        );
    }
}

#[test]
fn batch_and_group_extremes() {
    let Some(gpu) = gpu_or_skip("batch_and_group_extremes") else {
        return;
    };
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
    for (i, &(dims, g)) in shapes.iter().enumerate() {
        all_dtypes(&gpu, dims, g, 300 + i as u64, PLAIN);
    }
}

#[test]
fn stable_diffusion_shapes() {
    let Some(gpu) = gpu_or_skip("stable_diffusion_shapes") else {
        return;
    };
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
    for (i, dims) in shapes.iter().enumerate() {
        all_dtypes(&gpu, dims, 32, 400 + i as u64, PLAIN);
    }
}

#[test]
fn long_rows_up_to_2_pow_22() {
    let Some(gpu) = gpu_or_skip("long_rows_up_to_2_pow_22") else {
        return;
    };
    // one row of 2^22 values (pieces of one channel), and rows of 2^20 over 4 channels
    parity::<f32, f32>(&gpu, &[1, 1, 1 << 22], 1, 500, PLAIN);
    parity::<f16, f32>(&gpu, &[1, 1, 1 << 22], 1, 501, PLAIN);
    parity::<bf16, bf16>(&gpu, &[2, 4, 1 << 18], 1, 502, PLAIN);
    parity::<f32, f32>(&gpu, &[1, 64, 1 << 16], 1, 503, PLAIN);
}

#[test]
fn misaligned_sub_slices() {
    let Some(gpu) = gpu_or_skip("misaligned_sub_slices") else {
        return;
    };
    let o = Opts {
        misalign: true,
        ..PLAIN
    };
    all_dtypes(&gpu, &[2, 320, 8, 8], 32, 600, o);
    all_dtypes(&gpu, &[200, 64, 8, 8], 32, 601, o);
    all_dtypes(&gpu, &[1, 320, 64, 64], 32, 602, o);
    all_dtypes(&gpu, &[1, 8, 1 << 16], 2, 603, o); // one channel split into pieces
}

#[test]
fn large_offset_rows_f32() {
    let Some(gpu) = gpu_or_skip("large_offset_rows_f32") else {
        return;
    };
    for (i, mean) in [1e3, 1e4].into_iter().enumerate() {
        let o = Opts {
            x_mean: mean,
            f32_abs: F32_FORWARD_OFFSET_ABS,
            ..PLAIN
        };
        // every path runs on each (see `parity`); the last shape splits channels into pieces
        parity::<f32, f32>(&gpu, &[2, 64, 32, 32], 32, 700 + i as u64, o);
        parity::<f32, f32>(&gpu, &[300, 32, 8, 8], 32, 710 + i as u64, o);
        parity::<f32, f32>(&gpu, &[1, 4, 1 << 20], 2, 720 + i as u64, o);
        parity::<f16, f32>(&gpu, &[2, 320, 32, 32], 32, 730 + i as u64, o);
    }
}

/// A NaN or Inf in one group row makes that row's outputs NaN and leaves the others as they were.
#[test]
fn non_finite_values_stay_in_their_group() {
    let Some(gpu) = gpu_or_skip("non_finite_values_stay_in_their_group") else {
        return;
    };
    for dims in [
        &[2usize, 64, 32, 32][..],
        &[300, 32, 8, 8],
        &[1, 8, 1 << 16],
    ] {
        for (bad, path) in [f32::NAN, f32::INFINITY]
            .into_iter()
            .flat_map(|b| [(b, Path::Auto), (b, Path::Split)])
        {
            let groups = if dims[1] == 8 { 4 } else { 32 };
            let gn = GroupNorm::new(groups, dims[1]).unwrap();
            let (c, s) = (dims[1], dims[2..].iter().product::<usize>());
            let d = c / groups;
            let mut x: Vec<f32> = normal_vec(&mut rng(800), dims.iter().product(), 0.0, 1.0);
            // poison row (n = 0, g = 1), somewhere in its middle
            x[d * s + d * s / 2] = bad;
            let xd = DeviceTensor::from_host(&gpu, &x, dims, Layout::Nchw).unwrap();
            let mut op = gn.on_gpu(&gpu).with_path(path);
            let (y, stats) = op.forward(&xd, DeviceAffine::none()).unwrap();
            let y = y.to_host(&gpu).unwrap();
            let reference = reference::forward(&gn, &x, dims, None::<&[f32]>, None).unwrap();
            let row = d * s;
            for (i, (&g, &r)) in y.iter().zip(&reference.y).enumerate() {
                if i / row == 1 {
                    assert!(
                        g.is_nan(),
                        "{dims:?} {bad}: y[{i}] = {g} in the poisoned row"
                    );
                } else {
                    assert!(g.is_finite(), "{dims:?} {bad}: y[{i}] = {g} outside it");
                    assert!((g as f64 - r).abs() <= F32_FORWARD_ABS, "{dims:?}: y[{i}]");
                }
            }
            let st = stats.to_host(&gpu).unwrap();
            assert!(
                st.rstd[1].is_nan() || st.mean[1].is_nan(),
                "{dims:?}: row 1 stats"
            );
            assert!(
                st.mean[0].is_finite() && st.rstd[2].is_finite(),
                "{dims:?}: other rows"
            );
            // backward: dx of the poisoned row is NaN, the others finite
            let dy: Vec<f32> = normal_vec(&mut rng(801), x.len(), 0.0, 1.0);
            let dyd = DeviceTensor::from_host(&gpu, &dy, dims, Layout::Nchw).unwrap();
            let grads = op
                .backward(&dyd, &xd, &stats, DeviceAffine::none(), false)
                .unwrap();
            let dx = grads.dx.to_host(&gpu).unwrap();
            for (i, &g) in dx.iter().enumerate() {
                assert_eq!(g.is_nan(), i / row == 1, "{dims:?} {bad}: dx[{i}] = {g}");
            }
        }
    }
}

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

#[test]
fn empty_tensors_are_no_ops() {
    let Some(gpu) = gpu_or_skip("empty_tensors_are_no_ops") else {
        return;
    };
    let gn = GroupNorm::new(2, 4).unwrap();
    let mut op = gn.on_gpu(&gpu);
    for dims in [[0usize, 4, 3], [2, 4, 0]] {
        let xd = DeviceTensor::<f32>::from_host(&gpu, &[], &dims, Layout::Nchw).unwrap();
        let w = up(&gpu, &[1.0f32; 4]);
        let (y, stats) = op
            .forward(&xd, DeviceAffine::new().weight(&w).bias(&w))
            .unwrap();
        assert!(y.to_host(&gpu).unwrap().is_empty());
        let st = stats.to_host(&gpu).unwrap();
        assert_eq!(st.mean.len(), dims[0] * 2);
        let g = op
            .backward(&xd, &xd, &stats, DeviceAffine::new().weight(&w), true)
            .unwrap();
        assert!(g.dx.to_host(&gpu).unwrap().is_empty());
        assert_eq!(down(&gpu, g.dweight.as_ref().unwrap())[..4], [0.0; 4]);
        assert_eq!(down(&gpu, g.dbias.as_ref().unwrap())[..4], [0.0; 4]);
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
    let other = DeviceTensor::from_host(&gpu, &[f16::ONE; 20], &[2, 4, 5], Layout::Nchw).unwrap();
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
    // parameter dtype is checked even when no parameter is passed
    let e = op.forward(&x, DeviceAffine::none()).unwrap_err();
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

/// Channels-last and GN + SiLU on the GPU against the f64 reference, every dtype pair, every
/// path: the same checks as the emulated suite (tests/gpu_emulated.rs), on the hardware.
fn layout_silu_case<T: Element, P: Element>(
    gpu: &Gpu,
    dims: &[usize],
    groups: usize,
    layout: Layout,
    silu: bool,
    x_mean: f64,
    f32_abs: f64,
) {
    let act = if silu {
        groupnorm::Activation::Silu
    } else {
        groupnorm::Activation::None
    };
    let c = dims[1];
    let numel: usize = dims.iter().product();
    let gn = GroupNorm::new(groups, c)
        .unwrap()
        .with_layout(layout)
        .with_activation(act);
    let mut r = rng(1200 + numel as u64);
    let x: Vec<T> = normal_vec(&mut r, numel, x_mean, 1.0);
    let dy: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<P> = normal_vec(&mut r, c, 0.0, 0.5);
    let rf = reference::forward(&gn, &x, dims, Some(&w[..]), Some(&b[..])).unwrap();
    let rb = reference::backward_activated(&gn, &dy, &x, dims, Some(&w[..]), Some(&b[..])).unwrap();
    let geo = gn.geometry(dims).unwrap();
    let (w64, b64) = (to_f64(&w), to_f64(&b));
    let dz = reference::pre_activation_grad_f64(
        &geo,
        gn.eps(),
        act,
        &to_f64(&dy),
        &to_f64(&x),
        Some(&w64),
        Some(&b64),
    );
    let scale = dx_scale(&dz, dims, groups, layout, Some(&w64), &rf.rstd);
    let xd = DeviceTensor::from_host(gpu, &x, dims, layout).unwrap();
    let dyd = DeviceTensor::from_host(gpu, &dy, dims, layout).unwrap();
    let (wd, bd) = (up(gpu, &w), up(gpu, &b));
    for path in PATHS {
        let mut op = gn.on_gpu(gpu).with_path(path);
        let ctx = format!(
            "{dims:?} G={groups} {} silu={silu} {}/{} {path:?} ({})",
            layout.name(),
            T::DTYPE,
            P::DTYPE,
            op.describe_path::<T>(dims, false).unwrap_or_default()
        );
        let (y, stats) = match op.forward(&xd, DeviceAffine::new().weight(&wd).bias(&bd)) {
            Ok(v) => v,
            Err(Error::PathUnavailable { .. }) if refusable(path) => continue,
            Err(e) => panic!("{ctx}: forward: {e}"),
        };
        assert_forward_close(
            &y.to_host(gpu).unwrap(),
            &rf.y,
            f32_abs,
            &format!("{ctx}: y"),
        );
        let g = match op.backward(
            &dyd,
            &xd,
            &stats,
            DeviceAffine::new().weight(&wd).bias(&bd),
            true,
        ) {
            Ok(g) => g,
            Err(Error::PathUnavailable { .. }) if refusable(path) => continue,
            Err(e) => panic!("{ctx}: backward: {e}"),
        };
        assert_dx_close(
            &g.dx.to_host(gpu).unwrap(),
            &rb.dx,
            scale,
            &format!("{ctx}: dx"),
        );
        assert_param_grad_close(
            &down(gpu, g.dweight.as_ref().unwrap()),
            &rb.dweight,
            "dweight",
            &ctx,
        );
        assert_param_grad_close(
            &down(gpu, g.dbias.as_ref().unwrap()),
            &rb.dbias,
            "dbias",
            &ctx,
        );
    }
}

#[test]
fn nhwc_and_silu_parity() {
    let Some(gpu) = gpu_or_skip("nhwc_and_silu_parity") else {
        return;
    };
    let shapes: [(&[usize], usize); 6] = [
        (&[2, 32, 5, 7], 32),
        (&[2, 24, 3, 11], 6),
        (&[2, 320, 16, 16], 32),
        (&[1, 128, 64, 64], 32),
        (&[2, 6, 13], 1),
        (&[1, 64, 2, 3, 5], 4),
    ];
    for (dims, groups) in shapes {
        for (layout, silu) in [
            (Layout::Nhwc, false),
            (Layout::Nchw, true),
            (Layout::Nhwc, true),
        ] {
            let f = F32_FORWARD_ABS;
            layout_silu_case::<f32, f32>(&gpu, dims, groups, layout, silu, 0.0, f);
            layout_silu_case::<f16, f32>(&gpu, dims, groups, layout, silu, 0.0, f);
            layout_silu_case::<f16, f16>(&gpu, dims, groups, layout, silu, 0.0, f);
            layout_silu_case::<bf16, f32>(&gpu, dims, groups, layout, silu, 0.0, f);
            layout_silu_case::<bf16, bf16>(&gpu, dims, groups, layout, silu, 0.0, f);
        }
    }
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let f = F32_FORWARD_OFFSET_ABS;
        layout_silu_case::<f32, f32>(&gpu, &[2, 64, 32, 32], 32, layout, true, 1e4, f);
    }
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
    for (dims, groups) in [
        (&[1usize, 320, 64, 64][..], 32),
        (&[1, 128, 128, 128][..], 32),
        (&[2, 64, 37, 41][..], 8),
    ] {
        all_dtypes(&gpu, dims, groups, 1300, PLAIN);
        for silu in [false, true] {
            let f = F32_FORWARD_ABS;
            layout_silu_case::<f16, f32>(&gpu, dims, groups, Layout::Nchw, silu, 0.0, f);
        }
    }
    let f = F32_FORWARD_OFFSET_ABS;
    layout_silu_case::<f32, f32>(&gpu, &[1, 64, 64, 64], 8, Layout::Nchw, true, 1e4, f);
    // the largest VAE rows: 2 MiB of f16 per row, forward on a cluster of pieces
    let vae = [1usize, 128, 512, 512];
    let path = GroupNorm::new(32, 128)
        .unwrap()
        .on_gpu(&gpu)
        .describe_path::<f16>(&vae, false)
        .unwrap();
    eprintln!("cluster_path: 1x128x512x512 f16 forward takes `{path}`");
    layout_silu_case::<f16, f32>(&gpu, &vae, 32, Layout::Nchw, false, 0.0, F32_FORWARD_ABS);
}
