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
