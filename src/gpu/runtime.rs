//! The CUDA runtime: finding the driver and a device, loading the embedded kernels once per
//! context, and looking kernels up by a dense id (`KernelId`, src/gpu/kernel_id.rs).

use super::kernel_id::{KernelId, Kind};
use super::plan::DeviceLimits;
use crate::{DType, Error, Result};
use cudarc::driver::sys::{
    self, CUdevice_attribute, CUevent_flags, CUfunction_attribute, CUresult,
};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Compute capabilities the embedded kernels were built for (SASS for each, PTX for the last),
/// comma-separated; empty when the crate was built without nvcc.
pub fn built_archs() -> &'static str {
    embedded::ARCHS
}

/// Names of every kernel entry point in the embedded fatbins (empty without nvcc).
pub fn entry_points() -> &'static [&'static str] {
    embedded::ENTRY_POINTS
}

/// The embedded fatbins, `(module name, image)` (empty without nvcc): for the kernel report
/// (tools/kernel-report), which disassembles them.
#[doc(hidden)]
pub fn embedded_fatbins() -> &'static [(&'static str, &'static [u8])] {
    embedded::MODULES
}

/// Whether this binary carries GPU kernels at all.
pub fn kernels_built() -> bool {
    !embedded::MODULES.is_empty()
}

/// Whether the CUDA driver library can be loaded on this machine. Never panics.
///
/// cudarc panics on first use when libcuda is missing, so this runs before any driver call. It
/// tries names that cudarc's own loader also tries (a subset of them, so "present" here means
/// cudarc will find a library too); cudarc's probe cannot be used directly because it exists only
/// in its dynamic-loading mode, and candle switches cudarc to dynamic linking.
pub fn driver_present() -> bool {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    // Once found, the driver stays: every later call (each C ABI and Python call asks, through
    // `Gpu::for_stream`) is one atomic load instead of up to three dlopen searches, the first of
    // which (`libcuda.so`, a development symlink most driver-only machines lack) fails after
    // walking the library path.
    static FOUND: AtomicBool = AtomicBool::new(false);
    if FOUND.load(Ordering::Relaxed) {
        return true;
    }
    let found = [
        format!("{DLL_PREFIX}cuda{DLL_SUFFIX}"),
        format!("{DLL_PREFIX}cuda{DLL_SUFFIX}.1"),
        format!("{DLL_PREFIX}nvcuda{DLL_SUFFIX}"),
    ]
    .iter()
    .any(|name| {
        // SAFETY: opening the driver library runs only its loader initialisation (libcuda has
        // no constructor with preconditions on us); the handle is closed again at once.
        unsafe { libloading::Library::new(name) }.is_ok()
    });
    if found {
        FOUND.store(true, Ordering::Relaxed);
    }
    found
}

/// A CUDA device ready to run the crate's kernels: its context, a stream, and the loaded kernels.
///
/// Cheap to clone; clones share the context, the stream and the loaded module.
#[derive(Clone, Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    limits: DeviceLimits,
    /// Shared, so that a clone (one per C ABI call, from [`Gpu::cached`]) allocates nothing.
    name: Arc<str>,
    capability: (i32, i32),
}

impl Gpu {
    /// Opens device `ordinal`: probes the driver first (so a machine without one gets
    /// [`Error::NoDriver`], never a panic), then the device, then loads the kernels (once per
    /// context; later calls reuse them).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        let count = match CudaContext::device_count() {
            Ok(n) => n.max(0) as usize,
            Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => 0,
            Err(e) => return Err(Error::driver("initializing the CUDA driver", e)),
        };
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        if !kernels_built() {
            return Err(Error::KernelsNotBuilt);
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::driver(format!("creating a context on device {ordinal}"), e))?;
        let attr = |a: CUdevice_attribute, what: &str| {
            ctx.attribute(a)
                .map_err(|e| Error::driver(format!("querying {what}"), e))
        };
        let sms = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "the SM count",
        )?;
        let smem = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "the shared memory per block",
        )?;
        let major = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            "the compute capability",
        )?;
        let minor = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            "the compute capability",
        )?;
        let name = ctx
            .name()
            .unwrap_or_else(|_| format!("CUDA device {ordinal}"))
            .into();
        let smem_optin = smem.max(0) as usize;
        let mut limits = DeviceLimits {
            sms: sms.max(1) as usize,
            // The planner's budget for dynamic shared memory: 2 KiB under the device's limit
            // leaves room for the kernels' static shared memory, which the same limit covers
            // (`Kernels::resolve` lets each kernel have the rest). Reduction scratch and flags
            // are at most 784 bytes (bwd_fused; sm_80 figures in docs/kernel-report.md), but the
            // sm_90+ figures there are 1 KiB higher (up to 1808 bytes): the system's reservation.
            // Whether the driver counts that in a kernel's static size has not been seen on a
            // GPU; 2 KiB covers both readings, so a plan never asks for more than a kernel may.
            smem_per_block: smem_optin.saturating_sub(2048),
            max_cluster: 0,
        };
        let kernels = Kernels::for_context(&ctx, (major, minor), smem_optin)?;
        if major >= 9 {
            ctx.bind_to_thread()
                .map_err(|e| Error::driver("binding the context", e))?;
            limits.max_cluster = kernels.max_cluster(limits.smem_per_block);
        }
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            kernels,
            limits,
            name,
            capability: (major, minor),
        })
    }

    /// The device that owns a stream a caller borrows to us (a framework's `CUstream`): found
    /// from the stream's context, opened once per device and cached. The stream must belong to
    /// the device's primary context (the one PyTorch, candle and the runtime API use), because
    /// the kernels are loaded there.
    ///
    /// # Safety
    ///
    /// `stream` is a valid CUDA stream handle (or null, the legacy default stream of the current
    /// context) for the duration of the call.
    pub unsafe fn for_stream(stream: cudarc::driver::sys::CUstream) -> Result<Self> {
        use cudarc::driver::sys;
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        let mut dev: sys::CUdevice = 0;
        // SAFETY: plain driver queries on a handle the caller vouches for, writing into locals.
        unsafe {
            let init = sys::cuInit(0);
            if init != CUresult::CUDA_SUCCESS {
                return Err(match init {
                    CUresult::CUDA_ERROR_NO_DEVICE => Error::NoDevice {
                        ordinal: 0,
                        count: 0,
                    },
                    e => Error::driver("initializing the CUDA driver", DriverError(e)),
                });
            }
            let r = if stream.is_null() {
                sys::cuCtxGetCurrent(&mut ctx)
            } else {
                sys::cuStreamGetCtx(stream, &mut ctx)
            };
            if r != CUresult::CUDA_SUCCESS || ctx.is_null() {
                return Err(Error::driver(
                    "finding the context of the stream",
                    DriverError(if ctx.is_null() {
                        CUresult::CUDA_ERROR_INVALID_CONTEXT
                    } else {
                        r
                    }),
                ));
            }
            let r = sys::cuCtxPushCurrent_v2(ctx);
            if r != CUresult::CUDA_SUCCESS {
                return Err(Error::driver(
                    "entering the stream's context",
                    DriverError(r),
                ));
            }
            let r = sys::cuCtxGetDevice(&mut dev);
            let mut popped: sys::CUcontext = std::ptr::null_mut();
            sys::cuCtxPopCurrent_v2(&mut popped);
            if r != CUresult::CUDA_SUCCESS {
                return Err(Error::driver("finding the stream's device", DriverError(r)));
            }
        }
        let gpu = Self::cached(dev.max(0) as usize)?;
        if gpu.ctx.cu_ctx() != ctx {
            return Err(Error::ForeignContext {
                what: "the stream".into(),
                why: "it was made in a non-primary CUDA context; create it in the device's \
                      primary context, as the runtime API and PyTorch do",
            });
        }
        Ok(gpu)
    }

    /// `Gpu::new(ordinal)`, opened once per process and device.
    pub fn cached(ordinal: usize) -> Result<Self> {
        static OPEN: OnceLock<Mutex<HashMap<usize, Gpu>>> = OnceLock::new();
        let open = OPEN.get_or_init(|| Mutex::new(HashMap::new()));
        let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = open.get(&ordinal) {
            return Ok(g.clone());
        }
        let g = Gpu::new(ordinal)?;
        open.insert(ordinal, g.clone());
        Ok(g)
    }

    /// The same device with work issued on `stream` (which must belong to this device's context).
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Self> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::ForeignContext {
                what: "the stream".into(),
                why: "pass a stream of this Gpu's device (its primary context)",
            });
        }
        Ok(Gpu {
            stream,
            ..self.clone()
        })
    }

    /// A new stream on this device, for work that should overlap with other streams.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx
            .new_stream()
            .map_err(|e| Error::driver("creating a stream", e))
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream this handle issues work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability (major, minor).
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// Streaming multiprocessor count.
    pub fn sm_count(&self) -> usize {
        self.limits.sms
    }

    pub(crate) fn limits(&self) -> DeviceLimits {
        if self.kernels.clusters_refused.load(Ordering::Relaxed) {
            DeviceLimits {
                max_cluster: 0,
                ..self.limits
            }
        } else {
            self.limits
        }
    }

    /// Remembers, for this context, that the driver refused a cluster launch for resources:
    /// every later plan in this context takes the split path (see [`Gpu::limits`]).
    pub(crate) fn refuse_clusters(&self) {
        self.kernels.clusters_refused.store(true, Ordering::Relaxed);
    }

    /// Makes this device's context current on the calling thread and returns a guard that
    /// makes the caller's previous context (or none) current again when dropped, so a call
    /// never leaves a multi-GPU caller (PyTorch through the C ABI) in another context.
    pub(crate) fn bind_scoped(&self) -> Result<ContextGuard> {
        let previous = cudarc::driver::result::ctx::get_current()
            .map_err(|e| Error::driver("reading the current context", e))?;
        let ours = self.ctx.cu_ctx();
        if previous == Some(ours) {
            // already current (the common case: one device, or a caller that binds it): what
            // `bind` would do but its second cuCtxGetCurrent, and the guard restores nothing
            self.ctx
                .check_err()
                .map_err(|e| Error::driver("making the context current", e))?;
        } else {
            self.bind()?;
        }
        Ok(ContextGuard { previous, ours })
    }

    /// Makes this device's context current on the calling thread (raw launches need it).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::driver("making the context current", e))
    }

    /// Kernel `id`, loaded in this context (resolved and configured on its first use).
    pub(crate) fn function(&self, id: KernelId) -> Result<&CudaFunction> {
        self.kernels.function(id)
    }

    /// Records a timing event on this handle's stream; two of them measure the GPU time of the
    /// work issued between them (see [`Gpu::elapsed_ms`]).
    pub fn timing_event(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| Error::driver("recording a timing event", e))
    }

    /// Milliseconds of GPU time between two timing events, waiting for the second to complete.
    pub fn elapsed_ms(start: &CudaEvent, end: &CudaEvent) -> Result<f64> {
        end.synchronize()
            .map_err(|e| Error::driver("waiting for a timing event", e))?;
        start
            .elapsed_ms(end)
            .map(f64::from)
            .map_err(|e| Error::driver("reading a timing event", e))
    }

    /// Waits until all work issued on this handle's stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::driver("synchronizing the stream", e))
    }
}

/// Restores the context that was current before [`Gpu::bind_scoped`].
pub(crate) struct ContextGuard {
    previous: Option<cudarc::driver::sys::CUcontext>,
    ours: cudarc::driver::sys::CUcontext,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let previous = self.previous.unwrap_or(std::ptr::null_mut());
        if previous != self.ours {
            // SAFETY: `previous` was current on this thread when the guard was made (or null,
            // which unbinds): the caller's context, which the caller keeps alive across its own
            // call into this crate. Nothing can be done about a failure in a destructor; the
            // driver reports it again on the caller's next call.
            let _ = unsafe { cudarc::driver::result::ctx::set_current(previous) };
        }
    }
}

/// The embedded modules loaded into one context, and the functions looked up so far.
pub(crate) struct Kernels {
    modules: Vec<Arc<CudaModule>>,
    /// The functions resolved so far, at [`KernelId::index`]: a launch finds its function with
    /// one atomic load, no name formatted and no lock taken.
    functions: Box<[OnceLock<CudaFunction>]>,
    /// The device's shared memory per block (opt-in), static and dynamic together.
    smem_optin: usize,
    /// Set once the driver refused a cluster launch in this context for resources (MPS limits,
    /// MIG, another process's clusters): from then on the planner takes the split path here.
    clusters_refused: AtomicBool,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels")
            .field("modules", &self.modules.len())
            .finish_non_exhaustive()
    }
}

/// One entry per context that has loaded the kernels: cudarc loads a module anew on every
/// `load_module` call, so the crate keeps its own cache. Keyed by the context handle.
type ModuleCache = Mutex<Vec<(usize, Arc<Kernels>)>>;

fn cache() -> &'static ModuleCache {
    static CACHE: OnceLock<ModuleCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(Vec::new()))
}

impl Kernels {
    fn for_context(
        ctx: &Arc<CudaContext>,
        capability: (i32, i32),
        smem_optin: usize,
    ) -> Result<Arc<Self>> {
        let key = ctx.cu_ctx() as usize;
        let mut cache = cache()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, k)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(k.clone());
        }
        let mut modules = Vec::with_capacity(embedded::MODULES.len());
        for (name, image) in embedded::MODULES {
            let module =
                ctx.load_module(Ptx::from_binary(image.to_vec()))
                    .map_err(|e| match e {
                        DriverError(CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU) => {
                            Error::NoKernelForDevice {
                                major: capability.0,
                                minor: capability.1,
                                built: built_archs().into(),
                            }
                        }
                        e => Error::driver(format!("loading the `{name}` kernel module"), e),
                    })?;
            modules.push(module);
        }
        let kernels = Arc::new(Kernels {
            modules,
            functions: (0..KernelId::COUNT).map(|_| OnceLock::new()).collect(),
            smem_optin,
            clusters_refused: AtomicBool::new(false),
        });
        cache.push((key, kernels.clone()));
        Ok(kernels)
    }

    /// The largest thread-block cluster the cluster kernels run with at the most shared memory
    /// the planner gives a block (so one block per SM), as the driver computes it for this
    /// device; 0 where it cannot say (the planner then never takes the cluster path).
    /// The context must be current.
    fn max_cluster(&self, smem_bytes: usize) -> usize {
        // the kernel with the most registers: a cluster size it reaches, the others reach too
        let id = KernelId::new(Kind::ClusterBwd, DType::F32, Some(DType::F32), Some(false));
        let Ok(f) = self.function(id) else {
            return 0;
        };
        let config = sys::CUlaunchConfig {
            gridDimX: 16 * 64,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: super::plan::THREADS,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem_bytes as u32,
            hStream: std::ptr::null_mut(),
            attrs: std::ptr::null_mut(),
            numAttrs: 0,
        };
        let mut size: std::ffi::c_int = 0;
        // SAFETY: `f` is a loaded function of the current context (the caller's contract),
        // `config` and `size` are valid for the call; the query launches nothing.
        let r =
            unsafe { sys::cuOccupancyMaxPotentialClusterSize(&mut size, f.cu_function(), &config) };
        match r.result() {
            Ok(()) => size.max(0) as usize,
            Err(_) => 0,
        }
    }

    /// Kernel `id`: from the table once resolved; the first use in this context finds it in the
    /// modules by name and configures it. Two threads resolving one kernel at once both
    /// configure it (the same attributes) and the first stored wins.
    fn function(&self, id: KernelId) -> Result<&CudaFunction> {
        let slot = &self.functions[id.index()];
        if let Some(f) = slot.get() {
            return Ok(f);
        }
        let f = self.resolve(id)?;
        Ok(slot.get_or_init(|| f))
    }

    /// Finds kernel `id` in the modules and sets its attributes.
    fn resolve(&self, id: KernelId) -> Result<CudaFunction> {
        let name = id.name();
        let mut last_err = None;
        for module in &self.modules {
            match module.load_function(&name) {
                Ok(f) => {
                    // Let the kernel use all the dynamic shared memory the device allows a block
                    // beside its static scratch (the planner stays 2 KiB under this); each launch
                    // still asks only for what its plan needs.
                    let static_smem = f.shared_size_bytes().unwrap_or(0).max(0) as usize;
                    let dynamic = self.smem_optin.saturating_sub(static_smem);
                    f.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        dynamic as i32,
                    )
                    .map_err(|e| Error::driver(format!("configuring kernel `{name}`"), e))?;
                    if id.kind.is_cluster() {
                        // clusters of more than 8 blocks (the portable limit) where the device
                        // has them: the planner asks for no more than `max_cluster`
                        f.set_attribute(
                            CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                            1,
                        )
                        .map_err(|e| Error::driver(format!("configuring kernel `{name}`"), e))?;
                    }
                    return Ok(f);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(Error::KernelMissing {
            name,
            source: last_err.unwrap_or(DriverError(CUresult::CUDA_ERROR_NOT_FOUND)),
        })
    }
}
