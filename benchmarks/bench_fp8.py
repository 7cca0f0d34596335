#!/usr/bin/env python
"""FP8 block kernels on DeepSeek-V3 tensor shapes: throughput against a plain copy of the same bytes, one run.

Legs, each in GB/s of FP8 input (the codes' bytes), median of --repeat:
- copy: the codes' bytes copied once in memory (the floor any conversion pays);
- naive FP8→bf16: `codes.float() * scales.repeat_interleave(...)` as most conversion scripts do;
- FP8→bf16: the tool's blocked dequantize, rounded to bf16 (`--output-dtype bf16`, untouched weight);
- FP8→merge→bf16: dequantize, add a rank-16 LoRA delta, round to bf16 (`--output-dtype bf16`, touched weight);
- naive FP8→merge→FP8: whole-tensor dequantize as above, add the delta, quantize with the same expanded grid;
- FP8→merge→FP8: the tool's tile-by-tile dequantize, merge, re-quantize and delta-survival sums
  (`--output-dtype fp8`, touched weight).
On `--device cuda` the same legs run on the GPU (tensors resident there: kernel throughput, no transfers).

A second table runs every quantized format through its `WeightFormat` (block-FP8, compressed-tensors INT4
pack-quantized on Kimi-K2 expert shapes, MXFP4 on GPT-OSS-120B fused experts), in GB/s of the stored parts' bytes:
copy of those bytes, →bf16 (dequantize), →merge→bf16, →merge→same format (re-quantize with delta survival).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from prefect_lora_merge.core.formats import bitsandbytes, block_fp8, int4_packed, mxfp4, weight_format
from prefect_lora_merge.core.formats.base import TensorRef
from prefect_lora_merge.core.formats.block_fp8 import E4M3_MAX, dequantize, quantize, requantize
from prefect_lora_merge.core.lora_math import merged_tensor, tile_merge
from prefect_lora_merge.core.merge import keep_large_buffers_off_the_heap
from prefect_lora_merge.core.plan import Update
from prefect_lora_merge.core.safetensors_format import TensorEntry, dtype_name

BLOCK = (128, 128)
SHAPES = {  # name: (rows, cols), from the DeepSeek-V3 release
    "q_a_proj": (1536, 7168),
    "kv_a_proj_with_mqa": (576, 7168),
    "o_proj": (7168, 16384),
    "expert down_proj": (7168, 2048),
    "dense gate_proj": (18432, 7168),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeat: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    keep_large_buffers_off_the_heap()  # as a merge does
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(
        "\n| tensor | MB FP8 | copy GB/s | naive FP8→bf16 | FP8→bf16 | FP8→merge→bf16 | naive FP8→merge→FP8 "
        "| FP8→merge→FP8 | fp8 / naive |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (rows, cols) in SHAPES.items():
        rates = _measure(name, rows, cols, device, args.repeat)
        print(
            f"| {name} {rows}×{cols} | {rows * cols / 1e6:.0f} | "
            + " | ".join(f"{r:.2f}" for r in rates)
            + f" | {rates[5] / rates[4]:.1f}× |",
            flush=True,
        )
    print(
        "\n| format | tensor | MB stored | copy GB/s | →bf16 | →merge→bf16 | →merge→same format | merge→same / copy |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for key, name, shape in FORMAT_SHAPES:
        stored, rates = _measure_format(key, name, shape, device, args.repeat)
        print(
            f"| {weight_format(key).label} | {name} {'×'.join(map(str, shape))} | {stored / 1e6:.0f} | "
            + " | ".join(f"{r:.2f}" for r in rates)
            + (f" | {rates[0] / rates[3]:.1f}× slower |" if len(rates) > 3 else " | — (bf16 only) | — |"),
            flush=True,
        )


def _measure(name: str, rows: int, cols: int, device: torch.device, repeat: int) -> list[float]:
    """GB/s of FP8 input for each leg, in the table's order."""
    weight = (0.02 * torch.randn(rows, cols)).to(device)
    codes, scales = quantize(weight, BLOCK)
    del weight
    adapter = {"A": 0.01 * torch.randn(16, cols, device=device), "B": 0.01 * torch.randn(rows, 16, device=device)}
    update = Update(kind="delta", form="linear", module=name, adapter_tensors=("A", "B"), rank=16, scale=2.0)
    merge = tile_merge((update,), adapter.__getitem__)

    def copy() -> None:
        codes.view(torch.uint8).clone()

    def expanded_grid() -> torch.Tensor:
        return scales.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]

    def naive() -> None:
        (codes.to(torch.float32) * expanded_grid()).to(torch.bfloat16)

    def to_bf16() -> None:
        dequantize(codes, scales, BLOCK, torch.bfloat16)

    def merge_bf16() -> None:
        dequantize(codes, scales, BLOCK, torch.bfloat16, merge)

    def naive_merge_fp8() -> None:
        merged = codes.to(torch.float32) * expanded_grid() + 2.0 * (adapter["B"] @ adapter["A"])
        blocks = torch.nn.functional.pad(merged, (0, -cols % 128, 0, -rows % 128)).view(-1, 128, scales.shape[1], 128)
        grid = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / E4M3_MAX
        expanded = grid.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        (merged / expanded).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    def merge_fp8() -> None:
        requantize(codes, scales, BLOCK, merge, ue8m0=False, tensor=name)

    legs = (copy, naive, to_bf16, merge_bf16, naive_merge_fp8, merge_fp8)
    return [rows * cols / 1e9 / _time(fn, device, repeat) for fn in legs]


FORMAT_SHAPES = (  # (format, tensor, logical shape) from the released checkpoints
    ("block-fp8", "DeepSeek-V3 expert down_proj", (7168, 2048)),
    ("int4-pack-quantized", "Kimi-K2 expert gate_proj", (2048, 7168)),
    ("int4-pack-quantized", "Kimi-K2 expert down_proj", (7168, 2048)),
    ("mxfp4", "GPT-OSS-120B gate_up_proj, 8 of 128 experts", (8, 2880, 5760)),
    ("mxfp4", "GPT-OSS-120B down_proj, 8 of 128 experts", (8, 2880, 2880)),
    ("bnb-4bit", "Llama-3-8B nf4 (double quant) up_proj", (14336, 4096)),
    ("bnb-int8", "Llama-3-8B LLM.int8 up_proj", (14336, 4096)),
)


def _stored(values: torch.Tensor, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, stored tensors by name) of `values` written in format `key` by its own kernels."""
    if key == "block-fp8":
        codes, scales = block_fp8.quantize(values, BLOCK)
        config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(BLOCK)}}
        return config, {"w.weight": codes, "w.weight_scale_inv": scales}
    if key == "int4-pack-quantized":
        packed, scale = int4_packed.quantize(values, 32, torch.bfloat16, tensor="w.weight")
        group = {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
        }
        config = {
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {"group_0": group},
            }
        }
        shape = torch.tensor(values.shape, dtype=torch.int64)
        return config, {"w.weight_packed": packed, "w.weight_scale": scale, "w.weight_shape": shape}
    if key == "bnb-4bit":  # QLoRA's nf4, block 64, double quantization, as transformers saves it
        flat = values.reshape(-1).float()
        codes, absmax = bitsandbytes.quantize_blockwise(flat, bitsandbytes.code_values("nf4", flat.device), 64)
        offset = absmax.mean()
        nested, nested_absmax = bitsandbytes.quantize_blockwise(absmax - offset, bitsandbytes.dynamic_map(), 256)
        state = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": list(values.shape),
                 "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": float(offset)}  # fmt: skip
        config = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
        return config, {
            "w.weight": bitsandbytes.pack(codes),
            "w.weight.absmax": nested,
            "w.weight.quant_map": bitsandbytes.code_values("nf4", flat.device),
            "w.weight.nested_absmax": nested_absmax,
            "w.weight.nested_quant_map": bitsandbytes.dynamic_map(),
            "w.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8),
        }
    if key == "bnb-int8":  # LLM.int8's row-wise absmax / 127
        scb = values.abs().amax(dim=1).float()
        codes = torch.round(values * (127 / scb[:, None])).to(torch.int8)
        return {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, {
            "w.weight": codes,
            "w.SCB": scb,
        }
    blocks, scales = mxfp4.quantize(values)
    return {"quantization_config": {"quant_method": "mxfp4"}}, {
        "w.experts.gate_up_proj_blocks": blocks,
        "w.experts.gate_up_proj_scales": scales,
    }


def _measure_format(key: str, name: str, shape: tuple[int, ...], device: torch.device, repeat: int):
    """(stored bytes, GB/s of them for each leg) of one weight in format `key`, through its WeightFormat."""
    fmt = weight_format(key)
    config, stored = _stored((0.02 * torch.randn(shape)).to(device), key)
    refs, offset = {}, 0
    for tensor_name, tensor in stored.items():
        nbytes = tensor.numel() * tensor.element_size()
        entry = TensorEntry(
            name=tensor_name,
            dtype=dtype_name(tensor.dtype),
            shape=tuple(tensor.shape),
            begin=offset,
            end=offset + nbytes,
        )
        refs[tensor_name] = TensorRef(file="bench.safetensors", data_start=0, entry=entry)
        offset += nbytes
    (weight,) = fmt.detect(config, refs, "bench", lambda ref: stored[ref.entry.name].numpy().tobytes()).values()
    parts = {role: stored[ref.entry.name] for role, ref in weight.parts.items()}
    rank, rows, cols = 16, shape[-1] if len(shape) == 3 else shape[0], shape[-2] if len(shape) == 3 else shape[1]
    if len(shape) == 2:
        adapter = {
            "A": 0.01 * torch.randn(rank, cols, device=device),
            "B": 0.01 * torch.randn(rows, rank, device=device),
        }
        update = Update(kind="delta", form="linear", module=name, adapter_tensors=("A", "B"), rank=rank, scale=2.0)
        merge = lambda: tile_merge((update,), adapter.__getitem__)  # noqa: E731
    else:  # fused experts [E, in, out], as PEFT's target_parameters LoRA stores them: A (E·r, in), B (out, E·r)
        experts = shape[0]
        adapter = {
            "A": 0.01 * torch.randn(experts * rank, cols, device=device),
            "B": 0.01 * torch.randn(rows, experts * rank, device=device),
        }
        update = Update(
            kind="delta",
            form="experts",
            module=name,
            adapter_tensors=("A", "B"),
            rank=rank,
            scale=2.0,
            num_experts=experts,
            experts_layout="eio",
        )

        def merge():  # the whole weight merged first, then handed out (the merge's path for a non-tiled update)
            merged = merged_tensor(fmt.dequantize(weight, parts), (update,), adapter.__getitem__)
            return lambda _values, r, c: merged[r, c]

    def copy() -> None:
        for part in parts.values():
            part.view(torch.uint8).clone() if part.element_size() == 1 else part.clone()

    legs = (
        copy,
        lambda: fmt.dequantize(weight, parts, dtype=torch.bfloat16),
        lambda: fmt.dequantize(weight, parts, dtype=torch.bfloat16, merge=merge()),
        lambda: fmt.requantize(weight, parts, merge()),
    )
    if not fmt.keeps:  # written in bf16 only: no re-quantization to time
        legs = legs[:3]
    return offset, [offset / 1e9 / _time(fn, device, repeat) for fn in legs]


if __name__ == "__main__":
    main()
