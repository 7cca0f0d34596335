"""A zoo of tiny base checkpoints + PEFT adapters, and the PEFT oracle every merge is compared against.

Every model is built from a transformers config class with random weights (nothing is downloaded), saved sharded
(>= 3 safetensors shards + `model.safetensors.index.json`) so shard handling is exercised, and paired with a PEFT
adapter whose trainable tensors were overwritten with random values: PEFT initialises `lora_B` to zero, and a
zero adapter would let a merge that ignores it pass.

Usage: `case = CASES[name](directory)`; `peft_merged_state_dict(case)` is the reference result.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    ResNetConfig,
    ResNetForImageClassification,
)
from transformers.utils import logging as transformers_logging

# Progress bars from every from_pretrained/save_pretrained drown test output.
transformers_logging.disable_progress_bar()

INDEX_NAME = "model.safetensors.index.json"
# Minimum number of shards each base checkpoint must have, so cross-shard bookkeeping is exercised.
MIN_SHARDS = 3


@dataclass
class Case:
    """One base checkpoint + adapter pair, with what a correct merge of it must change."""

    name: str
    base_dir: Path
    adapter_dir: Path
    model_cls: type[PreTrainedModel]
    dtype: torch.dtype
    # Checkpoint tensor names (as stored in the base shards) the merge must change: one per adapter key type, so a
    # test can assert that none of them is silently dropped.
    expect_changed: tuple[str, ...] = ()
    # Maps a tensor name written by `save_pretrained` of the in-memory model to the name the base checkpoint stores.
    # Identity except for checkpoints we deliberately rewrote into an older key layout.
    saved_to_checkpoint_key: Callable[[str], str] = field(default=lambda key: key)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- helpers


def _shard_size_for(model: torch.nn.Module, dtype: torch.dtype, shards: int = 5) -> int:
    """A `max_shard_size` (bytes) that splits this model into about `shards` files."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(
        t.numel() * (itemsize if t.is_floating_point() else t.element_size()) for t in model.state_dict().values()
    )
    return max(total // shards, 1)


def _save_base(model: PreTrainedModel, directory: Path, dtype: torch.dtype) -> None:
    model.to(dtype)
    model.save_pretrained(directory, max_shard_size=_shard_size_for(model, dtype))
    # A hand-written tokenizer config: a non-weight side file a merger is expected to carry over unchanged.
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "tokenizer_class": "Fake"}))
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert (directory / INDEX_NAME).exists() and len(shards) >= MIN_SHARDS, f"{directory}: only {shards}"


def _randomize_trainable(peft_model: torch.nn.Module, seed: int) -> list[str]:
    """Give every trainable adapter tensor non-trivial random values; return their names.

    Additive noise turns zero-initialised `lora_B` into random matrices and perturbs full copies
    (modules_to_save, trainable-token rows, biases) away from the base values. DoRA magnitudes are scaled
    multiplicatively instead so they stay positive and of the order of the weight row norms.
    """
    gen = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                param.mul_((1 + 0.2 * noise).to(param.dtype))
            else:
                param.add_((0.05 * noise).to(param.dtype))
            names.append(name)
    return names


def _build_adapter(
    model: PreTrainedModel, lora_config: LoraConfig, adapter_dir: Path, seed: int, notes: list[str]
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, lora_config)
        _randomize_trainable(peft_model, seed)
        peft_model.save_pretrained(adapter_dir)
    for w in caught:
        message = str(w.message).splitlines()[0]
        # transformers' own deprecation noise says nothing about the adapter.
        if "is_gradient_checkpointing" not in message:
            notes.append(f"PEFT warning: {message}")


def adapter_keys(adapter_dir: Path) -> dict[str, tuple[list[int], str]]:
    """`{key: (shape, dtype)}` of an adapter_model.safetensors, for notes and debugging."""
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _dirs(root: Path, name: str) -> tuple[Path, Path]:
    base, adapter = Path(root) / name / "base", Path(root) / name / "adapter"
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    return base, adapter


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------------- builders


def build_llama_linear(root: Path) -> Case:
    """Plain LoRA on every Llama linear layer, with a rank pattern hitting one layer and an alpha pattern."""
    name = "llama_linear"
    base_dir, adapter_dir = _dirs(root, name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config())
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_LINEAR,
        # Only layer 0's q_proj gets rank 8; every down_proj gets alpha 32 (scale 8 instead of 2).
        rank_pattern={"layers.0.self_attn.q_proj": 8},
        alpha_pattern={"down_proj": 32},
    )
    _build_adapter(model, config, adapter_dir, seed=1, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        LlamaForCausalLM,
        torch.float32,
        expect_changed=(
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
        notes=notes,
    )


def build_llama_rslora_bf16(root: Path) -> Case:
    """rsLoRA (scale alpha/sqrt(r)) on a bfloat16 base: the merge must round once from fp32 to bf16."""
    name = "llama_rslora_bf16"
    base_dir, adapter_dir = _dirs(root, name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config())
    _save_base(model, base_dir, torch.bfloat16)
    notes: list[str] = []
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=LLAMA_LINEAR,
        rank_pattern={"layers.0.self_attn.q_proj": 8},
        alpha_pattern={"down_proj": 32},
    )
    # The adapter is trained on the bf16 model, as one would; PEFT keeps adapter weights in fp32
    # (autocast_adapter_dtype=True), so the adapter file is fp32 while the base is bf16.
    _build_adapter(model, config, adapter_dir, seed=2, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        LlamaForCausalLM,
        torch.bfloat16,
        expect_changed=("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"),
        notes=notes,
    )


def build_llama_dora(root: Path) -> Case:
    """DoRA on every linear layer and on the input embedding (embedding LoRA + DoRA)."""
    name = "llama_dora"
    base_dir, adapter_dir = _dirs(root, name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config())
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=[*LLAMA_LINEAR, "embed_tokens"])
    notes.append(
        "Embedding keys have no `.weight`: lora_embedding_A (r, vocab), lora_embedding_B (hidden, r), "
        "lora_magnitude_vector (hidden,); PEFT also saves embed_tokens.base_layer.weight (equal to the base)."
    )
    _build_adapter(model, config, adapter_dir, seed=3, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        LlamaForCausalLM,
        torch.float32,
        expect_changed=("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"),
        notes=notes,
    )


def _tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    # Random init leaves biases at zero; make them non-zero so a dropped `bias="all"` copy is visible.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.02)
    return model


def build_llama_extras(root: Path) -> Case:
    """lora_bias + bias="all" + modules_to_save + trainable tokens (Qwen2: q/k/v have biases, Llama has none)."""
    name = "llama_extras"
    base_dir, adapter_dir = _dirs(root, name)
    model = _tiny_qwen2()
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        # Only q/k/v: PEFT cannot merge lora_bias into a layer without a bias (Qwen2 o_proj), it raises at merge.
        target_modules=["q_proj", "k_proj", "v_proj"],
        lora_bias=True,
        bias="all",
        modules_to_save=["lm_head"],
        trainable_token_indices=[3, 5, 7],
    )
    notes.append(
        "bias='all' saves `<module>.base_layer.bias` (full replacement) next to `lora_B.bias` (scaled delta); PEFT's "
        "save warns that the 1-D lora_B.bias looks like an un-gathered ZeRO-3 shard (false positive)."
    )
    _build_adapter(model, config, adapter_dir, seed=4, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        Qwen2ForCausalLM,
        torch.float32,
        expect_changed=(
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",  # lora_B.bias and the bias="all" copy
            "lm_head.weight",  # modules_to_save
            "model.embed_tokens.weight",  # trainable_token_indices rows
        ),
        notes=notes,
    )


def build_qwen2_embed_lora(root: Path) -> Case:
    """LoRA on embed_tokens (PEFT also saves `embed_tokens.base_layer.weight`) plus bias="lora_only" copies.

    Split from llama_extras: PEFT refuses trainable_token_indices on a LoRA-wrapped embedding (TypeError) and
    lora_bias on an Embedding (ValueError).
    """
    name = "qwen2_embed_lora"
    base_dir, adapter_dir = _dirs(root, name)
    model = _tiny_qwen2()
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["embed_tokens", "q_proj", "k_proj", "v_proj"],
        bias="lora_only",
    )
    _build_adapter(model, config, adapter_dir, seed=5, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        Qwen2ForCausalLM,
        torch.float32,
        expect_changed=(
            "model.embed_tokens.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.self_attn.k_proj.bias",
        ),
        notes=notes,
    )


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # bos/eos default to 50256, outside the tiny vocab (transformers warns): point them inside it.
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _build_gpt2(root: Path, name: str, use_dora: bool, seed: int) -> Case:
    base_dir, adapter_dir = _dirs(root, name)
    model = _tiny_gpt2()
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    # Conv1D stores weights as (in, out): fan_in_fan_out=True transposes the delta.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_dora=use_dora
    )
    _build_adapter(model, config, adapter_dir, seed=seed, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        GPT2LMHeadModel,
        torch.float32,
        expect_changed=(
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.attn.c_proj.weight",
            "transformer.h.1.mlp.c_fc.weight",
            "transformer.h.1.mlp.c_proj.weight",
        ),
        notes=notes,
    )


def build_gpt2_conv1d(root: Path) -> Case:
    """GPT-2 Conv1D layers (fan_in_fan_out), tied embeddings untouched."""
    return _build_gpt2(root, "gpt2_conv1d", use_dora=False, seed=6)


def build_gpt2_dora(root: Path) -> Case:
    """DoRA on GPT-2 Conv1D layers: the weight norm must be taken on the un-transposed (out, in) weight."""
    return _build_gpt2(root, "gpt2_dora", use_dora=True, seed=7)


def build_tied_llama(root: Path) -> Case:
    """tie_word_embeddings=True with LoRA on both embed_tokens and lm_head: both deltas land in one stored tensor."""
    name = "tied_llama"
    base_dir, adapter_dir = _dirs(root, name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config(tie_word_embeddings=True))
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"])
    notes.append(
        "PEFT merges both deltas into the shared tensor in module order, (W + d_embed) + d_lm_head; the merged model's "
        "logits differ from the unmerged PeftModel's (no single tensor can hold both), PEFT issue #2777."
    )
    _build_adapter(model, config, adapter_dir, seed=8, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        LlamaForCausalLM,
        torch.float32,
        expect_changed=("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"),
        notes=notes,
    )


def build_tied_llama_ensure(root: Path) -> Case:
    """Like tied_llama but with `ensure_weight_tying=True`: PEFT ties lm_head's LoRA to the embedding's
    (lm_head.lora_A == lora_embedding_B.T, lm_head.lora_B == lora_embedding_A.T) and still saves both, so
    `merge_and_unload()` adds the same delta twice to the shared tensor."""
    name = "tied_llama_ensure"
    base_dir, adapter_dir = _dirs(root, name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config(tie_word_embeddings=True))
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True)
    notes.append(
        "ensure_weight_tying: saved target_modules lose `lm_head` (['embed_tokens', 'model.embed_tokens']) but the "
        "lm_head.lora_A/B keys are still written; merge_and_unload gives W + 2*d_embed while the unmerged model "
        "computes with W + d_embed."
    )
    _build_adapter(model, config, adapter_dir, seed=13, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        LlamaForCausalLM,
        torch.float32,
        expect_changed=("model.embed_tokens.weight",),
        notes=notes,
    )


def _llava_legacy_key(key: str) -> str:
    """transformers v5 already writes `language_model.model.*` / `language_model.lm_head.*` for Llava; the
    original llava-hf checkpoints also nest the CLIP tower as `vision_tower.vision_model.*`."""
    # Idempotent: a model loaded from the legacy files already saves `vision_tower.vision_model.*` (transformers
    # remembers the load-time renaming), one built from a config saves `vision_tower.*`.
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


def _rewrite_checkpoint_keys(directory: Path, rename: Callable[[str], str]) -> None:
    """Rename every tensor in place, keeping the shard layout and the index consistent."""
    index_path = directory / INDEX_NAME
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        path = directory / shard
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, path, metadata=metadata)
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _build_llava(root: Path, name: str, legacy_vision: bool, seed: int) -> Case:
    base_dir, adapter_dir = _dirs(root, name)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = LlavaConfig(vision_config=vision, text_config=_tiny_llama_config(), image_token_id=100)
    model = LlavaForConditionalGeneration(config)
    _save_base(model, base_dir, torch.float32)
    notes = [
        "transformers 5 save_pretrained writes Llava's language model in the legacy language_model.model.* / "
        "language_model.lm_head.* layout, and the CLIP tower as vision_tower.* (no vision_model.)."
    ]
    tower = "vision_tower."
    if legacy_vision:
        _rewrite_checkpoint_keys(base_dir, _llava_legacy_key)
        tower = "vision_tower.vision_model."
        notes.append("zoo renamed vision_tower.* -> vision_tower.vision_model.* (llava-hf / transformers 4 layout)")
    # Guard: transformers must load the checkpoint to the same weights, else the case itself is invalid.
    reloaded = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    expected = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[key]), f"{name}: reload changed {key}"
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        # Regex: language-model q/v only (not the CLIP q/v), the k x k patch conv, and both projector linears.
        target_modules=r".*language_model.*\.(q_proj|v_proj)|.*patch_embedding|.*multi_modal_projector\.linear_[12]",
    )
    _build_adapter(model, lora, adapter_dir, seed=seed, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        LlavaForConditionalGeneration,
        torch.float32,
        expect_changed=(
            "language_model.model.layers.0.self_attn.q_proj.weight",
            "language_model.model.layers.1.self_attn.v_proj.weight",
            f"{tower}embeddings.patch_embedding.weight",
            "multi_modal_projector.linear_1.weight",
            "multi_modal_projector.linear_2.weight",
        ),
        saved_to_checkpoint_key=_llava_legacy_key if legacy_vision else (lambda key: key),
        notes=notes,
    )


def build_llava_legacy(root: Path) -> Case:
    """Llava in the llava-hf (transformers 4) key layout; adapter trained on the v5 in-memory module names."""
    return _build_llava(root, "llava_legacy", legacy_vision=True, seed=9)


def build_llava_v5_saved(root: Path) -> Case:
    """Llava exactly as transformers 5 saves it (vision tower without `vision_model.`)."""
    return _build_llava(root, "llava_v5_saved", legacy_vision=False, seed=14)


def tiny_mixtral_config(**overrides) -> MixtralConfig:
    """A two-layer Mixtral of four experts, two per token."""
    kwargs = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


def build_mixtral_fused(root: Path) -> Case:
    """Mixtral: fused 3-D experts in memory, per-expert w1/w2/w3 on disk, LoRA via target_parameters."""
    name = "mixtral_fused"
    base_dir, adapter_dir = _dirs(root, name)
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config())
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    notes.append(
        "Nesting follows the experts module's parameter registration order, not the config list (saved sorted as "
        "['mlp.experts.down_proj', 'mlp.experts.gate_up_proj']): `mlp.experts.base_layer.lora_*` is gate_up_proj "
        "(A (E*r, H), B (2I, E*r)), `mlp.experts.lora_*` is down_proj (A (E*r, I), B (H, E*r)). On disk w1 = "
        "gate_up[:, :I], w3 = gate_up[:, I:], w2 = down_proj[e]."
    )
    _build_adapter(model, lora, adapter_dir, seed=10, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        MixtralForCausalLM,
        torch.float32,
        expect_changed=(
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.block_sparse_moe.experts.0.w1.weight",
            "model.layers.0.block_sparse_moe.experts.3.w3.weight",
            "model.layers.1.block_sparse_moe.experts.2.w2.weight",
        ),
        notes=notes,
    )


def _tiny_resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=3)
    return ResNetForImageClassification(config)


def build_conv_1x1(root: Path) -> Case:
    """LoRA on the 1x1 bottleneck convolutions of a ResNet (and its shortcut projections)."""
    name = "conv_1x1"
    base_dir, adapter_dir = _dirs(root, name)
    model = _tiny_resnet()
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=r".*(layer\.0|layer\.2|shortcut)\.convolution")
    notes.append("1x1 conv LoRA: lora_A (r, in, 1, 1), lora_B (out, r, 1, 1); int64 BatchNorm num_batches_tracked.")
    _build_adapter(model, lora, adapter_dir, seed=11, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        ResNetForImageClassification,
        torch.float32,
        expect_changed=(
            "resnet.encoder.stages.0.layers.0.layer.0.convolution.weight",
            "resnet.encoder.stages.1.layers.0.shortcut.convolution.weight",
        ),
        notes=notes,
    )


def build_conv_dora(root: Path) -> Case:
    """DoRA on 1x1 and 3x3 convolutions: the norm runs over every dim but the output channel."""
    name = "conv_dora"
    base_dir, adapter_dir = _dirs(root, name)
    model = _tiny_resnet()
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    lora = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=r".*layer\.[012]\.convolution")
    notes.append("Conv DoRA magnitude is saved with shape (1, out, 1, 1), not (out,).")
    _build_adapter(model, lora, adapter_dir, seed=12, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        ResNetForImageClassification,
        torch.float32,
        expect_changed=(
            "resnet.encoder.stages.0.layers.0.layer.0.convolution.weight",
            "resnet.encoder.stages.0.layers.0.layer.1.convolution.weight",
        ),
        notes=notes,
    )


def build_gpt_oss_experts(root: Path) -> Case:
    """GPT-OSS stores fused experts (E, in, out) (`is_transposed`); with hidden == intermediate the down_proj is
    square, so only the architecture, not the shape, says which way the delta goes."""
    name = "gpt_oss_experts"
    base_dir, adapter_dir = _dirs(root, name)
    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        layer_types=["full_attention"] * 2,
        tie_word_embeddings=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GptOssForCausalLM(config)
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    lora = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    _build_adapter(model, lora, adapter_dir, seed=13, notes=notes)
    return Case(
        name,
        base_dir,
        adapter_dir,
        GptOssForCausalLM,
        torch.float32,
        expect_changed=("model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"),
        notes=notes,
    )


def build_gpt2_mixed_fan_in_fan_out(root: Path) -> Case:
    """Conv1D and nn.Linear targets in one adapter: PEFT forces fan_in_fan_out per module type and saves the value
    it set last (False, for lm_head), which is wrong for the square Conv1D `attn.c_proj`."""
    name = "gpt2_mixed_fan_in_fan_out"
    base_dir, adapter_dir = _dirs(root, name)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False)
    )
    _save_base(model, base_dir, torch.float32)
    notes: list[str] = []
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_proj", "lm_head"], fan_in_fan_out=True)
    _build_adapter(model, lora, adapter_dir, seed=14, notes=notes)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"]
    notes.append(f"saved fan_in_fan_out={saved}")
    return Case(
        name,
        base_dir,
        adapter_dir,
        GPT2LMHeadModel,
        torch.float32,
        expect_changed=("transformer.h.0.attn.c_proj.weight", "lm_head.weight"),
        notes=notes,
    )


CASES: dict[str, Callable[[Path], Case]] = {
    "llama_linear": build_llama_linear,
    "llama_rslora_bf16": build_llama_rslora_bf16,
    "llama_dora": build_llama_dora,
    "llama_extras": build_llama_extras,
    "qwen2_embed_lora": build_qwen2_embed_lora,
    "gpt2_conv1d": build_gpt2_conv1d,
    "gpt2_dora": build_gpt2_dora,
    "tied_llama": build_tied_llama,
    "tied_llama_ensure": build_tied_llama_ensure,
    "llava_legacy": build_llava_legacy,
    "llava_v5_saved": build_llava_v5_saved,
    "mixtral_fused": build_mixtral_fused,
    "conv_1x1": build_conv_1x1,
    "conv_dora": build_conv_dora,
    "gpt_oss_experts": build_gpt_oss_experts,
    "gpt2_mixed_fan_in_fan_out": build_gpt2_mixed_fan_in_fan_out,
}


# ----------------------------------------------------------------------------------------------------- oracle


def loaded_state_dict(path: Path | str, case: Case) -> dict[str, torch.Tensor]:
    """The state dict transformers builds from a checkpoint directory, in the case's dtype."""
    model = case.model_cls.from_pretrained(str(path), dtype=case.dtype)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _peft_merged_model(case: Case) -> PreTrainedModel:
    # fp32 load: a bf16 base upcasts exactly, so PEFT merges in fp32 and the result is rounded once below.
    model = case.model_cls.from_pretrained(str(case.base_dir), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(case.adapter_dir))
        return peft_model.merge_and_unload()


def peft_merged_state_dict(case: Case) -> dict[str, torch.Tensor]:
    """PEFT's `merge_and_unload()` result in fp32, rounded once to the case's dtype."""
    merged = _peft_merged_model(case)
    # Integer buffers (BatchNorm's num_batches_tracked) keep their dtype, as `from_pretrained(dtype=...)` does.
    return {
        k: v.detach().to(case.dtype if v.is_floating_point() else v.dtype).clone()
        for k, v in merged.state_dict().items()
    }


def read_checkpoint(directory: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors checkpoint, as stored (no renaming, no dtype change)."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def peft_changed_checkpoint_keys(case: Case, scratch: Path) -> set[str]:
    """Names of the base checkpoint's tensors that PEFT's merge changes.

    The merged model is written with `save_pretrained` (transformers reverses its load-time conversions, e.g.
    fused MoE experts back to per-expert tensors) and mapped to the base's key layout, then compared tensor by
    tensor in the case's dtype.
    """
    merged = _peft_merged_model(case).to(case.dtype)
    merged.save_pretrained(scratch)
    saved = {case.saved_to_checkpoint_key(k): v for k, v in read_checkpoint(scratch).items()}
    base = read_checkpoint(case.base_dir)
    unknown = sorted(set(saved) - set(base))
    assert not unknown, f"{case.name}: oracle checkpoint has keys the base lacks: {unknown[:5]}"
    return {k for k, v in saved.items() if not torch.equal(v, base[k])}


def build_adapter_for(case: Case, adapter_dir: Path, lora_config: LoraConfig, seed: int) -> Path:
    """Another random PEFT adapter for `case`'s base, as a second training run would save it."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model = case.model_cls.from_pretrained(str(case.base_dir), dtype=torch.float32)
    _build_adapter(model, lora_config, adapter_dir, seed=seed, notes=[])
    return adapter_dir
