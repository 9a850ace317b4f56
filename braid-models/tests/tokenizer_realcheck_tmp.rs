use braid_models::tokenizer::{GgufTokenizerMetadata, Tokenizer};
use serde::Deserialize;
#[derive(Deserialize)]
struct Meta { model: String, pre: Option<String>, tokens: Vec<String>, token_types: Vec<i32>, merges: Option<Vec<String>>, scores: Option<Vec<f32>>, bos_id: Option<u32>, eos_id: Option<u32>, unk_id: Option<u32>, add_bos: Option<bool> }
#[derive(Deserialize)]
struct Case { text: String, ids: Vec<u32> }
#[derive(Deserialize)]
struct Entry { meta: Meta, cases: Vec<Case>, file: String }
#[test]
fn realcheck() {
    let all: std::collections::BTreeMap<String, Entry> = serde_json::from_str(&std::fs::read_to_string("/tmp/realcheck/real.json").unwrap()).unwrap();
    for (name, e) in all {
        let m = e.meta;
        let meta = GgufTokenizerMetadata { model: m.model, pre: m.pre, tokens: m.tokens, scores: m.scores, token_types: Some(m.token_types), merges: m.merges, bos_id: m.bos_id, eos_id: m.eos_id, unk_id: m.unk_id, pad_id: None, add_bos: m.add_bos.or(Some(false)), add_eos: None };
        let t0 = std::time::Instant::now();
        let g = Tokenizer::from_gguf(&meta).unwrap();
        let t1 = t0.elapsed();
        let t0 = std::time::Instant::now();
        let f = Tokenizer::from_file(std::path::Path::new(&e.file)).unwrap();
        let t2 = t0.elapsed();
        println!("{name}: gguf {:?} ({}, vocab {}), file {:?} ({}, vocab {})", t1, g.kind(), g.vocab_size(), t2, f.kind(), f.vocab_size());
        let special = name == "mistral";
        for c in &e.cases {
            let gi = g.encode(&c.text, special).unwrap();
            let fi = f.encode(&c.text, special).unwrap();
            if gi != c.ids { println!("  GGUF MISMATCH {:?}\n    got {:?}\n    exp {:?}", c.text, gi, c.ids); }
            if fi != c.ids { println!("  FILE MISMATCH {:?}", c.text); }
            let d = g.decode(&gi, false).unwrap();
            if name != "mistral" && d != c.text && !c.text.contains('\u{301}') { println!("  ROUNDTRIP {:?} -> {:?}", c.text, d); }
        }
    }
}
