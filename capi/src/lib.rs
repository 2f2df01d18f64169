//! The C ABI of [`groupnorm`](gn): the [raw layer](gn::gpu::raw) behind `extern "C"` functions, for C, C++, Python
//! (`ctypes`) and any other language with a C FFI. The header is `include/groupnorm.h`; the library
//! is `libgroupnorm.so` (crate type `cdylib`) or `libgroupnorm.a` (`staticlib`).
//!
//! Conventions, the same for every function:
//!
//! - Functions that can fail return a [`groupnorm_status_t`] and set the calling thread's last
//!   error message ([`groupnorm_last_error`]): what went wrong, with the values involved, or the
//!   empty string on success.
//! - No panic crosses the boundary: every entry point runs its body under
//!   [`std::panic::catch_unwind`], and a caught panic (a bug in this crate) returns
//!   [`GROUPNORM_STATUS_INTERNAL`] with the panic's message.
//! - The problem is validated before anything touches the CUDA driver, so bad arguments get
//!   [`GROUPNORM_STATUS_INVALID_ARGUMENT`] and a message on any machine, GPU or not; only then is
//!   the device found from the stream ([`Gpu::for_stream`], cached per device).
//! - Tensor pointers are CUDA device pointers in the stream's device's primary context; NULL
//!   `weight`, `bias`, `dweight`, `dbias` mean absent. Statistics are f32 `mean` and `rstd` of
//!   shape `(N, G)`, row-major, as PyTorch's `native_group_norm` saves them.
//! - Nothing allocates device memory or synchronizes: work is enqueued on the caller's stream with
//!   the caller's workspace (sized by the `*_workspace_size` queries), so a call can be captured in
//!   a CUDA graph.
//! - Enumerations cross as `int32_t` values. On the Rust side they are transparent `i32` newtypes,
//!   not Rust `enum`s, so that any value a C caller passes is a valid Rust value; unknown values
//!   are refused with [`GROUPNORM_STATUS_INVALID_ARGUMENT`].
//!
//! # How the header is kept true to this file
//!
//! `include/groupnorm.h` is written by hand (for its comments), so a test checks it against the
//! code. The code's side is [`abi`], the ABI as data, built by the macros of this file from the
//! Rust definitions themselves:
//!
//! - enums and the problem struct are *declared* through macros (`c_enum!`, `c_struct!`) that also
//!   emit their tables (names, values, C field types derived from the Rust field types by
//!   [`abi::CType`], byte offsets from `offset_of!`);
//! - functions are written as plain Rust; the `c_functions!` list names each one with its parameter
//!   types, and for each it emits a compile-time coercion of the real function to the listed
//!   `extern "C" fn` pointer type, so the list cannot disagree with the functions (the crate stops
//!   compiling).
//!
//! `tests/c_abi.rs` then (1) parses the header's enums, struct and prototypes and requires them to
//! equal these tables, item by item, in both directions (names, values, argument names and types,
//! field order); (2) generates a C file from the tables that asserts every enum value, field type,
//! field offset, struct size and function pointer type against the header with a C compiler in
//! `-Werror` mode, and links it against the built library (every function is exported); (3)
//! requires every `extern "C" fn` in this file to be in the list.
//!
//! [`groupnorm_status_t`]: crate::groupnorm_status_t
//! [`groupnorm_last_error`]: crate::groupnorm_last_error
//! [`GROUPNORM_STATUS_INTERNAL`]: crate::GROUPNORM_STATUS_INTERNAL
//! [`GROUPNORM_STATUS_INVALID_ARGUMENT`]: crate::GROUPNORM_STATUS_INVALID_ARGUMENT
//! [`Gpu::for_stream`]: gn::gpu::Gpu::for_stream
//! [`abi`]: crate::abi
//! [`abi::CType`]: crate::abi::CType

#![allow(non_camel_case_types)] // C names: groupnorm_status_t, ...

// The Rust library this crate wraps, re-exported: Activation, DType, Error, GroupNorm, Layout
// and the rest by their plain names here (items defined here take precedence).
#[doc(hidden)]
pub use gn::*;

use gn::cudarc::driver::sys::{CUdeviceptr, CUresult};
use gn::gpu::raw::{self, BackwardPtrs, ForwardPtrs, Problem};
use gn::gpu::{Gpu, Path};
// (Activation, DType, Error, GroupNorm, Layout: through `pub use gn::*` above)
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use abi::CType;

/// Declares a C enumeration as a transparent `i32` newtype with one constant per value, and its
/// table ([`abi::CEnum`]).
macro_rules! c_enum {
    (
        $(#[$doc:meta])*
        $name:ident {
            $( $(#[$vdoc:meta])* $variant:ident = $value:literal, )+
        }
    ) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name(pub i32);

        $( $(#[$vdoc])* pub const $variant: $name = $name($value); )+

        impl CType for $name {
            fn c_name() -> String {
                stringify!($name).to_string()
            }
        }

        impl $name {
            /// The enumeration as data: its C name and its named values, in declaration order.
            pub fn table() -> abi::CEnum {
                abi::CEnum {
                    name: stringify!($name),
                    values: vec![$( (stringify!($variant), $value) ),+],
                }
            }
        }
    };
}

/// Declares a `#[repr(C)]` struct and its table ([`abi::CStruct`]).
macro_rules! c_struct {
    (
        $(#[$doc:meta])*
        $name:ident {
            $( $(#[$fdoc:meta])* $field:ident: $ty:ty, )+
        }
    ) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        pub struct $name {
            $( $(#[$fdoc])* pub $field: $ty, )+
        }

        impl CType for $name {
            fn c_name() -> String {
                stringify!($name).to_string()
            }
        }

        impl $name {
            /// The struct as data: C name, size, and each field's name, C type and offset.
            pub fn table() -> abi::CStruct {
                abi::CStruct {
                    name: stringify!($name),
                    size: std::mem::size_of::<$name>(),
                    fields: vec![$(abi::CField {
                        name: stringify!($field),
                        c_type: <$ty as CType>::c_name(),
                        offset: std::mem::offset_of!($name, $field),
                    }),+],
                }
            }
        }
    };
}

/// Lists the exported functions with their signatures: checks each against the real function at
/// compile time and emits the table ([`abi::functions`]).
macro_rules! c_functions {
    ( $( fn $name:ident( $( $arg:ident: $ty:ty ),* $(,)? ) -> $ret:ty; )+ ) => {
        // The real function must coerce to exactly this pointer type: a changed parameter or
        // return type, a missing parameter or a non-`extern "C"` function stops the build.
        $( const _: unsafe extern "C" fn( $( $ty ),* ) -> $ret = $name; )+

        /// Every exported function as data: name, C return type, parameter names and C types,
        /// in the header's order.
        pub fn functions() -> Vec<CFunction> {
            vec![$(CFunction {
                name: stringify!($name),
                ret: <$ret as CType>::c_name(),
                params: vec![$( (stringify!($arg), <$ty as CType>::c_name()) ),*],
            }),+]
        }
    };
}

c_enum! {
    /// What a call returned: `GROUPNORM_STATUS_OK`, or why it failed (the details are in
    /// [`groupnorm_last_error`]).
    groupnorm_status_t {
        /// Success.
        GROUPNORM_STATUS_OK = 0,
        /// A bad argument: NULL where a pointer is required, a negative or inconsistent
        /// dimension, groups not dividing channels, an unknown enum value, a bad eps, a
        /// parameter dtype that is neither f32 nor the activation dtype, too small a workspace.
        GROUPNORM_STATUS_INVALID_ARGUMENT = 1,
        /// A valid request this build or device does not support (yet): a layout without GPU
        /// kernels, a stream of a non-primary context, a device the kernels were not built for.
        GROUPNORM_STATUS_UNSUPPORTED = 2,
        /// The CUDA driver library (libcuda) could not be loaded.
        GROUPNORM_STATUS_NO_DRIVER = 3,
        /// The driver loaded but found no usable device.
        GROUPNORM_STATUS_NO_DEVICE = 4,
        /// The library was built without nvcc, so it carries no GPU kernels (or lacks one).
        GROUPNORM_STATUS_KERNELS_NOT_BUILT = 5,
        /// The device ran out of memory (loading the kernels).
        GROUPNORM_STATUS_OUT_OF_MEMORY = 6,
        /// Any other error from the CUDA driver (an invalid stream or context, a failed launch).
        GROUPNORM_STATUS_CUDA_ERROR = 7,
        /// A bug in this library (a caught panic); the message says where.
        GROUPNORM_STATUS_INTERNAL = 8,
    }
}

c_enum! {
    /// Element type of activations (`dtype`) or parameters (`param_dtype`).
    groupnorm_dtype_t {
        /// IEEE binary32.
        GROUPNORM_DTYPE_F32 = 0,
        /// IEEE binary16.
        GROUPNORM_DTYPE_F16 = 1,
        /// bfloat16.
        GROUPNORM_DTYPE_BF16 = 2,
    }
}

c_enum! {
    /// Memory order of activations whose logical dims are `(N, C, *spatial)`.
    groupnorm_layout_t {
        /// Contiguous `(N, C, *spatial)`, PyTorch's default.
        GROUPNORM_LAYOUT_NCHW = 0,
        /// Channels-last, contiguous `(N, *spatial, C)`.
        GROUPNORM_LAYOUT_NHWC = 1,
    }
}

c_enum! {
    /// Which kernel path to take (for tests and benchmarks; `AUTO` otherwise).
    groupnorm_path_t {
        /// The planner decides from the shape and the device.
        GROUPNORM_PATH_AUTO = 0,
        /// One block per group row, the row on chip; an error where a row does not fit.
        GROUPNORM_PATH_FUSED = 1,
        /// Rows split across blocks, partials merged in a fixed order.
        GROUPNORM_PATH_SPLIT = 2,
        /// Rows split across the blocks of a thread-block cluster, chunks on chip (compute
        /// capability 9.0+, NCHW); an error where that is not possible.
        GROUPNORM_PATH_CLUSTER = 3,
    }
}

c_enum! {
    /// The activation fused after the affine transform.
    groupnorm_activation_t {
        /// None: `y = xhat * weight + bias`.
        GROUPNORM_ACTIVATION_NONE = 0,
        /// SiLU: `y = silu(xhat * weight + bias)`, `silu(z) = z / (1 + exp(-z))`; the backward
        /// is [`groupnorm_backward_activated`] (it needs the bias).
        GROUPNORM_ACTIVATION_SILU = 1,
    }
}

c_struct! {
    /// One GroupNorm problem: everything but the pointers. Dims are always the logical
    /// `(N, C, *spatial)`, whatever the layout.
    groupnorm_problem_t {
        /// `ndims` values: `N`, `C`, then any number of spatial dims (none included); `ndims`
        /// is 2 to 64.
        dims: *const i64,
        /// Number of dims, at least 2.
        ndims: i32,
        /// Number of groups `G`, at least 1, dividing `C`.
        groups: i64,
        /// Added to the variance before the square root; finite and positive once converted to f32 (about 1.4e-45 to 3.4e38).
        eps: f64,
        /// Memory layout of the activations.
        layout: groupnorm_layout_t,
        /// Activation dtype (`x`, `y`, `dy`, `dx`).
        dtype: groupnorm_dtype_t,
        /// Parameter dtype (`weight`, `bias`, `dweight`, `dbias`): f32 or `dtype`.
        param_dtype: groupnorm_dtype_t,
        /// Kernel path; `GROUPNORM_PATH_AUTO` unless comparing paths.
        path: groupnorm_path_t,
        /// Activation fused after the affine transform; `GROUPNORM_ACTIVATION_NONE` (0) for
        /// plain GroupNorm.
        activation: groupnorm_activation_t,
    }
}

use abi::CFunction;

c_functions! {
    fn groupnorm_version() -> *const c_char;
    fn groupnorm_status_string(status: groupnorm_status_t) -> *const c_char;
    fn groupnorm_last_error() -> *const c_char;
    fn groupnorm_forward_workspace_size(
        problem: *const groupnorm_problem_t,
        stream: *mut c_void,
        bytes: *mut usize,
    ) -> groupnorm_status_t;
    fn groupnorm_backward_workspace_size(
        problem: *const groupnorm_problem_t,
        stream: *mut c_void,
        bytes: *mut usize,
    ) -> groupnorm_status_t;
    fn groupnorm_forward(
        problem: *const groupnorm_problem_t,
        x: *const c_void,
        y: *mut c_void,
        weight: *const c_void,
        bias: *const c_void,
        mean: *mut f32,
        rstd: *mut f32,
        workspace: *mut c_void,
        workspace_bytes: usize,
        stream: *mut c_void,
    ) -> groupnorm_status_t;
    fn groupnorm_backward(
        problem: *const groupnorm_problem_t,
        dy: *const c_void,
        x: *const c_void,
        mean: *const f32,
        rstd: *const f32,
        weight: *const c_void,
        dx: *mut c_void,
        dweight: *mut c_void,
        dbias: *mut c_void,
        workspace: *mut c_void,
        workspace_bytes: usize,
        stream: *mut c_void,
    ) -> groupnorm_status_t;
    fn groupnorm_backward_activated(
        problem: *const groupnorm_problem_t,
        dy: *const c_void,
        x: *const c_void,
        mean: *const f32,
        rstd: *const f32,
        weight: *const c_void,
        bias: *const c_void,
        dx: *mut c_void,
        dweight: *mut c_void,
        dbias: *mut c_void,
        workspace: *mut c_void,
        workspace_bytes: usize,
        stream: *mut c_void,
    ) -> groupnorm_status_t;
}

pub mod abi {
    //! The C ABI as data, generated from the Rust definitions of [`super`] (see "How the header
    //! is kept true to this file" there); `tests/c_abi.rs` compares it with
    //! `include/groupnorm.h`.
    //!
    //! C types are written as tokens separated by single spaces, qualifiers first:
    //! `const int64_t *`, `void *`, `size_t`, `groupnorm_status_t`.

    use super::*;

    /// A Rust type that crosses the C ABI, and its C spelling.
    pub trait CType {
        /// The C type, as tokens separated by single spaces (`const char *`).
        fn c_name() -> String;
    }

    macro_rules! c_scalar {
        ($($rust:ty => $c:literal),+ $(,)?) => {
            $(impl CType for $rust {
                fn c_name() -> String {
                    $c.to_string()
                }
            })+
        };
    }

    c_scalar! {
        c_void => "void",
        c_char => "char",
        i32 => "int32_t",
        i64 => "int64_t",
        f32 => "float",
        f64 => "double",
        usize => "size_t",
    }

    impl<T: CType> CType for *const T {
        fn c_name() -> String {
            format!("const {} *", T::c_name())
        }
    }

    impl<T: CType> CType for *mut T {
        fn c_name() -> String {
            format!("{} *", T::c_name())
        }
    }

    /// An enumeration: C name and `(value name, value)` pairs.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct CEnum {
        /// The typedef name (`groupnorm_status_t`).
        pub name: &'static str,
        /// Named values in declaration order.
        pub values: Vec<(&'static str, i32)>,
    }

    /// One field of a struct.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct CField {
        /// Field name.
        pub name: &'static str,
        /// C type of the field.
        pub c_type: String,
        /// Byte offset in the Rust (`#[repr(C)]`) struct.
        pub offset: usize,
    }

    /// A struct: C name, size and fields in declaration order.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct CStruct {
        /// The typedef name.
        pub name: &'static str,
        /// `sizeof` in bytes.
        pub size: usize,
        /// Fields in declaration order.
        pub fields: Vec<CField>,
    }

    /// A function: name, C return type, `(parameter name, C type)` pairs.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct CFunction {
        /// The exported symbol.
        pub name: &'static str,
        /// C return type.
        pub ret: String,
        /// Parameters in order (empty for `(void)`).
        pub params: Vec<(&'static str, String)>,
    }

    /// Every enumeration, in the header's order.
    pub fn enums() -> Vec<CEnum> {
        vec![
            groupnorm_status_t::table(),
            groupnorm_dtype_t::table(),
            groupnorm_layout_t::table(),
            groupnorm_path_t::table(),
            groupnorm_activation_t::table(),
        ]
    }

    /// Every struct, in the header's order.
    pub fn structs() -> Vec<CStruct> {
        vec![groupnorm_problem_t::table()]
    }

    pub use super::functions;
}

// ---------------------------------------------------------------------------------------------
// Errors: statuses, messages, the panic guard
// ---------------------------------------------------------------------------------------------

/// The status a [`gn::Error`] is reported as.
pub fn status_of(error: &Error) -> groupnorm_status_t {
    match error {
        Error::ZeroGroups
        | Error::ZeroChannels
        | Error::GroupsDoNotDivideChannels { .. }
        | Error::InvalidEps { .. }
        | Error::TooFewDims { .. }
        | Error::ChannelMismatch { .. }
        | Error::TooLarge { .. }
        | Error::LengthMismatch { .. }
        | Error::ShapeMismatch { .. }
        | Error::DtypeMismatch { .. }
        | Error::LayoutMismatch { .. }
        | Error::BiasNeeded { .. }
        | Error::InvalidStats { .. }
        | Error::Aliased { .. }
        | Error::Misaligned { .. } => GROUPNORM_STATUS_INVALID_ARGUMENT,
        Error::WeightNeeded => GROUPNORM_STATUS_INVALID_ARGUMENT,
        Error::DtypeNotOnGpu { .. }
        | Error::PathUnavailable { .. }
        | Error::ShapeNotOnGpu { .. }
        | Error::BaselineUnavailable { .. }
        | Error::ForeignContext { .. }
        | Error::NoKernelForDevice { .. } => GROUPNORM_STATUS_UNSUPPORTED,
        Error::NoDriver => GROUPNORM_STATUS_NO_DRIVER,
        Error::NoDevice { .. } => GROUPNORM_STATUS_NO_DEVICE,
        Error::KernelsNotBuilt | Error::KernelMissing { .. } => GROUPNORM_STATUS_KERNELS_NOT_BUILT,
        Error::OutOfMemory { .. } => GROUPNORM_STATUS_OUT_OF_MEMORY,
        Error::Driver { source, .. } if source.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            GROUPNORM_STATUS_OUT_OF_MEMORY
        }
        Error::Driver { .. } => GROUPNORM_STATUS_CUDA_ERROR,
        // `Error` is #[non_exhaustive] and lives in the library crate: a variant added there
        // without a status here is this crate's bug, reported as one
        _ => GROUPNORM_STATUS_INTERNAL,
    }
}

/// Why a call failed: its status and the message for [`groupnorm_last_error`].
#[derive(Debug)]
struct Failure {
    status: groupnorm_status_t,
    message: String,
}

impl Failure {
    fn invalid(message: impl Into<String>) -> Self {
        Failure {
            status: GROUPNORM_STATUS_INVALID_ARGUMENT,
            message: message.into(),
        }
    }
}

/// The error's message followed by its causes (a driver error is the `source` of the variant
/// that carries it, not part of its message).
fn with_causes(e: &Error) -> String {
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure {
            status: status_of(&e),
            message: with_causes(&e),
        }
    }
}

thread_local! {
    /// The message of the last status-returning call on this thread (empty after a success).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Replaces this thread's last error message. Never panics: interior NULs are escaped, and a
/// thread-local that is already torn down is left alone.
fn set_last_error(message: &str) {
    let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut e) = e.try_borrow_mut() {
            *e = message;
        }
    });
}

/// Text of a caught panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs the body of entry point `function` with panics caught, and turns its outcome into a
/// status and this thread's last error message (prefixed with the function's name).
fn guarded(function: &str, body: impl FnOnce() -> Result<(), Failure>) -> groupnorm_status_t {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            GROUPNORM_STATUS_OK
        }
        Ok(Err(failure)) => {
            set_last_error(&format!("{function}: {}", failure.message));
            failure.status
        }
        Err(payload) => {
            set_last_error(&format!(
                "{function}: internal error (a panic, please report it): {}",
                panic_message(payload.as_ref())
            ));
            GROUPNORM_STATUS_INTERNAL
        }
    }
}

/// A static string that stays valid for the life of the process.
fn static_str(s: &'static CStr) -> *const c_char {
    s.as_ptr()
}

// ---------------------------------------------------------------------------------------------
// Strings
// ---------------------------------------------------------------------------------------------

/// The crate's version (`"0.1.0"`), a static string.
#[no_mangle]
pub extern "C" fn groupnorm_version() -> *const c_char {
    const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    let text = catch_unwind(|| CStr::from_bytes_with_nul(VERSION.as_bytes()).unwrap_or(c"?"));
    static_str(text.unwrap_or(c"?"))
}

/// A short static description of `status` (`"invalid argument"`, ...); unknown values get
/// `"unknown status"`. Never NULL.
#[no_mangle]
pub extern "C" fn groupnorm_status_string(status: groupnorm_status_t) -> *const c_char {
    let text = catch_unwind(|| match status {
        GROUPNORM_STATUS_OK => c"ok",
        GROUPNORM_STATUS_INVALID_ARGUMENT => c"invalid argument",
        GROUPNORM_STATUS_UNSUPPORTED => c"unsupported",
        GROUPNORM_STATUS_NO_DRIVER => c"no CUDA driver (libcuda could not be loaded)",
        GROUPNORM_STATUS_NO_DEVICE => c"no CUDA device",
        GROUPNORM_STATUS_KERNELS_NOT_BUILT => {
            c"GPU kernels not built (the library was built without nvcc)"
        }
        GROUPNORM_STATUS_OUT_OF_MEMORY => c"out of device memory",
        GROUPNORM_STATUS_CUDA_ERROR => c"CUDA driver error",
        GROUPNORM_STATUS_INTERNAL => c"internal error",
        _ => c"unknown status",
    });
    static_str(text.unwrap_or(c"internal error"))
}

/// The message of the last status-returning call on the calling thread: what went wrong, or the
/// empty string after a success (or before any call). Never NULL. Valid until the next
/// status-returning call on this thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn groupnorm_last_error() -> *const c_char {
    let ptr = catch_unwind(|| {
        LAST_ERROR
            .try_with(|e| e.try_borrow().map(|e| e.as_ptr()).ok())
            .ok()
            .flatten()
    });
    ptr.ok().flatten().unwrap_or_else(|| static_str(c""))
}

// ---------------------------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------------------------

/// A problem read from C and validated, owning its dims.
struct Validated {
    dims: Vec<usize>,
    groups: usize,
    eps: f64,
    layout: Layout,
    dtype: DType,
    param_dtype: DType,
    path: Path,
    activation: Activation,
}

impl Validated {
    fn problem(&self) -> Problem<'_> {
        Problem::new(&self.dims, self.groups, self.dtype, self.param_dtype)
            .with_eps(self.eps)
            .with_layout(self.layout)
            .with_path(self.path)
            .with_activation(self.activation)
    }
}

fn dtype_of(name: &str, v: groupnorm_dtype_t) -> Result<DType, Failure> {
    match v {
        GROUPNORM_DTYPE_F32 => Ok(DType::F32),
        GROUPNORM_DTYPE_F16 => Ok(DType::F16),
        GROUPNORM_DTYPE_BF16 => Ok(DType::BF16),
        groupnorm_dtype_t(other) => Err(Failure::invalid(format!(
            "{name} is {other}, not a groupnorm_dtype_t (0 = F32, 1 = F16, 2 = BF16)"
        ))),
    }
}

/// The most dims a problem may have (`ndims`): N, C and up to 62 spatial dims.
const MAX_DIMS: usize = 64;

/// Reads and validates `*problem`: every check that needs no device, so that bad arguments are
/// reported the same on machines with and without a GPU. The raw layer checks again (and checks
/// the pointers) once the device is known.
///
/// # Safety
///
/// `problem` is NULL or points to a readable `groupnorm_problem_t` whose `dims`, when `ndims`
/// is 2 to [`MAX_DIMS`] and `dims` is not NULL, points to `ndims` readable `int64_t`.
unsafe fn read_problem(problem: *const groupnorm_problem_t) -> Result<Validated, Failure> {
    if problem.is_null() {
        return Err(Failure::invalid("problem is NULL"));
    }
    // SAFETY: non-null, so a readable struct by this function's contract; copied out by value,
    // unaligned, so that no reference to C memory is made.
    let p = unsafe { problem.read_unaligned() };
    if p.ndims < 2 {
        return Err(Failure::invalid(format!(
            "ndims is {}: the input needs at least 2 dims (N, C, *spatial)",
            p.ndims
        )));
    }
    // checked before anything is read or allocated: ndims = INT32_MAX would otherwise ask for a
    // 16 GiB vector (and read far past any real array)
    if p.ndims as usize > MAX_DIMS {
        return Err(Failure::invalid(format!(
            "ndims is {}: at most {MAX_DIMS} dims (N, C and up to {} spatial dims) are accepted",
            p.ndims,
            MAX_DIMS - 2
        )));
    }
    if p.dims.is_null() {
        return Err(Failure::invalid(format!(
            "dims is NULL but ndims is {}",
            p.ndims
        )));
    }
    let raw_dims: Vec<i64> = (0..p.ndims as usize)
        // SAFETY: `dims` is non-null and holds `ndims` values, by this function's contract;
        // `i < ndims`; read unaligned, so a misaligned array is not undefined behaviour here.
        .map(|i| unsafe { p.dims.add(i).read_unaligned() })
        .collect();
    let mut dims = Vec::with_capacity(raw_dims.len());
    for (i, &d) in raw_dims.iter().enumerate() {
        let d = usize::try_from(d).map_err(|_| {
            Failure::invalid(format!(
                "dims[{i}] is {d}: every dim must be non-negative and fit size_t \
                 (dims = {raw_dims:?})"
            ))
        })?;
        dims.push(d);
    }
    let groups = usize::try_from(p.groups).map_err(|_| {
        Failure::invalid(format!(
            "groups is {}: it must be at least 1 and divide the channels",
            p.groups
        ))
    })?;
    let layout = match p.layout {
        GROUPNORM_LAYOUT_NCHW => Layout::Nchw,
        GROUPNORM_LAYOUT_NHWC => Layout::Nhwc,
        groupnorm_layout_t(other) => {
            return Err(Failure::invalid(format!(
                "layout is {other}, not a groupnorm_layout_t (0 = NCHW, 1 = NHWC)"
            )))
        }
    };
    let path = match p.path {
        GROUPNORM_PATH_AUTO => Path::Auto,
        GROUPNORM_PATH_FUSED => Path::Fused,
        GROUPNORM_PATH_SPLIT => Path::Split,
        GROUPNORM_PATH_CLUSTER => Path::Cluster,
        groupnorm_path_t(other) => {
            return Err(Failure::invalid(format!(
                "path is {other}, not a groupnorm_path_t (0 = AUTO, 1 = FUSED, 2 = SPLIT, \
                 3 = CLUSTER)"
            )))
        }
    };
    let activation = match p.activation {
        GROUPNORM_ACTIVATION_NONE => Activation::None,
        GROUPNORM_ACTIVATION_SILU => Activation::Silu,
        groupnorm_activation_t(other) => {
            return Err(Failure::invalid(format!(
                "activation is {other}, not a groupnorm_activation_t (0 = NONE, 1 = SILU)"
            )))
        }
    };
    let dtype = dtype_of("dtype", p.dtype)?;
    let param_dtype = dtype_of("param_dtype", p.param_dtype)?;
    if param_dtype != dtype && param_dtype != DType::F32 {
        return Err(Error::DtypeMismatch {
            name: "param_dtype",
            activation: dtype,
            param: param_dtype,
        }
        .into());
    }
    // groups, channels, divisibility, eps, and sizes that overflow
    GroupNorm::new(groups, dims[1])?
        .with_eps(p.eps)?
        .with_layout(layout)
        .geometry(&dims)?;
    Ok(Validated {
        dims,
        groups,
        eps: p.eps,
        layout,
        dtype,
        param_dtype,
        path,
        activation,
    })
}

/// The device owning `stream`.
///
/// # Safety
///
/// `stream` is NULL or a valid `CUstream`/`cudaStream_t` for the duration of the call.
unsafe fn device_of(stream: *mut c_void) -> Result<Gpu, Failure> {
    // SAFETY: by this function's contract.
    Ok(unsafe { Gpu::for_stream(stream.cast()) }?)
}

/// A host-side pointer value as the device address it holds (NULL is 0, meaning absent).
fn dev<T>(p: *const T) -> CUdeviceptr {
    p as usize as CUdeviceptr
}

// ---------------------------------------------------------------------------------------------
// Workspace queries
// ---------------------------------------------------------------------------------------------

/// Shared body of the two workspace queries.
///
/// # Safety
///
/// As [`groupnorm_forward_workspace_size`].
unsafe fn workspace_size(
    problem: *const groupnorm_problem_t,
    stream: *mut c_void,
    bytes: *mut usize,
    query: fn(&Gpu, &Problem) -> gn::Result<usize>,
) -> Result<(), Failure> {
    if bytes.is_null() {
        return Err(Failure::invalid("bytes is NULL"));
    }
    // SAFETY: non-null, and writable by the caller's contract; 0 until the answer is known.
    unsafe { bytes.write_unaligned(0) };
    // SAFETY: the caller's contract covers `problem`.
    let v = unsafe { read_problem(problem) }?;
    // SAFETY: the caller's contract covers `stream`.
    let gpu = unsafe { device_of(stream) }?;
    let n = query(&gpu, &v.problem())?;
    // SAFETY: as above.
    unsafe { bytes.write_unaligned(n) };
    Ok(())
}

/// Writes to `*bytes` the workspace a [`groupnorm_forward`] of `*problem` needs on the device
/// of `stream` (0 for most shapes). `*bytes` is 0 when the call fails.
///
/// # Safety
///
/// `problem` is NULL or points to a valid `groupnorm_problem_t` (its `dims` to `ndims` values);
/// `bytes` is NULL or writable; `stream` is NULL (the legacy default stream of the current
/// context) or a valid CUDA stream.
#[no_mangle]
pub unsafe extern "C" fn groupnorm_forward_workspace_size(
    problem: *const groupnorm_problem_t,
    stream: *mut c_void,
    bytes: *mut usize,
) -> groupnorm_status_t {
    guarded("groupnorm_forward_workspace_size", || {
        // SAFETY: forwarded from this function's contract.
        unsafe { workspace_size(problem, stream, bytes, raw::forward_workspace_bytes) }
    })
}

/// Writes to `*bytes` the workspace a [`groupnorm_backward`] of `*problem` needs on the device
/// of `stream`. `*bytes` is 0 when the call fails.
///
/// # Safety
///
/// As [`groupnorm_forward_workspace_size`].
#[no_mangle]
pub unsafe extern "C" fn groupnorm_backward_workspace_size(
    problem: *const groupnorm_problem_t,
    stream: *mut c_void,
    bytes: *mut usize,
) -> groupnorm_status_t {
    guarded("groupnorm_backward_workspace_size", || {
        // SAFETY: forwarded from this function's contract.
        unsafe { workspace_size(problem, stream, bytes, raw::backward_workspace_bytes) }
    })
}

// ---------------------------------------------------------------------------------------------
// Forward and backward
// ---------------------------------------------------------------------------------------------

/// Enqueues a forward pass on `stream`: `y = (x - mean) * rstd * weight[c] + bias[c]`, and the
/// statistics `mean`, `rstd` (f32, `(N, G)`) for the backward pass.
///
/// # Safety
///
/// - `problem` as in [`groupnorm_forward_workspace_size`];
/// - `x`, `y`: device pointers to `N * C * S` elements of `problem.dtype` in its layout;
///   `weight`, `bias`: `C` elements of `problem.param_dtype`, or NULL; `mean`, `rstd`: `N * G`
///   f32; `workspace`: `workspace_bytes` bytes (NULL when 0 are needed); all in the primary
///   context of `stream`'s device, outputs not overlapping inputs or each other;
/// - `stream` is NULL (the legacy default stream of the current context) or a valid stream;
/// - all stay valid until the enqueued work has completed.
#[no_mangle]
pub unsafe extern "C" fn groupnorm_forward(
    problem: *const groupnorm_problem_t,
    x: *const c_void,
    y: *mut c_void,
    weight: *const c_void,
    bias: *const c_void,
    mean: *mut f32,
    rstd: *mut f32,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> groupnorm_status_t {
    guarded("groupnorm_forward", || {
        // SAFETY: the contract of this function covers `problem`.
        let v = unsafe { read_problem(problem) }?;
        // SAFETY: the contract of this function covers `stream`.
        let gpu = unsafe { device_of(stream) }?;
        let ptrs = ForwardPtrs::new(dev(x), dev(y), dev(mean), dev(rstd))
            .with_affine(dev(weight), dev(bias));
        // SAFETY: the pointers, the workspace and the stream are what raw::forward requires, by
        // this function's contract (the same contract, restated for C); `gpu` is the device of
        // `stream`, found from it.
        unsafe {
            raw::forward(
                &gpu,
                stream.cast(),
                &v.problem(),
                &ptrs,
                dev(workspace),
                workspace_bytes,
            )
        }?;
        Ok(())
    })
}

/// Enqueues a backward pass on `stream`: `dx` and, when asked for, `dweight` and `dbias`, from
/// `dy`, `x` and the statistics the forward pass saved. For a problem with an activation this
/// fails with `GROUPNORM_STATUS_INVALID_ARGUMENT`: use [`groupnorm_backward_activated`], which
/// takes the bias the activation's input needs.
///
/// # Safety
///
/// - `problem` as in [`groupnorm_forward_workspace_size`];
/// - `dy`, `x`, `dx`: device pointers to `N * C * S` elements of `problem.dtype`; `mean`,
///   `rstd`: the `N * G` f32 statistics of the forward pass of this `x`; `weight`: `C`
///   elements of `problem.param_dtype`, or NULL (weight 1); `dweight`, `dbias`: `C` elements,
///   written, or NULL (not computed; `dweight` needs `weight`); `workspace`: `workspace_bytes`
///   bytes; all in the primary context of `stream`'s device, outputs not overlapping inputs or
///   each other;
/// - `stream` is NULL or a valid stream; all stay valid until the enqueued work has completed.
#[no_mangle]
pub unsafe extern "C" fn groupnorm_backward(
    problem: *const groupnorm_problem_t,
    dy: *const c_void,
    x: *const c_void,
    mean: *const f32,
    rstd: *const f32,
    weight: *const c_void,
    dx: *mut c_void,
    dweight: *mut c_void,
    dbias: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> groupnorm_status_t {
    guarded("groupnorm_backward", || {
        // SAFETY: the contract of this function covers `problem`.
        let v = unsafe { read_problem(problem) }?;
        if v.activation != Activation::None {
            return Err(Failure::invalid(format!(
                "the problem's activation is {}: its backward recomputes `xhat * weight + bias`, \
                 so call groupnorm_backward_activated with the forward pass's bias (NULL only if \
                 it had none)",
                v.activation.name()
            )));
        }
        // (bias 0: read only with an activation)
        let ptrs = BackwardPtrs::new(dev(dy), dev(x), dev(mean), dev(rstd), dev(dx))
            .with_affine(dev(weight), 0)
            .with_param_grads(dev(dweight), dev(dbias));
        // SAFETY: forwarded from this function's contract.
        unsafe { backward(&v, &ptrs, workspace, workspace_bytes, stream) }
    })
}

/// Enqueues the backward pass of GroupNorm followed by `problem.activation`: as
/// [`groupnorm_backward`], with `dy` the gradient of the activation's output, and `bias` the
/// forward pass's bias (`C` elements of `problem.param_dtype`, or NULL if it had none), from
/// which the kernels recompute the activation's input on chip. With
/// `GROUPNORM_ACTIVATION_NONE` it is [`groupnorm_backward`] (the bias is not read).
///
/// # Safety
///
/// As [`groupnorm_backward`]; `bias` is NULL or a device pointer to `C` elements of
/// `problem.param_dtype` in the same context, valid until the enqueued work has completed.
#[no_mangle]
pub unsafe extern "C" fn groupnorm_backward_activated(
    problem: *const groupnorm_problem_t,
    dy: *const c_void,
    x: *const c_void,
    mean: *const f32,
    rstd: *const f32,
    weight: *const c_void,
    bias: *const c_void,
    dx: *mut c_void,
    dweight: *mut c_void,
    dbias: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> groupnorm_status_t {
    guarded("groupnorm_backward_activated", || {
        // SAFETY: the contract of this function covers `problem`.
        let v = unsafe { read_problem(problem) }?;
        let ptrs = BackwardPtrs::new(dev(dy), dev(x), dev(mean), dev(rstd), dev(dx))
            .with_affine(dev(weight), dev(bias))
            .with_param_grads(dev(dweight), dev(dbias));
        // SAFETY: forwarded from this function's contract.
        unsafe { backward(&v, &ptrs, workspace, workspace_bytes, stream) }
    })
}

/// Shared body of the two backward entry points, after the problem was read.
///
/// # Safety
///
/// As [`groupnorm_backward_activated`], for the pointers in `ptrs`.
unsafe fn backward(
    v: &Validated,
    ptrs: &BackwardPtrs,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> Result<(), Failure> {
    // SAFETY: the caller's contract covers `stream`.
    let gpu = unsafe { device_of(stream) }?;
    // SAFETY: as in `groupnorm_forward`, for raw::backward's contract.
    unsafe {
        raw::backward(
            &gpu,
            stream.cast(),
            &v.problem(),
            ptrs,
            dev(workspace),
            workspace_bytes,
        )
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gn::cudarc::driver::DriverError;

    fn last_error() -> String {
        // SAFETY: groupnorm_last_error never returns NULL and its string is NUL-terminated.
        unsafe { CStr::from_ptr(groupnorm_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_internal_with_its_message() {
        let status = guarded("groupnorm_test", || panic!("boom {}", 42));
        assert_eq!(status, GROUPNORM_STATUS_INTERNAL);
        let msg = last_error();
        assert!(msg.starts_with("groupnorm_test: internal error"), "{msg}");
        assert!(msg.contains("boom 42"), "{msg}");
        // and a success clears it
        assert_eq!(guarded("groupnorm_test", || Ok(())), GROUPNORM_STATUS_OK);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn messages_with_nul_bytes_survive() {
        let status = guarded("groupnorm_test", || Err(Failure::invalid("a\0b")));
        assert_eq!(status, GROUPNORM_STATUS_INVALID_ARGUMENT);
        assert_eq!(last_error(), "groupnorm_test: a\\0b");
    }

    #[test]
    fn every_error_variant_has_its_status() {
        let d = |r| DriverError(r);
        let cases = [
            (Error::ZeroGroups, GROUPNORM_STATUS_INVALID_ARGUMENT),
            (Error::ZeroChannels, GROUPNORM_STATUS_INVALID_ARGUMENT),
            (
                Error::GroupsDoNotDivideChannels {
                    groups: 3,
                    channels: 4,
                },
                GROUPNORM_STATUS_INVALID_ARGUMENT,
            ),
            (
                Error::InvalidEps { eps: -1.0 },
                GROUPNORM_STATUS_INVALID_ARGUMENT,
            ),
            (
                Error::TooFewDims {
                    got: 1,
                    dims: vec![3],
                },
                GROUPNORM_STATUS_INVALID_ARGUMENT,
            ),
            (
                Error::ChannelMismatch {
                    expected: 4,
                    got: 3,
                    dims: vec![1, 3],
                },
                GROUPNORM_STATUS_INVALID_ARGUMENT,
            ),
            (
                Error::TooLarge {
                    dims: vec![],
                    why: String::new(),
                },
                GROUPNORM_STATUS_INVALID_ARGUMENT,
            ),
            (
                Error::LengthMismatch {
                    name: "x",
                    expected: 1,
                    got: 0,
                    what: String::new(),
                },
                GROUPNORM_STATUS_INVALID_ARGUMENT,
            ),
            (
                Error::ShapeMismatch {
                    name: "x",
                    expected: vec![],
                    got: vec![],
                },
                GROUPNORM_STATUS_INVALID_ARGUMENT,
            ),
            (
                Error::DtypeMismatch {
                    name: "weight",
                    activation: DType::F16,
                    param: DType::BF16,
                },
                GROUPNORM_STATUS_INVALID_ARGUMENT,
            ),
            (
                Error::LayoutMismatch {
                    name: "x",
                    expected: Layout::Nchw,
                    got: Layout::Nhwc,
                },
                GROUPNORM_STATUS_INVALID_ARGUMENT,
            ),
            (
                Error::PathUnavailable {
                    path: "fused",
                    why: String::new(),
                },
                GROUPNORM_STATUS_UNSUPPORTED,
            ),
            (Error::WeightNeeded, GROUPNORM_STATUS_INVALID_ARGUMENT),
            (
                Error::DtypeNotOnGpu { dtype: DType::F64 },
                GROUPNORM_STATUS_UNSUPPORTED,
            ),
            (Error::NoDriver, GROUPNORM_STATUS_NO_DRIVER),
            (
                Error::NoDevice {
                    ordinal: 0,
                    count: 0,
                },
                GROUPNORM_STATUS_NO_DEVICE,
            ),
            (Error::KernelsNotBuilt, GROUPNORM_STATUS_KERNELS_NOT_BUILT),
            (
                Error::KernelMissing {
                    name: "k".into(),
                    source: d(CUresult::CUDA_ERROR_NOT_FOUND),
                },
                GROUPNORM_STATUS_KERNELS_NOT_BUILT,
            ),
            (
                Error::OutOfMemory {
                    bytes: 1,
                    source: d(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
                },
                GROUPNORM_STATUS_OUT_OF_MEMORY,
            ),
            (
                Error::Driver {
                    context: "loading".into(),
                    source: d(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
                },
                GROUPNORM_STATUS_OUT_OF_MEMORY,
            ),
            (
                Error::Driver {
                    context: "launching".into(),
                    source: d(CUresult::CUDA_ERROR_LAUNCH_FAILED),
                },
                GROUPNORM_STATUS_CUDA_ERROR,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(status_of(&error), status, "{error:?}");
        }
    }

    #[test]
    fn tables_describe_the_rust_types() {
        let s = groupnorm_problem_t::table();
        assert_eq!(s.size, std::mem::size_of::<groupnorm_problem_t>());
        let types: Vec<_> = s.fields.iter().map(|f| f.c_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "const int64_t *",
                "int32_t",
                "int64_t",
                "double",
                "groupnorm_layout_t",
                "groupnorm_dtype_t",
                "groupnorm_dtype_t",
                "groupnorm_path_t",
                "groupnorm_activation_t"
            ]
        );
        let f = abi::functions();
        let fwd = f.iter().find(|f| f.name == "groupnorm_forward").unwrap();
        assert_eq!(fwd.ret, "groupnorm_status_t");
        assert_eq!(fwd.params[5], ("mean", "float *".to_string()));
        assert_eq!(fwd.params[8], ("workspace_bytes", "size_t".to_string()));
    }
}
