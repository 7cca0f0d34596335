"""PEFT's own LoRA test matrix (the cases of its tests/test_custom_models.py) beyond the zoo's transformers models.

Tiny torch models, wrapped with the real PEFT, saved as a base checkpoint and an adapter, merged by the tool and
compared bit for bit with PEFT's `merge_and_unload()` of the same model: nn.MultiheadAttention, VeLoRA, MonteCLoRA,
BD-LoRA. Where PEFT cannot merge (a grouped convolution) or the tool cannot yet (quantized bases), planning refuses
in one line that says so, before anything is written.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import zoo
from checkpoint_tools import write_checkpoint
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import BdLoraConfig, MontecloraConfig, VeloraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prefect_lora_merge.cli import main
from prefect_lora_merge.core.errors import AdapterMismatchError, UnsupportedAdapterError, UnsupportedBaseError
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import make_plan


class MLP(nn.Module):
    """PEFT's `MLP` test model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


class ModelMha(nn.Module):
    """PEFT's `ModelMha` test model: an nn.MultiheadAttention followed by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.mha(x, x, x)
        return self.lin0(x)


class ModelConv2dGroups(nn.Module):
    """PEFT's `ModelConv2DGroups`: a Conv2d with groups > 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(4, 8, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d(x)


def build(tmp_path: Path, model: nn.Module, config: LoraConfig, *, dtype=torch.float32, train_step=False):
    """Save `model` as a base checkpoint and PEFT's adapter for it; return (base, adapter, PEFT's merged state)."""
    torch.manual_seed(0)
    model = model.to(dtype)
    base = write_checkpoint(tmp_path / "base", {k: v.detach().clone() for k, v in model.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # every factor random, also the ones PEFT starts at zero (BD-LoRA's B)
            for name, param in peft_model.named_parameters():
                if param.requires_grad and ".lora_" in name:
                    param.add_(0.3 * torch.randn_like(param))
        if train_step:  # VeLoRA fills its projection in a training forward
            peft_model.train()
            peft_model(torch.randn(6, 10, dtype=dtype)).sum().backward()
        peft_model.save_pretrained(tmp_path / "adapter")
        merged = peft_model.merge_and_unload().state_dict()
    return base, tmp_path / "adapter", {k: v.detach().clone() for k, v in merged.items()}


def output_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_bit_identical(ours: dict[str, torch.Tensor], peft: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == peft.keys()
    differ = [k for k in peft if ours[k].dtype != peft[k].dtype or not torch.equal(_bits(ours[k]), _bits(peft[k]))]
    assert not differ, f"not bit-identical to PEFT's merge_and_unload(): {differ}"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def changed(base: Path, merged: dict[str, torch.Tensor]) -> set[str]:
    original = output_tensors(base)
    return {k for k in original if not torch.equal(original[k], merged[k])}


# -- nn.MultiheadAttention --------------------------------------------------------------------------------------


MHA_CONFIG = dict(
    target_modules=["mha", "lin0"],
    r=4,
    # PEFT gives the out_proj the attention module's alpha: an alpha_pattern for "mha" must reach it too
    alpha_pattern={"mha": 32},
    lora_alpha=8,
    init_lora_weights=False,
)


@pytest.mark.parametrize("lora_bias", [False, True], ids=["plain", "lora_bias"])
def test_multihead_attention_lora_merges_into_in_proj_and_out_proj_bit_for_bit_like_peft(tmp_path, lora_bias):
    base, adapter, peft = build(tmp_path, ModelMha(), LoraConfig(**MHA_CONFIG, lora_bias=lora_bias))
    expected = {"mha.in_proj_weight", "mha.out_proj.weight", "lin0.weight"}
    assert changed(base, peft) >= expected  # PEFT's merge really changed them: the comparison is not vacuous
    result = merge_checkpoint(str(base), str(adapter), str(tmp_path / "out"))
    assert result.report.passed, result.report.failures
    assert_bit_identical(output_tensors(tmp_path / "out"), peft)
    assert any("nn.MultiheadAttention mha" in d and "twice" in d for d in result.plan.decisions)


def test_multihead_attention_in_bf16_rounds_as_peft_merging_the_bf16_model_does(tmp_path):
    """PEFT's MultiheadAttention.merge adds ΔW.to(bf16) in bf16: one rounding more than a Linear's merge, which
    the fp32 merge rounded once would not reproduce."""
    base, adapter, peft = build(tmp_path, ModelMha(), LoraConfig(**MHA_CONFIG), dtype=torch.bfloat16)
    result = merge_checkpoint(str(base), str(adapter), str(tmp_path / "out"))
    assert result.report.passed, result.report.failures
    assert_bit_identical(output_tensors(tmp_path / "out"), peft)


@pytest.mark.usefixtures("prefect_server")
def test_multihead_attention_merge_through_the_cli_validates_against_base_and_adapter(tmp_path, capsys):
    base, adapter, peft = build(tmp_path, ModelMha(), LoraConfig(**MHA_CONFIG))
    out = tmp_path / "out"
    args = ["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--device", "cpu"]
    assert main(["run", *args]) == 0
    assert main(["validate", "--output", str(out), "--base", str(base), "--adapter", str(adapter)]) == 0
    assert "passed" in capsys.readouterr().out
    assert_bit_identical(output_tensors(out), peft)


# -- LoRA variants whose merge is the plain delta ----------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        dict(velora_config=VeloraConfig(num_groups=2, init_type="batch_average")),
        dict(velora_config=VeloraConfig(num_groups=2, init_type="random")),
        dict(monteclora_config=MontecloraConfig(num_samples=2)),
    ],
    ids=["velora_batch_average", "velora_random", "monteclora"],
)
def test_velora_and_monteclora_merge_the_plain_lora_delta_leaving_out_their_training_tensors(tmp_path, variant):
    config = LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, init_lora_weights=False, **variant)
    base, adapter, peft = build(tmp_path, MLP(), config, train_step=True)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        extra = [k for k in f.keys() if not k.endswith(("lora_A.weight", "lora_B.weight"))]
    assert extra, "the variant saved no training-only tensors: nothing would be tested"
    result = merge_checkpoint(str(base), str(adapter), str(tmp_path / "out"))
    assert result.report.passed, result.report.failures
    assert_bit_identical(output_tensors(tmp_path / "out"), peft)
    assert any("training-only" in d for d in result.plan.decisions)


def test_an_unknown_tensor_beside_velora_training_tensors_is_still_refused(tmp_path):
    config = LoraConfig(target_modules=["lin0"], r=4, init_lora_weights=False, velora_config=VeloraConfig(num_groups=2))
    base, adapter, _ = build(tmp_path, MLP(), config, train_step=True)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.lin0.lora_velora_extra"] = torch.zeros(5)  # not a tensor VeLoRA saves
    tensors["base_model.model.lin1.lora_velora_embed"] = torch.zeros(10)  # lin1 has no LoRA factors
    save_file(tensors, str(path))
    with pytest.raises(AdapterMismatchError) as error:
        make_plan(str(base), str(adapter), str(tmp_path / "out"))
    assert "lin0.lora_velora_extra" in str(error.value) and "lin1.lora_velora_embed" in str(error.value)


# -- BD-LoRA -----------------------------------------------------------------------------------------------------


def test_bd_lora_block_diagonal_factors_are_expanded_as_peft_merges_them(tmp_path):
    bd = BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)
    config = LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, use_bdlora=bd)
    base, adapter, peft = build(tmp_path, MLP(), config)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:  # stored as the blocks side by side
        assert f.get_slice("base_model.model.lin0.lora_A.weight").get_shape() == [4, 5]
        assert f.get_slice("base_model.model.lin1.lora_B.weight").get_shape() == [2, 2]
    result = merge_checkpoint(str(base), str(adapter), str(tmp_path / "out"))
    assert result.report.passed, result.report.failures
    ours = output_tensors(tmp_path / "out")
    assert changed(base, ours) == {"lin0.weight", "lin1.weight"}
    assert_bit_identical(ours, peft)


# -- what PEFT cannot merge either -------------------------------------------------------------------------------


def test_a_lora_on_a_grouped_convolution_is_refused_as_groups_above_one_not_as_another_base(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    model = ModelConv2dGroups()
    write_checkpoint(base, {k: v.detach().clone() for k, v in model.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(target_modules=["conv2d"], init_lora_weights=False))
        peft_model.save_pretrained(adapter)
        with pytest.raises(NotImplementedError, match="groups > 1"):  # the oracle: PEFT refuses too
            peft_model.merge_and_unload()
    with pytest.raises(UnsupportedAdapterError) as error:
        make_plan(str(base), str(adapter), str(tmp_path / "out"))
    message = str(error.value)
    assert "groups > 1" in message and "conv2d.weight" in message and "groups = 2" in message
    assert "trained on this base" not in message
    assert not (tmp_path / "out").exists()


# -- quantized bases ---------------------------------------------------------------------------------------------


def _llama(directory: Path, **overrides):
    from transformers import LlamaForCausalLM

    config = zoo._tiny_llama_config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, **overrides
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return model


def _adapter(model, directory: Path, targets: list[str], **config) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(target_modules=targets, init_lora_weights=False, **config))
        peft_model.save_pretrained(directory)
        peft_model.unload()
    return directory


@pytest.fixture(scope="module")
def unquantized_llama(tmp_path_factory):
    """A tiny llama, an adapter on q_proj, one on lm_head (which quantizers leave alone)."""
    root = tmp_path_factory.mktemp("llama")
    model = _llama(root / "base")
    return root, _adapter(model, root / "q_proj", ["q_proj"]), _adapter(model, root / "lm_head", ["lm_head"])


def assert_quantized_refusal(base: Path, adapter: Path, out: Path, *fragments: str) -> None:
    with pytest.raises(UnsupportedBaseError) as error:
        make_plan(str(base), str(adapter), str(out))
    message = str(error.value)
    for fragment in fragments + (
        "bases are not supported yet",
        "(the tool merges into block-FP8",
        "merge into the unquantized base",
    ):
        assert fragment in message, message
    assert "\n" not in message and "does not fit" not in message and "trained on this base" not in message


def assert_merges_untouched_quantized_tensors_as_bytes(base: Path, adapter: Path, out: Path, **options) -> None:
    result = merge_checkpoint(str(base), str(adapter), str(out), **options)
    assert result.report.passed, result.report.failures
    original, merged = load_file(str(base / "model.safetensors")), output_tensors(out)
    assert [k for k in original if not torch.equal(_bits(original[k]), _bits(merged[k]))] == ["lm_head.weight"]


def _rewrite(base: Path, target: Path, rewrite, quantization_config: dict) -> Path:
    """A copy of a one-shard checkpoint with some tensors replaced by quantized ones, as a quantizer saves them."""
    shutil.copytree(base, target)
    tensors = load_file(str(target / "model.safetensors"))
    save_file(rewrite(tensors), str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return target


def _packed(tensors):
    """Every projection as compressed-tensors stores a 4-bit packed Linear (codes and scales arbitrary here)."""
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        out, inp = tensors.pop(name).shape
        module = name.removesuffix(".weight")
        tensors[f"{module}.weight_packed"] = torch.randint(
            -(2**31), 2**31 - 1, (out, inp // 8), generator=gen, dtype=torch.int32
        )
        tensors[f"{module}.weight_scale"] = (0.01 * torch.rand(out, inp // 32, generator=gen) + 1e-3).to(torch.bfloat16)
        tensors[f"{module}.weight_shape"] = torch.tensor([out, inp])
    return tensors


def _compressed_tensors_config(fmt: str) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"],
    }


def test_an_adapter_on_a_compressed_tensors_pack_quantized_base_merges_into_its_packed_weights(unquantized_llama):
    root, q_proj, _ = unquantized_llama
    base = _rewrite(root / "base", root / "w4a16", _packed, _compressed_tensors_config("pack-quantized"))
    original = load_file(str(base / "model.safetensors"))
    kept = merge_checkpoint(str(base), str(q_proj), str(root / "w4a16-keep"), output_dtype="keep")
    assert kept.report.passed, kept.report.failures
    merged = output_tensors(root / "w4a16-keep")
    changed = sorted(k for k in original if not torch.equal(_bits(original[k]), _bits(merged[k])))
    assert changed == ["model.layers.0.self_attn.q_proj.weight_packed", "model.layers.0.self_attn.q_proj.weight_scale"]
    dequantized = merge_checkpoint(str(base), str(q_proj), str(root / "w4a16-bf16"))
    assert dequantized.report.passed, dequantized.report.failures
    written = output_tensors(root / "w4a16-bf16")
    assert written["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert not [k for k in written if k.endswith(("weight_packed", "weight_scale", "weight_shape"))]


def test_pack_quantized_settings_this_tool_cannot_merge_are_refused_naming_the_option_only_when_touched(
    unquantized_llama,
):
    root, q_proj, lm_head = unquantized_llama
    config = _compressed_tensors_config("pack-quantized")
    config["config_groups"]["group_0"]["weights"]["symmetric"] = False
    base = _rewrite(root / "base", root / "asymmetric", _packed, config)
    assert_quantized_refusal(
        base,
        q_proj,
        root / "asymmetric-out",
        "is a quantized checkpoint (compressed-tensors pack-quantized",
        "config_groups.group_0.weights has symmetric false",
        "q_proj.weight_packed",
    )
    assert_merges_untouched_quantized_tensors_as_bytes(base, lm_head, root / "asymmetric-lm_head")


def test_a_bf16_output_is_refused_where_quantized_weights_it_cannot_dequantize_would_lose_their_config(
    unquantized_llama,
):
    """Two config groups: the experts-like projections in a group the tool merges, the others in one it cannot;
    bf16 would drop quantization_config under the ones left quantized."""
    root, _, lm_head = unquantized_llama
    config = _compressed_tensors_config("pack-quantized")
    other = json.loads(json.dumps(config["config_groups"]["group_0"]))
    other["weights"]["num_bits"] = 8
    config["config_groups"] = {
        "group_0": {**config["config_groups"]["group_0"], "targets": ["re:.*mlp.*"]},
        "group_1": {**other, "targets": ["re:.*self_attn.*"]},
    }
    base = _rewrite(root / "base", root / "mixed", _packed, config)
    with pytest.raises(
        UnsupportedBaseError, match="--output-dtype bf16 dequantizes .*num_bits 8.*use --output-dtype keep"
    ):
        make_plan(str(base), str(lm_head), str(root / "mixed-out"))
    kept = merge_checkpoint(str(base), str(lm_head), str(root / "mixed-keep"), output_dtype="keep")
    assert kept.report.passed, kept.report.failures


def test_a_compressed_tensors_format_this_tool_does_not_merge_is_refused_by_name(unquantized_llama):
    root, q_proj, lm_head = unquantized_llama
    base = _rewrite(root / "base", root / "nvfp4", _packed, _compressed_tensors_config("nvfp4-pack-quantized"))
    assert_quantized_refusal(
        base,
        q_proj,
        root / "nvfp4-out",
        "is a quantized checkpoint (compressed-tensors nvfp4-pack-quantized",
        "q_proj.weight_packed",
    )
    assert_merges_untouched_quantized_tensors_as_bytes(base, lm_head, root / "nvfp4-lm_head")


def test_an_adapter_on_a_gpt_oss_mxfp4_base_merges_into_its_experts(tmp_path):
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GptOssForCausalLM(config)
    model.save_pretrained(tmp_path / "bf16")
    experts = _adapter(model, tmp_path / "experts", [], target_parameters=["mlp.experts.gate_up_proj"])
    lm_head = _adapter(model, tmp_path / "lm_head", ["lm_head"])

    def mxfp4(tensors):  # GPT-OSS's own layout: e2m1 code pairs in blocks of 32 values, one e8m0 scale per block
        for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            experts_, inp, out = tensors.pop(name).shape
            tensors[f"{name}_blocks"] = torch.zeros(experts_, out, inp // 32, 16, dtype=torch.uint8)
            tensors[f"{name}_scales"] = torch.full((experts_, out, inp // 32), 127, dtype=torch.uint8)
        return tensors

    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    base = _rewrite(tmp_path / "bf16", tmp_path / "mxfp4", mxfp4, quantization)
    result = merge_checkpoint(str(base), str(experts), str(tmp_path / "out"), output_dtype="keep")
    assert result.report.passed, result.report.failures
    assert result.plan.quantized_format == "MXFP4"
    touched = sorted(t.name for shard in result.plan.shards for t in shard.touched)
    assert touched == ["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert_merges_untouched_quantized_tensors_as_bytes(base, lm_head, tmp_path / "lm_head-out", output_dtype="keep")
