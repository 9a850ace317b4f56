//! The interactive chat: reads user turns from stdin, keeps the conversation, and lets Ctrl-C stop
//! the current answer without leaving the program.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use braid_core::{Braid, ChatMessage, Prompt};

use crate::args::GenArgs;
use crate::commands::stream_until;

pub fn interactive(braid: &mut Braid, gen: &GenArgs) -> Result<()> {
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
    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &gen.system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: system.clone(),
        });
    }
    eprintln!("Chatting with the model; Ctrl-C stops an answer, Ctrl-D or /exit quits.");
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        std::io::stderr().flush().ok();
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            _ => {}
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: input.to_owned(),
        });
        interrupted.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let result = stream_until(braid, Prompt::Chat(messages.clone()), gen, || {
            interrupted.load(Ordering::SeqCst)
        });
        generating.store(false, Ordering::SeqCst);
        match result {
            Ok(out) => messages.push(ChatMessage {
                role: "assistant".into(),
                content: out.text,
            }),
            Err(err) => {
                // The turn failed (e.g. the conversation outgrew the context); drop it and go on.
                messages.pop();
                eprintln!("error: {err:#}");
            }
        }
    }
}
