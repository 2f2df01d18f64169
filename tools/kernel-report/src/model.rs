//! Device and plan tables, the first-order model and the budgets.

use crate::devices::{self, Device, DEVICES};
use crate::traffic::{path_name, Run};
use groupnorm::gpu::emulate::{self, Trace};
use groupnorm::gpu::Path;
use groupnorm::{DType, GroupNorm, Layout};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

/// Assumed DRAM latency under load for Little's law, ns (a model constant: public
/// microbenchmarks of HBM GPUs report loaded latencies of several hundred ns; the first GPU
/// visit, scripts/gpu-visit.sh, corrects it).
pub const LATENCY_NS: f64 = 600.0;
/// Assumed cost of one kernel launch on a stream, µs (a model constant, to be corrected the same
/// way).
pub const LAUNCH_US: f64 = 2.5;
/// Bytes one thread of a 16-byte row kernel keeps in flight in its load phase: `U = 4` 16-byte
/// loads before the stores in `copy_to_shared` (kernels/common.cuh). A static count read from
/// the source, not from the SASS.
pub const INFLIGHT_PER_THREAD: u64 = 64;
/// Shared memory the driver reserves per block (CUDA guide: 1 KiB from compute capability 8.0).
const RESERVED_SMEM: u64 = 1024;

/// The device table.
pub fn device_table(s: &mut String, devs: &[Device]) {
    s.push_str(
        "## Device limits (public figures)\n\n\
         | device | cc | SMs | smem/SM KiB | smem/block KiB | regs/SM | threads/SM | blocks/SM | largest cluster | L2 MiB | boost MHz | copy GB/s (spec, not measured) | source |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for d in devs {
        let _ = writeln!(
            s,
            "| {} ({}) | {}.{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            d.name,
            d.key,
            d.cc / 10,
            d.cc % 10,
            d.sms,
            d.smem_per_sm_kib,
            d.smem_per_block_kib,
            d.regs_per_sm,
            d.threads_per_sm,
            d.blocks_per_sm,
            if d.max_cluster == 0 {
                "none".to_string()
            } else {
                d.max_cluster.to_string()
            },
            d.l2_mib,
            d.clock_mhz,
            d.copy_gbs,
            d.source
        );
    }
    let _ = writeln!(
        s,
        "\nPer compute capability (smem, registers, threads, blocks, clusters): {}.\n",
        devices::cc_source()
    );
}

/// The planned shapes: Stable Diffusion UNet and VAE GroupNorms (f16), a batch of small ones.
pub fn plan_shapes() -> Vec<(&'static str, [usize; 4], usize)> {
    vec![
        ("unet-64", [2, 320, 64, 64], 32),
        ("unet-32", [2, 640, 32, 32], 32),
        ("unet-16", [2, 1280, 16, 16], 32),
        ("unet-8", [2, 1280, 8, 8], 32),
        ("vae-64", [1, 512, 64, 64], 32),
        ("vae-128", [1, 512, 128, 128], 32),
        ("vae-256", [1, 256, 256, 256], 32),
        ("vae-512", [1, 128, 512, 512], 32),
        ("batch-16", [16, 128, 16, 16], 32),
    ]
}

/// Occupancy of one launch on `d`.
#[derive(Clone, Copy, Debug)]
pub struct Occupancy {
    /// Resident blocks per SM (threads, blocks and shared memory; registers not read here).
    pub per_sm: u64,
    /// Waves: blocks over (blocks per SM x SMs).
    pub waves: f64,
    /// Fill of the last wave, 0..=1.
    pub last_fill: f64,
    /// Bytes in flight per busy SM in the load phase.
    pub inflight: u64,
}

/// Registers per thread of each kernel, `(arch, entry point)`, from the SASS (when read).
static REGS: OnceLock<BTreeMap<(u32, String), u32>> = OnceLock::new();

/// Hands the occupancy model the registers the SASS section read.
pub fn set_registers(regs: BTreeMap<(u32, String), u32>) {
    let _ = REGS.set(regs);
}

/// Registers per thread of `kernel` on `d`'s architecture, where the report read its SASS.
pub fn registers(d: &Device, kernel: &str) -> Option<u32> {
    REGS.get()?.get(&(d.cc, kernel.to_string())).copied()
}

/// Blocks of `threads` threads of `regs` registers each that fit an SM's register file.
pub fn blocks_by_registers(regs: u32, threads: u32, regs_per_sm: u32, threads_per_sm: u32) -> u64 {
    let per_warp = (regs as u64 * 32).div_ceil(256) * 256;
    let warps = (regs_per_sm as u64 / per_warp.max(1)).min(threads_per_sm as u64 / 32);
    warps / (threads as u64).div_ceil(32)
}

/// The occupancy of a launch of `kernel`, `blocks` x `threads` with `smem` bytes, on `d`.
/// Registers: allocated per warp in units of 256 (8 per thread), as the CUDA occupancy
/// calculator does for compute capability 8.0 and later.
pub fn occupancy(d: &Device, kernel: &str, blocks: u32, threads: u32, smem: u32) -> Occupancy {
    let by_threads = (d.threads_per_sm / threads.max(1)) as u64;
    let by_smem = (d.smem_per_sm_kib as u64 * 1024) / (smem as u64 + RESERVED_SMEM);
    let by_regs = registers(d, kernel).map_or(u64::MAX, |r| {
        blocks_by_registers(r, threads, d.regs_per_sm, d.threads_per_sm)
    });
    let per_sm = by_threads
        .min(by_smem)
        .min(by_regs)
        .min(d.blocks_per_sm as u64)
        .max(1);
    let wave = per_sm * d.sms as u64;
    let waves = blocks as f64 / wave as f64;
    let rem = blocks as u64 % wave;
    let last_fill = if rem == 0 {
        1.0
    } else {
        rem as f64 / wave as f64
    };
    let resident = per_sm.min((blocks as u64).div_ceil(d.sms as u64));
    Occupancy {
        per_sm,
        waves,
        last_fill,
        inflight: resident * threads as u64 * INFLIGHT_PER_THREAD,
    }
}

/// The main (row) launch of a trace: the first one (partial, fused or cluster kernel).
pub fn row_launch(t: &Trace) -> &emulate::Launch {
    &t.launches[0]
}

fn plan(d: &Device, nchw: [usize; 4], groups: usize, nhwc: bool, backward: bool) -> Option<Trace> {
    let [n, c, h, w] = nchw;
    let dims = [n, c, h, w]; // (N, C, *spatial) whatever the layout
    let gn =
        GroupNorm::new(groups, c)
            .ok()?
            .with_layout(if nhwc { Layout::Nhwc } else { Layout::Nchw });
    emulate::plan_launches(
        &gn,
        Path::Auto,
        d.limits(),
        &dims,
        DType::F16,
        DType::F32,
        backward,
        backward,
    )
    .ok()
}

/// The plan table of one device.
pub fn plan_table(s: &mut String, d: &Device) {
    let _ = writeln!(
        s,
        "## Plans on the {} (exact: the crate's planner)\n\n\
         f16 activations, f32 parameters; the backward with dweight and dbias. Row launch: the \
         first kernel of the call (fused, cluster or split partial). Blocks per SM from threads, \
         blocks, shared memory (+{} B reserved per block) and the registers of the device's \
         architecture in the SASS section (sm_80, sm_90, sm_100; `-` where the report does not \
         list that architecture, and there registers are left out). Waves: blocks over blocks \
         per SM x SMs; cluster blocks are assumed to pack the SMs freely (placement within a \
         GPC is not modelled). In flight: resident blocks x threads x {} B (a static count from kernels/common.cuh).\n",
        d.name, RESERVED_SMEM, INFLIGHT_PER_THREAD
    );
    s.push_str(
        "| shape (N,C,H,W) G | layout | pass | path | launches | row grid | threads | smem KiB | cluster | regs | blocks/SM | waves | last wave fill | in flight/SM KiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (label, nchw, groups) in plan_shapes() {
        for nhwc in [false, true] {
            for backward in [false, true] {
                let [n, c, h, w] = nchw;
                let Some(t) = plan(d, nchw, groups, nhwc, backward) else {
                    let _ = writeln!(s, "| {label} {n}x{c}x{h}x{w} G{groups} | {} | {} | not planned (error) ||||||||||||", if nhwc { "NHWC" } else { "NCHW" }, if backward { "bwd" } else { "fwd" });
                    continue;
                };
                let l = row_launch(&t);
                let o = occupancy(d, &l.kernel, l.blocks, l.threads, l.smem_bytes);
                let _ = writeln!(
                    s,
                    "| {label} {n}x{c}x{h}x{w} G{groups} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {:.2} | {:.0} % | {:.0} |",
                    if nhwc { "NHWC" } else { "NCHW" },
                    if backward { "bwd" } else { "fwd" },
                    path_name(&t),
                    t.launches.len(),
                    l.blocks,
                    l.threads,
                    l.smem_bytes as f64 / 1024.0,
                    l.cluster,
                    registers(d, &l.kernel).map_or("-".to_string(), |r| r.to_string()),
                    o.per_sm,
                    o.waves,
                    o.last_fill * 100.0,
                    o.inflight as f64 / 1024.0
                );
            }
        }
    }
    s.push('\n');
}

/// Modelled time of one emulated run on `d`, µs, and what bounds it. `ipe`: SASS thread
/// instructions per element of each kernel (sm_90), where known.
pub fn model_time(d: &Device, r: &Run, ipe: &BTreeMap<String, f64>) -> (f64, &'static str) {
    let bw = d.copy_gbs as f64 * 1e3; // bytes per µs
    let mut total = 0.0;
    let mut bound_bw = 0.0;
    let mut bound_lat = 0.0;
    let mut bound_issue = 0.0;
    for (i, l) in r.trace.launches.iter().enumerate() {
        let o = occupancy(d, &l.kernel, l.blocks, l.threads, l.smem_bytes);
        let busy = (l.blocks as u64).min(d.sms as u64);
        let t_bw = r.counted.dram_per_launch[i] as f64 / bw;
        let inflight = (o.inflight * busy) as f64;
        let t_lat = r.counted.l2_per_launch[i] as f64 * LATENCY_NS / 1e3 / inflight.max(1.0);
        // 128 thread instructions per cycle per SM
        let t_issue = ipe.get(&l.kernel).map_or(0.0, |ipe| {
            r.case.numel() as f64 * ipe / (128.0 * d.sms as f64 * d.clock_mhz as f64)
        });
        total += t_bw.max(t_lat).max(t_issue) + LAUNCH_US;
        if t_bw >= t_lat && t_bw >= t_issue {
            bound_bw += t_bw;
        } else if t_lat >= t_issue {
            bound_lat += t_lat;
        } else {
            bound_issue += t_issue;
        }
    }
    let bound = if bound_bw >= bound_lat && bound_bw >= bound_issue {
        "bandwidth"
    } else if bound_lat >= bound_issue {
        "bytes in flight"
    } else {
        "instruction issue"
    };
    (total, bound)
}

/// The model section.
pub fn model_section(s: &mut String, runs: &[Run], ipe: &BTreeMap<String, f64>) {
    let _ = writeln!(
        s,
        "## First-order model (a model, not a measurement)\n\n\
         Per launch: time = max(DRAM bytes / copy bandwidth, bytes at L2 x latency / bytes in \
         flight, elements x SASS instructions per element / (128 x SMs x clock)) + launch cost, summed over the call's launches; predicted % of copy bandwidth = \
         minimum bytes / copy bandwidth / time. Constants: latency {LATENCY_NS} ns (assumed), \
         launch cost {LAUNCH_US} µs (assumed), {INFLIGHT_PER_THREAD} B in flight per thread \
         (static count from the source), copy bandwidth the datasheet figure of the device table. \
         Instructions per element: the sm_90 SASS figures of the SASS section (the issue term is \
         0 for a kernel without one, and everywhere in a build without SASS). Traffic from the \
         emulated runs above (plans at H200 limits, which the H100 shares).\n"
    );
    s.push_str(
        "| shape (`groupnorm bench` label) | layout | pass | asked | path | H100 µs | H100 % of copy BW | H200 µs | H200 % of copy BW | bound (H200) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let h100 = devices::by_key("h100").expect("h100");
    let h200 = devices::by_key("h200").expect("h200");
    let mut logs = [0.0f64; 2];
    let mut count = 0;
    // issue 14's done-when set: `Auto` rows that move at least 8 MiB, forward and backward apart
    let mut big = BigRows::default();
    for r in runs {
        let [n, c, h, w] = r.case.nchw;
        let mut cells = Vec::new();
        let mut bound = "";
        for (k, d) in [h100, h200].iter().enumerate() {
            let (t, b) = model_time(d, r, ipe);
            let pct = r.counted.minimum as f64 / (d.copy_gbs as f64 * 1e3) / t;
            if r.case.path == Path::Auto {
                logs[k] += pct.ln();
                if r.counted.minimum >= BIG_ROW_BYTES {
                    big.add(r.case.pass(), k, pct);
                }
            }
            cells.push(format!("{t:.1} | {:.0} %", pct * 100.0));
            bound = b;
        }
        if r.case.path == Path::Auto {
            count += 1;
        }
        let _ = writeln!(
            s,
            "| {} {n}x{c}x{h}x{w}:{} | {} | {} | {:?} | {} | {} | {} | {bound} |",
            r.case.label,
            r.case.groups,
            r.case.layout(),
            r.case.pass(),
            r.case.path,
            r.path_name(),
            cells[0],
            cells[1],
        );
    }
    if count > 0 {
        let _ = writeln!(
            s,
            "\nGeomean of the predicted % of copy bandwidth over the `Auto` rows (model): H100 \
             {:.0} %, H200 {:.0} %.\n",
            (logs[0] / count as f64).exp() * 100.0,
            (logs[1] / count as f64).exp() * 100.0
        );
        let _ = writeln!(
            s,
            "Issue 14's targets are a geomean over the `Auto` rows that move {} MiB or more \
             (smaller ones are ruled by launch cost), at least 90 % forward and 85 % backward. \
             Over the rows above that qualify (the video VAE shapes the issue also names are \
             not emulated: too large for the emulator's run time): {}.\n",
            BIG_ROW_BYTES >> 20,
            big.summary()
        );
    }
}

/// Rows at least this large (minimum traffic) are judged against the copy bandwidth.
pub const BIG_ROW_BYTES: u64 = 8 << 20;

/// Log-sums of the predicted fraction of copy bandwidth, per pass and device (H100, H200).
#[derive(Default)]
struct BigRows {
    fwd: ([f64; 2], usize),
    bwd: ([f64; 2], usize),
}

impl BigRows {
    fn add(&mut self, pass: &str, device: usize, pct: f64) {
        let slot = if pass == "fwd" {
            &mut self.fwd
        } else {
            &mut self.bwd
        };
        slot.0[device] += pct.ln();
        if device == 0 {
            slot.1 += 1;
        }
    }

    fn summary(&self) -> String {
        let one = |name: &str, (logs, n): ([f64; 2], usize)| {
            if n == 0 {
                return format!("{name}: no row");
            }
            let g = |k: usize| (logs[k] / n as f64).exp() * 100.0;
            format!("{name} H100 {:.0} %, H200 {:.0} % ({n} rows)", g(0), g(1))
        };
        format!(
            "{}; {}",
            one("forward", self.fwd),
            one("backward", self.bwd)
        )
    }
}

/// The budgets of issue 13, PASS or MISS with the figure.
pub fn budgets_section(s: &mut String, runs: &[Run], sass: &[(String, String, String, bool)]) {
    s.push_str(
        "## Budgets (issue 13; a MISS is listed, never silenced)\n\n\
         | budget | subject | figure | verdict |\n|---|---|---|---|\n",
    );
    let mut rows: Vec<(String, String, String, bool)> = Vec::new();
    let mut line = |_: &mut String, budget: &str, subject: String, figure: String, ok: bool| {
        rows.push((budget.to_string(), subject, figure, ok));
    };
    // 1. fused and cluster paths move exactly the minimum (activations; params and stats apart)
    for r in runs {
        let p = r.path_name();
        if p.contains("split") {
            continue;
        }
        let c = &r.counted;
        let [n, ch, h, w] = r.case.nchw;
        line(
            s,
            "fused/cluster move the minimum",
            format!(
                "{} {n}x{ch}x{h}x{w} {} {} ({p})",
                r.case.label,
                r.case.layout(),
                r.case.pass()
            ),
            format!(
                "{} B at DRAM vs {} B minimum ({:+.2} %)",
                c.act_dram,
                c.minimum,
                (c.act_dram as f64 / c.minimum as f64 - 1.0) * 100.0
            ),
            c.act_dram == c.minimum,
        );
    }
    // 2. split and cluster grids: last wave >= 90 % full or >= 4 waves; 3. bytes in flight
    for d in DEVICES
        .iter()
        .filter(|d| d.key == "h100" || d.key == "h200")
    {
        let need = if d.key == "h100" { 16 } else { 24 };
        for (label, nchw, groups) in plan_shapes() {
            for nhwc in [false, true] {
                for backward in [false, true] {
                    let Some(t) = plan(d, nchw, groups, nhwc, backward) else {
                        continue;
                    };
                    let l = row_launch(&t);
                    let o = occupancy(d, &l.kernel, l.blocks, l.threads, l.smem_bytes);
                    let subject = format!(
                        "{} {label} {} {} ({})",
                        d.key,
                        if nhwc { "NHWC" } else { "NCHW" },
                        if backward { "bwd" } else { "fwd" },
                        path_name(&t)
                    );
                    if !t.fused || t.cluster > 1 {
                        line(
                            s,
                            "last wave >= 90 % or >= 4 waves",
                            subject.clone(),
                            format!("{:.2} waves, last {:.0} %", o.waves, o.last_fill * 100.0),
                            o.waves >= 4.0 || o.last_fill >= 0.9,
                        );
                    }
                    line(
                        s,
                        &format!(">= {need} KiB in flight per SM"),
                        subject,
                        format!("{:.0} KiB", o.inflight as f64 / 1024.0),
                        o.inflight >= need * 1024,
                    );
                }
            }
        }
    }
    rows.extend(sass.iter().cloned());
    // every MISS on a line of its own; a budget's PASS lines folded into one when there are many
    let mut budgets: Vec<&str> = Vec::new();
    for r in &rows {
        if !budgets.contains(&r.0.as_str()) {
            budgets.push(&r.0);
        }
    }
    let misses = rows.iter().filter(|r| !r.3).count();
    for b in budgets {
        let mine: Vec<&(String, String, String, bool)> = rows.iter().filter(|r| r.0 == b).collect();
        let passes: Vec<_> = mine.iter().filter(|r| r.3).collect();
        for r in mine.iter().filter(|r| !r.3) {
            let _ = writeln!(s, "| {} | {} | {} | MISS |", r.0, r.1, r.2);
        }
        if passes.len() > 8 {
            let _ = writeln!(s, "| {b} | {} subjects | all within | PASS |", passes.len());
        } else {
            for r in passes {
                let _ = writeln!(s, "| {} | {} | {} | PASS |", r.0, r.1, r.2);
            }
        }
    }
    if sass.is_empty() {
        s.push_str(
            "\nNot checked in this build (no SASS): no spills; no global access narrower than \
             128 bits in a vector kernel's innermost loops; instructions per element.\n",
        );
    }
    let _ = writeln!(s, "\nMisses: {misses}.");
}

/// The GPU the driver reports, as a [`Device`] with what the planner needs (the other figures
/// are those of the named device with the same SM count and compute capability, if any).
pub fn current_device() -> Result<Device, String> {
    let gpu = groupnorm::gpu::Gpu::new(0).map_err(|e| e.to_string())?;
    let limits = emulate::limits_of(&gpu);
    let mut d = DEVICES
        .iter()
        .copied()
        .find(|d| d.sms as usize == limits.sms)
        .unwrap_or(DEVICES[0]);
    d.key = "current";
    d.name = "current GPU (limits from the driver; other figures of the closest named device)";
    d.sms = limits.sms as u32;
    d.smem_per_block_kib = (limits.smem_per_block / 1024) as u32;
    d.max_cluster = limits.max_cluster as u32;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_limited_blocks() {
        // 64 registers x 512 threads: 2048 per warp, 32 warps of 65,536, two blocks of 16
        assert_eq!(blocks_by_registers(64, 512, 65536, 2048), 2);
        // 40 registers round up to 40 x 32 = 1280 per warp: 51 warps, three blocks of 16
        assert_eq!(blocks_by_registers(40, 512, 65536, 2048), 3);
        // few registers: the threads limit (64 warps) binds
        assert_eq!(blocks_by_registers(16, 256, 65536, 2048), 8);
        assert_eq!(blocks_by_registers(255, 1024, 65536, 2048), 0);
    }

    #[test]
    fn waves_and_last_wave() {
        let h100 = devices::by_key("h100").unwrap();
        // no registers read: threads (4 x 512) and shared memory (227 KiB: 1 block) limit
        let o = occupancy(&h100, "none", 264, 512, 227 * 1024);
        assert_eq!(o.per_sm, 1);
        assert!((o.waves - 2.0).abs() < 1e-9 && (o.last_fill - 1.0).abs() < 1e-9);
        let o = occupancy(&h100, "none", 133, 512, 0);
        assert_eq!(o.per_sm, 4);
        assert_eq!(o.inflight, 2 * 512 * INFLIGHT_PER_THREAD);
    }
}
