//! The forward pass shared by every supported family: pre-norm decoder blocks with GQA attention over
//! the paged KV cache and a SiLU-gated MLP, switched by the `ArchSpec` facts (biases, q/k-norm).

use braid_cache::KvStorage;
use braid_kernels::{cpu, Tensor};

use crate::checkpoint::{HostEnds, HostLayer};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::Weights;

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V projections stacked: [q_dim + 2 * kv_dim, hidden].
    qkv: Tensor,
    qkv_bias: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o_proj: Tensor,
    mlp_norm: Vec<f32>,
    /// Gate and up projections stacked: [2 * intermediate, hidden].
    gate_up: Tensor,
    down: Tensor,
    window: Option<usize>,
}

/// One sequence's share of a batched forward call.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// New tokens to run (a whole prompt, a chunk of one, or one decode token).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`: the number of tokens already in the cache for this sequence.
    pub start_pos: usize,
    /// The sequence's KV blocks, with room for `start_pos + tokens.len()` tokens.
    pub block_table: &'a [u32],
}

/// Sequences of a decode step (one new token each) whose block tables start with the same blocks
/// holding their first `shared_tokens` tokens: attention reads that shared KV once for the group
/// (cascade attention) and each sequence's own suffix separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPrefixGroup {
    /// The group's members: a contiguous run of the step's sequences.
    pub seqs: std::ops::Range<usize>,
    pub shared_tokens: usize,
}

/// A model ready to run on the CPU, weights in f32.
pub struct Model {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<Tensor>,
    inv_freq: Vec<f32>,
}

impl Model {
    /// Read every weight the config calls for, checking each shape.
    pub fn load(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        let c = config;
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let tensor = |shape: Vec<usize>, data: Vec<f32>| {
            Tensor::new(shape, data).map_err(|e| ModelError::Weights(e.to_string()))
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for (i, &window) in c.layer_windows.iter().enumerate() {
            let l = HostLayer::read(c, weights, i)?;
            layers.push(Layer {
                attn_norm: l.attn_norm,
                qkv: tensor(vec![q_dim + 2 * kv_dim, h], l.qkv)?,
                qkv_bias: l.qkv_bias,
                q_norm: l.q_norm,
                k_norm: l.k_norm,
                o_proj: tensor(vec![h, q_dim], l.o_proj)?,
                mlp_norm: l.mlp_norm,
                gate_up: tensor(vec![2 * c.intermediate_size, h], l.gate_up)?,
                down: tensor(vec![h, c.intermediate_size], l.down)?,
                window,
            });
        }
        let ends = HostEnds::read(c, weights)?;
        Ok(Model {
            config: c.clone(),
            embed: tensor(vec![c.vocab_size, h], ends.embed)?,
            layers,
            norm: ends.norm,
            lm_head: ends
                .lm_head
                .map(|w| tensor(vec![c.vocab_size, h], w))
                .transpose()?,
            inv_freq: c.rope_inv_freq(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of host memory the f32 weights take.
    pub fn weight_bytes(&self) -> usize {
        let layer_floats: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.len()
                    + l.qkv.numel()
                    + l.qkv_bias.as_ref().map_or(0, Vec::len)
                    + l.q_norm.as_ref().map_or(0, Vec::len)
                    + l.k_norm.as_ref().map_or(0, Vec::len)
                    + l.o_proj.numel()
                    + l.mlp_norm.len()
                    + l.gate_up.numel()
                    + l.down.numel()
            })
            .sum();
        4 * (layer_floats
            + self.embed.numel()
            + self.norm.len()
            + self.lm_head.as_ref().map_or(0, Tensor::numel))
    }

    /// Run the new tokens of every sequence in one batch, writing their K/V into `kv`, and return the
    /// logits ([vocab]) at the last new token of each sequence. The members of each of `groups`
    /// attend with cascade attention: their shared prefix's KV is read once for the group.
    pub fn forward(
        &self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
        kv: &mut KvStorage,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
        let qkv_dim = q_dim + 2 * kv_dim;
        let block_size = kv.layout().block_size;

        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        for s in seqs {
            if s.tokens.is_empty() {
                return Err(ModelError::Forward(
                    "a sequence in the batch has no new tokens".into(),
                ));
            }
            let end = s.start_pos + s.tokens.len();
            if end > c.max_position_embeddings {
                return Err(ModelError::Forward(format!(
                    "sequence of {end} tokens exceeds the model's context of {} tokens",
                    c.max_position_embeddings
                )));
            }
            if s.block_table.len() * block_size < end {
                return Err(ModelError::Forward(format!(
                    "block table holds {} tokens but the sequence needs {end}",
                    s.block_table.len() * block_size
                )));
            }
            tokens.extend_from_slice(s.tokens);
            for pos in s.start_pos..end {
                positions.push(pos);
                slots
                    .push(s.block_table[pos / block_size] as usize * block_size + pos % block_size);
            }
        }
        check_groups(seqs, groups)?;
        let n = tokens.len();
        let mut x = vec![0.0f32; n * h];
        cpu::embedding(self.embed.data(), h, &tokens, &mut x)
            .map_err(|e| ModelError::Forward(e.to_string()))?;

        let mut normed = vec![0.0f32; n * h];
        let mut qkv = vec![0.0f32; n * qkv_dim];
        let mut q = vec![0.0f32; n * q_dim];
        let mut k = vec![0.0f32; n * kv_dim];
        let mut v = vec![0.0f32; n * kv_dim];
        let mut attn = vec![0.0f32; n * q_dim];
        let mut proj = vec![0.0f32; n * h];
        let mut gate_up = vec![0.0f32; n * 2 * c.intermediate_size];
        let mut act = vec![0.0f32; n * c.intermediate_size];
        let scale = 1.0 / (hd as f32).sqrt();

        for (li, layer) in self.layers.iter().enumerate() {
            cpu::rms_norm(&x, &layer.attn_norm, c.rms_norm_eps, &mut normed);
            cpu::linear(
                &normed,
                n,
                h,
                layer.qkv.data(),
                qkv_dim,
                layer.qkv_bias.as_deref(),
                &mut qkv,
            );
            for t in 0..n {
                let row = &qkv[t * qkv_dim..(t + 1) * qkv_dim];
                q[t * q_dim..(t + 1) * q_dim].copy_from_slice(&row[..q_dim]);
                k[t * kv_dim..(t + 1) * kv_dim].copy_from_slice(&row[q_dim..q_dim + kv_dim]);
                v[t * kv_dim..(t + 1) * kv_dim].copy_from_slice(&row[q_dim + kv_dim..]);
            }
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                let q_in = q.clone();
                cpu::rms_norm(&q_in, qn, c.rms_norm_eps, &mut q);
                let k_in = k.clone();
                cpu::rms_norm(&k_in, kn, c.rms_norm_eps, &mut k);
            }
            cpu::apply_rope(&mut q, c.num_heads, hd, &positions, &self.inv_freq, 1.0);
            cpu::apply_rope(&mut k, c.num_kv_heads, hd, &positions, &self.inv_freq, 1.0);
            kv.write(li, &slots, &k, &v);

            let shape = cpu::AttentionShape {
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: hd,
                block_size,
                sliding_window: layer.window,
                scale,
            };
            let (k_cache, v_cache) = kv.layer(li);
            let mut offset = 0;
            let mut i = 0;
            while i < seqs.len() {
                if let Some(g) = groups.iter().find(|g| g.seqs.start == i) {
                    // One decode row per member, contiguous in the batch.
                    let rows = offset..offset + g.seqs.len();
                    let tables: Vec<&[u32]> =
                        seqs[g.seqs.clone()].iter().map(|s| s.block_table).collect();
                    cpu::cascade_attention_decode(
                        &shape,
                        &q[rows.start * q_dim..rows.end * q_dim],
                        &positions[rows.clone()],
                        tables[0],
                        g.shared_tokens,
                        &tables,
                        k_cache,
                        v_cache,
                        &mut attn[rows.start * q_dim..rows.end * q_dim],
                    );
                    offset = rows.end;
                    i = g.seqs.end;
                    continue;
                }
                let len = seqs[i].tokens.len();
                let range = offset * q_dim..(offset + len) * q_dim;
                cpu::paged_attention(
                    &shape,
                    &q[range.clone()],
                    &positions[offset..offset + len],
                    seqs[i].block_table,
                    k_cache,
                    v_cache,
                    &mut attn[range],
                );
                offset += len;
                i += 1;
            }
            cpu::linear(&attn, n, q_dim, layer.o_proj.data(), h, None, &mut proj);
            cpu::add_inplace(&mut x, &proj);

            cpu::rms_norm(&x, &layer.mlp_norm, c.rms_norm_eps, &mut normed);
            let inter = c.intermediate_size;
            cpu::linear(
                &normed,
                n,
                h,
                layer.gate_up.data(),
                2 * inter,
                None,
                &mut gate_up,
            );
            for t in 0..n {
                let row = &gate_up[t * 2 * inter..(t + 1) * 2 * inter];
                cpu::silu_mul(
                    &row[..inter],
                    &row[inter..],
                    &mut act[t * inter..(t + 1) * inter],
                );
            }
            cpu::linear(&act, n, inter, layer.down.data(), h, None, &mut proj);
            cpu::add_inplace(&mut x, &proj);
        }

        // Only each sequence's last token needs logits.
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut out = Vec::with_capacity(seqs.len());
        let mut end = 0;
        let mut last = vec![0.0f32; h];
        for s in seqs {
            end += s.tokens.len();
            cpu::rms_norm(
                &x[(end - 1) * h..end * h],
                &self.norm,
                c.rms_norm_eps,
                &mut last,
            );
            let mut logits = vec![0.0f32; c.vocab_size];
            cpu::linear(&last, 1, h, head.data(), c.vocab_size, None, &mut logits);
            out.push(logits);
        }
        Ok(out)
    }
}

/// Cascade groups must be disjoint, ordered runs of decode rows (one new token each) whose
/// shared prefix lies before every member's new token.
pub(crate) fn check_groups(seqs: &[SeqInput<'_>], groups: &[SharedPrefixGroup]) -> Result<()> {
    let mut end = 0;
    for g in groups {
        let ok = g.seqs.start >= end
            && g.seqs.start < g.seqs.end
            && g.seqs.end <= seqs.len()
            && seqs[g.seqs.clone()]
                .iter()
                .all(|s| s.tokens.len() == 1 && s.start_pos >= g.shared_tokens);
        if !ok {
            return Err(ModelError::Forward(format!(
                "cascade group {:?} sharing {} tokens is not an ordered run of decode sequences past the shared prefix",
                g.seqs, g.shared_tokens
            )));
        }
        end = g.seqs.end;
    }
    Ok(())
}
