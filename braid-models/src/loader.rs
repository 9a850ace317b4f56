//! Opening a model location: config, weights, tokenizer, chat template and generation defaults,
//! read in that order so a bad file is reported before anything large is loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use braid_kernels::{DType, Device};
use braid_quant::{GgufFile, GgufValue};
use serde_json::Value;

use crate::chat_template::ChatTemplate;
use crate::config::ModelConfig;
use crate::cuda_model::CudaModel;
use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::source::ModelLocation;
use crate::tokenizer::{GgufTokenizerMetadata, Tokenizer};
use crate::weights::{GgufWeights, SafetensorsWeights, Weights};

/// Everything about a model except its weights: cheap to read, shown by `braid inspect`.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// "safetensors" or "gguf".
    pub format: &'static str,
    pub config: ModelConfig,
    /// Storage type → number of tensors stored in it.
    pub weight_types: BTreeMap<String, usize>,
    pub tokenizer_kind: String,
    pub tokenizer_vocab: usize,
    pub has_chat_template: bool,
}

/// Where the weights were loaded and the forward pass runs.
pub enum Backend {
    /// f32 weights in host memory.
    Cpu(Box<Model>),
    /// bf16/f16 weights on a GPU.
    Cuda(Box<CudaModel>),
}

/// A model with everything needed to turn text into text.
pub struct LoadedModel {
    pub info: ModelInfo,
    pub backend: Backend,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
}

impl LoadedModel {
    /// The CPU model, when the weights were loaded for the CPU.
    pub fn cpu_model(&self) -> Option<&Model> {
        match &self.backend {
            Backend::Cpu(m) => Some(m),
            Backend::Cuda(_) => None,
        }
    }
}

/// The parts of a model other than the forward pass.
struct Assets {
    info: ModelInfo,
    weights: Weights,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
}

/// Load a model for running on the CPU.
pub fn load(location: &ModelLocation) -> Result<LoadedModel> {
    load_on(location, Device::Cpu, DType::F32)
}

/// Load a model for running on `device`: the CPU computes in f32; a GPU in `dtype` (bf16 or f16).
pub fn load_on(location: &ModelLocation, device: Device, dtype: DType) -> Result<LoadedModel> {
    let a = open(location)?;
    let backend = match device {
        Device::Cpu if dtype != DType::F32 => {
            return Err(ModelError::Config(format!(
                "the CPU computes in f32; {dtype} applies to GPU runs only"
            )))
        }
        Device::Cpu => Backend::Cpu(Box::new(Model::load(&a.info.config, &a.weights)?)),
        Device::Cuda(ordinal) => Backend::Cuda(Box::new(CudaModel::load(
            &a.info.config,
            &a.weights,
            ordinal,
            dtype,
        )?)),
    };
    Ok(LoadedModel {
        info: a.info,
        backend,
        tokenizer: a.tokenizer,
        chat_template: a.chat_template,
    })
}

/// Read a model's description without loading its weights.
pub fn inspect(location: &ModelLocation) -> Result<ModelInfo> {
    open(location).map(|a| a.info)
}

impl Assets {
    fn new(
        path: &Path,
        format: &'static str,
        config: ModelConfig,
        weights: Weights,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
    ) -> Self {
        let info = ModelInfo {
            path: path.to_owned(),
            format,
            weight_types: weights.type_summary(),
            tokenizer_kind: tokenizer.kind().to_owned(),
            tokenizer_vocab: tokenizer.vocab_size(),
            has_chat_template: chat_template.is_some(),
            config,
        };
        Assets {
            info,
            weights,
            tokenizer,
            chat_template,
        }
    }
}

fn open(location: &ModelLocation) -> Result<Assets> {
    match location {
        ModelLocation::HfDir(dir) => open_hf_dir(dir),
        ModelLocation::Gguf(path) => open_gguf(path),
    }
}

fn open_hf_dir(dir: &Path) -> Result<Assets> {
    let mut config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let tok_config = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let gen_config = read_json_opt(&dir.join("generation_config.json"))?;

    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(ModelError::Tokenizer(format!(
            "{} holds no tokenizer.json",
            dir.display()
        )));
    }
    let special = |key: &str| -> Option<String> {
        match tok_config.as_ref()?.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        }
    };
    let bos = special("bos_token");
    let eos: Vec<String> = special("eos_token").into_iter().collect();
    // generation_config.json's eos ids take precedence over config.json's, as in transformers.
    if let Some(ids) = gen_config
        .as_ref()
        .and_then(|g| g.get("eos_token_id"))
        .map(ids_of)
        .filter(|i| !i.is_empty())
    {
        config.eos_token_ids = ids;
    }
    let tokenizer = Tokenizer::from_file(&tok_path)?.with_special_tokens(
        bos.clone(),
        eos.clone(),
        config.eos_token_ids.clone(),
    );

    let template_src = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
        Ok(s) => Some(s),
        Err(_) => tok_config
            .as_ref()
            .and_then(|t| template_from_json(t.get("chat_template")?)),
    };
    let chat_template = template_src
        .map(|src| ChatTemplate::new(&src, bos, eos.into_iter().next()))
        .transpose()?;

    let weights = Weights::Safetensors(SafetensorsWeights::open_dir(dir)?);
    Ok(Assets::new(
        dir,
        "safetensors",
        config,
        weights,
        tokenizer,
        chat_template,
    ))
}

fn open_gguf(path: &Path) -> Result<Assets> {
    let file = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(&file)?;
    let meta = gguf_tokenizer_metadata(&file)?;
    let tokenizer = Tokenizer::from_gguf(&meta)?;
    let token_str = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let chat_template = file
        .get_str("tokenizer.chat_template")
        .map(|src| ChatTemplate::new(src, token_str(meta.bos_id), token_str(meta.eos_id)))
        .transpose()?;
    let weights = Weights::Gguf(GgufWeights::new(file, &config));
    Ok(Assets::new(
        path,
        "gguf",
        config,
        weights,
        tokenizer,
        chat_template,
    ))
}

/// Collect the `tokenizer.ggml.*` keys.
fn gguf_tokenizer_metadata(file: &GgufFile) -> Result<GgufTokenizerMetadata> {
    let bad = |what: &str| ModelError::Tokenizer(format!("GGUF tokenizer metadata: {what}"));
    // An optional array key whose every element converts with `get` (else one sentence naming it).
    fn array<T>(
        file: &GgufFile,
        key: &str,
        kind: &str,
        get: impl Fn(&GgufValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let bad = |what: String| ModelError::Tokenizer(format!("GGUF tokenizer metadata: {what}"));
        let Some(v) = file.get(key) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| bad(format!("{key} is not an array")))?;
        items
            .iter()
            .map(|x| get(x).ok_or_else(|| bad(format!("{key} holds a non-{kind}"))))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    let strings = |key: &str| array(file, key, "string", |x| x.as_str().map(str::to_owned));
    let numbers = |key: &str| array(file, key, "number", GgufValue::as_f64);
    let id = |key: &str| file.get_u64(key).map(|x| x as u32);
    Ok(GgufTokenizerMetadata {
        model: file
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| bad("tokenizer.ggml.model is missing"))?
            .to_owned(),
        pre: file.get_str("tokenizer.ggml.pre").map(str::to_owned),
        tokens: strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| bad("tokenizer.ggml.tokens is missing"))?,
        scores: numbers("tokenizer.ggml.scores")?
            .map(|v| v.into_iter().map(|x| x as f32).collect()),
        token_types: numbers("tokenizer.ggml.token_type")?
            .map(|v| v.into_iter().map(|x| x as i32).collect()),
        merges: strings("tokenizer.ggml.merges")?,
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_id: id("tokenizer.ggml.eos_token_id"),
        unk_id: id("tokenizer.ggml.unknown_token_id"),
        pad_id: id("tokenizer.ggml.padding_token_id"),
        add_bos: file.get_bool("tokenizer.ggml.add_bos_token"),
        add_eos: file.get_bool("tokenizer.ggml.add_eos_token"),
    })
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Config(format!("{} is not valid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

/// `chat_template` is a string, or a list of named templates of which "default" is the one to use.
fn template_from_json(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or(items.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}
