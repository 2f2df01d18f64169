// GroupNorm backward, NCHW. With xhat = (x - mean) * rstd, w = weight[c] (1 when absent) and
// sums over one group row of L = D * S values:
//
//   dx = rstd * (w * dy - sum(w * dy) / L - xhat * sum(w * dy * xhat) / L)
//   dweight[c] = sum over n, s of dy * xhat        dbias[c] = sum over n, s of dy
//
// The saved mean is f32: on a row offset by 1e4 it is off by up to half an ulp (5e-4), which
// would shift every xhat of the row. So the sums also carry sum(x - mean), whose row mean `delta`
// is that rounding error, and xhat is taken as (x - mean - delta) * rstd. With
//   sdy = sum dy, sdyx = sum dy * (x - mean) * rstd, sxm = sum (x - mean)   (per (n, c, piece))
// a row's terms are delta = sum(sxm) / L, m1 = sum_c w sdy / L,
// m2 = sum_c w (sdyx - delta * rstd * sdy) / L; dweight[c] = sum_n (sdyx - delta_n rstd_n sdy).
//
// - fused (chunks == 1): one block holds the row's x and dy in shared memory, writes its
//   per-channel sums and its row record (m1, m2, delta), and writes dx from the same copy: x and
//   dy read once.
// - split (chunks > 1): `partial` writes per-(n, c, piece) sums for its chunk; `rows` (one block
//   per row) turns them into the row record once; `dx` reads the record and writes its chunk.
// - cluster (sm_90+, chunks > 1): the K chunks of a row are the K blocks of one thread-block
//   cluster, each with its chunk of x and dy on chip. Each writes its per-(n, c, piece) sums as
//   `partial` does and puts its chunk's share of the row's weighted sums in shared memory; every
//   block adds the K shares in rank order (distributed shared memory), so all hold the same
//   record, and writes dx from its on-chip copy: x and dy read once, one launch.
// - `params` reduces the sums over n and pieces, in a fixed order, into dweight and dbias. With
//   N == 1 the fused and cluster kernels do it themselves (row_kernel_param_grads); with N > 1
//   they do when the host gives them tickets (ticket_param_grads: the last block of a channel's
//   N reduces it); on the split path `dx` does it for any N (split_param_grads). Only the fused
//   and cluster paths with N > 1 and no tickets launch `params`.
// No float atomics (the tickets are an integer count): the same inputs give the same bits.
//
// SiLU (GnBwdParams::activation): dy is the gradient of y = silu(z), z = xhat * w + b. The
// kernels recompute z from x, the saved statistics, the weight and the bias, and take the sums
// and dx of dz = dy * silu'(z) instead of dy. z needs xhat to the precision of the row's spread,
// so the mean residual delta comes first: the fused kernel takes one more pass over its on-chip
// row; the split path runs `center` (per-chunk sums of x - mean) before `partial`.
//
// Workspace (f32): 3 * N * C * P partial sums, then 3 * N * G row records, then (split path
// with SiLU) N * G * K centered sums.
#include "cluster.cuh"
#include "common.cuh"

namespace gn {

constexpr int kBwdThreads = 512;
constexpr int kRowThreads = 256;
constexpr int kParamThreads = 256;
// Segments at least this long are reduced by the whole block; shorter ones one warp each.
constexpr uint32_t kBlockSegment = 2048;

struct Sums3 {
  float dy, dyx, xm;  // sum dy, sum dy * (x - mean) * rstd, sum (x - mean)
};

__device__ __forceinline__ Sums3 operator+(Sums3 a, Sums3 b) {
  return Sums3{a.dy + b.dy, a.dyx + b.dyx, a.xm + b.xm};
}

__device__ __forceinline__ Sums3 warp_sum(Sums3 v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    v.dy += __shfl_xor_sync(0xffffffffu, v.dy, o);
    v.dyx += __shfl_xor_sync(0xffffffffu, v.dyx, o);
    v.xm += __shfl_xor_sync(0xffffffffu, v.xm, o);
  }
  return v;
}

// Calls out(j, sums) once for each segment j of the chunk, from a single thread (thread 0 for
// block-reduced segments, lane 0 of the owning warp otherwise). xs/dys point at the chunk's first
// value, in shared or global memory. With SILU, dy is the gradient of silu(z) and the sums are
// of dz = dy * silu'(z), z = ((x - mean) - delta) * rstd * w + b, with coef(j) = (w, b) of
// segment j's channel and `delta` the row's mean residual.
// Assumes: with VEC, xs/dys are 16-byte aligned and seglen is a multiple of kVec<T>.
template <typename T, bool VEC, bool SILU, typename Coef, typename Out>
__device__ __forceinline__ void segment_sums(const T* xs, const T* dys, const Chunk& c, float mean,
                                             float rstd, float delta, Coef coef, Sums3* scratch,
                                             Out out) {
  constexpr int V = VEC ? kVec<T> : 1;
  const float shift = -delta * rstd;  // xhat = (x - mean) * rstd + shift, as dx_chunk takes it
  auto one = [=](Sums3& acc, float xv, float dy, float2 wb) {
    const float xm = xv - mean;
    if constexpr (SILU) dy *= activate_grad<true>(fmaf(xm, rstd, shift) * wb.x + wb.y);
    acc.dy += dy;
    acc.dyx += dy * (xm * rstd);
    acc.xm += xm;
  };
  auto add = [=](Sums3& acc, const T* xp, const T* dyp, float2 wb) {
    if constexpr (VEC) {
      const Vec16<T> xv = load16(xp), dv = load16(dyp);
#pragma unroll
      for (int e = 0; e < V; ++e) one(acc, elem_f32(xv, e), elem_f32(dv, e), wb);
    } else {
      one(acc, to_f32(*xp), to_f32(*dyp), wb);
    }
  };
  const uint32_t nv = c.seglen / V;
  if (c.seglen >= kBlockSegment) {
    for (uint32_t j = 0; j < c.nseg; ++j) {
      const size_t base = (size_t)j * c.seglen;
      const float2 wb = SILU ? coef(j) : make_float2(1.f, 0.f);
      Sums3 acc{0.f, 0.f, 0.f};
      for (uint32_t i = threadIdx.x; i < nv; i += blockDim.x) {
        add(acc, xs + base + (size_t)i * V, dys + base + (size_t)i * V, wb);
      }
      acc = block_sum(acc, scratch);
      if (threadIdx.x == 0) out(j, acc);
    }
  } else {
    const uint32_t lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    for (uint32_t j = warp; j < c.nseg; j += blockDim.x / kWarp) {
      const size_t base = (size_t)j * c.seglen;
      const float2 wb = SILU ? coef(j) : make_float2(1.f, 0.f);
      Sums3 acc{0.f, 0.f, 0.f};
      for (uint32_t i = lane; i < nv; i += kWarp) {
        add(acc, xs + base + (size_t)i * V, dys + base + (size_t)i * V, wb);
      }
      acc = warp_sum(acc);
      if (lane == 0) out(j, acc);
    }
  }
}

// Sum of (x - mean) over a chunk (the SiLU backward's mean residual), to every thread.
template <typename T, bool VEC>
__device__ __forceinline__ float chunk_centered_sum(const T* xs, uint32_t n, float mean,
                                                    float* scratch) {
  float acc = 0.f;
  if constexpr (VEC) {
    constexpr int V = kVec<T>;
    for (uint32_t i = threadIdx.x; i < n / V; i += blockDim.x) {
      const Vec16<T> v = load16(xs + (size_t)i * V);
#pragma unroll
      for (int e = 0; e < V; ++e) acc += elem_f32(v, e) - mean;
    }
  } else {
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) acc += to_f32(xs[i]) - mean;
  }
  return block_sum(acc, scratch);
}

// Sums (sum w sdy, sum w sdyx, sum sxm) over partial entries [e0, e0 + count) of the group row
// of `sample` whose first channel is chan0 (entry e: channel chan0 + e / P, piece e % P), each
// thread taking a fixed share: the same bits on every run. Returned to every thread.
template <typename P>
__device__ __forceinline__ Sums3 weighted_sums(const GnBwdParams& p, uint64_t sample,
                                               uint32_t chan0, uint64_t e0, uint64_t count,
                                               const P* __restrict__ w, Sums3* scratch) {
  const uint32_t pieces = p.chunking.pieces;
  const float* parts = p.partials + partial_index(sample, p.groups * p.d, chan0, pieces, 0);
  const DivU32 per_channel(pieces);
  Sums3 t{0.f, 0.f, 0.f};
  for (uint64_t e = e0 + threadIdx.x; e < e0 + count; e += blockDim.x) {
    const float wc = w ? to_f32(w[chan0 + per_channel.div((uint32_t)e)]) : 1.f;
    const float* s = parts + 3 * e;
    t.dy += wc * s[0];
    t.dyx += wc * s[1];
    t.xm += s[2];
  }
  return block_sum(t, scratch);
}

// A row's record (m1, m2, delta) from its weighted sums (weighted_sums over the whole row).
__device__ __forceinline__ float3 record_of(Sums3 t, float rstd, float inv_l) {
  const float delta = t.xm * inv_l;
  // sum w (sdyx - delta rstd sdy) = sum w sdyx - delta rstd sum w sdy
  return make_float3(t.dy * inv_l, (t.dyx - delta * rstd * t.dy) * inv_l, delta);
}

// A row's record from its D * P partial sums: the same for the fused and the split path.
template <typename P>
__device__ __forceinline__ float3 row_record(const GnBwdParams& p, uint64_t sample, uint32_t chan0,
                                             float rstd, const P* __restrict__ w,
                                             Sums3* scratch) {
  const uint64_t entries = (uint64_t)p.d * p.chunking.pieces;
  return record_of(weighted_sums<P>(p, sample, chan0, 0, entries, w, scratch), rstd,
                   p.inv_row_len);
}

// dx over one chunk: dx = rstd * (w * dz - m1 - xhat * m2), xhat = (x - mean - delta) * rstd,
// dz = dy, or dy * silu'(xhat * w + b) with SILU. Every thread of the block calls it.
template <typename T, typename P, bool VEC, bool SILU>
__device__ __forceinline__ void dx_chunk(const T* xs, const T* dys, T* __restrict__ dx,
                                         const Chunk& c, uint32_t chan0, float mean, float rstd,
                                         float3 rec, const P* __restrict__ w,
                                         const P* __restrict__ b) {
  // Per value, two FMAs where the formula as written takes five instructions: xhat as
  // (x - mean) * rstd - delta * rstd, and dx = (rstd w) dz + (xhat (-rstd m2) + (-rstd m1)),
  // with rstd w once per vector. Each form rounds at most once more per term than the other, an
  // error of a few f32 ulps of the largest term, far inside every dx target.
  const float shift = -rec.z * rstd, k1 = -rstd * rec.x, k2 = -rstd * rec.y;
  auto coef = [=](uint32_t k) { return affine_of(w, b, chan0 + c.c0 + k); };  // channel k
  auto one = [=](float xv, float dy, float2 wb, float a) {
    const float xhat = fmaf(xv - mean, rstd, shift);
    if constexpr (SILU) dy *= activate_grad<true>(xhat * wb.x + wb.y);
    return fmaf(a, dy, fmaf(xhat, k2, k1));
  };
  if constexpr (VEC) {
    constexpr int V = kVec<T>;
    // (w, b) once per channel and lane, handed to the vectors by shuffles (b only with SiLU):
    // the loop's only global accesses are its 16-byte loads (from global on the split path) and
    // its store
    for_vectors_by_channel<SILU>(c.nseg, c.seglen / V, coef, [&](uint32_t i, float2 wb) {
      const Vec16<T> xv = load16(xs + (size_t)i * V), dv = load16(dys + (size_t)i * V);
      const float a = rstd * wb.x;
      Vec16<T> out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        out.v[e] = from_f32<T>(one(elem_f32(xv, e), elem_f32(dv, e), wb, a));
      }
      store16_global(dx + (size_t)i * V, out);
    });
  } else {
    const DivU32 seg(c.seglen);
    const uint32_t n = c.len();
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float2 wb = coef(seg.div(i));
      dx[i] = from_f32<T>(one(to_f32(xs[i]), to_f32(dys[i]), wb, rstd * wb.x));
    }
  }
}

// Writes the 3 sums of segment j into the partials (consecutive segments are consecutive
// channels; with pieces > 1 a chunk has a single segment).
__device__ __forceinline__ void store_sums(float* parts, uint32_t j, uint32_t pieces, Sums3 s) {
  float* out = parts + 3 * (size_t)j * pieces;
  out[0] = s.dy;
  out[1] = s.dyx;
  out[2] = s.xm;
}

// Copies chunk c's x, then its dy, into shared memory at `base` and waits for the copies:
// returns where x starts (dy follows at + c.len()). Assumes: with VEC, `base` is 16-byte aligned
// (c.len() * sizeof(T) is then a multiple of 16, so dy is too).
template <typename T, bool VEC>
__device__ __forceinline__ T* stage_x_dy(unsigned char* base, const GnBwdParams& p,
                                         const Chunk& c) {
  T* xs = reinterpret_cast<T*>(base);
  const uint32_t n = c.len();
  const uint64_t off = chunk_offset(c, p.d, p.s);
  copy_to_shared<T, VEC>(xs, static_cast<const T*>(p.x) + off, n);
  copy_to_shared<T, VEC>(xs + n, static_cast<const T*>(p.dy) + off, n);
  __syncthreads();
  return xs;
}

// One block per row, x and dy of the row in dynamic shared memory (2 * d * s * sizeof(T) bytes).
template <typename T, typename P, bool VEC, bool SILU>
__device__ void bwd_fused(const GnBwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ Sums3 scratch[kWarp];
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const uint32_t n = c.len();
  T* xs = stage_x_dy<T, VEC>(smem_raw, p, c);
  T* dys = xs + n;
  const uint64_t off = chunk_offset(c, p.d, p.s);
  const float mean = p.mean[c.row], rstd = p.rstd[c.row];
  const uint64_t sample = c.row / p.groups;
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * p.d;
  const uint32_t channels = p.groups * p.d;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  // SiLU needs the row's mean residual before the sums (to recompute z): one more pass over
  // the on-chip copy.
  const float delta =
      SILU ? chunk_centered_sum<T, VEC>(xs, n, mean, reinterpret_cast<float*>(scratch)) * p.inv_row_len : 0.f;
  float* const parts = p.partials + partial_index(sample, channels, chan0 + c.c0, 1, 0);
  segment_sums<T, VEC, SILU>(
      xs, dys, c, mean, rstd, delta, [=](uint32_t j) { return affine_of(w, b, chan0 + c.c0 + j); },
      scratch, [=](uint32_t j, Sums3 s) { store_sums(parts, j, 1, s); });
  __syncthreads();  // the row's sums, written above by this block, are visible to all its threads
  const float3 rec = row_record<P>(p, sample, chan0, rstd, w, scratch);
  if (threadIdx.x == 0) {
    float* r = row_records(p) + 3 * c.row;
    r[0] = rec.x;
    r[1] = rec.y;
    r[2] = rec.z;
  }
  row_kernel_param_grads<P>(p, chan0, p.d, [&](uint32_t) { return rec.z * rstd; });
  ticket_param_grads<P>(p, chan0, p.d);
  dx_chunk<T, P, VEC, SILU>(xs, dys, static_cast<T*>(p.dx) + off, c, chan0, mean, rstd, rec, w, b);
}

// Split path with SiLU, pass 0: the chunk's sum of (x - mean), for the row's mean residual.
template <typename T, bool VEC>
__device__ void bwd_center(const GnBwdParams& p) {
  __shared__ float scratch[kWarp];
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const float t = chunk_centered_sum<T, VEC>(static_cast<const T*>(p.x) + chunk_offset(c, p.d, p.s),
                                             c.len(), p.mean[c.row], scratch);
  if (threadIdx.x == 0) centered_sums(p)[c.row * p.chunking.chunks + c.k] = t;
}

// The row's mean residual from its chunks' centered sums (bwd_center), in a fixed order.
__device__ __forceinline__ float row_delta(const GnBwdParams& p, uint64_t row, float* scratch) {
  const uint32_t k = p.chunking.chunks;
  const float* sums = centered_sums(p) + row * k;
  float acc = 0.f;
  for (uint32_t i = threadIdx.x; i < k; i += blockDim.x) acc += sums[i];
  return block_sum(acc, scratch) * p.inv_row_len;
}

// Split path, pass 1: per-(n, c, piece) sums for this block's chunk, streamed from global memory.
template <typename T, typename P, bool VEC, bool SILU>
__device__ void bwd_partial(const GnBwdParams& p) {
  __shared__ Sums3 scratch[kWarp];
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const uint64_t off = chunk_offset(c, p.d, p.s);
  const float mean = p.mean[c.row], rstd = p.rstd[c.row];
  const uint64_t sample = c.row / p.groups;
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * p.d;
  const uint32_t channels = p.groups * p.d;
  const uint32_t pieces = p.chunking.pieces;
  const uint32_t piece = pieces > 1 ? c.k % pieces : 0;
  float* const parts = p.partials + partial_index(sample, channels, chan0 + c.c0, pieces, piece);
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  const float delta = SILU ? row_delta(p, c.row, reinterpret_cast<float*>(scratch)) : 0.f;
  segment_sums<T, VEC, SILU>(
      static_cast<const T*>(p.x) + off, static_cast<const T*>(p.dy) + off, c, mean, rstd, delta,
      [=](uint32_t j) { return affine_of(w, b, chan0 + c.c0 + j); }, scratch,
      [=](uint32_t j, Sums3 s) { store_sums(parts, j, pieces, s); });
}

// Split path, pass 2: one block per row turns the row's partial sums into its record, once.
template <typename P>
__device__ void bwd_rows(const GnBwdParams& p) {
  __shared__ Sums3 scratch[kWarp];
  const uint64_t row = blockIdx.x;
  const float rstd = p.rstd[row];
  const float3 rec = row_record<P>(p, row / p.groups, (uint32_t)(row % p.groups) * p.d, rstd,
                                   static_cast<const P*>(p.weight), scratch);
  if (threadIdx.x == 0) {
    float* r = row_records(p) + 3 * row;
    r[0] = rec.x;
    r[1] = rec.y;
    r[2] = rec.z;
  }
}

// Split path, pass 3: dx for this block's chunk from the row's record (and, first, dweight and
// dbias of a channel per thread of the grid's first C threads).
template <typename T, typename P, bool VEC, bool SILU>
__device__ void bwd_dx(const GnBwdParams& p) {
  split_param_grads<P>(p);
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const float mean = p.mean[c.row], rstd = p.rstd[c.row];
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * p.d;
  const float* r = row_records(p) + 3 * c.row;
  const float3 rec = make_float3(r[0], r[1], r[2]);
  const uint64_t off = chunk_offset(c, p.d, p.s);
  dx_chunk<T, P, VEC, SILU>(static_cast<const T*>(p.x) + off, static_cast<const T*>(p.dy) + off,
                            static_cast<T*>(p.dx) + off, c, chan0, mean, rstd, rec,
                            static_cast<const P*>(p.weight), static_cast<const P*>(p.bias));
}

#if GN_CLUSTERS
// Cluster path: one cluster of `chunks` blocks per row; this block is rank c.k of its cluster.
// Dynamic shared memory: the block's exchange slot (its centered sum, then its 3 weighted sums),
// then its chunk of x, then of dy.
template <typename T, typename P, bool VEC, bool SILU>
__device__ void bwd_cluster(const GnBwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ Sums3 scratch[kWarp];
  float* slot = reinterpret_cast<float*>(smem_raw);
  const Chunk c = chunk_of(blockIdx.x, p.chunking, p.d, p.s);
  const uint32_t n = c.len();
  T* xs = stage_x_dy<T, VEC>(smem_raw + kClusterSlotBytes, p, c);
  T* dys = xs + n;
  const uint64_t off = chunk_offset(c, p.d, p.s);
  const float mean = p.mean[c.row], rstd = p.rstd[c.row];
  const uint64_t sample = c.row / p.groups;
  const uint32_t chan0 = (uint32_t)(c.row % p.groups) * p.d;
  const uint32_t channels = p.groups * p.d;
  const uint32_t chunks = p.chunking.chunks;  // <= 32: one lane per block of the cluster
  const uint32_t pieces = p.chunking.pieces;
  const uint32_t piece = pieces > 1 ? c.k % pieces : 0;
  const uint32_t lane = threadIdx.x % kWarp;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  // SiLU: the row's mean residual first (to recompute z), from every block's centered sum.
  float delta = 0.f;
  if constexpr (SILU) {
    const float t = chunk_centered_sum<T, VEC>(xs, n, mean, reinterpret_cast<float*>(scratch));
    if (threadIdx.x == 0) slot[0] = t;
    cluster_sync();  // every block's centered sum is written
    delta = warp_sum(lane < chunks ? cluster_peer(slot, lane)[0] : 0.f) * p.inv_row_len;
  }
  float* const parts = p.partials + partial_index(sample, channels, chan0 + c.c0, pieces, piece);
  segment_sums<T, VEC, SILU>(
      xs, dys, c, mean, rstd, delta, [=](uint32_t j) { return affine_of(w, b, chan0 + c.c0 + j); },
      scratch, [=](uint32_t j, Sums3 s) { store_sums(parts, j, pieces, s); });
  __syncthreads();  // the chunk's sums, written above by this block, are visible to all its threads
  // the chunk's entries: channels [c0, c0 + nseg) whole, or piece `piece` of channel c0
  const Sums3 mine = weighted_sums<P>(p, sample, chan0, (uint64_t)c.c0 * pieces + piece, c.nseg,
                                      w, scratch);
  if (threadIdx.x == 0) {
    slot[1] = mine.dy;
    slot[2] = mine.dyx;
    slot[3] = mine.xm;
  }
  cluster_sync();  // every block's share is written
  // every warp adds the K shares (lane k reads block k's); the butterfly gives all lanes the
  // same bits, so every block of the cluster holds the same record
  Sums3 row{0.f, 0.f, 0.f};
  if (lane < chunks) {
    const float* peer = cluster_peer(slot, lane);
    row = Sums3{peer[1], peer[2], peer[3]};
  }
  const float3 rec = record_of(warp_sum(row), rstd, p.inv_row_len);
  if (c.k == 0 && threadIdx.x == 0) {
    float* r = row_records(p) + 3 * c.row;
    r[0] = rec.x;
    r[1] = rec.y;
    r[2] = rec.z;
  }
  // this block's channels, or its channel when it holds the channel's piece 0 (the cluster_sync
  // above follows every block's partials)
  if (piece == 0) {
    row_kernel_param_grads<P>(p, chan0 + c.c0, c.nseg, [&](uint32_t) { return rec.z * rstd; });
  }
  dx_chunk<T, P, VEC, SILU>(xs, dys, static_cast<T*>(p.dx) + off, c, chan0, mean, rstd, rec, w, b);
  // with N > 1, the ticket of a channel's piece-0 block follows the cluster's partials and its
  // row record (written by rank 0): fenced by every block before this barrier
  if (uses_tickets(p)) __threadfence();
  cluster_sync();  // no block exits (taking its slot with it) before all have read the slots
  if (piece == 0) ticket_param_grads<P>(p, chan0 + c.c0, c.nseg);
}
#endif

// dweight[c] = sum over n, pieces of (sdyx - delta_n rstd_n sdy); dbias[c] likewise of sdy.
// One thread per channel, n in order. Runs after the row records are written.
template <typename P>
__device__ void bwd_params(const GnBwdParams& p) {
  const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < p.groups * p.d) channel_param_grads<P>(p, c);
}

}  // namespace gn

// Entry points: groupnorm_bwd_{fused,dx,partial}_<T>_<P>_<vec|scalar>,
// groupnorm_cluster_bwd_<T>_<P>_<vec|scalar> (a trap below sm_90),
// groupnorm_bwd_center_<T>_<vec|scalar>, groupnorm_bwd_{rows,params}_<P>.
#define GN_BWD_TP(NAME, T, P, VEC)                                                             \
  extern "C" __global__ void __launch_bounds__(gn::kBwdThreads, 1)                             \
      groupnorm_bwd_fused_##NAME(const GnBwdParams p) {                                        \
    GN_DISPATCH_ACT(gn::bwd_fused, T, P, VEC)                                                       \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kBwdThreads, 1)                             \
      groupnorm_bwd_dx_##NAME(const GnBwdParams p) {                                           \
    GN_DISPATCH_ACT(gn::bwd_dx, T, P, VEC)                                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kBwdThreads, 1)                             \
      groupnorm_bwd_partial_##NAME(const GnBwdParams p) {                                      \
    GN_DISPATCH_ACT(gn::bwd_partial, T, P, VEC)                                                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kBwdThreads, 1)                             \
      groupnorm_cluster_bwd_##NAME(const GnBwdParams p) {                                      \
    GN_IF_CLUSTERS(GN_DISPATCH_ACT(gn::bwd_cluster, T, P, VEC))                                \
  }

#define GN_BWD_T(NAME, T, VEC)                                                                 \
  extern "C" __global__ void __launch_bounds__(gn::kBwdThreads, 1)                             \
      groupnorm_bwd_center_##NAME(const GnBwdParams p) {                                       \
    gn::bwd_center<T, VEC>(p);                                                                 \
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
  extern "C" __global__ void __launch_bounds__(gn::kRowThreads)                                \
      groupnorm_bwd_rows_##NAME(const GnBwdParams p) {                                         \
    gn::bwd_rows<P>(p);                                                                        \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kParamThreads)                              \
      groupnorm_bwd_params_##NAME(const GnBwdParams p) {                                       \
    gn::bwd_params<P>(p);                                                                      \
  }
GN_BWD_P(f32, float)
GN_BWD_P(f16, __half)
GN_BWD_P(bf16, __nv_bfloat16)
