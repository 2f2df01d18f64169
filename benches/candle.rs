//! candle benchmarks (`cargo bench --features candle --bench candle`): this crate's op against
//! `candle_nn::GroupNorm` on the same tensors, forward alone and a training step (forward, then
//! backward through candle's autograd to `dx`, `dweight` and `dbias`), f32 and f16.
//!
//! On the CPU always; with `--features candle-cuda` on CUDA device 0 too, when there is one
//! (a line on stderr says why not otherwise). Ids read `step/impl/device/dtype/NxCxHxW_gG`.

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
criterion::criterion_main!(imp::benches);

/// Without the feature there is nothing to measure (Cargo.toml's `required-features` normally
/// keeps this target from being built at all).
#[cfg(not(feature = "candle"))]
fn main() {
    eprintln!("the candle benchmarks need `--features candle`");
}
