//! `groupnorm check`: randomized parity against the f64 CPU reference over a shape set, on the GPU
//! when one is usable (else the CPU fast path, and it says so). Prints the errors per shape and
//! dtype pair; exit code 1 when any result misses its accuracy target.

use super::args::{Args, UsageError};
use super::files::Failure;
use super::shapes::{self, Shape};
use groupnorm::accuracy::{
    dx_error, dx_scale_of, forward_error, param_grad_error, F32_FORWARD_ABS,
};
use groupnorm::cpu::reference;
use groupnorm::gpu::DeviceAffine;
use groupnorm::gpu::{self, DeviceTensor, Gpu, Path};
use groupnorm::Affine;
use groupnorm::{bf16, f16, Activation, DType, Element, GroupNorm, Layout};

pub const USAGE: &str = "usage: groupnorm check [--shapes small|sd|large|all|2x320x64x64:32,...]
       [--dtype all|f32|f16|bf16] [--device auto|cpu|gpu] [--path auto|fused|split|cluster] [--seed 1]
       [--layout nchw|nhwc] [--silu]
  compares forward and backward with the f64 reference on seeded random data, for each
  activation dtype with f32 parameters and with parameters of the activation dtype.
  --layout nhwc: channels-last tensors; --silu: GroupNorm fused with SiLU (dy is then the
  gradient of the activated output). Default: --shapes small --dtype all --device auto.";

/// Parses `--layout nchw|nhwc`.
/// A dtype pair the command has no code for (`DType` is `#[non_exhaustive]`): a usage error.
pub fn unknown_dtype(t: DType, p: DType) -> Failure {
    Failure(
        format!("dtype {t} with parameters {p}: not supported by this command"),
        2,
    )
}

pub fn parse_layout(s: &str) -> Result<Layout, UsageError> {
    match s {
        "nchw" => Ok(Layout::Nchw),
        "nhwc" => Ok(Layout::Nhwc),
        other => Err(UsageError(format!(
            "--layout: `{other}` is not nchw or nhwc"
        ))),
    }
}

/// The activation of `--silu`.
pub fn activation_of(silu: bool) -> Activation {
    if silu {
        Activation::Silu
    } else {
        Activation::None
    }
}

/// SplitMix64 and Box-Muller: seeded, reproducible data without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    /// `n` values `mean + std * N(0, 1)` rounded once to `T`.
    pub fn normal_vec<T: Element>(&mut self, n: usize, mean: f64, std: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(mean + std * self.normal()))
            .collect()
    }
}

pub enum Where {
    Cpu,
    Gpu(Gpu, Path),
}

pub fn run(raw: &[String]) -> Result<(), Failure> {
    let args = Args::parse(
        raw,
        &["shapes", "dtype", "device", "path", "seed", "layout"],
        &["silu"],
    )?;
    let variant = (
        parse_layout(args.get("layout").unwrap_or("nchw"))?,
        activation_of(args.on("silu")),
    );
    let shapes = shapes::parse(args.get("shapes").unwrap_or("small"))?;
    let dtypes = parse_dtypes(args.get("dtype").unwrap_or("all"))?;
    let seed: u64 = args.parsed("seed", 1)?;
    let path = parse_path(args.get("path").unwrap_or("auto"))?;
    let place = match args.get("device").unwrap_or("auto") {
        "cpu" => Where::Cpu,
        "gpu" => Where::Gpu(Gpu::new(0)?, path),
        "auto" => match Gpu::new(0) {
            Ok(g) => Where::Gpu(g, path),
            Err(e) => {
                eprintln!("check: no usable GPU ({e}); checking the CPU fast path instead");
                Where::Cpu
            }
        },
        other => {
            return Err(UsageError(format!("--device: `{other}` is not auto, cpu or gpu")).into())
        }
    };
    println!(
        "{:<22} {:<9} {:<4} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}  result",
        "shape",
        "dtype",
        "on",
        "fwd |err|",
        "fwd ulp",
        "fwd/tol",
        "dx rel",
        "dx bound",
        "dw rel",
        "db rel"
    );
    let mut failures = 0;
    for (i, shape) in shapes.iter().enumerate() {
        for &(t, p) in &dtypes {
            eprintln!("check: {} {t}/{p} ...", shape.label());
            let ok = match (t, p) {
                (DType::F32, _) => one::<f32, f32>(&place, variant, shape, seed + i as u64)?,
                (DType::F16, DType::F16) => {
                    one::<f16, f16>(&place, variant, shape, seed + i as u64)?
                }
                (DType::F16, _) => one::<f16, f32>(&place, variant, shape, seed + i as u64)?,
                (DType::BF16, DType::BF16) => {
                    one::<bf16, bf16>(&place, variant, shape, seed + i as u64)?
                }
                (DType::BF16, _) => one::<bf16, f32>(&place, variant, shape, seed + i as u64)?,
                (DType::F64, _) => one::<f64, f64>(&place, variant, shape, seed + i as u64)?,
                // (DType is #[non_exhaustive]: a type this command does not know yet)
                _ => return Err(unknown_dtype(t, p)),
            };
            failures += usize::from(!ok);
        }
    }
    if failures > 0 {
        Err(Failure(
            format!("{failures} check(s) missed their accuracy target"),
            1,
        ))
    } else {
        println!("all checks within their accuracy targets");
        Ok(())
    }
}

pub fn parse_path(s: &str) -> Result<Path, UsageError> {
    match s {
        "auto" => Ok(Path::Auto),
        "fused" => Ok(Path::Fused),
        "split" => Ok(Path::Split),
        "cluster" => Ok(Path::Cluster),
        other => Err(UsageError(format!(
            "--path: `{other}` is not auto, fused, split or cluster"
        ))),
    }
}

/// (activation, parameter) dtype pairs.
pub fn parse_dtypes(s: &str) -> Result<Vec<(DType, DType)>, UsageError> {
    let mut v = Vec::new();
    for name in s.split(',') {
        match name {
            "all" => v.extend([
                (DType::F32, DType::F32),
                (DType::F16, DType::F32),
                (DType::F16, DType::F16),
                (DType::BF16, DType::F32),
                (DType::BF16, DType::BF16),
            ]),
            "f32" => v.push((DType::F32, DType::F32)),
            "f16" => v.extend([(DType::F16, DType::F32), (DType::F16, DType::F16)]),
            "bf16" => v.extend([(DType::BF16, DType::F32), (DType::BF16, DType::BF16)]),
            other => {
                return Err(UsageError(format!(
                    "--dtype: `{other}` is not all, f32, f16 or bf16"
                )))
            }
        }
    }
    Ok(v)
}

fn one<T: Element, P: Element>(
    place: &Where,
    (layout, act): (Layout, Activation),
    shape: &Shape,
    seed: u64,
) -> Result<bool, Failure> {
    let dims = &shape.dims;
    let c = dims[1];
    let gn = GroupNorm::new(shape.groups, c)?
        .with_layout(layout)
        .with_activation(act);
    let mut rng = Rng::new(seed);
    let x: Vec<T> = rng.normal_vec(shape.numel(), 0.5, 2.0);
    let dy: Vec<T> = rng.normal_vec(shape.numel(), 0.0, 1.0);
    let w: Vec<P> = rng.normal_vec(c, 1.0, 0.25);
    let b: Vec<P> = rng.normal_vec(c, 0.0, 0.5);
    let r = reference::forward(&gn, &x, dims, Some(&w), Some(&b))?;
    let rg = reference::backward_activated(&gn, &dy, &x, dims, Some(&w), Some(&b))?;
    let (on, y, dx, dw, db) = match place {
        Where::Cpu => {
            let (y, stats) = gn.forward(&x, dims, Affine::new().weight(&w).bias(&b))?;
            let g = gn.backward(
                &dy,
                &x,
                dims,
                &stats,
                Affine::new().weight(&w).bias(&b),
                true,
            )?;
            (
                "cpu",
                y,
                g.dx,
                g.dweight.unwrap_or_default(),
                g.dbias.unwrap_or_default(),
            )
        }
        Where::Gpu(gpu, path) => {
            let mut op = gn.on_gpu(gpu).with_path(*path);
            let xd = DeviceTensor::from_host(gpu, &x, dims, layout)?;
            let dyd = DeviceTensor::from_host(gpu, &dy, dims, layout)?;
            let wd = gpu::upload(gpu.stream(), &w)?;
            let bd = gpu::upload(gpu.stream(), &b)?;
            let (y, stats) = op.forward(&xd, DeviceAffine::new().weight(&wd).bias(&bd))?;
            let g = op.backward(
                &dyd,
                &xd,
                &stats,
                DeviceAffine::new().weight(&wd).bias(&bd),
                true,
            )?;
            let down = |s: Option<gpu::CudaSlice<P>>| -> Result<Vec<P>, groupnorm::Error> {
                s.map(|s| gpu::download(gpu.stream(), &s))
                    .transpose()
                    .map(Option::unwrap_or_default)
            };
            (
                "gpu",
                y.to_host(gpu)?,
                g.dx.to_host(gpu)?,
                down(g.dweight)?,
                down(g.dbias)?,
            )
        }
    };
    let fe = forward_error(&y, &r.y, F32_FORWARD_ABS);
    let w64: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
    // dx is measured against ||rstd w dz||, dz the gradient reaching the normalization
    let b64: Vec<f64> = b.iter().map(|v| v.to_f64()).collect();
    let x64: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let dy64: Vec<f64> = dy.iter().map(|v| v.to_f64()).collect();
    let scale = dx_scale_of(&gn, dims, &dy64, &x64, Some(&w64), Some(&b64), &r.rstd)?;
    let (dxe, dxb) = dx_error(&dx, &rg.dx, scale);
    let (dwe, pb) = param_grad_error(&dw, &rg.dweight);
    let (dbe, _) = param_grad_error(&db, &rg.dbias);
    let ok = fe.passed() && dxe <= dxb && dwe <= pb && dbe <= pb;
    println!(
        "{:<22} {:<9} {:<4} {:>10.2e} {:>8.2} {:>8.2} {:>9.2e} {:>9.2e} {:>9.2e} {:>9.2e}  {}",
        shape.label(),
        format!("{}/{}", T::DTYPE, P::DTYPE),
        on,
        fe.max_abs,
        fe.max_ulps,
        fe.worst_ratio,
        dxe,
        dxb,
        dwe,
        dbe,
        if ok { "ok" } else { "FAILED" }
    );
    Ok(ok)
}
