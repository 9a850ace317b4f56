//! Helpers the CUDA test binaries share: opening device 0 (or reporting the test as skipped),
//! deterministic random inputs, float conversions, NaN-poisoned outputs, the relative L2 error
//! and CUDA graph capture.

// Each test binary compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

use std::io::Write as _;

use braid_kernels::cuda::{CudaDevice, CudaError, CudaGraph, CudaSlice, KernelFloat};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use half::{bf16, f16};

/// Device 0, or `None` after saying "skipped: no CUDA device" when the machine has no driver or
/// GPU. A device that exists but cannot be opened fails the test.
pub fn device(test: &str) -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(dev) => Some(dev),
        Err(CudaError::NoDriver | CudaError::NoDevice { .. }) => {
            // Straight to the real stderr, in one write, so it shows even though the harness
            // captures output and other tests print concurrently.
            let line = format!("{test}: skipped: no CUDA device\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
            None
        }
        Err(other) => panic!("{test}: CUDA device 0 is present but could not be opened: {other}"),
    }
}

/// Stops cudarc from recording and waiting on per-buffer events, which a single-stream caller
/// does not need and which must not be issued inside a stream capture. Affects buffers
/// allocated afterwards.
pub fn single_stream_mode(dev: &CudaDevice) {
    // SAFETY: every buffer of these tests lives on the device's one stream, so no cross-stream
    // synchronisation is lost.
    unsafe { dev.context().disable_event_tracking() };
}

/// Records what `ops` enqueues on the device's stream (and on streams it forks) into a CUDA
/// graph, without running it.
pub fn capture(dev: &CudaDevice, ops: impl FnOnce()) -> CudaGraph {
    dev.stream()
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    ops();
    dev.stream()
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture recorded work")
}

/// A storage dtype under test, with its tolerances against a higher-precision reference.
pub trait TestFloat: KernelFloat + std::fmt::Debug + PartialEq {
    /// Largest accepted ‖got − want‖₂ / ‖want‖₂ against the f32 reference.
    const REL_L2: f64;
    /// Tolerance of one output against an f64 reference: |got - want| <= ATOL + RTOL * |want|.
    const RTOL: f64;
    const ATOL: f64;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// The host rounding of an f32 result, which the kernels must reproduce exactly.
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl TestFloat for f32 {
    const REL_L2: f64 = 1e-5;
    const RTOL: f64 = 1e-5;
    const ATOL: f64 = 1e-6;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

/// `half`'s types share the inherent conversions; only their tolerances differ.
macro_rules! half_test_float {
    ($t:ty, rel_l2: $rel_l2:expr, rtol: $rtol:expr, atol: $atol:expr) => {
        impl TestFloat for $t {
            const REL_L2: f64 = $rel_l2;
            const RTOL: f64 = $rtol;
            const ATOL: f64 = $atol;
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
        }
    };
}

half_test_float!(f16, rel_l2: 2e-3, rtol: 2e-3, atol: 1e-4);
half_test_float!(bf16, rel_l2: 1e-2, rtol: 1e-2, atol: 1e-3);

/// SplitMix64: deterministic inputs without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[lo, hi)` with 24 random bits.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }

    /// Uniform in `[lo, hi)` with 53 random bits.
    pub fn uniform_f64(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `len` values of [`Rng::uniform`], rounded to `T`.
    pub fn vec<T: TestFloat>(&mut self, len: usize, lo: f32, hi: f32) -> Vec<T> {
        (0..len)
            .map(|_| T::from_f32(self.uniform(lo, hi)))
            .collect()
    }

    /// `len` values of [`Rng::uniform_f64`], rounded to `T`.
    pub fn vec_f64<T: TestFloat>(&mut self, len: usize, lo: f64, hi: f64) -> Vec<T> {
        (0..len)
            .map(|_| T::from_f64(self.uniform_f64(lo, hi)))
            .collect()
    }

    /// Fisher-Yates.
    pub fn shuffle<X>(&mut self, items: &mut [X]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

pub fn to_f32<T: TestFloat>(values: &[T]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// A device buffer of `len` NaNs: an output element the kernel fails to write stays NaN.
pub fn poisoned<T: TestFloat>(dev: &CudaDevice, len: usize) -> CudaSlice<T> {
    dev.upload(&vec![T::from_f32(f32::NAN); len])
        .expect("upload poisoned output")
}

/// ‖got − want‖₂ / ‖want‖₂ (the absolute ‖got − want‖₂ where `want` is all zeros), after
/// checking that every element is finite: a NaN left from the poison names its index.
pub fn rel_l2<T: TestFloat>(what: &str, got: &[T], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f32() as f64;
        assert!(
            g.is_finite(),
            "{what}: element {i} is {g}, expected {w} (unwritten or overflowed)"
        );
        diff += (g - *w as f64).powi(2);
        norm += (*w as f64).powi(2);
    }
    if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    }
}

/// Asserts that `got` is within `T::REL_L2` of the f32 reference `want`.
pub fn assert_rel_l2<T: TestFloat>(what: &str, got: &[T], want: &[f32]) {
    let rel = rel_l2(what, got, want);
    assert!(
        rel < T::REL_L2,
        "{what}: relative L2 error {rel:.3e} is above {:.0e}",
        T::REL_L2
    );
}
