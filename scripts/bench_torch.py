#!/usr/bin/env python3
"""Measures the PyTorch baselines that Braid's benchmark is compared with, and writes them as JSON.

    PYTHONUNBUFFERED=1 python3 scripts/bench_torch.py --model DIR --out torch.json [--quick]

DIR is a Hugging Face Qwen3 folder, normally the random-weight model of scripts/make_bench_model.py.
The script measures, in this order, on the first CUDA device:

1. copy bandwidth: a device-to-device copy of 1 GiB, bytes read plus written, median of 20 runs
   timed with CUDA events; with the weights' size it gives the batch-1 physical limit
   (one full read of the weights per generated token);
2. transformers eager (`generate`, SDPA attention, dynamic KV cache, greedy, EOS ignored): decode
   tok/s at each batch size from the difference between a generate of N new tokens and one of 1
   new token (the prefill), and time to first token for 512- and 4096-token prompts at batch 1;
3. a compiled static-cache decoder in the style of gpt-fast, defined below: the KV cache lives in
   module buffers, the decode step is compiled with `mode="reduce-overhead", fullgraph=True` (one
   CUDA graph per step, greedy argmax inside the graph), the prefill is compiled without CUDA
   graphs and with dynamic shapes. It loads the same safetensors and is checked against
   transformers before it is timed;
4. the peak GPU memory of each of the two frameworks (the allocator's peak, reset between them).

Each measurement is guarded: a failure is printed with its traceback, recorded under "errors" in
the JSON, and the rest still runs. The JSON is rewritten after every section, so a run that is cut
short still leaves what it measured. The full run takes under three minutes on an H100, most of
it compiling; `--quick` (batch 1 and 64, fewer tokens) exists to shake out errors.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import struct
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PROMPT_LEN = 128
TTFT_LENGTHS = (512, 4096)
COMPILED_NEW_TOKENS = 512
EAGER_NEW_TOKENS = 128
FULL_BATCHES = (1, 8, 64, 256)
QUICK_BATCHES = (1, 64)
CHECK_TOKENS = 8
CHECK_REL_L2 = 2e-2
PROMPT_SEED = 1234
# Ids below Qwen's first special token, so prompts look like ordinary text to the model.
PROMPT_VOCAB = 151643
DEVICE = "cuda"

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


class Results:
    """The JSON being built; written to disk after every section."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data
        self.data.setdefault("errors", {})

    def guarded(self, name: str, fn, *args, **kwargs):
        """Runs one measurement; on failure records it and returns None so the run goes on."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - every failure is reported, none stops the run
            log(f"FAILED {name}: {type(err).__name__}: {err}")
            traceback.print_exc()
            sys.stderr.flush()
            self.data["errors"][name] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
            free_gpu()
            return None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def prompt_ids(batch: int, length: int) -> torch.Tensor:
    """Seeded random prompts: the same ids for every framework at a given (batch, length)."""
    gen = torch.Generator().manual_seed(PROMPT_SEED + 7919 * batch + length)
    return torch.randint(0, PROMPT_VOCAB, (batch, length), generator=gen).to(DEVICE)


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, value


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.float().flatten().cpu()
    e = expected.float().flatten().cpu()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def weight_bytes(model_dir: Path) -> int:
    """Bytes of tensor data in the folder's safetensors files, read from their headers."""
    total = 0
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {model_dir}; expected a model folder")
    for file in files:
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                total += end - start
    return total


# ---------------------------------------------------------------------------------------------
# 1. Copy bandwidth


def copy_bandwidth_gbs(runs: int = 20) -> float:
    n_bytes = 1 << 30
    src = torch.empty(n_bytes, dtype=torch.uint8, device=DEVICE)
    src.random_(0, 256)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times_ms = []
    for _ in range(runs):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    del src, dst
    free_gpu()
    return 2 * n_bytes / (statistics.median(times_ms) / 1e3) / 1e9


# ---------------------------------------------------------------------------------------------
# 2. transformers eager


def bench_eager(model_dir: Path, batches, new_tokens: int, ttft_reps: int, results: Results) -> dict:
    from transformers import AutoModelForCausalLM

    section = {"new_tokens": new_tokens, "decode_tok_s": {}, "ttft_ms": {}}
    results.data["frameworks"]["transformers_eager"] = section
    free_gpu()
    torch.cuda.reset_peak_memory_stats()

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to(DEVICE)
    model.eval()
    torch.cuda.synchronize()
    section["startup_s"] = round(time.perf_counter() - start, 3)
    log(f"transformers eager: loaded in {section['startup_s']:.1f} s")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(ids: torch.Tensor, n: int, **extra):
        with torch.inference_mode():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad_id,
                **extra,
            )

    def decode_at(batch: int) -> float:
        ids = prompt_ids(batch, PROMPT_LEN)
        generate(ids, 2)  # warm-up: kernels, allocator, generation set-up
        t_prefill = statistics.median(timed(lambda: generate(ids, 1))[0] for _ in range(3))
        t_full, out = timed(lambda: generate(ids, new_tokens))
        if out.shape != (batch, PROMPT_LEN + new_tokens):
            raise RuntimeError(
                f"generate returned shape {tuple(out.shape)}, expected {(batch, PROMPT_LEN + new_tokens)}"
            )
        # The first new token comes from the prefill; the other new_tokens - 1 from decode steps.
        rate = batch * (new_tokens - 1) / (t_full - t_prefill)
        log(
            f"transformers eager: batch {batch:3d}: {rate:10.1f} tok/s "
            f"(generate {new_tokens}: {t_full:.2f} s, prefill-only: {t_prefill * 1e3:.1f} ms)"
        )
        return rate

    for batch in batches:
        rate = results.guarded(f"transformers_eager.decode.{batch}", decode_at, batch)
        if rate is not None:
            section["decode_tok_s"][str(batch)] = round(rate, 2)
        free_gpu()
        results.save()

    def ttft_at(length: int) -> float:
        ids = prompt_ids(1, length)
        generate(ids, 1)
        times = [timed(lambda: generate(ids, 1))[0] for _ in range(ttft_reps)]
        ms = statistics.median(times) * 1e3
        log(f"transformers eager: TTFT {length:5d} tokens: {ms:8.2f} ms")
        return ms

    for length in TTFT_LENGTHS:
        ms = results.guarded(f"transformers_eager.ttft.{length}", ttft_at, length)
        if ms is not None:
            section["ttft_ms"][str(length)] = round(ms, 3)
        results.save()

    def reference() -> dict:
        """Greedy tokens and raw logits that the compiled decoder is checked against."""
        ids = prompt_ids(1, PROMPT_LEN)
        out = generate(ids, CHECK_TOKENS, output_logits=True, return_dict_in_generate=True)
        return {
            "prompt": ids.cpu(),
            "tokens": out.sequences[0, PROMPT_LEN:].cpu(),
            "logits": [step[0].float().cpu() for step in out.logits],
        }

    ref = results.guarded("transformers_eager.reference", reference)
    section["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    log(f"transformers eager: peak memory {section['peak_memory_gib']:.2f} GiB")
    # The model is freed when this returns; the next section's free_gpu() then releases its memory.
    return ref


# ---------------------------------------------------------------------------------------------
# 3. Compiled static-cache decoder


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same rounding as transformers: normalise in f32, round to the input dtype, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Qwen3Layer(nn.Module):
    def __init__(self, weights: dict, prefix: str, cfg: dict):
        super().__init__()
        self.cfg = cfg

        def param(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.contiguous(), requires_grad=False)

        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        # Fused projections: one GEMM for q, k and v, one for gate and up (as gpt-fast does).
        self.wqkv = param(
            torch.cat([weights[attn + f"{p}_proj.weight"] for p in ("q", "k", "v")], dim=0)
        )
        self.wo = param(weights[attn + "o_proj.weight"])
        self.w13 = param(torch.cat([weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]]))
        self.w2 = param(weights[mlp + "down_proj.weight"])
        self.q_norm = param(weights[attn + "q_norm.weight"])
        self.k_norm = param(weights[attn + "k_norm.weight"])
        self.attn_norm = param(weights[prefix + "input_layernorm.weight"])
        self.ffn_norm = param(weights[prefix + "post_attention_layernorm.weight"])
        self.register_buffer("k_cache", torch.empty(0), persistent=False)
        self.register_buffer("v_cache", torch.empty(0), persistent=False)

    def setup_cache(self, batch: int, max_seq: int) -> None:
        c = self.cfg
        shape = (batch, c["n_kv_heads"], max_seq, c["head_dim"])
        dtype, device = self.wo.dtype, self.wo.device
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x, cos, sin, input_pos, decode_mask):
        c = self.cfg
        bsz, seq, _ = x.shape
        n_q, n_kv, hd, eps = c["n_heads"], c["n_kv_heads"], c["head_dim"], c["eps"]

        h = rms_norm(x, self.attn_norm, eps)
        q, k, v = F.linear(h, self.wqkv).split([n_q * hd, n_kv * hd, n_kv * hd], dim=-1)
        q = rms_norm(q.view(bsz, seq, n_q, hd), self.q_norm, eps).transpose(1, 2)
        k = rms_norm(k.view(bsz, seq, n_kv, hd), self.k_norm, eps).transpose(1, 2)
        v = v.view(bsz, seq, n_kv, hd).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)

        if decode_mask is None:
            # Prefill from position 0: attention over the fresh k/v alone, causal, flash kernel.
            rep = n_q // n_kv
            attn = F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), is_causal=True
            )
            attn = attn.transpose(1, 2).reshape(bsz, seq, n_q * hd)
        else:
            # One query per sequence: group the query heads by their KV head so each cached K/V
            # row is read once (no repeat of the cache), and mask positions not yet written.
            qg = q.reshape(bsz, n_kv, n_q // n_kv, hd)
            scores = torch.matmul(qg, self.k_cache.transpose(2, 3)) * (hd**-0.5)
            scores = scores.float().masked_fill(~decode_mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            attn = torch.matmul(probs, self.v_cache).reshape(bsz, 1, n_q * hd)
        x = x + F.linear(attn, self.wo)

        h = rms_norm(x, self.ffn_norm, eps)
        gate, up = F.linear(h, self.w13).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w2)


class CompactQwen3(nn.Module):
    """A Qwen3 decoder with a static KV cache: the whole decode step is one fixed-shape graph."""

    def __init__(self, model_dir: Path, rope_table_len: int, device: str = "cuda"):
        super().__init__()
        from safetensors.torch import load_file

        raw = json.loads((model_dir / "config.json").read_text())
        rope = raw.get("rope_parameters") or {}
        cfg = {
            "n_layers": raw["num_hidden_layers"],
            "n_heads": raw["num_attention_heads"],
            "n_kv_heads": raw["num_key_value_heads"],
            "head_dim": raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            "eps": raw["rms_norm_eps"],
            "rope_theta": rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
        }
        self.cfg = cfg
        self.device = torch.device(device)
        # Loaded and fused on the host, then moved once: the GPU never holds two copies, so the
        # peak-memory figure is the decoder's own.
        weights: dict[str, torch.Tensor] = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            weights.update(load_file(str(file), device="cpu"))
        weights = {name: t.to(torch.bfloat16) for name, t in weights.items()}

        def param(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t, requires_grad=False)

        self.embed = param(weights["model.embed_tokens.weight"])
        self.tied = "lm_head.weight" not in weights
        if not self.tied:
            self.lm_head = param(weights["lm_head.weight"])
        self.norm = param(weights["model.norm.weight"])
        self.layers = nn.ModuleList(
            Qwen3Layer(weights, f"model.layers.{i}.", cfg) for i in range(cfg["n_layers"])
        )
        del weights
        self.to(self.device)

        # Angles in f32, tables rounded to bf16, as transformers does before applying them.
        hd = cfg["head_dim"]
        exponents = torch.arange(0, hd, 2, dtype=torch.int64, device=self.device).float() / hd
        inv_freq = 1.0 / (cfg["rope_theta"] ** exponents)
        pos = torch.arange(rope_table_len, device=self.device, dtype=torch.float32)
        angles = torch.outer(pos, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos().to(torch.bfloat16), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(torch.bfloat16), persistent=False)
        self.register_buffer("positions", torch.empty(0), persistent=False)
        self.max_seq = 0

    def head_weight(self) -> torch.Tensor:
        return self.embed if self.tied else self.lm_head

    def setup_caches(self, batch: int, max_seq: int) -> None:
        if max_seq > self.rope_cos.shape[0]:
            raise ValueError(f"cache of {max_seq} positions exceeds the rope table of {self.rope_cos.shape[0]}")
        for layer in self.layers:
            layer.setup_cache(batch, max_seq)
            # A CUDA graph may then write the cache in place instead of copying it in each step.
            torch._dynamo.mark_static_address(layer.k_cache)
            torch._dynamo.mark_static_address(layer.v_cache)
        self.positions = torch.arange(max_seq, device=self.device)
        self.max_seq = max_seq

    def _trunk(self, tokens, input_pos, decode_mask):
        x = F.embedding(tokens, self.embed)
        cos = self.rope_cos[input_pos]
        sin = self.rope_sin[input_pos]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, decode_mask)
        return x

    def prefill(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Fills the cache from position 0; returns the last position's logits [batch, vocab]."""
        x = self._trunk(tokens, input_pos, None)
        x = rms_norm(x[:, -1], self.norm, self.cfg["eps"])
        return F.linear(x, self.head_weight())

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor):
        """One step for tokens [batch, 1] at input_pos [1]: (next greedy tokens, logits)."""
        decode_mask = self.positions <= input_pos
        x = self._trunk(tokens, input_pos, decode_mask)
        logits = F.linear(rms_norm(x[:, -1], self.norm, self.cfg["eps"]), self.head_weight())
        return logits.argmax(dim=-1, keepdim=True), logits


@torch.no_grad()
def bench_compiled(
    model_dir: Path, batches, new_tokens: int, ttft_reps: int, reference, results: Results
) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    section = {
        "new_tokens": new_tokens,
        "decode_tok_s": {},
        "ttft_ms": {},
        "compile_detail_s": {},
        "graphs": "decode: one CUDA graph per batch size (batch 1 compiled static, larger batches "
        "share one compile with a dynamic batch dimension); prefill: compiled, dynamic length, "
        "no CUDA graphs",
    }
    results.data["frameworks"]["torch_compiled"] = section
    free_gpu()
    torch.cuda.reset_peak_memory_stats()
    torch._dynamo.config.cache_size_limit = 64
    # Lets the KV-cache buffers take a dynamic batch (decode) where they are marked so; nothing
    # unmarked turns dynamic, since shapes stay static by default.
    torch._dynamo.config.force_parameter_static_shapes = False
    # Prints why a graph recompiles or skips CUDA graphs, which would silently cost speed.
    torch._logging.set_logs(perf_hints=True, recompiles=True)

    decode_seq = PROMPT_LEN + new_tokens
    ttft_seq = max(TTFT_LENGTHS)
    start = time.perf_counter()
    model = CompactQwen3(model_dir, rope_table_len=max(ttft_seq, decode_seq), device=DEVICE)
    torch.cuda.synchronize()
    section["load_s"] = round(time.perf_counter() - start, 3)
    log(f"torch compiled: weights loaded in {section['load_s']:.1f} s")

    decode_step = torch.compile(model.decode, mode="reduce-overhead", fullgraph=True)
    compiled_prefill = torch.compile(model.prefill, fullgraph=True)

    def prefill(tokens, pos):
        # One compile for every prompt length (the cache size stays fixed while prefill runs).
        torch._dynamo.mark_dynamic(tokens, 1)
        torch._dynamo.mark_dynamic(pos, 0)
        return compiled_prefill(tokens, pos)
    check: dict = {"of_tokens": CHECK_TOKENS}
    section["check"] = check

    def step(tokens, pos):
        torch.compiler.cudagraph_mark_step_begin()
        nxt, logits = decode_step(tokens, pos)
        return nxt.clone(), logits

    def first_call(name: str, fn):
        """Times a call that compiles; its time is counted as compile time."""
        elapsed, value = timed(fn)
        section["compile_detail_s"][name] = round(elapsed, 2)
        log(f"torch compiled: {name}: first call (compile) {elapsed:.1f} s")
        return value

    # Prefill phase: one cache size for every prompt length, so the dynamic-length prefill
    # compiles once (a buffer of another size would recompile it).
    def check_prefill() -> None:
        if reference is None:
            raise RuntimeError("no transformers reference (its section failed), nothing to check")
        prompt = reference["prompt"].to(DEVICE)
        logits = first_call("prefill", lambda: prefill(prompt, torch.arange(PROMPT_LEN, device=DEVICE)))
        check["prefill_logits_rel_l2"] = round(rel_l2(logits[0], reference["logits"][0]), 6)
        log(f"torch compiled: CHECK prefill logits vs transformers: rel. L2 {check['prefill_logits_rel_l2']:.2e}")

    def ttft_at(length: int) -> float:
        ids = prompt_ids(1, length)
        pos = torch.arange(length, device=DEVICE)

        def once():
            return prefill(ids, pos).argmax(dim=-1)

        if "prefill" not in section["compile_detail_s"]:
            first_call("prefill", once)
        timed(once)
        times = [timed(once)[0] for _ in range(ttft_reps)]
        ms = statistics.median(times) * 1e3
        log(f"torch compiled: TTFT {length:5d} tokens: {ms:8.2f} ms")
        return ms

    def setup_prefill() -> bool:
        model.setup_caches(1, ttft_seq)
        return True

    if results.guarded("torch_compiled.setup_prefill", setup_prefill):
        results.guarded("torch_compiled.check.prefill", check_prefill)
        for length in TTFT_LENGTHS:
            ms = results.guarded(f"torch_compiled.ttft.{length}", ttft_at, length)
            if ms is not None:
                section["ttft_ms"][str(length)] = round(ms, 3)
        results.save()

    def check_decode() -> None:
        """Batch-1 decode against transformers, teacher-forced and free-running."""
        if reference is None:
            raise RuntimeError("no transformers reference (its section failed), nothing to check")
        prompt = reference["prompt"].to(DEVICE)
        prompt_pos = torch.arange(PROMPT_LEN, device=DEVICE)
        ref_tokens = reference["tokens"].tolist()

        # Teacher-forced: every step sees transformers' token, so each logit row is comparable.
        model.prefill(prompt, prompt_pos)
        errors = []
        pos = torch.tensor([PROMPT_LEN], device=DEVICE)
        for i in range(1, CHECK_TOKENS):
            tok = torch.tensor([[ref_tokens[i - 1]]], device=DEVICE)
            if i == 1:
                _, logits = first_call("decode_batch1", lambda: step(tok, pos))
            else:
                _, logits = step(tok, pos)
            errors.append(rel_l2(logits[0], reference["logits"][i]))
            pos += 1

        # Free-running greedy through the compiled decode graph.
        cur = model.prefill(prompt, prompt_pos).argmax(dim=-1, keepdim=True)
        ours = [int(cur)]
        pos = torch.tensor([PROMPT_LEN], device=DEVICE)
        for _ in range(CHECK_TOKENS - 1):
            cur, _ = step(cur, pos)
            ours.append(int(cur))
            pos += 1
        agree = 0
        for a, b in zip(ours, ref_tokens):
            if a != b:
                break
            agree += 1
        worst = max(errors + [check.get("prefill_logits_rel_l2", 0.0)])
        check["decode_logits_rel_l2_max"] = round(max(errors), 6)
        check["greedy_tokens_agree"] = agree
        check["passed"] = agree == CHECK_TOKENS or worst < CHECK_REL_L2
        log(
            f"torch compiled: CHECK vs transformers eager: greedy tokens agree {agree}/{CHECK_TOKENS}; "
            f"teacher-forced decode logits rel. L2 "
            + ", ".join(f"{e:.1e}" for e in errors)
            + f" -> {'PASS' if check['passed'] else 'FAIL'}"
        )
        log(f"torch compiled: ours {ours}")
        log(f"torch compiled: ref  {ref_tokens}")

    def decode_at(batch: int) -> float:
        model.setup_caches(batch, decode_seq)
        if batch > 1:
            # One compile serves every batch size above 1 (size 1 is always specialised).
            for layer in model.layers:
                torch._dynamo.mark_dynamic(layer.k_cache, 0)
                torch._dynamo.mark_dynamic(layer.v_cache, 0)
        if batch == 1:
            results.guarded("torch_compiled.check.decode", check_decode)
            results.save()
        prompt = prompt_ids(batch, PROMPT_LEN)
        prompt_pos = torch.arange(PROMPT_LEN, device=DEVICE)

        def run(steps: int) -> None:
            # The prefill is not part of decode throughput, so it runs uncompiled here.
            cur = model.prefill(prompt, prompt_pos).argmax(dim=-1, keepdim=True)
            if batch > 1:
                torch._dynamo.mark_dynamic(cur, 0)
            pos = torch.tensor([PROMPT_LEN], device=DEVICE)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                cur, _ = step(cur, pos)
                pos += 1
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        # Warm-up: compiles (where this batch needs it), then records and replays the CUDA graph.
        first_call(f"decode_batch{batch}_warmup", lambda: run(8))
        run(8)
        elapsed = run(new_tokens)
        rate = batch * new_tokens / elapsed
        log(
            f"torch compiled: batch {batch:3d}: {rate:10.1f} tok/s "
            f"({new_tokens} steps in {elapsed:.3f} s, {elapsed / new_tokens * 1e3:.3f} ms/step)"
        )
        return rate

    for batch in batches:
        rate = results.guarded(f"torch_compiled.decode.{batch}", decode_at, batch)
        if rate is not None:
            section["decode_tok_s"][str(batch)] = round(rate, 2)
        results.save()

    section["compile_s"] = round(sum(section["compile_detail_s"].values()), 2)
    section["startup_s"] = round(section["load_s"] + section["compile_s"], 2)
    section["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    section["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
    section["dynamo_graphs"] = int(counters["stats"].get("unique_graphs", 0))
    log(
        f"torch compiled: compile {section['compile_s']:.1f} s in all ({section['dynamo_graphs']} graphs, "
        f"{section['cudagraph_skips']} CUDA-graph skips), peak memory {section['peak_memory_gib']:.2f} GiB"
    )


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="Hugging Face model folder")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 64, fewer tokens")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("error: no CUDA device; this benchmark measures the GPU.", file=sys.stderr)
        return 2
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} has no config.json; expected a Hugging Face model folder.", file=sys.stderr)
        return 2

    import transformers

    batches = QUICK_BATCHES if args.quick else FULL_BATCHES
    eager_new = 32 if args.quick else EAGER_NEW_TOKENS
    compiled_new = 128 if args.quick else COMPILED_NEW_TOKENS
    reps = 3 if args.quick else 5

    results = Results(
        args.out,
        {
            "gpu": torch.cuda.get_device_name(0),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "quick": args.quick,
            "model": str(args.model),
            "prompt_tokens": PROMPT_LEN,
            "frameworks": {},
        },
    )
    data = results.data
    log(f"{data['gpu']}, torch {data['torch']}, transformers {data['transformers']}, batches {list(batches)}")

    data["weight_bytes"] = results.guarded("weight_bytes", weight_bytes, args.model)
    bandwidth = results.guarded("copy_bandwidth_gbs", copy_bandwidth_gbs)
    if bandwidth is not None:
        data["copy_bandwidth_gbs"] = round(bandwidth, 1)
        log(f"copy bandwidth: {bandwidth:.0f} GB/s (read + write)")
    if bandwidth is not None and data["weight_bytes"]:
        data["batch1_limit_tok_s"] = round(bandwidth * 1e9 / data["weight_bytes"], 1)
        log(f"weights {data['weight_bytes'] / 1e9:.3f} GB: batch-1 limit {data['batch1_limit_tok_s']:.0f} tok/s")
    results.save()

    reference = results.guarded(
        "transformers_eager", bench_eager, args.model, batches, eager_new, reps, results
    )
    results.save()
    results.guarded(
        "torch_compiled", bench_compiled, args.model, batches, compiled_new, reps, reference, results
    )
    data["total_s"] = round(time.perf_counter() - _T0, 1)
    results.save()
    log(f"done in {data['total_s']:.0f} s; wrote {args.out}")
    if data["errors"]:
        log(f"{len(data['errors'])} measurement(s) failed: {', '.join(data['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
