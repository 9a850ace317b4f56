//! What each subcommand does.

use std::io::Write;
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use braid_core::{
    Braid, ChatMessage, Engine, EngineConfig, Generation, GenerationParams, Prompt, SamplingParams,
};
use braid_kernels::{DType, Device};
use braid_models::{source, Backend};

use crate::args::{Cli, Command, GenArgs, ModelArgs};

pub fn run(cli: Cli, process_start: Instant) -> Result<()> {
    match cli.command {
        Command::Bench { model, bench } => crate::bench::run(&model, &bench, process_start),
        Command::Run {
            model,
            prompt: Some(prompt),
            gen,
            ..
        } => {
            let mut braid = load(&model)?;
            let messages = conversation(&gen, &prompt);
            stream(&mut braid, Prompt::Chat(messages), &gen)?;
            Ok(())
        }
        Command::Run {
            model,
            prompt: None,
            gen,
            hide_think,
        }
        | Command::Chat {
            model,
            gen,
            hide_think,
        } => {
            let mut braid = load(&model)?;
            crate::interactive::run(&mut braid, &gen, hide_think)
        }
        Command::Generate {
            model,
            prompt,
            prompt_ids,
            raw,
            json,
            gen,
        } => {
            let mut braid = load(&model)?;
            let prompt = match (prompt_ids, prompt) {
                (Some(ids), _) => Prompt::Ids(ids),
                (None, Some(text)) if raw => Prompt::Raw(text),
                (None, Some(text)) => Prompt::Chat(conversation(&gen, &text)),
                (None, None) => bail!("give --prompt or --prompt-ids"),
            };
            if json {
                let out = braid.generate(prompt, &params(&gen)?)?;
                println!("{}", serde_json::to_string(&out)?);
            } else {
                stream(&mut braid, prompt, &gen)?;
            }
            Ok(())
        }
        Command::Inspect {
            model,
            device,
            dtype,
        } => inspect(&model, device, dtype),
        Command::Pull { alias } => {
            let path = source::pull(&alias)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Models => {
            for alias in source::aliases() {
                let cached = source::cached_path(alias).map_or_else(
                    || "not cached".to_owned(),
                    |p| format!("cached at {}", p.display()),
                );
                println!("{:<16} {} ({cached})", alias.name, alias.description);
            }
            Ok(())
        }
    }
}

/// Resolve, fetch if needed, and load a model on the requested device, with a default engine.
fn load(args: &ModelArgs) -> Result<Braid> {
    Ok(Braid::with_engine(load_engine(
        args,
        EngineConfig::default(),
    )?)?)
}

/// The device to run on: the one asked for, else the first GPU when one works, else the CPU.
fn choose_device(args: &ModelArgs) -> Device {
    if let Some(device) = args.device {
        return device;
    }
    match braid_kernels::cuda::CudaDevice::new(0) {
        Ok(_) => Device::Cuda(0),
        Err(e) => {
            eprintln!("warning: {e}; running on the CPU (pass --device cpu to silence this)");
            Device::Cpu
        }
    }
}

/// Resolve, fetch if needed, and load a model on the requested device into an engine. The KV
/// cache size comes from the flags when given (`config.kv_cache_tokens` otherwise).
pub fn load_engine(args: &ModelArgs, mut config: EngineConfig) -> Result<Engine> {
    if args.kv_cache_tokens == Some(0) {
        bail!("--kv-cache-tokens must be at least 1");
    }
    if let Some(gb) = args.kv_cache_gb {
        if !(gb > 0.0 && gb.is_finite()) {
            bail!("--kv-cache-gb must be a positive number of GiB, got {gb}");
        }
    }
    let device = choose_device(args);
    let dtype = match (device, args.dtype) {
        (Device::Cpu, Some(dtype)) if dtype != DType::F32 => {
            bail!("the CPU computes in f32; --dtype {dtype} applies to GPU runs only")
        }
        (Device::Cpu, _) => DType::F32,
        (Device::Cuda(_), Some(DType::F32)) => {
            bail!("the GPU computes in bf16 or f16; --dtype f32 runs on the CPU only")
        }
        (Device::Cuda(_), dtype) => dtype.unwrap_or(DType::BF16),
    };
    let spec = args.model.as_deref().unwrap_or(source::DEFAULT_MODEL);
    let location = source::resolve(spec).with_context(|| format!("cannot open model '{spec}'"))?;
    let start = Instant::now();
    let spinner = indicatif::ProgressBar::new_spinner().with_message(format!("loading {spec}"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let loaded = braid_models::load_on(&location, device, dtype);
    spinner.finish_and_clear();
    let loaded = loaded.with_context(|| format!("cannot load model '{spec}' on {device}"))?;
    tracing::info!(
        model = spec,
        seconds = start.elapsed().as_secs_f64(),
        "model loaded"
    );

    let c = &loaded.info.config;
    let bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype.size_in_bytes();
    if let Some(tokens) = args.kv_cache_tokens {
        config.kv_cache_tokens = Some(tokens);
    } else if let Some(gb) = args.kv_cache_gb {
        let tokens = (gb * (1u64 << 30) as f64 / bytes_per_token as f64) as usize;
        if tokens < config.block_size {
            bail!(
                "--kv-cache-gb {gb} holds {tokens} tokens of this model, less than one block of {}",
                config.block_size
            );
        }
        config.kv_cache_tokens = Some(tokens);
    }
    let tokens = config.kv_cache_tokens.unwrap_or(c.max_position_embeddings);
    if device != Device::Cpu {
        eprintln!(
            "KV cache: {tokens} tokens ({:.2} GiB of {dtype}) on {device}",
            (tokens * bytes_per_token) as f64 / (1u64 << 30) as f64
        );
    }
    Ok(Engine::new(loaded, config)?)
}

pub fn params(gen: &GenArgs) -> Result<GenerationParams> {
    // The engine accepts 0 (prefill only), which generates nothing a command could show.
    if gen.max_tokens == 0 {
        bail!("max_tokens must be at least 1");
    }
    let p = GenerationParams {
        max_tokens: gen.max_tokens,
        sampling: SamplingParams {
            temperature: gen.temperature,
            top_k: gen.top_k,
            top_p: gen.top_p,
            min_p: gen.min_p,
            repetition_penalty: gen.repetition_penalty,
            seed: gen.seed,
        },
        stop: gen.stop.clone(),
        ignore_eos: gen.ignore_eos,
        retain: false,
    };
    if let Err(msg) = p.validate() {
        bail!("{msg}");
    }
    Ok(p)
}

fn conversation(gen: &GenArgs, user: &str) -> Vec<ChatMessage> {
    let mut messages = Vec::new();
    if let Some(system) = &gen.system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: system.clone(),
        });
    }
    messages.push(ChatMessage {
        role: "user".into(),
        content: user.to_owned(),
    });
    messages
}

/// Stream text to stdout and a one-line summary to stderr.
pub fn stream(braid: &mut Braid, prompt: Prompt, gen: &GenArgs) -> Result<Generation> {
    stream_until(braid, prompt, gen, || false)
}

/// Like [`stream`], stopping early when `interrupted` says so.
pub fn stream_until(
    braid: &mut Braid,
    prompt: Prompt,
    gen: &GenArgs,
    interrupted: impl Fn() -> bool,
) -> Result<Generation> {
    let params = params(gen)?;
    let mut stdout = std::io::stdout().lock();
    let out = braid.generate_stream(prompt, &params, |piece| {
        // A closed stdout (e.g. piped into `head`) ends the generation quietly.
        if stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush())
            .is_err()
            || interrupted()
        {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    let _ = writeln!(stdout);
    let t = &out.timings;
    eprintln!(
        "{} prompt tokens, {} generated ({}), first token after {:.2} s, {:.1} tok/s",
        t.prompt_tokens,
        t.generated_tokens,
        out.finish_reason.as_str(),
        t.time_to_first_token_s,
        t.decode_tokens_per_s
    );
    Ok(out)
}

fn inspect(spec: &str, device: Option<Device>, dtype: Option<DType>) -> Result<()> {
    let location = source::resolve(spec).with_context(|| format!("cannot open model '{spec}'"))?;
    let info =
        braid_models::inspect(&location).with_context(|| format!("cannot read model '{spec}'"))?;
    let c = &info.config;
    let types: Vec<String> = info
        .weight_types
        .iter()
        .map(|(t, n)| format!("{t} ×{n}"))
        .collect();
    let windows: Vec<usize> = c.layer_windows.iter().flatten().copied().collect();
    println!("path:            {}", info.path.display());
    println!("format:          {}", info.format);
    println!("architecture:    {}", c.architecture.name());
    println!("parameters:      {:.1} M", c.parameter_count() as f64 / 1e6);
    println!("weight types:    {}", types.join(", "));
    println!(
        "shape:           {} layers, hidden {}, intermediate {}, {} heads / {} KV heads, head_dim {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("context length:  {}", c.max_position_embeddings);
    println!(
        "rope:            theta {}, scaling {:?}",
        c.rope_theta, c.rope_scaling
    );
    if let Some(w) = windows.first() {
        println!(
            "sliding window:  {w} tokens on {} of {} layers",
            windows.len(),
            c.num_layers
        );
    }
    println!(
        "vocabulary:      {} ({}, {} tokens)",
        c.vocab_size, info.tokenizer_kind, info.tokenizer_vocab
    );
    println!("tied embeddings: {}", c.tie_word_embeddings);
    println!(
        "chat template:   {}",
        if info.has_chat_template { "yes" } else { "no" }
    );
    let ordinal = match device {
        Some(Device::Cpu) => return Ok(()),
        Some(Device::Cuda(ordinal)) => ordinal,
        None => match braid_kernels::cuda::CudaDevice::new(0) {
            Ok(_) => 0,
            Err(e) => {
                println!("GPU:             none ({e})");
                return Ok(());
            }
        },
    };
    let dtype = match dtype {
        None => DType::BF16,
        Some(DType::F32) => bail!("the GPU computes in bf16 or f16; --dtype f32 has no GPU path"),
        Some(dtype) => dtype,
    };
    let loaded = braid_models::load_on(&location, Device::Cuda(ordinal), dtype)
        .with_context(|| format!("cannot load model '{spec}' on cuda:{ordinal}"))?;
    let Backend::Cuda(mut model) = loaded.backend else {
        bail!("model '{spec}' did not load onto the GPU")
    };
    println!("GPU:             {} ({dtype})", model.device_name());
    let fused = model.fused_norm_status();
    match &fused.reason {
        None => println!(
            "fused norm GEMV: on for steps of up to {} tokens (load-time self-check: rel. L2 {:.1e})",
            fused.max_tokens, fused.max_rel_err
        ),
        Some(reason) => println!("fused norm GEMV: off, unfused kernels in use ({reason})"),
    }
    Ok(())
}
