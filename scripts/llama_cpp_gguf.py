#!/usr/bin/env python3
"""Converts the benchmark model to a bf16 GGUF with llama.cpp's own converter, for the llama.cpp column.

    python3 scripts/llama_cpp_gguf.py MODEL_DIR OUT.gguf --llama-cpp LLAMA_CPP_DIR

MODEL_DIR is the folder scripts/make_bench_model.py writes (safetensors in bf16, config.json, a
word-level tokenizer.json); LLAMA_CPP_DIR is a llama.cpp source tree holding convert_hf_to_gguf.py
and gguf-py/. Every tensor and hyperparameter goes through llama.cpp's converter untouched, so the
GGUF is what llama.cpp itself would make of this checkpoint. Only the vocabulary step is replaced:
the converter cannot read a word-level tokenizer.json, and the benchmark tools feed token ids, never
text. The GGUF therefore says `tokenizer.ggml.model = "none"` and carries the vocabulary size, from
which llama.cpp adds that many nameless tokens when it loads the model.

Needs what the converter needs: torch, numpy, transformers (for AutoConfig) and pyyaml.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import ModuleType

# The benchmark model's architecture, as its config.json names it.
ARCHITECTURE = "Qwen3ForCausalLM"


class ConversionError(Exception):
    """An input the conversion cannot use."""


def load_converter(llama_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Imports llama.cpp's convert_hf_to_gguf and the gguf package from the tree at llama_dir."""
    script = llama_dir / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ConversionError(f"{llama_dir} holds no convert_hf_to_gguf.py; expected a llama.cpp source tree.")
    if not (llama_dir / "gguf-py" / "gguf").is_dir():
        raise ConversionError(f"{llama_dir} holds no gguf-py/gguf; expected a llama.cpp source tree with its gguf-py.")
    # The tree's own gguf-py must win over any installed gguf: its writer knows the tree's keys.
    sys.path.insert(0, str(llama_dir / "gguf-py"))
    sys.path.insert(0, str(llama_dir))
    try:
        import convert_hf_to_gguf  # type: ignore[import-not-found]
        import gguf  # type: ignore[import-not-found]
    except ImportError as err:
        raise ConversionError(f"llama.cpp's converter could not be imported ({err}); it needs torch, numpy, transformers and pyyaml.") from err
    return convert_hf_to_gguf, gguf


def model_class(converter: ModuleType, architecture: str) -> type:
    """The converter's class for an architecture; newer trees keep the classes in a `conversion` package."""
    getter = getattr(converter, "get_model_class", None)
    if getter is not None:
        return getter(architecture)
    return converter.ModelBase.from_model_architecture(architecture)


def vocab_free_class(base: type, vocab_size: int) -> type:
    """A subclass of the converter's class whose vocabulary step writes no tokens, only their count."""

    def set_vocab(self) -> None:
        self.gguf_writer.add_tokenizer_model("none")
        self.gguf_writer.add_vocab_size(vocab_size)

    # The converter insists that every model class names its architecture in its own body.
    return type(f"{base.__name__}NoVocab", (base,), {"model_arch": base.model_arch, "set_vocab": set_vocab})


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as err:
        raise ConversionError(f"cannot read {path}: {err.strerror}.") from err
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}).") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{path} holds a {type(config).__name__}, expected a JSON object.")
    architectures = config.get("architectures")
    if architectures != [ARCHITECTURE]:
        raise ConversionError(f"{path} names the architectures {architectures!r}, expected [{ARCHITECTURE!r}].")
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ConversionError(f"{path} gives vocab_size {vocab_size!r}, expected a positive integer.")
    return config


def convert(model_dir: Path, out: Path, llama_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ConversionError(f"the model folder {model_dir} does not exist.")
    if not any(model_dir.glob("*.safetensors")):
        raise ConversionError(f"the model folder {model_dir} holds no .safetensors file.")
    config = read_config(model_dir)
    converter, gguf = load_converter(llama_dir)
    import torch

    cls = vocab_free_class(model_class(converter, ARCHITECTURE), config["vocab_size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            model = cls(model_dir, gguf.LlamaFileType.MOSTLY_BF16, out, model_name="braid-bench-qwen3-0.6b")
            model.write()
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as err:
        # The converter reports a checkpoint it cannot map with these; name the folder and its words.
        raise ConversionError(f"llama.cpp's converter failed on {model_dir}: {type(err).__name__}: {err}") from err
    elapsed = time.perf_counter() - start
    print(f"wrote {out} ({out.stat().st_size / 1e9:.3f} GB) in {elapsed:.1f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder written by scripts/make_bench_model.py")
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)")
    args = parser.parse_args()
    try:
        convert(args.model_dir, args.out, args.llama_cpp.resolve())
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
