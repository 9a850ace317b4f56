//! The chunk store on the tiny Qwen3 fixture (CPU): content-hash ids, listing and eviction,
//! composition through the chat template, and what the cache supplies chunk by chunk.

mod common;

use braid_core::{
    Braid, ChatMessage, ChunkError, ChunkFilter, ChunkId, ChunkRole, ChunkStore, Composition,
    Engine, GenerationParams, Prompt,
};
use common::{greedy, qwen3, run};

/// Runs a composition with its KV retained (so the next composition can start from it token for
/// token) and records the use; returns the cached prompt tokens.
fn run_retained(engine: &mut Engine, store: &mut ChunkStore, c: &Composition) -> usize {
    let params = GenerationParams {
        retain: true,
        ..greedy(2)
    };
    let (_, metrics) = run(engine, c.tokens.clone(), params);
    store.record_use(c, metrics.cached_prompt_tokens);
    metrics.cached_prompt_tokens
}

#[test]
fn ids_are_content_hashes() {
    let engine = qwen3();
    let mut store = ChunkStore::new();
    let a = store
        .register(&engine, ChunkRole::Context, "The box is red.")
        .unwrap();
    let again = store
        .register(&engine, ChunkRole::Context, "The box is red.")
        .unwrap();
    assert_eq!(a, again, "the same content is the same chunk");
    assert_eq!(store.len(), 1);
    let as_query = store
        .register(&engine, ChunkRole::Query, "The box is red.")
        .unwrap();
    assert_ne!(a, as_query, "the role is part of the identity");
    let other = store
        .register(&engine, ChunkRole::Context, "The box is blue.")
        .unwrap();
    assert_ne!(a, other);

    let chunk = store.get(a).unwrap();
    assert_eq!(
        chunk.tokens,
        engine.tokenizer().encode("The box is red.", false).unwrap()
    );
    assert_eq!(chunk.role, ChunkRole::Context);

    // Ids print as 32 hex digits and parse back; they do not depend on the store.
    let text = a.to_string();
    assert_eq!(text.len(), 32);
    assert_eq!(text.parse::<ChunkId>().unwrap(), a);
    let mut fresh = ChunkStore::new();
    assert_eq!(
        fresh
            .register(&engine, ChunkRole::Context, "The box is red.")
            .unwrap(),
        a
    );
    assert_eq!(
        "xyz".parse::<ChunkId>().unwrap_err().to_string(),
        "'xyz' is not a chunk id; expected 32 hex digits"
    );
    assert!(matches!(
        store.register(&engine, ChunkRole::System, ""),
        Err(ChunkError::EmptyText)
    ));
}

#[test]
fn list_filters_by_role_and_metadata_and_chunks_can_go() {
    let engine = qwen3();
    let mut store = ChunkStore::new();
    let manual = store
        .register(&engine, ChunkRole::Context, "Manual text.")
        .unwrap();
    let faq = store
        .register(&engine, ChunkRole::Context, "FAQ text.")
        .unwrap();
    let system = store
        .register(&engine, ChunkRole::System, "Be brief.")
        .unwrap();
    store.set_metadata(manual, "source", "manual.txt").unwrap();
    store.set_metadata(faq, "source", "faq.txt").unwrap();
    store.set_metadata(faq, "lang", "en").unwrap();

    let ids = |store: &ChunkStore, filter: &ChunkFilter| -> Vec<ChunkId> {
        store.list(filter).iter().map(|c| c.id).collect()
    };
    assert_eq!(
        ids(&store, &ChunkFilter::default()),
        [manual, faq, system],
        "registration order"
    );
    assert_eq!(
        ids(&store, &ChunkFilter::role(ChunkRole::Context)),
        [manual, faq]
    );
    assert_eq!(
        ids(
            &store,
            &ChunkFilter::role(ChunkRole::Context).with_metadata("source", "faq.txt")
        ),
        [faq]
    );
    assert_eq!(
        ids(&store, &ChunkFilter::default().with_metadata("lang", "fr")),
        []
    );

    assert!(store.delete(faq));
    assert!(!store.delete(faq));
    assert!(store.get(faq).is_none());
    let err = store.set_metadata(faq, "k", "v").unwrap_err();
    assert_eq!(err.to_string(), format!("no chunk has id {faq}"));
    store.clear();
    assert!(store.is_empty());
    assert_eq!(ids(&store, &ChunkFilter::default()), []);
}

#[test]
fn unused_chunks_are_evicted() {
    let mut engine = qwen3();
    let mut store = ChunkStore::new();
    let system = store
        .register(&engine, ChunkRole::System, "Be brief.")
        .unwrap();
    let used = store.register(&engine, ChunkRole::Query, "Hello?").unwrap();
    let idle = store
        .register(&engine, ChunkRole::Context, "Never used.")
        .unwrap();
    let c = store.compose(&engine, Some(system), &[], used).unwrap();
    run_retained(&mut engine, &mut store, &c);
    assert_eq!(store.get(used).unwrap().uses, 1);
    assert_eq!(store.get(idle).unwrap().uses, 0);

    assert_eq!(store.evict_unused(1), 1, "only the never-used chunk goes");
    assert!(store.get(idle).is_none() && store.get(used).is_some());
    assert_eq!(store.stats().evictions, 1);
    let c = store.compose(&engine, Some(system), &[], used).unwrap();
    store.record_use(&c, 0);
    let late = store.register(&engine, ChunkRole::Query, "Late").unwrap();
    assert_eq!(
        store.evict_unused(1),
        0,
        "a chunk registered after the last use is still fresh"
    );
    assert_eq!(store.evict_unused(0), 3, "idle 0 evicts everything");
    assert!(store.get(late).is_none());
    assert_eq!(store.stats().evictions, 4);
}

#[test]
fn composition_renders_the_template_once_and_locates_each_chunk() {
    let engine = qwen3();
    let mut store = ChunkStore::new();
    let system = store
        .register(&engine, ChunkRole::System, "Be brief.")
        .unwrap();
    let doc1 = store
        .register(&engine, ChunkRole::Context, "Cats purr.")
        .unwrap();
    let doc2 = store
        .register(&engine, ChunkRole::Context, "Dogs bark.")
        .unwrap();
    let query = store
        .register(&engine, ChunkRole::Query, "Which one barks?")
        .unwrap();
    let c = store
        .compose(&engine, Some(system), &[doc1, doc2], query)
        .unwrap();

    let messages = vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Cats purr.\n\nDogs bark.\n\nWhich one barks?"),
    ];
    assert_eq!(c.messages, messages);
    let braid = Braid::with_engine(qwen3()).unwrap();
    assert_eq!(
        c.tokens,
        braid.tokenize(&Prompt::Chat(messages)).unwrap(),
        "the prompt is the whole conversation tokenized once, as a chat prompt is"
    );
    // A span holds the tokens wholly inside its chunk's text; a token that joins the chunk's
    // end to what follows (this vocabulary writes ".\n\n" as one) belongs to no span.
    let texts = ["Be brief.", "Cats purr.", "Dogs bark.", "Which one barks?"];
    let ids: Vec<ChunkId> = c.spans.iter().map(|s| s.chunk).collect();
    assert_eq!(ids, [system, doc1, doc2, query]);
    let decode =
        |r: std::ops::Range<usize>| engine.tokenizer().decode(&c.tokens[r], false).unwrap();
    for (i, (span, text)) in c.spans.iter().zip(texts).enumerate() {
        let inside = decode(span.tokens.clone());
        assert!(
            !inside.is_empty() && text.starts_with(&inside),
            "{inside:?} in {text:?}"
        );
        let until_next = c
            .spans
            .get(i + 1)
            .map_or(c.tokens.len(), |n| n.tokens.start);
        assert!(decode(span.tokens.start..until_next).starts_with(text));
        assert!(
            until_next - span.tokens.end <= 8,
            "only a join and template tokens lie between"
        );
    }
    assert_eq!(decode(c.spans[1].tokens.clone()), "Cats purr");

    // Chunks must go where their role says.
    let err = store.compose(&engine, Some(doc1), &[], query).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("chunk {doc1} is a context chunk, but a system chunk goes there")
    );
    assert!(matches!(
        store.compose(&engine, None, &[query], query),
        Err(ChunkError::WrongRole { .. })
    ));
}

#[test]
fn cached_chunks_are_hits_and_a_new_prefix_recomputes_them() {
    let mut engine = qwen3();
    let mut store = ChunkStore::new();
    let system = store
        .register(&engine, ChunkRole::System, "Be brief.")
        .unwrap();
    let doc = store
        .register(&engine, ChunkRole::Context, "The lamp is green.")
        .unwrap();
    let q1 = store
        .register(&engine, ChunkRole::Query, "What color?")
        .unwrap();
    let q2 = store
        .register(&engine, ChunkRole::Query, "Is it on?")
        .unwrap();

    let first = store.compose(&engine, Some(system), &[doc], q1).unwrap();
    let preview = store.preview(&engine, &first);
    assert_eq!(
        (preview.tokens, preview.cached_tokens),
        (first.tokens.len(), 0)
    );
    assert_eq!(run_retained(&mut engine, &mut store, &first), 0);
    assert_eq!((store.stats().hits, store.stats().misses), (0, 3));

    // Same system prompt and document, new query: both come from the cache, token for token.
    let second = store.compose(&engine, Some(system), &[doc], q2).unwrap();
    let preview = store.preview(&engine, &second);
    let cached: Vec<(ChunkId, bool)> = preview
        .chunks
        .iter()
        .map(|c| (c.chunk, c.cached_tokens == c.tokens))
        .collect();
    assert_eq!(cached, [(system, true), (doc, true), (q2, false)]);
    let cached_tokens = run_retained(&mut engine, &mut store, &second);
    assert_eq!(
        cached_tokens, preview.cached_tokens,
        "the preview told the truth"
    );
    let stats = *store.stats();
    assert_eq!((stats.hits, stats.misses), (2, 4));
    let span_len = |c: &Composition, id: ChunkId| {
        c.spans.iter().find(|s| s.chunk == id).unwrap().tokens.len() as u64
    };
    assert_eq!(
        stats.tokens_saved,
        span_len(&second, system) + span_len(&second, doc)
    );
    assert!((stats.hit_rate() - 2.0 / 6.0).abs() < 1e-12);

    // The document after another system prompt: its KV would differ, so it is computed again.
    let other = store
        .register(&engine, ChunkRole::System, "Be verbose.")
        .unwrap();
    let third = store.compose(&engine, Some(other), &[doc], q2).unwrap();
    let report = store.preview(&engine, &third);
    let doc_report = report.chunks.iter().find(|c| c.chunk == doc).unwrap();
    assert_eq!(doc_report.cached_tokens, 0);
    assert!(doc_report.after_different_prefix);
    run_retained(&mut engine, &mut store, &third);
    assert_eq!(
        store.stats().different_prefix,
        2,
        "the document and the query moved"
    );

    // Run again after the same prefix with nothing cached: the KV was given up, not moved.
    store.record_use(&third, 0);
    assert_eq!(store.stats().kv_evicted, 3);
    assert_eq!(store.stats().different_prefix, 2);
}

#[test]
fn composing_needs_a_chat_template() {
    let model = common::TempModel::copy_of("qwen3", "chunks-no-template");
    model.edit_json("tokenizer_config.json", |c| {
        c.as_object_mut().unwrap().remove("chat_template");
    });
    let engine = model.engine();
    let mut store = ChunkStore::new();
    let q = store.register(&engine, ChunkRole::Query, "Hi").unwrap();
    let err = store.compose(&engine, None, &[], q).unwrap_err();
    assert_eq!(
        err.to_string(),
        "this model has no chat template, so chunks cannot be composed into a prompt"
    );
}
