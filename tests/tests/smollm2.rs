//! The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same
//! file in f32 (tests/fixtures/smollm2/expected.json): tokenizer ids, chat prompt, greedy tokens.
//! Needs the model in the local cache (`braid pull smollm2-135m`; CI fetches it first); without it
//! each test says it was skipped.

use braid_core::{Braid, Engine, EngineConfig, Prompt};
use braid_models::source::{self, ModelLocation};
use braid_tests::*;
use serde_json::Value;

fn setup() -> Option<(Braid, Value)> {
    let alias = source::aliases()
        .iter()
        .find(|a| a.name == source::DEFAULT_MODEL)?;
    let Some(path) = source::cached_path(alias) else {
        eprintln!(
            "skipped: {} is not cached; run `braid pull {}`",
            alias.name, alias.name
        );
        return None;
    };
    let loaded =
        braid_models::load(&ModelLocation::Gguf(path)).expect("the cached default model loads");
    let config = EngineConfig {
        kv_cache_tokens: Some(1024),
        ..EngineConfig::default()
    };
    let braid = Braid::with_engine(Engine::new(loaded, config).unwrap()).unwrap();
    Some((
        braid,
        read_json(&fixtures_dir().join("smollm2/expected.json")),
    ))
}

#[test]
fn tokenizer_from_gguf_metadata_matches_transformers() {
    let Some((braid, expected)) = setup() else {
        return;
    };
    for case in expected["tokenization"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = braid.tokenize(&Prompt::Raw(text.into())).unwrap();
        assert_eq!(ids, as_ids(&case["ids"]), "ids for {text:?}");
    }
}

#[test]
fn raw_prompt_greedy_continuation_matches_transformers() {
    let Some((mut braid, expected)) = setup() else {
        return;
    };
    let case = &expected["completion"];
    let out = braid
        .generate(
            Prompt::Raw(case["text"].as_str().unwrap().into()),
            &greedy(16),
        )
        .unwrap();
    assert_eq!(out.prompt_token_ids, as_ids(&case["input_ids"]));
    assert_eq!(out.token_ids, as_ids(&case["greedy_ids_16"]));
    assert_eq!(out.text, case["greedy_text_16"].as_str().unwrap());
}

#[test]
fn chat_prompt_matches_transformers() {
    let Some((mut braid, expected)) = setup() else {
        return;
    };
    let chat = &expected["chat"];
    let messages = serde_json::from_value(chat["messages"].clone()).unwrap();
    let prompt = Prompt::Chat(messages);
    assert_eq!(braid.tokenize(&prompt).unwrap(), as_ids(&chat["input_ids"]));
    // Up to and including the end-of-turn token: "The capital of France is Paris.<|im_end|>".
    let want = as_ids(&chat["greedy_ids"]);
    let out = braid.generate(prompt, &greedy(8)).unwrap();
    assert_greedy_matches(
        "smollm2 chat",
        &out.token_ids,
        &want[..8],
        &as_f32s(&chat["greedy_margins"]),
        1e-3,
    );
}
