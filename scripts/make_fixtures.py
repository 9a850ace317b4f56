#!/usr/bin/env python3
"""Makes Braid's reference fixtures with Hugging Face transformers.

Everything under tests/fixtures/ comes from this one script, so the expectations our Rust tests
check against are transformers' numbers, never our own:

* tokenizer/    a small byte-level BPE tokenizer trained on the corpus below, with a ChatML template,
                and transformers' ids for a set of awkward strings;
* models/<name> tiny random models of each supported family, saved with `save_pretrained`, each with
                an expected.json of float32 reference logits and greedy tokens;
* models/llama-gguf*  the `llama` model converted to GGUF the way llama.cpp's converter does it, with
                the logits transformers computes from that GGUF;
* smollm2/      (only with --smollm2 PATH) greedy tokens, top logits and tokenizer ids of the real
                SmolLM2-135M-Instruct Q4_1 GGUF as transformers reads it.

Run it where torch, transformers and gguf are installed:

    python3 scripts/make_fixtures.py --out tests/fixtures
    python3 scripts/make_fixtures.py --out tests/fixtures --skip-tiny --smollm2 SmolLM2-135M-Instruct.Q4_1.gguf

Seeds are fixed and every file is rewritten, so a rerun with the same library versions reproduces
the same bytes. `--tokenizer-only` needs neither torch nor transformers' models: it rebuilds the
tokenizer fixture alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# Constants shared by every fixture.

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Ids follow from SPECIAL_TOKENS being the first tokens the trainer places.
BOS_ID, EOS_ID, PAD_ID = 0, 2, 0

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's split: case-insensitive contractions, letters with one leading non-letter, single digits,
# punctuation runs, newline runs, other whitespace.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

GREEDY_TOKENS = 24

PROMPTS = [
    "The little robot walked to the river and looked at the water.",
    "Once upon a time, a curious cat",
    "The café had 42 cups ☕.",
]
CHAT_MESSAGE = "What does the little robot see at the river?"

# The tokenizer is trained on this text alone, so it must stay byte-for-byte fixed.
CORPUS = """\
The little robot lived in a small house near the river. Every morning it walked to the water and
looked at the light on the waves. The river was quiet, and the robot liked the quiet.
Once upon a time, a curious cat found a box in the garden. The cat sat in the box and looked at the
sky. The sky was blue, and the clouds moved slowly over the hills.
The robot and the cat became friends. They walked together along the river, and the robot told the
cat about numbers: one, two, three, four, five, six, seven, eight, nine and ten.
In the evening the town was calm. People came home, cooked dinner and talked about the day.
Children played in the street until the lights came on, and then they ran inside.
A good engine reads the model, loads the weights and runs the layers one after another.
Each layer has attention and a small network; the attention looks back at the tokens before it.
The cache keeps the keys and values, so the next token is cheap to compute.
When the answer is ready, the engine sends the text back to the user, one piece at a time.
user: What is the capital of the country by the sea?
assistant: The capital is the old town by the harbour, where the ships come in.
user: Can you count to five?
assistant: Yes. One, two, three, four, five.
fn main() { let x = 42; println!("{}", x + 1); }
def add(a, b):
    return a + b
The year 2024 had 366 days, and the clock showed 12:30 when the train left.
There are 7 days in a week, 24 hours in a day and 60 minutes in an hour.
She said: "It's late, we'll go home now." He answered: "I'm not tired, you're right though."
The market sold apples, pears, bread, cheese and fresh fish from the morning boats.
Over the years the robot learned many words, and the cat learned to open the garden door.
They still walk to the river every morning, and they still look at the water together.
"""

# Strings whose tokenization is easy to get wrong: digits, whitespace runs, non-ASCII, code.
TOKENIZER_PROBES = [
    "Hello world",
    "The capital of France is",
    "2024 and 1234567",
    "3.14159 and -42",
    "  two leading spaces",
    "trailing spaces   ",
    "many     spaces   between",
    "tabs\tand\nnewlines\n\nand blank lines\n",
    "\n",
    "   ",
    "I'm sure you're right, we'll see; they've gone, it's done, I'd go.",
    "Unicode: café, naïve, Zürich, Ελληνικά, русский, 日本語, 中文",
    "emoji 🦀🚀👍🏽 and a family 👨‍👩‍👧",
    "fn main() {\n    println!(\"hi {}\", 1 + 2);\n}",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "CamelCaseIdentifier and snake_case_name",
    "https://example.com/path?query=1&b=two",
    "...!!!???---",
    "mixed 中文 and English words",
]


# ---------------------------------------------------------------------------------------------
# JSON output: structure indented, lists of numbers on one line, floats as the shortest text
# that parses back to the same float32.


def f32(value) -> float:
    """The float32 value as the shortest decimal that round-trips through float32."""
    v = np.float32(value)
    if not np.isfinite(v):
        raise ValueError(f"non-finite value {v!r} cannot be written to a fixture")
    return float(str(v))


def _encode(obj, indent: int) -> str:
    pad = " " * indent
    inner = " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {_encode(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, (int, float, bool)) or x is None for x in obj):
            return "[" + ",".join(json.dumps(x) for x in obj) + "]"
        if all(isinstance(x, str) for x in obj) and sum(len(x) for x in obj) < 2000:
            return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in obj) + "]"
        items = [inner + _encode(x, indent + 1) for x in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value {obj!r} cannot be written to a fixture")
    return json.dumps(obj, ensure_ascii=False)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_encode(obj, 0) + "\n", encoding="utf-8")


def log(message: str) -> None:
    print(f"[make_fixtures] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def build_tokenizer(out_dir: Path) -> Path:
    """Trains the shared byte-level BPE tokenizer and writes tokenizer.json + tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Exactly the Qwen2 pipeline: transformers rebuilds it for any `qwen2` model directory whatever
    # tokenizer.json says, so only this choice gives every fixture directory the same ids.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError(
            f"trained tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, expected {VOCAB_SIZE}"
        )
    for index, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != index:
            raise RuntimeError(f"special token {token} has id {tok.token_to_id(token)}, expected {index}")

    tok_dir = out_dir / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    # Pretty JSON keeps the committed file reviewable; key order is the library's own.
    tokenizer_json = json.loads(tok.to_str())
    (tok_dir / "tokenizer.json").write_text(
        json.dumps(tokenizer_json, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    tokenizer_config = {
        # TokenizersBackend reads tokenizer.json as it is; a model-specific class (LlamaTokenizer, ...)
        # would rebuild the pipeline with its own pre-tokenizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128,
        "chat_template": CHATML_TEMPLATE,
    }
    write_json(tok_dir / "tokenizer_config.json", tokenizer_config)
    return tok_dir


def tokenizer_probe_records(tok) -> list[dict]:
    """transformers' ids, token strings and decode round trip for every probe string."""
    records = []
    for text in TOKENIZER_PROBES:
        ids = tok(text)["input_ids"]
        records.append(
            {
                "text": text,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids),
            }
        )
    return records


def render_chat(tok, messages: list[dict]) -> tuple[str, list[int]]:
    """The chat-templated prompt as text and as the ids transformers feeds the model."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return text, list(encoded["input_ids"])


def write_tokenizer_expectations(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    messages = [{"role": "user", "content": CHAT_MESSAGE}]
    chat_text, chat_ids = render_chat(tok, messages)
    expected = {
        "vocab_size": len(tok),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tokenizer_class": type(tok).__name__,
        "probes": tokenizer_probe_records(tok),
        "prompts": [{"text": p, "ids": tok(p)["input_ids"]} for p in PROMPTS],
        "chat": {"messages": messages, "text": chat_text, "ids": chat_ids},
    }
    for record in expected["prompts"]:
        if not 10 <= len(record["ids"]) <= 24:
            raise RuntimeError(f"prompt {record['text']!r} has {len(record['ids'])} tokens, expected 10 to 24")
    write_json(tok_dir / "expected.json", expected)
    lengths = [len(r["ids"]) for r in expected["prompts"]]
    log(f"tokenizer: {len(tok)} tokens, prompt lengths {lengths}, chat {len(chat_ids)}")


# ---------------------------------------------------------------------------------------------
# Tiny models.

BASE_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    # Much larger than a real model's 0.02 so that logits spread out and greedy choices have margins.
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    tie_word_embeddings=False,
)


def model_specs() -> list[dict]:
    """One entry per tiny model; `seed` fixes the weights, so entries sharing a seed share weights."""
    return [
        dict(name="llama", family="llama", seed=11, dtype="float32",
             config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        dict(name="llama-bf16", family="llama", seed=11, dtype="bfloat16",
             config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        dict(name="llama-sharded", family="llama", seed=11, dtype="float32", max_shard_size="200KB",
             config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        # theta 10000 with head_dim 16 puts one frequency in each llama3 band: kept, smoothed, divided.
        dict(name="llama3-rope", family="llama", seed=12, dtype="float32", legacy_rope_keys=True,
             config=dict(tie_word_embeddings=True, max_position_embeddings=256,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32})),
        dict(name="mistral-sliding", family="mistral", seed=13, dtype="float32", legacy_rope_keys=True,
             config=dict(sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="qwen2", family="qwen2", seed=14, dtype="float32",
             config=dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="qwen2-bf16", family="qwen2", seed=14, dtype="bfloat16",
             config=dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        # head_dim 32 with hidden 64 and 4 heads: attention width 128 differs from the hidden size.
        dict(name="qwen3", family="qwen3", seed=15, dtype="float32",
             config=dict(head_dim=32, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    ]


def make_config(spec: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    kwargs = dict(BASE_CONFIG)
    kwargs.update(spec["config"])
    config = classes[spec["family"]](**kwargs)
    config.architectures = [
        {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM"}[spec["family"]]
    ]
    return config


def build_model(spec: dict):
    """Random model for `spec`, with norm weights and biases moved off their 1/0 initial values."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(make_config(spec), attn_implementation="eager")
    # Norm weights of exactly 1 and biases of exactly 0 would let a loader that drops them pass.
    generator = torch.Generator().manual_seed(spec["seed"] + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def rewrite_rope_keys_legacy(config_path: Path) -> None:
    """Rewrites `rope_parameters` as top-level `rope_theta` + `rope_scaling`, the form most published
    checkpoints carry, so the fixtures cover both spellings."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_tokenizer(tok_dir: Path, model_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, model_dir / name)


def safetensors_dtypes(model_dir: Path) -> list[str]:
    """The distinct tensor dtypes stored in a model directory's safetensors files."""
    dtypes = set()
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
        dtypes.update(v["dtype"] for k, v in header.items() if k != "__metadata__")
    return sorted(dtypes)


def reference_record(model, input_ids: list[int], new_tokens: int) -> dict:
    """Last-position logits, greedy continuation and per-step top-2 margins, all in float32.

    The greedy run goes through `generate` (with its KV cache); a second, cache-free forward over the
    whole sequence re-derives every step, and the record says whether the two agree.
    """
    import torch

    ids = torch.tensor([input_ids], dtype=torch.long)
    with torch.no_grad():
        prefill = model(input_ids=ids, use_cache=False).logits[0, -1].float()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
        )
        generated = out.sequences[0, len(input_ids):].tolist()
        if len(generated) != new_tokens:
            raise RuntimeError(f"generate returned {len(generated)} tokens, expected {new_tokens}")
        step_logits = torch.stack([step[0] for step in out.logits]).float()
        full = torch.tensor([input_ids + generated[:-1]], dtype=torch.long)
        no_cache = model(input_ids=full, use_cache=False).logits[0, len(input_ids) - 1:].float()

    top2 = step_logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    greedy_is_argmax = step_logits.argmax(-1).tolist() == generated
    no_cache_agrees = no_cache.argmax(-1).tolist() == generated
    cache_diff = float((no_cache - step_logits).abs().max())
    if not greedy_is_argmax:
        log("  WARNING: generate picked a token that is not the argmax of its raw logits")
    if not no_cache_agrees:
        log(f"  WARNING: cache-free forward disagrees with generate (max |diff| {cache_diff:.3g})")
    return {
        "input_ids": list(input_ids),
        "last_logits": [f32(v) for v in prefill.tolist()],
        "greedy_ids": generated,
        "greedy_margins": [f32(v) for v in margins],
        "min_greedy_margin": f32(min(margins)),
        "checks": {
            "greedy_is_argmax_of_raw_logits": greedy_is_argmax,
            "cache_free_forward_agrees": no_cache_agrees,
            "max_abs_diff_cached_vs_cache_free": f32(cache_diff),
            "max_abs_diff_prefill_vs_first_step": f32(float((prefill - step_logits[0]).abs().max())),
        },
    }


def expectations(model, tok, name: str, architecture: str, weights_dtype: str, extra: dict | None = None) -> dict:
    """expected.json content: three raw prompts and one chat-templated prompt."""
    # EOS must not end or bend generation: greedy ids are then the plain argmax at every step.
    model.generation_config.eos_token_id = None
    prompts = []
    for text in PROMPTS:
        input_ids = tok(text)["input_ids"]
        record = {"text": text}
        record.update(reference_record(model, input_ids, GREEDY_TOKENS))
        record["greedy_text"] = tok.decode(record["greedy_ids"])
        prompts.append(record)
    messages = [{"role": "user", "content": CHAT_MESSAGE}]
    chat_text, chat_ids = render_chat(tok, messages)
    chat = {"messages": messages, "text": chat_text}
    chat.update(reference_record(model, chat_ids, GREEDY_TOKENS))
    chat["greedy_text"] = tok.decode(chat["greedy_ids"])
    result = {
        "name": name,
        "architecture": architecture,
        "weights_dtype": weights_dtype,
        "compute_dtype": "float32",
        "greedy_tokens": GREEDY_TOKENS,
        "versions": library_versions(),
        "prompts": prompts,
        "chat": chat,
    }
    if extra:
        result.update(extra)
    return result


def library_versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "tokenizers": tokenizers.__version__}


def load_reference_model(model_dir: Path, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager", **kwargs)
    return model.float().eval() if next(model.parameters()).dtype != torch.float32 else model.eval()


def make_tiny_model(spec: dict, tok_dir: Path, models_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    name = spec["name"]
    model_dir = models_dir / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model = build_model(spec)
    save_kwargs = {}
    if "max_shard_size" in spec:
        save_kwargs["max_shard_size"] = spec["max_shard_size"]
    if spec["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(model_dir), **save_kwargs)
    if spec.get("legacy_rope_keys"):
        rewrite_rope_keys_legacy(model_dir / "config.json")
    copy_tokenizer(tok_dir, model_dir)
    if "max_shard_size" in spec and not (model_dir / "model.safetensors.index.json").exists():
        raise RuntimeError(f"{name}: save_pretrained wrote no shard index")

    # The reference comes from the saved files, so it checks what was written, not what was in memory.
    stored = safetensors_dtypes(model_dir)
    load_dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    reference = load_reference_model(model_dir, dtype=load_dtype)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    expected = expectations(
        reference,
        tok,
        name,
        reference.config.architectures[0],
        spec["dtype"],
        extra={"stored_dtypes": stored, "shards": len(list(model_dir.glob("*.safetensors")))},
    )
    write_json(model_dir / "expected.json", expected)
    margins = [p["min_greedy_margin"] for p in expected["prompts"]] + [expected["chat"]["min_greedy_margin"]]
    log(f"{name}: stored {stored}, min margins {margins}, greedy[0] {expected['prompts'][0]['greedy_ids'][:8]}...")


# ---------------------------------------------------------------------------------------------
# GGUF conversion of the tiny llama, mirroring llama.cpp's convert_hf_to_gguf.py for LLaMA.


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Q/K: its RoPE rotates adjacent pairs, HF's rotates halves."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def load_safetensors_dir(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def write_llama_gguf(model_dir: Path, tok_dir: Path, out_path: Path, weight_type: str) -> dict:
    """Converts a float32 HF llama directory to GGUF; 2-D weights as `weight_type` (F16 or Q8_0),
    1-D norm weights as F32. Returns the tensor types written, by GGUF name."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{model_dir}: the GGUF writer covers plain RoPE only, found {rope.get('rope_type')}")
    n_head = config["num_attention_heads"]
    n_head_kv = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    tensors = load_safetensors_dir(model_dir)
    for name, value in tensors.items():
        if value.dtype != np.float32:
            raise ValueError(f"{model_dir}: tensor {name} is {value.dtype}, the GGUF writer expects float32")

    tokenizer_json = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = dict(tokenizer_json["model"]["vocab"])
    special_ids = set()
    for added in tokenizer_json["added_tokens"]:
        vocab[added["content"]] = added["id"]
        if added["special"]:
            special_ids.add(added["id"])
    by_id = {index: token for token, index in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("tokenizer ids are not contiguous from 0")
    tokens = [by_id[i] for i in range(len(by_id))]
    token_types = [
        int(gguf.TokenType.CONTROL) if i in special_ids else int(gguf.TokenType.NORMAL) for i in range(len(tokens))
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]

    file_type = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[weight_type]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name("Braid Tiny Llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope_theta)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tokenizer_config["bos_token"]])
    writer.add_eos_token_id(vocab[tokenizer_config["eos_token"]])
    writer.add_pad_token_id(vocab[tokenizer_config["pad_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer_config["chat_template"])

    renames = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    ordered: list[tuple[str, np.ndarray]] = [("token_embd.weight", tensors["model.embed_tokens.weight"])]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for hf_name, gguf_name in renames.items():
            value = tensors[f"{prefix}{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                value = permute_qk(value, n_head)
            elif hf_name == "self_attn.k_proj":
                value = permute_qk(value, n_head_kv)
            ordered.append((f"blk.{layer}.{gguf_name}.weight", value))
    ordered.append(("output_norm.weight", tensors["model.norm.weight"]))
    if "lm_head.weight" in tensors:
        ordered.append(("output.weight", tensors["lm_head.weight"]))

    types = {}
    for name, value in ordered:
        value = np.ascontiguousarray(value)
        if value.ndim == 1:
            writer.add_tensor(name, value.astype(np.float32))
            types[name] = "F32"
        elif weight_type == "F16":
            writer.add_tensor(name, value.astype(np.float16))
            types[name] = "F16"
        else:
            packed = gguf.quants.quantize(value.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            types[name] = "Q8_0"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def make_gguf_fixture(name: str, weight_type: str, tok_dir: Path, models_dir: Path, hf_tokenizer_ids: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = models_dir / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    gguf_path = out_dir / "model.gguf"
    types = write_llama_gguf(models_dir / "llama", tok_dir, gguf_path, weight_type)

    # Load from a directory that holds the GGUF alone, so nothing but the GGUF can feed transformers.
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copyfile(gguf_path, Path(scratch) / "model.gguf")
        model = AutoModelForCausalLM.from_pretrained(
            scratch, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager"
        ).eval()
        tok = AutoTokenizer.from_pretrained(scratch, gguf_file="model.gguf")
        backend = json.loads(tok.backend_tokenizer.to_str())
        gguf_ids = {p: tok(p)["input_ids"] for p in PROMPTS}
        extra = {
            "source": "models/llama converted with the llama.cpp LLaMA conversion (Q/K rows permuted)",
            "gguf_tensor_types": types,
            "transformers_tokenizer": {
                "class": type(tok).__name__,
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "ids_match_hf_tokenizer": all(gguf_ids[p] == hf_tokenizer_ids[p] for p in PROMPTS),
            },
        }
        expected = expectations(model, tok, name, "LlamaForCausalLM", f"{weight_type} (1-D norms F32)", extra)
    (out_dir / "transformers_tokenizer.json").write_text(
        json.dumps(backend, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    write_json(out_dir / "expected.json", expected)
    margins = [p["min_greedy_margin"] for p in expected["prompts"]]
    matches = expected["transformers_tokenizer"]["ids_match_hf_tokenizer"]
    log(f"{name}: {weight_type}, tokenizer ids match HF: {matches}, min margins {margins}")


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct Q4_1, the default real model.

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_COMPLETION = "The capital of France is"
SMOLLM2_CHAT = "What is the capital of France?"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_smollm2_fixture(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_file(gguf_path)
    if digest != SMOLLM2_SHA256:
        raise ValueError(f"{gguf_path} has sha256 {digest}, expected {SMOLLM2_SHA256}")
    fixture_dir = out_dir / "smollm2"
    fixture_dir.mkdir(parents=True, exist_ok=True)
    folder, file_name = str(gguf_path.parent), gguf_path.name
    result: dict = {"model": file_name, "sha256": digest, "compute_dtype": "float32", "versions": library_versions()}
    errors = []

    started = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    backend = json.loads(tok.backend_tokenizer.to_str())
    (fixture_dir / "tokenizer.json").write_text(json.dumps(backend, ensure_ascii=False) + "\n", encoding="utf-8")
    result["tokenizer"] = {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "normalizer": backend.get("normalizer"),
        "pre_tokenizer": backend.get("pre_tokenizer"),
        "post_processor": backend.get("post_processor"),
        "decoder": backend.get("decoder"),
        "model_options": {k: v for k, v in backend["model"].items() if k not in ("vocab", "merges")},
    }
    result["tokenization"] = tokenizer_probe_records(tok)
    log(f"smollm2: tokenizer {type(tok).__name__} in {time.time() - started:.1f}s")

    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32).eval()
    config = model.config
    result["config"] = {
        "architecture": type(model).__name__,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": dict(config.rope_parameters or {}),
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }
    log(f"smollm2: model loaded in {time.time() - started:.1f}s")
    eos_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    model.generation_config.eos_token_id = None

    def first_eos(ids: list[int]) -> int | None:
        return next((i for i, t in enumerate(ids) if t in eos_ids), None)

    try:
        started = time.time()
        ids = tok(SMOLLM2_COMPLETION)["input_ids"]
        record = reference_record(model, ids, 32)
        logits = torch.tensor(record.pop("last_logits"))
        top = logits.topk(10)
        greedy = record.pop("greedy_ids")
        result["completion"] = {
            "text": SMOLLM2_COMPLETION,
            "input_ids": ids,
            "greedy_ids_16": greedy[:16],
            "greedy_text_16": tok.decode(greedy[:16]),
            "greedy_ids_32": greedy,
            "greedy_text_32": tok.decode(greedy),
            "first_eos_index": first_eos(greedy),
            "top10": [
                {"id": int(i), "token": tok.convert_ids_to_tokens(int(i)), "logit": f32(v)}
                for v, i in zip(top.values.tolist(), top.indices.tolist())
            ],
            **record,
        }
        log(f"smollm2: completion {result['completion']['greedy_text_32']!r} in {time.time() - started:.1f}s")
    except Exception as error:  # noqa: BLE001 - recorded, and the chat part still runs
        errors.append(f"completion: {error!r}")
        traceback.print_exc()

    try:
        messages = [{"role": "user", "content": SMOLLM2_CHAT}]
        chat_text, chat_ids = render_chat(tok, messages)
        record = reference_record(model, chat_ids, 16)
        record.pop("last_logits")
        greedy = record["greedy_ids"]
        result["chat"] = {
            "messages": messages,
            "text": chat_text,
            "chat_template": tok.chat_template,
            **record,
            "greedy_text": tok.decode(greedy),
            "first_eos_index": first_eos(greedy),
        }
        log(f"smollm2: chat {result['chat']['greedy_text']!r}")
    except Exception as error:  # noqa: BLE001
        errors.append(f"chat: {error!r}")
        traceback.print_exc()

    if errors:
        result["errors"] = errors
    write_json(fixture_dir / "expected.json", result)
    if errors:
        raise RuntimeError(f"smollm2 fixture is incomplete: {errors}")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="fixtures root folder")
    parser.add_argument("--tokenizer-only", action="store_true", help="rebuild the tokenizer fixture alone")
    parser.add_argument("--skip-tiny", action="store_true", help="leave the tiny model fixtures as they are")
    parser.add_argument("--only", default="", help="comma-separated tiny fixture names to rebuild")
    parser.add_argument("--smollm2", type=Path, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: library default)")
    args = parser.parse_args()

    out: Path = args.out
    tok_dir = build_tokenizer(out)
    log(f"tokenizer written to {tok_dir}")
    if args.tokenizer_only:
        write_tokenizer_expectations(tok_dir)
        return 0

    import torch

    # Reference numbers are computed on the CPU (nothing here moves a model to a GPU) in float32:
    # no TF32 and no GPU kernel choices can leak into them.
    if args.threads:
        torch.set_num_threads(args.threads)
    write_tokenizer_expectations(tok_dir)

    failures = []
    only = {name for name in args.only.split(",") if name}
    if not args.skip_tiny:
        models_dir = out / "models"
        for spec in model_specs():
            if only and spec["name"] not in only:
                continue
            try:
                make_tiny_model(spec, tok_dir, models_dir)
            except Exception as error:  # noqa: BLE001 - one broken family must not hide the others
                failures.append(f"{spec['name']}: {error!r}")
                traceback.print_exc()
        hf_ids = json.loads((tok_dir / "expected.json").read_text(encoding="utf-8"))["prompts"]
        hf_ids = {p["text"]: p["ids"] for p in hf_ids}
        for name, weight_type in (("llama-gguf", "F16"), ("llama-gguf-q8_0", "Q8_0")):
            if only and name not in only:
                continue
            try:
                make_gguf_fixture(name, weight_type, tok_dir, models_dir, hf_ids)
            except Exception as error:  # noqa: BLE001
                failures.append(f"{name}: {error!r}")
                traceback.print_exc()

    if args.smollm2 is not None:
        try:
            make_smollm2_fixture(args.smollm2, out)
        except Exception as error:  # noqa: BLE001
            failures.append(f"smollm2: {error!r}")
            traceback.print_exc()

    if failures:
        log("FAILED: " + "; ".join(failures))
        return 1
    log("all fixtures written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
