//! The fused step between the QKV projection and attention (`cuda/rope.cu`): per-head q/k RMSNorm,
//! rotate-half RoPE, and the write of k and v into the paged KV caches, in one launch per layer.

use std::ffi::c_void;

use cudarc::driver::{CudaView, DevicePtr, DevicePtrMut, LaunchConfig};

use super::{
    check_eps, check_limit, check_nonzero, invalid_argument, kernel_arg, CudaDevice, CudaError,
    KernelFloat,
};

/// Largest head dimension the kernel handles (mirrors `ROPE_MAX_HEAD_DIM` in rope.cu).
pub const ROPE_MAX_HEAD_DIM: usize = 512;
/// Warps per block, one (token, head) each (mirrors `ROPE_WARPS_PER_BLOCK` in rope.cu).
const WARPS_PER_BLOCK: usize = 4;
/// A `slot_mapping` entry with this value leaves the token's KV untouched (padding rows).
pub const SKIP_SLOT: u32 = u32::MAX;

/// Shape of one [`CudaDevice::rope_qk_norm_kv_write`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeParams {
    /// Tokens in the batch (rows of `qkv`).
    pub n: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: a divisor of `num_heads` in practice; not required here).
    pub num_kv_heads: usize,
    /// Elements per head; even, at most [`ROPE_MAX_HEAD_DIM`].
    pub head_dim: usize,
}

impl CudaDevice {
    /// Everything between the fused QKV projection and attention, for one layer.
    ///
    /// `qkv` is `[n, (num_heads + 2 * num_kv_heads) * head_dim]` straight from the QKV GEMM (bias
    /// already added): q heads, then k heads, then v heads. Writes `q_out`
    /// (`[n, num_heads * head_dim]`) = rope(q_norm(q)), and writes rope(k_norm(k)) and v into
    /// `k_cache` / `v_cache` (`[num_blocks, block_size, num_kv_heads, head_dim]`, seen as flat
    /// slots) at slot `slot_mapping[i]` (= block * block_size + offset). `positions[i]` is token
    /// i's absolute position and `inv_freq` holds `head_dim / 2` frequencies (RoPE scaling folded
    /// in). Each norm is an RMSNorm over one head with its `head_dim` weights, skipped when `None`.
    ///
    /// Matches the CPU path (`cpu::rms_norm` per head, then `cpu::apply_rope`): f32 compute with
    /// the angle `position as f32 * inv_freq[i]` and precise sin/cos, rounded once to `T`.
    /// A slot equal to [`SKIP_SLOT`] (or past the end of the caches) skips that token's KV write;
    /// its q row is still written. Positions and slots are read on the device, so the launch can
    /// be captured in a CUDA graph and replayed with new values. The kernel is launched with
    /// programmatic dependent launch: it is scheduled during the previous kernel's tail but
    /// touches no memory before that kernel has finished.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qk_norm_kv_write<T: KernelFloat>(
        &self,
        qkv: &impl DevicePtr<T>,
        positions: &impl DevicePtr<u32>,
        slot_mapping: &impl DevicePtr<u32>,
        inv_freq: &impl DevicePtr<f32>,
        q_norm: Option<&CudaView<'_, T>>,
        k_norm: Option<&CudaView<'_, T>>,
        eps: f32,
        q_out: &mut impl DevicePtrMut<T>,
        k_cache: &mut impl DevicePtrMut<T>,
        v_cache: &mut impl DevicePtrMut<T>,
        p: &RopeParams,
    ) -> Result<(), CudaError> {
        const OP: &str = "rope_qk_norm_kv_write";
        let shape = check_rope_shape(p)?;
        check_eps(OP, eps)?;
        self.check_buffer(OP, "qkv", qkv, shape.qkv_len)?;
        self.check_buffer(OP, "positions", positions, p.n)?;
        self.check_buffer(OP, "slot_mapping", slot_mapping, p.n)?;
        self.check_buffer(OP, "inv_freq", inv_freq, p.head_dim / 2)?;
        if let Some(w) = q_norm {
            self.check_buffer(OP, "q_norm", w, p.head_dim)?;
        }
        if let Some(w) = k_norm {
            self.check_buffer(OP, "k_norm", w, p.head_dim)?;
        }
        self.check_buffer(OP, "q_out", q_out, shape.q_len)?;
        self.check_context(OP, "k_cache", k_cache)?;
        self.check_buffer(OP, "v_cache", v_cache, k_cache.len())?;
        let slot_len = p.num_kv_heads * p.head_dim;
        if k_cache.len() % slot_len != 0 {
            return Err(invalid_argument(
                OP,
                "the KV cache length",
                "a whole number of slots of num_kv_heads * head_dim elements",
                format!("{} elements for slots of {slot_len}", k_cache.len()),
            ));
        }
        let num_slots = (k_cache.len() / slot_len) as u64;
        if p.n == 0 {
            return Ok(());
        }

        let function = self.kernel("rope", &format!("rope_qk_norm_kv_write_{}", T::SUFFIX))?;
        let cfg = LaunchConfig {
            grid_dim: (shape.items.div_ceil(WARPS_PER_BLOCK) as u32, 1, 1),
            block_dim: ((WARPS_PER_BLOCK * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // The shape check bounds every dimension below i32::MAX.
        let (n, heads, kv_heads, head_dim) = (
            p.n as i32,
            p.num_heads as i32,
            p.num_kv_heads as i32,
            p.head_dim as i32,
        );
        let (qkv_ptr, _qkv_sync) = qkv.device_ptr(&self.stream);
        let (pos_ptr, _pos_sync) = positions.device_ptr(&self.stream);
        let (slot_ptr, _slot_sync) = slot_mapping.device_ptr(&self.stream);
        let (freq_ptr, _freq_sync) = inv_freq.device_ptr(&self.stream);
        let q_norm = q_norm.map(|w| w.device_ptr(&self.stream));
        let k_norm = k_norm.map(|w| w.device_ptr(&self.stream));
        // A null pointer tells the kernel to skip that norm.
        let q_norm_ptr = q_norm.as_ref().map_or(0, |(ptr, _)| *ptr);
        let k_norm_ptr = k_norm.as_ref().map_or(0, |(ptr, _)| *ptr);
        let (q_ptr, _q_sync) = q_out.device_ptr_mut(&self.stream);
        let (k_ptr, _k_sync) = k_cache.device_ptr_mut(&self.stream);
        let (v_ptr, _v_sync) = v_cache.device_ptr_mut(&self.stream);
        let mut params: [*mut c_void; 15] = [
            kernel_arg(&qkv_ptr),
            kernel_arg(&pos_ptr),
            kernel_arg(&slot_ptr),
            kernel_arg(&freq_ptr),
            kernel_arg(&q_norm_ptr),
            kernel_arg(&k_norm_ptr),
            kernel_arg(&eps),
            kernel_arg(&q_ptr),
            kernel_arg(&k_ptr),
            kernel_arg(&v_ptr),
            kernel_arg(&n),
            kernel_arg(&heads),
            kernel_arg(&kv_heads),
            kernel_arg(&head_dim),
            kernel_arg(&num_slots),
        ];
        // SAFETY: `params` matches `rope_qk_norm_kv_write_*(const T*, const uint32_t*, const
        // uint32_t*, const float*, const T*, const T*, float, T*, T*, T*, int, int, int, int,
        // unsigned long long)` in rope.cu, each entry pointing at a live local of that type.
        // Input and output lengths are checked above, cache writes are bounded by `num_slots`
        // on the device, Rust's borrows keep the `__restrict__` outputs from aliasing each other
        // or the inputs, and every block waits for the previous kernel before touching memory.
        unsafe { self.launch_with_dependency_overlap(OP, &function, cfg, &mut params) }
    }
}

/// Element counts of a checked [`RopeParams`].
#[derive(Debug, PartialEq, Eq)]
struct RopeShape {
    qkv_len: usize,
    q_len: usize,
    /// Warps to launch: one per (token, q/k/v head).
    items: usize,
}

fn check_rope_shape(p: &RopeParams) -> Result<RopeShape, CudaError> {
    const OP: &str = "rope_qk_norm_kv_write";
    check_nonzero(OP, "num_heads", p.num_heads)?;
    check_nonzero(OP, "num_kv_heads", p.num_kv_heads)?;
    if p.head_dim == 0 || !p.head_dim.is_multiple_of(2) || p.head_dim > ROPE_MAX_HEAD_DIM {
        return Err(invalid_argument(
            OP,
            "head_dim",
            "an even number from 2 to 512",
            p.head_dim,
        ));
    }
    // Every count the kernel indexes with 32-bit ints (tokens, heads, warps) must stay below
    // i32::MAX; element offsets are 64-bit there.
    let limit = i32::MAX as usize;
    let too_large = |dimension: &'static str, value: usize| CudaError::TooLarge {
        op: OP,
        dimension,
        value,
        limit,
    };
    let heads = p
        .num_kv_heads
        .checked_mul(2)
        .and_then(|kv| kv.checked_add(p.num_heads))
        .filter(|&h| h <= limit)
        .ok_or_else(|| {
            too_large(
                "the head count",
                p.num_heads.saturating_add(p.num_kv_heads.saturating_mul(2)),
            )
        })?;
    check_limit(OP, "the token count", p.n, limit)?;
    let items =
        p.n.checked_mul(heads)
            .filter(|&i| i <= limit)
            .ok_or_else(|| too_large("tokens times heads", p.n.saturating_mul(heads)))?;
    let qkv_len = items
        .checked_mul(p.head_dim)
        .ok_or_else(|| too_large("the qkv length", usize::MAX))?;
    Ok(RopeShape {
        qkv_len,
        q_len: p.n * p.num_heads * p.head_dim,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n: usize, num_heads: usize, num_kv_heads: usize, head_dim: usize) -> RopeParams {
        RopeParams {
            n,
            num_heads,
            num_kv_heads,
            head_dim,
        }
    }

    #[test]
    fn shape_counts_q_k_and_v_heads() {
        let shape = check_rope_shape(&params(3, 16, 8, 128)).unwrap();
        assert_eq!(
            shape,
            RopeShape {
                qkv_len: 3 * 32 * 128,
                q_len: 3 * 16 * 128,
                items: 3 * 32,
            }
        );
    }

    #[test]
    fn bad_shapes_are_named() {
        let err = check_rope_shape(&params(1, 4, 2, 63))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "rope_qk_norm_kv_write: head_dim must be an even number from 2 to 512, found 63"
        );
        assert!(check_rope_shape(&params(1, 4, 2, 514)).is_err());
        assert!(check_rope_shape(&params(1, 0, 2, 64)).is_err());
        assert!(check_rope_shape(&params(1, 4, 0, 64)).is_err());
        let err = check_rope_shape(&params(1 << 30, 4, 2, 64)).unwrap_err();
        assert!(
            matches!(
                err,
                CudaError::TooLarge {
                    dimension: "tokens times heads",
                    ..
                }
            ),
            "{err}"
        );
    }
}
