//! A subset small enough for Miri (`cargo +nightly miri test --test miri_subset`): the CPU path
//! (its chunking, rayon and the 16-bit conversions) on tiny problems against the f64 reference,
//! so the `unsafe` it uses is checked by Miri, not trusted. The C ABI's argument checking has its
//! own subset, capi/tests/miri_capi.rs. Also runs as an ordinary test.
//!
//! Miri flags: `MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-permissive-provenance -Zmiri-ignore-leaks"`:
//! crossbeam-epoch (under rayon) breaks Stacked Borrows in its own code, and rayon's global
//! pool never joins its threads.

mod common;

use common::*;
use groupnorm::cpu::reference;
use groupnorm::Affine;
use groupnorm::{bf16, f16, Activation, Element, GroupNorm, Layout};

fn cpu_case<T: Element, P: Element>(dims: &[usize], groups: usize, layout: Layout, silu: bool) {
    let act = if silu {
        Activation::Silu
    } else {
        Activation::None
    };
    let gn = GroupNorm::new(groups, dims[1])
        .unwrap()
        .with_layout(layout)
        .with_activation(act);
    let numel: usize = dims.iter().product();
    let c = dims[1];
    let mut r = rng(7 + numel as u64);
    let x: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let dy: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<P> = normal_vec(&mut r, c, 0.0, 0.5);
    for (wh, bh) in [
        (None, None),
        (Some(&w[..]), None),
        (None, Some(&b[..])),
        (Some(&w[..]), Some(&b[..])),
    ] {
        let ctx = format!(
            "{dims:?} {layout:?} silu={silu} w={} b={}",
            wh.is_some(),
            bh.is_some()
        );
        let refd = reference::forward(&gn, &x, dims, wh, bh).unwrap();
        let (y, stats) = gn
            .forward(
                &x,
                dims,
                Affine {
                    weight: wh,
                    bias: bh,
                },
            )
            .unwrap();
        assert_forward_close(&y, &refd.y, F32_FORWARD_ABS, &ctx);
        assert_stats_close(&stats, &refd, F32_FORWARD_ABS, &ctx);
        let g = gn
            .backward(
                &dy,
                &x,
                dims,
                &stats,
                Affine {
                    weight: wh,
                    bias: bh,
                },
                true,
            )
            .unwrap();
        let rg = reference::backward_activated(&gn, &dy, &x, dims, wh, bh).unwrap();
        assert_eq!(g.dx.len(), numel, "{ctx}");
        assert_param_grad_close(&g.dbias.unwrap(), &rg.dbias, "dbias", &ctx);
        if wh.is_some() {
            assert_param_grad_close(&g.dweight.unwrap(), &rg.dweight, "dweight", &ctx);
        }
    }
}

#[test]
fn cpu_path_on_tiny_problems() {
    for layout in LAYOUTS {
        for silu in [false, true] {
            cpu_case::<f32, f32>(&[2, 4, 3], 2, layout, silu);
            cpu_case::<f16, f32>(&[1, 6, 5], 3, layout, silu);
            cpu_case::<bf16, bf16>(&[2, 2, 2, 2], 1, layout, silu);
        }
    }
    // empty tensors
    let gn = GroupNorm::new(2, 4).unwrap();
    let (y, stats) = gn
        .forward::<f32, f32>(&[], &[0, 4, 3], Affine::new())
        .unwrap();
    assert!(y.is_empty() && stats.mean.is_empty());
    let (y, stats) = gn
        .forward::<f32, f32>(&[], &[2, 4, 0], Affine::new())
        .unwrap();
    assert!(y.is_empty() && stats.mean.len() == 4);
}
