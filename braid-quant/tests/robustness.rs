//! Hostile input: random bytes, every truncation and random corruption of a valid file must give
//! Ok or Err, never a panic, and never an allocation out of proportion to the input.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use braid_quant::GgufFile;
use common::fixture_bytes;
use proptest::prelude::*;

/// Records, per thread, the largest single allocation requested, so a test can bound what one
/// parse asked for without seeing the allocations of tests running beside it.
struct TrackingAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the slot may be gone while a thread is being torn down.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// Parses `bytes` and, when that succeeds, reads and dequantizes every tensor; then checks that
/// no single allocation exceeded a small multiple of the input size. The bound covers a metadata
/// array of one-byte values (each becomes one 32-byte `GgufValue`) and the densest supported
/// block format (Q2_K: 256 f32 values from 84 bytes, about 12 output bytes per input byte).
fn exercise(bytes: Vec<u8>) {
    let len = bytes.len();
    LARGEST.with(|l| l.set(0));
    if let Ok(file) = GgufFile::from_bytes(bytes) {
        for info in file.tensors() {
            let raw = file.tensor_bytes(info);
            assert_eq!(raw.len() as u64, info.n_bytes(), "{}", info.name);
            if let Ok(values) = file.dequantize(&info.name) {
                assert_eq!(values.len() as u64, info.n_elements(), "{}", info.name);
            }
        }
    }
    let largest = LARGEST.with(|l| l.get());
    let bound = 64 * len + 64 * 1024;
    assert!(
        largest <= bound,
        "a {len}-byte input allocated {largest} bytes at once (bound {bound})"
    );
}

#[test]
fn every_truncation_of_the_fixtures_is_handled() {
    for name in ["metadata.gguf", "aligned64.gguf"] {
        let full = fixture_bytes(name);
        for len in 0..full.len() {
            exercise(full[..len].to_vec());
        }
        exercise(full);
    }
}

/// A syntactically plausible start, so random tails reach past the magic and version checks.
fn header_prefix() -> impl Strategy<Value = Vec<u8>> {
    (2u32..=3, 0u64..4, 0u64..4)
        .prop_map(|(version, tensors, kvs)| common::Builder::header(version, tensors, kvs).build())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        exercise(bytes);
    }

    #[test]
    fn random_tails_after_a_valid_header_never_panic(
        prefix in header_prefix(),
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = prefix;
        bytes.extend(tail);
        exercise(bytes);
    }

    #[test]
    fn byte_flips_in_a_valid_file_never_panic(
        which in 0usize..2,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
    ) {
        let mut bytes = fixture_bytes(["metadata.gguf", "aligned64.gguf"][which]);
        // Most of a file is tensor data; aim half the flips at the header where parsing happens.
        let header_len = 1280.min(bytes.len());
        for (n, (index, xor)) in flips.iter().enumerate() {
            let at = if n % 2 == 0 { index.index(header_len) } else { index.index(bytes.len()) };
            bytes[at] ^= xor;
        }
        exercise(bytes);
    }

    #[test]
    fn corrupted_counts_and_lengths_never_panic(
        field in 0usize..64,
        value in prop_oneof![Just(u64::MAX), Just(1u64 << 62), Just(1u64 << 32), 0u64..1 << 20],
    ) {
        // Overwrite one 8-byte aligned word of the header with a large or random number, which
        // hits the counts, string lengths, dims and offsets that the parser must bound.
        let mut bytes = fixture_bytes("metadata.gguf");
        let at = 8 + field * 8;
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        exercise(bytes);
    }
}
