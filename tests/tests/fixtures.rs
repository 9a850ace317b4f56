//! Every tiny model saved by transformers (tests/fixtures/models, made by scripts/make_fixtures.py)
//! loads and runs on the CPU with transformers' logits (rel. L2 < 1e-4) and greedy tokens.

use braid_core::{Braid, CascadePolicy, Engine, EngineConfig, FinishReason, Prompt};
use braid_tests::*;
use serde_json::Value;

const LOGITS_TOLERANCE: f64 = 1e-4;
/// A greedy step closer than this may flip under f32 reordering alone.
const MIN_MARGIN: f32 = 1e-3;

/// Each prompt, and the chat prompt, of a fixture.
fn cases(expected: &Value) -> Vec<&Value> {
    let mut v: Vec<&Value> = expected["prompts"].as_array().unwrap().iter().collect();
    v.push(&expected["chat"]);
    v
}

#[test]
fn logits_match_transformers() {
    for (name, location, expected) in fixture_models() {
        let loaded = braid_models::load(&location).unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in cases(&expected) {
            let ids = as_ids(&case["input_ids"]);
            let ours = prefill_logits(loaded.cpu_model().unwrap(), &ids);
            let err = rel_l2(&ours, &as_f32s(&case["last_logits"]));
            assert!(
                err < LOGITS_TOLERANCE,
                "{name}: logits rel. L2 {err:.2e} for {:?}",
                case["text"]
            );
        }
    }
}

#[test]
fn tokenizer_and_chat_template_give_transformers_ids() {
    for (name, location, expected) in fixture_models() {
        let braid = Braid::with_engine(
            Engine::new(
                braid_models::load(&location).unwrap(),
                EngineConfig::default(),
            )
            .unwrap(),
        )
        .unwrap();
        for case in expected["prompts"].as_array().unwrap() {
            let ids = braid
                .tokenize(&Prompt::Raw(case["text"].as_str().unwrap().into()))
                .unwrap();
            assert_eq!(ids, as_ids(&case["input_ids"]), "{name}: raw prompt ids");
        }
        let chat = &expected["chat"];
        let messages = serde_json::from_value(chat["messages"].clone()).unwrap();
        let ids = braid.tokenize(&Prompt::Chat(messages)).unwrap();
        assert_eq!(
            ids,
            as_ids(&chat["input_ids"]),
            "{name}: chat-templated ids"
        );
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    for (name, location, expected) in fixture_models() {
        let mut braid = Braid::with_engine(
            Engine::new(
                braid_models::load(&location).unwrap(),
                EngineConfig::default(),
            )
            .unwrap(),
        )
        .unwrap();
        for case in cases(&expected) {
            let want = as_ids(&case["greedy_ids"]);
            let out = braid
                .generate(Prompt::Ids(as_ids(&case["input_ids"])), &greedy(want.len()))
                .unwrap();
            assert_eq!(out.finish_reason, FinishReason::Length);
            assert_greedy_matches(
                &name,
                &out.token_ids,
                &want,
                &as_f32s(&case["greedy_margins"]),
                MIN_MARGIN,
            );
        }
    }
}

/// Continuous batching: all prompts of a model run at once, with a small step budget that forces
/// chunked prefill and a KV pool so small that sequences are preempted and recomputed; every
/// sequence still produces transformers' greedy tokens.
#[test]
fn batched_chunked_and_preempted_generation_is_unchanged() {
    for (name, location, expected) in fixture_models()
        .into_iter()
        .filter(|(n, ..)| n == "llama" || n == "qwen3" || n == "mistral-sliding")
    {
        let config = EngineConfig {
            block_size: 4,
            kv_cache_tokens: Some(96),
            max_batch_tokens: 7,
            max_running: 8,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(braid_models::load(&location).unwrap(), config).unwrap();
        let mut requests = Vec::new();
        for case in cases(&expected) {
            let want = as_ids(&case["greedy_ids"]);
            let id = engine
                .add_request(as_ids(&case["input_ids"]), greedy(want.len()))
                .unwrap();
            requests.push((id, want, as_f32s(&case["greedy_margins"]), Vec::new()));
        }
        while engine.has_work() {
            for ev in engine.step().unwrap() {
                let r = requests.iter_mut().find(|r| r.0 == ev.request).unwrap();
                r.3.extend(ev.token);
            }
        }
        assert!(
            engine.stats().preemptions > 0,
            "{name}: the pool was meant to overflow"
        );
        for (_, want, margins, got) in &requests {
            assert_greedy_matches(&name, got, want, margins, MIN_MARGIN);
        }
    }
}

/// A step with many new tokens detokenizes them in parallel: each of 150 requests decoding side
/// by side streams the same tokens and the same text, piece for piece joined, as it does alone.
#[test]
fn a_large_batch_streams_the_text_each_request_streams_alone() {
    let (_, location, expected) = fixture_models()
        .into_iter()
        .find(|(n, ..)| n == "llama")
        .expect("the llama fixture");
    let base = as_ids(&expected["prompts"][0]["input_ids"]);
    let config = || EngineConfig {
        max_running: 160,
        ..EngineConfig::default()
    };
    let mut batch = Engine::new(braid_models::load(&location).unwrap(), config()).unwrap();
    let vocab = batch.info().config.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..150u32)
        .map(|i| {
            let mut p = base.clone();
            p.push(1 + (i * 7919) % (vocab - 1));
            p
        })
        .collect();
    let run = |engine: &mut Engine, ids: &[u32]| {
        let id = engine.add_request(ids.to_vec(), greedy(8)).unwrap();
        (id, Vec::new(), String::new())
    };

    let mut outputs: Vec<_> = prompts.iter().map(|p| run(&mut batch, p)).collect();
    while batch.has_work() {
        for ev in batch.step().unwrap() {
            let out = outputs.iter_mut().find(|o| o.0 == ev.request).unwrap();
            out.1.extend(ev.token);
            out.2.push_str(&ev.text);
        }
    }

    let mut alone = Engine::new(braid_models::load(&location).unwrap(), config()).unwrap();
    for (prompt, (_, tokens, text)) in prompts.iter().zip(&outputs).step_by(7) {
        let (id, mut solo_tokens, mut solo_text) = run(&mut alone, prompt);
        while alone.has_work() {
            for ev in alone.step().unwrap() {
                assert_eq!(ev.request, id);
                solo_tokens.extend(ev.token);
                solo_text.push_str(&ev.text);
            }
        }
        assert_eq!(tokens, &solo_tokens, "prompt ending in {:?}", prompt.last());
        assert_eq!(text, &solo_text, "prompt ending in {:?}", prompt.last());
        assert!(!text.is_empty());
    }
}

/// Exact prefix reuse: the same prompt again, and a prompt that extends an earlier one, take their
/// shared blocks from the prefix cache and still produce transformers' greedy tokens.
#[test]
fn prefix_cache_hits_do_not_change_the_output() {
    for (name, location, expected) in fixture_models()
        .into_iter()
        .filter(|(n, ..)| n == "llama" || n == "qwen3" || n == "mistral-sliding")
    {
        let config = EngineConfig {
            block_size: 4,
            ..EngineConfig::default()
        };
        let mut braid = Braid::with_engine(
            Engine::new(braid_models::load(&location).unwrap(), config).unwrap(),
        )
        .unwrap();
        let case = &expected["prompts"][0];
        let ids = as_ids(&case["input_ids"]);
        let want = as_ids(&case["greedy_ids"]);
        let margins = as_f32s(&case["greedy_margins"]);
        let first = braid
            .generate(Prompt::Ids(ids.clone()), &greedy(want.len()))
            .unwrap();
        assert_eq!(braid.engine().stats().prefix_hit_tokens, 0);
        let again = braid
            .generate(Prompt::Ids(ids.clone()), &greedy(want.len()))
            .unwrap();
        let hits = braid.engine().stats().prefix_hit_tokens;
        // Every full block of the prompt but the one holding its last token comes from the cache.
        assert_eq!(hits as usize, (ids.len() - 1) / 4 * 4, "{name}");
        assert_eq!(
            again.token_ids, first.token_ids,
            "{name}: a cache hit changed the output"
        );
        assert_greedy_matches(&name, &again.token_ids, &want, &margins, MIN_MARGIN);

        // The prompt plus the first answer (a second turn) reuses the prompt and the generated tokens.
        let mut turn2 = ids.clone();
        turn2.extend_from_slice(&first.token_ids[..8]);
        let cached = braid
            .generate(Prompt::Ids(turn2.clone()), &greedy(8))
            .unwrap();
        assert!(
            braid.engine().stats().prefix_hit_tokens > hits + 4,
            "{name}: the answer's blocks were not reused"
        );
        let fresh = Braid::with_engine(
            Engine::new(
                braid_models::load(&location).unwrap(),
                EngineConfig::default(),
            )
            .unwrap(),
        )
        .unwrap()
        .generate(Prompt::Ids(turn2), &greedy(8))
        .unwrap();
        assert_eq!(
            cached.token_ids, fresh.token_ids,
            "{name}: reuse of generated tokens changed the output"
        );
    }
}

/// Each finished request reports its costs; a repeated prompt reports its cached tokens.
#[test]
fn finished_requests_report_their_metrics() {
    let (_, location, expected) = fixture_models()
        .into_iter()
        .find(|(n, ..)| n == "llama")
        .unwrap();
    let ids = as_ids(&expected["prompts"][0]["input_ids"]);
    let config = EngineConfig {
        block_size: 4,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(braid_models::load(&location).unwrap(), config).unwrap();
    let run = |engine: &mut Engine| {
        let id = engine.add_request(ids.clone(), greedy(6)).unwrap();
        let mut last = None;
        while engine.has_work() {
            for ev in engine.step().unwrap() {
                if ev.request == id && ev.finished.is_some() {
                    last = ev.metrics;
                }
            }
        }
        last.expect("the finishing event carries metrics")
    };
    let first = run(&mut engine);
    assert_eq!(
        (
            first.prompt_tokens,
            first.generated_tokens,
            first.cached_prompt_tokens
        ),
        (ids.len(), 6, 0)
    );
    assert!(first.time_to_first_token_s >= first.queue_s && first.mean_inter_token_s > 0.0);
    let second = run(&mut engine);
    assert_eq!(second.cached_prompt_tokens, (ids.len() - 1) / 4 * 4);
    let (used, total) = engine.kv_blocks();
    assert_eq!(used, 0, "finished requests hold no blocks (of {total})");
    assert_eq!(engine.queue_lengths(), (0, 0));
}

/// A retained answer is the next turn's prefix, token-exact (its partly filled last block
/// included): the second turn computes only its new tokens and gives the output of an engine
/// that never saw the first turn; the retained KV survives the second turn's writes
/// (copy-on-write), and outputs can be pinned, listed and released.
#[test]
fn retained_outputs_are_reused_exactly() {
    for (name, location, expected) in fixture_models()
        .into_iter()
        .filter(|(n, ..)| n == "llama" || n == "qwen3" || n == "mistral-sliding")
    {
        let config = EngineConfig {
            block_size: 4,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(braid_models::load(&location).unwrap(), config).unwrap();
        let ids = as_ids(&expected["prompts"][0]["input_ids"]);
        let turn1 = engine.add_request(ids.clone(), retaining(7)).unwrap();
        let (answer, _) = run_to_end(&mut engine, turn1);
        let held = engine.retained();
        assert_eq!(held.len(), 1, "{name}");
        assert_eq!(
            (held[0].id, held[0].tokens, held[0].pinned),
            (turn1, ids.len() + 6, false)
        );
        let mut kept = ids.clone();
        kept.extend_from_slice(&answer[..6]);
        assert_eq!(engine.retained_tokens(turn1), Some(&kept[..]));

        // The next turn: the whole first turn, then new tokens.
        let mut turn2 = ids.clone();
        turn2.extend_from_slice(&answer);
        turn2.extend_from_slice(&ids[1..4]);
        assert_eq!(engine.cached_prefix_len(&turn2), kept.len(), "{name}");
        let second = engine.add_request(turn2.clone(), greedy(6)).unwrap();
        let (cached_out, metrics) = run_to_end(&mut engine, second);
        assert_eq!(
            metrics.cached_prompt_tokens,
            kept.len(),
            "{name}: only the new tokens are computed"
        );
        let mut fresh = Engine::new(
            braid_models::load(&location).unwrap(),
            EngineConfig::default(),
        )
        .unwrap();
        let id = fresh.add_request(turn2.clone(), greedy(6)).unwrap();
        assert_eq!(
            cached_out,
            run_to_end(&mut fresh, id).0,
            "{name}: reusing the retained answer changed the output"
        );
        // The same follow-up again: the retained blocks were not overwritten.
        let again = engine.add_request(turn2, greedy(6)).unwrap();
        assert_eq!(run_to_end(&mut engine, again).0, cached_out, "{name}");

        assert!(engine.pin_retained(turn1 + 100, true).is_err());
        engine.pin_retained(turn1, true).unwrap();
        assert!(engine.retained()[0].pinned);
        assert!(engine.release_retained(turn1));
        assert!(!engine.release_retained(turn1));
        assert_eq!(
            engine.kv_blocks().0,
            0,
            "{name}: nothing holds blocks any more"
        );
    }
}

/// `max_tokens` 0 computes and retains the prompt's KV without generating; when the pool runs
/// short, unpinned outputs are dropped first, and a request that cannot fit beside pinned outputs
/// is dropped with an error instead of waiting forever.
#[test]
fn prefill_only_requests_and_pool_pressure() {
    let (_, location, expected) = fixture_models()
        .into_iter()
        .find(|(n, ..)| n == "llama")
        .unwrap();
    let ids = as_ids(&expected["prompts"][0]["input_ids"]);
    let config = EngineConfig {
        block_size: 4,
        kv_cache_tokens: Some(64),
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(braid_models::load(&location).unwrap(), config).unwrap();
    let warm = engine.add_request(ids.clone(), retaining(0)).unwrap();
    let (tokens, metrics) = run_to_end(&mut engine, warm);
    assert!(tokens.is_empty());
    assert_eq!(
        (metrics.prompt_tokens, metrics.generated_tokens),
        (ids.len(), 0)
    );
    assert_eq!(engine.retained_tokens(warm), Some(&ids[..]));

    // An unrelated prompt that needs most of the pool: the idle retained output makes room.
    let long: Vec<u32> = (0..50).map(|i| 3 + i % 40).collect();
    let big = engine.add_request(long.clone(), greedy(8)).unwrap();
    assert_eq!(run_to_end(&mut engine, big).0.len(), 8);
    assert!(
        engine.retained().is_empty(),
        "the unpinned output was dropped"
    );

    // A pinned output is never dropped; a request that cannot fit beside it errs once.
    let pinned = engine
        .add_request(long[..40].to_vec(), retaining(0))
        .unwrap();
    run_to_end(&mut engine, pinned);
    engine.pin_retained(pinned, true).unwrap();
    let other: Vec<u32> = long.iter().map(|t| t + 1).collect();
    let blocked = engine.add_request(other, greedy(8)).unwrap();
    let err = loop {
        match engine.step() {
            Ok(_) => assert!(engine.has_work(), "the request cannot have finished"),
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        err.contains(&format!("request {blocked}")) && err.contains("pinned"),
        "{err}"
    );
    assert!(!engine.has_work());
    assert_eq!(engine.retained().len(), 1);
}

/// A saved prefix cache loads into a fresh engine for the same model, which then skips the
/// prompt's cached blocks and gives the same output; a file for another model, or a damaged one,
/// is refused with the cache left empty.
#[test]
fn prefix_cache_files_survive_a_restart() {
    let models = fixture_models();
    let find = |name: &str| models.iter().find(|(n, ..)| n == name).unwrap();
    let (_, location, expected) = find("llama");
    let ids = as_ids(&expected["prompts"][0]["input_ids"]);
    let config = EngineConfig {
        block_size: 4,
        ..EngineConfig::default()
    };
    let new_engine =
        |location| Engine::new(braid_models::load(location).unwrap(), config.clone()).unwrap();
    let dir = std::env::temp_dir().join(format!("braid-prefix-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("llama.braidkv");

    let mut first = new_engine(location);
    let id = first.add_request(ids.clone(), greedy(6)).unwrap();
    let (want, _) = run_to_end(&mut first, id);
    let saved = first.save_prefix_cache(&file).unwrap();
    assert_eq!(
        saved.blocks,
        (ids.len() + 5) / 4,
        "every full block is saved"
    );

    let mut restarted = new_engine(location);
    let loaded = restarted.load_prefix_cache(&file).unwrap();
    assert_eq!((loaded.blocks, loaded.tokens), (saved.blocks, saved.tokens));
    let id = restarted.add_request(ids.clone(), greedy(6)).unwrap();
    let (got, metrics) = run_to_end(&mut restarted, id);
    assert_eq!(metrics.cached_prompt_tokens, (ids.len() - 1) / 4 * 4);
    assert_eq!(got, want, "loaded KV changed the output");

    // Same layout, other weights: the GGUF export of another model is refused by fingerprint.
    let (_, other, _) = find("llama-gguf");
    let mut stranger = new_engine(other);
    let err = stranger.load_prefix_cache(&file).unwrap_err().to_string();
    assert!(err.contains("different model"), "{err}");
    assert_eq!(stranger.cached_prefix_len(&ids), 0);

    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let broken = dir.join("broken.braidkv");
    std::fs::write(&broken, &bytes).unwrap();
    let mut fresh = new_engine(location);
    let err = fresh.load_prefix_cache(&broken).unwrap_err().to_string();
    assert!(
        err.contains("corrupt") && err.contains("broken.braidkv"),
        "{err}"
    );
    assert_eq!(fresh.cached_prefix_len(&ids), 0);
    let err = fresh
        .load_prefix_cache(&dir.join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Requests that share a cached system prompt decode with cascade attention (the prefix's KV read
/// once per group) and produce exactly the tokens of plain paged attention, with GQA and a
/// sliding window; the engine reports the cascade steps.
#[test]
fn cascade_attention_gives_the_plain_output() {
    for (name, location, expected) in fixture_models()
        .into_iter()
        .filter(|(n, ..)| n == "llama" || n == "qwen3" || n == "mistral-sliding")
    {
        let ids = as_ids(&expected["prompts"][0]["input_ids"]);
        let mut system: Vec<u32> = ids.iter().cycle().take(37).copied().collect();
        system.reverse();
        let run = |cascade: CascadePolicy| {
            let config = EngineConfig {
                block_size: 4,
                cascade,
                ..EngineConfig::default()
            };
            let mut engine = Engine::new(braid_models::load(&location).unwrap(), config).unwrap();
            let warm = engine.add_request(system.clone(), greedy(0)).unwrap();
            run_to_end(&mut engine, warm);
            let requests: Vec<_> = (0..5)
                .map(|i| {
                    let mut p = system.clone();
                    p.extend_from_slice(&ids[i..i + 2 + i]);
                    engine.add_request(p, greedy(10)).unwrap()
                })
                .collect();
            let mut out = vec![Vec::new(); requests.len()];
            while engine.has_work() {
                for ev in engine.step().unwrap() {
                    let k = requests.iter().position(|&r| r == ev.request).unwrap();
                    out[k].extend(ev.token);
                }
            }
            (out, engine.stats().clone())
        };
        let (plain, plain_stats) = run(CascadePolicy::Off);
        let (cascade, stats) = run(CascadePolicy::Always);
        assert_eq!(plain_stats.cascade_steps, 0);
        assert!(stats.cascade_steps >= 9, "{name}: {stats:?}");
        // Five members sharing 36 cached tokens (nine blocks of four).
        assert!(
            stats.cascade_saved_tokens >= 9 * 4 * 36,
            "{name}: {stats:?}"
        );
        assert_eq!(
            cascade, plain,
            "{name}: cascade attention changed the output"
        );
    }
}
