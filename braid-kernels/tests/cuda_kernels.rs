//! Each CUDA kernel against a straightforward f64 computation on the host, over random inputs of
//! odd sizes, with output buffers poisoned beforehand. Without a device the GPU tests say
//! "skipped: no CUDA device" and pass.

use braid_kernels::cuda::{self, CudaDevice, CudaError};
use half::{bf16, f16};

mod common;
use common::{device, poisoned, Rng, TestFloat};

/// Odd widths exercise the scalar tails and unaligned rows; multiples of 8 the 16-byte path.
const WIDTHS: [usize; 7] = [1, 7, 8, 577, 1024, 4096, 4099];
const EPS: f32 = 1e-6;

fn assert_close<T: TestFloat>(what: &str, got: &[T], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f64();
        assert!(
            (g - w).abs() <= T::ATOL + T::RTOL * w.abs(),
            "{what}: element {i} is {g}, expected {w}"
        );
    }
}

fn rms_norm_reference<T: TestFloat>(x: &[T], weight: &[T], cols: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let mean_sq = row.iter().map(|v| v.to_f64().powi(2)).sum::<f64>() / cols as f64;
        let inv_rms = 1.0 / (mean_sq + EPS as f64).sqrt();
        out.extend(
            row.iter()
                .zip(weight)
                .map(|(v, w)| v.to_f64() * inv_rms * w.to_f64()),
        );
    }
    out
}

fn rows_for(cols: usize) -> usize {
    match cols {
        1 => 3,
        4099 => 1,
        _ => 5,
    }
}

fn check_rms_norm<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    for cols in WIDTHS {
        let rows = rows_for(cols);
        let what = format!("rms_norm_{} [{rows}, {cols}]", T::SUFFIX);
        let x: Vec<T> = rng.vec_f64(rows * cols, -2.0, 2.0);
        let w: Vec<T> = rng.vec_f64(cols, 0.5, 1.5);
        let x_dev = dev.upload(&x).unwrap();
        let w_dev = dev.upload(&w).unwrap();
        let mut out = poisoned::<T>(dev, rows * cols);
        dev.rms_norm(&x_dev, &w_dev, &mut out, rows, cols, EPS)
            .unwrap();
        assert_close(
            &what,
            &dev.download(&out).unwrap(),
            &rms_norm_reference(&x, &w, cols),
        );
    }
}

/// Views one element into their buffers are never 16-byte aligned: the kernels must take their
/// scalar path and still be right.
fn check_rms_norm_unaligned<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    let (rows, cols) = (4, 1024);
    let what = format!("rms_norm_{} on unaligned views", T::SUFFIX);
    let x: Vec<T> = rng.vec_f64(rows * cols + 1, -2.0, 2.0);
    let w: Vec<T> = rng.vec_f64(cols, 0.5, 1.5);
    let x_dev = dev.upload(&x).unwrap();
    let w_dev = dev.upload(&w).unwrap();
    let mut out = poisoned::<T>(dev, rows * cols + 1);
    {
        let x_view = x_dev.slice(1..);
        let mut out_view = out.slice_mut(1..);
        dev.rms_norm(&x_view, &w_dev, &mut out_view, rows, cols, EPS)
            .unwrap();
    }
    let got = dev.download(&out).unwrap();
    assert!(got[0].to_f64().is_nan(), "{what}: wrote before the view");
    assert_close(&what, &got[1..], &rms_norm_reference(&x[1..], &w, cols));
}

fn check_fused_add_rms_norm<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    for cols in WIDTHS {
        let rows = rows_for(cols);
        let what = format!("fused_add_rms_norm_{} [{rows}, {cols}]", T::SUFFIX);
        let x: Vec<T> = rng.vec_f64(rows * cols, -2.0, 2.0);
        let residual: Vec<T> = rng.vec_f64(rows * cols, -2.0, 2.0);
        let w: Vec<T> = rng.vec_f64(cols, 0.5, 1.5);
        let x_dev = dev.upload(&x).unwrap();
        let mut res_dev = dev.upload(&residual).unwrap();
        let w_dev = dev.upload(&w).unwrap();
        let mut out = poisoned::<T>(dev, rows * cols);
        dev.fused_add_rms_norm(&x_dev, &mut res_dev, &w_dev, &mut out, rows, cols, EPS)
            .unwrap();

        let summed: Vec<T> = x
            .iter()
            .zip(&residual)
            .map(|(a, b)| T::from_f32(a.to_f32() + b.to_f32()))
            .collect();
        let got_res = dev.download(&res_dev).unwrap();
        for (i, (g, want)) in got_res.iter().zip(&summed).enumerate() {
            assert_eq!(
                g.to_f64().to_bits(),
                want.to_f64().to_bits(),
                "{what}: residual element {i} is {g:?}, expected {want:?}"
            );
        }
        let got = dev.download(&out).unwrap();
        assert_close(&what, &got, &rms_norm_reference(&summed, &w, cols));
    }
}

fn silu_mul_reference<T: TestFloat>(gate_up: &[T], inter: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks(2 * inter) {
        let (gate, up) = row.split_at(inter);
        out.extend(gate.iter().zip(up).map(|(g, u)| {
            let g = g.to_f64();
            g / (1.0 + (-g).exp()) * u.to_f64()
        }));
    }
    out
}

fn check_silu_mul<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    // The last shape has more rows than the grid's y limit, so the kernel's row loop runs.
    let shapes = WIDTHS
        .iter()
        .map(|&inter| (rows_for(inter) + 2, inter))
        .chain([(70_001, 3)]);
    for (rows, inter) in shapes {
        let what = format!("silu_mul_{} [{rows}, {inter}]", T::SUFFIX);
        let mut gate_up = Vec::with_capacity(rows * 2 * inter);
        for _ in 0..rows {
            gate_up.extend(rng.vec_f64::<T>(inter, -8.0, 8.0));
            gate_up.extend(rng.vec_f64::<T>(inter, -2.0, 2.0));
        }
        let in_dev = dev.upload(&gate_up).unwrap();
        let mut out = poisoned::<T>(dev, rows * inter);
        dev.silu_mul(&in_dev, &mut out, rows, inter).unwrap();
        assert_close(
            &what,
            &dev.download(&out).unwrap(),
            &silu_mul_reference(&gate_up, inter),
        );
    }
}

fn check_embedding<T: TestFloat>(dev: &CudaDevice, rng: &mut Rng) {
    let vocab = 37usize;
    let shapes = WIDTHS.iter().map(|&dim| (9usize, dim)).chain([(70_001, 2)]);
    for (rows, dim) in shapes {
        let what = format!("embedding_{} [{rows} ids, dim {dim}]", T::SUFFIX);
        let table: Vec<T> = rng.vec_f64(vocab * dim, -1.0, 1.0);
        let mut ids: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
        // Out-of-range ids must give zero rows, not reads past the table.
        ids[rows / 2] = vocab as u32;
        ids[rows - 1] = u32::MAX;
        let table_dev = dev.upload(&table).unwrap();
        let ids_dev = dev.upload(&ids).unwrap();
        let mut out = poisoned::<T>(dev, rows * dim);
        dev.embedding(&table_dev, &ids_dev, &mut out, dim).unwrap();
        let got = dev.download(&out).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let row = &got[r * dim..(r + 1) * dim];
            for (j, g) in row.iter().enumerate() {
                let want = match table.get(id as usize * dim + j) {
                    Some(v) if (id as usize) < vocab => v.to_f64(),
                    _ => 0.0,
                };
                assert_eq!(
                    g.to_f64().to_bits(),
                    want.to_bits(),
                    "{what}: row {r} (id {id}) element {j} is {g:?}, expected {want}"
                );
            }
        }
    }
}

#[test]
fn rms_norm_matches_reference() {
    let Some(dev) = device("rms_norm_matches_reference") else {
        return;
    };
    let mut rng = Rng(1);
    check_rms_norm::<f32>(&dev, &mut rng);
    check_rms_norm::<f16>(&dev, &mut rng);
    check_rms_norm::<bf16>(&dev, &mut rng);
    check_rms_norm_unaligned::<f32>(&dev, &mut rng);
    check_rms_norm_unaligned::<f16>(&dev, &mut rng);
    check_rms_norm_unaligned::<bf16>(&dev, &mut rng);
}

#[test]
fn fused_add_rms_norm_matches_reference() {
    let Some(dev) = device("fused_add_rms_norm_matches_reference") else {
        return;
    };
    let mut rng = Rng(2);
    check_fused_add_rms_norm::<f32>(&dev, &mut rng);
    check_fused_add_rms_norm::<f16>(&dev, &mut rng);
    check_fused_add_rms_norm::<bf16>(&dev, &mut rng);
}

#[test]
fn silu_mul_matches_reference() {
    let Some(dev) = device("silu_mul_matches_reference") else {
        return;
    };
    let mut rng = Rng(3);
    check_silu_mul::<f32>(&dev, &mut rng);
    check_silu_mul::<f16>(&dev, &mut rng);
    check_silu_mul::<bf16>(&dev, &mut rng);
}

#[test]
fn embedding_gathers_rows_exactly() {
    let Some(dev) = device("embedding_gathers_rows_exactly") else {
        return;
    };
    let mut rng = Rng(4);
    check_embedding::<f32>(&dev, &mut rng);
    check_embedding::<f16>(&dev, &mut rng);
    check_embedding::<bf16>(&dev, &mut rng);
}

#[test]
fn ops_reject_mismatched_buffers_and_bad_arguments() {
    let Some(dev) = device("ops_reject_mismatched_buffers_and_bad_arguments") else {
        return;
    };
    let x = dev.upload(&[1.0f32; 12]).unwrap();
    let w = dev.upload(&[1.0f32; 4]).unwrap();
    let mut short_out = dev.alloc_zeros::<f32>(11).unwrap();
    let err = dev.rms_norm(&x, &w, &mut short_out, 3, 4, EPS).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rms_norm: `out` holds 11 elements, expected 12"
    );

    let mut out = dev.alloc_zeros::<f32>(12).unwrap();
    let err = dev.rms_norm(&x, &w, &mut out, 3, 4, f32::NAN).unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                argument: "eps",
                ..
            }
        ),
        "{err}"
    );

    let err = dev.silu_mul(&x, &mut out, 3, 4).unwrap_err();
    assert_eq!(
        err.to_string(),
        "silu_mul: `gate_up` holds 12 elements, expected 24"
    );

    let ids = dev.upload(&[0u32, 1, 2]).unwrap();
    let err = dev.embedding(&x, &ids, &mut out, 5).unwrap_err();
    assert!(matches!(err, CudaError::InvalidArgument { .. }), "{err}");

    // Nothing to do is not an error, and must not launch an empty grid.
    dev.rms_norm(&x.slice(0..0), &w, &mut out.slice_mut(0..0), 0, 4, EPS)
        .unwrap();
    dev.silu_mul(&x.slice(0..0), &mut out.slice_mut(0..0), 0, 4)
        .unwrap();
    dev.synchronize().unwrap();
}

#[test]
fn opening_a_missing_device_is_a_clear_error() {
    let err = CudaDevice::new(usize::MAX).expect_err("no machine has that many GPUs");
    match &err {
        CudaError::NoDriver => {
            assert_eq!(
                err.to_string(),
                "no CUDA driver found: the libcuda shared library could not be loaded"
            );
        }
        CudaError::NoDevice { ordinal, .. } => {
            assert_eq!(*ordinal, usize::MAX);
            assert!(err
                .to_string()
                .starts_with(&format!("no CUDA device {}", usize::MAX)));
        }
        other => panic!("expected a missing driver or device, got: {other}"),
    }
}

#[test]
fn kernels_are_embedded_when_nvcc_was_required() {
    let required = matches!(
        std::env::var("BRAID_REQUIRE_NVCC").as_deref(),
        Ok("1" | "true" | "yes" | "on")
    );
    if required {
        assert!(
            cuda::kernels_built(),
            "BRAID_REQUIRE_NVCC is set but no kernels were built"
        );
    }
    if !cuda::kernels_built() {
        assert_eq!(cuda::module_names().count(), 0);
        return;
    }
    for name in ["norm", "activation", "embedding"] {
        let image = cuda::module_ptx_or_fatbin(name)
            .unwrap_or_else(|| panic!("module {name} is missing from the build"));
        // Fatbin magic 0xBA55ED50, little-endian.
        assert_eq!(
            image.get(..4),
            Some(&[0x50, 0xED, 0x55, 0xBA][..]),
            "module {name}"
        );
        assert_eq!(
            image.as_ptr() as usize % 16,
            0,
            "module {name} is not 16-byte aligned"
        );
    }
    assert!(cuda::module_ptx_or_fatbin("no_such_module").is_none());
}

/// Copy-on-write of a KV block: one launch copies block `src` over block `dst` in every cache,
/// touching nothing else, in both directions; bad block numbers and sizes are refused.
#[test]
fn copy_cache_block_copies_one_block_in_every_cache() {
    let Some(dev) = device("copy_cache_block_copies_one_block_in_every_cache") else {
        return;
    };
    let mut rng = Rng(31);
    let (blocks, block_elems) = (5usize, 16 * 3 * 40);
    let before: Vec<Vec<bf16>> = (0..7)
        .map(|_| rng.vec(blocks * block_elems, -1.0, 1.0))
        .collect();
    let mut caches: Vec<_> = before.iter().map(|c| dev.upload(c).unwrap()).collect();
    for (src, dst) in [(3usize, 1usize), (0, 4)] {
        let mut refs: Vec<_> = caches.iter_mut().collect();
        dev.copy_cache_block(&mut refs, block_elems, src, dst)
            .unwrap();
        for (i, (cache, old)) in caches.iter().zip(&before).enumerate() {
            let got = dev.download(cache).unwrap();
            for b in 0..blocks {
                let want_from = if b == dst { src } else { b };
                // Blocks copied over in an earlier round keep that copy.
                let want_from = if (src, dst) == (0, 4) && b == 1 {
                    3
                } else {
                    want_from
                };
                let want = &old[want_from * block_elems..(want_from + 1) * block_elems];
                let got = &got[b * block_elems..(b + 1) * block_elems];
                assert!(
                    got.iter()
                        .zip(want)
                        .all(|(g, w)| g.to_bits() == w.to_bits()),
                    "cache {i}, block {b} after copying {src} -> {dst}"
                );
            }
        }
    }
    let mut refs: Vec<_> = caches.iter_mut().collect();
    for (block_elems, src, dst) in [(block_elems, 2, 2), (block_elems, 1, blocks), (7, 0, 1)] {
        let err = dev
            .copy_cache_block(&mut refs, block_elems, src, dst)
            .unwrap_err();
        assert!(
            matches!(err, CudaError::InvalidArgument { .. }),
            "{block_elems} elements, {src} -> {dst}: {err}"
        );
    }
}
