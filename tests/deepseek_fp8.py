"""A tiny DeepSeek-V3-shaped FP8 checkpoint and a PEFT adapter trained on its dequantized weights, built here.

What it has, like the 671B release: FP8 e4m3 weights with float32 128×128 block scales (`weight_scale_inv`),
dimensions that are not multiples of 128 (ragged scale grids, `kv_a_proj_with_mqa` included), a dense first layer,
MoE layers with per-expert `nn.Linear` tensors and a shared expert, a bf16 router and an fp32
`e_score_correction_bias`, bf16 embeddings, norms and `lm_head`, a multi-token-prediction block stored as the layer
after the last (its own attention, experts, `enorm`/`hnorm`/`eh_proj`/`shared_head`), several shards, and weights
whose scale grid sits in another shard.

The quantizer here is written independently of the tool's (an expanded scale grid, the textbook formula), so the
tests compare two implementations.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from checkpoint_tools import save_perturbed_adapter, save_sharded
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

BLOCK = 128
LAYERS = 3  # layer 0 dense, 1-2 MoE; layer 3 is the MTP block
MTP = LAYERS
QUANTIZED = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.(shared_experts|experts\.\d+)\.(gate_proj|up_proj|down_proj))\.weight$"
)
ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def tiny_config(**overrides) -> DeepseekV3Config:
    kwargs = dict(
        vocab_size=256,
        hidden_size=192,  # 1.5 blocks: every weight touching the hidden size has a ragged edge
        intermediate_size=320,
        moe_intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=160,
        kv_lora_rank=128,
        qk_rope_head_dim=32,  # kv_a_proj_with_mqa: (128 + 32) × 192, a 2 × 2 grid with ragged edges
        qk_nope_head_dim=32,
        v_head_dim=48,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        num_nextn_predict_layers=1,
    )
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def reference_quantize(weight: torch.Tensor, *, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook block quantization with an expanded scale grid (slow, obvious)."""
    rows, cols = weight.shape
    grid = torch.zeros(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            block = weight[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            scale = max(block.abs().max().item(), 1e-4) / 448.0
            if ue8m0:
                scale = 2.0 ** math.ceil(math.log2(scale))
            grid[i, j] = scale
    expanded = grid.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    codes = (weight / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, grid


def reference_dequantize(codes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    expanded = grid.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return codes.to(torch.float32) * expanded


@dataclass
class Fp8Case:
    base_dir: Path  # the FP8 checkpoint
    dequantized_dir: Path  # the same model, every FP8 weight dequantized to float32: what the adapter trained on
    adapter_dir: Path
    quantized: tuple[str, ...]  # FP8 weight names
    cross_shard: tuple[str, ...]  # FP8 weights whose scale grid is stored in another shard
    mtp_tensors: tuple[str, ...]


def _mtp_block(layer: dict[str, torch.Tensor], hidden: int, vocab: int, gen: torch.Generator) -> dict:
    """Layer `MTP`: a copy of an MoE layer's tensors under the next index, plus the MTP-only tensors."""
    block = {k.replace(".layers.2.", f".layers.{MTP}."): v.clone() for k, v in layer.items()}
    prefix = f"model.layers.{MTP}."
    block[prefix + "enorm.weight"] = torch.ones(hidden) + 0.01 * torch.randn(hidden, generator=gen)
    block[prefix + "hnorm.weight"] = torch.ones(hidden) + 0.01 * torch.randn(hidden, generator=gen)
    block[prefix + "eh_proj.weight"] = 0.02 * torch.randn(hidden, 2 * hidden, generator=gen)
    block[prefix + "shared_head.norm.weight"] = torch.ones(hidden)
    block[prefix + "shared_head.head.weight"] = 0.02 * torch.randn(vocab, hidden, generator=gen)
    block[prefix + "embed_tokens.weight"] = 0.02 * torch.randn(vocab, hidden, generator=gen)
    return block


def build(root: Path, *, ue8m0: bool = False, model_type: str = "deepseek_v3", seed: int = 0) -> Fp8Case:
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
    layer2 = {k: v for k, v in tensors.items() if k.startswith("model.layers.2.")}
    tensors.update(_mtp_block(layer2, config.hidden_size, config.vocab_size, gen))

    fp8: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    quantized = []
    for name, value in sorted(tensors.items()):
        if QUANTIZED.search(name):
            codes, grid = reference_quantize(value.float(), ue8m0=ue8m0)
            fp8[name] = codes
            fp8[name + "_scale_inv"] = grid
            dequantized[name] = reference_dequantize(codes, grid)
            quantized.append(name)
        elif name.endswith("e_score_correction_bias"):
            fp8[name] = value.float()
            dequantized[name] = value.float()
        else:
            fp8[name] = value.to(torch.bfloat16)
            dequantized[name] = value.to(torch.bfloat16).float()

    base_dir = root / "base"
    cross = _write_shards(base_dir, fp8)
    cfg = config.to_dict()
    cfg.update(
        model_type=model_type,
        torch_dtype="bfloat16",
        quantization_config={
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
            **({"scale_fmt": "ue8m0"} if ue8m0 else {}),
        },
    )
    (base_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Fake"}))

    dequantized_dir = root / "dequantized"
    dequantized_dir.mkdir(parents=True)
    # Without the MTP block, which transformers does not load (it would only list its tensors as unexpected).
    dequantized = {k: v for k, v in dequantized.items() if not k.startswith(f"model.layers.{MTP}.")}
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
    mtp = tuple(sorted(n for n in fp8 if n.startswith(f"model.layers.{MTP}.")))
    return Fp8Case(base_dir, dequantized_dir, adapter_dir, tuple(quantized), cross, mtp)


def _write_shards(directory: Path, tensors: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Four shards by layer; the scale grids of layer 1's attention go to the next shard, away from their weight."""
    directory.mkdir(parents=True)

    def shard_of(name: str) -> int:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        layer = int(match[1]) if match else -1
        if layer == 1 and ".self_attn." in name and name.endswith("_scale_inv"):
            return 3  # layer 1's attention scales live with layer 2
        return {-1: 1, 0: 1, 1: 2, 2: 3, 3: 4}[layer]

    save_sharded(directory, tensors, shard_of, 4)
    cross = [
        name.removesuffix("_scale_inv")
        for name in tensors
        if name.endswith("_scale_inv") and shard_of(name) != shard_of(name.removesuffix("_scale_inv"))
    ]
    return tuple(sorted(cross))
