// Thread-block cluster primitives (sm_90+): a barrier over every thread of the cluster and reads
// of another block's shared memory (distributed shared memory, DSMEM). On the GPU they are
// cooperative_groups' cluster operations; in host emulation the same code runs against the
// stand-in `cooperative_groups::this_cluster()` of host_emu.h, whose operations are the
// emulator's: it runs the blocks of a cluster side by side and checks the kernels' use of them.
//
// GN_CLUSTERS is 1 where clusters exist: device code for sm_90 and newer, and the emulator.
// Elsewhere (older architectures, nvcc's host pass) the cluster kernels compile to a trap that
// the host never launches (src/gpu/plan.rs plans clusters only on compute capability 9.0+).
#pragma once
#include "common.cuh"

#if defined(GN_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define GN_CLUSTERS 1
#else
#define GN_CLUSTERS 0
#endif

#if GN_CLUSTERS && !defined(GN_HOST_EMULATION)
#include <cooperative_groups.h>
#endif

// GN_IF_CLUSTERS(statements): the statements where clusters exist, else a trap (the body of a
// cluster kernel's entry point on older architectures).
#if GN_CLUSTERS
#define GN_IF_CLUSTERS(...) __VA_ARGS__
#else
#define GN_IF_CLUSTERS(...) __trap();
#endif

namespace gn {

// Bytes at the start of a cluster kernel's dynamic shared memory that its peers read: the
// block's partial results (at most 4 floats), padded so what follows stays 16-byte aligned.
constexpr uint32_t kClusterSlotBytes = 16;

#if GN_CLUSTERS

// Every thread of every block of the cluster arrives before any goes on; shared-memory writes
// before it are visible to the cluster's reads after it (release/acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
  cooperative_groups::this_cluster().sync();
}

// This block's rank in its cluster: blockIdx.x % cluster size for the one-dimensional clusters
// the host launches.
__device__ __forceinline__ uint32_t cluster_rank() {
  return cooperative_groups::this_cluster().block_rank();
}

// Blocks in the cluster.
__device__ __forceinline__ uint32_t cluster_size() {
  return cooperative_groups::this_cluster().num_blocks();
}

// The address of `p` (in this block's dynamic shared memory) in block `rank`'s shared memory.
// Assumes: `p` points into dynamic shared memory (the emulator maps nothing else), and block
// `rank` reaches a cluster_sync after the caller's last read through the result (a block's
// shared memory is gone once it exits).
template <typename T>
__device__ __forceinline__ const T* cluster_peer(const T* p, uint32_t rank) {
  return cooperative_groups::this_cluster().map_shared_rank(const_cast<T*>(p), (int)rank);
}

#endif  // GN_CLUSTERS
}  // namespace gn
