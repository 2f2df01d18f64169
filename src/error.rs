//! The crate's one error type.
//!
//! Every way a call can go wrong has its own variant with the values a user needs to fix it:
//! what was expected and what was given. No public function panics on bad input.

use crate::dtype::DType;
use crate::Layout;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `groupnorm`.
///
/// A CUDA driver error is the [`source`](std::error::Error::source) of the variant that carries
/// it, not repeated in its message: print the whole chain (`anyhow`'s `{:#}`, or a loop over
/// `source()`) to see both.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `groups` was zero.
    #[error("groups must be at least 1, got 0")]
    ZeroGroups,

    /// `channels` was zero.
    #[error("channels must be at least 1, got 0")]
    ZeroChannels,

    /// `channels` is not a multiple of `groups`.
    #[error(
        "channels ({channels}) must be divisible by groups ({groups}); \
         valid group counts divide {channels}"
    )]
    GroupsDoNotDivideChannels {
        /// Requested number of groups.
        groups: usize,
        /// Number of channels.
        channels: usize,
    },

    /// `eps` is not finite and positive once converted to f32 (every path computes in f32).
    #[error(
        "eps must be finite and positive in f32 (from about 1.4e-45 to 3.4e38, as every path \
         computes with `eps as f32`), got {eps}"
    )]
    InvalidEps {
        /// The rejected value.
        eps: f64,
    },

    /// The input has fewer than two dimensions.
    #[error("input must have at least 2 dims (N, C, *spatial), got {got} dim(s): {dims:?}")]
    TooFewDims {
        /// How many dims were given.
        got: usize,
        /// The dims as given.
        dims: Vec<usize>,
    },

    /// The input's channel dimension does not match the configuration.
    #[error(
        "input dims {dims:?} have {got} channels in dim 1, but this GroupNorm was built for \
         {expected} channels (dims are always given as (N, C, *spatial), whatever the layout)"
    )]
    ChannelMismatch {
        /// Channels the configuration expects.
        expected: usize,
        /// Channels found in the dims.
        got: usize,
        /// The dims as given.
        dims: Vec<usize>,
    },

    /// The product of the dims overflows `usize` (or a per-kernel limit).
    #[error("tensor of dims {dims:?} is too large: {why}")]
    TooLarge {
        /// The dims as given.
        dims: Vec<usize>,
        /// Which limit was passed.
        why: String,
    },

    /// A buffer's length does not match what the dims imply.
    #[error("`{name}` has {got} elements, but {expected} were expected ({what})")]
    LengthMismatch {
        /// Which argument (`x`, `dy`, `weight`, `mean`, ...).
        name: &'static str,
        /// Length the dims imply.
        expected: usize,
        /// Length given.
        got: usize,
        /// Where the expected length comes from.
        what: String,
    },

    /// Saved statistics hold values no forward pass writes.
    #[error(
        "statistics row {row} holds mean {mean} and rstd {rstd}, which no forward pass writes: \
         rstd must be finite and positive with a finite mean (or both NaN, for a row whose input \
         held NaN or Inf); pass the statistics the forward pass returned for this x"
    )]
    InvalidStats {
        /// Index `n * G + g` of the row.
        row: usize,
        /// Its mean.
        mean: f32,
        /// Its rstd.
        rstd: f32,
    },

    /// An output overlaps an input (or another output) on a path that cannot honour it.
    #[error(
        "`{output}` overlaps `{input}` in memory: {why}; pass a separate buffer for `{output}`"
    )]
    Aliased {
        /// The output argument.
        output: &'static str,
        /// The argument it overlaps.
        input: &'static str,
        /// Which path refused it, and why.
        why: String,
    },

    /// A device pointer is not aligned to its element type.
    #[error(
        "`{name}` (address {ptr:#x}) is not aligned to {align} bytes, the size of its elements: \
         pass a pointer to the start of an element"
    )]
    Misaligned {
        /// Which argument.
        name: &'static str,
        /// The address given.
        ptr: u64,
        /// The alignment its elements need.
        align: usize,
    },

    /// Two tensors that must have the same dims do not.
    #[error("`{name}` has dims {got:?}, but dims {expected:?} were expected")]
    ShapeMismatch {
        /// Which argument.
        name: &'static str,
        /// Expected dims.
        expected: Vec<usize>,
        /// Given dims.
        got: Vec<usize>,
    },

    /// Parameters must be f32 or the activation dtype.
    #[error(
        "`{name}` has dtype {param}, but activations are {activation}: \
         parameters must be f32 or {activation}"
    )]
    DtypeMismatch {
        /// Which argument.
        name: &'static str,
        /// Activation dtype.
        activation: DType,
        /// Parameter dtype given.
        param: DType,
    },

    /// A tensor's layout differs from the configuration's.
    #[error("`{name}` is {got:?}, but this GroupNorm is configured for {expected:?}")]
    LayoutMismatch {
        /// Which argument.
        name: &'static str,
        /// Layout of the configuration.
        expected: Layout,
        /// Layout of the tensor.
        got: Layout,
    },

    /// The backward of an activated operator was asked for through an entry point that takes
    /// no bias (the f64 reference's [`backward`](crate::cpu::reference::backward)).
    #[error(
        "the backward of GroupNorm followed by {activation} recomputes `xhat * w + b`, so it \
         needs the bias the forward pass used: call reference::backward_activated with it (None \
         only if the forward pass had no bias)"
    )]
    BiasNeeded {
        /// The configured activation's name.
        activation: &'static str,
    },

    /// `dweight` was asked for, but no weight was given: the gradient of a parameter the
    /// forward pass did not use does not exist.
    #[error(
        "dweight was asked for without a weight: pass the weight the forward pass used (or \
         leave dweight out if the forward pass had none)"
    )]
    WeightNeeded,

    /// f64 (or another dtype without kernels) was given to the GPU path.
    #[error(
        "{dtype} on the GPU: the kernels exist for f32, f16 and bf16 activations; use the CPU \
         path (GroupNorm::forward / backward) for {dtype}"
    )]
    DtypeNotOnGpu {
        /// The dtype given.
        dtype: DType,
    },

    /// The path forced with `GpuGroupNorm::with_path` (or the raw layer's `path`) cannot run
    /// this shape on this device. `Path::Auto` picks one that can.
    #[error("the {path} path cannot run this: {why}; use Path::Auto to let the planner choose")]
    PathUnavailable {
        /// The forced path (`fused`, `cluster`, ...).
        path: &'static str,
        /// Why, with the sizes and limits involved.
        why: String,
    },

    /// A shape that no GPU path can run on this device (the CPU path can).
    #[error("no GPU path can run this shape on this device: {why}; the CPU path can")]
    ShapeNotOnGpu {
        /// Why, with the sizes and limits involved.
        why: String,
    },

    /// The benchmark-only unfused baseline kernels (feature `bench`) cannot run this problem.
    #[error("the unfused baseline kernels cannot run this: {why}")]
    BaselineUnavailable {
        /// Why.
        why: String,
    },

    /// A stream or buffer belongs to another CUDA context than the one this call runs in.
    #[error("{what} belongs to another CUDA context than this call's: {why}")]
    ForeignContext {
        /// Which argument (`the stream`, `x`, ...).
        what: String,
        /// What to do about it.
        why: &'static str,
    },

    /// The device's compute capability has no kernel image in this binary.
    #[error(
        "no kernels for this device, of compute capability {major}.{minor}: this binary was \
         built for sm_{{{built}}}; set GROUPNORM_CUDA_ARCHS (or CUDA_COMPUTE_CAP) to include \
         {major}{minor} and rebuild"
    )]
    NoKernelForDevice {
        /// Compute capability, major.
        major: i32,
        /// Compute capability, minor.
        minor: i32,
        /// The architectures the binary embeds, comma-separated.
        built: String,
    },

    /// The CUDA driver library (libcuda) could not be loaded.
    #[error(
        "no CUDA driver: libcuda could not be loaded (install the NVIDIA driver, or add the \
         directory holding libcuda.so to LD_LIBRARY_PATH); the CPU path works without it"
    )]
    NoDriver,

    /// The driver loaded but there is no usable device with this ordinal.
    #[error("no CUDA device with ordinal {ordinal}: the driver reports {count} device(s)")]
    NoDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices the driver sees.
        count: usize,
    },

    /// The crate was built without nvcc, so no GPU kernels are in this binary.
    #[error(
        "this binary was built without CUDA kernels (nvcc was not found at build time): \
         install the CUDA toolkit or run scripts/install-nvcc.sh, set NVCC, and rebuild"
    )]
    KernelsNotBuilt,

    /// The embedded kernel image lacks a kernel this call needs.
    #[error("kernel `{name}` is not in the embedded module")]
    KernelMissing {
        /// Name of the kernel.
        name: String,
        /// The driver's answer.
        source: cudarc::driver::DriverError,
    },

    /// A device allocation failed.
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory {
        /// Size of the failed request.
        bytes: usize,
        /// The driver's answer.
        source: cudarc::driver::DriverError,
    },

    /// Any other error from the CUDA driver, with what the crate was doing.
    #[error("CUDA driver error while {context}")]
    Driver {
        /// What was being done (for a launch: the kernel's name).
        context: String,
        /// The driver's answer.
        source: cudarc::driver::DriverError,
    },
}

impl Error {
    /// Wraps a driver error with what was being done.
    pub(crate) fn driver(context: impl Into<String>, source: cudarc::driver::DriverError) -> Self {
        Error::Driver {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;
    use cudarc::driver::DriverError;

    /// The driver's answer is the source, not a second copy in the message: `anyhow` and
    /// other reporters print the message, then each source, so it would show twice.
    #[test]
    fn driver_errors_carry_their_cause_once() {
        let cases = [
            Error::driver(
                "launching `k`",
                DriverError(CUresult::CUDA_ERROR_INVALID_VALUE),
            ),
            Error::OutOfMemory {
                bytes: 64,
                source: DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
            },
            Error::KernelMissing {
                name: "k".into(),
                source: DriverError(CUresult::CUDA_ERROR_NOT_FOUND),
            },
        ];
        for e in cases {
            let message = e.to_string();
            let source = std::error::Error::source(&e).expect("the driver error is the source");
            assert!(source.downcast_ref::<DriverError>().is_some(), "{e:?}");
            // cudarc prints a DriverError as its Debug form, `DriverError(CUDA_ERROR_.., "..")`,
            // which asks libcuda for the text: formatting one here (no driver) would panic, as
            // the old messages, which embedded it, did
            assert!(!message.contains("DriverError"), "{message}");
        }
    }
}
