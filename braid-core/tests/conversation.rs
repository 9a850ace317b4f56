//! Multi-turn conversations on the tiny fixture models (CPU): the cache holds each answer as the
//! next turn's prefix, exactly as the next turn's template renders it; reasoning is streamed
//! apart and dropped from the history the way Qwen3's template drops it.

mod common;

use std::ops::ControlFlow;

use braid_core::chunks::ChunkRole;
use braid_core::conversation::history_tokens;
use braid_core::reasoning::{split_reasoning, ReasoningParser, ThinkTags};
use braid_core::{ChatMessage, Conversation, ConversationError, Engine, FinishReason, OutputPiece};
use braid_models::chat_template::ChatTemplate;
use common::{choose_think_ids, greedy, qwen3, render_tokens, run, think_model, TempModel};
use serde_json::Value;

fn no_vars() -> serde_json::Map<String, Value> {
    serde_json::Map::new()
}

/// The tokens of the rendered prompt before `content` (the new user message's text): what the
/// cache can hold before the new message arrives.
fn tokens_before(engine: &Engine, text: &str, content: &str, prompt: &[u32]) -> Vec<u32> {
    let at = text
        .rfind(content)
        .expect("the new message is in the prompt");
    let before = engine.tokenizer().encode(&text[..at], false).unwrap();
    assert_eq!(
        &prompt[..before.len()],
        &before[..],
        "the text before the new message tokenizes as a prefix of the prompt"
    );
    before
}

fn answer_only(_: &OutputPiece) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

#[test]
fn later_turns_prefill_only_the_new_message() {
    let mut engine = qwen3();
    let mut chat = Conversation::new(&engine).unwrap();
    assert!(
        chat.think_tags().is_none(),
        "the fixture is no reasoning model"
    );
    chat.set_system(&engine, Some("Be brief.")).unwrap();

    let questions = ["Hi there", "What is the sky?", "Why so?"];
    for (i, question) in questions.into_iter().enumerate() {
        chat.set_query(&engine, question).unwrap();
        let mut messages = chat.history();
        messages.push(ChatMessage::new("user", question));
        let (text, prompt) = render_tokens(&engine, &messages);
        let before = tokens_before(&engine, &text, question, &prompt);

        let turn = chat
            .infer(&mut engine, &greedy(5), answer_only)
            .unwrap()
            .clone();
        assert_eq!(turn.metrics.prompt_tokens, prompt.len(), "turn {i}");
        assert_eq!(turn.metrics.generated_tokens, 5);
        if i == 0 {
            assert_eq!(
                turn.metrics.cached_prompt_tokens, 0,
                "a fresh engine caches nothing"
            );
        } else {
            // The new message's tokens and the template's tokens after them, nothing else.
            let new_message = engine.tokenizer().encode(question, false).unwrap().len();
            let template_tail = engine
                .tokenizer()
                .encode(
                    &text[text.rfind(question).unwrap() + question.len()..],
                    false,
                )
                .unwrap()
                .len();
            assert_eq!(turn.prefill_tokens, prompt.len() - before.len(), "turn {i}");
            assert_eq!(turn.prefill_tokens, new_message + template_tail, "turn {i}");
        }

        // The cache now holds the conversation exactly as the next turn renders it.
        let id = turn.retained.expect("the turn's KV is retained");
        let held = engine.retained_tokens(id).unwrap().to_vec();
        let mut next = chat.history();
        next.push(ChatMessage::new("user", "Next question"));
        let (next_text, next_prompt) = render_tokens(&engine, &next);
        assert_eq!(
            held,
            tokens_before(&engine, &next_text, "Next question", &next_prompt),
            "turn {i}"
        );
        assert!(
            turn.topup_tokens > 0,
            "the answer's end and the next header were computed"
        );
        assert_eq!(
            engine.retained().len(),
            i + 1,
            "one retained output per turn; the answer's own is replaced by the topped-up one"
        );
    }
    let stats = chat.stats();
    assert_eq!(stats.turns, 3);
    assert_eq!(stats.generated_tokens, 15);
    assert!(stats.cached_prompt_tokens > 0);
    assert!(stats.decode_tokens_per_s() > 0.0);
}

#[test]
fn cached_turns_answer_exactly_as_a_fresh_engine() {
    let mut engine = qwen3();
    let mut chat = Conversation::new(&engine).unwrap();
    chat.set_query(&engine, "Tell me a tale").unwrap();
    chat.infer(&mut engine, &greedy(6), answer_only).unwrap();
    chat.set_query(&engine, "And then?").unwrap();
    let prompt = chat.compose(&engine).unwrap().tokens;
    let turn = chat
        .infer(&mut engine, &greedy(6), answer_only)
        .unwrap()
        .clone();
    assert!(turn.metrics.cached_prompt_tokens > prompt.len() / 2);

    let mut fresh = qwen3();
    let (tokens, metrics) = run(&mut fresh, prompt, greedy(6));
    assert_eq!(metrics.cached_prompt_tokens, 0);
    let text = fresh.tokenizer().decode(&tokens, true).unwrap();
    assert_eq!(
        turn.answer, text,
        "reusing the cached turn changes no output"
    );
}

#[test]
fn contexts_and_earlier_outputs_join_the_next_query() {
    let mut engine = qwen3();
    let mut chat = Conversation::new(&engine).unwrap();
    chat.add_context(&engine, "The box is red.").unwrap();
    chat.set_query(&engine, "What color?").unwrap();
    let preview = chat.preview(&engine).unwrap();
    let roles: Vec<ChunkRole> = preview
        .chunks
        .iter()
        .map(|c| chat.chunks().get(c.chunk).unwrap().role)
        .collect();
    assert_eq!(roles, [ChunkRole::Context, ChunkRole::Query]);
    assert_eq!(preview.cached_tokens, 0);
    let first = chat
        .infer(&mut engine, &greedy(4), answer_only)
        .unwrap()
        .clone();
    assert_eq!(first.contexts.len(), 1);
    assert!(chat.pending_contexts().is_empty() && chat.pending_query().is_none());

    let output = chat.use_output(0).unwrap();
    assert_eq!(Some(output), first.output);
    chat.set_query(&engine, "Again?").unwrap();
    let history = chat.history();
    assert_eq!(history[0].content, "The box is red.\n\nWhat color?");
    let composition = chat.compose(&engine).unwrap();
    let last = composition.messages.last().unwrap();
    assert_eq!(last.content, format!("{}\n\nAgain?", first.answer));
    let report = chat.preview(&engine).unwrap();
    assert_eq!(
        report.chunks.len(),
        5,
        "context, query, output, then the output again as context, and the query"
    );
    assert!(
        report.chunks[..3]
            .iter()
            .all(|c| c.cached_tokens == c.tokens),
        "the first turn's chunks are cached: {report:?}"
    );
}

#[test]
fn outputs_can_be_pinned_released_and_cleared() {
    let mut engine = qwen3();
    let mut chat = Conversation::new(&engine).unwrap();
    chat.set_query(&engine, "One").unwrap();
    chat.infer(&mut engine, &greedy(3), answer_only).unwrap();
    chat.pin_output(&mut engine, 0, true).unwrap();
    let id = chat.turns()[0].retained.unwrap();
    assert!(engine.retained().iter().any(|r| r.id == id && r.pinned));

    chat.set_query(&engine, "Two").unwrap();
    chat.infer(&mut engine, &greedy(3), answer_only).unwrap();
    assert!(chat.output_is_cached(&engine, 0) && chat.output_is_cached(&engine, 1));

    assert!(chat.release_output(&mut engine, 1).unwrap());
    assert!(!chat.output_is_cached(&engine, 1));
    assert!(
        !chat.release_output(&mut engine, 1).unwrap(),
        "nothing left to release"
    );
    let err = chat.release_output(&mut engine, 7).unwrap_err();
    assert_eq!(
        err.to_string(),
        "there is no turn 7; the conversation has 2 turns, numbered from 0"
    );

    // With turn 1's KV gone, the next turn still finds turn 0's KV.
    chat.set_query(&engine, "Three").unwrap();
    let held0 = engine.retained_tokens(id).unwrap().len();
    let turn = chat.infer(&mut engine, &greedy(3), answer_only).unwrap();
    assert!(turn.metrics.cached_prompt_tokens >= held0);

    chat.clear(&mut engine);
    assert!(chat.turns().is_empty());
    assert!(
        engine.retained().is_empty(),
        "clear releases every retained output"
    );
    assert!(matches!(
        chat.infer(&mut engine, &greedy(3), answer_only),
        Err(ConversationError::NoQuery)
    ));
}

#[test]
fn a_stopped_answer_still_becomes_a_cached_turn() {
    let mut engine = qwen3();
    let mut chat = Conversation::new(&engine).unwrap();
    chat.set_query(&engine, "Count").unwrap();
    let mut pieces = 0;
    let turn = chat
        .infer(&mut engine, &greedy(20), |_| {
            pieces += 1;
            ControlFlow::Break(())
        })
        .unwrap()
        .clone();
    assert_eq!(pieces, 1, "nothing is reported after the stop");
    assert_eq!(turn.finish_reason, FinishReason::Abort);
    assert!(turn.metrics.generated_tokens < 20);
    let held = engine.retained_tokens(turn.retained.unwrap()).unwrap();
    let template = engine.chat_template().unwrap();
    let wanted = history_tokens(engine.tokenizer(), template, &no_vars(), &chat.history()).unwrap();
    assert_eq!(held, wanted.as_slice());
}

#[test]
fn a_saved_conversation_loads_and_refills_the_cache() {
    let mut engine = qwen3();
    let mut chat = Conversation::new(&engine).unwrap();
    chat.set_system(&engine, Some("Be kind.")).unwrap();
    chat.add_context(&engine, "Cats purr.").unwrap();
    chat.set_query(&engine, "Why?").unwrap();
    chat.infer(&mut engine, &greedy(4), answer_only).unwrap();
    chat.set_query(&engine, "Pending").unwrap();
    let path = std::env::temp_dir().join(format!("braid-conversation-{}.json", std::process::id()));
    chat.save(&path).unwrap();

    let mut other = qwen3();
    let mut loaded = Conversation::load(&other, &path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded.history(), chat.history());
    assert_eq!(loaded.turns()[0].answer, chat.turns()[0].answer);
    assert_eq!(
        loaded
            .chunks()
            .get(loaded.pending_query().unwrap())
            .unwrap()
            .text,
        "Pending"
    );
    let template = other.chat_template().unwrap();
    let wanted =
        history_tokens(other.tokenizer(), template, &no_vars(), &loaded.history()).unwrap();
    assert_eq!(loaded.prefill_history(&mut other).unwrap(), wanted.len());
    assert_eq!(
        loaded.prefill_history(&mut other).unwrap(),
        0,
        "already held"
    );
    let turn = loaded.infer(&mut other, &greedy(2), answer_only).unwrap();
    assert_eq!(turn.metrics.cached_prompt_tokens, wanted.len());

    std::fs::write(&path, "{\"version\": 9}").unwrap();
    let err = Conversation::load(&other, &path).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(err.starts_with("cannot read conversation file"), "{err}");
}

#[test]
fn a_model_without_a_chat_template_cannot_converse() {
    let model = TempModel::copy_of("qwen3", "no-template");
    model.edit_json("tokenizer_config.json", |c| {
        c.as_object_mut().unwrap().remove("chat_template");
    });
    let engine = model.engine();
    let err = Conversation::new(&engine).unwrap_err();
    assert_eq!(
        err.to_string(),
        "this model has no chat template, so it cannot hold a conversation"
    );
}

#[test]
fn reasoning_streams_apart_and_leaves_the_history_as_qwen3_renders_it() {
    let mut base = qwen3();
    let choice = choose_think_ids(&mut base);
    let g = &choice.generated;
    let k = choice.close_at;
    let model = think_model(g[0], g[k]);
    let mut engine = model.engine();

    // The real template renders a first turn like the fixture's ChatML, so the model, seeing the
    // same prompt tokens, answers the same tokens.
    let first = [ChatMessage::new("user", choice.question)];
    let (_, prompt) = render_tokens(&engine, &first);
    assert_eq!(prompt, render_tokens(&base, &first).1);

    let mut chat = Conversation::new(&engine).unwrap();
    let tags = chat
        .think_tags()
        .expect("<think> and </think> are found in the tokenizer")
        .clone();
    assert_eq!((tags.open(), tags.close()), ("<think>", "</think>"));
    chat.set_query(&engine, choice.question).unwrap();
    let mut pieces = Vec::new();
    let turn = chat
        .infer(&mut engine, &greedy(16), |p| {
            pieces.push(p.clone());
            ControlFlow::Continue(())
        })
        .unwrap()
        .clone();
    assert_eq!(turn.metrics.generated_tokens, 16);
    let tok = engine.tokenizer();
    assert_eq!(
        turn.raw,
        tok.decode(g, true).unwrap(),
        "raw output keeps the markers"
    );
    assert!(turn.raw.starts_with("<think>"));

    // Reasoning pieces first, then answer pieces; neither carries a marker, none is empty.
    assert!(pieces.iter().all(|p| !p.text().is_empty()), "{pieces:?}");
    let split = pieces
        .iter()
        .position(|p| matches!(p, OutputPiece::Answer(_)))
        .expect("an answer");
    assert!(split > 0, "reasoning comes first: {pieces:?}");
    assert!(pieces[..split]
        .iter()
        .all(|p| matches!(p, OutputPiece::Reasoning(_))));
    assert!(pieces[split..]
        .iter()
        .all(|p| matches!(p, OutputPiece::Answer(_))));
    let streamed: String = pieces[..split].iter().map(|p| p.text()).collect();
    let answered: String = pieces[split..].iter().map(|p| p.text()).collect();
    let (reasoning, answer) = split_reasoning(&turn.raw, &tags);
    assert_eq!((streamed.as_str(), answered.as_str()), (reasoning, answer));
    assert_eq!(
        (turn.reasoning.as_str(), turn.answer.as_str()),
        (reasoning, answer)
    );
    assert_eq!(
        reasoning,
        tok.decode(&g[1..k], true).unwrap().trim_matches('\n')
    );

    // The cache holds the history as the next turn's template renders it: the think block is
    // gone, the answer is there. The answer's own KV covered the prompt only, so the rest was
    // computed by the top-up.
    let held = engine
        .retained_tokens(turn.retained.unwrap())
        .unwrap()
        .to_vec();
    let mut next = chat.history();
    next.push(ChatMessage::new("user", "Next question"));
    let (next_text, next_prompt) = render_tokens(&engine, &next);
    assert!(!next_text.contains("<think>"), "{next_text:?}");
    assert_eq!(
        held,
        tokens_before(&engine, &next_text, "Next question", &next_prompt)
    );
    assert!(!held.contains(&g[0]) && !held.contains(&g[k]));
    assert_eq!(turn.topup_tokens, held.len() - prompt.len());

    // Against the template itself: what the cache holds is what Qwen3's template renders.
    let template =
        ChatTemplate::new(&common::qwen3_template(), None, Some("<|im_end|>".into())).unwrap();
    let reference = template.render(&next, true).unwrap();
    assert_eq!(reference, next_text);

    chat.set_query(&engine, "Next question").unwrap();
    let second = chat.infer(&mut engine, &greedy(2), answer_only).unwrap();
    assert_eq!(second.metrics.cached_prompt_tokens, held.len());
    assert_eq!(second.prefill_tokens, next_prompt.len() - held.len());
}

/// The byte-level tokenizer fixture (it has `<think>` and `</think>`) and Qwen3's template with
/// transformers' renders of it.
fn qwen3_reference() -> (braid_models::tokenizer::Tokenizer, ChatTemplate, Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../braid-models/tests/fixtures/tokenizer");
    let tok = braid_models::tokenizer::Tokenizer::from_file(&dir.join("byte_level/tokenizer.json"))
        .unwrap();
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("chat_templates.json")).unwrap())
            .unwrap();
    let template =
        ChatTemplate::new(&common::qwen3_template(), None, Some("<|im_end|>".into())).unwrap();
    (tok, template, doc)
}

#[test]
fn history_tokens_follow_transformers_render_of_the_next_turn() {
    let (tok, template, doc) = qwen3_reference();
    let conversation: Vec<ChatMessage> =
        serde_json::from_value(doc["conversations"]["with_thinking"].clone()).unwrap();
    let expected = doc["renders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["template"] == "qwen3"
                && r["conversation"] == "with_thinking"
                && r["add_generation_prompt"] == true
                && r["extra"].as_object().is_some_and(|e| e.is_empty())
        })
        .unwrap()["expected"]
        .as_str()
        .unwrap()
        .to_string();
    // Everything transformers renders before the next user message's text, think block gone.
    let before = &expected[..expected.rfind("And 7*8?").unwrap()];
    assert!(before.contains("<|im_start|>assistant\nIt is 42.<|im_end|>"));
    let history = &conversation[..3];
    assert_eq!(
        history_tokens(&tok, &template, &no_vars(), history).unwrap(),
        tok.encode(before, false).unwrap()
    );

    let tags = ThinkTags::detect(&tok).expect("the vocabulary has <think> and </think>");
    assert_eq!(
        split_reasoning(&history[2].content, &tags),
        ("Six times seven.", "It is 42.")
    );
}

#[test]
fn the_parser_splits_a_token_stream_by_the_tokenizers_markers() {
    let (tok, template, _) = qwen3_reference();
    let tags = ThinkTags::detect(&tok).unwrap();
    let answer = "<think>\nSix times seven.\n</think>\n\nIt is 42.";
    let ids = tok.encode(answer, false).unwrap();
    let open = tok.token_to_id("<think>").unwrap();
    assert!(ids.contains(&open), "the markers are single tokens");

    struct Dec<'a>(&'a braid_models::tokenizer::Tokenizer);
    impl braid_core::detokenizer::Decode for Dec<'_> {
        fn decode(&self, ids: &[u32]) -> String {
            self.0.decode(ids, true).unwrap()
        }
    }
    let prompt = tok.encode("<|im_start|>assistant\n", false).unwrap();
    let mut detok = braid_core::detokenizer::IncrementalDetokenizer::new(&prompt);
    let mut parser = ReasoningParser::new(Some(tags.clone()), &prompt);
    let mut pieces = Vec::new();
    for &id in &ids {
        let text = detok.push(&Dec(&tok), id);
        pieces.extend(parser.push(Some(id), &text));
    }
    pieces.extend(parser.push(None, &detok.flush(&Dec(&tok))));
    pieces.extend(parser.finish());
    let joined = |reasoning: bool| -> String {
        pieces
            .iter()
            .filter(|p| matches!(p, OutputPiece::Reasoning(_)) == reasoning)
            .map(|p| p.text())
            .collect()
    };
    assert_eq!(joined(true), "Six times seven.");
    assert_eq!(joined(false), "It is 42.");
    assert_eq!(parser.raw(), answer);

    // A generation prompt that opens the think block starts the parser inside it; Qwen3's
    // prompt with thinking switched off closes it again.
    let mut vars = no_vars();
    let user = [ChatMessage::new("user", "Hi")];
    let open_prompt = template.render_with(&user, true, &vars).unwrap() + "<think>\n";
    assert!(tags.prompt_opens_reasoning(&tok.encode(&open_prompt, false).unwrap()));
    vars.insert("enable_thinking".into(), Value::Bool(false));
    let closed = template.render_with(&user, true, &vars).unwrap();
    assert!(closed.ends_with("</think>\n\n"));
    assert!(!tags.prompt_opens_reasoning(&tok.encode(&closed, false).unwrap()));
}

#[test]
fn the_real_default_model_computes_only_the_new_message() {
    let alias = braid_models::source::aliases()
        .iter()
        .find(|a| a.name == braid_models::source::DEFAULT_MODEL)
        .unwrap();
    let Some(path) = braid_models::source::cached_path(alias) else {
        eprintln!(
            "skipped: {} is not cached; run `braid pull {}`",
            alias.name, alias.name
        );
        return;
    };
    let load = || {
        let loaded =
            braid_models::load(&braid_models::source::ModelLocation::Gguf(path.clone())).unwrap();
        let config = braid_core::EngineConfig {
            kv_cache_tokens: Some(512),
            ..Default::default()
        };
        Engine::new(loaded, config).unwrap()
    };
    let mut engine = load();
    let mut chat = Conversation::new(&engine).unwrap();
    chat.set_query(&engine, "What is the capital of France?")
        .unwrap();
    chat.infer(&mut engine, &greedy(8), answer_only).unwrap();

    let question = "And of Italy?";
    chat.set_query(&engine, question).unwrap();
    let prompt = chat.compose(&engine).unwrap().tokens;
    let (text, _) = render_tokens(&engine, &chat.compose(&engine).unwrap().messages);
    let before = tokens_before(&engine, &text, question, &prompt);
    let turn = chat
        .infer(&mut engine, &greedy(8), answer_only)
        .unwrap()
        .clone();
    assert_eq!(turn.prefill_tokens, prompt.len() - before.len());

    let mut fresh = load();
    let (tokens, _) = run(&mut fresh, prompt, greedy(8));
    assert_eq!(
        turn.answer,
        fresh.tokenizer().decode(&tokens, true).unwrap()
    );
}
