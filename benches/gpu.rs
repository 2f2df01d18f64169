//! GPU forward and backward per dtype on a few Stable Diffusion shapes, with criterion.
//!
//! Each sample is timed with CUDA events on the op's stream (`iter_custom`), so the time is the
//! GPU's, not the launch overhead's. Throughput is the minimum traffic: forward reads x and writes
//! y (2 tensor passes), backward reads x and dy and writes dx (3). Without a usable GPU this bench
//! prints why and measures nothing; `groupnorm bench` is the fuller tool (copy bandwidth, baseline,
//! rotation of inputs beyond L2).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use groupnorm::gpu::DeviceAffine;
use groupnorm::gpu::{upload, DeviceStats, DeviceTensor, Gpu};
use groupnorm::{f16, Element, GroupNorm, Layout};
use std::time::Duration;

const SHAPES: &[(&[usize], usize)] = &[
    (&[1, 320, 64, 64], 32),
    (&[2, 640, 32, 32], 32),
    (&[8, 1280, 16, 16], 32),
    (&[1, 128, 256, 256], 32),
];

fn bench_dtype<T: Element>(c: &mut Criterion, gpu: &Gpu) {
    let mut group = c.benchmark_group(format!("gpu/{}", T::DTYPE));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(2));
    for &(dims, groups) in SHAPES {
        let numel: usize = dims.iter().product();
        let ch = dims[1];
        let id = dims
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let gn = GroupNorm::new(groups, ch).expect("valid shape");
        let x: Vec<T> = (0..numel)
            .map(|i| T::from_f32(((i * 7919) % 1000) as f32 / 500.0 - 1.0))
            .collect();
        let xd = DeviceTensor::from_host(gpu, &x, dims, Layout::Nchw).expect("upload");
        let dyd = DeviceTensor::from_host(gpu, &x, dims, Layout::Nchw).expect("upload");
        let w = upload(gpu.stream(), &vec![1.0f32; ch]).expect("upload");
        let b = upload(gpu.stream(), &vec![0.0f32; ch]).expect("upload");
        let mut y = DeviceTensor::<T>::zeros(gpu, dims, Layout::Nchw).expect("alloc");
        let mut dx = DeviceTensor::<T>::zeros(gpu, dims, Layout::Nchw).expect("alloc");
        let mut stats = DeviceStats::zeros(gpu, dims[0] * groups).expect("alloc");
        let mut dw = upload(gpu.stream(), &vec![0.0f32; ch]).expect("alloc");
        let mut db = upload(gpu.stream(), &vec![0.0f32; ch]).expect("alloc");
        let mut op = gn.on_gpu(gpu);
        let bytes = (numel * T::DTYPE.size()) as u64;

        group.throughput(Throughput::Bytes(2 * bytes));
        group.bench_function(BenchmarkId::new("forward", &id), |bench| {
            bench.iter_custom(|iters| {
                let start = gpu.timing_event().expect("event");
                for _ in 0..iters {
                    op.forward_into(
                        &xd,
                        DeviceAffine::new().weight(&w).bias(&b),
                        &mut y,
                        &mut stats,
                    )
                    .expect("forward");
                }
                let end = gpu.timing_event().expect("event");
                Duration::from_secs_f64(Gpu::elapsed_ms(&start, &end).expect("timing") / 1e3)
            })
        });
        group.throughput(Throughput::Bytes(3 * bytes));
        group.bench_function(BenchmarkId::new("backward", &id), |bench| {
            bench.iter_custom(|iters| {
                let start = gpu.timing_event().expect("event");
                for _ in 0..iters {
                    op.backward_into(
                        &dyd,
                        &xd,
                        &stats,
                        DeviceAffine::new().weight(&w),
                        &mut dx,
                        Some(&mut dw),
                        Some(&mut db),
                    )
                    .expect("backward");
                }
                let end = gpu.timing_event().expect("event");
                Duration::from_secs_f64(Gpu::elapsed_ms(&start, &end).expect("timing") / 1e3)
            })
        });
    }
    group.finish();
}

fn gpu_benches(c: &mut Criterion) {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gpu benches skipped: no usable GPU ({e})");
            return;
        }
    };
    bench_dtype::<f16>(c, &gpu);
    bench_dtype::<f32>(c, &gpu);
}

criterion_group!(benches, gpu_benches);
criterion_main!(benches);
