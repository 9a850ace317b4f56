//! Reading a LLaMA-family checkpoint by Hugging Face tensor names, one layer at a time, in f32 with
//! every shape checked: the one place both backends learn which tensors a family has.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::Weights;

/// One decoder layer as stored, with Q/K/V and gate/up stacked along their output rows.
pub(crate) struct HostLayer {
    pub attn_norm: Vec<f32>,
    /// [q_dim + 2 * kv_dim, hidden].
    pub qkv: Vec<f32>,
    pub qkv_bias: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// [hidden, q_dim].
    pub o_proj: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    /// [2 * intermediate, hidden].
    pub gate_up: Vec<f32>,
    /// [hidden, intermediate].
    pub down: Vec<f32>,
}

/// The tensors outside the layers.
pub(crate) struct HostEnds {
    /// [vocab, hidden].
    pub embed: Vec<f32>,
    pub norm: Vec<f32>,
    /// [vocab, hidden]; `None` when tied to the embedding.
    pub lm_head: Option<Vec<f32>>,
}

impl HostLayer {
    pub fn read(c: &ModelConfig, weights: &Weights, i: usize) -> Result<Self> {
        let spec = c.architecture.spec();
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let p = format!("model.layers.{i}");
        let get = |name: &str, shape: &[usize]| {
            weights
                .get(&format!("{p}.{name}"), shape)
                .map(|t| t.into_data())
        };
        let mut qkv = get("self_attn.q_proj.weight", &[q_dim, h])?;
        qkv.extend(get("self_attn.k_proj.weight", &[kv_dim, h])?);
        qkv.extend(get("self_attn.v_proj.weight", &[kv_dim, h])?);
        let qkv_bias = if spec.qkv_bias {
            let mut b = get("self_attn.q_proj.bias", &[q_dim])?;
            b.extend(get("self_attn.k_proj.bias", &[kv_dim])?);
            b.extend(get("self_attn.v_proj.bias", &[kv_dim])?);
            Some(b)
        } else {
            None
        };
        let (q_norm, k_norm) = if spec.qk_norm {
            (
                Some(get("self_attn.q_norm.weight", &[c.head_dim])?),
                Some(get("self_attn.k_norm.weight", &[c.head_dim])?),
            )
        } else {
            (None, None)
        };
        let mut gate_up = get("mlp.gate_proj.weight", &[c.intermediate_size, h])?;
        gate_up.extend(get("mlp.up_proj.weight", &[c.intermediate_size, h])?);
        Ok(HostLayer {
            attn_norm: get("input_layernorm.weight", &[h])?,
            qkv,
            qkv_bias,
            q_norm,
            k_norm,
            o_proj: get("self_attn.o_proj.weight", &[h, q_dim])?,
            mlp_norm: get("post_attention_layernorm.weight", &[h])?,
            gate_up,
            down: get("mlp.down_proj.weight", &[h, c.intermediate_size])?,
        })
    }
}

impl HostEnds {
    pub fn read(c: &ModelConfig, weights: &Weights) -> Result<Self> {
        let (v, h) = (c.vocab_size, c.hidden_size);
        let lm_head = if c.tie_word_embeddings && !weights.contains("lm_head.weight") {
            None
        } else {
            Some(weights.get("lm_head.weight", &[v, h])?.into_data())
        };
        Ok(HostEnds {
            embed: weights
                .get("model.embed_tokens.weight", &[v, h])?
                .into_data(),
            norm: weights.get("model.norm.weight", &[h])?.into_data(),
            lm_head,
        })
    }
}
