//! The GPU linear layer (skinny kernel, wgmma kernel, cuBLASLt, and the dispatch between them),
//! the fused projections (residual add + RMSNorm, or SiLU·mul, computed in the projection's
//! prologue) and the gate|up projection with SiLU·mul in its epilogue, against the f32 CPU
//! references in `braid_kernels::cpu`, over random odd shapes with NaN-poisoned outputs; their
//! graph-capture behaviour; and timing reports on the decode shapes of a Qwen3-0.6B-sized model.
//! Without a device every test says "skipped: no CUDA device" and passes; the wgmma kernel's own
//! tests say they skipped on a device of another compute capability than 9.0.

use std::io::Write as _;

use braid_kernels::cpu;
use std::cell::RefCell;

use braid_kernels::cuda::{CudaDevice, CudaError, CudaSlice, CudaView, CudaViewMut, DevicePtrMut};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use half::{bf16, f16};

mod common;
use common::{
    assert_rel_l2, capture, device, poisoned, single_stream_mode, to_f32, Rng, TestFloat,
};

/// Prints to the real stdout in one write, so tables survive the harness's capture.
fn report(text: &str) {
    let _ = std::io::stdout().write_all(text.as_bytes());
    let _ = std::io::stdout().flush();
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Route {
    Auto,
    Overlapped,
    Skinny,
    Wgmma,
    CublasLt,
}

/// Whether the wgmma kernel runs on this device (compute capability 9.0).
fn wgmma_runs(dev: &CudaDevice) -> bool {
    dev.context().compute_capability().unwrap() == (9, 0)
}

/// Device 0 when the wgmma kernel runs on it; otherwise `None` after checking that the forced
/// route refuses the device by name and saying "skipped" (or "skipped: no CUDA device").
fn wgmma_device(test: &str) -> Option<CudaDevice> {
    let dev = device(test)?;
    if wgmma_runs(&dev) {
        return Some(dev);
    }
    let (major, minor) = dev.context().compute_capability().unwrap();
    let x = dev.upload(&[bf16::ONE; 17 * 64]).unwrap();
    let w = dev.upload(&[bf16::ONE; 64 * 64]).unwrap();
    let mut out = poisoned::<bf16>(&dev, 17 * 64);
    let err = dev
        .linear_wgmma(&x, 17, 64, &w, 64, None, None, &mut out)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "linear: the device must be of compute capability 9.0 for the wgmma kernel, found \
             {major}.{minor}"
        )
    );
    let line = format!(
        "{test}: skipped: the wgmma kernel needs compute capability 9.0, device 0 is \
         {major}.{minor}\n"
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    None
}

#[allow(clippy::too_many_arguments)]
fn call<T: TestFloat>(
    dev: &CudaDevice,
    route: Route,
    x: &CudaView<T>,
    n: usize,
    k: usize,
    w: &CudaView<T>,
    m: usize,
    bias: Option<&CudaView<T>>,
    residual: Option<&CudaView<T>>,
    out: &mut impl DevicePtrMut<T>,
) -> Result<(), CudaError> {
    match route {
        Route::Auto => dev.linear(x, n, k, w, m, bias, residual, out),
        Route::Overlapped => dev.linear_overlapped(x, n, k, w, m, bias, residual, out),
        Route::Skinny => dev.linear_skinny(x, n, k, w, m, bias, residual, out),
        Route::Wgmma => dev.linear_wgmma(x, n, k, w, m, bias, residual, out),
        Route::CublasLt => dev.linear_cublaslt(x, n, k, w, m, bias, residual, out),
    }
}

/// Random inputs of one case and the CPU reference result.
struct Case<T> {
    n: usize,
    k: usize,
    m: usize,
    x: Vec<T>,
    w: Vec<T>,
    bias: Option<Vec<T>>,
    residual: Option<Vec<T>>,
    want: Vec<f32>,
}

impl<T: TestFloat> Case<T> {
    fn new(rng: &mut Rng, n: usize, k: usize, m: usize, bias: bool, residual: bool) -> Self {
        // W scaled so that a dot product is O(1), the size of bias and residual: an error in
        // either addend must show in the relative error.
        let scale = 1.0 / (k as f32).sqrt();
        let x: Vec<T> = rng.vec(n * k, -1.0, 1.0);
        let w: Vec<T> = rng.vec(m * k, -2.0 * scale, 2.0 * scale);
        let bias: Option<Vec<T>> = bias.then(|| rng.vec(m, -0.5, 0.5));
        let residual: Option<Vec<T>> = residual.then(|| rng.vec(n * m, -0.5, 0.5));
        let mut want = vec![0.0f32; n * m];
        let bias_f32 = bias.as_deref().map(to_f32);
        cpu::linear(
            &to_f32(&x),
            n,
            k,
            &to_f32(&w),
            m,
            bias_f32.as_deref(),
            &mut want,
        );
        if let Some(residual) = &residual {
            for (o, r) in want.iter_mut().zip(residual) {
                *o += r.to_f32();
            }
        }
        Case {
            n,
            k,
            m,
            x,
            w,
            bias,
            residual,
            want,
        }
    }

    fn describe(&self, route: Route) -> String {
        format!(
            "linear_{} {route:?} n={} k={} m={} bias={} residual={}",
            T::SUFFIX,
            self.n,
            self.k,
            self.m,
            self.bias.is_some(),
            self.residual.is_some()
        )
    }

    /// Runs the case through `route` and checks the result against the reference.
    fn check(&self, dev: &CudaDevice, route: Route) {
        let got = self.run(dev, route);
        assert_rel_l2(&self.describe(route), &got, &self.want);
    }

    /// Runs the case through `route` into a NaN-poisoned output and returns it.
    fn run(&self, dev: &CudaDevice, route: Route) -> Vec<T> {
        let what = self.describe(route);
        let x = dev.upload(&self.x).unwrap();
        let w = dev.upload(&self.w).unwrap();
        let bias = self.bias.as_ref().map(|b| dev.upload(b).unwrap());
        let residual = self.residual.as_ref().map(|r| dev.upload(r).unwrap());
        let mut out = poisoned::<T>(dev, self.n * self.m);
        call(
            dev,
            route,
            &x.as_view(),
            self.n,
            self.k,
            &w.as_view(),
            self.m,
            bias.as_ref().map(|b| b.as_view()).as_ref(),
            residual.as_ref().map(|r| r.as_view()).as_ref(),
            &mut out,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        dev.download(&out).unwrap()
    }
}

const NS: [usize; 6] = [1, 3, 8, 9, 64, 300];
const KS: [usize; 4] = [64, 576, 1000, 1024];
const MS: [usize; 4] = [7, 1000, 1536, 3072];

fn check_all_shapes<T: TestFloat>(dev: &CudaDevice, seed: u64) {
    let mut rng = Rng(seed);
    let mut variant = 0usize;
    for n in NS {
        for k in KS {
            for m in MS {
                // Each n sees every bias/residual combination over its 16 (k, m) pairs.
                let (bias, residual) = (variant % 2 == 1, variant / 2 % 2 == 1);
                variant += 1;
                let case = Case::<T>::new(&mut rng, n, k, m, bias, residual);
                case.check(dev, Route::Auto);
                case.check(dev, Route::Overlapped);
                case.check(dev, Route::CublasLt);
                if T::SUFFIX != "f32" && n <= 64 {
                    case.check(dev, Route::Skinny);
                }
            }
        }
    }
}

#[test]
fn linear_bf16_matches_cpu_reference() {
    let Some(dev) = device("linear_bf16_matches_cpu_reference") else {
        return;
    };
    check_all_shapes::<bf16>(&dev, 11);
}

#[test]
fn linear_f16_matches_cpu_reference() {
    let Some(dev) = device("linear_f16_matches_cpu_reference") else {
        return;
    };
    check_all_shapes::<f16>(&dev, 12);
}

#[test]
fn linear_f32_matches_cpu_reference() {
    let Some(dev) = device("linear_f32_matches_cpu_reference") else {
        return;
    };
    check_all_shapes::<f32>(&dev, 13);
}

/// Every token count the skinny kernel compiles for (1..=64) on one odd shape, so each
/// 8-token group variant and each partial group is exercised.
#[test]
fn skinny_kernel_covers_every_token_count() {
    let Some(dev) = device("skinny_kernel_covers_every_token_count") else {
        return;
    };
    let mut rng = Rng(14);
    for n in 1..=64 {
        let case = Case::<bf16>::new(&mut rng, n, 1000, 203, n % 2 == 0, n % 3 == 0);
        case.check(&dev, Route::Skinny);
    }
}

/// Operands the skinny kernel cannot take make `linear` fall back to cuBLASLt (still right),
/// and make the forced skinny path fail with an error naming the operand.
#[test]
fn linear_falls_back_where_the_skinny_kernel_cannot_run() {
    let Some(dev) = device("linear_falls_back_where_the_skinny_kernel_cannot_run") else {
        return;
    };
    let mut rng = Rng(15);

    // k not a multiple of 8.
    let case = Case::<bf16>::new(&mut rng, 2, 1001, 300, true, true);
    case.check(&dev, Route::Auto);
    let x = dev.upload(&case.x).unwrap();
    let w = dev.upload(&case.w).unwrap();
    let mut out = poisoned::<bf16>(&dev, case.n * case.m);
    let err = dev
        .linear_skinny(&x, case.n, case.k, &w, case.m, None, None, &mut out)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "linear: k must be a multiple of 8 for the skinny kernel's 16-byte loads, found 1001"
    );

    // x, bias and residual one element into their buffers: nothing is 16-byte aligned.
    let (n, k, m) = (3, 512, 257);
    let case = Case::<bf16>::new(&mut rng, n, k, m, true, true);
    let mut padded = vec![bf16::from_f32(7.0)];
    padded.extend_from_slice(&case.x);
    let x = dev.upload(&padded).unwrap();
    let w = dev.upload(&case.w).unwrap();
    let mut bias_padded = vec![bf16::from_f32(7.0)];
    bias_padded.extend_from_slice(case.bias.as_ref().unwrap());
    let bias = dev.upload(&bias_padded).unwrap();
    let mut res_padded = vec![bf16::from_f32(7.0)];
    res_padded.extend_from_slice(case.residual.as_ref().unwrap());
    let residual = dev.upload(&res_padded).unwrap();
    for route in [Route::Auto, Route::CublasLt] {
        let what = format!("{} on unaligned views", case.describe(route));
        let mut out = poisoned::<bf16>(&dev, n * m);
        call(
            &dev,
            route,
            &x.slice(1..),
            n,
            k,
            &w.as_view(),
            m,
            Some(&bias.slice(1..)),
            Some(&residual.slice(1..)),
            &mut out,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_rel_l2(&what, &dev.download(&out).unwrap(), &case.want);
    }
    let mut out = poisoned::<bf16>(&dev, n * m);
    let err = dev
        .linear_skinny(&x.slice(1..), n, k, &w, m, None, None, &mut out)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("linear: the address of `x` must be 16-byte aligned"),
        "{err}"
    );
}

const WGMMA_NS: [usize; 7] = [1, 17, 31, 32, 33, 63, 64];
const WGMMA_KS: [usize; 6] = [64, 192, 384, 1024, 1088, 3072];
const WGMMA_MS: [usize; 3] = [64, 320, 1024];

/// The wgmma kernel forced, and `linear_overlapped` (which picks it from 17 rows on), over the
/// shapes it takes: k-slices of 1 to 6 slabs (fewer than the ring's 8 slots), 12 (slots refilled
/// once) and 17 (the first slot filled three times, so both barrier phases recur), in clusters
/// of 1, 2, 4 and 8 blocks; at n = 1 most blocks of an 8-block cluster have no rows to store.
fn check_wgmma_shapes<T: TestFloat>(dev: &CudaDevice, seed: u64) {
    let mut rng = Rng(seed);
    let mut variant = 0usize;
    for n in WGMMA_NS {
        for k in WGMMA_KS {
            for m in WGMMA_MS {
                // Each n sees every bias/residual combination over its 18 (k, m) pairs.
                let (bias, residual) = (variant % 2 == 1, variant / 2 % 2 == 1);
                variant += 1;
                let case = Case::<T>::new(&mut rng, n, k, m, bias, residual);
                case.check(dev, Route::Wgmma);
                if n > CudaDevice::LINEAR_SKINNY_MAX_TOKENS {
                    case.check(dev, Route::Overlapped);
                }
            }
        }
    }
}

#[test]
fn wgmma_bf16_matches_cpu_reference() {
    let Some(dev) = wgmma_device("wgmma_bf16_matches_cpu_reference") else {
        return;
    };
    check_wgmma_shapes::<bf16>(&dev, 31);
}

#[test]
fn wgmma_f16_matches_cpu_reference() {
    let Some(dev) = wgmma_device("wgmma_f16_matches_cpu_reference") else {
        return;
    };
    check_wgmma_shapes::<f16>(&dev, 32);
}

/// `linear` and `linear_overlapped` send 17–64 rows of operands the wgmma kernel takes to it.
/// Observed without timing: the kernel is deterministic, so the dispatch's output must equal
/// the forced route's bit for bit. cuBLASLt adds in another order and so rounds some element
/// differently; where it happens not to, the check cannot tell the two apart, and says so.
#[test]
fn linear_sends_17_to_64_rows_to_the_wgmma_kernel() {
    let Some(dev) = wgmma_device("linear_sends_17_to_64_rows_to_the_wgmma_kernel") else {
        return;
    };
    let mut rng = Rng(33);
    let bits = |v: &[bf16]| v.iter().map(|e| e.to_bits()).collect::<Vec<u16>>();
    // Narrow outputs (fewer than 64 tiles of 64 rows, so k is split over a cluster) take the
    // wgmma kernel; wide ones stay on cuBLASLt, which was as fast there.
    for (n, k, m, route_taken) in [
        (17usize, 2048usize, 1024usize, Route::Wgmma),
        (32, 2048, 1024, Route::Wgmma),
        (48, 1024, 2048, Route::Wgmma),
        (64, 3072, 1024, Route::Wgmma),
        (17, 1024, 4096, Route::CublasLt),
        (64, 1024, 6144, Route::CublasLt),
    ] {
        let case = Case::<bf16>::new(&mut rng, n, k, m, true, true);
        let taken = bits(&case.run(&dev, route_taken));
        for route in [Route::Auto, Route::Overlapped] {
            assert!(
                bits(&case.run(&dev, route)) == taken,
                "{}: output differs from the {route_taken:?} route's",
                case.describe(route)
            );
        }
        let other = match route_taken {
            Route::Wgmma => Route::CublasLt,
            _ => Route::Wgmma,
        };
        if bits(&case.run(&dev, other)) == taken {
            let line = format!(
                "linear_sends_17_to_64_rows_to_the_wgmma_kernel: n={n} k={k} m={m}: the \
                 {other:?} route matched bit for bit, so this shape does not show the route\n"
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
    // At 16 rows the skinny kernel keeps the batch.
    let case = Case::<bf16>::new(&mut rng, 16, 1024, 1024, true, true);
    assert!(
        bits(&case.run(&dev, Route::Auto)) == bits(&case.run(&dev, Route::Skinny)),
        "n=16 left the skinny kernel"
    );
}

/// Operands the wgmma kernel cannot take make `linear` fall back to cuBLASLt (still right), and
/// make the forced route fail with an error naming the operand. Views 16 bytes into their
/// buffers are aligned enough for it (TMA and the 16-byte epilogue need no more); a view 2
/// bytes in is not, whichever operand it is.
#[test]
fn linear_falls_back_where_the_wgmma_kernel_cannot_run() {
    let Some(dev) = wgmma_device("linear_falls_back_where_the_wgmma_kernel_cannot_run") else {
        return;
    };
    let mut rng = Rng(34);
    for (n, k, m, message) in [
        (
            32,
            1024,
            1000,
            "linear: m must be a multiple of 64 for the wgmma kernel's tiles, found 1000",
        ),
        (
            32,
            1000,
            1024,
            "linear: k must be a multiple of 64 for the wgmma kernel's tiles, found 1000",
        ),
        (
            65,
            1024,
            1024,
            "linear: n must be at most 64 for the wgmma kernel, found 65",
        ),
    ] {
        let case = Case::<bf16>::new(&mut rng, n, k, m, true, true);
        case.check(&dev, Route::Auto);
        case.check(&dev, Route::Overlapped);
        let x = dev.upload(&case.x).unwrap();
        let w = dev.upload(&case.w).unwrap();
        let mut out = poisoned::<bf16>(&dev, n * m);
        let err = dev
            .linear_wgmma(&x, n, k, &w, m, None, None, &mut out)
            .unwrap_err();
        assert_eq!(err.to_string(), message);
    }
    let x = dev.upload(&[1.0f32; 32 * 64]).unwrap();
    let w = dev.upload(&[1.0f32; 64 * 64]).unwrap();
    let mut out = poisoned::<f32>(&dev, 32 * 64);
    let err = dev
        .linear_wgmma(&x, 32, 64, &w, 64, None, None, &mut out)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "linear: the dtype must be f16 or bf16, found f32"
    );

    // Every operand 8 elements (16 bytes) into its buffer, then each in turn 1 element in.
    let (n, k, m) = (33, 1024, 1024);
    let case = Case::<bf16>::new(&mut rng, n, k, m, true, true);
    let padded = |values: &[bf16], pad: usize| {
        let mut v = vec![bf16::from_f32(7.0); pad];
        v.extend_from_slice(values);
        dev.upload(&v).unwrap()
    };
    let inputs = |pad: usize| {
        [
            padded(&case.x, pad),
            padded(&case.w, pad),
            padded(case.bias.as_ref().unwrap(), pad),
            padded(case.residual.as_ref().unwrap(), pad),
        ]
    };
    let (aligned, shifted) = (inputs(8), inputs(1));
    let names = ["x", "w", "bias", "residual", "out"];
    for odd in [None, Some(0), Some(1), Some(2), Some(3), Some(4)] {
        let pad = |i: usize| if odd == Some(i) { 1 } else { 8 };
        let view = |i: usize| {
            let buffers = if odd == Some(i) { &shifted } else { &aligned };
            buffers[i].slice(pad(i)..)
        };
        for route in [Route::Wgmma, Route::Auto, Route::Overlapped] {
            let what = format!(
                "{} with views {:?} elements in",
                case.describe(route),
                [0, 1, 2, 3, 4].map(pad)
            );
            let mut out = poisoned::<bf16>(&dev, pad(4) + n * m);
            let result = call(
                &dev,
                route,
                &view(0),
                n,
                k,
                &view(1),
                m,
                Some(&view(2)),
                Some(&view(3)),
                &mut out.slice_mut(pad(4)..),
            );
            match (route, odd) {
                (Route::Wgmma, Some(i)) => {
                    let err = result.unwrap_err().to_string();
                    let expected = format!(
                        "linear: the address of `{}` must be 16-byte aligned for the wgmma \
                         kernel, found 0x",
                        names[i]
                    );
                    assert!(err.starts_with(&expected), "{what}: {err}");
                }
                _ => {
                    result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    let got = dev.download(&out.slice(pad(4)..)).unwrap();
                    assert_rel_l2(&what, &got, &case.want);
                }
            }
        }
    }
}

#[test]
fn linear_rejects_mismatched_buffers_and_empty_k() {
    let Some(dev) = device("linear_rejects_mismatched_buffers_and_empty_k") else {
        return;
    };
    let x = dev.upload(&[bf16::ONE; 2 * 16]).unwrap();
    let w = dev.upload(&[bf16::ONE; 5 * 16]).unwrap();
    let bias = dev.upload(&[bf16::ONE; 4]).unwrap();
    let mut out = poisoned::<bf16>(&dev, 10);
    let err = dev
        .linear(&x, 2, 16, &w, 5, Some(&bias.as_view()), None, &mut out)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "linear: `bias` holds 4 elements, expected 5"
    );
    let err = dev
        .linear(&x, 2, 16, &w, 4, None, None, &mut out)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "linear: `w` holds 80 elements, expected 64"
    );
    let mut short = poisoned::<bf16>(&dev, 9);
    let err = dev
        .linear(&x, 2, 16, &w, 5, None, None, &mut short)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "linear: `out` holds 9 elements, expected 10"
    );
    let err = dev
        .linear(
            &x.slice(0..0),
            2,
            0,
            &w.slice(0..0),
            5,
            None,
            None,
            &mut out,
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "linear: k must be at least 1, found 0");
    let err = dev
        .linear_skinny_tuned(&x, 2, 16, &w, 5, &mut out, 3, 4, false)
        .unwrap_err();
    assert!(matches!(err, CudaError::InvalidArgument { .. }), "{err}");

    // No rows is nothing to do, on either path.
    let mut empty = poisoned::<bf16>(&dev, 0);
    dev.linear(&x.slice(0..0), 0, 16, &w, 5, None, None, &mut empty)
        .unwrap();
    dev.linear_cublaslt(&x.slice(0..0), 0, 16, &w, 5, None, None, &mut empty)
        .unwrap();
    dev.synchronize().unwrap();
}

/// A decode step is captured once and replayed with new inputs: the captured linear must read
/// x, W, bias and residual from device memory at replay time, on every path (the wgmma kernel's
/// tensor maps hold the buffers' addresses, not their contents), including clusters of 1, 2
/// and 4 blocks on the wgmma path.
#[test]
fn linear_replays_in_a_cuda_graph_with_new_inputs() {
    let Some(dev) = device("linear_replays_in_a_cuda_graph_with_new_inputs") else {
        return;
    };
    single_stream_mode(&dev);
    dev.prepare_linear().unwrap();
    let mut rng = Rng(16);
    let wgmma = wgmma_runs(&dev);
    for (n, k, m) in [
        (1usize, 1024usize, 3000usize),
        (4, 576, 1000),
        (40, 1024, 1536),
        (64, 2048, 2048),
        (17, 1024, 4096),
    ] {
        let mut routes = vec![Route::Auto, Route::Overlapped, Route::CublasLt];
        if wgmma && k % 64 == 0 && m % 64 == 0 {
            routes.push(Route::Wgmma);
        }
        let routes = &routes;
        let first = Case::<bf16>::new(&mut rng, n, k, m, true, true);
        let second = Case::<bf16>::new(&mut rng, n, k, m, true, true);
        let mut x = dev.upload(&first.x).unwrap();
        let mut w = dev.upload(&first.w).unwrap();
        let mut bias = dev.upload(first.bias.as_ref().unwrap()).unwrap();
        let mut residual = dev.upload(first.residual.as_ref().unwrap()).unwrap();
        let mut outs: Vec<CudaSlice<bf16>> = routes.iter().map(|_| poisoned(&dev, n * m)).collect();
        let run_all = |outs: &mut [CudaSlice<bf16>]| {
            for (route, out) in routes.iter().zip(outs.iter_mut()) {
                call(
                    &dev,
                    *route,
                    &x.as_view(),
                    n,
                    k,
                    &w.as_view(),
                    m,
                    Some(&bias.as_view()),
                    Some(&residual.as_view()),
                    out,
                )
                .unwrap();
            }
        };
        // Warm-up outside the capture: builds the cuBLASLt plan and loads the kernels.
        run_all(&mut outs);
        dev.synchronize().unwrap();

        let graph = capture(&dev, || run_all(&mut outs));
        let stream = dev.stream().clone();

        for case in [&first, &second] {
            stream.memcpy_htod(&case.x, &mut x).unwrap();
            stream.memcpy_htod(&case.w, &mut w).unwrap();
            stream
                .memcpy_htod(case.bias.as_ref().unwrap(), &mut bias)
                .unwrap();
            stream
                .memcpy_htod(case.residual.as_ref().unwrap(), &mut residual)
                .unwrap();
            for out in &mut outs {
                stream.memcpy_htod(&vec![bf16::NAN; n * m], out).unwrap();
            }
            graph.launch().unwrap();
            for (route, out) in routes.iter().zip(&outs) {
                let what = format!("graph replay n={n} k={k} m={m} {route:?}");
                assert_rel_l2(&what, &dev.download(out).unwrap(), &case.want);
            }
        }
    }
}

/// An overlapped linear starts before the kernel producing its input has finished: it must
/// still wait for that input. Chains h = x·W1ᵀ, y = h·W2ᵀ with the intermediate NaN-poisoned
/// before every run, directly on the stream and as graph replays: at 4 rows on the skinny
/// kernel, at 64 rows on the wgmma kernel where it runs (clusters of 2, then 4 blocks) and on
/// cuBLASLt elsewhere.
#[test]
fn overlapped_linear_waits_for_the_previous_kernel() {
    let Some(dev) = device("overlapped_linear_waits_for_the_previous_kernel") else {
        return;
    };
    single_stream_mode(&dev);
    let mut rng = Rng(18);
    overlapped_chain(&dev, &mut rng, 4, 1024, 3072, 1000);
    overlapped_chain(&dev, &mut rng, 64, 1024, 3072, 1024);
}

fn overlapped_chain(dev: &CudaDevice, rng: &mut Rng, n: usize, k: usize, hidden: usize, m: usize) {
    let x: Vec<bf16> = rng.vec(n * k, -1.0, 1.0);
    let w1: Vec<bf16> = rng.vec(hidden * k, -0.06, 0.06);
    let w2: Vec<bf16> = rng.vec(m * hidden, -0.04, 0.04);
    let mut h_want = vec![0.0f32; n * hidden];
    cpu::linear(&to_f32(&x), n, k, &to_f32(&w1), hidden, None, &mut h_want);
    // The GPU stores h in bf16 before the second product reads it.
    let h_rounded: Vec<f32> = h_want.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
    let mut want = vec![0.0f32; n * m];
    cpu::linear(&h_rounded, n, hidden, &to_f32(&w2), m, None, &mut want);

    let x_dev = dev.upload(&x).unwrap();
    let w1_dev = dev.upload(&w1).unwrap();
    let w2_dev = dev.upload(&w2).unwrap();
    let mut h = poisoned::<bf16>(dev, n * hidden);
    let mut y = poisoned::<bf16>(dev, n * m);
    let stream = dev.stream().clone();
    let chain = |h: &mut CudaSlice<bf16>, y: &mut CudaSlice<bf16>| {
        dev.linear_overlapped(&x_dev, n, k, &w1_dev, hidden, None, None, h)
            .unwrap();
        dev.linear_overlapped(&*h, n, hidden, &w2_dev, m, None, None, y)
            .unwrap();
    };
    for round in 0..20 {
        stream
            .memcpy_htod(&vec![bf16::NAN; n * hidden], &mut h)
            .unwrap();
        stream.memcpy_htod(&vec![bf16::NAN; n * m], &mut y).unwrap();
        chain(&mut h, &mut y);
        let what = format!("overlapped chain n={n}, stream round {round}");
        assert_rel_l2(&what, &dev.download(&y).unwrap(), &want);
    }
    let graph = capture(dev, || chain(&mut h, &mut y));
    for round in 0..20 {
        stream
            .memcpy_htod(&vec![bf16::NAN; n * hidden], &mut h)
            .unwrap();
        stream.memcpy_htod(&vec![bf16::NAN; n * m], &mut y).unwrap();
        graph.launch().unwrap();
        let what = format!("overlapped chain n={n}, graph round {round}");
        assert_rel_l2(&what, &dev.download(&y).unwrap(), &want);
    }
}

/// The norm and SiLU·mul kernels are launched with programmatic dependent launch too: in a chain
/// where every kernel reads what the one before it wrote (gate/up projection → SiLU·mul → down
/// projection → residual add + RMSNorm → RMSNorm → projection), each must wait for its
/// predecessor. Intermediates are NaN-poisoned every round, on a stream and in a graph.
#[test]
fn norm_and_activation_wait_for_the_previous_kernel() {
    let Some(dev) = device("norm_and_activation_wait_for_the_previous_kernel") else {
        return;
    };
    single_stream_mode(&dev);
    let mut rng = Rng(19);
    let (n, h, inter, m) = (4usize, 1024usize, 768usize, 500usize);
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect() };
    let x: Vec<bf16> = rng.vec(n * h, -1.0, 1.0);
    let w_gu: Vec<bf16> = rng.vec(2 * inter * h, -0.06, 0.06);
    let w_down: Vec<bf16> = rng.vec(h * inter, -0.06, 0.06);
    let w_out: Vec<bf16> = rng.vec(m * h, -0.04, 0.04);
    let norm_a: Vec<bf16> = rng.vec(h, 0.5, 1.5);
    let norm_b: Vec<bf16> = rng.vec(h, 0.5, 1.5);
    let residual: Vec<bf16> = rng.vec(n * h, -2.0, 2.0);

    // The CPU reference, rounding to bf16 wherever the GPU stores an intermediate.
    let mut gu = vec![0.0f32; n * 2 * inter];
    cpu::linear(&to_f32(&x), n, h, &to_f32(&w_gu), 2 * inter, None, &mut gu);
    let gu = round(&gu);
    let mut act = vec![0.0f32; n * inter];
    for r in 0..n {
        let row = &gu[r * 2 * inter..(r + 1) * 2 * inter];
        cpu::silu_mul(
            &row[..inter],
            &row[inter..],
            &mut act[r * inter..(r + 1) * inter],
        );
    }
    let act = round(&act);
    let mut proj = vec![0.0f32; n * h];
    cpu::linear(&act, n, inter, &to_f32(&w_down), h, None, &mut proj);
    let proj = round(&proj);
    let summed: Vec<f32> = to_f32(&residual)
        .iter()
        .zip(&proj)
        .map(|(r, p)| r + p)
        .collect();
    let summed = round(&summed);
    let mut normed = vec![0.0f32; n * h];
    cpu::rms_norm(&summed, &to_f32(&norm_a), EPS, &mut normed);
    let normed = round(&normed);
    let mut renormed = vec![0.0f32; n * h];
    cpu::rms_norm(&normed, &to_f32(&norm_b), EPS, &mut renormed);
    let renormed = round(&renormed);
    let mut want = vec![0.0f32; n * m];
    cpu::linear(&renormed, n, h, &to_f32(&w_out), m, None, &mut want);

    let x_d = dev.upload(&x).unwrap();
    let w_gu_d = dev.upload(&w_gu).unwrap();
    let w_down_d = dev.upload(&w_down).unwrap();
    let w_out_d = dev.upload(&w_out).unwrap();
    let norm_a_d = dev.upload(&norm_a).unwrap();
    let norm_b_d = dev.upload(&norm_b).unwrap();
    let mut bufs = [
        poisoned::<bf16>(&dev, n * 2 * inter),
        poisoned::<bf16>(&dev, n * inter),
        poisoned::<bf16>(&dev, n * h),
        dev.upload(&residual).unwrap(),
        poisoned::<bf16>(&dev, n * h),
        poisoned::<bf16>(&dev, n * h),
        poisoned::<bf16>(&dev, n * m),
    ];
    let stream = dev.stream().clone();
    let reset = |bufs: &mut [CudaSlice<bf16>; 7]| {
        for (i, buf) in bufs.iter_mut().enumerate() {
            let fill = if i == 3 {
                residual.clone()
            } else {
                vec![bf16::NAN; buf.len()]
            };
            stream.memcpy_htod(&fill, buf).unwrap();
        }
    };
    let chain = |bufs: &mut [CudaSlice<bf16>; 7]| {
        let [gu, act, proj, residual, normed, renormed, y] = bufs;
        dev.linear_overlapped(&x_d, n, h, &w_gu_d, 2 * inter, None, None, gu)
            .unwrap();
        dev.silu_mul(&*gu, act, n, inter).unwrap();
        dev.linear_overlapped(&*act, n, inter, &w_down_d, h, None, None, proj)
            .unwrap();
        dev.fused_add_rms_norm(&*proj, residual, &norm_a_d, normed, n, h, EPS)
            .unwrap();
        dev.rms_norm(&*normed, &norm_b_d, renormed, n, h, EPS)
            .unwrap();
        dev.linear_overlapped(&*renormed, n, h, &w_out_d, m, None, None, y)
            .unwrap();
    };
    for r in 0..20 {
        reset(&mut bufs);
        chain(&mut bufs);
        let what = format!("norm/activation chain, stream round {r}");
        assert_rel_l2(&what, &dev.download(&bufs[6]).unwrap(), &want);
    }
    let graph = capture(&dev, || chain(&mut bufs));
    for r in 0..20 {
        reset(&mut bufs);
        graph.launch().unwrap();
        let what = format!("norm/activation chain, graph round {r}");
        assert_rel_l2(&what, &dev.download(&bufs[6]).unwrap(), &want);
    }
}

// ---- fused projections --------------------------------------------------------------------

const EPS: f32 = 1e-6;

/// Residual-stream rows scaled like a real model's: most channels O(1), a few outlier channels
/// two orders of magnitude larger, which dominate the RMS.
fn residual_rows<T: TestFloat>(rng: &mut Rng, n: usize, k: usize) -> Vec<T> {
    let outliers: Vec<usize> = (0..3).map(|_| rng.below(k)).collect();
    (0..n * k)
        .map(|i| {
            let scale = if outliers.contains(&(i % k)) {
                60.0
            } else {
                1.5
            };
            T::from_f32(rng.uniform(-scale, scale))
        })
        .collect()
}

/// Norm weights: ordinary ones around 1, or extreme ones as trained models have them (Qwen3's
/// k_norm reaches ~96): a few channels near 100, some near zero, some negative.
fn norm_weights<T: TestFloat>(rng: &mut Rng, k: usize, extreme: bool) -> Vec<T> {
    (0..k)
        .map(|i| {
            let v = if !extreme {
                rng.uniform(0.5, 1.5)
            } else {
                match i % 7 {
                    0 => rng.uniform(60.0, 100.0),
                    1 => rng.uniform(-0.01, 0.01),
                    2 => rng.uniform(-3.0, -0.5),
                    _ => rng.uniform(0.2, 8.0),
                }
            };
            T::from_f32(v)
        })
        .collect()
}

/// The GPU's rounding of an f32 vector to `T`, back in f32.
fn rounded<T: TestFloat>(values: &[f32]) -> Vec<f32> {
    values.iter().map(|v| T::from_f32(*v).to_f32()).collect()
}

/// CPU reference of the norm prologue: the residual sum rounded to `T` (what `residual_out`
/// must hold, bit for bit) and the normalised rows rounded to `T`, as the unfused kernels store
/// them.
fn norm_reference<T: TestFloat>(
    residual: &[T],
    delta: Option<&[T]>,
    weight: &[T],
) -> (Vec<T>, Vec<f32>) {
    let sum: Vec<T> = match delta {
        Some(delta) => residual
            .iter()
            .zip(delta)
            .map(|(r, d)| T::from_f32(r.to_f32() + d.to_f32()))
            .collect(),
        None => residual.to_vec(),
    };
    let mut normed = vec![0.0f32; sum.len()];
    cpu::rms_norm(&to_f32(&sum), &to_f32(weight), EPS, &mut normed);
    (sum, rounded::<T>(&normed))
}

/// CPU reference of the SiLU·mul prologue: `[n, 2 * inter]` rows to `[n, inter]`, rounded.
fn silu_reference<T: TestFloat>(gate_up: &[T], n: usize, inter: usize) -> Vec<f32> {
    let mut act = vec![0.0f32; n * inter];
    for r in 0..n {
        let row = to_f32(&gate_up[r * 2 * inter..(r + 1) * 2 * inter]);
        cpu::silu_mul(
            &row[..inter],
            &row[inter..],
            &mut act[r * inter..(r + 1) * inter],
        );
    }
    rounded::<T>(&act)
}

fn linear_reference(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    m: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = vec![0.0f32; n * m];
    cpu::linear(x, n, k, w, m, bias, &mut out);
    out
}

/// One random case of `add_rms_norm_linear` with its references.
struct NormCase<T> {
    n: usize,
    k: usize,
    m: usize,
    residual: Vec<T>,
    delta: Option<Vec<T>>,
    weight: Vec<T>,
    w: Vec<T>,
    bias: Option<Vec<T>>,
    want_residual: Vec<T>,
    want: Vec<f32>,
}

impl<T: TestFloat> NormCase<T> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        n: usize,
        k: usize,
        m: usize,
        delta: bool,
        bias: bool,
        extreme: bool,
    ) -> Self {
        let scale = 1.0 / (k as f32).sqrt();
        let residual = residual_rows::<T>(rng, n, k);
        let delta: Option<Vec<T>> = delta.then(|| rng.vec(n * k, -1.0, 1.0));
        let weight = norm_weights::<T>(rng, k, extreme);
        let w: Vec<T> = rng.vec(m * k, -2.0 * scale, 2.0 * scale);
        let bias: Option<Vec<T>> = bias.then(|| rng.vec(m, -0.5, 0.5));
        let (want_residual, normed) = norm_reference(&residual, delta.as_deref(), &weight);
        let bias_f32 = bias.as_deref().map(to_f32);
        let want = linear_reference(&normed, n, k, &to_f32(&w), m, bias_f32.as_deref());
        NormCase {
            n,
            k,
            m,
            residual,
            delta,
            weight,
            w,
            bias,
            want_residual,
            want,
        }
    }

    /// Runs the fused kernel with NaN-poisoned outputs; checks the product against the
    /// reference, `residual_out` bit for bit, and that the input residual was left alone.
    fn check(&self, dev: &CudaDevice, write_residual: bool, what: &str) {
        let (n, k, m) = (self.n, self.k, self.m);
        let residual = dev.upload(&self.residual).unwrap();
        let delta = self.delta.as_ref().map(|d| dev.upload(d).unwrap());
        let weight = dev.upload(&self.weight).unwrap();
        let w = dev.upload(&self.w).unwrap();
        let bias = self.bias.as_ref().map(|b| dev.upload(b).unwrap());
        let mut residual_out = poisoned::<T>(dev, n * k);
        let mut out = poisoned::<T>(dev, n * m);
        dev.add_rms_norm_linear(
            &residual,
            delta.as_ref().map(|d| d.as_view()).as_ref(),
            &weight,
            EPS,
            n,
            k,
            &w,
            m,
            bias.as_ref().map(|b| b.as_view()).as_ref(),
            write_residual.then(|| residual_out.as_view_mut()).as_mut(),
            &mut out,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_rel_l2(what, &dev.download(&out).unwrap(), &self.want);
        assert_eq!(
            dev.download(&residual).unwrap(),
            self.residual,
            "{what}: the input residual changed"
        );
        let written = dev.download(&residual_out).unwrap();
        if write_residual {
            let bad = written
                .iter()
                .zip(&self.want_residual)
                .position(|(g, w)| g.to_f32().to_bits() != w.to_f32().to_bits());
            assert!(
                bad.is_none(),
                "{what}: residual_out[{}] is {:?}, expected {:?}",
                bad.unwrap_or(0),
                written[bad.unwrap_or(0)],
                self.want_residual[bad.unwrap_or(0)]
            );
        } else {
            assert!(
                written.iter().all(|v| v.to_f32().is_nan()),
                "{what}: residual_out was written although none was passed"
            );
        }
    }
}

fn check_fused_norm_shapes<T: TestFloat>(dev: &CudaDevice, seed: u64) {
    let mut rng = Rng(seed);
    let mut variant = 0usize;
    for n in [1usize, 3, 8, 9, 16] {
        for k in [64usize, 584, 1000, 2056] {
            for m in [7usize, 203, 1000, 4099] {
                // Every n sees each combination of delta, bias, residual_out and extreme weights.
                let flags = [0, 1, 2, 3].map(|bit| variant >> bit & 1 == 1);
                variant += 1;
                let case = NormCase::<T>::new(&mut rng, n, k, m, flags[0], flags[1], flags[2]);
                let what = format!(
                    "add_rms_norm_linear_{} n={n} k={k} m={m} delta={} bias={} extreme={} residual_out={}",
                    T::SUFFIX, flags[0], flags[1], flags[2], flags[3]
                );
                case.check(dev, flags[3], &what);
            }
        }
    }
}

#[test]
fn add_rms_norm_linear_bf16_matches_cpu_reference() {
    let Some(dev) = device("add_rms_norm_linear_bf16_matches_cpu_reference") else {
        return;
    };
    check_fused_norm_shapes::<bf16>(&dev, 21);
}

#[test]
fn add_rms_norm_linear_f16_matches_cpu_reference() {
    let Some(dev) = device("add_rms_norm_linear_f16_matches_cpu_reference") else {
        return;
    };
    check_fused_norm_shapes::<f16>(&dev, 22);
}

/// The updated residual is written by one block only and exactly once: with 257 blocks
/// reading the same rows, `residual_out` is `residual + delta` rounded once, never
/// `residual + 2·delta` or a mix, on every token count and over repeated runs.
#[test]
fn fused_norm_writes_the_residual_exactly_once() {
    let Some(dev) = device("fused_norm_writes_the_residual_exactly_once") else {
        return;
    };
    let mut rng = Rng(23);
    for n in 1..=16 {
        let case = NormCase::<bf16>::new(&mut rng, n, 1024, 4099, true, false, n % 2 == 0);
        for run in 0..3 {
            case.check(&dev, true, &format!("n={n} run {run}"));
        }
    }
}

fn check_silu_shapes<T: TestFloat>(dev: &CudaDevice, seed: u64) {
    let mut rng = Rng(seed);
    let mut variant = 0usize;
    for n in [1usize, 2, 7, 8, 13, 16] {
        for inter in [64usize, 1000, 3080] {
            for m in [9usize, 1000, 1029] {
                let bias = variant % 2 == 1;
                variant += 1;
                let scale = 1.0 / (inter as f32).sqrt();
                let gate_up: Vec<T> = rng.vec(n * 2 * inter, -4.0, 4.0);
                let w: Vec<T> = rng.vec(m * inter, -2.0 * scale, 2.0 * scale);
                let bias: Option<Vec<T>> = bias.then(|| rng.vec(m, -0.5, 0.5));
                let act = silu_reference(&gate_up, n, inter);
                let bias_f32 = bias.as_deref().map(to_f32);
                let want = linear_reference(&act, n, inter, &to_f32(&w), m, bias_f32.as_deref());

                let what = format!("silu_mul_linear_{} n={n} inter={inter} m={m}", T::SUFFIX);
                let gate_up = dev.upload(&gate_up).unwrap();
                let w = dev.upload(&w).unwrap();
                let bias = bias.as_ref().map(|b| dev.upload(b).unwrap());
                let mut out = poisoned::<T>(dev, n * m);
                dev.silu_mul_linear(
                    &gate_up,
                    n,
                    inter,
                    &w,
                    m,
                    bias.as_ref().map(|b| b.as_view()).as_ref(),
                    &mut out,
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_rel_l2(&what, &dev.download(&out).unwrap(), &want);
            }
        }
    }
}

#[test]
fn silu_mul_linear_bf16_matches_cpu_reference() {
    let Some(dev) = device("silu_mul_linear_bf16_matches_cpu_reference") else {
        return;
    };
    check_silu_shapes::<bf16>(&dev, 24);
}

#[test]
fn silu_mul_linear_f16_matches_cpu_reference() {
    let Some(dev) = device("silu_mul_linear_f16_matches_cpu_reference") else {
        return;
    };
    check_silu_shapes::<f16>(&dev, 25);
}

/// The fused kernels refuse, with an error naming the operand, what they cannot run, and
/// `*_fits` agrees with the calls.
#[test]
fn fused_linear_rejects_what_it_cannot_run() {
    let Some(dev) = device("fused_linear_rejects_what_it_cannot_run") else {
        return;
    };
    let (n, k, m) = (2usize, 64usize, 24usize);
    let x = dev.upload(&vec![bf16::ONE; 2 * n * k + 8]).unwrap();
    let weight = dev.upload(&vec![bf16::ONE; k]).unwrap();
    let w = dev.upload(&vec![bf16::ONE; m * k]).unwrap();
    let mut out = poisoned::<bf16>(&dev, n * m);
    let norm = |x: &CudaView<bf16>, n: usize, k: usize, out: &mut CudaSlice<bf16>| {
        dev.add_rms_norm_linear(
            x,
            None,
            &weight.slice(..k),
            EPS,
            n,
            k,
            &w.slice(..m * k),
            m,
            None,
            None,
            out,
        )
        .map(|_| ())
    };

    let err = norm(&x.slice(1..1 + n * k), n, k, &mut out).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("add_rms_norm_linear: the address of `residual` must be 16-byte aligned"),
        "{err}"
    );
    let err = norm(&x.slice(..n * 60), n, 60, &mut out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "add_rms_norm_linear: the row width must be a non-zero multiple of 8 for the fused kernel's \
         16-byte loads, found 60"
    );
    let err = norm(&x.slice(..n * k - 1), n, k, &mut out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "add_rms_norm_linear: `residual` holds 127 elements, expected 128"
    );
    let mut big_out = poisoned::<bf16>(&dev, 17 * m);
    let x17 = dev.upload(&vec![bf16::ONE; 17 * k]).unwrap();
    let err = norm(&x17.as_view(), 17, k, &mut big_out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "add_rms_norm_linear: n must be at most 16 for a fused projection, found 17"
    );
    assert!(!dev.fused_linear_fits::<bf16>(17, k));
    assert!(!dev.fused_linear_fits::<f32>(1, k));
    assert!(!dev.fused_linear_fits::<f16>(1, 60));
    assert!(dev.fused_linear_fits::<bf16>(16, k));
    assert!(dev.fused_linear_fits::<f16>(1, 3072));
    // 16 staged rows of 32768 need a megabyte: more than any GPU's shared memory per block.
    assert!(!dev.fused_linear_fits::<bf16>(16, 32_768));
    let gate_up = dev.alloc_zeros::<bf16>(16 * 2 * 32_768).unwrap();
    let w_big = dev.alloc_zeros::<bf16>(8 * 32_768).unwrap();
    let mut out_big = poisoned::<bf16>(&dev, 16 * 8);
    let err = dev
        .silu_mul_linear(&gate_up, 16, 32_768, &w_big, 8, None, &mut out_big)
        .unwrap_err();
    assert!(
        err.to_string().starts_with(
            "silu_mul_linear: the block's shared memory must be within the device's per-block limit"
        ),
        "{err}"
    );

    let err = dev
        .silu_mul_linear(&x.slice(..2 * n * k), n, k, &w, m - 1, None, &mut out)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "silu_mul_linear: `w` holds 1536 elements, expected 1472"
    );
    let f32_in = dev.upload(&vec![1.0f32; 2 * n * k]).unwrap();
    let f32_w = dev.upload(&vec![1.0f32; m * k]).unwrap();
    let mut f32_out = dev.alloc_zeros::<f32>(n * m).unwrap();
    let err = dev
        .silu_mul_linear(&f32_in, n, k, &f32_w, m, None, &mut f32_out)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "silu_mul_linear: the dtype must be f16 or bf16, found f32"
    );

    // No rows is nothing to do.
    let mut empty = poisoned::<bf16>(&dev, 0);
    norm(&x.slice(0..0), 0, k, &mut empty).unwrap();
    dev.synchronize().unwrap();
}

/// A decode-like chain on the fused path, run directly and as CUDA-graph replays with new
/// inputs: per layer, `gate_up = add_rms_norm_linear(residual, delta)` writing the updated
/// residual into the other of two buffers, then `delta = silu_mul_linear(gate_up)`; a final
/// norm + projection reads the last residual and delta. Every kernel starts under programmatic
/// dependent launch before its predecessor ends, so a missing wait or a residual read after it
/// was overwritten shows as a wrong result; the intermediates are NaN-poisoned every round.
#[test]
fn fused_chain_replays_in_a_cuda_graph() {
    let Some(dev) = device("fused_chain_replays_in_a_cuda_graph") else {
        return;
    };
    single_stream_mode(&dev);
    type T = bf16;
    let mut rng = Rng(26);
    let (n, h, inter, m, layers) = (5usize, 1000usize, 1544usize, 777usize, 3usize);
    let norms: Vec<Vec<T>> = (0..=layers)
        .map(|l| norm_weights::<T>(&mut rng, h, l % 2 == 1))
        .collect();
    let s_h = 1.0 / (h as f32).sqrt();
    let s_i = 1.0 / (inter as f32).sqrt();
    let w_gu: Vec<Vec<T>> = (0..layers)
        .map(|_| rng.vec(2 * inter * h, -2.0 * s_h, 2.0 * s_h))
        .collect();
    let w_down: Vec<Vec<T>> = (0..layers).map(|_| rng.vec(h * inter, -s_i, s_i)).collect();
    let w_head: Vec<T> = rng.vec(m * h, -2.0 * s_h, 2.0 * s_h);

    // The reference rounds to T wherever the GPU stores an intermediate.
    let reference = |input: &[T]| -> Vec<f32> {
        let mut residual = input.to_vec();
        let mut delta: Option<Vec<T>> = None;
        for l in 0..layers {
            let (sum, normed) = norm_reference(&residual, delta.as_deref(), &norms[l]);
            residual = sum;
            let gu = linear_reference(&normed, n, h, &to_f32(&w_gu[l]), 2 * inter, None);
            let gu: Vec<T> = gu.iter().map(|v| T::from_f32(*v)).collect();
            let act = silu_reference(&gu, n, inter);
            let d = linear_reference(&act, n, inter, &to_f32(&w_down[l]), h, None);
            delta = Some(d.iter().map(|v| T::from_f32(*v)).collect());
        }
        let (_, normed) = norm_reference(&residual, delta.as_deref(), &norms[layers]);
        linear_reference(&normed, n, h, &to_f32(&w_head), m, None)
    };
    let inputs: Vec<Vec<T>> = (0..2).map(|_| residual_rows::<T>(&mut rng, n, h)).collect();
    let wants: Vec<Vec<f32>> = inputs.iter().map(|x| reference(x)).collect();

    let up = |v: &[T]| dev.upload(v).unwrap();
    let norms_dev: Vec<_> = norms.iter().map(|v| up(v)).collect();
    let w_gu_dev: Vec<_> = w_gu.iter().map(|v| up(v)).collect();
    let w_down_dev: Vec<_> = w_down.iter().map(|v| up(v)).collect();
    let w_head_dev = up(&w_head);
    let mut res_a = poisoned::<T>(&dev, n * h);
    let mut res_b = poisoned::<T>(&dev, n * h);
    let mut gate_up = poisoned::<T>(&dev, n * 2 * inter);
    let mut delta = poisoned::<T>(&dev, n * h);
    let mut out = poisoned::<T>(&dev, n * m);

    let run = |res_a: &mut CudaSlice<T>,
               res_b: &mut CudaSlice<T>,
               gate_up: &mut CudaSlice<T>,
               delta: &mut CudaSlice<T>,
               out: &mut CudaSlice<T>| {
        for l in 0..layers {
            let (src, dst) = if l % 2 == 0 {
                (&*res_a, &mut *res_b)
            } else {
                (&*res_b, &mut *res_a)
            };
            let d = delta.as_view();
            dev.add_rms_norm_linear(
                src,
                (l > 0).then_some(&d),
                &norms_dev[l],
                EPS,
                n,
                h,
                &w_gu_dev[l],
                2 * inter,
                None,
                Some(&mut dst.as_view_mut()),
                gate_up,
            )
            .unwrap();
            dev.silu_mul_linear(&*gate_up, n, inter, &w_down_dev[l], h, None, delta)
                .unwrap();
        }
        let last = if layers % 2 == 1 { &*res_b } else { &*res_a };
        dev.add_rms_norm_linear(
            last,
            Some(&delta.as_view()),
            &norms_dev[layers],
            EPS,
            n,
            h,
            &w_head_dev,
            m,
            None,
            None,
            out,
        )
        .unwrap();
    };
    let stream = dev.stream().clone();
    let poison = |res_b: &mut CudaSlice<T>,
                  gate_up: &mut CudaSlice<T>,
                  delta: &mut CudaSlice<T>,
                  out: &mut CudaSlice<T>| {
        stream.memcpy_htod(&vec![T::NAN; n * h], res_b).unwrap();
        stream
            .memcpy_htod(&vec![T::NAN; n * 2 * inter], gate_up)
            .unwrap();
        stream.memcpy_htod(&vec![T::NAN; n * h], delta).unwrap();
        stream.memcpy_htod(&vec![T::NAN; n * m], out).unwrap();
    };
    for round in 0..6 {
        let i = round % 2;
        stream.memcpy_htod(&inputs[i], &mut res_a).unwrap();
        poison(&mut res_b, &mut gate_up, &mut delta, &mut out);
        run(&mut res_a, &mut res_b, &mut gate_up, &mut delta, &mut out);
        let what = format!("fused chain, stream round {round}");
        assert_rel_l2(&what, &dev.download(&out).unwrap(), &wants[i]);
    }
    let graph = capture(&dev, || {
        run(&mut res_a, &mut res_b, &mut gate_up, &mut delta, &mut out)
    });
    for round in 0..6 {
        let i = round % 2;
        stream.memcpy_htod(&inputs[i], &mut res_a).unwrap();
        poison(&mut res_b, &mut gate_up, &mut delta, &mut out);
        graph.launch().unwrap();
        let what = format!("fused chain, graph round {round}");
        assert_rel_l2(&what, &dev.download(&out).unwrap(), &wants[i]);
    }
}

// ---- gate|up projection with SiLU·mul --------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum GateUpRoute {
    Auto,
    Fused,
    Unfused,
}

#[allow(clippy::too_many_arguments)]
fn call_gate_up<T: TestFloat>(
    dev: &CudaDevice,
    route: GateUpRoute,
    x: &CudaView<T>,
    n: usize,
    k: usize,
    w: &CudaView<T>,
    inter: usize,
    gate_up: &mut CudaViewMut<T>,
    out: &mut CudaViewMut<T>,
) -> Result<(), CudaError> {
    match route {
        GateUpRoute::Auto => dev.linear_gate_up_silu(x, n, k, w, inter, gate_up, out),
        GateUpRoute::Fused => dev.linear_gate_up_silu_fused(x, n, k, w, inter, gate_up, out),
        GateUpRoute::Unfused => dev.linear_gate_up_silu_unfused(x, n, k, w, inter, gate_up, out),
    }
}

/// CPU reference of `linear_gate_up_silu`: the gate|up product rounded to `T` (what the unfused
/// path stores), then SiLU·mul in f32, rounded.
fn gate_up_silu_reference<T: TestFloat>(
    x: &[T],
    n: usize,
    k: usize,
    w: &[T],
    inter: usize,
) -> Vec<f32> {
    let gate_up = linear_reference(&to_f32(x), n, k, &to_f32(w), 2 * inter, None);
    let gate_up: Vec<T> = gate_up.iter().map(|v| T::from_f32(*v)).collect();
    silu_reference(&gate_up, n, inter)
}

/// One random case of `linear_gate_up_silu` with its reference.
struct GateUpCase<T> {
    n: usize,
    k: usize,
    inter: usize,
    x: Vec<T>,
    w: Vec<T>,
    want: Vec<f32>,
}

impl<T: TestFloat> GateUpCase<T> {
    fn new(rng: &mut Rng, n: usize, k: usize, inter: usize) -> Self {
        // Gate and up values of a few units, so SiLU's curved part and both signs show.
        let scale = 1.0 / (k as f32).sqrt();
        let x: Vec<T> = rng.vec(n * k, -1.0, 1.0);
        let w: Vec<T> = rng.vec(2 * inter * k, -4.0 * scale, 4.0 * scale);
        let want = gate_up_silu_reference(&x, n, k, &w, inter);
        GateUpCase {
            n,
            k,
            inter,
            x,
            w,
            want,
        }
    }

    fn describe(&self, route: GateUpRoute) -> String {
        format!(
            "linear_gate_up_silu_{} {route:?} n={} k={} inter={}",
            T::SUFFIX,
            self.n,
            self.k,
            self.inter
        )
    }

    /// Runs the case through `route` into NaN-poisoned outputs and returns `out`.
    fn run(&self, dev: &CudaDevice, route: GateUpRoute) -> Vec<T> {
        let what = self.describe(route);
        let (n, k, inter) = (self.n, self.k, self.inter);
        let x = dev.upload(&self.x).unwrap();
        let w = dev.upload(&self.w).unwrap();
        let mut gate_up = poisoned::<T>(dev, n * 2 * inter);
        let mut out = poisoned::<T>(dev, n * inter);
        call_gate_up(
            dev,
            route,
            &x.as_view(),
            n,
            k,
            &w.as_view(),
            inter,
            &mut gate_up.as_view_mut(),
            &mut out.as_view_mut(),
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        dev.download(&out).unwrap()
    }

    fn check(&self, dev: &CudaDevice, route: GateUpRoute) -> Vec<T> {
        let got = self.run(dev, route);
        assert_rel_l2(&self.describe(route), &got, &self.want);
        got
    }
}

fn bits<T: TestFloat>(values: &[T]) -> Vec<u32> {
    values.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// Clusters of 1, 2 and 8 blocks, k-slices of 1 to 24 slabs (17: the first ring slot filled
/// three times, so both barrier phases recur), one to 48 tiles of output features, and token
/// counts that leave the last block of a cluster with fewer rows or none.
const GATE_UP_NS: [usize; 6] = [4, 5, 17, 32, 33, 64];
const GATE_UP_KS: [usize; 4] = [64, 1024, 1088, 3072];
const GATE_UP_INTERS: [usize; 3] = [64, 320, 3072];

fn check_gate_up_shapes<T: TestFloat>(dev: &CudaDevice, seed: u64) {
    let mut rng = Rng(seed);
    for n in GATE_UP_NS {
        for k in GATE_UP_KS {
            for inter in GATE_UP_INTERS {
                let case = GateUpCase::<T>::new(&mut rng, n, k, inter);
                let fused = case.check(dev, GateUpRoute::Fused);
                case.check(dev, GateUpRoute::Unfused);
                let auto = case.check(dev, GateUpRoute::Auto);
                // 5–64 rows take the fused kernel (deterministic, so bit for bit); fewer take
                // the two steps.
                let expect = if n >= CudaDevice::GATE_UP_SILU_FUSED_MIN_TOKENS {
                    (fused, GateUpRoute::Fused)
                } else {
                    (case.run(dev, GateUpRoute::Unfused), GateUpRoute::Unfused)
                };
                assert!(
                    bits(&auto) == bits(&expect.0),
                    "{}: output differs from the {:?} route's",
                    case.describe(GateUpRoute::Auto),
                    expect.1
                );
            }
        }
    }
}

#[test]
fn gate_up_silu_bf16_matches_cpu_reference() {
    let Some(dev) = wgmma_device("gate_up_silu_bf16_matches_cpu_reference") else {
        return;
    };
    check_gate_up_shapes::<bf16>(&dev, 41);
}

#[test]
fn gate_up_silu_f16_matches_cpu_reference() {
    let Some(dev) = wgmma_device("gate_up_silu_f16_matches_cpu_reference") else {
        return;
    };
    check_gate_up_shapes::<f16>(&dev, 42);
}

/// Operands the fused kernel cannot take run the two steps (still right) under
/// `linear_gate_up_silu`, and make the forced fused route fail with an error naming the
/// argument; on a device other than compute capability 9.0 every call takes the two steps and
/// the forced route names the device. Buffer lengths are checked on every route.
#[test]
fn gate_up_silu_falls_back_where_the_fused_kernel_cannot_run() {
    let Some(dev) = device("gate_up_silu_falls_back_where_the_fused_kernel_cannot_run") else {
        return;
    };
    let hopper = wgmma_runs(&dev);
    let mut rng = Rng(43);
    let fused_error = |case: &GateUpCase<bf16>| {
        let (n, k, inter) = (case.n, case.k, case.inter);
        let x = dev.upload(&case.x).unwrap();
        let w = dev.upload(&case.w).unwrap();
        let mut gate_up = poisoned::<bf16>(&dev, n * 2 * inter);
        let mut out = poisoned::<bf16>(&dev, n * inter);
        dev.linear_gate_up_silu_fused(&x, n, k, &w, inter, &mut gate_up, &mut out)
            .unwrap_err()
            .to_string()
    };
    // Fewer than GATE_UP_SILU_FUSED_MIN_TOKENS rows (decode steps that take the fused GEMVs) and
    // more than 64 stay on the two steps: the output equals the two-step route's bit for bit.
    let below = CudaDevice::GATE_UP_SILU_FUSED_MIN_TOKENS - 1;
    for (n, k, inter) in [(below, 1024usize, 3072usize), (65, 1024, 3072)] {
        let case = GateUpCase::<bf16>::new(&mut rng, n, k, inter);
        let auto = case.check(&dev, GateUpRoute::Auto);
        let unfused = case.run(&dev, GateUpRoute::Unfused);
        assert!(
            bits(&auto) == bits(&unfused),
            "{}: left the two-step path",
            case.describe(GateUpRoute::Auto)
        );
    }
    let (major, minor) = dev.context().compute_capability().unwrap();
    for (n, k, inter, message) in [
        (
            32,
            1024,
            96,
            "linear_gate_up_silu: inter must be a multiple of 64 for the wgmma kernel's tiles, \
             found 96"
                .to_string(),
        ),
        (
            32,
            1000,
            320,
            "linear_gate_up_silu: k must be a multiple of 64 for the wgmma kernel's tiles, found \
             1000"
                .to_string(),
        ),
        (
            65,
            1024,
            320,
            "linear_gate_up_silu: n must be at most 64 for the wgmma kernel, found 65".to_string(),
        ),
        (
            32,
            1024,
            320,
            format!(
                "linear_gate_up_silu: the device must be of compute capability 9.0 for the wgmma \
                 kernel, found {major}.{minor}"
            ),
        ),
    ] {
        let case = GateUpCase::<bf16>::new(&mut rng, n, k, inter);
        case.check(&dev, GateUpRoute::Auto);
        case.check(&dev, GateUpRoute::Unfused);
        let device_case = message.contains("the device");
        if hopper != device_case {
            assert_eq!(fused_error(&case), message);
        }
    }

    // f32 runs the two steps; the fused kernel refuses it.
    let (n, k, inter) = (32usize, 64usize, 64usize);
    let x32: Vec<f32> = rng.vec(n * k, -1.0, 1.0);
    let w32: Vec<f32> = rng.vec(2 * inter * k, -0.5, 0.5);
    let want = gate_up_silu_reference(&x32, n, k, &w32, inter);
    let x = dev.upload(&x32).unwrap();
    let w = dev.upload(&w32).unwrap();
    let mut gate_up = poisoned::<f32>(&dev, n * 2 * inter);
    let mut out = poisoned::<f32>(&dev, n * inter);
    dev.linear_gate_up_silu(&x, n, k, &w, inter, &mut gate_up, &mut out)
        .unwrap();
    assert_rel_l2(
        "linear_gate_up_silu_f32",
        &dev.download(&out).unwrap(),
        &want,
    );
    if hopper {
        let err = dev
            .linear_gate_up_silu_fused(&x, n, k, &w, inter, &mut gate_up, &mut out)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "linear_gate_up_silu: the dtype must be f16 or bf16, found f32"
        );
    }

    // Every operand 8 elements (16 bytes) into its buffer, then each in turn 1 element in.
    let (n, k, inter) = (33usize, 1024usize, 320usize);
    let case = GateUpCase::<bf16>::new(&mut rng, n, k, inter);
    let padded = |values: &[bf16], pad: usize| {
        let mut v = vec![bf16::from_f32(7.0); pad];
        v.extend_from_slice(values);
        dev.upload(&v).unwrap()
    };
    let names = ["x", "w_gate_up", "gate_up", "out"];
    for odd in [None, Some(0), Some(1), Some(2), Some(3)] {
        let pad = |i: usize| if odd == Some(i) { 1 } else { 8 };
        let x = padded(&case.x, pad(0));
        let w = padded(&case.w, pad(1));
        for route in [GateUpRoute::Fused, GateUpRoute::Auto] {
            let what = format!(
                "{} with views {:?} elements in",
                case.describe(route),
                [0, 1, 2, 3].map(pad)
            );
            let mut gate_up = poisoned::<bf16>(&dev, pad(2) + n * 2 * inter);
            let mut out = poisoned::<bf16>(&dev, pad(3) + n * inter);
            let result = call_gate_up(
                &dev,
                route,
                &x.slice(pad(0)..),
                n,
                k,
                &w.slice(pad(1)..),
                inter,
                &mut gate_up.slice_mut(pad(2)..),
                &mut out.slice_mut(pad(3)..),
            );
            match (route, odd) {
                (GateUpRoute::Fused, _) if !hopper => assert!(result.is_err(), "{what}"),
                // The fused kernel never touches the scratch, whatever its alignment.
                (GateUpRoute::Fused, Some(i)) if names[i] != "gate_up" => {
                    let err = result.unwrap_err().to_string();
                    let expected = format!(
                        "linear_gate_up_silu: the address of `{}` must be 16-byte aligned for \
                         the wgmma kernel, found 0x",
                        names[i]
                    );
                    assert!(err.starts_with(&expected), "{what}: {err}");
                }
                _ => {
                    result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    let got = dev.download(&out.slice(pad(3)..)).unwrap();
                    assert_rel_l2(&what, &got, &case.want);
                }
            }
        }
    }

    // Lengths are checked before any route is chosen.
    let (n, k, inter) = (32usize, 64usize, 64usize);
    let x = dev.upload(&vec![bf16::ONE; n * k]).unwrap();
    let w = dev.upload(&vec![bf16::ONE; 2 * inter * k]).unwrap();
    let mut gate_up = poisoned::<bf16>(&dev, n * 2 * inter);
    let mut out = poisoned::<bf16>(&dev, n * inter);
    let err = dev
        .linear_gate_up_silu(
            &x,
            n,
            k,
            &w.slice(..inter * k),
            inter,
            &mut gate_up,
            &mut out,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "linear_gate_up_silu: `w_gate_up` holds 4096 elements, expected 8192"
    );
    let err = dev
        .linear_gate_up_silu_fused(
            &x,
            n,
            k,
            &w,
            inter,
            &mut gate_up.slice_mut(..n * inter),
            &mut out,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "linear_gate_up_silu: `gate_up` holds 2048 elements, expected 4096"
    );
    let err = dev
        .linear_gate_up_silu(&x, n, k, &w, inter, &mut gate_up, &mut out.slice_mut(1..))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "linear_gate_up_silu: `out` holds 2047 elements, expected 2048"
    );
    // No rows is nothing to do.
    let mut empty = poisoned::<bf16>(&dev, 0);
    let mut empty_gate_up = poisoned::<bf16>(&dev, 0);
    dev.linear_gate_up_silu(
        &x.slice(0..0),
        0,
        k,
        &w,
        inter,
        &mut empty_gate_up,
        &mut empty,
    )
    .unwrap();
    dev.synchronize().unwrap();
}

/// The layer's MLP front half as a decode step runs it at 5–64 rows, each kernel reading what
/// the one before wrote: h = x·W0ᵀ (`linear_overlapped`), act = `linear_gate_up_silu(h)`,
/// y = act·W_downᵀ (`linear_overlapped`), every kernel under programmatic dependent launch, so a
/// fused kernel that read h before its producer finished, or a down projection that read act
/// before the fused kernel finished, shows as a wrong result: h, the gate|up scratch, act and y
/// are NaN-poisoned every round. 20 rounds on the stream, then the chain captured once and
/// replayed 20 times, the second half of the replays with new x and W_gate|up.
#[test]
fn gate_up_silu_waits_for_the_previous_kernel_and_replays_in_a_graph() {
    let Some(dev) = device("gate_up_silu_waits_for_the_previous_kernel_and_replays_in_a_graph")
    else {
        return;
    };
    single_stream_mode(&dev);
    dev.prepare_linear().unwrap();
    let mut rng = Rng(44);
    for (n, k0, hidden, inter) in [
        (64usize, 512usize, 1024usize, 3072usize),
        (17, 512, 1024, 320),
    ] {
        gate_up_chain(&dev, &mut rng, n, k0, hidden, inter);
    }
}

fn gate_up_chain(
    dev: &CudaDevice,
    rng: &mut Rng,
    n: usize,
    k0: usize,
    hidden: usize,
    inter: usize,
) {
    type T = bf16;
    let s0 = 1.0 / (k0 as f32).sqrt();
    let sh = 1.0 / (hidden as f32).sqrt();
    let si = 1.0 / (inter as f32).sqrt();
    let w0: Vec<T> = rng.vec(hidden * k0, -2.0 * s0, 2.0 * s0);
    let w_down: Vec<T> = rng.vec(hidden * inter, -2.0 * si, 2.0 * si);
    let inputs: Vec<(Vec<T>, Vec<T>)> = (0..2)
        .map(|_| {
            (
                rng.vec(n * k0, -1.0, 1.0),
                rng.vec(2 * inter * hidden, -4.0 * sh, 4.0 * sh),
            )
        })
        .collect();
    let reference = |x: &[T], w_gu: &[T]| -> Vec<f32> {
        let h = rounded::<T>(&linear_reference(
            &to_f32(x),
            n,
            k0,
            &to_f32(&w0),
            hidden,
            None,
        ));
        let h: Vec<T> = h.iter().map(|v| T::from_f32(*v)).collect();
        let act = gate_up_silu_reference(&h, n, hidden, w_gu, inter);
        linear_reference(&act, n, inter, &to_f32(&w_down), hidden, None)
    };
    let wants: Vec<Vec<f32>> = inputs.iter().map(|(x, w)| reference(x, w)).collect();

    let mut x = dev.upload(&inputs[0].0).unwrap();
    let mut w_gu = dev.upload(&inputs[0].1).unwrap();
    let w0_dev = dev.upload(&w0).unwrap();
    let w_down_dev = dev.upload(&w_down).unwrap();
    let mut bufs = [
        poisoned::<T>(dev, n * hidden),
        poisoned::<T>(dev, n * 2 * inter),
        poisoned::<T>(dev, n * inter),
        poisoned::<T>(dev, n * hidden),
    ];
    let stream = dev.stream().clone();
    let poison = |bufs: &mut [CudaSlice<T>; 4]| {
        for buf in bufs.iter_mut() {
            stream.memcpy_htod(&vec![T::NAN; buf.len()], buf).unwrap();
        }
    };
    let chain = |x: &CudaSlice<T>, w_gu: &CudaSlice<T>, bufs: &mut [CudaSlice<T>; 4]| {
        let [h, gate_up, act, y] = bufs;
        dev.linear_overlapped(x, n, k0, &w0_dev, hidden, None, None, h)
            .unwrap();
        dev.linear_gate_up_silu(&*h, n, hidden, w_gu, inter, gate_up, act)
            .unwrap();
        dev.linear_overlapped(&*act, n, inter, &w_down_dev, hidden, None, None, y)
            .unwrap();
    };
    for round in 0..20 {
        poison(&mut bufs);
        chain(&x, &w_gu, &mut bufs);
        let what = format!("gate|up + SiLU·mul chain n={n} inter={inter}, stream round {round}");
        assert_rel_l2(&what, &dev.download(&bufs[3]).unwrap(), &wants[0]);
    }
    let graph = capture(dev, || chain(&x, &w_gu, &mut bufs));
    for round in 0..20 {
        let i = round / 10;
        stream.memcpy_htod(&inputs[i].0, &mut x).unwrap();
        stream.memcpy_htod(&inputs[i].1, &mut w_gu).unwrap();
        poison(&mut bufs);
        graph.launch().unwrap();
        let what = format!("gate|up + SiLU·mul chain n={n} inter={inter}, graph round {round}");
        assert_rel_l2(&what, &dev.download(&bufs[3]).unwrap(), &wants[i]);
    }
}

// ---- timing -------------------------------------------------------------------------------

/// Decode shapes of a Qwen3-0.6B-sized model: (name, k, m).
const QWEN3_SHAPES: [(&str, usize, usize); 5] = [
    ("qkv 1024->4096", 1024, 4096),
    ("o 2048->1024", 2048, 1024),
    ("gate|up 1024->6144", 1024, 6144),
    ("down 3072->1024", 3072, 1024),
    ("lm_head 1024->151936", 1024, 151_936),
];

/// Weights are timed across copies totalling well over the 50 MB L2 of an H100, as in a real
/// decode step where a layer's weights were evicted by the other layers since their last use.
const POOL_ELEMS: usize = 160 << 20;
const ROTATION_BYTES: usize = 128 << 20;

type Op<'a> = dyn Fn(&CudaDevice, &CudaView<bf16>, &CudaView<bf16>, &mut CudaSlice<bf16>) -> Result<(), CudaError>
    + 'a;

struct Bench {
    dev: CudaDevice,
    pool: CudaSlice<bf16>,
    x: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
}

impl Bench {
    fn new(dev: CudaDevice) -> Bench {
        single_stream_mode(&dev);
        dev.prepare_linear().unwrap();
        let mut rng = Rng(17);
        let pool: Vec<bf16> = rng.vec(POOL_ELEMS, -0.05, 0.05);
        let x: Vec<bf16> = rng.vec(256 * 3072, -1.0, 1.0);
        Bench {
            pool: dev.upload(&pool).unwrap(),
            x: dev.upload(&x).unwrap(),
            out: dev.alloc_zeros::<bf16>(256 * 151_936).unwrap(),
            dev,
        }
    }

    /// Median µs per call of `op(w, x, out)` over a rotation of weight copies, timed as CUDA
    /// graph replays of back-to-back calls, the way a captured decode step runs them.
    fn time(&mut self, n: usize, k: usize, m: usize, op: &Op) -> Result<f64, CudaError> {
        let size = m * k;
        let copies = (ROTATION_BYTES / (2 * size)).clamp(1, POOL_ELEMS / size);
        let calls = copies.max(8);
        let Bench { dev, pool, x, out } = self;
        let x = x.slice(0..n * k);
        let run = |dev: &CudaDevice, out: &mut CudaSlice<bf16>, i: usize| {
            let w = pool.slice((i % copies) * size..(i % copies + 1) * size);
            op(dev, &w, &x, out)
        };
        for i in 0..3 {
            run(dev, out, i)?;
        }
        dev.synchronize()?;
        let stream = dev.stream().clone();
        let driver = |op: &'static str| move |source| CudaError::Driver { op, source };
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver("begin capture"))?;
        let mut captured = Ok(());
        for i in 0..calls {
            captured = captured.and(run(dev, out, i));
        }
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(driver("end capture"))?;
        captured?;
        let graph = graph.ok_or(CudaError::InvalidArgument {
            op: "timing",
            argument: "the capture",
            expected: "non-empty",
            found: "no graph".into(),
        })?;
        graph.launch().map_err(driver("graph launch"))?;
        let replays = (400 / calls).max(2);
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut samples = Vec::new();
        for _ in 0..5 {
            let start = stream.record_event(flags).map_err(driver("event"))?;
            for _ in 0..replays {
                graph.launch().map_err(driver("graph launch"))?;
            }
            let end = stream.record_event(flags).map_err(driver("event"))?;
            let ms = start.elapsed_ms(&end).map_err(driver("event timing"))?;
            samples.push(ms as f64 * 1e3 / (replays * calls) as f64);
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[samples.len() / 2])
    }
}

fn skinny(n: usize, k: usize, m: usize, overlapped: bool) -> Box<Op<'static>> {
    Box::new(move |dev, w, x, out| {
        let out = &mut out.slice_mut(0..n * m);
        if overlapped {
            dev.linear_overlapped(x, n, k, w, m, None, None, out)
        } else {
            dev.linear_skinny(x, n, k, w, m, None, None, out)
        }
    })
}

fn overlapped(n: usize, k: usize, m: usize) -> Box<Op<'static>> {
    Box::new(move |dev, w, x, out| {
        dev.linear_overlapped(x, n, k, w, m, None, None, &mut out.slice_mut(0..n * m))
    })
}

fn wgmma(n: usize, k: usize, m: usize) -> Box<Op<'static>> {
    Box::new(move |dev, w, x, out| {
        dev.linear_wgmma(x, n, k, w, m, None, None, &mut out.slice_mut(0..n * m))
    })
}

fn cublaslt(n: usize, k: usize, m: usize) -> Box<Op<'static>> {
    Box::new(move |dev, w, x, out| {
        dev.linear_cublaslt(x, n, k, w, m, None, None, &mut out.slice_mut(0..n * m))
    })
}

fn tuned(
    n: usize,
    k: usize,
    m: usize,
    rg: usize,
    warps: usize,
    overlapped: bool,
) -> Box<Op<'static>> {
    Box::new(move |dev, w, x, out| {
        let out = &mut out.slice_mut(0..n * m);
        dev.linear_skinny_tuned(x, n, k, w, m, out, rg, warps, overlapped)
    })
}

fn rate(n: usize, k: usize, m: usize, us: f64) -> String {
    let bytes = 2.0 * (m * k + n * k + n * m) as f64;
    let flops = 2.0 * (n * m * k) as f64;
    let tflops = flops / us * 1e-6;
    if tflops > 50.0 {
        format!("{tflops:4.0} TFLOP/s")
    } else {
        format!("{:5.2} TB/s", bytes / us * 1e-6)
    }
}

/// Our kernels against cuBLASLt on the decode shapes, bf16, as CUDA-graph replays of back-to-back
/// calls over weights that do not fit in L2. Columns: the skinny kernel launched plainly; the
/// wgmma kernel launched plainly (17–64 rows, compute capability 9.0 only); `linear_overlapped`
/// (the dispatch, with our kernels under programmatic dependent launch), also as bandwidth net
/// of the harness's per-call floor; cuBLASLt. Then the gate|up projection with SiLU·mul at 32
/// and 64 rows on the Qwen3-0.6B shape: the two steps against the fused kernel. Prints the
/// tables; asserts only that every call succeeds.
#[test]
fn timing_report() {
    let Some(dev) = device("timing_report") else {
        return;
    };
    let name = dev.name().unwrap_or_default();
    let wgmma_here = wgmma_runs(&dev);
    let mut bench = Bench::new(dev);
    // The per-call floor of this harness: a kernel with next to nothing to do.
    let floor = bench.time(1, 64, 8, &*skinny(1, 64, 8, false)).unwrap();
    let floor_overlapped = bench.time(1, 64, 8, &*skinny(1, 64, 8, true)).unwrap();
    let mut table = format!(
        "\nlinear on {name}: bf16, µs per call in CUDA-graph replays of back-to-back calls, \
         weights rotated past L2\n{:<21} {:>3} {:>8} {:>10} {:>8} {:>10} {:>8} {:>10} {:>10} {:>8} {:>12} {:>7}\n",
        "shape", "n", "skinny", "", "wgmma", "", "linear_o", "", "net", "cuBLASLt", "", "lt/best"
    );
    for (label, k, m) in QWEN3_SHAPES {
        for n in [1usize, 4, 8, 16, 32, 64, 256] {
            let lt = bench.time(n, k, m, &*cublaslt(n, k, m)).unwrap();
            let mut row = format!("{label:<21} {n:>3}");
            let mut best = lt;
            if n <= 64 {
                let t = bench.time(n, k, m, &*skinny(n, k, m, false)).unwrap();
                best = best.min(t);
                row.push_str(&format!(" {t:8.2} {:>10}", rate(n, k, m, t)));
            } else {
                row.push_str(&format!(" {:>8} {:>10}", "-", ""));
            }
            let wgmma_rows = n > CudaDevice::LINEAR_SKINNY_MAX_TOKENS
                && n <= CudaDevice::LINEAR_WGMMA_MAX_TOKENS;
            if wgmma_here && wgmma_rows {
                let t = bench.time(n, k, m, &*wgmma(n, k, m)).unwrap();
                best = best.min(t);
                row.push_str(&format!(" {t:8.2} {:>10}", rate(n, k, m, t)));
            } else {
                row.push_str(&format!(" {:>8} {:>10}", "-", ""));
            }
            let t = bench.time(n, k, m, &*overlapped(n, k, m)).unwrap();
            best = best.min(t);
            let net = if n <= CudaDevice::LINEAR_SKINNY_MAX_TOKENS {
                rate(n, k, m, t - floor_overlapped)
            } else {
                String::new()
            };
            row.push_str(&format!(" {t:8.2} {:>10} {net:>10}", rate(n, k, m, t)));
            row.push_str(&format!(
                " {lt:8.2} {:>12} {:>6.2}x\n",
                rate(n, k, m, lt),
                lt / best
            ));
            table.push_str(&row);
        }
    }
    table.push_str(&format!(
        "harness floor (skinny kernel, n=1 k=64 m=8): {floor:.2} µs plain, {floor_overlapped:.2} µs overlapped; \
         net = bytes / (time - overlapped floor)\n"
    ));

    // The gate|up projection with SiLU·mul: the two steps it replaces (`linear_overlapped`, which
    // sends this wide output to cuBLASLt, then the silu_mul kernel) against the fused wgmma
    // kernel, under programmatic dependent launch (`linear_gate_up_silu`) and plainly.
    let (k, inter) = (1024usize, 3072usize);
    let scratch = RefCell::new(bench.dev.alloc_zeros::<bf16>(64 * 2 * inter).unwrap());
    table.push_str(&format!(
        "\ngate|up projection + SiLU·mul on {name}: bf16, µs per call as above\n{:<27} {:>3} {:>9} {:>10} {:>12} {:>7}\n",
        "shape", "n", "unfused", "fused PDL", "fused plain", "saved"
    ));
    for n in [8usize, 12, 16, 32, 64] {
        let label = format!("gate|up+silu {k}->2x{inter}");
        let time = |bench: &mut Bench, route| {
            let op = gate_up_silu_op(&scratch, route, n, k, inter);
            bench.time(n, k, 2 * inter, &*op).unwrap()
        };
        let unfused = time(&mut bench, GateUpRoute::Unfused);
        let mut row = format!("{label:<27} {n:>3} {unfused:9.2}");
        if wgmma_here {
            let fused = time(&mut bench, GateUpRoute::Auto);
            let plain = time(&mut bench, GateUpRoute::Fused);
            row.push_str(&format!(
                " {fused:10.2} {plain:12.2} {:7.2}\n",
                unfused - fused
            ));
        } else {
            row.push_str(&format!(" {:>10} {:>12} {:>7}\n", "-", "-", "-"));
        }
        table.push_str(&row);
    }
    report(&table);
}

/// `linear_gate_up_silu` through `route` for the bench: W of `2 * inter` rows, the gate|up
/// scratch from `scratch`, `out` as `[n, inter]`.
fn gate_up_silu_op(
    scratch: &RefCell<CudaSlice<bf16>>,
    route: GateUpRoute,
    n: usize,
    k: usize,
    inter: usize,
) -> Box<Op<'_>> {
    Box::new(move |dev, w, x, out| {
        let mut scratch = scratch.borrow_mut();
        let gate_up = &mut scratch.slice_mut(..n * 2 * inter);
        let out = &mut out.slice_mut(..n * inter);
        call_gate_up(dev, route, x, n, k, w, inter, gate_up, out)
    })
}

/// Buffers the fused-projection timings need besides the bench's x, W and out.
struct FusedScratch {
    norm_weight: CudaSlice<bf16>,
    delta: CudaSlice<bf16>,
    residual_out: CudaSlice<bf16>,
    normed: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
}

/// The two ways a decode step computes `rms_norm(residual + delta) · Wᵀ` and
/// `silu_mul(gate_up) · Wᵀ`: one fused kernel, or the separate op followed by
/// `linear_overlapped` (what the model ran before).
#[derive(Clone, Copy, PartialEq)]
enum Prologue {
    Norm,
    Silu,
}

fn fused_op<'a>(
    scratch: &'a RefCell<FusedScratch>,
    prologue: Prologue,
    fused: bool,
    n: usize,
    k: usize,
    m: usize,
) -> Box<Op<'a>> {
    Box::new(move |dev, w, x, out| {
        let s = &mut *scratch.borrow_mut();
        let out = &mut out.slice_mut(0..n * m);
        let nk = n * k;
        match (prologue, fused) {
            (Prologue::Norm, true) => dev.add_rms_norm_linear(
                x,
                Some(&s.delta.slice(..nk)),
                &s.norm_weight.slice(..k),
                EPS,
                n,
                k,
                w,
                m,
                None,
                Some(&mut s.residual_out.slice_mut(..nk)),
                out,
            ),
            (Prologue::Norm, false) => {
                // The in-place residual of the unfused path grows by delta on every call;
                // harmless for timing.
                dev.fused_add_rms_norm(
                    &s.delta.slice(..nk),
                    &mut s.residual_out.slice_mut(..nk),
                    &s.norm_weight.slice(..k),
                    &mut s.normed.slice_mut(..nk),
                    n,
                    k,
                    EPS,
                )?;
                dev.linear_overlapped(&s.normed.slice(..nk), n, k, w, m, None, None, out)
            }
            (Prologue::Silu, true) => {
                dev.silu_mul_linear(&s.gate_up.slice(..2 * nk), n, k, w, m, None, out)
            }
            (Prologue::Silu, false) => {
                dev.silu_mul(&s.gate_up.slice(..2 * nk), &mut s.act.slice_mut(..nk), n, k)?;
                dev.linear_overlapped(&s.act.slice(..nk), n, k, w, m, None, None, out)
            }
        }
    })
}

/// The fused projections against their unfused pairs (separate norm or SiLU·mul kernel, then
/// `linear_overlapped`) on the decode shapes, bf16, timed like `timing_report`. Prints a table;
/// asserts only that every call succeeds.
#[test]
fn fused_timing_report() {
    let Some(dev) = device("fused_timing_report") else {
        return;
    };
    let name = dev.name().unwrap_or_default();
    single_stream_mode(&dev);
    let mut rng = Rng(27);
    let max = 16 * 3072;
    let up = |v: Vec<bf16>| dev.upload(&v).unwrap();
    let scratch = RefCell::new(FusedScratch {
        norm_weight: up(rng.vec(3072, 0.5, 1.5)),
        delta: up(rng.vec(max, -1.0, 1.0)),
        residual_out: up(rng.vec(max, -1.0, 1.0)),
        normed: up(rng.vec(max, -1.0, 1.0)),
        gate_up: up(rng.vec(2 * max, -3.0, 3.0)),
        act: up(rng.vec(max, -1.0, 1.0)),
    });
    let mut bench = Bench::new(dev);
    let shapes = [
        ("norm + qkv 1024->4096", Prologue::Norm, 1024, 4096),
        ("norm + gate|up 1024->6144", Prologue::Norm, 1024, 6144),
        ("silu + down 3072->1024", Prologue::Silu, 3072, 1024),
    ];
    let mut table = format!(
        "\nfused projections on {name}: bf16, µs per call in CUDA-graph replays, weights rotated \
         past L2\n{:<26} {:>3} {:>9} {:>8} {:>8}\n",
        "shape", "n", "unfused", "fused", "saved"
    );
    for (label, prologue, k, m) in shapes {
        for n in [1usize, 2, 4, 8, 16] {
            let unfused = bench
                .time(n, k, m, &*fused_op(&scratch, prologue, false, n, k, m))
                .unwrap();
            let fused = bench
                .time(n, k, m, &*fused_op(&scratch, prologue, true, n, k, m))
                .unwrap();
            table.push_str(&format!(
                "{label:<26} {n:>3} {unfused:9.2} {fused:8.2} {:8.2}\n",
                unfused - fused
            ));
        }
    }
    report(&table);
}

/// Launch-shape sweep of the skinny kernel (row groups × warps), for re-tuning `linear`'s
/// choice on a new GPU: `cargo test --release --test cuda_linear -- --ignored skinny_tuning`.
#[test]
#[ignore = "tuning aid; prints a table for choosing launch shapes"]
fn skinny_tuning_sweep() {
    let Some(dev) = device("skinny_tuning_sweep") else {
        return;
    };
    let mut bench = Bench::new(dev);
    let shapes: Vec<(usize, usize)> = [1usize, 2]
        .iter()
        .flat_map(|&rg| [2usize, 4, 8, 12, 16].map(|wp| (rg, wp)))
        .collect();
    let mut table =
        String::from("\nskinny launch-shape sweep (bf16, µs per call; o = overlapped)\n");
    table.push_str(&format!("{:<21} {:>4}", "shape", "n"));
    for (rg, wp) in &shapes {
        table.push_str(&format!(" {:>6}", format!("r{rg}w{wp}")));
    }
    table.push_str(&format!(" {:>6}\n", "auto"));
    for (label, k, m) in QWEN3_SHAPES {
        for (n, overlapped) in [(1usize, false), (1, true), (16, false), (16, true)] {
            table.push_str(&format!(
                "{label:<21} {:>4}",
                format!("{n}{}", if overlapped { "o" } else { "" })
            ));
            for &(rg, wp) in &shapes {
                match bench.time(n, k, m, &*tuned(n, k, m, rg, wp, overlapped)) {
                    Ok(t) => table.push_str(&format!(" {t:6.2}")),
                    Err(CudaError::InvalidArgument { .. }) => {
                        table.push_str(&format!(" {:>6}", "-"))
                    }
                    Err(e) => panic!("{label} n={n}: {e}"),
                }
            }
            let t = bench.time(n, k, m, &*skinny(n, k, m, overlapped)).unwrap();
            table.push_str(&format!(" {t:6.2}\n"));
        }
    }
    report(&table);
}
