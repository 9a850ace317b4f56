//! A multi-turn conversation over an [`Engine`]: its messages as chunks, the answer of each turn
//! kept in the KV cache as the next turn's prefix, and reasoning (think) text split from answers.
//!
//! After each turn the conversation is rendered the way the next turn's chat template will render
//! it (a reasoning model's template drops earlier think blocks, for instance), and the cache is
//! made to hold exactly those tokens: whatever the answer's own KV does not cover is computed by
//! a prefill-only request whose KV is retained. The next turn then computes only its new message.
//!
//! The conversation drives the engine itself: run it on an engine that serves nothing else, since
//! other requests' events are not reported while it steps.
//!
//! ```no_run
//! use braid_core::{Braid, Conversation, GenerationParams, OutputPiece};
//!
//! let mut braid = Braid::load("smollm2-135m")?;
//! let mut chat = Conversation::new(braid.engine())?;
//! chat.set_system(braid.engine(), Some("Answer briefly."))?;
//! for question in ["What is Rust?", "Who made it?"] {
//!     chat.set_query(braid.engine(), question)?;
//!     let turn = chat.infer(braid.engine_mut(), &GenerationParams::default(), |piece| {
//!         if let OutputPiece::Answer(text) = piece {
//!             print!("{text}");
//!         }
//!         std::ops::ControlFlow::Continue(())
//!     })?;
//!     println!("\n({} prompt tokens computed)", turn.prefill_tokens);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ops::ControlFlow;
use std::path::Path;

use braid_models::chat_template::{ChatMessage, ChatTemplate};
use braid_models::tokenizer::Tokenizer;
use braid_models::ModelError;
use serde::{Deserialize, Serialize};

use crate::chunks::{
    common_prefix_len, ChunkError, ChunkId, ChunkRole, ChunkStore, Composition, CompositionReport,
};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::reasoning::{split_reasoning, OutputPiece, ReasoningParser, ThinkTags};
use crate::request::{FinishReason, GenerationParams, RequestId, RequestMetrics};

/// Version of the saved-conversation file format.
const SAVE_FORMAT_VERSION: u32 = 1;

/// Two user messages that differ from their first character: the tokens two next turns built
/// on them share are the conversation's tokens as the next turn renders them.
const PROBES: [&str; 2] = ["A", "B"];

/// A conversation failure, as one sentence.
#[derive(Debug, thiserror::Error)]
pub enum ConversationError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("this model has no chat template, so it cannot hold a conversation")]
    NoChatTemplate,
    #[error("there is no query to answer; give one first")]
    NoQuery,
    #[error("there is no turn {index}; the conversation has {turns} turns, numbered from 0")]
    NoTurn { index: usize, turns: usize },
    #[error("turn {0} has no output (its answer was empty)")]
    NoOutput(usize),
    #[error("cannot {action} conversation file {path}: {reason}")]
    File {
        action: &'static str,
        path: String,
        reason: String,
    },
}

/// One finished turn.
#[derive(Debug, Clone)]
pub struct Turn {
    /// Contexts (context or output chunks) sent with the query.
    pub contexts: Vec<ChunkId>,
    pub query: ChunkId,
    /// The answer as an output chunk, reusable as context; `None` when the answer was empty.
    pub output: Option<ChunkId>,
    /// The exact output, think markers included: the assistant message the template renders.
    pub raw: String,
    pub reasoning: String,
    pub answer: String,
    pub finish_reason: FinishReason,
    /// The answering request's metrics (zero for turns loaded from a file).
    pub metrics: RequestMetrics,
    /// Prompt tokens the answering request computed (the rest came from the cache).
    pub prefill_tokens: usize,
    /// Tokens a prefill-only request computed after the answer, so that the cache holds the
    /// conversation exactly as the next turn renders it.
    pub topup_tokens: usize,
    /// The retained output holding the conversation's KV through this turn.
    pub retained: Option<RequestId>,
}

impl Turn {
    /// Decode speed of the answer, in tokens per second (0 for a single token).
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.metrics.mean_inter_token_s > 0.0 {
            1.0 / self.metrics.mean_inter_token_s
        } else {
            0.0
        }
    }
}

/// Totals over a conversation's turns.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConversationStats {
    pub turns: usize,
    pub prompt_tokens: u64,
    /// Prompt tokens whose KV came from the cache.
    pub cached_prompt_tokens: u64,
    /// Tokens computed after answers to keep the cache in step with the next turn's template.
    pub topup_tokens: u64,
    pub generated_tokens: u64,
    /// Seconds spent between first and last generated token, over all turns.
    pub decode_s: f64,
    /// Generated tokens after each turn's first, over all turns.
    pub decode_tokens: u64,
}

impl ConversationStats {
    /// Mean decode speed over all turns, in tokens per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 {
            self.decode_tokens as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// A conversation: a system prompt, finished turns, and the contexts and query of the next turn.
#[derive(Debug, Clone)]
pub struct Conversation {
    chunks: ChunkStore,
    tags: Option<ThinkTags>,
    template_vars: serde_json::Map<String, serde_json::Value>,
    system: Option<ChunkId>,
    contexts: Vec<ChunkId>,
    query: Option<ChunkId>,
    turns: Vec<Turn>,
    stats: ConversationStats,
}

/// What a saved conversation file holds: texts, not ids or KV, so it loads into any engine
/// running the same model.
#[derive(Debug, Serialize, Deserialize)]
struct SavedConversation {
    version: u32,
    system: Option<String>,
    #[serde(default)]
    template_vars: serde_json::Map<String, serde_json::Value>,
    turns: Vec<SavedTurn>,
    #[serde(default)]
    contexts: Vec<SavedPart>,
    #[serde(default)]
    query: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedTurn {
    contexts: Vec<SavedPart>,
    query: String,
    /// The exact output, think markers included.
    output: String,
    /// "length", "stop" or "abort".
    finish_reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedPart {
    role: String,
    text: String,
}

impl Conversation {
    /// An empty conversation for `engine`'s model; reasoning is split by the think markers the
    /// tokenizer defines (see [`ThinkTags::detect`]).
    pub fn new(engine: &Engine) -> Result<Self, ConversationError> {
        if engine.chat_template().is_none() {
            return Err(ConversationError::NoChatTemplate);
        }
        Ok(Conversation {
            chunks: ChunkStore::new(),
            tags: ThinkTags::detect(engine.tokenizer()),
            template_vars: serde_json::Map::new(),
            system: None,
            contexts: Vec::new(),
            query: None,
            turns: Vec::new(),
            stats: ConversationStats::default(),
        })
    }

    /// The think markers reasoning is split by, if any.
    pub fn think_tags(&self) -> Option<&ThinkTags> {
        self.tags.as_ref()
    }

    /// Overrides the think markers (`None`: every output is answer).
    pub fn set_think_tags(&mut self, tags: Option<ThinkTags>) {
        self.tags = tags;
    }

    /// Sets a chat template variable for every render, such as Qwen3's `enable_thinking`.
    pub fn set_template_var(&mut self, name: impl Into<String>, value: serde_json::Value) {
        self.template_vars.insert(name.into(), value);
    }

    /// Sets (or with `None` removes) the system prompt. Changing it changes the start of every
    /// later prompt, so the next turn recomputes the whole conversation.
    pub fn set_system(
        &mut self,
        engine: &Engine,
        text: Option<&str>,
    ) -> Result<Option<ChunkId>, ConversationError> {
        self.system = match text {
            Some(text) => Some(self.chunks.register(engine, ChunkRole::System, text)?),
            None => None,
        };
        Ok(self.system)
    }

    pub fn system(&self) -> Option<ChunkId> {
        self.system
    }

    /// Adds a context document to the next turn, before its query.
    pub fn add_context(
        &mut self,
        engine: &Engine,
        text: &str,
    ) -> Result<ChunkId, ConversationError> {
        let id = self.chunks.register(engine, ChunkRole::Context, text)?;
        self.contexts.push(id);
        Ok(id)
    }

    /// Adds the output of turn `index` to the next turn as context.
    pub fn use_output(&mut self, index: usize) -> Result<ChunkId, ConversationError> {
        let output = self.turn(index)?.output;
        let id = output.ok_or(ConversationError::NoOutput(index))?;
        self.contexts.push(id);
        Ok(id)
    }

    /// Sets the next turn's query.
    pub fn set_query(&mut self, engine: &Engine, text: &str) -> Result<ChunkId, ConversationError> {
        let id = self.chunks.register(engine, ChunkRole::Query, text)?;
        self.query = Some(id);
        Ok(id)
    }

    /// The next turn's contexts so far.
    pub fn pending_contexts(&self) -> &[ChunkId] {
        &self.contexts
    }

    /// The next turn's query, once set.
    pub fn pending_query(&self) -> Option<ChunkId> {
        self.query
    }

    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// The chunks of this conversation (texts, roles, statistics).
    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    pub fn stats(&self) -> &ConversationStats {
        &self.stats
    }

    /// The finished turns as chat messages, as the template receives them (system prompt first;
    /// assistant messages hold the exact output, think markers included).
    pub fn history(&self) -> Vec<ChatMessage> {
        let mut messages = Vec::with_capacity(1 + 2 * self.turns.len());
        if let Some(chunk) = self.system.and_then(|id| self.chunks.get(id)) {
            messages.push(ChatMessage::new("system", chunk.text.clone()));
        }
        for turn in &self.turns {
            let mut order = Vec::new();
            // The chunks of a finished turn stay registered: every id below was checked once.
            let user = self
                .chunks
                .user_message(&turn.contexts, turn.query, &mut order)
                .unwrap_or_default();
            messages.push(ChatMessage::new("user", user));
            messages.push(ChatMessage::new("assistant", turn.raw.clone()));
        }
        messages
    }

    /// The next turn's prompt: the whole conversation with the pending contexts and query,
    /// rendered once through the chat template and tokenized once.
    pub fn compose(&self, engine: &Engine) -> Result<Composition, ConversationError> {
        let query = self.query.ok_or(ConversationError::NoQuery)?;
        let template = engine
            .chat_template()
            .ok_or(ConversationError::NoChatTemplate)?;
        let mut messages = self.history();
        let mut order: Vec<ChunkId> = self.system.into_iter().collect();
        for turn in &self.turns {
            order.extend(&turn.contexts);
            order.push(turn.query);
            order.extend(turn.output);
        }
        let user = self
            .chunks
            .user_message(&self.contexts, query, &mut order)?;
        messages.push(ChatMessage::new("user", user));
        Ok(self.chunks.compose_messages(
            engine.tokenizer(),
            template,
            &self.template_vars,
            messages,
            &order,
        )?)
    }

    /// What the cache would supply for the next turn's prompt now, chunk by chunk.
    pub fn preview(&self, engine: &Engine) -> Result<CompositionReport, ConversationError> {
        Ok(self.chunks.preview(engine, &self.compose(engine)?))
    }

    /// Answers the pending query, streaming reasoning and answer pieces to `on_piece`; returning
    /// `ControlFlow::Break(())` stops the answer (finish reason "abort"), which still becomes a
    /// turn. The request's `retain` is forced on: its KV is the next turn's prefix.
    pub fn infer(
        &mut self,
        engine: &mut Engine,
        params: &GenerationParams,
        mut on_piece: impl FnMut(&OutputPiece) -> ControlFlow<()>,
    ) -> Result<&Turn, ConversationError> {
        let composition = self.compose(engine)?;
        let prompt = composition.tokens.clone();
        let params = GenerationParams {
            retain: true,
            ..params.clone()
        };
        let id = engine.add_request(prompt.clone(), params)?;
        let mut parser = ReasoningParser::new(self.tags.clone(), &prompt);
        let mut stopped = false;
        let mut metrics = None;
        let finish_reason = 'run: loop {
            let events = match engine.step() {
                Ok(events) => events,
                Err(e) => {
                    engine.abort(id);
                    return Err(e.into());
                }
            };
            if events.is_empty() && !engine.has_work() {
                break FinishReason::Abort;
            }
            for event in events.into_iter().filter(|e| e.request == id) {
                for piece in parser.push(event.token, &event.text) {
                    stopped |= !stopped && on_piece(&piece).is_break();
                }
                if let Some(reason) = event.finished {
                    metrics = event.metrics;
                    break 'run reason;
                }
                if stopped {
                    metrics = engine.abort(id).and_then(|e| e.metrics);
                    break 'run FinishReason::Abort;
                }
            }
        };
        for piece in parser.finish() {
            if !stopped {
                stopped = on_piece(&piece).is_break();
            }
        }
        let metrics = metrics.unwrap_or_default();
        self.chunks
            .record_use(&composition, metrics.cached_prompt_tokens);

        let output = match parser.answer().trim() {
            "" => None,
            _ => Some(
                self.chunks
                    .register(engine, ChunkRole::Output, parser.answer())?,
            ),
        };
        let query = self.query.take().ok_or(ConversationError::NoQuery)?;
        self.turns.push(Turn {
            contexts: std::mem::take(&mut self.contexts),
            query,
            output,
            raw: parser.raw().to_string(),
            reasoning: parser.reasoning().to_string(),
            answer: parser.answer().to_string(),
            finish_reason,
            prefill_tokens: metrics.prompt_tokens - metrics.cached_prompt_tokens,
            metrics,
            topup_tokens: 0,
            retained: None,
        });
        let retained = engine.retained_tokens(id).is_some().then_some(id);
        self.retain_history(engine, retained)?;

        let turn = self.turns.last().expect("a turn was just pushed");
        let s = &mut self.stats;
        s.turns += 1;
        s.prompt_tokens += turn.metrics.prompt_tokens as u64;
        s.cached_prompt_tokens += turn.metrics.cached_prompt_tokens as u64;
        s.topup_tokens += turn.topup_tokens as u64;
        s.generated_tokens += turn.metrics.generated_tokens as u64;
        let gaps = turn.metrics.generated_tokens.saturating_sub(1);
        s.decode_tokens += gaps as u64;
        s.decode_s += gaps as f64 * turn.metrics.mean_inter_token_s;
        Ok(turn)
    }

    /// Makes the cache hold the conversation exactly as the next turn will render it, as a
    /// retained output recorded on the last turn; returns the tokens computed for it. Useful
    /// after [`Conversation::load`], or after the retained output was released.
    pub fn prefill_history(&mut self, engine: &mut Engine) -> Result<usize, ConversationError> {
        let current = self.turns.last().and_then(|t| t.retained);
        self.retain_history(engine, current)
    }

    /// Brings the last turn's retained output in line with the next turn's rendering: keeps
    /// `current` when it already holds exactly those tokens, else computes the missing part with
    /// a retained prefill-only request (which starts from `current`'s KV) and releases `current`.
    fn retain_history(
        &mut self,
        engine: &mut Engine,
        current: Option<RequestId>,
    ) -> Result<usize, ConversationError> {
        let Some(last) = self.turns.len().checked_sub(1) else {
            return Ok(0);
        };
        let template = engine
            .chat_template()
            .ok_or(ConversationError::NoChatTemplate)?;
        let wanted = history_tokens(
            engine.tokenizer(),
            template,
            &self.template_vars,
            &self.history(),
        )?;
        if current.is_some_and(|id| engine.retained_tokens(id) == Some(wanted.as_slice())) {
            self.turns[last].retained = current;
            return Ok(0);
        }
        let pinned =
            current.is_some_and(|id| engine.retained().iter().any(|r| r.id == id && r.pinned));
        // Prefill only: the conversation's KV, kept for the next turn.
        let params = GenerationParams {
            retain: true,
            ..GenerationParams::greedy_exact(0)
        };
        let id = match engine.add_request(wanted, params) {
            Ok(id) => id,
            // The conversation outgrew the context: the next turn will fail and say so; the
            // answer itself stands.
            Err(EngineError::InvalidRequest(reason)) => {
                tracing::warn!("the conversation's KV is not kept: {reason}");
                self.turns[last].retained = current;
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        let metrics = loop {
            let events = match engine.step() {
                Ok(events) => events,
                Err(e) => {
                    engine.abort(id);
                    return Err(e.into());
                }
            };
            if let Some(event) = events
                .into_iter()
                .find(|e| e.request == id && e.finished.is_some())
            {
                break event.metrics.unwrap_or_default();
            }
            if !engine.has_work() {
                break RequestMetrics::default();
            }
        };
        let kept = engine.retained_tokens(id).is_some();
        if kept {
            if let Some(old) = current {
                engine.release_retained(old);
            }
            if pinned {
                engine.pin_retained(id, true)?;
            }
        }
        let computed = metrics.prompt_tokens - metrics.cached_prompt_tokens;
        let turn = &mut self.turns[last];
        turn.retained = if kept { Some(id) } else { current };
        turn.topup_tokens += computed;
        Ok(computed)
    }

    /// Pins (never dropped to make room) or unpins the KV retained for turn `index`.
    pub fn pin_output(
        &mut self,
        engine: &mut Engine,
        index: usize,
        pinned: bool,
    ) -> Result<(), ConversationError> {
        let id = self
            .turn(index)?
            .retained
            .ok_or(ConversationError::NoOutput(index))?;
        Ok(engine.pin_retained(id, pinned)?)
    }

    /// Releases the KV retained for turn `index`; the turn stays in the conversation, and a later
    /// turn recomputes what the cache no longer holds. Returns whether any KV was held.
    pub fn release_output(
        &mut self,
        engine: &mut Engine,
        index: usize,
    ) -> Result<bool, ConversationError> {
        self.turn(index)?;
        Ok(self.turns[index]
            .retained
            .take()
            .is_some_and(|id| engine.release_retained(id)))
    }

    /// Whether turn `index`'s retained KV is still in the engine (unpinned outputs are dropped
    /// when the pool needs their blocks).
    pub fn output_is_cached(&self, engine: &Engine, index: usize) -> bool {
        self.turns
            .get(index)
            .and_then(|t| t.retained)
            .is_some_and(|id| engine.retained_tokens(id).is_some())
    }

    /// Ends the conversation: forgets every turn and the pending contexts and query, and releases
    /// the turns' retained KV. The system prompt, template variables and statistics stay.
    pub fn clear(&mut self, engine: &mut Engine) {
        for turn in self.turns.drain(..) {
            if let Some(id) = turn.retained {
                engine.release_retained(id);
            }
        }
        self.contexts.clear();
        self.query = None;
        let system = self.system;
        let keep: Vec<ChunkId> = system.into_iter().collect();
        let ids: Vec<ChunkId> = self
            .chunks
            .list(&Default::default())
            .iter()
            .map(|c| c.id)
            .filter(|id| !keep.contains(id))
            .collect();
        for id in ids {
            self.chunks.delete(id);
        }
    }

    /// Writes the conversation's texts (system prompt, turns, pending contexts and query) to
    /// `path` as JSON. The KV cache is not part of it.
    pub fn save(&self, path: &Path) -> Result<(), ConversationError> {
        let part = |id: &ChunkId| {
            self.chunks.get(*id).map(|c| SavedPart {
                role: c.role.as_str().to_string(),
                text: c.text.clone(),
            })
        };
        let text_of = |id: ChunkId| {
            self.chunks
                .get(id)
                .map(|c| c.text.clone())
                .unwrap_or_default()
        };
        let saved = SavedConversation {
            version: SAVE_FORMAT_VERSION,
            system: self.system.map(text_of),
            template_vars: self.template_vars.clone(),
            turns: self
                .turns
                .iter()
                .map(|t| SavedTurn {
                    contexts: t.contexts.iter().filter_map(part).collect(),
                    query: text_of(t.query),
                    output: t.raw.clone(),
                    finish_reason: t.finish_reason.as_str().to_string(),
                })
                .collect(),
            contexts: self.contexts.iter().filter_map(part).collect(),
            query: self.query.map(text_of),
        };
        let file_error = |reason: String| ConversationError::File {
            action: "write",
            path: path.display().to_string(),
            reason,
        };
        let json = serde_json::to_string_pretty(&saved).map_err(|e| file_error(e.to_string()))?;
        std::fs::write(path, json).map_err(|e| file_error(e.to_string()))
    }

    /// Reads a conversation written by [`Conversation::save`]. Nothing of it is in the cache
    /// yet: [`Conversation::prefill_history`] computes it (or finds it in a loaded prefix cache).
    pub fn load(engine: &Engine, path: &Path) -> Result<Self, ConversationError> {
        let file_error = |reason: String| ConversationError::File {
            action: "read",
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let saved: SavedConversation = serde_json::from_str(&text)
            .map_err(|e| file_error(format!("it is not a saved conversation ({e})")))?;
        if saved.version != SAVE_FORMAT_VERSION {
            return Err(file_error(format!(
                "its format version is {}, expected {SAVE_FORMAT_VERSION}",
                saved.version
            )));
        }
        let mut chat = Conversation::new(engine)?;
        chat.template_vars = saved.template_vars;
        chat.set_system(engine, saved.system.as_deref())?;
        let part = |chat: &mut Conversation, p: &SavedPart| -> Result<ChunkId, ConversationError> {
            let role: ChunkRole = p.role.parse()?;
            Ok(chat.chunks.register(engine, role, &p.text)?)
        };
        for t in &saved.turns {
            let contexts = t
                .contexts
                .iter()
                .map(|p| part(&mut chat, p))
                .collect::<Result<Vec<_>, _>>()?;
            let query = chat.chunks.register(engine, ChunkRole::Query, &t.query)?;
            let finish_reason = match t.finish_reason.as_str() {
                "length" => FinishReason::Length,
                "stop" => FinishReason::Stop,
                "abort" => FinishReason::Abort,
                other => {
                    return Err(file_error(format!(
                        "a turn's finish reason is '{other}', expected length, stop or abort"
                    )))
                }
            };
            let (reasoning, answer) = match &chat.tags {
                Some(tags) => split_reasoning(&t.output, tags),
                None => ("", t.output.as_str()),
            };
            let (reasoning, answer) = (reasoning.to_string(), answer.to_string());
            let output = match answer.trim() {
                "" => None,
                _ => Some(chat.chunks.register(engine, ChunkRole::Output, &answer)?),
            };
            chat.turns.push(Turn {
                contexts,
                query,
                output,
                raw: t.output.clone(),
                reasoning,
                answer,
                finish_reason,
                metrics: RequestMetrics::default(),
                prefill_tokens: 0,
                topup_tokens: 0,
                retained: None,
            });
        }
        for p in &saved.contexts {
            let id = part(&mut chat, p)?;
            chat.contexts.push(id);
        }
        if let Some(q) = &saved.query {
            chat.set_query(engine, q)?;
        }
        Ok(chat)
    }

    fn turn(&self, index: usize) -> Result<&Turn, ConversationError> {
        self.turns.get(index).ok_or(ConversationError::NoTurn {
            index,
            turns: self.turns.len(),
        })
    }
}

/// The tokens `history` renders to at the start of the next turn's prompt: the tokens shared by
/// the prompts of any next user message. Templates may render a message differently once another
/// follows it (Qwen3's drops the think block of every answer before the last query), so this is
/// what the cache must hold for the next turn to compute only its new message.
pub fn history_tokens(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    template_vars: &serde_json::Map<String, serde_json::Value>,
    history: &[ChatMessage],
) -> Result<Vec<u32>, ModelError> {
    let mut shared: Option<Vec<u32>> = None;
    for probe in PROBES {
        let mut messages = history.to_vec();
        messages.push(ChatMessage::new("user", probe));
        let text = template.render_with(&messages, true, template_vars)?;
        let tokens = tokenizer.encode(&text, false)?;
        shared = Some(match shared {
            None => tokens,
            Some(mut prev) => {
                let n = common_prefix_len(&prev, &tokens);
                prev.truncate(n);
                prev
            }
        });
    }
    Ok(shared.unwrap_or_default())
}
