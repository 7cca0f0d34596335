"""Merging into FP8 block-quantized checkpoints (DeepSeek-V3/R1/V3.1, Kimi-K2).

The base is a tiny DeepSeek-V3-shaped FP8 checkpoint built by `deepseek_fp8`; the adapter was trained on its
dequantized weights, so the delta applies to the dequantized float32 weight.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from checkpoint_tools import (
    read_raw_header,
    shards,
    stored_bytes,
    stored_tensors,
)
from deepseek_fp8 import BLOCK, build, reference_dequantize, reference_quantize
from peft import PeftModel
from safetensors.torch import load_file
from transformers import DeepseekV3ForCausalLM

from prefect_lora_merge.core import tiling
from prefect_lora_merge.core.errors import CheckpointFormatError, LoraMergeError
from prefect_lora_merge.core.formats.block_fp8 import dequantize, quantize, requantize
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import make_plan
from prefect_lora_merge.core.validate import validate_output

SCALE = 8 / 4  # lora_alpha / r of the fixture's adapter


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build(tmp_path_factory.mktemp("deepseek-fp8"))


@pytest.fixture(scope="module")
def bf16_out(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "merged"
    result = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="auto")
    return out, result


@pytest.fixture(scope="module")
def fp8_out(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "merged"
    result = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="fp8")
    return out, result


def _attention_deltas(case) -> dict[str, torch.Tensor]:
    """ΔW = scale · B @ A for every attention projection, straight from the adapter file (fp32)."""
    adapter = load_file(str(case.adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight") and ".self_attn." in key:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = adapter[key.replace("lora_A", "lora_B")]
            deltas[f"{module}.weight"] = SCALE * (b.float() @ a.float())
    assert deltas
    return deltas


# -- recognising the format --------------------------------------------------------------------------------------


def test_block_fp8_is_recognised_by_format_and_bf16_is_the_default(case, tmp_path):
    plan = make_plan(str(case.base_dir), str(case.adapter_dir), str(tmp_path / "out"))
    assert plan.output_dtype == "bf16"
    fp8 = {t.name: t.quantized for s in plan.shards for t in s.tensors if t.quantized is not None}
    assert {n for n, role in fp8.items() if role.write == "dequantized"} == set(case.quantized)
    assert {n for n, role in fp8.items() if role.write == "dropped"} == {f"{n}_scale_inv" for n in case.quantized}
    for name in case.cross_shard:  # found through the index, in the shard that holds it
        assert fp8[name].weight.parts["scales"].file != fp8[name].weight.parts["codes"].file


def test_kimi_k2_takes_the_same_path(case, tmp_path):
    kimi = tmp_path / "kimi"
    shutil.copytree(case.base_dir, kimi)
    config = json.loads((kimi / "config.json").read_text())
    config["model_type"] = "kimi_k2"
    (kimi / "config.json").write_text(json.dumps(config))
    deepseek = make_plan(str(case.base_dir), str(case.adapter_dir), str(tmp_path / "a"), output_dtype="fp8")
    kimi_plan = make_plan(str(kimi), str(case.adapter_dir), str(tmp_path / "b"), output_dtype="fp8")
    assert kimi_plan.shards == deepseek.shards, "the same tensors get the same treatment whatever model_type says"
    merge_checkpoint(str(kimi), str(case.adapter_dir), str(tmp_path / "kimi-out"), output_dtype="fp8")
    merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(tmp_path / "ds-out"), output_dtype="fp8")
    for path in shards(tmp_path / "ds-out"):
        assert (tmp_path / "kimi-out" / path.name).read_bytes() == path.read_bytes()


# -- bf16 output ---------------------------------------------------------------------------------------------------


def test_bf16_output_equals_dequantize_plus_delta_rounded_once(case, bf16_out):
    out, result = bf16_out
    assert result.report.passed
    base, merged = stored_tensors(case.base_dir), stored_tensors(out)
    deltas = _attention_deltas(case)
    for name in case.quantized:
        dequantized = reference_dequantize(base[name], base[f"{name}_scale_inv"])
        expected = (dequantized + deltas[name] if name in deltas else dequantized).to(torch.bfloat16)
        if ".experts." in name and ".layers.3." not in name:
            continue  # expert deltas come from the fused adapter tensors: checked against PEFT below
        assert merged[name].dtype == torch.bfloat16, name
        assert torch.equal(merged[name], expected), name
    assert not [n for n in merged if n.endswith("_scale_inv")]


def test_bf16_output_keeps_everything_else_exactly(case, bf16_out):
    out, _ = bf16_out
    base, merged = stored_bytes(case.base_dir), stored_bytes(out)
    kept = [n for n in base if n not in case.quantized and not n.endswith("_scale_inv")]
    assert any(n.endswith("e_score_correction_bias") for n in kept) and any(".layers.3." in n for n in kept)
    for name in kept:
        assert merged[name] == base[name], f"{name} changed"
    headers = {n: e for p in shards(out) for n, e in read_raw_header(p)[0].items() if n != "__metadata__"}
    assert headers["model.layers.1.mlp.gate.e_score_correction_bias"]["dtype"] == "F32"
    assert all(headers[n]["dtype"] == "BF16" for n in case.quantized)
    assert set(case.mtp_tensors) - {n for n in case.mtp_tensors if n.endswith("_scale_inv")} <= set(headers)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {
        k: v for k, v in json.loads((case.base_dir / "config.json").read_text()).items() if k != "quantization_config"
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(headers)
    assert index["metadata"]["total_size"] == sum(
        headers[n]["data_offsets"][1] - headers[n]["data_offsets"][0] for n in headers
    )


def test_bf16_output_loads_in_transformers_and_matches_peft_on_the_dequantized_model(case, bf16_out):
    out, _ = bf16_out
    reference = DeepseekV3ForCausalLM.from_pretrained(case.dequantized_dir, dtype=torch.float32)
    oracle = PeftModel.from_pretrained(reference, case.adapter_dir).merge_and_unload().state_dict()
    loaded = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert set(loaded) == set(oracle)
    # Everything is bf16 in the output but the router's fp32 bias, which must come back exactly as it was.
    expected = {
        n: v if n.endswith("e_score_correction_bias") else v.to(torch.bfloat16).float() for n, v in oracle.items()
    }
    mismatched = [n for n in oracle if not torch.equal(loaded[n], expected[n])]
    assert not mismatched, mismatched[:5]
    original = DeepseekV3ForCausalLM.from_pretrained(case.dequantized_dir, dtype=torch.float32).state_dict()
    changed = [n for n in oracle if ".experts." in n and not torch.equal(oracle[n], original[n])]
    assert changed, "the fixture's expert deltas must reach the weights"


# -- fp8 output ----------------------------------------------------------------------------------------------------


def test_fp8_output_keeps_untouched_fp8_weights_and_scales_byte_for_byte(case, fp8_out):
    out, result = fp8_out
    assert result.report.passed
    base, merged = stored_bytes(case.base_dir), stored_bytes(out)
    assert set(merged) == set(base)
    touched = {t.name for s in result.plan.shards for t in s.touched}
    untouched = [n for n in case.quantized if n not in touched]
    assert untouched and touched
    for name in untouched:
        assert merged[name] == base[name] and merged[f"{name}_scale_inv"] == base[f"{name}_scale_inv"], name
    for name in base:
        if name not in case.quantized and not name.endswith("_scale_inv"):
            assert merged[name] == base[name], name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [BLOCK, BLOCK]
    mtp_shard = next(r for r in result.receipts if r.file.startswith("model-00004"))
    assert mtp_shard.copied_server_side, "a shard with nothing touched is copied, not rewritten"


def test_fp8_output_requantizes_touched_weights_with_fresh_scales_wherever_the_scales_live(case, fp8_out):
    out, result = fp8_out
    base, merged = stored_tensors(case.base_dir), stored_tensors(out)
    deltas = _attention_deltas(case)
    for name, delta in deltas.items():
        intended = reference_dequantize(base[name], base[f"{name}_scale_inv"]) + delta
        codes, grid = reference_quantize(intended)
        assert torch.equal(merged[name].view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(merged[f"{name}_scale_inv"], grid), f"{name}_scale_inv"
    assert set(case.cross_shard) <= set(deltas)


def test_each_requantized_weight_is_computed_once_per_shard_that_stores_a_half_of_it(
    case, fp8_out, tmp_path, monkeypatch
):
    from prefect_lora_merge.core.formats.block_fp8 import BlockFp8

    calls: list[str] = []
    real = BlockFp8.requantize
    monkeypatch.setattr(
        BlockFp8, "requantize", lambda self, weight, *a: calls.append(weight.name) or real(self, weight, *a)
    )
    out = tmp_path / "merged"
    merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="fp8")
    touched = {t.name for s in fp8_out[1].plan.shards for t in s.touched if t.quantized is not None}
    # once where codes and scales share a shard; in each of the two shards where they do not
    assert sorted(calls) == sorted([*touched, *(set(case.cross_shard) & touched)])
    for path in shards(fp8_out[0]):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_fp8_output_reports_how_much_of_each_delta_survived(case, fp8_out):
    out, result = fp8_out
    touched = sorted(t.name for s in result.plan.shards for t in s.touched if t.quantized is not None)
    figures = {d.tensor: d for r in result.receipts for d in r.delta_survivals}
    assert sorted(figures) == touched
    base, merged = stored_tensors(case.base_dir), stored_tensors(out)
    for name, delta in _attention_deltas(case).items():
        realised = reference_dequantize(merged[name], merged[f"{name}_scale_inv"]) - reference_dequantize(
            base[name], base[f"{name}_scale_inv"]
        )
        cosine = torch.nn.functional.cosine_similarity(realised.flatten().double(), delta.flatten().double(), dim=0)
        assert figures[name].cosine == pytest.approx(cosine.item(), abs=1e-6)
        assert 0 < figures[name].relative_error < 1
    manifest = json.loads((out / "lora-merge-manifest.json").read_text())
    assert manifest["output_dtype"] == "keep"
    assert sorted(d["tensor"] for s in manifest["shards"] for d in s["delta_survivals"]) == touched


def test_validation_recomputes_every_converted_and_requantized_weight(case, bf16_out, fp8_out):
    for (_, result), expected in ((bf16_out, set(case.quantized)), (fp8_out, set(_attention_deltas(case)))):
        numbers = {n.tensor: n for n in result.report.numbers}
        assert expected <= set(numbers), expected - set(numbers)
        assert all(n.flips <= 0.01 for n in numbers.values())


def test_validation_catches_a_requantized_weight_that_lost_its_delta(case, fp8_out, tmp_path):
    out = shutil.copytree(fp8_out[0], tmp_path / "damaged")
    name = sorted(_attention_deltas(case))[0]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    file = index["weight_map"][name]
    header, body = read_raw_header(out / file)
    begin, end = header[name]["data_offsets"]
    base_codes = stored_bytes(case.base_dir)[name]
    raw = bytearray((out / file).read_bytes())
    start = len(raw) - len(body) + begin
    raw[start : start + end - begin] = base_codes
    (out / file).write_bytes(bytes(raw))
    manifest = json.loads((out / "lora-merge-manifest.json").read_text())
    manifest["files"][file] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (out / "lora-merge-manifest.json").write_text(json.dumps(manifest))
    plan = make_plan(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="fp8")
    report = validate_output(plan.job.output, plan)
    assert any(f.startswith(f"{file}: {name} rows") for f in report.failures), report.failures


def test_a_delta_that_does_not_survive_fails_the_shard_past_the_users_threshold(case, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(LoraMergeError, match=r"keeps too little.*--min-delta-cosine 0.9999999.*--output-dtype bf16"):
        merge_checkpoint(
            str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="fp8", min_delta_cosine=0.9999999
        )
    assert not (out / "lora-merge-manifest.json").exists()
    committed = [p.name for p in shards(out)]
    assert "model-00001-of-00004.safetensors" not in committed, "the failing shard committed nothing"


def test_an_untouched_weight_survives_dequantize_and_requantize_exactly(case):
    base = stored_tensors(case.base_dir)
    for name in case.quantized:
        codes, scales = base[name], base[f"{name}_scale_inv"]
        again_codes, again_scales = quantize(dequantize(codes, scales, (BLOCK, BLOCK)), (BLOCK, BLOCK))
        assert torch.equal(again_codes.view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(again_scales, scales), name


def test_with_power_of_two_scales_the_round_trip_keeps_every_value(tmp_path):
    """ue8m0 (V3.1): a block whose largest code is exactly 224 comes back as 448 at half the scale: the same
    values, another encoding. Values are what must survive; untouched weights are never re-encoded anyway."""
    torch.manual_seed(0)
    weight = 0.03 * torch.randn(300, 200)
    codes, scales = quantize(weight, (BLOCK, BLOCK), ue8m0=True)
    assert torch.equal(torch.log2(scales), torch.log2(scales).round()), "scales are powers of two"
    values = dequantize(codes, scales, (BLOCK, BLOCK))
    assert torch.equal(values, reference_dequantize(codes, scales))
    assert torch.equal(dequantize(*quantize(values, (BLOCK, BLOCK), ue8m0=True), (BLOCK, BLOCK)), values)


def test_ue8m0_checkpoints_are_requantized_with_power_of_two_scales(tmp_path):
    case = build(tmp_path / "v31", ue8m0=True, seed=1)
    out = tmp_path / "merged"
    result = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="fp8")
    assert result.report.passed
    merged = stored_tensors(out)
    for name in {t.name for s in result.plan.shards for t in s.touched if t.quantized is not None}:
        grid = merged[f"{name}_scale_inv"]
        assert torch.equal(torch.log2(grid), torch.log2(grid).round()), name


def test_tile_by_tile_gives_the_same_bytes_as_whole_tensors(case, bf16_out, fp8_out, tmp_path, monkeypatch):
    """The fixture's weights fit in one tile; one block per tile cuts every weight, ragged edges included."""
    monkeypatch.setattr(tiling, "TILE_VALUES", BLOCK * BLOCK)
    for mode, (reference, result) in (("bf16", bf16_out), ("fp8", fp8_out)):
        out = tmp_path / mode
        tiled = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype=mode)
        for path in shards(reference):
            assert (out / path.name).read_bytes() == path.read_bytes(), (mode, path.name)
        cosines = [d.cosine for r in tiled.receipts for d in r.delta_survivals]
        assert cosines == pytest.approx([d.cosine for r in result.receipts for d in r.delta_survivals], abs=1e-6)


def test_requantize_is_quantize_of_the_merged_weight_with_exact_survival_figures(monkeypatch):
    monkeypatch.setattr(tiling, "TILE_VALUES", 2 * BLOCK * BLOCK)
    torch.manual_seed(3)
    codes, scales = quantize(0.02 * torch.randn(300, 700), (BLOCK, BLOCK))  # ragged both ways, 3 x 6 blocks
    delta = 0.002 * torch.randn(300, 4) @ torch.randn(4, 700)
    base = dequantize(codes, scales, (BLOCK, BLOCK))
    new_codes, new_scales, survival = requantize(
        codes, scales, (BLOCK, BLOCK), lambda values, rows, cols: values + delta[rows, cols], ue8m0=False, tensor="w"
    )
    expected_codes, expected_scales = quantize(base + delta, (BLOCK, BLOCK))
    assert torch.equal(new_codes.view(torch.uint8), expected_codes.view(torch.uint8))
    assert torch.equal(new_scales, expected_scales)
    intended = ((base + delta) - base).double().flatten()
    realised = (dequantize(new_codes, new_scales, (BLOCK, BLOCK)) - base).double().flatten()
    assert survival.tensor == "w"
    cosine = float(intended @ realised / (intended.norm() * realised.norm()))
    assert survival.cosine == pytest.approx(cosine, abs=1e-6)
    assert survival.relative_norm == pytest.approx(float(realised.norm() / intended.norm()), rel=1e-6)
    assert survival.relative_error == pytest.approx(float((realised - intended).norm() / intended.norm()), rel=1e-5)
    assert 0.5 < survival.cosine < 1, "a delta this small loses part of itself to FP8 rounding"


def test_nan_codes_decode_to_nan_as_torch_decodes_them():
    codes = torch.tensor([[0x7F, 0xFF, 0x7E, 0x01]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    values = dequantize(codes, torch.ones(1, 1), (BLOCK, BLOCK))
    assert torch.equal(values.isnan(), codes.float().isnan())
    assert values[0, 2:].tolist() == codes.float()[0, 2:].tolist()


# -- bad inputs ----------------------------------------------------------------------------------------------------


def test_an_fp8_weight_without_its_scale_is_refused_by_name(case, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(case.base_dir, broken)
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = "model.layers.0.self_attn.o_proj.weight"
    file = index["weight_map"].pop(f"{victim}_scale_inv")
    tensors = load_file(str(broken / file))
    del tensors[f"{victim}_scale_inv"]
    from safetensors.torch import save_file

    save_file(tensors, str(broken / file), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=f"{victim}.*without a {victim}_scale_inv"):
        make_plan(str(broken), str(case.adapter_dir), str(tmp_path / "out"))


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_a_nan_code_in_a_touched_base_weight_is_blamed_on_the_base(case, tmp_path, mode):
    broken = tmp_path / "broken"
    shutil.copytree(case.base_dir, broken)
    victim = "model.layers.0.self_attn.o_proj.weight"
    file = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][victim]
    header, body = read_raw_header(broken / file)
    begin = header[victim]["data_offsets"][0]
    raw = bytearray((broken / file).read_bytes())
    raw[len(raw) - len(body) + begin + 5] = 0x7F  # e4m3fn NaN
    (broken / file).write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match=f"{victim} holds NaN/Inf after dequantizing.*damaged"):
        merge_checkpoint(str(broken), str(case.adapter_dir), str(tmp_path / "out"), output_dtype=mode)


def test_fp8_without_a_block_size_is_refused(case, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(case.base_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["quantization_config"]["weight_block_size"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="weight_block_size"):
        make_plan(str(broken), str(case.adapter_dir), str(tmp_path / "out"))


def test_output_dtype_on_a_checkpoint_without_fp8_is_refused(llama_case, tmp_path):
    with pytest.raises(LoraMergeError, match="--output-dtype fp8.*no quantized weights"):
        make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(tmp_path / "out"), output_dtype="fp8")


def test_cli_merges_in_fp8_and_validates_against_base_and_adapter(case, tmp_path):
    out = tmp_path / "merged"
    cli = [sys.executable, "-m", "prefect_lora_merge.cli"]
    inputs = ["--base", str(case.base_dir), "--adapter", str(case.adapter_dir)]
    run = subprocess.run(
        [*cli, "run", *inputs, "--output", str(out), "--output-dtype", "fp8", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "block-FP8 base kept in block-FP8" in run.stdout
    assert "worst delta survival after re-quantization" in run.stdout
    check = subprocess.run([*cli, "validate", *inputs, "--output", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_same_bytes_as_cpu(case, bf16_out, fp8_out, tmp_path):
    for mode, (reference, _) in (("bf16", bf16_out), ("fp8", fp8_out)):
        out = tmp_path / mode
        merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype=mode, device="cuda")
        for path in shards(reference):
            assert (out / path.name).read_bytes() == path.read_bytes(), (mode, path.name)


def test_an_fp8_output_whose_records_an_earlier_version_wrote_resumes_with_its_survival_figures(
    case, fp8_out, tmp_path
):
    """Before `keep` and INT4/MXFP4 existed, records called the figures `fp8_deltas` and the mode `fp8`: such an
    output is still this merge (same fingerprint), its shards are not merged again, and their figures are kept."""
    out = tmp_path / "merged"
    shutil.copytree(fp8_out[0], out)
    for record in (out / ".lora-merge" / "shards").glob("*.json"):
        data = json.loads(record.read_text())
        data["fp8_deltas"] = data.pop("delta_survivals")
        record.write_text(json.dumps(data))
    result = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="fp8")
    assert all(r.resumed for r in result.receipts)
    figures = [d.tensor for r in result.receipts for d in r.delta_survivals]
    assert sorted(figures) == sorted(d.tensor for r in fp8_out[1].receipts for d in r.delta_survivals) != []
