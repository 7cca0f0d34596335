#!/usr/bin/env python
"""FP8 block kernels on DeepSeek-V3 tensor shapes: throughput against a plain copy of the same bytes, one run.

Legs, each in GB/s of FP8 input (the codes' bytes), median of --repeat:
- copy: the codes' bytes copied once in memory (the floor any conversion pays);
- naive FP8→bf16: `codes.float() * scales.repeat_interleave(...)` as most conversion scripts do;
- FP8→bf16: the tool's blocked dequantize, rounded to bf16 (`--output-dtype bf16`, untouched weight);
- FP8→merge→FP8: dequantize, add a rank-16 LoRA delta, re-quantize, delta survival figures (`--output-dtype fp8`,
  touched weight).
On `--device cuda` the same legs run on the GPU (tensors resident there: kernel throughput, no transfers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prefect_lora_merge.core.fp8 import delta_survival, dequantize, quantize

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
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("\n| tensor | MB FP8 | copy GB/s | naive FP8→bf16 | FP8→bf16 | FP8→merge→FP8 | bf16 / copy | fp8 / copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (rows, cols) in SHAPES.items():
        rates = _measure(name, rows, cols, device, args.repeat)
        print(
            f"| {name} {rows}×{cols} | {rows * cols / 1e6:.0f} | "
            + " | ".join(f"{r:.2f}" for r in rates)
            + f" | {rates[2] / rates[0]:.3f} | {rates[3] / rates[0]:.3f} |",
            flush=True,
        )


def _measure(name: str, rows: int, cols: int, device: torch.device, repeat: int) -> list[float]:
    """GB/s of FP8 input for: copy, naive FP8→bf16, FP8→bf16, FP8→merge→FP8."""
    weight = (0.02 * torch.randn(rows, cols)).to(device)
    codes, scales = quantize(weight, BLOCK)
    del weight
    lora_a = 0.01 * torch.randn(16, cols, device=device)
    lora_b = 0.01 * torch.randn(rows, 16, device=device)

    def copy() -> None:
        codes.view(torch.uint8).clone()

    def naive() -> None:
        grid = scales.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        (codes.to(torch.float32) * grid).to(torch.bfloat16)

    def to_bf16() -> None:
        dequantize(codes, scales, BLOCK).to(torch.bfloat16)

    def merge_fp8() -> None:
        values = dequantize(codes, scales, BLOCK)
        merged = values + 2.0 * (lora_b @ lora_a)
        new_codes, new_scales = quantize(merged, BLOCK)
        realised = dequantize(new_codes, new_scales, BLOCK).sub_(values)
        delta_survival(name, merged.sub_(values), realised)

    return [rows * cols / 1e9 / _time(fn, device, repeat) for fn in (copy, naive, to_bf16, merge_fp8)]


if __name__ == "__main__":
    main()
