//! A tensor of more than 2^31 elements on the CPU path (f16, about 4.3 GB in and 4.3 GB out):
//! every index past i32 (and u32 for the products) must be computed in 64 bits.
//!
//! Opt-in (it needs ~9 GB of memory and a minute): `cargo test --release --test cpu_large --
//! --ignored`.

mod common;

use common::{forward_tolerance, F32_FORWARD_ABS};
use groupnorm::Affine;
use groupnorm::{f16, GroupNorm};

#[test]
#[ignore = "opt-in: ~9 GB of memory (cargo test --release --test cpu_large -- --ignored)"]
fn forward_past_2_pow_31_elements() {
    // N = 2, C = G = 32, S = 2^25 + 4: 2,147,483,904 elements, each row 33,554,436 values
    let s = (1usize << 25) + 4;
    let dims = [2usize, 32, s];
    let numel: usize = dims.iter().product();
    assert!(numel > 1 << 31);
    let gn = GroupNorm::new(32, 32).unwrap();
    // row r holds -1.5, -0.5, 0.5, 1.5 repeated, shifted by (r % 8): mean shift, variance 1.25,
    // all exact in f16; an index that wraps reads another row's shift and shows
    let pattern = [-1.5f32, -0.5, 0.5, 1.5];
    let start = std::time::Instant::now();
    let mut x = Vec::with_capacity(numel);
    for i in 0..numel {
        let row = i / s;
        x.push(f16::from_f32(pattern[i % 4] + (row % 8) as f32));
    }
    let filled = start.elapsed();
    let (y, stats) = gn.forward::<f16, f32>(&x, &dims, Affine::new()).unwrap();
    let ran = start.elapsed() - filled;
    drop(x);
    let rstd = 1.0 / (1.25f64 + groupnorm::DEFAULT_EPS).sqrt();
    for row in 0..64 {
        let mean = stats.mean[row] as f64;
        assert!(
            (mean - (row % 8) as f64).abs() < 1e-5,
            "row {row}: mean {mean}"
        );
        assert!(
            (stats.rstd[row] as f64 - rstd).abs() < 1e-5 * rstd,
            "row {row}: rstd {}",
            stats.rstd[row]
        );
    }
    // DESIGN.md's f16 forward tolerance around the exact f64 result
    let expected: Vec<(f64, f64)> = pattern
        .iter()
        .map(|&v| {
            let e = v as f64 * rstd;
            (e, forward_tolerance::<f16>(e, F32_FORWARD_ABS))
        })
        .collect();
    let bad = y
        .iter()
        .enumerate()
        .filter(|(i, v)| {
            let (e, tol) = expected[i % 4];
            (v.to_f64() - e).abs() > tol
        })
        .count();
    assert_eq!(bad, 0, "{bad} of {numel} outputs wrong");
    eprintln!(
        "{numel} f16 elements: fill {:.1} s, forward {:.1} s, check {:.1} s",
        filled.as_secs_f64(),
        ran.as_secs_f64(),
        (start.elapsed() - filled - ran).as_secs_f64()
    );
}
