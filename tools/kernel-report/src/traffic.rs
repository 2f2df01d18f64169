//! Exact global-memory traffic of the real kernels, counted in the host emulator.

use crate::devices::{self, Device};
use crate::lru::lru_hits;
use groupnorm::gpu::emulate::{self, LaunchTraffic, Trace, Watched, SECTOR_BYTES};
use groupnorm::gpu::{DeviceLimits, Path};
use groupnorm::{Activation, GroupNorm, Layout, Stats};
use half::f16;
use std::fmt::Write as _;

/// One emulated call.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// Short name of the shape.
    pub label: &'static str,
    /// N, C, H, W (the dims; NHWC buffers are laid out (N, H, W, C)).
    pub nchw: [usize; 4],
    /// Groups.
    pub groups: usize,
    /// Channels-last.
    pub nhwc: bool,
    /// Backward (else forward).
    pub backward: bool,
    /// The path asked for.
    pub path: Path,
}

impl Case {
    /// Elements of the activation.
    pub fn numel(&self) -> usize {
        self.nchw.iter().product()
    }
    fn dims(&self) -> Vec<usize> {
        // dims are (N, C, *spatial) whatever the layout
        self.nchw.to_vec()
    }
    /// `fwd`/`bwd`.
    pub fn pass(&self) -> &'static str {
        if self.backward {
            "bwd"
        } else {
            "fwd"
        }
    }
    /// `NCHW`/`NHWC`.
    pub fn layout(&self) -> &'static str {
        if self.nhwc {
            "NHWC"
        } else {
            "NCHW"
        }
    }
    fn gn(&self) -> GroupNorm {
        GroupNorm::new(self.groups, self.nchw[1])
            .expect("valid groups")
            .with_layout(if self.nhwc {
                Layout::Nhwc
            } else {
                Layout::Nchw
            })
            .with_activation(Activation::None)
    }
}

/// The device whose limits the traffic runs plan for (H100 and H200 share them).
pub const TRAFFIC_DEVICE: &str = "h200";

/// The emulated shapes (f16 activations, f32 parameters): bounded so that the whole report
/// runs in a few minutes on 2 cores (see the report's header for the bound).
pub fn cases() -> Vec<Case> {
    // (label, dims, groups, layouts): the 32 MiB vae-256 rows (NCHW only, to bound the run
    // time) are the ones whose split re-reads outgrow a 50 MiB L2
    let shapes: [(&str, [usize; 4], usize, &[bool]); 4] = [
        ("unet-64", [1, 320, 64, 64], 32, &[false, true]),
        ("vae-64", [1, 512, 64, 64], 32, &[false, true]),
        ("vae-256", [1, 256, 256, 256], 32, &[false]),
        ("batch-16", [16, 128, 16, 16], 32, &[false, true]),
    ];
    let mut v = Vec::new();
    for (label, nchw, groups, layouts) in shapes {
        for &nhwc in layouts {
            for backward in [false, true] {
                for path in [Path::Auto, Path::Split] {
                    v.push(Case {
                        label,
                        nchw,
                        groups,
                        nhwc,
                        backward,
                        path,
                    });
                }
            }
        }
    }
    v
}

/// Buffer classes the report lists apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// x, y, dy, dx.
    Activation,
    /// weight, bias, dweight, dbias.
    Param,
    /// mean, rstd.
    Stat,
    /// The plan's f32 workspace.
    Workspace,
}

fn class_of(name: &str) -> Class {
    match name {
        "x" | "y" | "dy" | "dx" => Class::Activation,
        "weight" | "bias" | "dweight" | "dbias" => Class::Param,
        "mean" | "rstd" => Class::Stat,
        _ => Class::Workspace,
    }
}

/// Traffic of one emulated call, in bytes.
#[derive(Clone, Debug, Default)]
pub struct Counted {
    /// Bytes of the minimum: whole sectors of the activations the pass must read and write.
    pub minimum: u64,
    /// Activation bytes to and from DRAM under the L2 model (reads that miss, each written
    /// sector once).
    pub act_dram: u64,
    /// Activation bytes read and written at L2 (each launch's sectors once).
    pub act_l2: u64,
    /// Parameter bytes at L2.
    pub params_l2: u64,
    /// Statistics bytes at L2.
    pub stats_l2: u64,
    /// Workspace bytes at L2.
    pub ws_l2: u64,
    /// Bytes read again in a later launch (any buffer), at L2.
    pub reread: u64,
    /// Of those, bytes the L2 model misses (from DRAM).
    pub reread_dram: u64,
    /// All DRAM bytes under the model (activations, parameters, statistics, workspace).
    pub dram_total: u64,
    /// `dram_total` per launch (a written sector counts in the launch that first writes it).
    pub dram_per_launch: Vec<u64>,
    /// Bytes at L2 per launch (all buffers).
    pub l2_per_launch: Vec<u64>,
}

/// One emulated call and what it moved.
pub struct Run {
    /// What ran.
    pub case: Case,
    /// The plan and launches.
    pub trace: Trace,
    /// Per launch, per buffer.
    pub launches: Vec<LaunchTraffic>,
    /// Summed with the L2 model of the traffic device.
    pub counted: Counted,
}

impl Run {
    /// The path the plan took, in words.
    pub fn path_name(&self) -> String {
        path_name(&self.trace)
    }
}

/// `fused`/`split`/`cluster`, with `nhwc-` for the channels-last kernels and `scalar` when the
/// 16-byte kernels did not run.
pub fn path_name(t: &Trace) -> String {
    let p = if t.cluster > 1 {
        "cluster"
    } else if t.fused {
        "fused"
    } else {
        "split"
    };
    format!(
        "{}{p}{}",
        if t.nhwc { "nhwc-" } else { "" },
        if t.vec { "" } else { " (scalar)" }
    )
}

/// 256-byte aligned storage, as cudaMalloc returns.
struct Aligned<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy> Aligned<T> {
    fn new(len: usize, value: T) -> Self {
        let size = std::mem::size_of::<T>();
        let buf = vec![value; len + 256 / size];
        let skip = (256 - buf.as_ptr() as usize % 256) % 256 / size;
        Aligned {
            buf,
            start: skip,
            len,
        }
    }
    fn s(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
    fn m(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

fn data(len: usize, seed: u64) -> Aligned<f16> {
    let mut a = Aligned::new(len, f16::ZERO);
    let mut state = seed | 1;
    for v in a.m() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *v = f16::from_f32((state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0);
    }
    a
}

/// Runs `case` in the emulator on a device of `limits`, counting every sector.
pub fn emulate(case: Case, limits: DeviceLimits) -> groupnorm::Result<(Trace, Vec<LaunchTraffic>)> {
    let gn = case.gn();
    let dims = case.dims();
    let numel = case.numel();
    let c = case.nchw[1];
    let rows = case.nchw[0] * case.groups;
    let x = data(numel, 1);
    let mut weight = Aligned::new(c, 1.0f32);
    let mut bias = Aligned::new(c, 0.0f32);
    for (i, (w, b)) in weight.m().iter_mut().zip(bias.m()).enumerate() {
        *w = 1.0 + (i % 7) as f32 / 8.0;
        *b = (i % 5) as f32 / 4.0 - 0.5;
    }
    // Stats owns plain Vecs (the allocator's alignment, at least 16 bytes here): their sector
    // counts may differ from a 256-byte aligned buffer's by one sector; they are listed apart.
    if !case.backward {
        let mut y = Aligned::new(numel, f16::ZERO);
        let mut stats = Stats {
            mean: vec![0.0; rows],
            rstd: vec![0.0; rows],
        };
        let watched = [
            Watched::of("x", x.s()),
            Watched::of("y", y.s()),
            Watched::of("weight", weight.s()),
            Watched::of("bias", bias.s()),
            Watched::of("mean", &stats.mean),
            Watched::of("rstd", &stats.rstd),
        ];
        let (r, launches) = emulate::count_traffic(&watched, || {
            emulate::forward_into(
                &gn,
                case.path,
                limits,
                x.s(),
                &dims,
                Some(weight.s()),
                Some(bias.s()),
                y.m(),
                &mut stats,
            )
        });
        return r.map(|t| (t, launches));
    }
    let dy = data(numel, 2);
    let mut dx = Aligned::new(numel, f16::ZERO);
    let mut dweight = Aligned::new(c, 0.0f32);
    let mut dbias = Aligned::new(c, 0.0f32);
    let stats = Stats {
        mean: (0..rows).map(|i| (i % 3) as f32 / 10.0).collect(),
        rstd: (0..rows).map(|i| 1.0 + (i % 4) as f32 / 10.0).collect(),
    };
    let watched = [
        Watched::of("dy", dy.s()),
        Watched::of("x", x.s()),
        Watched::of("dx", dx.s()),
        Watched::of("weight", weight.s()),
        Watched::of("bias", bias.s()),
        Watched::of("mean", &stats.mean),
        Watched::of("rstd", &stats.rstd),
        Watched::of("dweight", dweight.s()),
        Watched::of("dbias", dbias.s()),
    ];
    let (r, launches) = emulate::count_traffic(&watched, || {
        emulate::backward_into(
            &gn,
            case.path,
            limits,
            dy.s(),
            x.s(),
            &dims,
            &stats,
            Some(weight.s()),
            Some(bias.s()),
            dx.m(),
            Some(dweight.m()),
            Some(dbias.m()),
        )
    });
    r.map(|t| (t, launches))
}

/// Sums one call's traffic; re-reads go through an LRU model of `l2_bytes`. Within a launch the
/// sectors are replayed in grid order, approximated as each buffer in ascending address order,
/// the buffers interleaved by position (block b of a grid touches the b-th part of each).
pub fn count(launches: &[LaunchTraffic], minimum: u64, l2_bytes: u64) -> Counted {
    let sb = SECTOR_BYTES as u64;
    let mut c = Counted {
        minimum,
        dram_per_launch: vec![0; launches.len()],
        l2_per_launch: vec![0; launches.len()],
        ..Counted::default()
    };
    // events: (sector id, write, class, launch index)
    let mut events: Vec<(u64, bool, Class, usize)> = Vec::new();
    for (li, l) in launches.iter().enumerate() {
        let mut ev: Vec<(u64, u64, bool, Class)> = Vec::new(); // (order key, id, write, class)
        for (bi, b) in l.buffers.iter().enumerate() {
            let class = class_of(&b.name);
            let bytes = (b.read_sectors.len() + b.written_sectors.len()) as u64 * sb;
            c.l2_per_launch[li] += bytes;
            match class {
                Class::Activation => c.act_l2 += bytes,
                Class::Param => c.params_l2 += bytes,
                Class::Stat => c.stats_l2 += bytes,
                Class::Workspace => c.ws_l2 += bytes,
            }
            let span = b
                .read_sectors
                .iter()
                .chain(&b.written_sectors)
                .max()
                .map_or(1, |&m| m as u64 + 1);
            for (sectors, write) in [(&b.read_sectors, false), (&b.written_sectors, true)] {
                for &s in sectors {
                    // position in the buffer, scaled to 2^32, then buffer, then reads first
                    let key = ((s as u64) << 32) / span;
                    let id = ((bi as u64) << 40) | s as u64;
                    ev.push((
                        (key << 8) | ((bi as u64) << 1) | write as u64,
                        id,
                        write,
                        class,
                    ));
                }
            }
        }
        ev.sort_unstable_by_key(|e| e.0);
        events.extend(ev.into_iter().map(|(_, id, w, cl)| (id, w, cl, li)));
    }
    let ids: Vec<u64> = events.iter().map(|e| e.0).collect();
    let hits = lru_hits(&ids, l2_bytes / sb);
    let mut first_launch = std::collections::HashMap::new();
    let mut written = std::collections::HashSet::new();
    for (&(id, write, class, li), &hit) in events.iter().zip(&hits) {
        let first = *first_launch.entry(id).or_insert(li);
        if write {
            if written.insert(id) {
                c.dram_total += sb;
                c.dram_per_launch[li] += sb;
                if class == Class::Activation {
                    c.act_dram += sb;
                }
            }
            continue;
        }
        if first < li {
            c.reread += sb;
            if !hit {
                c.reread_dram += sb;
            }
        }
        // a read that hits a sector this sequence brought in or wrote costs no DRAM read
        if !hit {
            c.dram_total += sb;
            c.dram_per_launch[li] += sb;
            if class == Class::Activation {
                c.act_dram += sb;
            }
        }
    }
    c
}

/// Whole sectors of the activations a pass must move.
fn minimum(case: &Case) -> u64 {
    let sectors = (case.numel() * 2).div_ceil(SECTOR_BYTES) as u64 * SECTOR_BYTES as u64;
    sectors * if case.backward { 3 } else { 2 }
}

/// Every case, emulated at the traffic device's limits.
pub fn run_all() -> Vec<Run> {
    let dev: Device = devices::by_key(TRAFFIC_DEVICE).expect("traffic device");
    let mut runs = Vec::new();
    for case in cases() {
        let started = std::time::Instant::now();
        match emulate(case, dev.limits()) {
            Ok((trace, launches)) => {
                let counted = count(&launches, minimum(&case), (dev.l2_mib as u64) << 20);
                eprintln!(
                    "kernel-report: {} {} {} {:?}: {:.1} s",
                    case.label,
                    case.layout(),
                    case.pass(),
                    case.path,
                    started.elapsed().as_secs_f64()
                );
                runs.push(Run {
                    case,
                    trace,
                    launches,
                    counted,
                });
            }
            Err(e) => eprintln!(
                "kernel-report: {} {} {} {:?}: not run: {e}",
                case.label,
                case.layout(),
                case.pass(),
                case.path
            ),
        }
    }
    runs
}

fn mib(b: u64) -> String {
    format!("{:.3}", b as f64 / (1u64 << 20) as f64)
}

/// The traffic section.
pub fn traffic_section(s: &mut String, runs: &[Run]) {
    let dev = devices::by_key(TRAFFIC_DEVICE).expect("traffic device");
    let _ = writeln!(
        s,
        "## Traffic (exact, host emulator; L2 re-reads: LRU model)\n\n\
         Plans for the {} ({} SMs, {} KiB of shared memory per block, clusters of up to {}); \
         f16 activations, f32 weight and bias, no activation function; backward with dweight and \
         dbias. Every global load and store the kernels make is counted at 32-byte sector \
         granularity, per launch, reads and writes apart (each sector once per launch: the \
         traffic at L2). Across the launches of a call, re-reads replay through an LRU model of \
         the device's {} MiB L2 (sectors of a launch in grid order, approximated as ascending \
         addresses, buffers interleaved). DRAM bytes: reads that miss the model plus each \
         written sector once. Minimum: whole sectors of x and y (forward) or x, dy and dx \
         (backward). Parameters, statistics and workspace are listed apart, at L2. \
         MiB = 2^20 bytes. The shapes are emulated at full size (no extrapolation); the largest \
         bounds the report's run time (about a minute of emulation on one core).\n",
        dev.name, dev.sms, dev.smem_per_block_kib, dev.max_cluster, dev.l2_mib
    );
    s.push_str(
        "| shape (N,C,H,W) G | layout | pass | asked | path | launches | minimum MiB | activations at DRAM MiB | over minimum | params MiB | stats MiB | workspace MiB | re-read MiB | re-read from DRAM MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let c = &r.counted;
        let [n, ch, h, w] = r.case.nchw;
        let _ = writeln!(
            s,
            "| {} {n}x{ch}x{h}x{w} G{} | {} | {} | {:?} | {} | {} | {} | {} | {:+.1} % | {} | {} | {} | {} | {} |",
            r.case.label,
            r.case.groups,
            r.case.layout(),
            r.case.pass(),
            r.case.path,
            r.path_name(),
            r.launches.len(),
            mib(c.minimum),
            mib(c.act_dram),
            (c.act_dram as f64 / c.minimum as f64 - 1.0) * 100.0,
            mib(c.params_l2),
            mib(c.stats_l2),
            mib(c.ws_l2),
            mib(c.reread),
            mib(c.reread_dram),
        );
    }
    s.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(path: Path, backward: bool, nhwc: bool) -> Case {
        Case {
            label: "t",
            nchw: [4, 64, 8, 8],
            groups: 8,
            nhwc,
            backward,
            path,
        }
    }

    fn limits() -> DeviceLimits {
        devices::by_key("h200").unwrap().limits()
    }

    fn sectors(bytes: usize) -> Vec<u32> {
        (0..bytes.div_ceil(SECTOR_BYTES) as u32).collect()
    }

    /// The fused forward reads every sector of x once and writes every sector of y once, and
    /// reads nothing of y: what the kernel source says it does, held to the counters.
    #[test]
    fn fused_forward_counts_x_and_y_exactly() {
        for nhwc in [false, true] {
            let case = small(Path::Fused, false, nhwc);
            let (trace, launches) = emulate(case, limits()).unwrap();
            assert!(trace.fused && trace.vec, "{trace:?}");
            assert_eq!(launches.len(), 1);
            let b = |name: &str| launches[0].buffers.iter().find(|b| b.name == name).unwrap();
            let bytes = case.numel() * 2;
            assert_eq!(b("x").read_sectors, sectors(bytes));
            assert!(b("x").written_sectors.is_empty());
            assert_eq!(b("y").written_sectors, sectors(bytes));
            assert!(b("y").read_sectors.is_empty());
            // every element of x is loaded at least once: 16 elements (two 16-byte loads)
            // per sector at the least
            assert!(b("x").read_accesses >= sectors(bytes).len() as u64);
            let c = count(&launches, minimum(&case), 50 << 20);
            assert_eq!(c.act_dram, c.minimum);
            assert_eq!(c.reread, 0);
        }
    }

    /// The split forward reads x twice (partial, apply): the second read is a re-read, served
    /// by an L2 that holds x and y, and from DRAM by one far too small for them.
    #[test]
    fn split_forward_rereads_x_through_the_l2_model() {
        let case = small(Path::Split, false, false);
        let (trace, launches) = emulate(case, limits()).unwrap();
        assert!(!trace.fused);
        assert_eq!(launches.len(), 3);
        let x_bytes = (case.numel() * 2) as u64;
        let big = count(&launches, minimum(&case), 50 << 20);
        assert_eq!(big.reread_dram, 0);
        assert!(big.reread >= x_bytes, "{big:?}");
        assert_eq!(big.act_dram, big.minimum);
        // an L2 of 32 sectors: every x sector read after the partial kernel comes from DRAM
        // again (the merge kernel reads some of x too: the row pivots)
        let x_later: u64 = launches[1..]
            .iter()
            .flat_map(|l| &l.buffers)
            .filter(|b| b.name == "x")
            .map(|b| b.read_sectors.len() as u64 * SECTOR_BYTES as u64)
            .sum();
        assert!(x_later >= x_bytes);
        let tiny = count(&launches, minimum(&case), 1024);
        assert!(tiny.reread_dram >= x_bytes, "{tiny:?}");
        assert_eq!(tiny.act_dram, tiny.minimum + x_later);
        assert!(big.ws_l2 > 0);
    }

    /// A watched buffer the kernels never touch counts nothing, and the workspace a call
    /// allocates is watched on its own.
    #[test]
    fn untouched_buffers_count_nothing() {
        let case = small(Path::Split, true, false);
        let dummy = vec![0u8; 4096];
        let gn = case.gn();
        let x = data(case.numel(), 3);
        let ((), launches) = emulate::count_traffic(&[Watched::of("dummy", &dummy)], || {
            emulate::forward_into::<f16, f32>(
                &gn,
                case.path,
                limits(),
                x.s(),
                &case.dims(),
                None,
                None,
                &mut vec![f16::ZERO; case.numel()],
                &mut Stats {
                    mean: vec![0.0; 32],
                    rstd: vec![0.0; 32],
                },
            )
            .unwrap();
        });
        assert_eq!(launches.len(), 3);
        for l in &launches {
            let names: Vec<&str> = l.buffers.iter().map(|b| b.name.as_str()).collect();
            assert_eq!(names, ["dummy", "workspace"]);
            assert!(
                l.buffers[0].read_sectors.is_empty() && l.buffers[0].written_sectors.is_empty()
            );
        }
        assert!(!launches[0].buffers[1].written_sectors.is_empty());
    }
}
