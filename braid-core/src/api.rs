//! `Braid`: the simple API for the common case — load a model by name, generate text, optionally
//! streaming it as it is produced.

use std::ops::ControlFlow;
use std::time::Instant;

use braid_models::chat_template::ChatMessage;
use braid_models::source;
use serde::Serialize;

use crate::engine::{Engine, EngineConfig};
use crate::error::EngineError;
use crate::request::{FinishReason, GenerationParams};

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template (generation prompt appended).
    Chat(Vec<ChatMessage>),
    /// Text tokenized as it is, with the tokenizer's default special tokens (e.g. BOS).
    Raw(String),
    /// Token ids, used as given.
    Ids(Vec<u32>),
}

/// Wall-clock facts about one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Request start to first generated token (prefill).
    pub time_to_first_token_s: f64,
    pub total_s: f64,
    /// Generated tokens after the first, per second of decoding.
    pub decode_tokens_per_s: f64,
}

/// A finished generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// A loaded model with an engine around it.
///
/// ```no_run
/// use braid_core::{Braid, GenerationParams, Prompt};
///
/// let mut braid = Braid::load("smollm2-135m")?;
/// let params = GenerationParams { max_tokens: 16, ..Default::default() };
/// let out = braid.generate(Prompt::Raw("The capital of France is".into()), &params)?;
/// println!("{}", out.text);
///
/// // Or stream the text as it is produced; return ControlFlow::Break(()) to stop early.
/// braid.generate_stream(Prompt::Raw("Once upon a time".into()), &params, |piece| {
///     print!("{piece}");
///     std::ops::ControlFlow::Continue(())
/// })?;
/// # Ok::<(), braid_core::EngineError>(())
/// ```
pub struct Braid {
    engine: Engine,
}

impl Braid {
    /// Load a model by directory, `.gguf` path, Hugging Face cache id or alias (fetched on first use).
    pub fn load(model: &str) -> Result<Self, EngineError> {
        let location = source::resolve(model)?;
        let loaded = braid_models::load(&location)?;
        Self::with_engine(Engine::new(loaded, EngineConfig::default())?)
    }

    pub fn with_engine(engine: Engine) -> Result<Self, EngineError> {
        Ok(Braid { engine })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Turn a prompt into token ids.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let tokenizer = self.engine.tokenizer();
        let ids = match prompt {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Raw(text) => tokenizer.encode(text, true)?,
            Prompt::Chat(messages) => {
                let template = self.engine.chat_template().ok_or_else(|| {
                    EngineError::InvalidRequest(
                        "this model has no chat template; use a raw prompt instead".into(),
                    )
                })?;
                let text = template.render(messages, true)?;
                // The template writes the special tokens itself.
                tokenizer.encode(&text, false)?
            }
        };
        Ok(ids)
    }

    /// Generate to completion.
    pub fn generate(
        &mut self,
        prompt: Prompt,
        params: &GenerationParams,
    ) -> Result<Generation, EngineError> {
        self.generate_stream(prompt, params, |_| ControlFlow::Continue(()))
    }

    /// Generate, calling `on_text` with each piece of final text as soon as it exists. Returning
    /// `ControlFlow::Break(())` stops the generation (finish reason "abort") and frees its cache.
    pub fn generate_stream(
        &mut self,
        prompt: Prompt,
        params: &GenerationParams,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, EngineError> {
        let start = Instant::now();
        let prompt_ids = self.tokenize(&prompt)?;
        let id = self
            .engine
            .add_request(prompt_ids.clone(), params.clone())?;
        let mut token_ids = Vec::new();
        let mut text = String::new();
        let mut first_token: Option<Instant> = None;
        let mut cached_prompt_tokens = 0;
        let finish_reason = 'outer: loop {
            let events = match self.engine.step() {
                Ok(events) => events,
                Err(e) => {
                    self.engine.abort(id);
                    return Err(e);
                }
            };
            if events.is_empty() && !self.engine.has_work() {
                break FinishReason::Abort;
            }
            for ev in events.into_iter().filter(|e| e.request == id) {
                if let Some(t) = ev.token {
                    token_ids.push(t);
                    first_token.get_or_insert_with(Instant::now);
                }
                text.push_str(&ev.text);
                if let Some(m) = &ev.metrics {
                    cached_prompt_tokens = m.cached_prompt_tokens;
                }
                let stop = !ev.text.is_empty() && on_text(&ev.text).is_break();
                if let Some(reason) = ev.finished {
                    break 'outer reason;
                }
                if stop {
                    self.engine.abort(id);
                    break 'outer FinishReason::Abort;
                }
            }
        };
        let end = Instant::now();
        let ttft = first_token.map_or(0.0, |t| (t - start).as_secs_f64());
        let decode_s = first_token.map_or(0.0, |t| (end - t).as_secs_f64());
        let timings = Timings {
            prompt_tokens: prompt_ids.len(),
            cached_prompt_tokens,
            generated_tokens: token_ids.len(),
            time_to_first_token_s: ttft,
            total_s: (end - start).as_secs_f64(),
            decode_tokens_per_s: if decode_s > 0.0 {
                (token_ids.len().saturating_sub(1)) as f64 / decode_s
            } else {
                0.0
            },
        };
        Ok(Generation {
            prompt_token_ids: prompt_ids,
            token_ids,
            text,
            finish_reason,
            timings,
        })
    }
}
