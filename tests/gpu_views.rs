//! Borrowed device tensors: the GPU operations take a `DeviceView` of a buffer the caller keeps
//! (and write through a `DeviceViewMut`) exactly as they take an owned `DeviceTensor`.
//!
//! These need a GPU; without one each test prints why it is skipped (and fails under
//! `GROUPNORM_REQUIRE_GPU=1`, as the GPU machine's runner sets it).

mod common;
mod gpu_support;

use common::*;
use gpu_support::*;
use groupnorm::gpu::{DeviceAffine, DeviceTensor, DeviceView, DeviceViewMut};
use groupnorm::{f16, Error, GroupNorm, Layout};

/// A view at an element offset into a larger buffer the caller keeps gives the same bits as the
/// owned tensor holding the same values, forward and backward, and writes only its own range.
#[test]
fn views_of_caller_buffers_match_owned_tensors() {
    let Some(gpu) = gpu_or_skip("views_of_caller_buffers_match_owned_tensors") else {
        return;
    };
    let mut rng = rng(4417);
    let dims = [2usize, 8, 5, 3];
    let n: usize = dims.iter().product();
    // an odd offset: the view starts at an element that is not 16-byte aligned
    let pad = 3;
    let x: Vec<f16> = normal_vec(&mut rng, n, 0.5, 2.0);
    let dy: Vec<f16> = normal_vec(&mut rng, n, 0.0, 1.0);
    let w = up(&gpu, &uniform_vec::<f32>(&mut rng, 8, 0.5, 1.5));
    let b = up(&gpu, &uniform_vec::<f32>(&mut rng, 8, -1.0, 1.0));
    let affine = DeviceAffine::new().weight(&w).bias(&b);
    let gn = GroupNorm::new(4, 8).unwrap();
    let mut op = gn.on_gpu(&gpu);

    let owned_x = DeviceTensor::from_host(&gpu, &x, &dims, Layout::Nchw).unwrap();
    let owned_dy = DeviceTensor::from_host(&gpu, &dy, &dims, Layout::Nchw).unwrap();
    let (y_owned, st_owned) = op.forward(&owned_x, affine).unwrap();
    let g_owned = op
        .backward(&owned_dy, &owned_x, &st_owned, affine, true)
        .unwrap();

    let framed = |v: &[f16]| {
        let mut h = vec![f16::from_f32(7.0); pad];
        h.extend_from_slice(v);
        h.extend(vec![f16::from_f32(7.0); pad]);
        h
    };
    let xbuf = up(&gpu, &framed(&x));
    let dybuf = up(&gpu, &framed(&dy));
    let xv = DeviceView::with_offset(&xbuf, pad, &dims, Layout::Nchw).unwrap();
    let dyv = DeviceView::with_offset(&dybuf, pad, &dims, Layout::Nchw).unwrap();
    let mut ybuf = up(&gpu, &nans::<f16>(n + 2 * pad));
    let mut st = groupnorm::gpu::DeviceStats::zeros(&gpu, 2 * 4).unwrap();
    {
        let mut yv = DeviceViewMut::with_offset(&mut ybuf, pad, &dims, Layout::Nchw).unwrap();
        op.forward_into(&xv, affine, &mut yv, &mut st).unwrap();
    }
    let y = down(&gpu, &ybuf);
    assert!(
        y[..pad].iter().chain(&y[pad + n..]).all(|v| v.is_nan()),
        "wrote outside the view"
    );
    assert_eq!(
        y[pad..pad + n]
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        y_owned
            .to_host(&gpu)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    );
    let g = op.backward(&dyv, &xv, &st, affine, true).unwrap();
    assert_eq!(
        g.dx.to_host(&gpu)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        g_owned
            .dx
            .to_host(&gpu)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    );
    // the caller's buffers are still the caller's: readable after the calls, unchanged
    assert_eq!(down(&gpu, &xbuf), framed(&x));
}

/// A view that claims more elements than its buffer holds is a typed error, not a launch.
#[test]
fn views_past_their_buffer_are_refused() {
    let Some(gpu) = gpu_or_skip("views_past_their_buffer_are_refused") else {
        return;
    };
    let buf = up(&gpu, &[0.0f32; 10]);
    let e = DeviceView::with_offset(&buf, 1, &[1, 2, 5], Layout::Nchw).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    let e = DeviceView::new(&buf, &[1 << 40, 1 << 40, 1 << 40], Layout::Nchw).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}
