//! Stop strings over streamed text: detects a stop string even when it spans several tokens, and
//! holds back the text that might be the start of one until it is known not to be.

/// What [`StopChecker::push`] allows out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopDecision {
    /// Text safe to show now: it cannot be part of a stop string, and when one matched it is
    /// everything before the match.
    pub emit: String,
    /// The stop string that ended generation in this push, if any.
    pub matched: Option<String>,
}

impl StopDecision {
    /// Whether a stop string matched: the sequence is finished.
    pub fn is_stop(&self) -> bool {
        self.matched.is_some()
    }
}

/// Watches decoded text as it arrives for any of a set of stop strings.
///
/// Text is fed in pieces with [`StopChecker::push`]; a tail that could begin a stop string is held
/// back, and released on the next push that rules the match out or by [`StopChecker::flush`].
/// Once a stop string matched, the checker is finished: the text after it, and anything pushed
/// later, is dropped.
#[derive(Debug, Clone)]
pub struct StopChecker {
    stops: Vec<String>,
    /// Byte length of the longest stop string; a held tail is always shorter than this.
    longest: usize,
    held: String,
    finished: bool,
}

impl StopChecker {
    /// A checker for `stops`; empty strings are ignored (they would match before any text).
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            longest,
            held: String::new(),
            finished: false,
        }
    }

    /// Whether a stop string has matched.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Feeds newly decoded text; says what can be shown now and whether a stop string matched.
    pub fn push(&mut self, new_text: &str) -> StopDecision {
        if self.finished {
            return StopDecision::default();
        }
        self.held.push_str(new_text);

        // The earliest match wins, so the emitted text is the shortest correct one; on equal
        // starts the stop listed first is reported.
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()).map(|at| (at, stop)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, stop)) = earliest {
            let matched = Some(stop.clone());
            self.held.truncate(at);
            self.finished = true;
            return StopDecision {
                emit: std::mem::take(&mut self.held),
                matched,
            };
        }

        let keep_from = self.partial_match_start();
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopDecision {
            emit,
            matched: None,
        }
    }

    /// Ends the stream: returns the text still held back (none once a stop string matched).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Start of the longest tail of the held text that is a proper prefix of some stop string,
    /// or the held length when no tail is.
    fn partial_match_start(&self) -> usize {
        // No full match is present, so only tails shorter than the longest stop string can matter.
        let earliest = self
            .held
            .len()
            .saturating_sub(self.longest.saturating_sub(1));
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                self.stops
                    .iter()
                    .any(|stop| stop.starts_with(&self.held[i..]))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(stops: &[&str]) -> StopChecker {
        StopChecker::new(stops.iter().map(|s| s.to_string()).collect())
    }

    fn emit(text: &str) -> StopDecision {
        StopDecision {
            emit: text.to_string(),
            matched: None,
        }
    }

    fn stop(text: &str, matched: &str) -> StopDecision {
        StopDecision {
            emit: text.to_string(),
            matched: Some(matched.to_string()),
        }
    }

    #[test]
    fn stop_string_split_across_three_pushes() {
        let mut c = checker(&["</end>"]);
        assert_eq!(c.push("Hello <"), emit("Hello "));
        assert_eq!(c.push("/en"), emit(""));
        assert_eq!(c.push("d> and more"), stop("", "</end>"));
        assert!(c.is_finished());
        assert_eq!(c.push("ignored"), StopDecision::default());
        assert_eq!(c.flush(), "");
    }

    #[test]
    fn text_before_the_stop_in_the_same_push_is_emitted() {
        let mut c = checker(&["STOP"]);
        assert_eq!(c.push("one two STOP three"), stop("one two ", "STOP"));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        let mut c = checker(&["STOP"]);
        assert_eq!(c.push("go ST"), emit("go "));
        assert_eq!(c.push("AR"), emit("STAR"));
        assert_eq!(c.push("T S"), emit("T "));
        assert_eq!(c.flush(), "S");
        assert!(!c.is_finished());
    }

    #[test]
    fn overlapping_prefixes_hold_only_what_could_still_match() {
        let mut c = checker(&["aab"]);
        assert_eq!(c.push("xaa"), emit("x"));
        assert_eq!(c.push("a"), emit("a"));
        assert_eq!(c.push("b!"), stop("", "aab"));
    }

    #[test]
    fn several_stop_strings_earliest_wins() {
        let mut c = checker(&["\n\n", "User:"]);
        assert_eq!(c.push("a\nb"), emit("a\nb"));
        assert_eq!(c.push(" User"), emit(" "));
        assert_eq!(c.push(":x"), stop("", "User:"));

        let mut c = checker(&["world", "lo w"]);
        assert_eq!(c.push("hello world"), stop("hel", "lo w"));

        let mut c = checker(&["ab", "abc"]);
        assert_eq!(c.push("xabc"), stop("x", "ab"));
    }

    #[test]
    fn unicode_is_held_and_cut_on_character_boundaries() {
        let mut c = checker(&["🦀!"]);
        assert_eq!(c.push("héllo 🦀"), emit("héllo "));
        assert_eq!(c.push("?"), emit("🦀?"));
        assert_eq!(c.push(" 🦀!"), stop(" ", "🦀!"));

        let mut c = checker(&["日本"]);
        assert_eq!(c.push("今日は日"), emit("今日は"));
        assert_eq!(c.push("本です"), stop("", "日本"));

        // A stop string sharing a leading byte with the text must not match mid-character.
        let mut c = checker(&["é"]);
        assert_eq!(c.push("è"), emit("è"));
    }

    #[test]
    fn no_stop_strings_pass_everything_through() {
        let mut c = checker(&["", ""]);
        assert_eq!(c.push("anything"), emit("anything"));
        assert_eq!(c.flush(), "");
    }
}
