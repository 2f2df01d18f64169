//! `groupnorm apply` and `groupnorm grad`: forward or backward on NumPy `.npy` files, so anyone can
//! cross-check the crate against PyTorch or NumPy with their own data.

use super::args::{Args, UsageError};
use super::npy::{self, Array};
use groupnorm::gpu::DeviceAffine;
use groupnorm::gpu::{self, CudaSlice, DeviceTensor, Gpu};
use groupnorm::Affine;
use groupnorm::{f16, Element, GroupNorm, Layout, Stats};
use std::path::Path;

pub const APPLY_USAGE: &str = "usage: groupnorm apply --x X.npy --groups G --out Y.npy
       [--weight W.npy] [--bias B.npy] [--eps 1e-5] [--layout nchw|nhwc] [--device cpu|gpu]
       [--mean MEAN.npy] [--rstd RSTD.npy] [--silu]
  x is float32, float16 or float64 (CPU only), shaped (N, C, *spatial) for nchw or (N, *spatial, C) for nhwc;
  weight and bias are (C,), float32 or the dtype of x; y has the shape and dtype of x;
  mean and rstd are float32 (N, G).";

pub const GRAD_USAGE: &str = "usage: groupnorm grad --x X.npy --dy DY.npy --groups G --dx DX.npy
       [--weight W.npy] [--bias B.npy] [--dweight DW.npy] [--dbias DB.npy] [--eps 1e-5]
       [--layout nchw|nhwc] [--device cpu|gpu] [--silu]
  the statistics are recomputed from x with a forward pass on the same device;
  --silu: the operator is silu(groupnorm(x)) and dy is the gradient of its output (the bias,
  if the forward pass had one, is then needed to recompute the activation's input);
  --dweight needs --weight; dweight and dbias have the dtype of the weight (else of x).";

const COMMON: &[&str] = &["x", "groups", "weight", "eps", "layout", "device"];

/// Where a command runs.
enum Device {
    Cpu,
    Gpu(Gpu),
}

/// A failure: the message, and 2 for bad input or 1 for a machine that cannot run the request.
pub struct Failure(pub String, pub u8);

impl From<UsageError> for Failure {
    fn from(e: UsageError) -> Self {
        Failure(e.0, 2)
    }
}

impl From<groupnorm::Error> for Failure {
    fn from(e: groupnorm::Error) -> Self {
        use groupnorm::Error::*;
        let code = match e {
            NoDriver | NoDevice { .. } | KernelsNotBuilt | Driver { .. } | OutOfMemory { .. } => 1,
            _ => 2,
        };
        Failure(e.to_string(), code)
    }
}

fn device(args: &Args) -> Result<Device, Failure> {
    match args.get("device").unwrap_or("cpu") {
        "cpu" => Ok(Device::Cpu),
        "gpu" => Ok(Device::Gpu(Gpu::new(0)?)),
        other => Err(UsageError(format!("--device: `{other}` is not cpu or gpu")).into()),
    }
}

fn layout(args: &Args) -> Result<Layout, UsageError> {
    super::check::parse_layout(args.get("layout").unwrap_or("nchw"))
}

/// Logical dims `(N, C, *spatial)` of an array shaped for `layout`.
fn logical_dims(shape: &[usize], layout: Layout, name: &str) -> Result<Vec<usize>, UsageError> {
    if shape.len() < 2 {
        return Err(UsageError(format!(
            "--{name} has shape {shape:?}: it needs at least 2 dims"
        )));
    }
    Ok(match layout {
        Layout::Nchw => shape.to_vec(),
        Layout::Nhwc => {
            let mut d = vec![shape[0], shape[shape.len() - 1]];
            d.extend_from_slice(&shape[1..shape.len() - 1]);
            d
        }
        // (Layout is #[non_exhaustive])
        other => {
            return Err(UsageError(format!(
                "layout {other:?} is not supported here"
            )))
        }
    })
}

/// The configuration: groups from the flags, channels from x.
fn config(args: &Args, dims: &[usize], layout: Layout) -> Result<GroupNorm, Failure> {
    let groups: usize = args
        .required("groups")?
        .parse()
        .map_err(|_| UsageError("--groups must be a positive integer".into()))?;
    let eps: f64 = args.parsed("eps", groupnorm::DEFAULT_EPS)?;
    let act = super::check::activation_of(args.on("silu"));
    Ok(GroupNorm::new(groups, dims[1])?
        .with_eps(eps)?
        .with_layout(layout)
        .with_activation(act))
}

/// Refuses, before any work, output flags that name one file twice or a directory (an input named
/// as an output is fine: it is replaced only once the whole run succeeded).
fn check_outputs(args: &Args, flags: &[&str]) -> Result<(), UsageError> {
    let paths: Vec<&Path> = flags
        .iter()
        .filter_map(|f| args.get(f))
        .map(Path::new)
        .collect();
    npy::check_targets(&paths)
}

fn read_opt(args: &Args, name: &str) -> Result<Option<Array>, UsageError> {
    args.get(name).map(|p| npy::read(Path::new(p))).transpose()
}

/// A parameter array: (C,) of the activation dtype or float32, as an f32 or T vector.
enum Param<T> {
    Same(Vec<T>),
    F32(Vec<f32>),
}

fn param<T: Element>(
    a: Option<Array>,
    name: &str,
    channels: usize,
) -> Result<Option<Param<T>>, UsageError> {
    let Some(a) = a else { return Ok(None) };
    if a.shape() != [channels] {
        return Err(UsageError(format!(
            "--{name} has shape {:?}, but x has {channels} channels: expected ({channels},)",
            a.shape()
        )));
    }
    match a {
        Array::F32 { data, .. } => Ok(Some(Param::F32(data))),
        Array::F16 { data, .. } if T::DTYPE == groupnorm::DType::F16 => Ok(Some(Param::Same(
            data.into_iter().map(|v| T::from_f32(v.to_f32())).collect(),
        ))),
        Array::F16 { .. } => Err(UsageError(format!(
            "--{name} is float16 but x is {}: parameters must be float32 or the dtype of x",
            T::DTYPE
        ))),
        Array::F64 { data, .. } if T::DTYPE == groupnorm::DType::F64 => Ok(Some(Param::Same(
            data.into_iter().map(T::from_f64).collect(),
        ))),
        Array::F64 { .. } => Err(UsageError(format!(
            "--{name} is float64 but x is {}: parameters must be float32 or the dtype of x",
            T::DTYPE
        ))),
    }
}

fn to_array<T: Element>(shape: &[usize], data: Vec<T>) -> Array {
    match T::DTYPE {
        groupnorm::DType::F16 => Array::F16 {
            shape: shape.to_vec(),
            data: data
                .into_iter()
                .map(|v| f16::from_f32(v.to_f32()))
                .collect(),
        },
        groupnorm::DType::F64 => Array::F64 {
            shape: shape.to_vec(),
            data: data.into_iter().map(|v| v.to_f64()).collect(),
        },
        _ => Array::F32 {
            shape: shape.to_vec(),
            data: data.into_iter().map(|v| v.to_f32()).collect(),
        },
    }
}

fn stats_arrays(stats: &Stats, n: usize, g: usize) -> (Array, Array) {
    let f = |v: &Vec<f32>| Array::F32 {
        shape: vec![n, g],
        data: v.clone(),
    };
    (f(&stats.mean), f(&stats.rstd))
}

/// `groupnorm apply`.
pub fn apply(raw: &[String]) -> Result<(), Failure> {
    let mut valued = COMMON.to_vec();
    valued.extend(["bias", "out", "mean", "rstd"]);
    let args = Args::parse(raw, &valued, &["silu"])?;
    let out = Path::new(args.required("out")?);
    check_outputs(&args, &["out", "mean", "rstd"])?;
    let x = npy::read(Path::new(args.required("x")?))?;
    let (weight, bias) = (read_opt(&args, "weight")?, read_opt(&args, "bias")?);
    let dev = device(&args)?;
    match x {
        Array::F32 { shape, data } => apply_typed(&args, &dev, &shape, data, weight, bias, out),
        Array::F16 { shape, data } => apply_typed(&args, &dev, &shape, data, weight, bias, out),
        Array::F64 { shape, data } => apply_typed(&args, &dev, &shape, data, weight, bias, out),
    }
}

fn apply_typed<T: Element>(
    args: &Args,
    dev: &Device,
    shape: &[usize],
    x: Vec<T>,
    weight: Option<Array>,
    bias: Option<Array>,
    out: &Path,
) -> Result<(), Failure> {
    let layout = layout(args)?;
    let dims = logical_dims(shape, layout, "x")?;
    let gn = config(args, &dims, layout)?;
    let (w, b) = (
        param::<T>(weight, "weight", dims[1])?,
        param::<T>(bias, "bias", dims[1])?,
    );
    let (y, stats) = match (w, b) {
        (Some(Param::F32(w)), Some(Param::F32(b))) => {
            forward(dev, &gn, &x, &dims, Some(&w), Some(&b))?
        }
        (Some(Param::F32(w)), None) => forward(dev, &gn, &x, &dims, Some(&w), None)?,
        (None, Some(Param::F32(b))) => forward(dev, &gn, &x, &dims, None, Some(&b))?,
        (Some(Param::Same(w)), Some(Param::Same(b))) => {
            forward(dev, &gn, &x, &dims, Some(&w), Some(&b))?
        }
        (Some(Param::Same(w)), None) => forward(dev, &gn, &x, &dims, Some(&w), None)?,
        (None, Some(Param::Same(b))) => forward(dev, &gn, &x, &dims, None, Some(&b))?,
        (None, None) => forward::<T, T>(dev, &gn, &x, &dims, None, None)?,
        _ => return Err(UsageError(
            "--weight and --bias must have the same dtype (both float32, or both the dtype of x)"
                .into(),
        )
        .into()),
    };
    let mut outputs = vec![(out, to_array(shape, y))];
    let (mean, rstd) = stats_arrays(&stats, dims[0], gn.groups());
    if let Some(p) = args.get("mean") {
        outputs.push((Path::new(p), mean));
    }
    if let Some(p) = args.get("rstd") {
        outputs.push((Path::new(p), rstd));
    }
    Ok(npy::write_all(&outputs)?)
}

fn forward<T: Element, P: Element>(
    dev: &Device,
    gn: &GroupNorm,
    x: &[T],
    dims: &[usize],
    w: Option<&[P]>,
    b: Option<&[P]>,
) -> Result<(Vec<T>, Stats), Failure> {
    match dev {
        Device::Cpu => Ok(gn.forward(x, dims, Affine { weight: w, bias: b })?),
        Device::Gpu(gpu) => {
            let xd = DeviceTensor::from_host(gpu, x, dims, gn.layout())?;
            let wd = w.map(|w| gpu::upload(gpu.stream(), w)).transpose()?;
            let bd = b.map(|b| gpu::upload(gpu.stream(), b)).transpose()?;
            let (y, stats) = gn.on_gpu(gpu).forward(
                &xd,
                DeviceAffine {
                    weight: wd.as_ref(),
                    bias: bd.as_ref(),
                },
            )?;
            Ok((y.to_host(gpu)?, stats.to_host(gpu)?))
        }
    }
}

/// `groupnorm grad`.
pub fn grad(raw: &[String]) -> Result<(), Failure> {
    let mut valued = COMMON.to_vec();
    valued.extend(["bias", "dy", "dx", "dweight", "dbias"]);
    let args = Args::parse(raw, &valued, &["silu"])?;
    let dx_path = Path::new(args.required("dx")?);
    if args.get("dweight").is_some() && args.get("weight").is_none() {
        return Err(UsageError("--dweight needs --weight".into()).into());
    }
    check_outputs(&args, &["dx", "dweight", "dbias"])?;
    let x = npy::read(Path::new(args.required("x")?))?;
    let dy = npy::read(Path::new(args.required("dy")?))?;
    let weight = read_opt(&args, "weight")?;
    let bias = read_opt(&args, "bias")?;
    let dev = device(&args)?;
    let params = (weight, bias);
    match (x, dy) {
        (
            Array::F32 { shape, data },
            Array::F32 {
                shape: s2,
                data: dy,
            },
        ) => grad_typed(&args, &dev, &shape, &s2, data, dy, params, dx_path),
        (
            Array::F16 { shape, data },
            Array::F16 {
                shape: s2,
                data: dy,
            },
        ) => grad_typed(&args, &dev, &shape, &s2, data, dy, params, dx_path),
        (
            Array::F64 { shape, data },
            Array::F64 {
                shape: s2,
                data: dy,
            },
        ) => grad_typed(&args, &dev, &shape, &s2, data, dy, params, dx_path),
        (x, dy) => Err(UsageError(format!(
            "--x is {} but --dy is {}: they must have the same dtype",
            x.dtype_name(),
            dy.dtype_name()
        ))
        .into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn grad_typed<T: Element>(
    args: &Args,
    dev: &Device,
    shape: &[usize],
    dy_shape: &[usize],
    x: Vec<T>,
    dy: Vec<T>,
    (weight, bias): (Option<Array>, Option<Array>),
    dx_path: &Path,
) -> Result<(), Failure> {
    if shape != dy_shape {
        return Err(UsageError(format!(
            "--dy has shape {dy_shape:?}, but --x has {shape:?}: they must match"
        ))
        .into());
    }
    let layout = layout(args)?;
    let dims = logical_dims(shape, layout, "x")?;
    let gn = config(args, &dims, layout)?;
    let want_dbias = args.get("dbias").is_some();
    let c = dims[1];
    let (w, b) = (
        param::<T>(weight, "weight", c)?,
        param::<T>(bias, "bias", c)?,
    );
    let run = Run {
        dev,
        gn: &gn,
        x: &x,
        dy: &dy,
        dims: &dims,
        want_dbias,
    };
    let (dx, dw, db) =
        match (w, b) {
            (Some(Param::F32(w)), b @ (Some(Param::F32(_)) | None)) => {
                let b = b.map(|b| b.into_f32());
                let (dx, dw, db) = run.backward(Some(&w), b.as_deref())?;
                (dx, col_array(c, dw), col_array(c, db))
            }
            (None, Some(Param::F32(b))) => {
                let (dx, dw, db) = run.backward::<f32>(None, Some(&b))?;
                (dx, col_array(c, dw), col_array(c, db))
            }
            (Some(Param::Same(w)), b @ (Some(Param::Same(_)) | None)) => {
                let b = b.map(|b| b.into_same());
                let (dx, dw, db) = run.backward(Some(&w), b.as_deref())?;
                (dx, col_array(c, dw), col_array(c, db))
            }
            (None, Some(Param::Same(b))) => {
                let (dx, dw, db) = run.backward(None, Some(&b))?;
                (dx, col_array(c, dw), col_array(c, db))
            }
            (None, None) => {
                let (dx, dw, db) = run.backward::<T>(None, None)?;
                (dx, col_array(c, dw), col_array(c, db))
            }
            _ => return Err(UsageError(
                "--weight and --bias must have the same dtype (both float32, or both the dtype \
                 of x)"
                    .into(),
            )
            .into()),
        };
    let mut outputs = vec![(dx_path, to_array(shape, dx))];
    if let (Some(p), Some(a)) = (args.get("dweight"), dw) {
        outputs.push((Path::new(p), a));
    }
    if let (Some(p), Some(a)) = (args.get("dbias"), db) {
        outputs.push((Path::new(p), a));
    }
    Ok(npy::write_all(&outputs)?)
}

/// A `(C,)` output array, when there is one.
fn col_array<E: Element>(c: usize, v: Option<Vec<E>>) -> Option<Array> {
    v.map(|v| to_array(&[c], v))
}

type GradsOut<T, P> = (Vec<T>, Option<Vec<P>>, Option<Vec<P>>);

impl<T> Param<T> {
    fn into_f32(self) -> Vec<f32> {
        match self {
            Param::F32(v) => v,
            Param::Same(_) => unreachable!("matched as F32"),
        }
    }

    fn into_same(self) -> Vec<T> {
        match self {
            Param::Same(v) => v,
            Param::F32(_) => unreachable!("matched as Same"),
        }
    }
}

/// One `grad` call's inputs.
struct Run<'a, T> {
    dev: &'a Device,
    gn: &'a GroupNorm,
    x: &'a [T],
    dy: &'a [T],
    dims: &'a [usize],
    want_dbias: bool,
}

impl<T: Element> Run<'_, T> {
    /// Forward (for the statistics) then the backward of the whole operator.
    fn backward<P: Element>(
        &self,
        w: Option<&[P]>,
        b: Option<&[P]>,
    ) -> Result<GradsOut<T, P>, Failure> {
        let Run {
            dev,
            gn,
            x,
            dy,
            dims,
            want_dbias,
        } = *self;
        match dev {
            Device::Cpu => {
                let (_, stats) = gn.forward(x, dims, Affine { weight: w, bias: b })?;
                let g = gn.backward(
                    dy,
                    x,
                    dims,
                    &stats,
                    Affine { weight: w, bias: b },
                    want_dbias,
                )?;
                Ok((g.dx, g.dweight, g.dbias))
            }
            Device::Gpu(gpu) => {
                let mut op = gn.on_gpu(gpu);
                let xd = DeviceTensor::from_host(gpu, x, dims, gn.layout())?;
                let dyd = DeviceTensor::from_host(gpu, dy, dims, gn.layout())?;
                let up = |p: Option<&[P]>| p.map(|p| gpu::upload(gpu.stream(), p)).transpose();
                let (wd, bd): (Option<CudaSlice<P>>, _) = (up(w)?, up(b)?);
                let (_, stats) = op.forward(
                    &xd,
                    DeviceAffine {
                        weight: wd.as_ref(),
                        bias: bd.as_ref(),
                    },
                )?;
                let g = op.backward(
                    &dyd,
                    &xd,
                    &stats,
                    DeviceAffine {
                        weight: wd.as_ref(),
                        bias: bd.as_ref(),
                    },
                    want_dbias,
                )?;
                let down = |s: Option<CudaSlice<P>>| {
                    s.map(|s| gpu::download(gpu.stream(), &s)).transpose()
                };
                Ok((g.dx.to_host(gpu)?, down(g.dweight)?, down(g.dbias)?))
            }
        }
    }
}
