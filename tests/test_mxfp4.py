"""MXFP4 (GPT-OSS experts) as a weight format: transformers' own dequantization is the oracle for decoding, an
independent textbook encoder (tests/gpt_oss_mxfp4.py) for the quantizer's rule, and transformers' loader for the
fixture."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gpt_oss_mxfp4 import E2M1, build, reference_dequantize, reference_quantize
from peft import PeftModel
from safetensors.torch import load_file
from transformers import GptOssForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from prefect_lora_merge.core import tiling
from prefect_lora_merge.core.errors import CheckpointFormatError
from prefect_lora_merge.core.formats import mxfp4
from prefect_lora_merge.core.formats.base import NonFiniteValues, TensorRef
from prefect_lora_merge.core.formats.mxfp4 import Mxfp4, dequantize, quantize, requantize
from prefect_lora_merge.core.safetensors_format import layout, read_header
from prefect_lora_merge.core.storage import Location

FORMAT = Mxfp4()
GPT_OSS_CONFIG = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gpt_oss_mxfp4"))


def _stored(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _refs(directory) -> dict[str, TensorRef]:
    location = Location.parse(str(directory))
    refs = {}
    for path in sorted(directory.glob("*.safetensors")):
        header = read_header(location, path.name)
        refs.update({e.name: TensorRef(file=path.name, data_start=header.data_start, entry=e) for e in header.tensors})
    return refs


def _header_refs(specs: list[tuple[str, str, tuple[int, ...]]]) -> dict[str, TensorRef]:
    return {e.name: TensorRef(file="model-00001-of-00001.safetensors", data_start=8, entry=e) for e in layout(specs)}


def _every_code_with_every_scale() -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [2, 256, 8, 16] and scales [2, 256, 8] in which each of the 256 bytes meets each of the 256 scale
    bytes (0 and 255 included) once."""
    block = torch.arange(4096)
    scales = (block % 256).to(torch.uint8).view(2, 256, 8)
    blocks = ((block // 256)[:, None] * 16 + torch.arange(16)).to(torch.uint8).view(2, 256, 8, 16)
    return blocks, scales


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    integer = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(integer), b.view(integer))


# -- decoding ------------------------------------------------------------------------------------------------------


def test_the_e2m1_table_is_the_one_transformers_decodes_with():
    assert tuple(FP4_VALUES) == E2M1 + tuple(-v for v in E2M1)
    assert mxfp4.FP4_VALUES == tuple(FP4_VALUES)
    assert [math.copysign(1, v) for v in mxfp4.FP4_VALUES[8:]] == [-1.0] * 8  # code 8 is -0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_gives_transformers_bits_for_every_code_with_every_scale_byte(dtype):
    blocks, scales = _every_code_with_every_scale()
    ours = dequantize(blocks, scales, dtype)
    assert _same_bits(ours, convert_moe_packed_tensors(blocks, scales, dtype=dtype))
    assert ours.shape == (2, 8 * 32, 256)  # [E, in, out]: transformers' transposed layout


def test_dequantize_is_exact_textbook_arithmetic_low_nibble_first():
    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8)
    scales = torch.randint(100, 140, (3, 40, 4), dtype=torch.uint8)
    assert torch.equal(dequantize(blocks, scales).double(), reference_dequantize(blocks, scales))
    one = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    one[0, 0, 0, 0] = 0x72  # low nibble 2 (1.0) is input 0, high nibble 7 (6.0) input 1
    assert dequantize(one, torch.full((1, 1, 1), 128, dtype=torch.uint8))[0, :3, 0].tolist() == [2.0, 12.0, 0.0]


def test_dequantize_hands_the_merge_the_whole_float32_weight_once():
    blocks, scales = _every_code_with_every_scale()
    scales = scales.clamp(100, 150)
    seen = []

    def merge(values, rows, cols):
        seen.append((values.shape, values.dtype, rows, cols))
        return values * 2

    out = dequantize(blocks, scales, torch.bfloat16, merge=merge)
    assert seen == [((2, 256, 256), torch.float32, slice(None), slice(None))]
    assert torch.equal(out, (dequantize(blocks, scales) * 2).to(torch.bfloat16))


# -- the quantizer's rule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1.0, 0.02, 3e-5])
def test_quantize_writes_the_bytes_of_the_round_up_reference_rule(size):
    torch.manual_seed(1)
    values = size * torch.randn(3, 96, 200)
    values[0, :32, 0] = 0.0  # an all-zero block: scale byte 0
    values[0, :32, 1] = -0.0  # signed zeros keep their sign (code 8)
    values[2, :32, 3] = torch.tensor([1e-38, -3e-40] * 16)  # amax / 6 below 2^-126: the scale stays 2^-126
    # Every tie (to the even code), and a 0.5 (see the next-but-four test for blocks without a ±0.5 or ±1.5).
    values[1, :32, 2] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 3 + [0.5] * 8)
    blocks, scales = quantize(values)
    expected_blocks, expected_scales = reference_quantize(values)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(blocks, expected_blocks)
    assert scales[0, 0, 0] == 0 and blocks[0, 1, 0].tolist() == [0x88] * 16
    assert scales[2, 3, 0] == 1


def test_tiles_give_the_bytes_of_whole_experts(monkeypatch):
    torch.manual_seed(2)
    values = 0.02 * torch.randn(3, 160, 96)
    whole = quantize(values)
    monkeypatch.setattr(tiling, "TILE_VALUES", 2 * 32 * 96)  # two block groups a tile: three tiles an expert
    tiled = quantize(values)
    assert all(torch.equal(a, b) for a, b in zip(whole, tiled, strict=True))
    assert torch.equal(dequantize(*tiled), dequantize(*whole))


def test_an_untouched_weight_pushed_through_dequantize_and_quantize_reproduces_its_bytes(case):
    stored = _stored(case.base_dir)
    for name in case.quantized:
        blocks, scales = stored[f"{name}_blocks"], stored[f"{name}_scales"]
        again = quantize(dequantize(blocks, scales))
        assert torch.equal(again[0], blocks), name
        assert torch.equal(again[1], scales), name


def test_quantize_is_idempotent_on_its_own_output_at_every_scale():
    torch.manual_seed(3)
    values = torch.randn(2, 320, 64) * torch.logspace(-30, 30, 64)  # scale bytes from ~20 to ~230
    blocks, scales = quantize(values)
    assert int(scales.min()) < 40 and int(scales.max()) > 210
    again = quantize(dequantize(blocks, scales))
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def test_a_block_whose_largest_value_rounds_to_3_keeps_its_scale_where_round_up_would_halve_it():
    # amax / scale = 3.2 rounds to 3: ROUND_UP's scale for these values, and its bytes ...
    values = torch.zeros(1, 32, 1)
    values[0, :4, 0] = torch.tensor([3.2, 0.5, 1.5, -1.0])
    blocks, scales = quantize(values)
    assert torch.equal(blocks, reference_quantize(values)[0]) and torch.equal(scales, reference_quantize(values)[1])
    assert scales.item() == 127 and blocks[0, 0, 0, :2].tolist() == [0x15, 0xA3]
    decoded = dequantize(blocks, scales)
    # ... but ROUND_UP run on what they decode to picks half the scale and doubled codes (3 -> 6): same values,
    # other bytes, so the reference rule is not idempotent. Ours keeps the larger scale.
    reference_again = reference_quantize(decoded)
    assert reference_again[1].item() == 126
    assert torch.equal(reference_dequantize(*reference_again), decoded.double())
    again = quantize(decoded)
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def test_a_block_of_codes_that_all_have_halves_is_stored_at_the_larger_of_its_two_scales():
    values = torch.zeros(1, 32, 1)
    values[0, :4, 0] = torch.tensor([6.0, 1.0, -2.0, 3.0])  # no ±0.5 or ±1.5: (2^0, 6 1 2 3) = (2^1, 3 .5 1 1.5)
    blocks, scales = quantize(values)
    assert reference_quantize(values)[1].item() == 127  # where ROUND_UP stores it
    assert scales.item() == 128 and blocks[0, 0, 0, :2].tolist() == [0x15, 0x3A]
    assert torch.equal(dequantize(blocks, scales), values)  # the same values either way


def test_nan_or_inf_to_quantize_is_refused():
    for bad in (math.nan, math.inf, -math.inf):
        values = torch.zeros(2, 32, 4)
        values[1, 5, 3] = bad
        with pytest.raises(NonFiniteValues):
            quantize(values)


# -- re-quantization -----------------------------------------------------------------------------------------------


def test_requantize_is_quantize_of_the_merged_weight_with_exact_survival_figures(monkeypatch):
    monkeypatch.setattr(tiling, "TILE_VALUES", 2 * 32 * 200)  # tiles of two block groups
    torch.manual_seed(3)
    blocks, scales = quantize(0.02 * torch.randn(3, 128, 200))
    delta = 0.002 * torch.einsum("eir,ero->eio", torch.randn(3, 128, 4), torch.randn(3, 4, 200))
    base = dequantize(blocks, scales)
    new_blocks, new_scales, survival = requantize(
        blocks, scales, lambda values, rows, cols: values + delta[rows, cols], tensor="w"
    )
    expected_blocks, expected_scales = quantize(base + delta)
    assert torch.equal(new_blocks, expected_blocks)
    assert torch.equal(new_scales, expected_scales)
    intended = ((base + delta) - base).double().flatten()
    realised = (dequantize(new_blocks, new_scales) - base).double().flatten()
    assert survival.tensor == "w"
    cosine = float(intended @ realised / (intended.norm() * realised.norm()))
    assert survival.cosine == pytest.approx(cosine, abs=1e-6)
    assert survival.relative_norm == pytest.approx(float(realised.norm() / intended.norm()), rel=1e-6)
    assert survival.relative_error == pytest.approx(float((realised - intended).norm() / intended.norm()), rel=1e-5)
    assert 0 < survival.cosine < 1, "a delta this small loses part of itself to e2m1 rounding"


def test_requantize_refuses_merged_values_with_nan():
    blocks, scales = quantize(torch.randn(2, 64, 8))

    def merge(values, rows, cols):
        values = values.clone()
        values[1, 3, 2] = math.nan
        return values

    with pytest.raises(NonFiniteValues):
        requantize(blocks, scales, merge, tensor="w")


def test_the_format_class_round_trips_parts_by_role(case):
    refs = _refs(case.base_dir)
    weight = FORMAT.detect(GPT_OSS_CONFIG, refs, "base")["model.layers.1.mlp.experts.gate_up_proj"]
    stored = _stored(case.base_dir)
    parts = {role: stored[ref.entry.name] for role, ref in weight.parts.items()}
    values = FORMAT.dequantize(weight, parts)
    assert values.shape == weight.shape
    assert FORMAT.quantize(weight, values).keys() == {"blocks", "scales"}
    two_experts = FORMAT.quantize(weight, values[1:3].reshape(-1, weight.shape[2]))  # a run of whole experts, 2-D
    assert torch.equal(two_experts["blocks"], parts["blocks"][1:3])
    new_parts, survival = FORMAT.requantize(weight, parts, lambda v, rows, cols: v.clone())
    assert all(torch.equal(new_parts[r], parts[r]) for r in parts)
    assert survival.relative_norm == 0.0 and survival.tensor == weight.name


# -- detection -----------------------------------------------------------------------------------------------------


def test_detect_finds_every_expert_weight_with_the_shape_transformers_gives_it(case):
    refs = _refs(case.base_dir)
    config = json.loads((case.base_dir / "config.json").read_text())
    found = FORMAT.detect(config, refs, "base")
    assert sorted(found) == sorted(case.quantized)
    bf16 = load_file(str(case.dequantized_dir / "model.safetensors"))
    for name, weight in found.items():
        assert weight.format == "mxfp4" and weight.primary == "blocks"
        assert weight.shape == tuple(bf16[name].shape)  # [E, in, out], as a bf16 GPT-OSS checkpoint stores it
        assert weight.stored_names == (f"{name}_blocks", f"{name}_scales")
    down = found["model.layers.0.mlp.experts.down_proj"]
    assert down.shape == (4, 64, 96)
    assert down.parts["blocks"].file != down.parts["scales"].file  # scales in another shard are found
    assert case.cross_shard == ("model.layers.0.mlp.experts.down_proj",)


def test_detect_reads_quantization_config_under_text_config(case):
    config = {"model_type": "x", "text_config": {"quantization_config": {"quant_method": "mxfp4"}}}
    assert sorted(FORMAT.detect(config, _refs(case.base_dir), "base")) == sorted(case.quantized)


@pytest.mark.parametrize(
    "config",
    [{}, {"quantization_config": {"quant_method": "fp8"}}, {"quantization_config": "mxfp4"}],
    ids=["no quantization_config", "another method", "not an object"],
)
def test_detect_finds_nothing_in_a_base_not_declared_mxfp4(case, config):
    assert FORMAT.detect(config, _refs(case.base_dir), "base") == {}


def test_detect_refuses_broken_mxfp4_tensors_naming_each_one():
    p = "model.layers.{}.mlp.experts.gate_up_proj"
    refs = _header_refs(
        [
            (f"{p.format(0)}_blocks", "U8", (4, 128, 3, 16)),  # no scales
            (f"{p.format(1)}_blocks", "BF16", (4, 128, 3, 16)),
            (f"{p.format(1)}_scales", "U8", (4, 128, 3)),
            (f"{p.format(2)}_blocks", "U8", (4, 128, 6, 8)),
            (f"{p.format(2)}_scales", "U8", (4, 128, 6)),
            (f"{p.format(3)}_blocks", "U8", (4, 128, 3, 16)),
            (f"{p.format(3)}_scales", "U8", (4, 128, 4)),
            (f"{p.format(4)}_scales", "U8", (4, 128, 3)),  # no blocks
        ]
    )
    with pytest.raises(CheckpointFormatError) as raised:
        FORMAT.detect(GPT_OSS_CONFIG, refs, "s3://bucket/gpt-oss/config.json")
    message = str(raised.value)
    assert message.startswith("s3://bucket/gpt-oss/config.json: not an MXFP4 checkpoint")
    assert f"{p.format(0)}_blocks (model-00001-of-00001.safetensors) has no {p.format(0)}_scales" in message
    assert f"{p.format(1)}_blocks (model-00001-of-00001.safetensors) is BF16; MXFP4 blocks are U8" in message
    assert f"{p.format(2)}_blocks (model-00001-of-00001.safetensors) has shape [4, 128, 6, 8]" in message
    assert f"{p.format(3)}_scales (model-00001-of-00001.safetensors) is U8 [4, 128, 4]" in message
    assert f"{p.format(4)}_scales (model-00001-of-00001.safetensors) has no {p.format(4)}_blocks" in message


def test_detect_refuses_blocks_stored_beside_an_unquantized_copy_of_the_same_weight():
    p = "model.layers.0.mlp.experts.gate_up_proj"
    refs = _header_refs(
        [(f"{p}_blocks", "U8", (4, 128, 3, 16)), (f"{p}_scales", "U8", (4, 128, 3)), (p, "BF16", (4, 96, 128))]
    )
    with pytest.raises(
        CheckpointFormatError, match=f"{p}_blocks .* is stored beside an unquantized {p} .*remove the stale"
    ):
        FORMAT.detect(GPT_OSS_CONFIG, refs, "base")


def test_detect_refuses_an_mxfp4_config_over_a_base_without_blocks():
    refs = _header_refs([("model.layers.0.mlp.experts.gate_up_proj", "BF16", (4, 96, 128))])
    with pytest.raises(CheckpointFormatError, match="quant_method is mxfp4 but no tensor is named <weight>_blocks"):
        FORMAT.detect(GPT_OSS_CONFIG, refs, "base")


# -- validation hooks ----------------------------------------------------------------------------------------------


def test_decode_of_the_part_rows_of_whole_experts_is_the_dequantized_rows(case):
    refs = _refs(case.base_dir)
    stored = _stored(case.base_dir)
    for weight in FORMAT.detect(GPT_OSS_CONFIG, refs, "base").values():
        experts, inputs, out = weight.shape
        assert FORMAT.row_alignment(weight) == inputs
        whole = FORMAT.dequantize(weight, {r: stored[ref.entry.name] for r, ref in weight.parts.items()})
        rows = slice(1 * inputs, 3 * inputs)  # experts 1 and 2
        as_read = {}
        for role, ref in weight.parts.items():
            tensor = stored[ref.entry.name]
            as_read[role] = tensor.reshape(-1, tensor.shape[-1])[FORMAT.part_rows(weight, role, rows)]
        assert as_read["blocks"].shape == (2 * out * inputs // 32, 16)
        assert as_read["scales"].shape == (2 * out, inputs // 32)
        decoded = FORMAT.decode(weight, as_read, rows)
        assert decoded.dtype == torch.float64
        assert torch.equal(decoded, whole.reshape(-1, out)[rows].double())
        relative, absolute = FORMAT.rounding(weight, as_read, rows)
        assert absolute.shape == decoded.shape


def test_the_rounding_bound_holds_for_every_value_and_is_reached_at_ties():
    torch.manual_seed(4)
    values = torch.randn(2, 256, 48) * torch.logspace(-3, 1, 48)
    values[0, :32, 0] = torch.tensor([6.0, 5.0, 2.5, 0.25, 0.5, 0.0, 0.0, 0.0] * 4)  # ties at scale 1
    blocks, scales = quantize(values)
    weight = _weight(values.shape)
    as_read = {"blocks": blocks.reshape(-1, 16), "scales": scales.reshape(-1, scales.shape[-1])}
    relative, absolute = FORMAT.rounding(weight, as_read, slice(0, 512))
    error = (dequantize(blocks, scales) - values).double().abs().reshape(-1, 48)
    assert bool((error <= relative * values.double().abs().reshape(-1, 48) + absolute).all())
    assert relative == 0.2  # half the step 2 at 5 (and 1 at 2.5) is a fifth of the value
    assert error[0:4, 0].tolist() == [0.0, 1.0, 0.5, 0.25]
    assert absolute[0, 0] == 0.25  # a quarter of the scale: the half step below 2


def _weight(shape):
    experts, inputs, out = shape
    refs = _header_refs(
        [("w_blocks", "U8", (experts, out, inputs // 32, 16)), ("w_scales", "U8", (experts, out, inputs // 32))]
    )
    return FORMAT.detect(GPT_OSS_CONFIG, refs, "base")["w"]


# -- the fixture ---------------------------------------------------------------------------------------------------


def test_transformers_loads_the_mxfp4_fixture_on_cpu_as_its_dequantized_twin(case):
    model, info = GptOssForCausalLM.from_pretrained(
        case.base_dir, quantization_config=Mxfp4Config(dequantize=True), output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}
    twin = load_file(str(case.dequantized_dir / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(twin)
    assert all(torch.equal(state[k].to(twin[k].dtype), twin[k]) for k in twin)
    stored = _stored(case.base_dir)
    for name in case.quantized:  # and the tool's dequantize, rounded to bf16, is that twin
        ours = dequantize(stored[f"{name}_blocks"], stored[f"{name}_scales"], torch.bfloat16)
        assert _same_bits(ours, twin[name])
    _, plain = GptOssForCausalLM.from_pretrained(case.dequantized_dir, output_loading_info=True)
    assert {k: v for k, v in plain.items() if v} == {}


def test_the_fixture_is_a_gpt_oss_mxfp4_checkpoint_in_several_shards(case):
    config = json.loads((case.base_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_oss"
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert "model.layers.*.self_attn" in config["quantization_config"]["modules_to_not_convert"]
    index = json.loads((case.base_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    refs = _refs(case.base_dir)
    assert refs["model.layers.0.mlp.experts.gate_up_proj_blocks"].entry.shape == (4, 128, 3, 16)
    assert refs["model.layers.0.mlp.experts.gate_up_proj_scales"].entry.shape == (4, 128, 3)
    assert refs["model.layers.0.mlp.experts.gate_up_proj_bias"].entry.dtype == "BF16"
    assert "model.layers.0.mlp.experts.gate_up_proj" not in refs


def test_the_fixture_adapter_updates_fused_experts_as_e_i_o_einsum_of_expert_blocks_of_a_and_b(case):
    """What PEFT's target_parameters LoRA does to GPT-OSS's [E, in, out] experts: A (E·r, in) gives expert e rows
    e·r..e·r+r, B (out, E·r) gives it every E-th column; ΔW[e] = scale · (B_e A_e)^T."""
    base = GptOssForCausalLM.from_pretrained(case.dequantized_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, case.adapter_dir).merge_and_unload().state_dict()
    adapter = load_file(str(case.adapter_dir / "adapter_model.safetensors"))
    config = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    scale = config["lora_alpha"] / config["r"]
    prefix = "base_model.model.model.layers.0.mlp.experts."
    for param, nesting in (("gate_up_proj", "base_layer."), ("down_proj", "")):  # PEFT nests the second target
        A, B = adapter[f"{prefix}{nesting}lora_A.weight"], adapter[f"{prefix}{nesting}lora_B.weight"]
        name = f"model.layers.0.mlp.experts.{param}"
        experts, inputs, out = before[name].shape
        assert A.shape == (experts * 4, inputs) and B.shape == (out, experts * 4)
        delta = torch.einsum("ore,eri->eio", B.reshape(out, 4, experts), A.reshape(experts, 4, inputs)) * scale
        torch.testing.assert_close(merged[name] - before[name], delta, rtol=0, atol=1e-6)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert not torch.equal(merged[name], before[name])
