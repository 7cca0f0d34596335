"""bitsandbytes bases (QLoRA's nf4/fp4, LLM.int8) and `--as-quantized`, against bitsandbytes and PEFT themselves.

Every quantized checkpoint here is transformers' own save of a real bitsandbytes load on the CPU; the adapter is
trained a few steps through the 4-bit forward, as QLoRA trains."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("bitsandbytes")

import bitsandbytes.functional as F  # noqa: E402
import qlora  # noqa: E402
from checkpoint_tools import (  # noqa: E402
    edit_adapter_config,
    published_digest,
    read_raw_header,
    stored_tensors,
    write_raw_header,
)
from s3_server import BUCKET  # noqa: E402

from prefect_lora_merge.cli import main  # noqa: E402
from prefect_lora_merge.core.errors import CheckpointFormatError, LoraMergeError, UnsupportedBaseError  # noqa: E402
from prefect_lora_merge.core.formats import bitsandbytes as bnb_format  # noqa: E402
from prefect_lora_merge.core.formats.base import QuantizedWeight  # noqa: E402
from prefect_lora_merge.core.options import as_quantized_settings  # noqa: E402
from prefect_lora_merge.core.pipeline import merge_checkpoint  # noqa: E402
from prefect_lora_merge.core.plan import MANIFEST_FILE, REPORT_FILE, make_plan  # noqa: E402

NF4 = as_quantized_settings("nf4")


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> qlora.QloraCase:
    return qlora.build(tmp_path_factory.mktemp("qlora"))


@pytest.fixture(scope="module")
def deltas(case):
    return qlora.peft_deltas(case.base16, case.adapter)


@pytest.fixture(scope="module")
def merged(case, tmp_path_factory):
    """Each quantized checkpoint merged with the trained adapter (bf16 output, the default)."""
    root = tmp_path_factory.mktemp("merged")
    return {
        name: merge_checkpoint(str(path), str(case.adapter), str(root / name)) for name, path in case.quantized.items()
    }


# -- the arithmetic, against bitsandbytes.functional ----------------------------------------------------------------


def _stored_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = 64):
    """A weight quantized by bitsandbytes, as our format sees it: QuantizedWeight + parts as stored."""
    packed, state = F.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    parts = {"packed": packed, "absmax": state.absmax, "quant_map": state.code}
    params = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[weight.dtype],
        "nested": double_quant,
        "storage_itemsize": 1,
        "stored_shape": list(weight.shape),
    }
    if double_quant:
        parts |= {"nested_absmax": state.state2.absmax, "nested_quant_map": state.state2.code}
        params |= {"nested_blocksize": state.state2.blocksize, "nested_offset": float(state.offset)}
    weight_ = QuantizedWeight(format="bnb-4bit", name="w", shape=tuple(weight.shape), parts={}, primary="packed",
                              params=params)  # fmt: skip
    return weight_, parts, F.dequantize_4bit(packed, state)


SHAPES = [(256, 320), (3, 100), (7, 9), (1, 4097)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_4bit_weights_dequantize_to_bitsandbytes_own_values_bit_for_bit(quant_type, double_quant, dtype):
    torch.manual_seed(0)
    for shape in SHAPES:
        weight = (torch.randn(shape) * 0.05).to(dtype)
        described, parts, expected = _stored_4bit(weight, quant_type, double_quant)
        got = bnb_format.Bnb4bit().dequantize(described, parts)
        assert got.dtype == torch.float32 and got.shape == weight.shape
        assert torch.equal(got, expected.float()), (shape, int((got != expected.float()).sum()))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_validation_decodes_any_run_of_rows_from_the_bytes_that_hold_them(quant_type):
    """The textbook float64 decode of rows 5..9 of a [13, 100] weight reads only the packed bytes of their blocks."""
    weight = (torch.randn(13, 100) * 0.05).to(torch.bfloat16)
    described, parts, expected = _stored_4bit(weight, quant_type, True)
    fmt = bnb_format.Bnb4bit()
    rows = slice(5, 9)
    span = fmt.part_rows(described, "packed", rows)
    as_read = {k: v.reshape(1, -1) for k, v in parts.items() if k != "packed"}
    as_read["packed"] = parts["packed"].reshape(-1, 1)[span]
    assert span.stop - span.start < parts["packed"].numel() / 2
    assert torch.equal(fmt.decode(described, as_read, rows), expected[rows].to(torch.float64))


def test_int8_weights_dequantize_as_int8_vectorwise_dequant():
    weight = torch.randn(64, 96, dtype=torch.float16)
    codes, scales, _ = F.int8_vectorwise_quant(weight)
    described = QuantizedWeight(format="bnb-int8", name="w", shape=(64, 96), parts={}, primary="codes")
    got = bnb_format.BnbInt8().dequantize(described, {"codes": codes, "row_scales": scales})
    assert torch.equal(got, F.int8_vectorwise_dequant(codes, scales))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_round_trip_is_bitsandbytes_quantize_then_dequantize(quant_type, dtype):
    """Without double quantization bit for bit. With it, bitsandbytes' CPU kernel looks the absmax codes up in a
    65536-bin table that picks a neighbour of the nearest code for a few of them (its torch and CUDA quantizers pick
    the nearest, as ours does): those blocks differ by one step of the 8-bit map, nothing else."""
    torch.manual_seed(1)
    for shape in SHAPES:
        weight = (torch.randn(shape) * 0.05).to(dtype)
        for double_quant in (False, True):
            packed, state = F.quantize_4bit(
                weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
            )
            expected = F.dequantize_4bit(packed, state).float()
            got, offset = bnb_format.round_trip_4bit(weight, quant_type, 64, double_quant)
            if not double_quant:
                assert offset is None and torch.equal(got, expected), shape
                continue
            assert offset == float(state.offset)
            differs = got != expected
            assert differs.float().mean() < 0.02, (shape, float(differs.float().mean()))
            assert torch.allclose(got, expected, rtol=0.03, atol=1e-3 * float(weight.float().abs().max()))


# -- bitsandbytes bases, merged ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nf4", "nf4-single", "nf4-bf16-storage", "fp4", "int8"])
def test_a_bitsandbytes_base_merges_to_its_own_dequantization_plus_peft_delta_rounded_once(case, deltas, merged, name):
    result = merged[name]
    assert result.report.passed, result.report.failures
    out = stored_tensors(Path(result.plan.job.output.uri))
    oracle = qlora.oracle_weights(case.quantized[name])
    assert len(oracle) == 14 and set(deltas) <= set(oracle)
    for weight, dequantized in oracle.items():
        expected = dequantized.float()
        if weight in deltas:
            expected = expected + deltas[weight]
        assert out[weight].dtype == torch.bfloat16
        assert torch.equal(out[weight], expected.to(torch.bfloat16)), weight
    base = stored_tensors(case.quantized[name])
    for other in set(base) - {n for w in oracle for n in base if n == w or n.startswith(f"{w}.") or n == f"{w}_format"}:
        if other.endswith(".SCB"):
            continue  # LLM.int8's row scales: dropped with their weight
        assert torch.equal(out[other], base[other]), other  # embeddings, norms, lm_head: as stored
    assert set(out) == set(stored_tensors(case.base16)), "no companion tensor is left, none is missing"


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_the_merged_output_is_a_plain_bf16_model_without_quantization_config(case, merged, name):
    out = Path(merged[name].plan.job.output.uri)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    logits = qlora.logits_of(out, case.tokens)  # transformers loads it with no bitsandbytes settings at all
    assert torch.isfinite(logits).all()
    decisions = " ".join(merged[name].plan.decisions)
    assert "base written in bf16" in decisions and "quantization_config removed" in decisions


def test_the_plan_counts_the_dequantized_tensor_and_reads_nothing_but_headers_and_quant_states(case, tmp_path):
    plan = make_plan(str(case.quantized["nf4"]), str(case.adapter), str(tmp_path / "out"))
    weights = {t.quantized.weight.name: t.quantized.weight for s in plan.shards for t in s.tensors if t.quantized}
    assert len(weights) == 14
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert down.shape == (128, 200) and down.params["quant_type"] == "nf4" and down.params["nested"]
    assert set(down.parts) == {"packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state"}
    written = {t.name: t for s in plan.shards for t in s.written}
    assert written["model.layers.0.mlp.down_proj.weight"].dtype == "BF16"
    assert written["model.layers.0.mlp.down_proj.weight"].shape == (128, 200)
    assert plan.estimated_peak_bytes >= 3 * 4 * 128 * 200
    assert not (tmp_path / "out").exists()


def test_the_flow_merges_a_4bit_base_validates_it_and_a_rerun_resumes_every_shard(
    case, tmp_path, prefect_server, capsys
):
    out = tmp_path / "out"
    inputs = ["--base", str(case.quantized["nf4"]), "--adapter", str(case.adapter), "--output", str(out)]
    assert main(["run", *inputs, "--device", "cpu", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["validation_passed"] and len(first["merged_shards"]) == first["shards"] >= 2
    before = published_digest(out)
    assert main(["validate", *inputs]) == 0
    capsys.readouterr()
    assert main(["run", *inputs, "--device", "cpu", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["merged_shards"] == [] and len(again["resumed_shards"]) == first["shards"]
    assert published_digest(out) == before


def test_a_4bit_merge_from_and_to_s3_is_byte_identical_to_the_local_one(s3, case, merged):
    fs = s3.fs()
    fs.put(str(case.quantized["nf4"]), f"{BUCKET}/bnb/base", recursive=True)
    fs.put(str(case.adapter), f"{BUCKET}/bnb/adapter", recursive=True)
    result = merge_checkpoint(
        f"s3://{BUCKET}/bnb/base", f"s3://{BUCKET}/bnb/adapter", f"s3://{BUCKET}/bnb/out",
        storage_options=s3.storage_options(),
    )  # fmt: skip
    assert result.report.passed
    local = Path(merged["nf4"].plan.job.output.uri)
    for path in sorted(local.glob("*.safetensors")):
        assert fs.cat_file(f"{BUCKET}/bnb/out/{path.name}") == path.read_bytes(), path.name


def test_validation_catches_a_merged_4bit_weight_that_lost_its_delta(case, merged, tmp_path, capsys):
    out = shutil.copytree(Path(merged["nf4"].plan.job.output.uri), tmp_path / "out")
    weight = "model.layers.1.self_attn.v_proj.weight"
    oracle = qlora.oracle_weights(case.quantized["nf4"])[weight].to(torch.bfloat16)  # the base, no delta
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    header, body = read_raw_header(out / index[weight])
    begin, end = header[weight]["data_offsets"]
    body = body[:begin] + oracle.contiguous().view(torch.uint8).numpy().tobytes() + body[end:]
    write_raw_header(out / index[weight], header, body)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["validate", "--base", str(case.quantized["nf4"]), "--adapter", str(case.adapter), "--output", str(out)])
    assert f"{weight} rows" in capsys.readouterr().out


# -- --as-quantized ------------------------------------------------------------------------------------------------


def test_as_quantized_nf4_gives_the_trained_qlora_models_logits_and_the_plain_merge_does_not(
    case, tmp_path, prefect_server, capsys
):
    inputs = ["--base", str(case.base16), "--adapter", str(case.adapter), "--device", "cpu"]
    assert main(["run", *inputs, "--output", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main(["run", *inputs, "--output", str(tmp_path / "as-nf4"), "--as-quantized", "nf4"]) == 0
    printed = capsys.readouterr().out
    plain = qlora.relative(qlora.logits_of(tmp_path / "plain", case.tokens), case.trained_logits)
    as_nf4 = qlora.relative(qlora.logits_of(tmp_path / "as-nf4", case.tokens), case.trained_logits)
    merge_checkpoint(str(case.quantized["nf4"]), str(case.adapter), str(tmp_path / "from-nf4"))
    from_nf4 = qlora.relative(qlora.logits_of(tmp_path / "from-nf4", case.tokens), case.trained_logits)
    print(
        f"\nlogits vs the trained 4-bit PeftModel: plain merge into bf16 {plain:.4f}, --as-quantized nf4 "
        f"{as_nf4:.4f}, merge into the nf4 checkpoint {from_nf4:.4f}"
    )
    assert as_nf4 < plain / 3 and from_nf4 < plain / 3
    assert "as-quantized: ‖Q(W) − W‖ / ‖ΔW‖ over 14 touched weight(s): median" in printed
    print(next(line for line in printed.splitlines() if line.startswith("as-quantized:")))
    assert "--as-quantized nf4: 14 Linear weight(s) put through bitsandbytes' 4-bit round trip" in printed
    report = json.loads((tmp_path / "as-nf4" / REPORT_FILE).read_text())
    shifts = report["round_trip_shifts"]
    assert len(shifts) == 14 and all(s["ratio"] > 0 for s in shifts)
    assert [s["ratio"] for s in shifts] == sorted((s["ratio"] for s in shifts), reverse=True)
    manifest = json.loads((tmp_path / "as-nf4" / MANIFEST_FILE).read_text())
    assert manifest["as_quantized"]["quant_type"] == "nf4"
    # validate re-plans the round trip from the manifest
    assert main(["validate", *inputs[:4], "--output", str(tmp_path / "as-nf4")]) == 0


def test_the_reported_ratio_is_the_round_trips_shift_over_the_delta(case, deltas, tmp_path):
    result = merge_checkpoint(str(case.base16), str(case.adapter), str(tmp_path / "out"), as_quantized=NF4)
    base = stored_tensors(case.base16)
    shifts = {s.tensor: s for r in result.receipts for s in r.round_trip_shifts}
    assert set(shifts) == set(deltas)
    for name, shift in shifts.items():
        rounded, _ = bnb_format.round_trip_4bit(base[name], "nf4", 64, True)
        assert math.isclose(shift.shift_norm, float((rounded - base[name].float()).norm()), rel_tol=1e-4)
        assert math.isclose(shift.delta_norm, float(deltas[name].norm()), rel_tol=1e-4)
        assert math.isclose(shift.ratio, shift.shift_norm / shift.delta_norm)


def test_as_quantized_without_double_quantization_equals_merging_into_the_4bit_checkpoint(case, merged, tmp_path):
    """transformers' 4-bit load of the 16-bit base, saved, then merged: the same bytes as the round trip."""
    settings = as_quantized_settings("nf4", double_quant=False)
    result = merge_checkpoint(str(case.base16), str(case.adapter), str(tmp_path / "out"), as_quantized=settings)
    assert result.report.passed
    round_tripped, from_4bit = (
        stored_tensors(tmp_path / "out"),
        stored_tensors(Path(merged["nf4-single"].plan.job.output.uri)),
    )
    assert set(round_tripped) == set(from_4bit)
    for name in round_tripped:
        assert torch.equal(round_tripped[name], from_4bit[name]), name


def test_as_quantized_rounds_exactly_the_weights_transformers_quantizes(case, tmp_path):
    """The Linear layers of a 4-bit load: not embeddings, and not lm_head unless llm_int8_skip_modules is given (it
    replaces transformers' default), then not those."""
    import bitsandbytes as bnb

    for skip in ([], ["o_proj", "model.layers.1.mlp.up_proj"]):
        loaded = qlora.load_quantized(case.base16, **qlora.NF4, llm_int8_skip_modules=skip or None)
        expected = {f"{n}.weight" for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        settings = as_quantized_settings("nf4", skip=skip)
        plan = make_plan(str(case.base16), str(case.adapter), str(tmp_path / "out"), as_quantized=settings)
        rounded = {t.name for s in plan.shards for t in s.tensors if t.quantized is not None}
        assert rounded == expected, (skip, rounded ^ expected)
        assert ("lm_head.weight" in rounded) == bool(skip) and "model.embed_tokens.weight" not in rounded


# -- the choice, shown ---------------------------------------------------------------------------------------------


def test_an_adapter_trained_on_a_bnb_4bit_repo_is_shown_both_merges(case, tmp_path):
    adapter = shutil.copytree(case.adapter, tmp_path / "adapter")
    edit_adapter_config(adapter, base_model_name_or_path="unsloth/llama-3-8b-Instruct-bnb-4bit")
    plain = " ".join(make_plan(str(case.base16), str(adapter), str(tmp_path / "a")).decisions)
    assert "trained on unsloth/llama-3-8b-Instruct-bnb-4bit" in plain and "pass --as-quantized nf4" in plain
    four_bit = " ".join(make_plan(str(case.quantized["nf4"]), str(adapter), str(tmp_path / "b")).decisions)
    assert "the ones it was trained against" in four_bit and "original 16-bit weights" in four_bit
    chosen = " ".join(make_plan(str(case.base16), str(adapter), str(tmp_path / "c"), as_quantized=NF4).decisions)
    assert "pass --as-quantized" not in chosen
    neutral = " ".join(make_plan(str(case.base16), str(case.adapter), str(tmp_path / "d")).decisions)
    assert "bnb" not in neutral and "--as-quantized" not in neutral


def test_a_nan_in_a_round_tripped_base_weight_is_blamed_on_the_base_and_nothing_is_published(case, tmp_path):
    name = "model.layers.1.mlp.gate_proj.weight"

    def poison(tensors):
        if name in tensors:
            tensors[name][3, 5] = float("nan")

    base = _rewritten(case.base16, tmp_path / "nan", poison)
    with pytest.raises(CheckpointFormatError, match=rf"{name} \(.*\) holds NaN/Inf, which --as-quantized's 4-bit"):
        merge_checkpoint(str(base), str(case.adapter), str(tmp_path / "out"), as_quantized=NF4)
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()


def test_a_rerun_with_other_round_trip_settings_is_another_merge(case, tmp_path):
    one = make_plan(str(case.base16), str(case.adapter), str(tmp_path / "o"), as_quantized=NF4)
    other = make_plan(
        str(case.base16), str(case.adapter), str(tmp_path / "o"), as_quantized=as_quantized_settings("nf4", 128)
    )
    plain = make_plan(str(case.base16), str(case.adapter), str(tmp_path / "o"))
    assert len({one.fingerprint, other.fingerprint, plain.fingerprint}) == 3


# -- refusals ------------------------------------------------------------------------------------------------------


def test_keep_is_refused_for_a_bitsandbytes_base_saying_what_to_do(case, tmp_path):
    with pytest.raises(LoraMergeError, match=r"bitsandbytes 4-bit, which this tool writes in bf16 only.*auto"):
        make_plan(str(case.quantized["nf4"]), str(case.adapter), str(tmp_path / "o"), output_dtype="keep")
    assert not (tmp_path / "o").exists()


def test_as_quantized_on_a_quantized_base_is_refused(case, tmp_path):
    with pytest.raises(LoraMergeError, match=r"--as-quantized simulates a 4-bit load of a 16-bit base.*already"):
        make_plan(str(case.quantized["nf4"]), str(case.adapter), str(tmp_path / "o"), as_quantized=NF4)


def test_round_trip_settings_without_as_quantized_are_refused_by_option_name(case, tmp_path, capsys):
    inputs = ["--base", str(case.base16), "--adapter", str(case.adapter), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        main(["plan", *inputs, "--as-quantized-blocksize", "128"])
    assert "as_quantized" in capsys.readouterr().err


def _broken_copy(case, tmp_path, tensor: str, edit) -> Path:
    base = shutil.copytree(case.quantized["nf4"], tmp_path / "broken")
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    header, body = read_raw_header(base / index[tensor])
    edit(header, body, base / index[tensor])
    return base


def _replace_bytes(tensor: str, new: bytes):
    def edit(header, body, path):
        begin, end = header[tensor]["data_offsets"]
        assert len(new) == end - begin
        write_raw_header(path, header, body[:begin] + new + body[end:])

    return edit


STATE = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"


def test_a_quant_state_that_is_not_json_is_refused_naming_it(case, tmp_path):
    size = _size_of(case, STATE)
    base = _broken_copy(case, tmp_path, STATE, _replace_bytes(STATE, b"\xff" * size))
    with pytest.raises(CheckpointFormatError, match=rf"{STATE} \(.*\) is not the JSON bitsandbytes writes"):
        make_plan(str(base), str(case.adapter), str(tmp_path / "o"))


def test_a_quant_state_whose_shape_does_not_fit_the_packed_codes_is_refused(case, tmp_path):
    state = json.loads(bytes(stored_tensors(case.quantized["nf4"])[STATE].tolist()))
    lied = json.dumps({**state, "shape": [state["shape"][0] * 2, state["shape"][1] // 2 + 1]}).encode()
    size = _size_of(case, STATE)
    base = _broken_copy(case, tmp_path, STATE, _replace_bytes(STATE, lied.ljust(size)[:size]))
    with pytest.raises(
        CheckpointFormatError,
        match=r"q_proj.weight \(.*\) is U8 \[\d+, 1\]; the nf4 codes of a \[\d+, \d+\] weight are \d+ bytes",
    ):
        make_plan(str(base), str(case.adapter), str(tmp_path / "o"))


def test_a_quant_map_that_is_not_bitsandbytes_table_is_refused_before_anything_is_written(case, tmp_path):
    tensor = "model.layers.0.self_attn.q_proj.weight.quant_map"
    table = bnb_format.code_values("nf4").flip(0).contiguous()
    base = _broken_copy(case, tmp_path, tensor, _replace_bytes(tensor, table.view(torch.uint8).numpy().tobytes()))
    with pytest.raises(CheckpointFormatError, match=rf"{tensor} \(.*\) is not bitsandbytes' nf4 code table"):
        merge_checkpoint(str(base), str(case.adapter), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_missing_companion_is_refused_naming_it(case, tmp_path):
    absmax = "model.layers.1.mlp.up_proj.weight.absmax"

    def drop(header, body, path):
        entry = header.pop(absmax)
        begin, end = entry["data_offsets"]
        for spec in header.values():
            if isinstance(spec, dict) and "data_offsets" in spec and spec["data_offsets"][0] >= end:
                spec["data_offsets"] = [
                    spec["data_offsets"][0] - (end - begin),
                    spec["data_offsets"][1] - (end - begin),
                ]
        write_raw_header(path, header, body[:begin] + body[end:])

    base = _broken_copy(case, tmp_path, absmax, drop)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    del index["weight_map"][absmax]
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=rf"has no {absmax} anywhere in the base"):
        make_plan(str(base), str(case.adapter), str(tmp_path / "o"))


def test_4bit_tensors_without_their_quantization_config_are_refused_saying_so(case, tmp_path):
    base = shutil.copytree(case.quantized["nf4"], tmp_path / "no-config")
    config = json.loads((base / "config.json").read_text())
    del config["quantization_config"]
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedBaseError, match=r"no bitsandbytes quantization_config"):
        make_plan(str(base), str(case.adapter), str(tmp_path / "o"))


def _rewritten(source: Path, target: Path, edit) -> Path:
    """A copy of a checkpoint with `edit(tensors)` applied to each shard's tensors (a dict it may change)."""
    shutil.copytree(source, target)
    index_path = target / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(target / shard))
        edit(tensors)
        save_file(tensors, str(target / shard), metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | dict.fromkeys(
            tensors, shard
        )
    index_path.write_text(json.dumps(index))
    return target


def _state_edit(**changes):
    """An edit of q_proj's quant_state JSON (a value None removes the key)."""

    def edit(tensors):
        if STATE in tensors:
            state = json.loads(bytes(tensors[STATE].tolist()))
            state = {k: v for k, v in {**state, **changes}.items() if v is not None}
            tensors[STATE] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    return edit


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"blocksize": 64.0}, "blocksize 64.0 is not one bitsandbytes uses"),
        ({"blocksize": True}, "blocksize True is not one"),
        ({"dtype": ["bfloat16"]}, "dtype ['bfloat16'] is not bfloat16, float16 or float32"),
        ({"shape": [128 * 128]}, "is not two positive sizes"),
        ({"shape": [128, True]}, "is not two positive sizes"),
        ({"shape": [10**12, 10**12]}, "nf4 codes of a"),
        ({"nested_blocksize": True}, "nested_blocksize True is not one bitsandbytes uses"),
        ({"nested_offset": float("nan")}, "nested_offset nan is not a finite number"),
        ({"nested_offset": "0.5"}, "nested_offset '0.5' is not a finite number"),
        ({"nested_dtype": "float16"}, "nested_dtype 'float16' is not float32"),
        ({"quant_type": "fp4"}, "says quant_type 'fp4' under a __nf4 name"),
    ],
)
def test_a_damaged_quant_state_is_refused_naming_it_and_the_setting(case, tmp_path, changes, fragment):
    base = _rewritten(case.quantized["nf4"], tmp_path / "broken", _state_edit(**changes))
    with pytest.raises(CheckpointFormatError) as error:
        make_plan(str(base), str(case.adapter), str(tmp_path / "o"))
    assert fragment in str(error.value) and "q_proj.weight" in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.__setitem__(STATE, torch.zeros(70_000, dtype=torch.uint8)), "at most 65536 bytes"),
        (lambda t: t.__setitem__(STATE, torch.zeros(4, 50, dtype=torch.uint8)), "one dimension"),
        (
            lambda t: t.__setitem__(STATE, torch.tensor(list(b"[" * 5000 + b"]" * 5000), dtype=torch.uint8)),
            "is not the JSON bitsandbytes writes",
        ),
        (
            lambda t: t.__setitem__(
                f"{STATE[: STATE.index('.quant_state')]}.absmax",
                t[STATE.replace("quant_state.bitsandbytes__nf4", "absmax")].reshape(-1, 1),
            ),
            "needs U8 [",
        ),
        (
            lambda t: t.__setitem__(
                STATE[: STATE.index(".quant_state")], t[STATE[: STATE.index(".quant_state")]].reshape(-1)
            ),
            "stored as [n, 1]",
        ),
    ],
    ids=["huge-quant-state", "2-d-quant-state", "deep-json", "absmax-as-column", "packed-as-vector"],
)
def test_damaged_bitsandbytes_tensors_are_refused_naming_them(case, tmp_path, edit, fragment):
    def apply(tensors):
        if STATE in tensors:
            edit(tensors)

    base = _rewritten(case.quantized["nf4"], tmp_path / "broken", apply)
    with pytest.raises(CheckpointFormatError) as error:
        make_plan(str(base), str(case.adapter), str(tmp_path / "o"))
    assert fragment in str(error.value) and "q_proj.weight" in str(error.value), str(error.value)


def test_an_int8_weight_in_a_gpu_layout_is_refused_as_bitsandbytes_refuses_it(case, tmp_path):
    layout = "model.layers.0.self_attn.q_proj.weight_format"

    def turing(tensors):
        if layout in tensors:
            tensors[layout] = torch.tensor(2, dtype=torch.uint8)

    base = _rewritten(case.quantized["int8"], tmp_path / "turing", turing)
    with pytest.raises(CheckpointFormatError, match=rf"{layout} \(.*\) is col_turing, not row"):
        make_plan(str(base), str(case.adapter), str(tmp_path / "o"))


def _size_of(case, tensor: str) -> int:
    return stored_tensors(case.quantized["nf4"])[tensor].numel()


# -- memory --------------------------------------------------------------------------------------------------------

# The peak resident size of this process image (VmHWM: since exec, unlike ru_maxrss, which a child inherits from
# the process that forked it), before and after the merge.
_MEASURE = """
import json, sys
def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import make_plan
plan = make_plan(sys.argv[1], sys.argv[2], sys.argv[3] + "-plan")
before = peak()
merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"estimate": plan.estimated_peak_bytes, "before": before, "after": peak()}))
"""


def test_the_measured_peak_for_a_4bit_base_stays_within_the_plans_estimate(tmp_path):
    """One 4096×8192 nf4 weight (a 134 MB float32 tensor once dequantized) and a LoRA on it (Linux: /proc)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux) to read the peak resident size")
    from checkpoint_tools import write_adapter, write_checkpoint

    torch.manual_seed(0)
    weight = (torch.randn(4096, 8192) * 0.02).to(torch.bfloat16)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    tensors = {f"model.layers.0.mlp.up_proj.weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    tensors["model.layers.0.mlp.up_proj.weight"] = packed
    tensors["model.norm.weight"] = torch.ones(8192, dtype=torch.bfloat16)
    config = {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    base = write_checkpoint(tmp_path / "base", tensors, config=config)
    del weight, packed, state, tensors
    adapter = write_adapter(
        tmp_path / "adapter",
        {
            "model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(16, 8192) * 0.01,
            "model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(4096, 16) * 0.01,
        },
        r=16, lora_alpha=32, target_modules=["up_proj"],
    )  # fmt: skip
    script = textwrap.dedent(_MEASURE)
    done = subprocess.run(
        [sys.executable, "-c", script, str(base), str(adapter), str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    used = figures["after"] - figures["before"]
    print(f"\nmeasured {used / 2**20:.0f} MiB over the process's start, estimate {figures['estimate'] / 2**20:.0f} MiB")
    assert 4 * 4096 * 8192 <= used <= figures["estimate"], figures


# -- other architectures: MoE, GPT-2's Conv1D ----------------------------------------------------------------------


def _tiny(kind: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    common = dict(vocab_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    if kind == "mixtral":
        config = MixtralConfig(hidden_size=64, intermediate_size=128, num_local_experts=4, **common)
        return MixtralForCausalLM(config), ["q_proj"]
    if kind == "qwen2_moe":
        config = Qwen2MoeConfig(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
            num_experts=4, **common,
        )  # fmt: skip
        return Qwen2MoeForCausalLM(config), ["q_proj"]
    config = GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config), ["c_attn", "c_fc"]


@pytest.fixture(scope="module")
def architectures(tmp_path_factory):
    """Tiny Mixtral, Qwen2-MoE and GPT-2: bf16 checkpoint, its nf4 (no double quantization) save, an adapter."""
    import warnings

    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("architectures")
    built = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in ("mixtral", "qwen2_moe", "gpt2"):
            torch.manual_seed(0)
            model, targets = _tiny(kind)
            model = model.to(torch.bfloat16)
            model.save_pretrained(root / kind)
            quantized = type(model).from_pretrained(
                root / kind, quantization_config=_bnb_config(qlora.QUANTIZATIONS["nf4-single"]), device_map="cpu",
                torch_dtype=torch.bfloat16,
            )  # fmt: skip
            quantized.save_pretrained(root / f"{kind}-nf4")
            peft_model = get_peft_model(model, LoraConfig(target_modules=targets, init_lora_weights=False))
            peft_model.save_pretrained(root / f"{kind}-adapter")
            built[kind] = (root / kind, root / f"{kind}-nf4", root / f"{kind}-adapter", quantized)
    return built


def _bnb_config(settings):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**settings)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt2"])
def test_as_quantized_rounds_what_transformers_quantizes_in_moe_and_conv1d_models(architectures, kind, tmp_path):
    """transformers 5 keeps MoE experts (fused parameters) and routers in 16 bits, quantizes shared experts and
    their gate, and GPT-2's Conv1D layers (transposed)."""
    import bitsandbytes as bnb

    base, _, adapter, quantized = architectures[kind]
    expected = {f"{n}.weight" for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    plan = make_plan(str(base), str(adapter), str(tmp_path / "o"), as_quantized=NF4)
    rounded = {t.name for s in plan.shards for t in s.tensors if t.quantized is not None}
    assert rounded == expected, rounded ^ expected


@pytest.mark.parametrize("kind", ["mixtral", "gpt2"])
def test_as_quantized_equals_merging_into_transformers_own_4bit_save_of_the_same_base(architectures, kind, tmp_path):
    base, four_bit, adapter, _ = architectures[kind]
    single = as_quantized_settings("nf4", double_quant=False)
    round_tripped = merge_checkpoint(str(base), str(adapter), str(tmp_path / "a"), as_quantized=single)
    from_4bit = merge_checkpoint(str(four_bit), str(adapter), str(tmp_path / "b"))
    assert round_tripped.report.passed and from_4bit.report.passed, (
        round_tripped.report.failures,
        from_4bit.report.failures,
    )
    a, b = stored_tensors(tmp_path / "a"), stored_tensors(tmp_path / "b")
    assert set(a) == set(b) == set(stored_tensors(base))
    assert [n for n in a if not torch.equal(a[n], b[n])] == []


def test_a_gpt2_4bit_base_is_written_in_its_conv1d_orientation_and_loads_as_gpt2(architectures, tmp_path):
    from transformers import GPT2LMHeadModel

    base, four_bit, adapter, _ = architectures["gpt2"]
    result = merge_checkpoint(str(four_bit), str(adapter), str(tmp_path / "out"))
    assert result.report.passed, result.report.failures
    oracle = qlora.oracle_weights(four_bit)  # bitsandbytes' [out, in]
    deltas = qlora.peft_deltas(base, adapter, model_class=GPT2LMHeadModel)  # PEFT's, in Conv1D's [in, out]
    out = stored_tensors(tmp_path / "out")
    for name, dequantized in oracle.items():
        expected = dequantized.float().t() + deltas.get(name, 0)
        assert torch.equal(out[name], expected.to(torch.bfloat16)), name
    GPT2LMHeadModel.from_pretrained(tmp_path / "out")  # the shapes a bf16 GPT-2 has


@pytest.mark.parametrize(
    "pattern", ["o_proj", "model.layers.1", "model.layers.1.mlp", "layers.*.mlp", "mlp.gate", "proj", "lm_head"]
)
def test_skip_patterns_match_modules_as_transformers_matches_them(pattern):
    from transformers.quantizers.quantizers_utils import should_convert_module

    modules = [
        "model.layers.1.self_attn.o_proj", "model.layers.11.mlp.up_proj", "model.layers.1.mlp.gate_proj",
        "model.layers.0.mlp.gate", "lm_head", "model.layers.1.mlp.down_proj",
    ]  # fmt: skip
    for module in modules:
        assert bnb_format.skipped(module, (pattern,)) == (not should_convert_module(module, [pattern])), module
