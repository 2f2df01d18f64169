// Kernels that test the emulator itself (tests/gpu_emulated.rs, `emulator_*` tests): the warp and
// block reductions of common.cuh, and that broken synchronization is reported, not hung on.
// Compiled into the emulator only; they take GnFwdParams so the launch table can call them.
#include "cluster.cuh"
#include "common.cuh"

// y[i] = sum over the warp of x, then over the block (common.cuh's warp_sum and block_sum); the
// block sum goes to p.mean[blockIdx.x].
extern "C" __global__ void gn_emu_selftest_sums(const GnFwdParams p) {
  __shared__ float scratch[gn::kWarp];
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const float v = static_cast<const float*>(p.x)[i];
  static_cast<float*>(p.y)[i] = gn::warp_sum(v);
  const float total = gn::block_sum(v, scratch);
  if (threadIdx.x == 0) p.mean[blockIdx.x] = total;
}

// Even threads wait at __syncthreads while odd ones shuffle: can never complete.
extern "C" __global__ void gn_emu_selftest_divergent(const GnFwdParams p) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    static_cast<float*>(p.y)[threadIdx.x] = gn::warp_sum(1.0f);
  }
}

// Writes one byte past the dynamic shared memory it was launched with (p.s bytes). Declared
// in namespace gn, as in the kernels: the shim's smem_raw is gn::smem_raw.
namespace gn {
__device__ void smem_overflow(const GnFwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  if (threadIdx.x == 0) smem_raw[p.s] = 1;
}
}  // namespace gn
extern "C" __global__ void gn_emu_selftest_smem_overflow(const GnFwdParams p) {
  gn::smem_overflow(p);
}

// Threads past p.s return at once; the others meet at __syncthreads (exited threads do not
// count there) and write y[t] = number of live threads, read back through shared memory.
extern "C" __global__ void gn_emu_selftest_early_exit(const GnFwdParams p) {
  __shared__ unsigned count[1];
  if (threadIdx.x >= p.s) return;
  if (threadIdx.x == 0) count[0] = 0;
  __syncthreads();
  if (threadIdx.x == 0) count[0] = p.s;
  __syncthreads();
  static_cast<float*>(p.y)[threadIdx.x] = (float)count[0];
}

// A 16-byte vector load from x + p.s floats: faults (as on the GPU) unless 16-byte aligned.
extern "C" __global__ void gn_emu_selftest_vector_load(const GnFwdParams p) {
  const float* x = static_cast<const float*>(p.x) + p.s;
  const gn::Vec16<float> v = gn::load16(x);
  static_cast<float*>(p.y)[threadIdx.x] = v.v[0];
}

// Thread-block clusters. Each block puts blockIdx.x + 1 in its dynamic shared memory; after a
// cluster barrier every thread writes the sum of its cluster's values, read in rank order through
// cluster_peer, to y[i], and thread 0 the block's rank to mean[blockIdx.x]. p.s picks a mistake:
// 0 none; 1 the final cluster barrier is left out (a block may exit while its memory is read);
// 2 rank 0 alone passes one more cluster barrier.
namespace gn {
__device__ void cluster_exchange(const GnFwdParams& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* mine = reinterpret_cast<float*>(smem_raw);
  if (threadIdx.x == 0) mine[0] = (float)(blockIdx.x + 1);
  cluster_sync();
  float sum = 0.f;
  for (uint32_t r = 0; r < cluster_size(); ++r) sum += cluster_peer(mine, r)[0];
  static_cast<float*>(p.y)[(size_t)blockIdx.x * blockDim.x + threadIdx.x] = sum;
  if (threadIdx.x == 0) p.mean[blockIdx.x] = (float)cluster_rank();
  if (p.s != 1) cluster_sync();
  if (p.s == 2 && cluster_rank() == 0) cluster_sync();
}
}  // namespace gn
extern "C" __global__ void gn_emu_selftest_cluster(const GnFwdParams p) {
  gn::cluster_exchange(p);
}
