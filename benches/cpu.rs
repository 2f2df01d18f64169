//! CPU benchmarks: the fast path against the f64 reference, forward and backward, f32 and f16,
//! on two shapes from diffusion models.
//!
//! Throughput is the minimum memory traffic of the operation: forward reads `x` and writes `y`
//! (2 tensors), backward reads `x` and `dy` and writes `dx` (3 tensors); statistics and
//! parameters are negligible. Ids read `op/path/dtype/layout/NxCxHxW_gG`.
//!
//! `cargo bench --bench cpu` runs in well under two minutes; `cargo bench --bench cpu -- fast`
//! runs the fast path only.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use groupnorm::cpu::reference;
use groupnorm::Affine;
use groupnorm::{f16, Element, GroupNorm, Layout};
use std::hint::black_box;
use std::time::Duration;

/// `(dims, groups)`: a mid-UNet block and a high-resolution block with a single sample.
const SHAPES: [([usize; 4], usize); 2] = [([2, 320, 32, 32], 32), ([1, 64, 64, 64], 32)];

/// Deterministic data in roughly `[-2, 2)` (no RNG needed to measure speed).
fn data<T: Element>(len: usize, seed: u32) -> Vec<T> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            T::from_f32((state >> 8) as f32 / (1u32 << 22) as f32 - 2.0)
        })
        .collect()
}

fn shape_id(dims: &[usize], groups: usize) -> String {
    let d: Vec<String> = dims.iter().map(|v| v.to_string()).collect();
    format!("{}_g{groups}", d.join("x"))
}

fn bench_dtype<T: Element>(c: &mut Criterion) {
    for (dims, groups) in SHAPES {
        let numel: usize = dims.iter().product();
        let channels = dims[1];
        let x: Vec<T> = data(numel, 1);
        let dy: Vec<T> = data(numel, 2);
        let w: Vec<f32> = (0..channels).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect();
        let b: Vec<f32> = (0..channels).map(|i| (i % 5) as f32 / 5.0 - 0.4).collect();
        let shape = shape_id(&dims, groups);
        let bytes = (numel * T::DTYPE.size()) as u64;

        let mut fwd = c.benchmark_group("forward");
        fwd.throughput(Throughput::Bytes(2 * bytes));
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let gn = GroupNorm::new(groups, channels)
                .unwrap()
                .with_layout(layout);
            let id = format!("fast/{}/{}", T::DTYPE, layout.name());
            fwd.bench_with_input(BenchmarkId::new(id, &shape), &gn, |bch, gn| {
                bch.iter(|| {
                    gn.forward(black_box(&x), &dims, Affine::new().weight(&w).bias(&b))
                        .unwrap()
                })
            });
        }
        let gn = GroupNorm::new(groups, channels).unwrap();
        let id = format!("reference/{}/nchw", T::DTYPE);
        fwd.bench_with_input(BenchmarkId::new(id, &shape), &gn, |bch, gn| {
            bch.iter(|| reference::forward(gn, black_box(&x), &dims, Some(&w), Some(&b)).unwrap())
        });
        fwd.finish();

        let mut bwd = c.benchmark_group("backward");
        bwd.throughput(Throughput::Bytes(3 * bytes));
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let gn = GroupNorm::new(groups, channels)
                .unwrap()
                .with_layout(layout);
            let (_, stats) = gn.forward(&x, &dims, Affine::new().weight(&w)).unwrap();
            let id = format!("fast/{}/{}", T::DTYPE, layout.name());
            bwd.bench_with_input(BenchmarkId::new(id, &shape), &gn, |bch, gn| {
                bch.iter(|| {
                    gn.backward(
                        black_box(&dy),
                        black_box(&x),
                        &dims,
                        &stats,
                        Affine::new().weight(&w),
                        true,
                    )
                    .unwrap()
                })
            });
        }
        let id = format!("reference/{}/nchw", T::DTYPE);
        bwd.bench_with_input(BenchmarkId::new(id, &shape), &gn, |bch, gn| {
            bch.iter(|| {
                reference::backward(gn, black_box(&dy), black_box(&x), &dims, Some(&w)).unwrap()
            })
        });
        bwd.finish();
    }
}

fn benches(c: &mut Criterion) {
    bench_dtype::<f32>(c);
    bench_dtype::<f16>(c);
}

criterion_group! {
    name = cpu;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(cpu);
