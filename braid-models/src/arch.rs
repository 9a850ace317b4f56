//! The architecture registry: each supported family is a row of facts, not a copy of the forward pass.

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// What distinguishes one LLaMA-like family from another.
#[derive(Debug, Clone, Copy)]
pub struct ArchSpec {
    pub arch: Architecture,
    pub name: &'static str,
    /// `architectures` entries in config.json.
    pub hf_classes: &'static [&'static str],
    /// `model_type` values in config.json.
    pub model_types: &'static [&'static str],
    /// `general.architecture` values in GGUF.
    pub gguf_names: &'static [&'static str],
    /// Q, K and V projections carry a bias.
    pub qkv_bias: bool,
    /// RMSNorm over each head of Q and K before RoPE.
    pub qk_norm: bool,
    /// GGUF stores Q/K rows permuted for interleaved RoPE (llama.cpp's LLaMA converter does this).
    pub gguf_permuted_qk: bool,
}

pub const REGISTRY: &[ArchSpec] = &[
    ArchSpec {
        arch: Architecture::Llama,
        name: "llama",
        hf_classes: &["LlamaForCausalLM"],
        model_types: &["llama"],
        gguf_names: &["llama"],
        qkv_bias: false,
        qk_norm: false,
        gguf_permuted_qk: true,
    },
    ArchSpec {
        arch: Architecture::Mistral,
        name: "mistral",
        hf_classes: &["MistralForCausalLM"],
        model_types: &["mistral"],
        gguf_names: &["mistral"],
        qkv_bias: false,
        qk_norm: false,
        gguf_permuted_qk: true,
    },
    ArchSpec {
        arch: Architecture::Qwen2,
        name: "qwen2",
        hf_classes: &["Qwen2ForCausalLM"],
        model_types: &["qwen2"],
        gguf_names: &["qwen2"],
        qkv_bias: true,
        qk_norm: false,
        gguf_permuted_qk: false,
    },
    ArchSpec {
        arch: Architecture::Qwen3,
        name: "qwen3",
        hf_classes: &["Qwen3ForCausalLM"],
        model_types: &["qwen3"],
        gguf_names: &["qwen3"],
        qkv_bias: false,
        qk_norm: true,
        gguf_permuted_qk: false,
    },
];

impl Architecture {
    pub fn spec(self) -> &'static ArchSpec {
        REGISTRY
            .iter()
            .find(|s| s.arch == self)
            .expect("every architecture has a registry row")
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// Detect from config.json's `architectures` list, falling back to `model_type`.
    pub fn from_hf(classes: &[String], model_type: Option<&str>) -> Result<Self> {
        for class in classes {
            if let Some(s) = REGISTRY
                .iter()
                .find(|s| s.hf_classes.contains(&class.as_str()))
            {
                return Ok(s.arch);
            }
        }
        if let Some(mt) = model_type {
            if let Some(s) = REGISTRY.iter().find(|s| s.model_types.contains(&mt)) {
                return Ok(s.arch);
            }
        }
        let found = classes
            .first()
            .cloned()
            .or(model_type.map(str::to_owned))
            .unwrap_or_else(|| "(none given)".into());
        Err(unknown(found))
    }

    /// Detect from GGUF's `general.architecture`.
    pub fn from_gguf(name: &str) -> Result<Self> {
        REGISTRY
            .iter()
            .find(|s| s.gguf_names.contains(&name))
            .map(|s| s.arch)
            .ok_or_else(|| unknown(name.to_owned()))
    }
}

fn unknown(found: String) -> ModelError {
    let supported = REGISTRY
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ");
    ModelError::UnknownArchitecture { found, supported }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_class_then_model_type() {
        assert_eq!(
            Architecture::from_hf(&["Qwen3ForCausalLM".into()], None).unwrap(),
            Architecture::Qwen3
        );
        assert_eq!(
            Architecture::from_hf(&[], Some("mistral")).unwrap(),
            Architecture::Mistral
        );
        assert_eq!(
            Architecture::from_gguf("llama").unwrap(),
            Architecture::Llama
        );
    }

    #[test]
    fn unknown_names_the_architecture_and_lists_supported() {
        let err = Architecture::from_hf(&["GPTNeoXForCausalLM".into()], Some("gpt_neox"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GPTNeoXForCausalLM") && err.contains("llama, mistral, qwen2, qwen3"),
            "{err}"
        );
    }
}
