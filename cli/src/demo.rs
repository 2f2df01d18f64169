//! `groupnorm demo`: the worked examples of docs/design.md and one realistic shape, forward and
//! backward, on the CPU always and on the GPU when one is usable. Parity is judged with the
//! crate's accuracy targets; the exit code is non-zero only if a result misses one.

use groupnorm::accuracy::{dx_error, dx_scale, forward_error, param_grad_error, F32_FORWARD_ABS};
use groupnorm::cpu::reference;
use groupnorm::gpu::DeviceAffine;
use groupnorm::gpu::{self, CudaSlice, DeviceStats, DeviceTensor, Gpu};
use groupnorm::Affine;
use groupnorm::{f16, Element, Error, GroupNorm, Layout};
use std::process::ExitCode;
use std::time::Instant;

/// Prints what this binary and machine can do; returns the GPU if one is usable.
pub fn print_environment() -> Option<Gpu> {
    println!(
        "groupnorm {}: Group Normalization with PyTorch's semantics, CPU and NVIDIA GPU",
        env!("CARGO_PKG_VERSION")
    );
    if gpu::kernels_built() {
        let archs = gpu::built_archs();
        println!(
            "kernels: {} entry points, SASS for sm_{{{archs}}}, PTX for sm_{}",
            gpu::entry_points().len(),
            archs.rsplit(',').next().unwrap_or("?")
        );
    } else {
        println!("kernels: not built (nvcc was missing at build time; see README)");
    }
    match Gpu::new(0) {
        Ok(g) => {
            let (major, minor) = g.capability();
            println!(
                "GPU:     {} (sm_{major}{minor}, {} SMs)",
                g.name(),
                g.sm_count()
            );
            Some(g)
        }
        Err(e) => {
            println!("GPU:     not used: {e}");
            None
        }
    }
}

struct Verdict {
    failures: usize,
}

impl Verdict {
    fn check(&mut self, ok: bool) -> &'static str {
        if ok {
            "ok"
        } else {
            self.failures += 1;
            "FAILED"
        }
    }
}

pub fn run() -> ExitCode {
    let gpu = print_environment();
    let mut v = Verdict { failures: 0 };
    println!("\nWorked examples (docs/design.md), eps = 1e-5, expected to 4 decimals:");
    if let Err(e) = worked_examples(gpu.as_ref(), &mut v) {
        println!("  error: {e}");
        v.failures += 1;
    }
    println!("\nRealistic shape: x (2, 320, 64, 64) f16, G = 32, weight and bias f32:");
    if let Err(e) = realistic(gpu.as_ref(), &mut v) {
        println!("  error: {e}");
        v.failures += 1;
    }
    if v.failures == 0 {
        println!("\nall results within their accuracy targets");
        ExitCode::SUCCESS
    } else {
        println!("\n{} result(s) missed their accuracy target", v.failures);
        ExitCode::FAILURE
    }
}

struct Example {
    name: &'static str,
    dims: &'static [usize],
    groups: usize,
    x: Vec<f32>,
    affine: Option<(Vec<f32>, Vec<f32>)>,
    /// (index, expected value) pairs to check.
    expected: Vec<(usize, f32)>,
}

fn examples() -> Vec<Example> {
    let x = vec![5.0, 4., 7., 2., 1., 6., 2., 3., 4., 8., 1., 9.];
    let plain = [1., -1., 1., -1., -1., 1., -1., 1., -1., 1., -1., 1.];
    let affine = [1., -1., 3., -1.5, -1., 1., -1., -0.5, -1., 1., -1., -0.5];
    vec![
        Example {
            name: "x (3, 4), G = 2, no affine",
            dims: &[3, 4],
            groups: 2,
            x: x.clone(),
            affine: None,
            expected: plain.iter().copied().enumerate().collect(),
        },
        Example {
            name: "same x, weight [1,1,2,.5], bias [0,0,1,-1]",
            dims: &[3, 4],
            groups: 2,
            x,
            affine: Some((vec![1., 1., 2., 0.5], vec![0., 0., 1., -1.])),
            expected: affine.iter().copied().enumerate().collect(),
        },
        Example {
            name: "x (1, 2, 4, 4) = 1..32, G = 2",
            dims: &[1, 2, 4, 4],
            groups: 2,
            x: (1..=32).map(|v| v as f32).collect(),
            affine: None,
            expected: vec![(0, -1.62698), (31, 1.62698)],
        },
    ]
}

fn show(y: &[f32]) -> String {
    let head: Vec<String> = y.iter().take(4).map(|v| format!("{v:.4}")).collect();
    format!(
        "[{}{}]",
        head.join(", "),
        if y.len() > 4 { ", ..." } else { "" }
    )
}

fn worked_examples(gpu: Option<&Gpu>, v: &mut Verdict) -> Result<(), Error> {
    for ex in examples() {
        let gn = GroupNorm::new(ex.groups, ex.dims[1])?;
        let (w, b) = match &ex.affine {
            Some((w, b)) => (Some(&w[..]), Some(&b[..])),
            None => (None, None),
        };
        let mut results = vec![(
            "cpu",
            gn.forward(&ex.x, ex.dims, Affine { weight: w, bias: b })?.0,
        )];
        if let Some(gpu) = gpu {
            let xd = DeviceTensor::from_host(gpu, &ex.x, ex.dims, Layout::Nchw)?;
            let wd = w.map(|w| gpu::upload(gpu.stream(), w)).transpose()?;
            let bd = b.map(|b| gpu::upload(gpu.stream(), b)).transpose()?;
            let (y, _) = gn.on_gpu(gpu).forward(
                &xd,
                DeviceAffine {
                    weight: wd.as_ref(),
                    bias: bd.as_ref(),
                },
            )?;
            results.push(("gpu", y.to_host(gpu)?));
        }
        for (path, y) in results {
            let err = ex
                .expected
                .iter()
                .map(|&(i, e)| (y[i] - e).abs())
                .fold(0.0f32, f32::max);
            println!(
                "  {:<44} {path}  y = {:<40} max |y - expected| {err:.1e}  {}",
                ex.name,
                show(&y),
                v.check(err < 5e-5)
            );
        }
    }
    Ok(())
}

/// Median wall time of `runs` calls of `f`, in milliseconds.
fn time_ms<R>(runs: usize, mut f: impl FnMut() -> Result<R, Error>) -> Result<(f64, R), Error> {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[runs / 2], last.expect("runs > 0")))
}

/// Median GPU time of `runs` calls of `f` after 3 warm-up calls, from CUDA events.
fn gpu_time_ms(
    gpu: &Gpu,
    runs: usize,
    mut f: impl FnMut() -> Result<(), Error>,
) -> Result<f64, Error> {
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = gpu.timing_event()?;
        f()?;
        let end = gpu.timing_event()?;
        times.push(Gpu::elapsed_ms(&start, &end)?);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

fn realistic(gpu: Option<&Gpu>, v: &mut Verdict) -> Result<(), Error> {
    let dims = [2usize, 320, 64, 64];
    let (c, groups) = (dims[1], 32);
    let numel: usize = dims.iter().product();
    let gn = GroupNorm::new(groups, c)?;
    // deterministic, varied data: a different scale and offset per channel
    let x: Vec<f16> = (0..numel)
        .map(|i| {
            let ch = (i / 4096) % c;
            let u = ((i.wrapping_mul(2_654_435_761) >> 7) % 10_000) as f32 / 10_000.0 - 0.5;
            f16::from_f32(u * (1.0 + (ch % 5) as f32) + (ch % 3) as f32)
        })
        .collect();
    let dy: Vec<f16> = (0..numel)
        .map(|i| f16::from_f32(((i.wrapping_mul(40_503) >> 3) % 2_001) as f32 / 1_000.0 - 1.0))
        .collect();
    let w: Vec<f32> = (0..c).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect();
    let b: Vec<f32> = (0..c).map(|i| (i % 5) as f32 / 10.0 - 0.2).collect();

    let (t_ref, r) = time_ms(1, || reference::forward(&gn, &x, &dims, Some(&w), Some(&b)))?;
    let (t_ref_b, rg) = time_ms(1, || reference::backward(&gn, &dy, &x, &dims, Some(&w)))?;
    let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let dy64: Vec<f64> = dy.iter().map(|v| v.to_f64()).collect();
    let scale = dx_scale(&dy64, &dims, groups, Layout::Nchw, Some(&w64), &r.rstd);
    println!("  reference (f64, one thread)   forward {t_ref:8.2} ms   backward {t_ref_b:8.2} ms");

    let (t_f, (y, stats)) = time_ms(5, || {
        gn.forward(&x, &dims, Affine::new().weight(&w).bias(&b))
    })?;
    let (t_b, g) = time_ms(5, || {
        gn.backward(&dy, &x, &dims, &stats, Affine::new().weight(&w), true)
    })?;
    report(
        "cpu fast", t_f, t_b, numel, &y, &r.y, &g.dx, &rg.dx, scale, v,
    );
    let (dw, _) = param_grad_error(g.dweight.as_deref().unwrap_or(&[]), &rg.dweight);
    let (db, bound) = param_grad_error(g.dbias.as_deref().unwrap_or(&[]), &rg.dbias);
    println!(
        "  {:<29} dweight rel L2 {dw:.1e}, dbias {db:.1e} (target {bound:.0e})  {}",
        "",
        v.check(dw <= bound && db <= bound)
    );

    let Some(gpu) = gpu else {
        println!("  gpu                           not run (no usable GPU, see above)");
        return Ok(());
    };
    let xd = DeviceTensor::from_host(gpu, &x, &dims, Layout::Nchw)?;
    let dyd = DeviceTensor::from_host(gpu, &dy, &dims, Layout::Nchw)?;
    let wd: CudaSlice<f32> = gpu::upload(gpu.stream(), &w)?;
    let bd: CudaSlice<f32> = gpu::upload(gpu.stream(), &b)?;
    let mut op = gn.on_gpu(gpu);
    let mut yd = DeviceTensor::<f16>::zeros(gpu, &dims, Layout::Nchw)?;
    let mut sd = DeviceStats::zeros(gpu, dims[0] * groups)?;
    let mut dxd = DeviceTensor::<f16>::zeros(gpu, &dims, Layout::Nchw)?;
    let mut dwd: CudaSlice<f32> = gpu::upload(gpu.stream(), &vec![0.0f32; c])?;
    let mut dbd: CudaSlice<f32> = gpu::upload(gpu.stream(), &vec![0.0f32; c])?;
    let t_f = gpu_time_ms(gpu, 20, || {
        op.forward_into(
            &xd,
            DeviceAffine::new().weight(&wd).bias(&bd),
            &mut yd,
            &mut sd,
        )
    })?;
    let t_b = gpu_time_ms(gpu, 20, || {
        op.backward_into(
            &dyd,
            &xd,
            &sd,
            DeviceAffine::new().weight(&wd),
            &mut dxd,
            Some(&mut dwd),
            Some(&mut dbd),
        )
    })?;
    let y = yd.to_host(gpu)?;
    let dx = dxd.to_host(gpu)?;
    report("gpu", t_f, t_b, numel, &y, &r.y, &dx, &rg.dx, scale, v);
    let (dw, _) = param_grad_error(&gpu::download(gpu.stream(), &dwd)?, &rg.dweight);
    let (db, bound) = param_grad_error(&gpu::download(gpu.stream(), &dbd)?, &rg.dbias);
    println!(
        "  {:<29} dweight rel L2 {dw:.1e}, dbias {db:.1e} (target {bound:.0e})  {}",
        "",
        v.check(dw <= bound && db <= bound)
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report<T: Element>(
    path: &str,
    t_fwd: f64,
    t_bwd: f64,
    numel: usize,
    y: &[T],
    y_ref: &[f64],
    dx: &[T],
    dx_ref: &[f64],
    scale: f64,
    v: &mut Verdict,
) {
    let bytes = numel as f64 * T::DTYPE.size() as f64;
    let fe = forward_error(y, y_ref, F32_FORWARD_ABS);
    let (de, dbound) = dx_error(dx, dx_ref, scale);
    println!(
        "  {path:<29} forward  {t_fwd:8.3} ms {:7.1} GB/s   worst error {:.2} of its tolerance \
         (ulp + 1e-6; max {:.2} ulp)  {}",
        2.0 * bytes / t_fwd / 1e6,
        fe.worst_ratio,
        fe.max_ulps,
        v.check(fe.passed())
    );
    println!(
        "  {:<29} backward {t_bwd:8.3} ms {:7.1} GB/s   dx rel L2 {de:.1e} (target {dbound:.0e})  {}",
        "",
        3.0 * bytes / t_bwd / 1e6,
        v.check(de <= dbound)
    );
}
