//! `groupnorm bench`: time per shape, dtype and pass, achieved bandwidth at minimum traffic, and
//! the ratio to the device's copy bandwidth measured in the same run; the same for an unfused
//! baseline structured as PyTorch's kernels. Without a GPU it times the CPU fast path against
//! `memcpy` instead, and says so.
//!
//! Minimum traffic: forward reads x and writes y (2 tensor passes), backward reads x and dy and
//! writes dx (3). Parameters and statistics are not counted.

use super::args::{Args, UsageError};
use super::check::{parse_dtypes, parse_path, Rng};
use super::files::Failure;
use super::shapes::{self, Shape};
use groupnorm::cudarc::driver::sys::CUdevice_attribute;
use groupnorm::gpu::DeviceAffine;
use groupnorm::gpu::{self, CudaSlice, DeviceStats, DeviceTensor, Gpu, Path};
use groupnorm::Affine;
use groupnorm::{bf16, f16, DType, Element, GroupNorm, Layout};
use std::fmt::Write as _;
use std::time::Instant;

pub const USAGE: &str = "usage: groupnorm bench [--shapes sd|small|large|all|2x320x64x64:32,...]
       [--dtype f16,f32|all|bf16] [--pass fwd|bwd|both] [--runs 50] [--warmup 10]
       [--path auto|fused|split|cluster] [--device auto|gpu|cpu] [--no-baseline]
       [--layout nchw|nhwc] [--silu] [--csv FILE] [--json FILE]
  GPU, three timings per row, inputs and outputs rotated through more than twice the L2
  (up to 2048 copies): time_ms, per-call time of --runs back-to-back calls (at least one per
  copy) between one event pair, median of 5 batches, what a stream of calls costs; graph_ms,
  the same calls captured once into a CUDA graph and replayed (no host submission), median of
  5 replays; latency_ms, one call between its own events on an idle GPU, median of --runs.
  GB/s at minimum traffic from time_ms, and % of the device-to-device copy bandwidth measured
  first.
  --layout nhwc times channels-last tensors, --silu GroupNorm fused with SiLU (the unfused
  baseline exists for NCHW without an activation only, and is skipped otherwise).
  CPU: wall-clock median, inputs rotated past a 32 MiB last-level cache, outputs (the
  backward's too, through backward_into) allocated once; threads
  from RAYON_NUM_THREADS (scripts/bench_torch.py --device cpu --threads N times PyTorch alike).
  Defaults: --shapes sd --dtype f16,f32 --pass both (CPU: --shapes small --runs 10).";

/// One measured row; the CSV and JSON columns, shared with scripts/bench_torch.py.
pub struct Row {
    pub implementation: &'static str,
    pub device: String,
    pub shape: String,
    pub dtype: String,
    pub pass: &'static str,
    pub path: String,
    pub time_ms: f64,
    pub gbps: f64,
    pub pct_copy: f64,
    pub copy_gbps: f64,
    /// One call on an idle device (GPU: between its own events), ms.
    pub latency_ms: f64,
    /// Per call, replayed from a CUDA graph, ms (NaN: not measured, e.g. on the CPU).
    pub graph_ms: f64,
}

pub const CSV_HEADER: &str =
    "impl,device,shape,dtype,pass,path,time_ms,gbps,pct_copy,copy_gbps,latency_ms,graph_ms";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Config {
    shapes: Vec<Shape>,
    dtypes: Vec<(DType, DType)>,
    passes: Vec<&'static str>,
    runs: usize,
    warmup: usize,
    path: Path,
    baseline: bool,
    layout: Layout,
    act: groupnorm::Activation,
}

pub fn run(raw: &[String]) -> Result<(), Failure> {
    let args = Args::parse(
        raw,
        &[
            "shapes", "dtype", "pass", "runs", "warmup", "path", "device", "csv", "json", "layout",
        ],
        &["no-baseline", "silu"],
    )?;
    let layout = super::check::parse_layout(args.get("layout").unwrap_or("nchw"))?;
    let act = super::check::activation_of(args.on("silu"));
    let gpu = match args.get("device").unwrap_or("auto") {
        "gpu" => Some(Gpu::new(0)?),
        "cpu" => None,
        "auto" => match Gpu::new(0) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("bench: no usable GPU ({e}): benchmarking the CPU path against memcpy");
                None
            }
        },
        other => {
            return Err(UsageError(format!("--device: `{other}` is not auto, gpu or cpu")).into())
        }
    };
    let on_gpu = gpu.is_some();
    let default_shapes = if on_gpu { "sd" } else { "small" };
    let cfg = Config {
        shapes: shapes::parse(args.get("shapes").unwrap_or(default_shapes))?,
        dtypes: parse_dtypes(args.get("dtype").unwrap_or("f16,f32"))?
            .into_iter()
            // f16/bf16 activations are benchmarked with f32 parameters (autocast pipelines)
            .filter(|&(t, p)| t == DType::F32 || p == DType::F32)
            .collect(),
        passes: match args.get("pass").unwrap_or("both") {
            "fwd" => vec!["fwd"],
            "bwd" => vec!["bwd"],
            "both" => vec!["fwd", "bwd"],
            other => {
                return Err(UsageError(format!("--pass: `{other}` is not fwd, bwd or both")).into())
            }
        },
        runs: args.parsed("runs", if on_gpu { 50 } else { 10 })?,
        warmup: args.parsed("warmup", if on_gpu { 10 } else { 2 })?,
        path: parse_path(args.get("path").unwrap_or("auto"))?,
        baseline: !args.on("no-baseline")
            && layout == Layout::Nchw
            && act == groupnorm::Activation::None,
        layout,
        act,
    };
    if cfg.runs == 0 {
        return Err(UsageError("--runs must be at least 1".into()).into());
    }
    let rows = match &gpu {
        Some(g) => bench_gpu(g, &cfg)?,
        None => bench_cpu(&cfg)?,
    };
    print_table(&rows);
    if let Some(p) = args.get("csv") {
        std::fs::write(p, csv(&rows)).map_err(|e| UsageError(format!("--csv {p}: {e}")))?;
    }
    if let Some(p) = args.get("json") {
        std::fs::write(p, json(&rows)).map_err(|e| UsageError(format!("--json {p}: {e}")))?;
    }
    Ok(())
}

/// Tensor passes of minimum traffic.
fn passes_of(pass: &str) -> f64 {
    if pass == "fwd" {
        2.0
    } else {
        3.0
    }
}

// ---------------------------------------------------------------------------------------------
// GPU

/// Device-to-device copy bandwidth (bytes read plus written per second), median of 20 copies of
/// 512 MiB (or a quarter of free memory), far beyond any L2.
fn copy_bandwidth(gpu: &Gpu) -> Result<f64, Failure> {
    let (free, _) = gpu
        .context()
        .mem_get_info()
        .map_err(|e| Failure(format!("querying memory: {e}"), 1))?;
    let bytes = (512usize << 20).min(free / 4) & !0xFFFF;
    let stream = gpu.stream();
    let src: CudaSlice<u8> = stream
        .alloc_zeros(bytes)
        .map_err(|e| Failure(format!("allocating the copy buffers: {e}"), 1))?;
    let mut dst: CudaSlice<u8> = stream
        .alloc_zeros(bytes)
        .map_err(|e| Failure(format!("allocating the copy buffers: {e}"), 1))?;
    let mut times = Vec::new();
    for i in 0..23 {
        let start = gpu.timing_event()?;
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| Failure(format!("copying: {e}"), 1))?;
        let end = gpu.timing_event()?;
        let ms = Gpu::elapsed_ms(&start, &end)?;
        if i >= 3 {
            times.push(ms);
        }
    }
    Ok(2.0 * bytes as f64 / median(times) / 1e6)
}

fn bench_gpu(gpu: &Gpu, cfg: &Config) -> Result<Vec<Row>, Failure> {
    // Everything runs on the per-thread default stream: unlike the legacy default stream it can
    // be captured into a graph (graph_ms), and unlike a created stream it keeps cudarc in its
    // one-stream mode, where a call records and waits on no events (work that would add host
    // time to every call, and that a capture refuses).
    let gpu = &gpu.with_stream(gpu.context().per_thread_stream())?;
    let l2 = gpu
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .unwrap_or(0)
        .max(0) as usize;
    eprintln!(
        "bench: {} (L2 {} MiB); measuring copy bandwidth ...",
        gpu.name(),
        l2 >> 20
    );
    let copy = copy_bandwidth(gpu)?;
    eprintln!("bench: device-to-device copy {copy:.0} GB/s (read + write)");
    let mut rows = Vec::new();
    for shape in &cfg.shapes {
        for &(t, p) in &cfg.dtypes {
            eprintln!("bench: {} {t}/{p} ...", shape.label());
            let r = match (t, p) {
                (DType::F32, _) => gpu_shape::<f32, f32>(gpu, cfg, shape, l2, copy),
                (DType::F16, DType::F16) => gpu_shape::<f16, f16>(gpu, cfg, shape, l2, copy),
                (DType::F16, _) => gpu_shape::<f16, f32>(gpu, cfg, shape, l2, copy),
                (DType::BF16, DType::BF16) => gpu_shape::<bf16, bf16>(gpu, cfg, shape, l2, copy),
                (DType::BF16, _) => gpu_shape::<bf16, f32>(gpu, cfg, shape, l2, copy),
                (DType::F64, _) => gpu_shape::<f64, f64>(gpu, cfg, shape, l2, copy),
                // (DType is #[non_exhaustive]: a type this command does not know yet)
                _ => return Err(super::check::unknown_dtype(t, p)),
            };
            match r {
                Ok(mut v) => rows.append(&mut v),
                // a shape that does not fit this device is reported and skipped, not fatal
                Err(groupnorm::Error::OutOfMemory { bytes, .. }) => {
                    eprintln!(
                        "bench: {} skipped: out of device memory ({bytes} bytes)",
                        shape.label()
                    )
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(rows)
}

/// Timed back-to-back batches, and graph replays, whose median a row reports.
const BATCHES: usize = 5;

/// The most copies of a shape's tensors that rotate: tensors under about L2 / 2048 (25 KiB on
/// an H100) then stay partly resident in L2 between their uses; such shapes are ruled by launch
/// cost, which `latency_ms` shows.
const MAX_COPIES: usize = 2048;

/// Copies of a shape's tensors (inputs and outputs) to rotate through so that one round over
/// them moves more than twice the L2 at minimum traffic (each call touches at least two
/// tensors), and no call finds its tensors in L2 from an earlier one.
fn gpu_copies(tensor_bytes: usize, l2: usize) -> usize {
    if tensor_bytes >= l2 {
        // one call alone touches two L2s: its tensors' heads are gone before the next call
        1
    } else {
        l2.div_ceil(tensor_bytes.max(1))
            .saturating_add(1)
            .clamp(2, MAX_COPIES)
    }
}

/// The three times of one row, milliseconds per call.
struct Timing {
    /// Back-to-back calls between one event pair.
    per_call: f64,
    /// One call between its own events, the device idle before it.
    latency: f64,
    /// Replays of a CUDA graph of the calls (NaN where capture failed; the reason was printed).
    graph: f64,
}

/// Times `f(k)` (`k`: which copy of the tensors to use) three ways: see [`Timing`].
fn time_gpu(
    gpu: &Gpu,
    cfg: &Config,
    copies: usize,
    mut f: impl FnMut(usize) -> groupnorm::Result<()>,
) -> groupnorm::Result<Timing> {
    for i in 0..cfg.warmup {
        f(i % copies)?;
    }
    // single calls: each waits for the previous one to finish (elapsed_ms synchronizes)
    let mut single = Vec::with_capacity(cfg.runs);
    for i in 0..cfg.runs {
        let start = gpu.timing_event()?;
        f(i % copies)?;
        let end = gpu.timing_event()?;
        single.push(Gpu::elapsed_ms(&start, &end)?);
    }
    // back to back: every copy at least once per batch, one event pair around the batch
    let calls = cfg.runs.max(copies);
    let mut batches = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let start = gpu.timing_event()?;
        for i in 0..calls {
            f(i % copies)?;
        }
        let end = gpu.timing_event()?;
        batches.push(Gpu::elapsed_ms(&start, &end)? / calls as f64);
    }
    let graph = match graph_ms(gpu, calls, copies, &mut f) {
        Ok(ms) => ms,
        Err(why) => {
            eprintln!("bench: graph_ms not measured: {why}");
            f64::NAN
        }
    };
    Ok(Timing {
        per_call: median(batches),
        latency: median(single),
        graph,
    })
}

/// Per-call time of `calls` calls captured into one CUDA graph, median of [`BATCHES`] replays
/// after one untimed replay. The stream must be capturable (not the legacy default stream;
/// [`bench_gpu`] runs on the per-thread default stream).
fn graph_ms(
    gpu: &Gpu,
    calls: usize,
    copies: usize,
    f: &mut impl FnMut(usize) -> groupnorm::Result<()>,
) -> Result<f64, String> {
    use groupnorm::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let stream = gpu.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| format!("beginning a stream capture: {e}"))?;
    let mut enqueued = Ok(());
    for i in 0..calls {
        if let Err(e) = f(i % copies) {
            enqueued = Err(e);
            break;
        }
    }
    // the capture ends whatever happened, so that the stream is usable again
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    enqueued.map_err(|e| format!("a call failed while being captured: {e}"))?;
    let graph = graph
        .map_err(|e| format!("ending the capture: {e}"))?
        .ok_or("the capture recorded no work")?;
    let failed = |e: groupnorm::Error| e.to_string();
    let replay = || {
        graph
            .launch()
            .map_err(|e| format!("replaying the graph: {e}"))
    };
    replay()?;
    let mut times = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let start = gpu.timing_event().map_err(failed)?;
        replay()?;
        let end = gpu.timing_event().map_err(failed)?;
        times.push(Gpu::elapsed_ms(&start, &end).map_err(failed)? / calls as f64);
    }
    Ok(median(times))
}

fn gpu_shape<T: Element, P: Element>(
    gpu: &Gpu,
    cfg: &Config,
    shape: &Shape,
    l2: usize,
    copy: f64,
) -> groupnorm::Result<Vec<Row>> {
    let dims = &shape.dims;
    let c = dims[1];
    let gn = GroupNorm::new(shape.groups, c)?
        .with_layout(cfg.layout)
        .with_activation(cfg.act);
    let layout = cfg.layout;
    let bytes = shape.numel() * T::DTYPE.size();
    let copies = gpu_copies(bytes, l2);
    let mut rng = Rng::new(7);
    let x: Vec<T> = rng.normal_vec(shape.numel(), 0.0, 1.0);
    let dy: Vec<T> = rng.normal_vec(shape.numel(), 0.0, 1.0);
    let upload = |v: &[T]| -> groupnorm::Result<Vec<DeviceTensor<T>>> {
        (0..copies)
            .map(|_| DeviceTensor::from_host(gpu, v, dims, layout))
            .collect()
    };
    let zeros = || -> groupnorm::Result<Vec<DeviceTensor<T>>> {
        (0..copies)
            .map(|_| DeviceTensor::zeros(gpu, dims, layout))
            .collect()
    };
    let (xs, dys) = (upload(&x)?, upload(&dy)?);
    let (mut ys, mut dxs) = (zeros()?, zeros()?);
    let w = gpu::upload(gpu.stream(), &rng.normal_vec::<P>(c, 1.0, 0.1))?;
    let b = gpu::upload(gpu.stream(), &rng.normal_vec::<P>(c, 0.0, 0.1))?;
    let mut stats = DeviceStats::zeros(gpu, dims[0] * shape.groups)?;
    let mut dw = gpu::upload(gpu.stream(), &vec![P::default(); c])?;
    let mut db = gpu::upload(gpu.stream(), &vec![P::default(); c])?;
    let mut op = gn.on_gpu(gpu).with_path(cfg.path);
    let mut rows = Vec::new();
    let dtype = format!("{}/{}", T::DTYPE, P::DTYPE);
    let mut push = |implementation, pass: &'static str, path: String, t: Timing| {
        let gbps = passes_of(pass) * bytes as f64 / t.per_call / 1e6;
        rows.push(Row {
            implementation,
            device: gpu.name().to_string(),
            shape: shape.label(),
            dtype: dtype.clone(),
            pass,
            path,
            time_ms: t.per_call,
            gbps,
            pct_copy: 100.0 * gbps / copy,
            copy_gbps: copy,
            latency_ms: t.latency,
            graph_ms: t.graph,
        });
    };
    // statistics for the backward passes (every copy of x holds the same values)
    op.forward_into(
        &xs[0],
        DeviceAffine::new().weight(&w).bias(&b),
        &mut ys[0],
        &mut stats,
    )?;
    for &pass in &cfg.passes {
        let path = op.describe_path::<T>(dims, pass == "bwd")?;
        let t = if pass == "fwd" {
            time_gpu(gpu, cfg, copies, |k| {
                op.forward_into(
                    &xs[k],
                    DeviceAffine::new().weight(&w).bias(&b),
                    &mut ys[k],
                    &mut stats,
                )
            })?
        } else {
            time_gpu(gpu, cfg, copies, |k| {
                op.backward_into(
                    &dys[k],
                    &xs[k],
                    &stats,
                    DeviceAffine::new().weight(&w).bias(&b),
                    &mut dxs[k],
                    Some(&mut dw),
                    Some(&mut db),
                )
            })?
        };
        push(implementation_name(cfg), pass, path, t);
        if cfg.baseline {
            let t = if pass == "fwd" {
                time_gpu(gpu, cfg, copies, |k| {
                    op.forward_baseline_into(
                        &xs[k],
                        DeviceAffine::new().weight(&w).bias(&b),
                        &mut ys[k],
                        &mut stats,
                    )
                })?
            } else {
                time_gpu(gpu, cfg, copies, |k| {
                    op.backward_baseline_into(
                        &dys[k],
                        &xs[k],
                        &stats,
                        DeviceAffine::new().weight(&w),
                        &mut dxs[k],
                        Some(&mut dw),
                        Some(&mut db),
                    )
                })?
            };
            push("baseline", pass, "unfused".into(), t);
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// CPU

/// Host memcpy bandwidth (bytes read plus written per second), median of 7 copies of 256 MiB.
fn memcpy_bandwidth() -> f64 {
    let bytes = 256usize << 20;
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    2.0 * bytes as f64 / median(times) / 1e6
}

fn bench_cpu(cfg: &Config) -> Result<Vec<Row>, Failure> {
    eprintln!("bench: measuring memcpy bandwidth ...");
    let copy = memcpy_bandwidth();
    eprintln!(
        "bench: memcpy {copy:.1} GB/s (read + write), {} threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut rows = Vec::new();
    for shape in &cfg.shapes {
        for &(t, p) in &cfg.dtypes {
            eprintln!("bench: {} {t}/{p} ...", shape.label());
            let mut v = match (t, p) {
                (DType::F32, _) => cpu_shape::<f32, f32>(cfg, shape, copy)?,
                (DType::F16, DType::F16) => cpu_shape::<f16, f16>(cfg, shape, copy)?,
                (DType::F16, _) => cpu_shape::<f16, f32>(cfg, shape, copy)?,
                (DType::BF16, DType::BF16) => cpu_shape::<bf16, bf16>(cfg, shape, copy)?,
                (DType::BF16, _) => cpu_shape::<bf16, f32>(cfg, shape, copy)?,
                (DType::F64, _) => cpu_shape::<f64, f64>(cfg, shape, copy)?,
                _ => return Err(super::check::unknown_dtype(t, p)),
            };
            rows.append(&mut v);
        }
    }
    Ok(rows)
}

/// The implementation column: what was timed.
fn implementation_name(cfg: &Config) -> &'static str {
    match (cfg.layout, cfg.act) {
        (Layout::Nchw, groupnorm::Activation::None) => "groupnorm",
        (Layout::Nhwc, groupnorm::Activation::None) => "groupnorm nhwc",
        (Layout::Nchw, groupnorm::Activation::Silu) => "groupnorm+silu",
        (Layout::Nhwc, groupnorm::Activation::Silu) => "groupnorm+silu nhwc",
        // (#[non_exhaustive] enums: variants this command does not know yet)
        _ => "groupnorm (other)",
    }
}

/// The last-level cache size that the CPU timing rotates its inputs past (the same constant as
/// scripts/bench_torch.py's `--device cpu`; 32 MiB is the L3 of the development machine).
const CPU_LLC_BYTES: usize = 32 << 20;

/// Copies of a `bytes`-long input to rotate through (bench_torch.py's formula).
fn cpu_copies(bytes: usize) -> usize {
    if 2 * bytes < 3 * CPU_LLC_BYTES {
        (3 * CPU_LLC_BYTES).div_ceil(2 * bytes.max(1)).clamp(2, 16)
    } else {
        1
    }
}

fn cpu_shape<T: Element, P: Element>(
    cfg: &Config,
    shape: &Shape,
    copy: f64,
) -> Result<Vec<Row>, Failure> {
    let dims = &shape.dims;
    let c = dims[1];
    let gn = GroupNorm::new(shape.groups, c)?
        .with_layout(cfg.layout)
        .with_activation(cfg.act);
    let mut rng = Rng::new(7);
    let x: Vec<T> = rng.normal_vec(shape.numel(), 0.0, 1.0);
    let dy: Vec<T> = rng.normal_vec(shape.numel(), 0.0, 1.0);
    let w: Vec<P> = rng.normal_vec(c, 1.0, 0.1);
    let b: Vec<P> = rng.normal_vec(c, 0.0, 0.1);
    let mut y = vec![T::default(); x.len()];
    // the backward writes into buffers allocated once, as a training loop reuses its own (a
    // fresh dx per call timed its page faults: 33.5 MB at 1x128x256x256 f32)
    let (mut dx, mut dw, mut db) = (y.clone(), vec![P::default(); c], vec![P::default(); c]);
    let (_, mut stats) = gn.forward(&x, dims, Affine::new().weight(&w).bias(&b))?;
    let bytes = shape.numel() * T::DTYPE.size();
    // Inputs rotated as scripts/bench_torch.py rotates PyTorch's: copies of x and dy whose
    // total passes 1.5 times the last-level cache, so that no run finds its inputs in cache.
    let copies = cpu_copies(bytes);
    let xs = vec![x; copies];
    let dys = vec![dy; copies];
    let mut rows = Vec::new();
    for &pass in &cfg.passes {
        let mut times = Vec::new();
        for i in 0..cfg.warmup + cfg.runs {
            let (x, dy) = (&xs[i % copies], &dys[i % copies]);
            let t = Instant::now();
            if pass == "fwd" {
                gn.forward_into(
                    x,
                    dims,
                    Affine::new().weight(&w).bias(&b),
                    &mut y,
                    &mut stats,
                )?;
            } else {
                gn.backward_into(
                    dy,
                    x,
                    dims,
                    &stats,
                    Affine::new().weight(&w).bias(&b),
                    &mut dx,
                    Some(&mut dw),
                    Some(&mut db),
                )?;
            }
            if i >= cfg.warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let ms = median(times);
        let gbps = passes_of(pass) * bytes as f64 / ms / 1e6;
        rows.push(Row {
            implementation: if cfg.layout == Layout::Nhwc {
                "groupnorm-cpu nhwc"
            } else {
                "groupnorm-cpu"
            },
            device: "cpu".into(),
            shape: shape.label(),
            dtype: format!("{}/{}", T::DTYPE, P::DTYPE),
            pass,
            path: "cpu fast".into(),
            time_ms: ms,
            gbps,
            pct_copy: 100.0 * gbps / copy,
            copy_gbps: copy,
            // each CPU call is timed on its own: its latency is its time
            latency_ms: ms,
            graph_ms: f64::NAN,
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Output

fn print_table(rows: &[Row]) {
    println!(
        "{:<14} {:<20} {:<9} {:<4} {:<26} {:>10} {:>9} {:>7} {:>10} {:>10}",
        "impl",
        "shape",
        "dtype",
        "pass",
        "path",
        "time ms",
        "GB/s",
        "% copy",
        "graph ms",
        "latency ms"
    );
    for r in rows {
        println!(
            "{:<14} {:<20} {:<9} {:<4} {:<26} {:>10.4} {:>9.1} {:>6.1}% {:>10} {:>10.4}",
            r.implementation,
            r.shape,
            r.dtype,
            r.pass,
            r.path,
            r.time_ms,
            r.gbps,
            r.pct_copy,
            if r.graph_ms.is_finite() {
                format!("{:.4}", r.graph_ms)
            } else {
                "-".to_string()
            },
            r.latency_ms
        );
    }
    if let Some(r) = rows.first() {
        println!(
            "copy bandwidth (read + write) on {}: {:.1} GB/s",
            r.device, r.copy_gbps
        );
    }
}

pub fn csv(rows: &[Row]) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in rows {
        writeln!(
            s,
            "{},{},{},{},{},{},{:.6},{:.2},{:.2},{:.2},{},{}",
            r.implementation,
            r.device.replace(',', " "),
            r.shape,
            r.dtype,
            r.pass,
            r.path.replace(',', " "),
            r.time_ms,
            r.gbps,
            r.pct_copy,
            r.copy_gbps,
            csv_ms(r.latency_ms),
            csv_ms(r.graph_ms)
        )
        .expect("write to String");
    }
    s
}

/// A time for the CSV: empty when it was not measured (NaN).
fn csv_ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.6}")
    } else {
        String::new()
    }
}

/// A measured number as JSON: `null` when it is not finite (JSON has no NaN or infinity; a
/// time that could not be measured must not come out as an unparsable bare `NaN`).
fn json_num(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// The rows as a JSON array of objects with the CSV's columns, one row per line.
pub fn json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "impl": r.implementation,
                "device": r.device,
                "shape": r.shape,
                "dtype": r.dtype,
                "pass": r.pass,
                "path": r.path,
                "time_ms": json_num(r.time_ms),
                "gbps": json_num(r.gbps),
                "pct_copy": json_num(r.pct_copy),
                "copy_gbps": json_num(r.copy_gbps),
                "latency_ms": json_num(r.latency_ms),
                "graph_ms": json_num(r.graph_ms),
            })
            .to_string()
        })
        .collect();
    format!("[\n  {}\n]\n", items.join(",\n  "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_valid_and_non_finite_values_are_null() {
        let row = |t: f64| Row {
            implementation: "groupnorm",
            device: "dev \"quoted\"\n".into(),
            shape: "2x320x64x64:32".into(),
            dtype: "f16/f32".into(),
            pass: "fwd",
            path: "fused".into(),
            time_ms: t,
            gbps: 1.5,
            pct_copy: f64::INFINITY,
            copy_gbps: 3.0,
            latency_ms: t,
            graph_ms: f64::NAN,
        };
        let text = json(&[row(0.25), row(f64::NAN)]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v[0]["time_ms"], 0.25);
        assert_eq!(v[0]["device"], "dev \"quoted\"\n");
        assert!(v[1]["time_ms"].is_null() && v[0]["pct_copy"].is_null());
        assert_eq!(v[1]["gbps"], 1.5);
        assert!(!text.contains("NaN") && !text.contains("inf"));
        assert!(v[0]["graph_ms"].is_null() && v[0]["latency_ms"] == 0.25);
    }

    #[test]
    fn csv_rows_have_the_header_s_columns_and_unmeasured_times_are_empty() {
        let row = Row {
            implementation: "groupnorm",
            device: "dev, with a comma".into(),
            shape: "2x320x64x64:32".into(),
            dtype: "f16/f32".into(),
            pass: "fwd",
            path: "fused".into(),
            time_ms: 0.5,
            gbps: 1.5,
            pct_copy: 50.0,
            copy_gbps: 3.0,
            latency_ms: 0.75,
            graph_ms: f64::NAN,
        };
        let text = csv(&[row]);
        let lines: Vec<&str> = text.lines().collect();
        let header: Vec<&str> = lines[0].split(',').collect();
        let cells: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(header.len(), cells.len());
        let cell = |name| cells[header.iter().position(|h| *h == name).unwrap()];
        assert_eq!(cell("latency_ms"), "0.750000");
        assert_eq!(cell("graph_ms"), "");
        assert_eq!(cell("device"), "dev  with a comma");
    }

    #[test]
    fn rotation_moves_more_than_twice_the_l2_per_round() {
        let l2 = 50 << 20;
        for bytes in [1 << 10, 100 << 10, 1 << 20, 4 << 20, 24 << 20, 49 << 20] {
            let k = gpu_copies(bytes, l2);
            // a round touches at least two tensors of every copy
            assert!(
                k == MAX_COPIES || 2 * k * bytes > 2 * l2,
                "{bytes} B: {k} copies"
            );
            assert!(k >= 2);
        }
        assert_eq!(gpu_copies(1, l2), MAX_COPIES);
        // a tensor of L2 size or more: one call touches two L2s by itself
        assert_eq!(gpu_copies(l2, l2), 1);
        assert_eq!(gpu_copies(10 * l2, l2), 1);
    }
}
