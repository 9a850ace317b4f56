//! The forward pass on an NVIDIA GPU: the same LLaMA-family block as `model.rs`, with weights and
//! the paged KV cache in bf16 or f16 on the device, our kernels for everything but the large GEMMs
//! (cuBLASLt), greedy sampling on the device so only token ids come back, and decode steps captured
//! as CUDA graphs per batch-size bucket and replayed; so are the prefill steps of one sequence of
//! up to `GRAPH_PREFILL_MAX_TOKENS` tokens (a prompt, or the next message of a conversation),
//! padded to a token bucket.
//!
//! Steps of up to [`FUSED_STEP_MAX_TOKENS`] tokens fold each RMSNorm (with the residual add
//! before it) into the projection that follows, and SiLU·mul into the down projection, saving
//! three kernels per layer. Loading checks those fused kernels against the
//! unfused ones on every layer and keeps the unfused path if any layer disagrees
//! ([`CudaModel::fused_norm_status`]). Larger steps of 5–64 tokens on Hopper fold SiLU·mul into
//! the gate|up projection instead ([`CudaDevice::linear_gate_up_silu`]). Plain decode steps (no
//! cascade groups) of up to 64 sequences also fold the RoPE step into decode attention.

use std::sync::Arc;

use braid_kernels::cuda::cascade::{CascadeBounds, CascadeGrid};
use braid_kernels::cuda::{
    AttentionParams, CudaDevice, CudaError, CudaGraph, CudaSlice, DecodeRope, KernelFloat,
    RopeParams, SamplingBuffers, SamplingRow, SKIP_SLOT,
};
use braid_kernels::DType;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::checkpoint::{HostEnds, HostLayer};
use crate::config::ModelConfig;
use crate::cuda_inputs::{Field, StepInputs};
use crate::error::{ModelError, Result};
use crate::graph_cache::GraphCache;
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

/// Whether small steps run the fused norm and activation projections, and what the load-time
/// self-check found.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedNormStatus {
    /// Steps of up to this many tokens (at most [`FUSED_STEP_MAX_TOKENS`]) fold the RMSNorms
    /// into the QKV and gate/up projections and SiLU·mul into the down projection; 0 when the
    /// fused path is off.
    pub max_tokens: usize,
    /// Largest relative L2 difference between the fused and unfused outputs over every layer
    /// of the self-check; 0 when the check did not run.
    pub max_rel_err: f32,
    /// Why the fused path is off; `None` when it is on.
    pub reason: Option<String>,
}

/// Largest step that runs the fused projections. Every block of a fused projection recomputes
/// the norm (or activation) of all the step's rows, so the fusion pays only while that is
/// cheaper than a kernel launch. Measured on an H100 with the Qwen3-0.6B shape (µs saved per
/// layer by the three fused kernels, CUDA-graph replays): 2.3 at 1 token, 1.7 at 2, 0.0 at 4,
/// -3.8 at 8, -12 at 16; decode tok/s fused vs unfused: +5% at batch 1 and 2, +1.4% at 4,
/// -8% at 8, -18% at 16.
pub const FUSED_STEP_MAX_TOKENS: usize = 4;

/// Environment variable that, set to anything but `0` or an empty value, keeps every step on
/// the unfused kernels (for A/B measurements).
pub const DISABLE_FUSED_NORM_ENV: &str = "BRAID_DISABLE_FUSED_NORM";

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

    /// Whether small steps run the fused norm and activation projections; decided when the model
    /// was loaded.
    pub fn fused_norm_status(&self) -> FusedNormStatus {
        match &self.inner {
            Inner::Bf16(r) => r.fused.clone(),
            Inner::F16(r) => r.fused.clone(),
        }
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
    /// cascade attention. [`CudaModel::launch_sample`] followed by [`CudaModel::sampled`].
    pub fn forward_sample(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
        rows: Option<&[SamplingRow]>,
    ) -> Result<Vec<u32>> {
        self.launch_sample(seqs, groups, rows)?;
        self.sampled(seqs.len())
    }

    /// Starts [`CudaModel::forward_sample`]'s step and returns without waiting for the GPU, so
    /// the host can work while it computes; [`CudaModel::sampled`] waits for the ids. Work
    /// enqueued in between (block copies, reads) runs after the step.
    pub fn launch_sample(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
        rows: Option<&[SamplingRow]>,
    ) -> Result<()> {
        with_runner!(self, r => r.launch_sample(seqs, groups, rows))
    }

    /// The ids chosen by the last [`CudaModel::launch_sample`] for its `count` sequences, once
    /// the GPU has computed them.
    pub fn sampled(&mut self, count: usize) -> Result<Vec<u32>> {
        with_runner!(self, r => r.sampled(count))
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
    /// Token ids, positions, slots, tables and the rest of a step's small inputs.
    inputs: StepInputs,
    /// Cascade attention's scratch, grown to the largest step seen.
    cascade_workspace: Option<CudaSlice<f32>>,
    residual: CudaSlice<T>,
    /// The residual stream's second buffer on fused steps: a fused projection reads the
    /// residual from one buffer and writes the updated one to the other.
    residual_alt: CudaSlice<T>,
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
    /// Partials of prefill attention split over the keys (a short message after a long
    /// conversation).
    prefill_workspace: CudaSlice<f32>,
}

/// Row widths of a step's activations, from the model config.
#[derive(Clone, Copy)]
struct Widths {
    hidden: usize,
    q: usize,
    qkv: usize,
    inter: usize,
    vocab: usize,
}

type CudaResult = std::result::Result<(), CudaError>;

impl Widths {
    fn of(c: &ModelConfig) -> Widths {
        let q = c.num_heads * c.head_dim;
        Widths {
            hidden: c.hidden_size,
            q,
            qkv: q + 2 * c.num_kv_heads * c.head_dim,
            inter: c.intermediate_size,
            vocab: c.vocab_size,
        }
    }
}

/// The projections a step runs unfused, each from one step buffer into another.
#[derive(Clone, Copy)]
enum Projection {
    /// `qkv = normed · W_qkvᵀ (+ bias)`
    Qkv,
    /// `proj = attn · W_oᵀ`
    O,
    /// `gate_up = normed · W_gate|upᵀ`. Steps run it inside [`CudaDevice::linear_gate_up_silu`]
    /// (its two-step path); on its own it only warms up the cuBLASLt plans that path uses.
    GateUp,
    /// `proj = act · W_downᵀ`
    Down,
}

/// Projections over the first `n` rows of the step buffers. Each reads model weights no kernel
/// writes, so each may start streaming them while the previous kernel finishes (programmatic
/// dependent launch).
impl<T: KernelFloat> Buffers<T> {
    fn project(
        &mut self,
        d: &CudaDevice,
        layer: &Layer<T>,
        projection: Projection,
        n: usize,
        w: Widths,
    ) -> CudaResult {
        let (x, k, weight, m, out) = match projection {
            Projection::Qkv => (&self.normed, w.hidden, &layer.qkv, w.qkv, &mut self.qkv),
            Projection::O => (&self.attn, w.q, &layer.o_proj, w.hidden, &mut self.proj),
            Projection::GateUp => (
                &self.normed,
                w.hidden,
                &layer.gate_up,
                2 * w.inter,
                &mut self.gate_up,
            ),
            Projection::Down => (&self.act, w.inter, &layer.down, w.hidden, &mut self.proj),
        };
        let bias = match projection {
            Projection::Qkv => layer.qkv_bias.as_ref().map(|b| b.slice(..)),
            _ => None,
        };
        let out = &mut out.slice_mut(..n * m);
        d.linear_overlapped(&x.slice(..n * k), n, k, weight, m, bias.as_ref(), None, out)
    }

    /// `logits = x · W_headᵀ` over `rows` rows of `x`: `normed` in a decode step (every row is a
    /// sequence's last), `last` (the gathered last rows) otherwise.
    fn project_logits(
        &mut self,
        d: &CudaDevice,
        head: &CudaSlice<T>,
        rows: usize,
        gathered: bool,
        w: Widths,
    ) -> CudaResult {
        let x = if gathered { &self.last } else { &self.normed };
        let out = &mut self.logits.slice_mut(..rows * w.vocab);
        d.linear_overlapped(
            &x.slice(..rows * w.hidden),
            rows,
            w.hidden,
            head,
            w.vocab,
            None,
            None,
            out,
        )
    }
}

/// A decode step's cascade groups as the kernels read them, and their shape.
struct CascadeGroups {
    /// `group_starts`: each group's first row, then the end of the last group.
    starts: Vec<u32>,
    /// `prefix_lens`: each group's shared prefix length.
    prefix: Vec<u32>,
    step: CascadeStep,
}

/// What a step looks like to the kernels.
#[derive(Clone, Copy, PartialEq, Eq)]
struct StepShape {
    tokens: usize,
    seqs: usize,
    /// Block-table row width.
    width: usize,
    max_q_len: usize,
    /// A decode step with cascade groups (uploaded as `Field::GroupStarts` / `PrefixLens`).
    cascade: Option<CascadeStep>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct CascadeStep {
    num_groups: usize,
    bounds: CascadeBounds,
    /// What the kernels' launches depend on besides the group count.
    grid: CascadeGrid,
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
    /// Step graphs by step shape and token choice, at most [`GRAPH_CACHE_CAPACITY`].
    graphs: GraphCache<GraphKey, CudaGraph>,
    fused: FusedNormStatus,
}

/// What a captured graph was recorded for: the padded token count (the batch size of a decode
/// step), the padded batch size, the block-table width, greedy or sampled choice, and for cascade
/// steps the group count and the kernels' grid (steps whose bounds differ but give the same grid
/// launch the same work).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct GraphKey {
    tokens: usize,
    seqs: usize,
    width: usize,
    greedy: bool,
    /// `(num_groups, grid)`.
    cascade: Option<(usize, CascadeGrid)>,
}

impl GraphKey {
    /// Whether a graph of `other` ran the same kernels on the same row counts, so every kernel
    /// module, cuBLASLt plan and scratch buffer a capture of `self` needs is ready: decode steps
    /// (one token a sequence) that differ at most in the block-table width, which sizes only
    /// grids. (A prefill step's width can choose a split-key attention kernel.)
    fn same_kernels_as(&self, other: &GraphKey) -> bool {
        self.tokens == self.seqs
            && GraphKey {
                width: other.width,
                ..*self
            } == *other
    }
}

/// Most step graphs kept at once. A graph holds a few hundred kernel launches; the distinct step
/// shapes of a long-running server (batch buckets × table widths × greedy or sampled, plus
/// cascade group counts and grids) are not bounded otherwise.
const GRAPH_CACHE_CAPACITY: usize = 256;

/// Largest plain decode step whose attention kernel also does the RoPE step. Measured on an
/// H100 (Qwen3-0.6B shape): folding it in gains 2–4% at batch 1 and 1.5% at 64, where the
/// separate RoPE kernel was mostly hidden by programmatic dependent launch anyway, and loses
/// 3.5% at 256, where every attention block's extra rotation work delays its loads.
const FOLD_ROPE_MAX_SEQS: usize = 64;

/// Longest prefill step of one sequence that runs as a CUDA graph. Launched kernel by kernel, a
/// short prefill is bound by the host's launches (about ten a layer): on an H100 with the
/// Qwen3-0.6B shape a 16-token prompt took 1.32 ms to its first token, 41 µs a layer, where a
/// graphed decode step spends 33 µs a layer on five kernels. Longer steps are bound by the GPU.
const GRAPH_PREFILL_MAX_TOKENS: usize = 512;

/// Token counts prefill graphs are captured for: powers of two from 16 to 64, then multiples of
/// 64. The padding rows compute nothing that reaches the real ones (no KV write, no attention
/// row, every other kernel works row by row), so a bucket costs only what its extra rows cost
/// the projections, which at these sizes is little.
fn prefill_bucket(tokens: usize) -> usize {
    if tokens <= 64 {
        tokens.next_power_of_two().max(16)
    } else {
        tokens.div_ceil(64) * 64
    }
}

/// How a step's rows are padded: not at all (launched kernel by kernel), to a decode batch
/// bucket, or to a prefill token bucket (both replayed from graphs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Padding {
    None,
    Decode,
    Prefill,
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
        let mut runner = Runner {
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
            graphs: GraphCache::new(GRAPH_CACHE_CAPACITY),
            fused: FusedNormStatus {
                max_tokens: 0,
                max_rel_err: 0.0,
                reason: Some("not checked yet".into()),
            },
        };
        runner.fused = runner.choose_fused_path();
        Ok(runner)
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
        // The copy refuses a block onto itself or outside the caches.
        let mut caches: Vec<&mut CudaSlice<T>> =
            self.kv.iter_mut().flat_map(|(k, v)| [k, v]).collect();
        self.dev
            .copy_cache_block(&mut caches, elems, src, dst)
            .map_err(cuda)?;
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
            inputs: StepInputs::new(d, n, s, width).map_err(cuda)?,
            cascade_workspace: None,
            residual: alloc_t(n * h)?,
            residual_alt: alloc_t(n.min(FUSED_STEP_MAX_TOKENS) * h)?,
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
            prefill_workspace: d
                .alloc_zeros::<f32>(CudaDevice::paged_attention_prefill_workspace_len(
                    self.config.head_dim,
                ))
                .map_err(cuda)?,
        });
        self.warm_up_projections().map_err(cuda)
    }

    /// Runs every projection of a step once per cuBLASLt plan bucket of row counts the buffers
    /// hold (layer 0's weights, the step buffers, the forward pass's bias and alignment), so
    /// the first use of each bucket, a few milliseconds of cuBLASLt host time (and about 0.6 s
    /// for the first of all), happens at load instead of inside a request's prefill or a
    /// graph capture. The outputs are scratch.
    fn warm_up_projections(&mut self) -> CudaResult {
        let w = Widths::of(&self.config);
        let d = &*self.dev;
        let b = self.bufs.as_mut().expect("allocated above");
        let layer = &self.layers[0];
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let max_rows = b.cache.max_batch_tokens.max(b.cache.max_seqs);
        for n in CudaDevice::linear_warm_up_rows(max_rows) {
            for projection in [
                Projection::Qkv,
                Projection::O,
                Projection::GateUp,
                Projection::Down,
            ] {
                b.project(d, layer, projection, n, w)?;
            }
        }
        // The LM head runs over one row per sequence.
        for s in CudaDevice::linear_warm_up_rows(b.cache.max_seqs) {
            b.project_logits(d, head, s, true, w)?;
        }
        d.synchronize()
    }

    /// Stage and upload a step's inputs with one copy; for a decode step with cascade groups
    /// also its groups (see [`Runner::cascade_groups`]), returning their shape. Padding rows (up
    /// to `shape.seqs` sequences) read block 0 and write no KV.
    fn upload_inputs(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
        shape: StepShape,
    ) -> Result<Option<CascadeStep>> {
        let cascade = self.cascade_groups(seqs, groups, shape)?;
        let bufs = self
            .bufs
            .as_mut()
            .ok_or_else(|| ModelError::Forward("CUDA buffers were not allocated".into()))?;
        let bs = bufs.cache.block_size;
        let mut staged = bufs
            .inputs
            .stage(shape.tokens, shape.seqs, shape.width)
            .map_err(cuda)?;
        let mut row = 0;
        for (i, s) in seqs.iter().enumerate() {
            let end = s.start_pos + s.tokens.len();
            let rows = row..row + s.tokens.len();
            staged.get(Field::Ids)[rows.clone()].copy_from_slice(s.tokens);
            for (r, pos) in rows.zip(s.start_pos..end) {
                staged.get(Field::Positions)[r] = pos as u32;
                staged.get(Field::Slots)[r] =
                    s.block_table[pos / bs] * bs as u32 + (pos % bs) as u32;
            }
            row += s.tokens.len();
            let used = end.div_ceil(bs);
            staged.get(Field::BlockTables)[i * shape.width..i * shape.width + used]
                .copy_from_slice(&s.block_table[..used]);
            staged.get(Field::ContextLens)[i] = end as u32;
            staged.get(Field::QStarts)[i + 1] = row as u32;
            staged.get(Field::LastRows)[i] = row as u32 - 1;
        }
        // Padding rows (graph buckets): token 0 at position 0 (already zero), KV write skipped,
        // in no sequence's `q_starts` range. A padded decode step's extra sequences each own one
        // such row (row i is sequence i's) and read block 0.
        staged.get(Field::Slots)[row..].fill(SKIP_SLOT);
        staged.get(Field::QStarts)[seqs.len() + 1..].fill(row as u32);
        for (i, last) in staged
            .get(Field::LastRows)
            .iter_mut()
            .enumerate()
            .skip(seqs.len())
        {
            *last = i as u32;
        }
        if let Some(c) = &cascade {
            staged.get(Field::GroupStarts)[..c.starts.len()].copy_from_slice(&c.starts);
            staged.get(Field::PrefixLens)[..c.prefix.len()].copy_from_slice(&c.prefix);
        }
        bufs.inputs.upload(&self.dev).map_err(cuda)?;
        Ok(cascade.map(|c| c.step))
    }

    /// The cascade groups of a decode step as `group_starts` and `prefix_lens`: every run of
    /// sequences before a group becomes groups of one without a shared prefix, so the groups
    /// tile the batch up to the last one. Grows the scratch to the step's bounds. `None` when
    /// there are no groups.
    fn cascade_groups(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
        shape: StepShape,
    ) -> Result<Option<CascadeGroups>> {
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
        let c = &self.config;
        let b = self
            .bufs
            .as_mut()
            .ok_or_else(|| ModelError::Forward("CUDA buffers were not allocated".into()))?;
        // The bounds size the grids, never the results, and graphs are keyed by the grid, which
        // changes at only a few suffix lengths: a group decoding token after token replays one
        // graph for hundreds of steps.
        let max_suffix = seqs
            .iter()
            .zip(&shared)
            .map(|(s, &p)| s.start_pos + s.tokens.len() - p)
            .max()
            .unwrap_or(1);
        let bounds = CascadeBounds {
            max_group_size: groups.iter().map(|g| g.seqs.len()).max().unwrap_or(1),
            max_prefix_tokens: groups.iter().map(|g| g.shared_tokens).max().unwrap_or(0),
            max_suffix_tokens: max_suffix,
        };
        // Only the geometry sizes the scratch; scale and window do not.
        let params = AttentionParams {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: b.cache.block_size,
            max_blocks_per_seq: shape.width,
            scale: 1.0,
            sliding_window: 0,
        };
        let need = CudaDevice::cascade_attention_decode_workspace_len(
            shape.seqs,
            prefix.len(),
            &params,
            &bounds,
        )
        .max(1);
        if b.cascade_workspace.as_ref().is_none_or(|w| w.len() < need) {
            // Graphs recorded the old buffer's address.
            self.graphs.retain(|key| key.cascade.is_none());
            b.cascade_workspace = None; // free the old one first
            b.cascade_workspace = Some(self.dev.alloc_zeros::<f32>(need).map_err(cuda)?);
        }
        let step = CascadeStep {
            num_groups: prefix.len(),
            bounds,
            grid: bounds.grid(shape.seqs, prefix.len(), &params),
        };
        Ok(Some(CascadeGroups {
            starts,
            prefix,
            step,
        }))
    }

    /// How a step of `seqs` is padded: decode steps to a batch bucket; a single sequence's
    /// prefill of up to [`GRAPH_PREFILL_MAX_TOKENS`] tokens to a token bucket the buffers hold;
    /// anything else not at all.
    fn padding(&self, seqs: &[SeqInput<'_>]) -> Padding {
        let max_tokens = self.bufs.as_ref().map_or(0, |b| b.cache.max_batch_tokens);
        match seqs {
            _ if seqs.iter().all(|s| s.tokens.len() == 1) => Padding::Decode,
            [s] if s.tokens.len() <= GRAPH_PREFILL_MAX_TOKENS
                && prefill_bucket(s.tokens.len()) <= max_tokens =>
            {
                Padding::Prefill
            }
            _ => Padding::None,
        }
    }

    fn step_shape(&self, seqs: &[SeqInput<'_>], padding: Padding) -> Result<StepShape> {
        let bufs = self
            .bufs
            .as_ref()
            .ok_or_else(|| ModelError::Forward("CUDA buffers were not allocated".into()))?;
        let cache = bufs.cache;
        let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let n_seqs = if padding == Padding::Decode {
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
        // A graph's grids must cover every step replayed in its bucket.
        let (tokens, max_q_len) = match padding {
            Padding::None => (tokens, max_q_len),
            Padding::Decode => (n_seqs, 1),
            Padding::Prefill => (prefill_bucket(tokens), prefill_bucket(tokens)),
        };
        Ok(StepShape {
            tokens,
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
        let widths = Widths::of(c);
        let (h, hd, q_dim) = (widths.hidden, c.head_dim, widths.q);
        let (qkv_dim, inter) = (widths.qkv, widths.inter);
        let eps = c.rms_norm_eps;
        let n = shape.tokens;
        let d = &*self.dev;
        let b = self.bufs.as_mut().expect("allocated before any step");
        let decode = shape.max_q_len == 1;
        // Small steps fold each norm into the projection after it; the residual stream then
        // alternates between two buffers (0: `residual`, 1: `residual_alt`), `cur` holding it.
        let fused = n <= self.fused.max_tokens;
        let mut cur = 0usize;

        d.embedding(
            &self.embed,
            &b.inputs.view(Field::Ids, n),
            &mut b.residual.slice_mut(..n * h),
            h,
        )?;
        if !fused {
            d.rms_norm(
                &b.residual.slice(..n * h),
                &self.layers[0].attn_norm,
                &mut b.normed.slice_mut(..n * h),
                n,
                h,
                eps,
            )?;
        }
        // Every projection reads model weights that no kernel writes, so each may start streaming
        // them while the previous kernel finishes (programmatic dependent launch).
        for (li, layer) in self.layers.iter().enumerate() {
            let qkv_bias = layer.qkv_bias.as_ref().map(|x| x.slice(..));
            if fused {
                // Layer 0 normalises the embeddings as they are; later layers first add the
                // previous layer's down projection to the residual.
                let (src, dst) = if cur == 0 {
                    (&b.residual, &mut b.residual_alt)
                } else {
                    (&b.residual_alt, &mut b.residual)
                };
                let delta = b.proj.slice(..n * h);
                d.add_rms_norm_linear(
                    &src.slice(..n * h),
                    (li > 0).then_some(&delta),
                    &layer.attn_norm,
                    eps,
                    n,
                    h,
                    &layer.qkv,
                    qkv_dim,
                    qkv_bias.as_ref(),
                    (li > 0).then(|| dst.slice_mut(..n * h)).as_mut(),
                    &mut b.qkv.slice_mut(..n * qkv_dim),
                )?;
                if li > 0 {
                    cur ^= 1;
                }
            } else {
                b.project(d, layer, Projection::Qkv, n, widths)?;
            }
            let (k_cache, v_cache) = &mut self.kv[li];
            let p = AttentionParams {
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: hd,
                block_size: b.cache.block_size,
                max_blocks_per_seq: shape.width,
                scale: 1.0 / (hd as f32).sqrt(),
                sliding_window: layer.window,
            };
            let tables = b.inputs.view(Field::BlockTables, shape.seqs * shape.width);
            let lens = b.inputs.view(Field::ContextLens, shape.seqs);
            let q_norm = layer.q_norm.as_ref().map(|x| x.slice(..));
            let k_norm = layer.k_norm.as_ref().map(|x| x.slice(..));
            if decode && shape.cascade.is_none() && shape.seqs <= FOLD_ROPE_MAX_SEQS {
                // Plain decode attention does the RoPE step itself.
                let rope = DecodeRope {
                    qkv: b.qkv.slice(..n * qkv_dim),
                    positions: b.inputs.view(Field::Positions, n),
                    slot_mapping: b.inputs.view(Field::Slots, n),
                    inv_freq: self.inv_freq.slice(..),
                    q_norm,
                    k_norm,
                    eps,
                };
                d.paged_attention_decode_rope(
                    &rope,
                    k_cache,
                    v_cache,
                    &tables,
                    &lens,
                    &mut b.attn.slice_mut(..n * q_dim),
                    &mut b.attn_workspace,
                    &p,
                )?;
            } else {
                d.rope_qk_norm_kv_write(
                    &b.qkv.slice(..n * qkv_dim),
                    &b.inputs.view(Field::Positions, n),
                    &b.inputs.view(Field::Slots, n),
                    &self.inv_freq,
                    q_norm.as_ref(),
                    k_norm.as_ref(),
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
                if let Some(cascade) = shape.cascade {
                    let g = cascade.num_groups;
                    d.cascade_attention_decode(
                        &b.q.slice(..n * q_dim),
                        &*k_cache,
                        &*v_cache,
                        &tables,
                        &lens,
                        &b.inputs.view(Field::GroupStarts, g + 1),
                        &b.inputs.view(Field::PrefixLens, g),
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
                        &b.inputs.view(Field::QStarts, shape.seqs + 1),
                        &lens,
                        &mut b.attn.slice_mut(..n * q_dim),
                        &mut b.prefill_workspace,
                        shape.seqs,
                        shape.max_q_len,
                        &p,
                    )?;
                }
            }
            b.project(d, layer, Projection::O, n, widths)?;
            if fused {
                let (src, dst) = if cur == 0 {
                    (&b.residual, &mut b.residual_alt)
                } else {
                    (&b.residual_alt, &mut b.residual)
                };
                d.add_rms_norm_linear(
                    &src.slice(..n * h),
                    Some(&b.proj.slice(..n * h)),
                    &layer.mlp_norm,
                    eps,
                    n,
                    h,
                    &layer.gate_up,
                    2 * inter,
                    None,
                    Some(&mut dst.slice_mut(..n * h)),
                    &mut b.gate_up.slice_mut(..n * 2 * inter),
                )?;
                cur ^= 1;
                d.silu_mul_linear(
                    &b.gate_up.slice(..n * 2 * inter),
                    n,
                    inter,
                    &layer.down,
                    h,
                    None,
                    &mut b.proj.slice_mut(..n * h),
                )?;
                continue;
            }
            d.fused_add_rms_norm(
                &b.proj.slice(..n * h),
                &mut b.residual.slice_mut(..n * h),
                &layer.mlp_norm,
                &mut b.normed.slice_mut(..n * h),
                n,
                h,
                eps,
            )?;
            // One kernel with SiLU·mul in its epilogue at 5–64 rows on Hopper; elsewhere the
            // gate|up projection into `gate_up`, then the activation kernel.
            d.linear_gate_up_silu(
                &b.normed.slice(..n * h),
                n,
                h,
                &layer.gate_up,
                inter,
                &mut b.gate_up.slice_mut(..n * 2 * inter),
                &mut b.act.slice_mut(..n * inter),
            )?;
            b.project(d, layer, Projection::Down, n, widths)?;
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
        if fused {
            // The final norm stays a kernel of its own: folded into the LM head, each of its
            // thousands of blocks would recompute it.
            let residual = if cur == 0 {
                &mut b.residual
            } else {
                &mut b.residual_alt
            };
            d.fused_add_rms_norm(
                &b.proj.slice(..n * h),
                &mut residual.slice_mut(..n * h),
                &self.norm,
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
        if !decode {
            d.embedding(
                &b.normed.slice(..n * h),
                &b.inputs.view(Field::LastRows, s),
                &mut b.last.slice_mut(..s * h),
                h,
            )?;
        }
        b.project_logits(d, head, s, !decode, widths)
    }

    fn forward_logits(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
    ) -> Result<Vec<Vec<f32>>> {
        let mut shape = self.step_shape(seqs, Padding::None)?;
        shape.cascade = self.upload_inputs(seqs, groups, shape)?;
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

    fn launch_sample(
        &mut self,
        seqs: &[SeqInput<'_>],
        groups: &[SharedPrefixGroup],
        rows: Option<&[SamplingRow]>,
    ) -> Result<()> {
        let padding = self.padding(seqs);
        let graphed = padding != Padding::None;
        let mut shape = self.step_shape(seqs, padding)?;
        shape.cascade = self.upload_inputs(seqs, groups, shape)?;
        let greedy = rows.is_none();
        if let Some(rows) = rows {
            // Padding rows of a decode bucket sample greedily; their ids are dropped.
            let mut padded = rows.to_vec();
            padded.resize(shape.seqs, SamplingRow::greedy());
            let b = self.bufs.as_mut().expect("allocated");
            b.sampling.write(&self.dev, &padded).map_err(cuda)?;
        }
        if graphed {
            let key = GraphKey {
                tokens: shape.tokens,
                seqs: shape.seqs,
                width: shape.width,
                greedy,
                cascade: shape.cascade.map(|c| (c.num_groups, c.grid)),
            };
            if self.graphs.get(&key).is_none() {
                let warm = self.graphs.keys().any(|k| k.same_kernels_as(&key));
                let graph = self.capture(shape, greedy, warm)?;
                if let Some(old) = self.graphs.insert(key, graph) {
                    tracing::debug!(
                        batch = old.seqs,
                        width = old.width,
                        greedy = old.greedy,
                        "dropped the least recently used step graph"
                    );
                }
            }
            let graph = self.graphs.get(&key).expect("inserted above");
            graph.launch().map_err(|e| {
                cuda(CudaError::Driver {
                    op: "graph launch",
                    source: e,
                })
            })?;
        } else {
            self.enqueue_forward(shape).map_err(cuda)?;
            self.enqueue_choice(shape, greedy).map_err(cuda)?;
        }
        Ok(())
    }

    fn sampled(&mut self, count: usize) -> Result<Vec<u32>> {
        let b = self
            .bufs
            .as_ref()
            .ok_or_else(|| ModelError::Forward("CUDA buffers were not allocated".into()))?;
        if count > b.out_ids.len() {
            return Err(ModelError::Forward(format!(
                "{count} sampled ids asked for, where a step holds at most {}",
                b.out_ids.len()
            )));
        }
        self.dev.download(&b.out_ids.slice(..count)).map_err(cuda)
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

    /// Records one step (forward + token choice) for `shape` as a CUDA graph. `warm`: a step with
    /// the same kernels and row counts ran before (see [`GraphKey::same_kernels_as`]), so the
    /// eager warm-up run is skipped.
    fn capture(&mut self, shape: StepShape, greedy: bool, warm: bool) -> Result<CudaGraph> {
        let started = std::time::Instant::now();
        if !warm {
            // Lazy module loads and cuBLASLt heuristics must not happen inside the capture.
            self.enqueue_forward(shape).map_err(cuda)?;
            self.enqueue_choice(shape, greedy).map_err(cuda)?;
            self.dev.synchronize().map_err(cuda)?;
        }
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
            cascade_groups = shape.cascade.map_or(0, |c| c.num_groups),
            tokens = shape.tokens,
            warm,
            ms = started.elapsed().as_secs_f64() * 1e3,
            graphs = self.graphs.len() + 1,
            device_mib = self
                .dev
                .memory_info()
                .map_or(0, |(free, total)| (total - free) >> 20),
            "captured a step graph"
        );
        Ok(graph)
    }

    /// Decides whether small steps use the fused projections: off when the environment asks
    /// for it or the kernels cannot take the model's sizes, else on if every layer's fused
    /// projections agree with the unfused kernels on calibration inputs.
    fn choose_fused_path(&self) -> FusedNormStatus {
        let off = |max_rel_err: f32, reason: String| FusedNormStatus {
            max_tokens: 0,
            max_rel_err,
            reason: Some(reason),
        };
        if std::env::var(DISABLE_FUSED_NORM_ENV).is_ok_and(|v| !v.is_empty() && v != "0") {
            return off(0.0, format!("disabled by {DISABLE_FUSED_NORM_ENV}"));
        }
        let max_tokens = self.fused_max_tokens();
        if max_tokens == 0 {
            let c = &self.config;
            return off(
                0.0,
                format!(
                    "the fused kernels cannot take hidden size {} and intermediate size {} in {} on this GPU",
                    c.hidden_size,
                    c.intermediate_size,
                    T::SUFFIX
                ),
            );
        }
        match self.check_fused(max_tokens) {
            Ok(check) => {
                let tolerance = fused_tolerance::<T>();
                match check.worst {
                    Some((what, err)) if err.is_nan() || err > tolerance => {
                        tracing::warn!(
                            check = %what,
                            rel_l2 = err,
                            tolerance,
                            "fused norm projections disagree with the unfused kernels; using the unfused path"
                        );
                        off(
                            check.max_rel_err,
                            format!(
                                "{what}: fused and unfused outputs differ by rel. L2 {err:.2e}, above the {tolerance:.0e} tolerance"
                            ),
                        )
                    }
                    _ => {
                        tracing::info!(
                            max_rel_err = check.max_rel_err,
                            max_tokens,
                            "fused norm projections agree with the unfused kernels"
                        );
                        FusedNormStatus {
                            max_tokens,
                            max_rel_err: check.max_rel_err,
                            reason: None,
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "fused norm self-check could not run; using the unfused path");
                off(0.0, format!("the self-check could not run: {e}"))
            }
        }
    }

    /// Largest step (at most [`FUSED_STEP_MAX_TOKENS`] tokens) whose fused projections fit
    /// this GPU for this model's hidden and intermediate sizes, or 0.
    fn fused_max_tokens(&self) -> usize {
        let c = &self.config;
        let d = &self.dev;
        (1..=FUSED_STEP_MAX_TOKENS.min(CudaDevice::FUSED_LINEAR_MAX_TOKENS))
            .rev()
            .find(|&n| {
                d.fused_linear_fits::<T>(n, c.hidden_size)
                    && d.fused_linear_fits::<T>(n, c.intermediate_size)
            })
            .unwrap_or(0)
    }

    /// Runs every layer's fused projections and their unfused equivalents (norm kernel, then
    /// the projection) on calibration inputs of 1 and `max_tokens` rows, with the layer's real
    /// norm weights, and reports the largest relative L2 difference and where it occurred.
    fn check_fused(&self, max_tokens: usize) -> std::result::Result<FusedCheck, CudaError> {
        let c = &self.config;
        let (h, inter, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let qkv_dim = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        let d = &*self.dev;
        let mut check = FusedCheck::default();
        let mut sizes = vec![1, max_tokens];
        sizes.dedup();
        for n in sizes {
            let calib = Calibration::new(n, h, inter, n as u64);
            let up = |v: &[f32]| d.upload(&v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>());
            let residual = up(&calib.residual)?;
            let delta = up(&calib.delta)?;
            let gate_up = up(&calib.gate_up)?;
            let mut residual_fused = d.alloc_zeros::<T>(n * h)?;
            let mut residual_unfused = d.alloc_zeros::<T>(n * h)?;
            let mut normed = d.alloc_zeros::<T>(n * h)?;
            let mut act = d.alloc_zeros::<T>(n * inter)?;
            let widest = qkv_dim.max(2 * inter).max(h);
            let mut fused = d.alloc_zeros::<T>(n * widest)?;
            let mut unfused = d.alloc_zeros::<T>(n * widest)?;

            for (li, layer) in self.layers.iter().enumerate() {
                let qkv_bias = layer.qkv_bias.as_ref().map(|x| x.slice(..));
                let norms = [
                    (
                        "attention norm + QKV",
                        &layer.attn_norm,
                        &layer.qkv,
                        qkv_dim,
                        qkv_bias,
                    ),
                    (
                        "MLP norm + gate/up",
                        &layer.mlp_norm,
                        &layer.gate_up,
                        2 * inter,
                        None,
                    ),
                ];
                for (what, norm, w, m, bias) in norms {
                    d.add_rms_norm_linear(
                        &residual,
                        Some(&delta.slice(..)),
                        norm,
                        eps,
                        n,
                        h,
                        w,
                        m,
                        bias.as_ref(),
                        Some(&mut residual_fused.slice_mut(..)),
                        &mut fused.slice_mut(..n * m),
                    )?;
                    d.stream()
                        .memcpy_dtod(&residual, &mut residual_unfused)
                        .map_err(|source| CudaError::Driver {
                            op: "device-to-device copy",
                            source,
                        })?;
                    d.fused_add_rms_norm(
                        &delta,
                        &mut residual_unfused,
                        norm,
                        &mut normed,
                        n,
                        h,
                        eps,
                    )?;
                    d.linear(
                        &normed,
                        n,
                        h,
                        w,
                        m,
                        bias.as_ref(),
                        None,
                        &mut unfused.slice_mut(..n * m),
                    )?;
                    let err = rel_l2(
                        &d.download(&fused.slice(..n * m))?,
                        &d.download(&unfused.slice(..n * m))?,
                    )
                    .max(rel_l2(
                        &d.download(&residual_fused)?,
                        &d.download(&residual_unfused)?,
                    ));
                    check.record(format!("layer {li} {what}, {n} rows"), err);
                }
                d.silu_mul_linear(
                    &gate_up,
                    n,
                    inter,
                    &layer.down,
                    h,
                    None,
                    &mut fused.slice_mut(..n * h),
                )?;
                d.silu_mul(&gate_up, &mut act, n, inter)?;
                d.linear(
                    &act,
                    n,
                    inter,
                    &layer.down,
                    h,
                    None,
                    None,
                    &mut unfused.slice_mut(..n * h),
                )?;
                let err = rel_l2(
                    &d.download(&fused.slice(..n * h))?,
                    &d.download(&unfused.slice(..n * h))?,
                );
                check.record(format!("layer {li} SiLU·mul + down, {n} rows"), err);
            }
        }
        Ok(check)
    }
}

fn cudarc_capture_mode() -> braid_kernels::cuda::CaptureMode {
    braid_kernels::cuda::CaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
}

/// What the fused-path self-check measured.
#[derive(Default)]
struct FusedCheck {
    /// The largest error seen (NaN if any comparison was NaN).
    max_rel_err: f32,
    /// Which comparison gave it.
    worst: Option<(String, f32)>,
}

impl FusedCheck {
    fn record(&mut self, what: String, err: f32) {
        // A NaN is the worst possible outcome and is never replaced.
        let worse = match &self.worst {
            None => true,
            Some((_, worst)) => !worst.is_nan() && (err.is_nan() || err > *worst),
        };
        if worse {
            self.max_rel_err = err;
            self.worst = Some((what, err));
        }
    }
}

/// Largest relative L2 difference the self-check accepts between fused and unfused outputs:
/// both round the same f32 values, so they differ only where a sum of squares added in another
/// order tips a rounding, far below this.
fn fused_tolerance<T: KernelFloat>() -> f32 {
    if T::SUFFIX == "f16" {
        2e-3
    } else {
        1e-2
    }
}

/// ‖got − want‖₂ / ‖want‖₂ over the storage dtype's values; identical non-finite values count as
/// equal, any other non-finite value as an infinite error.
fn rel_l2<T: Convert>(got: &[T], want: &[T]) -> f32 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.to_f32(), w.to_f32());
        if g.to_bits() == w.to_bits() {
            if g.is_finite() {
                norm += (w as f64).powi(2);
            }
            continue;
        }
        if !g.is_finite() || !w.is_finite() {
            return f32::INFINITY;
        }
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    if norm > 0.0 {
        (diff / norm).sqrt() as f32
    } else {
        diff.sqrt() as f32
    }
}

/// Host-side calibration activations for the self-check, scaled like a real model's: residual
/// rows of unit scale with a few outlier channels around 60 (trained models have such massive
/// activations, and they dominate the RMS), a residual update of smaller scale, and gate/up
/// projections spanning SiLU's curved region.
struct Calibration {
    residual: Vec<f32>,
    delta: Vec<f32>,
    gate_up: Vec<f32>,
}

impl Calibration {
    fn new(n: usize, hidden: usize, inter: usize, seed: u64) -> Self {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        // SplitMix64, uniform in [-1, 1).
        let mut uniform = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let outliers = [hidden / 7, hidden / 3, hidden - 1];
        let residual = (0..n * hidden)
            .map(|i| {
                let scale = if outliers.contains(&(i % hidden)) {
                    60.0
                } else {
                    1.7
                };
                scale * uniform()
            })
            .collect();
        let delta = (0..n * hidden).map(|_| 0.5 * uniform()).collect();
        let gate_up = (0..n * 2 * inter).map(|_| 4.0 * uniform()).collect();
        Calibration {
            residual,
            delta,
            gate_up,
        }
    }
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
    use super::{
        bucket, prefill_bucket, rel_l2, Calibration, FusedCheck, GraphKey, GRAPH_PREFILL_MAX_TOKENS,
    };
    use half::bf16;

    #[test]
    fn only_decode_graphs_of_another_width_count_as_warm() {
        let decode = |seqs, width, greedy| GraphKey {
            tokens: seqs,
            seqs,
            width,
            greedy,
            cascade: None,
        };
        assert!(decode(8, 64, true).same_kernels_as(&decode(8, 16, true)));
        assert!(decode(8, 64, true).same_kernels_as(&decode(8, 64, true)));
        assert!(!decode(8, 64, true).same_kernels_as(&decode(16, 64, true)));
        assert!(!decode(8, 64, true).same_kernels_as(&decode(8, 64, false)));
        // A prefill graph of one sequence: its width may pick a split-key attention kernel.
        let prefill = |width| GraphKey {
            tokens: 64,
            seqs: 1,
            width,
            greedy: true,
            cascade: None,
        };
        assert!(!prefill(64).same_kernels_as(&prefill(16)));
    }

    #[test]
    fn rel_l2_compares_storage_values_and_fails_on_new_non_finite_values() {
        let v = |xs: &[f32]| xs.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        assert_eq!(rel_l2(&v(&[1.0, 2.0]), &v(&[1.0, 2.0])), 0.0);
        let err = rel_l2(&v(&[3.0, 4.0]), &v(&[3.0, 0.0]));
        assert!((err - 4.0 / 3.0).abs() < 1e-6, "{err}");
        // The same overflow on both paths is agreement; a new one is not.
        assert_eq!(
            rel_l2(&v(&[f32::INFINITY, 1.0]), &v(&[f32::INFINITY, 1.0])),
            0.0
        );
        assert_eq!(rel_l2(&v(&[f32::NAN, 1.0]), &v(&[0.5, 1.0])), f32::INFINITY);
    }

    #[test]
    fn fused_check_keeps_the_worst_comparison_and_nan_sticks() {
        let mut check = FusedCheck::default();
        check.record("a".into(), 1e-4);
        check.record("b".into(), 3e-3);
        check.record("c".into(), 2e-3);
        assert_eq!(check.max_rel_err, 3e-3);
        assert_eq!(check.worst.as_ref().map(|w| w.0.as_str()), Some("b"));
        check.record("d".into(), f32::NAN);
        check.record("e".into(), 0.5);
        assert!(check.max_rel_err.is_nan());
        assert_eq!(check.worst.as_ref().map(|w| w.0.as_str()), Some("d"));
    }

    #[test]
    fn calibration_rows_have_outlier_channels_and_are_reproducible() {
        let a = Calibration::new(2, 64, 96, 7);
        assert_eq!(a.residual.len(), 128);
        assert_eq!(a.delta.len(), 128);
        assert_eq!(a.gate_up.len(), 2 * 2 * 96);
        assert_eq!(a.residual, Calibration::new(2, 64, 96, 7).residual);
        let largest = a.residual.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(largest > 10.0 && largest <= 60.0, "{largest}");
        assert!(a.gate_up.iter().all(|x| x.abs() <= 4.0));
    }

    #[test]
    fn prefill_buckets_hold_every_graphed_prefill() {
        assert_eq!(prefill_bucket(1), 16);
        assert_eq!(prefill_bucket(16), 16);
        assert_eq!(prefill_bucket(17), 32);
        assert_eq!(prefill_bucket(64), 64);
        assert_eq!(prefill_bucket(65), 128);
        assert_eq!(prefill_bucket(80), 128);
        assert_eq!(prefill_bucket(129), 192);
        assert_eq!(
            prefill_bucket(GRAPH_PREFILL_MAX_TOKENS),
            GRAPH_PREFILL_MAX_TOKENS
        );
        for n in 1..=GRAPH_PREFILL_MAX_TOKENS {
            let b = prefill_bucket(n);
            assert!(
                b >= n && b <= GRAPH_PREFILL_MAX_TOKENS,
                "{n} tokens in a bucket of {b}"
            );
            // At most half of a bucket above 16 tokens is padding.
            assert!(b <= 16 || 2 * n > b, "{n} tokens in a bucket of {b}");
        }
    }

    #[test]
    fn buckets_cover_every_batch_size_with_little_padding() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65].map(bucket),
            [1, 2, 4, 4, 8, 8, 16, 16, 32, 64, 80]
        );
    }
}
