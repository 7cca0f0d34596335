"""A tiny Kimi-K2-Thinking-shaped INT4 checkpoint and a PEFT adapter trained on its dequantized weights, built here.

What it has, like the 1T release: a DeepSeek-V3 architecture (`model_type: kimi_k2`) with a dense first layer and
MoE layers of per-expert `nn.Linear` tensors plus a shared expert; the routed experts' weights quantized by
compressed-tensors itself (`calculate_qparams` on each group's min/max, as its min-max observer does, then
`PackedQuantizationCompressor.compress`) into `weight_packed` / `weight_scale` (bf16) / `weight_shape`; attention,
shared experts, the dense MLP, the router and `lm_head` in bf16; `config.json` with the `quantization_config` the
library's `ModelCompressor.update_config` writes (group size 32, symmetric, an `ignore` list naming every Linear that
is not a routed expert); several shards, and weights whose scales sit in another shard.

The dequantized reference is the library's own `decompress` (bf16 values), stored as float32 for the adapter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from checkpoint_tools import save_perturbed_adapter, save_sharded
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

GROUP = 32
LAYERS = 3  # layer 0 dense, 1-2 MoE
EXPERT = re.compile(r"^(?P<module>.+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj))\.weight$")
ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def scheme(group_size: int = GROUP) -> QuantizationScheme:
    """Kimi-K2-Thinking's weight scheme: 4-bit symmetric int, one scale per group of 32 inputs."""
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def library_compress(weight: torch.Tensor, quant: QuantizationScheme | None = None) -> dict[str, torch.Tensor]:
    """`weight_packed`, `weight_scale`, `weight_shape` of one Linear weight, computed by compressed-tensors."""
    quant = quant or scheme()
    groups = weight.unflatten(-1, (-1, quant.weights.group_size))
    scale, zero_point = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), quant.weights)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    return dict(PackedQuantizationCompressor.compress(state, quant))


def library_decompress(parts: dict[str, torch.Tensor], quant: QuantizationScheme | None = None) -> torch.Tensor:
    return PackedQuantizationCompressor.decompress(dict(parts), quant or scheme())["weight"]


def tiny_config(**overrides) -> DeepseekV3Config:
    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


@dataclass
class Int4Case:
    base_dir: Path  # the INT4 checkpoint
    dequantized_dir: Path  # INT4 weights as the library dequantizes them, stored float32: what the adapter trained on
    adapter_dir: Path
    quantized: tuple[str, ...]  # logical weight names (`<module>.weight`) stored pack-quantized
    cross_shard: tuple[str, ...]  # of those, the ones whose weight_scale is stored in another shard than weight_packed
    ignore: tuple[str, ...]  # the config's ignore list


def build(root: Path, *, seed: int = 0) -> Int4Case:
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = tiny_config()
    model = DeepseekV3ForCausalLM(config)
    source = root / "source"
    model.save_pretrained(source)  # per-expert tensors on disk, as the release stores them
    tensors = load_file(str(source / "model.safetensors"))
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = 0.1 * torch.randn(tensors[name].shape, generator=gen)
        elif "norm" in name:
            tensors[name] = 1 + 0.05 * torch.randn(tensors[name].shape, generator=gen)

    stored: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    quantized = []
    for name, value in sorted(tensors.items()):
        match = EXPERT.match(name)
        if name.endswith("e_score_correction_bias"):
            stored[name] = dequantized[name] = value.float()
        elif match is None:
            stored[name] = value.to(torch.bfloat16)
            dequantized[name] = stored[name].float()
        else:
            parts = library_compress(value.to(torch.bfloat16))
            stored.update({f"{match['module']}.{role}": tensor for role, tensor in parts.items()})
            dequantized[name] = library_decompress(parts).float()
            quantized.append(name)

    ignore = tuple(
        sorted(
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not re.search(r"\.experts\.\d+\.", name)
        )
    )
    base_dir = root / "base"
    cross = _write_shards(base_dir, stored)
    cfg = {
        **config.to_dict(),
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "torch_dtype": "bfloat16",
    }
    (base_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    quantization = QuantizationConfig(
        config_groups={"group_0": scheme()},
        format="pack-quantized",
        ignore=list(ignore),
        quantization_status="compressed",
    )
    ModelCompressor(quantization_config=quantization).update_config(str(base_dir))
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Fake"}))

    dequantized_dir = root / "dequantized"
    dequantized_dir.mkdir(parents=True)
    save_file(dequantized, str(dequantized_dir / "model.safetensors"), metadata={"format": "pt"})
    (dequantized_dir / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": "float32"}))

    adapter_dir = root / "adapter"
    reference = DeepseekV3ForCausalLM.from_pretrained(dequantized_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=ATTENTION,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    save_perturbed_adapter(reference, lora, adapter_dir, gen)
    return Int4Case(base_dir, dequantized_dir, adapter_dir, tuple(quantized), cross, ignore)


def _write_shards(directory: Path, tensors: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Four shards by layer; the weight_scale of layer 1's experts goes to the next shard, away from its weight."""
    directory.mkdir(parents=True)

    def shard_of(name: str) -> int:
        if name.startswith("lm_head") or name == "model.norm.weight":
            return 4
        match = re.match(r"model\.layers\.(\d+)\.", name)
        layer = int(match[1]) if match else 0  # the embeddings go with layer 0
        if layer == 1 and name.endswith(".weight_scale"):
            return 3  # layer 1's expert scales live with layer 2
        return layer + 1

    save_sharded(directory, tensors, shard_of, 4)
    cross = sorted(
        name.removesuffix("_scale")
        for name in tensors
        if name.endswith(".weight_scale") and shard_of(name) != shard_of(name.removesuffix("_scale") + "_packed")
    )
    return tuple(cross)
