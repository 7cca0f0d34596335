"""Merging into MXFP4 checkpoints (GPT-OSS-20B/120B fused experts), end to end.

The base is a tiny GPT-OSS built by `gpt_oss_mxfp4`; its adapter (attention and, through PEFT's
`target_parameters`, the fused experts) was trained on the dequantized twin, so the delta applies to the
dequantized float32 weight. The oracles are transformers' own MXFP4 dequantization and loader, and PEFT's merge.
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
    published_digest,
    read_raw_header,
    shards,
    stored_bytes,
    stored_tensors,
    touched_quantized_weights,
)
from gpt_oss_mxfp4 import ATTENTION, build
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from prefect_lora_merge.core.errors import LoraMergeError
from prefect_lora_merge.core.formats.mxfp4 import Mxfp4
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import make_plan
from prefect_lora_merge.core.state import record_name
from prefect_lora_merge.core.validate import validate_output

PARTS = ("_blocks", "_scales")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gpt-oss-mxfp4"))


@pytest.fixture(scope="module")
def bf16_out(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "merged"
    result = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="auto")
    return out, result


@pytest.fixture(scope="module")
def keep_out(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("keep") / "merged"
    result = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep")
    return out, result


@pytest.fixture(scope="module")
def oracle(case) -> dict[str, torch.Tensor]:
    """PEFT's merge on the dequantized twin, in float32."""
    reference = GptOssForCausalLM.from_pretrained(case.dequantized_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(reference, case.adapter_dir).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def attention_adapter(case, tmp_path_factory):
    """An adapter on attention only, trained (here: perturbed) on the dequantized twin with PEFT."""
    directory = tmp_path_factory.mktemp("attention") / "adapter"
    reference = GptOssForCausalLM.from_pretrained(case.dequantized_dir, dtype=torch.float32)
    model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(directory)
    return directory


def _transformers_dequantized(stored: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The logical [E, in, out] float32 weight, as transformers' own MXFP4 dequantization gives it."""
    return convert_moe_packed_tensors(stored[f"{name}_blocks"], stored[f"{name}_scales"], dtype=torch.float32)


def _bf16_ulp_at_a_rounding_boundary(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Where bf16 `got` is one bf16 ulp from the float32 `exact` rounded to bf16 and `exact` sits on the midpoint
    between the two (within a few float32 ulps): there two float32 sums of the same terms may round either way."""
    rounded = exact.to(torch.bfloat16)
    a, b = got.float(), rounded.float()
    neighbours = (got.view(torch.int16).int() - rounded.view(torch.int16).int()).abs() == 1
    midpoint = (a + b) / 2
    near = (exact - midpoint).abs() <= 8 * torch.finfo(torch.float32).eps * exact.abs()
    return neighbours & near


# -- recognising the format --------------------------------------------------------------------------------------


def test_mxfp4_is_recognised_by_config_and_headers_and_bf16_is_the_default(case, tmp_path):
    plan = make_plan(str(case.base_dir), str(case.adapter_dir), str(tmp_path / "out"))
    assert plan.output_dtype == "bf16"
    roles = {t.base.name: t.quantized for s in plan.shards for t in s.tensors if t.quantized is not None}
    assert {r.weight.format for r in roles.values()} == {"mxfp4"}
    dequantized = {n: r for n, r in roles.items() if r.write == "dequantized"}
    assert set(dequantized) == {f"{n}_blocks" for n in case.quantized}
    assert {r.weight.name for r in dequantized.values()} == set(case.quantized), "written under the logical name"
    assert {n for n, r in roles.items() if r.write == "dropped"} == {f"{n}_scales" for n in case.quantized}
    for name in case.quantized:
        experts, rows, groups, _ = roles[f"{name}_blocks"].weight.parts["blocks"].entry.shape
        assert roles[f"{name}_blocks"].weight.shape == (experts, groups * 32, rows)  # [E, in, out]
    for name in case.cross_shard:  # found through the index, in the shard that holds it
        weight = roles[f"{name}_blocks"].weight
        assert weight.parts["scales"].file != weight.parts["blocks"].file


def test_fp8_on_an_mxfp4_base_is_refused_pointing_at_keep(case, tmp_path):
    with pytest.raises(LoraMergeError, match=r"--output-dtype fp8 keeps a block-FP8.*MXFP4.*--output-dtype keep"):
        make_plan(str(case.base_dir), str(case.adapter_dir), str(tmp_path / "out"), output_dtype="fp8")
    assert not (tmp_path / "out").exists()


# -- bf16 output ---------------------------------------------------------------------------------------------------


def test_bf16_output_is_the_peft_merge_on_transformers_dequantization_rounded_once(case, bf16_out, oracle):
    out, result = bf16_out
    assert result.report.passed
    base, twin, merged = stored_tensors(case.base_dir), stored_tensors(case.dequantized_dir), stored_tensors(out)
    for name in case.quantized:  # the twin PEFT merged into is transformers' own dequantization of the base
        assert torch.equal(twin[name].float(), _transformers_dequantized(base, name)), name
    assert set(merged) == set(oracle)
    assert not [n for n in merged if n.endswith(PARTS)]
    boundary = 0
    for name, exact in oracle.items():
        got = merged[name]
        assert got.dtype == torch.bfloat16, name
        differ = got != exact.to(torch.bfloat16)
        assert torch.equal(differ, differ & _bf16_ulp_at_a_rounding_boundary(got, exact)), name
        boundary += int(differ.sum())
    assert boundary <= 1e-4 * sum(t.numel() for t in oracle.values())
    changed = [n for n in case.quantized if not torch.equal(oracle[n], twin[n].float())]
    assert changed == list(case.quantized), "the fixture's expert deltas reach every expert weight"


def test_bf16_output_keeps_everything_else_exactly_and_indexes_what_it_wrote(case, bf16_out):
    out, _ = bf16_out
    base, merged = stored_bytes(case.base_dir), stored_bytes(out)
    kept = [n for n in base if not n.endswith(PARTS) and not (".self_attn." in n and n.endswith("proj.weight"))]
    assert any(n.endswith("_bias") and ".experts." in n for n in kept) and any(n.endswith("sinks") for n in kept)
    for name in kept:
        assert merged[name] == base[name], f"{name} changed"
    headers = {n: e for p in shards(out) for n, e in read_raw_header(p)[0].items() if n != "__metadata__"}
    assert all(headers[n]["dtype"] == "BF16" for n in case.quantized)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(headers)
    assert {f.name for f in shards(out)} == {f.name for f in shards(case.base_dir)}
    assert index["metadata"]["total_size"] == sum(
        headers[n]["data_offsets"][1] - headers[n]["data_offsets"][0] for n in headers
    )


def test_bf16_output_loads_in_transformers_and_gives_peft_logits(case, bf16_out, oracle):
    out, _ = bf16_out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {
        k: v for k, v in json.loads((case.base_dir / "config.json").read_text()).items() if k != "quantization_config"
    }
    model, info = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    reference = GptOssForCausalLM.from_pretrained(case.dequantized_dir, dtype=torch.float32)
    reference.load_state_dict(oracle)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, reference(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2)  # bf16 weights: 2e-3 measured


# -- kept in MXFP4 ------------------------------------------------------------------------------------------------


def test_keep_output_loads_in_transformers_mxfp4_loader_on_cpu(case, keep_out):
    out, result = keep_out
    assert result.report.passed
    assert json.loads((out / "config.json").read_text()) == json.loads((case.base_dir / "config.json").read_text())
    model, info = GptOssForCausalLM.from_pretrained(
        out, quantization_config=Mxfp4Config(dequantize=True), output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}
    state, stored = model.state_dict(), stored_tensors(out)
    for name in case.quantized:
        assert torch.equal(state[name].float(), _transformers_dequantized(stored, name).to(state[name].dtype).float())


def test_an_attention_only_adapter_leaves_every_mxfp4_byte_as_it_was(case, attention_adapter, tmp_path):
    out = tmp_path / "merged"
    result = merge_checkpoint(str(case.base_dir), str(attention_adapter), str(out), output_dtype="keep")
    assert result.report.passed
    base, merged = stored_bytes(case.base_dir), stored_bytes(out)
    assert set(merged) == set(base)
    mxfp4 = [n for n in base if n.endswith(PARTS)]
    assert len(mxfp4) == 2 * len(case.quantized)
    for name in mxfp4:
        assert merged[name] == base[name], name
    assert [n for n in base if ".self_attn." in n and n.endswith("proj.weight") and merged[n] != base[n]]
    assert not [d for r in result.receipts for d in r.delta_survivals], "nothing was re-quantized"


def test_keep_output_requantizes_touched_experts_within_one_mxfp4_rounding(case, keep_out, oracle):
    out, result = keep_out
    base, merged = stored_tensors(case.base_dir), stored_tensors(out)
    weights = {
        t.quantized.weight.name: t.quantized.weight for s in result.plan.shards for t in s.touched if t.quantized
    }
    assert set(weights) == set(case.quantized)
    fmt = Mxfp4()
    for name, weight in weights.items():
        decoded = _transformers_dequantized(merged, name).double()
        intended = oracle[name].double()
        experts, inputs, rows = weight.shape
        parts = {
            "blocks": merged[f"{name}_blocks"].reshape(-1, 16),
            "scales": merged[f"{name}_scales"].reshape(-1, inputs // 32),
        }
        relative, absolute = fmt.rounding(weight, parts, slice(0, experts * inputs))
        bound = relative * intended.abs() + absolute.reshape(experts, inputs, rows)
        assert bool(((decoded - intended).abs() <= bound * (1 + 1e-6)).all()), name
        assert not torch.equal(merged[f"{name}_blocks"], base[f"{name}_blocks"]), f"{name}: the delta moved codes"


def test_keep_output_copies_everything_the_adapter_does_not_touch_byte_for_byte(case, keep_out):
    out, result = keep_out
    base, merged = stored_bytes(case.base_dir), stored_bytes(out)
    assert set(merged) == set(base)
    touched = {t.base.name for s in result.plan.shards for t in s.tensors if t.computed}
    assert {f"{n}{p}" for n in case.quantized for p in PARTS} <= touched
    kept = [n for n in base if n not in touched]
    assert any(n.endswith("_bias") and ".experts." in n for n in kept) and any(n.endswith("sinks") for n in kept)
    for name in kept:
        assert merged[name] == base[name], f"{name} changed"


def test_a_weight_whose_scales_live_in_another_shard_gets_the_same_pair_as_one_stored_together(
    case, keep_out, tmp_path
):
    together = tmp_path / "together"
    shutil.copytree(case.base_dir, together)
    index_path = together / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name in case.cross_shard:
        scales, blocks = f"{name}_scales", f"{name}_blocks"
        source, target = index["weight_map"][scales], index["weight_map"][blocks]
        moved = load_file(str(together / source))
        gaining = load_file(str(together / target))
        gaining[scales] = moved.pop(scales)
        save_file(moved, str(together / source), metadata={"format": "pt"})
        save_file(gaining, str(together / target), metadata={"format": "pt"})
        index["weight_map"][scales] = target
    index_path.write_text(json.dumps(index))
    out = tmp_path / "merged"
    assert merge_checkpoint(str(together), str(case.adapter_dir), str(out), output_dtype="keep").report.passed
    split, joined = stored_bytes(keep_out[0]), stored_bytes(out)
    output_index = json.loads((keep_out[0] / "model.safetensors.index.json").read_text())["weight_map"]
    for name in case.cross_shard:
        assert output_index[f"{name}_scales"] != output_index[f"{name}_blocks"], "the output keeps the base's layout"
        for part in PARTS:
            assert split[f"{name}{part}"] == joined[f"{name}{part}"], f"{name}{part}"


def test_keep_output_reports_how_much_of_each_delta_survived(case, keep_out, oracle):
    out, result = keep_out
    survivals = [d for r in result.receipts for d in r.delta_survivals]
    assert sorted(d.tensor for d in survivals) == touched_quantized_weights(result) == sorted(case.quantized)
    base, merged, twin = stored_tensors(case.base_dir), stored_tensors(out), stored_tensors(case.dequantized_dir)
    for figure in survivals:
        name = figure.tensor
        realised = _transformers_dequantized(merged, name) - _transformers_dequantized(base, name)
        intended = oracle[name] - twin[name].float()
        cosine = torch.nn.functional.cosine_similarity(realised.flatten().double(), intended.flatten().double(), dim=0)
        assert figure.cosine == pytest.approx(cosine.item(), abs=1e-6), name
        assert 0 < figure.relative_error < 1, name
    manifest = json.loads((out / "lora-merge-manifest.json").read_text())
    assert manifest["output_dtype"] == "keep"
    assert sorted(d["tensor"] for s in manifest["shards"] for d in s["delta_survivals"]) == sorted(case.quantized)


def test_a_delta_that_does_not_survive_fails_past_the_users_threshold(case, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(LoraMergeError, match=r"keeps too little.*--min-delta-cosine 0.9999999.*--output-dtype bf16"):
        merge_checkpoint(
            str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep", min_delta_cosine=0.9999999
        )
    assert not (out / "lora-merge-manifest.json").exists()


# -- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bf16", "keep"])
def test_validation_recomputes_every_converted_and_requantized_weight(case, bf16_out, keep_out, mode):
    _, result = {"bf16": bf16_out, "keep": keep_out}[mode]
    numbers = {n.tensor for n in result.report.numbers}
    # each under the name the output stores it by: the logical weight in bf16, its blocks (checked with its scales)
    written = {n if mode == "bf16" else f"{n}_blocks" for n in case.quantized}
    assert written <= numbers, written - numbers
    attention = {n for n in numbers if ".self_attn." in n}
    assert attention, "the attention projections the adapter touches are recomputed too"
    assert result.report.checks["tensors recomputed"] == len(case.quantized) + len(attention)
    assert all(n.flips <= 0.01 for n in result.report.numbers)


def test_validation_catches_a_requantized_weight_that_lost_its_delta(case, keep_out, tmp_path):
    out = shutil.copytree(keep_out[0], tmp_path / "damaged")
    name = sorted(case.quantized)[0]
    stored = f"{name}_blocks"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    file = index["weight_map"][stored]
    header, body = read_raw_header(out / file)
    begin, end = header[stored]["data_offsets"]
    raw = bytearray((out / file).read_bytes())
    start = len(raw) - len(body) + begin
    raw[start : start + end - begin] = stored_bytes(case.base_dir)[stored]
    (out / file).write_bytes(bytes(raw))
    manifest = json.loads((out / "lora-merge-manifest.json").read_text())
    manifest["files"][file] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (out / "lora-merge-manifest.json").write_text(json.dumps(manifest))
    plan = make_plan(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep")
    report = validate_output(plan.job.output, plan)
    assert not report.passed
    assert any(f.startswith(f"{file}: {name}") for f in report.failures), report.failures
    cli = [sys.executable, "-m", "prefect_lora_merge.cli", "validate"]
    inputs = ["--base", str(case.base_dir), "--adapter", str(case.adapter_dir), "--output", str(out)]
    check = subprocess.run([*cli, *inputs], capture_output=True, text=True, timeout=300)
    assert check.returncode != 0 and name in check.stdout + check.stderr, check.stdout + check.stderr


# -- resuming ------------------------------------------------------------------------------------------------------


def test_a_rerun_on_a_committed_keep_output_skips_every_shard_and_changes_no_byte(case, keep_out, tmp_path):
    out = shutil.copytree(keep_out[0], tmp_path / "merged")
    before = published_digest(out)
    again = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep")
    assert again.receipts and all(r.resumed for r in again.receipts)
    assert published_digest(out) == before


def test_a_partly_written_keep_output_is_finished_with_the_same_bytes(case, keep_out, tmp_path):
    out = shutil.copytree(keep_out[0], tmp_path / "merged")
    lost = next(r.file for r in keep_out[1].receipts if any(d for d in r.delta_survivals))
    (out / lost).unlink()  # as if the run died before this shard was committed
    (out / record_name(lost)).unlink()
    (out / "lora-merge-manifest.json").unlink()
    again = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep")
    assert [r.file for r in again.receipts if not r.resumed] == [lost]
    assert again.report.passed
    assert published_digest(out) == published_digest(keep_out[0])


# -- the command line ----------------------------------------------------------------------------------------------


def test_cli_merges_kept_in_mxfp4_and_validates_against_base_and_adapter(case, tmp_path):
    out = tmp_path / "merged"
    cli = [sys.executable, "-m", "prefect_lora_merge.cli"]
    inputs = ["--base", str(case.base_dir), "--adapter", str(case.adapter_dir)]
    run = subprocess.run(
        [*cli, "run", *inputs, "--output", str(out), "--output-dtype", "keep", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "MXFP4 base kept in MXFP4" in run.stdout
    assert "worst delta survival after re-quantization" in run.stdout
    check = subprocess.run([*cli, "validate", *inputs, "--output", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
