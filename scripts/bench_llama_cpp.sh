#!/usr/bin/env bash
# llama.cpp on the benchmark model: builds llama-bench and llama-batched-bench with CUDA, converts
# the model with llama.cpp's converter, runs the benchmark's workloads and writes llama_cpp.json
# with the keys `braid bench` uses, for scripts/bench_report.py --llama-cpp.
#
#   scripts/bench_llama_cpp.sh MODEL_DIR OUT_DIR LLAMA_TARBALL
#   scripts/bench_llama_cpp.sh --pack SDIST_DIR OUT.tar.xz
#
# MODEL_DIR is the folder scripts/make_bench_model.py writes. LLAMA_TARBALL is a trimmed llama.cpp
# source tree made by --pack from the llama-cpp-python source distribution, which vendors llama.cpp
# (SDIST_DIR is that distribution unpacked, e.g. llama_cpp_python-0.3.36/). Environment:
# LLAMA_CPP_WORK (build folder, default /tmp/braid-llama-cpp; a second run reuses its build),
# LLAMA_CUDA_ARCH (default 90a; "cpu" builds without CUDA, for checking the script on a machine
# without a GPU), PYTHON (default python3). Needs cmake, nvcc, a C++ compiler and, for the
# converter, python3 with torch, numpy, transformers and pyyaml; no network.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"

die() { echo "error: $*" >&2; exit 2; }

# The tarball keeps what CMake needs for the library, ggml's CPU and CUDA backends, common/, the
# tools tools/CMakeLists.txt adds unconditionally, and the converter with gguf-py. The server's web
# UI, models/, docs/, tests/, examples/ and the other GPU backends are most of the tree and unused.
pack() {
    local sdist="$1" out="$2"
    local src="$sdist/vendor/llama.cpp"
    [ -f "$src/CMakeLists.txt" ] || die "$sdist holds no vendor/llama.cpp/CMakeLists.txt; expected the llama-cpp-python source distribution unpacked."
    [ -f "$sdist/PKG-INFO" ] || die "$sdist holds no PKG-INFO; expected the llama-cpp-python source distribution unpacked."
    local version commit
    version="$(sed -n 's/^Version: //p' "$sdist/PKG-INFO" | head -n 1)"
    # The changelog names the llama.cpp commit each release vendors, newest first.
    commit="$(sed -n 's/.*llama\.cpp@\([0-9a-f]\{7,40\}\).*/\1/p' "$sdist/CHANGELOG.md" 2>/dev/null | head -n 1)"
    [ -n "$version" ] || die "$sdist/PKG-INFO names no Version."
    [ -n "$commit" ] || commit=unknown

    local stage
    stage="$(mktemp -d)"
    local dst="$stage/llama.cpp"
    mkdir -p "$dst/ggml/src" "$dst/tools"
    cp -a "$src/CMakeLists.txt" "$src/LICENSE" "$src/convert_hf_to_gguf.py" "$dst/"
    local d
    for d in cmake include src common vendor licenses conversion gguf-py; do
        [ -e "$src/$d" ] && cp -a "$src/$d" "$dst/"
    done
    rm -rf "$dst/gguf-py/tests" "$dst/gguf-py/examples"
    cp -a "$src/ggml/CMakeLists.txt" "$src/ggml/cmake" "$src/ggml/include" "$dst/ggml/"
    # ggml/src: the core files and the CPU and CUDA backends; the others are added only when enabled.
    local entry name
    for entry in "$src"/ggml/src/*; do
        name="$(basename "$entry")"
        case "$name" in
            ggml-cpu | ggml-cuda) cp -a "$entry" "$dst/ggml/src/" ;;
            ggml-*) [ -d "$entry" ] || cp -a "$entry" "$dst/ggml/src/" ;;
            *) cp -a "$entry" "$dst/ggml/src/" ;;
        esac
    done
    # tools/: the server, its CLI and web UI are built only with LLAMA_BUILD_SERVER, which stays off.
    for entry in "$src"/tools/*; do
        case "$(basename "$entry")" in
            ui | server | cli) ;;
            *) cp -a "$entry" "$dst/tools/" ;;
        esac
    done
    find "$dst" \( -name '.git*' -o -name '__pycache__' -o -name '*.pyc' \) -prune -exec rm -rf {} +
    printf 'llama.cpp commit %s, vendored in llama-cpp-python %s\n' "$commit" "$version" >"$dst/SOURCE_VERSION"
    mkdir -p "$(dirname "$out")"
    tar -C "$stage" -cf - llama.cpp | xz -9e -T0 >"$out"
    rm -rf "$stage"
    echo "packed llama.cpp $commit (llama-cpp-python $version) into $out ($(du -k "$out" | cut -f1) KiB)"
}

if [ "${1:-}" = "--pack" ]; then
    [ $# -eq 3 ] || die "usage: $0 --pack SDIST_DIR OUT.tar.xz"
    pack "$2" "$3"
    exit 0
fi

[ $# -eq 3 ] || die "usage: $0 MODEL_DIR OUT_DIR LLAMA_TARBALL (or --pack SDIST_DIR OUT.tar.xz)"
model="$1"
out="$2"
tarball="$3"
[ -f "$model/config.json" ] || die "the model folder $model holds no config.json; write it with scripts/make_bench_model.py --out $model."
[ -f "$tarball" ] || die "the llama.cpp tarball $tarball does not exist; make it with $0 --pack."
command -v cmake >/dev/null || die "cmake is not on PATH."

work="${LLAMA_CPP_WORK:-/tmp/braid-llama-cpp}"
arch="${LLAMA_CUDA_ARCH:-90a}"
if [ "$arch" = cpu ]; then
    backend=(-DGGML_CUDA=OFF)
else
    command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || die "nvcc is not on PATH and not in /usr/local/cuda/bin."
    command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
    backend=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch")
fi
mkdir -p "$out" "$work"
out="$(cd "$out" && pwd)"
log="$out/llama_cpp.log"
: >"$log"
note() { echo "== $*" | tee -a "$log"; }

src="$work/llama.cpp"
rm -rf "$src"
tar -C "$work" -xJf "$tarball"
[ -f "$src/CMakeLists.txt" ] || die "$tarball does not unpack to llama.cpp/CMakeLists.txt."
source_version="$(cat "$src/SOURCE_VERSION" 2>/dev/null || echo 'llama.cpp commit unknown')"
commit="$(sed -n 's/^llama\.cpp commit \([^ ,]*\).*/\1/p' "$src/SOURCE_VERSION" 2>/dev/null)"
note "source: $source_version"

# The conversion needs only the converter, not the build, so it runs while the build does.
gguf="$work/bench-model-bf16.gguf"
rm -f "$gguf"
note "convert $model to $gguf (alongside the build)"
"$python" "$here/llama_cpp_gguf.py" "$model" "$gguf" --llama-cpp "$src" >"$work/convert.log" 2>&1 &
convert_pid=$!

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
note "configure (CUDA architecture: $arch)"
start=$SECONDS
cmake -S "$src" -B "$work/build" ${generator[@]+"${generator[@]}"} \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    "${backend[@]}" -DGGML_NATIVE=OFF -DGGML_CCACHE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMIT="${commit:-unknown}" >>"$log" 2>&1 \
    || { tail -n 40 "$log"; wait "$convert_pid" || true; die "configuring llama.cpp failed; see $log."; }
note "build llama-bench and llama-batched-bench"
cmake --build "$work/build" --target llama-bench llama-batched-bench -j"$(nproc)" >>"$log" 2>&1 \
    || { tail -n 60 "$log"; wait "$convert_pid" || true; die "building llama.cpp failed; see $log."; }
build_s=$((SECONDS - start))
note "built in ${build_s} s"
bin="$work/build/bin"

wait "$convert_pid" \
    || { tail -n 30 "$work/convert.log" | tee -a "$log"; die "converting $model to GGUF failed; see $log."; }
tail -n 1 "$work/convert.log" | tee -a "$log"

# Each command's stdout is its machine-readable result; a failed one leaves its result empty and is
# recorded under "errors" rather than stopping the rest.
# The batched run needs 256 sequences of 128 + 128 tokens; each sequence gets n_ctx / 256 cells.
# Batch 1 runs twice and the second run counts: the first is the first timed decode of the process
# and also pays for whatever the 16-token warm-up left cold.
ctx=$((256 * 512))
cmd_tg=("$bin/llama-bench" -m "$gguf" -p 0 -n 128 -fa 1 -ngl 99 -o json -oe md)
cmd_pp=("$bin/llama-bench" -m "$gguf" -p 512,4096 -n 0 -fa 1 -ngl 99 -o json -oe md)
cmd_bb=("$bin/llama-batched-bench" -m "$gguf" -c "$ctx" -npp 128 -ntg 128 -npl 1,1,8,64,256 -fa on -ngl 99 --output-format jsonl)
run() {
    local name="$1"; shift
    note "$name: ${*#"$bin/"}"
    "$@" >"$work/$name.out" 2>>"$log" || echo "exit status $?" >"$work/$name.failed"
    grep -v '^\s*$' "$work/$name.out" | tail -n 12 >>"$log" || true
}
rm -f "$work"/*.failed
run tg128 "${cmd_tg[@]}"
run prefill "${cmd_pp[@]}"
run batched "${cmd_bb[@]}"

gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
"$python" - "$work" "$out/llama_cpp.json" "$gpu" "$source_version" "${commit:-unknown}" "$build_s" "$gguf" "$arch" \
    "${cmd_tg[*]}" "${cmd_pp[*]}" "${cmd_bb[*]}" <<'PY'
import datetime, json, os, statistics, sys
from pathlib import Path

work, out, gpu, source, commit, build_s, gguf, arch = sys.argv[1:9]
cmd_tg, cmd_pp, cmd_bb = sys.argv[9:12]
work = Path(work)
bin_prefix = str(work / "build" / "bin") + "/"
result = {
    "engine": "llama.cpp",
    "gpu": gpu or None,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "llama_cpp": {"commit": commit, "source": source, "build_s": int(build_s), "cuda_architectures": arch},
    "model_file": {"format": "GGUF", "type": "bf16", "bytes": os.path.getsize(gguf)},
    "commands": {name: cmd.replace(bin_prefix, "").replace(gguf, "MODEL.gguf") for name, cmd in (("tg128", cmd_tg), ("prefill", cmd_pp), ("batched", cmd_bb))},
    "decode_tok_s": {},
    "ttft_ms": {},
    "prefill_tok_s": {},
    "errors": {},
}


def read(name):
    failed = work / f"{name}.failed"
    if failed.exists():
        result["errors"][name] = failed.read_text().strip()
    path = work / f"{name}.out"
    return path.read_text() if path.exists() else ""


def bench_rows(name):
    text = read(name)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        result["errors"].setdefault(name, "llama-bench printed no JSON")
        return []
    return rows if isinstance(rows, list) else []


for row in bench_rows("tg128"):
    if row.get("n_prompt") == 0 and row.get("n_gen") == 128:
        result["batch1_tg128_tok_s"] = row["avg_ts"]
        result["batch1_tg128_stddev_tok_s"] = row.get("stddev_ts")
        result["llama_cpp"]["build_commit_reported"] = row.get("build_commit")
        result["llama_cpp"]["backends"] = row.get("backends")
for row in bench_rows("prefill"):
    if row.get("n_gen") == 0 and row.get("n_prompt") in (512, 4096):
        key = str(row["n_prompt"])
        samples = row.get("samples_ns") or [row["avg_ns"]]
        # The median, as Braid's TTFT is: llama-bench's first repetition of a prompt length also
        # pays for that shape's first launch and would pull a mean up.
        median_ns = statistics.median(samples)
        result["ttft_ms"][key] = median_ns / 1e6
        result["prefill_tok_s"][key] = row["n_prompt"] / (median_ns / 1e9)
        result.setdefault("prefill_detail", {})[key] = {
            "mean_ms": row["avg_ns"] / 1e6,
            "samples_ms": [v / 1e6 for v in samples],
            "n_batch": row.get("n_batch"),
            "n_ubatch": row.get("n_ubatch"),
        }
batched = []
for line in read("batched").splitlines():
    line = line.strip()
    if line.startswith("{") and "speed_tg" in line:
        try:
            batched.append(json.loads(line))
        except json.JSONDecodeError:
            pass
for row in batched:
    # A later row for the same batch size replaces the earlier one: that one was the warm-up.
    result["decode_tok_s"][str(row["pl"])] = row["speed_tg"]
if batched:
    result["prompt_tokens"] = batched[-1]["pp"]
    result["new_tokens"] = batched[-1]["tg"]
    result["batched_detail"] = batched
elif "batched" not in result["errors"]:
    result["errors"]["batched"] = "llama-batched-bench printed no result line"
if not result["errors"]:
    del result["errors"]
Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("gpu", "batch1_tg128_tok_s", "decode_tok_s", "ttft_ms", "prefill_tok_s", "errors") if k in result}, indent=1))
PY
note "wrote $out/llama_cpp.json"
