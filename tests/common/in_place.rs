//! In-place forward passes on the emulator (`y` aliasing `x`), for issue 15.
//!
//! The raw layer accepts `y == x` exactly where the plan is the fused path and refuses it with
//! `Error::Aliased` on the split and cluster paths (src/gpu/raw.rs, `prepare_forward`).
//! `emulate::forward_in_place` hands the kernels one buffer as both, as a caller of the raw
//! layer would. Compiled into tests/gpu_emulated.rs.
#![allow(dead_code)]

use crate::common::*;
use groupnorm::gpu::emulate;
use groupnorm::gpu::{DeviceLimits, Path};
use groupnorm::{f16, Error, GroupNorm, Layout, Stats};

/// On every path and layout: where the forward plan is fused, in place gives the out-of-place
/// result bit for bit (y and the statistics); elsewhere it is refused with `Error::Aliased`
/// naming `y` and `x`, and `x` is left as it was (nothing was launched).
#[test]
fn in_place_forward_is_exact_on_the_fused_path_and_refused_elsewhere() {
    let small = DeviceLimits::new(4, 8 * 1024, 0);
    let clusters = DeviceLimits::new(4, 8 * 1024, 8);
    let medium = DeviceLimits::new(8, 48 * 1024, 0);
    let cases: [(&[usize], usize, Layout, DeviceLimits); 6] = [
        (&[4, 16, 8, 8], 4, Layout::Nchw, small), // fused when planned
        (&[2, 32, 296], 2, Layout::Nchw, small),  // split into chunks of channels
        (&[1, 4, 5000], 2, Layout::Nchw, small),  // split into pieces of a channel
        (&[1, 4, 3000], 2, Layout::Nchw, clusters), // cluster
        (&[2, 24, 3, 11], 6, Layout::Nhwc, small), // NHWC tiles of several groups
        (&[1, 1040, 2, 3], 2, Layout::Nhwc, medium), // NHWC tile wider than the block
    ];
    let mut fused_ran = 0;
    let mut refused = 0;
    for (i, (dims, groups, layout, limits)) in cases.into_iter().enumerate() {
        let c = dims[1];
        let numel: usize = dims.iter().product();
        let rows = dims[0] * groups;
        let mut r = rng(1700 + i as u64);
        let x: Vec<f16> = normal_vec(&mut r, numel, 0.0, 1.0);
        let w: Vec<f32> = uniform_vec(&mut r, c, 0.5, 1.5);
        let b: Vec<f32> = normal_vec(&mut r, c, 0.0, 0.5);
        let gn = GroupNorm::new(groups, c).unwrap().with_layout(layout);
        let nan_stats = || Stats {
            mean: vec![f32::NAN; rows],
            rstd: vec![f32::NAN; rows],
        };
        let bits = |v: &[f16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for path in [Path::Auto, Path::Fused, Path::Split, Path::Cluster] {
            let ctx = format!("{dims:?} {} {path:?} on {limits:?}", layout.name());
            let mut y = vec![f16::NAN; numel];
            let mut stats = nan_stats();
            let t = match emulate::forward_into(
                &gn,
                path,
                limits,
                &x,
                dims,
                Some(&w[..]),
                Some(&b[..]),
                &mut y,
                &mut stats,
            ) {
                Ok(t) => t,
                Err(Error::PathUnavailable { .. }) if path != Path::Auto => continue,
                Err(e) => panic!("{ctx}: out of place: {e}"),
            };
            let mut xy = x.clone();
            let mut st = nan_stats();
            let r = emulate::forward_in_place(
                &gn,
                path,
                limits,
                &mut xy,
                dims,
                Some(&w[..]),
                Some(&b[..]),
                &mut st,
            );
            match (t.fused, r) {
                (true, Ok(t2)) => {
                    assert!(t2.fused, "{ctx}: the in-place plan differs");
                    assert_eq!(
                        bits(&xy),
                        bits(&y),
                        "{ctx}: in place differs from out of place"
                    );
                    assert_eq!(st, stats, "{ctx}: statistics differ");
                    fused_ran += 1;
                }
                (false, Err(Error::Aliased { output, input, .. })) => {
                    assert_eq!((output, input), ("y", "x"), "{ctx}");
                    assert_eq!(bits(&xy), bits(&x), "{ctx}: x written though refused");
                    refused += 1;
                }
                (fused, r) => panic!("{ctx}: fused={fused}, in place gave {r:?}"),
            }
        }
    }
    // both outcomes were exercised, NCHW and NHWC fused among them
    assert!(
        fused_ran >= 4 && refused >= 4,
        "{fused_ran} fused, {refused} refused"
    );
}
