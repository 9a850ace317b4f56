#!/usr/bin/env python3
"""Puts Braid's benchmark results, PyTorch's and llama.cpp's side by side in one markdown table.

    python3 scripts/bench_report.py --torch torch.json --braid braid.json [--llama-cpp llama_cpp.json] [--out merged.json]

torch.json is what scripts/bench_torch.py writes; braid.json is what `braid bench` writes:
{"gpu", "date", "decode_tok_s": {"1": ..}, "ttft_ms": {"512": ..}, "peak_memory_gib", "startup_s",
"smollm2_decode_tok_s"}; llama_cpp.json is what scripts/bench_llama_cpp.sh writes, with the same
workload keys. Rows are workloads, columns the engines and Braid's ratio to each other engine
(Braid's value divided by the other's: above 1 is better for throughput, below 1 is better for
latency, memory and start-up). The llama.cpp columns appear when --llama-cpp is given; a file that
does not exist then only leaves them empty. A value a file lacks prints as "—". Needs only the
standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MISSING = "—"
ENGINES = ("braid", "transformers_eager", "torch_compiled", "llama_cpp")
# (engine, column title, key of Braid's ratio to it)
BASELINES = (
    ("transformers_eager", "eager", "braid_over_eager"),
    ("torch_compiled", "compiled", "braid_over_compiled"),
    ("llama_cpp", "llama.cpp", "braid_over_llama_cpp"),
)
TITLES = {"braid": "Braid", "transformers_eager": "transformers eager", "torch_compiled": "torch compiled", "llama_cpp": "llama.cpp"}


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _ms(v: float) -> str:
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def _gib(v: float) -> str:
    return f"{v:.2f}"


def _secs(v: float) -> str:
    return f"{v:.1f}" if v >= 1 else f"{v:.2f}"


# (label, path inside one engine's results, formatter, shown only when Braid has it)
ROWS = [
    ("decode tok/s, batch 1 ↑", ("decode_tok_s", "1"), _rate, False),
    ("decode tok/s, batch 8 ↑", ("decode_tok_s", "8"), _rate, False),
    ("decode tok/s, batch 64 ↑", ("decode_tok_s", "64"), _rate, False),
    ("decode tok/s, batch 256 ↑", ("decode_tok_s", "256"), _rate, False),
    ("TTFT 512 tokens, ms ↓", ("ttft_ms", "512"), _ms, False),
    ("TTFT 4096 tokens, ms ↓", ("ttft_ms", "4096"), _ms, False),
    ("peak GPU memory, GiB ↓", ("peak_memory_gib",), _gib, False),
    ("start-up, s ↓", ("startup_s",), _secs, False),
    ("SmolLM2-135M decode tok/s, batch 1 ↑", ("smollm2_decode_tok_s",), _rate, True),
]


class ReportError(Exception):
    """A results file that cannot be used."""


def load(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ReportError(f"cannot read the {what} results file {path}: {err.strerror}.") from err
    except json.JSONDecodeError as err:
        raise ReportError(f"the {what} results file {path} is not valid JSON ({err.msg}, line {err.lineno}).") from err
    if not isinstance(data, dict):
        raise ReportError(f"the {what} results file {path} holds a {type(data).__name__}, expected a JSON object.")
    return data


def number(results: dict | None, path: tuple[str, ...]) -> float | None:
    """The number at path, or None where the key is missing or not a number."""
    value: object = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    # The SmolLM2 figure may come per batch size; batch 1 is the one this row means.
    if isinstance(value, dict) and path == ("smollm2_decode_tok_s",):
        value = value.get("1")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def ratio(braid: float | None, other: float | None) -> float | None:
    if braid is None or other is None or other == 0:
        return None
    return braid / other


def shared_prefix_table(shared: object) -> list[str]:
    """Braid's shared-prefix workload: cascade vs plain paged attention vs no prefix sharing."""
    if not isinstance(shared, dict) or not isinstance(shared.get("runs"), dict):
        return []
    runs = shared["runs"]
    title = (
        f"Shared prefix (Braid only): {shared.get('requests', MISSING)} requests sharing a "
        f"{shared.get('prefix_tokens', MISSING)}-token system prompt, {shared.get('question_tokens', MISSING)}-token "
        f"questions, {shared.get('new_tokens', MISSING)} new tokens each"
    )
    lines = ["", title, "", "| run | decode tok/s ↑ | peak KV GiB ↓ | cascade steps |", "|---|---:|---:|---:|"]
    for name, label in (("cascade", "prefix cached, cascade attention"), ("plain", "prefix cached, plain paged attention"), ("unshared", "no prefix sharing")):
        run = runs.get(name)
        tps, kv, steps = (number(run, (k,)) for k in ("decode_tok_s", "peak_kv_gib", "cascade_steps"))
        cells = [_rate(tps) if tps is not None else MISSING, _gib(kv) if kv is not None else MISSING, f"{steps:.0f}" if steps is not None else MISSING]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    speedup = ratio(number(runs.get("cascade"), ("decode_tok_s",)), number(runs.get("plain"), ("decode_tok_s",)))
    saving = ratio(number(runs.get("unshared"), ("peak_kv_gib",)), number(runs.get("cascade"), ("peak_kv_gib",)))
    if speedup is not None or saving is not None:
        parts = []
        if speedup is not None:
            parts.append(f"cascade decode speed-up {speedup:.2f}×")
        if saving is not None:
            parts.append(f"KV memory {saving:.1f}× smaller than unshared")
        lines += ["", "; ".join(parts) + "."]
    return lines


def llama_cpp_notes(llama: dict) -> list[str]:
    """What the llama.cpp column measured, beyond the table's keys."""
    notes = []
    version = llama.get("llama_cpp")
    commit = version.get("commit") if isinstance(version, dict) else None
    detail = []
    new_tokens = number(llama, ("new_tokens",))
    if new_tokens is not None:
        detail.append(f"decode over {new_tokens:.0f} new tokens")
    tg128 = number(llama, ("batch1_tg128_tok_s",))
    if tg128 is not None:
        detail.append(f"llama-bench tg128 at batch 1 {_rate(tg128)} tok/s")
    prefill = [(n, number(llama, ("prefill_tok_s", n))) for n in ("512", "4096")]
    prefill_text = ", ".join(f"{n} tokens {_rate(v)} tok/s" for n, v in prefill if v is not None)
    if prefill_text:
        detail.append(f"prefill {prefill_text}")
    title = f"llama.cpp {commit}" if isinstance(commit, str) and commit else "llama.cpp"
    notes.append(
        f"{title}: decode from llama-batched-bench (S_TG), TTFT is the median of llama-bench's prompt-processing runs"
        + (f"; {'; '.join(detail)}" if detail else "")
    )
    errors = llama.get("errors")
    if isinstance(errors, dict) and errors:
        notes.append(f"llama.cpp measurements that failed: {', '.join(sorted(errors))}")
    return notes


def build(torch_data: dict, braid_data: dict, llama_data: dict | None = None, with_llama: bool = False) -> tuple[list[str], dict]:
    """The report's lines and the merged results; with_llama adds the llama.cpp columns, empty where llama_data is None."""
    frameworks = torch_data.get("frameworks") if isinstance(torch_data.get("frameworks"), dict) else {}
    engines = {
        "braid": braid_data,
        "transformers_eager": frameworks.get("transformers_eager"),
        "torch_compiled": frameworks.get("torch_compiled"),
        "llama_cpp": llama_data,
    }
    shown = [name for name in ENGINES if with_llama or name != "llama_cpp"]
    baselines = [b for b in BASELINES if b[0] in shown]

    gpu = torch_data.get("gpu") or braid_data.get("gpu") or "unknown GPU"
    bandwidth = number(torch_data, ("copy_bandwidth_gbs",))
    limit = number(torch_data, ("batch1_limit_tok_s",))
    weights = number(torch_data, ("weight_bytes",))
    parts = [f"GPU: {gpu}"]
    if braid_data.get("gpu") and torch_data.get("gpu") and braid_data["gpu"] != torch_data["gpu"]:
        parts.append(f"Braid measured on {braid_data['gpu']}")
    if llama_data is not None and llama_data.get("gpu") and llama_data.get("gpu") != gpu:
        parts.append(f"llama.cpp measured on {llama_data['gpu']}")
    dates = f"date: {torch_data.get('date', MISSING)} (PyTorch), {braid_data.get('date', MISSING)} (Braid)"
    if with_llama:
        dates += f", {(llama_data or {}).get('date', MISSING)} (llama.cpp)"
    parts.append(dates)
    parts.append(f"copy bandwidth: {f'{bandwidth:,.0f} GB/s' if bandwidth is not None else MISSING}")
    limit_text = f"{limit:,.0f} tok/s" if limit is not None else MISSING
    if limit is not None and weights is not None:
        limit_text += f" ({weights / 1e9:.2f} GB of weights read per token)"
    parts.append(f"batch-1 physical limit: {limit_text}")
    lines = [" · ".join(parts), ""]

    header = ["workload"] + [TITLES[name] for name in shown] + [f"Braid / {title}" for _, title, _ in baselines]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - 1))
    rows = []
    for label, path, fmt, braid_only in ROWS:
        values = {name: number(engines[name], path) for name in shown}
        if braid_only and values["braid"] is None:
            continue
        ratios = {key: ratio(values["braid"], values[name]) for name, _, key in baselines}
        cells = [fmt(values[name]) if values[name] is not None else MISSING for name in shown]
        cells += [f"{r:.2f}×" if r is not None else MISSING for r in ratios.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        rows.append({"workload": label, "key": "/".join(path), **values, **ratios})

    notes = []
    for name, title in (("transformers_eager", "transformers eager"), ("torch_compiled", "torch compiled")):
        new_tokens = number(engines[name], ("new_tokens",))
        if new_tokens is not None:
            notes.append(f"{title} decode over {new_tokens:.0f} new tokens")
    prompt = number(torch_data, ("prompt_tokens",))
    if prompt is not None:
        notes.append(f"prompts of {prompt:.0f} tokens")
    check = engines["torch_compiled"].get("check") if isinstance(engines["torch_compiled"], dict) else None
    if isinstance(check, dict) and "passed" in check:
        agree, of = number(check, ("greedy_tokens_agree",)), number(check, ("of_tokens",))
        worst = [v for v in (number(check, ("prefill_logits_rel_l2",)), number(check, ("decode_logits_rel_l2_max",))) if v is not None]
        detail = []
        if agree is not None and of is not None:
            detail.append(f"{agree:.0f} of {of:.0f} greedy tokens agree")
        if worst:
            detail.append(f"logits rel. L2 ≤ {max(worst):.3f}")
        verdict = "passed" if check["passed"] is True else "FAILED"
        notes.append(f"compiled decoder checked against transformers ({', '.join(detail)}): {verdict}")
    errors = torch_data.get("errors")
    if isinstance(errors, dict) and errors:
        notes.append(f"PyTorch measurements that failed: {', '.join(sorted(errors))}")
    if notes:
        lines += ["", "; ".join(notes) + "."]
    if llama_data is not None:
        lines += ["", "; ".join(llama_cpp_notes(llama_data)) + "."]
    lines += shared_prefix_table(braid_data.get("shared_prefix"))

    merged = {
        "gpu": gpu,
        "date": torch_data.get("date"),
        "braid_gpu": braid_data.get("gpu"),
        "braid_date": braid_data.get("date"),
        "torch": torch_data.get("torch"),
        "transformers": torch_data.get("transformers"),
        "copy_bandwidth_gbs": bandwidth,
        "weight_bytes": weights,
        "batch1_limit_tok_s": limit,
        "frameworks": {name: engines[name] for name in ENGINES if engines[name] is not None},
        "rows": rows,
    }
    if llama_data is not None:
        merged["llama_cpp_gpu"] = llama_data.get("gpu")
        merged["llama_cpp_date"] = llama_data.get("date")
    return lines, merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", required=True, type=Path, help="JSON from scripts/bench_torch.py")
    parser.add_argument("--braid", required=True, type=Path, help="JSON from `braid bench`")
    parser.add_argument("--llama-cpp", type=Path, help="JSON from scripts/bench_llama_cpp.sh; adds the llama.cpp columns")
    parser.add_argument("--out", type=Path, help="write the merged results here")
    args = parser.parse_args()
    try:
        llama = None
        if args.llama_cpp is not None:
            if args.llama_cpp.exists():
                llama = load(args.llama_cpp, "llama.cpp")
            else:
                print(f"note: the llama.cpp results file {args.llama_cpp} does not exist; its columns stay empty.", file=sys.stderr)
        lines, merged = build(load(args.torch, "PyTorch"), load(args.braid, "Braid"), llama, with_llama=args.llama_cpp is not None)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
        except OSError as err:
            print(f"error: cannot write the merged results to {args.out}: {err.strerror}.", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
