//! The small per-step inputs the CUDA forward pass reads (token ids, positions, cache slots,
//! context lengths, row offsets, cascade groups and block tables), packed into one device buffer
//! and uploaded with one copy from page-locked host memory. In a microbenchmark on an H200
//! machine, seven copies from pageable vectors (nine with cascade groups) added ≈14 µs to a
//! batch-1 step while the GPU waited, one page-locked copy ≈3 µs (≈21 and ≈7 µs at batch 64).

use braid_kernels::cuda::{CudaDevice, CudaError, CudaSlice, CudaView, PinnedHostSlice};

/// One array of the packed inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    /// Token id of every row, `[tokens]`.
    Ids,
    /// Position of every row, `[tokens]`.
    Positions,
    /// Cache slot every row's K and V go to, `[tokens]`.
    Slots,
    /// Keys in each sequence's cache including its new tokens, `[seqs]`.
    ContextLens,
    /// First row of each sequence, and the end, `[seqs + 1]`.
    QStarts,
    /// Row of each sequence's last token, `[seqs]`.
    LastRows,
    /// Cascade groups' first rows, and the end, `[seqs + 1]` at most.
    GroupStarts,
    /// Cascade groups' shared prefix lengths, `[seqs]` at most.
    PrefixLens,
    /// Each sequence's block table, `[seqs, width]`.
    BlockTables,
}

const FIELDS: usize = 9;

/// Each array starts on a 64-byte line.
const ALIGN: usize = 16;

/// Where each array of a step's inputs starts in the packed buffer. It depends only on the
/// step's (tokens, seqs, width), so a CUDA graph captured for one shape reads its inputs where
/// every later step of that shape writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    starts: [usize; FIELDS],
    lens: [usize; FIELDS],
    end: usize,
}

impl Layout {
    fn new(tokens: usize, seqs: usize, width: usize) -> Self {
        let lens = [
            tokens,
            tokens,
            tokens,
            seqs,
            seqs + 1,
            seqs,
            seqs + 1,
            seqs,
            seqs * width,
        ];
        let mut starts = [0; FIELDS];
        let mut end = 0;
        for (start, len) in starts.iter_mut().zip(lens) {
            *start = end;
            end += len.next_multiple_of(ALIGN);
        }
        Layout { starts, lens, end }
    }

    /// `host[..end]` cut into the fields' arrays.
    fn split<'a>(&self, host: &'a mut [u32]) -> [&'a mut [u32]; FIELDS] {
        let mut rest = &mut host[..self.end];
        std::array::from_fn(|i| {
            let next = self.starts.get(i + 1).copied().unwrap_or(self.end);
            let (field, tail) = std::mem::take(&mut rest).split_at_mut(next - self.starts[i]);
            rest = tail;
            &mut field[..self.lens[i]]
        })
    }
}

/// The packed inputs: a device buffer, the page-locked host memory they are staged in, and the
/// layout of the last step staged.
pub(crate) struct StepInputs {
    device: CudaSlice<u32>,
    staging: PinnedHostSlice<u32>,
    layout: Layout,
}

/// A step's arrays in host memory, zeroed, to be filled and then uploaded.
pub(crate) struct Staged<'a> {
    fields: [&'a mut [u32]; FIELDS],
}

impl Staged<'_> {
    pub(crate) fn get(&mut self, field: Field) -> &mut [u32] {
        self.fields[field as usize]
    }
}

impl StepInputs {
    /// Room for every step of at most `max_tokens` rows, `max_seqs` sequences and tables
    /// `max_width` blocks wide.
    pub(crate) fn new(
        dev: &CudaDevice,
        max_tokens: usize,
        max_seqs: usize,
        max_width: usize,
    ) -> Result<Self, CudaError> {
        let layout = Layout::new(max_tokens, max_seqs, max_width);
        Ok(StepInputs {
            device: dev.alloc_zeros(layout.end)?,
            staging: dev.alloc_host_staging(layout.end)?,
            layout,
        })
    }

    /// The host arrays of a step of this shape, zeroed. The previous step's upload has been
    /// consumed: every forward pass ends by waiting for its result.
    pub(crate) fn stage(
        &mut self,
        tokens: usize,
        seqs: usize,
        width: usize,
    ) -> Result<Staged<'_>, CudaError> {
        let layout = Layout::new(tokens, seqs, width);
        if layout.end > self.device.len() {
            return Err(CudaError::TooLarge {
                op: "stage the step inputs",
                dimension: "the packed inputs",
                value: layout.end,
                limit: self.device.len(),
            });
        }
        self.layout = layout;
        let host = &mut staging_memory(&mut self.staging, "stage the step inputs")?[..layout.end];
        host.fill(0);
        Ok(Staged {
            fields: layout.split(host),
        })
    }

    /// Queues the copy of the staged arrays to the device; returns without waiting.
    pub(crate) fn upload(&mut self, dev: &CudaDevice) -> Result<(), CudaError> {
        let host = staging_memory(&mut self.staging, "upload the step inputs")?;
        dev.upload_into(&host[..self.layout.end], &mut self.device)
    }

    /// The first `len` elements of `field` on the device, as staged last.
    pub(crate) fn view(&self, field: Field, len: usize) -> CudaView<'_, u32> {
        let i = field as usize;
        debug_assert!(len <= self.layout.lens[i], "{field:?}: {len} elements");
        let start = self.layout.starts[i];
        self.device.slice(start..start + len)
    }
}

/// The whole page-locked staging memory, for `op`.
fn staging_memory<'a>(
    staging: &'a mut PinnedHostSlice<u32>,
    op: &'static str,
) -> Result<&'a mut [u32], CudaError> {
    staging
        .as_mut_slice()
        .map_err(|source| CudaError::Driver { op, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_aligned_and_disjoint_and_fit_the_largest_shape() {
        let largest = Layout::new(8192, 256, 2048);
        for (tokens, seqs, width) in [(1, 1, 16), (256, 256, 64), (8192, 3, 2048), (7, 5, 33)] {
            let l = Layout::new(tokens, seqs, width);
            assert!(l.end <= largest.end);
            for i in 0..FIELDS {
                assert_eq!(l.starts[i] % ALIGN, 0);
                let next = l.starts.get(i + 1).copied().unwrap_or(l.end);
                assert!(l.starts[i] + l.lens[i] <= next, "{i}: {l:?}");
            }
            assert_eq!(l.lens[Field::BlockTables as usize], seqs * width);
            assert_eq!(l.lens[Field::QStarts as usize], seqs + 1);

            // Each staged array is exactly the part of the buffer its field's views read.
            let mut host: Vec<u32> = (0..l.end as u32).collect();
            let fields = l.split(&mut host);
            for (i, field) in fields.iter().enumerate() {
                assert_eq!(field.len(), l.lens[i]);
                assert_eq!(
                    field.first().copied(),
                    (l.lens[i] > 0).then_some(l.starts[i] as u32)
                );
            }
        }
    }
}
