//! Public limits of the named devices, each figure with its source.

use groupnorm::gpu::DeviceLimits;

/// One device's public limits.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    /// The `--device` key.
    pub key: &'static str,
    /// Product name.
    pub name: &'static str,
    /// Compute capability, e.g. 90.
    pub cc: u32,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Shared memory per SM, KiB.
    pub smem_per_sm_kib: u32,
    /// Dynamic shared memory one block may opt into, KiB.
    pub smem_per_block_kib: u32,
    /// 32-bit registers per SM.
    pub regs_per_sm: u32,
    /// Resident threads per SM.
    pub threads_per_sm: u32,
    /// Resident blocks per SM.
    pub blocks_per_sm: u32,
    /// Largest thread-block cluster (0: none).
    pub max_cluster: u32,
    /// L2 cache, MiB.
    pub l2_mib: u32,
    /// Boost clock, MHz.
    pub clock_mhz: u32,
    /// DRAM bandwidth, GB/s: the datasheet figure, not measured here.
    pub copy_gbs: u32,
    /// Where the figures come from.
    pub source: &'static str,
}

impl Device {
    /// What the crate's planner needs.
    pub fn limits(&self) -> DeviceLimits {
        DeviceLimits::new(
            self.sms as usize,
            self.smem_per_block_kib as usize * 1024,
            self.max_cluster as usize,
        )
    }
}

const CUDA_GUIDE: &str =
    "CUDA C++ Programming Guide, table \"Technical Specifications per Compute \
                          Capability\" (smem, registers, threads, blocks per SM; cluster 16 is the \
                          non-portable maximum of cudaFuncAttributeNonPortableClusterSizeAllowed)";

/// The named devices, in report order.
pub const DEVICES: [Device; 5] = [
    Device {
        key: "h100",
        name: "H100 SXM5 80GB",
        cc: 90,
        sms: 132,
        smem_per_sm_kib: 228,
        smem_per_block_kib: 227,
        regs_per_sm: 65536,
        threads_per_sm: 2048,
        blocks_per_sm: 32,
        max_cluster: 16,
        l2_mib: 50,
        clock_mhz: 1980,
        copy_gbs: 3350,
        source: "NVIDIA H100 Tensor Core GPU Architecture whitepaper (SMs, L2, clock); H100 \
                 datasheet (3.35 TB/s HBM3)",
    },
    Device {
        key: "h200",
        name: "H200 SXM 141GB",
        cc: 90,
        sms: 132,
        smem_per_sm_kib: 228,
        smem_per_block_kib: 227,
        regs_per_sm: 65536,
        threads_per_sm: 2048,
        blocks_per_sm: 32,
        max_cluster: 16,
        l2_mib: 50,
        clock_mhz: 1980,
        copy_gbs: 4800,
        source: "NVIDIA H200 datasheet (4.8 TB/s HBM3e; the same GH100 SMs, L2 and clock as \
                 the H100 SXM5 of the H100 whitepaper)",
    },
    Device {
        key: "a100",
        name: "A100 SXM4 80GB",
        cc: 80,
        sms: 108,
        smem_per_sm_kib: 164,
        smem_per_block_kib: 163,
        regs_per_sm: 65536,
        threads_per_sm: 2048,
        blocks_per_sm: 32,
        max_cluster: 0,
        l2_mib: 40,
        clock_mhz: 1410,
        copy_gbs: 2039,
        source: "NVIDIA A100 Tensor Core GPU Architecture whitepaper (SMs, L2, clock); A100 \
                 datasheet (2,039 GB/s, 80GB SXM)",
    },
    Device {
        key: "l40s",
        name: "L40S",
        cc: 89,
        sms: 142,
        smem_per_sm_kib: 100,
        smem_per_block_kib: 99,
        regs_per_sm: 65536,
        threads_per_sm: 1536,
        blocks_per_sm: 24,
        max_cluster: 0,
        l2_mib: 96,
        clock_mhz: 2520,
        copy_gbs: 864,
        source: "NVIDIA L40S datasheet (864 GB/s); NVIDIA Ada GPU Architecture whitepaper \
                 (AD102: 142 SMs enabled on L40S, 96 MiB L2, boost clock)",
    },
    Device {
        key: "rtx4090",
        name: "GeForce RTX 4090",
        cc: 89,
        sms: 128,
        smem_per_sm_kib: 100,
        smem_per_block_kib: 99,
        regs_per_sm: 65536,
        threads_per_sm: 1536,
        blocks_per_sm: 24,
        max_cluster: 0,
        l2_mib: 72,
        clock_mhz: 2520,
        copy_gbs: 1008,
        source: "NVIDIA Ada GPU Architecture whitepaper (128 SMs, 72 MiB L2, 2.52 GHz boost, \
                 1,008 GB/s GDDR6X)",
    },
];

/// Where the per-compute-capability limits come from.
pub fn cc_source() -> &'static str {
    CUDA_GUIDE
}

/// The device named `key`.
pub fn by_key(key: &str) -> Option<Device> {
    DEVICES.iter().copied().find(|d| d.key == key)
}
