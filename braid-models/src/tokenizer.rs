//! Text ↔ token ids: loads a Hugging Face `tokenizer.json` or rebuilds the tokenizer a GGUF file
//! describes, and keeps the special-token facts (BOS, EOS) that generation and chat templates need.
//!
//! Both sources end up as one `tokenizers::Tokenizer`. A GGUF vocabulary is turned into the
//! `tokenizer.json` that Hugging Face transformers' GGUF converter would build, so a GGUF model
//! and its original Hugging Face repository tokenize the same text to the same ids.
//!
//! Chat-templated text already carries the BOS token where the model wants it: encode such text
//! with `add_special_tokens = false`, as transformers' `apply_chat_template` does.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{ModelError, Result};

/// The piece SentencePiece uses for a space.
const SPACE_PIECE: &str = "\u{2581}";

/// Meta-Llama-3's pre-tokenizer split (its `tokenizer.json`).
const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenizer split (its `tokenizer.json`): like Llama-3's, but one digit at a time.
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (`tokenizer.ggml.token_type`), as llama.cpp numbers them.
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A model's tokenizer together with its special-token facts.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    kind: String,
    vocab_size: usize,
    bos_token: Option<String>,
    bos_id: Option<u32>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

/// What a GGUF file says about its tokenizer (its `tokenizer.ggml.*` keys).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufTokenizerMetadata {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: which pre-tokenizer a "gpt2" vocabulary uses ("default", "smollm",
    /// "llama-bpe", "qwen2", ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by token id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: SentencePiece piece scores; "llama" vocabularies without merges
    /// derive their merges from them.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: "left right" pairs, highest priority first.
    pub merges: Option<Vec<String>>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; when absent, llama.cpp's default for the vocabulary applies.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// The BOS token is taken from the file's post-processor when it adds one; EOS tokens come
    /// from `tokenizer_config.json` / `generation_config.json` through [`Tokenizer::with_special_tokens`].
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let spec: Value = serde_json::from_str(&text).map_err(|e| {
            ModelError::Tokenizer(format!("{} is not valid JSON: {e}", path.display()))
        })?;
        Self::from_spec(spec, &path.display().to_string())
    }

    /// Rebuilds the tokenizer a GGUF file describes, the way transformers' GGUF converter does.
    pub fn from_gguf(meta: &GgufTokenizerMetadata) -> Result<Tokenizer> {
        let spec = gguf_tokenizer_spec(meta)?;
        let mut tokenizer = Self::from_spec(spec, "the GGUF tokenizer")?;
        // The GGUF ids are the facts here; the post-processor only knows about BOS when it is added.
        let token_at = |id: Option<u32>| id.and_then(|id| meta.tokens.get(id as usize).cloned());
        tokenizer.bos_token = token_at(meta.bos_id);
        tokenizer.bos_id = meta.bos_id;
        tokenizer.eos_token = token_at(meta.eos_id);
        tokenizer.eos_ids = meta.eos_id.into_iter().collect();
        Ok(tokenizer)
    }

    fn from_spec(spec: Value, origin: &str) -> Result<Tokenizer> {
        let kind = describe_kind(&spec);
        let bos_id_and_token = template_bos(&spec);
        let inner: tokenizers::Tokenizer = serde_json::from_value(spec).map_err(|e| {
            ModelError::Tokenizer(format!(
                "{origin} is not a tokenizer this version can load: {e}"
            ))
        })?;
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&max| max as usize + 1);
        let (bos_id, bos_token) = match bos_id_and_token {
            Some((id, token)) => (Some(id), Some(token)),
            None => (None, None),
        };
        Ok(Tokenizer {
            inner,
            kind,
            vocab_size,
            bos_token,
            bos_id,
            eos_token: None,
            eos_ids: Vec::new(),
        })
    }

    /// Turns text into token ids; `add_special_tokens` adds what the tokenizer adds around a
    /// sequence (a BOS token for LLaMA-style vocabularies).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| {
                ModelError::Tokenizer(format!(
                    "could not encode {} bytes of text: {e}",
                    text.len()
                ))
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Turns token ids back into text. Ids the vocabulary does not know are skipped, as Hugging
    /// Face tokenizers do, so a model whose embedding table is padded past the vocabulary cannot
    /// break a stream.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| {
            ModelError::Tokenizer(format!("could not decode {} token ids: {e}", ids.len()))
        })
    }

    /// One past the largest token id the tokenizer knows (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token given in its vocabulary form (e.g. "<|im_end|>", "Ġthe", "▁the").
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary form of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The BOS token's text, for chat templates.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The (first) EOS token's text, for chat templates.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every token id that ends generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// A short description of the tokenizer's algorithm, e.g. "BPE (byte-level)".
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Applies the facts of `tokenizer_config.json` / `generation_config.json`: the BOS token's
    /// text, the EOS tokens' texts (the first is the template's `eos_token`) and extra EOS ids.
    ///
    /// `None` / empty keep what the tokenizer already knows. Whether BOS is added while encoding
    /// stays with the tokenizer's own post-processor, which transformers also follows.
    pub fn with_special_tokens(
        mut self,
        bos: Option<String>,
        eos: Vec<String>,
        extra_eos_ids: Vec<u32>,
    ) -> Self {
        if let Some(bos) = bos {
            self.bos_id = self.inner.token_to_id(&bos);
            if self.bos_id.is_none() {
                tracing::warn!("BOS token {bos:?} is not in the tokenizer's vocabulary");
            }
            self.bos_token = Some(bos);
        }
        if let Some(first) = eos.first() {
            self.eos_token = Some(first.clone());
            self.eos_ids.clear();
            for token in &eos {
                match self.inner.token_to_id(token) {
                    Some(id) => push_unique(&mut self.eos_ids, id),
                    None => {
                        tracing::warn!("EOS token {token:?} is not in the tokenizer's vocabulary")
                    }
                }
            }
        }
        for id in extra_eos_ids {
            push_unique(&mut self.eos_ids, id);
        }
        self
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab_size)
            .field("bos_token", &self.bos_token)
            .field("bos_id", &self.bos_id)
            .field("eos_token", &self.eos_token)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

/// Names the algorithm of a `tokenizer.json` for `braid inspect`.
fn describe_kind(spec: &Value) -> String {
    let model = &spec["model"];
    let model_type = match model["type"].as_str() {
        Some(t) => t,
        // Files written before the model carried a "type" are BPE when they have merges.
        None if model.get("merges").is_some() => "BPE",
        None => "unknown",
    };
    let mentions = |part: &str, needle: &str| {
        spec.get(part)
            .is_some_and(|v| v.to_string().contains(needle))
    };
    match model_type {
        "BPE" if mentions("pre_tokenizer", "ByteLevel") || mentions("decoder", "ByteLevel") => {
            "BPE (byte-level)".to_string()
        }
        "BPE"
            if model["byte_fallback"].as_bool() == Some(true)
                || mentions("pre_tokenizer", "Metaspace")
                || mentions("normalizer", SPACE_PIECE) =>
        {
            "BPE (SentencePiece-style)".to_string()
        }
        "Unigram" => "Unigram (SentencePiece-style)".to_string(),
        other => other.to_string(),
    }
}

/// The BOS token a `tokenizer.json` post-processor puts in front of every sequence, if any.
fn template_bos(spec: &Value) -> Option<(u32, String)> {
    fn find(processor: &Value) -> Option<(u32, String)> {
        match processor["type"].as_str()? {
            "TemplateProcessing" => {
                let name = processor["single"].get(0)?.get("SpecialToken")?["id"].as_str()?;
                let special = processor["special_tokens"].get(name)?;
                let id = special["ids"].get(0)?.as_u64()?;
                let token = special["tokens"].get(0)?.as_str().unwrap_or(name);
                Some((u32::try_from(id).ok()?, token.to_string()))
            }
            "Sequence" => processor["processors"].as_array()?.iter().find_map(find),
            _ => None,
        }
    }
    find(spec.get("post_processor")?)
}

/// Builds the `tokenizer.json` equivalent of a GGUF vocabulary.
fn gguf_tokenizer_spec(meta: &GgufTokenizerMetadata) -> Result<Value> {
    check_gguf_metadata(meta)?;
    let vocab: Map<String, Value> = meta
        .tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), json!(id)))
        .collect();
    let token = |id: Option<u32>| id.map(|id| meta.tokens[id as usize].clone());
    let bos = token(meta.bos_id);
    let eos = token(meta.eos_id);
    match meta.model.as_str() {
        "gpt2" => {
            let merges = match &meta.merges {
                Some(merges) => parse_merges(merges)?,
                None => {
                    return Err(ModelError::Tokenizer(
                        "the GGUF tokenizer of model \"gpt2\" has no tokenizer.ggml.merges; a byte-level BPE vocabulary needs them"
                            .to_string(),
                    ))
                }
            };
            let pre = ByteLevelPre::from_name(meta.pre.as_deref());
            let add_bos = meta.add_bos.unwrap_or(pre == ByteLevelPre::Llama3);
            let add_eos = meta.add_eos.unwrap_or(false);
            let added_tokens = gguf_added_tokens(meta, false);
            let model = json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": pre.ignores_merges(),
                "vocab": vocab,
                "merges": merges,
            });
            let post_processor = special_tokens_template(
                add_bos.then_some(bos).flatten(),
                add_eos.then_some(eos).flatten(),
                meta,
            )
            .unwrap_or_else(|| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}));
            Ok(json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added_tokens,
                "normalizer": pre.normalizer(),
                "pre_tokenizer": pre.pre_tokenizer(),
                "post_processor": post_processor,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": model,
            }))
        }
        "llama" => {
            let merges = match &meta.merges {
                Some(merges) => parse_merges(merges)?,
                None => match &meta.scores {
                    Some(scores) => merges_from_scores(&meta.tokens, scores),
                    None => {
                        return Err(ModelError::Tokenizer(
                            "the GGUF tokenizer of model \"llama\" has neither tokenizer.ggml.merges nor tokenizer.ggml.scores; one of them is needed to rank merges"
                                .to_string(),
                        ))
                    }
                },
            };
            // llama.cpp's default for "llama" vocabularies; Gemma-style ones that set
            // tokenizer.ggml.add_space_prefix = false are not described by the metadata.
            let add_space_prefix = true;
            let add_bos = meta.add_bos.unwrap_or(true);
            let add_eos = meta.add_eos.unwrap_or(false);
            let added_tokens = gguf_added_tokens(meta, true);
            let model = json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": token(meta.unk_id),
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            });
            // transformers' LlamaTokenizerFast with legacy=False: "▁" is prepended to the start
            // of the text only, not after every special token.
            let pre_tokenizer = json!({
                "type": "Metaspace",
                "replacement": SPACE_PIECE,
                "prepend_scheme": if add_space_prefix { "first" } else { "never" },
                "split": false,
            });
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": SPACE_PIECE}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let post_processor = special_tokens_template(
                add_bos.then_some(bos).flatten(),
                add_eos.then_some(eos).flatten(),
                meta,
            );
            Ok(json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added_tokens,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": post_processor,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": model,
            }))
        }
        other => Err(ModelError::Tokenizer(format!(
            "unsupported GGUF tokenizer model {other:?}; supported are \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece BPE)"
        ))),
    }
}

fn check_gguf_metadata(meta: &GgufTokenizerMetadata) -> Result<()> {
    let n = meta.tokens.len();
    if n == 0 {
        return Err(ModelError::Tokenizer(
            "the GGUF file has an empty tokenizer.ggml.tokens list".to_string(),
        ));
    }
    if let Some(scores) = &meta.scores {
        if scores.len() != n {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {n}; expected one score per token",
                scores.len()
            )));
        }
    }
    if let Some(types) = &meta.token_types {
        if types.len() != n {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n}; expected one type per token",
                types.len()
            )));
        }
    }
    for (key, id) in [
        ("bos_token_id", meta.bos_id),
        ("eos_token_id", meta.eos_id),
        ("unknown_token_id", meta.unk_id),
        ("padding_token_id", meta.pad_id),
    ] {
        if let Some(id) = id {
            if id as usize >= n {
                return Err(ModelError::Tokenizer(format!(
                    "tokenizer.ggml.{key} is {id}, outside the vocabulary of {n} tokens"
                )));
            }
        }
    }
    Ok(())
}

/// Splits "left right" merge strings into pairs.
fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .enumerate()
        .map(|(i, merge)| match merge.split_once(' ') {
            Some((left, right)) if !left.is_empty() && !right.is_empty() && !right.contains(' ') => {
                Ok((left.to_string(), right.to_string()))
            }
            _ => Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.merges entry {i} is {merge:?}; expected two tokens separated by one space"
            ))),
        })
        .collect()
}

/// Derives BPE merges from SentencePiece scores, exactly as transformers' `GGUFTokenizerSkeleton`
/// does: every split of a piece into two known pieces is a merge ranked by the piece's score;
/// splits of one piece are ordered by the scores of their halves.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // A Python dict built from (token, score): the last score wins, the first position stays.
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (token, &score) in tokens.iter().zip(scores) {
        if score_of.insert(token.as_str(), score).is_none() {
            order.push(token.as_str());
        }
    }
    // Python compares -0.0 and 0.0 as equal; total_cmp would not.
    let key = |x: f32| if x == 0.0 { 0.0 } else { x };
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for piece in order {
        let piece_score = score_of[piece];
        let mut local: Vec<(&str, &str, f32)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(left, right)| score_of.contains_key(left) && score_of.contains_key(right))
            .map(|(left, right)| (left, right, piece_score))
            .collect();
        local.sort_by(|a, b| {
            key(score_of[b.0])
                .total_cmp(&key(score_of[a.0]))
                .then_with(|| key(score_of[b.1]).total_cmp(&key(score_of[a.1])))
        });
        merges.extend(local);
    }
    merges.sort_by(|a, b| key(b.2).total_cmp(&key(a.2)));
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// GGUF control (and, for SentencePiece vocabularies, unknown) tokens become special added
/// tokens and user-defined ones plain added tokens: either way they are matched whole, before
/// the model splits text, and only the special ones are dropped by `skip_special_tokens`.
fn gguf_added_tokens(meta: &GgufTokenizerMetadata, unknown_is_special: bool) -> Vec<Value> {
    let added = |id: usize, special: bool| {
        json!({
            "id": id,
            "content": meta.tokens[id],
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": special,
        })
    };
    match &meta.token_types {
        Some(types) => types
            .iter()
            .enumerate()
            .filter_map(|(id, &ty)| match ty {
                TOKEN_TYPE_CONTROL => Some(added(id, true)),
                TOKEN_TYPE_UNKNOWN if unknown_is_special => Some(added(id, true)),
                TOKEN_TYPE_USER_DEFINED => Some(added(id, false)),
                _ => None,
            })
            .collect(),
        // Without types, the tokens the GGUF names are the only ones known to be special.
        None => {
            let mut ids: Vec<u32> = Vec::new();
            for id in [meta.unk_id, meta.bos_id, meta.eos_id, meta.pad_id]
                .into_iter()
                .flatten()
            {
                push_unique(&mut ids, id);
            }
            ids.into_iter().map(|id| added(id as usize, true)).collect()
        }
    }
}

/// A `TemplateProcessing` post-processor that adds BOS and/or EOS around each sequence, the
/// way transformers' LLaMA tokenizer builds it; `None` when neither is added.
fn special_tokens_template(
    bos: Option<String>,
    eos: Option<String>,
    meta: &GgufTokenizerMetadata,
) -> Option<Value> {
    if bos.is_none() && eos.is_none() {
        return None;
    }
    let special =
        |token: &str, type_id: u32| json!({"SpecialToken": {"id": token, "type_id": type_id}});
    let sequence = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (name, type_id) in [("A", 0), ("B", 1)] {
        let part = if type_id == 0 { &mut single } else { &mut pair };
        if let Some(bos) = &bos {
            part.push(special(bos, type_id));
        }
        part.push(sequence(name, type_id));
        if let Some(eos) = &eos {
            part.push(special(eos, type_id));
        }
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    let mut special_tokens = Map::new();
    for (token, id) in [(&bos, meta.bos_id), (&eos, meta.eos_id)] {
        if let (Some(token), Some(id)) = (token, id) {
            special_tokens.insert(
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
        }
    }
    Some(json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    }))
}

/// The pre-tokenizers of byte-level vocabularies, by llama.cpp's `tokenizer.ggml.pre` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteLevelPre {
    /// GPT-2's regex inside the ByteLevel pre-tokenizer.
    Gpt2,
    /// Single digits split off first, then GPT-2's regex (SmolLM, StarCoder).
    Digits,
    /// Llama-3's split regex; whole words in the vocabulary skip the merges.
    Llama3,
    /// Qwen2's split regex after NFC normalisation.
    Qwen2,
}

impl ByteLevelPre {
    fn from_name(pre: Option<&str>) -> ByteLevelPre {
        match pre {
            None | Some("default" | "gpt2" | "gpt-2") => ByteLevelPre::Gpt2,
            Some("smollm" | "starcoder") => ByteLevelPre::Digits,
            Some("llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe") => ByteLevelPre::Llama3,
            Some("qwen2" | "deepseek-r1-qwen") => ByteLevelPre::Qwen2,
            Some(other) => {
                tracing::warn!(
                    "GGUF pre-tokenizer {other:?} is not known; using GPT-2's, so some texts may tokenize differently from the original model"
                );
                ByteLevelPre::Gpt2
            }
        }
    }

    fn ignores_merges(self) -> bool {
        self == ByteLevelPre::Llama3
    }

    fn normalizer(self) -> Value {
        match self {
            ByteLevelPre::Qwen2 => json!({"type": "NFC"}),
            _ => Value::Null,
        }
    }

    fn pre_tokenizer(self) -> Value {
        let byte_level = |trim_offsets: bool, use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim_offsets, "use_regex": use_regex});
        let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
        match self {
            ByteLevelPre::Gpt2 => byte_level(true, true),
            ByteLevelPre::Digits => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true, true)],
            }),
            ByteLevelPre::Llama3 => json!({
                "type": "Sequence",
                "pretokenizers": [split(LLAMA3_SPLIT_REGEX), byte_level(true, false)],
            }),
            ByteLevelPre::Qwen2 => json!({
                "type": "Sequence",
                "pretokenizers": [split(QWEN2_SPLIT_REGEX), byte_level(false, false)],
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// A tiny byte-level vocabulary: the 256 byte symbols, a few merges and two control tokens.
    fn byte_level_meta() -> GgufTokenizerMetadata {
        let mut tokens: Vec<String> = (0u8..=255).map(byte_symbol).collect();
        for merged in ["he", "ll", "hell", "hello", "Ġw"] {
            tokens.push(merged.to_string());
        }
        tokens.push("<|endoftext|>".to_string());
        tokens.push("<|im_end|>".to_string());
        let mut types = vec![1; tokens.len()];
        let n = types.len();
        types[n - 2] = 3;
        types[n - 1] = 3;
        GgufTokenizerMetadata {
            model: "gpt2".to_string(),
            pre: Some("default".to_string()),
            merges: Some(strings(&["h e", "l l", "he ll", "hell o", "Ġ w"])),
            token_types: Some(types),
            bos_id: Some((n - 2) as u32),
            eos_id: Some((n - 1) as u32),
            tokens,
            ..Default::default()
        }
    }

    /// GPT-2's printable stand-in for a byte.
    fn byte_symbol(b: u8) -> String {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        if printable {
            char::from(b).to_string()
        } else {
            let offset = (0u8..b)
                .filter(|&c| {
                    !((b'!'..=b'~').contains(&c)
                        || (0xA1..=0xAC).contains(&c)
                        || (0xAE..=0xFF).contains(&c))
                })
                .count() as u32;
            char::from_u32(256 + offset)
                .map(String::from)
                .unwrap_or_default()
        }
    }

    #[test]
    fn gguf_byte_level_merges_and_round_trip() {
        let meta = byte_level_meta();
        let tok = Tokenizer::from_gguf(&meta).unwrap();
        assert_eq!(tok.kind(), "BPE (byte-level)");
        let hello = tok.token_to_id("hello").unwrap();
        let space_w = tok.token_to_id("Ġw").unwrap();
        let ids = tok.encode("hello world", false).unwrap();
        assert_eq!(ids[0], hello);
        assert_eq!(ids[1], space_w);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert_eq!(tok.eos_ids(), &[tok.token_to_id("<|im_end|>").unwrap()]);
        assert_eq!(tok.vocab_size(), meta.tokens.len());
    }

    #[test]
    fn gguf_control_tokens_are_never_split_and_skippable() {
        let tok = Tokenizer::from_gguf(&byte_level_meta()).unwrap();
        let end = tok.token_to_id("<|im_end|>").unwrap();
        let ids = tok.encode("hello<|im_end|>", false).unwrap();
        assert_eq!(ids.last(), Some(&end));
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello");
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello<|im_end|>");
    }

    #[test]
    fn gguf_add_bos_and_eos_follow_the_metadata() {
        let mut meta = byte_level_meta();
        let bos = meta.bos_id.unwrap();
        let eos = meta.eos_id.unwrap();
        let without = Tokenizer::from_gguf(&meta)
            .unwrap()
            .encode("hello", true)
            .unwrap();
        assert_ne!(without.first(), Some(&bos));
        meta.add_bos = Some(true);
        meta.add_eos = Some(true);
        let with = Tokenizer::from_gguf(&meta)
            .unwrap()
            .encode("hello", true)
            .unwrap();
        assert_eq!(with.first(), Some(&bos));
        assert_eq!(with.last(), Some(&eos));
        assert_eq!(&with[1..with.len() - 1], &without[..]);
    }

    #[test]
    fn gguf_bad_metadata_gives_clear_errors() {
        let mut meta = byte_level_meta();
        meta.model = "bert".to_string();
        let err = Tokenizer::from_gguf(&meta).unwrap_err().to_string();
        assert!(
            err.contains("unsupported GGUF tokenizer model \"bert\""),
            "{err}"
        );

        let mut meta = byte_level_meta();
        meta.eos_id = Some(100_000);
        let err = Tokenizer::from_gguf(&meta).unwrap_err().to_string();
        assert!(
            err.contains("eos_token_id is 100000, outside the vocabulary"),
            "{err}"
        );

        let mut meta = byte_level_meta();
        meta.merges = Some(strings(&["h e", "nospace"]));
        let err = Tokenizer::from_gguf(&meta).unwrap_err().to_string();
        assert!(err.contains("merges entry 1"), "{err}");

        let mut meta = byte_level_meta();
        meta.merges = None;
        let err = Tokenizer::from_gguf(&meta).unwrap_err().to_string();
        assert!(err.contains("no tokenizer.ggml.merges"), "{err}");

        let mut meta = byte_level_meta();
        meta.token_types = Some(vec![1, 2, 3]);
        let err = Tokenizer::from_gguf(&meta).unwrap_err().to_string();
        assert!(err.contains("token_type has 3 entries"), "{err}");

        let meta = GgufTokenizerMetadata {
            model: "llama".to_string(),
            ..Default::default()
        };
        let err = Tokenizer::from_gguf(&meta).unwrap_err().to_string();
        assert!(err.contains("empty tokenizer.ggml.tokens"), "{err}");

        let meta = GgufTokenizerMetadata {
            model: "llama".to_string(),
            tokens: strings(&["a"]),
            ..Default::default()
        };
        let err = Tokenizer::from_gguf(&meta).unwrap_err().to_string();
        assert!(
            err.contains("neither tokenizer.ggml.merges nor tokenizer.ggml.scores"),
            "{err}"
        );
    }

    #[test]
    fn merges_from_scores_rank_by_piece_score_then_halves() {
        let tokens = strings(&["a", "b", "c", "ab", "bc", "abc"]);
        let scores = [-10.0, -11.0, -12.0, -1.0, -2.0, -3.0];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // "abc" splits as ab|c and a|bc; "ab" (-1) outscores "a" (-10), so ab|c comes first.
        assert_eq!(
            pairs,
            vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
        );
    }

    #[test]
    fn merges_from_scores_split_on_characters_not_bytes() {
        let tokens = strings(&["▁", "é", "▁é"]);
        let merges = merges_from_scores(&tokens, &[-5.0, -6.0, -1.0]);
        assert_eq!(merges, vec![("▁".to_string(), "é".to_string())]);
    }

    #[test]
    fn with_special_tokens_sets_bos_and_merges_eos_ids() {
        let tok = Tokenizer::from_gguf(&byte_level_meta()).unwrap();
        let text = tok.token_to_id("<|endoftext|>").unwrap();
        let end = tok.token_to_id("<|im_end|>").unwrap();
        let tok = tok.with_special_tokens(
            Some("<|endoftext|>".to_string()),
            vec![
                "<|endoftext|>".to_string(),
                "<|im_end|>".to_string(),
                "<|missing|>".to_string(),
            ],
            vec![end, 7],
        );
        assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
        assert_eq!(tok.bos_id(), Some(text));
        assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
        assert_eq!(tok.eos_ids(), &[text, end, 7]);
        // Nothing given keeps what is known.
        let tok = tok.with_special_tokens(None, Vec::new(), Vec::new());
        assert_eq!(tok.eos_ids(), &[text, end, 7]);
        assert_eq!(tok.bos_id(), Some(text));
    }

    #[test]
    fn decode_skips_ids_outside_the_vocabulary() {
        let tok = Tokenizer::from_gguf(&byte_level_meta()).unwrap();
        let mut ids = tok.encode("hello", false).unwrap();
        ids.push(1_000_000);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello");
    }

    #[test]
    fn unknown_pre_tokenizer_falls_back_to_gpt2() {
        let mut meta = byte_level_meta();
        meta.pre = Some("something-new".to_string());
        let tok = Tokenizer::from_gguf(&meta).unwrap();
        assert_eq!(
            tok.decode(&tok.encode("hello world", false).unwrap(), false)
                .unwrap(),
            "hello world"
        );
    }

    #[test]
    fn describe_kind_names_the_algorithm() {
        assert_eq!(
            describe_kind(&json!({"model": {"type": "Unigram"}})),
            "Unigram (SentencePiece-style)"
        );
        assert_eq!(
            describe_kind(&json!({"model": {"type": "WordPiece"}})),
            "WordPiece"
        );
        assert_eq!(
            describe_kind(&json!({"model": {"type": "BPE", "byte_fallback": true}})),
            "BPE (SentencePiece-style)"
        );
        assert_eq!(
            describe_kind(&json!({"model": {"merges": []}, "decoder": {"type": "ByteLevel"}})),
            "BPE (byte-level)"
        );
    }
}
