//! Compares Braid's tokenizers with the ids and texts transformers produced for the same
//! vocabularies (fixtures made by scripts/make_tokenizer_fixtures.py).

use std::path::{Path, PathBuf};

use braid_models::tokenizer::{GgufTokenizerMetadata, Tokenizer};
use braid_models::ModelError;
use proptest::prelude::*;
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
    ids_with_special: Option<Vec<u32>>,
}

#[derive(Deserialize)]
struct Vocabulary {
    bos_token: String,
    eos_token: String,
    vocab_size: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Cases {
    byte_level: Vocabulary,
    byte_level_pre: std::collections::BTreeMap<String, Vec<Case>>,
    sentencepiece: Vocabulary,
}

fn cases() -> Cases {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Checks every case; collects all mismatches so one run shows them all.
fn check(tok: &Tokenizer, cases: &[Case], what: &str) {
    let mut failures = Vec::new();
    for case in cases {
        let ids = tok.encode(&case.text, false).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "encode {:?}: got {ids:?}, transformers {:?}",
                case.text, case.ids
            ));
        }
        if let Some(expected) = &case.ids_with_special {
            let ids = tok.encode(&case.text, true).unwrap();
            if &ids != expected {
                failures.push(format!(
                    "encode+special {:?}: got {ids:?}, transformers {expected:?}",
                    case.text
                ));
            }
        }
        let decoded = tok.decode(&case.ids, false).unwrap();
        if decoded != case.decoded {
            failures.push(format!(
                "decode {:?}: got {decoded:?}, transformers {:?}",
                case.ids, case.decoded
            ));
        }
        let skipped = tok.decode(&case.ids, true).unwrap();
        if skipped != case.decoded_skip_special {
            failures.push(format!(
                "decode skipping specials {:?}: got {skipped:?}, transformers {:?}",
                case.ids, case.decoded_skip_special
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---- a minimal GGUF metadata reader, enough for the fixtures (llama.cpp's format, version 3) ----

#[derive(Debug, Clone)]
enum GgufValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let len = self.u64() as usize;
        String::from_utf8(self.take(len).to_vec()).unwrap()
    }
    fn value(&mut self, ty: u32) -> GgufValue {
        match ty {
            0 => GgufValue::Int(self.take(1)[0] as i64),
            1 => GgufValue::Int(self.take(1)[0] as i8 as i64),
            2 => GgufValue::Int(u16::from_le_bytes(self.take(2).try_into().unwrap()) as i64),
            3 => GgufValue::Int(i16::from_le_bytes(self.take(2).try_into().unwrap()) as i64),
            4 => GgufValue::Int(self.u32() as i64),
            5 => GgufValue::Int(self.u32() as i32 as i64),
            6 => GgufValue::Float(f32::from_le_bytes(self.take(4).try_into().unwrap()) as f64),
            7 => GgufValue::Bool(self.take(1)[0] != 0),
            8 => GgufValue::Str(self.string()),
            9 => {
                let elem = self.u32();
                let n = self.u64() as usize;
                GgufValue::Array((0..n).map(|_| self.value(elem)).collect())
            }
            10 => GgufValue::Int(self.u64() as i64),
            11 => GgufValue::Int(self.u64() as i64),
            12 => GgufValue::Float(f64::from_le_bytes(self.take(8).try_into().unwrap())),
            other => panic!("unknown GGUF value type {other}"),
        }
    }
}

fn read_gguf_tokenizer(path: &Path) -> GgufTokenizerMetadata {
    let bytes = std::fs::read(path).unwrap();
    let mut r = Reader {
        bytes: &bytes,
        at: 0,
    };
    assert_eq!(r.take(4), b"GGUF");
    assert_eq!(r.u32(), 3);
    let _tensors = r.u64();
    let kv_count = r.u64();
    let mut kv = std::collections::HashMap::new();
    for _ in 0..kv_count {
        let key = r.string();
        let ty = r.u32();
        kv.insert(key, r.value(ty));
    }
    let get = |key: &str| kv.get(&format!("tokenizer.ggml.{key}")).cloned();
    let string = |v: GgufValue| match v {
        GgufValue::Str(s) => s,
        other => panic!("expected a string, found {other:?}"),
    };
    let array = |v: GgufValue| match v {
        GgufValue::Array(items) => items,
        other => panic!("expected an array, found {other:?}"),
    };
    let int = |v: GgufValue| match v {
        GgufValue::Int(i) => i,
        other => panic!("expected an integer, found {other:?}"),
    };
    let boolean = |v: GgufValue| match v {
        GgufValue::Bool(b) => b,
        other => panic!("expected a bool, found {other:?}"),
    };
    let float = |v: GgufValue| match v {
        GgufValue::Float(f) => f as f32,
        other => panic!("expected a float, found {other:?}"),
    };
    GgufTokenizerMetadata {
        model: string(get("model").unwrap()),
        pre: get("pre").map(string),
        tokens: array(get("tokens").unwrap())
            .into_iter()
            .map(string)
            .collect(),
        scores: get("scores").map(|v| array(v).into_iter().map(float).collect()),
        token_types: get("token_type")
            .map(|v| array(v).into_iter().map(|t| int(t) as i32).collect()),
        merges: get("merges").map(|v| array(v).into_iter().map(string).collect()),
        bos_id: get("bos_token_id").map(|v| int(v) as u32),
        eos_id: get("eos_token_id").map(|v| int(v) as u32),
        unk_id: get("unknown_token_id").map(|v| int(v) as u32),
        pad_id: get("padding_token_id").map(|v| int(v) as u32),
        add_bos: get("add_bos_token").map(boolean),
        add_eos: get("add_eos_token").map(boolean),
    }
}

fn byte_level_gguf() -> Tokenizer {
    Tokenizer::from_gguf(&read_gguf_tokenizer(&fixtures().join("byte_level.gguf"))).unwrap()
}

// ---- byte-level BPE ----

#[test]
fn byte_level_tokenizer_json_matches_transformers() {
    let expected = cases().byte_level;
    let tok = Tokenizer::from_file(&fixtures().join("byte_level/tokenizer.json")).unwrap();
    assert_eq!(tok.kind(), "BPE (byte-level)");
    assert_eq!(tok.vocab_size(), expected.vocab_size);
    // This file's post-processor adds nothing, so it names no BOS of its own.
    assert_eq!(tok.bos_token(), None);
    check(&tok, &expected.cases, "byte-level tokenizer.json");
}

#[test]
fn byte_level_gguf_matches_transformers() {
    let expected = cases().byte_level;
    let tok = byte_level_gguf();
    assert_eq!(tok.kind(), "BPE (byte-level)");
    assert_eq!(tok.vocab_size(), expected.vocab_size);
    assert_eq!(tok.bos_token(), Some(expected.bos_token.as_str()));
    assert_eq!(tok.eos_token(), Some(expected.eos_token.as_str()));
    assert_eq!(
        tok.eos_ids(),
        &[tok.token_to_id(&expected.eos_token).unwrap()]
    );
    assert_eq!(tok.bos_id(), tok.token_to_id(&expected.bos_token));
    check(&tok, &expected.cases, "byte-level GGUF");
    // add_bos is false in this file, so special tokens add nothing.
    for case in &expected.cases {
        assert_eq!(tok.encode(&case.text, true).unwrap(), case.ids);
    }
}

#[test]
fn byte_level_gguf_pre_tokenizers_match_their_tokenizer_json() {
    let all = cases();
    let meta = read_gguf_tokenizer(&fixtures().join("byte_level.gguf"));
    assert!(!all.byte_level_pre.is_empty());
    for (pre, cases) in &all.byte_level_pre {
        let meta = GgufTokenizerMetadata {
            pre: Some(pre.clone()),
            add_bos: Some(false),
            ..meta.clone()
        };
        let tok = Tokenizer::from_gguf(&meta).unwrap();
        check(&tok, cases, &format!("GGUF pre-tokenizer {pre:?}"));
    }
}

#[test]
fn byte_level_token_lookups_agree_with_both_sources() {
    let json = Tokenizer::from_file(&fixtures().join("byte_level/tokenizer.json")).unwrap();
    let gguf = byte_level_gguf();
    for id in 0..json.vocab_size() as u32 {
        let token = json.id_to_token(id).unwrap();
        assert_eq!(gguf.id_to_token(id).as_deref(), Some(token.as_str()));
        assert_eq!(gguf.token_to_id(&token), Some(id));
    }
    assert_eq!(gguf.id_to_token(json.vocab_size() as u32), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn byte_level_decode_inverts_encode(text in any::<String>()) {
        let tok = byte_level_gguf();
        let ids = tok.encode(&text, false).unwrap();
        prop_assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn byte_level_decode_inverts_encode_with_special_tokens(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("<|im_start|>".to_string()),
                Just("<|im_end|>".to_string()),
                Just("<think>".to_string()),
                "[ a-zé\n\t0-9世😀]{0,12}",
            ],
            0..8,
        )
    ) {
        let tok = byte_level_gguf();
        let text = parts.concat();
        let ids = tok.encode(&text, false).unwrap();
        prop_assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

// ---- SentencePiece BPE with byte fallback ----

#[test]
fn sentencepiece_tokenizer_json_matches_transformers() {
    let expected = cases().sentencepiece;
    let tok = Tokenizer::from_file(&fixtures().join("sentencepiece/tokenizer.json")).unwrap();
    assert_eq!(tok.kind(), "BPE (SentencePiece-style)");
    assert_eq!(tok.vocab_size(), expected.vocab_size);
    // The post-processor adds BOS, so the file itself names it.
    assert_eq!(tok.bos_token(), Some(expected.bos_token.as_str()));
    assert_eq!(tok.bos_id(), Some(1));
    check(&tok, &expected.cases, "SentencePiece tokenizer.json");
}

#[test]
fn sentencepiece_gguf_matches_transformers() {
    let expected = cases().sentencepiece;
    let tok =
        Tokenizer::from_gguf(&read_gguf_tokenizer(&fixtures().join("sentencepiece.gguf"))).unwrap();
    assert_eq!(tok.kind(), "BPE (SentencePiece-style)");
    assert_eq!(tok.vocab_size(), expected.vocab_size);
    assert_eq!(tok.bos_token(), Some(expected.bos_token.as_str()));
    assert_eq!(tok.eos_token(), Some(expected.eos_token.as_str()));
    assert_eq!(tok.eos_ids(), &[2]);
    check(&tok, &expected.cases, "SentencePiece GGUF");
}

#[test]
fn sentencepiece_gguf_uses_byte_fallback() {
    let tok =
        Tokenizer::from_gguf(&read_gguf_tokenizer(&fixtures().join("sentencepiece.gguf"))).unwrap();
    let newline = tok.token_to_id("<0x0A>").unwrap();
    assert!(tok.encode("a\nb", false).unwrap().contains(&newline));
    // "😀" is not a piece of this vocabulary: it becomes its four UTF-8 bytes.
    let ids = tok.encode("😀", false).unwrap();
    let bytes: Vec<String> = ids.iter().filter_map(|&id| tok.id_to_token(id)).collect();
    assert!(
        bytes.ends_with(&["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"].map(String::from)),
        "{bytes:?}"
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), "😀");
}

// ---- errors ----

#[test]
fn missing_tokenizer_file_is_an_io_error_naming_the_path() {
    let path = fixtures().join("no_such_tokenizer.json");
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no_such_tokenizer.json"), "{err}");
}

#[test]
fn malformed_tokenizer_files_are_tokenizer_errors() {
    let dir = std::env::temp_dir().join(format!("braid-tokenizer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_json = dir.join("not_json.json");
    std::fs::write(&not_json, "{ this is not json").unwrap();
    let err = Tokenizer::from_file(&not_json).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer(_)), "{err:?}");
    assert!(err.to_string().contains("is not valid JSON"), "{err}");

    let wrong_shape = dir.join("wrong_shape.json");
    std::fs::write(
        &wrong_shape,
        r#"{"version": "1.0", "model": {"type": "BPE", "vocab": 3}}"#,
    )
    .unwrap();
    let err = Tokenizer::from_file(&wrong_shape).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("is not a tokenizer this version can load"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
