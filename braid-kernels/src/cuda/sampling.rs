//! Token selection on the GPU (`cuda/sampling.cu`): greedy argmax and seeded sampling with
//! temperature, top-k, top-p and min-p, so only token ids cross to the host.

use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use super::{
    check_limit, check_nonzero, driver_error, invalid_argument, CudaDevice, CudaError, KernelFloat,
};

/// Threads per block (mirrors `SAMPLE_BLOCK_THREADS` in sampling.cu).
const BLOCK_THREADS: u32 = 1024;
/// Cluster widths of the `*_cluster{8,2}_*` kernels in sampling.cu, each with the most rows it
/// takes, widest first. One block takes ~18 µs per pass over a 151936-token row, so on sm_90+
/// GPUs a row gets the widest cluster that still lets the whole batch fit an H100's 132 SMs in one
/// wave (16 rows × 8 blocks, 64 rows × 2); larger batches fill the GPU with one block per row.
const CLUSTERS: [(usize, usize); 2] = [(8, 16), (2, 64)];
/// Largest vocabulary [`CudaDevice::sample`] accepts: its per-row scratch lives in 44 KiB of shared
/// memory, one entry per 128 ids (mirrors `SAMPLE_MAX_SEGMENTS * SAMPLE_SEGMENT` in sampling.cu).
pub const SAMPLE_MAX_VOCAB: usize = 5632 * 128;
/// Largest vocabulary [`CudaDevice::argmax`] accepts: ids are 32-bit ints on the device.
const ARGMAX_MAX_VOCAB: usize = (i32::MAX as usize) / 2;
/// Largest row count: rows index the grid's x dimension.
const MAX_ROWS: usize = i32::MAX as usize;

/// Sampling parameters of one row, laid out as the kernel reads them (mirrors `SamplingRow` in
/// sampling.cu). The filters run in Hugging Face's order: temperature, top-k, top-p, min-p.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingRow {
    /// Softmax temperature; below 1e-5 the row decodes greedily (argmax, lowest id on ties).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (ties with the k-th kept); 0 turns it off.
    pub top_k: u32,
    /// Keep the smallest most-likely set whose probability reaches `top_p`; 1 turns it off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 turns it off.
    pub min_p: f32,
    /// Seed of this sequence's random stream.
    pub seed: u64,
    /// Draw counter (typically the number of tokens generated so far): the draw is a pure
    /// function of `(seed, step)`, through Philox4x32-10.
    pub step: u64,
}

// SAFETY: `SamplingRow` is `repr(C)` plain data (no padding: 4 * 4 + 2 * 8 bytes), matching the
// kernel's struct; the all-zero pattern is a valid (greedy) row.
unsafe impl DeviceRepr for SamplingRow {}
unsafe impl ValidAsZeroBits for SamplingRow {}

impl SamplingRow {
    /// Greedy decoding: argmax, every filter off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            step: 0,
        }
    }

    /// Checks every field's range, naming the first one out of it.
    fn validate(&self, row: usize) -> Result<(), CudaError> {
        let bad = |argument, expected, value: f32| {
            invalid_argument(
                "SamplingBuffers::write",
                argument,
                expected,
                format!("{value} in row {row}"),
            )
        };
        // Positive range checks, so NaN fails each of them.
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(bad(
                "temperature",
                "a finite non-negative number",
                self.temperature,
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", "greater than 0 and at most 1", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad("min_p", "between 0 and 1", self.min_p));
        }
        Ok(())
    }
}

/// Per-row sampling parameters in device memory, at a fixed address so a captured CUDA graph can
/// be replayed after [`SamplingBuffers::write`] changed them.
#[derive(Debug)]
pub struct SamplingBuffers {
    rows: CudaSlice<SamplingRow>,
}

impl SamplingBuffers {
    /// Room for `capacity` rows, all greedy until written.
    pub fn new(dev: &CudaDevice, capacity: usize) -> Result<Self, CudaError> {
        Ok(Self {
            rows: dev.alloc_zeros(capacity)?,
        })
    }

    /// How many rows the buffers hold.
    pub fn capacity(&self) -> usize {
        self.rows.len()
    }

    /// Validates `rows` and copies them into the first `rows.len()` entries, ordered on `dev`'s
    /// stream before any later op. Call it outside graph capture, before launching the graph.
    pub fn write(&mut self, dev: &CudaDevice, rows: &[SamplingRow]) -> Result<(), CudaError> {
        const OP: &str = "SamplingBuffers::write";
        dev.check_context(OP, "rows", &self.rows)?;
        if rows.len() > self.rows.len() {
            return Err(CudaError::BufferLength {
                op: OP,
                buffer: "rows",
                expected: self.rows.len(),
                actual: rows.len(),
            });
        }
        for (i, row) in rows.iter().enumerate() {
            row.validate(i)?;
        }
        if rows.is_empty() {
            return Ok(());
        }
        let mut dst = self.rows.slice_mut(0..rows.len());
        dev.stream
            .memcpy_htod(rows, &mut dst)
            .map_err(driver_error("host-to-device copy"))
    }
}

impl CudaDevice {
    /// Greedy decoding: `out_ids[r]` = the id of the largest logit of row `r` of `logits`
    /// (`[num_seqs, vocab]`), the lowest id among equals; NaN counts as negative infinity.
    pub fn argmax<T: KernelFloat>(
        &self,
        logits: &impl DevicePtr<T>,
        num_seqs: usize,
        vocab: usize,
        out_ids: &mut impl DevicePtrMut<u32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "argmax";
        let len = check_rows(OP, num_seqs, vocab, ARGMAX_MAX_VOCAB)?;
        self.check_buffer(OP, "logits", logits, len)?;
        self.check_buffer(OP, "out_ids", out_ids, num_seqs)?;
        if num_seqs == 0 {
            return Ok(());
        }
        let (function, cfg) = self.row_kernel::<T>("argmax", num_seqs)?;
        let vocab = vocab as i32;
        let (logits_ptr, _logits_sync) = logits.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out_ids.device_ptr_mut(&self.stream);
        let mut launch = self.stream.launch_builder(&function);
        launch.arg(&logits_ptr).arg(&vocab).arg(&out_ptr);
        // SAFETY: the arguments match `argmax_*` / `argmax_cluster{8,2}_*(const T*, int,
        // uint32_t*)` in sampling.cu, and the lengths checked above cover the `num_seqs` rows the
        // grid reads and writes.
        unsafe { launch.launch(cfg) }.map_err(driver_error(OP))?;
        Ok(())
    }

    /// Draws `out_ids[r]` from row `r` of `logits` (`[num_seqs, vocab]`) under the parameters in
    /// the first `num_seqs` rows of `params`.
    ///
    /// Semantics follow Hugging Face's warpers, in order: divide by the temperature, keep the
    /// top-k (ties with the k-th kept), keep the smallest most-likely set reaching top-p (ties at
    /// the boundary ranked by id), drop tokens below min-p times the top probability, then draw
    /// from the renormalised softmax. Rows with temperature below 1e-5 take the argmax. NaN logits
    /// are never drawn. The draw is a pure function of the logits, the row's parameters and its
    /// `(seed, step)`, so replays reproduce it, whatever the batch it is launched in (all sums are
    /// exact integers); nothing is allocated and nothing is read back, so the launch can be
    /// captured in a CUDA graph. `vocab` is at most [`SAMPLE_MAX_VOCAB`].
    pub fn sample<T: KernelFloat>(
        &self,
        logits: &impl DevicePtr<T>,
        num_seqs: usize,
        vocab: usize,
        params: &SamplingBuffers,
        out_ids: &mut impl DevicePtrMut<u32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "sample";
        let len = check_rows(OP, num_seqs, vocab, SAMPLE_MAX_VOCAB)?;
        self.check_buffer(OP, "logits", logits, len)?;
        self.check_buffer(OP, "out_ids", out_ids, num_seqs)?;
        self.check_context(OP, "params", &params.rows)?;
        if params.capacity() < num_seqs {
            return Err(CudaError::BufferLength {
                op: OP,
                buffer: "params",
                expected: num_seqs,
                actual: params.capacity(),
            });
        }
        if num_seqs == 0 {
            return Ok(());
        }
        let (function, cfg) = self.row_kernel::<T>("sample", num_seqs)?;
        let vocab = vocab as i32;
        let (logits_ptr, _logits_sync) = logits.device_ptr(&self.stream);
        let (params_ptr, _params_sync) = params.rows.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out_ids.device_ptr_mut(&self.stream);
        let mut launch = self.stream.launch_builder(&function);
        launch
            .arg(&logits_ptr)
            .arg(&vocab)
            .arg(&params_ptr)
            .arg(&out_ptr);
        // SAFETY: the arguments match `sample_*` / `sample_cluster{8,2}_*(const T*, int, const
        // SamplingRow*, uint32_t*)` in sampling.cu, `SamplingRow` mirrors the kernel's struct, and the lengths checked above
        // cover the `num_seqs` rows the grid reads and writes.
        unsafe { launch.launch(cfg) }.map_err(driver_error(OP))?;
        Ok(())
    }

    /// The per-row kernel `family` for `rows` rows and its grid: a cluster of blocks per row for
    /// small batches on GPUs that have clusters (sm_90+), one block per row otherwise. The choice
    /// depends on the row count only, so a graph bucket keeps one kernel.
    fn row_kernel<T: KernelFloat>(
        &self,
        family: &str,
        rows: usize,
    ) -> Result<(CudaFunction, LaunchConfig), CudaError> {
        let (major, _) = self.capability();
        let blocks_per_row = blocks_per_row(rows, major >= 9);
        let name = if blocks_per_row > 1 {
            format!("{family}_cluster{blocks_per_row}_{}", T::SUFFIX)
        } else {
            format!("{family}_{}", T::SUFFIX)
        };
        let function = self.kernel("sampling", &name)?;
        // rows <= i32::MAX was checked, and clusters take at most the row limits of CLUSTERS.
        let cfg = LaunchConfig {
            grid_dim: ((rows * blocks_per_row) as u32, 1, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok((function, cfg))
    }
}

/// Blocks that share one row of a `rows`-row launch: the widest of [`CLUSTERS`] that takes that
/// many rows where the GPU has thread-block clusters, else one.
fn blocks_per_row(rows: usize, has_clusters: bool) -> usize {
    CLUSTERS
        .iter()
        .find(|&&(_, max_rows)| has_clusters && rows <= max_rows)
        .map_or(1, |&(width, _)| width)
}

/// Checks a `[num_seqs, vocab]` logits shape and returns its element count.
fn check_rows(
    op: &'static str,
    num_seqs: usize,
    vocab: usize,
    max_vocab: usize,
) -> Result<usize, CudaError> {
    check_nonzero(op, "vocab", vocab)?;
    check_limit(op, "the vocabulary", vocab, max_vocab)?;
    check_limit(op, "the row count", num_seqs, MAX_ROWS)?;
    // Both factors are below 2^31.
    Ok(num_seqs * vocab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_row_matches_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<SamplingRow>(), 32);
        assert_eq!(std::mem::offset_of!(SamplingRow, top_k), 4);
        assert_eq!(std::mem::offset_of!(SamplingRow, seed), 16);
        assert_eq!(std::mem::offset_of!(SamplingRow, step), 24);
    }

    #[test]
    fn rows_are_validated_field_by_field() {
        assert!(SamplingRow::greedy().validate(0).is_ok());
        let row = SamplingRow {
            top_p: 0.0,
            ..SamplingRow::greedy()
        };
        assert_eq!(
            row.validate(3).unwrap_err().to_string(),
            "SamplingBuffers::write: top_p must be greater than 0 and at most 1, found 0 in row 3"
        );
        let row = SamplingRow {
            temperature: f32::NAN,
            ..SamplingRow::greedy()
        };
        assert!(row.validate(0).is_err());
        let row = SamplingRow {
            min_p: 1.5,
            ..SamplingRow::greedy()
        };
        assert!(row.validate(0).is_err());
    }

    #[test]
    fn shapes_are_checked_against_the_limits() {
        assert_eq!(check_rows("sample", 3, 50, SAMPLE_MAX_VOCAB).unwrap(), 150);
        assert_eq!(
            check_rows("sample", 1, 0, SAMPLE_MAX_VOCAB)
                .unwrap_err()
                .to_string(),
            "sample: vocab must be at least 1, found 0"
        );
        assert!(check_rows("sample", 1, SAMPLE_MAX_VOCAB + 1, SAMPLE_MAX_VOCAB).is_err());
        assert!(check_rows("argmax", 1, SAMPLE_MAX_VOCAB + 1, ARGMAX_MAX_VOCAB).is_ok());
    }

    #[test]
    fn rows_get_the_widest_cluster_that_fits_one_wave() {
        let widths: Vec<usize> = [1, 16, 17, 64, 65, 256]
            .iter()
            .map(|&rows| blocks_per_row(rows, true))
            .collect();
        assert_eq!(widths, [8, 8, 2, 2, 1, 1]);
        assert_eq!(blocks_per_row(1, false), 1);
    }
}
