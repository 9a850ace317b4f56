#!/usr/bin/env python3
"""Writes the benchmark model: a Hugging Face folder with random bf16 weights of the Qwen3-0.6B shape.

Speed does not depend on what the weights say, so random weights of the right shape measure the
same work as the real model without shipping 1.2 GB of checkpoint. Both sides of the benchmark
(`braid bench` and scripts/bench_torch.py) load this one folder, so they run the same numbers.

    python3 scripts/make_bench_model.py --out /tmp/qwen3-0.6b-random

The weights are seeded (torch.manual_seed(0)): linear and embedding weights are normal with std
0.02, every RMSNorm weight (q/k norms included) is 1. The model is built directly on the GPU when
one is present, which takes seconds instead of the minute a CPU initialisation of 0.6 B parameters
needs; without a GPU it is built on the CPU. The folder holds config.json, generation_config.json and
model.safetensors, and a word-level tokenizer.json naming every id (`<t123>`): the benchmark feeds
token ids, but a model folder without a tokenizer is not a model Braid will load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The Qwen3-0.6B shape. Braid's benchmark and scripts/bench_torch.py expect exactly these numbers.
QWEN3_0_6B_SHAPE = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=True,
    attention_bias=False,
    use_sliding_window=False,
    initializer_range=0.02,
    bos_token_id=151643,
    eos_token_id=151645,
    pad_token_id=151643,
)
INIT_STD = 0.02
SEED = 0


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id, so ids decode to readable text."""
    import json

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<t0>"},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen3Config(**QWEN3_0_6B_SHAPE, dtype="bfloat16")
    config.architectures = ["Qwen3ForCausalLM"]

    start = time.perf_counter()
    previous_dtype = torch.get_default_dtype()
    # Constructing in bf16 on the target device avoids a 2.4 GB f32 copy and a host-to-device move.
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous_dtype)

    # transformers' own initialisation differs between versions; writing every tensor ourselves
    # after one seed makes the weights a function of this script alone.
    torch.manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(mean=0.0, std=INIT_STD)
    model.eval()
    if device == "cuda":
        torch.cuda.synchronize()

    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_tokenizer(out, config.vocab_size)
    elapsed = time.perf_counter() - start

    n_params = sum(p.numel() for p in model.parameters())
    size = folder_size(out)
    print(f"model folder: {out}", flush=True)
    print(
        f"size: {size / 1e9:.3f} GB ({size} bytes), {n_params / 1e6:.1f} M parameters, "
        f"built on {device} in {elapsed:.1f} s",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the model into")
    args = parser.parse_args()
    try:
        build(args.out)
    except ImportError as err:
        print(f"error: this script needs torch and transformers ({err}).", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
