//! Argument validation of the CPU API: one test per error a caller can provoke, matching the
//! variant and checking that the message carries the numbers needed to fix the call.

use groupnorm::cpu::reference;
use groupnorm::Affine;
use groupnorm::{bf16, f16, DType, Error, GroupNorm, Layout, Stats};

/// Asserts `msg` contains every one of `parts`.
fn assert_mentions(err: &Error, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

fn gn() -> GroupNorm {
    GroupNorm::new(2, 4).unwrap()
}

fn stats(rows: usize) -> Stats {
    Stats {
        mean: vec![0.0; rows],
        rstd: vec![1.0; rows],
    }
}

#[test]
fn zero_groups() {
    let e = GroupNorm::new(0, 4).unwrap_err();
    assert!(matches!(e, Error::ZeroGroups), "{e:?}");
    assert_mentions(&e, &["groups", "0"]);
}

#[test]
fn zero_channels() {
    let e = GroupNorm::new(2, 0).unwrap_err();
    assert!(matches!(e, Error::ZeroChannels), "{e:?}");
    assert_mentions(&e, &["channels", "0"]);
}

#[test]
fn groups_must_divide_channels() {
    let e = GroupNorm::new(3, 4).unwrap_err();
    assert!(
        matches!(
            e,
            Error::GroupsDoNotDivideChannels {
                groups: 3,
                channels: 4
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["channels (4)", "groups (3)"]);
}

#[test]
fn eps_must_be_finite_and_positive_in_f32() {
    // every path computes with `eps as f32`: 1e-50 would become 0 (NaN rows), 1e300 inf
    for eps in [
        -1e-5,
        0.0,
        -0.0,
        1e-50,
        1e-46,
        1e300,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        let e = gn().with_eps(eps).unwrap_err();
        assert!(matches!(e, Error::InvalidEps { .. }), "{eps}: {e:?}");
        assert_mentions(&e, &[&eps.to_string(), "f32", "3.4e38"]);
    }
    // the f32 range's ends are accepted
    for eps in [1e-45, 1e-6, 3.0e38] {
        assert_eq!(gn().with_eps(eps).unwrap().eps(), eps);
    }
}

#[test]
fn fewer_than_two_dims() {
    for dims in [&[][..], &[4]] {
        let e = gn()
            .forward::<f32, f32>(&[0.0; 4], dims, Affine::new())
            .unwrap_err();
        assert!(
            matches!(e, Error::TooFewDims { got, .. } if got == dims.len()),
            "{dims:?}: {e:?}"
        );
        assert_mentions(
            &e,
            &[&format!("got {} dim", dims.len()), &format!("{dims:?}")],
        );
    }
}

#[test]
fn channel_mismatch() {
    let e = gn()
        .forward::<f32, f32>(&[0.0; 30], &[2, 5, 3], Affine::new())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ChannelMismatch {
                expected: 4,
                got: 5,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["[2, 5, 3]", "5 channels", "4 channels"]);
    // NHWC dims are still logical (N, C, *spatial): channels-last order is a mistake.
    let e = gn()
        .with_layout(Layout::Nhwc)
        .forward::<f32, f32>(&[0.0; 24], &[2, 3, 4], Affine::new())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ChannelMismatch {
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn element_count_overflowing_usize() {
    let e = gn()
        .forward::<f32, f32>(&[], &[usize::MAX, 4, 2], Affine::new())
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    assert_mentions(&e, &[&usize::MAX.to_string(), "element count overflows"]);

    let e = gn()
        .forward::<f32, f32>(&[], &[1, 4, usize::MAX, 2], Affine::new())
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    assert_mentions(&e, &["spatial size overflows"]);

    // 2^61 * 4 elements fit in usize, but not their bytes.
    let e = gn()
        .forward::<f32, f32>(&[], &[1 << 61, 4], Affine::new())
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    assert_mentions(&e, &["byte size"]);

    let e = gn()
        .backward::<f32, f32>(
            &[],
            &[],
            &[usize::MAX, 4, 2],
            &stats(0),
            Affine::none(),
            false,
        )
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
}

#[test]
fn x_length_mismatch() {
    let e = gn()
        .forward::<f32, f32>(&[0.0; 23], &[2, 4, 3], Affine::new())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "x",
                expected: 24,
                got: 23,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["`x`", "23", "24", "[2, 4, 3]"]);
    let e = gn()
        .backward::<f32, f32>(
            &[0.0; 24],
            &[0.0; 25],
            &[2, 4, 3],
            &stats(4),
            Affine::none(),
            false,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "x",
                expected: 24,
                got: 25,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn y_length_mismatch() {
    let mut y = vec![9.0f32; 25];
    let mut st = stats(4);
    let e = gn()
        .forward_into::<f32, f32>(&[1.0; 24], &[2, 4, 3], Affine::new(), &mut y, &mut st)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "y",
                expected: 24,
                got: 25,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["`y`", "25", "24"]);
    assert!(y.iter().all(|&v| v == 9.0), "y written despite the error");
}

#[test]
fn dy_length_mismatch() {
    let e = gn()
        .backward::<f32, f32>(
            &[0.0; 12],
            &[0.0; 24],
            &[2, 4, 3],
            &stats(4),
            Affine::none(),
            true,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "dy",
                expected: 24,
                got: 12,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["`dy`", "12", "24"]);
}

#[test]
fn stats_length_mismatch() {
    // Backward: mean, then rstd.
    let bad_mean = Stats {
        mean: vec![0.0; 3],
        rstd: vec![1.0; 4],
    };
    let e = gn()
        .backward::<f32, f32>(
            &[0.0; 24],
            &[0.0; 24],
            &[2, 4, 3],
            &bad_mean,
            Affine::none(),
            false,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "mean",
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["`mean`", "3", "4", "N * G = 2 * 2"]);
    let bad_rstd = Stats {
        mean: vec![0.0; 4],
        rstd: vec![1.0; 5],
    };
    let e = gn()
        .backward::<f32, f32>(
            &[0.0; 24],
            &[0.0; 24],
            &[2, 4, 3],
            &bad_rstd,
            Affine::none(),
            false,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "rstd",
                expected: 4,
                got: 5,
                ..
            }
        ),
        "{e:?}"
    );

    // forward_into: stats must already have N * G elements; nothing is written on error.
    let mut y = vec![9.0f32; 24];
    let mut st = Stats::default();
    let e = gn()
        .forward_into::<f32, f32>(&[1.0; 24], &[2, 4, 3], Affine::new(), &mut y, &mut st)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "mean",
                expected: 4,
                got: 0,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(y.iter().all(|&v| v == 9.0), "y written despite the error");
}

#[test]
fn weight_length_mismatch() {
    let w = [1.0f32; 3];
    let e = gn()
        .forward::<f32, f32>(&[0.0; 24], &[2, 4, 3], Affine::new().weight(&w))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "weight",
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["`weight`", "3", "4", "one value per channel"]);
    let e = gn()
        .backward::<f32, f32>(
            &[0.0; 24],
            &[0.0; 24],
            &[2, 4, 3],
            &stats(4),
            Affine::new().weight(&w),
            true,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "weight",
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{e:?}"
    );
    let e = reference::backward::<f32, f32>(&gn(), &[0.0; 24], &[0.0; 24], &[2, 4, 3], Some(&w))
        .unwrap_err();
    assert!(
        matches!(e, Error::LengthMismatch { name: "weight", .. }),
        "{e:?}"
    );
}

#[test]
fn bias_length_mismatch() {
    let w = [1.0f32; 4];
    let b = [0.0f32; 5];
    let e = gn()
        .forward::<f32, f32>(&[0.0; 24], &[2, 4, 3], Affine::new().weight(&w).bias(&b))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "bias",
                expected: 4,
                got: 5,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["`bias`", "5", "4"]);
    let e =
        reference::forward::<f32, f32>(&gn(), &[0.0; 24], &[2, 4, 3], None, Some(&b)).unwrap_err();
    assert!(
        matches!(e, Error::LengthMismatch { name: "bias", .. }),
        "{e:?}"
    );
}

#[test]
fn parameter_dtype_mismatch() {
    let x = [f16::ZERO; 24];
    let w = [bf16::ONE; 4];
    let e = gn()
        .forward::<f16, bf16>(&x, &[2, 4, 3], Affine::new().weight(&w))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::DtypeMismatch {
                name: "weight",
                activation: DType::F16,
                param: DType::BF16
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["`weight`", "bf16", "f16", "f32"]);

    let e = gn()
        .forward::<f16, bf16>(&x, &[2, 4, 3], Affine::new().bias(&w))
        .unwrap_err();
    assert!(
        matches!(e, Error::DtypeMismatch { name: "bias", .. }),
        "{e:?}"
    );

    // f16 parameters next to f32 activations are not allowed either.
    let x32 = [0.0f32; 24];
    let w16 = [f16::ONE; 4];
    let e = gn()
        .forward::<f32, f16>(&x32, &[2, 4, 3], Affine::new().weight(&w16))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::DtypeMismatch {
                name: "weight",
                activation: DType::F32,
                param: DType::F16
            }
        ),
        "{e:?}"
    );

    // Backward: the weight, and the type dbias would be returned in.
    let e = gn()
        .backward::<f16, bf16>(
            &x,
            &x,
            &[2, 4, 3],
            &stats(4),
            Affine::new().weight(&w),
            false,
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::DtypeMismatch { name: "weight", .. }),
        "{e:?}"
    );
    let e = gn()
        .backward::<f16, bf16>(&x, &x, &[2, 4, 3], &stats(4), Affine::new(), true)
        .unwrap_err();
    assert!(
        matches!(e, Error::DtypeMismatch { name: "dbias", .. }),
        "{e:?}"
    );
    assert_mentions(&e, &["`dbias`", "bf16", "f16"]);
    // Without a weight or dbias the parameter type is unused and not checked.
    let g = gn()
        .backward::<f16, bf16>(&x, &x, &[2, 4, 3], &stats(4), Affine::new(), false)
        .unwrap();
    assert!(g.dweight.is_none() && g.dbias.is_none());

    let e = reference::forward::<f16, bf16>(&gn(), &x, &[2, 4, 3], Some(&w), None).unwrap_err();
    assert!(matches!(e, Error::DtypeMismatch { .. }), "{e:?}");
}

#[test]
fn reference_validates_like_the_fast_path() {
    let e = reference::forward::<f32, f32>(&gn(), &[0.0; 23], &[2, 4, 3], None, None).unwrap_err();
    assert!(
        matches!(e, Error::LengthMismatch { name: "x", .. }),
        "{e:?}"
    );
    let e = reference::backward::<f32, f32>(&gn(), &[0.0; 23], &[0.0; 24], &[2, 4, 3], None)
        .unwrap_err();
    assert!(
        matches!(e, Error::LengthMismatch { name: "dy", .. }),
        "{e:?}"
    );
    let e = reference::forward::<f32, f32>(&gn(), &[0.0; 24], &[2, 6, 2], None, None).unwrap_err();
    assert!(matches!(e, Error::ChannelMismatch { .. }), "{e:?}");
}
