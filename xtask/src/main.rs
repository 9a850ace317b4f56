//! Project chores, run as `cargo xtask <task>`:
//! - `bench [OUT_DIR] [SMOLLM2_GGUF]`: build the bundle and run its `bench.sh` here (needs a GPU and
//!   python3 with torch; on a GPU machine without Rust, copy the bundle and run `bench.sh` there);
//! - `fixtures [--smollm2 GGUF]`: regenerate the reference fixtures with transformers (needs python3
//!   with torch and transformers; see docs/fixtures.md);
//! - `device-bundle [--out DIR]`: build the release `braid` binary and the test binaries into one
//!   self-contained folder, with the fixtures, `run.sh` (every test), `bench.sh` (the benchmark
//!   against PyTorch) and `profile.sh` (one decode step's kernels under Nsight Compute), to copy to
//!   a GPU machine that has no Rust.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(&root, &args[1..]),
        Some("device-bundle") => {
            let out = match args.get(1).map(String::as_str) {
                Some("--out") => PathBuf::from(args.get(2).context("--out needs a folder")?),
                Some(other) => bail!("unknown device-bundle option '{other}'; expected --out DIR"),
                None => root.join("device-bundle"),
            };
            device_bundle(&root, &out)
        }
        Some("bench") => {
            // On a machine with cargo, a GPU and PyTorch: build the bundle and run its benchmark.
            let out = root.join("device-bundle");
            device_bundle(&root, &out)?;
            run(Command::new(out.join("bench.sh")).args(&args[1..]).current_dir(&out))
        }
        _ => bail!("usage: cargo xtask fixtures [--smollm2 GGUF] | device-bundle [--out DIR] | bench [OUT_DIR] [SMOLLM2_GGUF]"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn fixtures(root: &Path, extra: &[String]) -> Result<()> {
    run(Command::new("python3")
        .arg(root.join("scripts/make_fixtures.py"))
        .arg("--out")
        .arg(root.join("tests/fixtures"))
        .args(extra)
        .current_dir(root))?;
    run(Command::new("python3")
        .arg(root.join("scripts/make_tokenizer_fixtures.py"))
        .current_dir(root))?;
    run(Command::new("python3")
        .arg(root.join("scripts/make_gguf_fixtures.py"))
        .current_dir(root))
}

fn device_bundle(root: &Path, out: &Path) -> Result<()> {
    run(Command::new("cargo")
        .args(["build", "--release", "-p", "braid-cli"])
        .current_dir(root))?;
    let output = Command::new("cargo")
        .args([
            "test",
            "--release",
            "--workspace",
            "--no-run",
            "--message-format=json",
            "--test",
            "cuda_*",
        ])
        .current_dir(root)
        .output()
        .context("cannot run cargo test --no-run")?;
    if !output.status.success() {
        bail!(
            "building the test binaries failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true {
            // The GPU suites (`cuda_*`); the CPU suites run in CI already.
            let gpu_suite = msg["target"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("cuda_"));
            if let (true, Some(exe)) = (gpu_suite, msg["executable"].as_str()) {
                tests.push(PathBuf::from(exe));
            }
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    let bin = out.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(root.join("target/release/braid"), bin.join("braid"))?;
    let mut names = Vec::new();
    for exe in &tests {
        let name = exe
            .file_name()
            .context("test binary without a name")?
            .to_string_lossy()
            .into_owned();
        std::fs::copy(exe, bin.join(&name))?;
        names.push(name);
    }
    // Symbols are not needed to run; dropping them keeps the bundle within one transfer.
    for entry in std::fs::read_dir(&bin)? {
        let path = entry?.path();
        if let Err(e) = Command::new("strip").arg(&path).status() {
            eprintln!("not stripping {}: {e}", path.display());
            break;
        }
    }
    copy_dir(&root.join("tests/fixtures"), &out.join("fixtures"))?;
    let scripts = out.join("scripts");
    std::fs::create_dir_all(&scripts)?;
    for name in [
        "make_bench_model.py",
        "bench_torch.py",
        "bench_report.py",
        "ncu_step.py",
        "bench_llama_cpp.sh",
        "llama_cpp_gguf.py",
    ] {
        std::fs::copy(root.join("scripts").join(name), scripts.join(name))?;
    }
    write_executable(&out.join("bench.sh"), BENCH_SH)?;
    write_executable(&out.join("profile.sh"), PROFILE_SH)?;
    let script = format!(
        r#"#!/usr/bin/env bash
# Runs Braid's tests and a generation on this machine. Usage: ./run.sh [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
set -uo pipefail
cd "$(dirname "$0")"
export BRAID_FIXTURES="$PWD/fixtures"
failed=0
for t in {tests}; do
    echo "=== $t"
    ./bin/$t --test-threads=4 || failed=1
done
if [ -n "${{1:-}}" ]; then
    echo "=== braid generate on $1"
    ./bin/braid generate --model "$1" --prompt "The capital of France is" --raw --temperature 0 --max-tokens 16 || failed=1
fi
exit $failed
"#,
        tests = names.join(" ")
    );
    write_executable(&out.join("run.sh"), &script)?;
    let size = dir_size(out)?;
    eprintln!(
        "device bundle: {} ({:.1} MiB, {} test binaries)",
        out.display(),
        size as f64 / (1 << 20) as f64,
        names.len()
    );
    if size > 64 << 20 {
        bail!(
            "the bundle is {:.1} MiB, over the 64 MiB a transfer may carry",
            size as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

/// The benchmark, run on the GPU machine from inside the bundle: Braid and PyTorch on the same
/// random-weight Qwen3-0.6B-shaped model, then one table; with a llama.cpp source tarball (made by
/// `scripts/bench_llama_cpp.sh --pack`), llama.cpp too.
/// Usage: ./bench.sh [OUT_DIR] [SMOLLM2_GGUF] [LLAMA_CPP_TARBALL]
const BENCH_SH: &str = r#"#!/usr/bin/env bash
set -euo pipefail
# The tarball may be named relative to the caller's folder; everything else runs from the bundle's.
llama="${3:+$(realpath "$3")}"
cd "$(dirname "$0")"
out="${1:-bench-out}"
smol="${2:-}"
mkdir -p "$out"
model=/tmp/braid-bench-qwen3-0.6b
date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
[ -f "$model/model.safetensors" ] || python3 scripts/make_bench_model.py --out "$model"
./bin/braid bench --model "$model" --device cuda --date "$date" --json "$out/braid.json"
if [ -n "$smol" ]; then
    ./bin/braid bench --model "$smol" --device cuda --batch 1 --ttft 512 --date "$date" --json "$out/braid-smollm2.json"
fi
python3 scripts/bench_torch.py --model "$model" --out "$out/torch.json"
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
braid = json.loads((out / "braid.json").read_text())
smol = out / "braid-smollm2.json"
if smol.exists():
    braid["smollm2_decode_tok_s"] = json.loads(smol.read_text())["decode_tok_s"]["1"]
(out / "braid.json").write_text(json.dumps(braid, indent=2))
PY
report=(--torch "$out/torch.json" --braid "$out/braid.json" --out "$out/merged.json")
if [ -n "$llama" ]; then
    # llama.cpp is built here from source (about 4 minutes); a failure leaves its columns empty.
    bash scripts/bench_llama_cpp.sh "$model" "$out" "$llama" || echo "the llama.cpp run failed; see $out/llama_cpp.log"
    report+=(--llama-cpp "$out/llama_cpp.json")
fi
python3 scripts/bench_report.py "${report[@]}"
"#;

/// Whole-step kernel profiles, run on the GPU machine from inside the bundle: Nsight Compute times
/// every kernel of short benchmark runs (batch 1, batch 64, and the shared-prefix workload with
/// cascade attention), then `ncu_step.py` prints one decode step of each. Caches are not flushed
/// between kernels, so L2 reuse across kernels shows as it does without the profiler.
/// Usage: ./profile.sh [OUT_DIR]
const PROFILE_SH: &str = r#"#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-profile-out}"
mkdir -p "$out"
model=/tmp/braid-bench-qwen3-0.6b
[ -f "$model/model.safetensors" ] || python3 scripts/make_bench_model.py --out "$model"
ncu_run() {
    local name="$1"; shift
    ncu --csv --page raw --metrics gpu__time_duration.sum --print-units base \
        --clock-control none --cache-control none --log-file "$out/$name.csv" \
        ./bin/braid bench --model "$model" --device cuda --ttft 16 --turns 0 "$@" > /dev/null
}
ncu_run batch1 --batch 1 --new-tokens 4 --shared-prefix 0
ncu_run batch64 --batch 64 --new-tokens 4 --shared-prefix 0
ncu_run cascade --batch 1 --new-tokens 2 --shared-runs cascade --shared-new-tokens 4
python3 scripts/ncu_step.py "$out/batch1.csv" --containing paged_attention_decode --first \
    --title "batch 1 decode step" --json "$out/batch1.json"
python3 scripts/ncu_step.py "$out/batch64.csv" --containing paged_attention_decode --first \
    --title "batch 64 decode step" --json "$out/batch64.json"
python3 scripts/ncu_step.py "$out/cascade.csv" --containing cascade --first \
    --title "64 x 4096 shared-prefix decode step (cascade)" --json "$out/cascade.json"
"#;

fn write_executable(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            dir_size(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}
