// GroupNorm forward and backward for channels-last (NHWC) tensors: x is (N, S, C) in memory and
// a group row is S runs of D = C / G channels, C apart.
//
// A block works on a *tile*: `cpb` consecutive groups (fewer in the last tile) over a piece of
// positions (GnChunking in params.h). Each position of a tile is one contiguous run of
// W = groups * D channels, so a block reads runs of W values: the host picks `cpb` so that a run
// is at least 64 bytes (two full 32-byte sectors) even for D = 1, 2, 4, and one group per tile
// for large D. Loads are 16-byte vectors when W, C and the pointers allow.
//
// Reductions are per column (channel) first: thread t owns column t % W and positions
// t / W, t / W + R, ... (R = blockDim / W), so consecutive threads read consecutive channels
// (coalesced from global memory, conflict-free from shared memory); the R partial sums of a
// column then combine in order, and a warp per group sums its D columns in order. Every result
// is the same bits on every run.
//
// Paths, as for NCHW (src/gpu/plan.rs decides):
// - fused (one piece per row): the tile (x, or x and dy) is copied into shared memory once;
//   statistics, per-channel sums and the output all come from the on-chip copy;
// - cluster (sm_90+): the pieces of a tile's rows are the blocks of one cluster, each with its
//   piece on chip (x, or x and dy); statistics and sums merged through distributed shared
//   memory; read once, one launch (plus bwd_params when N > 1 without tickets);
// - split: forward `partial` (tile on chip, per-group (mean about the pivot, m2)) -> `merge`
//   (one warp per row) -> `apply` (re-reads x); backward [`center` with SiLU] -> `partial`
//   (per-(n, c, piece) sums, streamed) -> bwd_rows (backward.cu) -> `dx` (streamed, which also
//   writes dweight and dbias: split_param_grads, common.cuh); the fused and cluster kernels with
//   N > 1 reduce them in the last block of each tile's N (ticket_param_grads, common.cuh) when
//   given tickets, else leave them to bwd_params (backward.cu): the workspace layouts are the
//   NCHW ones.
#include "cluster.cuh"
#include "common.cuh"

namespace gn {

constexpr int kNhwcThreads = 512;


struct Tile {
  uint64_t n;      // sample
  uint32_t g0;     // first group
  uint32_t ng;     // groups in the tile
  uint32_t k;      // piece of the rows
  uint32_t s0;     // first position
  uint32_t slen;   // positions
  uint32_t w;      // channels per position run, ng * D
  uint64_t base;   // offset of (n, s0, g0 * D)
  __device__ __forceinline__ uint64_t row(uint32_t groups, uint32_t j) const {
    return n * groups + g0 + j;
  }
};

__device__ __forceinline__ Tile tile_of(uint64_t block, const GnChunking& ch, uint32_t groups,
                                        uint32_t d, uint32_t s) {
  Tile t;
  const uint32_t tiles = (groups + ch.cpb - 1) / ch.cpb;
  t.k = (uint32_t)(block % ch.pieces);
  const uint64_t rest = block / ch.pieces;
  const uint32_t ti = (uint32_t)(rest % tiles);
  t.n = rest / tiles;
  t.g0 = ti * ch.cpb;
  t.ng = min(ch.cpb, groups - t.g0);
  t.s0 = t.k * ch.piece_len;
  t.slen = min(ch.piece_len, s - t.s0);
  t.w = t.ng * d;
  const uint64_t c = (uint64_t)groups * d;
  t.base = (t.n * s + t.s0) * c + (uint64_t)t.g0 * d;
  return t;
}

// Stride of the per-column partial arrays (floats): one per thread, or one per column.
__device__ __forceinline__ uint32_t part_stride(const GnChunking& ch, uint32_t d) {
  return max((uint32_t)blockDim.x, ch.cpb * d);
}

// Shared memory of a tile kernel: [tiles of T (each rounded to 16 bytes)] [Q * stride floats of
// column partials] [9 * cpb floats of per-group values]. Mirrored by nhwc_extra_floats in
// src/gpu/plan.rs.
struct TileSmem {
  unsigned char* tiles;
  float* part;
  float* garr;
};

__device__ __forceinline__ TileSmem tile_smem(unsigned char* raw, uint32_t tile_bytes,
                                              uint32_t ntiles, uint32_t q, uint32_t stride) {
  TileSmem m;
  m.tiles = raw;
  m.part = reinterpret_cast<float*>(raw + (size_t)ntiles * ((tile_bytes + 15u) & ~15u));
  m.garr = m.part + (size_t)q * stride;
  return m;
}

// Copies a tile (slen runs of w values, C apart in global memory) into dense shared memory.
// Assumes: with VEC, w, C and the pointers are multiples of kVec<T>.
template <typename T, bool VEC>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ src, const Tile& t,
                                          uint64_t c) {
  constexpr int V = VEC ? kVec<T> : 1;
  const uint32_t wv = t.w / V;
  const DivU32 per_run(wv);
  const uint32_t total = t.slen * wv;
  for (uint32_t i = threadIdx.x; i < total; i += blockDim.x) {
    const uint32_t r = per_run.div(i), j = i - r * wv;
    const T* g = src + t.base + (uint64_t)r * c + (uint64_t)j * V;
    if constexpr (VEC) {
      store16(dst + (size_t)i * V, load16(g));
    } else {
      dst[i] = *g;
    }
  }
}

// Per-column sums of f(position, column, acc[Q]) over the tile's positions, left in
// part[q * stride + column] for every column (fixed combination order). Contains barriers.
template <int Q, typename F>
__device__ __forceinline__ void column_sums(uint32_t w, uint32_t slen, float* part,
                                            uint32_t stride, F f) {
  const uint32_t t = threadIdx.x, bd = blockDim.x;
  if (w <= bd) {
    const uint32_t r_count = bd / w;
    if (t < r_count * w) {
      const uint32_t col = t % w;
      float acc[Q];
#pragma unroll
      for (int q = 0; q < Q; ++q) acc[q] = 0.f;
      for (uint32_t sl = t / w; sl < slen; sl += r_count) f(sl, col, acc);
#pragma unroll
      for (int q = 0; q < Q; ++q) part[q * stride + t] = acc[q];
    }
    __syncthreads();
    if (t < w) {
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        float v = part[q * stride + t];
        for (uint32_t r = 1; r < r_count; ++r) v += part[q * stride + r * w + t];
        part[q * stride + t] = v;
      }
    }
  } else {
    for (uint32_t col = t; col < w; col += bd) {
      float acc[Q];
#pragma unroll
      for (int q = 0; q < Q; ++q) acc[q] = 0.f;
      for (uint32_t sl = 0; sl < slen; ++sl) f(sl, col, acc);
#pragma unroll
      for (int q = 0; q < Q; ++q) part[q * stride + col] = acc[q];
    }
  }
  __syncthreads();
}

// Per-group totals of column values: g(j, lane-summed total of f(column) over group j's D
// columns) is called by lane 0 of the warp that owns group j. Followed by a barrier.
template <typename F, typename G>
__device__ __forceinline__ void group_totals(uint32_t ng, uint32_t d, F f, G g) {
  const uint32_t lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (uint32_t j = warp; j < ng; j += blockDim.x / kWarp) {
    float3 acc = make_float3(0.f, 0.f, 0.f);
    for (uint32_t i = lane; i < d; i += kWarp) {
      const float3 v = f(j * d + i);
      acc.x += v.x;
      acc.y += v.y;
      acc.z += v.z;
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      acc.x += __shfl_xor_sync(0xffffffffu, acc.x, o);
      acc.y += __shfl_xor_sync(0xffffffffu, acc.y, o);
      acc.z += __shfl_xor_sync(0xffffffffu, acc.z, o);
    }
    if (lane == 0) g(j, acc);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Forward

// Statistics of each group of an on-chip tile about its pivot: garr[0..ng) = pivot (set by the
// caller), garr[ng..2ng) = mean of (x - pivot), garr[2ng..3ng) = m2. Two exact passes.
template <typename T>
__device__ __forceinline__ void tile_stats(const T* buf, const Tile& t, uint32_t d, float* part,
                                           uint32_t stride, float* garr) {
  const DivU32 dd(d);
  const float* pivot = garr;
  float* mshift = garr + t.ng;
  float* m2 = garr + 2 * t.ng;
  const float count = (float)d * (float)t.slen;
  column_sums<1>(t.w, t.slen, part, stride, [&](uint32_t sl, uint32_t col, float* acc) {
    acc[0] += to_f32(buf[(size_t)sl * t.w + col]) - pivot[dd.div(col)];
  });
  group_totals(t.ng, d, [&](uint32_t col) { return make_float3(part[col], 0.f, 0.f); },
               [&](uint32_t j, float3 v) { mshift[j] = count > 0.f ? v.x / count : 0.f; });
  column_sums<1>(t.w, t.slen, part, stride, [&](uint32_t sl, uint32_t col, float* acc) {
    const uint32_t j = dd.div(col);
    const float v = to_f32(buf[(size_t)sl * t.w + col]) - pivot[j] - mshift[j];
    acc[0] += v * v;
  });
  group_totals(t.ng, d, [&](uint32_t col) { return make_float3(part[col], 0.f, 0.f); },
               [&](uint32_t j, float3 v) { m2[j] = v.x; });
}

// Calls column(cv, r0, step) for the vector columns this thread owns: cv = thread % wv over runs
// r0 = thread / wv, stepping by rpr = blockDim / wv runs a round; when a run is wider than the
// block, columns thread, thread + blockDim, ... over every run. Consecutive threads take
// consecutive columns of a run, so global accesses stay coalesced.
template <typename Column>
__device__ __forceinline__ void for_owned_columns(uint32_t wv, Column column) {
  if (wv <= blockDim.x) {
    const uint32_t rpr = blockDim.x / wv;
    if (threadIdx.x < rpr * wv) column(threadIdx.x % wv, threadIdx.x / wv, rpr);
  } else {
    for (uint32_t cv = threadIdx.x; cv < wv; cv += blockDim.x) column(cv, 0, 1);
  }
}

// y = act((x - pivot) * a + sh) over a tile, a = rstd * w[c] and sh = b[c] - mshift * a, with
// the group coefficients in garr (pv, ms, rs: pivot, mean about the pivot, rstd per group).
//
// Each thread owns fixed columns (for_owned_columns), so its V columns' pivot, scale and shift
// are computed once, into registers, and each value then costs one FADD and one FFMA: no
// division, shared-memory or parameter load per value.
template <typename T, typename P, bool VEC, bool SILU, bool FROM_SHARED>
__device__ __forceinline__ void normalize_tile(const T* src, T* __restrict__ y, const Tile& t,
                                               uint64_t c, uint32_t d, const float* pv,
                                               const float* ms, const float* rs,
                                               const P* __restrict__ w, const P* __restrict__ b) {
  constexpr int V = VEC ? kVec<T> : 1;
  const uint32_t wv = t.w / V;
  if (wv == 0) return;
  const uint32_t ch0 = t.g0 * d;
  // Normalizes vector column cv over runs r0, r0 + step, ...
  auto column = [&](uint32_t cv, uint32_t r0, uint32_t step) {
    float piv[V], a[V], sh[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const uint32_t col = cv * V + e, j = col / d;  // once per thread: a plain division
      piv[e] = pv[j];
      a[e] = w ? rs[j] * to_f32(w[ch0 + col]) : rs[j];
      sh[e] = fmaf(-ms[j], a[e], b ? to_f32(b[ch0 + col]) : 0.f);
    }
    for (uint32_t r = r0; r < t.slen; r += step) {
      const uint64_t g_off = t.base + (uint64_t)r * c + (uint64_t)cv * V;
      const size_t s_off = ((size_t)r * wv + cv) * V;
      Vec16<T> v;
      if constexpr (VEC) {
        v = FROM_SHARED ? load16(src + s_off) : load16(src + g_off);
      } else {
        v.v[0] = FROM_SHARED ? src[s_off] : src[g_off];
      }
      Vec16<T> out;  // apart from v: elem_f32 reads v's elements by pairs
#pragma unroll
      for (int e = 0; e < V; ++e) {
        out.v[e] = from_f32<T>(activate<SILU>(fmaf(elem_f32(v, e) - piv[e], a[e], sh[e])));
      }
      if constexpr (VEC) {
        store16_global(y + g_off, out);
      } else {
        y[g_off] = out.v[0];
      }
    }
  };
  for_owned_columns(wv, column);
}

// One block per tile of whole rows, the tile on chip.
template <typename T, typename P, bool VEC, bool SILU>
__device__ void nhwc_fwd_fused(const GnFwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Tile t = tile_of(blockIdx.x, p.chunking, p.groups, p.d, p.s);
  const uint64_t c = (uint64_t)p.groups * p.d;
  const uint32_t stride = part_stride(p.chunking, p.d);
  const TileSmem m = tile_smem(smem_raw, p.chunking.cpb * p.d * p.chunking.piece_len * sizeof(T),
                               1, 1, stride);
  T* buf = reinterpret_cast<T*>(m.tiles);
  load_tile<T, VEC>(buf, static_cast<const T*>(p.x), t, c);
  __syncthreads();
  float* garr = m.garr;  // pivot, mshift, m2 -> rstd
  for (uint32_t j = threadIdx.x; j < t.ng; j += blockDim.x) {
    garr[j] = t.slen ? to_f32(buf[j * p.d]) : 0.f;
  }
  __syncthreads();
  tile_stats(buf, t, p.d, m.part, stride, garr);
  float* rs = garr + 2 * t.ng;
  for (uint32_t j = threadIdx.x; j < t.ng; j += blockDim.x) {
    const float r = rstd_of(rs[j], (float)p.d * (float)t.slen, p.eps);
    p.mean[t.row(p.groups, j)] = garr[j] + garr[t.ng + j];
    p.rstd[t.row(p.groups, j)] = r;
    rs[j] = r;
  }
  __syncthreads();
  normalize_tile<T, P, VEC, SILU, true>(buf, static_cast<T*>(p.y), t, c, p.d, garr, garr + t.ng,
                                        rs, static_cast<const P*>(p.weight),
                                        static_cast<const P*>(p.bias));
}

// Split path, pass 1: each group's (mean about the row's pivot, m2) over the tile's positions.
template <typename T, bool VEC>
__device__ void nhwc_fwd_partial(const GnFwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Tile t = tile_of(blockIdx.x, p.chunking, p.groups, p.d, p.s);
  const uint64_t c = (uint64_t)p.groups * p.d;
  const uint32_t stride = part_stride(p.chunking, p.d);
  const TileSmem m = tile_smem(smem_raw, p.chunking.cpb * p.d * p.chunking.piece_len * sizeof(T),
                               1, 1, stride);
  T* buf = reinterpret_cast<T*>(m.tiles);
  const T* x = static_cast<const T*>(p.x);
  load_tile<T, VEC>(buf, x, t, c);
  for (uint32_t j = threadIdx.x; j < t.ng; j += blockDim.x) {
    m.garr[j] = to_f32(x[t.n * p.s * c + (uint64_t)(t.g0 + j) * p.d]);  // the row's pivot
  }
  __syncthreads();
  tile_stats(buf, t, p.d, m.part, stride, m.garr);
  for (uint32_t j = threadIdx.x; j < t.ng; j += blockDim.x) {
    float* out = p.partials + 2 * (t.row(p.groups, j) * p.chunking.chunks + t.k);
    out[0] = m.garr[t.ng + j];
    out[1] = m.garr[2 * t.ng + j];
  }
}

// Split path, pass 2: one warp per row merges its pieces' partials (fixed order), saves the
// statistics and the row record (mean about the pivot, rstd) after the partials.
template <typename T>
__device__ void nhwc_fwd_merge(const GnFwdParams& p) {
  const uint64_t row = blockIdx.x;
  const GnChunking ch = p.chunking;
  const uint32_t d = p.d, s = p.s;
  const Welford w = warp_merge(p.partials + 2 * row * ch.chunks, ch.chunks, [=](uint32_t k) {
    return (float)d * (float)min(ch.piece_len, s - k * ch.piece_len);
  });
  if (threadIdx.x == 0) {
    const uint64_t c = (uint64_t)p.groups * d;
    const uint64_t n = row / p.groups, g = row % p.groups;
    const float pivot = to_f32(static_cast<const T*>(p.x)[n * s * c + g * d]);
    const float rstd = rstd_of(w.m2, w.n, p.eps);
    p.mean[row] = pivot + w.mean;
    p.rstd[row] = rstd;
    float* rec = fwd_row_records(p) + 2 * row;
    rec[0] = w.mean;
    rec[1] = rstd;
  }
}

// Split path, pass 3: normalize the tile from global memory with its rows' records.
template <typename T, typename P, bool VEC, bool SILU>
__device__ void nhwc_fwd_apply(const GnFwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Tile t = tile_of(blockIdx.x, p.chunking, p.groups, p.d, p.s);
  const uint64_t c = (uint64_t)p.groups * p.d;
  const T* x = static_cast<const T*>(p.x);
  float* garr = reinterpret_cast<float*>(smem_raw);
  const float* records = fwd_row_records(p);
  for (uint32_t j = threadIdx.x; j < t.ng; j += blockDim.x) {
    const uint64_t row = t.row(p.groups, j);
    garr[j] = to_f32(x[t.n * p.s * c + (uint64_t)(t.g0 + j) * p.d]);
    garr[t.ng + j] = records[2 * row];
    garr[2 * t.ng + j] = records[2 * row + 1];
  }
  __syncthreads();
  normalize_tile<T, P, VEC, SILU, false>(x, static_cast<T*>(p.y), t, c, p.d, garr, garr + t.ng,
                                         garr + 2 * t.ng, static_cast<const P*>(p.weight),
                                         static_cast<const P*>(p.bias));
}

#if GN_CLUSTERS
// Cluster path (sm_90+): the K pieces of a tile's rows are the K blocks of one cluster (K =
// chunks = pieces, so rank = piece). Each block keeps its piece on chip, takes each group's
// (mean about the row's pivot, m2) over it as `partial` does, and every block merges the K
// partials of each group through distributed shared memory in rank order (one warp per group,
// the fixed tree of warp_merge_parts, as `merge` does), so all hold the same statistics; then it
// normalizes its on-chip piece. x read once, one launch. garr: pivot (0), the piece's mean
// about the pivot (ng) and m2 (2 ng), which the peers read; the row's mean about the pivot
// (3 ng) and rstd (4 ng).
template <typename T, typename P, bool VEC, bool SILU>
__device__ void nhwc_fwd_cluster(const GnFwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const GnChunking ch = p.chunking;
  const Tile t = tile_of(blockIdx.x, ch, p.groups, p.d, p.s);
  const uint64_t c = (uint64_t)p.groups * p.d;
  const uint32_t stride = part_stride(ch, p.d);
  const TileSmem m = tile_smem(smem_raw, ch.cpb * p.d * ch.piece_len * sizeof(T), 1, 1, stride);
  T* buf = reinterpret_cast<T*>(m.tiles);
  const T* x = static_cast<const T*>(p.x);
  float* garr = m.garr;
  const uint32_t ng = t.ng;
  load_tile<T, VEC>(buf, x, t, c);
  for (uint32_t j = threadIdx.x; j < ng; j += blockDim.x) {
    garr[j] = to_f32(x[t.n * p.s * c + (uint64_t)(t.g0 + j) * p.d]);  // the row's pivot
  }
  __syncthreads();
  tile_stats(buf, t, p.d, m.part, stride, garr);  // ends with a barrier
  cluster_sync();  // every block's partials are written
  const uint32_t lane = threadIdx.x % kWarp;
  const float d = (float)p.d;
  for (uint32_t j = threadIdx.x / kWarp; j < ng; j += blockDim.x / kWarp) {
    const Welford w = warp_merge_parts(ch.chunks, [&](uint32_t k) {
      const float* peer = cluster_peer(garr, k);
      return Welford(d * (float)min(ch.piece_len, p.s - k * ch.piece_len), peer[ng + j],
                     peer[2 * ng + j]);
    });
    if (lane == 0) {
      const float rstd = rstd_of(w.m2, w.n, p.eps);
      garr[3 * ng + j] = w.mean;
      garr[4 * ng + j] = rstd;
      if (t.k == 0) {
        p.mean[t.row(p.groups, j)] = garr[j] + w.mean;
        p.rstd[t.row(p.groups, j)] = rstd;
      }
    }
  }
  __syncthreads();
  normalize_tile<T, P, VEC, SILU, true>(buf, static_cast<T*>(p.y), t, c, p.d, garr, garr + 3 * ng,
                                        garr + 4 * ng, static_cast<const P*>(p.weight),
                                        static_cast<const P*>(p.bias));
  cluster_sync();  // no block exits (taking its partials with it) before all have read them
}
#endif

// ---------------------------------------------------------------------------------------------
// Backward (formulas and workspace as in backward.cu)

// Per-column backward sums of a tile (on chip when FROM_SHARED, else streamed from global) into
// part[0..3) * stride: (sum dz, sum dz (x - mean) rstd, sum (x - mean)). garr holds per group:
// mean at 0, rstd at ng, delta at 2 ng.
template <typename T, typename P, bool SILU, bool FROM_SHARED>
__device__ __forceinline__ void tile_bwd_sums(const T* xsrc, const T* dysrc, const Tile& t,
                                              uint64_t c, uint32_t d, float* part, uint32_t stride,
                                              const float* garr, const P* __restrict__ w,
                                              const P* __restrict__ b) {
  const DivU32 dd(d);
  const uint32_t ch0 = t.g0 * d;
  column_sums<3>(t.w, t.slen, part, stride, [&](uint32_t sl, uint32_t col, float* acc) {
    const uint32_t j = dd.div(col);
    const size_t i = FROM_SHARED ? (size_t)sl * t.w + col : t.base + (uint64_t)sl * c + col;
    const float mean = garr[j], rstd = garr[t.ng + j];
    const float xm = to_f32(xsrc[i]) - mean;
    float dy = to_f32(dysrc[i]);
    if constexpr (SILU) {
      const float2 wb = affine_of(w, b, ch0 + col);
      dy *= activate_grad<true>(fmaf(xm, rstd, -garr[2 * t.ng + j] * rstd) * wb.x + wb.y);
    }
    acc[0] += dy;
    acc[1] += dy * (xm * rstd);
    acc[2] += xm;
  });
}

// Per-column sums of (x - mean) into part[0..stride), for the SiLU mean residual.
template <typename T, bool FROM_SHARED>
__device__ __forceinline__ void tile_centered_sums(const T* xsrc, const Tile& t, uint64_t c,
                                                   uint32_t d, float* part, uint32_t stride,
                                                   const float* mean) {
  const DivU32 dd(d);
  column_sums<1>(t.w, t.slen, part, stride, [&](uint32_t sl, uint32_t col, float* acc) {
    const size_t i = FROM_SHARED ? (size_t)sl * t.w + col : t.base + (uint64_t)sl * c + col;
    acc[0] += to_f32(xsrc[i]) - mean[dd.div(col)];
  });
}

// dx over a tile: garr holds per group mean (0), rstd (ng), m1 (3 ng), m2 (4 ng), delta (2 ng).
// dx = rstd * (w * dz - m1 - xhat * m2) = (rstd w) dz - rstd m1 - xhat (rstd m2), with
// xhat = ((x - mean) - delta) * rstd, taken as (x - mean) * rstd + (-delta rstd) in one FMA.
// As normalize_tile, each thread owns fixed columns and
// keeps their coefficients in registers, so a value costs a handful of FMA-pipe instructions and
// no division or shared-memory load.
template <typename T, typename P, bool VEC, bool SILU, bool FROM_SHARED>
__device__ __forceinline__ void dx_tile(const T* xsrc, const T* dysrc, T* __restrict__ dx,
                                        const Tile& t, uint64_t c, uint32_t d, const float* garr,
                                        const P* __restrict__ w, const P* __restrict__ b) {
  constexpr int V = VEC ? kVec<T> : 1;
  const uint32_t wv = t.w / V;
  if (wv == 0) return;
  const uint32_t ch0 = t.g0 * d, ng = t.ng;
  auto column = [&](uint32_t cv, uint32_t r0, uint32_t step) {
    // per column: mean, rstd, -delta rstd; scale of dz, constant term, scale of xhat; (w, b)
    float mean[V], shift[V], rstd[V], a_dz[V], k0[V], a_xh[V], wt[V], bs[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const uint32_t col = cv * V + e, j = col / d;  // once per thread: a plain division
      const float2 wb = affine_of(w, b, ch0 + col);
      mean[e] = garr[j];
      rstd[e] = garr[ng + j];
      shift[e] = -garr[2 * ng + j] * rstd[e];
      a_dz[e] = rstd[e] * wb.x;
      k0[e] = -rstd[e] * garr[3 * ng + j];
      a_xh[e] = rstd[e] * garr[4 * ng + j];
      wt[e] = wb.x;
      bs[e] = wb.y;
    }
    for (uint32_t r = r0; r < t.slen; r += step) {
      const uint64_t g_off = t.base + (uint64_t)r * c + (uint64_t)cv * V;
      const size_t src = FROM_SHARED ? ((size_t)r * wv + cv) * V : g_off;
      Vec16<T> xv, dv, out;
      if constexpr (VEC) {
        xv = load16(xsrc + src);
        dv = load16(dysrc + src);
      } else {
        xv.v[0] = xsrc[src];
        dv.v[0] = dysrc[src];
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xhat = fmaf(elem_f32(xv, e) - mean[e], rstd[e], shift[e]);
        float dz = elem_f32(dv, e);
        if constexpr (SILU) dz *= activate_grad<true>(fmaf(xhat, wt[e], bs[e]));
        out.v[e] = from_f32<T>(fmaf(-xhat, a_xh[e], fmaf(a_dz[e], dz, k0[e])));
      }
      if constexpr (VEC) {
        store16_global(dx + g_off, out);
      } else {
        dx[g_off] = out.v[0];
      }
    }
  };
  for_owned_columns(wv, column);
}

// Loads mean and rstd of the tile's rows into garr[0..ng), garr[ng..2ng); delta = 0.
__device__ __forceinline__ void load_row_stats(const GnBwdParams& p, const Tile& t, float* garr) {
  for (uint32_t j = threadIdx.x; j < t.ng; j += blockDim.x) {
    const uint64_t row = t.row(p.groups, j);
    garr[j] = p.mean[row];
    garr[t.ng + j] = p.rstd[row];
    garr[2 * t.ng + j] = 0.f;
  }
}

// Writes the tile's per-column sums (part) into the workspace at piece q of P.
__device__ __forceinline__ void write_sums(const GnBwdParams& p, const Tile& t, const float* part,
                                           uint32_t stride, uint32_t pieces, uint32_t q) {
  const uint32_t channels = p.groups * p.d;
  for (uint32_t col = threadIdx.x; col < t.w; col += blockDim.x) {
    float* out = p.partials + partial_index(t.n, channels, t.g0 * p.d + col, pieces, q);
    out[0] = part[col];
    out[1] = part[stride + col];
    out[2] = part[2 * stride + col];
  }
}

// Fused path: each row's record (m1, m2, delta) from the tile's column sums (whole rows), into
// garr (m1 at 3 ng, m2 at 4 ng, delta at 2 ng) and the workspace (for the parameter gradients
// over N > 1 samples).
template <typename P>
__device__ __forceinline__ void tile_records(const GnBwdParams& p, const Tile& t,
                                             const float* part, uint32_t stride, float* garr,
                                             const P* __restrict__ w) {
  const uint32_t ch0 = t.g0 * p.d;
  float* records = row_records(p);
  group_totals(
      t.ng, p.d,
      [&](uint32_t col) {
        const float wc = w ? to_f32(w[ch0 + col]) : 1.f;
        return make_float3(wc * part[col], wc * part[stride + col], part[2 * stride + col]);
      },
      [&](uint32_t j, float3 v) {
        const float inv_l = p.inv_row_len, rstd = garr[t.ng + j];
        const float delta = v.z * inv_l;
        const float m1 = v.x * inv_l, m2 = (v.y - delta * rstd * v.x) * inv_l;
        garr[2 * t.ng + j] = delta;
        garr[3 * t.ng + j] = m1;
        garr[4 * t.ng + j] = m2;
        float* r = records + 3 * t.row(p.groups, j);
        r[0] = m1;
        r[1] = m2;
        r[2] = delta;
      });
}

// A backward tile kernel's shared memory (x's and dy's tiles of the block's piece, then the
// column partials and the per-group arrays), with both tiles loaded and the rows' mean and rstd
// in garr (delta 0), after a barrier.
template <typename T>
struct BwdTiles {
  T* xs;
  T* dys;
  TileSmem m;
};

template <typename T, bool VEC>
__device__ __forceinline__ BwdTiles<T> stage_bwd_tiles(unsigned char* raw, const GnBwdParams& p,
                                                       const Tile& t, uint64_t c,
                                                       uint32_t stride) {
  const uint32_t tile_bytes = p.chunking.cpb * p.d * p.chunking.piece_len * sizeof(T);
  const TileSmem m = tile_smem(raw, tile_bytes, 2, 3, stride);
  T* xs = reinterpret_cast<T*>(m.tiles);
  T* dys = reinterpret_cast<T*>(m.tiles + ((tile_bytes + 15u) & ~15u));
  load_tile<T, VEC>(xs, static_cast<const T*>(p.x), t, c);
  load_tile<T, VEC>(dys, static_cast<const T*>(p.dy), t, c);
  load_row_stats(p, t, m.garr);
  __syncthreads();
  return BwdTiles<T>{xs, dys, m};
}

// One block per tile of whole rows: x and dy on chip, read once.
template <typename T, typename P, bool VEC, bool SILU>
__device__ void nhwc_bwd_fused(const GnBwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Tile t = tile_of(blockIdx.x, p.chunking, p.groups, p.d, p.s);
  const uint64_t c = (uint64_t)p.groups * p.d;
  const uint32_t stride = part_stride(p.chunking, p.d);
  const BwdTiles<T> on_chip = stage_bwd_tiles<T, VEC>(smem_raw, p, t, c, stride);
  const TileSmem m = on_chip.m;
  T* xs = on_chip.xs;
  T* dys = on_chip.dys;
  float* garr = m.garr;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  if constexpr (SILU) {
    tile_centered_sums<T, true>(xs, t, c, p.d, m.part, stride, garr);
    group_totals(t.ng, p.d, [&](uint32_t col) { return make_float3(m.part[col], 0.f, 0.f); },
                 [&](uint32_t j, float3 v) { garr[2 * t.ng + j] = v.x * p.inv_row_len; });
  }
  tile_bwd_sums<T, P, SILU, true>(xs, dys, t, c, p.d, m.part, stride, garr, w, b);
  write_sums(p, t, m.part, stride, 1, 0);
  tile_records<P>(p, t, m.part, stride, garr, w);
  row_kernel_param_grads<P>(p, t.g0 * p.d, t.w, [&](uint32_t col) {
    const uint32_t j = col / p.d;
    return garr[2 * t.ng + j] * garr[t.ng + j];  // delta * rstd of the column's row
  });
  ticket_param_grads<P>(p, t.g0 * p.d, t.w);
  dx_tile<T, P, VEC, SILU, true>(xs, dys, static_cast<T*>(p.dx), t, c, p.d, garr, w, b);
}

#if GN_CLUSTERS
// Cluster path (sm_90+): the K pieces of a tile's rows are the K blocks of one cluster (rank =
// piece), each with its piece of x and dy on chip, read once. As the fused kernel, but each
// group's sums over the row come from the K blocks' shares through distributed shared memory:
// lane k of a warp reads block k's share and a butterfly adds them, so every block holds the
// same bits. garr: mean (0), rstd (ng), delta (2 ng), m1 (3 ng), m2 (4 ng) as the fused
// kernel; the shares the peers read: the piece's centered sum (5 ng, SiLU), its weighted sums
// (6 ng, 7 ng, 8 ng). The per-(n, c, piece) partials go to the workspace for the parameter
// gradients (by the blocks of piece 0: with N == 1 at once, with N > 1 the last of the N clusters
// of a tile through its ticket, else bwd_params).
template <typename T, typename P, bool VEC, bool SILU>
__device__ void nhwc_bwd_cluster(const GnBwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Tile t = tile_of(blockIdx.x, p.chunking, p.groups, p.d, p.s);
  const uint64_t c = (uint64_t)p.groups * p.d;
  const uint32_t stride = part_stride(p.chunking, p.d);
  const BwdTiles<T> on_chip = stage_bwd_tiles<T, VEC>(smem_raw, p, t, c, stride);
  const TileSmem m = on_chip.m;
  T* xs = on_chip.xs;
  T* dys = on_chip.dys;
  float* garr = m.garr;
  const uint32_t ng = t.ng, chunks = p.chunking.chunks;
  const uint32_t lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const uint32_t warps = blockDim.x / kWarp;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  if constexpr (SILU) {
    // the rows' mean residuals first (to recompute z), from every block's centered sums
    tile_centered_sums<T, true>(xs, t, c, p.d, m.part, stride, garr);
    group_totals(ng, p.d, [&](uint32_t col) { return make_float3(m.part[col], 0.f, 0.f); },
                 [&](uint32_t j, float3 v) { garr[5 * ng + j] = v.x; });
    cluster_sync();  // every block's centered sums are written
    for (uint32_t j = warp; j < ng; j += warps) {
      const float v = warp_sum(lane < chunks ? cluster_peer(garr, lane)[5 * ng + j] : 0.f);
      if (lane == 0) garr[2 * ng + j] = v * p.inv_row_len;
    }
    __syncthreads();
  }
  tile_bwd_sums<T, P, SILU, true>(xs, dys, t, c, p.d, m.part, stride, garr, w, b);
  write_sums(p, t, m.part, stride, p.chunking.pieces, t.k);
  const uint32_t ch0 = t.g0 * p.d;
  group_totals(
      ng, p.d,
      [&](uint32_t col) {
        const float wc = w ? to_f32(w[ch0 + col]) : 1.f;
        return make_float3(wc * m.part[col], wc * m.part[stride + col], m.part[2 * stride + col]);
      },
      [&](uint32_t j, float3 v) {
        garr[6 * ng + j] = v.x;
        garr[7 * ng + j] = v.y;
        garr[8 * ng + j] = v.z;
      });
  cluster_sync();  // every block's shares (and its partials in the workspace) are written
  float* records = row_records(p);
  for (uint32_t j = warp; j < ng; j += warps) {
    float3 v = make_float3(0.f, 0.f, 0.f);
    if (lane < chunks) {
      const float* peer = cluster_peer(garr, lane);
      v = make_float3(peer[6 * ng + j], peer[7 * ng + j], peer[8 * ng + j]);
    }
    v = make_float3(warp_sum(v.x), warp_sum(v.y), warp_sum(v.z));
    if (lane == 0) {
      // the row record as tile_records makes it
      const float inv_l = p.inv_row_len, rstd = garr[ng + j];
      const float delta = v.z * inv_l;
      const float m1 = v.x * inv_l, m2 = (v.y - delta * rstd * v.x) * inv_l;
      garr[2 * ng + j] = delta;
      garr[3 * ng + j] = m1;
      garr[4 * ng + j] = m2;
      if (t.k == 0) {
        float* r = records + 3 * t.row(p.groups, j);
        r[0] = m1;
        r[1] = m2;
        r[2] = delta;
      }
    }
  }
  __syncthreads();
  if (t.k == 0) {
    row_kernel_param_grads<P>(p, ch0, t.w, [&](uint32_t col) {
      const uint32_t j = col / p.d;
      return garr[2 * ng + j] * garr[ng + j];  // delta * rstd of the column's row
    });
  }
  dx_tile<T, P, VEC, SILU, true>(xs, dys, static_cast<T*>(p.dx), t, c, p.d, garr, w, b);
  // with N > 1, the ticket of rank 0 follows every piece's partials: fenced by every block
  // before this barrier
  if (uses_tickets(p)) __threadfence();
  cluster_sync();  // no block exits (taking its shares with it) before all have read them
  if (t.k == 0) ticket_param_grads<P>(p, ch0, t.w);
}
#endif

// Split path with SiLU, pass 0: each group's sum of (x - mean) over the tile's positions.
template <typename T>
__device__ void nhwc_bwd_center(const GnBwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Tile t = tile_of(blockIdx.x, p.chunking, p.groups, p.d, p.s);
  const uint64_t c = (uint64_t)p.groups * p.d;
  const uint32_t stride = part_stride(p.chunking, p.d);
  const TileSmem m = tile_smem(smem_raw, 0, 0, 3, stride);
  load_row_stats(p, t, m.garr);
  __syncthreads();
  tile_centered_sums<T, false>(static_cast<const T*>(p.x), t, c, p.d, m.part, stride, m.garr);
  float* sums = centered_sums(p);
  group_totals(t.ng, p.d, [&](uint32_t col) { return make_float3(m.part[col], 0.f, 0.f); },
               [&](uint32_t j, float3 v) { sums[t.row(p.groups, j) * p.chunking.chunks + t.k] = v.x; });
}

// Split path, pass 1: per-(n, c, piece) sums of the tile, streamed from global memory.
template <typename T, typename P, bool SILU>
__device__ void nhwc_bwd_partial(const GnBwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Tile t = tile_of(blockIdx.x, p.chunking, p.groups, p.d, p.s);
  const uint64_t c = (uint64_t)p.groups * p.d;
  const uint32_t stride = part_stride(p.chunking, p.d);
  const TileSmem m = tile_smem(smem_raw, 0, 0, 3, stride);
  load_row_stats(p, t, m.garr);
  if constexpr (SILU) {
    // load_row_stats' thread j zeroes the delta slot that lane 0 of warp j fills below: without
    // this barrier the zero could land last (dweight/dbias then depended on the block's schedule)
    __syncthreads();
    // the row's mean residual from its pieces' centered sums, in order, a warp per row
    const uint32_t lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const uint32_t k = p.chunking.chunks;
    for (uint32_t j = warp; j < t.ng; j += blockDim.x / kWarp) {
      const float* sums = centered_sums(p) + t.row(p.groups, j) * k;
      float acc = 0.f;
      for (uint32_t i = lane; i < k; i += kWarp) acc += sums[i];
      acc = warp_sum(acc);
      if (lane == 0) m.garr[2 * t.ng + j] = acc * p.inv_row_len;
    }
  }
  __syncthreads();
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  tile_bwd_sums<T, P, SILU, false>(static_cast<const T*>(p.x), static_cast<const T*>(p.dy), t, c,
                                   p.d, m.part, stride, m.garr, w, b);
  write_sums(p, t, m.part, stride, p.chunking.pieces, t.k);
}

// Split path, pass 3: dx of the tile, streamed, from the row records bwd_rows wrote (and,
// first, dweight and dbias: split_param_grads).
template <typename T, typename P, bool VEC, bool SILU>
__device__ void nhwc_bwd_dx(const GnBwdParams& p) {
  split_param_grads<P>(p);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Tile t = tile_of(blockIdx.x, p.chunking, p.groups, p.d, p.s);
  const uint64_t c = (uint64_t)p.groups * p.d;
  float* garr = reinterpret_cast<float*>(smem_raw);
  const float* records = row_records(p);
  for (uint32_t j = threadIdx.x; j < t.ng; j += blockDim.x) {
    const uint64_t row = t.row(p.groups, j);
    garr[j] = p.mean[row];
    garr[t.ng + j] = p.rstd[row];
    garr[2 * t.ng + j] = records[3 * row + 2];
    garr[3 * t.ng + j] = records[3 * row];
    garr[4 * t.ng + j] = records[3 * row + 1];
  }
  __syncthreads();
  dx_tile<T, P, VEC, SILU, false>(static_cast<const T*>(p.x), static_cast<const T*>(p.dy),
                                  static_cast<T*>(p.dx), t, c, p.d, garr,
                                  static_cast<const P*>(p.weight), static_cast<const P*>(p.bias));
}

}  // namespace gn

// Entry points: groupnorm_nhwc_{fwd_fused,fwd_apply,bwd_fused,bwd_dx}_<T>_<P>_<vec|scalar>,
// groupnorm_nhwc_{fwd,bwd}_cluster_<T>_<P>_<vec|scalar> (a trap below sm_90),
// groupnorm_nhwc_fwd_partial_<T>_<vec|scalar>, groupnorm_nhwc_bwd_partial_<T>_<P>,
// groupnorm_nhwc_{fwd_merge,bwd_center}_<T>. The activation is a uniform branch per kernel
// (GN_DISPATCH_ACT, common.cuh).

#define GN_NHWC_TPV(NAME, T, P, VEC)                                                           \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 1)                            \
      groupnorm_nhwc_fwd_fused_##NAME(const GnFwdParams p) {                                   \
    GN_DISPATCH_ACT(gn::nhwc_fwd_fused, T, P, VEC)                                                 \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 1)                            \
      groupnorm_nhwc_fwd_apply_##NAME(const GnFwdParams p) {                                   \
    GN_DISPATCH_ACT(gn::nhwc_fwd_apply, T, P, VEC)                                                 \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 1)                            \
      groupnorm_nhwc_fwd_cluster_##NAME(const GnFwdParams p) {                                 \
    GN_IF_CLUSTERS(GN_DISPATCH_ACT(gn::nhwc_fwd_cluster, T, P, VEC))                               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 1)                            \
      groupnorm_nhwc_bwd_fused_##NAME(const GnBwdParams p) {                                   \
    GN_DISPATCH_ACT(gn::nhwc_bwd_fused, T, P, VEC)                                                 \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 1)                            \
      groupnorm_nhwc_bwd_dx_##NAME(const GnBwdParams p) {                                      \
    GN_DISPATCH_ACT(gn::nhwc_bwd_dx, T, P, VEC)                                                    \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 1)                            \
      groupnorm_nhwc_bwd_cluster_##NAME(const GnBwdParams p) {                                 \
    GN_IF_CLUSTERS(GN_DISPATCH_ACT(gn::nhwc_bwd_cluster, T, P, VEC))                               \
  }

// bwd_partial streams x and dy with little shared memory: two blocks per SM (at most 64
// registers a thread) double its loads in flight. Left to itself ptxas gave it 56 registers,
// then 64-72 after an unrelated change to GnBwdParams (one block per SM): the bound keeps it.
#define GN_NHWC_TP(NAME, T, P)                                                                 \
  GN_NHWC_TPV(NAME##_vec, T, P, true)                                                          \
  GN_NHWC_TPV(NAME##_scalar, T, P, false)                                                      \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 2)                            \
      groupnorm_nhwc_bwd_partial_##NAME(const GnBwdParams p) {                                 \
    GN_DISPATCH_ACT(gn::nhwc_bwd_partial, T, P)                                                    \
  }

#define GN_NHWC_T(NAME, T)                                                                     \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 1)                            \
      groupnorm_nhwc_fwd_partial_##NAME##_vec(const GnFwdParams p) {                           \
    gn::nhwc_fwd_partial<T, true>(p);                                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 1)                            \
      groupnorm_nhwc_fwd_partial_##NAME##_scalar(const GnFwdParams p) {                        \
    gn::nhwc_fwd_partial<T, false>(p);                                                         \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kWarp)                                      \
      groupnorm_nhwc_fwd_merge_##NAME(const GnFwdParams p) {                                   \
    gn::nhwc_fwd_merge<T>(p);                                                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kNhwcThreads, 1)                            \
      groupnorm_nhwc_bwd_center_##NAME(const GnBwdParams p) {                                  \
    gn::nhwc_bwd_center<T>(p);                                                                 \
  }

GN_NHWC_TP(f32_f32, float, float)
GN_NHWC_TP(f16_f16, __half, __half)
GN_NHWC_TP(f16_f32, __half, float)
GN_NHWC_TP(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
GN_NHWC_TP(bf16_f32, __nv_bfloat16, float)
GN_NHWC_T(f32, float)
GN_NHWC_T(f16, __half)
GN_NHWC_T(bf16, __nv_bfloat16)
