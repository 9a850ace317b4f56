//! `braid bench`: Braid's side of the benchmark — decode throughput at several batch sizes, time to
//! first token, start-up time and memory — printed as a table and written as JSON for
//! `scripts/bench_report.py` to set beside PyTorch's figures from the same machine.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};
use braid_core::{CascadePolicy, Engine, EngineConfig, GenerationParams};
use serde_json::{json, Value};

use crate::args::{BenchArgs, ModelArgs, SharedRun};

/// Random-looking but reproducible prompt ids in `1..vocab`.
fn prompt(len: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            1 + (s % (vocab as u64 - 1)) as u32
        })
        .collect()
}

/// Decode tokens per second with `batch` sequences running together: tokens produced after every
/// sequence has its first token, over the time that took. (With chunked prefill some sequences
/// decode while others still prefill; those mixed steps are left out.)
fn decode_throughput(
    engine: &mut Engine,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
) -> Result<BatchRun> {
    let vocab = engine.info().config.vocab_size;
    let prompts = (0..batch).map(|i| prompt(prompt_len, i as u64 + 1, vocab));
    run_batch(engine, prompts, new_tokens)
}

/// Decode throughput of a batch run, and where its time went.
struct BatchRun {
    /// Decode tokens per second.
    tok_s: f64,
    /// Most KV blocks in use at any step.
    peak_blocks: usize,
    /// Share of the decode window spent outside the model's forward passes: the engine's host
    /// work, during which the GPU waits.
    host_share: f64,
}

/// Submit every prompt and run them to the end. The decode window opens once every sequence has
/// produced a token, so prefill is excluded.
fn run_batch(
    engine: &mut Engine,
    prompts: impl Iterator<Item = Vec<u32>>,
    new_tokens: usize,
) -> Result<BatchRun> {
    let mut batch = 0;
    for p in prompts {
        engine.add_request(p, GenerationParams::greedy_exact(new_tokens))?;
        batch += 1;
    }
    let mut started = std::collections::HashSet::new();
    let mut window: Option<(Instant, usize, f64)> = None;
    let mut produced = 0usize;
    let mut peak_blocks = 0;
    while engine.has_work() {
        let events = engine.step()?;
        peak_blocks = peak_blocks.max(engine.kv_blocks().0);
        for ev in events {
            if ev.token.is_some() {
                produced += 1;
                started.insert(ev.request);
            }
        }
        if window.is_none() && started.len() == batch {
            window = Some((Instant::now(), produced, engine.stats().forward_seconds));
        }
    }
    let Some((t0, at, forward_at)) = window else {
        bail!("no sequence produced a token")
    };
    let wall = t0.elapsed().as_secs_f64();
    let forward = engine.stats().forward_seconds - forward_at;
    Ok(BatchRun {
        tok_s: (produced - at) as f64 / wall,
        peak_blocks,
        host_share: if wall > 0.0 {
            1.0 - forward / wall
        } else {
            0.0
        },
    })
}

/// The shared-prefix workload: `shared_batch` requests whose prompts are one `shared_prefix`-token
/// system prompt plus a distinct question. Run up to three ways (`shared_runs`) on fresh engines of
/// the same pool size: the prefix cached once and decoded with cascade attention, cached but
/// decoded with plain paged attention, and with prefix caching off (every request holds its own
/// copy). Reports decode
/// tok/s and the peak KV memory the block pool had in use for each.
fn shared_prefix(model: &ModelArgs, args: &BenchArgs) -> Result<Value> {
    let (n, len) = (args.shared_batch, args.shared_prefix);
    let kv_tokens = n * (len + args.shared_question + args.shared_new_tokens + 16);
    let mut results = serde_json::Map::new();
    for &run in &args.shared_runs {
        let (name, cascade, prefix_caching) = match run {
            SharedRun::Cascade => ("cascade", CascadePolicy::Auto, true),
            SharedRun::CascadeAlways => ("cascade_always", CascadePolicy::Always, true),
            SharedRun::Plain => ("plain", CascadePolicy::Off, true),
            SharedRun::Unshared => ("unshared", CascadePolicy::Off, false),
        };
        let config = EngineConfig {
            kv_cache_tokens: Some(kv_tokens),
            max_running: n,
            max_batch_tokens: args.max_batch_tokens,
            prefix_caching,
            cascade,
            ..EngineConfig::default()
        };
        let mut engine = crate::commands::load_engine(model, config)?;
        let vocab = engine.info().config.vocab_size;
        let system = prompt(len, 7, vocab);
        // The system prompt is computed once, as a client would register it, before the burst.
        engine.add_request(system.clone(), GenerationParams::greedy_exact(0))?;
        while engine.has_work() {
            engine.step()?;
        }
        let prompts = (0..n).map(|i| {
            let mut p = system.clone();
            p.extend(prompt(args.shared_question, 100 + i as u64, vocab));
            p
        });
        let run = run_batch(&mut engine, prompts, args.shared_new_tokens)?;
        let (_, kv_bytes, _) = engine.memory_report();
        let block_bytes = kv_bytes / engine.kv_blocks().1;
        let kv_gib = (run.peak_blocks * block_bytes) as f64 / (1u64 << 30) as f64;
        let stats = engine.stats();
        eprintln!(
            "shared prefix {len} x {n} ({name:>8}): {:>10.1} tok/s, peak KV {kv_gib:.2} GiB, {} cascade steps, host {:.0}% of decode",
            run.tok_s,
            stats.cascade_steps,
            100.0 * run.host_share
        );
        results.insert(
            name.into(),
            json!({
                "decode_tok_s": run.tok_s,
                "peak_kv_gib": kv_gib,
                "cascade_steps": stats.cascade_steps,
                "host_share": run.host_share,
            }),
        );
    }
    Ok(json!({
        "prefix_tokens": len,
        "requests": n,
        "question_tokens": args.shared_question,
        "new_tokens": args.shared_new_tokens,
        "runs": results,
    }))
}

/// The multi-turn workload: one conversation of `turns` turns over a `turn_system`-token system
/// prompt, each turn a `turn_user`-token message whose prompt is the whole conversation so far
/// (every earlier message and answer) and a `turn_answer`-token answer. Run three ways on fresh
/// engines: answers retained as the next turn's prefix (exact KV of every earlier token, the
/// partly filled last block included), prefix caching alone (finished requests leave their full
/// blocks to the prefix tree), and no caching. Each engine first holds a two-turn conversation
/// of other tokens (then releases what it retained), so the timed one does not pay for the
/// first use of each step shape, as the TTFT workload runs a warm-up. Reports each turn's time
/// to first token and the prompt tokens it had to compute.
fn multi_turn(model: &ModelArgs, args: &BenchArgs) -> Result<Value> {
    let total = args.turn_system + args.turns * (args.turn_user + args.turn_answer);
    let mut results = serde_json::Map::new();
    for (name, retain, prefix_caching) in [
        ("retained", true, true),
        ("prefix_cache", false, true),
        ("no_cache", false, false),
    ] {
        let config = EngineConfig {
            kv_cache_tokens: Some(2 * total + 64),
            max_running: 1,
            max_batch_tokens: args.max_batch_tokens,
            prefix_caching,
            ..EngineConfig::default()
        };
        let mut engine = crate::commands::load_engine(model, config)?;
        conversation(&mut engine, args, retain, 2.min(args.turns), 7)?;
        for output in engine.retained() {
            engine.release_retained(output.id);
        }
        let (ttft_ms, computed) = conversation(&mut engine, args, retain, args.turns, 11)?;
        // The first turn prefills the system prompt in every run; the later ones show the reuse.
        let later = &ttft_ms[1.min(ttft_ms.len())..];
        let mean = later.iter().sum::<f64>() / later.len().max(1) as f64;
        eprintln!(
            "multi-turn {} turns ({name:>12}): TTFT of turns 2+ {mean:>7.2} ms, prompt tokens computed {}",
            args.turns,
            computed.iter().sum::<u64>()
        );
        results.insert(
            name.into(),
            json!({
                "ttft_ms": ttft_ms,
                "computed_prompt_tokens": computed,
                "mean_later_ttft_ms": mean,
            }),
        );
    }
    Ok(json!({
        "turns": args.turns,
        "system_tokens": args.turn_system,
        "user_tokens": args.turn_user,
        "answer_tokens": args.turn_answer,
        "runs": results,
    }))
}

/// One conversation of the multi-turn workload (`turns` turns, token ids drawn from `seed`):
/// each turn's time to first token in ms and the prompt tokens the engine computed for it.
fn conversation(
    engine: &mut Engine,
    args: &BenchArgs,
    retain: bool,
    turns: usize,
    seed: u64,
) -> Result<(Vec<f64>, Vec<u64>)> {
    let vocab = engine.info().config.vocab_size;
    let mut conversation = prompt(args.turn_system, seed, vocab);
    let (mut ttft_ms, mut computed) = (Vec::new(), Vec::new());
    for turn in 0..turns {
        conversation.extend(prompt(args.turn_user, seed * 1000 + turn as u64, vocab));
        let before = engine.stats().prompt_tokens;
        let params = GenerationParams {
            retain,
            ..GenerationParams::greedy_exact(args.turn_answer)
        };
        let t0 = Instant::now();
        let id = engine.add_request(conversation.clone(), params)?;
        let mut first = None;
        while engine.has_work() {
            for ev in engine.step()? {
                if ev.request != id {
                    continue;
                }
                if let Some(token) = ev.token {
                    first.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1e3);
                    conversation.push(token);
                }
            }
        }
        let Some(ms) = first else {
            bail!("turn {turn} of the multi-turn workload produced no token")
        };
        ttft_ms.push(ms);
        computed.push(engine.stats().prompt_tokens - before);
    }
    Ok((ttft_ms, computed))
}

/// Median time to the first token of one request with a `len`-token prompt, over `runs` runs
/// after one warm-up run.
fn time_to_first_token(engine: &mut Engine, len: usize, runs: usize) -> Result<f64> {
    let runs = runs.max(1);
    let vocab = engine.info().config.vocab_size;
    let mut times = Vec::new();
    let hits = engine.stats().prefix_hit_tokens;
    for r in 0..runs + 1 {
        let t0 = Instant::now();
        // A seed per (length, run): prompts of different lengths from one seed share their
        // leading tokens, and the longer one would find the shorter one's KV in the prefix cache.
        let seed = ((len as u64) << 16) + 1000 + r as u64;
        engine.add_request(prompt(len, seed, vocab), GenerationParams::greedy_exact(1))?;
        while engine.has_work() {
            engine.step()?;
        }
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    if engine.stats().prefix_hit_tokens != hits {
        bail!("a {len}-token TTFT prompt found cached KV, so its time would not cover the whole prompt");
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2] * 1e3)
}

pub fn run(model: &ModelArgs, args: &BenchArgs, process_start: Instant) -> Result<()> {
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let kv_tokens = (max_batch * (args.prompt_len + args.new_tokens))
        .max(args.ttft.iter().copied().max().unwrap_or(0) + 16);
    let config = EngineConfig {
        kv_cache_tokens: Some(kv_tokens),
        max_running: max_batch.max(1),
        max_batch_tokens: args.max_batch_tokens,
        ..EngineConfig::default()
    };
    let mut engine = crate::commands::load_engine(model, config)?;
    // Start-up: process start to the first generated token.
    let vocab = engine.info().config.vocab_size;
    engine.add_request(prompt(16, 0, vocab), GenerationParams::greedy_exact(1))?;
    while engine.has_work() {
        engine.step()?;
    }
    let startup_s = process_start.elapsed().as_secs_f64();

    let mut decode = BTreeMap::new();
    let mut host_share = BTreeMap::new();
    for &b in &args.batch {
        let run = decode_throughput(&mut engine, b, args.prompt_len, args.new_tokens)?;
        eprintln!(
            "decode  batch {b:>4}: {:>10.1} tok/s, host {:.0}% of decode",
            run.tok_s,
            100.0 * run.host_share
        );
        decode.insert(b.to_string(), json!(run.tok_s));
        host_share.insert(b.to_string(), json!(run.host_share));
    }
    let mut ttft = BTreeMap::new();
    for &len in &args.ttft {
        let ms = time_to_first_token(&mut engine, len, 3)?;
        eprintln!("TTFT    {len:>5} tokens: {ms:>8.2} ms");
        ttft.insert(len.to_string(), json!(ms));
    }
    let memory = engine.memory_report();
    let device = engine.device_name();
    drop(engine); // the shared-prefix runs need the memory
    let shared = if args.shared_prefix > 0 {
        Some(shared_prefix(model, args)?)
    } else {
        None
    };
    let multi_turn = if args.turns > 0 {
        Some(multi_turn(model, args)?)
    } else {
        None
    };
    let out: Value = json!({
        "model": model.model,
        "device": device,
        "date": args.date,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "decode_tok_s": decode,
        "decode_host_share": host_share,
        "ttft_ms": ttft,
        "startup_s": startup_s,
        "weights_gib": memory.0 as f64 / (1u64 << 30) as f64,
        "kv_cache_gib": memory.1 as f64 / (1u64 << 30) as f64,
        "peak_memory_gib": memory.2.map(|b| b as f64 / (1u64 << 30) as f64),
        "shared_prefix": shared,
        "multi_turn": multi_turn,
    });
    eprintln!(
        "start-up {startup_s:.2} s; {}",
        serde_json::to_string(&out["peak_memory_gib"])?
    );
    let text = serde_json::to_string_pretty(&out)?;
    match &args.json {
        Some(path) => std::fs::write(path, text)?,
        None => println!("{text}"),
    }
    Ok(())
}
