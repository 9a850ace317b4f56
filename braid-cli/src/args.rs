//! Command-line arguments.

use braid_kernels::{DType, Device};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "braid",
    version,
    about = "Run LLMs from safetensors or GGUF files on the CPU or an NVIDIA GPU."
)]
pub struct Cli {
    /// Log what the engine does (or set RUST_LOG).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Chat with a model: answer PROMPT and exit, or start an interactive chat without one.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// The user message; omit for an interactive chat.
        prompt: Option<String>,
        #[command(flatten)]
        gen: GenArgs,
        /// Start the interactive chat with reasoning text hidden (/think show brings it back).
        #[arg(long, conflicts_with = "prompt")]
        hide_think: bool,
    },
    /// Interactive chat that keeps the conversation, and its KV, between turns (/help lists the
    /// commands).
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        gen: GenArgs,
        /// Start with reasoning text hidden (/think show brings it back).
        #[arg(long)]
        hide_think: bool,
    },
    /// Generate from a prompt (chat-templated unless --raw) or from token ids.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt text.
        #[arg(
            long,
            conflicts_with = "prompt_ids",
            required_unless_present = "prompt_ids"
        )]
        prompt: Option<String>,
        /// Prompt as comma-separated token ids, used as given.
        #[arg(long, value_delimiter = ',')]
        prompt_ids: Option<Vec<u32>>,
        /// Tokenize the prompt as it is instead of applying the chat template.
        #[arg(long)]
        raw: bool,
        /// Print one JSON object with ids, text, finish reason and timings instead of streaming text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        gen: GenArgs,
    },
    /// Describe a model: architecture, size, weight types, context, tokenizer, chat template.
    /// Show a model's format, shape and tokenizer; on a GPU, also load it there and report which
    /// kernels its small decode steps use.
    Inspect {
        /// Directory, .gguf file, Hugging Face cache id or alias.
        model: String,
        /// Where to check the GPU path: cuda or cuda:N checks it, cpu skips it (default: the first
        /// GPU if there is one).
        #[arg(long)]
        device: Option<Device>,
        /// Compute type for the GPU check: bf16 or f16 (default bf16).
        #[arg(long)]
        dtype: Option<DType>,
    },
    /// Fetch a built-in model alias into the local cache.
    Pull { alias: String },
    /// List the built-in model aliases and whether each is cached.
    Models,
    /// Measure decode throughput, time to first token, start-up and memory; print JSON.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        bench: BenchArgs,
    },
}

/// One way of running the shared-prefix workload.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum SharedRun {
    /// The prefix cached once, decoded with cascade attention where the cost rule picks it.
    Cascade,
    /// The prefix cached once, decoded with cascade attention whatever the cost rule says (to
    /// measure where the rule should draw its line).
    CascadeAlways,
    /// The prefix cached once, decoded with plain paged attention.
    Plain,
    /// Prefix caching off: every request holds its own copy of the prefix.
    Unshared,
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Batch sizes to measure decode throughput at.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    pub batch: Vec<usize>,
    /// Prompt length of the decode runs.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens generated per sequence in the decode runs.
    #[arg(long, default_value_t = 512)]
    pub new_tokens: usize,
    /// Prompt lengths to time the first token for.
    #[arg(long, value_delimiter = ',', default_value = "512,4096")]
    pub ttft: Vec<usize>,
    /// Most tokens per forward step (prefill chunk size).
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// Shared-prefix workload: tokens of the system prompt all its requests share (0 skips it).
    #[arg(long, default_value_t = 4096)]
    pub shared_prefix: usize,
    /// Shared-prefix workload: requests sharing the prompt.
    #[arg(long, default_value_t = 64)]
    pub shared_batch: usize,
    /// Shared-prefix workload: each request's own question, in tokens.
    #[arg(long, default_value_t = 64)]
    pub shared_question: usize,
    /// Shared-prefix workload: tokens generated per request.
    #[arg(long, default_value_t = 256)]
    pub shared_new_tokens: usize,
    /// Shared-prefix workload: which of its runs to make (cascade, cascade-always, plain,
    /// unshared).
    #[arg(long, value_delimiter = ',', default_value = "cascade,plain,unshared")]
    pub shared_runs: Vec<SharedRun>,
    /// Multi-turn workload: turns of one conversation (0 skips it).
    #[arg(long, default_value_t = 8)]
    pub turns: usize,
    /// Multi-turn workload: tokens of the system prompt the conversation starts with.
    #[arg(long, default_value_t = 2048)]
    pub turn_system: usize,
    /// Multi-turn workload: tokens of each user message.
    #[arg(long, default_value_t = 64)]
    pub turn_user: usize,
    /// Multi-turn workload: tokens of each answer.
    #[arg(long, default_value_t = 64)]
    pub turn_answer: usize,
    /// Date to record in the JSON (the harness passes it).
    #[arg(long, default_value = "")]
    pub date: String,
    /// Write the JSON here instead of stdout.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Directory, .gguf file, Hugging Face cache id or alias (default: smollm2-135m).
    #[arg(long, short)]
    pub model: Option<String>,
    /// Where to run: cpu, cuda or cuda:N (default: the first GPU if there is one, else the CPU).
    #[arg(long)]
    pub device: Option<Device>,
    /// Compute type on the GPU: f32, bf16 or f16 (the CPU always computes in f32).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Tokens the KV cache holds (default: the model's context window).
    #[arg(long, conflicts_with = "kv_cache_gb")]
    pub kv_cache_tokens: Option<usize>,
    /// Size of the KV cache in GiB, converted to tokens for the model and dtype.
    #[arg(long, allow_hyphen_values = true)]
    pub kv_cache_gb: Option<f64>,
}

#[derive(Args, Clone)]
pub struct GenArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7, allow_hyphen_values = true)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to P (1 = off).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub min_p: f32,
    /// Penalise tokens already in the context (1 = off).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub repetition_penalty: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// System prompt for chat-templated prompts.
    #[arg(long)]
    pub system: Option<String>,
}
