//! Reasoning (think) text: finds a model's think markers in its tokenizer, splits a streamed
//! answer into reasoning and answer text, and strips reasoning from a finished answer the way
//! Qwen3-style chat templates do.
//!
//! Reasoning models such as Qwen3 and DeepSeek-R1 write `<think>…</think>` before their answer.
//! The markers are read from the tokenizer, never assumed by id: a vocabulary that has both
//! `<think>` and `</think>` as single tokens marks a reasoning model. Markers that decoding shows
//! as text (Qwen3's, which are not special tokens) are found in the text; markers that decoding
//! hides (special tokens) are found by token id.

use braid_models::tokenizer::Tokenizer;

/// Marker pairs that reasoning models use, tried in order against the vocabulary.
const KNOWN_TAGS: &[(&str, &str)] = &[
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("<reasoning>", "</reasoning>"),
    ("◁think▷", "◁/think▷"),
];

/// The pair of markers around a model's reasoning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinkTags {
    open: String,
    close: String,
    open_id: Option<u32>,
    close_id: Option<u32>,
    /// Decoding drops the markers (they are special tokens), so they are recognised by id.
    hidden: bool,
}

/// Why a pair of think markers cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReasoningError {
    #[error("think markers must be non-empty and different, got {open:?} and {close:?}")]
    BadMarkers { open: String, close: String },
    #[error(
        "think marker {0:?} decodes to no text, so it must be a single token of the vocabulary"
    )]
    HiddenMultiToken(String),
}

impl ThinkTags {
    /// The tokenizer's think markers: the first known pair (`<think>`/`</think>`, …) whose two
    /// markers are both single tokens of the vocabulary; `None` for models that do not reason.
    pub fn detect(tokenizer: &Tokenizer) -> Option<ThinkTags> {
        KNOWN_TAGS.iter().find_map(|&(open, close)| {
            tokenizer.token_to_id(open)?;
            tokenizer.token_to_id(close)?;
            ThinkTags::new(tokenizer, open, close).ok()
        })
    }

    /// Markers given as text, for models whose markers are not in [`ThinkTags::detect`]'s list.
    /// A marker that is one token of the vocabulary is also recognised by its id.
    pub fn new(
        tokenizer: &Tokenizer,
        open: &str,
        close: &str,
    ) -> Result<ThinkTags, ReasoningError> {
        if open.is_empty() || close.is_empty() || open == close {
            return Err(ReasoningError::BadMarkers {
                open: open.into(),
                close: close.into(),
            });
        }
        let single = |marker: &str| {
            tokenizer.token_to_id(marker).or_else(|| {
                match tokenizer.encode(marker, false).ok()?.as_slice() {
                    [id] => Some(*id),
                    _ => None,
                }
            })
        };
        let (open_id, close_id) = (single(open), single(close));
        let shows = |id: Option<u32>| {
            id.is_none_or(|id| !tokenizer.decode(&[id], true).unwrap_or_default().is_empty())
        };
        let hidden = !shows(open_id) || !shows(close_id);
        if hidden {
            for (marker, id) in [(open, open_id), (close, close_id)] {
                if id.is_none() {
                    return Err(ReasoningError::HiddenMultiToken(marker.into()));
                }
            }
        }
        Ok(ThinkTags {
            open: open.into(),
            close: close.into(),
            open_id,
            close_id,
            hidden,
        })
    }

    /// The opening marker's text, e.g. `<think>`.
    pub fn open(&self) -> &str {
        &self.open
    }

    /// The closing marker's text, e.g. `</think>`.
    pub fn close(&self) -> &str {
        &self.close
    }

    /// Whether a prompt leaves the model inside a think block: its last opening marker comes
    /// after its last closing one (templates that start the answer with `<think>\n` do this).
    /// Only markers that are single tokens are seen here.
    pub fn prompt_opens_reasoning(&self, prompt: &[u32]) -> bool {
        let (Some(open), Some(close)) = (self.open_id, self.close_id) else {
            return false;
        };
        let last = |id: u32| prompt.iter().rposition(|&t| t == id);
        match (last(open), last(close)) {
            (Some(o), Some(c)) => o > c,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// Reasoning and answer parts of a finished text, split like Qwen3's chat template does: the
/// answer is what follows the last closing marker, without leading newlines; the reasoning is
/// what lies between the opening marker and that closing marker, without surrounding newlines.
/// A text without a closing marker is all answer.
pub fn split_reasoning<'a>(text: &'a str, tags: &ThinkTags) -> (&'a str, &'a str) {
    match text.rfind(&tags.close) {
        Some(at) => {
            let before = &text[..at];
            let reasoning = match before.rfind(&tags.open) {
                Some(o) => &before[o + tags.open.len()..],
                None => before,
            };
            let answer = &text[at + tags.close.len()..];
            (
                reasoning.trim_matches('\n'),
                answer.trim_start_matches('\n'),
            )
        }
        None => ("", text),
    }
}

/// A piece of streamed output, marked as reasoning or answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputPiece {
    Reasoning(String),
    Answer(String),
}

impl OutputPiece {
    pub fn text(&self) -> &str {
        match self {
            OutputPiece::Reasoning(t) | OutputPiece::Answer(t) => t,
        }
    }
}

/// Splits one sequence's streamed output into reasoning and answer pieces as it arrives.
///
/// Markers never reach the pieces. Newlines that open a section and newlines that end the
/// reasoning are dropped, as Qwen3's template drops them, so a display shows clean sections.
/// [`ReasoningParser::raw`] keeps the exact output, markers included: that is the assistant
/// message a chat template must see to drop the reasoning its own way.
#[derive(Debug, Clone)]
pub struct ReasoningParser {
    tags: Option<ThinkTags>,
    inside: bool,
    /// Text that may be the start of the marker being looked for.
    held: String,
    /// Newlines at the end of the reasoning so far: shown only if more reasoning follows.
    held_newlines: String,
    /// No text of the current section has been shown yet (its leading newlines are dropped).
    section_start: bool,
    raw: String,
    reasoning: String,
    answer: String,
}

impl ReasoningParser {
    /// A parser for output generated after `prompt`; with no tags every piece is answer.
    pub fn new(tags: Option<ThinkTags>, prompt: &[u32]) -> Self {
        let inside = tags
            .as_ref()
            .is_some_and(|t| t.prompt_opens_reasoning(prompt));
        ReasoningParser {
            tags,
            inside,
            held: String::new(),
            held_newlines: String::new(),
            section_start: true,
            raw: String::new(),
            reasoning: String::new(),
            answer: String::new(),
        }
    }

    /// Feeds one engine event: the token sampled (if any) and the text that became final.
    pub fn push(&mut self, token: Option<u32>, text: &str) -> Vec<OutputPiece> {
        let mut out = Vec::new();
        let Some(tags) = self.tags.clone() else {
            self.raw.push_str(text);
            self.emit(text, &mut out);
            return out;
        };
        if tags.hidden {
            self.raw.push_str(text);
            self.emit(text, &mut out);
            let marker = if self.inside {
                tags.close_id
            } else {
                tags.open_id
            };
            if token.is_some() && token == marker {
                self.raw
                    .push_str(if self.inside { &tags.close } else { &tags.open });
                self.switch();
            }
            return out;
        }
        self.raw.push_str(text);
        self.held.push_str(text);
        loop {
            let marker = if self.inside { &tags.close } else { &tags.open };
            match self.held.find(marker.as_str()) {
                Some(at) => {
                    let before = self.held[..at].to_string();
                    self.held.drain(..at + marker.len());
                    self.emit(&before, &mut out);
                    self.switch();
                }
                None => {
                    let keep = partial_marker_start(&self.held, marker);
                    let ready: String = self.held.drain(..keep).collect();
                    self.emit(&ready, &mut out);
                    return out;
                }
            }
        }
    }

    /// Ends the stream: releases text held back while it could have begun a marker.
    pub fn finish(&mut self) -> Vec<OutputPiece> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        self.emit(&held, &mut out);
        out
    }

    /// The exact output so far, markers included.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The reasoning shown so far.
    pub fn reasoning(&self) -> &str {
        &self.reasoning
    }

    /// The answer shown so far.
    pub fn answer(&self) -> &str {
        &self.answer
    }

    fn switch(&mut self) {
        self.inside = !self.inside;
        self.section_start = true;
        self.held_newlines.clear();
    }

    fn emit(&mut self, text: &str, out: &mut Vec<OutputPiece>) {
        let mut text = text;
        if text.is_empty() {
            return;
        }
        if self.section_start {
            text = text.trim_start_matches('\n');
            if text.is_empty() {
                return;
            }
            self.section_start = false;
        }
        if self.inside {
            let body = text.trim_end_matches('\n');
            let newlines = &text[body.len()..];
            if body.is_empty() {
                self.held_newlines.push_str(newlines);
                return;
            }
            let piece = std::mem::take(&mut self.held_newlines) + body;
            self.held_newlines.push_str(newlines);
            self.reasoning.push_str(&piece);
            push_piece(out, OutputPiece::Reasoning(piece));
        } else {
            self.answer.push_str(text);
            push_piece(out, OutputPiece::Answer(text.to_string()));
        }
    }
}

/// Appends a piece, merging it with the previous one of the same kind.
fn push_piece(out: &mut Vec<OutputPiece>, piece: OutputPiece) {
    match (out.last_mut(), piece) {
        (Some(OutputPiece::Reasoning(a)), OutputPiece::Reasoning(b))
        | (Some(OutputPiece::Answer(a)), OutputPiece::Answer(b)) => a.push_str(&b),
        (_, piece) => out.push(piece),
    }
}

/// Start of the longest tail of `text` that is a proper prefix of `marker` (`text.len()` if none).
fn partial_marker_start(text: &str, marker: &str) -> usize {
    let earliest = text.len().saturating_sub(marker.len().saturating_sub(1));
    text.char_indices()
        .map(|(i, _)| i)
        .filter(|&i| i >= earliest)
        .find(|&i| marker.starts_with(&text[i..]))
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> ThinkTags {
        ThinkTags {
            open: "<think>".into(),
            close: "</think>".into(),
            open_id: Some(10),
            close_id: Some(11),
            hidden: false,
        }
    }

    fn run(parser: &mut ReasoningParser, events: &[(Option<u32>, &str)]) -> Vec<OutputPiece> {
        let mut pieces = Vec::new();
        for &(token, text) in events {
            for p in parser.push(token, text) {
                push_piece(&mut pieces, p);
            }
        }
        for p in parser.finish() {
            push_piece(&mut pieces, p);
        }
        pieces
    }

    #[test]
    fn markers_split_across_events_are_found() {
        let mut p = ReasoningParser::new(Some(tags()), &[]);
        let pieces = run(
            &mut p,
            &[
                (Some(1), "<thi"),
                (Some(2), "nk>\nLet me"),
                (Some(3), " see.\n\n</th"),
                (Some(4), "ink>\n\nIt is 4"),
                (Some(5), "2."),
            ],
        );
        assert_eq!(
            pieces,
            [
                OutputPiece::Reasoning("Let me see.".into()),
                OutputPiece::Answer("It is 42.".into())
            ]
        );
        assert_eq!(p.raw(), "<think>\nLet me see.\n\n</think>\n\nIt is 42.");
        assert_eq!(
            split_reasoning(p.raw(), &tags()),
            ("Let me see.", "It is 42.")
        );
    }

    #[test]
    fn inner_newlines_of_the_reasoning_are_kept() {
        let mut p = ReasoningParser::new(Some(tags()), &[]);
        let pieces = run(
            &mut p,
            &[
                (None, "<think>\none\n"),
                (None, "\ntwo\n"),
                (None, "</think>ok"),
            ],
        );
        assert_eq!(
            pieces,
            [
                OutputPiece::Reasoning("one\n\ntwo".into()),
                OutputPiece::Answer("ok".into())
            ]
        );
    }

    #[test]
    fn a_false_start_of_a_marker_is_released() {
        let mut p = ReasoningParser::new(Some(tags()), &[]);
        let pieces = run(&mut p, &[(None, "a <thin"), (None, "g> b <th")]);
        assert_eq!(pieces, [OutputPiece::Answer("a <thing> b <th".into())]);
        assert_eq!(p.reasoning(), "");
    }

    #[test]
    fn a_prompt_that_opens_a_think_block_starts_in_reasoning() {
        let t = tags();
        assert!(t.prompt_opens_reasoning(&[1, 10, 2]));
        assert!(!t.prompt_opens_reasoning(&[1, 10, 3, 11, 2]));
        assert!(!t.prompt_opens_reasoning(&[1, 2]));
        let mut p = ReasoningParser::new(Some(t), &[1, 10, 2]);
        let pieces = run(&mut p, &[(None, "hmm\n</think>\n\n"), (None, "yes")]);
        assert_eq!(
            pieces,
            [
                OutputPiece::Reasoning("hmm".into()),
                OutputPiece::Answer("yes".into())
            ]
        );
    }

    #[test]
    fn hidden_markers_switch_on_their_token_ids() {
        let t = ThinkTags {
            hidden: true,
            ..tags()
        };
        let mut p = ReasoningParser::new(Some(t.clone()), &[]);
        let pieces = run(
            &mut p,
            &[
                (Some(10), ""),
                (Some(3), "why"),
                (Some(11), ""),
                (Some(4), "\nbecause"),
            ],
        );
        assert_eq!(
            pieces,
            [
                OutputPiece::Reasoning("why".into()),
                OutputPiece::Answer("because".into())
            ]
        );
        assert_eq!(p.raw(), "<think>why</think>\nbecause");
    }

    #[test]
    fn without_tags_everything_is_answer() {
        let mut p = ReasoningParser::new(None, &[]);
        let pieces = run(&mut p, &[(None, "\n<think>x</think>")]);
        assert_eq!(pieces, [OutputPiece::Answer("<think>x</think>".into())]);
        assert_eq!(p.raw(), "\n<think>x</think>");
    }

    #[test]
    fn an_unclosed_think_block_is_all_reasoning() {
        let mut p = ReasoningParser::new(Some(tags()), &[]);
        let pieces = run(&mut p, &[(None, "<think>still going\n")]);
        assert_eq!(pieces, [OutputPiece::Reasoning("still going".into())]);
        assert_eq!(split_reasoning(p.raw(), &tags()), ("", p.raw()));
    }
}
