"""A tiny GPT-OSS checkpoint with MXFP4 experts, its dequantized bf16 twin, and a PEFT adapter, built here.

What it has, like gpt-oss-20b/120b: fused experts stored as `mlp.experts.{gate_up,down}_proj_blocks` (U8
[E, out, in/32, 16], two e2m1 codes a byte, low nibble first) and `..._scales` (U8 E8M0 [E, out, in/32]), bf16
expert biases, attention with sinks and biases, a router with a bias, `quantization_config` {"quant_method":
"mxfp4", "modules_to_not_convert": [...]}, several shards with an index and one weight whose scales sit in another
shard than its blocks. Hidden and intermediate sizes differ (96 and 64), so `[E, in, out]` and `[E, out, in]` cannot
be confused. transformers loads the base on CPU with `Mxfp4Config(dequantize=True)`.

The encoder here is written independently of the tool's (float64, the textbook formula: the scale is the smallest
power of two at least amax / 6, each value goes to the nearest e2m1 value, ties to the even code), so the tests
compare two implementations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from checkpoint_tools import save_perturbed_adapter, save_sharded
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import GptOssConfig, GptOssForCausalLM

BLOCK = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; code | 8 is the negative
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def tiny_config(**overrides) -> GptOssConfig:
    kwargs = dict(
        vocab_size=256,
        hidden_size=96,
        intermediate_size=64,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return GptOssConfig(**kwargs)


def reference_quantize(logical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [E, out, in/32, 16], scales [E, out, in/32]) of a logical [E, in, out] weight, in float64."""
    stored = logical.double().transpose(1, 2)  # [E, out, in]: blocks of 32 consecutive inputs
    experts, rows, inputs = stored.shape
    groups = stored.reshape(experts, rows, inputs // BLOCK, BLOCK)
    amax = groups.abs().amax(dim=-1)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(min=-126)  # log2(0) = -inf: an all-zero block
    exponent = torch.where(amax == 0, torch.full_like(exponent, -127), exponent)
    scaled = groups / torch.pow(2.0, exponent)[..., None]
    grid = torch.tensor(E2M1, dtype=torch.float64)
    distance = (scaled.abs()[..., None] - grid).abs()  # [..., 32, 8]
    nearest = distance == distance.amin(dim=-1, keepdim=True)
    even = torch.arange(8) % 2 == 0
    magnitude = torch.where(nearest & even, 2, nearest.int()).argmax(dim=-1)  # a tie goes to the even code
    codes = magnitude + 8 * torch.signbit(scaled).long()
    blocks = (codes[..., 0::2] + 16 * codes[..., 1::2]).to(torch.uint8)
    return blocks, (exponent + 127).to(torch.uint8)


def reference_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The logical [E, in, out] float64 weight: FP4 value of each nibble (low first) times 2^(s - 127)."""
    values = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float64)
    codes = torch.stack([blocks % 16, blocks // 16], dim=-1).long()  # [E, out, G, 16, 2]
    grouped = values[codes].flatten(-2) * torch.pow(2.0, scales.double() - 127)[..., None]
    return grouped.flatten(-2).transpose(1, 2)


@dataclass
class Mxfp4Case:
    base_dir: Path  # the MXFP4 checkpoint
    dequantized_dir: Path  # the same model in bf16, experts dequantized: what the adapter trained on
    adapter_dir: Path
    quantized: tuple[str, ...]  # logical names of the MXFP4 weights ("model.layers.0.mlp.experts.down_proj")
    cross_shard: tuple[str, ...]  # MXFP4 weights whose scales are in another shard than their blocks


def build(root: Path, *, seed: int = 0) -> Mxfp4Case:
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = tiny_config()
    model = GptOssForCausalLM(config)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, value in tensors.items():
        if name.endswith("bias") or name.endswith("sinks"):
            tensors[name] = 0.05 * torch.randn(value.shape, generator=gen)
        elif "norm" in name:
            tensors[name] = 1 + 0.05 * torch.randn(value.shape, generator=gen)

    mxfp4: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    quantized = []
    for name, value in sorted(tensors.items()):
        if name.rsplit(".", 1)[-1] in EXPERT_PARAMS:
            blocks, scales = reference_quantize(value)
            mxfp4[f"{name}_blocks"], mxfp4[f"{name}_scales"] = blocks, scales
            dequantized[name] = reference_dequantize(blocks, scales).to(torch.bfloat16).contiguous()  # exact
            quantized.append(name)
        else:
            mxfp4[name] = dequantized[name] = value.to(torch.bfloat16)

    base_dir = root / "base"
    cross = _write_shards(base_dir, mxfp4)
    cfg = {
        **config.to_dict(),
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_NOT_CONVERTED},
    }
    (base_dir / "config.json").write_text(json.dumps(cfg, indent=2))

    dequantized_dir = root / "dequantized"
    dequantized_dir.mkdir(parents=True)
    save_file(dequantized, str(dequantized_dir / "model.safetensors"), metadata={"format": "pt"})
    (dequantized_dir / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": "bfloat16"}))

    adapter_dir = root / "adapter"
    reference = GptOssForCausalLM.from_pretrained(dequantized_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=ATTENTION,
        target_parameters=[f"mlp.experts.{p}" for p in EXPERT_PARAMS],
    )
    save_perturbed_adapter(reference, lora, adapter_dir, gen)
    return Mxfp4Case(base_dir, dequantized_dir, adapter_dir, tuple(quantized), cross)


def _write_shards(directory: Path, tensors: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Three shards: embeddings and layer 0, layer 1, the head; layer 0's down_proj scales go with layer 1."""
    directory.mkdir(parents=True)
    moved = "model.layers.0.mlp.experts.down_proj_scales"

    def shard_of(name: str) -> int:
        if name == moved or name.startswith("model.layers.1."):
            return 2
        if name.startswith("lm_head") or name == "model.norm.weight":
            return 3
        return 1

    save_sharded(directory, tensors, shard_of, 3)
    return (moved.removesuffix("_scales"),)
