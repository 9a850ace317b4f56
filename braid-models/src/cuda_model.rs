//! The forward pass on an NVIDIA GPU: the same LLaMA-family block as `model.rs`, with weights and
//! the paged KV cache in bf16 or f16 on the device, our kernels for everything but the large GEMMs
//! (cuBLASLt), greedy sampling on the device so only token ids come back, and decode steps captured
//! as CUDA graphs per batch-size bucket and replayed.

use std::collections::HashMap;
use std::sync::Arc;

use braid_kernels::cuda::cascade::CascadeBounds;
use braid_kernels::cuda::{
    AttentionParams, CudaDevice, CudaError, CudaGraph, CudaSlice, KernelFloat, RopeParams,
    SamplingBuffers, SamplingRow, SKIP_SLOT,
};
use braid_kernels::DType;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::checkpoint::{HostEnds, HostLayer};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::{check_groups, SeqInput, SharedPrefixGroup};
use crate::weights::Weights;

/// A model whose weights live on one GPU.
pub struct CudaModel {
    inner: Inner,
}

enum Inner {
    Bf16(Runner<bf16>),
    F16(Runner<f16>),
}

/// Run `$body` with `$r` bound to the runner of whichever dtype the model uses.
macro_rules! with_runner {
    ($self:expr, $r:ident => $body:expr) => {
        match &mut $self.inner {
            Inner::Bf16($r) => $body,
            Inner::F16($r) => $body,
        }
    };
}

/// How the engine sizes the device buffers.
#[derive(Debug, Clone, Copy)]
pub struct CudaCacheConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    /// Most tokens in one forward step.
    pub max_batch_tokens: usize,
    /// Most sequences in one forward step.
    pub max_seqs: usize,
    /// Longest sequence, in tokens.
    pub max_seq_len: usize,
}

impl CudaModel {
    /// Upload the weights to GPU `ordinal` in `dtype` (bf16 or f16).
    pub fn load(
        config: &ModelConfig,
        weights: &Weights,
        ordinal: usize,
        dtype: DType,
    ) -> Result<Self> {
        let dev = Arc::new(CudaDevice::new(ordinal).map_err(cuda)?);
        let inner = match dtype {
            DType::BF16 => Inner::Bf16(Runner::load(dev, config, weights)?),
            DType::F16 => Inner::F16(Runner::load(dev, config, weights)?),
            DType::F32 => {
                return Err(ModelError::Forward(
                    "the CUDA backend computes in bf16 or f16; use --dtype bf16".into(),
                ))
            }
        };
        Ok(CudaModel { inner })
    }

    /// The dtype of the weights and the KV cache.
    pub fn dtype(&self) -> DType {
        match self.inner {
            Inner::Bf16(_) => DType::BF16,
            Inner::F16(_) => DType::F16,
        }
    }

    /// The GPU's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&mut self) -> String {
        with_runner!(self, r => r.dev.name().unwrap_or_else(|_| "unknown GPU".into()))
    }

    /// Allocate the KV pool and the step buffers.
    pub fn allocate(&mut self, cache: CudaCacheConfig) -> Result<()> {
        with_runner!(self, r => r.allocate(cache))
    }

    /// Bytes of device memory held by the weights and the KV pool.
    pub fn memory_bytes(&mut self) -> (usize, usize) {
        with_runner!(self, r => (r.weight_bytes, r.kv_bytes()))
    }

    /// Device memory in use on the whole GPU (all processes), in bytes.
    pub fn device_memory_used(&mut self) -> Option<usize> {
        with_runner!(self, r => r.dev.memory_info().ok().map(|(free, total)| total - free))
    }

    /// Copy KV block `src` over block `dst` in every layer (copy-on-write of a shared block).
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        with_runner!(self, r => r.copy_block(src as usize, dst as usize))
    }

    /// Bytes of one KV block over all layers (K then V per layer, in the cache dtype).
    pub fn block_bytes(&self) -> usize {
        match &self.inner {
            Inner::Bf16(r) => r.block_bytes(),
            Inner::F16(r) => r.block_bytes(),
        }
    }

    /// Copy KV block `id` of every layer to the host, as [`CudaModel::block_bytes`] bytes.
    pub fn read_block(&mut self, id: u32, out: &mut [u8]) -> Result<()> {
        with_runner!(self, r => r.read_block(id as usize, out))
    }

    /// Overwrite KV block `id` of every layer with bytes laid out as [`CudaModel::read_block`] gives them.
    pub fn write_block(&mut self, id: u32, data: &[u8]) -> Result<()> {
        with_runner!(self, r => r.write_block(id as usize, data))
    }

    /// Logits at each sequence's last new token, copied to the host ([num_seqs][vocab], f32).
    /// The members of each of `groups` attend with cascade attention (see
    /// [`SharedPrefixGroup`]).
    pub fn forward_logits(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
    ) -> Result<Vec<Vec<f32>>> {
        with_runner!(self, r => r.forward_logits(seqs, groups))
    }

    /// The next token of each sequence, chosen on the device: greedily when `rows` is `None`,
    /// else by each row's sampling parameters. The members of each of `groups` attend with
    /// cascade attention (a step with groups runs without a captured graph).
    pub fn forward_sample(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
        rows: Option<&[SamplingRow]>,
    ) -> Result<Vec<u32>> {
        with_runner!(self, r => r.forward_sample(seqs, groups, rows))
    }
}

fn cuda(e: CudaError) -> ModelError {
    ModelError::Forward(format!("CUDA: {e}"))
}

struct Layer<T> {
    attn_norm: CudaSlice<T>,
    qkv: CudaSlice<T>,
    qkv_bias: Option<CudaSlice<T>>,
    q_norm: Option<CudaSlice<T>>,
    k_norm: Option<CudaSlice<T>>,
    o_proj: CudaSlice<T>,
    mlp_norm: CudaSlice<T>,
    gate_up: CudaSlice<T>,
    down: CudaSlice<T>,
    window: usize,
}

/// Device buffers for one step, sized once for the largest step.
struct Buffers<T> {
    cache: CudaCacheConfig,
    ids: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    block_tables: CudaSlice<u32>,
    context_lens: CudaSlice<u32>,
    q_starts: CudaSlice<u32>,
    last_rows: CudaSlice<u32>,
    group_starts: CudaSlice<u32>,
    prefix_lens: CudaSlice<u32>,
    /// Cascade attention's scratch, grown to the largest step seen.
    cascade_workspace: Option<CudaSlice<f32>>,
    residual: CudaSlice<T>,
    normed: CudaSlice<T>,
    qkv: CudaSlice<T>,
    q: CudaSlice<T>,
    attn: CudaSlice<T>,
    proj: CudaSlice<T>,
    gate_up: CudaSlice<T>,
    act: CudaSlice<T>,
    last: CudaSlice<T>,
    logits: CudaSlice<T>,
    out_ids: CudaSlice<u32>,
    sampling: SamplingBuffers,
    attn_workspace: CudaSlice<f32>,
}

/// What a step looks like to the kernels.
#[derive(Clone, Copy, PartialEq, Eq)]
struct StepShape {
    tokens: usize,
    seqs: usize,
    /// Block-table row width.
    width: usize,
    max_q_len: usize,
    /// A decode step with cascade groups (uploaded to `group_starts` / `prefix_lens`).
    cascade: Option<CascadeStep>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct CascadeStep {
    num_groups: usize,
    bounds: CascadeBounds,
}

struct Runner<T: KernelFloat> {
    dev: Arc<CudaDevice>,
    config: ModelConfig,
    embed: CudaSlice<T>,
    layers: Vec<Layer<T>>,
    norm: CudaSlice<T>,
    lm_head: Option<CudaSlice<T>>,
    inv_freq: CudaSlice<f32>,
    weight_bytes: usize,
    kv: Vec<(CudaSlice<T>, CudaSlice<T>)>,
    bufs: Option<Buffers<T>>,
    /// Decode graphs by (padded batch size, block-table width, greedy).
    graphs: HashMap<(usize, usize, bool), CudaGraph>,
}

/// Batch sizes decode graphs are captured for; a step runs in the smallest bucket that holds it.
fn bucket(n: usize) -> usize {
    match n {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        5..=8 => 8,
        _ => n.div_ceil(16) * 16,
    }
}

impl<T: KernelFloat> Runner<T>
where
    T: Convert,
{
    fn load(dev: Arc<CudaDevice>, c: &ModelConfig, weights: &Weights) -> Result<Self> {
        let mut bytes = 0usize;
        let mut up = |host: Vec<f32>| -> Result<CudaSlice<T>> {
            bytes += host.len() * std::mem::size_of::<T>();
            let converted: Vec<T> = host.par_iter().map(|&x| T::from_f32(x)).collect();
            dev.upload(&converted).map_err(cuda)
        };
        // One layer at a time, so host memory holds a layer's f32 copy, not the model's.
        let mut layers = Vec::with_capacity(c.num_layers);
        for (i, window) in c.layer_windows.iter().enumerate() {
            let l = HostLayer::read(c, weights, i)?;
            layers.push(Layer {
                attn_norm: up(l.attn_norm)?,
                qkv: up(l.qkv)?,
                qkv_bias: l.qkv_bias.map(&mut up).transpose()?,
                q_norm: l.q_norm.map(&mut up).transpose()?,
                k_norm: l.k_norm.map(&mut up).transpose()?,
                o_proj: up(l.o_proj)?,
                mlp_norm: up(l.mlp_norm)?,
                gate_up: up(l.gate_up)?,
                down: up(l.down)?,
                window: window.unwrap_or(0),
            });
        }
        let ends = HostEnds::read(c, weights)?;
        let embed = up(ends.embed)?;
        let norm = up(ends.norm)?;
        let lm_head = ends.lm_head.map(&mut up).transpose()?;
        let inv_freq = dev.upload(&c.rope_inv_freq()).map_err(cuda)?;
        Ok(Runner {
            dev,
            config: c.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            weight_bytes: bytes,
            kv: Vec::new(),
            bufs: None,
            graphs: HashMap::new(),
        })
    }

    fn kv_bytes(&self) -> usize {
        self.kv
            .iter()
            .map(|(k, v)| (k.len() + v.len()) * std::mem::size_of::<T>())
            .sum()
    }

    /// Elements of one layer's K (or V) block.
    fn block_elems(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.cache.block_size)
            * self.config.num_kv_heads
            * self.config.head_dim
    }

    fn elem_bytes(&self) -> usize {
        std::mem::size_of::<T>()
    }

    fn block_bytes(&self) -> usize {
        self.block_elems() * 2 * self.kv.len() * self.elem_bytes()
    }

    /// The block's element range in a layer's K or V buffer, after checking `id` and `bytes`.
    fn block_range(&self, id: usize, bytes: usize) -> Result<std::ops::Range<usize>> {
        let num_blocks = self.bufs.as_ref().map_or(0, |b| b.cache.num_blocks);
        let elems = self.block_elems();
        let want = self.block_bytes();
        if id >= num_blocks || bytes != want {
            return Err(ModelError::Forward(format!(
                "KV block {id} of {bytes} bytes does not fit a cache of {num_blocks} blocks of {want} bytes"
            )));
        }
        Ok(id * elems..(id + 1) * elems)
    }

    fn read_block(&mut self, id: usize, out: &mut [u8]) -> Result<()> {
        let range = self.block_range(id, out.len())?;
        let st = self.dev.stream();
        let mut host = vec![T::from_f32(0.0); range.len()];
        let mut chunks = out.chunks_exact_mut(range.len() * self.elem_bytes());
        for (k, v) in &self.kv {
            for cache in [k, v] {
                st.memcpy_dtoh(&cache.slice(range.clone()), &mut host)
                    .and_then(|()| st.synchronize())
                    .map_err(|e| {
                        cuda(CudaError::Driver {
                            op: "KV block read",
                            source: e,
                        })
                    })?;
                if let Some(chunk) = chunks.next() {
                    chunk.copy_from_slice(bytemuck::cast_slice(&host));
                }
            }
        }
        Ok(())
    }

    fn write_block(&mut self, id: usize, data: &[u8]) -> Result<()> {
        let range = self.block_range(id, data.len())?;
        let st = self.dev.stream();
        let mut host = vec![T::from_f32(0.0); range.len()];
        let mut chunks = data.chunks_exact(range.len() * self.elem_bytes());
        for (k, v) in &mut self.kv {
            for cache in [k, v] {
                if let Some(chunk) = chunks.next() {
                    bytemuck::cast_slice_mut(&mut host).copy_from_slice(chunk);
                }
                st.memcpy_htod(&host, &mut cache.slice_mut(range.clone()))
                    .and_then(|()| st.synchronize())
                    .map_err(|e| {
                        cuda(CudaError::Driver {
                            op: "KV block write",
                            source: e,
                        })
                    })?;
            }
        }
        Ok(())
    }

    fn copy_block(&mut self, src: usize, dst: usize) -> Result<()> {
        let bufs = self
            .bufs
            .as_ref()
            .ok_or_else(|| ModelError::Forward("CUDA buffers were not allocated".into()))?;
        let elems = bufs.cache.block_size * self.config.num_kv_heads * self.config.head_dim;
        if src == dst || src.max(dst) >= bufs.cache.num_blocks {
            return Err(ModelError::Forward(format!(
                "cannot copy KV block {src} to block {dst} in a cache of {} blocks",
                bufs.cache.num_blocks
            )));
        }
        let st = self.dev.stream();
        for (k, v) in &mut self.kv {
            for cache in [k, v] {
                // Split the buffer between the two blocks to borrow one for reading and the
                // other for writing.
                let result = if src < dst {
                    let (a, mut b) = cache.split_at_mut(dst * elems);
                    st.memcpy_dtod(
                        &a.slice(src * elems..(src + 1) * elems),
                        &mut b.slice_mut(..elems),
                    )
                } else {
                    let (mut a, b) = cache.split_at_mut(src * elems);
                    st.memcpy_dtod(
                        &b.slice(..elems),
                        &mut a.slice_mut(dst * elems..(dst + 1) * elems),
                    )
                };
                result.map_err(|e| {
                    cuda(CudaError::Driver {
                        op: "KV block copy",
                        source: e,
                    })
                })?;
            }
        }
        Ok(())
    }

    fn allocate(&mut self, cache: CudaCacheConfig) -> Result<()> {
        let c = &self.config;
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let d = &self.dev;
        let n = cache.max_batch_tokens.max(cache.max_seqs);
        let s = cache.max_seqs;
        let width = cache.max_seq_len.div_ceil(cache.block_size);
        let alloc_t = |len: usize| d.alloc_zeros::<T>(len).map_err(cuda);
        let alloc_u = |len: usize| d.alloc_zeros::<u32>(len).map_err(cuda);
        self.graphs.clear();
        self.kv.clear();
        let per_layer = cache.num_blocks * cache.block_size * kv_dim;
        for _ in 0..c.num_layers {
            self.kv.push((alloc_t(per_layer)?, alloc_t(per_layer)?));
        }
        let workspace = CudaDevice::paged_attention_decode_workspace_len(
            s,
            c.num_heads,
            c.head_dim,
            width,
            cache.block_size,
        );
        self.bufs = Some(Buffers {
            cache,
            ids: alloc_u(n)?,
            positions: alloc_u(n)?,
            slots: alloc_u(n)?,
            block_tables: alloc_u(s * width)?,
            context_lens: alloc_u(s)?,
            q_starts: alloc_u(s + 1)?,
            last_rows: alloc_u(s)?,
            group_starts: alloc_u(s + 1)?,
            prefix_lens: alloc_u(s)?,
            cascade_workspace: None,
            residual: alloc_t(n * h)?,
            normed: alloc_t(n * h)?,
            qkv: alloc_t(n * (q_dim + 2 * kv_dim))?,
            q: alloc_t(n * q_dim)?,
            attn: alloc_t(n * q_dim)?,
            proj: alloc_t(n * h)?,
            gate_up: alloc_t(n * 2 * c.intermediate_size)?,
            act: alloc_t(n * c.intermediate_size)?,
            last: alloc_t(s * h)?,
            logits: alloc_t(s * c.vocab_size)?,
            out_ids: alloc_u(s)?,
            sampling: SamplingBuffers::new(d, s).map_err(cuda)?,
            attn_workspace: d.alloc_zeros::<f32>(workspace.max(1)).map_err(cuda)?,
        });
        Ok(())
    }

    /// Copy the step's host-side inputs into the fixed device buffers; padding rows (up to
    /// `shape.seqs` sequences) read block 0 and write no KV.
    fn upload_inputs(&mut self, seqs: &[SeqInput<'_>], shape: StepShape) -> Result<()> {
        let bufs = self
            .bufs
            .as_mut()
            .ok_or_else(|| ModelError::Forward("CUDA buffers were not allocated".into()))?;
        let bs = bufs.cache.block_size;
        let mut ids = Vec::with_capacity(shape.tokens);
        let mut positions = Vec::with_capacity(shape.tokens);
        let mut slots = Vec::with_capacity(shape.tokens);
        let mut tables = vec![0u32; shape.seqs * shape.width];
        let mut context_lens = vec![0u32; shape.seqs];
        let mut q_starts = vec![0u32; shape.seqs + 1];
        let mut last_rows = vec![0u32; shape.seqs];
        for (i, s) in seqs.iter().enumerate() {
            let end = s.start_pos + s.tokens.len();
            ids.extend_from_slice(s.tokens);
            for pos in s.start_pos..end {
                positions.push(pos as u32);
                slots.push(s.block_table[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            let used = end.div_ceil(bs);
            tables[i * shape.width..i * shape.width + used].copy_from_slice(&s.block_table[..used]);
            context_lens[i] = end as u32;
            q_starts[i + 1] = ids.len() as u32;
            last_rows[i] = ids.len() as u32 - 1;
        }
        for i in seqs.len()..shape.seqs {
            q_starts[i + 1] = q_starts[i];
        }
        // Padding tokens (decode buckets): token 0 at position 0, KV write skipped.
        while ids.len() < shape.tokens {
            ids.push(0);
            positions.push(0);
            slots.push(SKIP_SLOT);
        }
        // Padding only happens in decode buckets (one token per row), where row i's token is token i.
        for (i, row) in last_rows.iter_mut().enumerate().skip(seqs.len()) {
            *row = i as u32;
        }
        let st = self.dev.stream();
        let copy = |src: &[u32], dst: &mut CudaSlice<u32>| {
            st.memcpy_htod(src, &mut dst.slice_mut(..src.len()))
                .map_err(|e| {
                    cuda(CudaError::Driver {
                        op: "host-to-device copy",
                        source: e,
                    })
                })
        };
        copy(&ids, &mut bufs.ids)?;
        copy(&positions, &mut bufs.positions)?;
        copy(&slots, &mut bufs.slots)?;
        copy(&tables, &mut bufs.block_tables)?;
        copy(&context_lens, &mut bufs.context_lens)?;
        copy(&q_starts, &mut bufs.q_starts)?;
        copy(&last_rows, &mut bufs.last_rows)?;
        Ok(())
    }

    /// Upload the cascade groups of a decode step: every run of sequences before a group becomes
    /// groups of one without a shared prefix, so the groups tile the batch up to the last one;
    /// grow the scratch to the step's bounds. `None` when there are no groups.
    fn upload_groups(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
        shape: StepShape,
    ) -> Result<Option<CascadeStep>> {
        if groups.is_empty() {
            return Ok(None);
        }
        check_groups(seqs, groups)?;
        let mut starts = vec![0u32];
        let mut prefix = Vec::new();
        let mut shared = vec![0usize; seqs.len()];
        for g in groups {
            while (*starts.last().unwrap_or(&0) as usize) < g.seqs.start {
                starts.push(starts[starts.len() - 1] + 1);
                prefix.push(0);
            }
            starts.push(g.seqs.end as u32);
            prefix.push(g.shared_tokens as u32);
            shared[g.seqs.clone()].fill(g.shared_tokens);
        }
        let bounds = CascadeBounds {
            max_group_size: groups.iter().map(|g| g.seqs.len()).max().unwrap_or(1),
            max_prefix_tokens: groups.iter().map(|g| g.shared_tokens).max().unwrap_or(0),
            max_suffix_tokens: seqs
                .iter()
                .zip(&shared)
                .map(|(s, &p)| s.start_pos + s.tokens.len() - p)
                .max()
                .unwrap_or(1),
        };
        let c = &self.config;
        let params = AttentionParams {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: 1,
            max_blocks_per_seq: 1,
            scale: 1.0,
            sliding_window: 0,
        };
        let b = self
            .bufs
            .as_mut()
            .ok_or_else(|| ModelError::Forward("CUDA buffers were not allocated".into()))?;
        let params = AttentionParams {
            block_size: b.cache.block_size,
            max_blocks_per_seq: shape.width,
            ..params
        };
        let need = CudaDevice::cascade_attention_decode_workspace_len(
            seqs.len(),
            prefix.len(),
            &params,
            &bounds,
        )
        .max(1);
        if b.cascade_workspace.as_ref().is_none_or(|w| w.len() < need) {
            b.cascade_workspace = None; // free the old one first
            b.cascade_workspace = Some(self.dev.alloc_zeros::<f32>(need).map_err(cuda)?);
        }
        let st = self.dev.stream();
        for (src, dst) in [
            (&starts, &mut b.group_starts),
            (&prefix, &mut b.prefix_lens),
        ] {
            st.memcpy_htod(src.as_slice(), &mut dst.slice_mut(..src.len()))
                .map_err(|e| {
                    cuda(CudaError::Driver {
                        op: "host-to-device copy",
                        source: e,
                    })
                })?;
        }
        Ok(Some(CascadeStep {
            num_groups: prefix.len(),
            bounds,
        }))
    }

    fn step_shape(&self, seqs: &[SeqInput<'_>], pad: bool) -> Result<StepShape> {
        let bufs = self
            .bufs
            .as_ref()
            .ok_or_else(|| ModelError::Forward("CUDA buffers were not allocated".into()))?;
        let cache = bufs.cache;
        let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let n_seqs = if pad {
            bucket(seqs.len()).min(cache.max_seqs)
        } else {
            seqs.len()
        };
        let need = seqs
            .iter()
            .map(|s| (s.start_pos + s.tokens.len()).div_ceil(cache.block_size))
            .max()
            .unwrap_or(1);
        let full = cache.max_seq_len.div_ceil(cache.block_size);
        let width = need.next_power_of_two().max(16).min(full);
        if seqs.is_empty() || seqs.iter().any(|s| s.tokens.is_empty()) {
            return Err(ModelError::Forward(
                "every sequence in a step needs at least one new token".into(),
            ));
        }
        if tokens > cache.max_batch_tokens.max(cache.max_seqs)
            || seqs.len() > cache.max_seqs
            || need > full
        {
            return Err(ModelError::Forward(format!(
                "step of {tokens} tokens over {} sequences exceeds the allocated {} tokens, {} sequences, {} blocks per sequence",
                seqs.len(), cache.max_batch_tokens, cache.max_seqs, full
            )));
        }
        let max_q_len = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(1);
        Ok(StepShape {
            tokens: if pad { n_seqs } else { tokens },
            seqs: n_seqs,
            width,
            max_q_len,
            cascade: None,
        })
    }

    /// Enqueue the whole forward pass for `shape`, leaving logits of each sequence's last token in
    /// `bufs.logits`. Reads only device buffers, so it can be captured into a graph.
    fn enqueue_forward(&mut self, shape: StepShape) -> std::result::Result<(), CudaError> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
        let qkv_dim = q_dim + 2 * kv_dim;
        let inter = c.intermediate_size;
        let eps = c.rms_norm_eps;
        let n = shape.tokens;
        let d = &*self.dev;
        let b = self.bufs.as_mut().expect("allocated before any step");
        let decode = shape.max_q_len == 1;

        d.embedding(
            &self.embed,
            &b.ids.slice(..n),
            &mut b.residual.slice_mut(..n * h),
            h,
        )?;
        d.rms_norm(
            &b.residual.slice(..n * h),
            &self.layers[0].attn_norm,
            &mut b.normed.slice_mut(..n * h),
            n,
            h,
            eps,
        )?;
        // Every projection reads model weights that no kernel writes, so each may start streaming
        // them while the previous kernel finishes (programmatic dependent launch).
        for (li, layer) in self.layers.iter().enumerate() {
            d.linear_overlapped(
                &b.normed.slice(..n * h),
                n,
                h,
                &layer.qkv,
                qkv_dim,
                layer.qkv_bias.as_ref().map(|x| x.slice(..)).as_ref(),
                None,
                &mut b.qkv.slice_mut(..n * qkv_dim),
            )?;
            let (k_cache, v_cache) = &mut self.kv[li];
            d.rope_qk_norm_kv_write(
                &b.qkv.slice(..n * qkv_dim),
                &b.positions.slice(..n),
                &b.slots.slice(..n),
                &self.inv_freq,
                layer.q_norm.as_ref().map(|x| x.slice(..)).as_ref(),
                layer.k_norm.as_ref().map(|x| x.slice(..)).as_ref(),
                eps,
                &mut b.q.slice_mut(..n * q_dim),
                k_cache,
                v_cache,
                &RopeParams {
                    n,
                    num_heads: c.num_heads,
                    num_kv_heads: c.num_kv_heads,
                    head_dim: hd,
                },
            )?;
            let p = AttentionParams {
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: hd,
                block_size: b.cache.block_size,
                max_blocks_per_seq: shape.width,
                scale: 1.0 / (hd as f32).sqrt(),
                sliding_window: layer.window,
            };
            let tables = b.block_tables.slice(..shape.seqs * shape.width);
            let lens = b.context_lens.slice(..shape.seqs);
            if let Some(cascade) = shape.cascade {
                let g = cascade.num_groups;
                d.cascade_attention_decode(
                    &b.q.slice(..n * q_dim),
                    &*k_cache,
                    &*v_cache,
                    &tables,
                    &lens,
                    &b.group_starts.slice(..g + 1),
                    &b.prefix_lens.slice(..g),
                    &mut b.attn.slice_mut(..n * q_dim),
                    b.cascade_workspace.as_mut().expect("sized with the groups"),
                    &p,
                    &cascade.bounds,
                )?;
            } else if decode {
                d.paged_attention_decode(
                    &b.q.slice(..n * q_dim),
                    &*k_cache,
                    &*v_cache,
                    &tables,
                    &lens,
                    &mut b.attn.slice_mut(..n * q_dim),
                    &mut b.attn_workspace,
                    &p,
                )?;
            } else {
                d.paged_attention_prefill(
                    &b.q.slice(..n * q_dim),
                    &*k_cache,
                    &*v_cache,
                    &tables,
                    &b.q_starts.slice(..shape.seqs + 1),
                    &lens,
                    &mut b.attn.slice_mut(..n * q_dim),
                    shape.seqs,
                    shape.max_q_len,
                    &p,
                )?;
            }
            d.linear_overlapped(
                &b.attn.slice(..n * q_dim),
                n,
                q_dim,
                &layer.o_proj,
                h,
                None,
                None,
                &mut b.proj.slice_mut(..n * h),
            )?;
            d.fused_add_rms_norm(
                &b.proj.slice(..n * h),
                &mut b.residual.slice_mut(..n * h),
                &layer.mlp_norm,
                &mut b.normed.slice_mut(..n * h),
                n,
                h,
                eps,
            )?;
            d.linear_overlapped(
                &b.normed.slice(..n * h),
                n,
                h,
                &layer.gate_up,
                2 * inter,
                None,
                None,
                &mut b.gate_up.slice_mut(..n * 2 * inter),
            )?;
            d.silu_mul(
                &b.gate_up.slice(..n * 2 * inter),
                &mut b.act.slice_mut(..n * inter),
                n,
                inter,
            )?;
            d.linear_overlapped(
                &b.act.slice(..n * inter),
                n,
                inter,
                &layer.down,
                h,
                None,
                None,
                &mut b.proj.slice_mut(..n * h),
            )?;
            let next_norm = self.layers.get(li + 1).map_or(&self.norm, |l| &l.attn_norm);
            d.fused_add_rms_norm(
                &b.proj.slice(..n * h),
                &mut b.residual.slice_mut(..n * h),
                next_norm,
                &mut b.normed.slice_mut(..n * h),
                n,
                h,
                eps,
            )?;
        }
        // The LM head runs over each sequence's last row only: in a decode step those are all the
        // rows; otherwise they are gathered first (the embedding kernel is a row gather).
        let s = shape.seqs;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = &mut b.logits.slice_mut(..s * c.vocab_size);
        if decode {
            d.linear_overlapped(
                &b.normed.slice(..s * h),
                s,
                h,
                head,
                c.vocab_size,
                None,
                None,
                logits,
            )?;
        } else {
            d.embedding(
                &b.normed.slice(..n * h),
                &b.last_rows.slice(..s),
                &mut b.last.slice_mut(..s * h),
                h,
            )?;
            d.linear_overlapped(
                &b.last.slice(..s * h),
                s,
                h,
                head,
                c.vocab_size,
                None,
                None,
                logits,
            )?;
        }
        Ok(())
    }

    fn forward_logits(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
    ) -> Result<Vec<Vec<f32>>> {
        let mut shape = self.step_shape(seqs, false)?;
        self.upload_inputs(seqs, shape)?;
        shape.cascade = self.upload_groups(seqs, groups, shape)?;
        self.enqueue_forward(shape).map_err(cuda)?;
        let vocab = self.config.vocab_size;
        let b = self.bufs.as_ref().expect("allocated");
        let host = self
            .dev
            .download(&b.logits.slice(..seqs.len() * vocab))
            .map_err(cuda)?;
        Ok(host
            .chunks(vocab)
            .map(|row| row.iter().map(|x| x.to_f32()).collect())
            .collect())
    }

    fn forward_sample(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
        rows: Option<&[SamplingRow]>,
    ) -> Result<Vec<u32>> {
        // Cascade steps run eagerly: their grids follow the groups, which graphs would freeze.
        let graphed = groups.is_empty() && seqs.iter().all(|s| s.tokens.len() == 1);
        let mut shape = self.step_shape(seqs, graphed)?;
        self.upload_inputs(seqs, shape)?;
        shape.cascade = self.upload_groups(seqs, groups, shape)?;
        let greedy = rows.is_none();
        if let Some(rows) = rows {
            // Padding rows of a decode bucket sample greedily; their ids are dropped.
            let mut padded = rows.to_vec();
            padded.resize(shape.seqs, SamplingRow::greedy());
            let b = self.bufs.as_mut().expect("allocated");
            b.sampling.write(&self.dev, &padded).map_err(cuda)?;
        }
        if graphed {
            let key = (shape.seqs, shape.width, greedy);
            if !self.graphs.contains_key(&key) {
                let graph = self.capture(shape, greedy)?;
                self.graphs.insert(key, graph);
            }
            self.graphs[&key].launch().map_err(|e| {
                cuda(CudaError::Driver {
                    op: "graph launch",
                    source: e,
                })
            })?;
        } else {
            self.enqueue_forward(shape).map_err(cuda)?;
            self.enqueue_choice(shape, greedy).map_err(cuda)?;
        }
        let b = self.bufs.as_ref().expect("allocated");
        let ids = self
            .dev
            .download(&b.out_ids.slice(..seqs.len()))
            .map_err(cuda)?;
        Ok(ids)
    }

    /// Enqueue the token choice over `bufs.logits` into `bufs.out_ids`.
    fn enqueue_choice(
        &mut self,
        shape: StepShape,
        greedy: bool,
    ) -> std::result::Result<(), CudaError> {
        let vocab = self.config.vocab_size;
        let b = self.bufs.as_mut().expect("allocated");
        let logits = b.logits.slice(..shape.seqs * vocab);
        let out = &mut b.out_ids.slice_mut(..shape.seqs);
        if greedy {
            self.dev.argmax(&logits, shape.seqs, vocab, out)
        } else {
            self.dev
                .sample(&logits, shape.seqs, vocab, &b.sampling, out)
        }
    }

    /// Record one decode step (forward + token choice) for `shape` as a CUDA graph.
    fn capture(&mut self, shape: StepShape, greedy: bool) -> Result<CudaGraph> {
        // Warm up outside the capture: lazy module loads and cuBLASLt heuristics must not happen inside it.
        self.enqueue_forward(shape).map_err(cuda)?;
        self.enqueue_choice(shape, greedy).map_err(cuda)?;
        self.dev.synchronize().map_err(cuda)?;
        let stream = self.dev.stream().clone();
        let driver = |op: &'static str| move |e| cuda(CudaError::Driver { op, source: e });
        stream
            .begin_capture(cudarc_capture_mode())
            .map_err(driver("graph capture start"))?;
        let recorded = self
            .enqueue_forward(shape)
            .and_then(|_| self.enqueue_choice(shape, greedy));
        let graph = stream
            .end_capture(braid_kernels::cuda::GraphFlags(0))
            .map_err(driver("graph capture end"))?;
        recorded.map_err(cuda)?;
        let graph = graph
            .ok_or_else(|| ModelError::Forward("CUDA graph capture recorded nothing".into()))?;
        tracing::debug!(
            batch = shape.seqs,
            width = shape.width,
            greedy,
            "captured a decode graph"
        );
        Ok(graph)
    }
}

fn cudarc_capture_mode() -> braid_kernels::cuda::CaptureMode {
    braid_kernels::cuda::CaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
}

/// f32 → storage dtype, rounding to nearest.
pub(crate) trait Convert: bytemuck::Pod + Send + Sync {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Convert for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Convert for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_cover_every_batch_size_with_little_padding() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65].map(bucket),
            [1, 2, 4, 4, 8, 8, 16, 16, 32, 64, 80]
        );
    }
}
