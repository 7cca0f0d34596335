"""QLoRA test models: a tiny 16-bit llama, its bitsandbytes 4-bit and 8-bit checkpoints as transformers saves them,
and a LoRA adapter trained a few steps through the 4-bit forward (real bitsandbytes on the CPU).

The oracle is bitsandbytes itself: `oracle_weights` loads a quantized checkpoint with transformers and dequantizes
every quantized Linear with `bitsandbytes.functional`, as PEFT's own merge of a 4-bit model does."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# One layer's MLP has 200 input features: 4-bit blocks of 64 then straddle rows, and the last double-quantization
# block of absmax values is a short one.
CONFIG = dict(
    vocab_size=96, hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD = "120KB"  # several shards for every checkpoint
NF4 = dict(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)  # fmt: skip
QUANTIZATIONS = {
    "nf4": NF4,
    "nf4-single": {**NF4, "bnb_4bit_use_double_quant": False},
    # FSDP-QLoRA stores the packed codes in the weights' dtype (same bytes, another shape)
    "nf4-bf16-storage": {**NF4, "bnb_4bit_quant_storage": torch.bfloat16},
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


@dataclass
class QloraCase:
    root: Path
    base16: Path  # the bf16 checkpoint the quantized ones were made from
    quantized: dict[str, Path]  # QUANTIZATIONS key -> transformers' save of that quantized load
    adapter: Path  # trained through the nf4 (double quantization) forward
    tokens: torch.Tensor
    trained_logits: torch.Tensor  # the trained 4-bit PeftModel's, float32


def _quiet():
    warnings.simplefilter("ignore")


def load_quantized(directory: Path, **quantization):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(**quantization) if quantization else None
    return LlamaForCausalLM.from_pretrained(
        directory, quantization_config=config, device_map="cpu", torch_dtype=torch.bfloat16
    )


def build(root: Path, steps: int = 4, lr: float = 2e-3) -> QloraCase:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    with warnings.catch_warnings():
        _quiet()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
        model.save_pretrained(root / "base16", max_shard_size=SHARD)
        quantized = {}
        for name, settings in QUANTIZATIONS.items():
            load_quantized(root / "base16", **settings).save_pretrained(root / name, max_shard_size=SHARD)
            quantized[name] = root / name
        # QLoRA: LoRA on every Linear of the nf4 load, a few Adam steps on a fixed batch
        four_bit = load_quantized(root / "base16", **NF4)
        peft_model = get_peft_model(four_bit, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        tokens = torch.randint(0, CONFIG["vocab_size"], (4, 24), generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
        peft_model.train()
        for _ in range(steps):
            peft_model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        peft_model.eval()
        _portable_cpu_forward(peft_model)
        with torch.no_grad():
            logits = peft_model(input_ids=tokens).logits.float()
        peft_model.save_pretrained(root / "adapter")
    return QloraCase(root, root / "base16", quantized, root / "adapter", tokens, logits)


def _portable_cpu_forward(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks every 4-bit weight in place at its first inference
    forward for a faster kernel, which asserts out_features divisible by 32 (our 200-feature MLP deliberately is not).
    Keep the portable dequantize-then-matmul forward, the same on every CPU and the one a merge reproduces."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def oracle_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every quantized Linear weight of a bitsandbytes checkpoint as bitsandbytes dequantizes it (4-bit: in the
    dtype it was quantized from; LLM.int8: float32), by name."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        _quiet()
        model = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", torch_dtype=torch.bfloat16)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[f"{name}.weight"] = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights[f"{name}.weight"] = F.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    return weights


def peft_deltas(base16: Path, adapter: Path, model_class=None) -> dict[str, torch.Tensor]:
    """PEFT's float32 ΔW of every module the adapter targets (in the weight's own orientation), by weight name."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model_class = model_class or LlamaForCausalLM
    with warnings.catch_warnings():
        _quiet()
        model = PeftModel.from_pretrained(model_class.from_pretrained(base16, torch_dtype=torch.float32), adapter)
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[f"{name}.weight"] = module.get_delta_weight("default").float()
    return deltas


def logits_of(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """A merged output loaded as a plain bf16 model (no bitsandbytes), its float32 logits."""
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        _quiet()
        model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
