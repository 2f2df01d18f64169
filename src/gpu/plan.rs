//! Which kernels run for a shape, and how each group row is cut into chunks.
//!
//! Pure host logic (no CUDA calls), so its invariants are tested on machines without a GPU.
//!
//! - **fused**: one block per row, the row on chip, x read once. Taken when the row fits the
//!   shared-memory budget and there are enough rows to give every SM a block.
//! - **split**: several blocks per row, each a chunk of whole channels (or a piece of one channel
//!   when a channel alone is too long), partials merged in a fixed order, then a second kernel
//!   that re-reads its chunk (usually from L2). Taken for few or long rows where clusters are
//!   not available.
//! - **cluster** (compute capability 9.0+; NCHW, and NHWC: the backward, the forward when
//!   forced): the chunks of a row
//!   (NHWC: the pieces of a tile's rows) are the blocks of one
//!   thread-block cluster; each keeps its chunk on chip and the row's statistics are merged
//!   through distributed shared memory, so x (and dy) are still read once. Taken instead of the
//!   split path wherever a row fits one cluster.
//!
//! These thresholds have not been tuned on hardware yet: see BENCHMARKS.md.

use super::params::Chunking;
use crate::{Error, Result};

/// Threads per block of the row kernels (`kFwdThreads`, `kBwdThreads` in kernels/).
pub(crate) const THREADS: u32 = 512;
/// Threads per block of the parameter-gradient kernel (`kParamThreads`).
pub(crate) const PARAM_THREADS: u32 = 256;
/// Dynamic shared memory a fused block may use: two blocks of 512 threads fit an SM of
/// sm_80/sm_90 (164/228 KiB), so one can load while the other computes.
const FUSED_SMEM_BUDGET: usize = 96 * 1024;
/// Dynamic shared memory of a split-path chunk (the forward `partial` kernel keeps its chunk on
/// chip): under the 48 KiB that needs no opt-in, four blocks per SM.
const SPLIT_SMEM_BUDGET: usize = 48 * 1024;
/// Bytes at the start of a cluster kernel's shared memory that its peers read
/// (`kClusterSlotBytes` in kernels/cluster.cuh).
const CLUSTER_SLOT_BYTES: usize = 16;
/// Largest cluster the kernels handle (one lane per block in their exchanges), and the largest
/// CUDA allows at all.
const MAX_CLUSTER: usize = 16;
/// Smallest chunk worth a block of its own, in elements.
const MIN_CHUNK: usize = 4096;
/// Blocks per SM the split path aims for.
const SPLIT_BLOCKS_PER_SM: usize = 4;
/// Blocks of a cluster kernel that one SM holds by registers: 512 threads at 64 registers
/// (forward) and 80 (backward) on sm_90, of the SM's 64 Ki (docs/kernel-report.md, SASS
/// section; the report's plan tables recount it from the SASS for every architecture).
const CLUSTER_FWD_REG_BLOCKS: usize = 2;
const CLUSTER_BWD_REG_BLOCKS: usize = 1;
/// Blocks of the NHWC cluster kernels that one SM holds by registers: 512 threads at 72-90
/// (forward) and 100-118 (backward) registers, their 16-byte vector kernels on sm_90
/// (docs/kernel-report.md).
const NHWC_CLUSTER_FWD_REG_BLOCKS: usize = 1;
const NHWC_CLUSTER_BWD_REG_BLOCKS: usize = 1;
/// Blocks of an NHWC split-path kernel that one SM holds by registers: 512 threads at 48
/// (forward partial) to 56 (backward) registers on sm_90 (docs/kernel-report.md).
const NHWC_SPLIT_REG_BLOCKS: usize = 2;
/// How full the last wave of an NHWC split grid should be, unless it has [`MANY_WAVES`] (the
/// kernel report's budget).
const WAVE_FILL: f64 = 0.9;
/// Waves from which a partly filled last one costs little.
const MANY_WAVES: usize = 4;
/// Threads one SM holds (sm_75 holds 1024: the cluster path needs sm_90, which holds 2048).
const THREADS_PER_SM: usize = 2048;
/// Shared memory the driver reserves per resident block.
const SMEM_RESERVED_PER_BLOCK: usize = 1024;
/// Largest grid the kernels are launched with (gridDim.x limit).
const MAX_BLOCKS: u64 = i32::MAX as u64;

/// What the planner needs to know of the device. Made with [`DeviceLimits::new`]
/// (`#[non_exhaustive]`: fields may be added).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceLimits {
    /// Streaming multiprocessors.
    pub sms: usize,
    /// Dynamic shared memory one block may opt into, in bytes.
    pub smem_per_block: usize,
    /// Largest thread-block cluster the device runs with one such block per SM (16 on an
    /// H100); 0 where the device has no clusters (compute capability below 9.0).
    pub max_cluster: usize,
}

impl DeviceLimits {
    /// Limits of a device with `sms` multiprocessors, `smem_per_block` bytes of opt-in dynamic
    /// shared memory per block, and clusters of up to `max_cluster` blocks (0: none).
    pub const fn new(sms: usize, smem_per_block: usize, max_cluster: usize) -> Self {
        DeviceLimits {
            sms,
            smem_per_block,
            max_cluster,
        }
    }
}

/// Which kernel path a launch takes: chosen per shape, or forced (for tests and benchmarks that
/// compare the paths).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Path {
    /// The planner decides from the shape and the device.
    #[default]
    Auto,
    /// One block per row with the row on chip; an error where a row does not fit.
    Fused,
    /// Rows split across blocks, partials merged in a fixed order.
    Split,
    /// Rows split across the blocks of a thread-block cluster, each chunk kept on chip
    /// (compute capability 9.0+, NCHW); an error where that is not possible.
    Cluster,
}

/// Which pass is being planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Keeps one tensor (x) of the row on chip.
    Forward,
    /// Keeps two tensors (x and dy) of the row on chip.
    Backward,
}

/// A launch plan for one shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// One block per row with the row on chip (else the split path).
    pub fused: bool,
    /// 16-byte vector kernels (else the scalar ones).
    pub vec: bool,
    /// The chunking (`chunks == 1` when fused).
    pub chunking: Chunking,
    /// Blocks of the row kernels: rows * chunks.
    pub blocks: u32,
    /// Dynamic shared memory of the fused kernel, or of the forward partial kernel.
    pub smem_bytes: u32,
    /// f32 workspace the launch needs (split partials, or backward per-(n, c, piece) sums).
    pub workspace_floats: usize,
    /// The channels-last kernels (kernels/nhwc.cu): blocks are tiles of `chunking.cpb` groups.
    pub nhwc: bool,
    /// Dynamic shared memory of the NHWC kernels that stream from global memory (column
    /// partials and per-group values); 0 for NCHW.
    pub stream_smem_bytes: u32,
    /// Blocks per thread-block cluster: `chunking.chunks` on the cluster path, else 1.
    pub cluster: u32,
}

impl Plan {
    /// `u32` ticket words the backward's fused and cluster kernels use to reduce dweight and
    /// dbias over `batch > 1` samples in the kernel (one per block of a sample:
    /// `ticket_param_grads` in kernels/common.cuh); 0 for the split path and for one sample,
    /// which need none.
    pub(crate) fn ticket_words(&self, batch: usize) -> usize {
        if (self.fused || self.cluster > 1) && batch > 1 {
            self.blocks as usize / batch
        } else {
            0
        }
    }
}

/// The shape of one call, as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub n: usize,
    pub c: usize,
    pub g: usize,
    pub d: usize,
    pub s: usize,
    pub elem_bytes: usize,
    /// Channels-last with more than one position (with `S <= 1` both layouts are one order).
    pub nhwc: bool,
    /// The backward recomputes a SiLU (its split path needs per-chunk centered sums).
    pub silu: bool,
}

/// Elements per 16-byte vector.
pub(crate) fn vec_width(elem_bytes: usize) -> usize {
    16 / elem_bytes
}

/// Plans one pass. `ptrs_aligned`: every activation pointer of the call is 16-byte aligned.
pub(crate) fn plan(
    shape: Shape,
    pass: Pass,
    path: Path,
    dev: DeviceLimits,
    ptrs_aligned: bool,
    dims: &[usize],
) -> Result<Plan> {
    if shape.nhwc && shape.s > 1 {
        return plan_nhwc(shape, pass, path, dev, ptrs_aligned, dims);
    }
    let Shape {
        n,
        c,
        g,
        d,
        s,
        elem_bytes,
        silu,
        ..
    } = shape;
    let too_large = |why: String| Error::TooLarge {
        dims: dims.to_vec(),
        why,
    };
    check_u32_dims(n, c, s, dims)?;
    let v = vec_width(elem_bytes);
    let rows = n * g;
    let row_len = d * s;
    let on_chip = match pass {
        Pass::Forward => 1,
        Pass::Backward => 2,
    };
    let fused_budget = FUSED_SMEM_BUDGET.min(dev.smem_per_block);
    let fused_cap = fused_budget / (on_chip * elem_bytes);
    let enough_rows = rows >= dev.sms;
    let worth_splitting = row_len >= 2 * MIN_CHUNK;
    // An empty row (S = 0) has nothing to split: the fused kernel writes its statistics without
    // reading x, where the split kernels would read a pivot past the end (and `target / s` below
    // would divide by zero).
    let fused = row_len == 0
        || match path {
            Path::Auto => row_len <= fused_cap && (enough_rows || !worth_splitting),
            Path::Split | Path::Cluster => false,
            // forced: up to everything the device allows one block, not just the tuned budget
            Path::Fused if on_chip * row_len * elem_bytes <= dev.smem_per_block => true,
            Path::Fused => {
                return Err(Error::PathUnavailable {
                    path: "fused",
                    why: format!(
                        "rows of {row_len} values: it keeps {on_chip} tensor(s) of \
                     the row on chip, {} bytes, over the {} bytes a block may use here",
                        on_chip * row_len * elem_bytes,
                        dev.smem_per_block
                    ),
                })
            }
        };
    let clustered =
        match path {
            _ if fused => None,
            Path::Auto => cluster_chunking(shape, on_chip, dev),
            Path::Cluster => Some(cluster_chunking(shape, on_chip, dev).ok_or_else(|| {
                Error::PathUnavailable {
                    path: "cluster",
                    why: if dev.max_cluster < 2 {
                        "thread-block clusters need compute capability 9.0 or newer".to_string()
                    } else {
                        format!(
                            "rows of {row_len} values: {on_chip} tensor(s) of \
                         the row do not fit the shared memory of a cluster of at most {} blocks",
                            dev.max_cluster.min(MAX_CLUSTER)
                        )
                    },
                }
            })?),
            _ => None,
        };
    let chunking = if fused {
        Chunking {
            chunks: 1,
            cpb: d as u32,
            pieces: 1,
            piece_len: s as u32,
        }
    } else if let Some(chunking) = clustered {
        chunking
    } else {
        let split_cap = SPLIT_SMEM_BUDGET.min(dev.smem_per_block) / elem_bytes;
        let target_blocks = SPLIT_BLOCKS_PER_SM * dev.sms;
        let total = rows.saturating_mul(row_len);
        let target = (total / target_blocks.max(1)).clamp(MIN_CHUNK.min(split_cap), split_cap);
        if s <= target {
            let cpb = (target / s).clamp(1, d);
            Chunking {
                chunks: d.div_ceil(cpb) as u32,
                cpb: cpb as u32,
                pieces: 1,
                piece_len: s as u32,
            }
        } else {
            let piece_len = (target / v * v).max(v);
            let pieces = s.div_ceil(piece_len);
            let chunks = (d as u64) * (pieces as u64);
            if chunks > u32::MAX as u64 {
                return Err(too_large(format!(
                    "{chunks} chunks per row exceed the kernels' 32-bit chunk index"
                )));
            }
            Chunking {
                chunks: chunks as u32,
                cpb: 1,
                pieces: pieces as u32,
                piece_len: piece_len as u32,
            }
        }
    };
    let blocks = rows as u64 * chunking.chunks as u64;
    if blocks > MAX_BLOCKS {
        return Err(too_large(format!(
            "{blocks} thread blocks exceed the launch limit of {MAX_BLOCKS}"
        )));
    }
    let vec = ptrs_aligned && s % v == 0 && (chunking.piece_len as usize) % v == 0;
    let chunk_elems = if fused {
        row_len
    } else {
        chunking.cpb as usize * chunking.piece_len as usize
    };
    let smem_bytes = match (fused, pass) {
        (true, _) => on_chip * row_len * elem_bytes,
        _ if clustered.is_some() => CLUSTER_SLOT_BYTES + on_chip * chunk_elems * elem_bytes,
        (false, Pass::Forward) => chunk_elems * elem_bytes,
        (false, Pass::Backward) => 0,
    };
    // the cluster path keeps every chunk on chip: no merge workspace, no centered sums
    let on_chip_path = fused || clustered.is_some();
    // forward split: (mean, m2) per chunk, then (mean, rstd) per row;
    // backward: (sum dy, sum dy xhat, sum x - mean) per (n, c, piece), then (m1, m2, delta) per row
    Ok(Plan {
        fused,
        vec,
        chunking,
        blocks: blocks as u32,
        smem_bytes: smem_bytes as u32,
        workspace_floats: checked_workspace(shape, pass, on_chip_path, chunking, silu, dims)?,
        nhwc: false,
        stream_smem_bytes: 0,
        cluster: if clustered.is_some() {
            chunking.chunks
        } else {
            1
        },
    })
}

/// The chunking of the cluster path for `shape`, or `None` where the device has no clusters or
/// no cluster of at most [`MAX_CLUSTER`] blocks holds the row on chip.
///
/// Candidates: `k` blocks of whole channels (`ceil(D / k)` each) for every k up to the largest
/// cluster, and, where `D` is at most half of it, every split of each channel into pieces.
/// Among those that fit one block's shared memory the planner takes the one whose grid runs in
/// the least time under a wave model, then the fewest chunks (smaller clusters schedule more
/// easily and exchange less). Wave model: every block of a candidate does the same work,
/// `1 / blocks` of the call's, and the grid runs in `ceil(blocks / slots)` rounds of one block
/// time each, where `slots` is the blocks the device holds at once (SMs x blocks per SM, from
/// registers, shared memory and threads); so the cost is `ceil(blocks / slots) / blocks`. A
/// grid of 1.2 waves pays two rounds for the work of 1.2: 2x320x64x64 (64 rows of 10
/// channels, f16) went from 320 blocks (1.21 waves of 264 slots) to 256 (0.97, one wave).
/// Clusters are assumed to pack the SMs freely (placement within a GPC is not modelled).
fn cluster_chunking(shape: Shape, on_chip: usize, dev: DeviceLimits) -> Option<Chunking> {
    let Shape {
        n,
        g,
        d,
        s,
        elem_bytes,
        ..
    } = shape;
    let max_k = dev.max_cluster.min(MAX_CLUSTER);
    if max_k < 2 || d == 0 || s == 0 {
        return None;
    }
    let v = vec_width(elem_bytes);
    let rows = n * g;
    let bytes = |elems: usize| CLUSTER_SLOT_BYTES + on_chip * elems * elem_bytes;
    let mut candidates = Vec::new();
    for k in 2..=max_k.min(d) {
        let cpb = d.div_ceil(k);
        candidates.push((
            Chunking {
                chunks: d.div_ceil(cpb) as u32,
                cpb: cpb as u32,
                pieces: 1,
                piece_len: s as u32,
            },
            cpb * s,
        ));
    }
    for pieces in 2..=max_k / d {
        let piece_len = s.div_ceil(pieces).next_multiple_of(v);
        let pieces = s.div_ceil(piece_len);
        if pieces >= 2 {
            candidates.push((
                Chunking {
                    chunks: (d * pieces) as u32,
                    cpb: 1,
                    pieces: pieces as u32,
                    piece_len: piece_len as u32,
                },
                piece_len,
            ));
        }
    }
    let reg_blocks = if on_chip == 1 {
        CLUSTER_FWD_REG_BLOCKS
    } else {
        CLUSTER_BWD_REG_BLOCKS
    };
    // (rounds, blocks) of a candidate: its cost is rounds / blocks
    let waves = |ch: Chunking, elems: usize| {
        let blocks = (rows as u128) * ch.chunks as u128;
        let slots = resident_blocks(dev, bytes(elems), reg_blocks);
        (blocks.div_ceil(slots), blocks.max(1))
    };
    candidates
        .into_iter()
        .filter(|&(_, elems)| bytes(elems) <= dev.smem_per_block)
        .min_by(|&(a, ea), &(b, eb)| {
            let ((ra, ba), (rb, bb)) = (waves(a, ea), waves(b, eb));
            (ra * bb).cmp(&(rb * ba)).then(a.chunks.cmp(&b.chunks))
        })
        .map(|(ch, _)| ch)
}

/// The kernels index N, C and S in 32 bits.
/// Pieces per (sample, tile) of the NHWC split path: the fewest whose grid meets the kernel
/// report's wave budget (its last wave at least [`WAVE_FILL`] full, or [`MANY_WAVES`] waves or
/// more; slots = SMs x [`NHWC_SPLIT_REG_BLOCKS`]), among those whose pieces fit `cap` positions
/// and hold about [`MIN_CHUNK`] values or more (at most `ceil(s w / MIN_CHUNK)` pieces); where
/// none does, the one that uses its rounds' slots best. `units` = samples x tiles, `w` the
/// tile's channels. The old target of four blocks per SM made 2x320x64x64 and 1x512x128x128
/// 544 blocks for 264 slots: 2.06 waves, the last 6 % full.
fn nhwc_split_pieces(units: usize, s: usize, w: usize, cap: usize, dev: DeviceLimits) -> usize {
    let units = units.max(1);
    let lo = s.div_ceil(cap.max(1)).max(1);
    let hi = (s * w).div_ceil(MIN_CHUNK).clamp(lo, s.max(1));
    let slots = (dev.sms * NHWC_SPLIT_REG_BLOCKS).max(1);
    // asking for `pieces` gives pieces of ceil(s / pieces) positions: s.div_ceil(that) of them.
    // Returns (pieces, meets the budget, blocks / (rounds x slots)).
    let judge = |pieces: usize| {
        let real = s.div_ceil(s.div_ceil(pieces));
        let blocks = units * real;
        let rounds = blocks.div_ceil(slots);
        let last = (blocks - (rounds - 1) * slots) as f64 / slots as f64;
        let ok = rounds >= MANY_WAVES || last >= WAVE_FILL;
        (real, ok, blocks as f64 / (rounds * slots) as f64)
    };
    let mut best = judge(lo);
    if best.1 {
        return best.0;
    }
    // the fewest blocks whose r-th round is WAVE_FILL full, for r = 1, 2, ...
    for rounds in 1..=MANY_WAVES {
        let need = (((rounds - 1) as f64 + WAVE_FILL) * slots as f64).ceil() as usize;
        let first = need.div_ceil(units).clamp(lo, hi);
        for p in first..(first + 4).min(hi + 1) {
            let j = judge(p);
            if j.1 {
                return j.0;
            }
            if j.2 > best.2 {
                best = j;
            }
        }
    }
    best.0
}

/// Pieces per row of the NHWC cluster kernels (`nhwc_{fwd,bwd}_cluster`): the cluster size K,
/// 2 to the largest cluster, whose pieces of `ceil(s / K)` positions fit one block's shared
/// memory (`bytes(positions)`), taken by the wave model of [`cluster_chunking`] (rounds /
/// blocks, then the fewest pieces); `None` where the device has no clusters or no K fits.
/// `units` = samples x tiles.
fn nhwc_cluster_pieces(
    units: usize,
    s: usize,
    bytes: impl Fn(usize) -> usize,
    pass: Pass,
    dev: DeviceLimits,
) -> Option<usize> {
    let reg_blocks = match pass {
        Pass::Forward => NHWC_CLUSTER_FWD_REG_BLOCKS,
        Pass::Backward => NHWC_CLUSTER_BWD_REG_BLOCKS,
    };
    let max_k = dev.max_cluster.min(MAX_CLUSTER).min(s);
    (2..=max_k)
        .filter_map(|k| {
            let len = s.div_ceil(k);
            let pieces = s.div_ceil(len); // distinct cluster sizes only
            let smem = bytes(len);
            (pieces == k && smem <= dev.smem_per_block).then(|| {
                let blocks = (units.max(1) * k) as u128;
                (
                    k,
                    blocks.div_ceil(resident_blocks(dev, smem, reg_blocks)),
                    blocks,
                )
            })
        })
        .min_by(|&(ka, ra, ba), &(kb, rb, bb)| (ra * bb).cmp(&(rb * ba)).then(ka.cmp(&kb)))
        .map(|(k, _, _)| k)
}

/// Blocks of a row kernel (512 threads, `smem` bytes of dynamic shared memory, `reg_blocks`
/// blocks per SM by its registers) the device holds at once: one wave.
fn resident_blocks(dev: DeviceLimits, smem: usize, reg_blocks: usize) -> u128 {
    let per_sm = ((dev.smem_per_block + SMEM_RESERVED_PER_BLOCK)
        / (smem + SMEM_RESERVED_PER_BLOCK))
        .min(reg_blocks)
        .min(THREADS_PER_SM / THREADS as usize)
        .max(1);
    (dev.sms.max(1) * per_sm) as u128
}

fn check_u32_dims(n: usize, c: usize, s: usize, dims: &[usize]) -> Result<()> {
    for (what, v) in [("batch N", n), ("channels C", c), ("spatial size S", s)] {
        if v > u32::MAX as usize {
            return Err(Error::TooLarge {
                dims: dims.to_vec(),
                why: format!("the GPU kernels take {what} up to 2^32 - 1, got {v}"),
            });
        }
    }
    Ok(())
}

/// forward split: (mean, m2) per chunk, then (mean, rstd) per row; backward: (sum dy, sum dy
/// xhat, sum x - mean) per (n, c, piece), then (m1, m2, delta) per row, then (split path with
/// SiLU) one centered sum per chunk. The same for both layouts.
///
/// Checked: `None` where the count (or its byte size) overflows, whether or not the tensor is
/// empty (`N * C` can be huge with `S = 0`).
fn workspace_floats(
    shape: Shape,
    pass: Pass,
    fused: bool,
    ch: Chunking,
    silu: bool,
) -> Option<usize> {
    let rows = shape.n.checked_mul(shape.g)?;
    let chunks = ch.chunks as usize;
    let floats = match pass {
        Pass::Forward if fused => 0,
        Pass::Forward => rows
            .checked_mul(chunks)?
            .checked_add(rows)?
            .checked_mul(2)?,
        Pass::Backward => {
            let center = if silu && !fused {
                rows.checked_mul(chunks)?
            } else {
                0
            };
            shape
                .n
                .checked_mul(shape.c)?
                .checked_mul(ch.pieces as usize)?
                .checked_add(rows)?
                .checked_mul(3)?
                .checked_add(center)?
        }
    };
    crate::config::fits_bytes(floats, 4).then_some(floats)
}

/// [`workspace_floats`], or [`Error::TooLarge`] naming the workspace.
fn checked_workspace(
    shape: Shape,
    pass: Pass,
    fused: bool,
    ch: Chunking,
    silu: bool,
    dims: &[usize],
) -> Result<usize> {
    workspace_floats(shape, pass, fused, ch, silu).ok_or_else(|| Error::TooLarge {
        dims: dims.to_vec(),
        why: "the workspace size in bytes overflows isize".into(),
    })
}

/// Bytes each position run of an NHWC tile should span at least: two full 32-byte sectors, so
/// no sector a block reads is shared with a neighbouring tile's block.
const NHWC_MIN_RUN_BYTES: usize = 64;
/// Per-group values an NHWC tile kernel keeps in shared memory (`8 * cpb` floats in nhwc.cu).
const NHWC_GROUP_ARRAYS: usize = 9;

/// Groups per NHWC tile: the fewest consecutive groups whose run spans
/// [`NHWC_MIN_RUN_BYTES`], rounded up (within a vector's worth) to a run that is a whole number
/// of 16-byte vectors where that exists, and at most `G`.
pub(crate) fn nhwc_groups_per_tile(g: usize, d: usize, elem_bytes: usize) -> usize {
    let v = vec_width(elem_bytes);
    let k0 = NHWC_MIN_RUN_BYTES.div_ceil(d * elem_bytes).clamp(1, g);
    (k0..=(k0 + v).min(g))
        .find(|k| (k * d) % v == 0)
        .unwrap_or(k0)
}

/// Floats of shared memory an NHWC tile kernel needs besides its tile(s): `q` column-partial
/// arrays of `max(threads, W)` and the per-group values. Mirrors `tile_smem` in nhwc.cu.
pub(crate) fn nhwc_extra_floats(q: usize, w: usize, gpb: usize) -> usize {
    q * w.max(THREADS as usize) + NHWC_GROUP_ARRAYS * gpb
}

/// Plans an NHWC pass (see kernels/nhwc.cu): tiles of `gpb` groups, whole rows on chip when
/// they fit (fused), else pieces of positions: the forward on clusters where the pieces of a
/// tile fit one (`nhwc_cluster_pieces`), the rest split.
fn plan_nhwc(
    shape: Shape,
    pass: Pass,
    path: Path,
    dev: DeviceLimits,
    ptrs_aligned: bool,
    dims: &[usize],
) -> Result<Plan> {
    let Shape {
        n,
        c,
        g,
        d,
        s,
        elem_bytes,
        silu,
        ..
    } = shape;
    let too_large = |why: String| Error::TooLarge {
        dims: dims.to_vec(),
        why,
    };
    check_u32_dims(n, c, s, dims)?;
    let v = vec_width(elem_bytes);
    let gpb = nhwc_groups_per_tile(g, d, elem_bytes);
    let w = gpb * d;
    let tiles = g.div_ceil(gpb);
    let (on_chip, q) = match pass {
        Pass::Forward => (1, 1),
        Pass::Backward => (2, 3),
    };
    let extra = nhwc_extra_floats(q, w, gpb) * 4;
    let tile_bytes = |positions: usize| (w * positions * elem_bytes).next_multiple_of(16);
    let fused_bytes = on_chip * tile_bytes(s) + extra;
    let fits = |bytes: usize, budget: usize| bytes <= budget.min(dev.smem_per_block);
    let enough_blocks = n * tiles >= dev.sms;
    let worth_splitting = d * s >= 2 * MIN_CHUNK;
    let fused = match path {
        Path::Auto => fits(fused_bytes, FUSED_SMEM_BUDGET) && (enough_blocks || !worth_splitting),
        Path::Split => false,
        Path::Cluster => false,
        Path::Fused if fits(fused_bytes, dev.smem_per_block) => true,
        Path::Fused => {
            return Err(Error::PathUnavailable {
                path: "fused",
                why: format!(
                    "NHWC tiles of {gpb} group(s) x {s} positions: {fused_bytes} \
                     bytes of shared memory, over the {} bytes a block may use here",
                    dev.smem_per_block
                ),
            })
        }
    };
    // the cluster kernels keep each piece's tile(s) on chip, with `extra` beside them
    let cluster_bytes = |len: usize| on_chip * tile_bytes(len) + extra;
    let clustered = match path {
        _ if fused => None,
        // Auto: the backward only. On an H200 (2026-11-30, BENCHMARKS.md) the cluster forward
        // measured slower than the split path on every NHWC shape benched (1x512x64x64 f16:
        // 31.3 against 22.4 µs), the cluster backward as fast or faster (1x512x128x128: 70.8
        // against 83.0 µs); forcing Path::Cluster still runs the forward on clusters.
        Path::Auto if pass == Pass::Backward => {
            nhwc_cluster_pieces(n * tiles, s, cluster_bytes, pass, dev)
        }
        Path::Cluster => Some(
            nhwc_cluster_pieces(n * tiles, s, cluster_bytes, pass, dev).ok_or_else(|| {
                Error::PathUnavailable {
                    path: "cluster",
                    why: if dev.max_cluster < 2 {
                        "thread-block clusters need compute capability 9.0 or newer".to_string()
                    } else {
                        format!(
                            "NHWC tiles of {gpb} group(s) x {s} positions do not fit the shared \
                             memory of a cluster of at most {} blocks",
                            dev.max_cluster.min(MAX_CLUSTER)
                        )
                    },
                }
            })?,
        ),
        _ => None,
    };
    let chunking = if fused {
        Chunking {
            chunks: 1,
            cpb: gpb as u32,
            pieces: 1,
            piece_len: s as u32,
        }
    } else if let Some(pieces) = clustered {
        let piece_len = s.div_ceil(pieces);
        Chunking {
            chunks: pieces as u32,
            cpb: gpb as u32,
            pieces: pieces as u32,
            piece_len: piece_len as u32,
        }
    } else {
        // the forward partial kernel keeps a piece's tile on chip; the backward streams
        let budget = SPLIT_SMEM_BUDGET.min(dev.smem_per_block);
        let room = budget.checked_sub(nhwc_extra_floats(3, w, gpb) * 4);
        let Some(room) = room.filter(|r| *r >= w * elem_bytes + 16) else {
            return Err(Error::ShapeNotOnGpu {
                why: format!(
                    "NHWC tiles of {w} channels: their per-channel sums need more \
                     than the {budget} bytes of shared memory a split-path block uses"
                ),
            });
        };
        let cap = (room - 16) / (w * elem_bytes);
        let pieces = nhwc_split_pieces(n * tiles, s, w, cap, dev);
        let piece_len = s.div_ceil(pieces);
        Chunking {
            chunks: pieces as u32,
            cpb: gpb as u32,
            pieces: pieces as u32,
            piece_len: piece_len as u32,
        }
    };
    let blocks = (n as u64) * (tiles as u64) * chunking.pieces as u64;
    if blocks > MAX_BLOCKS {
        return Err(too_large(format!(
            "{blocks} thread blocks exceed the launch limit of {MAX_BLOCKS}"
        )));
    }
    let vec = ptrs_aligned && c % v == 0 && w % v == 0;
    let smem_bytes = match (fused, pass) {
        (true, _) => fused_bytes,
        _ if clustered.is_some() => cluster_bytes(chunking.piece_len as usize),
        (false, Pass::Forward) => tile_bytes(chunking.piece_len as usize) + extra,
        (false, Pass::Backward) => 0,
    };
    // the cluster path keeps every piece on chip: no merge workspace
    let on_chip_path = fused || clustered.is_some();
    Ok(Plan {
        fused,
        vec,
        chunking,
        blocks: blocks as u32,
        smem_bytes: smem_bytes as u32,
        workspace_floats: checked_workspace(shape, pass, on_chip_path, chunking, silu, dims)?,
        nhwc: true,
        stream_smem_bytes: (nhwc_extra_floats(q, w, gpb) * 4) as u32,
        cluster: if clustered.is_some() {
            chunking.pieces
        } else {
            1
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100: DeviceLimits = DeviceLimits {
        sms: 132,
        smem_per_block: 227 * 1024,
        max_cluster: 16,
    };
    const T4: DeviceLimits = DeviceLimits {
        sms: 40,
        smem_per_block: 64 * 1024,
        max_cluster: 0,
    };

    fn shape(n: usize, c: usize, g: usize, s: usize, elem_bytes: usize) -> Shape {
        Shape {
            n,
            c,
            g,
            d: c / g,
            s,
            elem_bytes,
            nhwc: false,
            silu: false,
        }
    }

    /// Host mirror of `chunk_of` in kernels/common.cuh: (first channel, channels, s0, seglen).
    fn chunk_of(k: u32, ch: Chunking, d: u32, s: u32) -> (u32, u32, u32, u32) {
        if ch.pieces == 1 {
            let c0 = k * ch.cpb;
            (c0, ch.cpb.min(d - c0), 0, s)
        } else {
            let s0 = (k % ch.pieces) * ch.piece_len;
            (k / ch.pieces, 1, s0, ch.piece_len.min(s - s0))
        }
    }

    /// Every value of a row belongs to exactly one chunk, chunks are contiguous and in order,
    /// fit their shared-memory budget, and keep vector alignment when `vec`.
    fn check_covers(sh: Shape, pass: Pass, dev: DeviceLimits) {
        let p = plan(sh, pass, Path::Auto, dev, true, &[sh.n, sh.c, sh.s]).unwrap();
        let (d, s) = (sh.d as u32, sh.s as u32);
        let mut next = 0u64;
        for k in 0..p.chunking.chunks {
            let (c0, nseg, s0, seglen) = chunk_of(k, p.chunking, d, s);
            assert!(
                nseg >= 1 && seglen >= 1,
                "empty chunk {k} in {p:?} for {sh:?}"
            );
            let start = c0 as u64 * s as u64 + s0 as u64;
            assert_eq!(start, next, "chunk {k} not contiguous in {p:?} for {sh:?}");
            next = start + nseg as u64 * seglen as u64;
            if p.vec {
                assert_eq!(start % vec_width(sh.elem_bytes) as u64, 0);
            }
            let tensors = match pass {
                Pass::Forward => 1,
                // the split backward streams; the fused and cluster ones keep x and dy
                Pass::Backward if p.fused || p.cluster > 1 => 2,
                Pass::Backward => 0,
            };
            let on_chip = tensors * nseg as u64 * seglen as u64 * sh.elem_bytes as u64;
            assert!(on_chip <= dev.smem_per_block as u64);
            assert!(on_chip <= p.smem_bytes as u64 || (pass == Pass::Backward && !p.fused));
        }
        assert_eq!(
            next,
            sh.d as u64 * sh.s as u64,
            "chunks miss values in {p:?}"
        );
        assert_eq!(p.blocks as usize, sh.n * sh.g * p.chunking.chunks as usize);
    }

    #[test]
    fn chunks_cover_every_row_exactly_once() {
        let shapes = [
            shape(1, 320, 32, 64 * 64, 2),
            shape(2, 320, 32, 64 * 64, 4),
            shape(8, 640, 32, 32 * 32, 2),
            shape(1, 128, 32, 512 * 512, 2),
            shape(1, 128, 32, 512 * 512, 4),
            shape(1, 4, 1, 1 << 22, 4),
            shape(3, 6, 3, 35, 4),
            shape(1, 2560, 32, 64, 2),
            shape(1, 2560, 1, 1, 4),
            shape(4096, 32, 32, 1, 2),
            shape(1, 7, 7, 100_003, 2),
        ];
        for sh in shapes {
            for pass in [Pass::Forward, Pass::Backward] {
                for dev in [H100, T4] {
                    check_covers(sh, pass, dev);
                }
            }
        }
    }

    #[test]
    fn one_batch_stable_diffusion_shape_uses_every_sm() {
        let p = plan(
            shape(1, 320, 32, 64 * 64, 2),
            Pass::Forward,
            Path::Auto,
            H100,
            true,
            &[],
        )
        .unwrap();
        assert!(!p.fused);
        // every SM gets a block, and the grid is one wave (two 16 KiB blocks per SM): 160
        // blocks of 2 channels, not 320 of 1 (1.21 waves, the second one a fifth full)
        assert!(p.blocks as usize >= H100.sms, "{p:?}");
        assert!(p.blocks as usize <= 2 * H100.sms, "{p:?}");
        assert!(p.vec);
    }

    /// NHWC split grids fill their last wave to 90 % (the shapes the kernel report flagged at 0.73
    /// to 2.06 waves with the last one 6-73 % full), and their pieces cover every position once.
    #[test]
    fn nhwc_split_grids_fill_their_waves() {
        let slots = H100.sms * NHWC_SPLIT_REG_BLOCKS;
        // (2x1280x16x16, 655 k values, cannot fill 264 slots with blocks of ~MIN_CHUNK: it
        // takes the most blocks that allows, 3 pieces of 86 positions x 40 channels)
        let small = plan(
            Shape {
                nhwc: true,
                ..shape(2, 1280, 32, 16 * 16, 2)
            },
            Pass::Forward,
            Path::Split,
            H100,
            true,
            &[],
        )
        .unwrap();
        assert_eq!((small.chunking.pieces, small.blocks), (3, 192), "{small:?}");
        for (n, c, s) in [(2, 320, 64 * 64), (2, 640, 32 * 32), (1, 512, 128 * 128)] {
            let sh = Shape {
                nhwc: true,
                ..shape(n, c, 32, s, 2)
            };
            for pass in [Pass::Forward, Pass::Backward] {
                let p = plan(sh, pass, Path::Split, H100, true, &[]).unwrap();
                let ch = p.chunking;
                let blocks = p.blocks as usize;
                let rounds = blocks.div_ceil(slots);
                let last = (blocks - (rounds - 1) * slots) as f64 / slots as f64;
                assert!(
                    last >= WAVE_FILL,
                    "{n}x{c}x{s} {pass:?}: {last:.2} of {p:?}"
                );
                let len = ch.piece_len as usize;
                assert!(
                    ch.pieces as usize == s.div_ceil(len) && len * (ch.pieces as usize - 1) < s
                );
            }
        }
    }

    /// Cluster grids are sized in whole waves (issue 14, item 4): the wave model of
    /// `cluster_chunking` on the shapes whose plans the kernel report flagged.
    #[test]
    fn cluster_grids_fill_whole_waves() {
        let cases = [
            // (shape, pass, blocks): 2x320x64x64 forward, 64 rows: 4 chunks (256 blocks of two
            // per SM: 0.97 waves) where 5 made 320 (1.21); backward (80 registers: one block
            // per SM) 2 chunks, 128 blocks (0.97) where 5 made 2.42 waves
            (shape(2, 320, 32, 64 * 64, 2), Pass::Forward, 256),
            (shape(2, 320, 32, 64 * 64, 2), Pass::Backward, 128),
            // 1x512x64x64 backward: 4 chunks of 4 channels, 128 blocks, where 16 made 3.88
            // waves with the last one 88 % full
            (shape(1, 512, 32, 64 * 64, 2), Pass::Backward, 128),
        ];
        for (sh, pass, blocks) in cases {
            let p = plan(sh, pass, Path::Auto, H100, true, &[]).unwrap();
            assert!(p.cluster > 1, "{pass:?}: {p:?}");
            assert_eq!(p.blocks, blocks, "{pass:?}: {p:?}");
            check_covers(sh, pass, H100);
        }
    }

    #[test]
    fn many_short_rows_are_fused_and_read_once() {
        let p = plan(
            shape(16, 320, 32, 32 * 32, 2),
            Pass::Forward,
            Path::Auto,
            H100,
            true,
            &[],
        )
        .unwrap();
        assert!(p.fused && p.vec, "{p:?}");
        assert_eq!(p.workspace_floats, 0);
        assert_eq!(p.smem_bytes as usize, 10 * 1024 * 2);
    }

    #[test]
    fn odd_spatial_sizes_take_the_scalar_kernels() {
        let p = plan(
            shape(2, 6, 3, 35, 2),
            Pass::Forward,
            Path::Auto,
            H100,
            true,
            &[],
        )
        .unwrap();
        assert!(!p.vec);
        let p = plan(
            shape(2, 6, 3, 64, 2),
            Pass::Forward,
            Path::Auto,
            H100,
            false,
            &[],
        )
        .unwrap();
        assert!(!p.vec, "misaligned pointers must take the scalar kernels");
    }

    #[test]
    fn empty_rows_are_fused_no_ops() {
        let p = plan(
            shape(2, 4, 2, 0, 4),
            Pass::Forward,
            Path::Auto,
            H100,
            true,
            &[],
        )
        .unwrap();
        assert!(p.fused);
        assert_eq!(p.smem_bytes, 0);
    }

    #[test]
    fn paths_can_be_forced() {
        let sh = shape(1, 320, 32, 64 * 64, 2);
        for pass in [Pass::Forward, Pass::Backward] {
            let p = plan(sh, pass, Path::Fused, H100, true, &[]).unwrap();
            assert!(p.fused && p.chunking.chunks == 1, "{p:?}");
            let p = plan(
                shape(300, 32, 32, 64, 4),
                pass,
                Path::Split,
                H100,
                true,
                &[],
            )
            .unwrap();
            assert!(!p.fused && p.workspace_floats > 0, "{p:?}");
        }
        let e = plan(
            shape(1, 4, 1, 1 << 20, 4),
            Pass::Forward,
            Path::Fused,
            T4,
            true,
            &[],
        );
        assert!(matches!(e, Err(Error::PathUnavailable { .. })), "{e:?}");
    }

    #[test]
    fn oversized_dims_are_typed_errors() {
        let e = plan(
            shape(1, 1, 1, 1 << 33, 4),
            Pass::Forward,
            Path::Auto,
            H100,
            true,
            &[1, 1, 1 << 33],
        );
        assert!(matches!(e, Err(Error::TooLarge { .. })), "{e:?}");
    }

    /// On a device with clusters, few long rows take the cluster path (every chunk on chip, one
    /// launch, no forward workspace); without clusters, the split path. Clusters never exceed
    /// the device's largest, and their chunks fit a block's shared memory.
    #[test]
    fn clusters_keep_few_long_rows_on_chip() {
        let sd = shape(1, 320, 32, 64 * 64, 2);
        for pass in [Pass::Forward, Pass::Backward] {
            let p = plan(sd, pass, Path::Auto, H100, true, &[1, 320, 64, 64]).unwrap();
            assert!(!p.fused && p.cluster > 1, "{pass:?}: {p:?}");
            assert_eq!(p.cluster, p.chunking.chunks);
            assert!(p.cluster as usize <= H100.max_cluster);
            assert!(p.smem_bytes as usize <= H100.smem_per_block);
            assert_eq!(p.blocks, 32 * p.cluster);
            check_covers(sd, pass, H100);
            let t = plan(sd, pass, Path::Auto, T4, true, &[1, 320, 64, 64]).unwrap();
            assert!(!t.fused && t.cluster == 1, "{pass:?} on T4: {t:?}");
        }
        let fwd = plan(sd, Pass::Forward, Path::Auto, H100, true, &[]).unwrap();
        assert_eq!(fwd.workspace_floats, 0);
        // rows that fit one block with enough of them stay fused
        let many = shape(64, 320, 32, 32 * 32, 2);
        assert!(
            plan(many, Pass::Forward, Path::Auto, H100, true, &[])
                .unwrap()
                .fused
        );
    }

    /// The largest VAE rows (1x128x512x512, G = 32, 2 MiB per f16 row): the forward fits a
    /// cluster in pieces of channels; the backward (x and dy, 4 MiB) does not and splits, and
    /// forcing clusters there, or on a device without them, is a typed error.
    #[test]
    fn cluster_limits() {
        let vae = shape(1, 128, 32, 512 * 512, 2);
        let dims = [1, 128, 512, 512];
        let f = plan(vae, Pass::Forward, Path::Auto, H100, true, &dims).unwrap();
        // 3 pieces of 87384 values per channel (BENCHMARKS.md quotes this): 12 blocks of 171 KiB
        assert!(f.cluster == 12 && f.chunking.pieces == 3, "{f:?}");
        assert_eq!(f.smem_bytes, 16 + 87384 * 2);
        check_covers(vae, Pass::Forward, H100);
        let b = plan(vae, Pass::Backward, Path::Auto, H100, true, &dims).unwrap();
        assert!(!b.fused && b.cluster == 1, "{b:?}");
        assert!(matches!(
            plan(vae, Pass::Backward, Path::Cluster, H100, true, &dims),
            Err(Error::PathUnavailable { .. })
        ));
        assert!(matches!(
            plan(vae, Pass::Forward, Path::Cluster, T4, true, &dims),
            Err(Error::PathUnavailable { .. })
        ));
        // a device whose largest cluster is 8 blocks: 8 * 227 KiB cannot hold the 2 MiB row
        let eight = DeviceLimits {
            max_cluster: 8,
            ..H100
        };
        let f = plan(vae, Pass::Forward, Path::Auto, eight, true, &dims).unwrap();
        assert_eq!(f.cluster, 1);
        // the f32 forward row (4 MiB) does not fit 16 blocks either
        let vae32 = shape(1, 128, 32, 512 * 512, 4);
        let f = plan(vae32, Pass::Forward, Path::Auto, H100, true, &dims).unwrap();
        assert_eq!(f.cluster, 1);
    }
}
