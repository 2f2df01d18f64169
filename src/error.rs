//! The crate's one error type.
//!
//! Every way a call can go wrong has its own variant with the values a user needs to fix it:
//! what was expected and what was given. No public function panics on bad input.

use crate::dtype::DType;
use crate::Layout;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `groupnorm`.
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

    /// The backward of an activated operator was asked for without the bias it needs.
    #[error(
        "the backward of GroupNorm followed by {activation} recomputes `xhat * w + b`, so it \
         needs the bias the forward pass used: call `backward_activated` with it (pass None \
         only if the forward pass had no bias)"
    )]
    BiasNeeded {
        /// The configured activation's name.
        activation: &'static str,
    },

    /// A feature that exists on one path but not (yet) on this one.
    #[error("not supported: {what}")]
    Unsupported {
        /// What was asked for.
        what: String,
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
    #[error("kernel `{name}` is not in the embedded module ({source})")]
    KernelMissing {
        /// Name of the kernel.
        name: String,
        /// The driver's answer.
        source: cudarc::driver::DriverError,
    },

    /// A device allocation failed.
    #[error("out of device memory allocating {bytes} bytes ({source})")]
    OutOfMemory {
        /// Size of the failed request.
        bytes: usize,
        /// The driver's answer.
        source: cudarc::driver::DriverError,
    },

    /// Any other error from the CUDA driver, with what the crate was doing.
    #[error("CUDA driver error while {context}: {source}")]
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
