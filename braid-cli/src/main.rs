//! The `braid` command: run and chat with a model, generate from a prompt, inspect and fetch models.

mod args;
mod bench;
mod commands;
mod interactive;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let process_start = std::time::Instant::now();
    let cli = args::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if cli.verbose { "info" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match commands::run(cli, process_start) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One sentence per cause, outermost first.
            let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}
