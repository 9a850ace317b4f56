//! Dense linear layers on the GPU, `y = x·Wᵀ (+ bias) (+ residual)`: our skinny tensor-core GEMM
//! (`cuda/gemv.cu`) for decode-sized batches of up to 16 rows, our Hopper wgmma GEMM
//! (`cuda/gemm_wgmma.cu`) for 17–64 rows of narrow outputs, cuBLASLt for everything else, and
//! the dispatch between them; plus the decode-sized projections that compute their own x first
//! (residual add and RMSNorm, or SiLU·mul) so that op needs no kernel of its own, and the gate|up
//! projection of 5–64 rows with SiLU·mul in the wgmma kernel's epilogue.
//!
//! Every path reads W in PyTorch's `[out_features, in_features]` row-major layout, computes in
//! f32 and rounds once to the storage dtype, after the bias and residual were added. None
//! allocates, synchronises or branches on device data, so a decode step that calls
//! [`CudaDevice::linear`] can be captured into a CUDA graph; call
//! [`CudaDevice::prepare_linear`] once before the first capture so the cuBLASLt handle and its
//! workspace already exist.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::sys::{CUdevice_attribute, CUdeviceptr, CUfunction_attribute};
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::{
    check_eps, check_nonzero, consts, driver_error, invalid_argument, kernel_arg, tensor_map_2d,
    to_i32, CudaDevice, CudaError, KernelFloat, LaunchAttributes,
};

/// The kernel module built from `cuda/gemv.cu`.
const MODULE: &str = "gemv";
/// Largest batch the skinny kernel can take: eight 8-token groups of x (`NX` ≤ 8 in gemv.cu).
const SKINNY_TOKEN_LIMIT: usize = 64;
/// Elements per 16-byte load of an f16/bf16 row: k must be a multiple of it.
const PACK: usize = 8;
/// A k-block is one 16-byte pack for each of the 4 lanes of a quad (`kBlockK` in gemv.cu).
const BLOCK_K: usize = 4 * PACK;
/// `kMaxWarps` in gemv.cu: the kernels are compiled for at most this many warps per block.
const SKINNY_MAX_WARPS: usize = 16;
/// Shared memory a block may use without opting in to more.
const SKINNY_MAX_SHARED: usize = 48 * 1024;
/// Floats of one warp's 16×8 accumulator tile, staged in shared memory for the k reduction.
const FRAGMENT_FLOATS: usize = 128;
/// Most rows the fused kernels are compiled for (`NX` ≤ 2 in gemv.cu's fused variants).
const FUSED_TOKEN_LIMIT: usize = 16;
/// `kSumSlots` floats in gemv.cu: the fused kernels' row-sum scratch after the k-reduction
/// partials.
const FUSED_SUM_SLOTS_BYTES: usize = 16 * 4;
/// The largest k-reduction scratch a fused kernel uses: 16 warps, one 16-token tile, two row
/// groups (`SkinnyConfig::choose` never asks for more at n ≤ 16).
const FUSED_MAX_PARTIALS_BYTES: usize = SKINNY_MAX_WARPS * 2 * FRAGMENT_FLOATS * 4;

/// The kernel module built from `cuda/gemm_wgmma.cu`.
const WGMMA_MODULE: &str = "gemm_wgmma";
/// Most rows the wgmma kernel takes: one TMA box of x (`kTile` in gemm_wgmma.cu).
const WGMMA_TOKEN_LIMIT: usize = 64;
/// `kTile` in gemm_wgmma.cu: W rows per block, and the k-slab of one pipeline stage; k and m
/// must be multiples of it.
const WGMMA_TILE: usize = 64;
/// `kThreads` in gemm_wgmma.cu: one consumer warpgroup and one producer warp.
const WGMMA_THREADS: u32 = 160;
/// `kStages` in gemm_wgmma.cu.
const WGMMA_STAGES: usize = 8;
/// `kTileBytes` in gemm_wgmma.cu: a 64 × 64 tile of W or x, 2-byte elements.
const WGMMA_TILE_BYTES: usize = WGMMA_TILE * 128;
/// `kPartialBytes` in gemm_wgmma.cu: one f32 partial tile, 64 tokens × (64 + 4) features.
const WGMMA_PARTIAL_BYTES: usize = WGMMA_TILE * (WGMMA_TILE + 4) * 4;
/// `kBarrierBytes` in gemm_wgmma.cu, plus the slack that aligns the base to 1024 bytes.
const WGMMA_FIXED_BYTES: usize = 1024 + 1024;
/// Largest cluster the split-k uses: the portable maximum, which needs no opt-in.
const WGMMA_MAX_SPLIT: usize = 8;
/// The grid's y extent (one block row per 64 rows of W) is limited to 65,535.
const WGMMA_MAX_M: usize = 65_535 * WGMMA_TILE;

/// What the wgmma kernel does with its product (`kSiluMul` in gemm_wgmma.cu): the linear
/// layer's bias and residual (`gemm_wgmma_*`), or SiLU·mul of the gate and up halves of a gate|up
/// projection (`gemm_wgmma_silu_*`, two W tiles and two accumulators per block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WgmmaEpilogue {
    Linear,
    SiluMul,
}

impl WgmmaEpilogue {
    /// `Layout::kWTiles` in gemm_wgmma.cu: W tiles a block streams per k-slab.
    fn w_tiles(self) -> usize {
        match self {
            WgmmaEpilogue::Linear => 1,
            WgmmaEpilogue::SiluMul => 2,
        }
    }

    fn op(self) -> &'static str {
        match self {
            WgmmaEpilogue::Linear => "linear",
            WgmmaEpilogue::SiluMul => GATE_UP_SILU_OP,
        }
    }

    fn kernel_name<T: KernelFloat>(self) -> String {
        match self {
            WgmmaEpilogue::Linear => format!("gemm_wgmma_{}", T::SUFFIX),
            WgmmaEpilogue::SiluMul => format!("gemm_wgmma_silu_{}", T::SUFFIX),
        }
    }

    /// `Layout::shared_bytes` in gemm_wgmma.cu: dynamic shared memory of a block whose k-slice
    /// is `slabs` 64-wide slabs, the ring slots it uses (W tiles and an x tile each) or its
    /// partial tiles, whichever is larger.
    fn shared_bytes(self, slabs: usize) -> usize {
        let stage = (self.w_tiles() + 1) * WGMMA_TILE_BYTES;
        let partials = self.w_tiles() * WGMMA_PARTIAL_BYTES;
        WGMMA_FIXED_BYTES + (slabs.min(WGMMA_STAGES) * stage).max(partials)
    }
}

/// The op name of [`CudaDevice::linear_gate_up_silu`] and its forced routes, in their errors.
const GATE_UP_SILU_OP: &str = "linear_gate_up_silu";

/// Blocks per cluster splitting k for a `[m, k]` weight (k and m multiples of 64): the smallest
/// power of two that puts at least 64 blocks in the grid (the best configurations of the
/// prototype's sweep on an H100 ran 64 or 96 blocks), at most 8 and dividing k into whole
/// 64-wide slabs. On the Qwen3-0.6B shapes: 1 for QKV and gate/up, 4 for O and down, each the
/// sweep's best or within 0.05 µs of it.
///
/// The dispatch takes the wgmma kernel only where this is above 1. Its gain is the split over a
/// cluster for narrow outputs; with one block per 64 rows of a wide output cuBLASLt was as fast
/// or faster (µs at 64 rows under PDL against cuBLASLt, H100: QKV 6.38 / 5.76, gate|up
/// 7.28 / 7.23, LM head 134.4 / 122.8; O 4.67 / 5.79 and down 6.11 / 7.97 with splits of 4).
fn wgmma_split(k: usize, m: usize) -> usize {
    let tiles = m / WGMMA_TILE;
    let mut split = 1;
    while tiles * split < 64 && split < WGMMA_MAX_SPLIT {
        split *= 2;
    }
    while !k.is_multiple_of(WGMMA_TILE * split) {
        split /= 2;
    }
    split
}

/// `stage_stride` in gemv.cu: each staged row of x is padded to 64 bytes past a multiple of 128.
fn stage_stride(k: usize) -> usize {
    k.div_ceil(64) * 64 + 32
}
/// cuBLASLt's recommended workspace: 32 MiB on Hopper and later, 4 MiB before.
const WORKSPACE_HOPPER: usize = 32 << 20;
const WORKSPACE_OLDER: usize = 4 << 20;
/// Largest alignment cuBLASLt distinguishes between (its default assumption for every pointer).
const MAX_ALIGNMENT: u64 = 256;
/// The bias epilogue reads the bias vector in 16-byte chunks; a less aligned bias is added by
/// our own kernel after the matmul instead.
const BIAS_EPILOGUE_ALIGNMENT: u64 = 16;

/// Launch shape of the skinny kernel: `nx` 8-token groups, `row_groups` 8-row groups of W per
/// block, `warps` warps per block splitting k.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SkinnyConfig {
    nx: usize,
    row_groups: usize,
    warps: usize,
}

impl SkinnyConfig {
    fn token_groups(n: usize) -> usize {
        n.div_ceil(8).next_power_of_two()
    }

    /// Whether gemv.cu instantiates this (token groups, row groups) pair.
    fn compiled(nx: usize, row_groups: usize) -> bool {
        [1, 2, 4, 8].contains(&nx) && [1, 2].contains(&row_groups)
    }

    fn shared_bytes(nx: usize, row_groups: usize, warps: usize) -> usize {
        warps * nx.div_ceil(2) * row_groups * FRAGMENT_FLOATS * 4
    }

    /// Most warps whose k-reduction scratch fits in the default shared-memory allowance.
    fn max_warps(nx: usize, row_groups: usize) -> usize {
        (SKINNY_MAX_SHARED / Self::shared_bytes(nx, row_groups, 1)).min(SKINNY_MAX_WARPS)
    }

    /// The configuration `linear` uses, from a sweep on an H100 (KERNELS.md, "Linear"): about
    /// 4 k-blocks per warp, so that a warp issues all its W loads in one or two trips, with
    /// 1000-2000 warps in the grid on the decode shapes.
    fn choose(n: usize, k: usize, m: usize) -> SkinnyConfig {
        let nx = Self::token_groups(n);
        // A second row group halves the x traffic per W byte, which matters from 9 tokens on;
        // at n ≤ 8 it only pays where m is large enough to keep a thousand-odd warps busy.
        let row_groups = if nx > 1 || m >= 4096 { 2 } else { 1 };
        let kblocks = k.div_ceil(BLOCK_K);
        let warps = kblocks
            .div_ceil(4)
            .clamp(1, Self::max_warps(nx, row_groups));
        SkinnyConfig {
            nx,
            row_groups,
            warps,
        }
    }

    fn kernel_name<T: KernelFloat>(self) -> String {
        format!(
            "skinny_gemm_{}_x{}_r{}",
            T::SUFFIX,
            self.nx,
            self.row_groups
        )
    }

    fn launch_config(self, m: usize) -> LaunchConfig {
        let rows_per_block = 8 * self.row_groups;
        let shared = Self::shared_bytes(self.nx, self.row_groups, self.warps);
        LaunchConfig {
            grid_dim: (m.div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: ((self.warps * consts::WARP_SIZE as usize) as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        }
    }
}

/// Which implementation runs a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Skinny(SkinnyConfig),
    Wgmma,
    CublasLt,
}

/// How a call was asked to run: a forced path (else the dispatch picks), and whether our
/// kernels may be launched with programmatic dependent launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route {
    path: Option<Path>,
    overlapped: bool,
}

impl Route {
    const AUTO: Route = Route {
        path: None,
        overlapped: false,
    };

    fn forced(path: Path) -> Route {
        Route {
            path: Some(path),
            overlapped: false,
        }
    }
}

/// Device pointers and shape of one call, validated.
struct Operands {
    x: CUdeviceptr,
    w: CUdeviceptr,
    bias: Option<CUdeviceptr>,
    residual: Option<CUdeviceptr>,
    out: CUdeviceptr,
    n: usize,
    k: usize,
    m: usize,
}

impl Operands {
    /// Why the skinny kernel cannot take these operands, if it cannot.
    fn skinny_obstacle<T: KernelFloat>(&self) -> Option<(&'static str, &'static str, String)> {
        if T::SUFFIX == "f32" {
            return Some(("the dtype", "f16 or bf16", T::SUFFIX.to_string()));
        }
        if self.n > SKINNY_TOKEN_LIMIT {
            return Some(("n", "at most 64 for the skinny kernel", self.n.to_string()));
        }
        if !self.k.is_multiple_of(PACK) {
            return Some((
                "k",
                "a multiple of 8 for the skinny kernel's 16-byte loads",
                self.k.to_string(),
            ));
        }
        for (name, ptr) in [("x", self.x), ("w", self.w)] {
            if ptr % 16 != 0 {
                return Some((
                    if name == "x" {
                        "the address of `x`"
                    } else {
                        "the address of `w`"
                    },
                    "16-byte aligned for the skinny kernel",
                    format!("{ptr:#x}"),
                ));
            }
        }
        None
    }

    /// Why the wgmma kernel cannot take these operands on a device of compute capability
    /// `capability`, if it cannot.
    fn wgmma_obstacle<T: KernelFloat>(
        &self,
        capability: (i32, i32),
    ) -> Option<(&'static str, &'static str, String)> {
        if T::SUFFIX == "f32" {
            return Some(("the dtype", "f16 or bf16", T::SUFFIX.to_string()));
        }
        if capability != (9, 0) {
            return Some((
                "the device",
                "of compute capability 9.0 for the wgmma kernel",
                format!("{}.{}", capability.0, capability.1),
            ));
        }
        if self.n > WGMMA_TOKEN_LIMIT {
            return Some(("n", "at most 64 for the wgmma kernel", self.n.to_string()));
        }
        if !self.k.is_multiple_of(WGMMA_TILE) {
            return Some((
                "k",
                "a multiple of 64 for the wgmma kernel's tiles",
                self.k.to_string(),
            ));
        }
        if !self.m.is_multiple_of(WGMMA_TILE) {
            return Some((
                "m",
                "a multiple of 64 for the wgmma kernel's tiles",
                self.m.to_string(),
            ));
        }
        if self.m > WGMMA_MAX_M {
            return Some((
                "m",
                "at most 4,194,240 for the wgmma kernel's grid",
                self.m.to_string(),
            ));
        }
        // TMA reads x and W from 16-byte aligned addresses; the epilogue moves bias, residual
        // and out in 16-byte packs.
        let pointers = [
            ("the address of `x`", Some(self.x)),
            ("the address of `w`", Some(self.w)),
            ("the address of `bias`", self.bias),
            ("the address of `residual`", self.residual),
            ("the address of `out`", Some(self.out)),
        ];
        for (name, ptr) in pointers {
            if let Some(ptr) = ptr.filter(|p| p % 16 != 0) {
                return Some((
                    name,
                    "16-byte aligned for the wgmma kernel",
                    format!("{ptr:#x}"),
                ));
            }
        }
        None
    }
}

/// Largest power of two (up to 256) dividing `ptr`: the alignment cuBLASLt may assume.
fn alignment(ptr: CUdeviceptr) -> u32 {
    if ptr == 0 {
        return MAX_ALIGNMENT as u32;
    }
    (1u64 << ptr.trailing_zeros().min(MAX_ALIGNMENT.trailing_zeros())) as u32
}

fn cublas_error(call: &'static str, err: CublasError) -> CudaError {
    invalid_argument(
        "linear",
        call,
        "CUBLAS_STATUS_SUCCESS",
        format!("{:?}", err.0),
    )
}

/// Everything a cuBLASLt matmul of one shape needs besides the pointers, built once and reused:
/// building descriptors and asking for a heuristic costs tens of microseconds of host time.
///
/// A plan is built for a bucket of row counts ([`plan_rows`]) and serves every count in it: the
/// x and out layouts are set to the call's row count before each matmul. The first matmul of
/// every new problem size costs cuBLASLt 2–4 ms of host time (measured on an H100; it happens
/// inside `cublasLtMatmul`, not in the heuristic), which a plan per exact row count paid for
/// every new prompt length; within a bucket the problem is the bucket's, already prepared.
struct Plan {
    desc: MatmulDesc,
    a: Layout,
    b: Layout,
    c: Layout,
    algo: lt_sys::cublasLtMatmulAlgo_t,
    /// Row counts below the bucket's for which cuBLASLt confirmed the algorithm
    /// (`cublasLtMatmulAlgoCheck`), or found it unusable.
    checked: HashMap<usize, bool>,
}

/// The row count a cuBLASLt plan is built for, covering `n`: multiples of 16 up to 256 (the
/// decode batch buckets), then steps of ×1.5 and ×4/3 (384, 512, 768, 1024, …), so a plan's
/// algorithm is never chosen for more than about 1.5 times the rows it runs.
fn plan_rows(n: usize) -> usize {
    if n <= 256 {
        return n.div_ceil(16).max(1) * 16;
    }
    let mut rows = 256;
    while rows < n {
        rows = if rows.is_power_of_two() {
            rows / 2 * 3
        } else {
            rows / 3 * 4
        };
    }
    rows
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    dtype: usize,
    /// The rows the plan was built for: the bucket of the calls' row counts, or one exact count
    /// when the bucket's algorithm cannot run it.
    n: usize,
    k: usize,
    m: usize,
    bias_epilogue: bool,
    residual: bool,
    /// Alignments of W (A), x (B), the addend (C) and out (D).
    alignments: [u32; 4],
}

struct MatmulDesc(lt_sys::cublasLtMatmulDesc_t);
struct Layout(lt_sys::cublasLtMatrixLayout_t);
struct Preference(lt_sys::cublasLtMatmulPreference_t);

// Destruction failures are ignored: the handles are ours, and there is nothing to recover.
impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulDescCreate and destroyed only here.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatrixLayoutCreate and destroyed only here.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulPreferenceCreate and destroyed only here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// One cuBLASLt handle with its workspace and plan cache, per device stream.
struct LtState {
    handle: lt_sys::cublasLtHandle_t,
    /// Owns the workspace memory; `workspace_ptr` is its address, taken once so matmuls do not
    /// go through the buffer's event tracking.
    _workspace: CudaSlice<u8>,
    workspace_ptr: CUdeviceptr,
    workspace_size: usize,
    plans: HashMap<PlanKey, Plan>,
}

// SAFETY: the raw cuBLASLt handles are only used while the state's mutex is held, and cuBLASLt
// handles and descriptors may be used from any thread as long as calls do not overlap.
unsafe impl Send for LtState {}

/// Keyed by the address of the device's stream. The entries live for the rest of the process
/// (they hold the stream, so an address is never reused): handles cannot be tied to the
/// lifetime of a `CudaDevice`, whose fields this module does not own.
type LtTable = Mutex<Vec<(usize, Arc<Mutex<LtState>>)>>;
static LT_STATES: OnceLock<LtTable> = OnceLock::new();

/// The shape of cuBLASLt's `*SetAttribute` calls: handle, attribute, value bytes and their size.
type SetAttribute<H, A> = unsafe fn(H, A, *const c_void, usize) -> Result<(), CublasError>;

/// Sets `attr` of a live cuBLASLt object `handle` to `value` through `set`, which is `call`.
///
/// # Safety
/// `handle` must be alive, and `V` must be the type cuBLASLt documents for `attr`.
unsafe fn set_attribute<H, A, V>(
    set: SetAttribute<H, A>,
    call: &'static str,
    handle: H,
    attr: A,
    value: &V,
) -> Result<(), CudaError> {
    // SAFETY: `value` points at a live `V` of exactly the size passed; the caller vouches for
    // the handle and the type.
    unsafe {
        set(
            handle,
            attr,
            (value as *const V).cast(),
            std::mem::size_of::<V>(),
        )
    }
    .map_err(|e| cublas_error(call, e))
}

fn set_desc_attribute<V>(
    desc: &MatmulDesc,
    attr: lt_sys::cublasLtMatmulDescAttributes_t,
    value: &V,
) -> Result<(), CudaError> {
    let call = "cublasLtMatmulDescSetAttribute";
    // SAFETY: `desc` owns a live descriptor; callers pass the type documented for `attr`.
    unsafe { set_attribute(lt::set_matmul_desc_attribute, call, desc.0, attr, value) }
}

fn set_pref_attribute<V>(
    pref: &Preference,
    attr: lt_sys::cublasLtMatmulPreferenceAttributes_t,
    value: &V,
) -> Result<(), CudaError> {
    let call = "cublasLtMatmulPreferenceSetAttribute";
    // SAFETY: as in `set_desc_attribute`.
    unsafe { set_attribute(lt::set_matmul_pref_attribute, call, pref.0, attr, value) }
}

fn data_type<T: KernelFloat>() -> lt_sys::cudaDataType {
    match T::SUFFIX {
        "f16" => lt_sys::cudaDataType_t::CUDA_R_16F,
        "bf16" => lt_sys::cudaDataType_t::CUDA_R_16BF,
        _ => lt_sys::cudaDataType_t::CUDA_R_32F,
    }
}

impl LtState {
    /// The plan for `key` (whose `n` is the call's row count) with its x and out layouts set to
    /// that count: the bucket's plan when its algorithm runs the count, else one of its own.
    fn plan<T: KernelFloat>(&mut self, key: PlanKey) -> Result<&Plan, CudaError> {
        let bucket = PlanKey {
            n: plan_rows(key.n),
            ..key
        };
        self.prepare::<T>(bucket)?;
        let plan = self.plans.get_mut(&bucket).ok_or_else(missing_plan)?;
        plan.set_rows(key.n)?;
        // The heuristic chose the algorithm for the bucket's own row count; fewer rows are
        // checked once.
        let fits = match plan.checked.get(&key.n) {
            _ if key.n == bucket.n => true,
            Some(&fits) => fits,
            None => {
                let fits = plan.runs(self.handle, self.workspace_size);
                plan.checked.insert(key.n, fits);
                fits
            }
        };
        let key = if fits { bucket } else { key };
        self.prepare::<T>(key)?;
        self.plans.get(&key).ok_or_else(missing_plan)
    }

    /// Builds the plan of `key` unless it exists.
    fn prepare<T: KernelFloat>(&mut self, key: PlanKey) -> Result<(), CudaError> {
        if !self.plans.contains_key(&key) {
            let plan = self.build_plan::<T>(key)?;
            self.plans.insert(key, plan);
        }
        Ok(())
    }

    /// Column-major view of the row-major problem: D[m, n] = op(A)[m, k] · B[k, n] with
    /// A = W stored as a k×m column-major matrix (transposed), B = x as k×n, D = out as m×n.
    fn build_plan<T: KernelFloat>(&self, key: PlanKey) -> Result<Plan, CudaError> {
        let ty = data_type::<T>();
        let layout = |rows: usize, cols: usize, ld: usize| -> Result<Layout, CudaError> {
            lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
                .map(Layout)
                .map_err(|e| cublas_error("cublasLtMatrixLayoutCreate", e))
        };
        let a = layout(key.k, key.m, key.k)?;
        let b = layout(key.k, key.n, key.k)?;
        let c = layout(key.m, key.n, key.m)?;

        let desc = lt::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType_t::CUDA_R_32F,
        )
        .map(MatmulDesc)
        .map_err(|e| cublas_error("cublasLtMatmulDescCreate", e))?;
        // cublasOperation_t values: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        set_desc_attribute(
            &desc,
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &1i32,
        )?;
        set_desc_attribute(
            &desc,
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &0i32,
        )?;
        let epilogue = if key.bias_epilogue {
            lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        set_desc_attribute(
            &desc,
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue,
        )?;

        let pref = lt::create_matmul_pref()
            .map(Preference)
            .map_err(|e| cublas_error("cublasLtMatmulPreferenceCreate", e))?;
        set_pref_attribute(
            &pref,
            lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &self.workspace_size,
        )?;
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
        let alignment_attributes = [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ];
        for (attr, align) in alignment_attributes.into_iter().zip(&key.alignments) {
            set_pref_attribute(&pref, attr, align)?;
        }

        // SAFETY: every descriptor passed is alive for the duration of the call.
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, c.0, c.0, pref.0)
        }
        .map_err(|e| cublas_error("cublasLtMatmulAlgoGetHeuristic", e))?;
        Ok(Plan {
            desc,
            a,
            b,
            c,
            algo: heuristic.algo,
            checked: HashMap::new(),
        })
    }
}

fn missing_plan() -> CudaError {
    invalid_argument(
        "linear",
        "the cuBLASLt plan cache",
        "to hold the plan just inserted",
        "no entry",
    )
}

impl Plan {
    /// Sets the x (B) and out (C, D) layouts to `rows` rows (columns in cuBLASLt's view).
    fn set_rows(&self, rows: usize) -> Result<(), CudaError> {
        let cols = rows as u64;
        for layout in [&self.b, &self.c] {
            // SAFETY: the layout is alive (owned by the plan), and COLS takes a u64.
            unsafe {
                set_attribute(
                    lt::set_matrix_layout_attribute,
                    "cublasLtMatrixLayoutSetAttribute",
                    layout.0,
                    lt_sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_COLS,
                    &cols,
                )?;
            }
        }
        Ok(())
    }

    /// Whether cuBLASLt accepts this plan's algorithm for the problem its layouts now describe,
    /// within `workspace_size` bytes of workspace.
    fn runs(&self, handle: lt_sys::cublasLtHandle_t, workspace_size: usize) -> bool {
        // SAFETY: a zeroed heuristic result is valid plain data that the call overwrites.
        let mut result: lt_sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        // SAFETY: the handle, descriptor and layouts are alive; the call only reads them and
        // writes `result`.
        let status = unsafe {
            lt_sys::cublasLtMatmulAlgoCheck(
                handle,
                self.desc.0,
                self.a.0,
                self.b.0,
                self.c.0,
                self.c.0,
                &self.algo,
                &mut result,
            )
        };
        status == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && result.workspaceSize <= workspace_size
    }
}

impl CudaDevice {
    /// `out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias[m]) (+ residual[n, m])`, with `w` in PyTorch
    /// Linear layout (row-major `[out_features, in_features]`).
    ///
    /// Products accumulate in f32; bias and residual are added in f32 before the single rounding
    /// to `T`. Batches of up to [`CudaDevice::LINEAR_SKINNY_MAX_TOKENS`] rows (decode) run our
    /// skinny tensor-core kernel, which streams W at close to full memory bandwidth; batches of
    /// up to [`CudaDevice::LINEAR_WGMMA_MAX_TOKENS`] rows run our wgmma kernel on a device of
    /// compute capability 9.0 (H100, H200) when the output is narrow (fewer than 64 tiles of 64
    /// rows, so the kernel splits k over a cluster; on wide outputs cuBLASLt is as fast); larger
    /// batches, wide outputs, f32, and operands the kernels cannot take (for the skinny kernel k
    /// not a multiple of 8, `x` or `w` not 16-byte aligned; for the wgmma kernel k or m not a
    /// multiple of 64, a pointer not 16-byte aligned) run cuBLASLt.
    /// `x` holds `n * k` elements, `w` `m * k`, `bias` `m`, `residual` and `out` `n * m`; `out`
    /// must not overlap the inputs.
    ///
    /// A cuBLASLt-bound call builds and caches a plan for its shape on first use (host work
    /// only); cuBLASLt failures are reported as [`CudaError::InvalidArgument`] naming the call
    /// and its status.
    #[allow(clippy::too_many_arguments)]
    pub fn linear<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w: &impl DevicePtr<T>,
        m: usize,
        bias: Option<&CudaView<T>>,
        residual: Option<&CudaView<T>>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        self.linear_on(Route::AUTO, x, n, k, w, m, bias, residual, out)
    }

    /// [`CudaDevice::linear`] with our kernels (skinny or wgmma) launched through programmatic
    /// dependent launch: the kernel may start while the previous kernel on the stream is still
    /// running, streaming `w` at once and waiting for that kernel only before it reads `x`,
    /// `bias` or `residual` and writes `out`. This hides most of the launch gap and tail between
    /// back-to-back kernels, which dominate at decode sizes.
    ///
    /// Use it only when no kernel that may still be running writes `w` (model weights
    /// qualify). On the cuBLASLt path it is the same as `linear`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_overlapped<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w: &impl DevicePtr<T>,
        m: usize,
        bias: Option<&CudaView<T>>,
        residual: Option<&CudaView<T>>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let route = Route {
            path: None,
            overlapped: true,
        };
        self.linear_on(route, x, n, k, w, m, bias, residual, out)
    }

    /// [`CudaDevice::linear`] forced onto the skinny kernel: for benchmarks and tests. Fails
    /// with [`CudaError::InvalidArgument`] where the kernel cannot run (f32, `n` above 64, `k`
    /// not a multiple of 8, `x` or `w` not 16-byte aligned).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_skinny<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w: &impl DevicePtr<T>,
        m: usize,
        bias: Option<&CudaView<T>>,
        residual: Option<&CudaView<T>>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let config = SkinnyConfig::choose(n, k, m);
        let route = Route::forced(Path::Skinny(config));
        self.linear_on(route, x, n, k, w, m, bias, residual, out)
    }

    /// [`CudaDevice::linear`] forced onto the wgmma kernel, launched plainly: for benchmarks
    /// and tests. Fails with [`CudaError::InvalidArgument`] where the kernel cannot run (a
    /// device other than compute capability 9.0, f32, `n` above 64, `k` or `m` not a multiple
    /// of 64, `x`, `w`, `bias`, `residual` or `out` not 16-byte aligned).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_wgmma<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w: &impl DevicePtr<T>,
        m: usize,
        bias: Option<&CudaView<T>>,
        residual: Option<&CudaView<T>>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let route = Route::forced(Path::Wgmma);
        self.linear_on(route, x, n, k, w, m, bias, residual, out)
    }

    /// [`CudaDevice::linear`] forced onto cuBLASLt: for benchmarks and tests.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_cublaslt<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w: &impl DevicePtr<T>,
        m: usize,
        bias: Option<&CudaView<T>>,
        residual: Option<&CudaView<T>>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let route = Route::forced(Path::CublasLt);
        self.linear_on(route, x, n, k, w, m, bias, residual, out)
    }

    /// Tuning hook: the skinny kernel with an explicit launch shape, `row_groups` groups of 8
    /// W rows per block (1 or 2) and `warps` warps splitting k (1 to 16,
    /// fewer at `n` > 16 where the reduction scratch grows), optionally overlapped as in
    /// [`CudaDevice::linear_overlapped`].
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn linear_skinny_tuned<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w: &impl DevicePtr<T>,
        m: usize,
        out: &mut impl DevicePtrMut<T>,
        row_groups: usize,
        warps: usize,
        overlapped: bool,
    ) -> Result<(), CudaError> {
        let nx = SkinnyConfig::token_groups(n);
        if !SkinnyConfig::compiled(nx, row_groups)
            || !(1..=SkinnyConfig::max_warps(nx, row_groups)).contains(&warps)
        {
            return Err(invalid_argument(
                "linear",
                "the skinny launch shape",
                "a compiled row-group count and a warp count within the shared-memory limit",
                format!("{row_groups} row groups and {warps} warps for n = {n}"),
            ));
        }
        let config = SkinnyConfig {
            nx,
            row_groups,
            warps,
        };
        let route = Route {
            path: Some(Path::Skinny(config)),
            overlapped,
        };
        self.linear_on(route, x, n, k, w, m, None, None, out)
    }

    /// Row counts that, passed once each to [`CudaDevice::linear`] for a weight shape, prepare
    /// every cuBLASLt-bound call of that shape with up to `max_rows` rows (above
    /// [`CudaDevice::LINEAR_SKINNY_MAX_TOKENS`]): one per plan bucket, the bucket's own count or
    /// `max_rows` for the last.
    ///
    /// The first cuBLASLt matmul of each bucket costs 2–4 ms of host time (on an H100), and the
    /// very first one in a process about 0.6 s; a model that runs these calls at load keeps
    /// both out of its requests' time to first token.
    pub fn linear_warm_up_rows(max_rows: usize) -> Vec<usize> {
        let mut rows = Vec::new();
        let mut n = Self::LINEAR_SKINNY_MAX_TOKENS + 1;
        while n <= max_rows {
            let bucket = plan_rows(n);
            rows.push(bucket.min(max_rows));
            n = bucket + 1;
        }
        rows
    }

    /// Creates this device's cuBLASLt handle and workspace now rather than on the first
    /// cuBLASLt-bound `linear`. Call it before capturing a CUDA graph: the workspace is a
    /// stream-ordered allocation, which must not land inside a capture.
    pub fn prepare_linear(&self) -> Result<(), CudaError> {
        self.lt_state().map(|_| ())
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_on<T: KernelFloat>(
        &self,
        route: Route,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w: &impl DevicePtr<T>,
        m: usize,
        bias: Option<&CudaView<T>>,
        residual: Option<&CudaView<T>>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        const OP: &str = "linear";
        let x_len = self.check_matrix(OP, n, k)?;
        let w_len = self.check_matrix(OP, m, k)?;
        let out_len = self.check_matrix(OP, n, m)?;
        check_nonzero(OP, "k", k)?;
        self.check_buffer(OP, "x", x, x_len)?;
        self.check_buffer(OP, "w", w, w_len)?;
        if let Some(bias) = bias {
            self.check_buffer(OP, "bias", bias, m)?;
        }
        if let Some(residual) = residual {
            self.check_buffer(OP, "residual", residual, out_len)?;
        }
        self.check_buffer(OP, "out", out, out_len)?;

        let (x_ptr, _x_sync) = x.device_ptr(&self.stream);
        let (w_ptr, _w_sync) = w.device_ptr(&self.stream);
        let bias_ptr = bias.map(|b| b.device_ptr(&self.stream));
        let residual_ptr = residual.map(|r| r.device_ptr(&self.stream));
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let ops = Operands {
            x: x_ptr,
            w: w_ptr,
            bias: bias_ptr.as_ref().map(|(p, _)| *p),
            residual: residual_ptr.as_ref().map(|(p, _)| *p),
            out: out_ptr,
            n,
            k,
            m,
        };
        if out_len == 0 {
            return Ok(());
        }

        let wgmma_rows = n > Self::LINEAR_SKINNY_MAX_TOKENS && n <= Self::LINEAR_WGMMA_MAX_TOKENS;
        let path = match route.path {
            Some(path) => path,
            None if n <= Self::LINEAR_SKINNY_MAX_TOKENS && ops.skinny_obstacle::<T>().is_none() => {
                Path::Skinny(SkinnyConfig::choose(n, k, m))
            }
            None if wgmma_rows
                && ops.wgmma_obstacle::<T>(self.capability()).is_none()
                && wgmma_split(k, m) > 1 =>
            {
                Path::Wgmma
            }
            None => Path::CublasLt,
        };
        match path {
            Path::Skinny(config) => {
                if let Some((argument, expected, found)) = ops.skinny_obstacle::<T>() {
                    return Err(invalid_argument(OP, argument, expected, found));
                }
                self.launch_skinny::<T>(&ops, config, route.overlapped)
            }
            Path::Wgmma => {
                if let Some((argument, expected, found)) =
                    ops.wgmma_obstacle::<T>(self.capability())
                {
                    return Err(invalid_argument(OP, argument, expected, found));
                }
                self.launch_wgmma::<T>(&ops, WgmmaEpilogue::Linear, route.overlapped)
            }
            Path::CublasLt => self.launch_cublaslt::<T>(&ops),
        }
    }

    fn launch_skinny<T: KernelFloat>(
        &self,
        ops: &Operands,
        config: SkinnyConfig,
        overlapped: bool,
    ) -> Result<(), CudaError> {
        let function = self.kernel(MODULE, &config.kernel_name::<T>())?;
        let (n, k, m) = (to_i32(ops.n), to_i32(ops.k), to_i32(ops.m));
        let null: CUdeviceptr = 0;
        let bias = ops.bias.unwrap_or(null);
        let residual = ops.residual.unwrap_or(null);
        let cfg = config.launch_config(ops.m);
        if overlapped {
            let mut params: [*mut c_void; 8] = [
                (&ops.x as *const CUdeviceptr).cast_mut().cast(),
                (&ops.w as *const CUdeviceptr).cast_mut().cast(),
                (&bias as *const CUdeviceptr).cast_mut().cast(),
                (&residual as *const CUdeviceptr).cast_mut().cast(),
                (&ops.out as *const CUdeviceptr).cast_mut().cast(),
                (&n as *const i32).cast_mut().cast(),
                (&k as *const i32).cast_mut().cast(),
                (&m as *const i32).cast_mut().cast(),
            ];
            // SAFETY: as below; `params` points at live values of exactly the kernel's
            // parameter types, in order, for the duration of the call.
            return unsafe {
                self.launch_with_dependency_overlap("linear", &function, cfg, &mut params)
            };
        }
        let mut launch = self.stream.launch_builder(&function);
        launch
            .arg(&ops.x)
            .arg(&ops.w)
            .arg(&bias)
            .arg(&residual)
            .arg(&ops.out)
            .arg(&n)
            .arg(&k)
            .arg(&m);
        // SAFETY: the arguments match `skinny_gemm_*(const T*, const T*, const T*, const T*, T*,
        // int, int, int)` in gemv.cu; the buffer lengths were checked against n, k and m, and
        // `skinny_obstacle` enforced the kernel's alignment and k requirements.
        unsafe { launch.launch(cfg) }.map_err(driver_error("linear"))?;
        Ok(())
    }

    /// Launches the wgmma kernel of `epilogue` on operands `wgmma_obstacle` accepted: a cluster
    /// of `split` blocks per 64 output features, with programmatic dependent launch when
    /// `overlapped`. For [`WgmmaEpilogue::SiluMul`], `ops.m` is the output width I and `ops.w`
    /// holds 2I rows (gate, then up); bias and residual are not read.
    fn launch_wgmma<T: KernelFloat>(
        &self,
        ops: &Operands,
        epilogue: WgmmaEpilogue,
        overlapped: bool,
    ) -> Result<(), CudaError> {
        let op = epilogue.op();
        let function = self.kernel(WGMMA_MODULE, &epilogue.kernel_name::<T>())?;
        self.ctx.bind_to_thread().map_err(driver_error(op))?;
        // Always the limit of the largest launch, never a smaller one: a graph captured earlier
        // must keep finding room for its launches.
        self.allow_dynamic_smem(op, &function, epilogue.shared_bytes(WGMMA_STAGES))?;
        let split = wgmma_split(ops.k, ops.m);
        let k_per_block = ops.k / split;
        let tm_w = tensor_map_2d::<T>(
            op,
            ops.w,
            epilogue.w_tiles() * ops.m,
            ops.k,
            (WGMMA_TILE as u32, WGMMA_TILE as u32),
        )?;
        let tm_x = tensor_map_2d::<T>(
            op,
            ops.x,
            ops.n,
            ops.k,
            (WGMMA_TILE as u32, WGMMA_TILE as u32),
        )?;
        let null: CUdeviceptr = 0;
        let bias = ops.bias.unwrap_or(null);
        let residual = ops.residual.unwrap_or(null);
        let (n, m, k_per_block_i) = (to_i32(ops.n), to_i32(ops.m), to_i32(k_per_block));
        let mut linear_params = [
            kernel_arg(&tm_w),
            kernel_arg(&tm_x),
            kernel_arg(&bias),
            kernel_arg(&residual),
            kernel_arg(&ops.out),
            kernel_arg(&n),
            kernel_arg(&m),
            kernel_arg(&k_per_block_i),
        ];
        let mut silu_params = [
            kernel_arg(&tm_w),
            kernel_arg(&tm_x),
            kernel_arg(&ops.out),
            kernel_arg(&n),
            kernel_arg(&m),
            kernel_arg(&k_per_block_i),
        ];
        let params: &mut [*mut c_void] = match epilogue {
            WgmmaEpilogue::Linear => &mut linear_params,
            WgmmaEpilogue::SiluMul => &mut silu_params,
        };
        let cfg = LaunchConfig {
            grid_dim: (split as u32, (ops.m / WGMMA_TILE) as u32, 1),
            block_dim: (WGMMA_THREADS, 1, 1),
            shared_mem_bytes: epilogue.shared_bytes(k_per_block / WGMMA_TILE) as u32,
        };
        let attributes = LaunchAttributes {
            dependency_overlap: overlapped,
            cluster_x: Some(split as u32),
        };
        // SAFETY: `params` matches `gemm_wgmma_*(CUtensorMap, CUtensorMap, const T*, const T*,
        // T*, int, int, int)` or `gemm_wgmma_silu_*(CUtensorMap, CUtensorMap, T*, int, int, int)`
        // in gemm_wgmma.cu, whichever `epilogue` names, each entry pointing at a live local of
        // that type (the driver copies the tensor maps at launch, or at capture into a graph).
        // The buffer lengths were checked against n, k and m (2m rows of W for SiLU·mul, which
        // the W tensor map covers), and `wgmma_obstacle` enforced the tile multiples, the
        // alignment and the device; the grid, cluster and shared memory follow the kernel's
        // launch contract, `wgmma_split` keeping k a multiple of 64 · split. The kernel waits
        // for the previous one before it touches anything but `w`.
        unsafe { self.launch_with_attributes(op, &function, cfg, attributes, params) }
    }

    fn launch_cublaslt<T: KernelFloat>(&self, ops: &Operands) -> Result<(), CudaError> {
        let state = self.lt_state()?;
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let bias_epilogue = ops.bias.is_some_and(|p| p % BIAS_EPILOGUE_ALIGNMENT == 0);
        let addend = ops.residual.unwrap_or(ops.out);
        let key = PlanKey {
            dtype: T::INDEX,
            n: ops.n,
            k: ops.k,
            m: ops.m,
            bias_epilogue,
            residual: ops.residual.is_some(),
            alignments: [
                alignment(ops.w),
                alignment(ops.x),
                alignment(addend),
                alignment(ops.out),
            ],
        };
        let handle = state.handle;
        let (workspace, workspace_size) = (state.workspace_ptr, state.workspace_size);
        let plan = state.plan::<T>(key)?;
        if bias_epilogue {
            if let Some(bias) = ops.bias {
                set_desc_attribute(
                    &plan.desc,
                    lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias,
                )?;
            }
        }
        let alpha = 1.0f32;
        let beta = if ops.residual.is_some() { 1.0f32 } else { 0.0 };
        // SAFETY: the plan's layouts describe exactly the checked buffers behind these pointers,
        // the workspace is this state's own allocation of `workspace_size` bytes, and the state
        // lock keeps the descriptor's bias pointer stable until the matmul is enqueued.
        unsafe {
            lt::matmul(
                handle,
                plan.desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                ops.w as *const _,
                plan.a.0,
                ops.x as *const _,
                plan.b.0,
                addend as *const _,
                plan.c.0,
                ops.out as *mut _,
                plan.c.0,
                &plan.algo,
                workspace as *mut _,
                workspace_size,
                self.stream.cu_stream() as lt_sys::cudaStream_t,
            )
        }
        .map_err(|e| cublas_error("cublasLtMatmul", e))?;
        drop(state);

        match ops.bias {
            Some(bias) if !bias_epilogue => self.add_row_bias::<T>(ops.out, bias, ops.n, ops.m),
            _ => Ok(()),
        }
    }

    /// `out[r, j] += bias[j]`, for a bias the cuBLASLt epilogue cannot read.
    fn add_row_bias<T: KernelFloat>(
        &self,
        out: CUdeviceptr,
        bias: CUdeviceptr,
        rows: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        let function = self.kernel(MODULE, &format!("add_row_bias_{}", T::SUFFIX))?;
        let threads = consts::ELEMENTWISE_BLOCK_THREADS as usize;
        let blocks = (rows * cols).div_ceil(threads).clamp(1, 4096);
        let (rows, cols) = (to_i32(rows), to_i32(cols));
        let mut launch = self.stream.launch_builder(&function);
        launch.arg(&out).arg(&bias).arg(&rows).arg(&cols);
        // SAFETY: matches `add_row_bias_*(T*, const T*, int, int)` in gemv.cu; `out` holds
        // rows * cols elements and `bias` cols, as checked by `linear_on`.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(driver_error("linear"))?;
        Ok(())
    }

    /// This device stream's cuBLASLt state, created on first use.
    fn lt_state(&self) -> Result<Arc<Mutex<LtState>>, CudaError> {
        let key = Arc::as_ptr(&self.stream) as usize;
        let table = LT_STATES.get_or_init(Default::default);
        let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, state)) = table.iter().find(|(k, _)| *k == key) {
            return Ok(state.clone());
        }

        // SAFETY: only tries to load the library; without this check cudarc panics on the
        // first cuBLASLt call when the library is missing.
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(invalid_argument(
                "linear",
                "the cuBLASLt library",
                "loadable (libcublasLt from the CUDA toolkit)",
                "no libcublasLt on the library search path",
            ));
        }
        self.ctx
            .bind_to_thread()
            .map_err(driver_error("cuBLASLt initialisation"))?;
        let major = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(driver_error("device attribute query"))?;
        let workspace_size = if major >= 9 {
            WORKSPACE_HOPPER
        } else {
            WORKSPACE_OLDER
        };
        let workspace = self.alloc_zeros::<u8>(workspace_size)?;
        let workspace_ptr = {
            let (ptr, _sync) = workspace.device_ptr(&self.stream);
            ptr
        };
        let handle = lt::create_handle().map_err(|e| cublas_error("cublasLtCreate", e))?;
        let state = Arc::new(Mutex::new(LtState {
            handle,
            _workspace: workspace,
            workspace_ptr,
            workspace_size,
            plans: HashMap::new(),
        }));
        table.push((key, state.clone()));
        Ok(state)
    }
}

/// How [`CudaDevice::linear_gate_up_silu`] was asked to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GateUpRoute {
    /// The fused wgmma kernel where it can run and the rows are its (5–64), else the two steps;
    /// launched with programmatic dependent launch.
    Auto,
    /// The fused wgmma kernel, launched plainly; an error where it cannot run.
    Fused,
    /// `linear_overlapped` into the gate|up scratch, then `silu_mul`.
    Unfused,
}

/// Why the fused gate|up + SiLU·mul kernel cannot take `ops` (W of `2 * ops.m` rows, output
/// width `ops.m`), if it cannot: the wgmma kernel's obstacles, named as the op's arguments.
fn gate_up_silu_obstacle<T: KernelFloat>(
    ops: &Operands,
    capability: (i32, i32),
) -> Option<(&'static str, &'static str, String)> {
    ops.wgmma_obstacle::<T>(capability)
        .map(|(argument, expected, found)| {
            let argument = match argument {
                "m" => "inter",
                "the address of `w`" => "the address of `w_gate_up`",
                other => other,
            };
            (argument, expected, found)
        })
}

impl CudaDevice {
    /// `out[n, inter] = silu(g) · u` with `[g | u] = x[n, k] · w_gate_upᵀ`: the gate|up
    /// projection of a gated MLP and its activation. `w_gate_up` is `[2 * inter, k]` in PyTorch
    /// Linear layout, the gate rows first, then the up rows, as [`CudaDevice::silu_mul`] reads
    /// the projection's output.
    ///
    /// Batches of [`CudaDevice::GATE_UP_SILU_FUSED_MIN_TOKENS`] to
    /// [`CudaDevice::LINEAR_WGMMA_MAX_TOKENS`] rows run one kernel, the wgmma
    /// GEMM with SiLU·mul in its epilogue, where that kernel can take the operands (a device of
    /// compute capability 9.0, f16 or bf16, `k` and `inter` multiples of 64, `x`, `w_gate_up`
    /// and `out` 16-byte aligned). Everything else runs the two steps it replaces:
    /// [`CudaDevice::linear_overlapped`] into `gate_up`, then [`CudaDevice::silu_mul`] into
    /// `out`. Either way g and u are rounded to `T` before the activation and the activation
    /// once after it, so the paths differ only in the order of the k sums.
    ///
    /// `x` holds `n * k` elements, `w_gate_up` `2 * inter * k`, `gate_up` `n * 2 * inter`
    /// (scratch for the two-step path; the fused kernel leaves it untouched, so its contents
    /// after the call are unspecified), `out` `n * inter`. Both kernels of either path are
    /// launched with programmatic dependent launch, as [`CudaDevice::linear_overlapped`]: no
    /// kernel that may still be running may write `w_gate_up` (model weights qualify). Nothing
    /// is allocated or synchronised: the call can be captured into a CUDA graph (after
    /// [`CudaDevice::prepare_linear`], for the two-step path's cuBLASLt).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_gate_up_silu<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w_gate_up: &impl DevicePtr<T>,
        inter: usize,
        gate_up: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let route = GateUpRoute::Auto;
        self.gate_up_silu_on(route, x, n, k, w_gate_up, inter, gate_up, out)
    }

    /// [`CudaDevice::linear_gate_up_silu`] forced onto the fused wgmma kernel, launched plainly
    /// (`gate_up` is checked but not used): for benchmarks and tests. Takes 1–64 rows; fails
    /// with [`CudaError::InvalidArgument`] where the kernel cannot run (a device other than
    /// compute capability 9.0, f32, `n` above 64, `k` or `inter` not a multiple of 64, `x`,
    /// `w_gate_up` or `out` not 16-byte aligned).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_gate_up_silu_fused<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w_gate_up: &impl DevicePtr<T>,
        inter: usize,
        gate_up: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let route = GateUpRoute::Fused;
        self.gate_up_silu_on(route, x, n, k, w_gate_up, inter, gate_up, out)
    }

    /// [`CudaDevice::linear_gate_up_silu`] forced onto the two steps the fused kernel replaces
    /// ([`CudaDevice::linear_overlapped`] into `gate_up`, then [`CudaDevice::silu_mul`]): for
    /// benchmarks and tests.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_gate_up_silu_unfused<T: KernelFloat>(
        &self,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w_gate_up: &impl DevicePtr<T>,
        inter: usize,
        gate_up: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let route = GateUpRoute::Unfused;
        self.gate_up_silu_on(route, x, n, k, w_gate_up, inter, gate_up, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn gate_up_silu_on<T: KernelFloat>(
        &self,
        route: GateUpRoute,
        x: &impl DevicePtr<T>,
        n: usize,
        k: usize,
        w_gate_up: &impl DevicePtr<T>,
        inter: usize,
        gate_up: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        const OP: &str = GATE_UP_SILU_OP;
        let x_len = self.check_matrix(OP, n, k)?;
        let wide = inter.saturating_mul(2);
        let w_len = self.check_matrix(OP, wide, k)?;
        let gate_up_len = self.check_matrix(OP, n, wide)?;
        let out_len = self.check_matrix(OP, n, inter)?;
        check_nonzero(OP, "k", k)?;
        self.check_buffer(OP, "x", x, x_len)?;
        self.check_buffer(OP, "w_gate_up", w_gate_up, w_len)?;
        self.check_buffer(OP, "gate_up", gate_up, gate_up_len)?;
        self.check_buffer(OP, "out", out, out_len)?;
        if out_len == 0 {
            return Ok(());
        }

        let operands = |x: CUdeviceptr, w: CUdeviceptr, out: CUdeviceptr| Operands {
            x,
            w,
            bias: None,
            residual: None,
            out,
            n,
            k,
            m: inter,
        };
        let fused = match route {
            GateUpRoute::Fused => true,
            GateUpRoute::Unfused => false,
            GateUpRoute::Auto => {
                (Self::GATE_UP_SILU_FUSED_MIN_TOKENS..=Self::LINEAR_WGMMA_MAX_TOKENS).contains(&n)
                    && {
                        let capability = self.capability();
                        let (x_ptr, _x_sync) = x.device_ptr(&self.stream);
                        let (w_ptr, _w_sync) = w_gate_up.device_ptr(&self.stream);
                        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
                        let ops = operands(x_ptr, w_ptr, out_ptr);
                        gate_up_silu_obstacle::<T>(&ops, capability).is_none()
                    }
            }
        };
        if !fused {
            let linear = Route {
                path: None,
                overlapped: true,
            };
            self.linear_on(linear, x, n, k, w_gate_up, wide, None, None, gate_up)?;
            return self.silu_mul(&*gate_up, out, n, inter);
        }

        let capability = self.capability();
        let (x_ptr, _x_sync) = x.device_ptr(&self.stream);
        let (w_ptr, _w_sync) = w_gate_up.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let ops = operands(x_ptr, w_ptr, out_ptr);
        if let Some((argument, expected, found)) = gate_up_silu_obstacle::<T>(&ops, capability) {
            return Err(invalid_argument(OP, argument, expected, found));
        }
        let overlapped = route == GateUpRoute::Auto;
        self.launch_wgmma::<T>(&ops, WgmmaEpilogue::SiluMul, overlapped)
    }
}

/// The op a fused projection computes its x with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prologue {
    /// Residual add (when `delta` is given) and RMSNorm.
    AddRmsNorm {
        delta: bool,
    },
    SiluMul,
}

impl Prologue {
    fn op(self) -> &'static str {
        match self {
            Prologue::AddRmsNorm { .. } => "add_rms_norm_linear",
            Prologue::SiluMul => "silu_mul_linear",
        }
    }

    fn kernel_name<T: KernelFloat>(self, config: SkinnyConfig) -> String {
        let family = match self {
            Prologue::AddRmsNorm { delta: true } => "add_rms_norm_gemm",
            Prologue::AddRmsNorm { delta: false } => "rms_norm_gemm",
            Prologue::SiluMul => "silu_mul_gemm",
        };
        format!(
            "{family}_{}_x{}_r{}",
            T::SUFFIX,
            config.nx,
            config.row_groups
        )
    }

    /// Dynamic shared memory of one block, laid out as gemv.cu's fused kernels expect: the
    /// k-reduction partials, the row sums, `n` staged rows of x and, for the norm, its weight.
    fn shared_bytes<T>(self, partials: usize, n: usize, k: usize) -> usize {
        let elem = std::mem::size_of::<T>();
        let weight = match self {
            Prologue::AddRmsNorm { .. } => k * elem,
            Prologue::SiluMul => 0,
        };
        partials + FUSED_SUM_SLOTS_BYTES + n * stage_stride(k) * elem + weight
    }
}

impl CudaDevice {
    /// Most rows [`CudaDevice::add_rms_norm_linear`] and [`CudaDevice::silu_mul_linear`] take:
    /// the decode batches that run the skinny kernel.
    pub const FUSED_LINEAR_MAX_TOKENS: usize = FUSED_TOKEN_LIMIT;

    /// Whether [`CudaDevice::add_rms_norm_linear`] and [`CudaDevice::silu_mul_linear`] take
    /// `n` rows of width `k` (the hidden size, or the intermediate size for SiLU·mul) with `T`
    /// storage on this device: f16 or bf16, `n ≤ 16`, `k` a non-zero multiple of 8, and the
    /// `n` staged rows within a block's shared memory (on an H100, 16 rows up to k = 6,272,
    /// one row up to k = 53,952). Buffer lengths and alignment are checked by the calls.
    pub fn fused_linear_fits<T: KernelFloat>(&self, n: usize, k: usize) -> bool {
        self.fused_obstacle::<T>(n, k).is_none()
    }

    /// `out[n, m] = rms_norm(residual + delta) · wᵀ (+ bias)` in one kernel, for decode-sized
    /// batches: the residual add and RMSNorm that precede a projection, folded into it.
    ///
    /// Every element is computed as [`CudaDevice::fused_add_rms_norm`] followed by
    /// [`CudaDevice::linear`] would: `residual + delta` is rounded to `T`, normalised with
    /// `norm_weight` and `eps` and rounded to `T` again, then multiplied in f32; only the order
    /// in which the sum of squares is added up differs. Without `delta` the rows of `residual`
    /// are normalised as they are. When `residual_out` is given, it receives the rounded
    /// `residual + delta` (or a copy of `residual`): the updated residual stream, written once.
    /// It must be another buffer than `residual`, whose old value the kernel is still reading;
    /// a decode step alternates two residual buffers.
    ///
    /// `residual`, `delta` and `residual_out` hold `n * k` elements, `norm_weight` `k`, `w`
    /// `m * k` (PyTorch Linear layout), `bias` `m` and `out` `n * m`. Requirements (else
    /// [`CudaError::InvalidArgument`]): those of [`CudaDevice::fused_linear_fits`], and every
    /// buffer but `bias` and `out` 16-byte aligned.
    ///
    /// Every block recomputes the norm of all `n` rows before its share of the product, so the
    /// fusion pays only at the smallest batches: on an H100 with the Qwen3-0.6B shapes, the
    /// QKV projection fused took 5.70 µs against 6.68 for the norm kernel plus
    /// [`CudaDevice::linear_overlapped`] at 1 row, 6.32 against 6.80 at 4, 7.44 against 6.96
    /// at 8 (`fused_timing_report` in tests/cuda_linear.rs).
    ///
    /// The kernel is launched with programmatic dependent launch, as
    /// [`CudaDevice::linear_overlapped`]: it starts loading `w` before the previous kernel on
    /// the stream has finished, and reads everything else only after it has. So no kernel that
    /// may still be running may write `w` (model weights qualify). Nothing is allocated or
    /// synchronised: the call can be captured into a CUDA graph.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm_linear<T: KernelFloat>(
        &self,
        residual: &impl DevicePtr<T>,
        delta: Option<&CudaView<T>>,
        norm_weight: &impl DevicePtr<T>,
        eps: f32,
        n: usize,
        k: usize,
        w: &impl DevicePtr<T>,
        m: usize,
        bias: Option<&CudaView<T>>,
        residual_out: Option<&mut CudaViewMut<T>>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let prologue = Prologue::AddRmsNorm {
            delta: delta.is_some(),
        };
        let op = prologue.op();
        let x_len = self.check_matrix(op, n, k)?;
        let w_len = self.check_matrix(op, m, k)?;
        let out_len = self.check_matrix(op, n, m)?;
        check_nonzero(op, "k", k)?;
        check_eps(op, eps)?;
        self.check_buffer(op, "residual", residual, x_len)?;
        if let Some(delta) = delta {
            self.check_buffer(op, "delta", delta, x_len)?;
        }
        self.check_buffer(op, "norm_weight", norm_weight, k)?;
        self.check_buffer(op, "w", w, w_len)?;
        if let Some(bias) = bias {
            self.check_buffer(op, "bias", bias, m)?;
        }
        if let Some(residual_out) = residual_out.as_deref() {
            self.check_buffer(op, "residual_out", residual_out, x_len)?;
        }
        self.check_buffer(op, "out", out, out_len)?;
        if let Some((argument, expected, found)) = self.fused_obstacle::<T>(n, k) {
            return Err(invalid_argument(op, argument, expected, found));
        }

        let (residual_ptr, _residual_sync) = residual.device_ptr(&self.stream);
        let delta_ptr = delta.map(|d| d.device_ptr(&self.stream));
        let (norm_ptr, _norm_sync) = norm_weight.device_ptr(&self.stream);
        let (w_ptr, _w_sync) = w.device_ptr(&self.stream);
        let bias_ptr = bias.map(|b| b.device_ptr(&self.stream));
        let residual_out_ptr = residual_out.map(|r| r.device_ptr_mut(&self.stream));
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let null: CUdeviceptr = 0;
        let delta_ptr = delta_ptr.as_ref().map_or(null, |(p, _)| *p);
        let bias_ptr = bias_ptr.as_ref().map_or(null, |(p, _)| *p);
        let residual_out_ptr = residual_out_ptr.as_ref().map_or(null, |(p, _)| *p);
        check_aligned(
            op,
            &[
                ("the address of `residual`", residual_ptr),
                ("the address of `delta`", delta_ptr),
                ("the address of `norm_weight`", norm_ptr),
                ("the address of `w`", w_ptr),
                ("the address of `residual_out`", residual_out_ptr),
            ],
        )?;
        if out_len == 0 {
            return Ok(());
        }

        let config = SkinnyConfig::choose(n, k, m);
        let (n_i, k_i, m_i) = (to_i32(n), to_i32(k), to_i32(m));
        let mut params: [*mut c_void; 11] = [
            (&residual_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&delta_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&norm_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&residual_out_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&eps as *const f32).cast_mut().cast(),
            (&w_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&bias_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&out_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&n_i as *const i32).cast_mut().cast(),
            (&k_i as *const i32).cast_mut().cast(),
            (&m_i as *const i32).cast_mut().cast(),
        ];
        // SAFETY: `params` matches `{add_,}rms_norm_gemm_*(const T*, const T*, const T*, T*,
        // float, const T*, const T*, T*, int, int, int)` in gemv.cu, each entry pointing at a
        // live local of that type; the buffer lengths were checked against n, k and m and the
        // pointers' alignment above, and Rust's borrows keep `residual_out` and `out` apart from
        // the inputs.
        unsafe { self.launch_fused::<T>(prologue, config, n, k, m, &mut params) }
    }

    /// `out[n, m] = (silu(gate) * up) · wᵀ (+ bias)` in one kernel, for decode-sized batches:
    /// the gated activation folded into the down projection. Each row of `gate_up` is the gate
    /// projection followed by the up projection, `2 * inter` elements, as
    /// [`CudaDevice::silu_mul`] reads them; the activation is rounded to `T` exactly as that op
    /// stores it, then multiplied in f32.
    ///
    /// `gate_up` holds `n * 2 * inter` elements, `w` `m * inter`, `bias` `m`, `out` `n * m`.
    /// Requirements (else [`CudaError::InvalidArgument`]): those of
    /// [`CudaDevice::fused_linear_fits`] with `inter` as `k`, and `gate_up` and `w` 16-byte
    /// aligned. Launched with programmatic dependent launch, as
    /// [`CudaDevice::add_rms_norm_linear`]; capturable.
    #[allow(clippy::too_many_arguments)]
    pub fn silu_mul_linear<T: KernelFloat>(
        &self,
        gate_up: &impl DevicePtr<T>,
        n: usize,
        inter: usize,
        w: &impl DevicePtr<T>,
        m: usize,
        bias: Option<&CudaView<T>>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let prologue = Prologue::SiluMul;
        let op = prologue.op();
        let x_len = self.check_matrix(op, n, inter)?;
        let w_len = self.check_matrix(op, m, inter)?;
        let out_len = self.check_matrix(op, n, m)?;
        check_nonzero(op, "inter", inter)?;
        self.check_buffer(op, "gate_up", gate_up, 2 * x_len)?;
        self.check_buffer(op, "w", w, w_len)?;
        if let Some(bias) = bias {
            self.check_buffer(op, "bias", bias, m)?;
        }
        self.check_buffer(op, "out", out, out_len)?;
        if let Some((argument, expected, found)) = self.fused_obstacle::<T>(n, inter) {
            return Err(invalid_argument(op, argument, expected, found));
        }

        let (gate_up_ptr, _gate_up_sync) = gate_up.device_ptr(&self.stream);
        let (w_ptr, _w_sync) = w.device_ptr(&self.stream);
        let bias_ptr = bias.map(|b| b.device_ptr(&self.stream));
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let bias_ptr = bias_ptr.as_ref().map_or(0, |(p, _)| *p);
        check_aligned(
            op,
            &[
                ("the address of `gate_up`", gate_up_ptr),
                ("the address of `w`", w_ptr),
            ],
        )?;
        if out_len == 0 {
            return Ok(());
        }

        let config = SkinnyConfig::choose(n, inter, m);
        let (n_i, k_i, m_i) = (to_i32(n), to_i32(inter), to_i32(m));
        let mut params: [*mut c_void; 7] = [
            (&gate_up_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&w_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&bias_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&out_ptr as *const CUdeviceptr).cast_mut().cast(),
            (&n_i as *const i32).cast_mut().cast(),
            (&k_i as *const i32).cast_mut().cast(),
            (&m_i as *const i32).cast_mut().cast(),
        ];
        // SAFETY: `params` matches `silu_mul_gemm_*(const T*, const T*, const T*, T*, int, int,
        // int)` in gemv.cu, each entry pointing at a live local of that type; lengths and
        // alignment were checked above.
        unsafe { self.launch_fused::<T>(prologue, config, n, inter, m, &mut params) }
    }

    /// Launches the fused kernel of `prologue` for `config` with programmatic dependent launch,
    /// over `n` rows of width `k` and `m` rows of W. The grid holds at most as many blocks as
    /// fit on the GPU at once (each loops over tiles of W), so every block's prologue runs in
    /// the first and only wave; the dynamic shared-memory limit is raised first when the staged
    /// rows need more than 48 KB.
    ///
    /// # Safety
    /// As [`CudaDevice::launch_with_dependency_overlap`]; the caller has checked the shape with
    /// `fused_obstacle`.
    unsafe fn launch_fused<T: KernelFloat>(
        &self,
        prologue: Prologue,
        config: SkinnyConfig,
        n: usize,
        k: usize,
        m: usize,
        params: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        let op = prologue.op();
        let function = self.kernel(MODULE, &prologue.kernel_name::<T>(config))?;
        // The attribute and occupancy calls below act on the current context.
        self.ctx.bind_to_thread().map_err(driver_error(op))?;
        let mut cfg = config.launch_config(m);
        let shared = prologue.shared_bytes::<T>(cfg.shared_mem_bytes as usize, n, k);
        if shared > SKINNY_MAX_SHARED {
            function
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    to_i32(shared),
                )
                .map_err(driver_error(op))?;
        }
        cfg.shared_mem_bytes = shared as u32;
        // Without the occupancy figures the grid keeps one block per tile: still correct.
        let resident = function
            .occupancy_max_active_blocks_per_multiprocessor(cfg.block_dim.0, shared, None)
            .ok()
            .zip(
                self.ctx
                    .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                    .ok(),
            )
            .map(|(per_sm, sms)| per_sm as usize * usize::try_from(sms).unwrap_or(0))
            .filter(|&blocks| blocks > 0);
        if let Some(resident) = resident {
            cfg.grid_dim.0 = cfg.grid_dim.0.min(resident as u32);
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_with_dependency_overlap(op, &function, cfg, params) }
    }

    /// Why the fused kernels cannot take `n` rows of width `k` in `T` on this device, if they
    /// cannot.
    fn fused_obstacle<T: KernelFloat>(
        &self,
        n: usize,
        k: usize,
    ) -> Option<(&'static str, &'static str, String)> {
        if T::SUFFIX == "f32" {
            return Some(("the dtype", "f16 or bf16", T::SUFFIX.to_string()));
        }
        if n > FUSED_TOKEN_LIMIT {
            return Some(("n", "at most 16 for a fused projection", n.to_string()));
        }
        if k == 0 || !k.is_multiple_of(PACK) {
            return Some((
                "the row width",
                "a non-zero multiple of 8 for the fused kernel's 16-byte loads",
                k.to_string(),
            ));
        }
        let bytes =
            Prologue::AddRmsNorm { delta: true }.shared_bytes::<T>(FUSED_MAX_PARTIALS_BYTES, n, k);
        let limit = self.max_shared_per_block();
        if bytes > limit {
            return Some((
                "the block's shared memory",
                "within the device's per-block limit",
                format!("{bytes} bytes for {n} rows of {k}, limit {limit}"),
            ));
        }
        None
    }

    /// Shared memory one block may use after opting in (227 KB on an H100; the 48 KB every
    /// device grants if the query fails).
    fn max_shared_per_block(&self) -> usize {
        self.ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .ok()
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(SKINNY_MAX_SHARED)
    }
}

/// Fails with `op`'s alignment error for the first non-null pointer that is not 16-byte
/// aligned (the fused kernels read and write every operand in 16-byte packs).
fn check_aligned(
    op: &'static str,
    pointers: &[(&'static str, CUdeviceptr)],
) -> Result<(), CudaError> {
    for &(name, ptr) in pointers {
        if ptr % 16 != 0 {
            return Err(invalid_argument(
                op,
                name,
                "16-byte aligned for the fused kernel",
                format!("{ptr:#x}"),
            ));
        }
    }
    Ok(())
}

impl CudaDevice {
    /// Largest batch `linear` sends to the skinny kernel; larger batches go to the wgmma kernel
    /// or cuBLASLt. From 32 rows on, cuBLASLt alone was as fast as the skinny kernel or faster
    /// for every Qwen3-0.6B decode shape on an H100.
    pub const LINEAR_SKINNY_MAX_TOKENS: usize = 16;

    /// Fewest rows [`CudaDevice::linear_gate_up_silu`] runs as one wgmma kernel. Measured on an
    /// H100 with the Qwen3-0.6B MLP (µs a call under PDL, against the skinny kernel plus
    /// `silu_mul`): 7.92 against 10.21 at 8 rows, 7.53 against 10.15 at 16, 7.73 against 8.78
    /// at 32 (cuBLASLt from 17 rows). Below 5 rows decode steps take the fused GEMVs instead.
    pub const GATE_UP_SILU_FUSED_MIN_TOKENS: usize = 5;

    /// Largest batch `linear` sends to the wgmma kernel (from
    /// [`CudaDevice::LINEAR_SKINNY_MAX_TOKENS`] + 1 rows on, on a device of compute capability
    /// 9.0); larger batches go to cuBLASLt. One 64-row tile of x per block.
    pub const LINEAR_WGMMA_MAX_TOKENS: usize = WGMMA_TOKEN_LIMIT;
}

const _: () = assert!(CudaDevice::LINEAR_SKINNY_MAX_TOKENS <= SKINNY_TOKEN_LIMIT);
const _: () = assert!(CudaDevice::LINEAR_SKINNY_MAX_TOKENS < CudaDevice::LINEAR_WGMMA_MAX_TOKENS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_buckets_cover_each_row_count_with_at_most_half_again_as_many() {
        assert_eq!(plan_rows(1), 16);
        assert_eq!(plan_rows(17), 32);
        assert_eq!(plan_rows(256), 256);
        assert_eq!(plan_rows(257), 384);
        assert_eq!(plan_rows(600), 768);
        assert_eq!(plan_rows(4096), 4096);
        assert_eq!(plan_rows(4097), 6144);
        assert_eq!(
            CudaDevice::linear_warm_up_rows(600),
            [32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 384, 512, 600]
        );
        assert!(CudaDevice::linear_warm_up_rows(16).is_empty());
        for n in 1..20_000 {
            let rows = plan_rows(n);
            assert!(rows >= n, "{n}");
            assert!(n <= 16 || 2 * rows <= 3 * n + 32, "{n} -> {rows}");
            // Buckets nest: every count of a bucket maps to the bucket itself.
            assert_eq!(plan_rows(rows), rows, "{n}");
        }
    }

    #[test]
    fn token_groups_are_the_compiled_powers_of_two() {
        let expect = [
            (1, 1),
            (8, 1),
            (9, 2),
            (16, 2),
            (17, 4),
            (32, 4),
            (33, 8),
            (64, 8),
        ];
        for (n, nx) in expect {
            assert_eq!(SkinnyConfig::token_groups(n), nx, "n = {n}");
        }
    }

    #[test]
    fn chosen_configs_stay_within_the_compiled_kernels() {
        for n in [1, 3, 8, 9, 16, 33, 64] {
            for k in [8, 64, 576, 1000, 1024, 3072, 8192] {
                for m in [1, 7, 1000, 8192, 151_936] {
                    let c = SkinnyConfig::choose(n, k, m);
                    assert!(SkinnyConfig::compiled(c.nx, c.row_groups), "{c:?}");
                    assert!(8 * c.nx >= n);
                    assert!((1..=SkinnyConfig::max_warps(c.nx, c.row_groups)).contains(&c.warps));
                    let cfg = c.launch_config(m);
                    assert!(cfg.grid_dim.0 as usize * 8 * c.row_groups >= m);
                    assert!(cfg.block_dim.0 as usize <= SKINNY_MAX_WARPS * 32);
                    assert!(cfg.shared_mem_bytes as usize <= SKINNY_MAX_SHARED);
                }
            }
        }
    }

    #[test]
    fn decode_shapes_get_the_measured_launch_shapes() {
        let shape = |n, k, m| {
            let c = SkinnyConfig::choose(n, k, m);
            (c.row_groups, c.warps)
        };
        assert_eq!(shape(1, 1024, 4096), (2, 8));
        assert_eq!(shape(1, 2048, 1024), (1, 16));
        assert_eq!(shape(1, 1024, 6144), (2, 8));
        assert_eq!(shape(1, 3072, 1024), (1, 16));
        assert_eq!(shape(1, 1024, 151_936), (2, 8));
        assert_eq!(shape(16, 2048, 1024), (2, 16));
        // 64 tokens need four accumulator tiles: the reduction scratch caps the warps.
        assert_eq!(shape(64, 3072, 1024), (2, 12));
    }

    #[test]
    fn fused_kernels_use_compiled_shapes_within_the_partials_bound() {
        for n in 1..=FUSED_TOKEN_LIMIT {
            for k in [8, 64, 1024, 3072, 8192, 14_336, 32_768] {
                for m in [1, 7, 1024, 6144, 151_936] {
                    let c = SkinnyConfig::choose(n, k, m);
                    assert!([1, 2].contains(&c.nx), "{c:?}");
                    assert!(SkinnyConfig::compiled(c.nx, c.row_groups), "{c:?}");
                    let partials = c.launch_config(m).shared_mem_bytes as usize;
                    assert!(partials <= FUSED_MAX_PARTIALS_BYTES, "{c:?}");
                }
            }
        }
        let c = SkinnyConfig::choose(16, 1024, 6144);
        assert_eq!(
            Prologue::AddRmsNorm { delta: true }.kernel_name::<half::bf16>(c),
            "add_rms_norm_gemm_bf16_x2_r2"
        );
        assert_eq!(
            Prologue::AddRmsNorm { delta: false }.kernel_name::<half::f16>(c),
            "rms_norm_gemm_f16_x2_r2"
        );
        assert_eq!(
            Prologue::SiluMul.kernel_name::<half::bf16>(SkinnyConfig::choose(1, 3072, 1024)),
            "silu_mul_gemm_bf16_x1_r1"
        );
    }

    #[test]
    fn fused_shared_memory_follows_the_kernel_layout() {
        // Rows padded to 64 bytes past a multiple of 128: 1000 -> 1056 elements.
        assert_eq!(stage_stride(1000), 1056);
        assert_eq!(stage_stride(1024), 1056);
        assert_eq!(stage_stride(8), 96);
        let norm = Prologue::AddRmsNorm { delta: true };
        assert_eq!(
            norm.shared_bytes::<half::bf16>(8192, 2, 1024),
            8192 + 64 + 2 * 1056 * 2 + 1024 * 2
        );
        assert_eq!(
            Prologue::SiluMul.shared_bytes::<half::bf16>(8192, 2, 1024),
            8192 + 64 + 2 * 1056 * 2
        );
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0), 256);
    }

    #[test]
    fn wgmma_splits_fill_the_grid_within_a_portable_cluster() {
        // The Qwen3-0.6B decode shapes get the splits measured best on an H100.
        assert_eq!(wgmma_split(1024, 4096), 1);
        assert_eq!(wgmma_split(2048, 1024), 4);
        assert_eq!(wgmma_split(1024, 6144), 1);
        assert_eq!(wgmma_split(3072, 1024), 4);
        assert_eq!(wgmma_split(1024, 151_936), 1);
        // Capped at 8, then halved until whole slabs divide k.
        assert_eq!(wgmma_split(3072, 64), 8);
        assert_eq!(wgmma_split(384, 64), 2);
        assert_eq!(wgmma_split(1088, 64), 1);
        assert_eq!(wgmma_split(64, 64), 1);
        for k in (64..=8192).step_by(64) {
            for m in (64..=8192).step_by(64) {
                let split = wgmma_split(k, m);
                assert!(
                    split.is_power_of_two() && split <= WGMMA_MAX_SPLIT,
                    "{k} {m}"
                );
                assert!(k.is_multiple_of(WGMMA_TILE * split), "{k} {m}");
            }
        }
    }

    #[test]
    fn wgmma_shared_memory_follows_the_kernel_layout() {
        // Alignment slack and barriers, then the ring slots used or the 64 × 68 f32 partial
        // tile, whichever is larger.
        let linear = WgmmaEpilogue::Linear;
        assert_eq!(linear.shared_bytes(1), 2048 + 64 * 68 * 4);
        assert_eq!(linear.shared_bytes(2), 2048 + 2 * 16384);
        assert_eq!(linear.shared_bytes(8), 2048 + 8 * 16384);
        assert_eq!(linear.shared_bytes(48), linear.shared_bytes(8));
        // SiLU·mul: slots of two W tiles and an x tile, two partial tiles.
        let silu = WgmmaEpilogue::SiluMul;
        assert_eq!(silu.shared_bytes(1), 2048 + 2 * 64 * 68 * 4);
        assert_eq!(silu.shared_bytes(2), 2048 + 2 * 24576);
        assert_eq!(silu.shared_bytes(8), 2048 + 8 * 24576);
        assert_eq!(silu.shared_bytes(48), silu.shared_bytes(8));
        // One block per SM at most: within the 227 KB an H100 grants a block.
        for epilogue in [linear, silu] {
            assert!(
                epilogue.shared_bytes(WGMMA_STAGES) <= 227 * 1024,
                "{epilogue:?}"
            );
        }
    }

    #[test]
    fn gate_up_silu_takes_the_measured_split_and_names_its_arguments() {
        // Qwen3-0.6B: I = 3072 is 48 tiles of 64 output features, so k = 1024 splits in 2.
        assert_eq!(wgmma_split(1024, 3072), 2);
        assert_eq!(
            WgmmaEpilogue::SiluMul.kernel_name::<half::bf16>(),
            "gemm_wgmma_silu_bf16"
        );
        assert_eq!(
            WgmmaEpilogue::Linear.kernel_name::<half::f16>(),
            "gemm_wgmma_f16"
        );
        let ops = |w, inter| Operands {
            x: 0x1000,
            w,
            bias: None,
            residual: None,
            out: 0x5000,
            n: 32,
            k: 1024,
            m: inter,
        };
        let hopper = (9, 0);
        assert!(gate_up_silu_obstacle::<half::bf16>(&ops(0x2000, 3072), hopper).is_none());
        assert_eq!(
            gate_up_silu_obstacle::<half::bf16>(&ops(0x2000, 3000), hopper).map(|o| o.0),
            Some("inter")
        );
        assert_eq!(
            gate_up_silu_obstacle::<half::bf16>(&ops(0x2002, 3072), hopper).map(|o| o.0),
            Some("the address of `w_gate_up`")
        );
        assert_eq!(
            gate_up_silu_obstacle::<half::bf16>(&ops(0x2000, 3072), (8, 0)).map(|o| o.0),
            Some("the device")
        );
    }

    #[test]
    fn wgmma_obstacles_name_the_problem() {
        let ops = |n, k, m| Operands {
            x: 0x1000,
            w: 0x2000,
            bias: Some(0x3000),
            residual: Some(0x4000),
            out: 0x5000,
            n,
            k,
            m,
        };
        let hopper = (9, 0);
        let first = |o: &Operands, capability| o.wgmma_obstacle::<half::bf16>(capability);
        assert!(first(&ops(17, 1024, 4096), hopper).is_none());
        assert!(first(&ops(1, 64, 64), hopper).is_none());
        assert_eq!(
            ops(64, 64, 64).wgmma_obstacle::<f32>(hopper).map(|o| o.0),
            Some("the dtype")
        );
        assert!(ops(64, 64, 64)
            .wgmma_obstacle::<half::f16>(hopper)
            .is_none());
        let device = first(&ops(32, 1024, 1024), (8, 9)).unwrap();
        assert_eq!((device.0, device.2.as_str()), ("the device", "8.9"));
        assert_eq!(
            first(&ops(32, 1024, 1024), (10, 0)).map(|o| o.0),
            Some("the device")
        );
        assert_eq!(first(&ops(65, 1024, 1024), hopper).map(|o| o.0), Some("n"));
        assert_eq!(first(&ops(32, 1000, 1024), hopper).map(|o| o.0), Some("k"));
        assert_eq!(first(&ops(32, 1024, 1000), hopper).map(|o| o.0), Some("m"));
        assert_eq!(
            first(&ops(32, 1024, WGMMA_MAX_M + 64), hopper).map(|o| o.0),
            Some("m")
        );
        assert!(first(&ops(32, 1024, WGMMA_MAX_M), hopper).is_none());
        let misaligned = [
            (
                "the address of `x`",
                Operands {
                    x: 0x1008,
                    ..ops(32, 64, 64)
                },
            ),
            (
                "the address of `w`",
                Operands {
                    w: 0x2002,
                    ..ops(32, 64, 64)
                },
            ),
            (
                "the address of `bias`",
                Operands {
                    bias: Some(0x3002),
                    ..ops(32, 64, 64)
                },
            ),
            (
                "the address of `residual`",
                Operands {
                    residual: Some(0x4008),
                    ..ops(32, 64, 64)
                },
            ),
            (
                "the address of `out`",
                Operands {
                    out: 0x5002,
                    ..ops(32, 64, 64)
                },
            ),
        ];
        for (name, o) in misaligned {
            assert_eq!(first(&o, hopper).map(|o| o.0), Some(name));
        }
        let without_addends = Operands {
            bias: None,
            residual: None,
            ..ops(32, 64, 64)
        };
        assert!(first(&without_addends, hopper).is_none());
    }

    #[test]
    fn skinny_obstacles_name_the_problem() {
        let ops = |n, k, x| Operands {
            x,
            w: 0x2000,
            bias: None,
            residual: None,
            out: 0x3000,
            n,
            k,
            m: 16,
        };
        assert!(ops(8, 64, 0x1000).skinny_obstacle::<half::bf16>().is_none());
        assert_eq!(
            ops(8, 64, 0x1000).skinny_obstacle::<f32>().map(|o| o.0),
            Some("the dtype")
        );
        assert_eq!(
            ops(65, 64, 0x1000)
                .skinny_obstacle::<half::f16>()
                .map(|o| o.0),
            Some("n")
        );
        assert_eq!(
            ops(1, 63, 0x1000)
                .skinny_obstacle::<half::f16>()
                .map(|o| o.0),
            Some("k")
        );
        assert_eq!(
            ops(1, 64, 0x1002)
                .skinny_obstacle::<half::f16>()
                .map(|o| o.0),
            Some("the address of `x`")
        );
    }
}
