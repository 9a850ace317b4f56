//! `ModelConfig`: one description of a model's shape, read from Hugging Face `config.json` or from
//! GGUF metadata, checked before any weight is touched.

use std::path::Path;

use braid_quant::GgufFile;
use serde_json::Value;

use crate::arch::Architecture;
use crate::error::{ModelError, Result};

/// How RoPE frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// LLaMA 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// Sliding-window size of each layer (`None` = full attention).
    pub layer_windows: Vec<Option<usize>>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            ModelError::Config(format!("{} is not valid JSON: {e}", path.display()))
        })?;
        Self::from_hf_json(&v).map_err(|e| match e {
            ModelError::Config(msg) => ModelError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    pub fn from_hf_json(v: &Value) -> Result<Self> {
        // Multimodal wrappers keep the language model's fields under text_config.
        let v = v.get("text_config").filter(|t| t.is_object()).unwrap_or(v);
        let classes: Vec<String> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let architecture =
            Architecture::from_hf(&classes, v.get("model_type").and_then(Value::as_str))?;
        let hidden_size = req_usize(v, "hidden_size")?;
        let num_heads = req_usize(v, "num_attention_heads")?;
        let num_layers = req_usize(v, "num_hidden_layers")?;
        let head_dim = opt_usize(v, "head_dim")?.unwrap_or(hidden_size / num_heads.max(1));
        let rope_theta = opt_f64(v, "rope_theta")?
            .or(v
                .get("rope_parameters")
                .map(|p| opt_f64(p, "rope_theta"))
                .transpose()?
                .flatten())
            .unwrap_or(10000.0) as f32;
        let scaling_json = v
            .get("rope_scaling")
            .filter(|s| !s.is_null())
            .or(v.get("rope_parameters"));
        let rope_scaling = match scaling_json {
            Some(s) => parse_rope_scaling(s)?,
            None => RopeScaling::None,
        };
        let window = opt_usize(v, "sliding_window")?;
        // Qwen2/3 configs carry a window size but only use it when use_sliding_window is set.
        let window_enabled = v
            .get("use_sliding_window")
            .and_then(Value::as_bool)
            .unwrap_or(architecture == Architecture::Mistral);
        let layer_windows = match v.get("layer_types").and_then(Value::as_array) {
            Some(types) => {
                if types.len() != num_layers {
                    return Err(ModelError::Config(format!(
                        "layer_types lists {} layers but num_hidden_layers is {num_layers}",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(window),
                        Some("full_attention") => Ok(None),
                        other => Err(ModelError::Config(format!(
                            "unsupported layer type {other:?} in layer_types"
                        ))),
                    })
                    .collect::<Result<_>>()?
            }
            None => vec![if window_enabled { window } else { None }; num_layers],
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: req_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads: opt_usize(v, "num_key_value_heads")?.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(v, "max_position_embeddings")?.unwrap_or(2048),
            layer_windows,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: opt_usize(v, "bos_token_id")?.map(|x| x as u32),
            eos_token_ids: ids(v.get("eos_token_id")),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read the config from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch_name = file.get_str("general.architecture").ok_or_else(|| {
            ModelError::Config("GGUF file has no general.architecture key".into())
        })?;
        let architecture = Architecture::from_gguf(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> {
            file.get_u64(&key(k))
                .map(|x| x as usize)
                .ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks {}", key(k))))
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let num_layers = req("block_count")?;
        let head_dim = file
            .get_u64(&key("attention.key_length"))
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match file.get_u64(&key("vocab_size")) {
            Some(n) => n as usize,
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|t| t.len())
                .ok_or_else(|| {
                    ModelError::Config(
                        "GGUF metadata gives neither a vocab size nor a token list".into(),
                    )
                })?,
        };
        let rope_scaling = match file.get_str(&key("rope.scaling.type")) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: file.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0) as f32,
            },
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "unsupported GGUF rope scaling type '{other}'"
                )))
            }
        };
        let window = file
            .get_u64(&key("attention.sliding_window"))
            .map(|x| x as usize);
        let tie_word_embeddings = file.tensor("output.weight").is_none();
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads: file
                .get_u64(&key("attention.head_count_kv"))
                .map(|x| x as usize)
                .unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: file
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            rope_theta: file.get_f64(&key("rope.freq_base")).unwrap_or(10000.0) as f32,
            rope_scaling,
            max_position_embeddings: file
                .get_u64(&key("context_length"))
                .map(|x| x as usize)
                .unwrap_or(2048),
            layer_windows: vec![window; num_layers],
            tie_word_embeddings,
            bos_token_id: file
                .get_u64("tokenizer.ggml.bos_token_id")
                .map(|x| x as u32),
            eos_token_ids: file
                .get_u64("tokenizer.ggml.eos_token_id")
                .map(|x| vec![x as u32])
                .unwrap_or_default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ModelError::Config(msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim must be even for rotary embeddings, got {}",
                self.head_dim
            ));
        }
        if self.layer_windows.contains(&Some(0)) {
            return bad("sliding_window must be positive".into());
        }
        Ok(())
    }

    /// RoPE inverse frequencies with the configured scaling folded in.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f64;
        let inv: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => inv.iter().map(|&f| f as f32).collect(),
            RopeScaling::Linear { factor } => {
                inv.iter().map(|&f| (f / factor as f64) as f32).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    factor as f64,
                    low_freq_factor as f64,
                    high_freq_factor as f64,
                );
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                inv.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        scaled as f32
                    })
                    .collect()
            }
        }
    }

    /// Approximate parameter count (embeddings counted once when tied).
    pub fn parameter_count(&self) -> u64 {
        let (h, i, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let (q, kv) = (
            (self.num_heads * self.head_dim) as u64,
            (self.num_kv_heads * self.head_dim) as u64,
        );
        let spec = self.architecture.spec();
        let attn = h * q + 2 * h * kv + q * h + if spec.qkv_bias { q + 2 * kv } else { 0 };
        let norms = 2 * h
            + if spec.qk_norm {
                2 * self.head_dim as u64
            } else {
                0
            };
        let layer = attn + 3 * h * i + norms;
        let embed = v * h * if self.tie_word_embeddings { 1 } else { 2 };
        layer * self.num_layers as u64 + embed + h
    }
}

fn parse_rope_scaling(s: &Value) -> Result<RopeScaling> {
    let kind = s
        .get("rope_type")
        .or(s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || -> Result<f32> {
        opt_f64(s, "factor")?.map(|f| f as f32).ok_or_else(|| {
            ModelError::Config(format!("rope_scaling of type {kind} needs a factor"))
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: opt_f64(s, "low_freq_factor")?.unwrap_or(1.0) as f32,
            high_freq_factor: opt_f64(s, "high_freq_factor")?.unwrap_or(4.0) as f32,
            original_max_position_embeddings: opt_usize(s, "original_max_position_embeddings")?
                .unwrap_or(8192),
        }),
        other => Err(ModelError::Config(format!(
            "unsupported rope scaling type '{other}'; supported: default, linear, llama3"
        ))),
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            ModelError::Config(format!("{key} must be a non-negative integer, got {x}"))
        }),
    }
}

fn req_usize(v: &Value, key: &str) -> Result<usize> {
    opt_usize(v, key)?
        .ok_or_else(|| ModelError::Config(format!("config lacks the required field {key}")))
}

fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| ModelError::Config(format!("{key} must be a number, got {x}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100})
    }

    #[test]
    fn parses_defaults() {
        let c = ModelConfig::from_hf_json(&base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.layer_windows, vec![None, None]);
        assert_eq!(c.rope_inv_freq().len(), 8);
    }

    #[test]
    fn rejects_bad_head_counts() {
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let err = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(err.contains("multiple of num_key_value_heads"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(ModelConfig::from_hf_json(&v)
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
        let c = ModelConfig::from_hf_json(&v).unwrap();
        let mut plain = c.clone();
        plain.rope_scaling = RopeScaling::None;
        let (s, p) = (c.rope_inv_freq(), plain.rope_inv_freq());
        assert_eq!(s[0], p[0]);
        assert!((s[7] - p[7] / 8.0).abs() < 1e-9);
    }

    #[test]
    fn unknown_scaling_is_refused() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "su", "factor": 2.0});
        assert!(ModelConfig::from_hf_json(&v)
            .unwrap_err()
            .to_string()
            .contains("'su'"));
    }
}
