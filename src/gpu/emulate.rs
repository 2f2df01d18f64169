//! Host emulator of the CUDA kernels (cargo feature `emulate`; for tests, not a public API).
//!
//! build.rs compiles the real `kernels/*.cu` with a C++ host compiler (kernels/host_emu.h,
//! tests/emu/) into a static library; this module runs them on host slices through the crate's
//! own planning (`src/gpu/plan.rs`) and launch sequence (`src/gpu/launch.rs`), with the
//! parameter structs filled as `ops.rs` fills them, but with host addresses. So a machine without
//! a GPU runs the kernels' arithmetic, indexing, chunking and synchronization, and tests hold them
//! to the f64 reference (tests/kernels.rs on every backend, tests/gpu_emulated.rs for the
//! emulator-only checks).
//!
//! Each block's threads run as fibers on the calling OS thread, so a launch is deterministic
//! under a given [`Schedule`]; running under another schedule and comparing bits finds races.
//! Outputs of the allocating [`forward`] and [`backward`], and the workspace, start as NaN, so an
//! element a kernel forgets to write shows; the workspace and [`HostBuffer`]s carry guard zones
//! that detect stray writes.
//!
//! Argument errors are returned as the GPU path returns them. A kernel that fails (threads that
//! can never meet at a barrier, a write past its shared memory or out of the workspace, a launch
//! the driver would refuse) is a bug in the kernels or the plan, the equivalent of a GPU fault:
//! these functions panic with the emulator's diagnosis.
//!
//! The kernels are trusted as on the GPU: every pointer handed to them is checked against the
//! dims here, but a kernel that indexed out of its buffers would corrupt host memory. The guard
//! zones exist to catch exactly that in tests.

use super::kernel_id::KernelId;
use super::launch::{self, Grid};
use super::params::{BwdParams, Chunking, FwdParams};
use super::plan::{DeviceLimits, Pass, Path, Plan};
use super::raw::{self, BackwardPtrs, ForwardPtrs, Problem};
use crate::config::check_len;
use crate::dtype::check_param_dtype;
use crate::{DType, Element, Error, Geometry, Grads, GroupNorm, Result, Stats};
use std::ffi::{c_char, c_void, CStr, CString};

extern "C" {
    fn gn_emu_launch_cluster(
        kernel: *const c_char,
        grid: u32,
        block: u32,
        smem_bytes: u32,
        cluster: u32,
        params: *const c_void,
    ) -> i32;
    fn gn_emu_last_error() -> *const c_char;
    fn gn_emu_set_schedule(policy: u32, seed: u64) -> i32;
    fn gn_emu_kernel_count() -> usize;
    fn gn_emu_kernel_name(i: usize) -> *const c_char;
    fn gn_emu_float2half_rn(f: f32) -> u16;
    fn gn_emu_half2float(h: u16) -> f32;
    fn gn_emu_float2bfloat16_rn(f: f32) -> u16;
    fn gn_emu_bfloat162float(b: u16) -> f32;
    fn gn_emu_traffic_watch(base: usize, bytes: usize, reads: *mut u32, writes: *mut u32) -> i32;
    fn gn_emu_traffic_clear();
}

/// Prefix of the kernels that test the emulator itself (tests/emu/emu_selftest.cpp).
pub const SELFTEST_PREFIX: &str = "gn_emu_selftest_";

/// Elements of guard zone on each side of a [`HostBuffer`] and of the workspace.
const GUARD: usize = 64;
/// The value guard zones hold (exact in every dtype, and nothing a kernel computes here).
const GUARD_VALUE: f32 = -24576.0;

/// The order in which an emulated launch runs its blocks, and the ready threads of a block
/// between barriers. The kernels must give the same bits under every order: a difference is a
/// race (a missing `__syncthreads`, or blocks of one launch depending on each other).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// Blocks in ascending order; in a block, one warp runs as far as the barriers let it
    /// before the next starts (lowest warp first, lanes ascending), so warps drift apart as far
    /// as they can (the default).
    #[default]
    Forward,
    /// As `Forward`, in descending order of blocks, warps and lanes.
    Reverse,
    /// Blocks, warps and lanes in orders drawn from a generator with this seed.
    Shuffled(u64),
    /// Ascending, one thread at a time across the whole block: warps in near lockstep.
    RoundRobin,
}

/// Sets the [`Schedule`] of emulated launches made from the calling OS thread.
pub fn set_schedule(schedule: Schedule) {
    let (policy, seed) = match schedule {
        Schedule::Forward => (0, 0),
        Schedule::Reverse => (1, 0),
        Schedule::Shuffled(seed) => (2, seed),
        Schedule::RoundRobin => (3, 0),
    };
    // SAFETY: plain values; the C side only stores them in thread-local variables.
    let rc = unsafe { gn_emu_set_schedule(policy, seed) };
    debug_assert_eq!(rc, 0);
}

thread_local! {
    static TICKETS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Whether emulated backward calls from the calling OS thread hand the kernels ticket words
/// (`raw::BackwardPtrs::with_tickets`, as [`GpuGroupNorm`](super::GpuGroupNorm) does; the
/// default), so that the fused and cluster paths reduce dweight and dbias over `N > 1` samples
/// in their own launch, or none (as the C ABI and the candle op), so that `bwd_params` follows.
pub fn set_tickets(on: bool) {
    TICKETS.with(|t| t.set(on));
}

/// One kernel launch an emulated call made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// The entry point.
    pub kernel: String,
    /// Grid size.
    pub blocks: u32,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory, bytes.
    pub smem_bytes: u32,
    /// Blocks per thread-block cluster (1: no clusters).
    pub cluster: u32,
}

/// What an emulated call ran: the plan the crate's planner chose, and the launches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// One block per row (else the split path).
    pub fused: bool,
    /// The 16-byte vector kernels (else the scalar ones).
    pub vec: bool,
    /// Chunks per row.
    pub chunks: u32,
    /// Channels per chunk (when `pieces == 1`).
    pub cpb: u32,
    /// Pieces per channel.
    pub pieces: u32,
    /// Spatial values per piece.
    pub piece_len: u32,
    /// f32 workspace the plan asked for.
    pub workspace_floats: usize,
    /// The channels-last kernels ran (`cpb` is then groups per tile, `chunks` pieces per row).
    pub nhwc: bool,
    /// Blocks per thread-block cluster: `chunks` on the cluster path, else 1.
    pub cluster: u32,
    /// The launches, in order.
    pub launches: Vec<Launch>,
}

impl Trace {
    fn new(plan: &Plan) -> Trace {
        let Chunking {
            chunks,
            cpb,
            pieces,
            piece_len,
        } = plan.chunking;
        Trace {
            fused: plan.fused,
            vec: plan.vec,
            chunks,
            cpb,
            pieces,
            piece_len,
            workspace_floats: plan.workspace_floats,
            nhwc: plan.nhwc,
            cluster: plan.cluster,
            launches: Vec::new(),
        }
    }

    /// Total blocks over all launches (what an emulated call costs).
    pub fn total_blocks(&self) -> u64 {
        self.launches.iter().map(|l| l.blocks as u64).sum()
    }
}

/// A host buffer whose data starts `misalign` elements past a 16-byte boundary, between guard
/// zones that detect stray writes ([`HostBuffer::guards_intact`]). (Not `Clone`: a clone's
/// data would lie elsewhere, with another alignment.)
#[derive(Debug)]
pub struct HostBuffer<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Element> HostBuffer<T> {
    /// A copy of `data`, starting `misalign` elements past a 16-byte boundary.
    pub fn new(data: &[T], misalign: usize) -> Self {
        let mut b = Self::filled(data.len(), T::default(), misalign);
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// `len` copies of `value`, starting `misalign` elements past a 16-byte boundary.
    pub fn filled(len: usize, value: T, misalign: usize) -> Self {
        let size = std::mem::size_of::<T>();
        let per_16 = 16 / size;
        let guard = T::from_f32(GUARD_VALUE);
        let mut buf = vec![guard; len + 2 * GUARD + per_16 + misalign];
        // the Vec never reallocates after this, so the address (and its alignment) stays
        let base = buf.as_ptr() as usize + GUARD * size;
        let skip = (16 - base % 16) % 16 / size;
        let start = GUARD + skip + misalign;
        buf[start..start + len].fill(value);
        HostBuffer { buf, start, len }
    }

    /// The data.
    pub fn as_slice(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }

    /// The data, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }

    /// A copy of the data.
    pub fn to_vec(&self) -> Vec<T> {
        self.as_slice().to_vec()
    }

    /// Whether every element outside the data still holds the guard value.
    pub fn guards_intact(&self) -> bool {
        let guard = T::from_f32(GUARD_VALUE);
        let (before, rest) = self.buf.split_at(self.start);
        before.iter().chain(&rest[self.len..]).all(|&v| v == guard)
    }
}

/// Elements `p` lies past a 16-byte boundary.
fn misalignment<T>(p: *const T) -> usize {
    (p as usize % 16) / std::mem::size_of::<T>()
}

/// Runs one kernel of the emulator on the calling thread; `Err` holds the emulator's diagnosis.
///
/// # Safety
///
/// `params` must be the parameter struct `kernel` takes (`GnFwdParams` or `GnBwdParams`, see
/// params.h), and every pointer in it valid for what the kernel reads and writes with the given
/// grid: the same contract as a GPU launch.
unsafe fn launch_raw(
    kernel: &str,
    grid: Grid,
    params: *const c_void,
) -> std::result::Result<(), String> {
    let name = CString::new(kernel).map_err(|_| format!("kernel name `{kernel}` with a NUL"))?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the caller guarantees
    // `params` and the pointers in it (see this function's contract).
    let rc = unsafe {
        gn_emu_launch_cluster(
            name.as_ptr(),
            grid.blocks,
            grid.threads,
            grid.smem,
            grid.cluster,
            params,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: gn_emu_last_error returns a NUL-terminated thread-local buffer that stays valid
    // until the next launch from this thread; it is copied out at once.
    let why = unsafe { CStr::from_ptr(gn_emu_last_error()) }
        .to_string_lossy()
        .into_owned();
    Err(format!("emulating `{kernel}` (code {rc}): {why}"))
}

/// A launcher for the shared launch sequence: checks what the driver would refuse, runs the
/// kernel on the host and records it in `trace`. Panics where the launch fails (see the module
/// documentation).
fn launcher<'a, A>(
    limits: DeviceLimits,
    trace: &'a mut Trace,
) -> impl FnMut(KernelId, Grid, &A) -> Result<()> + 'a {
    move |id, grid, params| {
        let name = id.name();
        assert!(
            grid.smem as usize <= limits.smem_per_block,
            "launching `{name}`: {} bytes of dynamic shared memory, over the {} this device \
             allows a block (the driver would refuse the launch)",
            grid.smem,
            limits.smem_per_block
        );
        assert!(
            grid.cluster == 1 || grid.cluster as usize <= limits.max_cluster,
            "launching `{name}` in clusters of {}: this device runs clusters of at most {}",
            grid.cluster,
            limits.max_cluster
        );
        trace.launches.push(Launch {
            kernel: name.clone(),
            blocks: grid.blocks,
            threads: grid.threads,
            smem_bytes: grid.smem,
            cluster: grid.cluster,
        });
        // SAFETY: the launch sequences pass `FwdParams` to the forward kernels and `BwdParams`
        // to the backward ones (the names say which), #[repr(C)] mirrors of params.h. The
        // callers below filled them from slices checked against the dims and the plan, which
        // stay borrowed until the sequence returns.
        let r = unsafe { launch_raw(&name, grid, params as *const A as *const c_void) };
        if let Err(why) = r {
            panic!("emulated launch failed: {why}");
        }
        take_launch_traffic(&name);
        Ok(())
    }
}

fn check_geometry(gn: &GroupNorm, dims: &[usize]) -> Result<Geometry> {
    gn.geometry(dims)
}

fn check_param<T: Element, P: Element>(
    name: &'static str,
    p: Option<&[P]>,
    channels: usize,
) -> Result<()> {
    if let Some(p) = p {
        check_param_dtype::<T, P>(name)?;
        check_len(name, p.len(), channels, "one value per channel")?;
    }
    Ok(())
}

fn check_stats(mean: usize, rstd: usize, rows: usize) -> Result<()> {
    for (name, len) in [("mean", mean), ("rstd", rstd)] {
        if len < rows {
            check_len(name, len, rows, "N * G rows")?;
        }
    }
    Ok(())
}

fn addr<T>(s: &[T]) -> u64 {
    s.as_ptr() as u64
}

fn addr_mut<T>(s: &mut [T]) -> u64 {
    s.as_mut_ptr() as u64
}

/// A NaN-poisoned workspace of `floats` values between guard zones.
fn workspace(floats: usize) -> HostBuffer<f32> {
    HostBuffer::filled(floats, f32::NAN, 0)
}

fn check_workspace(ws: &HostBuffer<f32>) {
    assert!(
        ws.guards_intact(),
        "a kernel wrote outside the workspace the plan sized"
    );
}

/// `words` zeroed ticket words between guard zones (u32 words in an f32 buffer: the zero of
/// both is all bits clear).
fn tickets(words: usize) -> HostBuffer<f32> {
    HostBuffer::filled(words, 0.0, 0)
}

/// The kernels' contract for the ticket words: back to zero after every call, none written
/// outside them.
fn check_tickets(t: &HostBuffer<f32>) {
    assert!(
        t.guards_intact(),
        "a kernel wrote outside the ticket words the plan sized"
    );
    let left: Vec<u32> = t.as_slice().iter().map(|v| v.to_bits()).collect();
    assert!(
        left.iter().all(|&w| w == 0),
        "the kernels left ticket words that are not zero: {left:?}"
    );
}

/// Forward pass of the kernels on the host into caller-owned buffers, as
/// [`GpuGroupNorm::forward_into`](super::GpuGroupNorm::forward_into) with `path` forced and a
/// device of `limits`. The vector kernels run when `x` and `y` are 16-byte aligned (and the
/// shape allows); the returned [`Trace`] says what ran.
///
/// Panics where a kernel fails (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub fn forward_into<T: Element, P: Element>(
    gn: &GroupNorm,
    path: Path,
    limits: DeviceLimits,
    x: &[T],
    dims: &[usize],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    y: &mut [T],
    stats: &mut Stats,
) -> Result<Trace> {
    let geo = check_forward::<T, P>(gn, dims, weight, bias, stats)?;
    geo.check_activation("x", x.len())?;
    geo.check_activation("y", y.len())?;
    let (xa, ya) = (addr(x), addr_mut(y));
    run_forward::<T, P>(gn, path, limits, &geo, xa, ya, weight, bias, stats)
}

/// [`forward_into`] in place: `y` is `x` (the same addresses), as the raw layer allows where
/// the plan is fused (a block reads its whole row before it writes any of it) and refuses with
/// [`Error::Aliased`](crate::Error::Aliased) on the split and cluster paths.
///
/// Panics where a kernel fails (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub fn forward_in_place<T: Element, P: Element>(
    gn: &GroupNorm,
    path: Path,
    limits: DeviceLimits,
    xy: &mut [T],
    dims: &[usize],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    stats: &mut Stats,
) -> Result<Trace> {
    let geo = check_forward::<T, P>(gn, dims, weight, bias, stats)?;
    geo.check_activation("x", xy.len())?;
    let at = addr_mut(xy);
    run_forward::<T, P>(gn, path, limits, &geo, at, at, weight, bias, stats)
}

/// The geometry of a forward pass, with its parameters and statistics checked.
fn check_forward<T: Element, P: Element>(
    gn: &GroupNorm,
    dims: &[usize],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    stats: &Stats,
) -> Result<Geometry> {
    let geo = check_geometry(gn, dims)?;
    check_param_dtype::<T, P>("weight")?;
    check_param::<T, P>("weight", weight, geo.c)?;
    check_param::<T, P>("bias", bias, geo.c)?;
    check_stats(stats.mean.len(), stats.rstd.len(), geo.rows())?;
    Ok(geo)
}

/// The forward pass of [`forward_into`] and [`forward_in_place`] once their arguments are
/// checked: the raw layer's validation and planning with host addresses, then the launches.
#[allow(clippy::too_many_arguments)]
fn run_forward<T: Element, P: Element>(
    gn: &GroupNorm,
    path: Path,
    limits: DeviceLimits,
    geo: &Geometry,
    x: u64,
    y: u64,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    stats: &mut Stats,
) -> Result<Trace> {
    let problem = problem::<T, P>(gn, path, geo);
    let mut ws = workspace(raw::workspace_floats(limits, &problem, Pass::Forward)?);
    let ws_ptr = if ws.as_slice().is_empty() {
        0
    } else {
        addr_mut(ws.as_mut_slice())
    };
    let ws_bytes = ws.as_slice().len() * 4;
    watch_if_counting("workspace", ws_ptr as usize, ws_bytes);
    let ptrs = ForwardPtrs {
        x,
        y,
        weight: weight.map_or(0, addr),
        bias: bias.map_or(0, addr),
        mean: addr_mut(&mut stats.mean),
        rstd: addr_mut(&mut stats.rstd),
    };
    // the raw layer's own validation, planning and parameter filling, with host addresses
    let (plan, params) = raw::prepare_forward(limits, &problem, &ptrs, ws_ptr, ws_bytes, false)?;
    let mut trace = Trace::new(&plan);
    launch::forward_sequence(
        &plan,
        T::DTYPE,
        P::DTYPE,
        &params,
        launcher(limits, &mut trace),
    )?;
    check_workspace(&ws);
    Ok(trace)
}

/// Backward pass of the kernels on the host into caller-owned buffers, as
/// [`GpuGroupNorm::backward_into`](super::GpuGroupNorm::backward_into) with `path` forced and a
/// device of `limits`. `dweight` may only be asked for with a weight.
///
/// Panics where a kernel fails (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Element, P: Element>(
    gn: &GroupNorm,
    path: Path,
    limits: DeviceLimits,
    dy: &[T],
    x: &[T],
    dims: &[usize],
    stats: &Stats,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    dx: &mut [T],
    dweight: Option<&mut [P]>,
    dbias: Option<&mut [P]>,
) -> Result<Trace> {
    let geo = check_geometry(gn, dims)?;
    geo.check_activation("dy", dy.len())?;
    geo.check_activation("x", x.len())?;
    geo.check_activation("dx", dx.len())?;
    check_param_dtype::<T, P>("weight")?;
    check_param::<T, P>("weight", weight, geo.c)?;
    check_param::<T, P>("bias", bias, geo.c)?;
    check_param::<T, P>("dweight", dweight.as_deref(), geo.c)?;
    check_param::<T, P>("dbias", dbias.as_deref(), geo.c)?;
    if dweight.is_some() && weight.is_none() {
        return Err(Error::WeightNeeded);
    }
    check_stats(stats.mean.len(), stats.rstd.len(), geo.rows())?;
    let problem = problem::<T, P>(gn, path, &geo);
    let mut ws = workspace(raw::workspace_floats(limits, &problem, Pass::Backward)?);
    let ws_ptr = if ws.as_slice().is_empty() {
        0
    } else {
        addr_mut(ws.as_mut_slice())
    };
    let ws_bytes = ws.as_slice().len() * 4;
    watch_if_counting("workspace", ws_ptr as usize, ws_bytes);
    let words = if TICKETS.with(|t| t.get()) {
        raw::ticket_words(limits, &problem)?
    } else {
        0
    };
    let mut tk = tickets(words);
    let tk_ptr = if words == 0 {
        0
    } else {
        addr_mut(tk.as_mut_slice())
    };
    let ptrs = BackwardPtrs {
        dy: addr(dy),
        x: addr(x),
        mean: addr(&stats.mean),
        rstd: addr(&stats.rstd),
        weight: weight.map_or(0, addr),
        dx: addr_mut(dx),
        dweight: dweight.map_or(0, addr_mut),
        dbias: dbias.map_or(0, addr_mut),
        bias: bias.map_or(0, addr),
        tickets: tk_ptr,
        ticket_words: words,
    };
    let (plan, params, _) =
        raw::prepare_backward(limits, &problem, &ptrs, ws_ptr, ws_bytes, false)?;
    let mut trace = Trace::new(&plan);
    launch::backward_sequence(
        &plan,
        T::DTYPE,
        P::DTYPE,
        geo.c,
        &params,
        launcher(limits, &mut trace),
    )?;
    check_workspace(&ws);
    check_tickets(&tk);
    Ok(trace)
}

/// The raw layer's description of an emulated call.
fn problem<'a, T: Element, P: Element>(
    gn: &GroupNorm,
    path: Path,
    geo: &'a Geometry,
) -> Problem<'a> {
    Problem {
        dims: &geo.dims,
        groups: geo.g,
        eps: gn.eps(),
        layout: geo.layout,
        dtype: T::DTYPE,
        param_dtype: P::DTYPE,
        path,
        activation: gn.activation(),
    }
}

/// A device without thread-block clusters (as before compute capability 9.0): the allocating
/// [`forward`] and [`backward`] plan for one; [`forward_into`] and [`backward_into`] take any
/// [`DeviceLimits`].
fn limits(sms: usize, smem_per_block: usize) -> DeviceLimits {
    DeviceLimits {
        sms,
        smem_per_block,
        max_cluster: 0,
    }
}

fn check_guards<T: Element>(name: &str, b: &HostBuffer<T>) {
    assert!(b.guards_intact(), "a kernel wrote outside `{name}`");
}

/// Forward pass of the kernels on the host, into new NaN-filled outputs: `y` is placed with the
/// same alignment as `x`, so an aligned `x` runs the vector kernels where the shape allows and a
/// misaligned one the scalar kernels.
///
/// Panics where a kernel fails (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Element, P: Element>(
    gn: &GroupNorm,
    path: Path,
    x: &[T],
    dims: &[usize],
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    sms: usize,
    smem_per_block: usize,
) -> Result<(Vec<T>, Stats)> {
    let geo = check_geometry(gn, dims)?;
    let mut y = HostBuffer::filled(geo.numel(), T::from_f32(f32::NAN), misalignment(x.as_ptr()));
    let mut stats = Stats {
        mean: vec![f32::NAN; geo.rows()],
        rstd: vec![f32::NAN; geo.rows()],
    };
    forward_into(
        gn,
        path,
        limits(sms, smem_per_block),
        x,
        dims,
        weight,
        bias,
        y.as_mut_slice(),
        &mut stats,
    )?;
    check_guards("y", &y);
    Ok((y.to_vec(), stats))
}

/// Backward pass of the kernels on the host, into new NaN-filled outputs (`dx` placed with the
/// same alignment as `x`). `dweight` is computed when `weight` is given, `dbias` when
/// `want_dbias`.
///
/// Panics where a kernel fails (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element, P: Element>(
    gn: &GroupNorm,
    path: Path,
    dy: &[T],
    x: &[T],
    dims: &[usize],
    stats: &Stats,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    want_dbias: bool,
    sms: usize,
    smem_per_block: usize,
) -> Result<Grads<T, P>> {
    let geo = check_geometry(gn, dims)?;
    let nan_p = P::from_f32(f32::NAN);
    let mut dx = HostBuffer::filled(geo.numel(), T::from_f32(f32::NAN), misalignment(x.as_ptr()));
    let mut dweight = weight.map(|_| HostBuffer::filled(geo.c, nan_p, 0));
    let mut dbias = want_dbias.then(|| HostBuffer::filled(geo.c, nan_p, 0));
    backward_into(
        gn,
        path,
        limits(sms, smem_per_block),
        dy,
        x,
        dims,
        stats,
        weight,
        bias,
        dx.as_mut_slice(),
        dweight.as_mut().map(|b| b.as_mut_slice()),
        dbias.as_mut().map(|b| b.as_mut_slice()),
    )?;
    check_guards("dx", &dx);
    for (name, b) in [("dweight", &dweight), ("dbias", &dbias)] {
        if let Some(b) = b {
            check_guards(name, b);
        }
    }
    Ok(Grads {
        dx: dx.to_vec(),
        dweight: dweight.map(|b| b.to_vec()),
        dbias: dbias.map(|b| b.to_vec()),
    })
}

/// Every kernel of `kernels/*.cu` the emulator can run (its launch table, built by build.rs from
/// the preprocessed sources), sorted; without the emulator's own self-test kernels.
pub fn kernel_names() -> Vec<String> {
    table()
        .into_iter()
        .filter(|n| !n.starts_with(SELFTEST_PREFIX))
        .collect()
}

fn table() -> Vec<String> {
    // SAFETY: no arguments; returns the length of a static table.
    let n = unsafe { gn_emu_kernel_count() };
    (0..n)
        .map(|i| {
            // SAFETY: i < count, so the C side returns a pointer to a static NUL-terminated
            // string literal.
            unsafe { CStr::from_ptr(gn_emu_kernel_name(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Every kernel name the shared launch sequences (`src/gpu/launch.rs`) can ask for, over
/// every dtype pair the API accepts, both paths, both kinds of kernel and with or without
/// parameter gradients: found by running the sequences with a launcher that only records.
pub fn launchable_kernels() -> Vec<String> {
    let mut names = Vec::new();
    for t in [DType::F32, DType::F16, DType::BF16] {
        for p in [t, DType::F32] {
            for (fused, vec, nhwc, silu, cluster) in (0..32).map(|i| {
                let cluster = if i & 16 != 0 { 2 } else { 1 };
                (i & 1 != 0, i & 2 != 0, i & 4 != 0, i & 8 != 0, cluster)
            }) {
                let plan = Plan {
                    fused,
                    vec,
                    chunking: Chunking::default(),
                    blocks: 1,
                    smem_bytes: 0,
                    workspace_floats: 0,
                    nhwc,
                    stream_smem_bytes: 0,
                    cluster,
                };
                let mut record = |id: KernelId| {
                    names.push(id.name());
                    Ok(())
                };
                let fwd = FwdParams {
                    rows: 1,
                    ..FwdParams::default()
                };
                launch::forward_sequence(&plan, t, p, &fwd, |n, _, _: &FwdParams| record(n))
                    .expect("recording cannot fail");
                let bwd = BwdParams {
                    rows: 1,
                    dweight: 1,
                    dbias: 1,
                    activation: silu as u32,
                    ..BwdParams::default()
                };
                launch::backward_sequence(&plan, t, p, 1, &bwd, |n, _, _: &BwdParams| record(n))
                    .expect("recording cannot fail");
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Runs one of the emulator's self-test kernels (tests/emu/emu_selftest.cpp) with forward
/// parameters whose `x`, `y` and `mean` point at the given buffers and whose `s` is `s`.
/// `Err` holds the emulator's diagnosis of a failed launch.
///
/// # Panics
///
/// Where `name` is not a self-test kernel, `x` or `y` holds fewer than `blocks * threads` values
/// or `mean` fewer than `blocks` (the self-test kernels index them so).
#[allow(clippy::too_many_arguments)]
pub fn run_selftest(
    name: &str,
    blocks: u32,
    threads: u32,
    smem_bytes: u32,
    s: u32,
    x: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
) -> std::result::Result<(), String> {
    run_selftest_in_clusters(name, blocks, threads, smem_bytes, 1, s, x, y, mean)
}

/// [`run_selftest`] with thread-block clusters of `cluster` consecutive blocks.
#[allow(clippy::too_many_arguments)]
pub fn run_selftest_in_clusters(
    name: &str,
    blocks: u32,
    threads: u32,
    smem_bytes: u32,
    cluster: u32,
    s: u32,
    x: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
) -> std::result::Result<(), String> {
    assert!(
        name.starts_with(SELFTEST_PREFIX),
        "`{name}` is not a self-test kernel ({SELFTEST_PREFIX}*)"
    );
    let total = blocks as usize * threads as usize;
    assert!(x.len() >= total && y.len() >= total && mean.len() >= blocks as usize);
    let params = FwdParams {
        x: addr(x),
        y: addr_mut(y),
        mean: addr_mut(mean),
        s,
        ..FwdParams::default()
    };
    // SAFETY: the self-test kernels take GnFwdParams and touch only x[i], y[i] for i < blocks *
    // threads, mean[block] and dynamic shared memory (the emulator's own), all checked above.
    unsafe {
        launch_raw(
            name,
            Grid {
                blocks,
                threads,
                smem: smem_bytes,
                cluster,
            },
            &params as *const FwdParams as *const c_void,
        )
    }
}

/// The emulator's f32 → f16 conversion (`__float2half_rn`), as bits.
pub fn f32_to_f16_bits(v: f32) -> u16 {
    // SAFETY: a pure function of its argument.
    unsafe { gn_emu_float2half_rn(v) }
}

/// The emulator's f16 → f32 conversion (`__half2float`).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    // SAFETY: a pure function of its argument.
    unsafe { gn_emu_half2float(h) }
}

/// The emulator's f32 → bf16 conversion (`__float2bfloat16_rn`), as bits.
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    // SAFETY: a pure function of its argument.
    unsafe { gn_emu_float2bfloat16_rn(v) }
}

/// The emulator's bf16 → f32 conversion (`__bfloat162float`).
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    // SAFETY: a pure function of its argument.
    unsafe { gn_emu_bfloat162float(b) }
}

// --- global-memory traffic (kernels compiled with counting hooks: build.rs, emu_runtime.cpp) ---

/// Size of the unit global memory moves in: a DRAM/L2 sector.
pub const SECTOR_BYTES: usize = 32;

/// A buffer whose global-memory traffic [`count_traffic`] counts.
#[derive(Clone, Debug)]
pub struct Watched {
    /// Its name in the counts.
    pub name: String,
    /// First byte (a host address of an emulated call's buffer).
    pub addr: usize,
    /// Length, bytes.
    pub bytes: usize,
}

impl Watched {
    /// Watches the elements of `s` under `name`.
    pub fn of<T>(name: &str, s: &[T]) -> Watched {
        Watched {
            name: name.to_string(),
            addr: s.as_ptr() as usize,
            bytes: std::mem::size_of_val(s),
        }
    }
}

/// The 32-byte sectors one launch touched in one watched buffer. Sector `i` is the 32 bytes at
/// `addr + 32 * i`: counted as if the buffer started on a sector boundary, as device allocations
/// do, so the counts do not depend on where the host allocator placed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BufferTraffic {
    /// The buffer's name ([`Watched::name`]; the workspace is `workspace`).
    pub name: String,
    /// Sectors read, ascending, each once.
    pub read_sectors: Vec<u32>,
    /// Sectors written, ascending, each once.
    pub written_sectors: Vec<u32>,
    /// Sector reads summed over every access (a thread's 16-byte load of one sector counts 1,
    /// the same sector read by 32 threads counts 32): how often the kernel asks, not what
    /// DRAM moves.
    pub read_accesses: u64,
    /// As `read_accesses`, for writes.
    pub write_accesses: u64,
}

/// What one emulated launch read and wrote in the watched buffers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchTraffic {
    /// The entry point.
    pub kernel: String,
    /// One entry per watched buffer, in the order they were watched (workspace last).
    pub buffers: Vec<BufferTraffic>,
}

struct Counters {
    names: Vec<String>,
    reads: Vec<Vec<u32>>,
    writes: Vec<Vec<u32>>,
    launches: Vec<LaunchTraffic>,
}

thread_local! {
    static COUNTING: std::cell::RefCell<Option<Counters>> = const { std::cell::RefCell::new(None) };
}

fn watch(c: &mut Counters, name: &str, addr: usize, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let sectors = bytes.div_ceil(SECTOR_BYTES);
    c.names.push(name.to_string());
    c.reads.push(vec![0; sectors]);
    c.writes.push(vec![0; sectors]);
    let (r, w) = (c.reads.last_mut().unwrap(), c.writes.last_mut().unwrap());
    // SAFETY: the counter arrays hold one u32 per sector of [addr, addr + bytes), as the C side
    // indexes them; their heap storage stays put (the Vecs are never resized) and outlives the
    // watch: `count_traffic` clears it before dropping them. The C side never dereferences
    // `addr`, it only compares addresses with it.
    let rc = unsafe { gn_emu_traffic_watch(addr, bytes, r.as_mut_ptr(), w.as_mut_ptr()) };
    assert_eq!(rc, 0, "the emulator watches at most 16 buffers");
}

fn watch_if_counting(name: &str, addr: usize, bytes: usize) {
    COUNTING.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            watch(c, name, addr, bytes);
        }
    });
}

fn take_launch_traffic(kernel: &str) {
    COUNTING.with(|c| {
        let mut c = c.borrow_mut();
        let Some(c) = c.as_mut() else { return };
        let mut launch = LaunchTraffic {
            kernel: kernel.to_string(),
            buffers: Vec::new(),
        };
        for i in 0..c.names.len() {
            let mut b = BufferTraffic {
                name: c.names[i].clone(),
                ..BufferTraffic::default()
            };
            for (counts, sectors, total) in [
                (&mut c.reads[i], &mut b.read_sectors, &mut b.read_accesses),
                (
                    &mut c.writes[i],
                    &mut b.written_sectors,
                    &mut b.write_accesses,
                ),
            ] {
                for (s, n) in counts.iter_mut().enumerate() {
                    if *n != 0 {
                        sectors.push(s as u32);
                        *total += *n as u64;
                        *n = 0;
                    }
                }
            }
            launch.buffers.push(b);
        }
        c.launches.push(launch);
    });
}

/// Runs `f` (emulated calls on this OS thread) counting, per launch, the 32-byte sectors its
/// kernels read and write in `buffers` and in the workspace the calls allocate. Every load
/// and store of the kernels is seen (they are compiled with counting hooks); accesses outside
/// the watched buffers (shared memory, registers) are not global traffic and are ignored.
///
/// # Panics
///
/// Where `f` panics, where more than 15 buffers are watched, or where it is called from
/// inside `f`.
pub fn count_traffic<R>(buffers: &[Watched], f: impl FnOnce() -> R) -> (R, Vec<LaunchTraffic>) {
    COUNTING.with(|c| {
        let mut c = c.borrow_mut();
        assert!(c.is_none(), "count_traffic inside count_traffic");
        let mut counters = Counters {
            names: Vec::new(),
            reads: Vec::new(),
            writes: Vec::new(),
            launches: Vec::new(),
        };
        for b in buffers {
            watch(&mut counters, &b.name, b.addr, b.bytes);
        }
        *c = Some(counters);
    });
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            // SAFETY: no arguments; forgets the calling thread's watched buffers before their
            // counters are dropped.
            unsafe { gn_emu_traffic_clear() };
            COUNTING.with(|c| c.borrow_mut().take());
        }
    }
    let clear = Clear;
    let r = f();
    let launches = COUNTING.with(|c| {
        c.borrow_mut()
            .as_mut()
            .map(|c| std::mem::take(&mut c.launches))
            .unwrap_or_default()
    });
    drop(clear);
    (r, launches)
}

/// What the planner makes of a call on a device of `limits`, without running it: the plan and
/// the launches (names, grids, shared memory) of the pass, for 16-byte aligned buffers. For
/// reports (tools/kernel-report); argument errors as the GPU path returns them.
#[allow(clippy::too_many_arguments)]
pub fn plan_launches(
    gn: &GroupNorm,
    path: Path,
    limits: DeviceLimits,
    dims: &[usize],
    dtype: DType,
    param_dtype: DType,
    backward: bool,
    with_param_grads: bool,
) -> Result<Trace> {
    let geo = check_geometry(gn, dims)?;
    let problem = Problem {
        dims: &geo.dims,
        groups: geo.g,
        eps: gn.eps(),
        layout: geo.layout,
        dtype,
        param_dtype,
        path,
        activation: gn.activation(),
    };
    let pass = if backward {
        Pass::Backward
    } else {
        Pass::Forward
    };
    let (_, plan) = raw::plan_of(limits, &problem, pass)?;
    let mut trace = Trace::new(&plan);
    let mut record = |id: KernelId, grid: Grid| {
        trace.launches.push(Launch {
            kernel: id.name(),
            blocks: grid.blocks,
            threads: grid.threads,
            smem_bytes: grid.smem,
            cluster: grid.cluster,
        });
        Ok(())
    };
    let rows = geo.rows() as u64;
    if backward {
        let bwd = BwdParams {
            rows,
            dweight: with_param_grads as u64,
            dbias: with_param_grads as u64,
            activation: (gn.activation() != crate::Activation::None) as u32,
            ..BwdParams::default()
        };
        launch::backward_sequence(&plan, dtype, param_dtype, geo.c, &bwd, |n, g, _| {
            record(n, g)
        })?;
    } else {
        let fwd = FwdParams {
            rows,
            ..FwdParams::default()
        };
        launch::forward_sequence(&plan, dtype, param_dtype, &fwd, |n, g, _| record(n, g))?;
    }
    Ok(trace)
}

/// The limits the planner uses on `gpu` (read from its driver), for reports.
pub fn limits_of(gpu: &super::Gpu) -> DeviceLimits {
    gpu.limits()
}
