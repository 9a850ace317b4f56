//! The identity of a model as the KV cache sees it: saved KV is only valid for the same weights,
//! architecture and KV dtype, so cache files carry this fingerprint and are refused otherwise.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use braid_models::ModelInfo;
use sha2::{Digest, Sha256};

/// Bytes hashed at each end of every weight file: enough to tell checkpoints apart (headers,
/// first and last tensors) without reading gigabytes at every save and load.
const SAMPLE: u64 = 1 << 20;

/// SHA-256 over the model's format, configuration, KV dtype, and each weight file's name, size
/// and first and last MiB.
pub(crate) fn model_fingerprint(info: &ModelInfo, kv_dtype: &str) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(b"braid model fingerprint v1\0");
    h.update(info.format.as_bytes());
    h.update(format!("{:?}", info.config).as_bytes());
    h.update(kv_dtype.as_bytes());
    for path in weight_files(&info.path)? {
        let mut f = File::open(&path)?;
        let len = f.metadata()?.len();
        h.update(path.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
        h.update(len.to_le_bytes());
        let mut buf = Vec::new();
        f.by_ref().take(SAMPLE).read_to_end(&mut buf)?;
        if len > SAMPLE {
            f.seek(SeekFrom::Start(len.saturating_sub(SAMPLE).max(SAMPLE)))?;
            f.read_to_end(&mut buf)?;
        }
        h.update(&buf);
    }
    Ok(h.finalize().into())
}

/// The files holding the weights: the file itself, or a folder's `.safetensors` / `.gguf` files
/// in name order.
fn weight_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "safetensors" || e == "gguf")
        })
        .collect();
    files.sort();
    Ok(files)
}
