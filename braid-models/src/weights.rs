//! Weight files: safetensors (single or sharded, memory-mapped) and GGUF, both presented under the
//! Hugging Face tensor names and converted to f32 with their shapes checked.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use braid_kernels::Tensor;
use braid_quant::GgufFile;
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::arch::Architecture;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// A set of named weights that can be read as f32 tensors.
pub enum Weights {
    Safetensors(SafetensorsWeights),
    Gguf(GgufWeights),
}

impl Weights {
    /// Read `name` (a Hugging Face tensor name), checking that its shape is `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match self {
            Weights::Safetensors(w) => w.get(name)?,
            Weights::Gguf(w) => w.get(name)?,
        };
        if t.shape() != shape {
            return Err(ModelError::Weights(format!(
                "tensor {name} has shape {:?} but the config implies {shape:?}",
                t.shape()
            )));
        }
        Ok(t)
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Safetensors(w) => w.index.contains_key(name),
            Weights::Gguf(w) => w.file.tensor(&w.gguf_name(name)).is_some(),
        }
    }

    /// Storage types and how many tensors use each, e.g. {"bf16": 290}.
    pub fn type_summary(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        match self {
            Weights::Safetensors(w) => {
                for f in &w.files {
                    for info in f.metadata.tensors().values() {
                        *out.entry(format!("{:?}", info.dtype).to_lowercase())
                            .or_default() += 1;
                    }
                }
            }
            Weights::Gguf(w) => {
                for t in w.file.tensors() {
                    *out.entry(t.ggml_type.name().to_owned()).or_default() += 1;
                }
            }
        }
        out
    }
}

/// One memory-mapped `.safetensors` file with its header parsed once.
struct SafetensorsFile {
    map: Mmap,
    /// Where the data section starts in `map`.
    data_start: usize,
    metadata: Metadata,
}

/// One or more memory-mapped `.safetensors` files.
pub struct SafetensorsWeights {
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Open `model.safetensors`, or the shards listed in `model.safetensors.index.json`, in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                ModelError::Weights(format!("{} is not valid JSON: {e}", index_path.display()))
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    ModelError::Weights(format!(
                        "{} has no weight_map object",
                        index_path.display()
                    ))
                })?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| ModelError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            found
        };
        if files.is_empty() {
            return Err(ModelError::Weights(format!(
                "{} holds no .safetensors weight files",
                dir.display()
            )));
        }
        Self::open_files(&files)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the file is opened read-only and the mapping is never written; a file
            // changed underneath a running process is outside what any loader can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            // Checks every tensor's offsets against the file length, so slicing below cannot fail.
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
                ModelError::Weights(format!(
                    "{} is not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            for name in metadata.tensors().into_keys() {
                index.insert(name, i);
            }
            files.push(SafetensorsFile {
                data_start: 8 + header_len,
                metadata,
                map,
            });
        }
        Ok(SafetensorsWeights { files, index })
    }

    fn info(&self, name: &str) -> Result<(&SafetensorsFile, &TensorInfo)> {
        let &file = self.index.get(name).ok_or_else(|| missing(name))?;
        let f = &self.files[file];
        let info = f.metadata.info(name).ok_or_else(|| missing(name))?;
        Ok((f, info))
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        let (f, info) = self.info(name)?;
        let (start, end) = info.data_offsets;
        let bytes = &f.map[f.data_start + start..f.data_start + end];
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .par_chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .par_chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .par_chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::Weights(format!(
                    "tensor {name} has dtype {other:?}; supported: F32, F16, BF16"
                )))
            }
        };
        Tensor::new(info.shape.clone(), data)
            .map_err(|e| ModelError::Weights(format!("tensor {name}: {e}")))
    }
}

/// A GGUF file, addressed by Hugging Face names.
pub struct GgufWeights {
    file: GgufFile,
    arch: Architecture,
    num_heads: usize,
    num_kv_heads: usize,
}

impl GgufWeights {
    pub fn new(file: GgufFile, config: &ModelConfig) -> Self {
        GgufWeights {
            file,
            arch: config.architecture,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
        }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The GGUF name llama.cpp's converter gives a Hugging Face tensor name.
    fn gguf_name(&self, hf: &str) -> String {
        match hf {
            "model.embed_tokens.weight" => return "token_embd.weight".into(),
            "model.norm.weight" => return "output_norm.weight".into(),
            "lm_head.weight" => return "output.weight".into(),
            _ => {}
        }
        let Some(rest) = hf.strip_prefix("model.layers.") else {
            return hf.to_owned();
        };
        let Some((layer, tail)) = rest.split_once('.') else {
            return hf.to_owned();
        };
        let mapped = match tail {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "self_attn.q_proj.bias" => "attn_q.bias",
            "self_attn.k_proj.bias" => "attn_k.bias",
            "self_attn.v_proj.bias" => "attn_v.bias",
            "self_attn.q_norm.weight" => "attn_q_norm.weight",
            "self_attn.k_norm.weight" => "attn_k_norm.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            other => other,
        };
        format!("blk.{layer}.{mapped}")
    }

    fn get(&self, hf: &str) -> Result<Tensor> {
        let name = self.gguf_name(hf);
        let info = self.file.tensor(&name).ok_or_else(|| missing(&name))?;
        let shape = info.shape();
        let mut data = self.file.dequantize(&name)?;
        if self.arch.spec().gguf_permuted_qk {
            let heads = if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") {
                Some(self.num_heads)
            } else if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") {
                Some(self.num_kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                let rows = shape[0];
                let cols = if shape.len() > 1 { shape[1] } else { 1 };
                data = unpermute_rows(&data, rows, cols, heads)
                    .map_err(|msg| ModelError::Weights(format!("tensor {name}: {msg}")))?;
            }
        }
        Tensor::new(shape, data).map_err(|e| ModelError::Weights(format!("tensor {name}: {e}")))
    }
}

/// Undo llama.cpp's Q/K permutation: GGUF keeps each head's rotary pairs interleaved
/// (`reshape(heads, 2, half, cols).swapaxes(1, 2)`); Hugging Face keeps the halves apart.
fn unpermute_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    heads: usize,
) -> std::result::Result<Vec<f32>, String> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!(
            "{rows} rows cannot be split into {heads} heads of rotary pairs"
        ));
    }
    let half = rows / heads / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) holds HF row (h, j, i).
                let src = ((h * half + i) * 2 + j) * cols;
                let dst = ((h * 2 + j) * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(out)
}

fn missing(name: &str) -> ModelError {
    ModelError::Weights(format!("the weights have no tensor named {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's forward permutation, as its converter writes it.
    fn permute(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let half = rows / heads / 2;
        let mut out = vec![0.0; data.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = ((h * 2 + j) * half + i) * cols;
                    let dst = ((h * half + i) * 2 + j) * cols;
                    out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converter() {
        let (rows, cols, heads) = (24, 3, 3);
        let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        assert_eq!(
            unpermute_rows(&permute(&data, rows, cols, heads), rows, cols, heads).unwrap(),
            data
        );
        assert!(unpermute_rows(&data, 10, 1, 3).is_err());
    }
}
