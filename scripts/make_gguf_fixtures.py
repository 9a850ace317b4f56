#!/usr/bin/env python3
"""Regenerates braid-quant/tests/fixtures: reference dequantizations and small GGUF files.

Every expected value comes from the `gguf` Python package (the reference implementation that
ships with ggml), so the Rust tests compare Braid against it, never against Braid itself.

    python3 -m venv .venv && .venv/bin/pip install gguf numpy
    .venv/bin/python scripts/make_gguf_fixtures.py

The output is deterministic (seeded) and small (well under 1 MB); re-running it rewrites the
same bytes.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf.quants import dequantize, quantize

SEED = 20250117
ROWS, COLS = 2, 512

OUT = Path(__file__).resolve().parent.parent / "braid-quant" / "tests" / "fixtures"

# Types the package can quantize: real quantization of normal data gives realistic blocks.
QUANTIZED = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]

# Types the package can only dequantize: random block bytes with finite scales cover every bit
# pattern of the quants. Each entry lists the byte offsets of the block's f16 scales.
RANDOM_BLOCKS = {
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ4_NL: [0],
    T.IQ4_XS: [0],
    T.MXFP4: [],
}


def special_floats() -> np.ndarray:
    """Values whose conversion must be exact: zeros, infinities, NaN, subnormals, extremes."""
    return np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-45, 6e-8, 65504.0, -65504.0, 3.4e38, 1.0],
        dtype=np.float32,
    )


def float_input(rng: np.random.Generator, qtype: T) -> np.ndarray:
    data = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if qtype in (T.F32, T.F16, T.BF16):
        specials = special_floats()
        data[0, : specials.size] = specials
    return data


def raw_bytes_of(quantized: np.ndarray) -> np.ndarray:
    """The on-disk bytes of a quantized array, shaped (rows, bytes per row)."""
    raw = np.ascontiguousarray(quantized).view(np.uint8)
    return raw.reshape((ROWS, -1))


def random_blocks(rng: np.random.Generator, qtype: T, scale_offsets: list[int]) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.normal(0.0, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape((n_blocks, 2))
    if qtype == T.MXFP4:
        # E8M0 exponents: keep products finite, and include the two subnormal encodings (0, 1).
        blocks[:, 0] = rng.integers(100, 150, size=n_blocks, dtype=np.uint8)
        blocks[0, 0] = 0
        blocks[1, 0] = 1
    return blocks.reshape((ROWS, -1))


def write_f32(path: Path, values: np.ndarray) -> None:
    path.write_bytes(np.ascontiguousarray(values, dtype="<f4").tobytes())


def make_dequant_fixtures(rng: np.random.Generator) -> list[dict]:
    out_dir = OUT / "dequant"
    out_dir.mkdir(parents=True)
    entries = []
    for qtype in QUANTIZED + list(RANDOM_BLOCKS):
        if qtype in RANDOM_BLOCKS:
            raw = random_blocks(rng, qtype, RANDOM_BLOCKS[qtype])
        else:
            with np.errstate(over="ignore"):  # the specials overflow f16 on purpose
                raw = raw_bytes_of(quantize(float_input(rng, qtype), qtype))
        expected = np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape((ROWS, COLS))
        stem = qtype.name.lower()
        (out_dir / f"{stem}.bin").write_bytes(raw.tobytes())
        write_f32(out_dir / f"{stem}.f32", expected)
        entries.append(
            {
                "type": qtype.name,
                "type_id": int(qtype),
                "shape": [ROWS, COLS],
                "raw": f"dequant/{stem}.bin",
                "expected": f"dequant/{stem}.f32",
            }
        )
    return entries


def typed_json(value, vtype: V, sub_type: V | None = None):
    """The value as the file stores it: each node carries its GGUF type name."""
    if vtype == V.ARRAY:
        elem_type = sub_type if sub_type is not None else V.get_type(value[0])
        return {"type": "array", "value": [typed_json(v, elem_type) for v in value]}
    names = {
        V.UINT8: "uint8", V.INT8: "int8", V.UINT16: "uint16", V.INT16: "int16",
        V.UINT32: "uint32", V.INT32: "int32", V.UINT64: "uint64", V.INT64: "int64",
        V.FLOAT32: "float32", V.FLOAT64: "float64", V.BOOL: "bool", V.STRING: "string",
    }
    return {"type": names[vtype], "value": value}


# (key, type, value, array element type); the writer adds general.architecture itself.
METADATA = [
    ("test.u8", V.UINT8, 200, None),
    ("test.i8", V.INT8, -100, None),
    ("test.u16", V.UINT16, 60000, None),
    ("test.i16", V.INT16, -30000, None),
    ("test.u32", V.UINT32, 4000000000, None),
    ("test.i32", V.INT32, -2000000000, None),
    ("test.u64", V.UINT64, 2**63 + 5, None),
    ("test.i64", V.INT64, -(2**62) - 3, None),
    ("test.f32", V.FLOAT32, 0.1, None),
    ("test.f64", V.FLOAT64, -2.718281828459045, None),
    ("test.bool_true", V.BOOL, True, None),
    ("test.bool_false", V.BOOL, False, None),
    ("test.string", V.STRING, "héllo, wörld ✓", None),
    ("test.array.strings", V.ARRAY, ["<s>", "</s>", "▁the", "", "日本"], None),
    ("test.array.i32", V.ARRAY, [1, -2, 3, 2147483647], None),
    ("test.array.f32", V.ARRAY, [0.5, -1.25, 1e-3], None),
    ("test.array.u8", V.ARRAY, [0, 1, 255], V.UINT8),
    ("test.array.bool", V.ARRAY, [True, False, True], None),
    ("test.array.nested", V.ARRAY, [[1, 2], [3], [4, 5, 6]], None),
    ("test.context_length", V.UINT32, 2048, None),
]


def quantized_tensor(rng: np.random.Generator, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    data = rng.standard_normal(shape).astype(np.float32)
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float16)
    return np.ascontiguousarray(quantize(data, qtype))


def random_block_tensor(rng: np.random.Generator, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in RANDOM_BLOCKS[qtype]:
        scales = rng.normal(0.0, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape((n_blocks, 2))
    return blocks.reshape((*shape[:-1], shape[-1] // block_size * type_size))


def write_gguf(
    rng: np.random.Generator, name: str, tensors: list[tuple[str, T, tuple[int, ...]]],
    alignment: int | None, metadata: list,
) -> dict:
    path = OUT / name
    writer = gguf.GGUFWriter(str(path), arch="llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, vtype, value, sub_type in metadata:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)

    stem = name.removesuffix(".gguf")
    expected_dir = OUT / stem
    expected_dir.mkdir()
    infos = []
    for tensor_name, qtype, shape in tensors:
        if qtype in RANDOM_BLOCKS:
            data = random_block_tensor(rng, qtype, shape)
        else:
            data = quantized_tensor(rng, qtype, shape)
        raw_dtype = None if qtype in (T.F32, T.F16) else qtype
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        raw = np.ascontiguousarray(data).view(np.uint8)
        expected = np.asarray(dequantize(raw, qtype), dtype=np.float32)
        expected_file = f"{stem}/{tensor_name}.f32"
        write_f32(OUT / expected_file, expected)
        infos.append(
            {
                "name": tensor_name,
                "type": qtype.name,
                # GGUF order: the innermost (contiguous) dimension first.
                "dims": list(reversed(shape)),
                "expected": expected_file,
            }
        )

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    keys = {"general.architecture": {"type": "string", "value": "llama"}}
    if alignment is not None:
        keys["general.alignment"] = {"type": "uint32", "value": alignment}
    for key, vtype, value, sub_type in metadata:
        keys[key] = typed_json(value, vtype, sub_type)
    return {
        "file": name,
        "version": gguf.GGUF_VERSION,
        "alignment": alignment if alignment is not None else gguf.GGUF_DEFAULT_ALIGNMENT,
        "metadata": keys,
        "tensors": infos,
    }


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    rng = np.random.default_rng(SEED)

    index = {
        "generator": "scripts/make_gguf_fixtures.py",
        "gguf_package": importlib.metadata.version("gguf"),
        "seed": SEED,
        "dequant": make_dequant_fixtures(rng),
        "gguf_files": [
            write_gguf(
                rng,
                "metadata.gguf",
                [
                    ("token_embd.weight", T.F32, (4, 32)),
                    ("output_norm.weight", T.F16, (64,)),
                    ("blk.0.attn_q.weight", T.Q4_0, (4, 64)),
                    ("blk.0.attn_k.weight", T.Q8_0, (2, 32)),
                    ("blk.0.ffn_up.weight", T.BF16, (2, 3, 32)),
                    ("blk.0.ffn_down.weight", T.Q6_K, (2, 256)),
                    ("blk.0.ffn_gate.weight", T.Q4_K, (1, 256)),
                ],
                None,
                METADATA,
            ),
            write_gguf(
                rng,
                "aligned64.gguf",
                [
                    ("odd.weight", T.F32, (7,)),
                    ("blk.0.attn_v.weight", T.Q5_1, (3, 32)),
                    ("tail.weight", T.F16, (5,)),
                ],
                64,
                [("test.note", V.STRING, "custom alignment", None)],
            ),
        ],
    }
    (OUT / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
