//! CUDA backend runtime: the kernels compiled from `cuda/*.cu` at build time, a device handle
//! that loads them, and checked launches of each op on device buffers.
//!
//! ```no_run
//! use braid_kernels::cuda::CudaDevice;
//! # fn main() -> Result<(), braid_kernels::cuda::CudaError> {
//! let dev = CudaDevice::new(0)?;
//! let x = dev.upload(&[1.0f32, 2.0, 3.0, 4.0])?;
//! let w = dev.upload(&[1.0f32, 1.0])?;
//! let mut y = dev.alloc_zeros::<f32>(4)?;
//! dev.rms_norm(&x, &w, &mut y, 2, 2, 1e-6)?;
//! let host = dev.download(&y)?;
//! # let _ = host;
//! # Ok(())
//! # }
//! ```
//!
//! Every op takes its buffers as anything cudarc can hand out a device pointer for (a
//! [`CudaSlice`], or a [`CudaView`]/[`CudaViewMut`] into one), checks their lengths against the
//! shape it is given, and enqueues the kernel on the device's stream without waiting for it.
//! Errors raised by a running kernel surface at the next synchronising call.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self as driver_sys, CUdeviceptr, CUfunction_attribute, CUresult};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

pub use attention::{AttentionParams, DecodeRope};
pub use cudarc::driver::sys::{
    CUgraphInstantiate_flags as GraphFlags, CUstreamCaptureMode as CaptureMode,
};
pub use cudarc::driver::{
    CudaGraph, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice, DriverError,
    PinnedHostSlice,
};
pub use rope::{RopeParams, ROPE_MAX_HEAD_DIM, SKIP_SLOT};
pub use sampling::{SamplingBuffers, SamplingRow, SAMPLE_MAX_VOCAB};

mod attention;
pub mod cascade;
mod kv_copy;
mod linear;
mod rope;
mod sampling;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/cuda_modules.rs"));
}
use generated::consts;

// The launch configurations below rely on these relations between the header's constants.
const _: () = assert!(
    consts::ELEMENTWISE_BLOCK_THREADS <= consts::MAX_BLOCK_THREADS
        && consts::ELEMENTWISE_BLOCK_THREADS / consts::WARP_SIZE * consts::WARP_SIZE
            == consts::ELEMENTWISE_BLOCK_THREADS
        && consts::MAX_BLOCK_THREADS / consts::WARP_SIZE <= consts::WARP_SIZE
);

/// Whether nvcc compiled the kernels into this build; without them, opening a device that exists
/// fails with [`CudaError::KernelsNotBuilt`].
pub fn kernels_built() -> bool {
    cfg!(braid_cuda_kernels)
}

/// The compiled image (a fatbin: sm_90a SASS plus compute_80 PTX) of the module built from
/// `cuda/<name>.cu`, or `None` when no such module was built. The bytes are 16-byte aligned.
pub fn module_ptx_or_fatbin(name: &str) -> Option<&'static [u8]> {
    generated::MODULES
        .iter()
        .find(|(module, _)| *module == name)
        .map(|(_, image)| *image)
}

/// Names of every compiled module, in file-name order.
pub fn module_names() -> impl Iterator<Item = &'static str> {
    generated::MODULES.iter().map(|(name, _)| *name)
}

/// Why a CUDA device could not be opened or an op could not be launched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The CUDA driver library (libcuda) is not installed or cannot be loaded.
    #[error("no CUDA driver found: the libcuda shared library could not be loaded")]
    NoDriver,
    /// The driver works but has no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver sees {count} device(s)")]
    NoDevice { ordinal: usize, count: usize },
    /// The crate was compiled without nvcc, so there is nothing to launch.
    #[error("built without CUDA kernels: nvcc was not found when braid-kernels was compiled")]
    KernelsNotBuilt,
    /// The driver rejected an embedded module (typically a driver too old for its PTX).
    #[error("CUDA module `{module}` could not be loaded on device {ordinal}: {source}")]
    ModuleLoad {
        module: &'static str,
        ordinal: usize,
        source: DriverError,
    },
    /// A module loaded but lacks a kernel this runtime launches.
    #[error("CUDA kernel `{kernel}` was not found in module `{module}`: {source}")]
    MissingKernel {
        kernel: String,
        module: &'static str,
        source: DriverError,
    },
    /// A buffer's length does not match the shape passed to the op.
    #[error("{op}: `{buffer}` holds {actual} elements, expected {expected}")]
    BufferLength {
        op: &'static str,
        buffer: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A dimension exceeds what the kernel's 32-bit indexing or grid can cover.
    #[error("{op}: {dimension} is {value}, above the kernel limit of {limit}")]
    TooLarge {
        op: &'static str,
        dimension: &'static str,
        value: usize,
        limit: usize,
    },
    /// A scalar argument is outside its valid range.
    #[error("{op}: {argument} must be {expected}, found {found}")]
    InvalidArgument {
        op: &'static str,
        argument: &'static str,
        expected: &'static str,
        found: String,
    },
    /// A buffer was allocated through another CUDA context than this device's.
    #[error("{op}: `{buffer}` belongs to another CUDA context than device {ordinal}")]
    ForeignBuffer {
        op: &'static str,
        buffer: &'static str,
        ordinal: usize,
    },
    /// A driver call failed (allocation, copy, launch, or a fault reported on synchronisation).
    #[error(
        "allocating {bytes} bytes of device memory failed ({free} of {total} bytes free): {source}"
    )]
    Allocation {
        bytes: usize,
        free: usize,
        total: usize,
        source: DriverError,
    },
    #[error("CUDA driver call failed during {op}: {source}")]
    Driver {
        op: &'static str,
        source: DriverError,
    },
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A storage dtype the kernels are instantiated for: `f32`, `half::f16` or `half::bf16`.
/// Whatever the storage, kernels accumulate in f32.
pub trait KernelFloat: DeviceRepr + ValidAsZeroBits + Copy + sealed::Sealed {
    /// Suffix of the kernel names for this dtype (`rms_norm_bf16`).
    const SUFFIX: &'static str;
    #[doc(hidden)]
    const INDEX: usize;
}

impl KernelFloat for f32 {
    const SUFFIX: &'static str = "f32";
    const INDEX: usize = 0;
}
impl KernelFloat for half::f16 {
    const SUFFIX: &'static str = "f16";
    const INDEX: usize = 1;
}
impl KernelFloat for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const INDEX: usize = 2;
}

const DTYPE_SUFFIXES: [&str; 3] = [
    <f32 as KernelFloat>::SUFFIX,
    <half::f16 as KernelFloat>::SUFFIX,
    <half::bf16 as KernelFloat>::SUFFIX,
];

#[derive(Clone, Copy)]
enum Op {
    RmsNorm,
    FusedAddRmsNorm,
    SiluMul,
    Embedding,
}

impl Op {
    const ALL: [Op; 4] = [Op::RmsNorm, Op::FusedAddRmsNorm, Op::SiluMul, Op::Embedding];

    fn module(self) -> &'static str {
        match self {
            Op::RmsNorm | Op::FusedAddRmsNorm => "norm",
            Op::SiluMul => "activation",
            Op::Embedding => "embedding",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::RmsNorm => "rms_norm",
            Op::FusedAddRmsNorm => "fused_add_rms_norm",
            Op::SiluMul => "silu_mul",
            Op::Embedding => "embedding",
        }
    }
}

/// Largest row width the kernels accept: chunk offsets are computed in 32-bit ints and must not
/// overflow past the end of a row.
const MAX_DIM: usize = (i32::MAX as usize) / 2;
/// Largest row count: rows index the grid (norm) or are walked with a 32-bit counter.
const MAX_ROWS: usize = i32::MAX as usize;

/// One CUDA device with Braid's kernels loaded and a stream to launch them on.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Indexed by `op as usize * 3 + dtype index`.
    functions: Vec<CudaFunction>,
    /// Every embedded module, by name, for op families that look their kernels up by name.
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    /// Kernels looked up by name so far.
    named: std::sync::Mutex<std::collections::HashMap<String, CudaFunction>>,
    /// A second stream and its fork and join events, created on first use (see
    /// [`CudaDevice::fork_side_stream`]).
    side: std::sync::OnceLock<SideStream>,
    /// Compute capability (major, minor), read once at open: kernel choices depend on it.
    capability: (i32, i32),
}

/// A stream for kernels that run beside the main stream's, and the two events that order it
/// against the main stream. Reusing the events is sound: a wait applies to the event's most
/// recent record when the wait is enqueued.
struct SideStream {
    stream: Arc<CudaStream>,
    fork: CudaEvent,
    join: CudaEvent,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// Opens device `ordinal`, loads every kernel module and creates the launch stream.
    pub fn new(ordinal: usize) -> Result<CudaDevice, CudaError> {
        // SAFETY: only tries to dlopen libcuda; cudarc panics on the first driver call instead of
        // returning an error when the library is missing, so this check must come first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        let count = match CudaContext::device_count() {
            Ok(n) => usize::try_from(n).unwrap_or(0),
            // A driver without any visible GPU fails cuInit with NO_DEVICE.
            Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => 0,
            Err(source) => {
                return Err(CudaError::Driver {
                    op: "driver initialisation",
                    source,
                })
            }
        };
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        if !kernels_built() {
            return Err(CudaError::KernelsNotBuilt);
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_error("context creation"))?;
        let capability = ctx
            .compute_capability()
            .map_err(driver_error("compute capability query"))?;
        // Every op of this device runs on its one stream, so cudarc's cross-stream events are not
        // needed; they would also cost ~1 µs per buffer per launch and cannot sit inside a
        // CUDA graph capture.
        // SAFETY: buffers of this device are only ever used on `stream`.
        unsafe { ctx.disable_event_tracking() };
        // A dedicated stream rather than the legacy default one, so launches can be captured
        // into CUDA graphs.
        let stream = ctx.new_stream().map_err(driver_error("stream creation"))?;

        let mut modules: Vec<(&'static str, Arc<CudaModule>)> = Vec::new();
        let mut functions = Vec::with_capacity(Op::ALL.len() * DTYPE_SUFFIXES.len());
        for op in Op::ALL {
            let module_name = op.module();
            let module = match modules.iter().find(|(name, _)| *name == module_name) {
                Some((_, module)) => module.clone(),
                None => {
                    let module = load_module(&ctx, module_name, ordinal)?;
                    modules.push((module_name, module.clone()));
                    module
                }
            };
            for suffix in DTYPE_SUFFIXES {
                let kernel = format!("{}_{suffix}", op.name());
                let function =
                    module
                        .load_function(&kernel)
                        .map_err(|source| CudaError::MissingKernel {
                            kernel: kernel.clone(),
                            module: module_name,
                            source,
                        })?;
                functions.push(function);
            }
        }
        for name in module_names() {
            if modules.iter().all(|(n, _)| *n != name) {
                modules.push((name, load_module(&ctx, name, ordinal)?));
            }
        }
        Ok(CudaDevice {
            ordinal,
            ctx,
            stream,
            functions,
            modules,
            named: Default::default(),
            side: Default::default(),
            capability,
        })
    }

    /// The kernel named `kernel` in module `module` (a `cuda/<module>.cu` file), loaded once and cached.
    pub(crate) fn kernel(
        &self,
        module: &'static str,
        kernel: &str,
    ) -> Result<CudaFunction, CudaError> {
        let mut named = self.named.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = named.get(kernel) {
            return Ok(f.clone());
        }
        let (_, m) = self
            .modules
            .iter()
            .find(|(n, _)| *n == module)
            .ok_or(CudaError::KernelsNotBuilt)?;
        let f = m
            .load_function(kernel)
            .map_err(|source| CudaError::MissingKernel {
                kernel: kernel.to_owned(),
                module,
                source,
            })?;
        named.insert(kernel.to_owned(), f.clone());
        Ok(f)
    }

    /// Free and total device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_error("context binding"))?;
        cudarc::driver::result::mem_get_info().map_err(driver_error("memory query"))
    }

    /// The context this device's buffers belong to.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device ordinal this handle was opened with.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's marketing name (for logs and reports).
    pub fn name(&self) -> Result<String, CudaError> {
        self.ctx.name().map_err(driver_error("device name query"))
    }

    /// The side stream, after making it wait for everything enqueued on the main stream so far.
    /// Kernels launched on it run beside the main stream's later work until
    /// [`CudaDevice::join_side_stream`]. Under a stream capture of the main stream the pair is
    /// recorded as two parallel branches of the graph.
    pub(crate) fn fork_side_stream(&self, op: &'static str) -> Result<&CudaStream, CudaError> {
        let side = match self.side.get() {
            Some(side) => side,
            None => {
                let side = SideStream {
                    stream: self.ctx.new_stream().map_err(driver_error(op))?,
                    fork: self.ctx.new_event(None).map_err(driver_error(op))?,
                    join: self.ctx.new_event(None).map_err(driver_error(op))?,
                };
                self.side.get_or_init(|| side)
            }
        };
        side.fork.record(&self.stream).map_err(driver_error(op))?;
        side.stream.wait(&side.fork).map_err(driver_error(op))?;
        Ok(&side.stream)
    }

    /// Makes the main stream wait for everything enqueued on the side stream so far; pairs with
    /// a [`CudaDevice::fork_side_stream`] of the same operation (under a capture, a join without
    /// a fork in the same capture would wait on work outside it).
    pub(crate) fn join_side_stream(&self, op: &'static str) -> Result<(), CudaError> {
        if let Some(side) = self.side.get() {
            side.join.record(&side.stream).map_err(driver_error(op))?;
            self.stream.wait(&side.join).map_err(driver_error(op))?;
        }
        Ok(())
    }

    /// The device's compute capability, (major, minor).
    pub(crate) fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// The stream every op of this device is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies `host` into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        if host.is_empty() {
            return self.empty();
        }
        self.stream
            .clone_htod(host)
            .map_err(driver_error("host-to-device copy"))
    }

    /// Waits for all queued work, then copies `buffer` back to the host.
    pub fn download<T: DeviceRepr>(&self, buffer: &impl DevicePtr<T>) -> Result<Vec<T>, CudaError> {
        if buffer.is_empty() {
            self.synchronize()?;
            return Ok(Vec::new());
        }
        let host = self
            .stream
            .clone_dtoh(buffer)
            .map_err(driver_error("device-to-host copy"))?;
        self.synchronize()?;
        Ok(host)
    }

    /// Allocates a zero-filled device buffer of `len` elements.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        if len == 0 {
            return self.empty();
        }
        self.stream.alloc_zeros(len).map_err(|source| {
            let (free, total) = self.memory_info().unwrap_or((0, 0));
            CudaError::Allocation {
                bytes: len.saturating_mul(std::mem::size_of::<T>()),
                free,
                total,
                source,
            }
        })
    }

    /// Allocates `len` zeroed elements of page-locked host memory to stage uploads from. A copy
    /// from it is a DMA the driver queues at once; a copy from pageable memory first passes
    /// through the driver's own staging buffer, at a few microseconds of host time per copy.
    pub fn alloc_host_staging<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<PinnedHostSlice<T>, CudaError> {
        const OP: &str = "page-locked host allocation";
        // SAFETY: the memory is zeroed below before anything reads it, and zero bits are a
        // valid `T`. Flags 0: ordinary cached memory, which the host may also read back.
        let mut host =
            unsafe { self.ctx.alloc_pinned_with_flags::<T>(len, 0) }.map_err(driver_error(OP))?;
        let elements = host.as_mut_slice().map_err(driver_error(OP))?;
        // SAFETY: `elements` is the whole allocation, `len` elements of `T`.
        unsafe { std::ptr::write_bytes(elements.as_mut_ptr(), 0, elements.len()) };
        Ok(host)
    }

    /// Queues a copy of `src` to the start of `dst` on this device's stream and returns at once.
    /// `src` should be page-locked memory ([`CudaDevice::alloc_host_staging`]) and must stay
    /// unchanged until the stream has passed the copy (a later synchronisation, or a download,
    /// which waits for it).
    pub fn upload_into<T: DeviceRepr>(
        &self,
        src: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        const OP: &str = "host-to-device copy";
        check_limit(OP, "the source length", src.len(), dst.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(src, &mut dst.slice_mut(..src.len()))
            .map_err(driver_error(OP))
    }

    /// A zero-length buffer through cudarc's dedicated path: zero-byte copies and memsets are
    /// not something to ask the driver for.
    fn empty<T>(&self) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .null()
            .map_err(driver_error("device allocation"))
    }

    /// Blocks until every op queued on this device's stream has finished; reports faults raised
    /// by those kernels.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(driver_error("stream synchronisation"))
    }

    /// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight` for each of `rows` rows of `cols`
    /// elements, computed in f32.
    ///
    /// `x` and `out` hold `rows * cols` elements, `weight` holds `cols`.
    pub fn rms_norm<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        weight: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "rms_norm";
        let len = self.check_matrix(OP, rows, cols)?;
        check_eps(OP, eps)?;
        self.check_buffer(OP, "x", x, len)?;
        self.check_buffer(OP, "weight", weight, cols)?;
        self.check_buffer(OP, "out", out, len)?;
        if len == 0 {
            return Ok(());
        }
        let (x_ptr, _x_sync) = x.device_ptr(&self.stream);
        let (w_ptr, _w_sync) = weight.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        // SAFETY: the pointers match `rms_norm_*(const T*, const T*, T*, int, float)` in
        // norm.cu, and the lengths checked above keep every access inside the buffers.
        unsafe { self.launch_norm::<T>(Op::RmsNorm, &[x_ptr, w_ptr, out_ptr], rows, cols, eps) }
    }

    /// Adds `x` into `residual` in place (rounded to the storage dtype), then writes
    /// `rms_norm(residual) * weight` to `out`, in one pass per row.
    ///
    /// `x`, `residual` and `out` hold `rows * cols` elements, `weight` holds `cols`.
    #[allow(clippy::too_many_arguments)]
    pub fn fused_add_rms_norm<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        residual: &mut impl DevicePtrMut<T>,
        weight: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "fused_add_rms_norm";
        let len = self.check_matrix(OP, rows, cols)?;
        check_eps(OP, eps)?;
        self.check_buffer(OP, "x", x, len)?;
        self.check_buffer(OP, "residual", residual, len)?;
        self.check_buffer(OP, "weight", weight, cols)?;
        self.check_buffer(OP, "out", out, len)?;
        if len == 0 {
            return Ok(());
        }
        let (x_ptr, _x_sync) = x.device_ptr(&self.stream);
        let (res_ptr, _res_sync) = residual.device_ptr_mut(&self.stream);
        let (w_ptr, _w_sync) = weight.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let ptrs = [x_ptr, res_ptr, w_ptr, out_ptr];
        // SAFETY: the pointers match `fused_add_rms_norm_*(const T*, T*, const T*, T*, int,
        // float)` in norm.cu; lengths are checked above, and Rust's borrows guarantee that the
        // `__restrict__` buffers `residual` and `out` do not alias each other or `x`.
        unsafe { self.launch_norm::<T>(Op::FusedAddRmsNorm, &ptrs, rows, cols, eps) }
    }

    /// `out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j]`: each input row is the gate
    /// projection followed by the up projection.
    ///
    /// `gate_up` holds `rows * 2 * inter` elements, `out` holds `rows * inter`.
    pub fn silu_mul<T: KernelFloat>(
        &self,
        gate_up: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        rows: usize,
        inter: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "silu_mul";
        let len = self.check_matrix(OP, rows, inter)?;
        self.check_buffer(OP, "gate_up", gate_up, len * 2)?;
        self.check_buffer(OP, "out", out, len)?;
        if len == 0 {
            return Ok(());
        }
        let cfg = elementwise_launch_config::<T>(rows, inter);
        let (rows, inter) = (to_i32(rows), to_i32(inter));
        let (in_ptr, _in_sync) = gate_up.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let mut params = [
            kernel_arg(&in_ptr),
            kernel_arg(&out_ptr),
            kernel_arg(&rows),
            kernel_arg(&inter),
        ];
        // SAFETY: `params` matches `silu_mul_*(const T*, T*, int, int)` in activation.cu, each
        // entry pointing at a live local of that type; the lengths checked above keep every
        // access inside the buffers, and every block waits for the previous kernel before
        // touching memory.
        unsafe {
            self.launch_with_dependency_overlap(
                OP,
                self.function::<T>(Op::SiluMul),
                cfg,
                &mut params,
            )
        }
    }

    /// Gathers `out[r] = table[ids[r]]` for every id, where `table` is `[vocab, dim]` row-major.
    ///
    /// `table` holds a whole number of `dim`-wide rows, `out` holds `ids.len() * dim`. Ids must
    /// be validated against the vocabulary beforehand: an out-of-range id yields a zero row
    /// rather than reading outside the table.
    pub fn embedding<T: KernelFloat>(
        &self,
        table: &impl DevicePtr<T>,
        ids: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<T>,
        dim: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "embedding";
        let rows = ids.len();
        let len = self.check_matrix(OP, rows, dim)?;
        self.check_context(OP, "table", table)?;
        self.check_context(OP, "ids", ids)?;
        if dim == 0 || table.len() % dim != 0 {
            return Err(invalid_argument(
                OP,
                "the table length",
                "a non-zero multiple of dim",
                format!("{} elements for dim {dim}", table.len()),
            ));
        }
        let vocab = table.len() / dim;
        check_limit(OP, "the vocabulary", vocab, u32::MAX as usize)?;
        let vocab = vocab as u32;
        self.check_buffer(OP, "out", out, len)?;
        if len == 0 {
            return Ok(());
        }
        let cfg = elementwise_launch_config::<T>(rows, dim);
        let (rows, dim) = (to_i32(rows), to_i32(dim));
        let (ids_ptr, _ids_sync) = ids.device_ptr(&self.stream);
        let (table_ptr, _table_sync) = table.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let mut launch = self
            .stream
            .launch_builder(self.function::<T>(Op::Embedding));
        launch
            .arg(&ids_ptr)
            .arg(&table_ptr)
            .arg(&out_ptr)
            .arg(&rows)
            .arg(&dim)
            .arg(&vocab);
        // SAFETY: the arguments match `embedding_*(const uint32_t*, const T*, T*, int, int,
        // uint32_t)` in embedding.cu; output lengths are checked above and the kernel bounds
        // every table read by `vocab`.
        unsafe { launch.launch(cfg) }.map_err(driver_error(OP))?;
        Ok(())
    }

    /// Launches the norm kernel of `op` over `rows` rows of `cols`: the buffer pointers `ptrs`
    /// (at most four), then `cols` and `eps`.
    ///
    /// # Safety
    /// `ptrs` must be the kernel's pointer parameters in order, each into a live buffer of this
    /// device whose length was checked against `rows` and `cols`.
    unsafe fn launch_norm<T: KernelFloat>(
        &self,
        op: Op,
        ptrs: &[CUdeviceptr],
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let cfg = norm_launch_config::<T>(rows, cols);
        let cols = to_i32(cols);
        // At most four buffer pointers, then `cols` and `eps`: no allocation per launch.
        let mut params = [std::ptr::null_mut::<c_void>(); 6];
        let used = ptrs.len() + 2;
        for (slot, ptr) in params.iter_mut().zip(ptrs) {
            *slot = kernel_arg(ptr);
        }
        params[used - 2] = kernel_arg(&cols);
        params[used - 1] = kernel_arg(&eps);
        // SAFETY: the caller vouches for the pointers; `cols` and `eps` complete the signature.
        // Every block of the norm kernels waits for the previous kernel before touching memory.
        unsafe {
            self.launch_with_dependency_overlap(
                op.name(),
                self.function::<T>(op),
                cfg,
                &mut params[..used],
            )
        }
    }

    fn function<T: KernelFloat>(&self, op: Op) -> &CudaFunction {
        // `new` loads one function per (op, dtype) in exactly this order.
        &self.functions[op as usize * DTYPE_SUFFIXES.len() + T::INDEX]
    }

    /// Checks a `[rows, cols]` shape against the kernels' limits and returns its element count.
    fn check_matrix(&self, op: &'static str, rows: usize, cols: usize) -> Result<usize, CudaError> {
        check_limit(op, "the row count", rows, MAX_ROWS)?;
        check_limit(op, "the row width", cols, MAX_DIM)?;
        // Both factors are below 2^31, so the product fits a 64-bit usize.
        Ok(rows * cols)
    }

    fn check_context<T>(
        &self,
        op: &'static str,
        name: &'static str,
        buffer: &impl DeviceSlice<T>,
    ) -> Result<(), CudaError> {
        if **buffer.stream().context() != *self.ctx {
            return Err(CudaError::ForeignBuffer {
                op,
                buffer: name,
                ordinal: self.ordinal,
            });
        }
        Ok(())
    }

    fn check_buffer<T>(
        &self,
        op: &'static str,
        name: &'static str,
        buffer: &impl DeviceSlice<T>,
        expected: usize,
    ) -> Result<(), CudaError> {
        self.check_context(op, name, buffer)?;
        if buffer.len() != expected {
            return Err(CudaError::BufferLength {
                op,
                buffer: name,
                expected,
                actual: buffer.len(),
            });
        }
        Ok(())
    }
}

fn check_eps(op: &'static str, eps: f32) -> Result<(), CudaError> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(invalid_argument(
            op,
            "eps",
            "a finite non-negative number",
            eps,
        ))
    }
}

/// `op`'s error for an `argument` outside the range `expected` describes.
fn invalid_argument(
    op: &'static str,
    argument: &'static str,
    expected: &'static str,
    found: impl ToString,
) -> CudaError {
    CudaError::InvalidArgument {
        op,
        argument,
        expected,
        found: found.to_string(),
    }
}

/// Fails with `op`'s "must be at least 1" error when `value` is 0.
fn check_nonzero(op: &'static str, argument: &'static str, value: usize) -> Result<(), CudaError> {
    if value == 0 {
        return Err(invalid_argument(op, argument, "at least 1", value));
    }
    Ok(())
}

/// Fails with [`CudaError::TooLarge`] when `value` exceeds `limit`.
fn check_limit(
    op: &'static str,
    dimension: &'static str,
    value: usize,
    limit: usize,
) -> Result<(), CudaError> {
    if value > limit {
        return Err(CudaError::TooLarge {
            op,
            dimension,
            value,
            limit,
        });
    }
    Ok(())
}

/// What [`CudaDevice::launch_with_attributes`] adds to a launch besides its grid, block and
/// shared memory: the launch attributes cudarc's launch builder cannot set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LaunchAttributes {
    /// Programmatic dependent launch, as [`CudaDevice::launch_with_dependency_overlap`]
    /// describes it.
    pub(crate) dependency_overlap: bool,
    /// Blocks per thread-block cluster along x (sm_90+), for a kernel that shares memory across
    /// its blocks; the grid's x extent must be a multiple of it.
    pub(crate) cluster_x: Option<u32>,
}

impl CudaDevice {
    /// Launches `function` with programmatic dependent launch (the programmatic-stream-
    /// serialization attribute, which cudarc's launch builder cannot set): the kernel may be
    /// scheduled while the previous kernel on the stream is still running, and must itself
    /// execute `wait_for_previous()` (common.cuh) in every block before it touches memory an
    /// earlier kernel writes or reads. A kernel image built from pre-Hopper PTX has those waits
    /// compiled out, so it is launched plainly.
    ///
    /// # Safety
    /// `params` must hold one pointer per kernel parameter, each to a live value of that
    /// parameter's type, and the kernel's accesses must stay inside their buffers.
    pub(crate) unsafe fn launch_with_dependency_overlap(
        &self,
        op: &'static str,
        function: &CudaFunction,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        let attributes = LaunchAttributes {
            dependency_overlap: true,
            cluster_x: None,
        };
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_with_attributes(op, function, cfg, attributes, params) }
    }

    /// Launches `function` on this device's stream through `cuLaunchKernelEx` with
    /// `attributes`. Programmatic dependent launch is dropped for a kernel image built from
    /// pre-Hopper PTX, as [`CudaDevice::launch_with_dependency_overlap`] explains.
    ///
    /// # Safety
    /// As [`CudaDevice::launch_with_dependency_overlap`]; a cluster launch must also suit the
    /// kernel (the cluster shape it was written for, on a device that has clusters).
    pub(crate) unsafe fn launch_with_attributes(
        &self,
        op: &'static str,
        function: &CudaFunction,
        cfg: LaunchConfig,
        attributes: LaunchAttributes,
        params: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        // SAFETY: forwarded from the caller.
        unsafe {
            self.launch_with_attributes_on(&self.stream, op, function, cfg, attributes, params)
        }
    }

    /// [`CudaDevice::launch_with_attributes`] on `stream`, this device's or its side stream.
    ///
    /// # Safety
    /// As [`CudaDevice::launch_with_attributes`].
    pub(crate) unsafe fn launch_with_attributes_on(
        &self,
        stream: &CudaStream,
        op: &'static str,
        function: &CudaFunction,
        cfg: LaunchConfig,
        attributes: LaunchAttributes,
        params: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        let waits = attributes.dependency_overlap
            && function
                .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_PTX_VERSION)
                .map_err(driver_error(op))?
                >= 90;
        let attribute = |id, value| driver_sys::CUlaunchAttribute {
            id,
            pad: [0; 4],
            value,
        };
        use driver_sys::CUlaunchAttributeID as Id;
        // SAFETY: zero bits are a valid value of this plain-data union; each attribute set below
        // writes the one field its id reads.
        let zero: driver_sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        let mut list = [attribute(Id::CU_LAUNCH_ATTRIBUTE_IGNORE, zero); 2];
        let mut count = 0;
        if waits {
            let mut value = zero;
            value.programmaticStreamSerializationAllowed = 1;
            list[count] = attribute(
                Id::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                value,
            );
            count += 1;
        }
        if let Some(x) = attributes.cluster_x {
            let mut value = zero;
            value.clusterDim =
                driver_sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x, y: 1, z: 1 };
            list[count] = attribute(Id::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, value);
            count += 1;
        }
        let config = driver_sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: list.as_mut_ptr(),
            numAttrs: count as u32,
        };
        self.ctx.bind_to_thread().map_err(driver_error(op))?;
        // SAFETY: `config` and `list` outlive the call; the caller vouches for `params` and the
        // cluster shape.
        unsafe {
            driver_sys::cuLaunchKernelEx(
                &config,
                function.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(driver_error(op))
    }
}

/// One entry of the `params` array of [`CudaDevice::launch_with_dependency_overlap`]: a pointer
/// to the live value of a kernel parameter.
pub(crate) fn kernel_arg<T>(value: &T) -> *mut c_void {
    (value as *const T).cast_mut().cast()
}

/// A TMA descriptor of the row-major `[rows, cols]` matrix of `T` at `ptr`, read in boxes of
/// `box_dims` = (rows, columns) with the 128-byte swizzle that the wgmma kernels' shared-memory
/// descriptors assume (`cuda/hopper.cuh`), promoted to L2 in 256-byte lines. Box rows past `rows`
/// read as zeros. Only f16 and bf16 reach the wgmma kernels; the caller has checked the pointer's
/// 16-byte alignment and that a row is a multiple of 16 bytes.
pub(crate) fn tensor_map_2d<T: KernelFloat>(
    op: &'static str,
    ptr: CUdeviceptr,
    rows: usize,
    cols: usize,
    box_dims: (u32, u32),
) -> Result<driver_sys::CUtensorMap, CudaError> {
    use driver_sys::CUtensorMapDataType as DataType;
    let data_type = if T::SUFFIX == "f16" {
        DataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    } else {
        DataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    };
    let mut map = driver_sys::CUtensorMap { opaque: [0; 16] };
    let dims = [cols as u64, rows as u64];
    let row_stride = [(cols * std::mem::size_of::<T>()) as u64];
    let box_sizes = [box_dims.1, box_dims.0];
    let element_strides = [1u32; 2];
    // SAFETY: every array holds the rank's entries (the stride array one fewer), and the call
    // only writes `map`; the address is recorded, not dereferenced.
    unsafe {
        driver_sys::cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            row_stride.as_ptr(),
            box_sizes.as_ptr(),
            element_strides.as_ptr(),
            driver_sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            driver_sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            driver_sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            driver_sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(driver_error(op))?;
    Ok(map)
}

/// Wraps a failed driver call of `op`, for `map_err`.
fn driver_error(op: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |source| CudaError::Driver { op, source }
}

/// Loads the embedded module `name` into `ctx`.
fn load_module(
    ctx: &Arc<CudaContext>,
    name: &'static str,
    ordinal: usize,
) -> Result<Arc<CudaModule>, CudaError> {
    let image = module_ptx_or_fatbin(name).ok_or(CudaError::KernelsNotBuilt)?;
    ctx.load_module(Ptx::from_binary(image.to_vec()))
        .map_err(|source| CudaError::ModuleLoad {
            module: name,
            ordinal,
            source,
        })
}

/// Callers have bounded the value below `i32::MAX` (by `MAX_DIM`, `MAX_ROWS`, a grid limit or
/// an explicit check).
fn to_i32(value: usize) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn elements_per_pack<T>() -> usize {
    consts::VEC_BYTES as usize / std::mem::size_of::<T>()
}

/// One block per row, with just enough whole warps for one 16-byte chunk per thread (capped at
/// the block limit, beyond which threads loop over chunks).
fn norm_launch_config<T>(rows: usize, cols: usize) -> LaunchConfig {
    let warp = consts::WARP_SIZE as usize;
    let chunks = cols.div_ceil(elements_per_pack::<T>());
    let threads = chunks
        .div_ceil(warp)
        .saturating_mul(warp)
        .clamp(warp, consts::MAX_BLOCK_THREADS as usize);
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// x covers a row's 16-byte chunks, y covers rows up to the grid-y limit (kernels loop past it).
fn elementwise_launch_config<T>(rows: usize, cols: usize) -> LaunchConfig {
    let threads = consts::ELEMENTWISE_BLOCK_THREADS as usize;
    let chunks = cols.div_ceil(elements_per_pack::<T>());
    let blocks_x = chunks.div_ceil(threads);
    let blocks_y = rows.min(consts::MAX_GRID_Y as usize);
    LaunchConfig {
        grid_dim: (blocks_x as u32, blocks_y as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_blocks_are_whole_warps_within_the_block_limit() {
        for cols in [1usize, 7, 8, 9, 577, 1024, 4096, 4099, 100_000] {
            let cfg = norm_launch_config::<half::bf16>(3, cols);
            let threads = cfg.block_dim.0 as usize;
            assert_eq!(threads % consts::WARP_SIZE as usize, 0, "cols {cols}");
            assert!(threads <= consts::MAX_BLOCK_THREADS as usize, "cols {cols}");
            assert_eq!(cfg.grid_dim, (3, 1, 1));
        }
        assert_eq!(norm_launch_config::<half::bf16>(1, 4096).block_dim.0, 512);
        assert_eq!(norm_launch_config::<f32>(1, 4096).block_dim.0, 1024);
    }

    #[test]
    fn elementwise_grid_covers_every_chunk_and_caps_rows() {
        let cfg = elementwise_launch_config::<f32>(100_000, 4099);
        let covered = cfg.grid_dim.0 as usize * cfg.block_dim.0 as usize * 4;
        assert!(covered >= 4099);
        assert_eq!(cfg.grid_dim.1, consts::MAX_GRID_Y);
        assert_eq!(
            elementwise_launch_config::<half::f16>(5, 1).grid_dim,
            (1, 5, 1)
        );
    }

    #[test]
    fn shared_constants_come_from_the_header() {
        assert_eq!(consts::WARP_SIZE, 32);
        assert_eq!(consts::VEC_BYTES, 16);
    }

    #[test]
    fn modules_are_listed_exactly_when_kernels_are_built() {
        let names: Vec<_> = module_names().collect();
        if kernels_built() {
            for op in Op::ALL {
                assert!(
                    names.contains(&op.module()),
                    "module {} missing",
                    op.module()
                );
            }
        } else {
            assert!(names.is_empty());
            assert!(module_ptx_or_fatbin("norm").is_none());
        }
    }

    #[test]
    fn eps_must_be_finite_and_non_negative() {
        assert!(check_eps("rms_norm", 1e-6).is_ok());
        assert!(check_eps("rms_norm", 0.0).is_ok());
        let err = check_eps("rms_norm", f32::NAN).unwrap_err().to_string();
        assert_eq!(
            err,
            "rms_norm: eps must be a finite non-negative number, found NaN"
        );
        assert!(check_eps("rms_norm", -1.0).is_err());
    }
}
