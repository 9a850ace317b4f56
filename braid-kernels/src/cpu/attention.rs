//! Causal attention of new query tokens over a sequence's paged KV cache, with GQA and an optional
//! sliding window; partial attention over a key range with its log-sum-exp state, the merge of
//! two such states, and cascade decode that reads a prefix shared by several sequences once.

use std::ops::Range;

use rayon::prelude::*;

/// Geometry of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Only the last `w` positions (the query's own included) are visible, as in Mistral.
    pub sliding_window: Option<usize>,
    pub scale: f32,
}

impl AttentionShape {
    fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Keys a query at `pos` may see: causal, and within the window.
    fn visible(&self, pos: usize) -> Range<usize> {
        let start = self
            .sliding_window
            .map_or(0, |w| (pos + 1).saturating_sub(w));
        start..pos + 1
    }

    /// Offset in a cache laid out [num_blocks, block_size, num_kv_heads, head_dim] of key `j`
    /// of KV head `kvh`, found through `block_table`.
    fn key_offset(&self, block_table: &[u32], j: usize, kvh: usize) -> usize {
        let slot =
            block_table[j / self.block_size] as usize * self.block_size + j % self.block_size;
        (slot * self.num_kv_heads + kvh) * self.head_dim
    }
}

/// Intersection of two key ranges (empty when they do not meet).
fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let start = a.start.max(b.start);
    start..a.end.min(b.end).max(start)
}

/// Softmax-weighted sum of V rows over `keys` for one query head: writes the normalised output
/// into `o` and returns the natural-log sum-exp of the scaled scores (-inf for no keys, with `o`
/// zeroed).
#[allow(clippy::too_many_arguments)]
fn attend_head(
    shape: &AttentionShape,
    qh: &[f32],
    kvh: usize,
    keys: Range<usize>,
    block_table: &[u32],
    k_cache: &[f32],
    v_cache: &[f32],
    o: &mut [f32],
) -> f32 {
    let hd = shape.head_dim;
    o.fill(0.0);
    if keys.is_empty() {
        return f32::NEG_INFINITY;
    }
    let mut scores: Vec<f32> = keys
        .clone()
        .map(|j| {
            let off = shape.key_offset(block_table, j, kvh);
            super::dot(qh, &k_cache[off..off + hd]) * shape.scale
        })
        .collect();
    let lse = softmax_with_lse(&mut scores);
    for (j, p) in keys.zip(scores) {
        let off = shape.key_offset(block_table, j, kvh);
        for (o, &v) in o.iter_mut().zip(&v_cache[off..off + hd]) {
            *o += p * v;
        }
    }
    lse
}

/// Softmax of one row in place, returning the natural-log sum-exp of the inputs: the largest
/// probability is `exp(0) / sum`, so the sum comes back from it without a second pass of `exp`.
fn softmax_with_lse(x: &mut [f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    super::softmax_inplace(x);
    let top = x.iter().copied().fold(0.0f32, f32::max);
    max - top.ln()
}

/// `q`: [n, num_heads * head_dim] for tokens at absolute `positions` of one sequence; each attends to
/// the sequence's keys at positions `..=position` (within the window), found through `block_table` in
/// `k_cache`/`v_cache` laid out [num_blocks, block_size, num_kv_heads, head_dim]. Writes `out` like `q`.
pub fn paged_attention(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    block_table: &[u32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
) {
    let (hd, heads, group) = (shape.head_dim, shape.num_heads, shape.group());
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (t, h) = (idx / heads, idx % heads);
        let qh = &q[idx * hd..(idx + 1) * hd];
        let keys = shape.visible(positions[t]);
        attend_head(shape, qh, h / group, keys, block_table, k_cache, v_cache, o);
    });
}

/// Attention of `q` ([n, num_heads * head_dim], absolute `positions`) over the keys at positions
/// in `keys` only (e.g. `0..prefix_len` or `prefix_len..pos + 1`), causal masking and the window
/// still applying. Writes the normalised partial output into `out` (like `q`) and into `lse`
/// ([n * num_heads]) the natural-log sum-exp of the scaled scores, -inf (with a zero output)
/// where no key of the range is visible. Two such states merge exactly with
/// [`merge_attention_states`].
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_partial(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    block_table: &[u32],
    k_cache: &[f32],
    v_cache: &[f32],
    keys: Range<usize>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (hd, heads, group) = (shape.head_dim, shape.num_heads, shape.group());
    out.par_chunks_mut(hd)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(idx, (o, l))| {
            let (t, h) = (idx / heads, idx % heads);
            let qh = &q[idx * hd..(idx + 1) * hd];
            let visible = intersect(&shape.visible(positions[t]), &keys);
            *l = attend_head(
                shape,
                qh,
                h / group,
                visible,
                block_table,
                k_cache,
                v_cache,
                o,
            );
        });
}

/// Merges the partial state `b` into `a` (rows of `head_dim` outputs, one log-sum-exp each):
/// afterwards `a` is the attention over the union of both key sets. A row whose lse is -inf
/// (no visible key) takes the other side unchanged.
pub fn merge_attention_states(
    out_a: &mut [f32],
    lse_a: &mut [f32],
    out_b: &[f32],
    lse_b: &[f32],
    head_dim: usize,
) {
    for ((oa, la), (ob, &lb)) in out_a
        .chunks_mut(head_dim)
        .zip(lse_a.iter_mut())
        .zip(out_b.chunks(head_dim).zip(lse_b))
    {
        if lb == f32::NEG_INFINITY {
            continue;
        }
        if *la == f32::NEG_INFINITY {
            oa.copy_from_slice(ob);
            *la = lb;
            continue;
        }
        let max = la.max(lb);
        let (wa, wb) = ((*la - max).exp(), (lb - max).exp());
        let inv = 1.0 / (wa + wb);
        for (a, &b) in oa.iter_mut().zip(ob) {
            *a = (wa * *a + wb * b) * inv;
        }
        *la = max + (wa + wb).ln();
    }
}

/// Cascade decode for one group of sequences that share their first `prefix_len` tokens of KV:
/// `q` holds one query row per member ([members, num_heads * head_dim]) at `positions`. The
/// prefix keys are read once for the whole group through `prefix_table` (keys outer, every
/// member's queries inner), each member's own keys `prefix_len..=position` through
/// `member_tables[m]`, and the two partial states merged. Equals [`paged_attention`] of each
/// member over its own table within rounding.
#[allow(clippy::too_many_arguments)]
pub fn cascade_attention_decode(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    prefix_table: &[u32],
    prefix_len: usize,
    member_tables: &[&[u32]],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
) {
    let (hd, heads, group) = (shape.head_dim, shape.num_heads, shape.group());
    let members = positions.len();
    let row = heads * hd;

    // Prefix: per KV head, scores of all (member, head) rows key by key, then V key by key.
    let per_kv_head: Vec<(Vec<f32>, Vec<f32>)> = (0..shape.num_kv_heads)
        .into_par_iter()
        .map(|kvh| {
            let rows = members * group;
            let ranges: Vec<Range<usize>> = (0..rows)
                .map(|r| intersect(&shape.visible(positions[r / group]), &(0..prefix_len)))
                .collect();
            let mut scores = vec![f32::NEG_INFINITY; rows * prefix_len];
            for j in 0..prefix_len {
                let off = shape.key_offset(prefix_table, j, kvh);
                let k = &k_cache[off..off + hd];
                for (r, range) in ranges.iter().enumerate() {
                    if range.contains(&j) {
                        let (m, hg) = (r / group, r % group);
                        let qh = &q[m * row + (kvh * group + hg) * hd..][..hd];
                        scores[r * prefix_len + j] = super::dot(qh, k) * shape.scale;
                    }
                }
            }
            let mut lse = vec![f32::NEG_INFINITY; rows];
            for (r, range) in ranges.iter().enumerate() {
                if range.is_empty() {
                    continue;
                }
                let s = &mut scores[r * prefix_len + range.start..r * prefix_len + range.end];
                lse[r] = softmax_with_lse(s);
            }
            let mut acc = vec![0.0f32; rows * hd];
            for j in 0..prefix_len {
                let off = shape.key_offset(prefix_table, j, kvh);
                let v = &v_cache[off..off + hd];
                for (r, range) in ranges.iter().enumerate() {
                    if range.contains(&j) {
                        let p = scores[r * prefix_len + j];
                        for (a, &x) in acc[r * hd..(r + 1) * hd].iter_mut().zip(v) {
                            *a += p * x;
                        }
                    }
                }
            }
            (acc, lse)
        })
        .collect();

    let mut lse = vec![f32::NEG_INFINITY; members * heads];
    for (kvh, (acc, prefix_lse)) in per_kv_head.iter().enumerate() {
        for r in 0..members * group {
            let (m, h) = (r / group, kvh * group + r % group);
            out[m * row + h * hd..][..hd].copy_from_slice(&acc[r * hd..(r + 1) * hd]);
            lse[m * heads + h] = prefix_lse[r];
        }
    }

    // Each member's own keys, merged into its prefix state.
    let mut suffix = vec![0.0f32; row];
    let mut suffix_lse = vec![0.0f32; heads];
    for (m, (&pos, table)) in positions.iter().zip(member_tables).enumerate() {
        paged_attention_partial(
            shape,
            &q[m * row..(m + 1) * row],
            &[pos],
            table,
            k_cache,
            v_cache,
            prefix_len..pos + 1,
            &mut suffix,
            &mut suffix_lse,
        );
        merge_attention_states(
            &mut out[m * row..(m + 1) * row],
            &mut lse[m * heads..(m + 1) * heads],
            &suffix,
            &suffix_lse,
            hd,
        );
    }
}
