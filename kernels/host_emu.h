// Host emulation shim: lets a C++20 host compiler (g++, clang++) compile kernels/*.cu unchanged,
// so the real kernel source runs on the CPU in tests (cargo feature `emulate`, tests/emu/).
//
// Included by common.cuh instead of cuda_fp16.h / cuda_bf16.h when GN_HOST_EMULATION is defined;
// nvcc never sees this file.
//
// Execution model (implemented in tests/emu/emu_runtime.cpp):
// - a launch runs its blocks one after another on the calling OS thread;
// - the threads of a block are fibers (user-mode contexts, one stack each) on that OS thread,
//   switched only at __syncthreads() and warp shuffles, so every run is deterministic;
// - `__shared__` is `thread_local`: a block-scope thread_local is static, so one instance is
//   shared by the fibers of the running block, and launches from different OS threads (parallel
//   tests) do not share it;
// - `extern __shared__ unsigned char smem_raw[]` names gn::smem_raw, a thread_local buffer of
//   GN_EMU_SMEM_BYTES that the launcher poisons (0xff: NaN in every dtype) before each block;
// - threadIdx / blockIdx / blockDim / gridDim are thread_local, set by the scheduler before it
//   resumes a fiber;
// - __syncthreads() waits until every live thread of the block has arrived; __shfl_xor_sync
//   needs the full mask and all 32 lanes of the warp. A launch whose threads can never meet
//   (barrier divergence, a shuffle in a warp with exited lanes) fails with an error instead of
//   hanging.
// - thread-block clusters (gn_emu_launch_cluster): the blocks of one cluster run at the same
//   time, each on an OS thread of its own, so each has its own `__shared__` (thread_local) and
//   dynamic shared memory; gn::cluster_sync() (kernels/cluster.cuh) is a barrier over every
//   thread of the cluster and gn::cluster_peer() maps a dynamic-shared-memory address to the same
//   offset in another block of the cluster, as cooperative_groups' map_shared_rank does.
// - global-memory traffic: build.rs compiles the kernels (only they) with -fsanitize=thread and
//   no sanitizer run-time, so each of their loads and stores calls a __tsan_* hook of the runtime
//   that counts 32-byte sectors of the buffers a caller watches (src/gpu/emulate.rs,
//   count_traffic; tools/kernel-report). Nothing here changes for that.
#pragma once
#ifndef GN_HOST_EMULATION
#error "host_emu.h is for host emulation builds only (define GN_HOST_EMULATION)"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------
// CUDA keywords.

// `__global__` doubles as the marker build.rs looks for in the preprocessed kernels to build the
// launch table: every `extern "C" __global__` function is found there, so the table is complete.
#define __global__ __attribute__((used))
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
// `__restrict__` is a GNU keyword already.

// ---------------------------------------------------------------------------------------------
// Vector types.

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
};
namespace gn_emu {
void check_align16(const void* p);  // fails the launch as a misaligned access would fault
}
// 16-byte vector: copying one checks that both ends are 16-byte aligned (the kernels move
// vectors as `*reinterpret_cast<const uint4*>(p)`), and copies by field, so a misaligned vector
// access is reported as the fault it is on the GPU instead of passing on the host.
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
  uint4() = default;
  uint4(const uint4& o) {
    gn_emu::check_align16(&o);
    x = o.x, y = o.y, z = o.z, w = o.w;
  }
  uint4& operator=(const uint4& o) {
    gn_emu::check_align16(this);
    gn_emu::check_align16(&o);
    x = o.x, y = o.y, z = o.z, w = o.w;
    return *this;
  }
};
struct alignas(8) float2 {
  float x, y;
};
struct float3 {
  float x, y, z;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }

// ---------------------------------------------------------------------------------------------
// Built-in indices: per OS thread, rewritten by the scheduler at every fiber switch.

inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim = {1, 1, 1};
inline thread_local dim3 gridDim = {1, 1, 1};

// Dynamic shared memory: `extern __shared__ ... smem_raw[]` inside namespace gn names this.
#define GN_EMU_SMEM_BYTES (256u * 1024u)
// (g++ needs -fno-extern-tls-init, which build.rs passes: the kernels' block-scope `extern`
// redeclaration is otherwise reached through a TLS init hook that nothing defines.)
namespace gn {
alignas(128) inline thread_local unsigned char smem_raw[GN_EMU_SMEM_BYTES];
}

// ---------------------------------------------------------------------------------------------
// Synchronization and warp exchange (tests/emu/emu_runtime.cpp).

namespace gn_emu {
void sync_block();
uint32_t shfl_xor_u32(unsigned mask, uint32_t v, int lane_mask);
}  // namespace gn_emu

inline void __syncthreads() { gn_emu::sync_block(); }

// Device-scope atomics and fences, for the backward's integer tickets (common.cuh): a sequentially
// consistent read-modify-write and fence on the host (the blocks of a cluster run on OS threads).
namespace gn_emu {
uint32_t atomic_inc_u32(uint32_t* address, uint32_t limit);
void thread_fence();
}  // namespace gn_emu

// CUDA's atomicInc: old >= limit ? 0 : old + 1 stored, old returned.
inline unsigned int atomicInc(unsigned int* address, unsigned int limit) {
  return gn_emu::atomic_inc_u32(address, limit);
}
inline void __threadfence() { gn_emu::thread_fence(); }

// Thread-block clusters (one-dimensional): see tests/emu/emu_runtime.cpp.
namespace gn_emu {
void sync_cluster();
unsigned cluster_rank();
unsigned cluster_size();
// `p` must point into the calling block's dynamic shared memory; the launch fails otherwise, and
// where block `rank` may already have exited when the mapped memory is read (see the runtime).
const void* cluster_map(const void* p, unsigned rank);
}  // namespace gn_emu

// A stand-in for the part of cooperative_groups' cluster API the kernels use, so that
// kernels/cluster.cuh compiles its device branch unchanged in emulation (replacing the device
// call, say `this_cluster().sync()` by `__syncthreads()`, then fails the emulated tests).
namespace cooperative_groups {
struct cluster_group {
  void sync() const { gn_emu::sync_cluster(); }
  unsigned block_rank() const { return gn_emu::cluster_rank(); }
  unsigned num_blocks() const { return gn_emu::cluster_size(); }
  template <typename T>
  T* map_shared_rank(T* p, int rank) const {
    return static_cast<T*>(const_cast<void*>(gn_emu::cluster_map(p, (unsigned)rank)));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  static_assert(sizeof(V) == 4, "the emulator exchanges 32-bit values");
  (void)width;
  uint32_t bits;
  memcpy(&bits, &v, 4);
  bits = gn_emu::shfl_xor_u32(mask, bits, lane_mask);
  memcpy(&v, &bits, 4);
  return v;
}

// __shfl_sync with a lane index: lane `src_lane % 32`'s value. The runtime's exchange takes a
// lane mask per lane (each lane reads lane ^ mask), so the index becomes lane ^ src_lane; the
// same rules hold (full mask, all 32 lanes live).
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src_lane, int width = 32) {
  static_assert(sizeof(V) == 4, "the emulator exchanges 32-bit values");
  (void)width;
  const unsigned lane = threadIdx.x % 32u;
  uint32_t bits;
  memcpy(&bits, &v, 4);
  bits = gn_emu::shfl_xor_u32(mask, bits, (int)(((unsigned)src_lane % 32u) ^ lane));
  memcpy(&v, &bits, 4);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Integer and float intrinsics.

inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return (unsigned int)(((unsigned long long)a * b) >> 32);
}
// Count of leading zero bits (32 for 0), as the device instruction.
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// Fast float intrinsics, emulated at their documented worst case (CUDA C++ Programming Guide,
// "Intrinsic Functions": __expf within 2 + floor(|1.173 x|) ulp, __fdividef within 2 ulp for
// 2^-126 <= |y| <= 2^126 and 0 for 2^126 < |y|): the exact result moved by that many ulp, up or
// down as a hash of the operands says, so tests see the error the device is allowed to make
// rather than an exact result it never gives. Deterministic: the same operands, the same bits.
namespace gn_emu {
inline float perturb_ulps(float exact, float ulps, uint32_t seed) {
  if (!(fabsf(exact) < INFINITY) || exact == 0.f) return exact;
  seed ^= seed >> 16;
  seed *= 0x7feb352du;
  seed ^= seed >> 15;
  const float ulp = nextafterf(fabsf(exact), INFINITY) - fabsf(exact);
  return (seed & 1u) ? exact + ulps * ulp : exact - ulps * ulp;
}
inline uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
}  // namespace gn_emu
inline float __expf(float x) {
  return gn_emu::perturb_ulps(expf(x), 2.f + floorf(fabsf(1.173f * x)), gn_emu::bits_of(x));
}
inline float __fdividef(float a, float b) {
  if (fabsf(b) > 0x1p126f && fabsf(b) < INFINITY) return copysignf(0.f, a) * copysignf(1.f, b);
  return gn_emu::perturb_ulps(a / b, 2.f, gn_emu::bits_of(a) * 31u + gn_emu::bits_of(b));
}

// ---------------------------------------------------------------------------------------------
// 16-bit floats, converted bit-exactly as the device does (round to nearest even).

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace gn_emu {
inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// binary16 -> binary32: exact (subnormals normalized, Inf kept, NaN quiet with its payload).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (mant << 13) | (mant ? 0x00400000u : 0u);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {
    // subnormal: value = mant * 2^-24; normalize
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    u = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  return f32_from_bits(u);
}

// binary32 -> binary16, round to nearest even; overflow to Inf, NaN to a quiet NaN.
inline uint16_t float_to_half_bits_rn(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520: Inf (and Inf itself)
  if (a >= 0x38800000u) {
    // normal result (|f| >= 2^-14): rebias, round off 13 bits to nearest even
    const uint32_t r = a - 0x38000000u;  // exponent 127 -> 15
    const uint32_t q = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;
    return (uint16_t)(sign | q);  // a carry into the exponent is the correct rounding
  }
  if (a < 0x33000000u) return sign;  // < 2^-25: rounds to zero (2^-25 itself is a tie to 0)
  // subnormal result: value / 2^-24, rounded to nearest even
  const uint32_t exp = a >> 23;                       // 102 ..= 112
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;  // 24 bits
  const uint32_t shift = 126u - exp;                  // 14 ..= 24
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return (uint16_t)(sign | q);
}

// bfloat16 is the top half of binary32: widening is exact, narrowing rounds to nearest even.
inline float bf16_bits_to_float(uint16_t b) { return f32_from_bits((uint32_t)b << 16); }
inline uint16_t float_to_bf16_bits_rn(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);  // quiet NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
}  // namespace gn_emu

inline float __uint_as_float(uint32_t u) { return gn_emu::f32_from_bits(u); }
inline float __half2float(__half h) { return gn_emu::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{gn_emu::float_to_half_bits_rn(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return gn_emu::bf16_bits_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{gn_emu::float_to_bf16_bits_rn(f)};
}
