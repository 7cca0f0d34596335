"""compressed-tensors INT4 pack-quantized weights (Kimi-K2-Thinking, K2.5, K2.6): the format module against the
library itself.

The oracle is compressed-tensors: its `calculate_qparams` (what its min-max observer computes), its
`PackedQuantizationCompressor.compress` / `decompress` and its `pack_to_int32` / `unpack_from_int32`.
"""

from __future__ import annotations

import copy
import json
import math
import re
import struct

import pytest
import torch
from checkpoint_tools import shards
from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from kimi_int4 import GROUP, build, library_compress, library_decompress, scheme
from safetensors.torch import load_file
from transformers import DeepseekV3ForCausalLM

from prefect_lora_merge.core import tiling
from prefect_lora_merge.core.errors import CheckpointFormatError
from prefect_lora_merge.core.formats import int4_packed
from prefect_lora_merge.core.formats.base import NonFiniteValues, QuantizedWeight, TensorRef
from prefect_lora_merge.core.formats.int4_packed import (
    Int4PackQuantized,
    dequantize,
    pack,
    quantize,
    requantize,
    unmergeable_settings,
    unpack,
)
from prefect_lora_merge.core.safetensors_format import TensorEntry, dtype_name

FORMAT = Int4PackQuantized()
SCALE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [((64, 256), 32), ((37, 512), 128), ((300, 96), 32), ((5, 1024), 128)]

# Kimi-K2-Thinking's config.json quantization_config, in the shape its release ships it (an ignore list of the
# Linears that stay bf16, the weights' observer and actorder fields, kv_cache_scheme null).
KIMI_QUANTIZATION = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": 32,
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
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}
KIMI_CONFIG = {
    "model_type": "kimi_k2",
    "architectures": ["DeepseekV3ForCausalLM"],
    "quantization_config": KIMI_QUANTIZATION,
}
EXPERT = "model.layers.1.mlp.experts.7.down_proj"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build(tmp_path_factory.mktemp("kimi-int4"))


def _library(weight: torch.Tensor, group: int | None = GROUP) -> tuple[dict[str, torch.Tensor], QuantizationScheme]:
    """The library's parts of a weight, in the weight's dtype; `group=None`: one scale per row (strategy channel)."""
    if group is None:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
        quant = QuantizationScheme(targets=["Linear"], weights=args)
        from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
        from compressed_tensors.quantization.utils import calculate_qparams

        scale, zero_point = calculate_qparams(weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True), args)
        state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
        return dict(PackedQuantizationCompressor.compress(state, quant)), quant
    quant = scheme(group)
    return library_compress(weight, quant), quant


def _random(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Weights with rows of different sizes and an all-zero group (its scale is the dtype's eps)."""
    gen = torch.Generator().manual_seed(seed)
    weight = 0.02 * torch.randn(shape, generator=gen) * (0.1 + 10 * torch.rand(shape[0], 1, generator=gen))
    weight[0, :32] = 0
    return weight.to(dtype)


def _entry(name: str, dtype: str, shape: tuple[int, ...]) -> TensorEntry:
    return TensorEntry(name=name, dtype=dtype, shape=shape, begin=0, end=0)


def _refs(modules: dict[str, tuple[int, int]], *, group: int = GROUP, scale_dtype: str = "BF16") -> dict:
    """Header-only refs of pack-quantized modules {name: (out, in)}, the scales in another shard."""
    refs = {}
    for module, (out, inn) in modules.items():
        for name, dtype, shape, file in (
            (f"{module}.weight_packed", "I32", (out, inn // 8), "a.safetensors"),
            (f"{module}.weight_scale", scale_dtype, (out, math.ceil(inn / group)), "b.safetensors"),
            (f"{module}.weight_shape", "I64", (2,), "a.safetensors"),
        ):
            refs[name] = TensorRef(file=file, data_start=8, entry=_entry(name, dtype, shape))
    return refs


def _weight(
    shape: tuple[int, int], group: int, scale_dtype: torch.dtype, *, with_shape: bool = True
) -> QuantizedWeight:
    refs = _refs({"m": shape}, group=group, scale_dtype=dtype_name(scale_dtype))
    if not with_shape:
        del refs["m.weight_shape"]
    quantization = {**KIMI_QUANTIZATION, "config_groups": copy.deepcopy(KIMI_QUANTIZATION["config_groups"])}
    quantization["config_groups"]["group_0"]["weights"]["group_size"] = group
    return FORMAT.detect({"quantization_config": quantization}, refs, "base")["m.weight"]


def _parts(library_parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"packed": library_parts["weight_packed"], "scale": library_parts["weight_scale"]} | (
        {"shape": library_parts["weight_shape"]} if "weight_shape" in library_parts else {}
    )


# -- the layout ----------------------------------------------------------------------------------------------------


def test_nibbles_are_offset_binary_values_in_input_order_as_the_library_packs_them():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(2).reshape(1, 32)
    words = pack(codes)
    assert torch.equal(words, pack_to_int32(codes, 4))
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [0x76543210, 0xFEDCBA98] * 2  # value 0 in the low nibble
    random = torch.randint(-8, 8, (33, 96), dtype=torch.int8)
    assert torch.equal(pack(random), pack_to_int32(random, 4))
    assert torch.equal(unpack(pack(random)).to(torch.int8) - 8, unpack_from_int32(pack(random), 4, random.shape))


# -- dequantize ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize(("shape", "group"), SHAPES)
def test_dequantize_is_the_library_decompress_bit_for_bit(shape, group, scale_dtype):
    parts, quant = _library(_random(shape, scale_dtype), group)
    expected = library_decompress(parts, quant)
    assert expected.dtype == scale_dtype
    ours = dequantize(parts["weight_packed"], parts["weight_scale"], group, dtype=scale_dtype)
    assert torch.equal(ours, expected)
    assert torch.equal(dequantize(parts["weight_packed"], parts["weight_scale"], group), expected.float())


def test_the_library_rounds_each_product_of_code_and_bf16_scale_to_bf16():
    """`q.to(scale.dtype) * scale`: a 4-bit code times a bf16 scale needs up to 11 bits, so the library's weight is
    not the exact product; ours is the library's (the float32 product, rounded once to bf16)."""
    parts, quant = _library(_random((64, 256), torch.bfloat16))
    codes = unpack_from_int32(parts["weight_packed"], 4, torch.Size([64, 256])).float()
    exact = codes * parts["weight_scale"].float().repeat_interleave(GROUP, dim=1)
    library = library_decompress(parts, quant).float()
    assert bool((exact != library).any())
    assert torch.equal(exact.to(torch.bfloat16).float(), library)


def test_channel_scales_are_one_per_row_as_the_library_writes_them():
    weight = _random((40, 256), torch.bfloat16)
    parts, quant = _library(weight, None)
    assert parts["weight_scale"].shape == (40, 1)
    assert torch.equal(
        dequantize(parts["weight_packed"], parts["weight_scale"], 256, torch.bfloat16), library_decompress(parts, quant)
    )
    packed, scale = quantize(weight.float(), 256, torch.bfloat16)
    assert torch.equal(packed, parts["weight_packed"]) and torch.equal(scale, parts["weight_scale"])


def test_dequantize_applies_the_merge_in_float32_and_rounds_once():
    parts, quant = _library(_random((64, 256), torch.bfloat16))
    delta = 1e-3 * torch.randn(64, 256)
    merged = dequantize(
        parts["weight_packed"], parts["weight_scale"], GROUP, torch.bfloat16, lambda v, r, c: v + delta[r, c]
    )
    assert torch.equal(merged, (library_decompress(parts, quant).float() + delta).to(torch.bfloat16))


# -- quantize ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize(("shape", "group"), SHAPES)
def test_quantize_is_the_library_quantizer_on_random_weights(shape, group, scale_dtype):
    weight = _random(shape, scale_dtype, seed=1)
    parts, _ = _library(weight, group)
    packed, scale = quantize(weight.float(), group, scale_dtype)
    assert scale.dtype == scale_dtype
    assert torch.equal(scale, parts["weight_scale"])
    assert torch.equal(packed, parts["weight_packed"])


@pytest.mark.parametrize("group", [32, 128])
def test_float32_values_are_quantized_as_the_library_quantizes_them_held_in_bf16(group):
    values = _random((96, 512), torch.float32, seed=2)
    assert bool((values.to(torch.bfloat16).float() != values).any())
    parts, _ = _library(values.to(torch.bfloat16), group)
    packed, scale = quantize(values, group, torch.bfloat16)
    assert torch.equal(packed, parts["weight_packed"]) and torch.equal(scale, parts["weight_scale"])


def test_the_library_does_not_reproduce_its_own_output_but_quantize_does():
    """The library's scale `amax / 7.5` puts a group's largest value at ±7.5 codes, stored as 7 or -8: quantizing
    the dequantized group again gives a scale 7/7.5 or 8/7.5 of the first, and most codes move."""
    weight = _random((256, 1024), torch.bfloat16, seed=3)
    parts, quant = _library(weight)
    dequantized = library_decompress(parts, quant)
    again, _ = _library(dequantized)
    codes = unpack_from_int32(parts["weight_packed"], 4, weight.shape).view(256, -1, GROUP)
    ratio = again["weight_scale"].float() / parts["weight_scale"].float()
    lowest = codes.amin(dim=2) == -8
    live = parts["weight_scale"] > torch.finfo(torch.bfloat16).eps  # the all-zero group keeps its eps
    assert bool((ratio[live] != 1).all())
    assert 1.06 < float(ratio[lowest & live].min()) and float(ratio[lowest & live].max()) < 1.08  # ≈ 8 / 7.5
    assert 0.92 < float(ratio[~lowest & live].min()) and float(ratio[~lowest & live].max()) < 0.94  # ≈ 7 / 7.5
    moved = library_decompress(again, quant) != dequantized
    assert float(moved.float().mean()) > 0.5

    packed, scale = quantize(dequantized.float(), GROUP, torch.bfloat16)
    assert torch.equal(packed, parts["weight_packed"]) and torch.equal(scale, parts["weight_scale"])


@pytest.mark.parametrize(("shape", "group"), SHAPES)
def test_an_untouched_weight_pushed_through_dequantize_and_quantize_reproduces_its_bytes(shape, group):
    for seed in range(3):
        parts, _ = _library(_random(shape, torch.bfloat16, seed=seed), group)
        weight = _weight(shape, group, torch.bfloat16)
        again = FORMAT.quantize(weight, FORMAT.dequantize(weight, _parts(parts)))
        assert torch.equal(again["packed"], parts["weight_packed"])
        assert torch.equal(again["scale"], parts["weight_scale"])
        assert torch.equal(again["shape"], parts["weight_shape"])


def test_groups_on_a_grid_keep_it_and_every_other_group_gets_the_library_scale():
    weight = _random((64, 256), torch.bfloat16, seed=4)
    parts, _ = _library(weight)
    values = dequantize(parts["weight_packed"], parts["weight_scale"], GROUP)
    values[1::2] = _random((32, 256), torch.float32, seed=5)  # odd rows: fresh float32 weights
    packed, scale = quantize(values, GROUP, torch.bfloat16)
    assert torch.equal(packed[0::2], parts["weight_packed"][0::2]) and torch.equal(
        scale[0::2], parts["weight_scale"][0::2]
    )
    fresh, _ = _library(values[1::2].to(torch.bfloat16))
    assert torch.equal(packed[1::2], fresh["weight_packed"]) and torch.equal(scale[1::2], fresh["weight_scale"])


def test_quantize_of_a_run_of_rows_gives_those_rows_of_every_part():
    weight = _weight((64, 256), GROUP, torch.bfloat16)
    values = _random((64, 256), torch.float32, seed=6)
    whole, rows = FORMAT.quantize(weight, values), FORMAT.quantize(weight, values[10:20])
    for role in ("packed", "scale"):
        assert torch.equal(rows[role], whole[role][FORMAT.part_rows(weight, role, slice(10, 20))])
    assert rows["shape"].tolist() == [64, 256] and rows["shape"].dtype == torch.int64
    assert "shape" not in FORMAT.quantize(_weight((64, 256), GROUP, torch.bfloat16, with_shape=False), values)


def test_non_finite_values_are_refused():
    values = _random((8, 64), torch.float32)
    values[3, 5] = math.inf
    with pytest.raises(NonFiniteValues):
        quantize(values, GROUP, torch.bfloat16)


# -- requantize ----------------------------------------------------------------------------------------------------


def test_requantize_is_quantize_of_the_merged_weight_with_exact_survival_figures(monkeypatch):
    monkeypatch.setattr(tiling, "TILE_VALUES", 4 * 1024)
    parts, _ = _library(_random((300, 512), torch.bfloat16, seed=7))
    gen = torch.Generator().manual_seed(8)
    delta = 0.004 * torch.randn(300, 4, generator=gen) @ torch.randn(4, 512, generator=gen)
    base = dequantize(parts["weight_packed"], parts["weight_scale"], GROUP)
    new_packed, new_scale, survival = requantize(
        parts["weight_packed"], parts["weight_scale"], GROUP, lambda v, r, c: v + delta[r, c], tensor="w"
    )
    expected_packed, expected_scale = quantize(base + delta, GROUP, torch.bfloat16)
    assert torch.equal(new_packed, expected_packed) and torch.equal(new_scale, expected_scale)
    intended = delta.double().flatten()
    realised = (dequantize(new_packed, new_scale, GROUP) - base).double().flatten()
    assert survival.tensor == "w"
    cosine = float(intended @ realised / (intended.norm() * realised.norm()))
    assert survival.cosine == pytest.approx(cosine, abs=1e-6)
    assert survival.relative_norm == pytest.approx(float(realised.norm() / intended.norm()), rel=1e-6)
    assert survival.relative_error == pytest.approx(float((realised - intended).norm() / intended.norm()), rel=1e-5)
    assert 0.3 < survival.cosine < 1, "a delta this small loses part of itself to INT4 rounding"


def test_requantize_with_no_change_keeps_every_byte_and_reports_nothing_lost():
    weight = _weight((64, 256), GROUP, torch.bfloat16)
    parts = _parts(_library(_random((64, 256), torch.bfloat16, seed=9))[0])
    again, survival = FORMAT.requantize(weight, parts, lambda v, r, c: v.clone())
    assert all(torch.equal(again[role], parts[role]) for role in parts)
    assert (survival.cosine, survival.relative_error) == (1.0, 0.0)


def test_requantize_refuses_nan_or_inf_in_the_merged_values():
    weight = _weight((64, 256), GROUP, torch.bfloat16)
    parts = _parts(_library(_random((64, 256), torch.bfloat16))[0])

    def poisoned(values, rows, cols):
        values = values.clone()
        values[0, 0] = math.nan
        return values

    with pytest.raises(NonFiniteValues, match="m.weight"):
        FORMAT.requantize(weight, parts, poisoned)


def test_tile_by_tile_gives_the_same_bytes_as_the_whole_tensor(monkeypatch):
    parts, _ = _library(_random((300, 640), torch.bfloat16, seed=10))
    packed, scale = parts["weight_packed"], parts["weight_scale"]
    delta = 0.01 * torch.randn(300, 640)

    def merge(values, rows, cols):
        return values + delta[rows, cols]

    def everything():
        return (
            dequantize(packed, scale, GROUP, torch.bfloat16, merge),
            *quantize(dequantize(packed, scale, GROUP) + delta, GROUP, torch.bfloat16),
            *requantize(packed, scale, GROUP, merge, tensor="w"),
        )

    monkeypatch.setattr(tiling, "TILE_VALUES", 1 << 30)
    whole = everything()
    monkeypatch.setattr(tiling, "TILE_VALUES", 3 * 128)
    assert len(list(tiling.tiles((300, 640), torch.device("cpu"), (1, GROUP)))) > 300
    tiled = everything()
    for got, expected in zip(tiled[:5], whole[:5], strict=True):
        assert torch.equal(got, expected)
    assert tiled[5].cosine == pytest.approx(whole[5].cosine, abs=1e-6)  # float32 dot products, summed per tile


# -- validation's reference ----------------------------------------------------------------------------------------


def test_decode_of_a_run_of_rows_is_the_library_dequantization_in_float64():
    parts, quant = _library(_random((64, 256), torch.bfloat16, seed=11))
    weight, stored = _weight((64, 256), GROUP, torch.bfloat16), _parts(parts)
    rows = slice(17, 40)
    assert FORMAT.row_alignment(weight) == 1
    as_rows = {role: tensor.reshape(-1, tensor.shape[-1]) for role, tensor in stored.items()}  # [rows, last dim]
    read = {role: tensor[FORMAT.part_rows(weight, role, rows)] for role, tensor in as_rows.items()}
    assert read["shape"].tolist() == [[64, 256]]  # one row, the whole of it: decode does not need it
    decoded = FORMAT.decode(weight, read, rows)
    assert decoded.dtype == torch.float64
    assert torch.equal(decoded, library_decompress(parts, quant)[rows].double())


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_one_rounding_stays_within_the_stated_bound_and_the_bound_is_close(scale_dtype):
    weight = _weight((512, 1024), GROUP, scale_dtype)
    values = _random((512, 1024), torch.float32, seed=12)
    parts = FORMAT.quantize(weight, values)
    relative, absolute = FORMAT.rounding(weight, parts, slice(0, 512))
    error = (FORMAT.decode(weight, parts, slice(0, 512)) - values.double()).abs()
    assert bool((error <= relative * values.double().abs() + absolute).all())
    scale = parts["scale"].double().repeat_interleave(GROUP, dim=1)
    assert float((error / scale).max()) > 0.5  # the clamp of a group's largest value costs more than half a step


# -- detection -----------------------------------------------------------------------------------------------------


def test_kimis_config_and_headers_give_every_packed_weight_with_its_parts():
    refs = _refs({EXPERT: (7168, 2048), "model.layers.1.mlp.experts.7.gate_proj": (2048, 7168)})
    refs["model.layers.1.self_attn.o_proj.weight"] = TensorRef(
        file="a.safetensors", data_start=8, entry=_entry("model.layers.1.self_attn.o_proj.weight", "BF16", (7168, 8192))
    )
    found = FORMAT.detect(KIMI_CONFIG, refs, "s3://bucket/kimi")
    assert sorted(found) == [f"model.layers.1.mlp.experts.7.{m}.weight" for m in ("down_proj", "gate_proj")]
    weight = found[f"{EXPERT}.weight"]
    assert weight.format == "int4-pack-quantized" and weight.shape == (7168, 2048) and weight.primary == "packed"
    assert {role: ref.entry.name for role, ref in weight.parts.items()} == {
        "packed": f"{EXPERT}.weight_packed",
        "scale": f"{EXPERT}.weight_scale",
        "shape": f"{EXPERT}.weight_shape",
    }
    assert weight.parts["scale"].file == "b.safetensors"
    assert weight.params == {
        "num_bits": 4,
        "strategy": "group",
        "group_size": 32,
        "scale_dtype": "BF16",
        "shape_dtype": "I64",
    }


def test_a_config_under_text_config_and_a_format_per_group_are_recognised():
    quantization = copy.deepcopy(KIMI_QUANTIZATION)
    quantization["format"] = "mixed-precision"
    quantization["config_groups"]["group_0"]["format"] = "pack-quantized"
    found = FORMAT.detect({"text_config": {"quantization_config": quantization}}, _refs({EXPERT: (64, 256)}), "base")
    assert list(found) == [f"{EXPERT}.weight"]


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
        {"quantization_config": {**KIMI_QUANTIZATION, "format": "int-quantized"}},
    ],
)
def test_other_formats_are_not_this_one(config):
    assert FORMAT.detect(config, _refs({EXPERT: (64, 256)}), "base") == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_bits": 8}, "num_bits 8: only 4-bit"),
        (
            {"symmetric": False},
            "symmetric false: asymmetric weights .zero points, weight_zero_point. are not supported",
        ),
        ({"strategy": "tensor"}, "strategy 'tensor'"),
        ({"type": "float"}, "type 'float'"),
        ({"actorder": "group"}, "actorder 'group'"),
    ],
)
def test_weights_of_settings_this_module_cannot_merge_are_left_to_the_refusals_with_the_option_named(change, message):
    """Not this format's weights (so a merge that does not touch them copies them as bytes), and why, option by
    option, for the refusal of a merge that does."""
    quantization = copy.deepcopy(KIMI_QUANTIZATION)
    quantization["config_groups"]["group_0"]["weights"].update(change)
    config = {"quantization_config": quantization}
    assert FORMAT.detect(config, _refs({EXPERT: (64, 256)}), "base") == {}
    (why,) = unmergeable_settings(config)
    assert re.search(f"quantization_config.config_groups.group_0.weights has {message}", why), why


def _broken(refs: dict, name: str, **changes) -> None:
    ref = refs[name]
    refs[name] = ref.model_copy(update={"entry": ref.entry.model_copy(update=changes)})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda refs: refs.pop(f"{EXPERT}.weight_scale"),
            f"{EXPERT}.weight_packed .a.safetensors. has no {EXPERT}.weight_scale",
        ),
        (
            lambda refs: _broken(refs, f"{EXPERT}.weight_scale", shape=(64, 4)),
            f"{EXPERT}.weight_scale .b.safetensors. is \\[64, 4\\]; .* needs scales \\[64, 8\\]",
        ),
        (
            lambda refs: _broken(refs, f"{EXPERT}.weight_scale", dtype="F8_E4M3"),
            f"{EXPERT}.weight_scale .b.safetensors. is F8_E4M3",
        ),
        (
            lambda refs: _broken(refs, f"{EXPERT}.weight_packed", dtype="I64"),
            f"{EXPERT}.weight_packed .a.safetensors. is I64 \\[64, 32\\]",
        ),
        (lambda refs: _broken(refs, f"{EXPERT}.weight_packed", shape=(4, 64, 32)), "packed weights are 2-D I32"),
        (
            lambda refs: _broken(refs, f"{EXPERT}.weight_shape", shape=(3,)),
            f"{EXPERT}.weight_shape .a.safetensors. is I64 \\[3\\]",
        ),
        (
            lambda refs: refs.update(
                {
                    f"{EXPERT}.weight": TensorRef(
                        file="c.safetensors", data_start=8, entry=_entry(f"{EXPERT}.weight", "BF16", (64, 256))
                    )
                }
            ),
            f"{EXPERT}.weight_packed .a.safetensors. is stored beside an unquantized {EXPERT}.weight",
        ),
        (
            lambda refs: refs.update({f"{EXPERT}.weight_zero_point": refs[f"{EXPERT}.weight_shape"]}),
            f"{EXPERT}.weight_zero_point .a.safetensors.: zero points are not supported",
        ),
    ],
)
def test_tensors_that_do_not_fit_the_config_are_refused_by_name(damage, message):
    refs = _refs({EXPERT: (64, 256)})
    damage(refs)
    with pytest.raises(
        CheckpointFormatError,
        match=f"base is not a compressed-tensors INT4 pack-quantized checkpoint this tool can read: .*{message}",
    ):
        FORMAT.detect(KIMI_CONFIG, refs, "base")


def test_rows_that_end_in_padding_values_are_refused():
    """36 input features in groups of 12 pack into 5 words (40 nibbles): the headers say the weight is not 40 wide."""
    quantization = copy.deepcopy(KIMI_QUANTIZATION)
    quantization["config_groups"]["group_0"]["weights"]["group_size"] = 12
    refs = _refs({EXPERT: (64, 40)}, group=12)
    _broken(refs, f"{EXPERT}.weight_scale", shape=(64, 3))
    with pytest.raises(CheckpointFormatError, match="has 36 input features by its scale .* not a multiple of 8"):
        FORMAT.detect({"quantization_config": quantization}, refs, "base")


def test_a_stored_weight_shape_that_disagrees_with_the_headers_is_refused_when_read():
    weight = _weight((64, 256), GROUP, torch.bfloat16)
    parts = _parts(_library(_random((64, 256), torch.bfloat16))[0])
    parts["shape"] = torch.tensor([64, 250])
    with pytest.raises(CheckpointFormatError, match=r"m.weight_shape \(a.safetensors\) holds \[64, 250\]"):
        FORMAT.dequantize(weight, parts)


def test_every_problem_is_listed_up_to_five():
    refs = _refs({f"model.layers.{i}.mlp.experts.0.up_proj": (64, 256) for i in range(7)})
    for i in range(7):
        refs.pop(f"model.layers.{i}.mlp.experts.0.up_proj.weight_scale")
    with pytest.raises(CheckpointFormatError, match=r"has no .*\(and 2 more\)$") as raised:
        FORMAT.detect(KIMI_CONFIG, refs, "base")
    assert str(raised.value).count("has no") == 5


# -- the fixture ---------------------------------------------------------------------------------------------------


def _header_refs(directory) -> dict[str, TensorRef]:
    refs = {}
    for path in shards(directory):
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        header.pop("__metadata__", None)
        for name, spec in header.items():
            entry = TensorEntry(
                name=name,
                dtype=spec["dtype"],
                shape=tuple(spec["shape"]),
                begin=spec["data_offsets"][0],
                end=spec["data_offsets"][1],
            )
            refs[name] = TensorRef(file=path.name, data_start=8 + length, entry=entry)
    return refs


def test_the_kimi_fixture_is_what_the_library_writes_and_decompresses(case):
    config = json.loads((case.base_dir / "config.json").read_text())
    assert config["model_type"] == "kimi_k2"
    quantization = config["quantization_config"]
    assert (quantization["quant_method"], quantization["format"], quantization["kv_cache_scheme"]) == (
        "compressed-tensors",
        "pack-quantized",
        None,
    )
    assert quantization["config_groups"]["group_0"]["weights"] | {} == {
        "dynamic": False,
        "group_size": 32,
        "num_bits": 4,
        "strategy": "group",
        "symmetric": True,
        "type": "int",
    }
    assert "model.layers.1.self_attn.o_proj" in quantization["ignore"] and "lm_head" in quantization["ignore"]
    assert not any(".experts." in name for name in quantization["ignore"])
    assert len(case.quantized) == 2 * 4 * 3 and case.cross_shard

    stored: dict[str, torch.Tensor] = {}
    for path in shards(case.base_dir):
        stored.update(load_file(str(path)))
    dequantized = load_file(str(case.dequantized_dir / "model.safetensors"))
    refs = _header_refs(case.base_dir)
    found = FORMAT.detect(config, refs, str(case.base_dir))
    assert sorted(found) == sorted(case.quantized)
    for name in case.quantized:
        module = name.removesuffix(".weight")
        assert name not in stored and stored[f"{module}.weight_scale"].dtype == torch.bfloat16
        parts = {role: stored[f"{module}.weight_{role}"] for role in ("packed", "scale", "shape")}
        library = library_decompress({f"weight_{role}": tensor for role, tensor in parts.items()})
        assert torch.equal(library.float(), dequantized[name])
        assert torch.equal(FORMAT.dequantize(found[name], parts), dequantized[name])
    for name in (
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "lm_head.weight",
    ):
        assert stored[name].dtype == torch.bfloat16
    assert all(refs[f"{n}_scale"].file != refs[f"{n}_packed"].file for n in case.cross_shard)

    model = DeepseekV3ForCausalLM.from_pretrained(case.dequantized_dir, dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.down_proj[3], dequantized["model.layers.1.mlp.experts.3.down_proj.weight"])
    assert (case.adapter_dir / "adapter_model.safetensors").exists()


def test_int4_packed_module_names_the_format():
    assert (FORMAT.key, FORMAT.label) == ("int4-pack-quantized", "compressed-tensors INT4 pack-quantized")
    assert int4_packed.KEY == FORMAT.key
