//! Which kernels run for a shape, and how each group row is cut into chunks.
//!
//! Pure host logic (no CUDA calls), so its invariants are tested on machines without a GPU.
//!
//! - **fused**: one block per row, the row on chip, x read once. Taken when the row fits the
//!   shared-memory budget and there are enough rows to give every SM a block.
//! - **split**: several blocks per row, each a chunk of whole channels (or a piece of one channel
//!   when a channel alone is too long), partials merged in a fixed order, then a second kernel
//!   that re-reads its chunk (usually from L2). Taken for few or long rows.
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
/// Smallest chunk worth a block of its own, in elements.
const MIN_CHUNK: usize = 4096;
/// Blocks per SM the split path aims for.
const SPLIT_BLOCKS_PER_SM: usize = 4;
/// Largest grid the kernels are launched with (gridDim.x limit).
const MAX_BLOCKS: u64 = i32::MAX as u64;

/// What the planner needs to know of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Streaming multiprocessors.
    pub sms: usize,
    /// Dynamic shared memory one block may opt into, in bytes.
    pub smem_per_block: usize,
}

/// Which kernel path a launch takes: chosen per shape, or forced (for tests and benchmarks that
/// compare the paths).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Path {
    /// The planner decides from the shape and the device.
    #[default]
    Auto,
    /// One block per row with the row on chip; an error where a row does not fit.
    Fused,
    /// Rows split across blocks, partials merged in a fixed order.
    Split,
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
    let Shape {
        n,
        c,
        g,
        d,
        s,
        elem_bytes,
    } = shape;
    let too_large = |why: String| Error::TooLarge {
        dims: dims.to_vec(),
        why,
    };
    for (what, v) in [("batch N", n), ("channels C", c), ("spatial size S", s)] {
        if v > u32::MAX as usize {
            return Err(too_large(format!(
                "the GPU kernels take {what} up to 2^32 - 1, got {v}"
            )));
        }
    }
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
            Path::Split => false,
            // forced: up to everything the device allows one block, not just the tuned budget
            Path::Fused if on_chip * row_len * elem_bytes <= dev.smem_per_block => true,
            Path::Fused => {
                return Err(Error::Unsupported {
                    what: format!(
                    "the fused path for rows of {row_len} values: it keeps {on_chip} tensor(s) of \
                     the row on chip, {} bytes, over the {} bytes a block may use here",
                    on_chip * row_len * elem_bytes,
                    dev.smem_per_block
                ),
                })
            }
        };
    let chunking = if fused {
        Chunking {
            chunks: 1,
            cpb: d as u32,
            pieces: 1,
            piece_len: s as u32,
        }
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
        (false, Pass::Forward) => chunk_elems * elem_bytes,
        (false, Pass::Backward) => 0,
    };
    // forward split: (mean, m2) per chunk, then (mean, rstd) per row;
    // backward: (sum dy, sum dy xhat, sum x - mean) per (n, c, piece), then (m1, m2, delta) per row
    let workspace_floats = match pass {
        Pass::Forward if fused => 0,
        Pass::Forward => 2 * rows * chunking.chunks as usize + 2 * rows,
        Pass::Backward => 3 * n * c * chunking.pieces as usize + 3 * rows,
    };
    Ok(Plan {
        fused,
        vec,
        chunking,
        blocks: blocks as u32,
        smem_bytes: smem_bytes as u32,
        workspace_floats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100: DeviceLimits = DeviceLimits {
        sms: 132,
        smem_per_block: 227 * 1024,
    };
    const T4: DeviceLimits = DeviceLimits {
        sms: 40,
        smem_per_block: 64 * 1024,
    };

    fn shape(n: usize, c: usize, g: usize, s: usize, elem_bytes: usize) -> Shape {
        Shape {
            n,
            c,
            g,
            d: c / g,
            s,
            elem_bytes,
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
            let on_chip = if pass == Pass::Forward || p.fused {
                nseg as u64 * seglen as u64 * sh.elem_bytes as u64
            } else {
                0
            };
            assert!(on_chip <= dev.smem_per_block as u64);
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
        assert!(p.blocks as usize >= 2 * H100.sms, "{p:?}");
        assert!(p.vec);
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
        assert!(matches!(e, Err(Error::Unsupported { .. })), "{e:?}");
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
}
