//! Incremental detokenization: turns a stream of token ids into text chunks that never split a
//! character, using the prefix/read offset method of vLLM and text-generation-inference.
//!
//! Decoding each token alone goes wrong twice over: a character spread over several byte-level
//! tokens comes out as U+FFFD pieces, and tokenizers that mark word starts ("▁word") drop or keep
//! the leading space depending on whether the token opens the decoded string. So each step decodes
//! a short window of recent tokens twice, with and without the new ones, and emits the difference,
//! and only once the window's text no longer ends in an unfinished character.

/// Prompt tokens kept as context, so the first generated token decodes as it would mid-text.
const PROMPT_CONTEXT_TOKENS: usize = 5;

const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Turns token ids into text; the model's tokenizer implements this, skipping special tokens.
pub trait Decode {
    /// Text of `ids`, with invalid or incomplete UTF-8 replaced by U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
}

/// Streams the text of one sequence's generated tokens.
///
/// The output chunks concatenate to the text the generated tokens add to the prompt's text, and no
/// chunk ends inside a character: a token that leaves one unfinished yields nothing until the
/// tokens completing it arrive.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// The decoding window; tokens before it are dropped once emitted.
    ids: Vec<u32>,
    /// Start of the context whose text was already emitted; `ids[..prefix_offset]` is unused.
    prefix_offset: usize,
    /// End of what has been emitted; `ids[read_offset..]` is pending.
    read_offset: usize,
}

impl IncrementalDetokenizer {
    /// A detokenizer whose starting context is the last few `prompt_ids`, so the first generated
    /// token's leading space decodes right.
    pub fn new(prompt_ids: &[u32]) -> Self {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        Self {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds generated token `id`; returns the newly finalised text, possibly empty.
    pub fn push(&mut self, dec: &impl Decode, id: u32) -> String {
        self.ids.push(id);
        let prefix_text = dec.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let window_text = dec.decode(&self.ids[self.prefix_offset..]);
        if window_text.ends_with(REPLACEMENT) {
            return String::new();
        }
        match text_after(&window_text, &prefix_text) {
            Some(new_text) => {
                let new_text = new_text.to_string();
                self.advance();
                new_text
            }
            None => String::new(),
        }
    }

    /// Ends the stream: returns whatever is still held, even an unfinished character's U+FFFD.
    pub fn flush(&mut self, dec: &impl Decode) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let prefix_text = dec.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let window_text = dec.decode(&self.ids[self.prefix_offset..]);
        let rest = text_after(&window_text, &prefix_text)
            .unwrap_or_default()
            .to_string();
        self.advance();
        rest
    }

    /// Marks every pending token emitted: the emitted tokens become the next step's context.
    fn advance(&mut self) {
        // Dropping what precedes the new context keeps the window a few tokens long, however
        // long the generation runs.
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
    }
}

/// The part of `window` past `prefix`, or `None` when it adds no text.
fn text_after<'a>(window: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = match window.strip_prefix(prefix) {
        Some(rest) => rest,
        // The context decodes differently once followed by more tokens (a replacement character
        // completed, say): skip as many characters as the context had, as vLLM does.
        None => {
            let skip = prefix.chars().count();
            let (at, _) = window.char_indices().nth(skip)?;
            &window[at..]
        }
    };
    (!rest.is_empty()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A byte-level vocabulary: each id is a byte string, decoded like a byte-fallback tokenizer.
    struct Bytes(Vec<Vec<u8>>);

    impl Decode for Bytes {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&id| self.0[id as usize].iter().copied())
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    /// A SentencePiece-like vocabulary: "▁" marks a space, and the decoded text's leading space
    /// is stripped; id 0 is a special token that decodes to nothing.
    struct Pieces(Vec<&'static str>);

    impl Decode for Pieces {
        fn decode(&self, ids: &[u32]) -> String {
            let text: String = ids
                .iter()
                .map(|&id| self.0[id as usize])
                .collect::<String>()
                .replace('▁', " ");
            text.strip_prefix(' ').map(str::to_string).unwrap_or(text)
        }
    }

    fn stream(dec: &impl Decode, prompt: &[u32], generated: &[u32]) -> Vec<String> {
        let mut detok = IncrementalDetokenizer::new(prompt);
        let mut chunks: Vec<String> = generated.iter().map(|&id| detok.push(dec, id)).collect();
        chunks.push(detok.flush(dec));
        chunks
    }

    #[test]
    fn characters_split_across_tokens_are_never_split_in_output() {
        let vocab = Bytes(vec![
            b"Caf".to_vec(),
            vec![0xC3],       // é, first byte
            vec![0xA9, b' '], // é, second byte, then a space
            vec![0xF0],       // 🦀 in four tokens
            vec![0x9F],
            vec![0xA6],
            vec![0x80],
            vec![0xE2, 0x82],       // € in two tokens
            vec![0xAC, b'!', 0xF0], // € ends, 🦀 starts
            vec![0x9F, 0xA6, 0x80],
        ]);
        let generated = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let chunks = stream(&vocab, &[], &generated);
        assert_eq!(chunks.concat(), "Café 🦀€!🦀");
        assert_eq!(chunks.concat(), vocab.decode(&generated));
        for chunk in &chunks {
            assert!(
                !chunk.contains(REPLACEMENT),
                "chunk {chunk:?} holds a replacement character"
            );
        }
        assert_eq!(chunks[1], "", "half of é is held");
        assert_eq!(chunks[2], "é ");
        assert_eq!(&chunks[3..6], ["", "", ""]);
        assert_eq!(chunks[6], "🦀");
    }

    #[test]
    fn leading_spaces_survive_with_prompt_context() {
        let vocab = Pieces(vec!["", "▁The", "▁cat", "▁sat", "▁on", "▁the", "▁mat", "."]);
        let prompt = [1, 2];
        let generated = [3, 0, 4, 5, 6, 7];
        let chunks = stream(&vocab, &prompt, &generated);
        assert_eq!(chunks, [" sat", "", " on", " the", " mat", ".", ""]);
        let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
        assert_eq!(
            chunks.concat(),
            vocab.decode(&all)[vocab.decode(&prompt).len()..]
        );

        // With no prompt the first token opens the text, and its space is dropped as in a full decode.
        let chunks = stream(&vocab, &[], &generated);
        assert_eq!(chunks.concat(), vocab.decode(&generated));
    }

    #[test]
    fn flush_returns_an_unfinished_character() {
        let vocab = Bytes(vec![b"ok".to_vec(), vec![0xF0, 0x9F]]);
        let mut detok = IncrementalDetokenizer::new(&[]);
        assert_eq!(detok.push(&vocab, 0), "ok");
        assert_eq!(detok.push(&vocab, 1), "");
        assert_eq!(detok.flush(&vocab), "\u{FFFD}");
        assert_eq!(detok.flush(&vocab), "", "nothing is returned twice");
    }

    #[test]
    fn window_stays_short_over_long_generations() {
        let vocab = Bytes(vec![b"a".to_vec(), vec![0xC3], vec![0xA9]]);
        let mut detok = IncrementalDetokenizer::new(&[0; 100]);
        assert_eq!(detok.ids.len(), PROMPT_CONTEXT_TOKENS);
        let mut text = String::new();
        for i in 0..1000 {
            text += &detok.push(&vocab, [0, 1, 2][i % 3]);
            assert!(detok.ids.len() <= 4, "window grew to {}", detok.ids.len());
        }
        text += &detok.flush(&vocab);
        assert_eq!(text, "aé".repeat(333) + "a");
    }

    proptest! {
        /// Any text cut into arbitrary byte-level tokens streams back whole and without U+FFFD.
        #[test]
        fn arbitrary_byte_splits_round_trip(text in "[a-zé€🦀 日本\u{301}]{0,40}", cuts in prop::collection::vec(1usize..5, 1..60)) {
            let bytes = text.as_bytes();
            let mut tokens = Vec::new();
            let mut at = 0;
            for &len in cuts.iter().cycle() {
                if at >= bytes.len() {
                    break;
                }
                let end = (at + len).min(bytes.len());
                tokens.push(bytes[at..end].to_vec());
                at = end;
            }
            let ids: Vec<u32> = (0..tokens.len() as u32).collect();
            let vocab = Bytes(tokens);
            let chunks = stream(&vocab, &[], &ids);
            prop_assert_eq!(chunks.concat(), text);
            for chunk in &chunks {
                prop_assert!(!chunk.contains(REPLACEMENT));
            }
        }
    }
}
