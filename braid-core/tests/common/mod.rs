//! Shared helpers of the engine's integration tests: fixture models, temporary model folders and
//! greedy parameters.

#![allow(dead_code)] // each test file uses its own part of these helpers

use std::path::{Path, PathBuf};

use braid_core::{ChatMessage, Engine, EngineConfig, GenerationParams, SamplingParams};
use braid_models::source::ModelLocation;
use serde_json::Value;

/// A fixture model's folder (tests/fixtures/models/NAME).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

/// An engine over the model in `dir`, on the CPU, with room in its KV pool for several
/// conversations' retained outputs beside the fixtures' 128-token context.
pub fn engine_at(dir: &Path) -> Engine {
    let loaded = braid_models::load(&ModelLocation::HfDir(dir.to_path_buf()))
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", dir.display()));
    let config = EngineConfig {
        kv_cache_tokens: Some(1024),
        ..EngineConfig::default()
    };
    Engine::new(loaded, config).expect("an engine")
}

/// The tiny Qwen3 fixture (ChatML template, 128-token context).
pub fn qwen3() -> Engine {
    engine_at(&fixture("qwen3"))
}

/// Greedy decoding of exactly `max_tokens` tokens (EOS ignored), so runs are comparable.
pub fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Qwen3's real chat template (with its think handling), as the tokenizer fixtures hold it.
pub fn qwen3_template() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../braid-models/tests/fixtures/tokenizer/chat_templates.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["templates"]["qwen3"]["source"]
        .as_str()
        .expect("the Qwen3 template")
        .to_string()
}

/// A copy of a fixture model in a temporary folder, removed on drop.
pub struct TempModel {
    pub dir: PathBuf,
}

impl TempModel {
    /// Copies fixture `name` into a fresh folder named after `tag`.
    pub fn copy_of(name: &str, tag: &str) -> TempModel {
        let dir = std::env::temp_dir().join(format!(
            "braid-core-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixture(name)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        TempModel { dir }
    }

    /// Reads, edits and writes back one JSON file of the model.
    pub fn edit_json(&self, file: &str, edit: impl FnOnce(&mut Value)) {
        let path = self.dir.join(file);
        let mut value: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut value);
        std::fs::write(&path, serde_json::to_string(&value).unwrap()).unwrap();
    }

    pub fn engine(&self) -> Engine {
        engine_at(&self.dir)
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs one request to completion on `engine`; returns its generated tokens and metrics.
pub fn run(
    engine: &mut Engine,
    prompt: Vec<u32>,
    params: GenerationParams,
) -> (Vec<u32>, braid_core::RequestMetrics) {
    let id = engine.add_request(prompt, params).expect("a valid request");
    let mut tokens = Vec::new();
    loop {
        for event in engine
            .step()
            .expect("a step")
            .into_iter()
            .filter(|e| e.request == id)
        {
            tokens.extend(event.token);
            if event.finished.is_some() {
                return (tokens, event.metrics.expect("metrics on the last event"));
            }
        }
    }
}

/// Tokens of `engine`'s template rendering of `messages` with the generation prompt.
pub fn render_tokens(engine: &Engine, messages: &[ChatMessage]) -> (String, Vec<u32>) {
    let text = engine
        .chat_template()
        .unwrap()
        .render(messages, true)
        .unwrap();
    let tokens = engine.tokenizer().encode(&text, false).unwrap();
    (text, tokens)
}

/// Token ids of the fixture model's greedy answer that can stand for `<think>` and `</think>`:
/// the answer opens with the first, the second closes a non-empty reasoning, a non-empty answer
/// follows, neither occurs anywhere else, and renaming them leaves the prompt's tokens alone.
pub struct ThinkChoice {
    pub question: &'static str,
    /// The greedy answer: `generated[0]` becomes `<think>`, `generated[close_at]` `</think>`.
    pub generated: Vec<u32>,
    pub close_at: usize,
}

pub fn choose_think_ids(engine: &mut Engine) -> ThinkChoice {
    let tok = engine.tokenizer().clone();
    for question in [
        "Hi",
        "Tell me more.",
        "What is two and two?",
        "Why?",
        "Go on",
        "Name a fruit.",
    ] {
        let (_, prompt) = render_tokens(engine, &[ChatMessage::new("user", question)]);
        let (generated, _) = run(engine, prompt.clone(), greedy(16));
        let unique = |at: usize| {
            let id = generated[at];
            id > 2 && !prompt.contains(&id) && generated.iter().filter(|&&t| t == id).count() == 1
        };
        if !unique(0) {
            continue;
        }
        let text = |ids: &[u32]| tok.decode(ids, true).unwrap();
        // Renaming a token removes its text from what the tokenizer can write, so that text
        // must occur nowhere else in the conversation.
        let alone = |at: usize| {
            let own = text(&generated[at..at + 1]);
            let others: Vec<u32> = (0..generated.len())
                .filter(|&i| i != at)
                .map(|i| generated[i])
                .collect();
            !own.is_empty()
                && !own.contains('\u{FFFD}')
                && !text(&others).contains(&own)
                && !"Next question".contains(&own)
        };
        if !alone(0) {
            continue;
        }
        let close_at = (2..generated.len() - 2).find(|&k| {
            unique(k)
                && alone(k)
                && !text(&generated[1..k]).trim_matches('\n').is_empty()
                && !text(&generated[k + 1..]).trim().is_empty()
        });
        if let Some(close_at) = close_at {
            return ThinkChoice {
                question,
                generated,
                close_at,
            };
        }
    }
    panic!("no question made the fixture model answer with two usable marker tokens");
}

/// The Qwen3 fixture turned into a reasoning model: `<think>`/`</think>` replace two vocabulary
/// entries (merges through them removed), and the chat template is Qwen3's real one.
pub fn think_model(open: u32, close: u32) -> TempModel {
    let model = TempModel::copy_of("qwen3", "think");
    model.edit_json("tokenizer.json", |t| {
        let mut renamed = Vec::new();
        let vocab = t["model"]["vocab"].as_object_mut().unwrap();
        for (id, marker) in [(open, "<think>"), (close, "</think>")] {
            let old = vocab
                .iter()
                .find(|(_, v)| v.as_u64() == Some(u64::from(id)))
                .map(|(k, _)| k.clone())
                .unwrap();
            vocab.remove(&old);
            vocab.insert(marker.to_string(), Value::from(id));
            renamed.push(old);
        }
        let merges = t["model"]["merges"].as_array_mut().unwrap();
        merges.retain(|m| {
            let (a, b) = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .unwrap(),
                Value::Array(p) => (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into()),
                _ => unreachable!("merges are strings or pairs"),
            };
            let joined = format!("{a}{b}");
            !renamed.iter().any(|r| *r == a || *r == b || *r == joined)
        });
        for (id, marker) in [(open, "<think>"), (close, "</think>")] {
            t["added_tokens"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "id": id, "content": marker, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": false
                }));
        }
    });
    model.edit_json("tokenizer_config.json", |c| {
        c["chat_template"] = Value::from(qwen3_template());
    });
    model
}
