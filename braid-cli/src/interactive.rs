//! The interactive chat (`braid chat`, `braid run` without a prompt): reads messages and commands
//! from stdin, keeps the conversation and its KV in the engine so each turn computes only its new
//! message, streams answers with reasoning dimmed, marked or hidden, and lets Ctrl-C stop an
//! answer without leaving the program.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use braid_core::{Braid, ChunkRole, Conversation, GenerationParams, OutputPiece, Turn};

use crate::args::GenArgs;
use crate::commands::params;

const HELP: &str = "\
Type a message to ask it, or a command:
  /system TEXT         set the system prompt (no TEXT removes it)
  /context FILE|TEXT   add a document (a file's contents, or the text) to the next question
  /query TEXT          set the next question without answering it yet
  /infer               answer the question set with /query
  /list                show the conversation and what the next prompt holds
  /stats               cache hits, tokens saved, speed
  /output [N]          list the answers kept in the cache, or print answer N
  /use-output N        add answer N to the next question as a document
  /delete-output N     free the cache held by answer N (the turn stays in the conversation)
  /save FILE           save the conversation to FILE and the prefix cache to FILE.kv
  /load FILE           load a conversation saved with /save (and its cache, if saved)
  /clear               start over (the system prompt stays)
  /think show|hide     show or hide reasoning text
  /help                this list
  /exit                quit (Ctrl-D too)";

/// ANSI dim and reset, for reasoning shown on a terminal.
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// The chat session: the conversation plus how answers are shown.
struct Session {
    chat: Conversation,
    params: GenerationParams,
    show_think: bool,
    /// Whether stdout is a terminal: reasoning is dimmed there, marked with the model's think
    /// markers elsewhere.
    terminal: bool,
}

/// Runs the interactive chat until /exit or the end of input.
pub fn run(braid: &mut Braid, gen: &GenArgs, hide_think: bool) -> Result<()> {
    let generating = Arc::new(AtomicBool::new(false));
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let (generating, interrupted) = (generating.clone(), interrupted.clone());
        ctrlc::set_handler(move || {
            if generating.load(Ordering::SeqCst) {
                interrupted.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let mut chat = Conversation::new(braid.engine())?;
    if let Some(system) = &gen.system {
        chat.set_system(braid.engine(), Some(system))?;
    }
    let mut session = Session {
        chat,
        params: params(gen)?,
        show_think: !hide_think,
        terminal: std::io::stdout().is_terminal(),
    };
    let interactive = std::io::stdin().is_terminal();
    eprintln!("Chatting with the model; /help lists the commands, Ctrl-C stops an answer, Ctrl-D or /exit quits.");
    let mut stdin = std::io::stdin().lock();
    let mut line = Vec::new();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        line.clear();
        if stdin.read_until(b'\n', &mut line)? == 0 {
            if interactive {
                eprintln!();
            }
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let input = text.trim();
        if input.is_empty() {
            continue;
        }
        let result = if let Some(command) = input.strip_prefix('/') {
            let (name, arg) = command
                .split_once(char::is_whitespace)
                .map_or((command, ""), |(n, a)| (n, a.trim()));
            match name {
                "exit" | "quit" => return Ok(()),
                _ => session.command(braid, name, arg, &generating, &interrupted),
            }
        } else {
            session
                .chat
                .set_query(braid.engine(), input)
                .map_err(Into::into)
                .and_then(|_| session.infer(braid, &generating, &interrupted))
        };
        if let Err(err) = result {
            eprintln!("error: {err:#}");
        }
    }
}

impl Session {
    fn command(
        &mut self,
        braid: &mut Braid,
        name: &str,
        arg: &str,
        generating: &AtomicBool,
        interrupted: &AtomicBool,
    ) -> Result<()> {
        let mut out = std::io::stdout().lock();
        match name {
            "help" => writeln!(out, "{HELP}")?,
            "system" => {
                let text = (!arg.is_empty()).then_some(arg);
                self.chat.set_system(braid.engine(), text)?;
                match text {
                    Some(text) => writeln!(
                        out,
                        "system prompt set ({} tokens)",
                        count_tokens(braid, text)?
                    )?,
                    None => writeln!(out, "system prompt removed")?,
                }
            }
            "context" => {
                if arg.is_empty() {
                    bail!("/context needs a file name or some text");
                }
                let path = Path::new(arg);
                let (text, from) = if path.is_file() {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
                    (text, format!(" from {}", path.display()))
                } else {
                    (arg.to_string(), String::new())
                };
                if text.trim().is_empty() {
                    bail!("the context{from} is empty");
                }
                self.chat.add_context(braid.engine(), &text)?;
                writeln!(
                    out,
                    "context {} added{from} ({} tokens)",
                    self.chat.pending_contexts().len(),
                    count_tokens(braid, &text)?
                )?;
            }
            "query" => {
                if arg.is_empty() {
                    bail!("/query needs the question's text");
                }
                self.chat.set_query(braid.engine(), arg)?;
                writeln!(
                    out,
                    "query set ({} tokens); /infer answers it",
                    count_tokens(braid, arg)?
                )?;
            }
            "infer" => {
                no_argument(name, arg)?;
                drop(out);
                self.infer(braid, generating, interrupted)?;
            }
            "list" => {
                no_argument(name, arg)?;
                self.list(braid, &mut out)?;
            }
            "stats" => {
                no_argument(name, arg)?;
                self.stats(braid, &mut out)?;
            }
            "output" => match arg {
                "" => self.outputs(braid, &mut out)?,
                n => {
                    let turn = &self.chat.turns()[self.turn_index(n)?];
                    writeln!(out, "{}", turn.answer)?;
                }
            },
            "use-output" => {
                let index = self.turn_index(arg)?;
                self.chat.use_output(index)?;
                writeln!(
                    out,
                    "answer {arg} added to the next question as context {}",
                    self.chat.pending_contexts().len()
                )?;
            }
            "delete-output" => {
                let index = self.turn_index(arg)?;
                if self.chat.release_output(braid.engine_mut(), index)? {
                    writeln!(
                        out,
                        "answer {arg}'s cache released; the turn stays in the conversation"
                    )?;
                } else {
                    writeln!(out, "answer {arg} held no cache")?;
                }
            }
            "save" => {
                let path = file_argument(name, arg)?;
                self.chat.save(&path)?;
                let kv = kv_path(&path);
                let summary = braid.engine_mut().save_prefix_cache(&kv)?;
                writeln!(
                    out,
                    "saved {} to {} and {} cached tokens to {}",
                    count(self.chat.turns().len(), "turn"),
                    path.display(),
                    summary.tokens,
                    kv.display()
                )?;
            }
            "load" => {
                let path = file_argument(name, arg)?;
                let loaded = Conversation::load(braid.engine(), &path)?;
                self.chat.clear(braid.engine_mut());
                self.chat = loaded;
                let kv = kv_path(&path);
                let cached = if kv.is_file() {
                    braid.engine_mut().load_prefix_cache(&kv)?.tokens
                } else {
                    0
                };
                let computed = self.chat.prefill_history(braid.engine_mut())?;
                writeln!(
                    out,
                    "loaded {} from {} ({cached} tokens from the cache file, {computed} computed)",
                    count(self.chat.turns().len(), "turn"),
                    path.display()
                )?;
            }
            "clear" => {
                no_argument(name, arg)?;
                self.chat.clear(braid.engine_mut());
                writeln!(out, "conversation cleared")?;
            }
            "think" => match arg {
                "show" => {
                    self.show_think = true;
                    writeln!(out, "reasoning is shown")?;
                }
                "hide" => {
                    self.show_think = false;
                    writeln!(out, "reasoning is hidden")?;
                }
                "" => writeln!(
                    out,
                    "reasoning is {}; /think show or /think hide changes it",
                    if self.show_think { "shown" } else { "hidden" }
                )?,
                other => bail!("/think takes show or hide, not '{other}'"),
            },
            other => bail!("unknown command '/{other}'; /help lists the commands"),
        }
        Ok(())
    }

    /// Answers the pending query, streaming the answer to stdout and a summary to stderr.
    fn infer(
        &mut self,
        braid: &mut Braid,
        generating: &AtomicBool,
        interrupted: &AtomicBool,
    ) -> Result<()> {
        let tags = self
            .chat
            .think_tags()
            .map(|t| (t.open().to_string(), t.close().to_string()));
        let (show, terminal) = (self.show_think, self.terminal);
        let mut stdout = std::io::stdout().lock();
        let mut in_reasoning = false;
        let mut closed_stdout = false;
        interrupted.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let result = self
            .chat
            .infer(braid.engine_mut(), &self.params, |piece| {
                let mut text = String::new();
                match piece {
                    OutputPiece::Reasoning(r) if show => {
                        if !in_reasoning {
                            in_reasoning = true;
                            text.push_str(&reasoning_open(terminal, tags.as_ref()));
                        }
                        text.push_str(r);
                    }
                    OutputPiece::Reasoning(_) => {}
                    OutputPiece::Answer(a) => {
                        if in_reasoning {
                            in_reasoning = false;
                            text.push_str(&reasoning_close(terminal, tags.as_ref()));
                        }
                        text.push_str(a);
                    }
                }
                // A closed stdout (e.g. piped into `head`) ends the answer quietly.
                closed_stdout |= stdout
                    .write_all(text.as_bytes())
                    .and_then(|_| stdout.flush())
                    .is_err();
                if closed_stdout || interrupted.load(Ordering::SeqCst) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .cloned();
        generating.store(false, Ordering::SeqCst);
        if in_reasoning {
            let _ = write!(stdout, "{}", reasoning_close(terminal, tags.as_ref()));
        }
        let _ = writeln!(stdout);
        let _ = stdout.flush();
        let turn = result?;
        let m = &turn.metrics;
        eprintln!(
            "{} prompt tokens ({} cached), {} generated ({}), first token after {:.2} s, {:.1} tok/s",
            m.prompt_tokens,
            m.cached_prompt_tokens,
            m.generated_tokens,
            turn.finish_reason.as_str(),
            m.time_to_first_token_s,
            turn.decode_tokens_per_s()
        );
        Ok(())
    }

    fn list(&self, braid: &Braid, out: &mut impl Write) -> Result<()> {
        let chunks = self.chat.chunks();
        let text = |id| chunks.get(id).map_or("", |c| c.text.as_str());
        match self.chat.system() {
            Some(id) => writeln!(out, "system: {}", preview(text(id)))?,
            None => writeln!(out, "system: (none)")?,
        }
        for (i, turn) in self.chat.turns().iter().enumerate() {
            for &c in &turn.contexts {
                writeln!(out, "#{} context: {}", i + 1, preview(text(c)))?;
            }
            writeln!(out, "#{} query: {}", i + 1, preview(text(turn.query)))?;
            if !turn.reasoning.is_empty() {
                writeln!(
                    out,
                    "#{} reasoning: {} characters (not kept in the conversation)",
                    i + 1,
                    turn.reasoning.chars().count()
                )?;
            }
            writeln!(out, "#{} answer: {}", i + 1, preview(&turn.answer))?;
        }
        for &c in self.chat.pending_contexts() {
            let role = chunks.get(c).map_or(ChunkRole::Context, |c| c.role);
            writeln!(out, "next {role}: {}", preview(text(c)))?;
        }
        match self.chat.pending_query() {
            Some(q) => {
                writeln!(out, "next query: {}", preview(text(q)))?;
                let report = self.chat.preview(braid.engine())?;
                writeln!(
                    out,
                    "next prompt: {} tokens, {} of them cached",
                    report.tokens, report.cached_tokens
                )?;
            }
            None => writeln!(out, "next query: (none)")?,
        }
        Ok(())
    }

    fn stats(&self, braid: &Braid, out: &mut impl Write) -> Result<()> {
        let s = self.chat.stats();
        let c = self.chat.chunks().stats();
        let last = self.chat.turns().last();
        writeln!(out, "turns: {}", s.turns)?;
        writeln!(
            out,
            "prompt tokens: {} ({} from the cache, {} computed)",
            s.prompt_tokens,
            s.cached_prompt_tokens,
            s.prompt_tokens - s.cached_prompt_tokens
        )?;
        writeln!(
            out,
            "cache hits: {} of {} chunk uses ({:.0}% hit rate), {} moved after another prefix, {} evicted",
            c.hits,
            c.hits + c.misses,
            100.0 * c.hit_rate(),
            c.different_prefix,
            c.kv_evicted
        )?;
        writeln!(out, "tokens saved: {}", s.cached_prompt_tokens)?;
        writeln!(
            out,
            "tokens computed to keep the next turn's prefix: {}",
            s.topup_tokens
        )?;
        writeln!(
            out,
            "generated tokens: {}, {:.1} tok/s (last answer {:.1} tok/s)",
            s.generated_tokens,
            s.decode_tokens_per_s(),
            last.map_or(0.0, Turn::decode_tokens_per_s)
        )?;
        let (used, total) = braid.engine().kv_blocks();
        let retained = braid.engine().retained();
        writeln!(
            out,
            "KV cache: {used} of {total} blocks in use, {} answers kept ({} tokens)",
            retained.len(),
            retained.iter().map(|r| r.tokens).sum::<usize>()
        )?;
        Ok(())
    }

    fn outputs(&self, braid: &Braid, out: &mut impl Write) -> Result<()> {
        if self.chat.turns().is_empty() {
            writeln!(out, "no answers yet")?;
        }
        let retained = braid.engine().retained();
        for (i, turn) in self.chat.turns().iter().enumerate() {
            let kept = turn
                .retained
                .and_then(|id| retained.iter().find(|r| r.id == id));
            let state = match kept {
                Some(r) if r.pinned => format!("{} tokens cached, pinned", r.tokens),
                Some(r) => format!("{} tokens cached", r.tokens),
                None => "not cached".to_string(),
            };
            writeln!(out, "#{} ({state}): {}", i + 1, preview(&turn.answer))?;
        }
        Ok(())
    }

    /// The turn index of answer number `arg` (numbered from 1, as /output lists them).
    fn turn_index(&self, arg: &str) -> Result<usize> {
        let turns = self.chat.turns().len();
        let n: usize = arg.parse().ok().filter(|&n| n >= 1).with_context(|| {
            format!("'{arg}' is not an answer number; /output lists them from 1")
        })?;
        if n > turns {
            bail!(
                "there is no answer {n}; the conversation has {}",
                count(turns, "answer")
            );
        }
        Ok(n - 1)
    }
}

/// "1 turn", "2 turns".
fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

fn no_argument(name: &str, arg: &str) -> Result<()> {
    if !arg.is_empty() {
        bail!("/{name} takes no argument, got '{arg}'");
    }
    Ok(())
}

fn file_argument(name: &str, arg: &str) -> Result<PathBuf> {
    if arg.is_empty() {
        bail!("/{name} needs a file name");
    }
    Ok(PathBuf::from(arg))
}

/// Where /save puts the prefix cache beside the conversation file.
fn kv_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".kv");
    PathBuf::from(name)
}

fn count_tokens(braid: &Braid, text: &str) -> Result<usize> {
    Ok(braid.engine().tokenizer().encode(text, false)?.len())
}

/// The first line of `text`, cut to 60 characters.
fn preview(text: &str) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut out: String = line.chars().take(60).collect();
    if out.len() < line.len() || text.trim().lines().count() > 1 {
        out.push('…');
    }
    out
}

fn reasoning_open(terminal: bool, tags: Option<&(String, String)>) -> String {
    match (terminal, tags) {
        (true, _) => DIM.to_string(),
        (false, Some((open, _))) => format!("{open}\n"),
        (false, None) => String::new(),
    }
}

fn reasoning_close(terminal: bool, tags: Option<&(String, String)>) -> String {
    match (terminal, tags) {
        (true, _) => format!("{RESET}\n\n"),
        (false, Some((_, close))) => format!("\n{close}\n\n"),
        (false, None) => "\n\n".to_string(),
    }
}
