"""The tool's own plan of a full-size Kimi-K2-Thinking (about 1T parameters, INT4 routed experts) merge, without
600 GB of weights.

Like `scale_plan.py` for DeepSeek-V3: a Kimi-K2-Thinking-shaped checkpoint whose shards are sparse files (real
safetensors headers: every tensor of the 61 layers with its real shape and dtype, the 384 routed experts of each MoE
layer as compressed-tensors `pack-quantized` INT4 triples `weight_packed` I32 / `weight_scale` BF16 (group 32) /
`weight_shape` I32, everything else bf16; data left as holes). The adapter is sparse too (planning reads only its
header): rank-r LoRA on the attention projections and on every routed expert's gate/up/down projections. Prints, for
`--output-dtype keep` and `bf16`, the plan's per-shard work and memory estimate; docs/scale-671b.md uses them.

    python benchmarks/scale_plan_kimi.py --workdir bench-work/scale-kimi
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scale_plan import run, write_sparse, write_sparse_shards

HIDDEN, DENSE_INTER, MOE_INTER, EXPERTS, LAYERS, DENSE_LAYERS = 7168, 18432, 2048, 384, 61, 1
HEADS, Q_RANK, KV_RANK, ROPE, NOPE, V_DIM, VOCAB = 64, 1536, 512, 64, 128, 128, 163840
GROUP = 32
SHARD_BYTES = 9_800_000_000  # the release's shards are about 10 GB each
ATTENTION = {
    "q_a_proj": (Q_RANK, HIDDEN),
    "q_b_proj": (HEADS * (NOPE + ROPE), Q_RANK),
    "kv_a_proj_with_mqa": (KV_RANK + ROPE, HIDDEN),
    "kv_b_proj": (HEADS * (NOPE + V_DIM), KV_RANK),
    "o_proj": (HIDDEN, HEADS * V_DIM),
}
EXPERT_PROJECTIONS = {
    "gate_proj": (MOE_INTER, HIDDEN),
    "up_proj": (MOE_INTER, HIDDEN),
    "down_proj": (HIDDEN, MOE_INTER),
}
Entry = tuple[str, str, tuple[int, ...]]


def tensors() -> list[Entry]:
    """(name, dtype, shape) in the order of the released checkpoint's layers."""
    out: list[Entry] = [("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]

    def int4(name: str, shape: tuple[int, int]) -> None:
        out.append((f"{name}.weight_packed", "I32", (shape[0], shape[1] // 8)))
        out.append((f"{name}.weight_scale", "BF16", (shape[0], shape[1] // GROUP)))
        out.append((f"{name}.weight_shape", "I32", (2,)))

    for n in range(LAYERS):
        p = f"model.layers.{n}."
        for module, shape in ATTENTION.items():
            out.append((p + f"self_attn.{module}.weight", "BF16", shape))
        out.append((p + "self_attn.q_a_layernorm.weight", "BF16", (Q_RANK,)))
        out.append((p + "self_attn.kv_a_layernorm.weight", "BF16", (KV_RANK,)))
        out.append((p + "input_layernorm.weight", "BF16", (HIDDEN,)))
        out.append((p + "post_attention_layernorm.weight", "BF16", (HIDDEN,)))
        if n < DENSE_LAYERS:
            for module, inter in (("gate_proj", DENSE_INTER), ("up_proj", DENSE_INTER)):
                out.append((p + f"mlp.{module}.weight", "BF16", (inter, HIDDEN)))
            out.append((p + "mlp.down_proj.weight", "BF16", (HIDDEN, DENSE_INTER)))
            continue
        out.append((p + "mlp.gate.weight", "BF16", (EXPERTS, HIDDEN)))
        out.append((p + "mlp.gate.e_score_correction_bias", "F32", (EXPERTS,)))
        for e in range(EXPERTS):
            for module, shape in EXPERT_PROJECTIONS.items():
                int4(p + f"mlp.experts.{e}.{module}", shape)
        for module, shape in EXPERT_PROJECTIONS.items():
            out.append((p + f"mlp.shared_experts.{module}.weight", "BF16", shape))
    out += [("model.norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (VOCAB, HIDDEN))]
    return out


def write_sparse_base(directory: Path) -> None:
    write_sparse_shards(directory, tensors(), SHARD_BYTES)
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "num_hidden_layers": LAYERS,
        "first_k_dense_replace": DENSE_LAYERS,
        "n_routed_experts": EXPERTS,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "config_groups": {
                "group_0": {
                    "input_activations": None,
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": {
                        "actorder": None,
                        "block_structure": None,
                        "dynamic": False,
                        "group_size": GROUP,
                        "num_bits": 4,
                        "observer": "minmax",
                        "observer_kwargs": {},
                        "strategy": "group",
                        "symmetric": True,
                        "type": "int",
                    },
                }
            },
            "format": "pack-quantized",
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        },
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def write_adapter(directory: Path, rank: int) -> None:
    """A sparse adapter (header only, planning reads nothing else): LoRA on attention and on every routed expert."""
    directory.mkdir(parents=True, exist_ok=True)
    entries: list[Entry] = []
    for n in range(LAYERS):
        modules = [(f"self_attn.{m}", shape) for m, shape in ATTENTION.items()]
        if n >= DENSE_LAYERS:
            modules += [(f"mlp.experts.{e}.{m}", s) for e in range(EXPERTS) for m, s in EXPERT_PROJECTIONS.items()]
        for module, (rows, cols) in modules:
            key = f"base_model.model.model.layers.{n}.{module}"
            entries.append((f"{key}.lora_A.weight", "F32", (rank, cols)))
            entries.append((f"{key}.lora_B.weight", "F32", (rows, rank)))
    write_sparse(directory / "adapter_model.safetensors", entries)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(ATTENTION) + sorted(EXPERT_PROJECTIONS),
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def main(argv: list[str]) -> int:
    return run(argv, __doc__, "bench-work/scale-kimi", write_sparse_base, write_adapter, ("keep", "bf16"))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
