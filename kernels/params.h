// Launch parameters shared by the kernels and the Rust launch layer (src/gpu/params.rs).
//
// Plain C, passed by value as one kernel argument. Rust mirrors each struct with #[repr(C)];
// both sides assert the same sizes and offsets (static_assert here, const asserts there), so a
// change on one side that is not made on the other fails to compile.
#pragma once
#include <stddef.h>
#include <stdint.h>

// How one group row of L = D * S values is cut into chunks, one thread block each.
//
// NCHW: a chunk is always contiguous in the row and is made of `nseg` segments of equal length:
// - pieces == 1: chunk k holds whole channels [k * cpb, min(D, (k + 1) * cpb)), segments of S;
// - pieces  > 1: chunk k holds piece (k % pieces) of channel (k / pieces): spatial values
//   [p * piece_len, min(S, (p + 1) * piece_len)), one segment.
// NHWC (kernels/nhwc.cu): a block holds a tile of `cpb` consecutive groups (fewer in the last
// tile) over positions [k * piece_len, min(S, (k + 1) * piece_len)); chunks == pieces == K, the
// positions of a row are cut into K pieces and chunk k of a row is its piece k.
typedef struct GnChunking {
  uint32_t chunks;     // chunks per row, K
  uint32_t cpb;        // channels per chunk when pieces == 1 (else 1)
  uint32_t pieces;     // spatial pieces per channel, P >= 1
  uint32_t piece_len;  // spatial values per piece when pieces > 1 (else S)
} GnChunking;

typedef struct GnFwdParams {
  const void* x;       // (N, C, S) activations, T
  void* y;             // (N, C, S) output, T
  const void* weight;  // (C) P, or NULL
  const void* bias;    // (C) P, or NULL
  float* mean;         // (N, G)
  float* rstd;         // (N, G)
  float* partials;     // (N * G * K, 2) split path workspace: (mean about the pivot, m2); else unused
  uint64_t rows;       // N * G
  uint32_t groups;     // G
  uint32_t d;          // channels per group, D
  uint32_t s;          // spatial size, S
  float eps;
  GnChunking chunking;
  uint32_t activation; // GN_ACT_NONE or GN_ACT_SILU: y = act(xhat * w + b)
  uint32_t reserved;   // 0
} GnFwdParams;

typedef struct GnBwdParams {
  const void* dy;      // (N, C, S) T
  const void* x;       // (N, C, S) T
  const float* mean;   // (N, G) saved by the forward pass
  const float* rstd;   // (N, G)
  const void* weight;  // (C) P, or NULL
  void* dx;            // (N, C, S) T
  void* dweight;       // (C) P, or NULL when not wanted
  void* dbias;         // (C) P, or NULL when not wanted
  float* partials;     // (N * C * P, 2) workspace: (sum dy, sum dy * xhat) per (n, c, piece)
  uint64_t rows;       // N * G
  uint32_t batch;      // N
  uint32_t groups;     // G
  uint32_t d;          // D
  uint32_t s;          // S
  float inv_row_len;   // 1 / (D * S) rounded once from f64 on the host (0 when S == 0)
  GnChunking chunking;
  uint32_t activation; // the forward pass's activation; dy is the gradient of act's output
  const void* bias;    // (C) P, or NULL: read only with an activation, to recompute z
  uint32_t* tickets;   // fused and cluster paths with N > 1: (blocks / N) words, zero on entry
                       // and left zero on exit, one per block of a sample; or NULL (then the
                       // host launches bwd_params). See ticket_param_grads in common.cuh.
} GnBwdParams;

// Activations (GnFwdParams::activation, GnBwdParams::activation).
#define GN_ACT_NONE 0u
#define GN_ACT_SILU 1u

#ifdef __cplusplus
static_assert(sizeof(GnChunking) == 16, "GnChunking layout is mirrored in Rust");
static_assert(sizeof(GnFwdParams) == 104, "GnFwdParams layout is mirrored in Rust");
static_assert(offsetof(GnFwdParams, activation) == 96, "GnFwdParams layout is mirrored in Rust");
static_assert(offsetof(GnFwdParams, rows) == 56, "GnFwdParams layout is mirrored in Rust");
static_assert(offsetof(GnFwdParams, eps) == 76, "GnFwdParams layout is mirrored in Rust");
static_assert(offsetof(GnFwdParams, chunking) == 80, "GnFwdParams layout is mirrored in Rust");
static_assert(sizeof(GnBwdParams) == 136, "GnBwdParams layout is mirrored in Rust");
static_assert(offsetof(GnBwdParams, activation) == 116, "GnBwdParams layout is mirrored in Rust");
static_assert(offsetof(GnBwdParams, bias) == 120, "GnBwdParams layout is mirrored in Rust");
static_assert(offsetof(GnBwdParams, tickets) == 128, "GnBwdParams layout is mirrored in Rust");
static_assert(offsetof(GnBwdParams, rows) == 72, "GnBwdParams layout is mirrored in Rust");
static_assert(offsetof(GnBwdParams, chunking) == 100, "GnBwdParams layout is mirrored in Rust");
#endif
