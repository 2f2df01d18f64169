// GroupNorm forward, NCHW: y = act((x - mean) * rstd * weight[c] + bias[c]), saved mean/rstd in
// f32; act is the identity or SiLU (GnFwdParams::activation, one branch per block).
//
// Two paths, chosen per shape on the host (src/gpu/plan.rs):
// - fused (one block per row, chunks == 1): the row is copied into shared memory once; its
//   statistics (about a per-row pivot) come from the registers on the way in (each thread's
//   Welford state over its 16-byte vectors, merged over the block in a fixed order), and it is
//   normalized from the on-chip copy: one read of x, one write of y.
// - split (chunks > 1, for few or long rows): `partial` computes each chunk's (mean, m2) about the
//   row's pivot from an on-chip copy; `merge` (one warp per row) merges a row's partials once, in
//   a fixed order (Chan), and saves the statistics; `apply` normalizes each chunk, re-reading x
//   (usually from L2).
//
// - cluster (sm_90+, chunks > 1): the K chunks of a row are the K blocks of one thread-block
//   cluster. Each block keeps its chunk on chip and computes its (mean, m2) as `partial` does;
//   the blocks exchange them through distributed shared memory, every block merges the K partials
//   in the same fixed order (so all get the same bits) and normalizes its chunk from its on-chip
//   copy: one read of x, one write of y, one launch, no workspace.
//
// Split-path workspace (f32): 2 * rows * K chunk partials, then 2 * rows row records
// (mean about the pivot, rstd).
//
// The pivot is the row's first value: subtracting it before accumulating and before normalizing
// makes the error scale with the spread of the row, not with its offset (x = 1e4 + noise).
#include "cluster.cuh"
#include "common.cuh"

namespace gn {

constexpr int kFwdThreads = 512;

// y = act(((x - pivot) - mshift) * (rstd * w[c]) + b[c]) over one chunk; src may be shared or
// global. Every thread of the block calls it.
// Assumes: with VEC, src/dst are 16-byte aligned and seglen is a multiple of kVec<T>, so a vector
// never crosses a channel.
template <typename T, typename P, bool VEC, bool SILU>
__device__ __forceinline__ void normalize_chunk(const T* src, T* __restrict__ dst, const Chunk& c,
                                                uint32_t chan0, float pivot, float mshift,
                                                float rstd, const P* __restrict__ w,
                                                const P* __restrict__ b) {
  // y = act((x - pivot) * a + sh) with a = rstd * w[c] and sh = b[c] - mshift * a: the mean's
  // shift is folded into the per-channel constant, so each value costs one FADD and one FFMA.
  // x - pivot stays first, so a large common offset cancels exactly before any rounding.
  auto affine = [&](uint32_t k) {  // (a, sh) of channel k of the chunk
    const uint32_t ch = chan0 + c.c0 + k;
    const float a = w ? rstd * to_f32(w[ch]) : rstd;
    return make_float2(a, fmaf(-mshift, a, b ? to_f32(b[ch]) : 0.f));
  };
  if constexpr (VEC) {
    constexpr int V = kVec<T>;
    // (a, sh) once per channel and lane, handed to the vectors by shuffles: the loop's only
    // global accesses are its 16-byte load (from global on the split path) and store
    for_vectors_by_channel<true>(c.nseg, c.seglen / V, affine, [&](uint32_t i, float2 k) {
      const Vec16<T> v = load16(src + (size_t)i * V);
      Vec16<T> out;  // apart from v: elem_f32 reads v's elements by pairs
#pragma unroll
      for (int e = 0; e < V; ++e) {
        out.v[e] = from_f32<T>(activate<SILU>(fmaf(elem_f32(v, e) - pivot, k.x, k.y)));
      }
      store16_global(dst + (size_t)i * V, out);
    });
  } else {
    const DivU32 seg(c.seglen);
    const uint32_t n = c.len();
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float2 k = affine(seg.div(i));
      dst[i] = from_f32<T>(activate<SILU>(fmaf(to_f32(src[i]) - pivot, k.x, k.y)));
    }
  }
}

// One block per row; the whole row lives in dynamic shared memory (d * s * sizeof(T) bytes).
template <typename T, typename P, bool VEC>
__device__ void fwd_fused(const GnFwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch[3 * kWarp];
  T* buf = reinterpret_cast<T*>(smem_raw);
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const uint64_t off = chunk_offset(c, p.d, p.s);
  const uint32_t n = c.len();
  const T* xr = static_cast<const T*>(p.x) + off;  // the row (chunks == 1)
  const float pivot = n ? to_f32(xr[0]) : 0.f;
  const Welford st = copy_to_shared_stats<T, VEC>(buf, xr, n, pivot, scratch);
  const float rstd = rstd_of(st.m2, (float)n, p.eps);
  if (threadIdx.x == 0) {
    p.mean[c.row] = pivot + st.mean;
    p.rstd[c.row] = rstd;
  }
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * p.d;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  T* y = static_cast<T*>(p.y) + off;
  if (p.activation == GN_ACT_SILU) {
    normalize_chunk<T, P, VEC, true>(buf, y, c, chan0, pivot, st.mean, rstd, w, b);
  } else {
    normalize_chunk<T, P, VEC, false>(buf, y, c, chan0, pivot, st.mean, rstd, w, b);
  }
}

// Split path, pass 1: (mean about the row's pivot, m2) of each chunk into p.partials.
template <typename T, bool VEC>
__device__ void fwd_partial(const GnFwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch[3 * kWarp];
  T* buf = reinterpret_cast<T*>(smem_raw);
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const T* x = static_cast<const T*>(p.x);
  const uint64_t row_off = c.row * (uint64_t)p.d * p.s;
  const uint32_t n = c.len();
  const float pivot = to_f32(x[row_off]);
  const Welford st = copy_to_shared_stats<T, VEC>(buf, x + chunk_offset(c, p.d, p.s), n, pivot, scratch);
  if (threadIdx.x == 0) {
    float* out = p.partials + 2 * (c.row * p.chunking.chunks + c.k);
    out[0] = st.mean;
    out[1] = st.m2;
  }
}

// Split path, pass 2: one warp per row merges the row's partials (fixed order), saves the
// statistics and the row record for `apply`.
template <typename T>
__device__ void fwd_merge(const GnFwdParams& p) {
  const uint64_t row = blockIdx.x;
  const GnChunking ch = p.chunking;
  const uint32_t d = p.d, s = p.s;
  const Welford w = warp_merge(p.partials + 2 * row * ch.chunks, ch.chunks,
                               [=](uint32_t k) { return (float)chunk_len(k, ch, d, s); });
  if (threadIdx.x == 0) {
    const float pivot = to_f32(static_cast<const T*>(p.x)[row * (uint64_t)d * s]);
    const float rstd = rstd_of(w.m2, w.n, p.eps);
    p.mean[row] = pivot + w.mean;
    p.rstd[row] = rstd;
    float* rec = fwd_row_records(p) + 2 * row;
    rec[0] = w.mean;
    rec[1] = rstd;
  }
}

// Split path, pass 3: normalize this block's chunk from global memory with its row's record.
template <typename T, typename P, bool VEC>
__device__ void fwd_apply(const GnFwdParams& p) {
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const T* x = static_cast<const T*>(p.x);
  const float pivot = to_f32(x[c.row * (uint64_t)p.d * p.s]);
  const float* rec = fwd_row_records(p) + 2 * c.row;
  const uint64_t off = chunk_offset(c, p.d, p.s);
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * p.d;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  T* y = static_cast<T*>(p.y) + off;
  if (p.activation == GN_ACT_SILU) {
    normalize_chunk<T, P, VEC, true>(x + off, y, c, chan0, pivot, rec[0], rec[1], w, b);
  } else {
    normalize_chunk<T, P, VEC, false>(x + off, y, c, chan0, pivot, rec[0], rec[1], w, b);
  }
}

#if GN_CLUSTERS
// Cluster path: one cluster of `chunks` blocks per row; this block is rank c.k of its cluster.
// Dynamic shared memory: the block's exchange slot (mean, m2), then its chunk.
template <typename T, typename P, bool VEC>
__device__ void fwd_cluster(const GnFwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch[3 * kWarp];
  float* slot = reinterpret_cast<float*>(smem_raw);
  T* buf = reinterpret_cast<T*>(smem_raw + kClusterSlotBytes);
  const GnChunking ch = p.chunking;
  const uint32_t d = p.d, s = p.s;
  const Chunk c = chunk_of(blockIdx.x, ch, d, s);
  const T* x = static_cast<const T*>(p.x);
  const uint64_t off = chunk_offset(c, d, s);
  const uint32_t n = c.len();
  const float pivot = to_f32(x[c.row * (uint64_t)d * s]);
  const Welford st = copy_to_shared_stats<T, VEC>(buf, x + off, n, pivot, scratch);
  if (threadIdx.x == 0) {
    slot[0] = st.mean;
    slot[1] = st.m2;
  }
  cluster_sync();  // every block's slot is written
  // every warp merges the K partials (lane k reads block k's slot), in the same fixed order
  const Welford w = warp_merge_parts(ch.chunks, [&](uint32_t k) {
    const float* peer = cluster_peer(slot, k);
    return Welford((float)chunk_len(k, ch, d, s), peer[0], peer[1]);
  });
  const float rstd = rstd_of(w.m2, w.n, p.eps);
  if (c.k == 0 && threadIdx.x == 0) {
    p.mean[c.row] = pivot + w.mean;
    p.rstd[c.row] = rstd;
  }
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * d;
  const P* wt = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  T* y = static_cast<T*>(p.y) + off;
  if (p.activation == GN_ACT_SILU) {
    normalize_chunk<T, P, VEC, true>(buf, y, c, chan0, pivot, w.mean, rstd, wt, b);
  } else {
    normalize_chunk<T, P, VEC, false>(buf, y, c, chan0, pivot, w.mean, rstd, wt, b);
  }
  cluster_sync();  // no block exits (taking its slot with it) before all have read the slots
}
#endif

}  // namespace gn

// Entry points: groupnorm_fwd_{fused,apply}_<T>_<P>_<vec|scalar>, groupnorm_fwd_partial_<T>_<..>,
// groupnorm_fwd_merge_<T>, groupnorm_cluster_fwd_<T>_<P>_<vec|scalar> (a trap below sm_90).
#define GN_FWD_TP(NAME, T, P, VEC)                                                             \
  extern "C" __global__ void __launch_bounds__(gn::kFwdThreads, 1)                                \
      groupnorm_fwd_fused_##NAME(const GnFwdParams p) {                                        \
    gn::fwd_fused<T, P, VEC>(p);                                                               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kFwdThreads, 1)                                \
      groupnorm_fwd_apply_##NAME(const GnFwdParams p) {                                        \
    gn::fwd_apply<T, P, VEC>(p);                                                               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kFwdThreads, 1)                             \
      groupnorm_cluster_fwd_##NAME(const GnFwdParams p) {                                      \
    GN_IF_CLUSTERS(gn::fwd_cluster<T, P, VEC>(p);)                                             \
  }

#define GN_FWD_T(NAME, T, VEC)                                                                 \
  extern "C" __global__ void __launch_bounds__(gn::kFwdThreads, 1)                                \
      groupnorm_fwd_partial_##NAME(const GnFwdParams p) {                                      \
    gn::fwd_partial<T, VEC>(p);                                                                \
  }

#define GN_FWD_ALL(VNAME, VEC)                                                                 \
  GN_FWD_TP(f32_f32_##VNAME, float, float, VEC)                                                \
  GN_FWD_TP(f16_f16_##VNAME, __half, __half, VEC)                                              \
  GN_FWD_TP(f16_f32_##VNAME, __half, float, VEC)                                               \
  GN_FWD_TP(bf16_bf16_##VNAME, __nv_bfloat16, __nv_bfloat16, VEC)                              \
  GN_FWD_TP(bf16_f32_##VNAME, __nv_bfloat16, float, VEC)                                       \
  GN_FWD_T(f32_##VNAME, float, VEC)                                                            \
  GN_FWD_T(f16_##VNAME, __half, VEC)                                                           \
  GN_FWD_T(bf16_##VNAME, __nv_bfloat16, VEC)

GN_FWD_ALL(vec, true)
GN_FWD_ALL(scalar, false)

// One warp per row; the row's first value (the pivot) is read with the row's element type.
#define GN_FWD_MERGE(NAME, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(gn::kWarp)                                      \
      groupnorm_fwd_merge_##NAME(const GnFwdParams p) {                                        \
    gn::fwd_merge<T>(p);                                                                       \
  }
GN_FWD_MERGE(f32, float)
GN_FWD_MERGE(f16, __half)
GN_FWD_MERGE(bf16, __nv_bfloat16)
