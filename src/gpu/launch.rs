//! The launch layer: the only place that calls into the kernels. Everything it receives has been
//! validated by the caller (src/gpu/ops.rs): shapes, lengths, dtypes, contexts and the plan.

use super::kernel_id::{KernelId, Kind};
use super::params::{BwdParams, FwdParams};
use super::plan::{Plan, PARAM_THREADS, THREADS};
use super::runtime::Gpu;
use crate::{DType, Error, Result};
use cudarc::driver::sys::CUstream;
use cudarc::driver::{result, sys, DeviceRepr};
use std::ffi::c_void;

/// The configuration of one launch of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grid {
    /// Thread blocks (a one-dimensional grid).
    pub blocks: u32,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory per block, bytes.
    pub smem: u32,
    /// Blocks per thread-block cluster (consecutive blocks; 1: no clusters).
    pub cluster: u32,
}

impl Grid {
    /// A launch without clusters.
    pub(crate) fn new(blocks: u32, threads: u32, smem: u32) -> Grid {
        Grid {
            blocks,
            threads,
            smem,
            cluster: 1,
        }
    }
}

/// Launches kernel `id` on a raw stream with its one parameter-struct argument.
///
/// # Safety
///
/// `stream` is a valid stream of `gpu`'s context, and every pointer in `params` is valid for what
/// kernel `id` reads and writes under the plan the caller made for it, until the stream's work
/// completes.
unsafe fn launch<A: DeviceRepr>(
    gpu: &Gpu,
    stream: CUstream,
    id: KernelId,
    grid: Grid,
    params: &A,
) -> Result<()> {
    // the caller's current context comes back when this returns, launched or not (taken before
    // the function lookup, which may bind the context itself)
    let _restore = gpu.bind_scoped()?;
    let f = gpu.function(id)?;
    let mut args = [params as *const A as *mut c_void];
    // the name is formatted on failure only (is_cluster_refusal reads it from the context)
    let failed = |e| Error::driver(format!("launching `{id}`"), e);
    if grid.cluster > 1 {
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                clusterDim: sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
                    x: grid.cluster,
                    y: 1,
                    z: 1,
                },
            },
        };
        let config = sys::CUlaunchConfig {
            gridDimX: grid.blocks,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: grid.threads,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: grid.smem,
            hStream: stream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as below; in addition `config` and the one attribute it points at live until
        // the call returns, the grid is a multiple of the cluster size (the plan makes it rows *
        // cluster) and the cluster size is one the device reported it can run (DeviceLimits).
        return unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(failed);
    }
    // SAFETY: `id` is one of kernels/'s entry points, all of which take exactly one argument,
    // the #[repr(C)] parameter struct `A` mirrors (layout asserted on both sides); `args` points
    // at it for the duration of the call (the driver copies arguments at launch). Grid, block and
    // shared-memory sizes come from the plan, which keeps them within the device limits; the
    // pointers inside `params` and `stream` are valid by this function's contract.
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            (grid.blocks, 1, 1),
            (grid.threads, 1, 1),
            grid.smem,
            stream,
            &mut args,
        )
    }
    .map_err(failed)
}

impl Plan {
    /// A launch of the row kernels: one block per chunk, in clusters of `self.cluster` (1 off
    /// the cluster path, whose one row kernel is the only one launched with it).
    fn row_grid(&self, smem: u32) -> Grid {
        Grid {
            blocks: self.blocks,
            threads: THREADS,
            smem,
            cluster: self.cluster,
        }
    }

    /// Whether the backward's row kernels write dweight and dbias themselves, so that no
    /// `bwd_params` launch follows:
    /// - the fused and cluster kernels (NCHW and NHWC) with one sample, where all of a
    ///   channel's sums are in one block or one cluster (`row_kernel_param_grads` in
    ///   kernels/common.cuh holds the kernel's half of this rule);
    /// - the fused and cluster kernels with more samples when `tickets` (the launch's ticket
    ///   words, [`Plan::ticket_words`] of them, zeroed) is not 0: the last block of each
    ///   channel's N reduces it (`uses_tickets` and `ticket_param_grads` in common.cuh);
    /// - the split path's `dx` kernels (NCHW and NHWC) with any number of samples: they run
    ///   after every sum and row record exists (`split_param_grads`).
    pub(crate) fn param_grads_in_row_kernel(&self, batch: u32, rows: u64, tickets: u64) -> bool {
        let split = !self.fused && self.cluster <= 1;
        rows > 0 && (split || batch == 1 || tickets != 0)
    }
}

/// Threads of the forward merge kernel: one warp per row.
const MERGE_THREADS: u32 = 32;
/// Threads of the backward row kernel (`kRowThreads`).
const ROW_THREADS: u32 = 256;

/// Forward: fused, cluster, or partial, merge, apply.
///
/// # Safety
///
/// As [`launch`], for every kernel of the sequence.
pub(crate) unsafe fn forward(
    gpu: &Gpu,
    stream: CUstream,
    plan: &Plan,
    t: DType,
    p: DType,
    params: &FwdParams,
) -> Result<()> {
    forward_sequence(plan, t, p, params, |id, grid, a| {
        // SAFETY: forwarded from this function's contract.
        unsafe { launch(gpu, stream, id, grid, a) }
    })
}

/// Backward: fused, cluster, or (center,) partial, rows, dx; then the parameter gradients when asked for.
///
/// # Safety
///
/// As [`launch`], for every kernel of the sequence.
pub(crate) unsafe fn backward(
    gpu: &Gpu,
    stream: CUstream,
    plan: &Plan,
    t: DType,
    p: DType,
    channels: usize,
    params: &BwdParams,
) -> Result<()> {
    backward_sequence(plan, t, p, channels, params, |id, grid, a| {
        // SAFETY: forwarded from this function's contract.
        unsafe { launch(gpu, stream, id, grid, a) }
    })
}

/// The forward pass's kernels, in order, each handed to `launch` as (kernel id, blocks,
/// threads per block, dynamic shared memory bytes, parameters). The GPU path and the host
/// emulator (`emulate`, feature `emulate`) share this one sequence.
pub(crate) fn forward_sequence<L>(
    plan: &Plan,
    t: DType,
    p: DType,
    params: &FwdParams,
    mut launch: L,
) -> Result<()>
where
    L: FnMut(KernelId, Grid, &FwdParams) -> Result<()>,
{
    if params.rows == 0 {
        return Ok(());
    }
    if plan.nhwc {
        return if plan.fused {
            let id = KernelId::new(Kind::NhwcFwdFused, t, Some(p), Some(plan.vec));
            launch(id, plan.row_grid(plan.smem_bytes), params)
        } else if plan.cluster > 1 {
            let id = KernelId::new(Kind::NhwcFwdCluster, t, Some(p), Some(plan.vec));
            launch(id, plan.row_grid(plan.smem_bytes), params)
        } else {
            let id = KernelId::new(Kind::NhwcFwdPartial, t, None, Some(plan.vec));
            launch(id, plan.row_grid(plan.smem_bytes), params)?;
            let id = KernelId::new(Kind::NhwcFwdMerge, t, None, None);
            launch(id, Grid::new(params.rows as u32, MERGE_THREADS, 0), params)?;
            let id = KernelId::new(Kind::NhwcFwdApply, t, Some(p), Some(plan.vec));
            launch(id, plan.row_grid(plan.stream_smem_bytes), params)
        };
    }
    if plan.cluster > 1 {
        let id = KernelId::new(Kind::ClusterFwd, t, Some(p), Some(plan.vec));
        return launch(id, plan.row_grid(plan.smem_bytes), params);
    }
    if plan.fused {
        let id = KernelId::new(Kind::FwdFused, t, Some(p), Some(plan.vec));
        launch(id, plan.row_grid(plan.smem_bytes), params)
    } else {
        let id = KernelId::new(Kind::FwdPartial, t, None, Some(plan.vec));
        launch(id, plan.row_grid(plan.smem_bytes), params)?;
        let id = KernelId::new(Kind::FwdMerge, t, None, None);
        launch(id, Grid::new(params.rows as u32, MERGE_THREADS, 0), params)?;
        let id = KernelId::new(Kind::FwdApply, t, Some(p), Some(plan.vec));
        launch(id, plan.row_grid(0), params)
    }
}

/// The backward pass's kernels, in order, as [`forward_sequence`].
pub(crate) fn backward_sequence<L>(
    plan: &Plan,
    t: DType,
    p: DType,
    channels: usize,
    params: &BwdParams,
    mut launch: L,
) -> Result<()>
where
    L: FnMut(KernelId, Grid, &BwdParams) -> Result<()>,
{
    let silu = params.activation != 0;
    if params.rows > 0 && plan.nhwc {
        if plan.fused {
            let id = KernelId::new(Kind::NhwcBwdFused, t, Some(p), Some(plan.vec));
            launch(id, plan.row_grid(plan.smem_bytes), params)?;
        } else if plan.cluster > 1 {
            let id = KernelId::new(Kind::NhwcBwdCluster, t, Some(p), Some(plan.vec));
            launch(id, plan.row_grid(plan.smem_bytes), params)?;
        } else {
            let smem = plan.stream_smem_bytes;
            if silu {
                let id = KernelId::new(Kind::NhwcBwdCenter, t, None, None);
                launch(id, plan.row_grid(smem), params)?;
            }
            let id = KernelId::new(Kind::NhwcBwdPartial, t, Some(p), None);
            launch(id, plan.row_grid(smem), params)?;
            let id = KernelId::new(Kind::BwdRows, p, None, None);
            launch(id, Grid::new(params.rows as u32, ROW_THREADS, 0), params)?;
            let id = KernelId::new(Kind::NhwcBwdDx, t, Some(p), Some(plan.vec));
            launch(id, plan.row_grid(smem), params)?;
        }
    } else if params.rows > 0 && plan.cluster > 1 {
        let id = KernelId::new(Kind::ClusterBwd, t, Some(p), Some(plan.vec));
        launch(id, plan.row_grid(plan.smem_bytes), params)?;
    } else if params.rows > 0 {
        if plan.fused {
            let id = KernelId::new(Kind::BwdFused, t, Some(p), Some(plan.vec));
            launch(id, plan.row_grid(plan.smem_bytes), params)?;
        } else {
            if silu {
                let id = KernelId::new(Kind::BwdCenter, t, None, Some(plan.vec));
                launch(id, plan.row_grid(0), params)?;
            }
            let id = KernelId::new(Kind::BwdPartial, t, Some(p), Some(plan.vec));
            launch(id, plan.row_grid(0), params)?;
            let id = KernelId::new(Kind::BwdRows, p, None, None);
            launch(id, Grid::new(params.rows as u32, ROW_THREADS, 0), params)?;
            let id = KernelId::new(Kind::BwdDx, t, Some(p), Some(plan.vec));
            launch(id, plan.row_grid(0), params)?;
        }
    }
    let wanted = params.dweight != 0 || params.dbias != 0;
    if wanted && !plan.param_grads_in_row_kernel(params.batch, params.rows, params.tickets) {
        let id = KernelId::new(Kind::BwdParams, p, None, None);
        let blocks = channels.div_ceil(PARAM_THREADS as usize) as u32;
        launch(id, Grid::new(blocks, PARAM_THREADS, 0), params)?;
    }
    Ok(())
}

/// Threads of the baseline kernels (`kBaseThreads`).
const BASE_THREADS: u32 = 256;

/// Grid of the baseline's elementwise kernels: enough blocks to fill any GPU, grid-stride beyond.
fn elementwise_blocks(numel: u64) -> u32 {
    numel.div_ceil(BASE_THREADS as u64).clamp(1, 65_536) as u32
}

/// The unfused baseline forward (PyTorch's structure), on the GPU.
///
/// # Safety
///
/// As [`launch`], for every kernel of the sequence.
pub(crate) unsafe fn forward_baseline(
    gpu: &Gpu,
    stream: CUstream,
    t: DType,
    p: DType,
    params: &FwdParams,
) -> Result<()> {
    forward_baseline_sequence(t, p, params, |id, grid, a| {
        // SAFETY: forwarded from this function's contract.
        unsafe { launch(gpu, stream, id, grid, a) }
    })
}

/// The unfused baseline backward, on the GPU.
///
/// # Safety
///
/// As [`launch`], for every kernel of the sequence.
pub(crate) unsafe fn backward_baseline(
    gpu: &Gpu,
    stream: CUstream,
    t: DType,
    p: DType,
    channels: usize,
    params: &BwdParams,
) -> Result<()> {
    backward_baseline_sequence(t, p, channels, params, |id, grid, a| {
        // SAFETY: forwarded from this function's contract.
        unsafe { launch(gpu, stream, id, grid, a) }
    })
}

/// The baseline forward's kernels, in order (as [`forward_sequence`]): row statistics (one block
/// per row), then an elementwise normalize kernel.
pub(crate) fn forward_baseline_sequence<L>(
    t: DType,
    p: DType,
    params: &FwdParams,
    mut launch: L,
) -> Result<()>
where
    L: FnMut(KernelId, Grid, &FwdParams) -> Result<()>,
{
    if params.rows == 0 {
        return Ok(());
    }
    let numel = params.rows * params.d as u64 * params.s as u64;
    launch(
        KernelId::new(Kind::BaseStats, t, None, None),
        Grid::new(params.rows as u32, BASE_THREADS, 0),
        params,
    )?;
    let id = KernelId::new(Kind::BaseNorm, t, Some(p), None);
    launch(
        id,
        Grid::new(elementwise_blocks(numel), BASE_THREADS, 0),
        params,
    )
}

/// The baseline backward's kernels, in order: per-(n, c) sums, per-row coefficients, elementwise
/// dx, then dweight/dbias. Workspace: 2 * N * C + 2 * N * G floats.
pub(crate) fn backward_baseline_sequence<L>(
    t: DType,
    p: DType,
    channels: usize,
    params: &BwdParams,
    mut launch: L,
) -> Result<()>
where
    L: FnMut(KernelId, Grid, &BwdParams) -> Result<()>,
{
    if params.rows > 0 {
        let numel = params.rows * params.d as u64 * params.s as u64;
        let sums = params.batch as u64 * channels as u64;
        if sums > i32::MAX as u64 {
            return Err(Error::BaselineUnavailable {
                why: format!("its backward handles fewer (n, c) pairs than {sums}"),
            });
        }
        launch(
            KernelId::new(Kind::BaseBwdSums, t, None, None),
            Grid::new(sums as u32, BASE_THREADS, 0),
            params,
        )?;
        let id = KernelId::new(Kind::BaseBwdCoeffs, p, None, None);
        launch(id, Grid::new(params.rows as u32, BASE_THREADS, 0), params)?;
        let id = KernelId::new(Kind::BaseBwdDx, t, Some(p), None);
        launch(
            id,
            Grid::new(elementwise_blocks(numel), BASE_THREADS, 0),
            params,
        )?;
    }
    if params.dweight != 0 || params.dbias != 0 {
        let id = KernelId::new(Kind::BaseBwdParams, p, None, None);
        let blocks = channels.div_ceil(BASE_THREADS as usize) as u32;
        launch(id, Grid::new(blocks, BASE_THREADS, 0), params)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name `forward`/`backward` can ask for exists in the fatbins (checked against the
    /// entry points ptxas compiled), for every dtype pair the API accepts.
    #[test]
    fn every_launchable_kernel_was_compiled() {
        let built = crate::gpu::runtime::entry_points();
        if built.is_empty() {
            assert!(!crate::gpu::kernels_built());
            eprintln!("skipping: built without nvcc, no kernels to check");
            return;
        }
        let mut wanted = Vec::new();
        for t in [DType::F32, DType::F16, DType::BF16] {
            for p in [t, DType::F32] {
                for vec in [true, false] {
                    for kind in [
                        Kind::FwdFused,
                        Kind::FwdApply,
                        Kind::BwdFused,
                        Kind::BwdDx,
                        Kind::BwdPartial,
                        Kind::NhwcFwdFused,
                        Kind::NhwcFwdApply,
                        Kind::NhwcBwdFused,
                        Kind::NhwcBwdDx,
                        Kind::ClusterFwd,
                        Kind::ClusterBwd,
                        Kind::NhwcFwdCluster,
                        Kind::NhwcBwdCluster,
                    ] {
                        wanted.push(KernelId::new(kind, t, Some(p), Some(vec)).name());
                    }
                    for kind in [Kind::FwdPartial, Kind::BwdCenter, Kind::NhwcFwdPartial] {
                        wanted.push(KernelId::new(kind, t, None, Some(vec)).name());
                    }
                }
                wanted.push(KernelId::new(Kind::NhwcBwdPartial, t, Some(p), None).name());
            }
            for kind in [Kind::NhwcFwdMerge, Kind::NhwcBwdCenter] {
                wanted.push(KernelId::new(kind, t, None, None).name());
            }
            wanted.push(KernelId::new(Kind::BwdParams, t, None, None).name());
            wanted.push(KernelId::new(Kind::BwdRows, t, None, None).name());
            wanted.push(KernelId::new(Kind::FwdMerge, t, None, None).name());
            // the baseline is embedded with the `bench` feature only (build.rs)
            if cfg!(feature = "bench") {
                for kind in [
                    Kind::BaseStats,
                    Kind::BaseBwdSums,
                    Kind::BaseBwdCoeffs,
                    Kind::BaseBwdParams,
                ] {
                    wanted.push(KernelId::new(kind, t, None, None).name());
                }
                for p in [t, DType::F32] {
                    for kind in [Kind::BaseNorm, Kind::BaseBwdDx] {
                        wanted.push(KernelId::new(kind, t, Some(p), None).name());
                    }
                }
            }
        }
        for name in &wanted {
            assert!(
                built.contains(&name.as_str()),
                "kernel `{name}` is not in the fatbins"
            );
        }
    }
}
