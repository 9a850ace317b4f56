//! The safetensors loading path never panics on damaged files: random bytes, truncations and byte
//! flips of a real fixture all end in `Ok` or one error sentence.

use std::path::PathBuf;

use braid_models::weights::{SafetensorsWeights, Weights};
use proptest::prelude::*;

fn fixture() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models/qwen2/model.safetensors");
    std::fs::read(path).expect("fixture weights")
}

/// Open `bytes` as a weight file and read every tensor it lists.
fn load_all(bytes: &[u8]) -> Result<usize, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let weights =
        Weights::Safetensors(SafetensorsWeights::open_files(&[path]).map_err(|e| e.to_string())?);
    let mut read = 0;
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.norm.weight",
    ] {
        if weights.contains(name) {
            // The shape check may refuse it; what matters is that nothing panics.
            let _ = weights.get(name, &[0]);
            read += 1;
        }
    }
    Ok(read)
}

#[test]
fn the_intact_fixture_loads() {
    assert_eq!(load_all(&fixture()), Ok(3));
}

#[test]
fn every_truncation_is_refused_cleanly() {
    let bytes = fixture();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 8;
    // Every cut inside the header and a spread of cuts inside the data.
    for cut in (0..header.min(bytes.len())).chain((header..bytes.len()).step_by(997)) {
        let err = load_all(&bytes[..cut]).expect_err("a truncated file must be refused");
        assert!(err.contains("safetensors"), "cut at {cut}: {err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = load_all(&bytes);
    }

    #[test]
    fn flipped_bytes_never_panic(flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let mut bytes = fixture();
        for (at, v) in flips {
            let i = at % bytes.len().min(4096);
            bytes[i] ^= v | 1;
        }
        let _ = load_all(&bytes);
    }
}
