// GroupNorm backward, NCHW. With xhat = (x - mean) * rstd, w = weight[c] (1 when absent) and
// sums over one group row of L = D * S values:
//
//   dx = rstd * (w * dy - sum(w * dy) / L - xhat * sum(w * dy * xhat) / L)
//   dweight[c] = sum over n, s of dy * xhat        dbias[c] = sum over n, s of dy
//
// Everything derives from per-(n, c) sums of dy and dy * xhat: the row sums are
// sum_c w[c] * (those), and the parameter gradients are their sums over n. So:
// - fused (chunks == 1): one block holds the row's x and dy in shared memory, writes the
//   per-(n, c) sums, forms the row sums and writes dx from the same copy: x and dy read once.
// - split (chunks > 1): `partial` writes per-(n, c, piece) sums for its chunk; `dx` re-reads them
//   for its row and writes dx for its chunk.
// - `params` reduces the per-(n, c, piece) sums over n and pieces in a fixed order into dweight
//   and dbias. No atomics: the same inputs give the same bits.
#include "common.cuh"

namespace gn {

constexpr int kBwdThreads = 512;
constexpr int kParamThreads = 256;
// Segments at least this long are reduced by the whole block; shorter ones one warp each.
constexpr uint32_t kBlockSegment = 2048;

// Calls out(j, {sum dy, sum dy * xhat}) once for each segment j of the chunk, from a single thread
// (thread 0 for block-reduced segments, lane 0 of the owning warp otherwise). xs/dys point at the
// chunk's first value, in shared or global memory.
// Assumes: with VEC, xs/dys are 16-byte aligned and seglen is a multiple of kVec<T>.
template <typename T, bool VEC, typename Out>
__device__ __forceinline__ void segment_sums(const T* xs, const T* dys, const Chunk& c, float mean,
                                             float rstd, float2* scratch, Out out) {
  constexpr int V = VEC ? kVec<T> : 1;
  auto add = [&](float2& acc, const T* xp, const T* dyp) {
    if constexpr (VEC) {
      const Vec16<T> xv = load16(xp), dv = load16(dyp);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float dy = to_f32(dv.v[e]);
        acc.x += dy;
        acc.y += dy * ((to_f32(xv.v[e]) - mean) * rstd);
      }
    } else {
      const float dy = to_f32(*dyp);
      acc.x += dy;
      acc.y += dy * ((to_f32(*xp) - mean) * rstd);
    }
  };
  const uint32_t nv = c.seglen / V;
  if (c.seglen >= kBlockSegment) {
    for (uint32_t j = 0; j < c.nseg; ++j) {
      const size_t base = (size_t)j * c.seglen;
      float2 acc = make_float2(0.f, 0.f);
      for (uint32_t i = threadIdx.x; i < nv; i += blockDim.x) {
        add(acc, xs + base + (size_t)i * V, dys + base + (size_t)i * V);
      }
      acc = block_sum(acc, scratch);
      if (threadIdx.x == 0) out(j, acc);
    }
  } else {
    const uint32_t lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    for (uint32_t j = warp; j < c.nseg; j += blockDim.x / kWarp) {
      const size_t base = (size_t)j * c.seglen;
      float2 acc = make_float2(0.f, 0.f);
      for (uint32_t i = lane; i < nv; i += kWarp) {
        add(acc, xs + base + (size_t)i * V, dys + base + (size_t)i * V);
      }
      acc = warp_sum(acc);
      if (lane == 0) out(j, acc);
    }
  }
}

// Index of the (sum dy, sum dy * xhat) pair for channel c (global), piece p of sample n.
__device__ __forceinline__ size_t partial_index(uint64_t n, uint32_t channels, uint32_t c,
                                                uint32_t pieces, uint32_t p) {
  return 2 * (((size_t)n * channels + c) * pieces + p);
}

// (sum w * dy, sum w * dy * xhat) / L of one row, from its D * P per-(channel, piece) sums, each
// thread taking a fixed share: the same bits on every run, for the fused and the split path alike.
template <typename P>
__device__ __forceinline__ float2 row_means(const GnBwdParams& p, uint64_t sample, uint32_t chan0,
                                            const P* __restrict__ w, float2* scratch) {
  const uint32_t pieces = p.chunking.pieces;
  const float* parts = p.partials + partial_index(sample, p.groups * p.d, chan0, pieces, 0);
  const DivU32 per_channel(pieces);
  float2 total = make_float2(0.f, 0.f);
  for (uint32_t e = threadIdx.x; e < p.d * pieces; e += blockDim.x) {
    const float wc = w ? to_f32(w[chan0 + per_channel.div(e)]) : 1.f;
    total.x += wc * parts[2 * e];
    total.y += wc * parts[2 * e + 1];
  }
  total = block_sum(total, scratch);
  return make_float2(total.x * p.inv_row_len, total.y * p.inv_row_len);
}

// dx over one chunk: dx = rstd * (w * dy - m1 - xhat * m2).
template <typename T, typename P, bool VEC>
__device__ __forceinline__ void dx_chunk(const T* xs, const T* dys, T* __restrict__ dx,
                                         const Chunk& c, uint32_t chan0, float mean, float rstd,
                                         float m1, float m2, const P* __restrict__ w) {
  const DivU32 seg(c.seglen);
  const uint32_t n = c.len();
  auto weight = [&](uint32_t j) { return w ? to_f32(w[chan0 + c.c0 + seg.div(j)]) : 1.f; };
  if constexpr (VEC) {
    constexpr int V = kVec<T>;
    for (uint32_t i = threadIdx.x; i < n / V; i += blockDim.x) {
      const float wc = weight(i * V);
      const Vec16<T> xv = load16(xs + (size_t)i * V), dv = load16(dys + (size_t)i * V);
      Vec16<T> out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xhat = (to_f32(xv.v[e]) - mean) * rstd;
        out.v[e] = from_f32<T>(rstd * (wc * to_f32(dv.v[e]) - m1 - xhat * m2));
      }
      store16(dx + (size_t)i * V, out);
    }
  } else {
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float xhat = (to_f32(xs[i]) - mean) * rstd;
      dx[i] = from_f32<T>(rstd * (weight(i) * to_f32(dys[i]) - m1 - xhat * m2));
    }
  }
}

// One block per row, x and dy of the row in dynamic shared memory (2 * d * s * sizeof(T) bytes).
template <typename T, typename P, bool VEC>
__device__ void bwd_fused(const GnBwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float2 scratch[kWarp];
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const uint32_t n = c.len();
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* dys = xs + n;  // n * sizeof(T) is a multiple of 16 with VEC
  const uint64_t off = chunk_offset(c, p.d, p.s);
  copy_to_shared<T, VEC>(xs, static_cast<const T*>(p.x) + off, n);
  copy_to_shared<T, VEC>(dys, static_cast<const T*>(p.dy) + off, n);
  __syncthreads();
  const float mean = p.mean[c.row], rstd = p.rstd[c.row];
  const uint64_t sample = c.row / p.groups;
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * p.d;
  const uint32_t channels = p.groups * p.d;
  const P* w = static_cast<const P*>(p.weight);
  float* const parts = p.partials + partial_index(sample, channels, chan0 + c.c0, 1, 0);
  segment_sums<T, VEC>(xs, dys, c, mean, rstd, scratch, [=](uint32_t j, float2 s) {
    parts[2 * j] = s.x;
    parts[2 * j + 1] = s.y;
  });
  __syncthreads();  // the row's sums, written above by this block, are visible to all its threads
  const float2 m = row_means<P>(p, sample, chan0, w, scratch);
  dx_chunk<T, P, VEC>(xs, dys, static_cast<T*>(p.dx) + off, c, chan0, mean, rstd, m.x, m.y, w);
}

// Split path, pass 1: per-(n, c, piece) sums for this block's chunk, streamed from global memory.
template <typename T, bool VEC>
__device__ void bwd_partial(const GnBwdParams& p) {
  __shared__ float2 scratch[kWarp];
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const uint64_t off = chunk_offset(c, p.d, p.s);
  const float mean = p.mean[c.row], rstd = p.rstd[c.row];
  const uint64_t sample = c.row / p.groups;
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * p.d;
  const uint32_t channels = p.groups * p.d;
  const uint32_t pieces = p.chunking.pieces;
  const uint32_t piece = pieces > 1 ? c.k % pieces : 0;
  float* const parts = p.partials + partial_index(sample, channels, chan0 + c.c0, pieces, piece);
  segment_sums<T, VEC>(static_cast<const T*>(p.x) + off, static_cast<const T*>(p.dy) + off, c,
                       mean, rstd, scratch, [=](uint32_t j, float2 s) {
                         // consecutive segments are consecutive channels (pieces > 1: one segment)
                         parts[2 * (size_t)j * pieces] = s.x;
                         parts[2 * (size_t)j * pieces + 1] = s.y;
                       });
}

// Split path, pass 2: the row's sums from its D * P partials (fixed assignment to threads), then
// dx for this block's chunk.
template <typename T, typename P, bool VEC>
__device__ void bwd_dx(const GnBwdParams& p) {
  __shared__ float2 scratch[kWarp];
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const float mean = p.mean[c.row], rstd = p.rstd[c.row];
  const uint64_t sample = c.row / p.groups;
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * p.d;
  const P* w = static_cast<const P*>(p.weight);
  const float2 m = row_means<P>(p, sample, chan0, w, scratch);
  const uint64_t off = chunk_offset(c, p.d, p.s);
  dx_chunk<T, P, VEC>(static_cast<const T*>(p.x) + off, static_cast<const T*>(p.dy) + off,
                      static_cast<T*>(p.dx) + off, c, chan0, mean, rstd, m.x, m.y, w);
}

// dweight[c] = sum over n, pieces of sum(dy * xhat); dbias[c] likewise of sum(dy). One thread per
// channel, n in order.
template <typename P>
__device__ void bwd_params(const GnBwdParams& p) {
  const uint32_t channels = p.groups * p.d;
  const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const uint32_t pieces = p.chunking.pieces;
  float sdy = 0.f, sdyx = 0.f;
  for (uint32_t n = 0; n < p.batch; ++n) {
    for (uint32_t q = 0; q < pieces; ++q) {
      const float* part = p.partials + partial_index(n, channels, c, pieces, q);
      sdy += part[0];
      sdyx += part[1];
    }
  }
  if (p.dweight) static_cast<P*>(p.dweight)[c] = from_f32<P>(sdyx);
  if (p.dbias) static_cast<P*>(p.dbias)[c] = from_f32<P>(sdy);
}

}  // namespace gn

// Entry points: groupnorm_bwd_{fused,dx}_<T>_<P>_<vec|scalar>, groupnorm_bwd_partial_<T>_<..>,
// groupnorm_bwd_params_<P>.
#define GN_BWD_TP(NAME, T, P, VEC)                                                             \
  extern "C" __global__ void __launch_bounds__(gn::kBwdThreads, 1)                                \
      groupnorm_bwd_fused_##NAME(const GnBwdParams p) {                                        \
    gn::bwd_fused<T, P, VEC>(p);                                                               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kBwdThreads, 1)                                \
      groupnorm_bwd_dx_##NAME(const GnBwdParams p) {                                           \
    gn::bwd_dx<T, P, VEC>(p);                                                                  \
  }

#define GN_BWD_T(NAME, T, VEC)                                                                 \
  extern "C" __global__ void __launch_bounds__(gn::kBwdThreads, 1)                                \
      groupnorm_bwd_partial_##NAME(const GnBwdParams p) {                                      \
    gn::bwd_partial<T, VEC>(p);                                                                \
  }

#define GN_BWD_ALL(VNAME, VEC)                                                                 \
  GN_BWD_TP(f32_f32_##VNAME, float, float, VEC)                                                \
  GN_BWD_TP(f16_f16_##VNAME, __half, __half, VEC)                                              \
  GN_BWD_TP(f16_f32_##VNAME, __half, float, VEC)                                               \
  GN_BWD_TP(bf16_bf16_##VNAME, __nv_bfloat16, __nv_bfloat16, VEC)                              \
  GN_BWD_TP(bf16_f32_##VNAME, __nv_bfloat16, float, VEC)                                       \
  GN_BWD_T(f32_##VNAME, float, VEC)                                                            \
  GN_BWD_T(f16_##VNAME, __half, VEC)                                                           \
  GN_BWD_T(bf16_##VNAME, __nv_bfloat16, VEC)

GN_BWD_ALL(vec, true)
GN_BWD_ALL(scalar, false)

#define GN_BWD_P(NAME, P)                                                                      \
  extern "C" __global__ void __launch_bounds__(gn::kParamThreads)                              \
      groupnorm_bwd_params_##NAME(const GnBwdParams p) {                                       \
    gn::bwd_params<P>(p);                                                                      \
  }
GN_BWD_P(f32, float)
GN_BWD_P(f16, __half)
GN_BWD_P(bf16, __nv_bfloat16)
