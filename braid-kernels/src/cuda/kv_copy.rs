//! Copy-on-write of a paged KV block across every layer's caches in one launch
//! (`cuda/kv_copy.cu`).

use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{consts, driver_error, invalid_argument, CudaDevice, CudaError, KernelFloat};

const MODULE: &str = "kv_copy";
/// Blocks per cache of one copy: enough 16-byte moves in flight for a block of tens of KB.
const CHUNKS_PER_CACHE: u32 = 4;

impl CudaDevice {
    /// Copies block `src` over block `dst` in each of `caches`, blocks being `block_elems`
    /// elements long (`block_size * num_kv_heads * head_dim` for a KV cache): the copy-on-write
    /// of a partly filled block that another sequence still shares, for every layer's K and V
    /// at once. Requirements (else [`CudaError::InvalidArgument`]): `src != dst`, both blocks
    /// inside every cache, and blocks of a whole number of 16 bytes. Asynchronous on the
    /// device's stream; the list of cache addresses is uploaded first, so it is not for graph
    /// capture.
    pub fn copy_cache_block<T: KernelFloat>(
        &self,
        caches: &mut [&mut CudaSlice<T>],
        block_elems: usize,
        src: usize,
        dst: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "copy_cache_block";
        let elem = std::mem::size_of::<T>();
        let block_bytes = block_elems * elem;
        if block_bytes == 0 || !block_bytes.is_multiple_of(16) {
            return Err(invalid_argument(
                OP,
                "the block size",
                "a non-zero whole number of 16 bytes",
                format!("{block_elems} elements of {elem} bytes"),
            ));
        }
        if src == dst {
            return Err(invalid_argument(
                OP,
                "the blocks",
                "two different blocks",
                format!("block {src} onto itself"),
            ));
        }
        let needed = (src.max(dst) + 1) * block_elems;
        let mut addresses = Vec::with_capacity(caches.len());
        let mut syncs = Vec::with_capacity(caches.len());
        for cache in caches.iter_mut() {
            self.check_context(OP, "a cache", &**cache)?;
            if cache.len() < needed {
                return Err(invalid_argument(
                    OP,
                    "the blocks",
                    "blocks inside every cache",
                    format!(
                        "blocks {src} and {dst} of {block_elems} elements in a cache of {} elements",
                        cache.len()
                    ),
                ));
            }
            let (ptr, sync) = cache.device_ptr_mut(&self.stream);
            addresses.push(ptr);
            syncs.push(sync);
        }
        if addresses.is_empty() {
            return Ok(());
        }
        let caches_dev = self
            .stream
            .clone_htod(&addresses)
            .map_err(driver_error(OP))?;
        let function = self.kernel(MODULE, "copy_kv_block")?;
        let cfg = LaunchConfig {
            grid_dim: (addresses.len() as u32, CHUNKS_PER_CACHE, 1),
            block_dim: (consts::ELEMENTWISE_BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (src_offset, dst_offset) = ((src * block_bytes) as u64, (dst * block_bytes) as u64);
        let block_bytes = block_bytes as u64;
        let mut launch = self.stream.launch_builder(&function);
        launch
            .arg(&caches_dev)
            .arg(&src_offset)
            .arg(&dst_offset)
            .arg(&block_bytes);
        // SAFETY: the arguments match `copy_kv_block(const unsigned long long*, unsigned long
        // long, unsigned long long, unsigned long long)` in kv_copy.cu; every cache holds both
        // blocks (checked above), cudarc allocations are 256-byte aligned and the offsets are
        // multiples of the 16-byte block size, and `src != dst`, so the copies neither overlap
        // nor leave their caches.
        unsafe { launch.launch(cfg) }.map_err(driver_error(OP))?;
        drop(syncs);
        Ok(())
    }
}
