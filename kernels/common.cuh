// Device helpers shared by the forward and backward kernels: element conversions, 16-byte
// vector access, Welford/Chan statistics, warp and block reductions, fast division.
//
// Every reduction here combines in a fixed order (lane order, then warp order), so the same
// inputs give the same bits on every run: no float atomics anywhere (the backward's tickets are
// an integer count that only picks which block runs a fixed-order reduction).
#pragma once
// --- host emulation switch (cargo feature `emulate`, tests/emu/): see host_emu.h ---
#ifdef GN_HOST_EMULATION
#include "host_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
// --- end host emulation switch ---
#include <stdint.h>

#include "params.h"

namespace gn {

constexpr int kWarp = 32;

// ---------------------------------------------------------------------------------------------
// Element conversions: everything is computed in f32.

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------
// Activations (GnFwdParams::activation). SiLU uses the fast intrinsics `__expf` (ex2.approx) and
// `__fdividef` (rcp.approx): two MUFU operations and three FMA-pipe instructions per value, where
// IEEE `expf` and `/` cost about twenty and made fused GN+SiLU compute-bound. Their documented
// worst-case errors (2 + floor(|1.173 z|) ulp for __expf, 2 ulp for __fdividef) keep every output
// within the accuracy targets; the host emulator applies those worst-case errors (host_emu.h), so
// the emulated parity tests hold the targets under the worst the hardware may do.

// e^x for the sigmoid: ex2.approx.ftz(x * log2 e). That is __expf's own computation (one FMUL by
// the same rounded log2 e, one MUFU.EX2) less its subnormal fix-up, which costs an FSETP and two
// FMULs per value: only 1 + e^x is ever used, and 1 + e is 1 both for a subnormal e and for the
// 0 that .ftz gives instead, and for x subnormal (read as 0, 2^0 = 1) as for the exact 2^x; so
// the sigmoid has the same bits as with __expf. The emulator runs its __expf model (host_emu.h,
// with the documented worst-case error), the same computation.
__device__ __forceinline__ float exp_for_sigmoid(float x) {
#ifdef GN_HOST_EMULATION
  return __expf(x);
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.44269504f));
  return r;
#endif
}

// sigmoid(z) = 1 / (1 + e^-z). For z < -87 the sum passes 2^126 and __fdividef returns 0, the
// limit of the true value (< 2^-126).
__device__ __forceinline__ float fast_sigmoid(float z) {
  return __fdividef(1.0f, 1.0f + exp_for_sigmoid(-z));
}

// y = act(z).
template <bool SILU> __device__ __forceinline__ float activate(float z) {
  if constexpr (SILU) {
    return z * fast_sigmoid(z);
  } else {
    return z;
  }
}

// d act(z) / dz: silu'(z) = sig(z) * (1 + z * (1 - sig(z))); 0 for z -> -inf, 1 for z -> +inf.
// One sigmoid per value.
template <bool SILU> __device__ __forceinline__ float activate_grad(float z) {
  if constexpr (SILU) {
    const float sig = fast_sigmoid(z);
    return sig * (1.0f + z * (1.0f - sig));
  } else {
    return 1.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// 16-byte vectors. `kVec<T>` elements move in one 128-bit access when the pointer is 16-byte
// aligned; the host decides that once per launch (see `vectorizable` in src/gpu/plan.rs) and
// picks the scalar instantiation otherwise.

template <typename T> constexpr int kVec = 16 / sizeof(T);

template <typename T> struct alignas(16) Vec16 {
  T v[kVec<T>];
};

template <typename T> __device__ __forceinline__ Vec16<T> load16(const T* p) {
  // Assumes: p is 16-byte aligned; p may point to global or shared memory (generic load).
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  return *reinterpret_cast<Vec16<T>*>(&raw);
}

// Element e of a loaded vector, in f32. bf16 is the top half of binary32, so an element is its
// 32-bit word shifted (even e) or masked (odd e): one instruction each, where widening the
// 16-bit element first costs a PRMT more for every odd one (a quarter of the instructions the
// bf16 backward's dx loop saves, counted in docs/kernel-report.md). Exact, like to_f32.
template <typename T> __device__ __forceinline__ float elem_f32(const Vec16<T>& v, int e) {
  return to_f32(v.v[e]);
}
template <>
__device__ __forceinline__ float elem_f32<__nv_bfloat16>(const Vec16<__nv_bfloat16>& v, int e) {
  uint32_t word;
  memcpy(&word, &v.v[e & ~1], sizeof word);  // elements e & ~1 (low half) and e | 1 (high half)
  return __uint_as_float((e & 1) ? (word & 0xffff0000u) : (word << 16));
}

template <typename T> __device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
  // Assumes: p is 16-byte aligned.
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
}

// store16 for an output in global memory, kept one 128-bit store. Storing through a
// reinterpreted `Vec16` lets nvcc split a store of computed elements into four 32-bit stores
// (`st.global.v2.u16` in the PTX of normalize_chunk, STG.E in its SASS), which costs four store
// instructions per 16 bytes; PTX spelled out here cannot be split.
// Assumes: p is a 16-byte aligned global address.
template <typename T> __device__ __forceinline__ void store16_global(T* p, const Vec16<T>& v) {
  uint4 raw;
  memcpy(static_cast<void*>(&raw), &v, sizeof raw);
#ifdef GN_HOST_EMULATION
  *reinterpret_cast<uint4*>(p) = raw;
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(raw.x), "r"(raw.y),
               "r"(raw.z), "r"(raw.w));
#endif
}

// Copies `n` elements from global `src` to shared `dst` with every thread of the block, handing
// each thread's values to it on their way: on_vector(Vec16) with VEC, on_value(T) without.
// Assumes: with VEC, src and dst are 16-byte aligned and n is a multiple of kVec<T>.
template <typename T, bool VEC, typename OnVector, typename OnValue>
__device__ __forceinline__ void copy_to_shared_visit(T* dst, const T* __restrict__ src,
                                                     uint32_t n, OnVector on_vector,
                                                     OnValue on_value) {
  if constexpr (VEC) {
    constexpr int U = 4;  // loads in flight per thread before the stores
    const uint32_t nv = n / kVec<T>;
    uint32_t i = threadIdx.x;
    for (; i + (U - 1) * blockDim.x < nv; i += U * blockDim.x) {
      Vec16<T> r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r[u] = load16(src + (size_t)(i + u * blockDim.x) * kVec<T>);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        store16(dst + (size_t)(i + u * blockDim.x) * kVec<T>, r[u]);
        on_vector(r[u]);
      }
    }
    for (; i < nv; i += blockDim.x) {
      const Vec16<T> r = load16(src + (size_t)i * kVec<T>);
      store16(dst + (size_t)i * kVec<T>, r);
      on_vector(r);
    }
  } else {
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
      const T v = src[i];
      dst[i] = v;
      on_value(v);
    }
  }
}

// copy_to_shared_visit with nothing to do on the way.
template <typename T, bool VEC>
__device__ __forceinline__ void copy_to_shared(T* dst, const T* __restrict__ src, uint32_t n) {
  copy_to_shared_visit<T, VEC>(dst, src, n, [](const Vec16<T>&) {}, [](T) {});
}

// ---------------------------------------------------------------------------------------------
// Fast unsigned division by a divisor fixed for the kernel (Granlund-Montgomery): one mul-hi,
// one add and one shift instead of a ~20-instruction division. Exact for every 32-bit n.
struct DivU32 {
  uint32_t d, m, shift;
  __device__ __forceinline__ explicit DivU32(uint32_t divisor) : d(divisor) {
    // Assumes: divisor >= 1. shift = ceil(log2 d), m = floor(2^32 (2^shift - d) / d) + 1.
    // The quotient is below 2^32, so a double division (53-bit significand, correctly rounded)
    // lands within 2^-21 of it and its floor is off by at most one; one exact 64-bit check each
    // way makes it exact. About 40 instructions per block, where the shift-and-subtract long
    // division this replaces ran a 32-step dependent loop (over 200) before the first load.
    shift = divisor > 1u ? 32u - (uint32_t)__clz(divisor - 1u) : 0u;
    const uint64_t num = ((1ull << shift) - divisor) << 32;
    uint64_t q = (uint64_t)((double)num / (double)divisor);
    if (q * divisor > num) {
      --q;
    } else if ((q + 1u) * divisor <= num) {
      ++q;
    }
    m = (uint32_t)q + 1u;
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    uint64_t t = __umulhi(n, m);
    return (uint32_t)((t + n) >> shift);
  }
};

// ---------------------------------------------------------------------------------------------
// Per-channel coefficients with no parameter load in the steady-state loop (NCHW normalize and
// dx). A chunk is `nseg` channels of `segv` 16-byte vectors each, channel-major; a vector never
// crosses a channel (the host picks the vector kernels only when the channel length is a
// multiple of the vector width). Each warp takes one contiguous run of the chunk's vectors (a
// multiple of 32 long) and walks it in windows of 32 channels: lane l computes, once, the
// coefficients coef_of(k) of the window's channel k with k % 32 == l (k: the channel's index in
// the chunk; the only parameter loads, outside the vector loop), and each vector takes its
// channel's pair from lane k % 32 with two shuffles. Per vector that is one division by a
// constant (DivU32) and two shuffles instead of a division and two narrow global loads, for any
// channel length (1 vector or millions). visit(i, coef) runs once for each vector i of the chunk,
// in one thread; full rounds of 32 vectors run without a bounds check, a window's last partial
// round after them. With PAIR false only coef.x is handed on (one shuffle; coef.y is 0).
// Assumes: called by every thread of the block (the shuffles take the full mask), blockDim.x a
// multiple of 32.
template <bool PAIR, typename CoefOf, typename Visit>
__device__ __forceinline__ void for_vectors_by_channel(uint32_t nseg, uint32_t segv,
                                                       CoefOf coef_of, Visit visit) {
  const uint32_t nv = nseg * segv;  // the chunk's length over the vector width: fits 32 bits
  if (nv == 0) return;
  const uint32_t lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const uint32_t nwarps = blockDim.x / kWarp;
  const uint32_t span = ((nv + nwarps - 1) / nwarps + kWarp - 1) & ~(uint32_t)(kWarp - 1);
  const uint32_t first = min(warp * span, nv);  // warp * span <= nv + 32 * nwarps: no overflow
  const uint32_t end = min(first + span, nv);
  const DivU32 per_seg(segv);
  // the pair of vector i's channel k, from lane k % 32 (the shuffle takes the lane mod 32)
  auto coef_at = [&](float2 mine, uint32_t i) {
    const int src = (int)per_seg.div(i);
    return make_float2(__shfl_sync(0xffffffffu, mine.x, src),
                       PAIR ? __shfl_sync(0xffffffffu, mine.y, src) : 0.f);
  };
  for (uint32_t v = first; v < end;) {  // uniform over the warp
    const uint32_t k0 = per_seg.div(v);
    const uint32_t k = k0 + ((lane - k0) & (uint32_t)(kWarp - 1));  // in [k0, k0 + 32)
    const float2 mine = k < nseg ? coef_of(k) : make_float2(0.f, 0.f);
    const uint64_t lim = (uint64_t)(k0 + kWarp) * segv;  // end of the window's 32 channels
    const uint32_t wend = lim < end ? (uint32_t)lim : end;
    uint32_t i0 = v;
    for (; i0 + kWarp <= wend; i0 += kWarp) visit(i0 + lane, coef_at(mine, i0 + lane));
    if (i0 < wend) {
      const float2 cf = coef_at(mine, i0 + lane);
      if (i0 + lane < wend) visit(i0 + lane, cf);
    }
    v = wend;
  }
}

// ---------------------------------------------------------------------------------------------
// Statistics. A Welford state about a pivot: count, mean of (x - pivot), sum of squared
// deviations. `combine` is Chan's merge and short-circuits empty partners, so identity lanes
// and empty chunks need no special case at the call site.
struct Welford {
  float n, mean, m2;
  __device__ __forceinline__ Welford() : n(0.f), mean(0.f), m2(0.f) {}
  __device__ __forceinline__ Welford(float n_, float mean_, float m2_) : n(n_), mean(mean_), m2(m2_) {}
};

__device__ __forceinline__ Welford combine(const Welford& a, const Welford& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n;
  const float wb = b.n / n;
  const float delta = b.mean - a.mean;
  return Welford(n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb);
}

// ---------------------------------------------------------------------------------------------
// Reductions. Assumptions for the block versions: blockDim.x is a multiple of 32 and at most
// 1024; `scratch` holds at least 32 elements of the reduced type; every thread of the block calls
// them (they contain __syncthreads). The result is returned to every thread.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

template <typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V r = lane < nwarps ? scratch[lane] : V{};
  r = warp_sum(r);
  return r;
}

// Merges the 32 lanes' Welford states with a butterfly in lane order, so every lane gets the same
// bits whatever the schedule. Assumes: called by all 32 lanes of a warp.
__device__ __forceinline__ Welford warp_merge_lanes(Welford w) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    Welford other(__shfl_xor_sync(0xffffffffu, w.n, o), __shfl_xor_sync(0xffffffffu, w.mean, o),
                  __shfl_xor_sync(0xffffffffu, w.m2, o));
    // Combine in lane order so both partners compute bit-identical results.
    w = (lane & o) ? combine(other, w) : combine(w, other);
  }
  return w;
}

// Merges every thread's Welford state: lanes first (warp_merge_lanes), then the warps in index
// order; every thread of the block gets the same bits. Assumes: as block_sum, with `scratch`
// holding 3 * 32 floats.
__device__ __forceinline__ Welford block_merge(Welford w, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  w = warp_merge_lanes(w);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
    scratch[3 * warp] = w.n;
    scratch[3 * warp + 1] = w.mean;
    scratch[3 * warp + 2] = w.m2;
  }
  __syncthreads();
  const Welford r = lane < nwarps
                        ? Welford(scratch[3 * lane], scratch[3 * lane + 1], scratch[3 * lane + 2])
                        : Welford();
  return warp_merge_lanes(r);
}

// Merges `count` Welford partials `part_of(i)` in index order, with one warp. Assumes: called by
// all 32 lanes of one warp. The merge tree is fixed (lane i takes i, i+32, ...; then a
// butterfly), so the result does not depend on scheduling, and every lane gets the same bits.
template <typename PartOf>
__device__ __forceinline__ Welford warp_merge_parts(uint32_t count, PartOf part_of) {
  const int lane = threadIdx.x % kWarp;
  Welford w;
  for (uint32_t i = lane; i < count; i += kWarp) w = combine(w, part_of(i));
  return warp_merge_lanes(w);
}

// warp_merge_parts over `parts[i] = (mean, m2)` with counts `count_of(i)`.
template <typename CountOf>
__device__ __forceinline__ Welford warp_merge(const float* parts, uint32_t count, CountOf count_of) {
  return warp_merge_parts(
      count, [&](uint32_t i) { return Welford(count_of(i), parts[2 * i], parts[2 * i + 1]); });
}

// ---------------------------------------------------------------------------------------------
// Statistics from the registers a thread has just loaded.

// One thread's running statistics about a pivot, kept as a sum rather than a mean: count n, sum
// s of (x - pivot), and m2, the sum of squared deviations from s / n. The mean is never updated
// by a rounded weight, so it is as exact as the sum; the fast reciprocals below only touch m2's
// small correction term (Chan's delta^2 n V / (n + V)).
struct PivotSums {
  float n = 0.f, s = 0.f, m2 = 0.f;
  // As a Welford state (one IEEE division): what block_merge takes.
  __device__ __forceinline__ Welford welford() const {
    return n > 0.f ? Welford(n, s / n, m2) : Welford();
  }
};

// Adds one 16-byte vector of values: the vector's own sum and m2 exactly (two passes over
// registers), then Chan's merge with the running state.
template <typename T>
__device__ __forceinline__ void add_vector(PivotSums& acc, const Vec16<T>& v, float pivot) {
  constexpr int V = kVec<T>;
  float d[V];
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    d[e] = elem_f32(v, e) - pivot;
    sum += d[e];
  }
  const float mean = sum * (1.0f / V);  // V is a power of two: exact
  float m2 = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float t = d[e] - mean;
    m2 = fmaf(t, t, m2);
  }
  // Chan: m2 += m2_v + (mean_v - s / n)^2 * n * V / (n + V); with n = 0 the correction is 0.
  const float delta = mean - acc.s * __fdividef(1.0f, fmaxf(acc.n, 1.0f));
  acc.m2 += m2 + delta * delta * __fdividef(acc.n * V, acc.n + V);
  acc.s += sum;
  acc.n += (float)V;
}

// copy_to_shared that also returns the statistics of the copied values about `pivot`, taken from
// the registers on their way to shared memory (no second pass over shared memory), merged over the
// block in a fixed order (block_merge). Every thread gets the same result, and `dst` is visible
// to the whole block on return. Assumes: as copy_to_shared and block_merge.
template <typename T, bool VEC>
__device__ __forceinline__ Welford copy_to_shared_stats(T* dst, const T* __restrict__ src,
                                                        uint32_t n, float pivot, float* scratch) {
  PivotSums acc;  // vectors
  Welford w;      // the scalar fallback (misaligned buffers): exact Welford, one value at a time
  copy_to_shared_visit<T, VEC>(
      dst, src, n, [&](const Vec16<T>& v) { add_vector(acc, v, pivot); },
      [&](T v) { w = combine(w, Welford(1.f, to_f32(v) - pivot, 0.f)); });
  return block_merge(VEC ? acc.welford() : w, scratch);  // its barriers also publish dst
}

// ---------------------------------------------------------------------------------------------
// Chunk geometry (see GnChunking in params.h). A chunk is `nseg` contiguous segments of `seglen`
// values: channels [c0, c0 + nseg) of the row, spatial values [s0, s0 + seglen) of each.
struct Chunk {
  uint64_t row;     // n * G + g
  uint32_t k;       // chunk index within the row
  uint32_t c0;      // first channel within the group
  uint32_t nseg;    // channels in the chunk
  uint32_t s0;      // first spatial index
  uint32_t seglen;  // spatial values per channel in the chunk
  __device__ __forceinline__ uint32_t len() const { return nseg * seglen; }
};

__device__ __forceinline__ Chunk chunk_of(uint64_t block, const GnChunking& ch, uint32_t d,
                                          uint32_t s) {
  Chunk c;
  c.row = block / ch.chunks;
  c.k = (uint32_t)(block % ch.chunks);
  if (ch.pieces == 1) {
    c.c0 = c.k * ch.cpb;
    c.nseg = min(ch.cpb, d - c.c0);
    c.s0 = 0;
    c.seglen = s;
  } else {
    c.c0 = c.k / ch.pieces;
    c.nseg = 1;
    c.s0 = (c.k % ch.pieces) * ch.piece_len;
    c.seglen = min(ch.piece_len, s - c.s0);
  }
  return c;
}

// Number of values in chunk k of a row (for merging partials without storing counts).
__device__ __forceinline__ uint32_t chunk_len(uint32_t k, const GnChunking& ch, uint32_t d,
                                              uint32_t s) {
  if (ch.pieces == 1) return min(ch.cpb, d - k * ch.cpb) * s;
  const uint32_t s0 = (k % ch.pieces) * ch.piece_len;
  return min(ch.piece_len, s - s0);
}

// Offset of the chunk's first value in the (N, C, S) tensor.
__device__ __forceinline__ uint64_t chunk_offset(const Chunk& c, uint32_t d, uint32_t s) {
  return c.row * (uint64_t)d * s + (uint64_t)c.c0 * s + c.s0;
}

// ---------------------------------------------------------------------------------------------
// Shared by both layouts (forward.cu, backward.cu, nhwc.cu): statistics, parameters, and the
// workspace layout the host sizes in src/gpu/plan.rs (`workspace_floats`).

// rstd from a row's m2 and count; an empty row gets 1 / sqrt(eps).
__device__ __forceinline__ float rstd_of(float m2, float count, float eps) {
  const float var = count > 0.f ? m2 / count : 0.f;
  return 1.0f / sqrtf(var + eps);
}

// (weight, bias) of global channel ch, (1, 0) where absent.
template <typename P>
__device__ __forceinline__ float2 affine_of(const P* __restrict__ w, const P* __restrict__ b,
                                            uint32_t ch) {
  return make_float2(w ? to_f32(w[ch]) : 1.f, b ? to_f32(b[ch]) : 0.f);
}

// Forward split path: 2 * rows * K chunk partials, then the row records (mean about the pivot,
// rstd).
__device__ __forceinline__ float* fwd_row_records(const GnFwdParams& p) {
  return p.partials + 2 * p.rows * p.chunking.chunks;
}

// Backward: index of the 3 sums of (sample n, global channel c, piece q).
__device__ __forceinline__ size_t partial_index(uint64_t n, uint32_t channels, uint32_t c,
                                                uint32_t pieces, uint32_t q) {
  return 3 * (((size_t)n * channels + c) * pieces + q);
}

// Backward: the row records (m1, m2, delta) follow the partial sums.
__device__ __forceinline__ float* row_records(const GnBwdParams& p) {
  return p.partials + 3 * (size_t)p.batch * p.groups * p.d * p.chunking.pieces;
}

// Backward split path with SiLU: one centered sum per chunk follows the row records.
__device__ __forceinline__ float* centered_sums(const GnBwdParams& p) {
  return row_records(p) + 3 * p.rows;
}

// dweight and dbias: channel c's sums of sample n, over its pieces, added into (sdy, sdyx),
// with shift = delta_n * rstd_n. bwd_params (backward.cu) runs it for n = 0, 1, ... in order;
// the row kernels that write the gradients themselves (row_kernel_param_grads) run it once, so
// both give the same bits.
__device__ __forceinline__ void add_param_sums(const GnBwdParams& p, uint64_t n, uint32_t c,
                                               float shift, float& sdy, float& sdyx) {
  const uint32_t channels = p.groups * p.d;
  const uint32_t pieces = p.chunking.pieces;
  float ndy = 0.f, ndyx = 0.f;
#pragma unroll 4
  for (uint32_t q = 0; q < pieces; ++q) {
    const float* part = p.partials + partial_index(n, channels, c, pieces, q);
    ndy += part[0];
    ndyx += part[1];
  }
  sdy += ndy;
  sdyx += ndyx - shift * ndy;
}

template <typename P>
__device__ __forceinline__ void store_param_grads(const GnBwdParams& p, uint32_t c, float sdy,
                                                  float sdyx) {
  if (p.dweight) static_cast<P*>(p.dweight)[c] = from_f32<P>(sdyx);
  if (p.dbias) static_cast<P*>(p.dbias)[c] = from_f32<P>(sdy);
}

// Channel c's dweight and dbias over all samples, n in order, from the row records (delta_n,
// with rstd_n) and the per-(n, c, piece) sums: what bwd_params does for each channel.
// The loop over n is not unrolled and add_param_sums' loop over pieces 4 times: inlined into
// the split dx kernels with nvcc's own unrolling, this took their registers from 40-47 to
// 61-64 on sm_90 (fewer dx blocks per SM for a few threads' serial work); with these pragmas
// every kernel keeps the registers it had before (docs/kernel-report.md).
template <typename P>
__device__ __forceinline__ void channel_param_grads(const GnBwdParams& p, uint32_t c) {
  const uint32_t g = c / p.d;
  const float* records = row_records(p);
  float sdy = 0.f, sdyx = 0.f;
#pragma unroll 1
  for (uint32_t n = 0; n < p.batch; ++n) {
    const uint64_t row = (uint64_t)n * p.groups + g;
    add_param_sums(p, n, c, records[3 * row + 2] * p.rstd[row], sdy, sdyx);  // delta * rstd
  }
  store_param_grads<P>(p, c, sdy, sdyx);
}

// The split path's dx kernels (NCHW and NHWC) start with this: the row records and every
// per-(n, c, piece) sum are complete before they run (bwd_rows ran before them on the stream),
// so the threads of the whole grid take one channel each, the first C of them in grid order,
// and the host launches no bwd_params after them (Plan::param_grads_in_row_kernel in
// src/gpu/launch.rs is the same rule): the same bits as bwd_params, no serial launch.
template <typename P>
__device__ __forceinline__ void split_param_grads(const GnBwdParams& p) {
  if (!p.dweight && !p.dbias) return;
  const uint32_t channels = p.groups * p.d;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t c = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; c < channels; c += stride) {
    channel_param_grads<P>(p, (uint32_t)c);
  }
}

// With one sample (N == 1) a channel's gradients are its sums over its pieces, all written by
// one block (fused) or by the blocks of one cluster, so those kernels write dweight and dbias
// themselves and the host launches no bwd_params (Plan::param_grads_in_row_kernel in
// src/gpu/launch.rs is the same rule): no serial tail. Channels [first, first + count) of
// sample 0, shift_of(j) = delta * rstd of channel first + j's row (as bwd_params takes it
// from the row record), once the partials of all their pieces are visible to this block (a
// __syncthreads after its own writes; a cluster_sync after its peers').
template <typename P, typename ShiftOf>
__device__ __forceinline__ void row_kernel_param_grads(const GnBwdParams& p, uint32_t first,
                                                       uint32_t count, ShiftOf shift_of) {
  if (p.batch != 1 || (!p.dweight && !p.dbias)) return;
  for (uint32_t j = threadIdx.x; j < count; j += blockDim.x) {
    float sdy = 0.f, sdyx = 0.f;
    add_param_sums(p, 0, first + j, shift_of(j), sdy, sdyx);
    store_param_grads<P>(p, first + j, sdy, sdyx);
  }
}

// Whether the fused and cluster kernels reduce dweight and dbias over N > 1 samples themselves
// (ticket_param_grads), so that no bwd_params launch follows: the host gave them tickets.
// Plan::param_grads_in_row_kernel (src/gpu/launch.rs) is the host's half of this rule.
__device__ __forceinline__ bool uses_tickets(const GnBwdParams& p) {
  return p.batch > 1 && p.tickets != nullptr && (p.dweight || p.dbias);
}

// With N > 1 samples, channel c's sums come from N blocks (fused) or N clusters (cluster), one
// per sample. With tickets, the last of them to finish reduces channels [first, first + count)
// over n: channel_param_grads, as bwd_params runs it, so the bits are bwd_params' whichever
// block comes last. Blocks are numbered sample-major, so the blocks holding the same channels in
// each sample share the word tickets[blockIdx.x % (gridDim.x / N)]. Each counts itself with
// atomicInc(word, N - 1) (an integer count: no float atomics, the sums' order stays fixed),
// which wraps the word back to 0 at the N-th: the one that reads N - 1 is the last, and the
// words are zero on entry and on exit without a separate store. Memory order, as cooperative
// groups' grid barrier orders it: the block's barrier, then thread 0 fences (release: every
// thread's partials and records, ordered before it by the barrier, before the ticket), takes
// the ticket, fences again (acquire: the other samples' sums after it), and a second barrier
// hands the verdict to the block. On the cluster paths every thread also fences before the
// cluster barrier that follows its block's writes (the peers' partials, rank 0's record).
// Called by every thread of a block (a block-uniform branch), once per kernel.
template <typename P>
__device__ __forceinline__ void ticket_param_grads(const GnBwdParams& p, uint32_t first,
                                                   uint32_t count) {
  if (!uses_tickets(p)) return;
  __shared__ uint32_t last;
  __syncthreads();  // every thread's partials and records are written
  if (threadIdx.x == 0) {
    __threadfence();
    const uint32_t seen = atomicInc(p.tickets + blockIdx.x % (gridDim.x / p.batch), p.batch - 1);
    __threadfence();
    last = seen == p.batch - 1;
  }
  __syncthreads();
  if (!last) return;
  for (uint32_t j = threadIdx.x; j < count; j += blockDim.x) channel_param_grads<P>(p, first + j);
}


}  // namespace gn

// Runs KERNEL<..., SILU> with SILU from the launch parameters' activation: a uniform branch at
// the top of an entry point, one instantiation per activation.
#define GN_DISPATCH_ACT(KERNEL, ...)                                                           \
  if (p.activation == GN_ACT_SILU) {                                                           \
    KERNEL<__VA_ARGS__, true>(p);                                                              \
  } else {                                                                                     \
    KERNEL<__VA_ARGS__, false>(p);                                                             \
  }

