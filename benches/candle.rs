//! candle benchmarks (`cargo bench --features candle --bench candle`): this crate's op against
//! `candle_nn::GroupNorm` on the same tensors, forward alone and a training step (forward, then
//! backward through candle's autograd to `dx`, `dweight` and `dbias`), f32 and f16.
//!
//! On the CPU always; with `--features candle-cuda` on CUDA device 0 too, when there is one
//! (a line on stderr says why not otherwise). Ids read `step/impl/device/dtype/NxCxHxW_gG`.
//!
//! With `GROUPNORM_CANDLE_CSV=FILE` set it skips criterion and times `candle_nn::GroupNorm` on
//! CPU tensors the way `groupnorm bench --device cpu` times ours, for
//! `scripts/compare_bench.py --candle FILE`: shapes from `GROUPNORM_CANDLE_SHAPES` (the CLI's
//! `2x320x64x64:32,...` syntax), f32, f16 and bf16 with parameters of the same dtype, NCHW
//! (candle_nn's op wants contiguous NCHW), median of `GROUPNORM_CANDLE_RUNS` (default 20) runs
//! after 3 warm-ups, inputs rotated past a 32 MiB last-level cache as the CLI does. `fwd` is the
//! forward alone; `bwd` is candle's autograd from a retained graph (`(y * dy).sum_all()` then
//! `backward()`, which also computes that product and sum), as bench_torch.py times
//! `torch.autograd.grad` with `retain_graph=True`. Threads: candle's CPU ops follow
//! `RAYON_NUM_THREADS`.

#[cfg(feature = "candle")]
mod imp {
    use candle_core::{DType, Device, Module, Tensor, Var};
    use criterion::{criterion_group, BenchmarkId, Criterion};
    use std::hint::black_box;
    use std::time::Duration;

    /// `(dims, groups)`: a mid-UNet block and a high-resolution block with a single sample.
    const SHAPES: [([usize; 4], usize); 2] = [([2, 320, 32, 32], 32), ([1, 64, 64, 64], 32)];

    fn shape_id(dims: &[usize], groups: usize) -> String {
        let d: Vec<String> = dims.iter().map(|v| v.to_string()).collect();
        format!("{}_g{groups}", d.join("x"))
    }

    /// The devices to measure on: the CPU, and CUDA device 0 when built for it and present.
    fn devices() -> Vec<(&'static str, Device)> {
        let mut out = vec![("cpu", Device::Cpu)];
        if cfg!(feature = "candle-cuda") {
            if groupnorm::gpu::driver_present() {
                match Device::new_cuda(0) {
                    Ok(d) => out.push(("cuda", d)),
                    Err(e) => eprintln!("candle bench: no CUDA device ({e}): CPU only"),
                }
            } else {
                eprintln!("candle bench: no CUDA driver: CPU only");
            }
        }
        out
    }

    /// Waits for a device's queued work, so a measured iteration includes it.
    fn sync(device: &Device) {
        device.synchronize().expect("device synchronize");
    }

    type Forward = fn(&Tensor, &Tensor, &Tensor, usize) -> candle_core::Result<Tensor>;

    fn ours(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize) -> candle_core::Result<Tensor> {
        groupnorm::candle::group_norm(x, Some(w), Some(b), groups, 1e-5)
    }

    fn candle_nn(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize) -> candle_core::Result<Tensor> {
        candle_nn::GroupNorm::new(w.clone(), b.clone(), x.dim(1)?, groups, 1e-5)?.forward(x)
    }

    fn bench(c: &mut Criterion) {
        let impls: [(&str, Forward); 2] = [("groupnorm", ours), ("candle_nn", candle_nn)];
        for (dev_name, device) in devices() {
            for dtype in [DType::F32, DType::F16] {
                for (dims, groups) in SHAPES {
                    let shape = shape_id(&dims, groups);
                    let channels = dims[1];
                    let x = Tensor::randn(0f32, 1., &dims[..], &device)
                        .and_then(|t| t.to_dtype(dtype))
                        .expect("x");
                    let dy = Tensor::randn(0f32, 1., &dims[..], &device)
                        .and_then(|t| t.to_dtype(dtype))
                        .expect("dy");
                    let w = Tensor::randn(1f32, 0.5, channels, &device)
                        .and_then(|t| t.to_dtype(dtype))
                        .expect("weight");
                    let b = Tensor::randn(0f32, 0.5, channels, &device)
                        .and_then(|t| t.to_dtype(dtype))
                        .expect("bias");
                    let (xv, wv, bv) = (
                        Var::from_tensor(&x).expect("x var"),
                        Var::from_tensor(&w).expect("w var"),
                        Var::from_tensor(&b).expect("b var"),
                    );
                    let dtype_name = format!("{dtype:?}").to_lowercase();
                    for (name, f) in impls {
                        let id = format!("{name}/{dev_name}/{dtype_name}");
                        let mut fwd = c.benchmark_group("forward");
                        fwd.bench_with_input(BenchmarkId::new(&id, &shape), &(), |bch, _| {
                            bch.iter(|| {
                                let y = f(black_box(&x), &w, &b, groups).expect("forward");
                                sync(&device);
                                y
                            })
                        });
                        fwd.finish();
                        let mut step = c.benchmark_group("train_step");
                        step.bench_with_input(BenchmarkId::new(&id, &shape), &(), |bch, _| {
                            bch.iter(|| {
                                let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), groups)
                                    .expect("forward");
                                let loss = (y * &dy).and_then(|t| t.sum_all()).expect("loss");
                                let grads = loss.backward().expect("backward");
                                sync(&device);
                                grads
                            })
                        });
                        step.finish();
                    }
                }
            }
        }
    }

    /// The CSV mode (see the file's documentation).
    pub fn csv(path: &str) {
        use std::io::Write as _;
        use std::time::Instant;
        let shapes = std::env::var("GROUPNORM_CANDLE_SHAPES")
            .unwrap_or_else(|_| "2x320x64x64:32,4x64x16x16:32".into());
        let runs: usize = std::env::var("GROUPNORM_CANDLE_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        // memcpy bandwidth, as the CLI measures it
        let bytes = 256usize << 20;
        let (src, mut dst) = (vec![1u8; bytes], vec![0u8; bytes]);
        let mut times = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            black_box(&mut dst);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let copy = 2.0 * bytes as f64 / median(times) / 1e6;
        drop((src, dst));
        let mut out = std::fs::File::create(path).expect("create the CSV file");
        writeln!(
            out,
            "impl,device,shape,dtype,pass,path,time_ms,gbps,pct_copy,copy_gbps"
        )
        .expect("write");
        let device = Device::Cpu;
        for spec in shapes.split(',') {
            let (dims_s, groups) = spec.split_once(':').unwrap_or((spec, "32"));
            let dims: Vec<usize> = dims_s
                .split('x')
                .map(|d| d.parse().expect("a dimension"))
                .collect();
            let groups: usize = groups.parse().expect("a group count");
            let numel: usize = dims.iter().product();
            for (dtype, name, size) in [
                (DType::F32, "f32", 4),
                (DType::F16, "f16", 2),
                (DType::BF16, "bf16", 2),
            ] {
                eprintln!("candle csv: {spec} {name} ...");
                let nbytes = numel * size;
                let llc = 32usize << 20;
                let copies = if 2 * nbytes < 3 * llc {
                    (3 * llc).div_ceil(2 * nbytes).clamp(2, 16)
                } else {
                    1
                };
                let make = |mean: f32, std: f32, shape: &[usize]| {
                    Tensor::randn(mean, std, shape, &device)
                        .and_then(|t| t.to_dtype(dtype))
                        .expect("tensor")
                };
                let xs: Vec<Var> = (0..copies)
                    .map(|_| Var::from_tensor(&make(0.0, 1.0, &dims)).expect("var"))
                    .collect();
                let dys: Vec<Tensor> = (0..copies).map(|_| make(0.0, 1.0, &dims)).collect();
                let w = Var::from_tensor(&make(1.0, 0.1, &[dims[1]])).expect("var");
                let b = Var::from_tensor(&make(0.0, 0.1, &[dims[1]])).expect("var");
                let gn = candle_nn::GroupNorm::new(
                    w.as_tensor().clone(),
                    b.as_tensor().clone(),
                    dims[1],
                    groups,
                    1e-5,
                )
                .expect("candle_nn::GroupNorm");
                let time = |f: &dyn Fn(usize)| {
                    let mut t = Vec::new();
                    for i in 0..3 + runs {
                        let s = Instant::now();
                        f(i % copies);
                        if i >= 3 {
                            t.push(s.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    median(t)
                };
                let fwd = time(&|k| {
                    black_box(gn.forward(xs[k].as_tensor()).expect("forward"));
                });
                let ys: Vec<Tensor> = xs
                    .iter()
                    .map(|x| gn.forward(x.as_tensor()).expect("forward"))
                    .collect();
                let bwd = time(&|k| {
                    let loss = (&ys[k] * &dys[k]).and_then(|t| t.sum_all()).expect("loss");
                    black_box(loss.backward().expect("backward"));
                });
                for (pass, ms, passes) in [("fwd", fwd, 2.0), ("bwd", bwd, 3.0)] {
                    let gbps = passes * nbytes as f64 / ms / 1e6;
                    writeln!(
                        out,
                        "candle_nn,cpu,{spec},{name}/{name},{pass},candle_nn,{ms:.6},{gbps:.2},{:.2},{copy:.2}",
                        100.0 * gbps / copy
                    )
                    .expect("write");
                }
            }
        }
    }

    criterion_group! {
        name = benches;
        config = Criterion::default()
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        targets = bench
    }
}

#[cfg(feature = "candle")]
fn main() {
    if let Ok(path) = std::env::var("GROUPNORM_CANDLE_CSV") {
        imp::csv(&path);
        return;
    }
    imp::benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}

/// Without the feature there is nothing to measure (Cargo.toml's `required-features` normally
/// keeps this target from being built at all).
#[cfg(not(feature = "candle"))]
fn main() {
    eprintln!("the candle benchmarks need `--features candle`");
}
