"""The tool's own plan of a full-size DeepSeek-V3 (671B) merge, without 700 GB of weights.

Writes a DeepSeek-V3-shaped FP8 checkpoint whose shards are sparse files: real safetensors headers (every tensor
of the 61 layers with its real shape, dtype and 128×128 scale grid; the MTP layer left out), data left as holes,
so it takes a few MB of disk. The planner reads only headers, so `make_plan` sees exactly what it would see on the
real checkpoint. Adds a rank-r LoRA adapter on the attention projections (real tensors, ~190 MB at r=8), then
prints, for `--output-dtype fp8` and `bf16`, the plan's per-shard work: bytes, touched tensors, and the memory
estimate that sets how many shards a machine runs at once. docs/scale-671b.md uses these figures.

    python benchmarks/scale_plan.py --workdir bench-work/scale
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, DENSE_INTER, MOE_INTER, EXPERTS, LAYERS, DENSE_LAYERS = 7168, 18432, 2048, 256, 61, 3
HEADS, Q_RANK, KV_RANK, ROPE, NOPE, V_DIM, VOCAB = 128, 1536, 512, 64, 128, 128, 129280
BLOCK = 128
SHARD_BYTES = 4_300_000_000  # DeepSeek-V3's 163 shards are ~4.3 GB each
ATTENTION = {
    "q_a_proj": (Q_RANK, HIDDEN),
    "q_b_proj": (HEADS * (NOPE + ROPE), Q_RANK),
    "kv_a_proj_with_mqa": (KV_RANK + ROPE, HIDDEN),
    "kv_b_proj": (HEADS * (NOPE + V_DIM), KV_RANK),
    "o_proj": (HIDDEN, HEADS * V_DIM),
}
SIZES = {"F8_E4M3": 1, "BF16": 2, "F32": 4, "I32": 4}


def tensors() -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) in the order of the released checkpoint's layers."""
    out: list[tuple[str, str, tuple[int, ...]]] = [("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]

    def fp8(name: str, shape: tuple[int, int]) -> None:
        out.append((f"{name}.weight", "F8_E4M3", shape))
        grid = (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
        out.append((f"{name}.weight_scale_inv", "F32", grid))

    for n in range(LAYERS):
        p = f"model.layers.{n}."
        for module, shape in ATTENTION.items():
            fp8(p + f"self_attn.{module}", shape)
        out.append((p + "self_attn.q_a_layernorm.weight", "BF16", (Q_RANK,)))
        out.append((p + "self_attn.kv_a_layernorm.weight", "BF16", (KV_RANK,)))
        out.append((p + "input_layernorm.weight", "BF16", (HIDDEN,)))
        out.append((p + "post_attention_layernorm.weight", "BF16", (HIDDEN,)))
        mlps = [("mlp", DENSE_INTER)] if n < DENSE_LAYERS else []
        if n >= DENSE_LAYERS:
            out.append((p + "mlp.gate.weight", "BF16", (EXPERTS, HIDDEN)))
            out.append((p + "mlp.gate.e_score_correction_bias", "F32", (EXPERTS,)))
            mlps += [(f"mlp.experts.{e}", MOE_INTER) for e in range(EXPERTS)] + [("mlp.shared_experts", MOE_INTER)]
        for prefix, inter in mlps:
            fp8(p + f"{prefix}.gate_proj", (inter, HIDDEN))
            fp8(p + f"{prefix}.up_proj", (inter, HIDDEN))
            fp8(p + f"{prefix}.down_proj", (HIDDEN, inter))
    out += [("model.norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (VOCAB, HIDDEN))]
    return out


def write_sparse(path: Path, entries: list[tuple[str, str, tuple[int, ...]]]) -> int:
    """A safetensors file with a real header and its data left as a hole; returns the data's size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for tensor, dtype, shape in entries:
        nbytes = math.prod(shape) * SIZES[dtype]
        header[tensor] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.truncate(8 + len(blob) + offset)  # a hole: no data blocks on disk
    return offset


def write_sparse_shards(directory: Path, entries: list[tuple[str, str, tuple[int, ...]]], shard_bytes: int) -> None:
    """`entries` as sparse shards of about `shard_bytes` each, in order, with their index."""
    directory.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * SIZES[entry[1]]
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_sparse(directory / name, group)
        weight_map.update({tensor: name for tensor, _, _ in group})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


def write_sparse_base(directory: Path) -> None:
    write_sparse_shards(directory, tensors(), SHARD_BYTES)
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "num_hidden_layers": LAYERS,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
        },
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def write_adapter(directory: Path, rank: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    weights = {}
    for n in range(LAYERS):
        for module, (rows, cols) in ATTENTION.items():
            key = f"base_model.model.model.layers.{n}.self_attn.{module}"
            weights[f"{key}.lora_A.weight"] = torch.full((rank, cols), 1e-3)
            weights[f"{key}.lora_B.weight"] = torch.full((rows, rank), 1e-3)
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(ATTENTION),
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def plan_summary(plan) -> str:
    """The plan's per-shard work in one line: bytes, touched tensors, computed bytes, copies, memory estimate."""
    peaks = sorted(s.peak_bytes(plan.job.adapters) for s in plan.shards)
    touched = [s for s in plan.shards if s.touched]
    computed = sum(t.base.nbytes for s in plan.shards for t in s.tensors if t.computed)
    written = sum(e.nbytes for s in plan.shards for e in s.output_entries())
    copied = [s for s in plan.shards if s.copies_base_bytes()]
    return (
        f"{len(plan.shards)} shards, {sum(s.base_size for s in plan.shards) / 1e9:.1f} GB in, {written / 1e9:.1f} GB "
        f"of tensors out, {sum(len(s.touched) for s in plan.shards)} tensors touched in {len(touched)} shards, "
        f"{computed / 1e9:.1f} GB of tensors computed, {len(copied)} shards byte-identical "
        f"({sum(s.base_size for s in copied) / 1e9:.1f} GB: server-side copies); estimated peak per shard median "
        f"{peaks[len(peaks) // 2] / 2**30:.2f} GiB, max {peaks[-1] / 2**30:.2f} GiB"
    )


def run(argv: list[str], doc: str, workdir: str, write_base, write_adapter, dtypes: tuple[str, ...]) -> int:
    """Write the sparse base and adapter once (under --workdir), then print the plan of each output dtype."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(workdir))
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args(argv)
    from prefect_lora_merge.core.plan import make_plan

    base, adapter = args.workdir / "base", args.workdir / "adapter"
    if not (base / "config.json").exists():
        write_base(base)
    if not (adapter / "adapter_config.json").exists():
        write_adapter(adapter, args.rank)
    on_disk = sum(os.stat(f).st_blocks * 512 for f in base.iterdir())
    print(f"sparse base: {len(list(base.glob('*.safetensors')))} shards, {on_disk / 1e6:.1f} MB on disk")
    for dtype in dtypes:
        plan = make_plan(str(base), str(adapter), str(args.workdir / f"out-{dtype}"), output_dtype=dtype)
        print(f"--output-dtype {dtype}: {plan_summary(plan)}")
    return 0


def main(argv: list[str]) -> int:
    return run(argv, __doc__, "bench-work/scale", write_sparse_base, write_adapter, ("fp8", "bf16"))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
