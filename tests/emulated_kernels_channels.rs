//! NCHW chunks of many short channels, run by the real kernels in the host emulator: the
//! normalize and dx loops hand each 16-byte vector its channel's coefficients from a lane of
//! its warp (kernels/common.cuh, `for_vectors_by_channel`), in windows of 32 channels. These
//! shapes put many windows in one warp's run, windows that end inside a round of 32 vectors,
//! channels of 1, 2, 3, 5 and 10 vectors, and runs that start inside a channel, on the fused,
//! split and cluster paths, with and without SiLU, weight and bias. Held to the f64 reference
//! at the tolerances of docs/design.md ("Accuracy targets", as tests/gpu_emulated.rs).
//!
//! Run: `cargo test --release --features emulate --test emulated_kernels_channels`.
#![cfg(feature = "emulate")]

mod common;

use common::*;
use groupnorm::cpu::reference;
use groupnorm::gpu::emulate::{self, HostBuffer};
use groupnorm::gpu::{DeviceLimits, Path};
use groupnorm::{bf16, f16, Activation, Element, Error, GroupNorm, Stats};

/// Room for fused rows of a few thousand values; clusters of up to 8 blocks.
const DEVICE: DeviceLimits = DeviceLimits::new(4, 48 * 1024, 8);
/// Little shared memory: the same rows are split into chunks of several channels.
const SMALL: DeviceLimits = DeviceLimits::new(4, 8 * 1024, 8);

fn nan<E: Element>() -> E {
    E::from_f64(f64::NAN)
}

/// Forward and backward of one case on `path`, against the f64 reference. Returns whether the
/// vector kernels ran (false where the path refused the shape).
fn check<T: Element, P: Element>(
    dims: &[usize],
    groups: usize,
    silu: bool,
    affine: (bool, bool),
    path: Path,
    limits: DeviceLimits,
    seed: u64,
) -> bool {
    let ctx = format!(
        "{dims:?} G={groups} {}/{} silu={silu} affine={affine:?} {path:?} {limits:?}",
        T::DTYPE,
        P::DTYPE
    );
    let act = if silu {
        Activation::Silu
    } else {
        Activation::None
    };
    let gn = GroupNorm::new(groups, dims[1])
        .unwrap()
        .with_activation(act);
    let c = dims[1];
    let numel: usize = dims.iter().product();
    let rows = dims[0] * groups;
    let mut r = rng(seed);
    let x: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<P> = normal_vec(&mut r, c, 0.0, 0.5);
    let dy: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let wh = affine.0.then_some(&w[..]);
    let bh = affine.1.then_some(&b[..]);
    let reference = reference::forward(&gn, &x, dims, wh, bh).unwrap();
    let grads = reference::backward_activated(&gn, &dy, &x, dims, wh, bh).unwrap();

    let mut y = HostBuffer::filled(numel, nan::<T>(), 0);
    let mut stats = Stats {
        mean: vec![f32::NAN; rows],
        rstd: vec![f32::NAN; rows],
    };
    let xb = HostBuffer::new(&x, 0);
    let fwd = match emulate::forward_into(
        &gn,
        path,
        limits,
        xb.as_slice(),
        dims,
        wh,
        bh,
        y.as_mut_slice(),
        &mut stats,
    ) {
        Ok(t) => t,
        Err(Error::PathUnavailable { .. }) if matches!(path, Path::Fused | Path::Cluster) => {
            return false
        }
        Err(e) => panic!("{ctx}: forward: {e}"),
    };
    let ctx = format!("{ctx} fwd={fwd:?}");
    assert_forward_close(
        y.as_slice(),
        &reference.y,
        F32_FORWARD_ABS,
        &format!("{ctx}: y"),
    );
    assert_stats_close(
        &stats,
        &reference,
        F32_FORWARD_ABS,
        &format!("{ctx}: stats"),
    );

    let w64 = affine.0.then(|| to_f64(&w));
    let b64 = affine.1.then(|| to_f64(&b));
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
    let dyb = HostBuffer::new(&dy, 0);
    let mut dx = HostBuffer::filled(numel, nan::<T>(), 0);
    let mut dw = HostBuffer::filled(c, nan::<P>(), 0);
    let mut db = HostBuffer::filled(c, nan::<P>(), 0);
    match emulate::backward_into(
        &gn,
        path,
        limits,
        dyb.as_slice(),
        xb.as_slice(),
        dims,
        &stats,
        wh,
        bh,
        dx.as_mut_slice(),
        affine.0.then(|| dw.as_mut_slice()),
        Some(db.as_mut_slice()),
    ) {
        Ok(bwd) => {
            let ctx = format!("{ctx} bwd={bwd:?}");
            assert_dx_close(dx.as_slice(), &grads.dx, scale, &format!("{ctx}: dx"));
            if affine.0 {
                assert_param_grad_close(dw.as_slice(), &grads.dweight, "dweight", &ctx);
            }
            assert_param_grad_close(db.as_slice(), &grads.dbias, "dbias", &ctx);
        }
        Err(Error::PathUnavailable { .. }) if matches!(path, Path::Fused | Path::Cluster) => {}
        Err(e) => panic!("{ctx}: backward: {e}"),
    }
    fwd.vec
}

fn every_case<T: Element, P: Element>(seed: u64) {
    // (dims, groups): channels of S = 8, 16, 24, 40, 80 values (1..10 vectors of f16, 2..20 of
    // f32) and 48..192 channels per row, so that a warp's run crosses several 32-channel windows
    for (i, (dims, groups)) in [
        (&[2usize, 256, 8][..], 2), // 128 channels of 8
        (&[1, 192, 24], 1),         // 192 channels of 24
        (&[2, 96, 40], 2),          // 48 channels of 40
        (&[1, 64, 16], 1),          // 64 channels of 16
        (&[1, 160, 80], 2),         // 80 channels of 80
    ]
    .into_iter()
    .enumerate()
    {
        for (j, (silu, affine)) in [
            (false, (true, true)),
            (true, (true, true)),
            (false, (false, false)),
            (true, (true, false)),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = seed + 10 * i as u64 + j as u64;
            for (path, limits) in [
                (Path::Fused, DEVICE),
                (Path::Split, SMALL),
                (Path::Cluster, SMALL),
            ] {
                let vec = check::<T, P>(dims, groups, silu, affine, path, limits, seed);
                assert!(
                    vec || matches!(path, Path::Fused | Path::Cluster),
                    "{dims:?} {path:?}: the vector kernels did not run"
                );
            }
        }
    }
}

#[test]
fn many_short_channels_f32() {
    every_case::<f32, f32>(1000);
}

#[test]
fn many_short_channels_f16() {
    every_case::<f16, f16>(2000);
}

#[test]
fn many_short_channels_bf16_f32() {
    every_case::<bf16, f32>(3000);
}
