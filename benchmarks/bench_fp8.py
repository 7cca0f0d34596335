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
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prefect_lora_merge.core.formats.block_fp8 import E4M3_MAX, dequantize, quantize, requantize
from prefect_lora_merge.core.lora_math import tile_merge
from prefect_lora_merge.core.merge import keep_large_buffers_off_the_heap
from prefect_lora_merge.core.plan import Update

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


if __name__ == "__main__":
    main()
