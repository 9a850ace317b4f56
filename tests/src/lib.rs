//! Shared helpers for the cross-crate tests: where the fixtures are and how results are compared.

use std::collections::BTreeMap;
use std::path::PathBuf;

use braid_cache::{BlockManager, BlockTable, KvLayout, KvStorage};
use braid_core::{
    Engine, FinishReason, GenerationParams, RequestId, RequestMetrics, SamplingParams,
};
use braid_models::source::ModelLocation;
use braid_models::{Model, SeqInput};
use serde_json::Value;

/// The fixtures folder: `$BRAID_FIXTURES` (set on machines that got the tests as a bundle), else the
/// repository's `tests/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("BRAID_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
}

pub fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

pub fn as_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

pub fn as_f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a number list")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den).sqrt()
}

/// Last-position logits of `ids`, prefilled in one forward call over a fresh paged cache.
pub fn prefill_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let c = model.config();
    let layout = KvLayout {
        num_layers: c.num_layers,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        block_size: 16,
        num_blocks: ids.len().div_ceil(16) + 1,
    };
    let mut cache = BlockManager::new(layout);
    let mut storage = KvStorage::new(layout);
    let mut table = BlockTable::new();
    cache
        .reserve(&mut table, ids.len())
        .expect("the cache was sized for the prompt");
    let input = SeqInput {
        tokens: ids,
        start_pos: 0,
        block_table: table.blocks(),
    };
    model
        .forward(&[input], &[], &mut storage)
        .expect("forward")
        .remove(0)
}

/// Greedy tokens must equal the reference's up to the first step whose top-2 margin is too small
/// for the backend's rounding to decide; after a near-tie the two runs may rightly part ways.
pub fn assert_greedy_matches(
    name: &str,
    ours: &[u32],
    expected: &[u32],
    margins: &[f32],
    min_margin: f32,
) {
    for (i, (&a, &b)) in ours.iter().zip(expected).enumerate() {
        if margins.get(i).is_some_and(|&m| m < min_margin) {
            eprintln!(
                "{name}: greedy step {i} is a near-tie (margin {}); compared {i} tokens",
                margins[i]
            );
            return;
        }
        assert_eq!(
            a, b,
            "{name}: greedy token {i} differs: ours {ours:?}, transformers {expected:?}"
        );
    }
    assert_eq!(ours.len(), expected.len(), "{name}: greedy length differs");
}

/// Every fixture model (tests/fixtures/models), sorted by name: its name, where it loads from
/// (`model.gguf` when the folder has one) and its `expected.json`.
pub fn fixture_models() -> Vec<(String, ModelLocation, Value)> {
    let dir = fixtures_dir().join("models");
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
    {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_name()
            .expect("a folder name")
            .to_string_lossy()
            .into_owned();
        let location = if path.join("model.gguf").exists() {
            ModelLocation::Gguf(path.join("model.gguf"))
        } else {
            ModelLocation::HfDir(path.clone())
        };
        out.push((name, location, read_json(&path.join("expected.json"))));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 10,
        "expected every fixture model, found {}",
        out.len()
    );
    out
}

/// Greedy decoding of exactly `max_tokens` tokens (EOS ignored), as the fixtures were made.
pub fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams::greedy_exact(max_tokens)
}

/// Like [`greedy`], keeping the request's KV as a retained output when it finishes.
pub fn retaining(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        retain: true,
        ..greedy(max_tokens)
    }
}

/// Step `engine` until it is idle; request `id`'s tokens and its finishing metrics.
pub fn run_to_end(engine: &mut Engine, id: RequestId) -> (Vec<u32>, RequestMetrics) {
    let (mut tokens, mut metrics) = (Vec::new(), None);
    while engine.has_work() {
        for ev in engine.step().unwrap() {
            if ev.request == id {
                tokens.extend(ev.token);
                if ev.finished.is_some() {
                    metrics = ev.metrics;
                }
            }
        }
    }
    (
        tokens,
        metrics.expect("the finishing event carries metrics"),
    )
}

/// What one request of [`mixed_workload`] produced: its tokens, text and how it ended.
pub type RequestOutput = (Vec<u32>, String, Option<FinishReason>);

/// A workload that exercises everything a step can do to a request, for comparing two ways of
/// running the engine: `prompts` (at least three) as greedy requests of 20 tokens, one of them
/// with `stop` strings, one seeded-sampled, one retained and then continued by a second turn
/// once it finishes, one aborted after its fourth token. Run with a KV pool small enough to
/// preempt. Returns every request's output by id.
pub fn mixed_workload(
    engine: &mut Engine,
    prompts: &[Vec<u32>],
    stop: &[String],
) -> BTreeMap<RequestId, RequestOutput> {
    let with_stop = GenerationParams {
        stop: stop.to_vec(),
        ..greedy(20)
    };
    let sampled = GenerationParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 20,
            seed: Some(7),
            ..SamplingParams::default()
        },
        ..greedy(20)
    };
    let mut outputs: BTreeMap<RequestId, RequestOutput> = BTreeMap::new();
    let mut ids = Vec::new();
    for (k, prompt) in prompts.iter().enumerate() {
        let params = match k % 4 {
            0 => with_stop.clone(),
            1 => sampled.clone(),
            2 => retaining(12),
            _ => greedy(20),
        };
        let id = engine.add_request(prompt.clone(), params).unwrap();
        outputs.insert(id, (Vec::new(), String::new(), None));
        ids.push(id);
    }
    let (retained_turn, aborted) = (ids[2], ids[prompts.len() - 1]);
    while engine.has_work() {
        for ev in engine.step().unwrap() {
            let out = outputs
                .get_mut(&ev.request)
                .expect("a request of the workload");
            out.0.extend(ev.token);
            out.1.push_str(&ev.text);
            out.2 = ev.finished;
            if ev.request == retained_turn && ev.finished.is_some() {
                // The second turn: the first turn's prompt and answer, then more of a prompt.
                let mut turn2 = prompts[2].clone();
                turn2.extend(&out.0);
                turn2.extend(&prompts[0][..4]);
                let id = engine.add_request(turn2, greedy(10)).unwrap();
                outputs.insert(id, (Vec::new(), String::new(), None));
            }
        }
        if outputs[&aborted].0.len() >= 4 && outputs[&aborted].2.is_none() {
            let ev = engine.abort(aborted).expect("the request is still running");
            outputs.get_mut(&aborted).unwrap().2 = ev.finished;
        }
    }
    outputs
}
