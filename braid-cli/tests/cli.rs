//! The `braid` binary end to end on the tiny fixture models: JSON output against transformers'
//! tokens, streaming, `inspect`, and one clear error sentence (exit status 1, no panic) for each
//! kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model(name: &str) -> String {
    fixtures()
        .join("models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn expected(name: &str) -> Value {
    let path = fixtures().join("models").join(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn braid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_braid"))
        .args(args)
        .env(
            "BRAID_CACHE",
            std::env::temp_dir().join("braid-cli-test-cache"),
        )
        .output()
        .unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Runs and expects failure with one error line containing `needle`, and no panic.
fn fails_with(args: &[&str], needle: &str) {
    let out = braid(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should fail cleanly; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    assert!(
        line.contains(needle),
        "{args:?}: expected '{needle}' in: {line}"
    );
}

#[test]
fn generate_json_matches_transformers_greedy_tokens() {
    let exp = expected("llama");
    let case = &exp["prompts"][0];
    let out = braid(&[
        "generate",
        "--model",
        &model("llama"),
        "--prompt",
        case["text"].as_str().unwrap(),
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(ids(&json["prompt_token_ids"]), ids(&case["input_ids"]));
    assert_eq!(
        ids(&json["token_ids"]),
        ids(&case["greedy_ids"])[..8].to_vec()
    );
    assert_eq!(json["finish_reason"], "length");
    assert!(json["text"].is_string());
    assert!(json["timings"]["decode_tokens_per_s"].is_number());
}

#[test]
fn prompt_ids_and_streaming_output() {
    let exp = expected("qwen3");
    let case = &exp["prompts"][1];
    let prompt: Vec<String> = ids(&case["input_ids"]).iter().map(u64::to_string).collect();
    let out = braid(&[
        "generate",
        "--model",
        &model("qwen3"),
        "--prompt-ids",
        &prompt.join(","),
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--ignore-eos",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("4 generated (length)") && stderr.contains("tok/s"),
        "{stderr}"
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let run = || {
        let out = braid(&[
            "generate",
            "--model",
            &model("llama"),
            "--prompt",
            "the robot",
            "--raw",
            "--temperature",
            "0.9",
            "--top-k",
            "50",
            "--top-p",
            "0.9",
            "--seed",
            "7",
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        ids(&json["token_ids"])
    };
    assert_eq!(run(), run());
}

#[test]
fn inspect_describes_the_model() {
    let out = braid(&["inspect", &model("qwen2")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "architecture:    qwen2",
        "format:          safetensors",
        "chat template:   yes",
        "context length:",
    ] {
        assert!(stdout.contains(needle), "missing '{needle}' in:\n{stdout}");
    }
    // Without --device the GPU path is checked where a GPU works, and its absence is said.
    assert!(
        stdout.contains("GPU:             none (") || stdout.contains("fused norm GEMV: "),
        "{stdout}"
    );
    let out = braid(&["inspect", &model("qwen2"), "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !stdout.contains("GPU:"), "{stdout}");
    fails_with(
        &[
            "inspect",
            &model("qwen2"),
            "--device",
            "cuda",
            "--dtype",
            "f32",
        ],
        "bf16 or f16",
    );
    let out = braid(&["inspect", &(model("llama-gguf-q8_0") + "/model.gguf")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("format:          gguf") && stdout.contains("Q8_0"),
        "{stdout}"
    );
}

#[test]
fn out_of_range_flags_are_refused() {
    let m = model("llama");
    fails_with(
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--temperature",
            "-1",
        ],
        "temperature",
    );
    fails_with(
        &["generate", "--model", &m, "--prompt", "x", "--top-p", "1.5"],
        "top_p",
    );
    fails_with(
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--max-tokens",
            "0",
        ],
        "max_tokens",
    );
    fails_with(
        &[
            "generate", "--model", &m, "--prompt", "x", "--dtype", "bf16",
        ],
        "f32",
    );
    fails_with(
        &["generate", "--model", &m, "--prompt-ids", "1,99999"],
        "outside the vocabulary",
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    // The fixture's context window is 128 tokens.
    let prompt = vec!["5"; 200].join(",");
    fails_with(
        &[
            "generate",
            "--model",
            &model("llama"),
            "--prompt-ids",
            &prompt,
        ],
        "the prompt has 200 tokens",
    );
}

#[test]
fn unknown_models_and_architectures_are_named() {
    fails_with(
        &["generate", "--model", "no/such-model", "--prompt", "x"],
        "no/such-model",
    );
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("llama", dir.path());
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM")
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&config, text).unwrap();
    fails_with(
        &["inspect", dir.path().to_str().unwrap()],
        "unknown architecture 'GPTNeoXForCausalLM'",
    );
}

#[test]
fn damaged_model_files_give_one_sentence() {
    // Truncated safetensors.
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("llama", dir.path());
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt",
            "x",
        ],
        "model.safetensors",
    );

    // A config whose shape disagrees with the weights.
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("llama", dir.path());
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&config, text).unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt",
            "x",
        ],
        "shape",
    );

    // Truncated GGUF.
    let dir = tempfile::tempdir().unwrap();
    let gguf = std::fs::read(fixtures().join("models/llama-gguf/model.gguf")).unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, &gguf[..gguf.len() - 1000]).unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        "model.gguf",
    );

    // Not a GGUF at all.
    std::fs::write(&path, b"definitely not a model").unwrap();
    fails_with(&["inspect", path.to_str().unwrap()], "GGUF");
}

fn copy_fixture(name: &str, to: &Path) {
    for entry in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

// ---- the interactive chat, driven through stdin ----

#[path = "../../braid-core/tests/common/mod.rs"]
mod engine_helpers;

/// Runs `braid` with `input` on stdin.
fn braid_with_input(args: &[&str], input: &str) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_braid"))
        .args(args)
        .env(
            "BRAID_CACHE",
            std::env::temp_dir().join("braid-cli-test-cache"),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A chat on `model` that ends cleanly; returns (stdout, stderr).
fn chat(model: &str, extra: &[&str], input: &str) -> (String, String) {
    let mut args = vec![
        "chat",
        "--model",
        model,
        "--device",
        "cpu",
        "--temperature",
        "0",
    ];
    args.extend_from_slice(extra);
    let out = braid_with_input(&args, input);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "the chat failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

/// (prompt tokens, cached tokens) of each answer's summary line.
fn summaries(stderr: &str) -> Vec<(usize, usize)> {
    stderr
        .lines()
        .filter_map(|l| {
            let (prompt, rest) = l.split_once(" prompt tokens (")?;
            let (cached, _) = rest.split_once(" cached)")?;
            Some((prompt.parse().ok()?, cached.parse().ok()?))
        })
        .collect()
}

#[test]
fn chat_keeps_the_conversation_and_answers_commands() {
    let input = "\
/system Be brief.
/context The sky is blue.
/query What color?
/infer
/bogus
hello there
/use-output 9
/think maybe
/stats
/output
/list
/clear
/list
/exit
/help
";
    let (stdout, stderr) = chat(&model("qwen3"), &["--max-tokens", "4"], input);
    for needle in [
        "system prompt set (",
        "context 1 added (",
        "query set (",
        "turns: 2",
        "cache hits: ",
        "tok/s",
        "#1 (",
        "#2 query: hello there",
        "conversation cleared",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    assert!(
        !stdout.contains("Type a message"),
        "nothing runs after /exit"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors,
        [
            "error: unknown command '/bogus'; /help lists the commands",
            "error: there is no answer 9; the conversation has 2 answers",
            "error: /think takes show or hide, not 'maybe'",
        ]
    );

    // The second answer found the first turn in the cache; /stats says how much it saved.
    let answers = summaries(&stderr);
    assert_eq!(answers.len(), 2, "{stderr}");
    assert_eq!(answers[0].1, 0);
    assert!(answers[1].1 > answers[0].0, "{answers:?}");
    assert!(
        stdout.contains(&format!("tokens saved: {}", answers[1].1)),
        "{stdout}"
    );
    let after_clear = &stdout[stdout.find("conversation cleared").unwrap()..];
    assert!(after_clear.contains("system: Be brief.") && !after_clear.contains("#1 query"));
}

#[test]
fn run_without_a_prompt_is_the_chat() {
    let out = braid_with_input(
        &[
            "run",
            "--model",
            &model("qwen3"),
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-tokens",
            "3",
        ],
        "hi\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("3 generated (length)"), "{stderr}");

    // Hiding reasoning is a chat setting; a one-shot run refuses it.
    let out = braid(&["run", "--model", &model("qwen3"), "hi", "--hide-think"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--hide-think"));
}

#[test]
fn a_saved_chat_loads_in_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.json");
    let file = file.to_str().unwrap();
    let (stdout, _) = chat(
        &model("qwen3"),
        &["--max-tokens", "3"],
        &format!("/context Cats purr.\nWhy?\n/save {file}\n"),
    );
    assert!(
        stdout.contains(&format!("saved 1 turn to {file}")),
        "{stdout}"
    );
    assert!(dir.path().join("chat.json.kv").is_file());

    let (stdout, stderr) = chat(
        &model("qwen3"),
        &["--max-tokens", "3"],
        &format!("/load {file}\n/list\nAnd then?\n/load {file}.missing\n"),
    );
    let loaded = stdout
        .lines()
        .find(|l| l.starts_with("loaded 1 turn from"))
        .unwrap_or_else(|| panic!("no load line in:\n{stdout}"));
    let from_file: usize = loaded
        .split_once('(')
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        from_file > 0,
        "full blocks come from the cache file: {loaded}"
    );
    assert!(stdout.contains("#1 context: Cats purr."), "{stdout}");
    let answers = summaries(&stderr);
    assert!(
        answers[0].1 > from_file,
        "the next turn starts from the loaded conversation"
    );
    let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(
        error.starts_with("error: cannot read conversation file") && error.contains(".missing"),
        "{error}"
    );
}

#[test]
fn reasoning_is_marked_when_piped_and_can_be_hidden() {
    let mut base = engine_helpers::qwen3();
    let choice = engine_helpers::choose_think_ids(&mut base);
    let g = &choice.generated;
    let think = engine_helpers::think_model(g[0], g[choice.close_at]);
    let engine = think.engine();
    let tags = braid_core::ThinkTags::detect(engine.tokenizer()).unwrap();
    let raw = engine.tokenizer().decode(g, true).unwrap();
    let (reasoning, answer) = braid_core::reasoning::split_reasoning(&raw, &tags);
    let dir = think.dir.to_str().unwrap();
    let gen = ["--max-tokens", "16", "--ignore-eos"];
    let question = format!("{}\n", choice.question);

    let (stdout, _) = chat(dir, &gen, &question);
    assert_eq!(
        stdout,
        format!("<think>\n{reasoning}\n</think>\n\n{answer}\n")
    );
    assert!(
        !stdout.contains('\x1b'),
        "no ANSI codes when stdout is not a terminal"
    );

    let hidden = [&gen[..], &["--hide-think"]].concat();
    let (stdout, _) = chat(dir, &hidden, &question);
    assert_eq!(stdout, format!("{answer}\n"));
    let (stdout, _) = chat(dir, &gen, &format!("/think hide\n{question}"));
    assert_eq!(stdout, format!("reasoning is hidden\n{answer}\n"));
    let (stdout, _) = chat(dir, &hidden, &format!("/think show\n{question}"));
    assert!(
        stdout.starts_with("reasoning is shown\n<think>\n"),
        "{stdout}"
    );
}

/// The benchmark's multi-turn workload: with answers retained, each later turn computes only its
/// new message plus the answer's last token (whose KV no step computed), prefix caching alone
/// recomputes the unfinished last block, and no caching recomputes everything.
#[test]
fn bench_multi_turn_computes_only_the_new_tokens_when_answers_are_retained() {
    let out = braid(&[
        "bench",
        "--model",
        &model("llama"),
        "--device",
        "cpu",
        "--batch",
        "1",
        "--prompt-len",
        "8",
        "--new-tokens",
        "2",
        "--ttft",
        "8",
        "--shared-prefix",
        "0",
        "--turns",
        "3",
        "--turn-system",
        "40",
        "--turn-user",
        "8",
        "--turn-answer",
        "4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = &report["multi_turn"]["runs"];
    let computed = |run: &str| -> Vec<u64> {
        runs[run]["computed_prompt_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    // The conversation before turn t holds 40 + t * (8 + 4) tokens, then 8 new ones.
    assert_eq!(computed("retained"), [48, 9, 9]);
    assert_eq!(computed("no_cache"), [48, 60, 72]);
    let cached = computed("prefix_cache");
    assert!(
        cached[0] == 48 && cached[1..].iter().all(|&c| c > 9 && c < 60),
        "{cached:?}"
    );
}
