// The unfused baseline `groupnorm bench` compares against: GroupNorm structured as PyTorch's CUDA
// implementation structures it, so the table shows what the fused design gains.
//
// Forward, 2 kernels, 3 passes over memory: one block per (n, g) row computes the statistics
// (streaming Welford, no pivot), then an elementwise kernel re-reads x and writes y.
// Backward, 4 kernels, 5 passes: one block per (n, c) sums dy * x and dy; one block per row turns
// them into the coefficients of dx = c1 * dy + c2 * x + c3; an elementwise kernel re-reads x and dy
// and writes dx; one thread per channel reduces dweight and dbias over n.
//
// Same parameter structs as the fused kernels. Workspace for the backward: 2 * N * C sums, then
// 2 * N * G coefficients.
#include "common.cuh"

namespace gn {

constexpr int kBaseThreads = 256;

// Assumes: blockDim.x == kBaseThreads; called by every thread.
__device__ __forceinline__ Welford block_welford(Welford w) {
  __shared__ float sn[kBaseThreads], sm[kBaseThreads], s2[kBaseThreads];
  sn[threadIdx.x] = w.n;
  sm[threadIdx.x] = w.mean;
  s2[threadIdx.x] = w.m2;
  __syncthreads();
  for (int stride = kBaseThreads / 2; stride > 0; stride >>= 1) {
    if ((int)threadIdx.x < stride) {
      const Welford o = combine(Welford(sn[threadIdx.x], sm[threadIdx.x], s2[threadIdx.x]),
                                Welford(sn[threadIdx.x + stride], sm[threadIdx.x + stride],
                                        s2[threadIdx.x + stride]));
      sn[threadIdx.x] = o.n;
      sm[threadIdx.x] = o.mean;
      s2[threadIdx.x] = o.m2;
    }
    __syncthreads();
  }
  return Welford(sn[0], sm[0], s2[0]);
}

template <typename T>
__device__ void base_stats(const GnFwdParams& p) {
  const uint64_t row = blockIdx.x;
  const uint64_t len = (uint64_t)p.d * p.s;
  const T* x = static_cast<const T*>(p.x) + row * len;
  Welford w;
  for (uint64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float v = to_f32(x[i]);
    w.n += 1.f;
    const float delta = v - w.mean;
    w.mean += delta / w.n;
    w.m2 += delta * (v - w.mean);
  }
  w = block_welford(w);
  if (threadIdx.x == 0) {
    p.mean[row] = w.mean;
    p.rstd[row] = 1.0f / sqrtf((w.n > 0.f ? w.m2 / w.n : 0.f) + p.eps);
  }
}

template <typename T, typename P>
__device__ void base_norm(const GnFwdParams& p) {
  const uint64_t total = p.rows * p.d * p.s;
  const uint64_t c_count = (uint64_t)p.groups * p.d;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t nc = i / p.s;
    const uint32_t c = (uint32_t)(nc % c_count);
    const uint64_t row = (nc / c_count) * p.groups + c / p.d;
    const float a = p.rstd[row] * (w ? to_f32(w[c]) : 1.f);
    const float sh = (b ? to_f32(b[c]) : 0.f) - p.mean[row] * a;
    y[i] = from_f32<T>(to_f32(x[i]) * a + sh);
  }
}

// One block per (n, c): sum dy * x and sum dy over S.
template <typename T>
__device__ void base_bwd_sums(const GnBwdParams& p) {
  __shared__ float2 scratch[kWarp];
  const uint64_t nc = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + nc * p.s;
  const T* dy = static_cast<const T*>(p.dy) + nc * p.s;
  float2 acc = make_float2(0.f, 0.f);
  for (uint32_t i = threadIdx.x; i < p.s; i += blockDim.x) {
    const float g = to_f32(dy[i]);
    acc.x += g * to_f32(x[i]);
    acc.y += g;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) {
    p.partials[2 * nc] = acc.x;
    p.partials[2 * nc + 1] = acc.y;
  }
}

// One block per row: dx = c1 * dy + c2 * x + c3 with c1 = rstd * w[c] (per element),
// c2 = (sum_c w db * mean - sum_c w ds) * rstd^3 / L, c3 = -c2 * mean - sum_c w db * rstd / L.
template <typename P>
__device__ void base_bwd_coeffs(const GnBwdParams& p) {
  __shared__ float2 scratch[kWarp];
  const uint64_t row = blockIdx.x;
  const uint64_t n = row / p.groups;
  const uint32_t c0 = (uint32_t)(row % p.groups) * p.d;
  const uint32_t channels = p.groups * p.d;
  const P* w = static_cast<const P*>(p.weight);
  float2 acc = make_float2(0.f, 0.f);
  for (uint32_t j = threadIdx.x; j < p.d; j += blockDim.x) {
    const float wc = w ? to_f32(w[c0 + j]) : 1.f;
    acc.x += wc * p.partials[2 * (n * channels + c0 + j)];
    acc.y += wc * p.partials[2 * (n * channels + c0 + j) + 1];
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) {
    const float mean = p.mean[row], rstd = p.rstd[row];
    const float c2 = (acc.y * mean - acc.x) * rstd * rstd * rstd * p.inv_row_len;
    const float c3 = -c2 * mean - acc.y * rstd * p.inv_row_len;
    float* coeffs = p.partials + 2 * (size_t)p.batch * channels;
    coeffs[2 * row] = c2;
    coeffs[2 * row + 1] = c3;
  }
}

template <typename T, typename P>
__device__ void base_bwd_dx(const GnBwdParams& p) {
  const uint32_t channels = p.groups * p.d;
  const uint64_t total = p.rows * p.d * p.s;
  const P* w = static_cast<const P*>(p.weight);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const float* coeffs = p.partials + 2 * (size_t)p.batch * channels;
  T* dx = static_cast<T*>(p.dx);
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t nc = i / p.s;
    const uint32_t c = (uint32_t)(nc % channels);
    const uint64_t row = (nc / channels) * p.groups + c / p.d;
    const float c1 = p.rstd[row] * (w ? to_f32(w[c]) : 1.f);
    dx[i] = from_f32<T>(c1 * to_f32(dy[i]) + coeffs[2 * row] * to_f32(x[i]) + coeffs[2 * row + 1]);
  }
}

template <typename P>
__device__ void base_bwd_params(const GnBwdParams& p) {
  const uint32_t channels = p.groups * p.d;
  const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  float dw = 0.f, db = 0.f;
  for (uint32_t n = 0; n < p.batch; ++n) {
    const uint64_t row = (uint64_t)n * p.groups + c / p.d;
    const float ds = p.partials[2 * ((size_t)n * channels + c)];
    const float dbi = p.partials[2 * ((size_t)n * channels + c) + 1];
    dw += (ds - dbi * p.mean[row]) * p.rstd[row];
    db += dbi;
  }
  if (p.dweight) static_cast<P*>(p.dweight)[c] = from_f32<P>(dw);
  if (p.dbias) static_cast<P*>(p.dbias)[c] = from_f32<P>(db);
}

}  // namespace gn

#define GN_BASE_T(NAME, T)                                                                     \
  extern "C" __global__ void __launch_bounds__(gn::kBaseThreads)                               \
      groupnorm_base_stats_##NAME(const GnFwdParams p) {                                       \
    gn::base_stats<T>(p);                                                                      \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kBaseThreads)                               \
      groupnorm_base_bwd_sums_##NAME(const GnBwdParams p) {                                    \
    gn::base_bwd_sums<T>(p);                                                                   \
  }
#define GN_BASE_TP(NAME, T, P)                                                                 \
  extern "C" __global__ void __launch_bounds__(gn::kBaseThreads)                               \
      groupnorm_base_norm_##NAME(const GnFwdParams p) {                                        \
    gn::base_norm<T, P>(p);                                                                    \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kBaseThreads)                               \
      groupnorm_base_bwd_dx_##NAME(const GnBwdParams p) {                                      \
    gn::base_bwd_dx<T, P>(p);                                                                  \
  }
#define GN_BASE_P(NAME, P)                                                                     \
  extern "C" __global__ void __launch_bounds__(gn::kBaseThreads)                               \
      groupnorm_base_bwd_coeffs_##NAME(const GnBwdParams p) {                                  \
    gn::base_bwd_coeffs<P>(p);                                                                 \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(gn::kBaseThreads)                               \
      groupnorm_base_bwd_params_##NAME(const GnBwdParams p) {                                  \
    gn::base_bwd_params<P>(p);                                                                 \
  }

GN_BASE_T(f32, float)
GN_BASE_T(f16, __half)
GN_BASE_T(bf16, __nv_bfloat16)
GN_BASE_TP(f32_f32, float, float)
GN_BASE_TP(f16_f16, __half, __half)
GN_BASE_TP(f16_f32, __half, float)
GN_BASE_TP(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
GN_BASE_TP(bf16_f32, __nv_bfloat16, float)
GN_BASE_P(f32, float)
GN_BASE_P(f16, __half)
GN_BASE_P(bf16, __nv_bfloat16)
